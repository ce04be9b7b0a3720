"""End of turn, offline: three detectors on the same audio, eot-bench's figures, the knobs fitted.

    python -m bench.turn                      # all corpus clips: collect, fit on half, report the rest
    python -m bench.turn --limit 20           # quicker
    python -m bench.turn --json turn.json
    python -m bench.turn --cache cases.json --decode-scale 2 --answer-s 0.08 --last-steps 0.5,0.6,0.75

Every corpus sentence three times: **finished** (its speech, then room tone), **cut after a
function word** near its middle ("... in the", "... to": the speaker hesitates) and **cut after
another word** near its middle; word boundaries from the engine's word timings on the whole clip.
For each, as the worker hears it (its segmenter finds where the trailing silence starts):

* the end-of-turn model's probability after every silence of :data:`GRID_S`;
* the speculative final's words: the engine's decode of the utterance at the first query point
  (what the worker decodes then), and how long that decode took here.

Then, with no more model or engine calls, each detector's decision time for every clip:

* **silence**: a fixed silence (knob: its length);
* **Smart Turn alone**: the model asked at every point of the grid from ``min`` on, the turn
  ends at the first probability over the threshold, else at ``max`` (knobs: threshold, min, max);
* **combined** (the worker's :class:`stt.core.turn.Turn`, run as the session runs it): the model at
  ``query_s``, the words when their decode is done, thresholds per silence, the bonus for a
  finished sentence, ``max_silence_s``.

The cut points come from the audio (quiet moments between words) and what the engine hears
before them (:func:`cut_points`). A hesitation of length L is *cut off* when the detector ends the turn before L (pauses of
:data:`PAUSES_S`, each equally likely); the latency is the decision time on finished sentences,
counted from where the worker's silence starts. eot-bench's two figures per detector: the
cut-off rate at a mean latency budget (0.3 s, 0.6 s) and the mean latency at a cut-off budget
(5 %, 10 %), each the best operating point of the detector's grid — chosen on the even clips
(fit), reported on the odd ones (held out), with the knobs that gave it. The last table is the
worker's default against the goals of issue 24, per pause length and cut kind.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stt.config import Settings
from stt.core.audio import SAMPLE_RATE
from stt.core.segmenter import PCM_FRAME_BYTES, Segmenter, SegmenterParams, frame_inputs
from stt.core.textnorm import UNFINISHED_LAST_WORDS, normalize
from stt.core.transcription import TranscribeOptions
from stt.core.turn import Turn, TurnParams, Verdict
from stt.core.vad import FRAME_S, FRAME_SAMPLES
from stt.engines import create_engine

from .common import DEFAULT_CORPUS, header, percentile
from .scenarios import CorpusClip, load_corpus, room_tone, select

GRID_S = (0.06, 0.09, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9, 1.05, 1.2, 1.4)
PAUSES_S = (0.3, 0.6, 0.9, 1.2, 1.5)
GOAL_PAUSES_S = (0.6, 0.9, 1.2)  # issue 24: hesitations of 0.6-1.2 s
MODEL_LATENCY_S = 0.05          # a query's answer, after it is asked (measured: 45-50 ms)
SPEC_AT_S = 0.15                # the speculative decode collected (the words differ little
                                # whether it starts at 0.06 or 0.15 s of silence)
TAIL_S = 1.8
SPECULATIVE_S = 0.2             # STT_SPECULATIVE_MS
HANGOVER_S = 0.15               # STT_HANGOVER_MS: the speculative decode starts no sooner
DECODE_SCALE = 1.0              # --decode-scale: decodes this many times slower than collected
KINDS = ("finished", "cut-function", "cut-other")


@dataclass
class Case:
    clip: str
    kind: str
    p: dict[float, float]       # silence (s) -> P(complete)
    words: str                  # the speculative decode at SPEC_AT_S
    decode_s: float             # how long that decode took here
    speech_end_s: float         # where the speech really ended (cut or offset), stream time
    silence_start_s: float      # where the worker's trailing silence starts

    @property
    def finished(self) -> bool:
        return self.kind == "finished"


# --- collecting -------------------------------------------------------------------------------


def gaps(audio: np.ndarray, onset_s: float, offset_s: float, limit: int = 8) -> list[float]:
    """Quiet moments between words in the middle 30-70 % of the speech (seconds), the middle
    first: local minima of the 40 ms energy, at least 12 dB under the speech's median."""
    hop = SAMPLE_RATE // 100
    lo = int((onset_s + 0.3 * (offset_s - onset_s)) * SAMPLE_RATE)
    hi = int((onset_s + 0.7 * (offset_s - onset_s)) * SAMPLE_RATE)
    n = (hi - lo) // hop
    if n < 10:
        return []
    energy = np.mean(audio[lo:lo + n * hop].reshape(n, hop).astype(np.float64) ** 2, axis=1)
    smooth = np.convolve(energy, np.ones(4) / 4, mode="same")
    level = np.median(smooth) * 10 ** (-12 / 10)
    minima = [i for i in range(2, n - 2) if smooth[i] <= smooth[i - 2:i + 3].min()
              and smooth[i] < level]
    middle = (n - 1) / 2
    picked: list[int] = []
    for i in sorted(minima, key=lambda i: abs(i - middle)):
        if all(abs(i - j) > 15 for j in picked):   # one per 150 ms
            picked.append(i)
    return [(lo + i * hop + hop // 2) / SAMPLE_RATE for i in picked[:limit]]


async def cut_points(engine: Any, clip: CorpusClip) -> dict[str, float]:
    """Where to cut a sentence for a hesitation: the quiet moment nearest its middle whose
    prefix, decoded, ends on a function word ("... in the"), and the one whose prefix ends on
    another word. What the recognizer hears decides the kind: word timings from alignment are
    only good to a tenth of a second, and a cut a little late would keep the next word's onset."""
    out: dict[str, float] = {}
    for at in gaps(clip.audio, clip.onset_s, clip.offset_s):
        prefix = clip.audio[max(0, int((clip.onset_s - 0.2) * SAMPLE_RATE)):int(at * SAMPLE_RATE)]
        text = (await engine.transcribe(prefix, TranscribeOptions(language="en"))).text
        last = normalize(text).split()[-1:] or [""]
        if not last[0] or text.rstrip().endswith(("-", "...")):
            continue
        kind = "cut-function" if last[0] in UNFINISHED_LAST_WORDS else "cut-other"
        out.setdefault(kind, at)
        if len(out) == 2:
            break
    return out


def silence_start(audio: np.ndarray) -> float | None:
    """Where the worker's segmenter starts counting the final trailing silence (stream s)."""
    seg = Segmenter(SegmenterParams(endpoint_frames=10_000, max_frames=20_000))
    n = audio.size // FRAME_SAMPLES
    frames = audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
    pcm, energies = frame_inputs(frames)
    for i, energy in enumerate(energies):
        seg.push(frames[i], pcm[i * PCM_FRAME_BYTES:(i + 1) * PCM_FRAME_BYTES], energy)
    if seg.segment is None or not seg.segment.speech_count:
        return None
    return (seg.frames - seg.segment.trailing_silence) * FRAME_S


async def collect(clips: list[CorpusClip], seed: int) -> list[Case]:
    from stt.engines.turn_model import TurnModel

    settings = Settings()
    engine = create_engine(settings)
    await engine.start()
    model = TurnModel()
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    lead = 0.5
    for k, clip in enumerate(clips):
        ends = {"finished": clip.offset_s, **(await cut_points(engine, clip))}
        for kind in KINDS:
            if kind not in ends:
                continue
            a = max(0, int((clip.onset_s - 0.2) * SAMPLE_RATE))
            b = int(min(clip.duration_s, ends[kind] + (0.15 if kind == "finished" else 0.0))
                    * SAMPLE_RATE)
            audio = np.concatenate([room_tone(lead, rng), clip.audio[a:b],
                                    room_tone(TAIL_S, rng)])
            start = silence_start(audio)
            if start is None:
                continue
            first = int(max(0.0, start - 30.0) * SAMPLE_RATE)  # the segment (pre-roll aside)
            probs = {t: model.predict(audio[first:int((start + t) * SAMPLE_RATE)])
                     for t in GRID_S}
            spec = audio[int(max(0.0, lead - 0.3) * SAMPLE_RATE):
                         int((start + SPEC_AT_S) * SAMPLE_RATE)]
            t0 = time.perf_counter()
            decoded = await engine.transcribe(spec, TranscribeOptions(language="en"))
            cases.append(Case(clip.name, kind, probs, decoded.text, time.perf_counter() - t0,
                              lead + ends[kind] - a / SAMPLE_RATE, start))
        print(f"  collected {k + 1}/{len(clips)}", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    await engine.close()
    return cases


# --- detectors --------------------------------------------------------------------------------


def p_at(case: Case, t: float) -> float:
    """The probability asked at silence ``t`` (the grid point at or before it)."""
    best = GRID_S[0]
    for g in GRID_S:
        if g <= t + 1e-9:
            best = g
    return case.p[best]


def combined_time(case: Case, params: TurnParams) -> float:
    """When the worker's Turn ends this case's turn (silence s), run event by event."""
    # the worker starts the speculative final's decode when the model's first answer says the
    # turn is probably over, else at STT_SPECULATIVE_MS; never before the final's tail of
    # silence (STT_HANGOVER_MS) is in
    first = params.first_query_s
    spec_at = max(HANGOVER_S, first + MODEL_LATENCY_S if p_at(case, first) >= params.speculate_p
                  else max(first, SPECULATIVE_S))
    words_at = spec_at + case.decode_s * DECODE_SCALE
    events = sorted({*params.query_s, *(q + MODEL_LATENCY_S for q in params.query_s),
                     *(s for s, _ in params.thresholds), words_at, params.max_silence_s})
    turn = Turn(params)
    pending: list[tuple[float, float]] = []   # (answer time, probability)
    for t in events:
        if t > params.max_silence_s:
            break
        while pending and pending[0][0] <= t + 1e-9:
            turn.scored(pending.pop(0)[1])
        if turn.query_due(t):
            turn.asked(t)
            pending.append((t + MODEL_LATENCY_S, p_at(case, t)))
        if turn.decide(t, case.words if t + 1e-9 >= words_at else None) is Verdict.END:
            return t
    return params.max_silence_s


def smart_turn_time(case: Case, threshold: float, min_s: float, max_s: float) -> float:
    for t in GRID_S:
        if min_s - 1e-9 <= t < max_s and case.p[t] >= threshold:
            return t + MODEL_LATENCY_S
    return max_s


def rates(times: list[float], cases: list[Case], pauses: tuple[float, ...] = PAUSES_S
          ) -> tuple[float, float]:
    """(mean latency on finished sentences, cut-off rate on hesitations)."""
    lat = [t for t, c in zip(times, cases, strict=True) if c.finished]
    cuts = [t < pause for t, c in zip(times, cases, strict=True) if not c.finished
            for pause in pauses]
    return float(np.mean(lat)), float(np.mean(cuts))


def silence_grid() -> list[tuple[str, Any]]:
    return [(f"silence {s:.2f} s", round(float(s), 2)) for s in np.arange(0.2, 2.01, 0.05)]


def smart_turn_grid() -> list[tuple[str, Any]]:
    out = []
    for th, lo, hi in itertools.product((0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
                                        (0.06, 0.15, 0.3, 0.5), (0.8, 1.0, 1.2, 1.6, 2.0)):
        out.append((f"threshold {th}, from {lo} s, max {hi} s", (th, lo, hi)))
    return out


def combined_grid() -> list[tuple[str, TurnParams]]:
    out = []
    for first, t1, t2, last, t3, bonus, hi, sure in itertools.product(
            (0.06, 0.09, 0.15), (0.7, 0.8, 0.9, 1.0, 1.2), (0.7, 0.8, 0.9, 1.0, 1.2), (0.6, 0.9),
            (0.3, 0.45, 0.6, 0.8, 1.0, 1.2), (0.0, 0.15, 0.3), (1.4, 1.6, 2.0),
            (0.5, 0.7, 0.9, 2.0)):
        query = (first, 0.3, last)
        steps = ((first, t1), (0.3, t2), (last, t3))
        params = TurnParams(query_s=query, thresholds=steps, finished_bonus=bonus,
                            max_silence_s=hi, sure=sure, eager=2.0)
        out.append((describe(params), params))
    return out


def fit_default(fit: list[Case], p95_s: float) -> tuple[str, TurnParams] | None:
    """The worker's default, chosen on ``fit`` against issue 24's goals: hesitations of 0.6-1.2 s
    ending the turn at most 15 % of the time after a function word and 30 % after another word,
    finished sentences decided within ``p95_s`` (p95); of those, the lowest median latency."""
    best: tuple[tuple[float, float], str, TurnParams] | None = None
    for label, params in combined_grid():
        times = times_for("combined", params, fit)
        fin = [t for t, c in zip(times, fit, strict=True) if c.finished]
        if (percentile(fin, 95) or 0.0) > p95_s:
            continue
        cut = goal_cutoffs(times, fit)
        if cut["cut-function"] > 0.15 or cut["cut-other"] > 0.30:
            continue
        key = (float(np.median(fin)), cut["cut-other"])
        if best is None or key < best[0]:
            best = (key, label, params)
    return None if best is None else (best[1], best[2])


def describe(p: TurnParams) -> str:
    steps = ",".join(f"{s}:{v}" for s, v in p.thresholds)
    return (f"query {','.join(map(str, p.query_s))}; thresholds {steps}; bonus "
            f"{p.finished_bonus}; max {p.max_silence_s} s" + (f"; sure {p.sure}" if p.sure <= 1
                                                              else ""))


def times_for(family: str, knobs: Any, cases: list[Case]) -> list[float]:
    if family == "silence":
        return [float(knobs)] * len(cases)
    if family == "smart turn":
        return [smart_turn_time(c, *knobs) for c in cases]
    return [combined_time(c, knobs) for c in cases]


FAMILIES = {"silence": silence_grid, "smart turn": smart_turn_grid, "combined": combined_grid}


def operating_points(family: str, fit: list[Case], held: list[Case]) -> dict[str, Any]:
    """eot-bench's four figures: knobs chosen on ``fit``, figures on ``held``."""
    scored = []
    for label, knobs in FAMILIES[family]():
        scored.append((rates(times_for(family, knobs, fit), fit), label, knobs))
    out: dict[str, Any] = {}
    for name, ok, key in (
            ("cut-offs at 0.3 s", lambda lat, cut: lat <= 0.3, lambda r: r[0][1]),
            ("cut-offs at 0.6 s", lambda lat, cut: lat <= 0.6, lambda r: r[0][1]),
            ("latency at 5 %", lambda lat, cut: cut <= 0.05, lambda r: r[0][0]),
            ("latency at 10 %", lambda lat, cut: cut <= 0.10, lambda r: r[0][0])):
        feasible = [r for r in scored if ok(*r[0])]
        if not feasible:
            out[name] = None
            continue
        best = min(feasible, key=key)
        lat, cut = rates(times_for(family, best[2], held), held)
        out[name] = {"value": cut if name.startswith("cut") else lat, "latency_s": lat,
                     "cutoffs": cut, "knobs": best[1], "fit": best[0]}
    return out


def goal_cutoffs(times: list[float], cases: list[Case]) -> dict[str, float]:
    """Per cut kind: the share of its hesitations of :data:`GOAL_PAUSES_S` the turn ended."""
    out = {}
    for kind in KINDS[1:]:
        ended = [t < pause for t, c in zip(times, cases, strict=True) if c.kind == kind
                 for pause in GOAL_PAUSES_S]
        out[kind] = float(np.mean(ended)) if ended else 0.0
    return out


def goal_rows(params: TurnParams, cases: list[Case]) -> list[str]:
    times = times_for("combined", params, cases)
    fin = [t for t, c in zip(times, cases, strict=True) if c.finished]
    cut = goal_cutoffs(times, cases)
    offset = [c.silence_start_s - c.speech_end_s for c in cases if c.finished]
    rows = [f"  finished sentences: decision p50 {percentile(fin, 50):.2f} s, p95 "
            f"{percentile(fin, 95):.2f} s after the worker's silence starts (which is "
            f"{np.median(offset):+.2f} s from the end of speech, median)"]
    for kind in KINDS[1:]:
        sub = [(t, c) for t, c in zip(times, cases, strict=True) if c.kind == kind]
        per = "  ".join(f"{pause:.1f} s: {sum(t < pause for t, _ in sub)}/{len(sub)}"
                        for pause in PAUSES_S)
        rows.append(f"  {kind}: turns ended during a hesitation of {per}; 0.6-1.2 s: "
                    f"{cut[kind]:.0%}")
    return rows


def moved_last_step(params: TurnParams, silence_s: float) -> TurnParams:
    """``params`` with its last threshold step, and the query point there, at ``silence_s``."""
    last, score = params.thresholds[-1]
    query = sorted({q for q in params.query_s if q != last} | {silence_s})
    return replace(params, query_s=tuple(query),
                   thresholds=(*params.thresholds[:-1], (silence_s, score)))


def step_row(params: TurnParams, cases: list[Case]) -> str:
    times = times_for("combined", params, cases)
    fin = [t for t, c in zip(times, cases, strict=True) if c.finished]
    return (" / ".join(f"{percentile(fin, q):.2f}" for q in (50, 75, 95)) + " s, "
            + " / ".join(f"{x:.0%}" for x in goal_cutoffs(times, cases).values()))


def main(argv: list[str] | None = None) -> int:
    global DECODE_SCALE, MODEL_LATENCY_S
    ap = argparse.ArgumentParser(prog="python -m bench.turn", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--limit", type=int, default=0, help="clips (0 = all)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--cache", type=Path, help="read/write the collected cases here")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--p95-s", type=float, default=1.5,
                    help="the fitted default's finished-sentence decision p95 at most this")
    ap.add_argument("--decode-scale", type=float, default=1.0,
                    help="the decodes this many times slower than collected (2: two sessions "
                         "at once on two cores, as bench.turn_live measures them)")
    ap.add_argument("--answer-s", type=float, default=MODEL_LATENCY_S,
                    help="the model's answer this long after it is asked")
    ap.add_argument("--last-steps", type=lambda v: [float(x) for x in v.split(",")],
                    default=[], help="also the worker's default with its last threshold step "
                                     "(and query point) at each of these silences, both halves")
    args = ap.parse_args(argv)
    DECODE_SCALE, MODEL_LATENCY_S = args.decode_scale, args.answer_s
    if not (args.corpus / "references.tsv").exists():
        print(f"corpus not available at {args.corpus}", file=sys.stderr)
        return 2
    print(header("python -m bench.turn " + " ".join(argv if argv is not None else sys.argv[1:])))
    if args.cache and args.cache.exists():
        cases = [Case(**{**c, "p": {float(k): v for k, v in c["p"].items()}})
                 for c in json.loads(args.cache.read_text())]
    else:
        clips = select(load_corpus(args.corpus), args.limit)
        cases = asyncio.run(collect(clips, args.seed))
        if args.cache:
            args.cache.write_text(json.dumps([asdict(c) for c in cases]))
    names = sorted({c.clip for c in cases})
    fit_names = set(names[0::2])
    fit = [c for c in cases if c.clip in fit_names]
    held = [c for c in cases if c.clip not in fit_names]
    decode = [c.decode_s for c in cases]
    print(f"{len(cases)} cases from {len(names)} clips ({sum(c.finished for c in cases)} "
          f"finished); fit on {len(fit_names)} clips, figures on the other {len(names) - len(fit_names)}")
    print(f"speculative decode here: p50 {percentile(decode, 50):.2f} s, p95 "
          f"{percentile(decode, 95):.2f} s (counted {DECODE_SCALE:g} times that); the model's "
          f"answer counted {MODEL_LATENCY_S} s after it is asked")
    table = {}
    for family in FAMILIES:
        table[family] = operating_points(family, fit, held)
    print("\n| detector | cut-offs at 0.3 s | at 0.6 s | latency at 5 % cut-offs | at 10 % |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for family, points in table.items():
        cells = []
        for name, point in points.items():
            if point is None:
                cells.append("n/a")
            elif name.startswith("cut"):
                cells.append(f"{point['value']:.1%}")
            else:
                cells.append(f"{point['value']:.2f} s")
        print(f"| {family} | " + " | ".join(cells) + " |")
    print("\noperating points (knobs chosen on the fit half):")
    for family, points in table.items():
        for name, point in points.items():
            if point is not None:
                print(f"  {family}, {name}: {point['knobs']} (held out: mean latency "
                      f"{point['latency_s']:.2f} s, cut-offs {point['cutoffs']:.1%})")
    fitted, p95_s = None, args.p95_s
    for p95_s in (args.p95_s, args.p95_s + 0.1, args.p95_s + 0.2, args.p95_s + 0.4):
        fitted = fit_default(fit, p95_s)
        if fitted is not None:
            break
    if fitted is not None:
        print(f"\nfitted (finished p95 within {p95_s:.2f} s, hesitations of 0.6-1.2 s ended at "
              f"most 15 % after function words and 30 % after others, then the lowest median "
              f"latency): {fitted[0]}; held out:")
        for row in goal_rows(fitted[1], held):
            print(row)
    default = Settings().turn_params()
    print(f"\nthe worker's default ({describe(default)}), held-out clips:")
    for row in goal_rows(default, held):
        print(row)
    if args.last_steps:
        print("\nthe default's last threshold step moved (fit half | held-out half): finished "
              "sentences' decision p50 / p75 / p95; hesitations of 0.6-1.2 s that ended the "
              "turn, after a function word / another word")
        for step in args.last_steps:
            print(f"  {step:.2f} s: " + " | ".join(
                step_row(moved_last_step(default, step), part) for part in (fit, held)))
    if args.json:
        args.json.write_text(json.dumps({"table": table, "cases": len(cases)}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
