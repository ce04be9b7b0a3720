"""The health port over real HTTP: /livez, /readyz through a worker's life, /metrics."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import ROOT, SAMPLE, eventually, make_settings

from stt.cli.wiring import build_worker
from stt.core.audio import load_16k_mono
from stt.core.transcription import TranscribeOptions, Transcription
from stt.engines.base import Engine
from stt.ops.health import HealthServer
from stt.ops.metrics import MetricsTelemetry
from stt.transport.client import stream_audio
from stt.transport.nats_server import NatsServer, free_port

SR = 16000
SENTENCE = load_16k_mono(str(SAMPLE))[int(8.2 * SR): int(11.8 * SR)]  # "he was not an ill..."
SPEECH_WITH_PAUSE = np.concatenate([SENTENCE, np.zeros(SR, dtype=np.float32)])


class GatedEngine(Engine):
    """Loads when ``loaded`` is set; each transcription waits for ``release``."""

    name = "gated"

    def __init__(self) -> None:
        self.loaded = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.calls = 0

    async def start(self) -> None:
        await self.loaded.wait()

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        self.calls += 1
        await self.release.wait()
        return Transcription(text="words")


async def get(server: HealthServer, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(f"http://127.0.0.1:{server.port}{path}")


async def status_of(server: HealthServer, path: str) -> int:
    return (await get(server, path)).status_code


async def wait_status(server: HealthServer, path: str, code: int, timeout_s: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (got := await status_of(server, path)) != code:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{path} stayed {got}, expected {code}")
        await asyncio.sleep(0.05)


async def test_probes_follow_loading_connecting_outage_and_draining(
        nats_server: NatsServer, nc: Any) -> None:
    engine = GatedEngine()
    worker = build_worker(make_settings(nats_server.url, drain_timeout_s=20.0, chunk_timeout_s=0.3),
                    engine)
    server = HealthServer(worker.status, MetricsTelemetry(worker.status), "127.0.0.1", 0)
    await server.start()
    try:
        # Model loading: alive, not ready, and the body says why.
        assert await status_of(server, "/livez") == 200
        response = await get(server, "/readyz")
        assert response.status_code == 503
        assert "engine loading" in response.json()["reasons"]
        starting = asyncio.create_task(worker.start())
        await asyncio.sleep(0.1)
        assert await status_of(server, "/readyz") == 503
        engine.loaded.set()
        await starting
        response = await get(server, "/readyz")
        assert response.status_code == 200, response.text
        assert response.json()["engine"]["name"] == "gated"

        # NATS outage: not ready, but still alive (no restart storm while NATS is down).
        nats_server.stop()
        await wait_status(server, "/readyz", 503)
        assert "NATS not connected" in (await get(server, "/readyz")).json()["reasons"]
        assert await status_of(server, "/livez") == 200
        nats_server.start()
        await wait_status(server, "/readyz", 200)

        # Draining: a live session's final is held in the engine, so the drain takes a while.
        await eventually(lambda: nc.is_connected)
        assert worker.nc is not None
        await worker.nc.flush()  # its subscription is back on the server
        engine.release.clear()
        await stream_audio(nc, SPEECH_WITH_PAUSE, SR, session_id="held", speed=0,
                           send_end=False)
        await eventually(lambda: engine.calls > 0)
        stopping = asyncio.create_task(worker.shutdown())
        await wait_status(server, "/readyz", 503)
        assert "draining" in (await get(server, "/readyz")).json()["reasons"]
        assert await status_of(server, "/livez") == 200
        engine.release.set()
        await asyncio.wait_for(stopping, 20)
        assert await status_of(server, "/readyz") == 503
    finally:
        engine.loaded.set()
        engine.release.set()
        await worker.shutdown()
        await server.stop()


async def test_metrics_parse_and_move_with_a_real_session(worker_factory: Any, nc: Any) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    worker = await worker_factory(partial_interval_s=0.5)
    worker.telemetry = metrics = MetricsTelemetry(worker.status)
    server = HealthServer(worker.status, metrics, "127.0.0.1", 0)
    await server.start()
    try:
        before = scrape(parser, (await get(server, "/metrics")).text)
        assert before["stt_sessions_started_total"][()] == 0
        assert before["stt_ready"][()] == 1 and before["stt_nats_connected"][()] == 1

        result = await stream_audio(nc, SPEECH_WITH_PAUSE, SR, session_id="m1", speed=0)
        assert result.finals
        barge_in = await stream_audio(nc, SPEECH_WITH_PAUSE, SR, session_id="m2", speed=0,
                                      state="responding")
        assert barge_in.of_type("interrupt")
        response = await get(server, "/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        after = scrape(parser, response.text)
    finally:
        await server.stop()

    assert after["stt_sessions_started_total"][()] == 2
    assert after["stt_sessions_ended_total"][(("reason", "end"),)] == 2
    assert after["stt_interrupts_total"][()] == 1
    assert after["stt_sessions_active"][()] == 0
    assert after["stt_chunks_total"][(("result", "ok"),)] == worker.session_totals()["chunks_ok"] > 0
    assert after["stt_audio_received_seconds_total"][()] == pytest.approx(
        2 * len(SPEECH_WITH_PAUSE) / SR, abs=0.05)
    assert after["stt_audio_transcribed_seconds_total"][()] > 0
    finals = len(result.finals) + len(barge_in.finals)
    assert after["stt_transcripts_total"][(("kind", "final"),)] == finals
    assert after["stt_messages_received_total"][()] == worker.stats.messages_in
    assert after["stt_messages_published_total"][()] == \
        len(result.messages) + len(barge_in.messages)
    assert after["stt_engine_jobs_total"][()] == worker.stats.engine_jobs
    final_count = after["stt_transcription_duration_seconds_count"][(("kind", "final"),)]
    assert final_count == finals
    assert after["stt_transcription_real_time_factor_count"][(("kind", "final"),)] == final_count
    assert after["stt_final_latency_seconds_count"][()] == finals
    assert after["stt_final_latency_seconds_bucket"][(("le", "+Inf"),)] == finals
    (info_labels, info_value), = after["stt_info"].items()
    assert dict(info_labels)["engine"] == "faster-whisper" and info_value == 1


def scrape(parser: Any, text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Prometheus' own parser; samples by name, then by sorted label pairs."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


async def test_routes_methods_and_bad_requests(nats_server: NatsServer) -> None:
    worker = build_worker(make_settings(nats_server.url), GatedEngine())
    server = HealthServer(worker.status, MetricsTelemetry(worker.status), "127.0.0.1", 0)
    await server.start()
    try:
        assert await status_of(server, "/nope") == 404
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{server.port}"
            assert (await client.post(url + "/livez")).status_code == 405
            head = await client.head(url + "/livez")
            assert head.status_code == 200 and head.content == b""
            metrics = (await client.get(url + "/metrics")).text
            assert "stt_sessions_active 0" in metrics and "stt_engine_ready 0" in metrics
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
    finally:
        await server.stop()


async def test_container_health_check_command(nats_server: NatsServer) -> None:
    """``python -m stt.ops.health`` is the images' HEALTHCHECK: 0 when /livez answers, 1 when not."""
    worker = build_worker(make_settings(nats_server.url), GatedEngine())
    server = HealthServer(worker.status, MetricsTelemetry(worker.status), "127.0.0.1", 0)
    await server.start()
    env = {**os.environ, "STT_HEALTH_PORT": str(server.port)}
    env.pop("STT_HEALTHCHECK_URL", None)
    try:
        ok = await asyncio.create_subprocess_exec(sys.executable, "-m", "stt.ops.health", env=env,
                                                  cwd=ROOT)
        assert await ok.wait() == 0
    finally:
        await server.stop()
    down = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stt.ops.health", f"http://127.0.0.1:{free_port()}/livez",
        stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    _, stderr = await down.communicate()
    assert down.returncode == 1 and b"failed" in stderr


async def test_slow_consumer_events_and_breaker_state_are_counted(worker_factory: Any) -> None:
    from nats.errors import SlowConsumerError

    from stt.engines import create_engine

    engine = create_engine(make_settings("nats://unused", engine="http"))
    worker = await worker_factory(engine=engine)
    metrics = MetricsTelemetry(worker.status)
    assert worker.nc is not None
    # nats-py reports a dropped message only to the error callback, as here
    await worker.nc._error_cb(SlowConsumerError(subject="ai.voice.stream.x", reply="", sid=1,
                                                sub=None))
    text = metrics.render()
    assert "stt_nats_slow_consumers_total 1" in text
    assert 'stt_engine_breaker{state="closed"} 1' in text
    assert 'stt_engine_breaker{state="open"} 0' in text
