"""nats.micro discovery over a real nats-server: $SRV.PING, $SRV.INFO, $SRV.STATS, status."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest

from stt.transport.client import send
from stt.transport.discovery import SERVICE_NAME, Discovery
from stt.wire.protocol import Subjects


async def gather(nc: Any, subject: str, expect: int = 0,
                 wait_s: float = 2.0) -> list[dict[str, Any]]:
    """Every answer to one request, as ``nats micro ls`` collects them: until ``expect`` answers
    have come (then a short wait for extra ones), or ``wait_s`` passes without one."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subject, b"", reply=inbox)
    answers = []
    try:
        while True:
            timeout = 10.0 if len(answers) < expect else wait_s  # a loaded machine answers late
            msg = await sub.next_msg(timeout=timeout)
            if msg.data:  # not the server's empty "no responders" status
                answers.append(json.loads(msg.data))
    except nats.errors.TimeoutError:
        pass
    await sub.unsubscribe()
    return answers


async def test_ping_info_stats_and_status(worker_factory: Any, nc: Any) -> None:
    first, second = await worker_factory(), await worker_factory()
    workers = [first, second]
    discoveries = [Discovery(w.settings, w.status) for w in workers]
    for d, w in zip(discoveries, workers, strict=True):
        await d.start(w.nc)
    try:
        pings = await gather(nc, "$SRV.PING", expect=2)
        ours = [p for p in pings if p["name"] == SERVICE_NAME]
        assert len(ours) == 2
        assert {p["id"] for p in ours} == {d.service.id for d in discoveries if d.service}
        assert all(p["type"] == "io.nats.micro.v1.ping_response" and p["version"] == "0.1.0"
                   for p in ours)

        d = discoveries[0]
        assert d.service is not None
        reply = await nc.request(f"$SRV.INFO.{SERVICE_NAME}.{d.service.id}", b"", timeout=2)
        info = json.loads(reply.data)
        assert info["type"] == "io.nats.micro.v1.info_response"
        assert info["metadata"]["engine"] == "faster-whisper"
        assert info["metadata"]["input_subject"] == "ai.voice.stream.*"
        (endpoint,) = info["endpoints"]
        assert endpoint["name"] == "status" and endpoint["subject"] == d.status_subject

        status = json.loads((await nc.request(endpoint["subject"], b"", timeout=2)).data)
        assert status["ready"] is True and status["sessions"] == 0
        assert status["engine"]["name"] == "faster-whisper"

        # a live session shows in status and in $SRV.STATS (the session goes to both workers:
        # no queue group)
        await send(nc, Subjects(), "s1", {"type": "start", "session_id": "s1"})
        await asyncio.sleep(0.2)
        status = json.loads((await nc.request(endpoint["subject"], b"", timeout=2)).data)
        assert status["sessions"] == 1 and status["counters"]["sessions_started"] == 1
        stats = await gather(nc, f"$SRV.STATS.{SERVICE_NAME}", expect=2)
        assert len(stats) == 2
        for s in stats:
            assert s["type"] == "io.nats.micro.v1.stats_response"
            (ep,) = s["endpoints"]
            assert ep["data"]["sessions"] == 1 and ep["data"]["draining"] is False
        assert max(s["endpoints"][0]["num_requests"] for s in stats) == 2
    finally:
        for d in discoveries:
            await d.stop()

    # stopped: the worker leaves discovery
    assert [p for p in await gather(nc, "$SRV.PING") if p["name"] == SERVICE_NAME] == []
    with pytest.raises(nats.errors.NoRespondersError):
        await nc.request(f"$SRV.PING.{SERVICE_NAME}", b"", timeout=2)


async def test_discovery_survives_a_nats_restart(worker_factory: Any, nats_server: Any,
                                                 nc: Any) -> None:
    worker = await worker_factory()
    discovery = Discovery(worker.settings, worker.status)
    await discovery.start(worker.nc)
    try:
        nats_server.stop()
        await asyncio.sleep(0.3)
        nats_server.start()
        for _ in range(100):  # both clients reconnect and resubscribe on their own
            if nc.is_connected and worker.connected:
                break
            await asyncio.sleep(0.05)
        assert worker.nc is not None
        await worker.nc.flush()
        reply = await nc.request(f"$SRV.PING.{SERVICE_NAME}", b"", timeout=2)
        assert json.loads(reply.data)["id"] == discovery.service.id  # type: ignore[union-attr]
    finally:
        await discovery.stop()
