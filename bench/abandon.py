"""Open N sessions, abandon them, and watch the idle timeout end them and memory come back.

    python -m bench.abandon --sessions 2000 --idle-timeout-s 5

Runs a real nats-server and the worker in this process (the sessions and their buffers are what
is measured), prints RSS before, with every session open, and after the idle timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time

import nats
import numpy as np
import psutil

from stt.cli.wiring import build_worker
from stt.config import Settings
from stt.core.audio import to_pcm16
from stt.transport.nats_server import NatsServer
from stt.transport.worker import TRIM_INTERVAL_S
from stt.wire import protocol
from stt.wire.protocol import Subjects

from .common import machine


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


async def run(sessions: int, idle_timeout_s: float, speech_s: float) -> None:
    rng = np.random.default_rng(0)
    # half a second of a voiced-like tone so every session opens a segment with buffered audio
    t = np.arange(int(16000 * speech_s)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + 0.1 * rng.standard_normal(t.size)))
    chunks = [to_pcm16(tone[i:i + 640].astype(np.float32)) for i in range(0, tone.size, 640)]
    subjects = Subjects()
    with NatsServer() as server:
        settings = Settings.from_env(environ={}, overrides={
            "nats_url": server.url, "engine": "bench.null_engine:InstantEngine",
            "session_idle_timeout_s": idle_timeout_s, "max_sessions": sessions + 10})
        worker = build_worker(settings)
        await worker.start()
        nc = await nats.connect(server.url)
        gc.collect()
        before = rss_mib()
        for i in range(sessions):
            subject = subjects.input(f"gone{i}")
            await nc.publish(subject, protocol.pack({"type": "start"}))
            for chunk in chunks:
                await nc.publish(subject, protocol.pack({"type": "chunk", "audio": chunk}))
        await nc.flush()
        while worker.stats.sessions_started < sessions:  # noqa: ASYNC110 - polling from outside
            await asyncio.sleep(0.05)
        peak_open = len(worker.sessions)
        gc.collect()
        with_sessions = rss_mib()
        t0 = time.monotonic()
        while worker.sessions:  # noqa: ASYNC110 - polling the worker from outside
            await asyncio.sleep(0.1)
        ended_after = time.monotonic() - t0
        await asyncio.sleep(TRIM_INTERVAL_S + 0.5)  # the worker hands freed heap back this often
        gc.collect()
        after = rss_mib()
        ended = worker.stats.sessions_ended.get("idle_timeout", 0)
        await nc.close()
        await worker.shutdown()
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {machine()}")
    print(f"sessions opened {sessions} (open at once {peak_open}), ended by idle timeout {ended} "
          f"in {ended_after:.1f} s after the last opened")
    print(f"worker RSS MiB: before {before:.0f}, all open {with_sessions:.0f}, after {after:.0f} "
          f"(+{after - before:.0f} MiB kept of +{with_sessions - before:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--idle-timeout-s", type=float, default=5.0)
    parser.add_argument("--speech-s", type=float, default=0.5)
    args = parser.parse_args()
    asyncio.run(run(args.sessions, args.idle_timeout_s, args.speech_s))


if __name__ == "__main__":
    main()
