"""The endpoint decision alone: the worker's segmenter over the corpus, no engine, no clock.

    python -m bench.endpoint                                  # the defaults
    python -m bench.endpoint --sweep noise_gate_db=0,10,15    # one row per value

Every corpus clip, at 16 kHz, streamed back to back as one session's audio with 1.3-1.8 s of
digital silence between clips (a seeded order). For each clip: end of speech (found offline,
as ``bench.load`` does) to the segmenter's endpoint decision, and how many segments the clips
became. Runs in seconds, so settings that move the endpoint (``chunk_timeout_s``,
``noise_gate_db``, ``vad_aggressiveness``, ``hangover_ms``) can be compared side by side;
the latency of the final on top of the decision is ``bench.latency``'s subject.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from stt.config import Settings
from stt.core.audio import SAMPLE_RATE, Converter
from stt.core.segmenter import PCM_FRAME_BYTES, Ended, Segmenter, frame_inputs
from stt.core.vad import FRAME_S, FRAME_SAMPLES

from .common import DEFAULT_CORPUS, Clip, CorpusUnavailable, header, load_corpus, percentile
from .evaluate import parse_assignment

GAP_S = (1.3, 1.8)


def stream(clips: list[Clip], seed: int) -> tuple[np.ndarray, list[float]]:
    """The session's audio and each clip's end of speech on its timeline (seconds)."""
    rng = np.random.default_rng(seed)
    pieces, ends, at = [], [], 0
    for i in rng.permutation(len(clips)):
        clip = clips[i]
        to_16k = Converter(clip.sample_rate, 1, "pcm_s16le")  # as the worker hears it
        audio = np.concatenate([to_16k.convert(clip.pcm), to_16k.flush()])
        ends.append(at / SAMPLE_RATE + clip.speech_end_s)
        gap = np.zeros(int(rng.uniform(*GAP_S) * SAMPLE_RATE), dtype=np.float32)
        pieces += [audio, gap]
        at += audio.size + gap.size
    return np.concatenate(pieces), ends


def decisions(audio: np.ndarray, settings: Settings) -> list[float]:
    """Stream time (s) of every endpoint the segmenter decided."""
    seg = Segmenter(settings.segmenter_params())
    n = audio.size // FRAME_SAMPLES
    frames = audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
    pcm, energies = frame_inputs(frames)
    width = PCM_FRAME_BYTES
    out = []
    for i, energy in enumerate(energies):
        boundary = seg.push(frames[i], pcm[i * width:(i + 1) * width], energy)
        if isinstance(boundary, Ended) and boundary.rest is None:
            out.append((i + 1) * FRAME_S)
    return out


def measure(audio: np.ndarray, ends: list[float], settings: Settings) -> dict[str, float | None]:
    decided = np.array(decisions(audio, settings))
    waits = []
    for end in ends:
        later = decided[decided > end]
        if later.size:
            waits.append(float(later[0] - end))
    return {"segments": float(decided.size), "p50": percentile(waits, 50),
            "p95": percentile(waits, 95), "max": max(waits) if waits else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.endpoint", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--sweep", type=parse_assignment, metavar="NAME=V1,V2,...")
    p.add_argument("--set", dest="sets", action="append", type=parse_assignment, default=[],
                   metavar="NAME=VALUE")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    try:
        clips = load_corpus(args.corpus)
    except CorpusUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    audio, ends = stream(clips, args.seed)
    base = dict(args.sets)
    name, values = args.sweep if args.sweep else ("", "")
    configs = [{**base, name: v} for v in values.split(",")] if name else [base]
    print(header())
    print(f"{len(clips)} clips back to back, {audio.size / SAMPLE_RATE:.0f} s; end of speech -> "
          "endpoint decision, s")
    print("| settings | segments | p50 | p95 | max |\n| --- | ---: | ---: | ---: | ---: |")
    for overrides in configs:
        settings = Settings.from_env(environ={}, overrides=overrides)
        m = measure(audio, ends, settings)
        label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        cells = " | ".join("-" if m[k] is None else f"{m[k]:.3f}" for k in ("p50", "p95", "max"))
        print(f"| {label} | {m['segments']:.0f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
