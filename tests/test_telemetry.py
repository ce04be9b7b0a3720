"""Traces and metrics, end to end: a real nats-server, real OTLP/HTTP to a receiver run here.

The receiver decodes the protobuf the exporter sends, as a collector would; nothing is
read from an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import secrets
import signal
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import ROOT, SAMPLE, eventually, make_settings

from stt.cli import build_telemetry
from stt.core.audio import load_16k_mono, to_pcm16
from stt.engines import create_engine
from stt.ops.metrics import MetricsTelemetry
from stt.ops.telemetry import Telemetry
from stt.transport.client import send
from stt.transport.nats_server import NatsServer, free_port
from stt.transport.worker import Worker
from stt.wire.protocol import Subjects

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from stt.ops.otel import OtelTelemetry
from stt.transport.connection import subscribed

SR = 16000
SENTENCE = load_16k_mono(str(SAMPLE))[int(8.2 * SR): int(11.8 * SR)]  # "he was not an ill..."
AUDIO = np.concatenate([SENTENCE, np.zeros(SR, dtype=np.float32)])
SUBJECTS = Subjects()


# --- an OTLP/HTTP receiver -------------------------------------------------------------------

@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)

    def spans(self, prefix: str = "") -> list[dict[str, Any]]:
        out = []
        for r in self.requests:
            if r.path != prefix + "/v1/traces":
                continue
            for rs in r.body.resource_spans:
                resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        out.append({
                            "name": s.name, "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                            "parent_id": s.parent_span_id.hex(), "kind": s.kind,
                            "status": s.status.code, "resource": resource,
                            "attributes": {a.key: _value(a.value) for a in s.attributes}})
        return out

    def metric_names(self, prefix: str = "") -> set[str]:
        return {m.name for r in self.requests if r.path == prefix + "/v1/metrics"
                for rm in r.body.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


@pytest.fixture
def otlp() -> Iterator[Receiver]:
    receiver = Receiver("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers["Content-Length"]))
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                data = gzip.decompress(data)
            elif encoding == "deflate":
                data = zlib.decompress(data)
            kind = (ExportTraceServiceRequest if self.path.endswith("/v1/traces")
                    else ExportMetricsServiceRequest)
            message = kind()
            message.ParseFromString(data)
            receiver.requests.append(Received(self.path, {k.lower(): v for k, v in
                                                          self.headers.items()}, message))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


@pytest.fixture
def otel_env(otlp: Receiver, monkeypatch: pytest.MonkeyPatch) -> Receiver:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "stt-test")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "300")
    monkeypatch.setenv("HYPERDX_ENDPOINT", otlp.url + "/hyperdx")
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_TRACES_SAMPLER", "OTEL_EXPORTER_OTLP_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    return otlp


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def parse_traceparent(value: str) -> tuple[str, str]:
    version, trace_id, span_id, _flags = value.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    return trace_id, span_id


@contextlib.asynccontextmanager
async def collect(nc: Any, session_id: str) -> AsyncIterator[list[tuple[dict[str, Any], dict[str, str]]]]:
    """(message, headers) for each message published for ``session_id``."""
    from stt.wire import protocol

    got: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def cb(msg: Any) -> None:
        got.append((protocol.unpack(msg.data), dict(msg.headers or {})))

    sub = await nc.subscribe(SUBJECTS.output(session_id), cb=cb)
    await subscribed(nc)
    try:
        yield got
    finally:
        await sub.unsubscribe()


async def speak(nc: Any, session_id: str, header: str | None, chunk_ms: int = 40) -> None:
    """A session as a front-end sends it, with ``traceparent`` on start and end only."""
    headers = {"traceparent": header} if header else None
    await send(nc, SUBJECTS, session_id, {"type": "start", "session_id": session_id}, headers)
    step = SR * chunk_ms // 1000
    for seq, offset in enumerate(range(0, len(AUDIO), step)):
        await send(nc, SUBJECTS, session_id, {"type": "chunk", "seq": seq, "timestamp": 0.0,
                                              "audio": to_pcm16(AUDIO[offset:offset + step])})
    await send(nc, SUBJECTS, session_id, {"type": "end"}, headers)


def attach_telemetry(worker: Worker) -> Telemetry:
    """What ``stt worker`` wires for these settings, on a worker the fixture already started."""
    tel = build_telemetry(worker.settings, worker.engine)
    tel.attach(worker.status)
    worker.telemetry = tel
    return tel


# --- tests -----------------------------------------------------------------------------------

async def test_trace_runs_from_front_end_through_worker_and_engine_to_transcript(
        worker_factory: Any, nc: Any, otel_env: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    worker = await worker_factory(otel_enabled=True, hyperdx_enabled=True,
                                  hyperdx_api_key="hdx-key", partial_interval_s=0.5)
    tel = attach_telemetry(worker)
    assert isinstance(tel, OtelTelemetry)
    header, trace_id, client_span = traceparent()
    caplog.set_level(logging.INFO, logger="stt")
    async with collect(nc, "t1") as got:
        await speak(nc, "t1", header)
        await eventually(lambda: any(m["type"] == "end" for m, _ in got), 30)
    await tel.shutdown()

    # every message of the session carries the front-end's trace
    finals = [(m, h) for m, h in got if m["type"] == "transcript" and m["is_final"]]
    assert finals and "young man" in finals[0][0]["transcript"]
    for message, headers in got:
        assert parse_traceparent(headers["traceparent"])[0] == trace_id, message
    final_span = parse_traceparent(finals[0][1]["traceparent"])[1]

    # and the exported spans form one tree under the front-end's span
    spans = otel_env.spans()
    by_id = {s["span_id"]: s for s in spans}
    assert {s["trace_id"] for s in spans} == {trace_id}
    processes = [s for s in spans if s["name"] == "process ai.voice.stream.{session_id}"]
    assert [s["attributes"]["stt.message.type"] for s in processes] == ["start", "end"]
    assert all(s["parent_id"] == client_span for s in processes)
    assert processes[0]["attributes"] | {"messaging.system": "nats"} == processes[0]["attributes"]
    assert processes[0]["attributes"]["messaging.destination.name"] == "ai.voice.stream.t1"
    assert processes[0]["attributes"]["messaging.operation.type"] == "process"
    (utterance,) = [s for s in spans if s["name"] == "stt utterance"]
    assert by_id[utterance["parent_id"]]["name"].startswith("process")
    (engine,) = [s for s in spans if s["name"] == "engine transcribe"]
    assert engine["parent_id"] == utterance["span_id"]
    (publish,) = [s for s in spans if s["name"] == "send ai.voice.transcription.{session_id}"]
    assert publish["parent_id"] == utterance["span_id"] and publish["span_id"] == final_span
    assert publish["attributes"]["messaging.destination.template"] == \
        "ai.voice.transcription.{session_id}"
    assert publish["attributes"]["messaging.operation.type"] == "send"
    assert publish["kind"] == 4 and processes[0]["kind"] == 5  # PRODUCER, CONSUMER
    assert utterance["resource"]["service.name"] == "stt-test"
    assert utterance["resource"]["deployment.environment"] == "test"

    # the same spans went to HyperDX, with its key
    hyperdx = [r for r in otel_env.requests if r.path.startswith("/hyperdx/")]
    assert hyperdx and all(r.headers["authorization"] == "hdx-key" for r in hyperdx)
    assert {s["span_id"] for s in otel_env.spans("/hyperdx")} == set(by_id)
    assert not any("authorization" in r.headers for r in otel_env.requests
                   if not r.path.startswith("/hyperdx/"))

    # metrics went out over OTLP too
    names = otel_env.metric_names()
    assert {"stt.sessions.active", "stt.chunks", "stt.transcription.duration",
            "stt.final.latency", "stt.audio.received"} <= names
    assert names == otel_env.metric_names("/hyperdx")

    # logs about the session carry its trace id
    session_logs = [r for r in caplog.records if getattr(r, "session_id", None) == "t1"]
    assert session_logs and all(getattr(r, "trace_id", None) == trace_id for r in session_logs)


@pytest.fixture
def whisper_service() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A stand-in Whisper HTTP service that records each request's headers."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({k.lower(): v for k, v in self.headers.items()})
            body = json.dumps({"text": "hello"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


async def test_whisper_requests_carry_the_engine_span(
        worker_factory: Any, nc: Any, otel_env: Receiver,
        whisper_service: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = whisper_service
    engine = create_engine(make_settings("nats://unused", engine="http", whisper_url=url))
    worker = await worker_factory(engine=engine, otel_enabled=True, partial_interval_s=0.5)
    tel = attach_telemetry(worker)
    header, trace_id, _ = traceparent()
    async with collect(nc, "e1") as got:
        await speak(nc, "e1", header)
        await eventually(lambda: any(m["type"] == "end" for m, _ in got), 30)
    await tel.shutdown()
    assert any(m["type"] == "transcript" and m["transcript"] == "hello" for m, _ in got)
    spans = {s["span_id"]: s for s in otel_env.spans()}
    carried = [parse_traceparent(h["traceparent"]) for h in seen]
    assert carried and {t for t, _ in carried} == {trace_id}
    # finals carry their engine span; partials (no span of their own) the session's
    names = {spans[span_id]["name"] for _, span_id in carried}
    assert names <= {"engine transcribe", "process ai.voice.stream.{session_id}"}
    engine_spans = [s for s in spans.values() if s["name"] == "engine transcribe"]
    assert engine_spans and {s["span_id"] for s in engine_spans} <= {i for _, i in carried}
    assert all(s["kind"] == 3 for s in engine_spans)  # CLIENT: a call to another service


async def test_sessions_without_context_get_a_trace_of_their_own(
        worker_factory: Any, nc: Any, otel_env: Receiver) -> None:
    worker = await worker_factory(otel_enabled=True, partial_interval_s=0)
    tel = attach_telemetry(worker)
    async with collect(nc, "n1") as got:
        await speak(nc, "n1", None)
        await eventually(lambda: any(m["type"] == "end" for m, _ in got), 30)
    await tel.shutdown()
    (headers,) = [h for m, h in got if m["type"] == "transcript"]
    trace_id, _ = parse_traceparent(headers["traceparent"])
    spans = otel_env.spans()
    assert {s["trace_id"] for s in spans} == {trace_id}
    (root,) = [s for s in spans if not s["parent_id"]]
    assert root["attributes"]["stt.message.type"] == "start"


async def test_off_means_no_exporter_and_no_threads(nats_server: NatsServer) -> None:
    before = set(threading.enumerate())
    engine = create_engine(make_settings(nats_server.url, engine="http"))
    assert type(build_telemetry(make_settings(nats_server.url), engine)) is Telemetry
    assert type(build_telemetry(make_settings(nats_server.url, health_port=free_port()),
                                engine)) is MetricsTelemetry
    assert set(threading.enumerate()) == before
    # This test module imports OpenTelemetry itself; a fresh interpreter shows what the worker
    # imports with telemetry off and the health port on.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", OFF_CHECK, cwd=ROOT)
    assert await proc.wait() == 0, "telemetry off must not even import OpenTelemetry"


OFF_CHECK = """
import sys
from stt.cli.wiring import build_worker
from stt.config import Settings
from stt.engines.base import Engine

class Silent(Engine):
    async def transcribe(self, audio, options):
        raise NotImplementedError

settings = Settings.from_env({}, overrides={"health_port": 8080})
engine = Silent()
worker = build_worker(settings, engine)
worker.telemetry.render()
sys.exit(1 if any(m.startswith("opentelemetry") for m in sys.modules) else 0)
"""


# --- the worker as a process, as a user runs it ------------------------------------------------

async def test_worker_process_with_telemetry_on(nats_server: NatsServer, otel_env: Receiver,
                                                nc: Any) -> None:
    """``stt worker`` with OTEL_ENABLED and the health port: a connected trace, moving metrics,
    discovery, and a clean exit on SIGTERM."""
    port = free_port()
    env = {**os.environ, "NATS_URL": nats_server.url, "STT_ENGINE": "faster-whisper",
           "STT_HEALTH_PORT": str(port),
           "STT_HEALTH_HOST": "127.0.0.1", "OTEL_ENABLED": "true", "STT_LOG_FORMAT": "json",
           "STT_PARTIAL_INTERVAL": "0", "HYPERDX_ENABLED": "false"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stt", "worker", env=env, cwd=ROOT,
        stderr=asyncio.subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("worker never became ready")
            ping = await nc.request("$SRV.PING.stt-worker", b"", timeout=2)
            assert json.loads(ping.data)["name"] == "stt-worker"

            header, trace_id, _ = traceparent()
            async with collect(nc, "p1") as got:
                await speak(nc, "p1", header)
                await eventually(lambda: any(m["type"] == "end" for m, _ in got), 30)
            finals = [h for m, h in got if m["type"] == "transcript" and m["is_final"]]
            assert finals and parse_traceparent(finals[0]["traceparent"])[0] == trace_id
            metrics = (await http.get("/metrics")).text
            assert 'stt_transcripts_total{kind="final"} 1' in metrics
            assert "stt_sessions_started_total 1" in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    names = {s["name"] for s in otel_env.spans() if s["trace_id"] == trace_id}
    assert {"stt utterance", "engine transcribe",
            "send ai.voice.transcription.{session_id}"} <= names
    assert "stt.sessions.started" in otel_env.metric_names()
    logs = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    session_logs = [r for r in logs if r.get("session_id") == "p1"]
    assert session_logs and all(r.get("trace_id") == trace_id for r in session_logs)
    assert any(r["msg"] == "registered with NATS service discovery" for r in logs)


def test_unknown_exporter_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from stt.config import ConfigError
    from stt.ops.otel import exporters

    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        exporters(make_settings("nats://127.0.0.1:1", otel_enabled=True))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        exporters(make_settings("nats://127.0.0.1:1", otel_enabled=True))
