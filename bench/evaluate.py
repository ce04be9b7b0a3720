"""Conversation-quality evaluation: stream scenarios with known ground truth through the worker.

Usage (from the repository root)::

    python -m bench.evaluate                                  # default: 12 clips, all scenarios
    python -m bench.evaluate --limit 3 --speed 2              # quick check (timings not valid)
    python -m bench.evaluate --limit 0 --json eval.json --png eval.png
    python -m bench.evaluate --set chunk_timeout_s=0.8 --set interrupt_min_speech_ms=250
    python -m bench.evaluate --sweep chunk_timeout_s=0.3,0.45,0.6,0.8,1.0

Options: ``--corpus DIR`` (default ``../shared/corpus``; prints "corpus not available" and exits
2 without it), ``--engine`` (default: the worker's, faster-whisper), ``--speed`` (1 = real time; faster runs are for checking the
harness: every timing figure is then distorted), ``--scenarios single,ptt,multi,barge,noise``,
``--limit N`` clips per scenario (0 = all 70), ``--concurrency K`` sessions at once, ``--json``,
``--png`` (needs matplotlib; skipped with a note without it), ``--set NAME=VALUE`` (any worker
setting, by its field name in :class:`stt.config.Settings`), ``--sweep NAME=V1,V2,...`` (runs
the multi scenario once per value, with a fresh worker each, and prints boundary and latency
figures per value: used to choose the default ``STT_CHUNK_TIMEOUT``).

What runs: for each configuration this process starts a real ``nats-server`` on a free loopback
port and an in-process :class:`stt.transport.worker.Worker` (the default engine, real Whisper, unless
``--engine`` or ``--set`` says otherwise), streams every scenario as one live session (start, 40 ms
chunks on an absolute real-time schedule, each sent when its capture interval ends as a
microphone would, then ``end``), ``K`` sessions at a time, and stops everything it started.
Before that, the same clips are decoded offline, whole, by the same engine: the reference
that the streaming finals are scored against. The scenarios are built in
:mod:`bench.scenarios` (single clips, push-to-talk clips ended by ``end`` 0.1 s after the
speech, clips joined with pauses and hesitations, barge-in while
``responding`` with a ``listening`` twin, noise and corpus silence).

Speed: segment boundaries (false cuts, merges) come from the worker's VAD on the audio alone,
so they are the same at any ``--speed``; a boundary sweep over all clips can run at 3x. Every
latency needs ``--speed 1``, and the finals' text (hence WER) can shift with speed and CPU
load too, since which partials get decoded, and so which words are committed, depends on timing.

Time: "stream time" is seconds since the first chunk's capture began, the session's audio
timeline, so "speech onset at 1.54 s" and "interrupt arrived at 1.98 s" are comparable. Audio
at time ``x`` reaches the worker at stream time ``ceil(x / 40 ms) * 40 ms``.

Metrics (table columns are scenario groups; ``all`` pools the speech groups):

* WER vs offline — word error rate of the session's finals (joined) against the offline decode
  of its clips (joined): what streaming costs, with the recognizer's own errors factored out.
  WER vs reference (finals and offline decode, against the human transcripts) is shown for scale.
* time to first partial — arrival of a segment's first partial with words minus the speech
  onset of the utterance that opened the segment.
* final latency — arrival of a final minus the stream time at which the last speech it covers
  was sent. Includes the ``chunk_timeout_s`` of silence the worker waits for by design.
* utterances without words — clips no final with words overlaps (lost speech).
* false cuts — a final boundary inside a clip's speech (hesitation gaps count as inside): the
  final's end, and its end less ``hangover_ms`` (where the last speech was), both fall inside
  one clip's speech span, more than 60 ms from its edges. Cuts at the segment size limit
  (finals at least the limit less 3 s long, where the worker looks for a quiet point) and
  cuts at an inserted hesitation are counted in parentheses (a cut can be both). A cut in a
  pause between clips is never a false cut, however short.
* merges — two clips in one final (informative: a short pause between two sentences should be
  bridged). "missed cuts" are the merges across a pause of at least ``chunk_timeout_s`` + 0.15 s.
* partial churn — of the words published in partials, the fraction at a position whose word
  differs in the segment's next partial (or its final): how much the text on screen jumps.
* stable words withdrawn — words of a partial's ``stable_text`` that do not appear at the same
  position in every later partial of its segment. Must be 0. ("n/a" while the worker sends no
  ``stable_text``; a missing field counts as empty.) Beside it, those only the final changed:
  with ``STT_FINAL_WINDOW=full`` (the default) a final may revise a stable word.
* interrupt latency — interrupt arrival minus the barge-in speech onset; missed interrupts —
  barge-ins (speech >= 0.5 s) with no interrupt at or after the onset; false interrupts — any
  interrupt before the onset (lead-in noise) or during noise/silence sessions.
* words lost at barge-in start — leading words of the ``listening`` twin's finals that the
  ``responding`` session's finals lack (sequence alignment).
* invented text — finals with words on noise-only or silence-only audio.
* word timing vs offline — sessions ask for ``word_timestamps``; in the scenarios that place a
  clip unedited (single, barge-listen), each final word matched (same word, in order) to the
  offline whole-clip decode's word is compared with that word's time, shifted to the session's
  timeline: p50/p95 of |start difference| and the share within 0.1 s. "Words outside speech"
  are final words that end before the utterance's first speech or start after its last by
  more than 0.3 s.

The machine (nproc, CPU, load average before and after) and the exact command are printed with
the results: other processes on a shared machine change the latency figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import difflib
import itertools
import json
import math
import os
import platform
import shlex
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np

from stt.cli.wiring import build_worker
from stt.config import FIELDS, ConfigError, Settings
from stt.config.transcription import TranscriptionSettings
from stt.core.audio import SAMPLE_RATE, to_pcm16
from stt.core.textnorm import normalize, word_errors
from stt.engines import TranscribeOptions, create_engine
from stt.transport.client import Listener, send
from stt.transport.nats_server import NatsServer
from stt.wire.protocol import Subjects

from .common import DEFAULT_CORPUS, CorpusUnavailable
from .scenarios import (
    CorpusClip,
    Scenario,
    Utterance,
    build,
    load_corpus,
    select,
)

GROUPS = ("single", "multi", "barge", "noise", "synth", "ptt")
COLUMNS = ("single", "ptt", "multi", "barge", "barge-listen", "noise", "synth")
BARGE_GROUPS = ("barge", "synth")  # scored for interrupts
SPEECH_COLUMNS = ("single", "ptt", "multi", "barge", "barge-listen")
DEFAULT_LIMIT = 12
DEFAULT_CONCURRENCY = 6
CHUNK_MS = 40
TAIL_S = 1.5                 # silence after the last clip; raised to chunk timeout + 0.6 s
STAGGER_S = 0.35             # the first K sessions start this far apart, not in lockstep
END_TIMEOUT_S = 120.0        # wait for the worker's ``end`` after ours
BOUNDARY_TOL_S = 0.06        # two VAD frames: a boundary this close to a clip edge is not "inside"
MERGE_OVERLAP_S = 0.2        # a final "holds" a clip when they share this much speech time
MISSED_CUT_MARGIN_S = 0.15   # a pause this much over the chunk timeout should have been cut
MIN_INTERRUPT_SPEECH_S = 0.5  # barge-ins at least this long must raise an interrupt
SIZE_CUT_SEARCH_S = 3.0      # a size-limit cut lands up to this far before the limit
                             # (stt.core.session.CUT_SEARCH_S: it looks back for a quiet point)
LAG_WARN_MS = 20.0           # chunk sends later than this (p99) mean real time was not kept


# --- streaming ------------------------------------------------------------------------------


@dataclass
class Played:
    """One scenario streamed as one session: what came back, on the stream-time axis."""

    scenario: Scenario
    session_id: str
    messages: list[dict[str, Any]]
    times: list[float]          # stream time of each message's arrival
    lag_ms: list[float]         # how late each chunk left against its schedule
    ended: bool                 # the worker's ``end`` message arrived


async def play(nc: Any, subjects: Subjects, sc: Scenario, speed: float,
               chunk_ms: int = CHUNK_MS, seed: bool = False, words: bool = True) -> Played:
    """Stream ``sc`` as a live session, sending its ``state_change`` messages on time.

    Not :func:`stt.transport.client.stream_audio`: that sends each chunk when its capture *starts* and has
    no mid-stream state changes; here chunk ``i`` leaves when its 40 ms have been "recorded",
    so stream time and the worker's view of the audio agree. ``seed``: chunks as the seed's
    front-ends send them (``audio_b64`` and ``timestamp``, no ``seq``). ``words``: the ``start``
    asks for word timestamps (the word-timing figures need them; a seed front-end does not ask).
    """
    sid = f"eval{uuid.uuid4().hex[:8]}-{sc.name}"
    audio = sc.audio
    step = SAMPLE_RATE * chunk_ms // 1000
    changes = sorted(sc.state_changes)
    lags: list[float] = []
    async with Listener(nc, subjects, sid) as listener:
        await send(nc, subjects, sid, {"type": "start", "session_id": sid,
                                       "sample_rate": SAMPLE_RATE, "channels": 1,
                                       "state": sc.state, "encoding": "pcm_s16le",
                                       "word_timestamps": words})
        t0 = time.monotonic()
        next_change = 0
        for i, offset in enumerate(range(0, audio.size, step)):
            due = t0 + (min(offset + step, audio.size) / SAMPLE_RATE) / speed
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, time.monotonic() - due) * 1000.0)
            # a change "at t" applies to the audio from t on: send it before that audio
            while next_change < len(changes) and changes[next_change][0] <= offset / SAMPLE_RATE:
                await send(nc, subjects, sid, {"type": "state_change",
                                               "state": changes[next_change][1]})
                next_change += 1
            pcm = to_pcm16(audio[offset: offset + step])
            chunk = ({"audio_b64": base64.b64encode(pcm).decode()} if seed
                     else {"seq": i, "audio": pcm})
            await send(nc, subjects, sid, {"type": "chunk", "timestamp": time.time(), **chunk})
        await send(nc, subjects, sid, {"type": "end"})
        ended = True
        try:
            await listener.wait_end(END_TIMEOUT_S)
        except asyncio.TimeoutError:
            ended = False
        result = listener.result
    times = [(t - t0) * speed for t in result.arrivals]
    return Played(sc, sid, list(result.messages), times, lags, ended)


async def play_all(nc: Any, subjects: Subjects, scenarios: list[Scenario], speed: float,
                   concurrency: int, label: str, seed: bool = False,
                   words: bool = True) -> list[Played]:
    """Every scenario, ``concurrency`` sessions at a time, longest first (tighter packing)."""
    order = sorted(scenarios, key=lambda s: -s.duration_s)
    slots = asyncio.Semaphore(concurrency)
    done = 0

    async def one(i: int, sc: Scenario) -> Played:
        nonlocal done
        async with slots:
            if i < concurrency:
                await asyncio.sleep(i * STAGGER_S)
            played = await play(nc, subjects, sc, speed, seed=seed, words=words)
        done += 1
        print(f"  [{label}] {done}/{len(order)} {sc.name}"
              + ("" if played.ended else " (no end message!)"), file=sys.stderr, flush=True)
        return played

    return list(await asyncio.gather(*(one(i, sc) for i, sc in enumerate(order))))


def make_settings(nats_url: str, engine: str, overrides: dict[str, str]) -> Settings:
    values: dict[str, Any] = {"nats_url": nats_url, "engine": engine, "engine_workers": 2,
                              "log_level": "WARNING"}
    values.update(overrides)
    return Settings.from_env(environ={}, overrides=values)


async def run_config(engine: str, overrides: dict[str, str], scenarios: list[Scenario],
                     speed: float, concurrency: int, label: str,
                     seed: bool = False,
                     words: bool = True) -> tuple[list[Played], Settings, dict[str, Any]]:
    """A fresh nats-server and worker for one configuration; both are stopped afterwards."""
    with NatsServer() as server:
        settings = make_settings(server.url, engine, overrides)
        worker = build_worker(settings)
        # per-message handling time inside the worker: tells a stalled event loop (the
        # worker's own work, in this process) from chunks that merely left late
        worker.stats.sample_chunk_handling = True
        nc = None
        try:
            await worker.start()
            nc = await nats.connect(server.url)
            played = await play_all(nc, worker.subjects, scenarios, speed, concurrency, label,
                                    seed, words)
        finally:
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            await worker.shutdown()
        stats = worker.stats
        handling_ms = [x * 1000.0 for x in stats.chunk_handling_s]
        info = {"engine_jobs": stats.engine_jobs, "engine_seconds": round(stats.engine_seconds, 2),
                "engine_failures": stats.engine_failures, "errors": dict(stats.errors),
                "handling_ms_p99": round(pct(handling_ms, 99) or 0.0, 2),
                "handling_ms_max": round(max(handling_ms, default=0.0), 2),
                "turn_scored": stats.turn_queries["scored"],
                "turn_failed": stats.turn_queries["failed"], "turn_s": stats.turn_seconds}
    return played, settings, info


@dataclass(frozen=True)
class Offline:
    """A clip decoded whole: its text, and its words' times relative to the clip's first speech."""

    text: str
    words: list[tuple[str, float, float]]


async def offline_decode(engine: str, overrides: dict[str, str],
                         clips: list[CorpusClip]) -> dict[str, Offline]:
    """Each clip decoded whole by the same engine: the text streaming should reproduce."""
    settings = make_settings("nats://127.0.0.1:4222", engine, overrides)
    eng = create_engine(settings)
    await eng.start()
    try:
        options = TranscribeOptions(language=settings.transcription.language or None,
                                    word_timestamps=True)
        results = await asyncio.gather(*(eng.transcribe(c.audio, options) for c in clips))
    finally:
        await eng.close()
    return {c.name: Offline(r.text, [(w.word, w.start - c.onset_s, w.end - c.onset_s)
                                     for w in r.words])
            for c, r in zip(clips, results, strict=True)}


# --- scoring --------------------------------------------------------------------------------


def words(text: str | None) -> list[str]:
    return normalize(text or "").split()


WORD_TIME_TOL_S = 0.1       # a word's start within this of the offline decode's counts as on time
OUTSIDE_SPEECH_S = 0.3      # a word this far before the first speech or after the last is placed wrong
UNEDITED = ("single", "barge-listen")  # scenarios that place one clip unedited


def word_time_errors(finals: list[dict[str, Any]], reference: list[tuple[str, float, float]],
                     shift_s: float) -> list[float]:
    """|start difference| of each final word matched in order to the offline word list."""
    got = [(normalize(w.get("word", "")), float(w["start"])) for m in finals
           for w in m.get("words") or [] if normalize(w.get("word", ""))]
    want = [(normalize(w), a + shift_s) for w, a, _ in reference if normalize(w)]
    matcher = difflib.SequenceMatcher(a=[w for w, _ in got], b=[w for w, _ in want],
                                      autojunk=False)
    return [abs(got[blk.a + k][1] - want[blk.b + k][1])
            for blk in matcher.get_matching_blocks() for k in range(blk.size)]


@dataclass
class Score:
    """Tallies for one session; :meth:`add` pools sessions into a column."""

    sessions: int = 0
    utterances: int = 0
    audio_s: float = 0.0
    wer_offline: list[int] = field(default_factory=lambda: [0, 0])   # [errors, ref words]
    wer_reference: list[int] = field(default_factory=lambda: [0, 0])
    offline_reference: list[int] = field(default_factory=lambda: [0, 0])
    ttfp_s: list[float] = field(default_factory=list)
    no_partial: int = 0
    final_latency_s: list[float] = field(default_factory=list)
    finals: int = 0
    no_words: int = 0
    false_cuts: int = 0
    false_cuts_size: int = 0
    false_cuts_hesitation: int = 0
    merges: int = 0
    missed_cuts: int = 0
    long_pauses: int = 0
    partials: int = 0
    partial_words: int = 0
    changed_words: int = 0
    stable_partials: int = 0
    stable_words: int = 0
    withdrawn: int = 0          # by a later partial: never
    stable_revised: int = 0     # by the final only (STT_FINAL_WINDOW=full may)
    expected_interrupts: int = 0
    interrupt_latency_s: list[float] = field(default_factory=list)
    missed_interrupts: int = 0
    false_interrupts: int = 0
    cancelled: int = 0
    lost_words: list[int] = field(default_factory=list)
    word_start_error_s: list[float] = field(default_factory=list)
    timed_words: int = 0
    words_outside_speech: int = 0
    bursts: Counter[str] = field(default_factory=Counter)
    silence_s: float = 0.0
    false_by_kind: Counter[str] = field(default_factory=Counter)
    invented_finals_listening: int = 0
    invented_finals_responding: int = 0
    invented_words: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    no_end: int = 0
    lag_ms: list[float] = field(default_factory=list)

    def add(self, other: Score) -> None:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, Counter):
                mine.update(theirs)
            elif f.name.startswith(("wer_", "offline_")):
                mine[0] += theirs[0]
                mine[1] += theirs[1]
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, f.name, mine + theirs)


def _sent_at(x: float, chunk_s: float) -> float:
    """Stream time at which audio time ``x`` reached the worker (end of its chunk)."""
    return math.ceil(x / chunk_s - 1e-9) * chunk_s


def _inside(t: float, utterances: list[Utterance]) -> Utterance | None:
    for u in utterances:
        if u.onset_s + BOUNDARY_TOL_S < t < u.offset_s - BOUNDARY_TOL_S:
            return u
    return None


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def score_session(p: Played, offline: dict[str, Offline], settings: Settings,
                  chunk_s: float = CHUNK_MS / 1000) -> tuple[Score, dict[str, Any]]:
    sc = p.scenario
    s = Score(sessions=1, utterances=len(sc.utterances), audio_s=sc.duration_s,
              no_end=0 if p.ended else 1, lag_ms=list(p.lag_ms))
    timed = list(zip(p.messages, p.times, strict=True))
    transcripts = [(m, t) for m, t in timed if m.get("type") == "transcript"]
    finals = [(m, t) for m, t in transcripts if m.get("is_final")]
    interrupts = [t for m, t in timed if m.get("type") == "interrupt"]
    s.cancelled = sum(1 for m in p.messages if m.get("type") == "interrupt_cancelled")
    s.errors.update(str(m.get("code")) for m in p.messages if m.get("type") == "error")
    s.finals = len(finals)
    utts = sc.utterances
    hangover = settings.session.hangover_ms / 1000
    size_limit_s = min(settings.session.buffer_size_bytes / (2 * SAMPLE_RATE),
                       settings.limits.max_segment_s)

    # --- per segment: partial churn and stable-text promises ---------------------------------
    by_segment: dict[int, list[dict[str, Any]]] = {}
    for m, _ in transcripts:
        by_segment.setdefault(int(m.get("segment_id") or 0), []).append(m)
    for msgs in by_segment.values():
        texts = [words(m.get("transcript")) for m in msgs]
        for j, m in enumerate(msgs):
            if not m.get("is_partial"):
                continue
            s.partials += 1
            if j + 1 < len(msgs):   # a word is "changed" if the next version differs there
                nxt = texts[j + 1]
                s.partial_words += len(texts[j])
                s.changed_words += sum(1 for i, w in enumerate(texts[j])
                                       if i >= len(nxt) or nxt[i] != w)
            if "stable_text" in m:
                s.stable_partials += 1
            stable = words(m.get("stable_text"))
            s.stable_words += len(stable)
            withdrawn: set[int] = set()
            revised: set[int] = set()
            for k in range(j + 1, len(msgs)):
                later = texts[k]
                (withdrawn if msgs[k].get("is_partial") else revised).update(
                    i for i, w in enumerate(stable) if i >= len(later) or later[i] != w)
            s.withdrawn += len(withdrawn)
            s.stable_revised += len(revised - withdrawn)

    # --- WER ----------------------------------------------------------------------------------
    detail: dict[str, Any] = {"name": sc.name, "group": sc.group, "kind": sc.kind,
                              "session_id": p.session_id, "duration_s": round(sc.duration_s, 2),
                              "finals": [{"t": round(t, 3), "start": m.get("start"),
                                          "end": m.get("end"), "text": m.get("transcript")}
                                         for m, t in finals],
                              "interrupts": [round(t, 3) for t in interrupts]}
    if utts:
        hyp = " ".join(m.get("transcript") or "" for m, _ in finals)
        # synthetic voices have no offline decode: their WER is against the text spoken
        ref_off = " ".join(offline[u.clip].text if u.clip in offline else u.reference
                           for u in utts)
        ref_hum = " ".join(u.reference for u in utts)
        for acc, ref, h in ((s.wer_offline, ref_off, hyp), (s.wer_reference, ref_hum, hyp),
                            (s.offline_reference, ref_hum, ref_off)):
            e, n = word_errors(ref, h)
            acc[0] += e
            acc[1] += n
        detail.update(hypothesis=hyp, offline=ref_off,
                      utterances=[{"clip": u.clip, "onset": round(u.onset_s, 3),
                                   "offset": round(u.offset_s, 3), "gaps": u.gaps}
                                  for u in utts], pauses=sc.pauses_s)

    # --- word timestamps ----------------------------------------------------------------------
    final_msgs = [m for m, _ in finals]
    if utts:
        first, last = utts[0].onset_s, utts[-1].offset_s
        timed_words = [w for m in final_msgs for w in m.get("words") or []]
        s.timed_words += len(timed_words)
        s.words_outside_speech += sum(1 for w in timed_words
                                      if float(w["end"]) < first - OUTSIDE_SPEECH_S
                                      or float(w["start"]) > last + OUTSIDE_SPEECH_S)
    if sc.group in UNEDITED and len(utts) == 1:
        s.word_start_error_s += word_time_errors(final_msgs, offline[utts[0].clip].words,
                                                 utts[0].onset_s)

    # --- boundaries: false cuts, merges, final latency ----------------------------------------
    intervals = [iv for u in utts for iv in u.speech_intervals()]
    cuts = []
    for m, t in finals:
        start, end = m.get("start"), m.get("end")
        if start is None or end is None or not utts:
            continue
        at_end = _inside(end, utts)
        false_cut = False
        if at_end is not None and at_end is _inside(max(start, end - hangover), utts):
            false_cut = True
            s.false_cuts += 1
            s.false_cuts_size += end - start >= size_limit_s - SIZE_CUT_SEARCH_S - 0.1
            # at an inserted hesitation: the end (last speech + hangover, or a size cut's quiet
            # point) lies in the gap; the hangover runs from the last word before the gap, so
            # with gaps of 0.25 s or more it ends within 0.1 s of the gap's end
            s.false_cuts_hesitation += any(a - 0.1 <= end <= b + 0.1 for a, b in at_end.gaps)
            cuts.append(round(end, 3))
        held = [u for u in utts if _overlap(start, end, u.onset_s, u.offset_s) > MERGE_OVERLAP_S]
        if len(held) > 1:
            s.merges += len(held) - 1
            for a, b in itertools.pairwise(held):
                if b.onset_s - a.offset_s >= settings.session.chunk_timeout_s + MISSED_CUT_MARGIN_S:
                    s.missed_cuts += 1
        covered = [iv for iv in intervals if iv[0] < end and iv[1] > start]
        if false_cut or not covered:
            continue
        last = max(iv[1] for iv in covered)
        if last <= end + BOUNDARY_TOL_S:   # the final's segment closed after its last speech
            s.final_latency_s.append(t - _sent_at(last, chunk_s))
    detail["false_cuts"] = cuts
    s.long_pauses = sum(1 for x in sc.pauses_s
                        if x >= settings.session.chunk_timeout_s + MISSED_CUT_MARGIN_S)
    for u in utts:
        if not any(words(m.get("transcript"))
                   and _overlap(m.get("start", 0.0), m.get("end", 0.0), u.onset_s, u.offset_s) > 0
                   for m, _ in finals):
            s.no_words += 1

    # --- time to first partial: per utterance that opens a segment ------------------------------
    spans = {seg: (min(m.get("start", 0.0) for m in msgs), max(m.get("end", 0.0) for m in msgs))
             for seg, msgs in by_segment.items()}
    first_partial: dict[int, float] = {}
    for m, t in transcripts:
        seg = int(m.get("segment_id") or 0)
        if m.get("is_partial") and words(m.get("transcript")) and seg not in first_partial:
            first_partial[seg] = t
    for k, u in enumerate(utts):
        opening = [seg for seg, (a, b) in spans.items() if a <= u.onset_s + 0.1 < b]
        if not opening:
            continue
        a, b = spans[opening[0]]
        if k and _overlap(a, b, utts[k - 1].onset_s, utts[k - 1].offset_s) > MERGE_OVERLAP_S:
            continue  # the utterance continues a segment opened by the previous one
        if opening[0] in first_partial:
            s.ttfp_s.append(first_partial[opening[0]] - u.onset_s)
        else:
            s.no_partial += 1

    # --- interrupts -------------------------------------------------------------------------
    if sc.group in BARGE_GROUPS:
        barge_in = utts[0]
        s.false_interrupts += sum(1 for t in interrupts if t < barge_in.onset_s)
        hit = [t for t in interrupts if t >= barge_in.onset_s]
        if barge_in.offset_s - barge_in.onset_s >= MIN_INTERRUPT_SPEECH_S:
            s.expected_interrupts += 1
            if hit:
                s.interrupt_latency_s.append(hit[0] - barge_in.onset_s)
            else:
                s.missed_interrupts += 1
    if sc.group == "noise":
        responding = sc.state == "responding"
        for burst in sc.bursts:
            if burst.kind == "corpus-silence":
                s.silence_s += burst.end_s - burst.start_s
            elif responding:
                s.bursts[burst.kind] += 1
        if responding:
            s.false_interrupts += len(interrupts)
            for t in interrupts:   # blame the latest burst that began before the interrupt
                began = [burst for burst in sc.bursts if burst.start_s <= t]
                s.false_by_kind[began[-1].kind if began else "lead-in"] += 1
        for m, _ in finals:
            n = len(words(m.get("transcript")))
            if n:
                s.invented_words += n
                if responding:
                    s.invented_finals_responding += 1
                else:
                    s.invented_finals_listening += 1
    return s, detail


def lost_at_start(twin_text: str, barge_text: str) -> int | None:
    """Leading words of the twin's text that the barge-in text does not have (None: no words)."""
    a, b = words(twin_text), words(barge_text)
    if not a:
        return None
    blocks = [blk for blk in difflib.SequenceMatcher(a=a, b=b, autojunk=False)
              .get_matching_blocks() if blk.size]
    return blocks[0].a if blocks else len(a)


def score_all(played: list[Played], offline: dict[str, Offline],
              settings: Settings) -> tuple[dict[str, Score], list[dict[str, Any]]]:
    columns = {c: Score() for c in (*COLUMNS, "all")}
    details = []
    text = {p.scenario.name: " ".join(m.get("transcript") or "" for m in p.messages
                                      if m.get("type") == "transcript" and m.get("is_final"))
            for p in played}
    for p in played:
        score, detail = score_session(p, offline, settings)
        twin = p.scenario.twin
        if twin is not None and twin in text:
            lost = lost_at_start(text[twin], text[p.scenario.name])
            if lost is not None:
                score.lost_words.append(lost)
                detail["lost_words"] = lost
        columns[p.scenario.group].add(score)
        if p.scenario.group in SPEECH_COLUMNS:
            columns["all"].add(score)
        details.append(detail)
    return columns, details


# --- reporting ------------------------------------------------------------------------------


def pct(v: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(v, dtype=float), q)) if len(v) else None


def fmt_dist(v: Sequence[float]) -> str:
    if not v:
        return "-"
    return f"{pct(v, 50):.2f} / {pct(v, 95):.2f} s (n={len(v)})"


def fmt_ratio(errors: int, total: int) -> str:
    return f"{errors / total:.3f} ({errors}/{total})" if total else "-"


def summary(s: Score, column: str) -> dict[str, Any]:
    """The figures of one column, as JSON values (None where not applicable)."""
    speech = column in (*SPEECH_COLUMNS, "all")
    barge = column in (*BARGE_GROUPS, "all")
    noise = column == "noise"
    out: dict[str, Any] = {
        "sessions": s.sessions, "utterances": s.utterances, "audio_s": round(s.audio_s, 1),
        "finals": s.finals,
        "errors": dict(s.errors), "sessions_without_end": s.no_end,
        "partials": s.partials,
        "partial_churn": (s.changed_words / s.partial_words) if s.partial_words else None,
        "partial_words": s.partial_words, "changed_words": s.changed_words,
        "stable_text_present": s.stable_partials, "stable_words": s.stable_words,
        "stable_words_withdrawn": s.withdrawn if s.stable_partials else None,
        "stable_words_revised_by_final": s.stable_revised if s.stable_partials else None,
        "chunk_lag_ms_p99": pct(s.lag_ms, 99), "chunk_lag_ms_max": max(s.lag_ms, default=None),
        "interrupt_cancelled": s.cancelled,
    }
    if speech:
        out.update({
            "wer_vs_offline": s.wer_offline[0] / s.wer_offline[1] if s.wer_offline[1] else None,
            "wer_vs_offline_counts": s.wer_offline,
            "wer_vs_reference": (s.wer_reference[0] / s.wer_reference[1]
                                 if s.wer_reference[1] else None),
            "offline_wer_vs_reference": (s.offline_reference[0] / s.offline_reference[1]
                                         if s.offline_reference[1] else None),
            "ttfp_s": s.ttfp_s, "ttfp_p50": pct(s.ttfp_s, 50), "ttfp_p95": pct(s.ttfp_s, 95),
            "segments_without_partial": s.no_partial,
            "final_latency_s": s.final_latency_s, "final_latency_p50": pct(s.final_latency_s, 50),
            "final_latency_p95": pct(s.final_latency_s, 95),
            "utterances_without_words": s.no_words,
            "false_cuts": s.false_cuts, "false_cuts_at_size_limit": s.false_cuts_size,
            "false_cuts_at_hesitation": s.false_cuts_hesitation,
            "merges": s.merges, "missed_cuts": s.missed_cuts, "long_pauses": s.long_pauses,
            "timed_words": s.timed_words, "words_outside_speech": s.words_outside_speech,
            "word_start_error_p50_s": pct(s.word_start_error_s, 50),
            "word_start_error_p95_s": pct(s.word_start_error_s, 95),
            "word_start_within_tol": (sum(1 for x in s.word_start_error_s if x <= WORD_TIME_TOL_S)
                                      / len(s.word_start_error_s) if s.word_start_error_s
                                      else None),
        })
    if barge:
        out.update({
            "expected_interrupts": s.expected_interrupts,
            "interrupt_latency_s": s.interrupt_latency_s,
            "interrupt_latency_p50": pct(s.interrupt_latency_s, 50),
            "interrupt_latency_p95": pct(s.interrupt_latency_s, 95),
            "missed_interrupts": s.missed_interrupts,
            "lost_words": s.lost_words, "lost_words_total": sum(s.lost_words),
            "sessions_losing_words": sum(1 for x in s.lost_words if x),
        })
    if barge or noise:
        out["false_interrupts"] = s.false_interrupts
    if noise:
        out.update({
            "bursts": dict(s.bursts), "corpus_silence_s": round(s.silence_s, 1),
            "false_interrupts_by_kind": dict(s.false_by_kind),
            "invented_finals_listening": s.invented_finals_listening,
            "invented_finals_responding": s.invented_finals_responding,
            "invented_words": s.invented_words,
        })
    return out


def table(columns: dict[str, Score], present: list[str]) -> str:
    """Metrics down, scenario groups across; '-' where a metric does not apply."""
    cols = [c for c in (*COLUMNS, "all") if c in present]
    sums = {c: summary(columns[c], c) for c in cols}

    def row(label: str, fn: Any) -> list[str]:
        cells = []
        for c in cols:
            try:
                v = fn(columns[c], sums[c], c)
            except KeyError:
                v = None
            cells.append("-" if v is None else str(v))
        return [label, *cells]

    def dist(key: str) -> Any:
        return lambda s, d, c: fmt_dist(d[key]) if key in d else None

    def when(cond: Iterable[str], fn: Any) -> Any:
        allowed = set(cond)
        return lambda s, d, c: fn(s, d, c) if c in allowed else None

    speech = (*SPEECH_COLUMNS, "all")
    rows = [
        row("sessions / utterances / audio s",
            lambda s, d, c: f"{s.sessions} / {s.utterances} / {s.audio_s:.0f}"),
        row("WER finals vs offline decode",
            when(speech, lambda s, d, c: fmt_ratio(*s.wer_offline))),
        row("WER finals vs reference",
            when(speech, lambda s, d, c: fmt_ratio(*s.wer_reference))),
        row("  (offline decode vs reference)",
            when(speech, lambda s, d, c: fmt_ratio(*s.offline_reference))),
        row("time to first partial p50/p95", when(speech, dist("ttfp_s"))),
        row("  segments finalized without a partial", when(speech, lambda s, d, c: s.no_partial)),
        row("final latency after speech p50/p95", when(speech, dist("final_latency_s"))),
        row("utterances without words in finals", when(speech, lambda s, d, c: s.no_words)),
        row("false cuts inside utterances (size limit, hesitation)",
            when(speech, lambda s, d, c: (f"{s.false_cuts} ({s.false_cuts_size}, "
                                          f"{s.false_cuts_hesitation})"))),
        row("merges: clips in one final (missed cuts/long pauses)",
            when(speech, lambda s, d, c: f"{s.merges} ({s.missed_cuts}/{s.long_pauses})")),
        row("word start vs offline decode p50/p95 (within 0.1 s)",
            when((*UNEDITED, "all"), lambda s, d, c: (
                f"{pct(s.word_start_error_s, 50):.3f} / {pct(s.word_start_error_s, 95):.3f} s "
                f"({d['word_start_within_tol']:.0%} of {len(s.word_start_error_s)})"
                if s.word_start_error_s else None))),
        row("final words outside the speech (> 0.3 s)",
            when(speech, lambda s, d, c: f"{s.words_outside_speech} of {s.timed_words}")),
        row("partials published", lambda s, d, c: s.partials),
        row("partial churn (words changed later)",
            lambda s, d, c: (fmt_ratio(s.changed_words, s.partial_words)
                             if s.partial_words else None)),
        row("stable words withdrawn by a later partial (must be 0)",
            lambda s, d, c: (f"{s.withdrawn} of {s.stable_words}" if s.stable_partials
                             else ("n/a (no stable_text)" if s.partials else None))),
        row("  stable words the final revised (full window may)",
            lambda s, d, c: (f"{s.stable_revised} of {s.stable_words}" if s.stable_partials
                             else None)),
        row("interrupt latency p50/p95",
            when(("barge", "synth", "all"), dist("interrupt_latency_s"))),
        row("missed interrupts",
            when(("barge", "synth", "all"),
                 lambda s, d, c: f"{s.missed_interrupts} of {s.expected_interrupts}")),
        row("false interrupts",
            when(("barge", "synth", "noise", "all"),
                 lambda s, d, c: (f"{s.false_interrupts} in {sum(s.bursts.values())} bursts"
                                  f" + {s.silence_s:.0f} s silence" if c == "noise"
                                  else f"{s.false_interrupts} (lead-in)"))),
        row("interrupt_cancelled messages", lambda s, d, c: s.cancelled),
        row("words lost at barge-in start",
            when(("barge", "all"),
                 lambda s, d, c: (f"{sum(s.lost_words)} in {sum(1 for x in s.lost_words if x)}"
                                  f" of {len(s.lost_words)} sessions"))),
        row("invented text on noise: finals listening/responding (words)",
            when(("noise",), lambda s, d, c: (f"{s.invented_finals_listening}/"
                                              f"{s.invented_finals_responding}"
                                              f" ({s.invented_words})"))),
        row("error messages", lambda s, d, c: (", ".join(f"{k}:{v}" for k, v in s.errors.items())
                                               or "0")),
        row("sessions without end message", lambda s, d, c: s.no_end),
        row("chunk send lag p99 / max ms",
            lambda s, d, c: (f"{pct(s.lag_ms, 99):.1f} / {max(s.lag_ms):.1f}"
                             if s.lag_ms else None)),
    ]
    return render([["metric", *cols], *rows])


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(r, widths, strict=True))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def plot(path: Path, series: dict[str, dict[str, list[float]]], title: str,
         bars: dict[str, dict[str, dict[str, float]]] | None = None) -> str:
    """Box plots of latency distributions, one panel per metric, then optional grouped bar
    charts (``bars``: panel -> series -> {x label: value}, e.g. false cuts and merges per sweep
    value). Returns a note for the log.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"PNG skipped: matplotlib is not installed (pip install matplotlib) — {path}"
    panels = [(name, data) for name, data in series.items() if any(data.values())]
    bar_panels = list((bars or {}).items())
    if not panels and not bar_panels:
        return "PNG skipped: no latency samples"
    count = len(panels) + len(bar_panels)
    fig, axes = plt.subplots(1, count, figsize=(max(8.0, 5.0 * count), 4.6), squeeze=False)
    for ax, (name, groups) in zip(axes[0][len(panels):], bar_panels, strict=True):
        width = 0.8 / max(1, len(groups))
        for k, (label, counts) in enumerate(groups.items()):
            ax.bar(np.arange(len(counts)) + k * width, list(counts.values()), width, label=label)
            ax.set_xticks(np.arange(len(counts)) + 0.4 - width / 2, list(counts))
        ax.set_title(name)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    for ax, (name, data) in zip(axes[0], panels, strict=False):
        labels = [k for k, v in data.items() if v]
        values = [data[k] for k in labels]
        ax.boxplot(values, whis=(5, 95), showfliers=False)
        rng = np.random.default_rng(0)
        for i, v in enumerate(values, 1):   # every sample, jittered, over the box
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=8, alpha=0.5)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20)
        ax.set_title(name)
        ax.set_ylabel("seconds")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(textwrap.fill(title, 140), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"PNG written: {path}"


# --- command line ---------------------------------------------------------------------------


def parse_assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if name not in FIELDS:
        raise argparse.ArgumentTypeError(
            f"unknown setting {name!r} (a field of stt.config.Settings)")
    return name, value.strip()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.evaluate",
        description="Conversation-quality evaluation of the streaming worker (see the module "
                    "docstring for the metrics).")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--engine", default=TranscriptionSettings.engine)
    p.add_argument("--speed", type=float, default=1.0,
                   help="1 = real time; faster distorts every timing figure")
    p.add_argument("--scenarios", default=",".join(GROUPS))
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="clips per scenario; 0 = all")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    p.add_argument("--seed-chunks", action="store_true",
                   help="chunks as the seed's front-ends send them (audio_b64 and timestamp, no "
                        "seq) instead of raw audio with seq")
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--set", dest="sets", action="append", type=parse_assignment, default=[],
                   metavar="NAME=VALUE")
    p.add_argument("--sweep", type=parse_assignment, metavar="NAME=V1,V2,...")
    return p


async def run(args: argparse.Namespace) -> int:
    groups = [g.strip() for g in args.scenarios.split(",") if g.strip()]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        print(f"unknown scenarios: {', '.join(sorted(unknown))} (choose from {', '.join(GROUPS)})",
              file=sys.stderr)
        return 2
    base = dict(args.sets)
    sweep: list[str] = []
    if args.sweep:
        sweep = [v.strip() for v in args.sweep[1].split(",") if v.strip()]
        if groups != ["multi"] and args.scenarios != ",".join(GROUPS):
            print(f"note: --sweep runs the multi scenario, not {args.scenarios}; for other "
                  "scenarios run once per value with --set", file=sys.stderr)
        groups = ["multi"]   # the sweep is about segment boundaries
    configs = ([{**base, args.sweep[0]: v} for v in sweep] if sweep else [base])
    try:  # fail on a bad value now, not after the offline decode
        settings_list = [make_settings("nats://127.0.0.1:4222", args.engine, c) for c in configs]
    except (ConfigError, ValueError) as exc:
        print(f"bad setting: {exc}", file=sys.stderr)
        return 2
    if args.speed <= 0:
        print("--speed must be > 0", file=sys.stderr)
        return 2

    try:
        all_clips = load_corpus(args.corpus, settings_list[0].session.vad_aggressiveness)
    except CorpusUnavailable as exc:
        print(str(exc))
        return 2
    clips = select(all_clips, args.limit)
    tail = max(TAIL_S, max(s.session.chunk_timeout_s for s in settings_list) + 0.6)
    scenarios = build(clips, all_clips, groups, tail)

    info = machine()
    command = "python -m bench.evaluate " + shlex.join(sys.argv[1:])
    print(f"machine: nproc={info['nproc']} ({info['cpu_model']}), python {info['python']}, "
          f"load average {info['loadavg']} at start")
    print(f"command: {command}")
    print(f"corpus: {args.corpus} — {len(clips)} of {len(all_clips)} clips; "
          f"{len(scenarios)} sessions, {sum(s.duration_s for s in scenarios):.0f} s of audio per "
          f"configuration; speed {args.speed}x, concurrency {args.concurrency}")
    if args.speed != 1.0:
        print("note: speed != 1: latency figures are not real-time figures")

    t = time.monotonic()
    speech_clips = clips if any(g in groups for g in ("single", "ptt", "multi", "barge")) else []
    offline = await offline_decode(args.engine, base, speech_clips) if speech_clips else {}
    print(f"offline decode of {len(speech_clips)} clips: {time.monotonic() - t:.1f} s", flush=True)

    results: list[dict[str, Any]] = []
    for overrides in configs:
        label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        print(f"\n== {label}", flush=True)
        played, settings, worker_info = await run_config(args.engine, overrides, scenarios,
                                                         args.speed, args.concurrency, label,
                                                         args.seed_chunks)
        columns, details = score_all(played, offline, settings)
        present = [g for g in COLUMNS if columns[g].sessions]
        if len([c for c in present if c in SPEECH_COLUMNS]) > 1:
            present.append("all")
        flat = settings.redacted()
        key = {k: flat[k] for k in (
            "engine", "engine_workers", "chunk_timeout_s", "partial_interval_s",
            "vad_aggressiveness", "vad_start_ms", "preroll_ms", "hangover_ms",
            "interrupt_min_speech_ms", "buffer_size_bytes")}
        print("settings: " + ", ".join(f"{k}={v}" for k, v in key.items()))
        if not sweep:
            print(table(columns, present))
        print(f"engine: {worker_info['engine_jobs']} jobs, {worker_info['engine_seconds']} s "
              f"in engine calls (queueing included), {worker_info['engine_failures']} failures;"
              f" worker message handling p99 {worker_info['handling_ms_p99']} ms, "
              f"max {worker_info['handling_ms_max']} ms")
        lag = [x for p in played for x in p.lag_ms]
        if lag and (pct(lag, 99) or 0) > LAG_WARN_MS:
            print(f"warning: the client fell behind real time (CPU contention?): chunks left up "
                  f"to {max(lag):.0f} ms late, p99 {pct(lag, 99):.0f} ms")
        results.append({"overrides": overrides, "settings": key, "worker": worker_info,
                         "columns": {c: summary(columns[c], c) for c in present},
                         "sessions": details})

    if sweep:
        assert args.sweep is not None
        name = args.sweep[0]
        rows = [[name, "false cuts (size, hesit.)", "merges", "missed cuts/long pauses",
                 "final latency p50", "p95", "WER vs offline", "utt. w/o words"]]
        for r in results:
            m = r["columns"]["multi"]
            p50, p95 = m["final_latency_p50"], m["final_latency_p95"]
            rows.append([str(r["overrides"][name]),
                         f"{m['false_cuts']} ({m['false_cuts_at_size_limit']}, "
                         f"{m['false_cuts_at_hesitation']})",
                         str(m["merges"]), f"{m['missed_cuts']}/{m['long_pauses']}",
                         "-" if p50 is None else f"{p50:.2f} s",
                         "-" if p95 is None else f"{p95:.2f} s",
                         "-" if m["wer_vs_offline"] is None else f"{m['wer_vs_offline']:.3f}",
                         str(m["utterances_without_words"])])
        print(f"\nsweep of {name} over the multi scenario "
              f"({results[0]['columns']['multi']['utterances']} clips, "
              f"{results[0]['columns']['multi']['sessions']} sessions):")
        print(render(rows))

    info_end = machine()
    print(f"\nload average at end: {info_end['loadavg']} (other processes share this machine)")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "machine": info,
                                         "loadavg_end": info_end["loadavg"],
                                         "speed": args.speed, "concurrency": args.concurrency,
                                         "chunk_ms": CHUNK_MS, "corpus": str(args.corpus),
                                         "clips": [c.name for c in clips],
                                         "offline": {k: dataclasses.asdict(v)
                                                     for k, v in offline.items()},
                                         "configs": results}, indent=1, default=str))
        print(f"JSON written: {args.json}")
    if args.png:
        if sweep:
            assert args.sweep is not None
            name = args.sweep[0]
            series = {"final latency after speech (multi)": {
                str(r["overrides"][name]): r["columns"]["multi"]["final_latency_s"]
                for r in results}}
            bars = {f"boundaries by {name} (multi)": {
                what: {str(r["overrides"][name]): r["columns"]["multi"][key] for r in results}
                for what, key in (("false cuts", "false_cuts"), ("merges", "merges"))}}
        else:
            bars = None
            cols = results[0]["columns"]
            series = {metric: {c: cols[c].get(key, []) for c in cols if c != "all"}
                      for metric, key in (("time to first partial", "ttfp_s"),
                                          ("final latency after speech", "final_latency_s"),
                                          ("interrupt latency", "interrupt_latency_s"))}
        print(plot(args.png, series, f"{command} — {info['cpu_model']}, nproc={info['nproc']}",
                   bars))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
