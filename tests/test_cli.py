"""The command line as a user runs it: real processes, a real nats-server."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from typing import Any

from conftest import ROOT, SAMPLE, make_settings

from stt.engines import create_engine
from stt.nats_server import NatsServer
from stt.worker import Worker

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
            worker = Worker(settings, create_engine(settings))
            await worker.start()
            try:
                assert worker.connected
            finally:
                await worker.shutdown()
