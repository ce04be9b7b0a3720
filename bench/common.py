"""Corpus clips with their speech boundaries, machine description and percentiles for the benchmarks."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import soundfile
import soxr
import webrtcvad

from stt.core.audio import SAMPLE_RATE, to_pcm16
from stt.core.vad import FRAME_S, FRAME_SAMPLES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus"

GATE_ABOVE_FLOOR_DB = 10.0  # a speech frame is this much above the clip's noise floor
GATE_BELOW_PEAK_DB = 45.0   # ... and no more than this below its loud frames
ONSET_WINDOW, ONSET_VOICED = 5, 3  # 3 of 5 frames voiced opens speech (the worker's rule)
OFFSET_VOICED = 2                  # last frame with 2 of the 5 up to it voiced closes it


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


def _rms_db(x: np.ndarray) -> np.ndarray:
    return 20.0 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1)) + 1e-9)


def speech_frames(audio: np.ndarray, aggressiveness: int = 2) -> np.ndarray:
    """One bool per 30 ms frame of 16 kHz audio: webrtcvad says speech and it is loud enough.

    The same detector and mode as the worker, so "end of speech" is when the worker's own VAD
    stops hearing speech; the level gate keeps webrtcvad from calling low room noise speech.
    """
    n = audio.size // FRAME_SAMPLES
    frames = audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)
    vad = webrtcvad.Vad(aggressiveness)
    voiced = np.array([vad.is_speech(to_pcm16(f), SAMPLE_RATE) for f in frames], dtype=bool)
    if n == 0:
        return voiced
    level = _rms_db(frames)
    gate = max(float(np.percentile(level, 10)) + GATE_ABOVE_FLOOR_DB,
               float(np.percentile(level, 95)) - GATE_BELOW_PEAK_DB)
    return voiced & (level >= gate)


def speech_bounds(audio: np.ndarray, aggressiveness: int = 2) -> tuple[float, float]:
    """(onset, offset) in seconds of the speech in a clean 16 kHz clip."""
    speech = speech_frames(audio, aggressiveness)
    n = speech.size
    if not speech.any():
        return 0.0, n * FRAME_S
    counts = np.convolve(speech, np.ones(ONSET_WINDOW, dtype=int))[:n]  # speech in the 5 up to i
    onsets = np.flatnonzero(speech & (counts >= ONSET_VOICED))
    offsets = np.flatnonzero(speech & (counts >= OFFSET_VOICED))
    first = (int(onsets[0]) - ONSET_WINDOW + 1) if onsets.size else int(np.flatnonzero(speech)[0])
    # the window that opened speech may start with quiet frames: begin at its first speech frame
    first = max(0, first)
    while first < n and not speech[first]:
        first += 1
    last = int(offsets[-1]) if offsets.size else int(np.flatnonzero(speech)[-1])
    return first * FRAME_S, (last + 1) * FRAME_S


def corpus_rows(corpus: Path) -> list[tuple[str, str]]:
    """(path relative to the corpus, reference transcript) for each clip of references.tsv."""
    table = corpus / "references.tsv"
    if not table.is_file():
        raise CorpusUnavailable(f"corpus not available at {corpus} (no references.tsv)")
    rows = []
    for row in table.read_text().splitlines()[1:]:
        if row.strip():
            rel, reference = row.split("\t", 1)
            rows.append((rel, reference.strip()))
    if not rows:
        raise CorpusUnavailable(f"corpus not available at {corpus} (references.tsv is empty)")
    return rows


def load_corpus(corpus: Path) -> list[Clip]:
    """Clips at their own rate (the load generator streams them so), with speech bounds."""
    clips = []
    for rel, _reference in corpus_rows(corpus):
        data, rate = soundfile.read(str(corpus / rel), dtype="float32", always_2d=True)
        mono = data.mean(axis=1, dtype=np.float32)
        at16k = mono if rate == SAMPLE_RATE else soxr.resample(mono, rate, SAMPLE_RATE)
        start, end = speech_bounds(np.asarray(at16k, dtype=np.float32))
        pcm = to_pcm16(mono)
        clips.append(Clip(rel, pcm, int(rate), start, end))
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


def code_revision() -> str:
    """The commit measured, and whether the worker's code differs from it (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "stt"], cwd=ROOT,
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no git)"
    return f"{head or 'unknown'}" + (" + uncommitted changes in stt/" if dirty else "")


def header(command: str | None = None, *, load: bool = False,
           info: dict[str, object] | None = None) -> str:
    """What every benchmark prints first: the command, the commit, the machine (``info``, as
    :func:`machine` read it, when the caller keeps it too)."""
    m = info or machine()
    lines = [f"command: {command}"] if command else []
    lines.append(f"code: {code_revision()}")
    lines.append(f"machine: {m['nproc']} CPUs, {m['cpu_model']}, Python {m['python']}"
                 + (f", {m['platform']}, load average at start {m['loadavg']}" if load else ""))
    return "\n".join(lines)


def percentile(values: list[float] | np.ndarray, q: float) -> float | None:
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used; 0 once it is gone."""
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return 0.0
