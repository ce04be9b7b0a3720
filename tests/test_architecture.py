"""Dependencies inside ``stt/`` point one way: the folders are layers (``LAYERS``: what each may
import), no import cycle (type-checking imports included), and only the CLI, which wires
everything together, imports the worker."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "stt"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] \
                    if node.level else []
                target = ".".join([*base, *([node.module] if node.module else [])])
                candidates = {target} | {f"{target}.{a.name}" for a in node.names}
                deps |= {c for c in candidates if c in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in modules}
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                found.append([*path[path.index(dep):], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(node)

    for node in sorted(graph):
        visit(node, [node])
    return found


# Each folder of the package and what it may import besides itself, bottom up. The session is
# sans-I/O (core), built from its own parameters; the wire format knows nothing else; config
# builds the core's parameters from the environment; engines, operations and the cluster sit
# on those; the NATS transport runs them; the HTTP/websocket front doors use the transport;
# the CLI wires everything.
LAYERS: dict[str, set[str]] = {
    "wire": set(),
    "core": {"wire"},
    "config": {"wire", "core"},
    "engines": {"wire", "core", "config"},
    "ops": {"wire", "core", "config"},
    "cluster": {"wire", "core", "config"},
    "transport": {"wire", "core", "config", "engines", "ops", "cluster"},
    "api": {"wire", "core", "config", "engines", "ops", "transport"},
    "cli": {"wire", "core", "config", "engines", "ops", "cluster", "transport", "api"},
}


def layer(module: str) -> str:
    """``stt.core.session`` -> core, ``stt.config`` -> config, ``stt`` -> stt."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, d) for m, deps in graph.items() for d in deps
                  if layer(m) in LAYERS and layer(d) != layer(m)
                  and layer(d) not in LAYERS[layer(m)] and d != "stt")


def test_every_module_is_in_a_layer() -> None:
    graph = import_graph()
    outside = sorted(m for m in graph if layer(m) not in LAYERS and m not in ("stt", "stt.__main__"))
    assert outside == [], "a module outside the layers: put it in a folder of LAYERS"


def test_dependencies_point_down_the_layers() -> None:
    assert violations(import_graph()) == []


def test_the_layer_check_finds_a_violation() -> None:
    assert violations({"stt.core.session": {"stt.transport.worker", "stt.wire.protocol"}}) == [
        ("stt.core.session", "stt.transport.worker")]


def test_the_session_is_built_without_settings() -> None:
    """The core takes its own typed parameters (``Settings.session_profile`` builds them)."""
    for path in (PACKAGE / "core").glob("*.py"):
        assert "Settings" not in path.read_text().replace("Settings.session_profile", ""), path


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert "stt.transport.worker" in graph and "stt.ops.status" in graph
    assert cycles(graph) == []


def test_only_the_cli_imports_the_worker() -> None:
    graph = import_graph()
    importers = {m for m, deps in graph.items() if "stt.transport.worker" in deps}
    assert importers and {layer(m) for m in importers} == {"cli"}, importers


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_a_session_reads_no_clock_and_does_no_io() -> None:
    """The session and its parts get the time as an argument; only the worker has a clock."""
    banned = {"time", "datetime", "asyncio", "socket", "nats", "threading", "stt.transport.worker",
              "stt.engines.local", "stt.engines.http"}
    for name in ("core/session", "core/segmenter", "core/stabilizer", "core/turn",
                 "wire/protocol"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & banned, (name, imported & banned)
    graph = import_graph()
    for part in ("stt.core.segmenter", "stt.core.stabilizer"):  # below the session: no protocol either
        assert not graph[part] & {"stt.core.session", "stt.wire.protocol"}, (part, graph[part])
