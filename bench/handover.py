"""Every word once across replicas: sessions moved by SIGKILL, SIGTERM and rebalancing, with
real Whisper, checked against the sample's text beside one decode of each session's whole audio.

    python -m bench.handover                  # 3 replicas, 6 sessions, seed chunks (no seq)
    python -m bench.handover --seq --runs 3   # chunks with the seq extension, three runs

Real processes on loopback: nats-server with ``k8s/nats/nats-server.conf``, three ``stt worker``
replicas with ``STT_PARTITIONS=32`` and the worker defaults (faster-whisper tiny.en, model
endpointing, partials). This process streams six live sessions at real time, each three of the
sample's sentences with ``--gap-s`` (2 s) of silence after each, as the seed's front-ends send
them: ``audio_b64`` and a capture ``timestamp``, no ``seq`` unless ``--seq``. ``--kill-at-s``
(9 s) in, the replica holding most partitions is SIGKILLed; ``--term-after-s`` (10 s) later,
another is SIGTERMed; the last one serves everything to the end, when every session sends
``end``. Then each session's whole audio is decoded in this process with the same engine.

Printed per session and in total:

* WER of the session's finals joined (in ``sequence`` order) against the sample's text, beside
  the WER of the whole-clip decode; the check: no session more than 0.03 worse than its
  whole-clip decode (sessions that lost an utterance at the SIGKILL are left out: a crash loses
  the audio of its window);
* utterances lost (under half their words found, in order, in the finals), by where: the
  SIGKILL (its final was due within 4 s before it, or its speech began before the partitions
  were claimed plus 3 s), the SIGTERM (until 10 s after it), elsewhere;
* repeated phrases: any 4 words in a row that the finals hold twice or more, and more often
  than the text;
* each session's ``end`` messages (one expected), ``sequence`` numbers repeated or going back;
* partitions per replica before the kill and after it (max/min), SIGTERM's exit code.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nats
import numpy as np

from stt.cluster.membership import REPLICA_HEADER, heartbeats, poll_until, wait_balanced
from stt.config import Settings
from stt.core.audio import SAMPLE_RATE, load_16k_mono, to_pcm16
from stt.core.textnorm import normalize, word_errors
from stt.core.transcription import TranscribeOptions
from stt.engines import create_engine
from stt.transport.nats_server import REPLICAS_PARTITIONS, NatsServer
from stt.wire import protocol

from .common import header
from .replicas import CHUNK_S, LAPSED, MID_HANDOVER, PHRASES, SAMPLE, Replica

SAMPLE_TEXT = SAMPLE.with_suffix(".txt")  # the sample's sentences, one a line (PHRASES)

LEAD_S = 0.5


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


async def one_run(args: argparse.Namespace, run: int, engine: Any, speech: np.ndarray,
                  tmp: Path) -> dict[str, Any]:
    sessions = [Session(f"h{run}s{i}-{os.urandom(2).hex()}",
                        [(i + k) % len(PHRASES) for k in range(3)]) for i in range(args.sessions)]
    for s in sessions:
        s.build(speech, args.gap_s)
    by_sid = {s.sid: s for s in sessions}
    step = int(CHUNK_S * SAMPLE_RATE)
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        replicas = [Replica(server.url, tmp / f"run{run}-r{i}.log", args.engine,
                            STT_PARTIAL_INTERVAL=str(Settings.from_env({}).partial_interval_s))
                    for i in range(3)]
        try:
            hbs = await wait_balanced(nc, 3, REPLICAS_PARTITIONS, timeout_s=120)
            for r in replicas:
                r.learn_id()
            spread_3 = [len(hb.partitions) for hb in hbs.values()]

            async def on_out(msg: Any) -> None:
                sid = msg.subject.rsplit(".", 1)[-1]
                if sid in by_sid:
                    by_sid[sid].out.append((time.monotonic(), msgpack.unpackb(msg.data),
                                            (msg.headers or {}).get(REPLICA_HEADER)))

            await nc.subscribe("ai.voice.transcription.*", cb=on_out)
            await nc.flush()
            for s in sessions:
                await nc.publish(f"ai.voice.stream.{s.sid}", protocol.pack(
                    {"type": "start", "sample_rate": SAMPLE_RATE}))

            async def pump() -> None:
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
                                await nc.publish(f"ai.voice.stream.{s.sid}",
                                                 protocol.pack({"type": "end"}))
                            continue
                        body: dict[str, Any] = {"type": "chunk", "timestamp": captured,
                                                "audio_b64": base64.b64encode(piece).decode()}
                        if args.seq:
                            body["seq"] = tick + 1
                        await nc.publish(f"ai.voice.stream.{s.sid}", protocol.pack(body))
                    captured += CHUNK_S
                    await asyncio.sleep(max(0.0, t0 + (tick + 1) * CHUNK_S - time.monotonic()))
                for s, pcm in zip(sessions, pcms, strict=True):
                    if n * 2 * step < len(pcm) + 2 * step:  # the longest: ends now
                        await nc.publish(f"ai.voice.stream.{s.sid}",
                                         protocol.pack({"type": "end"}))

            pumping = asyncio.create_task(pump())
            t0 = time.monotonic()
            await asyncio.sleep(args.kill_at_s)
            hbs = await heartbeats(nc)
            victim = max(replicas, key=lambda r: len(hbs[r.id].partitions) if r.id in hbs else 0)
            victim.proc.kill()
            victim.proc.wait()
            kill_at, kill_wall = time.monotonic() - t0, time.time()
            await asyncio.sleep(args.term_after_s)
            hbs = await heartbeats(nc)
            spread_2 = [len(hb.partitions) for r, hb in hbs.items() if r != victim.id]
            rest = [r for r in replicas if r is not victim]
            claims = [t for r in rest for t in
                      r.claims(kill_wall, 20, messages=(LAPSED, MID_HANDOVER)).values()]
            stopped = max(rest, key=lambda r: len(hbs[r.id].partitions) if r.id in hbs else 0)
            stopped.proc.send_signal(signal.SIGTERM)
            term_at = time.monotonic() - t0
            term_rc = await asyncio.to_thread(stopped.proc.wait, 60)
            await pumping
            await poll_until(lambda: all(any(m.get("type") == "end" for _, m, _ in s.out)
                                         for s in sessions), 60)
        finally:
            for r in replicas:
                r.stop()
            await nc.close()

    claimed_s = max(claims, default=5.0)
    print(f"run {run}: partitions per replica {sorted(spread_3)} (3 replicas), "
          f"{sorted(spread_2)} after the SIGKILL at {kill_at:.1f} s (claimed "
          f"{min(claims, default=float('nan')):.1f}-{claimed_s:.1f} s after); SIGTERM at "
          f"{term_at:.1f} s exited {term_rc}", flush=True)
    totals: dict[str, Any] = collections.Counter()
    worst = 0.0
    truth = [normalize(line) for line in SAMPLE_TEXT.read_text().splitlines() if line.strip()]
    for s in sessions:
        whole = normalize((await engine.transcribe(s.audio, TranscribeOptions(language="en"))).text)
        refs = [truth[i].split() for i in s.phrases]
        ref = " ".join(" ".join(r) for r in refs)
        hyp = normalize(" ".join(s.finals())).split()
        found = matched_per_utterance(refs, hyp)
        where = []
        for (a, b), share in zip(s.spans, found, strict=True):
            if share >= 0.5:
                continue
            # its final was due by the kill, or its speech came before the partitions were
            # claimed (plus an endpoint and a decode)
            if a < kill_at + claimed_s + 3 and b > kill_at - 4:
                where.append("kill")
            elif a < term_at + 10 and b > term_at:
                where.append("term")
            else:
                where.append("elsewhere")
        for w in where:
            totals["lost_" + w] += 1
        errors, n = word_errors(ref, " ".join(hyp))
        base, _ = word_errors(ref, whole)
        rate, base_rate = errors / max(1, n), base / max(1, n)
        if "kill" not in where:  # a crash loses what it loses; the rest must read as one decode
            worst = max(worst, rate - base_rate)
            totals["errors"] += errors
            totals["base_errors"] += base
            totals["words"] += n
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
        print(f"  {s.sid}: WER {rate:.3f}, whole-clip decode {base_rate:.3f}; lost {where or 'none'}; "
              f"repeated {rep or 'none'}; ends {ends}; sequence back/dup {backwards}/"
              f"{len(seqs) - len(set(seqs))}; replica changes {moves}", flush=True)
        if args.verbose or rate > base_rate + 0.03 or rep:
            print(f"    whole: {whole}\n    finals: {' | '.join(s.finals())}", flush=True)
    totals["worst_wer"] = worst
    totals["term_rc"] = term_rc
    totals["spread_3"] = max(spread_3) / max(1, min(spread_3))
    totals["spread_2"] = max(spread_2, default=0) / max(1, min(spread_2, default=1))
    return dict(totals)


async def main_async(args: argparse.Namespace) -> int:
    speech = load_16k_mono(str(SAMPLE))
    engine = create_engine(Settings.from_env({}))
    await engine.start()
    tmp = Path(tempfile.mkdtemp(prefix="stt-handover-"))
    failed = 0
    for run in range(1, args.runs + 1):
        t = await one_run(args, run, engine, speech, tmp)
        ok = (t.get("lost_term", 0) == 0 and t.get("lost_elsewhere", 0) == 0
              and t.get("lost_kill", 0) <= 2 and t.get("repeated", 0) == 0
              and t["worst_wer"] <= 0.03 and not t.get("ends_missing") and not t.get("ends_extra")
              and not t.get("sequence_duplicates") and not t.get("sequence_backwards")
              and t["term_rc"] == 0 and t["spread_3"] <= 1.5 and t["spread_2"] <= 1.5)
        failed += not ok
        print(f"run {run}: {'PASS' if ok else 'FAIL'}: utterances lost at SIGKILL "
              f"{t.get('lost_kill', 0)}, at SIGTERM {t.get('lost_term', 0)}, elsewhere "
              f"{t.get('lost_elsewhere', 0)}; repeated phrases {t.get('repeated', 0)}; WER of the "
              f"joined finals {t.get('errors', 0) / max(1, t.get('words', 1)):.3f}, of the "
              f"whole-clip decode {t.get('base_errors', 0) / max(1, t.get('words', 1)):.3f} "
              f"(sessions without a crash loss; worst session +{t['worst_wer']:.3f}); "
              f"ends missing {t.get('ends_missing', 0)}, "
              f"extra {t.get('ends_extra', 0)}; sequence duplicates "
              f"{t.get('sequence_duplicates', 0)}, backwards {t.get('sequence_backwards', 0)}; "
              f"partition spread {t['spread_3']:.2f} / {t['spread_2']:.2f}; SIGTERM exit "
              f"{t['term_rc']}", flush=True)
    await engine.close()
    print(f"logs in {tmp}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.handover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--seq", action="store_true", help="chunks carry the seq extension")
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
