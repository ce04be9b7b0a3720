"""``stt realtime``: the OpenAI Realtime transcription websocket and the live microphone page,
a bridge onto the worker's NATS subjects.

* ``GET /v1/realtime`` (websocket; ``?intent=transcription``, any ``model``): each connection is
  one worker session with a random id: audio goes to ``ai.voice.stream.{id}``, transcripts come
  back from ``ai.voice.transcription.{id}``; :mod:`stt.api.realtime_mapping` translates both ways.
  Closing the websocket sends the worker ``end``, so the session is freed.
* ``GET /``: the page (``stt/api/web/``: plain HTML and JavaScript, no build step, nothing fetched
  from elsewhere); it speaks the same websocket, with ``?stt_events=1`` to also get the worker's
  own messages (stable words, turn events) for its timeline.
* ``GET /health``: NATS connected, websockets open (and, under ``stt live``, the worker's
  sessions).

With ``STT_SERVE_API_KEY`` set, the websocket needs ``Authorization: Bearer KEY`` (or, from a
browser, which cannot set headers, the subprotocol ``openai-insecure-api-key.KEY`` as OpenAI's
own browser clients send it); none by default, when the server binds loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stt import config
from stt.api.realtime_mapping import Actions, RealtimeSession
from stt.config import Settings
from stt.ops import logs
from stt.ops.status import Status
from stt.transport.connection import ConnectError
from stt.wire import protocol

log = logging.getLogger("stt.realtime")

WEB = Path(__file__).parent / "web"
KEY_PROTOCOL = "openai-insecure-api-key."
MAX_MESSAGE_BYTES = 24 * 1024 * 1024  # the API takes appends of up to 15 MiB, base64 on top
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=lambda o: None)


def authorized(headers: Any, subprotocols: list[str], api_key: str) -> bool:
    if not api_key:
        return True
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), api_key):
        return True
    return any(p.startswith(KEY_PROTOCOL) and hmac.compare_digest(p[len(KEY_PROTOCOL):], api_key)
               for p in subprotocols)


class Bridge:
    """The NATS side: one connection for every websocket."""

    def __init__(self, settings: Settings,
                 worker_status: Callable[[], Status] | None = None) -> None:
        self.settings = settings
        self.subjects = settings.nats.subjects
        self.worker_status = worker_status
        self.nc: Any = None
        self.open = 0  # websockets connected now

    async def connect(self, stop: asyncio.Event | None = None) -> bool:
        from stt.transport.connection import connect

        self.nc = await connect(self.settings.nats, stop=stop, max_reconnect_attempts=-1)
        return self.nc is not None

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    async def session(self, ws: Any) -> None:
        """One websocket: one worker session, until either side closes."""
        from starlette.websockets import WebSocketDisconnect

        sid = uuid.uuid4().hex
        rs = RealtimeSession(sid, worker_events=ws.query_params.get("stt_events") in ("1",
                                                                                      "true"))
        lock, wake = asyncio.Lock(), asyncio.Event()
        state = {"open": True}

        async def apply(actions: Actions) -> None:
            for message in actions.worker:
                await self.nc.publish(self.subjects.input(sid), protocol.pack(message))
            if actions.client and state["open"]:
                async with lock:
                    for event in actions.client:
                        await ws.send_text(_json(event))

        async def on_worker(msg: Any) -> None:
            try:
                message = protocol.unpack(msg.data)
                await apply(rs.on_worker(message, time.monotonic()))
            except Exception as exc:  # a closed websocket, a garbled payload: this one only
                log.debug("worker message not delivered: %s", exc, extra={"session_id": sid})
            wake.set()

        async def ticker() -> None:
            while True:
                due = rs.deadline
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), None if due is None
                                           else max(0.0, due - time.monotonic()))
                wake.clear()
                await apply(rs.tick(time.monotonic()))

        sub = await self.nc.subscribe(self.subjects.output(sid), cb=on_worker)
        self.open += 1
        tick = asyncio.create_task(ticker())
        log.info("realtime session opened", extra={"session_id": sid})
        try:
            await apply(Actions(client=[rs.created()]))
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("text")
                data = data if data is not None else message.get("bytes") or b""
                await apply(rs.on_client(data, time.time(), time.monotonic()))
                wake.set()
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away mid-send
        finally:
            state["open"] = False
            tick.cancel()
            self.open -= 1
            try:
                await apply(rs.close())  # the worker frees the session
            except Exception as exc:  # NATS gone: the worker's idle timeout frees it
                log.warning("could not end the worker session: %s", exc,
                            extra={"session_id": sid})
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            log.info("realtime session closed", extra={"session_id": sid})


def create_app(bridge: Bridge) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Mount, Route, WebSocketRoute
    from starlette.staticfiles import StaticFiles
    from starlette.websockets import WebSocket

    api_key = bridge.settings.serve.serve_api_key

    async def realtime(ws: WebSocket) -> None:
        offered = list(ws.scope.get("subprotocols") or [])
        if not authorized(ws.headers, offered, api_key):
            denial = JSONResponse({"error": {"message": "Incorrect API key provided.",
                                             "type": "invalid_request_error", "param": None,
                                             "code": "invalid_api_key"}}, status_code=401)
            try:
                await ws.send_denial_response(denial)
            except RuntimeError:  # a server without the denial extension
                await ws.close(code=1008, reason="invalid api key")
            return
        if bridge.nc is None or not bridge.nc.is_connected:
            await ws.close(code=1011, reason="NATS is not connected")
            return
        await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
        await bridge.session(ws)

    async def index(request: Request) -> Response:
        return FileResponse(WEB / "index.html", headers={"cache-control": "no-cache"})

    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": "ok", "nats": bool(bridge.nc and bridge.nc.is_connected),
                                "websockets": bridge.open}
        if bridge.worker_status is not None:
            body["worker_sessions"] = bridge.worker_status().sessions
        return JSONResponse(body)

    return Starlette(routes=[WebSocketRoute("/v1/realtime", realtime),
                             Route("/", index), Route("/health", health),
                             Mount("/", StaticFiles(directory=WEB))])


async def serve_realtime(settings: Settings, *,
                         worker_status: Callable[[], Status] | None = None,
                         on_ready: Callable[[str], Awaitable[None] | None] | None = None) -> int:
    """Connect to NATS, then serve until SIGTERM/SIGINT; ``on_ready(url)`` once listening."""
    import uvicorn

    from stt.api.serve import _server_class

    bridge = Bridge(settings, worker_status)
    if not await bridge.connect():
        return 0
    server = _server_class()(uvicorn.Config(
        create_app(bridge), host=settings.serve.serve_host, port=settings.serve.serve_port,
        log_config=None, ws_max_size=MAX_MESSAGE_BYTES, server_header=False,
        timeout_graceful_shutdown=2))
    serve = settings.serve
    host = "127.0.0.1" if serve.serve_host in ("0.0.0.0", "::", "") else serve.serve_host
    url = f"http://{host}:{serve.serve_port}/"
    if not settings.serve.serve_api_key and settings.serve.serve_host not in LOOPBACK:
        log.warning("no STT_SERVE_API_KEY: anyone who reaches %s:%s can use the websocket",
                    settings.serve.serve_host, settings.serve.serve_port)

    async def announce() -> None:
        # uvicorn says nothing when its socket is bound but sets `started`
        while not server.started and not server.should_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if server.started and on_ready is not None:
            result = on_ready(url)
            if result is not None:
                await result

    told = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        told.cancel()
        await bridge.close()
    return 0 if server.started else 1


SERVER_MODULES = ("starlette", "uvicorn", "websockets")


def cmd_realtime(args: argparse.Namespace) -> int:
    from stt.api.serve import missing_extra

    if missing_extra("stt realtime", SERVER_MODULES):
        return 2
    settings = Settings.from_env(overrides=config.overrides_from_args(args))
    logs.setup(settings.ops.log_level, settings.ops.log_format)

    def ready(url: str) -> None:
        print(f"open {url}  (Realtime websocket: {url.replace('http', 'ws', 1)}v1/realtime"
              f"?intent=transcription)", flush=True)

    try:
        return asyncio.run(serve_realtime(settings, on_ready=ready))
    except ConnectError as exc:
        print(f"stt realtime: cannot connect to NATS: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def add_parser(sub: Any) -> None:
    from stt.api.serve import add_server_parser

    add_server_parser(
        sub, "realtime", cmd_realtime, ("nats", "serve", "ops"),
        help="OpenAI Realtime transcription websocket + live microphone page, onto a worker "
             "over NATS",
        description="Serve the OpenAI Realtime transcription websocket (/v1/realtime) and the "
                    "live microphone page (/) as a bridge onto the worker's NATS subjects. "
                    "Every flag has an environment variable.")
