"""The command line as a user runs it: real processes, a real nats-server."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from typing import Any

from conftest import ROOT, SAMPLE, make_settings

from stt.cli.wiring import build_worker
from stt.transport.nats_server import NatsServer

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def stt(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stt", *args], cwd=ROOT, env={**ENV, **env},
                          capture_output=True, text=True, timeout=timeout)


async def test_stream_prints_partials_finals_and_exits_after_end(worker_factory: Any,
                                                                  nats_server: NatsServer) -> None:
    await worker_factory(partial_interval_s=0.5, engine_workers=2)
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stt", "tail", "--nats-url", nats_server.url, cwd=ROOT, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert tail.stderr is not None
    await tail.stderr.readline()  # "listening on ..."
    out = await asyncio.to_thread(stt, "stream", str(SAMPLE), "--nats-url", nats_server.url,
                                  "--speed", "4", "--session-id", "cli", "--print-text")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("FINAL" in line for line in lines) and "END reason=end" in out.stdout
    assert "dashwood" in lines[-1].lower() or "john" in lines[-1].lower()  # --print-text
    tail.terminate()
    tailed = (await tail.communicate())[0].decode()
    assert "[cli #1]" in tailed and "FINAL" in tailed and "END" in tailed


def test_stream_says_when_no_worker_answers(nats_server: NatsServer) -> None:
    out = stt("stream", str(SAMPLE), "--nats-url", nats_server.url, "--speed", "0",
              "--timeout", "2")
    assert out.returncode == 1 and "is a worker running" in out.stderr


def test_demo_runs_offline_with_embedded_server() -> None:
    out = stt("demo", "--speed", "8", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "FINAL" in out.stdout and "transcript:" in out.stdout
    # one final per sentence of the sample, give or take the pauses the silence timeout merges
    finals = int(re.search(r"(\d+) finals", out.stdout).group(1))  # type: ignore[union-attr]
    assert 3 <= finals <= 5


def test_demo_with_replicas_shares_the_partitions_and_serves_the_session_once() -> None:
    out = stt("demo", "--replicas", "3", "--speed", "0", "--engine",
              "bench.null_engine:InstantEngine", timeout=300)
    assert out.returncode == 0, out.stderr
    shares = [(int(m.group(1)), bool(m.group(2)))
              for m in re.finditer(r"^replica \w+: (\d+) partitions( \(with demo-)?", out.stdout, re.M)]
    assert len(shares) == 3 and sum(n for n, _ in shares) == 32, out.stdout
    assert all(10 <= n <= 11 for n, _ in shares) and sum(w for _, w in shares) == 1, out.stdout
    assert "END reason=end" in out.stdout and "Traceback" not in out.stderr
    assert stt("demo", "--replicas", "9").returncode == 2


def test_entry_scripts_say_what_is_missing_when_the_engine_cannot_start() -> None:
    out = subprocess.run([sys.executable, "stt_streaming_local.py"], cwd=ROOT,
                         env={**ENV, "WHISPER_MODEL_SIZE": "/nonexistent/model.pt",
                              "NATS_URL": "nats://127.0.0.1:1"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "WHISPER_MODEL_SIZE" in out.stderr


async def test_user_password_and_token_credentials() -> None:
    for server_args, creds in (
            (["--user", "ann", "--pass", "s3cret"], {"nats_user": "ann", "nats_password": "s3cret"}),
            (["--auth", "t0ken"], {"nats_token": "t0ken"})):
        with NatsServer(extra_args=server_args) as server:
            settings = make_settings(server.url, **creds)
            worker = build_worker(settings)
            await worker.start()
            try:
                assert worker.connected
            finally:
                await worker.shutdown()


# --- errors a user meets: one line, the variable and the flag, no traceback --------------------

def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


def test_stream_says_in_one_line_what_is_wrong(tmp_path: Any) -> None:
    line = one_line_error(stt("stream", str(tmp_path / "missing.flac")))
    assert line == f"stt stream: {tmp_path / 'missing.flac'}: no such file"
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    line = one_line_error(stt("stream", str(text)))
    assert line.startswith(f"stt stream: {text}: not an audio file")
    from stt.transport.nats_server import free_port

    nowhere = f"nats://127.0.0.1:{free_port()}"
    out = stt("stream", str(SAMPLE), "--nats-url", nowhere, timeout=30)
    line = one_line_error(out)
    assert line.startswith("stt stream: cannot reach NATS at " + nowhere) and "NATS_URL" in line
    line = one_line_error(stt("tail", "--nats-url", nowhere, timeout=30))
    assert line.startswith("stt tail: cannot reach NATS")


def test_configuration_errors_name_the_variable_and_the_flag() -> None:
    for args, env in ((["--vad-aggressiveness", "9"], {}),
                      (["--chunk-timeout-s", "abc"], {}),
                      ([], {"STT_VAD_AGGRESSIVENESS": "9"}),
                      ([], {"STT_CHUNK_TIMEOUT": "abc"})):
        line = one_line_error(stt("worker", *args, timeout=30, **env))
        assert line.startswith("configuration error: "), line
        assert ("STT_VAD_AGGRESSIVENESS (--vad-aggressiveness)" in line
                or "STT_CHUNK_TIMEOUT (--chunk-timeout-s)" in line), line


def test_start_up_line_lists_only_what_differs_from_the_defaults() -> None:
    import json

    out = stt("worker", "--engine", "no.such.module:Engine", "--max-sessions", "7", timeout=30,
              STT_LOG_FORMAT="json", NATS_PASSWORD="hunter2", NATS_USER="ann")
    assert out.returncode == 2
    first = json.loads(out.stderr.splitlines()[0])
    assert first["msg"] == "starting worker"
    assert first["settings"] == {"engine": "no.such.module:Engine", "max_sessions": 7,
                                 "nats_user": "ann", "nats_password": "***",
                                 "log_format": "json"}
    assert len(out.stderr.splitlines()[0]) < 400


async def test_http_engine_start_up_check_names_whisper_url(caplog: Any) -> None:
    import http.server
    import threading

    import pytest

    from stt.cli import check_http_engine
    from stt.config import Settings
    from stt.engines.base import EngineUnavailable
    from stt.engines.http import HttpEngine
    from stt.transport.nats_server import free_port

    def engine_for(**env: str) -> tuple[Settings, HttpEngine]:
        settings = Settings.from_env(environ={"STT_ENGINE": "http", **env})
        return settings, HttpEngine.from_settings(settings.transcription)

    # a real HTTP server answers (404 is an answer): nothing to say
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        await check_http_engine(*engine_for(WHISPER_URL=f"http://127.0.0.1:{httpd.server_port}"))
    finally:
        httpd.shutdown()
        httpd.server_close()
    # a chosen URL where nothing listens: a warning naming the variable, the worker goes on
    caplog.clear()
    await check_http_engine(*engine_for(WHISPER_URL=f"http://127.0.0.1:{free_port()}"))
    assert any("WHISPER_URL" in str(r.__dict__.get("hint")) for r in caplog.records)
    # the loopback default where nothing listens: stop and say what to set
    settings, engine = engine_for()
    if await engine.probe() is None:
        pytest.skip("something listens on 127.0.0.1:8000 here")
    with pytest.raises(EngineUnavailable, match=r"set WHISPER_URL \(--whisper-url\)"):
        await check_http_engine(settings, engine)
