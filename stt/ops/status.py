"""What one worker is doing, as a read-only snapshot.

Metrics (``/metrics`` and OpenTelemetry), health (``/readyz``) and service discovery read a
:class:`Status`, never the worker itself: the worker builds one on demand (at scrape or export
time, never per chunk) and nothing downstream can change it. Readiness is decided here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from importlib import metadata
from typing import Any

from stt.core.session import Counters

# the sessions' own tallies, declared once in Counters: what the worker sums over its sessions
SESSION_TOTALS = tuple(f.name for f in fields(Counters) if f.type in ("int", int))
CHUNK_RESULTS = tuple(name.removeprefix("chunks_") for name in SESSION_TOTALS
                      if name.startswith("chunks_"))  # ok, duplicate, late, dropped


def package_version() -> str:
    try:
        return metadata.version("stt-streaming")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def not_ready_reasons(*, engine_ready: bool, connected: bool, draining: bool) -> list[str]:
    """Why a worker should not receive traffic; empty when it is ready."""
    reasons = []
    if not engine_ready:
        reasons.append("engine loading")
    if not connected:
        reasons.append("NATS not connected")
    if draining:
        reasons.append("draining")
    return reasons


@dataclass(frozen=True)
class Status:
    version: str
    engine: Mapping[str, Any]            # Engine.describe(): name, model, device, ...
    engine_ready: bool
    connected: bool
    draining: bool
    sessions: int
    max_sessions: int
    sessions_started: int = 0
    sessions_ended: Mapping[str, int] = field(default_factory=dict)   # by reason
    audio_received_s: float = 0.0
    audio_transcribed_s: float = 0.0
    chunks: Mapping[str, int] = field(default_factory=dict)           # by CHUNK_RESULTS
    messages_in: int = 0
    bad_messages: int = 0
    published: int = 0
    publish_failures: int = 0
    transcripts: Mapping[str, int] = field(default_factory=dict)      # partial, final
    interrupts: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)           # by protocol code
    engine_jobs: int = 0
    engine_failures: int = 0
    engine_seconds: float = 0.0
    turn_queries: Mapping[str, int] = field(default_factory=dict)     # scored, failed
    turn_seconds: float = 0.0
    reconnects: int = 0
    disconnects: int = 0
    slow_consumers: int = 0
    pending_inbound: int = 0
    pending_outbound: int = 0
    cluster: Mapping[str, Any] | None = None  # STT_PARTITIONS: replica id, partitions held, ...

    @property
    def not_ready(self) -> list[str]:
        return not_ready_reasons(engine_ready=self.engine_ready, connected=self.connected,
                                 draining=self.draining)

    @property
    def ready(self) -> bool:
        return not self.not_ready


StatusSource = Callable[[], Status]
