"""Load benchmark: N concurrent real-time sessions of corpus speech through nats-server and the worker.

    python -m bench.load --engine null --sessions 500 --duration-s 30
    python -m bench.load --engine faster-whisper --find-max --duration-s 30

What runs where (the machine may have only 2 cores, so CPU is accounted per process):

* this process only orchestrates: it starts a real ``nats-server`` (:class:`stt.transport.nats_server.NatsServer`),
  the worker (``bench.probe``: the product's Worker with per-message timing on) and the load
  generator(s), samples their CPU and memory with psutil, and prints the figures;
* the load generator runs in its own process (``--gen-procs`` splits the sessions across more):
  one asyncio loop and one NATS connection publish every session's chunks on a shared 5 ms
  clock tick, which is far cheaper than a task and a timer per session. It measures its own
  lag behind the schedule; if it cannot keep real time the figures say so instead of passing
  a slower load off as the requested one.

Each session streams corpus clips back to back at real-time pace in ``--chunk-ms`` chunks, sent
at the end of each chunk's capture interval as a microphone would. Half the sessions send the
16 kHz LibriSpeech clips, half the 22.05 kHz LJ Speech clips (which the worker resamples).
After each clip's speech comes ``STT_CHUNK_TIMEOUT`` plus 0.5-1.0 s of silence, so every
utterance is ended by silence (the worker needs ``STT_CHUNK_TIMEOUT`` of it) before the next one
starts. Session starts are staggered over the first second.

Measured:

* chunks/s published, and dropped chunks: chunks sent minus the worker's ``chunks_ok``;
* per-chunk handling p50/p99: wall time of the worker's message callback (parse, decode,
  resample, VAD, segmentation, queueing outputs), sampled inside the worker; it excludes time a
  message waits in the socket or the client's queue, which shows up in the final latency;
* final latency after end of speech: arrival of the final that covers an utterance's end minus
  the moment the chunk holding its last voiced audio was published. End of speech is found
  offline per clip with the worker's own VAD (webrtcvad, same mode). It includes the
  ``STT_CHUNK_TIMEOUT`` of silence the worker waits for by design;
* worker backlog: round trip of a "ping" (an ``end`` for an unknown session, answered at once)
  queued behind the chunks; when it grows, the worker is not keeping real time even if each
  message is handled quickly (nats-server cuts a consumer that falls seconds behind);
* CPU (% of one core) over the streaming window and peak RSS: the worker's main process, and
  the worker with any engine processes (the Whisper engines decode in threads of the worker
  process, so both figures are the same); with the null
  engine also the worker's CPU per message, which gives the sessions one free core can carry
  even when the run itself shared the machine;
* CPU of nats-server, of the generator, and of every other process on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgpack
import nats
import psutil

from stt.cluster.membership import wait_balanced
from stt.config import Settings
from stt.transport.nats_server import REPLICAS_PARTITIONS, NatsServer

from .common import (
    DEFAULT_CORPUS,
    ROOT,
    Clip,
    CorpusUnavailable,
    code_revision,
    cpu_s,
    header,
    load_corpus,
    machine,
    percentile,
)

SLOT_MS = 5                 # the generator's clock tick; chunk_ms must be a multiple
STAGGER_S = 1.0             # session starts spread over the first second
GAP_EXTRA_S = (0.5, 1.0)    # silence after speech, on top of STT_CHUNK_TIMEOUT
SAMPLE_EVERY_S = 0.2        # psutil sampling period (peak RSS)
READY_TIMEOUT_S = 180.0     # worker start (model load; the whisper engine converts once)
RECOGNIZER_STEPS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
FIND_MAX_STEPS = {"faster-whisper": RECOGNIZER_STEPS, "whisper": RECOGNIZER_STEPS,
                  "null": (100, 200, 300, 400, 500, 600, 800, 1000, 1500, 2000)}
ENGINES = {"null": "bench.null_engine:InstantEngine", "faster-whisper": "faster-whisper",
           "whisper": "whisper"}
LATENCY_MARGIN_S = 0.5      # (a): final latency p95 at most STT_CHUNK_TIMEOUT + 0.5 s
HANDLING_TARGET_MS = 5.0    # (b): per-chunk handling p99 under 5 ms
LAG_OK_MS = 20.0            # generator lag p99 beyond this (or over 1 % of chunks more than
LATE_OK_FRACTION = 0.01     # a chunk period late): it did not keep real time
PING_EVERY_TICKS = 50       # a round-trip probe every 250 ms
BACKLOG_OK_MS = 100.0       # ping round trip p99 beyond this: the worker fell behind


# --- session plans (the same recipe is expanded in the generator and in the report) -------------


@dataclass(frozen=True)
class Item:
    clip: int                # index into the corpus list
    silence_chunks: int      # chunks of silence sent after the clip
    counted: bool            # clip and its silence fit in the run: its latency is measured


@dataclass(frozen=True)
class SessionPlan:
    session_id: str
    sample_rate: int
    start_tick: int          # tick of the start message; chunk j leaves at start_tick + (j+1)*slots
    n_chunks: int
    items: tuple[Item, ...]


@dataclass(frozen=True)
class Utterance:
    start_s: float           # speech on the session's audio timeline
    end_s: float
    end_chunk: int           # index of the chunk carrying the last voiced audio


def chunk_samples(sample_rate: int, chunk_ms: int) -> int:
    return max(1, round(sample_rate * chunk_ms / 1000))


def clip_chunks(clip: Clip, step: int) -> int:
    return math.ceil(len(clip.pcm) / 2 / step)


def make_plans(clips: list[Clip], sessions: int, duration_s: float, chunk_ms: int,
               chunk_timeout_s: float, seed: int) -> list[SessionPlan]:
    by_rate: dict[int, list[int]] = {}
    for i, clip in enumerate(clips):
        by_rate.setdefault(clip.sample_rate, []).append(i)
    groups = [by_rate[r] for r in sorted(by_rate)]
    n_chunks = max(1, round(duration_s * 1000 / chunk_ms))
    plans = []
    for s in range(sessions):
        rng = random.Random(seed * 100_003 + s)
        group = groups[s % len(groups)]
        order = group[:]
        rng.shuffle(order)  # sessions do not speak the same clip at the same moment
        rate = clips[group[0]].sample_rate
        step = chunk_samples(rate, chunk_ms)
        items: list[Item] = []
        used = 0
        k = 0
        while used < n_chunks:
            ci = order[k % len(order)]
            k += 1
            clip = clips[ci]
            n_clip = clip_chunks(clip, step)
            tail_s = n_clip * step / rate - clip.speech_end_s  # silence already in the clip
            gap_s = max(0.0, chunk_timeout_s + rng.uniform(*GAP_EXTRA_S) - tail_s)
            n_gap = math.ceil(gap_s * 1000 / chunk_ms)
            if used + n_clip + n_gap <= n_chunks:
                items.append(Item(ci, n_gap, counted=True))
                used += n_clip + n_gap
            else:  # the run ends inside this clip or its silence: send what fits, uncounted
                items.append(Item(ci, max(0, n_chunks - used - n_clip), counted=False))
                break
        # stagger over the first second, on the generator's 5 ms grid
        start_tick = round(s / max(1, sessions) * STAGGER_S * 1000 / SLOT_MS)
        plans.append(SessionPlan(f"bench{s:05d}", rate, start_tick, n_chunks, tuple(items)))
    return plans


def utterances(plan: SessionPlan, clips: list[Clip], chunk_ms: int) -> list[Utterance]:
    step = chunk_samples(plan.sample_rate, chunk_ms)
    out = []
    base = 0  # first chunk of the current item
    for item in plan.items:
        clip = clips[item.clip]
        if item.counted:
            first = base * step
            last_sample = first + max(0, math.ceil(clip.speech_end_s * plan.sample_rate) - 1)
            out.append(Utterance(start_s=first / plan.sample_rate + clip.speech_start_s,
                                 end_s=first / plan.sample_rate + clip.speech_end_s,
                                 end_chunk=last_sample // step))
        base += clip_chunks(clip, step) + item.silence_chunks
    return out


# --- the load generator (runs in its own process) -------------------------------------------


@dataclass
class SessionOutcome:
    session_id: str
    # start, end, arrival, segment_id
    finals: list[tuple[float, float, float, int]] = field(default_factory=list)
    partials: int = 0
    interrupts: int = 0
    errors: list[str] = field(default_factory=list)
    ended: bool = False
    end_sent_at: float = 0.0
    utterance_sent_at: dict[int, float] = field(default_factory=dict)  # end_chunk -> send time


@dataclass
class GenResult:
    sessions: list[SessionOutcome]
    chunks_sent: int
    messages_sent: int
    first_chunk_at: float
    last_chunk_at: float
    lag_ms: list[float]            # per tick: how late the tick ran
    ping_ms: list[float]           # round trips through nats-server and the worker's queue
    late_chunks: int               # chunks published more than one chunk period late
    drain_s: float                 # after the last chunk, until every 'end' came back
    unfinished: int                # sessions whose 'end' never came back
    error: str | None = None


def _payload_tables(clips: list[Clip], rates: set[int], chunk_ms: int,
                    raw: bool) -> tuple[dict[int, list[Any]], dict[int, Any]]:
    """Chunk payloads per clip and a silence chunk per rate, built once and shared by sessions."""
    def enc(pcm: bytes) -> Any:
        return pcm if raw else base64.b64encode(pcm).decode("ascii")

    per_clip: dict[int, list[Any]] = {}
    silence: dict[int, Any] = {}
    for rate in rates:
        step = chunk_samples(rate, chunk_ms)
        silence[rate] = enc(bytes(2 * step))
        for i, clip in enumerate(clips):
            if clip.sample_rate != rate:
                continue
            nbytes = 2 * step
            pcm = clip.pcm + bytes(-len(clip.pcm) % nbytes)  # pad the last chunk with silence
            per_clip[i] = [enc(pcm[o:o + nbytes]) for o in range(0, len(pcm), nbytes)]
    return per_clip, silence


def _expand(plan: SessionPlan, per_clip: dict[int, list[Any]], silence: dict[int, Any]) -> list[Any]:
    chunks: list[Any] = []
    for item in plan.items:
        chunks += per_clip[item.clip]
        chunks += [silence[plan.sample_rate]] * item.silence_chunks
    return chunks[:plan.n_chunks]


async def _generate(conn: Connection, url: str, plans: list[SessionPlan], clips: list[Clip],
                    chunk_ms: int, raw: bool, end_timeout_s: float, gen_index: int) -> GenResult:
    subjects = Settings.from_env().subjects
    per_clip, silence = _payload_tables(clips, {p.sample_rate for p in plans}, chunk_ms, raw)
    streams = [_expand(p, per_clip, silence) for p in plans]
    end_chunks = [{u.end_chunk for u in utterances(p, clips, chunk_ms)} for p in plans]
    outcomes = {p.session_id: SessionOutcome(p.session_id) for p in plans}
    all_ended = asyncio.Event()
    ended = 0
    prefix_len = len(subjects.output_prefix) + 1
    # Ping: an 'end' for a session the worker does not know is answered at once with an 'end'.
    # NATS keeps order per connection, so the reply waits behind every chunk queued before it:
    # the round trip is the worker's backlog (plus two hops), which per-message handling
    # times cannot show.
    ping_prefix = f"ping{gen_index}x"
    pings_sent: dict[str, float] = {}
    ping_ms: list[float] = []

    async def on_output(msg: Any) -> None:
        nonlocal ended
        arrival = time.monotonic()
        sid = msg.subject[prefix_len:]
        out = outcomes.get(sid)
        if out is None:
            sent = pings_sent.pop(sid, None)
            if sent is not None:
                ping_ms.append((arrival - sent) * 1000)
            return  # a ping, or another generator process's session
        m = msgpack.unpackb(msg.data, raw=False)
        kind = m.get("type")
        if kind == "transcript":
            if m.get("is_final"):
                out.finals.append((float(m["start"]), float(m["end"]), arrival,
                                   int(m.get("segment_id") or 0)))
            else:
                out.partials += 1
        elif kind == "end":
            if not out.ended:
                out.ended = True
                ended += 1
                if ended == len(outcomes):
                    all_ended.set()
        elif kind == "error":
            out.errors.append(str(m.get("code")))
        elif kind == "interrupt":
            out.interrupts += 1

    nc = await nats.connect(url, pending_size=64 * 1024 * 1024, max_reconnect_attempts=3,
                            connect_timeout=5)
    try:
        await nc.subscribe(subjects.output("*"), cb=on_output, pending_msgs_limit=1_000_000,
                           pending_bytes_limit=512 * 1024 * 1024)
        await nc.flush()
        conn.send("ready")
        t0: float = conn.recv()  # a monotonic instant shared by all generator processes
        loop = asyncio.get_running_loop()
        n_slots = chunk_ms // SLOT_MS
        slot_s = SLOT_MS / 1000
        buckets: list[list[int]] = [[] for _ in range(n_slots)]
        for i, p in enumerate(plans):
            buckets[p.start_tick % n_slots].append(i)
        input_subject = [subjects.input(p.session_id) for p in plans]
        remaining = len(plans)
        chunks_sent = messages_sent = late_chunks = 0
        lag_ms: list[float] = []
        first_chunk_at = last_chunk_at = 0.0
        pack = msgpack.packb
        audio_key = "audio" if raw else "audio_b64"
        k = 0
        while remaining:
            target = t0 + k * slot_s
            now = loop.time()
            # yield on every tick, even when behind: the client's flusher and the output
            # subscription run on this loop too, and must not starve while we catch up
            await asyncio.sleep(max(0.0, target - now))
            now = loop.time()
            lag = now - target
            lag_ms.append(lag * 1000)
            wall = time.time()
            if k % PING_EVERY_TICKS == 0:
                ping_id = f"{ping_prefix}{k}"
                pings_sent[ping_id] = now
                await nc.publish(subjects.input(ping_id), pack({"type": "end"}))
            bucket = buckets[k % n_slots]
            done: list[int] = []
            for i in bucket:
                plan = plans[i]
                rel = k - plan.start_tick
                if rel < 0:
                    continue
                if rel == 0:
                    await nc.publish(input_subject[i], pack({
                        "type": "start", "session_id": plan.session_id,
                        "sample_rate": plan.sample_rate, "channels": 1, "encoding": "pcm_s16le"}))
                    messages_sent += 1
                    continue
                j = rel // n_slots - 1
                await nc.publish(input_subject[i], pack({
                    "type": "chunk", "timestamp": wall, "seq": j, audio_key: streams[i][j]}))
                chunks_sent += 1
                messages_sent += 1
                if lag > chunk_ms / 1000:
                    late_chunks += 1
                if not first_chunk_at:
                    first_chunk_at = now
                last_chunk_at = now
                if j in end_chunks[i]:
                    outcomes[plan.session_id].utterance_sent_at[j] = now
                if j == plan.n_chunks - 1:
                    await nc.publish(input_subject[i], pack({"type": "end"}))
                    messages_sent += 1
                    outcomes[plan.session_id].end_sent_at = now
                    done.append(i)
            if done:
                finished = set(done)
                buckets[k % n_slots] = [i for i in bucket if i not in finished]
                remaining -= len(done)
            k += 1
        await nc.flush()
        drain_started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_ended.wait(), end_timeout_s)
        drain_s = time.monotonic() - drain_started
        return GenResult(
            sessions=list(outcomes.values()), chunks_sent=chunks_sent, messages_sent=messages_sent,
            first_chunk_at=first_chunk_at, last_chunk_at=last_chunk_at, lag_ms=lag_ms,
            ping_ms=ping_ms,
            late_chunks=late_chunks, drain_s=drain_s,
            unfinished=sum(not o.ended for o in outcomes.values()))
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def generator_main(conn: Connection, url: str, plans: list[SessionPlan], corpus: str,
                   chunk_ms: int, raw: bool, end_timeout_s: float, gen_index: int) -> None:
    """Entry point of a generator process: expand the plans, stream, send the result back."""
    # Ctrl-C reaches the whole process group; the orchestrator decides how everything stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    try:
        clips = load_corpus(Path(corpus))

        async def run() -> GenResult:
            async def watch_parent() -> None:  # never outlive a killed orchestrator
                # polling: nothing signals a parent's death portably
                while os.getppid() == parent:  # noqa: ASYNC110
                    await asyncio.sleep(1.0)
                os._exit(1)

            watcher = asyncio.create_task(watch_parent())
            try:
                return await _generate(conn, url, plans, clips, chunk_ms, raw, end_timeout_s,
                                       gen_index)
            finally:
                watcher.cancel()

        conn.send(asyncio.run(run()))
    except Exception as exc:
        conn.send(GenResult([], 0, 0, 0.0, 0.0, [], [], 0, 0.0, len(plans),
                            error=f"{type(exc).__name__}: {exc}"))


# --- one run ---------------------------------------------------------------------------------


@dataclass
class RunConfig:
    engine: str
    sessions: int
    duration_s: float
    chunk_ms: int
    corpus: Path
    raw_audio: bool
    gen_procs: int
    end_timeout_s: float
    seed: int
    profile: Path | None
    worker_env: dict[str, str]
    floor: bool = False      # a bare nats-py subscriber that only unpacks, instead of the worker
    workers: int = 1         # worker processes sharing the sessions (STT_PARTITIONS) when > 1


class Sampler:
    """CPU time and RSS of process trees (the worker processes), sampled from outside with
    psutil; "main" is the worker processes themselves, summed."""

    def __init__(self, *pids: int) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.peak_rss_tree = 0
        self.peak_rss_main = 0

    def _tree(self) -> list[tuple[bool, psutil.Process]]:
        out: list[tuple[bool, psutil.Process]] = []
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                out += [(True, proc), *((False, c) for c in proc.children(recursive=True))]
        return out

    def sample(self) -> None:
        total = main = 0
        for is_main, p in self._tree():
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            main += rss if is_main else 0
        self.peak_rss_main = max(self.peak_rss_main, main)
        self.peak_rss_tree = max(self.peak_rss_tree, total)

    def cpu(self) -> tuple[float, float]:
        """(main processes, whole trees) CPU seconds so far."""
        main = tree = 0.0
        for is_main, p in self._tree():
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            tree += t.user + t.system
            main += t.user + t.system if is_main else 0.0
        return main, tree


def merge_stats(all_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of several worker processes as one worker's (sums, concatenations, maxima)."""
    if len(all_stats) == 1:
        return all_stats[0]
    out: dict[str, Any] = {"scheduler": all_stats[0].get("scheduler")}
    for st in all_stats:
        for key, value in st.items():
            if key == "scheduler":
                continue
            if key == "ru_maxrss_bytes":
                out[key] = max(out.get(key, 0), value)
            elif isinstance(value, list):
                out[key] = out.get(key, []) + value
            elif isinstance(value, dict):
                merged = out.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, (int, float)):
                        merged[k] = merged.get(k, 0) + v
            elif isinstance(value, (int, float)):
                out[key] = out.get(key, 0) + value
    return out


async def _balanced(url: str, workers: int) -> None:
    nc = await nats.connect(url)
    try:
        await wait_balanced(nc, workers, REPLICAS_PARTITIONS, READY_TIMEOUT_S)
    finally:
        await nc.close()


def _system_busy_s() -> float:
    """CPU seconds spent by everything on the machine (Linux counts guest time inside user)."""
    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def _stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL; the worker runs in its own process group (it owns engine processes)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_once(cfg: RunConfig, server: NatsServer, clips: list[Clip]) -> dict[str, Any]:
    env = {**cfg.worker_env, "NATS_URL": server.url}
    settings = Settings.from_env(environ=env)
    plans = make_plans(clips, cfg.sessions, cfg.duration_s, cfg.chunk_ms,
                       settings.session.chunk_timeout_s, cfg.seed)
    if cfg.workers > 1:
        env["STT_PARTITIONS"] = str(REPLICAS_PARTITIONS)
    tmp = Path(tempfile.mkdtemp(prefix="stt-bench-"))
    stats_paths = [tmp / f"worker{i}-stats.json" for i in range(cfg.workers)]
    log_paths = [tmp / f"worker{i}.log" for i in range(cfg.workers)]
    ctx = multiprocessing.get_context("spawn")  # no inherited sockets, loops or threads
    gens: list[tuple[Any, Connection]] = []
    workers: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as files:
        try:
            for i, (stats_path, log_path) in enumerate(zip(stats_paths, log_paths, strict=True)):
                cmd = [sys.executable, "-m", "bench.probe", "--stats-out", str(stats_path)]
                if cfg.floor:
                    cmd = [sys.executable, "-m", "bench.hotpath", "floor-subscriber",
                           "--stats-out", str(stats_path)]
                if cfg.profile is not None:
                    cmd += ["--profile", str(cfg.profile.with_suffix(f".{i}{cfg.profile.suffix}")
                                             if cfg.workers > 1 else cfg.profile)]
                # own session: Ctrl-C in the terminal reaches only this process, which then
                # stops the worker in order (SIGTERM -> stats written -> graceful shutdown)
                workers.append(subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                    stderr=files.enter_context(open(log_path, "wb")), start_new_session=True))
            readies = [_wait_ready(w, lp) for w, lp in zip(workers, log_paths, strict=True)]
            if cfg.workers > 1:  # every worker holds its share of the partitions
                asyncio.run(_balanced(server.url, cfg.workers))
            ready = {**readies[0], "cpu_s": sum(float(r.get("cpu_s", 0.0)) for r in readies)}
            sampler = Sampler(*(w.pid for w in workers))
            procs = min(cfg.gen_procs, len(plans))
            shares = [plans[i::procs] for i in range(procs)]
            for gi, share in enumerate(shares):
                parent_end, child_end = ctx.Pipe()
                p = ctx.Process(target=generator_main, daemon=True,
                                args=(child_end, server.url, share, str(cfg.corpus), cfg.chunk_ms,
                                      cfg.raw_audio, cfg.end_timeout_s, gi))
                p.start()
                gens.append((p, parent_end))
            for _, c in gens:
                if not c.poll(60):
                    raise RuntimeError("load generator did not get ready within 60 s")
                if (msg := c.recv()) != "ready":
                    raise RuntimeError(f"load generator failed: {getattr(msg, 'error', msg)}")
            t0 = time.monotonic() + 0.5
            for _, c in gens:
                c.send(t0)
            window_end = t0 + STAGGER_S + cfg.duration_s + cfg.chunk_ms / 1000
            _sleep_sampling(sampler, t0)
            cpu0 = sampler.cpu()
            nats0 = cpu_s(server.proc.pid) if server.proc else 0.0
            gen0 = sum(cpu_s(p.pid) for p, _ in gens if p.pid)
            sys0 = _system_busy_s()
            me0 = cpu_s(os.getpid())
            _sleep_sampling(sampler, window_end)
            window_s = time.monotonic() - t0
            cpu1 = sampler.cpu()
            nats_cpu = (cpu_s(server.proc.pid) if server.proc else 0.0) - nats0
            gen_cpu = sum(cpu_s(p.pid) for p, _ in gens if p.pid) - gen0
            others = _system_busy_s() - sys0 - (cpu1[1] - cpu0[1]) - nats_cpu - gen_cpu \
                - (cpu_s(os.getpid()) - me0)
            results: list[GenResult] = []
            deadline = time.monotonic() + cfg.end_timeout_s + 60
            for p, c in gens:
                while not c.poll(SAMPLE_EVERY_S):
                    sampler.sample()
                    if time.monotonic() > deadline or not p.is_alive():
                        raise RuntimeError("load generator did not report back")
                results.append(c.recv())
            for w in workers:  # all at once: none hands its sessions to another
                with contextlib.suppress(ProcessLookupError):
                    w.send_signal(signal.SIGTERM)
            for w in workers:
                _stop_process(w, 30)
            stats = merge_stats([json.loads(sp.read_text()) for sp in stats_paths if sp.exists()])
            for sp in stats_paths:
                sp.unlink(missing_ok=True)  # megabytes of samples; the logs stay for reading
        finally:
            for p, _ in gens:
                if p.is_alive():
                    p.terminate()
                    p.join(5)
            for w in workers:
                _stop_process(w, 10)
    failures = [r.error for r in results if r.error]
    if failures:
        raise RuntimeError("load generator failed: " + "; ".join(f for f in failures if f))
    if not stats:
        raise RuntimeError(f"worker wrote no stats; logs: {' '.join(map(str, log_paths))}")
    return report(cfg, clips, plans, results, stats, ready, {
        "window_s": window_s,
        "worker_cpu_main_s": cpu1[0] - cpu0[0], "worker_cpu_tree_s": cpu1[1] - cpu0[1],
        "nats_cpu_s": nats_cpu, "gen_cpu_s": gen_cpu, "others_cpu_s": max(0.0, others),
        "peak_rss_tree": sampler.peak_rss_tree, "peak_rss_main_sampled": sampler.peak_rss_main,
        "worker_log": " ".join(map(str, log_paths))})


def _wait_ready(worker: subprocess.Popen[bytes], log_path: Path) -> dict[str, Any]:
    assert worker.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    os.set_blocking(worker.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited ({worker.returncode}): "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        chunk = worker.stdout.read()
        if chunk:
            buf += chunk
            for line in buf.splitlines():
                with contextlib.suppress(ValueError):
                    msg = json.loads(line)
                    if isinstance(msg, dict) and msg.get("ready"):
                        return msg
        time.sleep(0.05)
    raise RuntimeError(f"worker not ready within {READY_TIMEOUT_S:.0f} s; log: {log_path}")


def _sleep_sampling(sampler: Sampler, until: float) -> None:
    while (left := until - time.monotonic()) > 0:
        sampler.sample()
        time.sleep(min(SAMPLE_EVERY_S, left))


# --- figures ---------------------------------------------------------------------------------


LATENCY_PARTS = ("silence", "queue", "engine", "publish")


def latency_parts(sent: float, arrival: float, timing: list[Any] | None) -> dict[str, float] | None:
    """A final's latency split where it went (they add up to arrival - sent):

    * silence: end of speech to the endpoint decision (STT_CHUNK_TIMEOUT, by design);
    * queue: endpoint to the start of the engine pass that made the final (0 when a speculative
      final's pass began before the endpoint);
    * engine: what was left of that pass after the endpoint;
    * publish: from the later of the pass's end and the endpoint to arrival at the client.
    """
    if timing is None:
        return None
    endpoint, start, end = timing[2], timing[3], timing[4]
    done = max(end, endpoint)
    return {"silence": round(endpoint - sent, 4), "queue": round(max(0.0, start - endpoint), 4),
            "engine": round(max(0.0, end - max(start, endpoint)), 4),
            "publish": round(arrival - done, 4)}


def after_endpoint(parts: dict[str, float]) -> float:
    """Endpoint decision -> arrival: the latency left once the silence timeout has run out."""
    return parts["queue"] + parts["engine"] + parts["publish"]


def final_latencies(plan: SessionPlan, outcome: SessionOutcome, clips: list[Clip],
                    chunk_ms: int, timings: dict[tuple[str, int], list[Any]] | None = None
                    ) -> list[dict[str, Any]]:
    """One row per counted utterance: its speech span, the final that closed it, the latency.

    The final "covering" an utterance is the last one (largest end) whose segment overlaps
    the utterance's speech: an utterance with a long pause inside gives several finals, and the
    one that closes it is what a user waits for. ``latency_s`` is None when no final came;
    ``parts`` splits it (:func:`latency_parts`) when the worker reported its timings.
    """
    timings = timings or {}
    rows = []
    slack = 0.35  # the worker's segment starts in the pre-roll and ends in the hang-over
    for u in utterances(plan, clips, chunk_ms):
        sent = outcome.utterance_sent_at.get(u.end_chunk)
        if sent is None:
            continue
        covering = [f for f in outcome.finals
                    if f[0] <= u.end_s + slack and f[1] >= u.start_s - slack]
        final = max(covering, key=lambda f: f[1]) if covering else None
        rows.append({"session_id": plan.session_id, "speech_s": [round(u.start_s, 3),
                                                                 round(u.end_s, 3)],
                     "final_s": None if final is None else [final[0], final[1]],
                     "latency_s": None if final is None else round(final[2] - sent, 4),
                     "parts": None if final is None else latency_parts(
                         sent, final[2], timings.get((plan.session_id, final[3])))})
    return rows


def report(cfg: RunConfig, clips: list[Clip], plans: list[SessionPlan], results: list[GenResult],
           stats: dict[str, Any], ready: dict[str, Any], sys_: dict[str, Any]) -> dict[str, Any]:
    outcomes = {o.session_id: o for r in results for o in r.sessions}
    timings = {(t[0], int(t[1])): t for t in stats.get("final_timings", [])}
    rows = [row for plan in plans
            for row in final_latencies(plan, outcomes[plan.session_id], clips, cfg.chunk_ms,
                                       timings)]
    latencies = [row["latency_s"] for row in rows if row["latency_s"] is not None]
    parts = [row["parts"] for row in rows if row.get("parts")]
    missed = len(rows) - len(latencies)
    chunks_sent = sum(r.chunks_sent for r in results)
    messages_sent = sum(r.messages_sent for r in results)
    first = min(r.first_chunk_at for r in results)
    last = max(r.last_chunk_at for r in results)
    send_s = max(1e-9, last - first)
    lag = [x for r in results for x in r.lag_ms]
    ping = [x for r in results for x in r.ping_ms]
    ping_p99 = percentile(ping, 99)
    totals = stats.get("chunk_totals", {})
    chunks_ok = int(totals.get("chunks_ok", 0))
    handling_ms = [us / 1000 for us in stats.get("handling_us", [])]
    errors: dict[str, int] = {}
    for o in outcomes.values():
        for code in o.errors:
            errors[code] = errors.get(code, 0) + 1
    window = sys_["window_s"]
    # CPU the worker process spent serving (after start-up) per message it handled: unlike
    # latency, this barely depends on what else the machine runs, so it gives the capacity
    # of one dedicated core even when the run itself was starved
    serving_cpu_s = float(stats.get("cpu_s", 0.0)) - float(ready.get("cpu_s", 0.0))
    cpu_per_msg_us = 1e6 * serving_cpu_s / max(1, int(stats.get("messages_in", 0)))
    lag_p99 = percentile(lag, 99) or 0.0
    late = sum(r.late_chunks for r in results)
    after = [after_endpoint(p) for p in parts]
    return {
        "engine": cfg.engine, "worker_engine": ready.get("engine"),
        "sessions": cfg.sessions, "duration_s": cfg.duration_s, "chunk_ms": cfg.chunk_ms,
        "audio": "raw bytes" if cfg.raw_audio else "audio_b64",
        "chunks_sent": chunks_sent, "messages_sent": messages_sent,
        "chunks_per_s": chunks_sent / send_s,
        "worker_messages_in": stats.get("messages_in"),
        "chunks_ok": chunks_ok,
        "chunks_dropped": chunks_sent - chunks_ok,
        "worker_chunk_totals": totals,
        "worker_disconnects": stats.get("disconnects", 0),
        "error_messages": errors,
        "handling_ms": {"n": len(handling_ms), "p50": percentile(handling_ms, 50),
                        "p99": percentile(handling_ms, 99), "p999": percentile(handling_ms, 99.9),
                        "max": max(handling_ms) if handling_ms else None},
        "final_latency_s": {"n": len(latencies), "missed": missed,
                            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
                            "max": max(latencies) if latencies else None,
                            "parts": {k: {"p50": percentile([p[k] for p in parts], 50),
                                          "p95": percentile([p[k] for p in parts], 95)}
                                      for k in LATENCY_PARTS} if parts else None,
                            # what the final took once the endpoint was decided
                            "after_endpoint": {"p50": percentile(after, 50),
                                               "p95": percentile(after, 95)} if parts else None},
        "scheduler": stats.get("scheduler"),
        "worker_backlog_ms": {"n": len(ping), "p50": percentile(ping, 50), "p99": ping_p99,
                              "max": max(ping) if ping else None,
                              "kept_up": ping_p99 is not None and ping_p99 <= BACKLOG_OK_MS},
        "partials": sum(o.partials for o in outcomes.values()),
        "finals": sum(len(o.finals) for o in outcomes.values()),
        "sessions_unfinished": sum(r.unfinished for r in results),
        "drain_s": max(r.drain_s for r in results),
        "worker_cpu_pct": {"main": 100 * sys_["worker_cpu_main_s"] / window,
                           "with_engine": 100 * sys_["worker_cpu_tree_s"] / window},
        "worker_cpu_per_message_us": cpu_per_msg_us,
        "sessions_per_core_estimate": 1e6 / (max(cpu_per_msg_us, 1e-3) * 1000 / cfg.chunk_ms),
        "worker_peak_rss_mb": {"main": stats.get("ru_maxrss_bytes", 0) / 2**20,
                               # the sampled tree can miss the main process's exact peak
                               "with_engine": max(sys_["peak_rss_tree"],
                                                  stats.get("ru_maxrss_bytes", 0)) / 2**20},
        "nats_server_cpu_pct": 100 * sys_["nats_cpu_s"] / window,
        "generator": {"procs": cfg.gen_procs, "cpu_pct": 100 * sys_["gen_cpu_s"] / window,
                      "lag_ms_p50": percentile(lag, 50), "lag_ms_p99": lag_p99,
                      "lag_ms_max": max(lag) if lag else None, "late_chunks": late,
                      "kept_real_time": (lag_p99 <= LAG_OK_MS
                                         and late <= chunks_sent * LATE_OK_FRACTION)},
        "other_processes_cpu_pct": 100 * sys_["others_cpu_s"] / window,
        "window_s": window,
        "worker_log": sys_["worker_log"],
        "utterances": rows,
    }


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def print_run(r: dict[str, Any]) -> None:
    h, lat, g, b = r["handling_ms"], r["final_latency_s"], r["generator"], r["worker_backlog_ms"]
    dropped = r["chunks_dropped"]
    lines = [
        f"engine {r['engine']}: {r['sessions']} sessions x {r['duration_s']:g} s, "
        f"{r['chunk_ms']} ms chunks ({r['audio']})",
        f"  chunks/s sent            {r['chunks_per_s']:.0f}   ({r['chunks_sent']} chunks; "
        f"{r['sessions'] * 1000 / r['chunk_ms']:.0f}/s once every session runs)",
        f"  dropped chunks           {dropped}   (worker chunks_ok {r['chunks_ok']}; "
        f"error messages {r['error_messages'] or 'none'}"
        + (f"; the worker's NATS connection was cut {r['worker_disconnects']} time(s): "
           "nats-server drops a consumer that falls too far behind" if r["worker_disconnects"]
           else "") + ")",
        f"  per-chunk handling ms    p50 {_f(h['p50'], '.3f')}  p99 {_f(h['p99'], '.3f')}  "
        f"p99.9 {_f(h['p999'], '.3f')}  max {_f(h['max'], '.1f')}  (n={h['n']})",
        f"  final latency s          p50 {_f(lat['p50'])}  p95 {_f(lat['p95'])}  "
        f"max {_f(lat['max'])}  (n={lat['n']}, no final: {lat['missed']}; "
        f"includes the {Settings.from_env().session.chunk_timeout_s:g} s STT_CHUNK_TIMEOUT)",
        *(["    parts s (p50 / p95)    " + "  ".join(
            f"{k} {_f(v['p50'])} / {_f(v['p95'])}" for k, v in lat["parts"].items())]
          if lat.get("parts") else []),
        f"  worker backlog ms        p50 {_f(b['p50'], '.1f')}  p99 {_f(b['p99'], '.1f')}  "
        f"max {_f(b['max'], '.0f')}  (ping round trip, n={b['n']}): "
        + ("kept up" if b["kept_up"] else f"FELL BEHIND (p99 over {BACKLOG_OK_MS:g} ms)"),
        f"  worker CPU % of a core   {r['worker_cpu_pct']['main']:.0f} (event loop process)  "
        f"{r['worker_cpu_pct']['with_engine']:.0f} (with engine processes)",
        *([f"  worker CPU per message   {r['worker_cpu_per_message_us']:.0f} us (event loop "
           f"process, all its work) -> one free core: about "
           f"{r['sessions_per_core_estimate']:.0f} sessions at {r['chunk_ms']} ms chunks"]
          if r["engine"] == "null" else []),  # with an engine, its processes dominate
        f"  worker peak RSS MiB      {r['worker_peak_rss_mb']['main']:.0f} (main)  "
        f"{r['worker_peak_rss_mb']['with_engine']:.0f} (with engine processes)",
        f"  nats-server CPU %        {r['nats_server_cpu_pct']:.0f}",
        f"  generator                {g['procs']} process(es), CPU {g['cpu_pct']:.0f} %, lag ms "
        f"p50 {_f(g['lag_ms_p50'])} p99 {_f(g['lag_ms_p99'])} max {_f(g['lag_ms_max'], '.0f')}, "
        f"late chunks {g['late_chunks']}: "
        + ("kept real time" if g["kept_real_time"] else
           "DID NOT KEEP REAL TIME - the load was lighter than requested"
           + (" (it was held back, not busy: nats-server stalls publishers while a consumer "
              "is behind, and other processes compete for the CPU)" if g["cpu_pct"] < 50 else "")),
        f"  other processes CPU %    {r['other_processes_cpu_pct']:.0f}   (everything else on "
        f"the machine during the {r['window_s']:.0f} s window)",
        f"  partials {r['partials']}, finals {r['finals']}, sessions without 'end' "
        f"{r['sessions_unfinished']}, drain {r['drain_s']:.1f} s",
    ]
    print("\n".join(lines), flush=True)


def clean(r: dict[str, Any]) -> bool:
    """Every chunk handled, every session ended, no error message."""
    return r["chunks_dropped"] == 0 and r["sessions_unfinished"] == 0 and not r["error_messages"]


def passes(r: dict[str, Any], engine: str, latency_target_s: float) -> bool:
    """--find-max's criterion: (a) for a recognizer, (b) plus "the worker kept up" for null."""
    if engine != "null":
        p95 = r["final_latency_s"]["p95"]
        return clean(r) and p95 is not None and p95 <= latency_target_s
    p99 = r["handling_ms"]["p99"]
    return (clean(r) and p99 is not None and p99 < HANDLING_TARGET_MS
            and r["worker_backlog_ms"]["kept_up"])


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="null",
                        help="null: benchmark-only engine that answers at once (worker overhead); "
                             "faster-whisper, whisper: the recognizers")
    parser.add_argument("--sessions", type=int, default=10, help="concurrent sessions")
    parser.add_argument("--duration-s", type=float, default=30.0, help="audio per session")
    parser.add_argument("--chunk-ms", type=int, default=40,
                        help=f"chunk length, a multiple of {SLOT_MS} ms (the product handles 20-100)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                        help="speech corpus directory with references.tsv (default: "
                             "../shared/corpus beside the repository)")
    parser.add_argument("--raw-audio", action="store_true",
                        help="send 'audio' as msgpack bytes instead of the seed's audio_b64")
    parser.add_argument("--find-max", action="store_true",
                        help="step sessions up (recognizers: 1, 2, 3, 4, 6, 8, ...; null: 100, "
                             "200, ...) until a step fails, and report the largest N that passed "
                             "(recognizers: final latency p95 at most --latency-target-s; null: "
                             "handling p99 < "
                             f"{HANDLING_TARGET_MS:g} ms and worker backlog p99 < "
                             f"{BACKLOG_OK_MS:g} ms); each with no dropped chunk")
    parser.add_argument("--latency-target-s", type=float, default=None,
                        help="final latency p95 target for --find-max with a recognizer "
                             f"(default: the worker's STT_CHUNK_TIMEOUT + {LATENCY_MARGIN_S:g} s)")
    parser.add_argument("--steps-after-fail", type=int, default=0,
                        help="with --find-max, run this many more steps after the first that "
                             "fails, to show the curve (the result is still the last passing N)")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="upper bound for --find-max (default: the last step)")
    parser.add_argument("--gen-procs", type=int, default=1,
                        help="load generator processes (the sessions are split between them)")
    parser.add_argument("--end-timeout-s", type=float, default=30.0,
                        help="after the last chunk, how long to wait for every session's 'end'")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--profile", type=Path, default=None,
                        help="cProfile the worker's event loop into this file (slows it down)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes sharing the sessions through the partition mapping "
                             "(STT_PARTITIONS, the server with k8s/nats/nats-server.conf); the "
                             "figures are their sums")
    parser.add_argument("--floor", action="store_true",
                        help="instead of the worker, a bare nats-py subscriber that only "
                             "msgpack-unpacks each message (and answers 'end'): its CPU per "
                             "message is the floor any worker in Python pays for NATS")
    args = parser.parse_args(argv)
    if args.chunk_ms % SLOT_MS or not 10 <= args.chunk_ms <= 200:
        parser.error(f"--chunk-ms must be a multiple of {SLOT_MS} between 10 and 200")
    if args.sessions < 1 or args.gen_procs < 1:
        parser.error("--sessions and --gen-procs must be at least 1")

    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop nats-server and the worker
    signal.signal(signal.SIGTERM, _interrupt)
    worker_env = dict(os.environ)
    worker_env["STT_ENGINE"] = ENGINES[args.engine]
    worker_env.setdefault("STT_DRAIN_TIMEOUT_S", "5")
    worker_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        worker_settings = Settings.from_env(environ=worker_env)
    except ValueError as exc:
        print(f"bad worker configuration: {exc}", file=sys.stderr)
        return 2
    if args.latency_target_s is None:
        args.latency_target_s = worker_settings.session.chunk_timeout_s + LATENCY_MARGIN_S

    command = " ".join(shlex.quote(a) for a in [sys.executable.replace(str(ROOT) + "/", ""),
                                                 "-m", "bench.load", *(argv or sys.argv[1:])])
    m = machine()
    print(header(command, load=True, info=m))
    stt_env = {k: v for k, v in worker_env.items() if k.startswith("STT_") and k != "STT_ENGINE"}
    print(f"worker: STT_ENGINE={worker_env['STT_ENGINE']} {stt_env or ''}".rstrip(), flush=True)
    try:
        clips = load_corpus(args.corpus)
    except CorpusUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(f"corpus: {len(clips)} clips, {sum(c.duration_s for c in clips):.0f} s, {args.corpus}",
          flush=True)

    steps = ([n for n in FIND_MAX_STEPS[args.engine]
              if args.max_sessions is None or n <= args.max_sessions]
             if args.find_max else [args.sessions])
    runs: list[dict[str, Any]] = []
    best: int | None = None
    failed = 0
    try:
        with NatsServer.for_replicas() if args.workers > 1 else NatsServer() as server:
            for n in steps:
                cfg = RunConfig(args.engine, n, args.duration_s, args.chunk_ms, args.corpus,
                                args.raw_audio, args.gen_procs, args.end_timeout_s, args.seed,
                                args.profile and args.profile.resolve(), worker_env,
                                floor=args.floor, workers=args.workers)
                r = run_once(cfg, server, clips)
                runs.append(r)
                print()
                print_run(r)
                if args.find_max:
                    if not r["generator"]["kept_real_time"]:
                        print("  stopping: the generator could not keep real time")
                        break
                    if passes(r, args.engine, args.latency_target_s) and not failed:
                        best = n
                        continue
                    failed += 1
                    if failed > args.steps_after_fail:
                        break
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        if args.json is not None and runs:
            args.json.write_text(json.dumps({"command": command, "code": code_revision(),
                                             "machine": m, "runs": runs},
                                            indent=2, default=_json_default))
    if args.find_max:
        _print_find_max(runs, best, args.engine, args.latency_target_s)
    elif runs:
        print_table(runs)
    if not args.find_max and args.engine == "null" and runs:
        r = runs[0]
        p99 = r["handling_ms"]["p99"]
        ok = clean(r) and p99 is not None and p99 < HANDLING_TARGET_MS
        print(f"\ntarget (b), {r['sessions']} sessions: per-chunk handling p99 < "
              f"{HANDLING_TARGET_MS:g} ms and no dropped chunk: {'met' if ok else 'NOT met'}; "
              f"worker kept real time (backlog p99 < {BACKLOG_OK_MS:g} ms): "
              f"{'yes' if r['worker_backlog_ms']['kept_up'] else 'NO'}"
              + ("" if r["generator"]["kept_real_time"] else
                 " (the generator did not keep real time: load lighter than requested)"))
    return 0


def print_table(runs: list[dict[str, Any]]) -> None:
    """One markdown row per run, for the README."""
    print("\n| sessions | chunks/s | handling p50 / p99 ms | final latency p50 / p95 s | no final "
          "| dropped | backlog p99 ms | worker CPU % (with engine) | peak RSS MiB (with engine) "
          "| generator lag p99 ms | other processes CPU % |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in runs:
        h, lat = r["handling_ms"], r["final_latency_s"]
        print(f"| {r['sessions']} | {r['chunks_per_s']:.0f} | {_f(h['p50'], '.3f')} / "
              f"{_f(h['p99'], '.3f')} | {_f(lat['p50'])} / {_f(lat['p95'])} | {lat['missed']} | "
              f"{r['chunks_dropped']} | {_f(r['worker_backlog_ms']['p99'], '.0f')} | "
              f"{r['worker_cpu_pct']['main']:.0f} ({r['worker_cpu_pct']['with_engine']:.0f}) | "
              f"{r['worker_peak_rss_mb']['main']:.0f} ({r['worker_peak_rss_mb']['with_engine']:.0f}) | "
              f"{_f(r['generator']['lag_ms_p99'], '.1f')} | {r['other_processes_cpu_pct']:.0f} |")


def _print_find_max(runs: list[dict[str, Any]], best: int | None, engine: str,
                    latency_target_s: float) -> None:
    print_table(runs)
    what = (f"final latency p95 at most {latency_target_s:g} s" if engine != "null"
            else f"per-chunk handling p99 < {HANDLING_TARGET_MS:g} ms, worker backlog p99 < "
                 f"{BACKLOG_OK_MS:g} ms")
    print(f"\nlargest N with {what} and no dropped chunk: {best if best is not None else 'none'}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
