"""OpenTelemetry: traces across NATS and the engine, metrics over OTLP, trace ids in logs.

Long because it is the whole optional OpenTelemetry integration, imported only when enabled.

Trace shape, for one session::

    front-end "send start"                      (the client's span; its traceparent header)
      └─ process ai.voice.stream.{session_id}   CONSUMER, one per start/state_change/end
           └─ stt utterance                     INTERNAL, one per final: end of speech → publish
                ├─ engine transcribe            CLIENT (http engine) or INTERNAL
                └─ send ai.voice.transcription.{session_id}   PRODUCER; its context is the
                                                traceparent header of the published final

Chunks get no span (dozens per second per session). Partials and interrupts carry the
session's context (the latest control message's span) in their headers without spans of their
own. The engine call's context is current in the job's task, so the http engine's
``extra_headers`` hook can put it on the request to the Whisper service.

Configuration is OpenTelemetry's own: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and the per-signal
variants), ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``; ``grpc`` with the gRPC exporter
installed), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``(``_ARG``), ``OTEL_PROPAGATORS``, ``OTEL_BSP_SCHEDULE_DELAY``,
``OTEL_METRIC_EXPORT_INTERVAL``, and ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER``
(``otlp``, ``console`` or ``none``). ``HYPERDX_ENABLED`` adds a second OTLP/HTTP destination,
``HYPERDX_ENDPOINT`` (default https://in-otel.hyperdx.io) with ``authorization: HYPERDX_API_KEY``.

The providers are this object's own, not the process-global ones, so tests (and embedders) can
create several and shut each down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from stt.config import ConfigError, Settings
from stt.ops.metrics import METRICS, Histogram, Metric, MetricsTelemetry
from stt.ops.status import package_version
from stt.ops.telemetry import CANCELLED
from stt.wire.protocol import Error, Outgoing, Transcript, kind

if TYPE_CHECKING:
    from stt.core.actions import Job

log = logging.getLogger("stt.otel")

HYPERDX_DEFAULT_ENDPOINT = "https://in-otel.hyperdx.io"
SHUTDOWN_TIMEOUT_S = 10.0  # exporting the last spans must not outlast the pod's grace period


@dataclass
class _SessionTrace:
    context: otel_context.Context | None = None   # the latest control message's span
    headers: dict[str, str] | None = None         # that context, injected once for reuse
    trace_id: str | None = None                   # for log lines about this session
    utterance: Span | None = None                 # open from the final's job to its publication
    closed: bool = False


@dataclass
class _JobTrace:
    session_id: str
    utterance: Span | None = None
    engine: Span | None = None
    context_token: object | None = field(default=None, repr=False)


class OtelTelemetry(MetricsTelemetry):

    def __init__(self, settings: Settings, engine_name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.settings = settings
        self.engine_name = engine_name
        self.clock = clock  # the worker's: job times are on it
        self.version = package_version()
        self.subjects = settings.nats.subjects
        self._sessions: dict[str, _SessionTrace] = {}
        self._shut_down = False
        span_exporters, metric_exporters = exporters(settings)
        resource = _resource(self.version)
        # Shut down by shutdown() with a time limit, not again by an atexit hook without one.
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for exporter in span_exporters:
            self.tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        readers: list[MetricReader] = [PeriodicExportingMetricReader(e) for e in metric_exporters]
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers,
                                            shutdown_on_exit=False)
        self.tracer = self.tracer_provider.get_tracer("stt", self.version)
        self._engine_kind = SpanKind.CLIENT if engine_name == "http" else SpanKind.INTERNAL
        self._register_metrics()
        self._log_filter = _TraceLogFilter(self)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._log_filter)
        log.info("OpenTelemetry on", extra={
            "traces": [type(e).__name__ for e in span_exporters],
            "metrics": [type(e).__name__ for e in metric_exporters],
            "service": resource.attributes.get("service.name")})

    # --- metrics --------------------------------------------------------------------------

    def _register_metrics(self) -> None:
        meter = self.meter_provider.get_meter("stt", self.version)
        for metric in METRICS:
            callback = self._observer(metric)
            if metric.kind == "counter":
                meter.create_observable_counter(metric.otel_name, [callback], metric.unit,
                                                metric.help)
            else:
                meter.create_observable_gauge(metric.otel_name, [callback], metric.unit,
                                              metric.help)
        for hist in self.histograms:
            self._mirror(hist, meter.create_histogram(
                "stt." + hist.name, hist.unit, hist.help,
                explicit_bucket_boundaries_advisory=list(hist.buckets)))

    def _observer(self, metric: Metric) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, labels) for labels, value in metric.read(self.status())]
        return observe

    @staticmethod
    def _mirror(hist: Histogram, otel_hist: Any) -> None:
        hist.on_observe = lambda value, label: otel_hist.record(
            value, {"kind": label} if label else None)

    # --- traces ---------------------------------------------------------------------------

    def control_message(self, session_id: str, kind: str, headers: dict[str, str] | None) -> None:
        st = self._sessions.get(session_id)
        if st is None or st.closed:
            st = self._sessions[session_id] = _SessionTrace()
        # Header names compared case-insensitively: some clients canonicalize them (Traceparent).
        # Without a context of its own the message continues the session's trace.
        parent = st.context
        if headers:
            extracted = propagate.extract({k.lower(): v for k, v in headers.items()})
            if trace.get_current_span(extracted).get_span_context().is_valid:
                parent = extracted
        span = self.tracer.start_span(
            f"process {self.subjects.input_template}", context=parent, kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": self.subjects.input(session_id),
                "messaging.destination.template": self.subjects.input_template,
                **({"messaging.consumer.group.name": self.settings.nats.queue_group}
                   if self.settings.nats.queue_group else {}),
                "stt.session.id": session_id,
                "stt.message.type": kind,
            })
        span.end()
        st.context = trace.set_span_in_context(span)
        st.headers = {}
        propagate.inject(st.headers, context=st.context)
        st.trace_id = trace.format_trace_id(span.get_span_context().trace_id)

    def job_started(self, job: Job) -> _JobTrace:
        st = self._sessions.get(job.session_id)
        parent = st.context if st is not None else None
        token = _JobTrace(job.session_id)
        if job.is_final:
            st = st or self._sessions.setdefault(job.session_id, _SessionTrace())
            self._end_utterance(job.session_id, st.utterance)  # one that published nothing
            token.utterance = st.utterance = self.tracer.start_span(
                "stt utterance", context=parent, kind=SpanKind.INTERNAL,
                start_time=_epoch_ns(job.speech_end_at, self.clock),
                attributes={"stt.session.id": job.session_id, "stt.segment.id": job.segment_id,
                            "stt.audio.duration_s": round(job.duration_s, 3),
                            "stt.segment.start_s": round(job.start_s, 3),
                            "stt.segment.end_s": round(job.end_s, 3)})
            token.engine = self.tracer.start_span(
                "engine transcribe", context=trace.set_span_in_context(token.utterance),
                kind=self._engine_kind,
                attributes={"stt.engine": self.engine_name,
                            "stt.audio.duration_s": round(job.duration_s, 3)})
            current = trace.set_span_in_context(token.engine)
        else:
            current = parent or otel_context.Context()
        # Current for the rest of this job's task: the engine's outgoing request and log lines.
        token.context_token = otel_context.attach(current)
        return token

    def job_finished(self, token: Any, job: Job, *, engine_s: float, error: str | None,
                     queued_s: float = 0.0) -> None:
        super().job_finished(token, job, engine_s=engine_s, error=error, queued_s=queued_s)
        if not isinstance(token, _JobTrace):
            return
        if token.context_token is not None:
            otel_context.detach(token.context_token)  # type: ignore[arg-type]
        cancelled = error == CANCELLED
        failed = error is not None and not cancelled
        if token.engine is not None:
            token.engine.set_attribute("stt.engine.seconds", round(engine_s, 4))
            if cancelled:
                token.engine.set_attribute("stt.job.cancelled", True)
            if failed:
                token.engine.set_status(Status(StatusCode.ERROR, error))
            token.engine.end()
        if token.utterance is not None:
            if failed:
                token.utterance.set_status(Status(StatusCode.ERROR, error))
            if job.speculative and error is None:
                return  # decoded before its endpoint: the final is published when that comes
            # The final (if any) is published in the same synchronous step that follows this
            # hook; whatever is still open after it published nothing (silence, failure).
            try:
                asyncio.get_running_loop().call_soon(
                    self._end_utterance, token.session_id, token.utterance)
            except RuntimeError:
                self._end_utterance(token.session_id, token.utterance)

    def publish_headers(self, message: Outgoing, sequence: int) -> dict[str, str] | None:
        session_id = message.session_id
        st = self._sessions.get(session_id)
        if st is None:
            return None
        final = isinstance(message, Transcript) and message.is_final
        if st.utterance is not None and (final or isinstance(message, Error)):
            send = self.tracer.start_span(
                f"send {self.subjects.output_template}",
                context=trace.set_span_in_context(st.utterance), kind=SpanKind.PRODUCER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.operation.type": "send",
                    "messaging.operation.name": "publish",
                    "messaging.destination.name": self.subjects.output(session_id),
                    "messaging.destination.template": self.subjects.output_template,
                    "stt.session.id": session_id,
                    "stt.message.type": kind(message),
                    "stt.message.sequence": sequence,
                })
            headers: dict[str, str] = {}
            propagate.inject(headers, context=trace.set_span_in_context(send))
            send.end()
            if isinstance(message, Transcript):
                st.utterance.set_attribute("stt.transcript.empty", not message.text)
                self._end_utterance(session_id, st.utterance)
            return headers
        return st.headers

    def _end_utterance(self, session_id: str, span: Span | None) -> None:
        st = self._sessions.get(session_id)
        if span is None or st is None or st.utterance is not span:
            return
        span.end()
        st.utterance = None

    def session_closed(self, session_id: str, reason: str) -> None:
        st = self._sessions.get(session_id)
        if st is None:
            return
        if st.utterance is not None:
            st.utterance.end()
            st.utterance = None
        st.closed = True
        # Forgotten after the current step, so the worker's "session ended" line, logged just
        # after this hook, still gets the session's trace id.
        try:
            asyncio.get_running_loop().call_soon(self._forget, session_id, st)
        except RuntimeError:
            self._forget(session_id, st)

    def _forget(self, session_id: str, st: _SessionTrace) -> None:
        if self._sessions.get(session_id) is st:
            del self._sessions[session_id]

    def trace_id_for(self, session_id: str) -> str | None:
        st = self._sessions.get(session_id)
        return st.trace_id if st is not None else None

    # --- shutdown -------------------------------------------------------------------------

    async def shutdown(self) -> None:
        if self._shut_down:
            return
        self._shut_down = True
        for st in self._sessions.values():
            if st.utterance is not None:
                st.utterance.end()
        self._sessions.clear()
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self._log_filter)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def flush() -> None:
            try:
                self.tracer_provider.shutdown()
                self.meter_provider.shutdown(timeout_millis=SHUTDOWN_TIMEOUT_S * 1000)
            except Exception as exc:
                log.warning("telemetry flush failed: %s", exc)
            finally:
                loop.call_soon_threadsafe(done.set)

        # A daemon thread, not the default executor: asyncio.run() would wait for an exporter
        # stuck on an unreachable collector; the process must be able to exit regardless.
        threading.Thread(target=flush, name="otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done.wait(), SHUTDOWN_TIMEOUT_S + 1)
        except TimeoutError:
            log.warning("telemetry flush timed out; some spans or metrics were not exported")


def current_trace_headers() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current context, for outgoing requests."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


class _TraceLogFilter(logging.Filter):
    """Adds ``trace_id``/``span_id`` to log records: the current span's, or the session's."""

    def __init__(self, telemetry: OtelTelemetry) -> None:
        super().__init__()
        self.telemetry = telemetry

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "trace_id", None):
            return True
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = trace.format_trace_id(ctx.trace_id)
            record.span_id = trace.format_span_id(ctx.span_id)
            return True
        session_id = getattr(record, "session_id", None)
        if isinstance(session_id, str):
            trace_id = self.telemetry.trace_id_for(session_id)
            if trace_id:
                record.trace_id = trace_id
        return True


def _epoch_ns(monotonic_at: float | None, clock: Callable[[], float]) -> int | None:
    """A time on the worker's clock as epoch nanoseconds (span start times are wall clock)."""
    if monotonic_at is None:
        return None
    ago_s = clock() - monotonic_at
    if not 0 <= ago_s < 3600:  # a test's fake clock, or nonsense: start the span now
        return None
    return time.time_ns() - int(ago_s * 1e9)


def _resource(version: str) -> Resource:
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over these defaults.
    attributes: dict[str, Any] = {"service.name": "stt-worker", "service.version": version,
                                  "service.instance.id": socket.gethostname()}
    for key, value in Resource.create().attributes.items():
        if key == "service.name" and str(value).startswith("unknown_service"):
            continue  # the SDK's placeholder when no name was configured
        attributes[key] = value
    return Resource(attributes)


def exporters(settings: Settings) -> tuple[list[SpanExporter], list[MetricExporter]]:
    """Span and metric exporters for OTEL_ENABLED and HYPERDX_ENABLED."""
    spans: list[SpanExporter] = []
    metrics: list[MetricExporter] = []
    if settings.ops.otel_enabled:
        traces_kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        metrics_kind = os.environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower()
        for variable, kind in (("OTEL_TRACES_EXPORTER", traces_kind),
                               ("OTEL_METRICS_EXPORTER", metrics_kind)):
            if kind not in ("otlp", "console", "none"):
                raise ConfigError(variable, f"unsupported exporter {kind!r}: use otlp, console "
                                            "or none")
        span_cls, metric_cls = _otlp_classes()
        if traces_kind == "otlp":
            spans.append(span_cls())
        elif traces_kind == "console":
            spans.append(ConsoleSpanExporter())
        if metrics_kind == "otlp":
            metrics.append(metric_cls())
        elif metrics_kind == "console":
            metrics.append(ConsoleMetricExporter())
    if settings.ops.hyperdx_enabled:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        base = os.environ.get("HYPERDX_ENDPOINT", HYPERDX_DEFAULT_ENDPOINT).rstrip("/")
        auth = {"authorization": settings.ops.hyperdx_api_key}
        spans.append(OTLPSpanExporter(endpoint=base + "/v1/traces", headers=auth))
        metrics.append(OTLPMetricExporter(endpoint=base + "/v1/metrics", headers=auth))
    return spans, metrics


def _otlp_classes() -> tuple[Any, Any]:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter, OTLPMetricExporter
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter as GrpcMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL",
                              "grpc needs opentelemetry-exporter-otlp-proto-grpc installed; "
                              "or use http/protobuf (port 4318)") from None
        return GrpcSpanExporter, GrpcMetricExporter
    raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL",
                      f"unsupported protocol {protocol!r}: use http/protobuf or grpc")
