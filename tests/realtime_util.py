"""The Realtime bridge served in the test's event loop, on a free port, over a real NATS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import uvicorn

from stt.api.realtime import MAX_MESSAGE_BYTES, Bridge, create_app
from stt.config import Settings
from stt.ops.status import Status
from stt.transport.nats_server import free_port


@contextlib.asynccontextmanager
async def bridge_server(settings: Settings,
                        worker_status: Callable[[], Status] | None = None
                        ) -> AsyncIterator[tuple[str, Bridge]]:
    """Yields (http://127.0.0.1:PORT, the bridge)."""
    bridge = Bridge(settings, worker_status)
    assert await bridge.connect()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(bridge), host="127.0.0.1", port=port,
                                           log_config=None, ws_max_size=MAX_MESSAGE_BYTES))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # pytest's
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(200):
            if server.started:
                break
            await asyncio.sleep(0.02)
        assert server.started
        yield f"http://127.0.0.1:{port}", bridge
    finally:
        server.should_exit = True
        await task
        await bridge.close()


def openai_client(url: str, api_key: str = "unused") -> Any:
    from openai import AsyncOpenAI

    return AsyncOpenAI(api_key=api_key, base_url=url + "/v1", max_retries=0)
