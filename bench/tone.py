"""Words a test can count: each "word" is a 0.3 s harmonic tone whose pitch names it (``w{k}``),
and :class:`ToneEngine` reads them back exactly, so a repeated or dropped word shows in the
finals' text. Shared by ``tests/`` (hand-over, durable mode) and replica processes
(``STT_ENGINE=bench.tone:ToneEngine``): BENCHMARK AND TEST ONLY, never a product engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stt.core.transcription import TranscribeOptions, Transcription
from stt.engines.base import Engine

SR = 16000
# w1-w3 (130-170 Hz) repeat so exactly that, at some frame phases, the worker's pitch check takes
# a whole utterance of them for a steady electronic tone and drops it (as it should a beep); a
# test that moves sessions between replicas (which shifts the frame phase) uses w4 and above
RELIABLE = range(4, 13)


def word(k: int, dur: float = 0.3) -> np.ndarray:
    """A voiced, pitched 'word': harmonics of 110 + 20k Hz."""
    t = np.arange(int(dur * SR)) / SR
    f0 = 110 + 20 * k
    sig = sum((1 / h) * np.sin(2 * np.pi * f0 * h * t) for h in range(1, 12))
    env = np.minimum(1, np.minimum(t / 0.02, (dur - t) / 0.02))
    return np.asarray(0.25 * sig * env / np.max(np.abs(sig)), np.float32)


def utter(*ks: int) -> np.ndarray:
    parts: list[np.ndarray] = []
    for k in ks:
        parts += [word(k), silence(0.12)]
    return np.concatenate(parts)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), np.float32)


def read_words(audio: np.ndarray) -> str:
    """The engine's side: each run of 10 ms frames above -34 dBFS lasting 120 ms is one word,
    named by its strongest frequency between 90 and 500 Hz (the fundamental)."""
    fr = SR // 100
    n = len(audio) // fr
    loud = [float(np.sqrt(np.mean(audio[i * fr:(i + 1) * fr] ** 2))) > 0.02 for i in range(n)]
    words, i = [], 0
    while i < n:
        j = i
        while j < n and loud[j]:
            j += 1
        if j - i >= 12:
            seg = audio[i * fr:j * fr]
            spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), 16 * len(seg)))
            freqs = np.fft.rfftfreq(16 * len(seg), 1 / SR)
            band = (freqs > 90) & (freqs < 500)
            words.append(f"w{round((freqs[band][np.argmax(spec[band])] - 110) / 20)}")
        i = max(j, i + 1)
    return " ".join(words)


class ToneEngine(Engine):
    """Reads the tone words; constructed bare or with the Settings (``module:Class``)."""

    name = "tone"

    def __init__(self, settings: Any = None) -> None:
        self.settings = settings

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        return Transcription(text=read_words(audio), language="en", duration_s=audio.size / SR)
