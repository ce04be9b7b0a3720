"""``stt serve`` as a real process: the official ``openai`` client for every response format,
OpenAI-style errors, limits, auth, health, and start-up failures that say what to set."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import ROOT, SAMPLE
from whisper_checkpoint import write_checkpoint

from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.engines.http import encode_wav
from stt.transport.nats_server import free_port

API_KEY = "test-key"


class ServeProcess:
    """``python -m stt serve ...`` on a free loopback port; stop() and start() keep the port."""

    def __init__(self, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.port = port or free_port()
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self.leftover_children: list[int] = []  # child processes still alive after stop()
        self.log = tempfile.NamedTemporaryFile(prefix="stt-serve-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def start(self, timeout_s: float = 90.0) -> ServeProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("STT_", "WHISPER_"))}  # the test decides every setting
        env.update({"STT_LOG_LEVEL": "WARNING", "OMP_NUM_THREADS": "1", **self.env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stt", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             *self.args], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"stt serve exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"stt serve did not answer in {timeout_s} s:\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM, as an orchestrator would; records the exit code and any orphaned children."""
        import psutil

        if self.proc is not None and self.proc.poll() is None:
            children = psutil.Process(self.proc.pid).children(recursive=True)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            _, alive = psutil.wait_procs(children, timeout=5)
            self.leftover_children = [p.pid for p in alive]
            for p in alive:  # do not leave them running whatever the test says
                p.kill()
        if self.proc is not None:
            self.returncode = self.proc.returncode
        self.proc = None

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    return encode_wav(samples, rate)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return wav_bytes(load_16k_mono(str(SAMPLE))[: 4 * SAMPLE_RATE])  # 128 kB


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    """The default engine: faster-whisper with the embedded tiny.en (real Whisper, offline)."""
    with ServeProcess("--whisper-cpu-threads", "1",
                      "--serve-max-bytes", "400000", "--serve-api-key", API_KEY) as server:
        yield server


# --- the official OpenAI client ---------------------------------------------------------------


def test_openai_client_every_response_format(server: ServeProcess, clip: bytes) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)

    def create(fmt: str, **kwargs: object) -> object:
        return client.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip),
                                                  response_format=fmt, **kwargs)

    as_json = create("json")
    assert isinstance(as_json.text, str) and len(as_json.text.split()) >= 3  # type: ignore[attr-defined]

    as_text = create("text", language="en", prompt="a novel", temperature=0.0)
    assert isinstance(as_text, str) and as_text.strip() == as_json.text  # type: ignore[attr-defined]

    srt = create("srt")
    assert isinstance(srt, str) and srt.startswith("1\n00:00:00,000 --> 00:00:0")

    vtt = create("vtt")
    assert isinstance(vtt, str) and vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")

    verbose = create("verbose_json", timestamp_granularities=["word", "segment"])
    assert verbose.language == "english"  # type: ignore[attr-defined]
    assert verbose.duration == pytest.approx(4.0, abs=0.01)  # type: ignore[attr-defined]
    assert verbose.segments and verbose.segments[0].end > verbose.segments[0].start  # type: ignore[attr-defined]
    words = verbose.words  # type: ignore[attr-defined]
    assert words and all(0 <= w.start <= w.end <= 4.01 for w in words)
    assert " ".join(w.word for w in words) == verbose.text  # type: ignore[attr-defined]

    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny.en"]


def test_openai_client_sees_openai_style_errors(server: ServeProcess, clip: bytes) -> None:
    openai = pytest.importorskip("openai")
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        wrong.audio.transcriptions.create(model="whisper-1", file=("a.wav", clip))
    assert auth.value.code == "invalid_api_key"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"not audio"))
    assert bad.value.code == "invalid_audio" and bad.value.param == "file"


# --- the HTTP surface --------------------------------------------------------------------------


def test_errors_limits_and_health(server: ServeProcess, clip: bytes) -> None:
    url = server.url
    auth = {"Authorization": f"Bearer {API_KEY}"}
    post = url + "/v1/audio/transcriptions"

    def error(response: httpx.Response, status: int) -> dict[str, object]:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body

    assert error(httpx.post(post, files={"file": ("a.wav", clip)}), 401)["code"] == \
        "invalid_api_key"
    assert error(httpx.post(post, headers=auth, data={"model": "whisper-1"}), 400)["param"] == "file"
    body = error(httpx.post(post, headers=auth, files={"file": ("a.wav", clip)},
                            data={"response_format": "mp4"}), 400)
    assert body["param"] == "response_format"
    body = error(httpx.post(post, headers=auth, files={"file": ("a.wav", clip)},
                            data={"timestamp_granularities[]": "word"}), 400)
    assert body["param"] == "timestamp_granularities"
    body = error(httpx.post(post, headers=auth, files={"file": ("a.wav", clip)},
                            data={"temperature": "hot"}), 400)
    assert body["param"] == "temperature"
    body = error(httpx.post(post, headers=auth, files={"file": ("a.wav", clip)},
                            data={"language": "en; rm -rf"}), 400)
    assert body["param"] == "language"
    short = wav_bytes(np.zeros(SAMPLE_RATE // 20, dtype=np.float32))
    assert error(httpx.post(post, headers=auth, files={"file": ("a.wav", short)}), 400)["code"] == \
        "audio_too_short"
    big = wav_bytes(np.zeros(15 * SAMPLE_RATE, dtype=np.float32))  # 480 kB > 400 kB
    assert error(httpx.post(post, headers=auth, files={"file": ("a.wav", big)}), 413)["code"] == \
        "request_too_large"
    error(httpx.get(url + "/v1/nothing-here", headers=auth), 404)
    error(httpx.get(url + "/v1/models/whisper-9", headers=auth), 404)
    assert httpx.get(url + "/v1/models/tiny.en", headers=auth).json()["id"] == "tiny.en"
    assert httpx.get(url + "/v1/models").status_code == 401

    # A damaged file is refused; another sample rate is resampled.
    response = httpx.post(post, headers=auth, files={"file": ("s.flac", SAMPLE.read_bytes()[:50])})
    assert error(response, 400)["code"] == "invalid_audio"
    two_s = load_16k_mono(str(SAMPLE))[: 2 * SAMPLE_RATE]
    upsampled = wav_bytes(np.repeat(two_s, 3), rate=48000)
    response = httpx.post(post, headers=auth, files={"file": ("a.wav", upsampled)},
                          data={"response_format": "verbose_json"})
    assert response.status_code == 200 and response.json()["duration"] == pytest.approx(2.0, abs=0.01)

    for path in ("/health", "/healthz", "/readyz"):
        assert httpx.get(url + path).status_code == 200


# --- start-up -------------------------------------------------------------------------------


def test_missing_model_offline_fails_at_start_saying_what_to_set(tmp_path: Path) -> None:
    pytest.importorskip("whisper")
    # A proxy that refuses connections stands for "no internet", so nothing is downloaded.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STT_", "WHISPER_"))}
    env.update(https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               no_proxy="", NO_PROXY="")
    named = subprocess.run(
        [sys.executable, "-m", "stt", "serve", "--engine", "whisper", "--whisper-model-size", "tiny",
         "--whisper-download-root", str(tmp_path), "--whisper-device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert named.returncode == 2, named.stderr
    assert "WHISPER_DOWNLOAD_ROOT" in named.stderr and "tiny.pt" in named.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "stt", "serve", "--engine", "whisper", "--whisper-model-size",
         str(tmp_path / "x.pt")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "WHISPER_MODEL_SIZE" in missing.stderr
    bad = subprocess.run([sys.executable, "-m", "stt", "serve", "--serve-port", "0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "STT_SERVE_PORT" in bad.stderr


def test_serves_the_local_whisper_engine(tmp_path: Path, clip: bytes) -> None:
    pytest.importorskip("whisper")
    checkpoint = write_checkpoint(tmp_path / "random.pt")
    with ServeProcess("--engine", "whisper", "--whisper-model-size", str(checkpoint),
                      "--whisper-device", "cpu",
                      "--whisper-cpu-threads", "1") as server:
        health = httpx.get(server.url + "/health").json()
        assert health["model"] == "random" and health["engine"]["name"] == "whisper"
        response = httpx.post(server.url + "/v1/audio/transcriptions", timeout=60,
                              files={"file": ("a.wav", clip)},
                              data={"response_format": "verbose_json", "language": "en",
                                    "timestamp_granularities[]": ["word", "segment"]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["text"], str) and body["language"] == "english"
        assert all(0 <= s["start"] <= s["end"] <= 4.01 for s in body["segments"])
        assert isinstance(body["words"], list)
        srt = httpx.post(server.url + "/v1/audio/transcriptions", timeout=60,
                         files={"file": ("a.wav", clip)}, data={"response_format": "srt"})
        assert srt.status_code == 200 and srt.headers["content-type"].startswith("text/plain")


def test_silence_is_an_empty_text_and_a_bad_language_is_a_client_error(server: ServeProcess,
                                                                       clip: bytes) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    silence = wav_bytes(np.zeros(3 * SAMPLE_RATE, dtype=np.float32))
    response = httpx.post(server.url + "/v1/audio/transcriptions", headers=headers, timeout=60,
                          files={"file": ("silence.wav", silence)})
    assert response.status_code == 200 and response.json() == {"text": ""}, response.text
    # tiny.en is English-only: asking for German is the client's mistake (400), not a 500
    # that the official client would retry three times.
    response = httpx.post(server.url + "/v1/audio/transcriptions", headers=headers, timeout=60,
                          files={"file": ("a.wav", clip)}, data={"language": "de"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "language"
    assert "English-only" in error["message"]


def test_a_proxy_in_front_passes_the_language_error_on_as_400(server: ServeProcess,
                                                               clip: bytes) -> None:
    """``stt serve --engine http`` in front of another service: the upstream's 400 about the
    language stays a 400 naming ``language``, not a 500 that clients would retry."""
    with ServeProcess("--engine", "http", env={"WHISPER_URL": server.url,
                                               "WHISPER_API_KEY": API_KEY}) as proxy:
        response = httpx.post(proxy.url + "/v1/audio/transcriptions", timeout=60,
                              files={"file": ("a.wav", clip)}, data={"language": "de"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "language"
        assert "English-only" in error["message"]
        response = httpx.post(proxy.url + "/v1/audio/transcriptions", timeout=60,
                              files={"file": ("a.wav", clip)}, data={"language": "en"})
        assert response.status_code == 200 and response.json()["text"], response.text


# --- help, STT_ENGINE, logs ---------------------------------------------------------------------


def test_help_names_the_real_default_engine_and_stt_engine_is_read() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STT_", "WHISPER_"))}
    helped = subprocess.run([sys.executable, "-m", "stt", "serve", "--help"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert "[env STT_ENGINE, default 'faster-whisper']" in text and "sphinx" not in text
    chosen = subprocess.run([sys.executable, "-m", "stt", "serve"], cwd=ROOT,
                            env={**env, "STT_ENGINE": "no.such.module:Engine"},
                            capture_output=True, text=True, timeout=60)
    assert chosen.returncode == 2 and "STT_ENGINE='no.such.module:Engine'" in chosen.stderr


def test_logs_carry_no_colour_codes_and_no_doubled_prefix(caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    import json

    from starlette.testclient import TestClient

    from stt.api.serve import create_app
    from stt.config import Settings
    from stt.engines.base import EngineError

    with ServeProcess("--whisper-cpu-threads", "1",
                      env={"STT_LOG_LEVEL": "INFO", "STT_LOG_FORMAT": "json"}) as served:
        pass
    lines = [json.loads(line) for line in served.output().splitlines() if line.startswith("{")]
    assert any(line["logger"].startswith("uvicorn") for line in lines), served.output()
    assert "\x1b" not in served.output() and "color_message" not in served.output()
    start = next(line for line in lines if line["msg"] == "starting stt serve")
    assert set(start["settings"]) <= {"engine", "serve_host", "serve_port", "whisper_cpu_threads",
                                      "log_format"}, start

    class Broken:
        name = "broken"

        def describe(self) -> dict[str, str]:
            return {"name": self.name}

        async def transcribe(self, audio: object, options: object) -> None:
            raise EngineError("the GPU fell off")

    client = TestClient(create_app(Broken(), Settings.from_env({})))  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="stt.serve"):
        response = client.post("/v1/audio/transcriptions",
                               files={"file": ("a.wav", wav_bytes(np.ones(8000, np.float32) / 4))})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "Transcription failed: the GPU fell off"
    messages = [r.getMessage() for r in caplog.records if r.name == "stt.serve"]
    assert messages == ["Transcription failed: the GPU fell off"], messages
