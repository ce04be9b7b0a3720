"""Telemetry hooks the worker calls. This base class does nothing and costs nothing.

The worker calls these at a handful of points (never per chunk): when a control message
(start, state_change, end) arrives with NATS headers, around each engine job, and when it
publishes a message. ``create(settings, worker)`` picks the implementation: OpenTelemetry
(:mod:`stt.otel`) when ``OTEL_ENABLED``/``HYPERDX_ENABLED`` is set, the ``/metrics`` recorder
(:mod:`stt.metrics`) when only the health port is on, this no-op otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Settings
    from .session import Job
    from .worker import Worker


class Telemetry:
    def control_message(self, session_id: str, kind: str, headers: dict[str, str] | None) -> None:
        """A start/state_change/end arrived; ``headers`` may carry W3C trace context."""

    def session_closed(self, session_id: str, reason: str) -> None:
        """The session is gone; drop anything kept for it."""

    def job_started(self, job: Job) -> Any:
        """An engine job begins; the return value is handed to ``job_finished``."""
        return None

    def job_finished(self, token: Any, job: Job, *, engine_s: float, error: str | None) -> None:
        """An engine job ended (``error`` is None on success)."""

    def publish_headers(self, session_id: str, message: dict[str, Any]) -> dict[str, str] | None:
        """Headers for an outgoing message (trace context), or None."""
        return None

    def final_published(self, job: Job, latency_s: float) -> None:
        """A final left; ``latency_s`` is from the end-of-speech decision to publication."""

    async def shutdown(self) -> None:
        """Flush exporters."""


def create(settings: Settings, worker: Worker | None = None) -> Telemetry:
    """The cheapest implementation that does what the settings ask for.

    * ``OTEL_ENABLED`` or ``HYPERDX_ENABLED``: :class:`stt.otel.OtelTelemetry` (traces, OTLP
      metrics, and the ``/metrics`` recorder);
    * else, with ``STT_HEALTH_PORT`` set: :class:`stt.metrics.MetricsTelemetry` (a few counters
      and histograms for ``/metrics``, no exporter thread);
    * else this no-op. Without a worker there is nothing to observe: the no-op too.
    """
    if worker is None:
        return Telemetry()
    if settings.otel_enabled or settings.hyperdx_enabled:
        try:
            from .otel import OtelTelemetry
        except ImportError as exc:
            from .config import ConfigError

            variable = "OTEL_ENABLED" if settings.otel_enabled else "HYPERDX_ENABLED"
            raise ConfigError(variable, f"needs the otel extra: pip install "
                                        f"'stt-streaming[otel]' ({exc})") from None
        return OtelTelemetry(settings, worker)
    if settings.health_port:
        from .metrics import MetricsTelemetry

        return MetricsTelemetry(worker)
    return Telemetry()
