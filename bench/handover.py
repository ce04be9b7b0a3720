"""Every word once across replicas: sessions moved by SIGKILL, SIGTERM and rebalancing, with
real Whisper, checked against the sample's text beside one decode of each session's whole audio.

    python -m bench.handover                  # 3 replicas, 6 sessions, seed chunks (no seq)
    python -m bench.handover --seq --runs 3   # chunks with the seq extension, three runs
    python -m bench.handover --modes core,durable   # STT_DURABLE off, then on, side by side

Real processes on loopback: nats-server with ``k8s/nats/nats-server.conf``, three ``stt worker``
replicas with ``STT_PARTITIONS=32`` and the worker defaults (faster-whisper tiny.en, model
endpointing, partials). This process streams six live sessions at real time, each three of the
sample's sentences with ``--gap-s`` (2 s) of silence after each, as the seed's front-ends send
them: ``audio_b64`` and a capture ``timestamp``, no ``seq`` unless ``--seq``. ``--kill-at-s``
(9 s) in, the replica holding most partitions (``--victim sessions``: serving most of the six
sessions) is SIGKILLed; ``--term-after-s`` (10 s) later,
another is SIGTERMed; the last one serves everything to the end, when every session sends
``end``. First the same six sessions are streamed the same way through one replica that
nothing moves them from (the control); at the end each session's whole audio is decoded in this
process with the same engine.

Printed per session and in total:

* WER of the session's finals joined (in ``sequence`` order) against the sample's text, beside
  the WER of the same session on one replica and of the whole-clip decode, and how many words
  differ from one replica's; the check: no session more than 0.03 worse than on one replica
  (sessions the SIGKILL lost or cut an utterance of are left out: a crash loses the audio of
  its window). The whole-clip decode reads some sentences better than any streaming decode
  (more context: tiny.en reads the sample's "ill-disposed" as "old-sposed" in a sentence of
  its own, moved or not), so it is printed, not checked;
* utterances lost (under half their words found, in order, in the finals) or cut (over
  ``CUT_SHARE`` of its words missing that one replica found), by where: the
  SIGKILL (its final was due within 4 s before it, or its speech began before the partitions
  were claimed plus 3 s), the SIGTERM (until 10 s after it), elsewhere; at most 2 at the
  SIGKILL in core mode, none anywhere else, or at all in durable mode;
* repeated phrases: any 4 words in a row that the finals hold twice or more, and more often
  than the text;
* each session's ``end`` messages (one expected), ``sequence`` numbers repeated or going back;
* partitions per replica before the kill and after it (max/min), SIGTERM's exit code;
* what each mode costs (``--modes``; ``durable`` is ``STT_DURABLE=1``, ``durable-memory`` that
  with ``STT_DURABLE_STORAGE=memory``; a SIGKILL then must lose nothing): nats-server's and the replicas' CPU per chunk sent (from their start to the last
  ``end``), end of speech -> final p50/p95 (every final but those of utterances that ended
  between 1 s before the SIGKILL and 2 s after the partitions were claimed), and the failover time: SIGKILL ->
  partitions claimed (the last), and -> the first message another replica published for each
  session the killed one served (median / max).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import difflib
import itertools
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nats
import numpy as np

from stt.cluster.membership import (
    REPLICA_HEADER,
    heartbeats,
    partition_of,
    poll_until,
    wait_balanced,
)
from stt.config import Settings
from stt.core.audio import SAMPLE_RATE, load_16k_mono, to_pcm16
from stt.core.textnorm import normalize, word_errors
from stt.core.transcription import TranscribeOptions
from stt.engines import create_engine
from stt.transport.connection import subscribed
from stt.transport.nats_server import REPLICAS_PARTITIONS, NatsServer
from stt.wire import protocol

from .common import cpu_s, header, percentile
from .replicas import CHUNK_S, LAPSED, MID_HANDOVER, PHRASES, SAMPLE, Replica

SAMPLE_TEXT = SAMPLE.with_suffix(".txt")  # the sample's sentences, one a line (PHRASES)

LEAD_S = 0.5
# an utterance is cut when this share of its words more than one replica found is missing
CUT_SHARE = 0.1


@dataclass
class Session:
    sid: str
    phrases: list[int]
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    spans: list[tuple[float, float]] = field(default_factory=list)  # speech, s into the audio
    out: list[tuple[float, dict[str, Any], str | None]] = field(default_factory=list)
    started: float = 0.0  # monotonic time of its first chunk

    def build(self, speech: np.ndarray, gap_s: float) -> None:
        parts, at = [np.zeros(int(LEAD_S * SAMPLE_RATE), np.float32)], LEAD_S
        for i in self.phrases:
            a, b = PHRASES[i]
            clip = speech[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)]
            self.spans.append((at, at + len(clip) / SAMPLE_RATE))
            parts += [clip, np.zeros(int(gap_s * SAMPLE_RATE), np.float32)]
            at += len(clip) / SAMPLE_RATE + gap_s
        self.audio = np.concatenate(parts)

    def ended(self) -> bool:
        return any(m.get("type") == "end" for _, m, _ in self.out)

    def finals(self) -> list[str]:
        return [m["transcript"] for _, m, _ in sorted(self.out, key=lambda x: x[1]["sequence"])
                if m.get("type") == "transcript" and m.get("is_final") and m["transcript"]]


def repeats(hyp: list[str], ref: list[str], n: int = 4) -> list[str]:
    """n-grams the hypothesis holds twice or more, and more often than the reference."""
    def grams(words: list[str]) -> collections.Counter[str]:
        return collections.Counter(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))
    h, r = grams(hyp), grams(ref)
    return [g for g, c in h.items() if c > max(1, r.get(g, 0))]


def matched_per_utterance(refs: list[list[str]], hyp: list[str]) -> list[float]:
    """Share of each utterance's words found, in order, in the hypothesis."""
    ref = [w for words in refs for w in words]
    owner = [i for i, words in enumerate(refs) for _ in words]
    hit = [0] * len(refs)
    sm = difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False)
    for block in sm.get_matching_blocks():
        for k in range(block.size):
            hit[owner[block.a + k]] += 1
    return [h / max(1, len(words)) for h, words in zip(hit, refs, strict=True)]


async def stream(nc: Any, sessions: list[Session], *, seq: bool) -> None:
    """Every session's ``start``, then its audio at real time in 40 ms chunks, as a seed
    front-end sends them (``audio_b64`` and a capture ``timestamp``; ``seq`` only with
    ``--seq``), then its ``end``."""
    for s in sessions:
        await nc.publish(f"ai.voice.stream.{s.sid}", protocol.pack(
            {"type": "start", "sample_rate": SAMPLE_RATE}))
    step = int(CHUNK_S * SAMPLE_RATE)
    t0 = time.monotonic()
    captured = time.time()
    pcms = [to_pcm16(s.audio) for s in sessions]
    for s in sessions:
        s.started = t0
    n = max(len(p) for p in pcms) // (2 * step) + 1
    for tick in range(n):
        for s, pcm in zip(sessions, pcms, strict=True):
            piece = pcm[tick * 2 * step:(tick + 1) * 2 * step]
            if not piece:
                if tick * 2 * step < len(pcm) + 2 * step:  # just ran out: it ends
                    await nc.publish(f"ai.voice.stream.{s.sid}", protocol.pack({"type": "end"}))
                continue
            body: dict[str, Any] = {"type": "chunk", "timestamp": captured,
                                    "audio_b64": base64.b64encode(piece).decode()}
            if seq:
                body["seq"] = tick + 1
            await nc.publish(f"ai.voice.stream.{s.sid}", protocol.pack(body))
        captured += CHUNK_S
        await asyncio.sleep(max(0.0, t0 + (tick + 1) * CHUNK_S - time.monotonic()))
    for s, pcm in zip(sessions, pcms, strict=True):
        if n * 2 * step < len(pcm) + 2 * step:  # the longest: ends now
            await nc.publish(f"ai.voice.stream.{s.sid}", protocol.pack({"type": "end"}))


def new_sessions(args: argparse.Namespace, speech: np.ndarray, tag: str) -> list[Session]:
    """Session i speaks the sample's sentences i, i+1, i+2 (the same in every run)."""
    sessions = [Session(f"{tag}s{i}-{os.urandom(2).hex()}",
                        [(i + k) % len(PHRASES) for k in range(3)]) for i in range(args.sessions)]
    for s in sessions:
        s.build(speech, args.gap_s)
    return sessions


def replica(url: str, log_path: Path, args: argparse.Namespace, mode: str = "core") -> Replica:
    """One ``stt worker`` as every run starts them (the control on one replica included)."""
    return Replica(url, log_path, args.engine,
                   STT_PARTIAL_INTERVAL=str(Settings.from_env({}).session.partial_interval_s),
                   STT_DURABLE="0" if mode == "core" else "1",
                   STT_DURABLE_STORAGE="memory" if mode == "durable-memory" else "file",
                   # k8s/nats/nats-server.conf keeps 256 MB of memory for all streams
                   STT_DURABLE_MAX_BYTES=str(64 << 20))


def collect(sessions: list[Session]) -> Callable[[Any], Awaitable[None]]:
    """A subscription callback that files each transcript message under its session."""
    by_sid = {s.sid: s for s in sessions}

    async def on_out(msg: Any) -> None:
        sid = msg.subject.rsplit(".", 1)[-1]
        if sid in by_sid:
            by_sid[sid].out.append((time.monotonic(), msgpack.unpackb(msg.data),
                                    (msg.headers or {}).get(REPLICA_HEADER)))
    return on_out


async def one_replica(args: argparse.Namespace, speech: np.ndarray, tmp: Path) -> list[list[str]]:
    """The same sessions, the same way, on one replica that nothing moves them from: each
    session's finals as the control the moved sessions are compared with, word for word."""
    sessions = new_sessions(args, speech, "c")
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        alone = replica(server.url, tmp / "one-replica.log", args)
        try:
            await wait_balanced(nc, 1, REPLICAS_PARTITIONS, timeout_s=120)
            await nc.subscribe("ai.voice.transcription.*", cb=collect(sessions))
            await subscribed(nc)
            await stream(nc, sessions, seq=args.seq)
            await poll_until(lambda: all(s.ended() for s in sessions), 60)
        finally:
            alone.stop()
            await nc.close()
    return [s.finals() for s in sessions]


async def one_run(args: argparse.Namespace, run: int, engine: Any, speech: np.ndarray,
                  tmp: Path, one_replica_finals: list[list[str]],
                  mode: str = "core") -> dict[str, Any]:
    sessions = new_sessions(args, speech, f"h{run}")
    step = int(CHUNK_S * SAMPLE_RATE)
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        replicas = [replica(server.url, tmp / f"{mode}-run{run}-r{i}.log", args, mode)
                    for i in range(3)]
        cpu0: dict[int, float] = {}  # pid -> CPU seconds when the sessions started
        cpu_end: dict[int, float] = {}
        try:
            hbs = await wait_balanced(nc, 3, REPLICAS_PARTITIONS, timeout_s=120)
            for r in replicas:
                r.learn_id()
            spread_3 = [len(hb.partitions) for hb in hbs.values()]

            await nc.subscribe("ai.voice.transcription.*", cb=collect(sessions))
            await subscribed(nc)
            procs = [server.proc.pid if server.proc else 0, *(r.proc.pid for r in replicas)]
            cpu0 = {pid: cpu_s(pid) for pid in procs}

            pumping = asyncio.create_task(stream(nc, sessions, seq=args.seq))
            t0 = time.monotonic()
            await asyncio.sleep(args.kill_at_s)
            hbs = await heartbeats(nc)
            wanted = [partition_of(s.sid, REPLICAS_PARTITIONS) for s in sessions]
            # the replica holding most partitions (issue 26's check), or with --victim sessions
            # the one serving most of the sessions, so that a crash has utterances to lose

            def rank(r: Replica) -> tuple[int, int]:
                if r.id not in hbs:
                    return (-1, 0)
                held = hbs[r.id].partitions
                serving = sum(p in held for p in wanted)
                return (serving, len(held)) if args.victim == "sessions" else (len(held), serving)

            victim = max(replicas, key=rank)
            cpu_end[victim.proc.pid] = cpu_s(victim.proc.pid)
            victim.proc.kill()
            victim.proc.wait()
            kill_at, kill_wall = time.monotonic() - t0, time.time()
            # failover: until the live replicas' heartbeats hold every partition again
            claimed_at = None
            while claimed_at is None and time.monotonic() - t0 - kill_at < args.term_after_s:
                held = {p for r, hb in (await heartbeats(nc)).items() if r != victim.id
                        for p in hb.partitions}
                if len(held) == REPLICAS_PARTITIONS:
                    claimed_at = time.monotonic() - t0 - kill_at
                else:
                    await asyncio.sleep(0.1)
            await asyncio.sleep(max(0.0, t0 + kill_at + args.term_after_s - time.monotonic()))
            hbs = await heartbeats(nc)
            spread_2 = [len(hb.partitions) for r, hb in hbs.items() if r != victim.id]
            rest = [r for r in replicas if r is not victim]
            claims = [t for r in rest for t in
                      r.claims(kill_wall, 20, messages=(LAPSED, MID_HANDOVER)).values()]
            stopped = max(rest, key=lambda r: len(hbs[r.id].partitions) if r.id in hbs else 0)
            cpu_end[stopped.proc.pid] = cpu_s(stopped.proc.pid)  # (its drain is not counted)
            stopped.proc.send_signal(signal.SIGTERM)
            term_at = time.monotonic() - t0
            term_rc = await asyncio.to_thread(stopped.proc.wait, 60)
            await pumping
            await poll_until(lambda: all(s.ended() for s in sessions), 60)
            cpu_end.update({pid: cpu_s(pid) for pid in procs if pid not in cpu_end})
        finally:
            for r in replicas:
                r.stop()
            await nc.close()

    claimed_s = max(claims, default=5.0)  # (when the check counts an utterance lost at the kill)
    server_pid = procs[0]
    chunks = sum(len(s.audio) // step + 1 for s in sessions)
    server_cpu = cpu_end.get(server_pid, 0.0) - cpu0.get(server_pid, 0.0)
    worker_cpu = sum(cpu_end.get(pid, 0.0) - cpu0.get(pid, 0.0) for pid in procs[1:])
    latencies, failover = [], []
    for s in sessions:
        ends = [s.started + b for _, b in s.spans]
        for at, m, _ in s.out:
            if not (m.get("type") == "transcript" and m.get("is_final") and m["transcript"]):
                continue
            before = [e for e in ends if e <= at]
            if not before:
                continue
            end = max(before) - t0  # the speech end this final follows, in seconds of the run
            if not kill_at - 1 < end < kill_at + (claimed_at or 5.0) + 2:  # (waited for a claim)
                latencies.append(at - max(before))
        killed = {r for _, _, r in s.out if r == victim.id}
        after = [at - t0 - kill_at for at, _, r in s.out
                 if r is not None and r != victim.id and at - t0 > kill_at]
        if killed and after:
            failover.append(min(after))
    print(f"run {run}: partitions per replica {sorted(spread_3)} (3 replicas), "
          f"{sorted(spread_2)} after the SIGKILL at {kill_at:.1f} s (claimed "
          f"{min(claims, default=float('nan')):.1f}-{claimed_s:.1f} s after); SIGTERM at "
          f"{term_at:.1f} s exited {term_rc}", flush=True)
    totals: dict[str, Any] = collections.Counter()
    worst = worst_replica = 0.0
    truth = [normalize(line) for line in SAMPLE_TEXT.read_text().splitlines() if line.strip()]
    for s, control in zip(sessions, one_replica_finals, strict=True):
        whole = normalize((await engine.transcribe(s.audio, TranscribeOptions(language="en"))).text)
        alone = normalize(" ".join(control))
        refs = [truth[i].split() for i in s.phrases]
        ref = " ".join(" ".join(r) for r in refs)
        hyp = normalize(" ".join(s.finals())).split()
        where = []
        for (a, b), share, control_share in zip(s.spans, matched_per_utterance(refs, hyp),
                                                matched_per_utterance(refs, alone.split()),
                                                strict=True):
            if share >= max(0.5, control_share - CUT_SHARE):
                continue
            # lost (under half its words found) or cut (a part of it missing that one replica
            # found); at the kill if its final was due by then, or its speech came before the
            # partitions were claimed (plus an endpoint and a decode)
            if a < kill_at + claimed_s + 3 and b > kill_at - 4:
                place = "kill"
            elif a < term_at + 10 and b > term_at:
                place = "term"
            else:
                place = "elsewhere"
            where.append(place if share < 0.5 else place + " (cut)")
        for w in where:
            totals[("cut_" if w.endswith("(cut)") else "lost_") + w.split()[0]] += 1
        errors, n = word_errors(ref, " ".join(hyp))
        base, _ = word_errors(ref, whole)
        base_replica, _ = word_errors(ref, alone)
        differ, n_alone = word_errors(alone, " ".join(hyp))
        rate, base_rate, replica_rate = (errors / max(1, n), base / max(1, n),
                                         base_replica / max(1, n))
        if not any(w.startswith("kill") for w in where):
            # a crash loses what it loses; the rest must read as on one replica
            worst = max(worst, rate - base_rate)
            worst_replica = max(worst_replica, rate - replica_rate)
            totals["errors"] += errors
            totals["base_errors"] += base
            totals["replica_errors"] += base_replica
            totals["words"] += n
            totals["differ"] += differ
            totals["words_alone"] += n_alone
        rep = repeats(hyp, ref.split())
        totals["repeated"] += len(rep)
        ends = sum(m.get("type") == "end" for _, m, _ in s.out)
        seqs = [m["sequence"] for _, m, _ in sorted(s.out, key=lambda x: x[0])]
        backwards = sum(b <= a for a, b in itertools.pairwise(seqs))
        totals["ends_missing"] += ends == 0
        totals["ends_extra"] += max(0, ends - 1)
        totals["sequence_backwards"] += backwards
        totals["sequence_duplicates"] += len(seqs) - len(set(seqs))
        spoke = [r for _, _, r in s.out]
        moves = sum(a != b for a, b in itertools.pairwise(spoke))
        print(f"  {s.sid}: WER {rate:.3f}, on one replica {replica_rate:.3f} ({differ} of "
              f"{n_alone} words differ), whole-clip decode {base_rate:.3f}; lost "
              f"{where or 'none'}; "
              f"repeated {rep or 'none'}; ends {ends}; sequence back/dup {backwards}/"
              f"{len(seqs) - len(set(seqs))}; replica changes {moves}", flush=True)
        if args.verbose or rate > replica_rate + 0.03 or rep:
            print(f"    whole: {whole}\n    one replica: {' | '.join(control)}\n    finals: "
                  f"{' | '.join(s.finals())}", flush=True)
    totals["worst_wer"] = worst
    totals["worst_wer_replica"] = worst_replica
    totals["term_rc"] = term_rc
    totals["spread_3"] = max(spread_3) / max(1, min(spread_3))
    totals["spread_2"] = max(spread_2, default=0) / max(1, min(spread_2, default=1))
    return {**totals, "server_us_per_chunk": 1e6 * server_cpu / max(1, chunks),
            "worker_us_per_chunk": 1e6 * worker_cpu / max(1, chunks),
            "latencies": latencies, "failover": failover,
            "claimed_s": claimed_at if claimed_at is not None else float("nan")}


async def main_async(args: argparse.Namespace) -> int:
    speech = load_16k_mono(str(SAMPLE))
    engine = create_engine(Settings.from_env({}))
    await engine.start()
    tmp = Path(tempfile.mkdtemp(prefix="stt-handover-"))
    print("--- the same sessions on one replica, nothing moved (the control)", flush=True)
    alone = await one_replica(args, speech, tmp)
    failed = 0
    costs: dict[str, list[dict[str, Any]]] = {}
    for run, mode in itertools.product(range(1, args.runs + 1), args.modes.split(",")):
        print(f"--- {mode}, run {run}", flush=True)
        t = await one_run(args, run, engine, speech, tmp, alone, mode)
        costs.setdefault(mode, []).append(t)
        may_lose = 2 if mode == "core" else 0
        crash = t.get("lost_kill", 0) + t.get("cut_kill", 0)
        ok = (all(t.get(k, 0) == 0 for k in ("lost_term", "cut_term", "lost_elsewhere",
                                             "cut_elsewhere", "repeated", "ends_missing",
                                             "ends_extra", "sequence_duplicates",
                                             "sequence_backwards", "term_rc"))
              and crash <= may_lose and t["worst_wer_replica"] <= 0.03
              and t["spread_3"] <= 1.5 and t["spread_2"] <= 1.5)
        failed += not ok
        words = max(1, t.get("words", 1))
        print(f"run {run}: {'PASS' if ok else 'FAIL'}: utterances lost (cut) at SIGKILL "
              f"{t.get('lost_kill', 0)} ({t.get('cut_kill', 0)}), at SIGTERM "
              f"{t.get('lost_term', 0)} ({t.get('cut_term', 0)}), elsewhere "
              f"{t.get('lost_elsewhere', 0)} ({t.get('cut_elsewhere', 0)}); repeated phrases "
              f"{t.get('repeated', 0)}; sessions without a crash loss: WER of the joined finals "
              f"{t.get('errors', 0) / words:.3f}, of the same sessions on one replica "
              f"{t.get('replica_errors', 0) / words:.3f} (worst session "
              f"+{t['worst_wer_replica']:.3f}, {t.get('differ', 0)} of "
              f"{t.get('words_alone', 0)} words differ), of the whole-clip decode "
              f"{t.get('base_errors', 0) / words:.3f} (worst session +{t['worst_wer']:.3f}); "
              f"ends missing {t.get('ends_missing', 0)}, "
              f"extra {t.get('ends_extra', 0)}; sequence duplicates "
              f"{t.get('sequence_duplicates', 0)}, backwards {t.get('sequence_backwards', 0)}; "
              f"partition spread {t['spread_3']:.2f} / {t['spread_2']:.2f}; SIGTERM exit "
              f"{t['term_rc']}", flush=True)
        print_costs({mode: [t]})
    print("\nwhat each mode costs, all runs")
    print_costs(costs)
    await engine.close()
    print(f"logs in {tmp}")
    return 1 if failed else 0


def print_costs(costs: dict[str, list[dict[str, Any]]]) -> None:
    """Per chunk sent: nats-server CPU, the replicas' CPU (with Whisper); end of speech ->
    final; SIGKILL -> partitions claimed, -> the killed replica's sessions heard from elsewhere."""
    for mode, runs in costs.items():
        lat = [x for t in runs for x in t["latencies"]]
        fo = [x for t in runs for x in t["failover"]]
        print(f"  {mode:14} server {np.mean([t['server_us_per_chunk'] for t in runs]):6.1f} us/chunk"
              f", replicas {np.mean([t['worker_us_per_chunk'] for t in runs]):7.0f} us/chunk; "
              f"final p50 {percentile(lat, 50) or 0:.2f} s, p95 {percentile(lat, 95) or 0:.2f} s "
              f"({len(lat)} finals); claimed {max(t['claimed_s'] for t in runs):.1f} s, first "
              f"word elsewhere median {percentile(fo, 50) or 0:.1f} s, max {max(fo, default=0):.1f}"
              f" s ({len(fo)} sessions)", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.handover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--seq", action="store_true", help="chunks carry the seq extension")
    parser.add_argument("--victim", choices=("partitions", "sessions"), default="partitions",
                        help="the replica SIGKILLed: the one holding most partitions, or the one "
                             "serving most of the sessions")
    parser.add_argument("--modes", default="core",
                        help="comma-separated: core (STT_DURABLE=0), durable (STT_DURABLE=1), "
                             "durable-memory (and STT_DURABLE_STORAGE=memory); each run plays "
                             "every mode in turn")
    parser.add_argument("--gap-s", type=float, default=2.0)
    parser.add_argument("--kill-at-s", type=float, default=9.0)
    parser.add_argument("--term-after-s", type=float, default=10.0)
    parser.add_argument("--engine", default="faster-whisper",
                        help="the replicas' STT_ENGINE (bench.null_engine:InstantEngine checks "
                             "the harness alone)")
    parser.add_argument("--verbose", action="store_true", help="print every session's words")
    args = parser.parse_args(argv)
    print(header("python -m bench.handover " + " ".join(argv), load=True), flush=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
