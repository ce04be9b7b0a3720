"""Worker metrics: one table read at scrape time, three histograms recorded as jobs finish.

Nothing here runs per audio chunk. The counters the worker already keeps are read, as one
:class:`~stt.ops.status.Status` snapshot, when ``/metrics`` is scraped or when the OpenTelemetry
reader collects; only the latency histograms are recorded, in the telemetry hooks, a few times
per utterance.

The Prometheus text format is written by hand: it is a few lines of code, and ``/metrics``
then works without any optional dependency. No metric has a per-session label.

Names: each :class:`Metric` has a dotted OpenTelemetry name (``stt.sessions.active``) and
the Prometheus name derived the way OpenTelemetry's Prometheus exporters derive it (dots to
underscores, ``_seconds`` for unit ``s``, ``_total`` for counters; dimensionless values have
no unit, so no ``_ratio`` suffix), so dashboards work whichever path the numbers took.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from stt.ops.status import CHUNK_RESULTS, Status, StatusSource, package_version
from stt.ops.telemetry import Telemetry

if TYPE_CHECKING:
    from stt.core.actions import Job
    from stt.wire.protocol import Transcript

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; engine calls for partials take tens of ms on a GPU, long finals on a CPU several s.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
# Engine seconds per audio second: below 1 keeps up with live speech.
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)
BREAKER_STATES = ("closed", "open", "half_open")

Sample = tuple[dict[str, str], float]


@dataclass(frozen=True)
class Metric:
    """One value (or one labelled family) read from a status snapshot when metrics are collected."""

    name: str                           # dotted, without the ``stt.`` prefix
    kind: Literal["counter", "gauge"]
    unit: str                           # UCUM: "s", a {curly} annotation, or "" (a plain number)
    help: str
    read: Callable[[Status], Iterable[Sample]]

    @property
    def otel_name(self) -> str:
        return "stt." + self.name

    @property
    def prometheus_name(self) -> str:
        return prometheus_name(self.name, self.unit, self.kind == "counter")


def prometheus_name(name: str, unit: str, counter: bool = False) -> str:
    out = "stt_" + name.replace(".", "_")
    if unit == "s":
        out += "_seconds"
    return out + "_total" if counter else out


def _one(value: float) -> list[Sample]:
    return [({}, float(value))]


def _durable(t: Status, key: str) -> list[Sample]:
    """A durable-mode counter; none without STT_DURABLE."""
    durable = (t.cluster or {}).get("durable")
    return _one(durable[key]) if durable else []


def _by(label: str, values: Mapping[str, int] | Mapping[str, float]) -> list[Sample]:
    return [({label: key}, float(n)) for key, n in sorted(values.items())]


def _breaker(t: Status) -> list[Sample]:
    # The http engine reports its circuit breaker in describe() as {"breaker": "closed"|...};
    # engines without one have no such series.
    state = t.engine.get("breaker")
    if not isinstance(state, str):
        return []
    return [({"state": s}, 1.0 if s == state else 0.0) for s in BREAKER_STATES]


def _info(t: Status) -> list[Sample]:
    return [({"version": t.version, "engine": str(t.engine.get("name", "?")),
              "model": str(t.engine.get("model", ""))}, 1.0)]


def _chunks(t: Status) -> list[Sample]:
    return [({"result": key}, float(t.chunks.get(key, 0))) for key in CHUNK_RESULTS]


def _table() -> tuple[Metric, ...]:
    return (
        Metric("sessions.active", "gauge", "{session}", "Sessions open on this worker.",
               lambda t: _one(t.sessions)),
        Metric("sessions.started", "counter", "{session}", "Sessions opened (start or adopted).",
               lambda t: _one(t.sessions_started)),
        Metric("sessions.ended", "counter", "{session}", "Sessions ended, by reason.",
               lambda t: _by("reason", t.sessions_ended)),
        Metric("audio.received", "counter", "s", "Seconds of audio received.",
               lambda t: _one(t.audio_received_s)),
        Metric("audio.transcribed", "counter", "s",
               "Seconds of audio sent to the engine (partials included).",
               lambda t: _one(t.audio_transcribed_s)),
        Metric("chunks", "counter", "{chunk}", "Audio chunks by result.", _chunks),
        Metric("messages.received", "counter", "{message}", "Input messages received.",
               lambda t: _one(t.messages_in)),
        Metric("messages.bad", "counter", "{message}", "Input messages that could not be parsed.",
               lambda t: _one(t.bad_messages)),
        Metric("messages.published", "counter", "{message}", "Messages published.",
               lambda t: _one(t.published)),
        Metric("messages.publish_failures", "counter", "{message}",
               "Messages that could not be published (or were dropped from a full outbox).",
               lambda t: _one(t.publish_failures)),
        Metric("transcripts", "counter", "{message}", "Transcripts published, by kind.",
               lambda t: _by("kind", t.transcripts)),
        Metric("interrupts", "counter", "{message}", "Barge-in interrupts published.",
               lambda t: _one(t.interrupts)),
        Metric("errors", "counter", "{error}", "Errors, by protocol error code.",
               lambda t: _by("code", t.errors)),
        Metric("engine.jobs", "counter", "{job}", "Engine transcriptions that succeeded.",
               lambda t: _one(t.engine_jobs)),
        Metric("engine.failures", "counter", "{job}", "Engine transcriptions that failed.",
               lambda t: _one(t.engine_failures)),
        Metric("engine.busy", "counter", "s", "Seconds spent in successful engine calls.",
               lambda t: _one(t.engine_seconds)),
        Metric("turn.queries", "counter", "{query}",
               "End-of-turn model queries, by result (scored, failed: overloaded or an error).",
               lambda t: _by("result", t.turn_queries)),
        Metric("turn.busy", "counter", "s", "Seconds spent in end-of-turn model queries.",
               lambda t: _one(t.turn_seconds)),
        Metric("engine.ready", "gauge", "", "1 once the model is loaded.",
               lambda t: _one(t.engine_ready)),
        Metric("engine.breaker", "gauge", "", "Circuit breaker of the engine, 1 for its state.",
               _breaker),
        Metric("nats.connected", "gauge", "", "1 while connected to NATS.",
               lambda t: _one(t.connected)),
        Metric("nats.reconnects", "counter", "{event}", "NATS reconnections.",
               lambda t: _one(t.reconnects)),
        Metric("nats.disconnects", "counter", "{event}", "NATS disconnections.",
               lambda t: _one(t.disconnects)),
        Metric("nats.slow_consumers", "counter", "{event}",
               "Input messages the NATS client dropped because the worker fell behind.",
               lambda t: _one(t.slow_consumers)),
        Metric("nats.pending", "gauge", "{message}", "Input messages received but not handled yet.",
               lambda t: _one(t.pending_inbound)),
        Metric("outbound.pending", "gauge", "{message}", "Messages waiting to be published.",
               lambda t: _one(t.pending_outbound)),
        Metric("cluster.moves", "counter", "{partition}",
               "Partitions handed to another replica, by reason: partitions (over the fair "
               "share), sessions (load), leaving (SIGTERM).",
               lambda t: _by("reason", (t.cluster or {}).get("moves", {}))),
        Metric("cluster.replicas_gone", "counter", "{replica}",
               "Replicas this one found gone by their closed NATS connection (a crash): their "
               "partitions taken over at once instead of after STT_LEASE_TTL_S.",
               lambda t: _one(t.cluster["replicas_gone"]) if t.cluster else []),
        Metric("durable.acks", "counter", "{ack}",
               "Acknowledgements sent to the durable audio stream (STT_DURABLE), each up to "
               "the oldest audio a session still needs.",
               lambda t: _durable(t, "acks")),
        Metric("durable.replay_skipped", "counter", "{message}",
               "Messages a replay from the stream's ack floor skipped because the resumed "
               "session had taken them in before (STT_DURABLE).",
               lambda t: _durable(t, "replay_skipped")),
        Metric("ready", "gauge", "", "1 when connected, loaded and not draining (/readyz).",
               lambda t: _one(t.ready)),
        Metric("draining", "gauge", "", "1 while shutting down.",
               lambda t: _one(t.draining)),
        Metric("info", "gauge", "", "Version and engine of this worker.", _info),
    )


METRICS = _table()


class Histogram:
    """Cumulative-bucket histogram with at most one label (``kind``)."""

    def __init__(self, name: str, unit: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.unit, self.help, self.buckets = name, unit, help, buckets
        self._series: dict[str, tuple[list[int], list[float]]] = {}  # label -> (counts, [sum])
        self.on_observe: Callable[[float, str], None] | None = None  # e.g. the OTel histogram

    @property
    def prometheus_name(self) -> str:
        return prometheus_name(self.name, self.unit)

    def observe(self, value: float, label: str = "") -> None:
        counts, total = self._series.setdefault(label, ([0] * (len(self.buckets) + 1), [0.0]))
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        else:
            counts[-1] += 1
        total[0] += value
        if self.on_observe is not None:
            self.on_observe(value, label)

    def lines(self, label_name: str) -> Iterator[str]:
        base = self.prometheus_name
        for label, (counts, total) in sorted(self._series.items()):
            labels = {label_name: label} if label else {}
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                yield f"{base}_bucket{_labels({**labels, 'le': _number(bound)})} {running}"
            yield f"{base}_sum{_labels(labels)} {_number(total[0])}"
            yield f"{base}_count{_labels(labels)} {running}"


class MetricsTelemetry(Telemetry):
    """Records the few things the worker does not count itself; renders ``/metrics``.

    Used when the health port is on and OpenTelemetry is off; :class:`stt.ops.otel.OtelTelemetry`
    extends it, so ``/metrics`` reads the same whichever is active.
    """

    def __init__(self, status: StatusSource | None = None) -> None:
        self.status = status or _no_worker
        self.started_at = time.time()
        self.transcription_duration = Histogram(
            "transcription.duration", "s", "Engine time per transcription, by kind.",
            LATENCY_BUCKETS_S)
        self.real_time_factor = Histogram(
            "transcription.real_time_factor", "",
            "Engine seconds per second of audio, by kind (< 1 keeps up with speech).",
            RTF_BUCKETS)
        self.final_latency = Histogram(
            "final.latency", "s", "From the end-of-speech decision to the final's publication.",
            LATENCY_BUCKETS_S)

    # --- hooks ----------------------------------------------------------------------------

    def attach(self, status: StatusSource) -> None:
        self.status = status

    def job_finished(self, token: Any, job: Job, *, engine_s: float, error: str | None,
                     queued_s: float = 0.0) -> None:
        if error is not None:
            return  # counted by the worker (engine.failures, errors{code="engine_failed"})
        kind = "final" if job.is_final else "partial"
        self.transcription_duration.observe(engine_s, kind)
        if job.duration_s > 0:
            self.real_time_factor.observe(engine_s / job.duration_s, kind)

    def final_published(self, message: Transcript, latency_s: float) -> None:
        self.final_latency.observe(latency_s)

    # --- exposition -----------------------------------------------------------------------

    @property
    def histograms(self) -> tuple[Histogram, ...]:
        return (self.transcription_duration, self.real_time_factor, self.final_latency)

    def render(self) -> str:
        """The Prometheus text exposition format (0.0.4)."""
        out: list[str] = []
        snapshot = self.status()
        for metric in METRICS:
            name = metric.prometheus_name
            out.append(f"# HELP {name} {metric.help}")
            out.append(f"# TYPE {name} {metric.kind}")
            out.extend(f"{name}{_labels(labels)} {_number(value)}"
                       for labels, value in metric.read(snapshot))
        for hist in self.histograms:
            name = hist.prometheus_name
            out.append(f"# HELP {name} {hist.help}")
            out.append(f"# TYPE {name} histogram")
            out.extend(hist.lines("kind"))
        out.append("# HELP stt_start_time_seconds Start time of the worker, epoch seconds.")
        out.append("# TYPE stt_start_time_seconds gauge")
        out.append(f"stt_start_time_seconds {_number(self.started_at)}")
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _no_worker() -> Status:
    """Before a worker attaches: nothing loaded, nothing connected."""
    return Status(version=package_version(), engine={}, engine_ready=False, connected=False,
                  draining=False, sessions=0, max_sessions=0)
