"""Turn-taking through the worker, live: hesitations, finished sentences and push-to-talk at real
time, model endpointing and fixed silence side by side in one run.

    python -m bench.turn_live                          # 12 held-out clips, 1 and 2 sessions
    python -m bench.turn_live --limit 0 --sessions 1 2 4
    python -m bench.turn_live --configs model          # one configuration only

The clips are the corpus clips :mod:`bench.turn` did *not* fit its knobs on (the odd ones in
name order), so the figures are held out. Each clip becomes three sessions, streamed in 40 ms
chunks as the seed's front-ends send them (``audio_b64``, ``timestamp``, no ``seq``; a
``start`` without word timestamps) on a real-time schedule (:func:`bench.evaluate.play`),
with 2.5 s of room tone after the speech and then ``end``:

* **finished**: the sentence as recorded;
* **hesitation after a function word** and **after another word**: the sentence cut near its
  middle (:func:`bench.turn.cut_points`), a pause of room tone (0.6, 0.9 or 1.2 s in turn; and
  0.3 / 1.5 s with ``--all-pauses``) inserted, then the rest;

and, with ``--ptt``, once more as **push-to-talk**: the audio stops 0.1 s after the speech and
``end`` is sent at once.

Printed per configuration and session count: end of speech → final p50/p95 (finished sentences,
all, and each hesitation kind; the last final of a
session against its last speech, stream time; push-to-talk: against the ``end`` message too);
hesitations that ended the turn (a final whose audio ends inside the pause), per kind and pause
length; eager end-of-turn events and how many were followed by ``turn_resumed``; the WER of each
session's joined finals against the session's own audio decoded at once (its pause included;
offline, the same engine); the
model's time per query; and the most sessions whose final p95 stays within ``--goal-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stt.config import Settings
from stt.core.audio import SAMPLE_RATE
from stt.core.textnorm import wer
from stt.engines import TranscribeOptions, create_engine

from .common import DEFAULT_CORPUS, header, percentile
from .evaluate import Played, run_config
from .scenarios import CorpusClip, Scenario, Utterance, load_corpus, room_tone, select
from .turn import cut_points

CONFIGS = {"model": {}, "silence": {"endpointing": "silence"}}
PAUSES_S = (0.6, 0.9, 1.2)
ALL_PAUSES_S = (0.3, 0.6, 0.9, 1.2, 1.5)
LEAD_S = 0.5
TAIL_S = 2.5
PTT_RELEASE_S = 0.1


@dataclass
class Result:
    latency: list[float] = field(default_factory=list)          # finished + hesitation sessions
    latency_finished: list[float] = field(default_factory=list)
    latency_by_kind: dict[str, list[float]] = field(default_factory=dict)  # the hesitation kinds
    after_end: list[float] = field(default_factory=list)        # push-to-talk
    ended: dict[tuple[str, float], list[bool]] = field(default_factory=dict)
    eager: int = 0
    resumed: int = 0
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # group: (offline, finals)
    info: dict[str, Any] = field(default_factory=dict)
    sessions: list[str] = field(default_factory=list)  # one line each, for --verbose


async def all_cut_points(clips: list[CorpusClip]) -> dict[str, dict[str, float]]:
    engine = create_engine(Settings())
    await engine.start()
    out = {clip.name: await cut_points(engine, clip) for clip in clips}
    await engine.close()
    return out


def build(clips: list[CorpusClip], cuts: dict[str, dict[str, float]],
          pauses: tuple[float, ...], ptt: bool, seed: int) -> list[Scenario]:
    rng = np.random.default_rng(seed)
    out: list[Scenario] = []
    k = 0
    for clip in clips:
        short = Path(clip.name).stem  # no dots: the session id is a subject token
        a = max(0, int((clip.onset_s - 0.2) * SAMPLE_RATE))
        b = min(clip.audio.size, int((clip.offset_s + 0.15) * SAMPLE_RATE))
        lead = room_tone(LEAD_S, rng)
        onset = LEAD_S + clip.onset_s - a / SAMPLE_RATE
        offset = LEAD_S + clip.offset_s - a / SAMPLE_RATE
        audio = np.concatenate([lead, clip.audio[a:b], room_tone(TAIL_S, rng)])
        out.append(Scenario(f"fin-{short}", "finished", "finished", audio,
                            utterances=[Utterance(clip.name, clip.reference, onset, offset)]))
        for kind, cut in cuts[clip.name].items():
            pause = pauses[k % len(pauses)]
            k += 1
            c = int(cut * SAMPLE_RATE)
            audio = np.concatenate([lead, clip.audio[a:c], room_tone(pause, rng),
                                    clip.audio[c:b], room_tone(TAIL_S, rng)])
            gap_at = LEAD_S + (c - a) / SAMPLE_RATE
            utt = Utterance(clip.name, clip.reference, onset, offset + pause,
                            gaps=[(gap_at, gap_at + pause)])
            out.append(Scenario(f"{kind}-{int(pause * 1000)}ms-{short}", kind,
                                str(pause), audio, utterances=[utt]))
        if ptt:
            cut = min(clip.audio.size, int((clip.offset_s + PTT_RELEASE_S) * SAMPLE_RATE))
            audio = np.concatenate([lead, clip.audio[a:cut]])
            out.append(Scenario(f"ptt-{short}", "ptt", "ptt", audio,
                                utterances=[Utterance(clip.name, clip.reference, onset, offset)]))
    return out


async def whole_decodes(scenarios: list[Scenario]) -> dict[str, str]:
    """Each session's audio decoded at once (its pause included), by the same engine: what
    the joined finals are scored against."""
    engine = create_engine(Settings())
    await engine.start()
    options = TranscribeOptions(language="en")
    out = {sc.name: (await engine.transcribe(sc.audio, options)).text for sc in scenarios}
    await engine.close()
    return out


def score(played: list[Played], offline: dict[str, str], result: Result) -> None:
    for p in played:
        sc = p.scenario
        utt = sc.utterances[0]
        finals = [(m, t) for m, t in zip(p.messages, p.times, strict=True)
                  if m.get("type") == "transcript" and m.get("is_final")]
        kinds = [m.get("type") for m in p.messages]
        result.eager += kinds.count("eager_end_of_turn")
        result.resumed += kinds.count("turn_resumed")
        text = " ".join(m.get("transcript", "") for m, _ in finals)
        result.pairs.setdefault(sc.group, []).append((offline[sc.name], text))
        if not finals:
            result.sessions.append(f"    {sc.name}: no final")
            continue
        last, last_at = finals[-1]
        after = last_at - (sc.duration_s if sc.group == "ptt" else utt.offset_s)
        result.sessions.append(
            f"    {sc.name}: {after:.2f} s, P {last.get('turn_probability')}, "
            f"{len(finals)} final(s), ...{last.get('transcript', '')[-40:]!r}")
        if sc.group == "ptt":
            result.after_end.append(after)
            continue
        result.latency.append(after)
        if sc.group == "finished":
            result.latency_finished.append(after)
            continue
        result.latency_by_kind.setdefault(sc.group, []).append(after)
        gap_start, gap_end = utt.gaps[0]
        split = any(gap_start - 0.1 <= m.get("end", 0.0) <= gap_end + 0.05 for m, _ in finals)
        result.ended.setdefault((sc.group, float(sc.kind)), []).append(split)


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{percentile(values, 50):.2f} / {percentile(values, 95):.2f} s"


def report(label: str, sessions: int, r: Result, verbose: bool = False) -> list[str]:
    rows = [f"{label}, {sessions} session{'s' if sessions > 1 else ''} at once:",
            f"  end of speech -> final p50 / p95: finished {fmt(r.latency_finished)}; all "
            f"sentences {fmt(r.latency)}"
            + "".join(f"; {kind} {fmt(v)}" for kind, v in sorted(r.latency_by_kind.items()))]
    if r.after_end:
        rows.append(f"  push-to-talk: final after the end message p50 / p95 {fmt(r.after_end)}")
    for kind in ("cut-function", "cut-other"):
        cells = [f"{pause} s: {sum(v)} of {len(v)}"
                 for (k, pause), v in sorted(r.ended.items()) if k == kind]
        if cells:
            rows.append(f"  hesitations that ended the turn, {kind}: " + ", ".join(cells))
    rows.append(f"  eager end-of-turn events: {r.eager}, followed by turn_resumed: {r.resumed}")
    every = [pair for pairs in r.pairs.values() for pair in pairs]
    rows.append(f"  WER of the finals against the whole-clip decode: {wer(every):.3f} ("
                + ", ".join(f"{g} {wer(p):.3f}" for g, p in sorted(r.pairs.items())) + ")")
    if verbose:
        rows += ["  each session: its last final after the end of speech (push-to-talk: after "
                 "the end message), the model's last probability, its words", *r.sessions]
    info = r.info
    if info.get("turn_scored"):
        rows.append(f"  model: {info['turn_scored']} queries, {1000 * info['turn_s'] / info['turn_scored']:.0f} ms each "
                    f"(mean), {info.get('turn_failed', 0)} refused")
    return rows


async def run(args: argparse.Namespace) -> int:
    clips = load_corpus(args.corpus)
    names = sorted(c.name for c in clips)
    held = set(names[1::2])
    chosen = select([c for c in clips if c.name in held], args.limit)
    cuts = await all_cut_points(chosen)
    scenarios = build(chosen, cuts, ALL_PAUSES_S if args.all_pauses else PAUSES_S,
                      args.ptt, args.seed)
    offline = await whole_decodes(scenarios)
    print(f"{len(chosen)} held-out clips, {len(scenarios)} sessions per run")
    capacity: dict[str, int] = {}
    for n in args.sessions:
        for label in args.configs:
            played, _settings, info = await run_config(
                "faster-whisper", {**CONFIGS[label], **dict(args.sets)}, scenarios, 1.0, n,
                f"{label} x{n}", seed=True, words=False)
            result = Result(info=info)
            score(played, offline, result)
            for row in report(label, n, result, args.verbose):
                print(row, flush=True)
            p95 = percentile(result.latency, 95)
            if p95 is not None and p95 <= args.goal_s:
                capacity[label] = max(capacity.get(label, 0), n)
    for label in args.configs:
        print(f"most sessions with final p95 within {args.goal_s} s of the end of speech, "
              f"{label}: {capacity.get(label, 0)} (of {', '.join(map(str, args.sessions))} tried)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.turn_live",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--limit", type=int, default=12, help="held-out clips (0 = all 35)")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--ptt", action="store_true", help="push-to-talk sessions too")
    ap.add_argument("--all-pauses", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="one line per session")
    ap.add_argument("--goal-s", type=float, default=0.8, help="final p95 goal for capacity")
    ap.add_argument("--set", dest="sets", action="append", default=[], type=lambda s: s.split("=", 1),
                    metavar="NAME=VALUE")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    if not (args.corpus / "references.tsv").exists():
        print(f"corpus not available at {args.corpus}", file=sys.stderr)
        return 2
    print(header("python -m bench.turn_live " + " ".join(argv if argv is not None
                                                         else sys.argv[1:]), load=True))
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
