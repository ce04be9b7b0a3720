"""Chaos soak: many real-time sessions while NATS restarts, the engine service dies, garbage floods.

    python -m bench.chaos                          # 100 sessions, 90 s
    python -m bench.chaos --sessions 150 --duration-s 120

Everything is a real process on loopback: nats-server (``stt.transport.nats_server``), ``stt serve`` as the
HTTP engine's service, ``stt worker`` with ``STT_ENGINE=http`` (exactly as deployed), and this
process as every client. The service answers with the benchmark-only instant engine
(``bench/null_engine.py``), so what is measured is the worker's resilience, not recognition,
and 100 sessions fit on 2 cores. Each session streams short corpus clips back to back in real
time (40 ms chunks, ``seq`` numbered), each followed by 1.2 s of silence, and ends with ``end``.
Meanwhile a flood of malformed messages (random bytes, unknown types, bad base64) goes to live
and unknown sessions, and on a schedule:

* nats-server is killed and started again on the same port, twice (2 s down each);
* the HTTP service is killed (SIGKILL) and started again (6 s down).

Printed: whether the worker process survived (restarts), sessions that got their ``end``,
utterances that got a final within 4 s of their speech ending (those near an outage counted
apart), error messages by code, and the worker's RSS at the start, at its peak and after the
sessions ended.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import nats
import numpy as np
import psutil

from stt.core.audio import SAMPLE_RATE, to_pcm16
from stt.transport.nats_server import NatsServer, free_port
from stt.wire import protocol
from stt.wire.protocol import Subjects

from .common import DEFAULT_CORPUS, ROOT, header
from .scenarios import load_corpus, select

CHUNK_S = 0.04
GAP_S = 1.2             # silence after each clip
FINAL_WITHIN_S = 4.0    # a final must follow the end of its speech within this
NEAR_OUTAGE_S = 3.0     # utterances ending this close to an outage are counted apart
LATE_WITHIN_S = 15.0    # ... and whether their final came at all, once the outage was over
FLOOD_PER_S = 100


@dataclass
class Sess:
    sid: str
    utterance_ends: list[float] = field(default_factory=list)  # monotonic, when the speech ended
    finals: list[float] = field(default_factory=list)          # arrival of finals with words
    ended: bool = False


class Service:
    """``stt serve`` with the instant engine on a fixed port: killed and started at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, "STT_ENGINE": "bench.null_engine:InstantEngine",
               "PYTHONPATH": str(ROOT), "STT_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen([sys.executable, "-m", "stt", "serve", "--host", "127.0.0.1",
                                      "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("stt serve did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_worker(nats_url: str, whisper_url: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NATS_URL": nats_url, "STT_ENGINE": "http", "WHISPER_URL": whisper_url,
           "STT_ENGINE_WORKERS": "16", "STT_LOG_FORMAT": "json", "STT_MAX_SESSIONS": "5000"}
    proc = subprocess.Popen([sys.executable, "-m", "stt", "worker"], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b'"listening"' not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("worker did not start:\n" + log.read_text(errors="replace"))
        time.sleep(0.1)
    return proc


async def talk(nc: Any, subjects: Subjects, s: Sess, clips: list[np.ndarray], until: float,
               rng: random.Random) -> None:
    await asyncio.sleep(rng.random())  # stagger the starts
    await nc.publish(subjects.input(s.sid), protocol.pack({"type": "start",
                                                           "sample_rate": SAMPLE_RATE}))
    step = int(CHUNK_S * SAMPLE_RATE)
    seq, t0, sent = 0, time.monotonic(), 0.0
    silence = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    while time.monotonic() < until:
        clip = clips[rng.randrange(len(clips))]
        audio = np.concatenate([clip, silence])
        for off in range(0, audio.size, step):
            sent += step / SAMPLE_RATE
            delay = t0 + sent - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if off <= clip.size < off + step:
                s.utterance_ends.append(time.monotonic())
            pcm = to_pcm16(audio[off:off + step])
            try:
                await nc.publish(subjects.input(s.sid), protocol.pack(
                    {"type": "chunk", "seq": seq, "audio_b64": base64.b64encode(pcm).decode()}))
            except Exception:  # NATS down and the client's buffer full: the chunk is lost
                pass
            seq += 1
    for _ in range(50):  # NATS may be down right now: try the end until it goes out
        try:
            await nc.publish(subjects.input(s.sid), protocol.pack({"type": "end"}))
            await nc.flush(timeout=2)
            return
        except Exception:
            await asyncio.sleep(0.2)


async def flood(nc: Any, subjects: Subjects, sids: list[str], until: float,
                rng: random.Random) -> int:
    junk = [lambda: rng.randbytes(rng.randrange(1, 200)),
            lambda: protocol.pack({"type": "chunk", "audio_b64": "!!not base64!!"}),
            lambda: protocol.pack({"type": "sing", "seq": rng.randrange(10**6)}),
            lambda: protocol.pack({"type": "start", "sample_rate": -5}),
            lambda: msgpack.packb([1, 2, 3])]  # not a map
    n = 0
    while time.monotonic() < until:
        await asyncio.sleep(1 / FLOOD_PER_S)
        sid = rng.choice(sids) if rng.random() < 0.5 else f"junk{rng.randrange(1000)}"
        try:
            await nc.publish(subjects.input(sid), rng.choice(junk)())
            n += 1
        except Exception:
            pass
    return n


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    margin = int(0.25 * SAMPLE_RATE)  # of the quiet around each clip's speech
    clips = [c.audio[max(0, int(c.onset_s * SAMPLE_RATE) - margin):
                     int(c.offset_s * SAMPLE_RATE) + margin]
             for c in select(load_corpus(args.corpus), 12) if c.offset_s - c.onset_s < 7]
    print(header())
    print(f"{args.sessions} sessions x {args.duration_s:g} s, {len(clips)} clips, flood "
          f"{FLOOD_PER_S}/s of malformed messages", flush=True)
    subjects = Subjects()
    log = Path(f"/tmp/stt-chaos-worker-{os.getpid()}.log")
    service = Service()
    with NatsServer() as server:
        service.start()
        worker = start_worker(server.url, service.url, log)
        proc = psutil.Process(worker.pid)
        sessions = [Sess(f"chaos{i:03d}") for i in range(args.sessions)]
        by_id = {s.sid: s for s in sessions}
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                pending_size=64 * 1024 * 1024)
        errors: dict[str, int] = {}

        async def on_output(msg: Any) -> None:
            s = by_id.get(msg.subject.rsplit(".", 1)[-1])
            if s is None:
                return
            m = protocol.unpack(msg.data)
            if m.get("type") == "transcript" and m.get("is_final") and m.get("transcript"):
                s.finals.append(time.monotonic())
            elif m.get("type") == "end":
                s.ended = True
            elif m.get("type") == "error":
                errors[str(m.get("code"))] = errors.get(str(m.get("code")), 0) + 1

        await nc.subscribe(subjects.output("*"), cb=on_output)
        t0 = time.monotonic()
        until = t0 + args.duration_s
        outages: list[tuple[str, float, float]] = []

        async def chaos() -> None:
            d = args.duration_s
            for at, what, down in ((0.22 * d, "nats", 2.0), (0.45 * d, "http", 6.0),
                                   (0.72 * d, "nats", 2.0)):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                began = time.monotonic()
                if what == "nats":
                    server.kill()
                    await asyncio.sleep(down)
                    await asyncio.get_running_loop().run_in_executor(None, server.start)
                else:
                    service.kill()
                    await asyncio.sleep(down)
                    await asyncio.get_running_loop().run_in_executor(None, service.start)
                outages.append((what, began, time.monotonic()))
                print(f"  {what} down {began - t0:.1f}-{time.monotonic() - t0:.1f} s", flush=True)

        rss_start = peak = 0.0

        async def sample_rss() -> None:
            nonlocal rss_start, peak
            while True:
                await asyncio.sleep(0.5)
                with contextlib.suppress(psutil.Error):
                    rss = proc.memory_info().rss / 2**20
                    peak = max(peak, rss)
                    if not rss_start and time.monotonic() > t0 + 8:
                        rss_start = rss

        sampler = asyncio.create_task(sample_rss())
        chaos_task = asyncio.create_task(chaos())
        flooded = asyncio.create_task(flood(nc, subjects, list(by_id), until, rng))
        await asyncio.gather(*(talk(nc, subjects, s, clips, until, random.Random(rng.random()))
                               for s in sessions))
        await chaos_task
        deadline = time.monotonic() + 30
        while not all(s.ended for s in sessions) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        await asyncio.sleep(7)  # the worker trims freed memory at most every 5 s
        rss_end = proc.memory_info().rss / 2**20
        sampler.cancel()
        n_flood = await flooded
        await nc.close()
        alive = worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(30)
        service.kill()
    near = [(b - NEAR_OUTAGE_S, e + NEAR_OUTAGE_S) for _, b, e in outages]
    got = total = got_near = late_near = total_near = 0
    for s in sessions:
        for end in s.utterance_ends:
            if end > until - FINAL_WITHIN_S:
                continue  # its final may race the session's end
            ok = any(end <= f <= end + FINAL_WITHIN_S for f in s.finals)
            if any(a <= end <= b for a, b in near):
                total_near, got_near = total_near + 1, got_near + ok
                late_near += any(end <= f <= end + LATE_WITHIN_S for f in s.finals)
            else:
                total, got = total + 1, got + ok
    print(f"\nworker restarts: {0 if alive else 1} (exit {code} on the final SIGTERM)")
    print(f"sessions with their end: {sum(s.ended for s in sessions)} of {len(sessions)}")
    print(f"utterances with a final within {FINAL_WITHIN_S:g} s, away from outages: {got} of "
          f"{total}; within {NEAR_OUTAGE_S:g} s of an outage: {got_near} of {total_near} "
          f"({late_near} within {LATE_WITHIN_S:g} s)")
    print(f"malformed messages sent: {n_flood}; error messages received: "
          f"{json.dumps(errors, sort_keys=True)}")
    print(f"worker RSS MiB: {rss_start:.0f} at 8 s, {peak:.0f} peak (sampled), {rss_end:.0f} "
          f"after the sessions ended")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--duration-s", type=float, default=90.0)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--seed", type=int, default=1)
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
