"""End to end through NATS: the worker with the ``http`` engine -> ``stt serve`` (a real
process) -> a local engine; and the service stopped and restarted in the middle of a session."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE, eventually, make_settings
from test_serve import ServeProcess
from whisper_checkpoint import write_checkpoint

from stt.core.audio import SAMPLE_RATE, load_16k_mono, to_pcm16
from stt.engines.http import BreakerState, HttpEngine
from stt.transport.client import Listener, send, stream_audio
from stt.transport.nats_server import NatsServer
from stt.wire.protocol import Subjects


def http_engine(nats: NatsServer, url: str, **overrides: Any) -> HttpEngine:
    return HttpEngine.from_settings(make_settings(nats.url, engine="http", whisper_url=url,
                                                  engine_workers=2, **overrides).transcription)


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


class Talker:
    """One session's chunks, sent as fast as possible, with the messages it got back."""

    def __init__(self, nc: Any, sid: str) -> None:
        self.nc, self.sid, self.subjects, self.seq = nc, sid, Subjects(), 0
        self.listener = Listener(nc, self.subjects, sid)

    async def __aenter__(self) -> Talker:
        await self.listener.__aenter__()
        await send(self.nc, self.subjects, self.sid, {"type": "start", "session_id": self.sid,
                                                      "sample_rate": SAMPLE_RATE,
                                                      "language": "en"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.listener.__aexit__(*exc)

    async def speak(self, samples: np.ndarray) -> None:
        step = SAMPLE_RATE * 40 // 1000
        for offset in range(0, samples.size, step):
            pcm = to_pcm16(samples[offset: offset + step])
            await send(self.nc, self.subjects, self.sid,
                       {"type": "chunk", "seq": self.seq, "timestamp": time.time(),
                        "audio_b64": base64.b64encode(pcm).decode()})
            self.seq += 1

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.listener.result.messages if m.get("type") == kind]

    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.of("transcript") if m["is_final"]]

    async def end(self) -> Any:
        await send(self.nc, self.subjects, self.sid, {"type": "end"})
        return await self.listener.wait_end(60)


SPEECH = load_16k_mono(str(SAMPLE))
PAUSE = np.zeros(int(1.5 * SAMPLE_RATE), np.float32)


def utterance(i: int) -> np.ndarray:
    return np.concatenate([SPEECH[3 * i * SAMPLE_RATE: 3 * (i + 1) * SAMPLE_RATE], PAUSE])


def outage_engine(nats_server: NatsServer, url: str) -> HttpEngine:
    return http_engine(nats_server, url, whisper_retries=1, whisper_retry_backoff_s=0.05,
                       whisper_breaker_failures=2, whisper_breaker_cooldown_s=0.5,
                       whisper_connect_timeout_s=1.0)


async def test_service_down_6_s_mid_session_loses_no_utterance(nats_server: NatsServer,
                                                               worker_factory: Any,
                                                               nc: Any) -> None:
    """The default STT_FINAL_RETRY_S (10 s) outlasts a restart: the utterance spoken while the
    service was down gets its final once it is back, and nothing says engine_failed."""
    serve = ServeProcess("--engine", "faster-whisper").start()
    try:
        engine = outage_engine(nats_server, serve.url)
        worker = await worker_factory(engine=engine)
        async with Talker(nc, "outage-recovered") as talk:
            await talk.speak(utterance(0))
            await eventually(lambda: len(talk.finals()) >= 1, 60)
            serve.stop()  # the service goes away mid-session
            down_at = time.monotonic()
            await talk.speak(utterance(1))  # spoken during the outage
            await asyncio.sleep(max(0.0, 6.0 - (time.monotonic() - down_at)))
            assert len(talk.finals()) == 1 and not talk.of("error")
            serve.start()  # same port
            await eventually(lambda: len(talk.finals()) >= 2, 30)
            await talk.speak(utterance(2))
            await eventually(lambda: len(talk.finals()) >= 3, 60)
            result = await talk.end()
    finally:
        serve.stop()
    assert not talk.of("error"), talk.of("error")
    assert [bool(f["transcript"]) for f in talk.finals()] == [True, True, True]
    assert worker.stats.engine_retries >= 1
    assert result.of_type("end")[0]["reason"] == "end"
    sequences = [m["sequence"] for m in result.messages]
    assert sequences == sorted(sequences)


async def test_service_down_past_the_retry_deadline_says_engine_failed_and_recovers(
        nats_server: NatsServer, worker_factory: Any, nc: Any) -> None:
    serve = ServeProcess("--engine", "faster-whisper").start()
    try:
        engine = outage_engine(nats_server, serve.url)
        await worker_factory(engine=engine, final_retry_s=1.0)
        async with Talker(nc, "outage-given-up") as talk:
            await talk.speak(utterance(0))
            await eventually(lambda: len(talk.finals()) >= 1, 60)
            serve.stop()
            assert serve.returncode == 0 and serve.leftover_children == []
            t0 = time.monotonic()
            await talk.speak(utterance(1))
            await eventually(lambda: len(talk.of("error")) >= 1, 30)
            assert time.monotonic() - t0 < 10  # after STT_FINAL_RETRY_S, not STT_ENGINE_TIMEOUT_S
            error = talk.of("error")[0]
            assert error["code"] == "engine_failed" and "whisper service" in error["message"]
            assert engine.breaker.state is not BreakerState.CLOSED
            serve.start()  # the worker recovers by itself
            finals_before = len(talk.finals())
            await talk.speak(utterance(2))
            await eventually(lambda: len(talk.finals()) > finals_before, 60)
            result = await talk.end()
    finally:
        serve.stop()
    assert engine.breaker.state is BreakerState.CLOSED
    last = talk.finals()[-1]
    assert last["transcript"] and last["sequence"] > talk.of("error")[-1]["sequence"]
    assert result.of_type("end")[0]["reason"] == "end"
