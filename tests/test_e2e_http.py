"""End to end through NATS: the worker with the ``http`` engine -> ``stt serve`` (a real
process) -> a local engine; and the service stopped and restarted in the middle of a session."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE, eventually, make_settings
from test_serve import ServeProcess
from whisper_checkpoint import write_checkpoint

from stt.audio import SAMPLE_RATE, load_16k_mono, to_pcm16
from stt.client import Listener, send, stream_audio
from stt.engines.http import BreakerState, HttpEngine
from stt.nats_server import NatsServer
from stt.protocol import Subjects


def http_engine(nats: NatsServer, url: str, **overrides: Any) -> HttpEngine:
    return HttpEngine.from_settings(make_settings(nats.url, engine="http", whisper_url=url,
                                                  engine_workers=2, **overrides))


async def test_worker_http_engine_to_stt_serve_whisper(tmp_path: Path, nats_server: NatsServer,
                                                       worker_factory: Any, nc: Any) -> None:
    pytest.importorskip("whisper")
    checkpoint = write_checkpoint(tmp_path / "random.pt")
    # Random weights: keep their (arbitrary) text rather than have the guards drop it.
    with ServeProcess("--engine", "whisper", "--whisper-model-size", str(checkpoint),
                      "--whisper-device", "cpu",
                      "--whisper-cpu-threads", "1", "--whisper-compression-ratio-threshold", "0",
                      "--whisper-logprob-threshold", "-1000") as serve:
        engine = http_engine(nats_server, serve.url)
        await worker_factory(engine=engine)
        speech = load_16k_mono(str(SAMPLE))
        audio = np.concatenate([speech[: 4 * SAMPLE_RATE], np.zeros(SAMPLE_RATE, np.float32),
                                speech[5 * SAMPLE_RATE: 8 * SAMPLE_RATE]])
        result = await stream_audio(nc, audio, SAMPLE_RATE, speed=0, language="en",
                                    end_timeout_s=90)
    assert not result.of_type("error"), result.of_type("error")
    assert result.finals and all(m["transcript"] for m in result.finals)
    assert all(m["language"] == "en" for m in result.finals)
    assert result.of_type("end")[0]["reason"] == "end"
    assert engine.requests >= len(result.finals) and engine.failures == 0


async def test_service_stopped_and_restarted_mid_session(nats_server: NatsServer,
                                                         worker_factory: Any, nc: Any) -> None:
    serve = ServeProcess("--engine", "faster-whisper").start()
    try:
        engine = http_engine(nats_server, serve.url, whisper_retries=1,
                             whisper_retry_backoff_s=0.05, whisper_breaker_failures=2,
                             whisper_breaker_cooldown_s=0.5, whisper_connect_timeout_s=1.0)
        await worker_factory(engine=engine)
        speech = load_16k_mono(str(SAMPLE))
        silence = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)
        subjects, sid = Subjects(), "restart-mid-session"
        seq = 0

        async def speak(samples: np.ndarray) -> None:
            nonlocal seq
            step = SAMPLE_RATE * 40 // 1000
            for offset in range(0, samples.size, step):
                pcm = to_pcm16(samples[offset: offset + step])
                await send(nc, subjects, sid, {"type": "chunk", "seq": seq, "timestamp": time.time(),
                                               "audio_b64": base64.b64encode(pcm).decode()})
                seq += 1

        async with Listener(nc, subjects, sid) as listener:
            messages = listener.result.messages

            def finals() -> list[dict[str, Any]]:
                return [m for m in messages if m.get("type") == "transcript" and m["is_final"]]

            def errors() -> list[dict[str, Any]]:
                return [m for m in messages if m.get("type") == "error"]

            await send(nc, subjects, sid, {"type": "start", "session_id": sid,
                                           "sample_rate": SAMPLE_RATE, "language": "en"})
            await speak(np.concatenate([speech[: 3 * SAMPLE_RATE], silence]))
            await eventually(lambda: len(finals()) >= 1, 60)

            serve.stop()  # the service goes away mid-session (SIGTERM: clean exit)
            assert serve.returncode == 0 and serve.leftover_children == []
            t0 = time.monotonic()
            await speak(np.concatenate([speech[3 * SAMPLE_RATE: 6 * SAMPLE_RATE], silence]))
            await eventually(lambda: len(errors()) >= 1, 30)
            assert time.monotonic() - t0 < 10  # promptly, not after STT_ENGINE_TIMEOUT_S
            assert errors()[0]["code"] == "engine_failed"
            assert "whisper service" in errors()[0]["message"]
            assert engine.breaker.state is not BreakerState.CLOSED

            serve.start()  # same port: the worker recovers by itself
            finals_before = len(finals())
            await speak(np.concatenate([speech[6 * SAMPLE_RATE: 9 * SAMPLE_RATE], silence]))
            await eventually(lambda: len(finals()) > finals_before, 60)
            await send(nc, subjects, sid, {"type": "end"})
            result = await listener.wait_end(60)
    finally:
        serve.stop()
    assert engine.breaker.state is BreakerState.CLOSED
    last = finals()[-1]
    assert last["transcript"] and last["sequence"] > errors()[-1]["sequence"]
    assert result.of_type("end")[0]["reason"] == "end"
    sequences = [m["sequence"] for m in result.messages]
    assert sequences == sorted(sequences)
