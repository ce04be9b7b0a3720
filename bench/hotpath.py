"""Hot-path micro-benchmark: CPU per input message, stage by stage, without NATS.

    python -m bench.hotpath                       # this tree, 100 sessions x 20 s
    python -m bench.hotpath --ref HEAD~3          # also the code of a revision, side by side
    python -m bench.hotpath --profile /tmp/hp.prof

The messages are the ones ``bench.load`` publishes (its session plans and payload tables):
msgpack maps with 40 ms ``audio_b64`` chunks of corpus speech, half the sessions 16 kHz
LibriSpeech, half 22.05 kHz LJ Speech, with ``STT_CHUNK_TIMEOUT`` + 0.5-1.0 s of silence after
each clip, interleaved as they would arrive (every session's chunk k, then chunk k + 1).

Each pass feeds all of them through one more stage of the product's own code, with fresh
state, and times it (``time.process_time``); a stage's cost is the difference to the pass
before:

* ``msgpack.unpackb``: the floor, what any subscriber pays to read the message at all;
* ``protocol.unpack + parse``: plus the checks and the base64 decode;
* ``+ Converter.convert``: plus PCM decode and the 22.05 kHz -> 16 kHz resample;
* ``+ Framer.push``: plus cutting into 30 ms frames;
* ``Session.handle``: everything a session does (VAD, segmentation, pitch, jobs), the engine
  answering every job at once with a fixed text;
* ``Worker.handle``: what the worker's message callback runs (subject, session lookup,
  actions, packing outputs), with ``bench.null_engine`` answering jobs on the event loop; the
  figure covers the whole loop (jobs, ticker) per input message.

The ``Session.handle`` pass also hashes every action (messages, job boundaries and their
audio): two trees with the same digest made the same decisions on the same audio.

``--ref REV`` runs the same passes on ``git archive REV stt`` in a child process, so the
before and after figures come from one run on one machine.

``python -m bench.hotpath floor-subscriber --stats-out FILE`` is the floor as ``bench.load
--floor`` runs it: a bare nats-py subscriber that only unpacks each message (and answers
``end`` so the generator finishes), speaking ``bench.probe``'s protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from stt.cli.wiring import build_worker
from stt.config import Settings
from stt.core.actions import Close, Publish, Transcribe
from stt.core.session import Session
from stt.core.transcription import Transcription
from stt.core.vad import Framer
from stt.wire import protocol

from .common import DEFAULT_CORPUS, ROOT, load_corpus

CHUNK_MS = 40
TICK_S = CHUNK_MS / 1000
TEXT = "benchmark"


def build_messages(corpus: Path, sessions: int, duration_s: float,
                   seed: int) -> list[tuple[str, bytes]]:
    """(subject, payload) in arrival order: starts, then chunk k of every session, then ends."""
    from .load import _expand, _payload_tables, make_plans

    clips = load_corpus(corpus)
    settings = Settings.from_env(environ={})
    plans = make_plans(clips, sessions, duration_s, CHUNK_MS, settings.session.chunk_timeout_s,
                       seed)
    per_clip, silence = _payload_tables(clips, {p.sample_rate for p in plans}, CHUNK_MS, False)
    streams = [_expand(p, per_clip, silence) for p in plans]
    subjects = settings.nats.subjects
    subject = [subjects.input(p.session_id) for p in plans]
    pack = msgpack.packb
    out = [(subject[i], pack({"type": "start", "session_id": p.session_id,
                              "sample_rate": p.sample_rate, "channels": 1,
                              "encoding": "pcm_s16le"}))
           for i, p in enumerate(plans)]
    wall = 1.7e9
    for j in range(max(p.n_chunks for p in plans)):
        for i, p in enumerate(plans):
            if j < p.n_chunks:
                out.append((subject[i], pack({"type": "chunk", "timestamp": wall + j * TICK_S,
                                              "seq": j, "audio_b64": streams[i][j]})))
    out += [(s, pack({"type": "end"})) for s in subject]
    return out


def _ticks(messages: list[tuple[str, bytes]]) -> list[float]:
    """The simulated arrival time of each message: chunk k of every session arrives at k * 40 ms."""
    seen: dict[str, int] = {}
    now = []
    for subject, _ in messages:
        k = seen.get(subject, -1) + 1
        seen[subject] = k
        now.append(k * TICK_S)
    return now


# --- the passes -----------------------------------------------------------------------------


def pass_floor(messages: list[tuple[str, bytes]]) -> None:
    unpackb = msgpack.unpackb
    for _, data in messages:
        unpackb(data, raw=False, strict_map_key=False)


def pass_parse(messages: list[tuple[str, bytes]]) -> None:
    parse, unpack = protocol.parse, protocol.unpack
    for _, data in messages:
        parse(unpack(data))


def _pass_audio(messages: list[tuple[str, bytes]], framed: bool) -> None:
    from stt.core.audio import Converter

    parse, unpack = protocol.parse, protocol.unpack
    conv: dict[str, Converter] = {}
    framers: dict[str, Framer] = {}
    for subject, data in messages:
        event = parse(unpack(data))
        if isinstance(event, protocol.Start):
            conv[subject] = Converter(event.sample_rate, event.channels, event.encoding)
            framers[subject] = Framer()
        elif isinstance(event, protocol.Chunk):
            samples = conv[subject].convert(event.audio)
            if framed:
                framers[subject].push(samples)


def pass_convert(messages: list[tuple[str, bytes]]) -> None:
    _pass_audio(messages, framed=False)


def pass_framer(messages: list[tuple[str, bytes]]) -> None:
    _pass_audio(messages, framed=True)


class Digest:
    """A running hash of every decision a session makes."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.counts: dict[str, int] = {}

    def add(self, sid: str, action: Any) -> None:
        if isinstance(action, Publish):
            m = action.message
            key = f"publish:{protocol.kind(m)}"
            fields = {k: v for k, v in m.fields().items()}
            self.h.update(repr((sid, action.sequence, key, sorted(fields.items()))).encode())
        elif isinstance(action, Transcribe):
            j = action.job
            key = "transcribe:final" if j.is_final else "transcribe:partial"
            self.h.update(repr((sid, key, j.job_id, j.segment_id, j.audio.size,
                                round(j.start_s, 6), round(j.end_s, 6), j.speculative)).encode())
            self.h.update(j.audio.tobytes())
        else:
            key = type(action).__name__.lower()
            self.h.update(repr((sid, key, vars(action))).encode())
        self.counts[key] = self.counts.get(key, 0) + 1


def pass_session(messages: list[tuple[str, bytes]], digest: Digest | None = None) -> None:
    settings = Settings.from_env(environ={})
    profile = settings.session_profile()
    parse, unpack = protocol.parse, protocol.unpack
    sessions: dict[str, Session] = {}
    ticks = _ticks(messages)
    sid_of = settings_subjects(settings).session_id
    for (subject, data), now in zip(messages, ticks, strict=True):
        sid = sid_of(subject)
        event = parse(unpack(data))
        session = sessions.get(sid)
        if session is None:
            session = sessions[sid] = Session(sid, profile, now)
        pending = session.handle(event, now)
        while pending:  # the engine answers every job at once
            action = pending.pop(0)
            if digest is not None:
                digest.add(sid, action)
            if isinstance(action, Transcribe):
                job = action.job
                pending += session.transcribed(job.job_id, Transcription(
                    text=TEXT, language="en", duration_s=job.duration_s), now)
            elif isinstance(action, Close):
                sessions.pop(sid, None)


def settings_subjects(settings: Settings) -> protocol.Subjects:
    return settings.nats.subjects


def pass_worker(messages: list[tuple[str, bytes]]) -> None:

    from .null_engine import InstantEngine

    settings = Settings.from_env(environ={})
    ticks = _ticks(messages)
    clock = [0.0]
    worker = build_worker(settings, InstantEngine(settings), clock=lambda: clock[0])

    async def run() -> None:
        last = -1.0
        handle = worker.handle
        for (subject, data), now in zip(messages, ticks, strict=True):
            if now != last:  # a new 40 ms tick: the jobs and the ticker of the one before run
                last = now
                for _ in range(3):
                    await asyncio.sleep(0)
                worker.tick(now)
                worker.take_outbound()
            clock[0] = now
            worker.stats.messages_in += 1
            handle(subject, data, None)
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(run())


PASSES: list[tuple[str, Callable[[list[tuple[str, bytes]]], None]]] = [
    ("msgpack.unpackb (floor)", pass_floor),
    ("protocol.unpack + parse", pass_parse),
    ("+ Converter.convert", pass_convert),
    ("+ Framer.push", pass_framer),
    ("Session.handle (all)", pass_session),
    ("Worker.handle (all)", pass_worker),
]


def measure(messages: list[tuple[str, bytes]], repeat: int) -> dict[str, Any]:
    """µs of CPU per message for each pass (best of ``repeat``), and the decision digest."""
    n = len(messages)
    out: dict[str, Any] = {"messages": n, "passes": {}}
    for name, fn in PASSES:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.process_time()
            fn(messages)
            best = min(best, time.process_time() - t0)
        out["passes"][name] = 1e6 * best / n
    digest = Digest()
    pass_session(messages, digest)
    out["digest"] = digest.h.hexdigest()[:16]
    out["actions"] = dict(sorted(digest.counts.items()))
    return out


def print_table(columns: list[tuple[str, dict[str, Any]]]) -> None:
    names = [name for name, _ in PASSES]
    head = "| stage (cumulative) | " + " | ".join(f"{c} µs/msg" for c, _ in columns) + " |"
    print(head)
    print("| --- |" + " ---: |" * len(columns))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r['passes'][name]:.1f}" for _, r in columns) + " |")
    print()
    print("per stage (difference to the pass before):")
    prev = None
    for name in names:
        cells = []
        for _, r in columns:
            p = r["passes"]
            base = p[prev] if prev is not None else 0.0
            if name == "Worker.handle (all)":
                base = p["Session.handle (all)"]
            cells.append(f"{p[name] - base:+.1f}")
        print(f"  {name:28s} " + "  ".join(f"{c:>8s}" for c in cells))
        prev = name
    for c, r in columns:
        floor = r["passes"]["msgpack.unpackb (floor)"]
        worker = r["passes"]["Worker.handle (all)"]
        print(f"{c}: {r['messages']} messages, Worker.handle {worker:.1f} µs/msg = "
              f"{worker / floor:.1f}x the bare unpack ({floor:.2f} µs); decisions digest "
              f"{r['digest']}; actions {r['actions']}")


def run_ref(rev: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same passes on the ``stt`` package of ``rev`` (bench from this tree)."""
    tmp = Path(tempfile.mkdtemp(prefix="stt-hotpath-ref-"))
    archive = subprocess.run(["git", "archive", rev, "stt"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    subprocess.run(["cp", "-r", str(ROOT / "bench"), str(tmp / "bench")], check=True)
    out = tmp / "ref.json"
    cmd = [sys.executable, "-m", "bench.hotpath", "--json", str(out), "--quiet",
           "--sessions", str(args.sessions), "--duration-s", str(args.duration_s),
           "--repeat", str(args.repeat), "--corpus", str(args.corpus), "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(tmp)}
    subprocess.run(cmd, cwd=tmp, env=env, check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


# --- the floor through NATS (bench.load --floor) ----------------------------------------------


async def _floor_serve(stats_out: Path) -> None:
    import nats

    settings = Settings.from_env()
    subjects = settings.nats.subjects
    nc = await nats.connect(settings.nats.nats_url)
    count = [0, 0]  # messages, chunks
    unpackb = msgpack.unpackb
    pack = msgpack.packb

    async def on_msg(msg: Any) -> None:
        count[0] += 1
        m = unpackb(msg.data, raw=False, strict_map_key=False)
        if m.get("type") == "end":  # so the generator's pings and sessions finish
            sid = msg.subject.rsplit(".", 1)[-1]
            await nc.publish(subjects.output(sid), pack({"type": "end", "session_id": sid}))
        elif m.get("type") == "chunk":
            count[1] += 1

    from stt.transport.worker import SUBSCRIPTION_LIMITS

    await nc.subscribe(settings.nats.input_subject, queue=settings.nats.queue_group, cb=on_msg,
                       **SUBSCRIPTION_LIMITS)
    await nc.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"ready": True, "pid": os.getpid(), "engine": {"name": "floor"},
                      "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)
    await stop.wait()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    tmp = stats_out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"messages_in": count[0], "chunk_totals": {"chunks_ok": count[1]},
                               "cpu_s": usage.ru_utime + usage.ru_stime,
                               "ru_maxrss_bytes": usage.ru_maxrss * 1024}))
    tmp.replace(stats_out)
    await nc.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["floor-subscriber"]:
        p = argparse.ArgumentParser(prog="python -m bench.hotpath floor-subscriber")
        p.add_argument("--stats-out", type=Path, required=True)
        p.add_argument("--profile", type=Path, default=None)  # accepted, as bench.probe does
        a = p.parse_args(argv[1:])
        asyncio.run(_floor_serve(a.stats_out))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath",
                                     description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=100)
    parser.add_argument("--duration-s", type=float, default=20.0, help="audio per session")
    parser.add_argument("--repeat", type=int, default=2, help="best of this many runs per pass")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--ref", action="append", default=[],
                        help="also measure the stt package of this git revision (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--profile", type=Path, default=None,
                        help="cProfile one Worker.handle pass into this file instead")
    args = parser.parse_args(argv)
    messages = build_messages(args.corpus, args.sessions, args.duration_s, args.seed)
    if args.profile is not None:
        prof = cProfile.Profile()
        prof.enable()
        pass_worker(messages)
        prof.disable()
        prof.dump_stats(str(args.profile))
        return 0
    columns = [(rev, run_ref(rev, args)) for rev in args.ref]
    mine = measure(messages, args.repeat)
    if args.json is not None:
        args.json.write_text(json.dumps(mine))
    if args.quiet:
        return 0
    columns.append(("this tree", mine))
    print(f"{args.sessions} sessions x {args.duration_s:g} s of {CHUNK_MS} ms audio_b64 chunks "
          f"(half 16 kHz, half 22.05 kHz), CPU µs per message, best of {args.repeat}")
    print_table(columns)
    digests = {r["digest"] for _, r in columns}
    if len(columns) > 1:
        print("decisions: " + ("identical" if len(digests) == 1 else "DIFFER"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
