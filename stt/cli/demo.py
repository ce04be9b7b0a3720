"""``stt demo`` and ``stt live``: everything on embedded defaults."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from stt.cli.client import connect_client, printer
from stt.cli.wiring import SAMPLE, embedded
from stt.ops import logs


async def _demo(args: argparse.Namespace) -> int:
    from stt.cluster.membership import partition_of, wait_balanced
    from stt.core.audio import load_file
    from stt.transport.client import stream_audio
    from stt.transport.nats_server import REPLICAS_PARTITIONS

    path = args.file or str(SAMPLE)
    many = args.replicas > 1
    async with embedded(args.engine, args.log_level, args.replicas) as (server, settings,
                                                                        workers):
        print(f"nats-server {server.url} · engine {settings.transcription.engine} · "
              f"streaming {path} at {args.speed:g}x real time", flush=True)
        sid = "demo-" + uuid.uuid4().hex[:6]
        nc = await connect_client(settings)
        if many:  # every replica holds its share of the partitions before the session starts
            await wait_balanced(nc, args.replicas, REPLICAS_PARTITIONS, 60)
            p = partition_of(sid, REPLICAS_PARTITIONS)
            for w in workers:
                assert w.cluster is not None
                print(f"replica {w.cluster.replica_id}: {len(w.cluster.owned)} partitions"
                      f"{f' (with {sid}, partition {p})' if p in w.cluster.owned else ''}")
        try:
            samples, rate = load_file(path)
            t0 = time.monotonic()
            result = await stream_audio(nc, samples, rate, session_id=sid,
                                        speed=args.speed, on_message=printer())
            took = time.monotonic() - t0
        finally:
            await nc.close()
    print(f"\n{len(result.finals)} finals, {len(result.partials)} partials, "
          f"{len(samples) / rate:.1f} s of audio in {took:.1f} s")
    print("transcript:", result.text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.replicas <= 8:
        print("stt demo: --replicas must be between 1 and 8", file=sys.stderr)
        return 2
    logs.setup(args.log_level, "text")
    return asyncio.run(_demo(args))


async def _live(args: argparse.Namespace) -> int:
    from stt.api.realtime import serve_realtime
    from stt.transport.nats_server import free_port, port_free

    async with embedded(args.engine, args.log_level) as (server, settings, workers):
        host = args.host or settings.serve.serve_host
        port = settings.serve.serve_port if args.port is None else args.port
        if not port or not port_free(host, port):
            port = free_port()
        settings = settings.replace(serve_host=host, serve_port=port)

        def ready(url: str) -> None:
            print(f"nats-server {server.url} · worker ready "
                  f"(engine {settings.transcription.engine})\n"
                  f"open {url}  (Realtime websocket {url.replace('http', 'ws', 1)}v1/realtime"
                  f"?intent=transcription; Ctrl-C to stop)", flush=True)

        return await serve_realtime(settings, worker_status=workers[0].status, on_ready=ready)


def cmd_live(args: argparse.Namespace) -> int:
    from stt.api.realtime import SERVER_MODULES
    from stt.api.serve import missing_extra

    if missing_extra("stt live", SERVER_MODULES):
        return 2
    logs.setup(args.log_level, "text")
    try:
        return asyncio.run(_live(args))
    except KeyboardInterrupt:
        return 130
