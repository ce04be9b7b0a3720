"""The worker in a child process, with per-message timing on, for ``bench.load``.

``python -m bench.probe --stats-out FILE`` builds the worker from the environment exactly as
``stt worker`` does (``Settings.from_env()``, ``create_engine``), turns on
``worker.stats.sample_chunk_handling`` and serves until SIGTERM/SIGINT. It then writes what
the load generator cannot see from outside (per-message handling times, the worker's chunk
totals, its own peak RSS and CPU time) as JSON, shuts the worker down gracefully and exits.

Protocol with the parent: one JSON line ``{"ready": true, ...}`` on stdout once the worker is
subscribed. The probe also ends itself when its parent dies, so a killed benchmark never
leaves a worker behind.

Why a separate process: the load generator must not share the worker's event loop or its CPU
accounting, and this way the worker runs exactly the product code with nothing else in it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

from stt.cli.wiring import build_worker
from stt.config import Settings
from stt.core.actions import Job
from stt.ops import logs
from stt.ops.telemetry import Telemetry
from stt.transport.worker import Worker
from stt.wire.protocol import Transcript

PARENT_POLL_S = 1.0


class FinalTimings(Telemetry):
    """When each final's parts happened, on the monotonic clock the load generator shares.

    Per (session, segment): the endpoint decision, the start of the engine pass that made the
    final (after any wait inside the engine), its end, and the publication. A speculative final
    may have started its pass before the endpoint.
    """

    def __init__(self) -> None:
        self._passes: dict[tuple[str, int], tuple[float, float]] = {}
        self.finals: list[list[Any]] = []

    def job_finished(self, token: Any, job: Job, *, engine_s: float, error: str | None,
                     queued_s: float = 0.0) -> None:
        if job.is_final and error is None:
            end = time.monotonic()
            self._passes[(job.session_id, job.segment_id)] = (end - engine_s + queued_s, end)

    def final_published(self, message: Transcript, latency_s: float) -> None:
        now = time.monotonic()
        start, end = self._passes.pop((message.session_id, message.segment_id), (now, now))
        self.finals.append([message.session_id, message.segment_id, now - latency_s, start, end,
                            now])


def snapshot(worker: Worker, timings: FinalTimings) -> dict[str, Any]:
    """Everything bench.load needs from inside the worker, as plain JSON values."""
    stats = worker.stats
    usage = resource.getrusage(resource.RUSAGE_SELF)  # before building the big list below
    return {
        # microseconds as integers: compact, and far finer than the 5 ms target
        "handling_us": [round(s * 1e6) for s in stats.chunk_handling_s],
        "chunk_totals": worker.session_totals(),
        "messages_in": stats.messages_in,
        "bad_messages": stats.bad_messages,
        "published": stats.published,
        "publish_failures": stats.publish_failures,
        "sessions_started": stats.sessions_started,
        "sessions_ended": stats.sessions_ended,
        "sessions_open": len(worker.sessions),
        "errors": stats.errors,
        "engine_jobs": stats.engine_jobs,
        "engine_failures": stats.engine_failures,
        "engine_seconds": stats.engine_seconds,
        "pending_outbound": worker.pending_outbound,
        "reconnects": stats.reconnects,
        "disconnects": stats.disconnects,
        "ru_maxrss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "engine": worker.engine.describe(),
        "final_timings": timings.finals,
        "scheduler": vars(worker.scheduler.stats),
    }


async def serve(stats_out: Path) -> None:
    settings = Settings.from_env()
    logs.setup(settings.ops.log_level, settings.ops.log_format)
    timings = FinalTimings()
    worker = build_worker(settings, telemetry=timings)
    worker.stats.sample_chunk_handling = True
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        # polling: nothing signals a parent's death portably
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(PARENT_POLL_S)
        stop.set()

    watcher = asyncio.create_task(watch_parent())
    try:
        await worker.start()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # CPU spent so far (imports, engine load) is not serving: the parent subtracts it
        print(json.dumps({"ready": True, "pid": os.getpid(), "engine": worker.engine.describe(),
                          "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
        await stop.wait()
        data = snapshot(worker, timings)
        tmp = stats_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(stats_out)  # the parent never reads a half-written file
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await worker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--stats-out", type=Path, required=True,
                        help="where to write the worker's stats (JSON) on SIGTERM")
    parser.add_argument("--profile", type=Path, default=None,
                        help="also profile the event loop thread with cProfile into this file")
    args = parser.parse_args(argv)
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    try:
        asyncio.run(serve(args.stats_out))
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(args.profile))
    print(json.dumps({"stopped": True, "wall_s": round(time.perf_counter() - started, 2)}),
          file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
