"""Many replicas: what the partition mapping adds per message, and failover over repeated SIGKILLs.

    python -m bench.replicas mapping                 # 20,000 messages each way, side by side
    python -m bench.replicas failover --kills 20     # two workers, 12 live sessions, 20 SIGKILLs

Everything is a real process on loopback: nats-server with ``k8s/nats/nats-server.conf``
(:meth:`stt.transport.nats_server.NatsServer.for_replicas`) and, for ``failover``, ``stt worker`` processes
with ``STT_PARTITIONS=32`` and the benchmark-only instant engine (``bench/null_engine.py``), so
what is measured is the handover machinery, not recognition.

``mapping``: one client publishes a 1.3 kB chunk-sized message and receives it itself, in turn
on a plain subject, on ``ai.voice.stream.{id}`` (which the server rewrites to
``stt.in.{partition}.{id}``: this design) and through a JetStream stream (file storage) and a
waiting pull consumer that acknowledges it (the design with pinned consumers, or a durable mode);
printed: one-way latency of each, what each adds to every chunk, and nats-server's CPU per
message. psutil's CPU times tick in 10 ms, so the CPU figures are averages over many messages.

``failover``: this process streams the sample's sentences in a loop, each followed by 1.4 s of
silence, as live sessions (40 ms chunks, real-time pace). Each round SIGKILLs the replica with more
sessions, then measures

* claim: kill → the last of its partitions claimed by the survivor (from the survivor's log):
  from then on that replica receives the sessions' audio again, so this is the window whose
  audio is lost;
* next final: kill → the first final of each of its sessions from the survivor (the utterance
  then in progress included: its remaining speech and the silence that ends it);

and starts a fresh replica, waiting until the two hold 16 partitions each before the next round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgpack
import nats

from stt.cluster.membership import REPLICA_HEADER, heartbeats, partition_of, wait_balanced
from stt.core.audio import load_16k_mono, to_pcm16
from stt.transport.connection import subscribed
from stt.transport.nats_server import REPLICAS_PARTITIONS, NatsServer
from stt.wire import protocol

from .common import ROOT, cpu_s, header, percentile

INSTANT = "bench.null_engine:InstantEngine"
SAMPLE = ROOT / "stt" / "data" / "sample.flac"
CHUNK_S = 0.04
# the sample's sentences (webrtcvad, 0.45 s pauses), seconds; streamed with GAP_S of silence after
# each, so every one ends its utterance (some of the clip's own pauses are under STT_CHUNK_TIMEOUT)
PHRASES = [(0.2, 7.5), (8.5, 12.0), (12.7, 18.2), (19.2, 25.5), (26.4, 30.2)]
GAP_S = 1.4
LAPSED = "partition taken over after its replica stopped renewing it"  # its lease ran out
MID_HANDOVER = "the giving replica went away mid-handover; carrying on from the kept snapshots"


def print_header(argv: list[str]) -> None:
    print(header("python -m bench.replicas " + " ".join(argv), load=True), flush=True)


def spread(values: list[float], unit: str = "s", scale: float = 1.0) -> str:
    if not values:
        return "none"
    p = [percentile(values, q) for q in (50, 95)]
    return (f"n={len(values)} min {min(values) * scale:.2f} p50 {p[0] * scale:.2f} "  # type: ignore[operator]
            f"p95 {p[1] * scale:.2f} max {max(values) * scale:.2f} {unit}")  # type: ignore[operator]


# --- mapping ---------------------------------------------------------------------------------


async def mapping(messages: int) -> None:
    payload = protocol.pack({"type": "chunk", "audio": b"\0" * 1280, "seq": 1})
    with NatsServer.for_replicas() as server:
        assert server.proc is not None
        server_pid = server.proc.pid
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        got: dict[str, list[float]] = defaultdict(list)
        server_cpu: dict[str, float] = defaultdict(float)
        sent: dict[str, float] = {}
        arrived = asyncio.Event()

        async def on(msg: Any) -> None:
            kind = "mapped" if msg.subject.startswith("stt.in.") else "plain"
            got[kind].append(time.perf_counter() - sent[kind])
            arrived.set()

        await nc.subscribe("stt.in.*.bench", cb=on)
        await nc.subscribe("plain.bench", cb=on)
        # the alternative design: every chunk stored in a stream, delivered to a pull consumer
        # and acknowledged (what pinned consumers or a durable mode need)
        await js.add_stream(name="bench", subjects=["durable.>"], storage="file")
        pull = await js.pull_subscribe("durable.bench", durable="bench")
        await subscribed(nc)

        async def one(kind: str) -> None:
            if kind == "jetstream":
                fetch = asyncio.create_task(pull.fetch(1, timeout=5))
                await asyncio.sleep(0)  # the pull request goes out first, as a waiting consumer's
                sent[kind] = time.perf_counter()
                await nc.publish("durable.bench", payload)
                (msg,) = await fetch
                got[kind].append(time.perf_counter() - sent[kind])
                await msg.ack()
                return
            arrived.clear()
            sent[kind] = time.perf_counter()
            await nc.publish("plain.bench" if kind == "plain" else "ai.voice.stream.bench", payload)
            await asyncio.wait_for(arrived.wait(), 5)

        kinds = ("plain", "mapped", "jetstream")
        for i in range(len(kinds) * messages):
            kind = kinds[i % len(kinds)]
            before = cpu_s(server_pid)
            await one(kind)
            server_cpu[kind] += cpu_s(server_pid) - before
        await nc.close()
    for kind in kinds:
        print(f"{kind:>9}: one-way {spread(got[kind], 'µs', 1e6)}; nats-server CPU "
              f"{1e6 * server_cpu[kind] / messages:.0f} µs per message")
    for kind in kinds[1:]:
        d50 = percentile(got[kind], 50) - percentile(got["plain"], 50)  # type: ignore[operator]
        d99 = percentile(got[kind], 99) - percentile(got["plain"], 99)  # type: ignore[operator]
        print(f"{kind} adds {d50 * 1e6:+.1f} µs at p50, {d99 * 1e6:+.1f} µs at p99 per message")


# --- failover --------------------------------------------------------------------------------


class Replica:
    """``python -m stt worker`` with STT_PARTITIONS, its JSON log in a file (also the tests')."""

    def __init__(self, url: str, log_path: Path, engine: str = INSTANT, **env: str) -> None:
        self.log_path = log_path
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("STT_", "WHISPER_"))}
        environ.update({"NATS_URL": url, "STT_ENGINE": engine, "STT_LOG_FORMAT": "json",
                        "STT_PARTITIONS": str(REPLICAS_PARTITIONS), "STT_PARTIAL_INTERVAL": "0",
                        "PYTHONPATH": str(ROOT),
                        # the instant engine measures the mapping, not turn-taking: 60 sessions'
                        # end-of-turn queries would be most of the CPU it runs on
                        **({"STT_ENDPOINTING": "silence"} if engine == INSTANT else {}), **env})
        self.proc = subprocess.Popen([sys.executable, "-m", "stt", "worker"], cwd=ROOT,
                                     env=environ, stdout=log_path.open("wb"),
                                     stderr=subprocess.STDOUT)
        self.id: str | None = None

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"msg": line})  # a traceback, say
        return out

    def learn_id(self) -> str | None:
        """The replica id it logged when it joined."""
        for rec in self.logs():
            if rec.get("msg") == "joined the replicas":
                self.id = rec["replica"]
        return self.id

    def claims(self, since_wall: float, within_s: float = math.inf,
               messages: tuple[str, ...] = (LAPSED,)) -> dict[int, float]:
        """Partition -> seconds after ``since_wall`` (``time.time()``) that this replica took it
        over, by the log line it wrote then."""
        return {r["partition"]: r["ts"] - since_wall for r in self.logs()
                if r.get("msg") in messages and since_wall < r["ts"] < since_wall + within_s}

    def stop(self, timeout_s: float = 40.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


async def failover(kills: int, sessions: int) -> int:
    speech = load_16k_mono(str(SAMPLE))
    pcm = b"".join(to_pcm16(speech[int(a * 16000):int(b * 16000)]) + bytes(int(GAP_S * 16000) * 2)
                   for a, b in PHRASES)
    step = int(CHUNK_S * 16000) * 2
    tmp = Path(tempfile.mkdtemp(prefix="stt-replicas-"))
    claims: list[float] = []
    finals: list[float] = []
    missing = 0
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        workers = [Replica(server.url, tmp / f"worker{n}.log") for n in range(2)]
        started = 2
        finals_from: dict[str, list[tuple[float, str | None]]] = defaultdict(list)

        async def on_out(msg: Any) -> None:
            m = msgpack.unpackb(msg.data)
            if m.get("type") == "transcript" and m.get("is_final"):
                finals_from[msg.subject.rsplit(".", 1)[-1]].append(
                    (time.monotonic(), (msg.headers or {}).get(REPLICA_HEADER)))

        await nc.subscribe("ai.voice.transcription.*", cb=on_out)
        sids = [f"fo{i}-{os.urandom(2).hex()}" for i in range(sessions)]
        stop = asyncio.Event()

        async def pump() -> None:
            for sid in sids:
                await nc.publish(f"ai.voice.stream.{sid}", protocol.pack(
                    {"type": "start", "sample_rate": 16000, "encoding": "pcm_s16le"}))
            pos, t0, tick = [i * len(pcm) // sessions // 2 * 2 for i in range(sessions)], time.monotonic(), 0
            while not stop.is_set():
                tick += 1
                for i, sid in enumerate(sids):
                    if pos[i] + step > len(pcm):
                        pos[i] = 0
                    await nc.publish(f"ai.voice.stream.{sid}", protocol.pack(
                        {"type": "chunk", "audio": pcm[pos[i]:pos[i] + step]}))
                    pos[i] += step
                await asyncio.sleep(max(0.0, t0 + tick * CHUNK_S - time.monotonic()))

        pumping: asyncio.Task[None] | None = None
        try:
            await wait_balanced(nc, 2, REPLICAS_PARTITIONS)  # before any session starts
            pumping = asyncio.create_task(pump())
            await asyncio.sleep(8)  # every session has spoken and been saved
            for k in range(kills):
                quiet_by = time.monotonic() + 30  # no handover under way: a crash, nothing else
                while True:
                    hbs = await heartbeats(nc)
                    if not any(hb.giving for hb in hbs.values()) or time.monotonic() > quiet_by:
                        break
                    await asyncio.sleep(0.25)
                for w in workers:
                    w.learn_id()
                counts = {w.id: sum(partition_of(s, REPLICAS_PARTITIONS) in hbs[w.id or ""].partitions
                                    for s in sids) for w in workers if w.id in hbs}
                victim = max(workers, key=lambda w: counts.get(w.id or "", 0))
                survivor = next(w for w in workers if w is not victim)
                theirs = {s for s in sids
                          if partition_of(s, REPLICAS_PARTITIONS) in hbs[victim.id or ""].partitions}
                # the survivor logs the claim of each partition that had sessions
                with_sessions = {partition_of(s, REPLICAS_PARTITIONS) for s in theirs}
                victim.proc.kill()
                victim.proc.wait()
                kill_at, kill_wall = time.monotonic(), time.time()
                deadline = kill_at + 20
                claim = None
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                    got = survivor.claims(kill_wall, messages=(LAPSED, MID_HANDOVER))
                    done = {s: [t for t, r in finals_from[s] if t > kill_at and r == survivor.id]
                            for s in theirs}
                    if with_sessions <= set(got) and all(done.values()):
                        claim = max(got[q] for q in with_sessions)
                        break
                if claim is None:
                    missing += 1
                    print(f"round {k + 1}: within 20 s, partitions with sessions claimed: "
                          f"{sorted(set(got) & with_sessions)} of {sorted(with_sessions)}; "
                          f"sessions answered {sum(map(bool, done.values()))} of {len(done)}",
                          flush=True)
                else:
                    claims.append(claim)
                    per = [min(ts) - kill_at for ts in done.values()]
                    finals.extend(per)
                    print(f"round {k + 1}: {len(theirs)} sessions on the killed replica; partitions "
                          f"claimed {claim:.2f} s after the kill; first final of each "
                          f"{min(per, default=0):.1f}-{max(per, default=0):.1f} s after",
                          flush=True)
                workers = [survivor, Replica(server.url, tmp / f"worker{started}.log")]
                started += 1
                await wait_balanced(nc, 2, REPLICAS_PARTITIONS)
                await asyncio.sleep(4)  # the newcomer's sessions have spoken and been saved
        finally:
            stop.set()
            if pumping is not None:
                await asyncio.gather(pumping, return_exceptions=True)
            for w in workers:
                w.stop()
            await nc.close()
    print()
    print(f"SIGKILL → partitions claimed: {spread(claims)}")
    print(f"SIGKILL → each session's first final from the survivor: {spread(finals)}")
    print(f"rounds without a full takeover within 20 s: {missing}; logs in {tmp}")
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("mapping", help="what the partition mapping adds per message")
    p.add_argument("--messages", type=int, default=20_000)
    p = sub.add_parser("failover", help="repeated SIGKILLs of one of two replicas")
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--sessions", type=int, default=12)
    args = parser.parse_args(argv)
    print_header(argv)
    if args.what == "mapping":
        asyncio.run(mapping(args.messages))
        return 0
    return asyncio.run(failover(args.kills, args.sessions))


if __name__ == "__main__":
    sys.exit(main())
