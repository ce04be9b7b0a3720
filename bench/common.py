"""Corpus clips with their speech boundaries, machine description and percentiles for the benchmarks."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr
import webrtcvad

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"

VAD_RATE = 16000
VAD_FRAME_MS = 30
VAD_FRAME = VAD_RATE * VAD_FRAME_MS // 1000
VAD_MODE = 2          # the worker's default STT_VAD_AGGRESSIVENESS
ONSET_WINDOW = 5      # frames; speech starts where 3 of 5 frames are voiced (the worker's rule)
ONSET_VOICED = 3
OFFSET_WINDOW = 5     # speech ends at the last voiced frame with 2 of the 5 up to it voiced,
OFFSET_VOICED = 2     # so a lone click after the last word does not count as speech


class CorpusUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Clip:
    name: str
    pcm: bytes            # mono little-endian int16 at the clip's own rate
    sample_rate: int
    speech_start_s: float  # first and last voiced audio, found offline with webrtcvad
    speech_end_s: float

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate


def speech_bounds(samples: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """(start, end) in seconds of the voiced part of a clip, by webrtcvad on 30 ms frames.

    The same detector and mode as the worker, so "end of speech" here is the moment the
    worker's own VAD stops hearing speech, not a different detector's opinion.
    """
    mono16 = samples if sample_rate == VAD_RATE else soxr.resample(samples, sample_rate, VAD_RATE)
    pcm = (np.clip(mono16, -1.0, 1.0) * 32767.0).astype("<i2")
    vad = webrtcvad.Vad(VAD_MODE)
    n = len(pcm) // VAD_FRAME
    voiced = np.array([vad.is_speech(pcm[i * VAD_FRAME:(i + 1) * VAD_FRAME].tobytes(), VAD_RATE)
                       for i in range(n)], dtype=bool)
    frame_s = VAD_FRAME_MS / 1000
    if not voiced.any():
        return 0.0, n * frame_s
    counts = np.convolve(voiced, np.ones(ONSET_WINDOW, dtype=int))[:n]  # voiced in the 5 up to i
    onsets = np.flatnonzero(voiced & (counts >= ONSET_VOICED))
    offsets = np.flatnonzero(voiced & (counts >= OFFSET_VOICED))
    first = int(onsets[0]) - ONSET_WINDOW + 1 if onsets.size else int(np.flatnonzero(voiced)[0])
    last = int(offsets[-1]) if offsets.size else int(np.flatnonzero(voiced)[-1])
    return max(0, first) * frame_s, (last + 1) * frame_s


def load_corpus(corpus: Path) -> list[Clip]:
    table = corpus / "references.tsv"
    if not table.is_file():
        raise CorpusUnavailable(f"corpus not available at {corpus} (no references.tsv)")
    clips = []
    for row in table.read_text().splitlines()[1:]:
        if not row.strip():
            continue
        rel = row.split("\t", 1)[0]
        data, rate = soundfile.read(str(corpus / rel), dtype="float32", always_2d=True)
        mono = data.mean(axis=1, dtype=np.float32)
        start, end = speech_bounds(mono, int(rate))
        pcm = (np.clip(mono, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        clips.append(Clip(rel, pcm, int(rate), start, end))
    if not clips:
        raise CorpusUnavailable(f"corpus not available at {corpus} (references.tsv is empty)")
    return clips


def machine() -> dict[str, object]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def percentile(values: list[float] | np.ndarray, q: float) -> float | None:
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))
