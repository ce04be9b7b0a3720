"""Service discovery over NATS: the worker as a ``nats.micro`` service.

Every worker answers the standard ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` requests
(``nats micro ls``, ``nats micro info stt-worker``, ``nats micro stats stt-worker``), and has
one endpoint, ``status``, on a subject of its own (``stt.status.<instance id>``, listed by
``$SRV.INFO``) that returns its state as JSON: sessions, engine, readiness, counters. The
same status is attached to the endpoint's ``$SRV.STATS`` entry, so one stats request shows
every worker's sessions at once.

The status subject is per instance, not shared: a shared subject would be answered by one
worker of the queue group, chosen at random, which is not what anyone asking wants.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import Any

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointStats, Service

from stt.config import Settings
from stt.ops.status import Status, StatusSource, package_version
from stt.transport.connection import subscribed

log = logging.getLogger("stt.discovery")

SERVICE_NAME = "stt-worker"
STATUS_SUBJECT_PREFIX = "stt.status"


def status(s: Status, started_at: float) -> dict[str, Any]:
    """What the ``status`` endpoint answers (JSON-ready; no per-session detail)."""
    return {
        "ready": s.ready,
        "connected": s.connected,
        "engine_ready": s.engine_ready,
        "draining": s.draining,
        "sessions": s.sessions,
        "max_sessions": s.max_sessions,
        "engine": dict(s.engine),
        "pending_outbound": s.pending_outbound,
        "uptime_s": round(time.monotonic() - started_at, 1),
        "counters": {
            "messages_in": s.messages_in, "published": s.published,
            "sessions_started": s.sessions_started, "sessions_ended": dict(s.sessions_ended),
            "engine_jobs": s.engine_jobs, "engine_failures": s.engine_failures,
            "errors": dict(s.errors), "reconnects": s.reconnects,
            **{"chunks_" + k: v for k, v in s.chunks.items()},
        },
    }


class Discovery:
    """Registers the worker with ``nats.micro`` on its NATS connection; ``stop()`` removes it."""

    def __init__(self, settings: Settings, status: StatusSource) -> None:
        self.settings = settings
        self.status = status
        self.started_at = time.monotonic()
        self.service: Service | None = None

    @property
    def status_subject(self) -> str | None:
        return f"{STATUS_SUBJECT_PREFIX}.{self.service.id}" if self.service else None

    async def start(self, nc: Client | None) -> Service:
        """Register on the worker's connection (``worker.nc``, once it is started)."""
        if nc is None:
            raise RuntimeError("the worker is not connected; start it first")
        settings = self.settings
        self.service = await add_service(
            nc, name=SERVICE_NAME, version=package_version(),
            description="Streaming speech-to-text worker: audio chunks in, transcripts out",
            metadata={"engine": str(self.status().engine.get("name", "")),
                      "input_subject": settings.nats.input_subject,
                      "output_subject": settings.nats.subjects.output_wildcard,
                      "host": socket.gethostname()},
            stats_handler=self._stats)
        await self.service.add_endpoint(name="status", subject=self.status_subject,
                                        handler=self._on_status)
        # Registered means the server has our subscriptions: until this round trip, a $SRV.PING
        # from another connection can pass this worker by.
        await subscribed(nc)
        log.info("registered with NATS service discovery",
                 extra={"service": SERVICE_NAME, "id": self.service.id,
                        "status_subject": self.status_subject})
        return self.service

    async def stop(self) -> None:
        """Leave discovery (before draining, so a stopping worker is no longer listed)."""
        if self.service is None:
            return
        service, self.service = self.service, None
        try:
            await service.stop()
        except Exception as exc:  # the connection may already be gone; nothing to clean up
            log.debug("micro service stop: %s", exc)

    async def _on_status(self, request: Request) -> None:
        await request.respond(json.dumps(status(self.status(), self.started_at),
                                         default=str).encode())

    def _stats(self, endpoint: EndpointStats) -> dict[str, Any]:
        return status(self.status(), self.started_at)
