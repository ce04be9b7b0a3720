"""Telemetry hooks the worker calls. This base class does nothing and costs nothing.

The worker calls these at a handful of points (never per chunk): when a control message
(start, state_change, end) arrives with NATS headers, around each engine job, and when it
publishes a message. Implementations: the ``/metrics`` recorder (:mod:`stt.ops.metrics`) and
OpenTelemetry (:mod:`stt.ops.otel`); :func:`stt.cli.build_telemetry` picks one from the settings.
They read the worker only through the :class:`~stt.ops.status.Status` snapshots it hands to
:meth:`Telemetry.attach`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stt.core.actions import Job
    from stt.ops.status import StatusSource
    from stt.wire.protocol import Outgoing, Transcript


CANCELLED = "cancelled"  # the ``error`` of a job its session withdrew (not a failure)


class Telemetry:
    def attach(self, status: StatusSource) -> None:
        """The worker's status snapshots, for implementations that report them."""

    def control_message(self, session_id: str, kind: str, headers: dict[str, str] | None) -> None:
        """A start/state_change/end arrived; ``headers`` may carry W3C trace context."""

    def session_closed(self, session_id: str, reason: str) -> None:
        """The session is gone; drop anything kept for it."""

    def job_started(self, job: Job) -> Any:
        """An engine job begins; the return value is handed to ``job_finished``."""
        return None

    def job_finished(self, token: Any, job: Job, *, engine_s: float, error: str | None,
                     queued_s: float = 0.0) -> None:
        """An engine job ended (``error`` is None on success); of its ``engine_s``, the
        request waited ``queued_s`` inside the engine for its pass."""

    def publish_headers(self, message: Outgoing, sequence: int) -> dict[str, str] | None:
        """Headers for an outgoing message (trace context), or None."""
        return None

    def final_published(self, message: Transcript, latency_s: float) -> None:
        """A final left; ``latency_s`` is from the end-of-speech decision to publication."""

    async def shutdown(self) -> None:
        """Flush exporters."""
