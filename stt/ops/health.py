"""The side HTTP port (``STT_HEALTH_PORT``): ``/livez``, ``/readyz`` and ``/metrics``.

* ``/livez``  200 whenever the event loop answers. It deliberately ignores NATS: during a NATS
  outage every replica would fail it at once and be restarted together, which helps nothing
  (the client reconnects by itself) and loses the sessions they hold.
* ``/readyz`` 200 when connected to NATS, the model is loaded and the worker is not draining;
  503 otherwise, with the reasons as JSON.
* ``/metrics`` the Prometheus text format (see :mod:`stt.ops.metrics`).

A few lines of asyncio instead of a web framework: three GET routes on the worker's own
event loop, so an answer proves that loop is alive, and no dependency is needed.

``python -m stt.ops.health [URL]`` is the container health check: exit 0 when the URL (default
``http://127.0.0.1:$STT_HEALTH_PORT/livez``, or ``$STT_HEALTHCHECK_URL``) answers 2xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from stt.ops.metrics import CONTENT_TYPE, MetricsTelemetry
from stt.ops.status import Status, StatusSource

log = logging.getLogger("stt.health")

MAX_REQUEST_HEAD_BYTES = 8192
READ_TIMEOUT_S = 5.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}


def readiness(status: Status) -> tuple[bool, dict[str, Any]]:
    """Whether the worker should count as ready, and why not."""
    return status.ready, {"ready": status.ready, "reasons": status.not_ready,
                          "sessions": status.sessions, "engine": dict(status.engine)}


class HealthServer:
    def __init__(self, status: StatusSource, metrics: MetricsTelemetry, host: str = "0.0.0.0",
                 port: int = 8080) -> None:
        self.status = status
        self.metrics = metrics
        self.host = host
        self.port = port  # 0 picks a free port; the real one is here after start()
        self.started_at = time.monotonic()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("health endpoints up", extra={"host": self.host, "port": self.port,
                                               "paths": "/livez /readyz /metrics"})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for one request (no I/O: testable directly)."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/livez":
            body = {"status": "ok", "uptime_s": round(time.monotonic() - self.started_at, 1)}
            return 200, "application/json", json.dumps(body).encode() + b"\n"
        if path == "/readyz":
            ready, detail = readiness(self.status())
            return (200 if ready else 503), "application/json", \
                json.dumps(detail, default=str).encode() + b"\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics.render().encode()
        return 404, "text/plain", b"not found: try /livez, /readyz or /metrics\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            if len(head) > MAX_REQUEST_HEAD_BYTES:
                raise ValueError("request head too large")
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                raise ValueError("bad request line")
            method, path = parts[0], parts[1]
            try:
                status, content_type, body = self.respond(method, path)
            except Exception:  # a metrics bug must not look like a dead loop to the probe
                log.exception("health endpoint failed", extra={"path": path})
                status, content_type, body = 503, "text/plain", b"internal error\n"
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, ConnectionError):
            method, status, content_type, body = "GET", 400, "text/plain", b"bad request\n"
        head_out = (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\n"
                    "Connection: close\r\n\r\n").encode()
        try:
            writer.write(head_out if method == "HEAD" else head_out + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def check(url: str, timeout_s: float = 3.0) -> int:
    """Exit status for a container health check: 0 when ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 0 if 200 <= response.status < 300 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"health check {url} failed: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    default = os.environ.get("STT_HEALTHCHECK_URL") or \
        f"http://127.0.0.1:{os.environ.get('STT_HEALTH_PORT') or '8080'}/livez"
    return check(args[0] if args else default)


if __name__ == "__main__":
    sys.exit(main())
