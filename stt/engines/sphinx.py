"""Offline English recognition with pocketsphinx and its bundled en-us model.

No download, CPU-cheap, far less accurate than Whisper: for demos, tests and machines where
Whisper weights cannot be fetched. pocketsphinx holds the GIL for a whole decode, so decoding
runs in a pool of worker processes (one decoder each) and never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np

from ..audio import SAMPLE_RATE, to_pcm16
from .base import Engine, EngineError, EngineUnavailable, TranscribeOptions, Transcription, Word

FRAMES_PER_S = 100  # pocketsphinx reports word times in 10 ms frames
_FILLER = re.compile(r"^(<s>|</s>|<sil>|\[.*\]|\+\+.*\+\+)$")
_ALTERNATE = re.compile(r"\(\d+\)$")

_decoder: Any = None


def _init_worker() -> None:
    global _decoder
    from pocketsphinx import Decoder

    _decoder = Decoder(loglevel="FATAL")


def _decode(pcm: bytes) -> tuple[str, list[tuple[str, float, float, float]]]:
    d = _decoder
    d.start_utt()
    d.process_raw(pcm, full_utt=True)
    d.end_utt()
    hyp = d.hyp()
    if hyp is None:
        return "", []
    words = []
    for seg in d.seg():
        if _FILLER.match(seg.word):
            continue
        words.append((_ALTERNATE.sub("", seg.word), seg.start_frame / FRAMES_PER_S,
                      (seg.end_frame + 1) / FRAMES_PER_S, float(seg.prob)))
    return " ".join(w[0] for w in words), words


class SphinxEngine(Engine):
    name = "sphinx"

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None

    async def start(self) -> None:
        try:
            import pocketsphinx  # noqa: F401
        except ImportError:
            raise EngineUnavailable(
                "the sphinx engine needs pocketsphinx: pip install 'stt-streaming[sphinx]'"
            ) from None
        # spawn: the worker must not inherit the event loop, sockets or threads by fork
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker)
        # warm up every process (model load happens in the initializer)
        silence = to_pcm16(np.zeros(SAMPLE_RATE // 2, dtype=np.float32))
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self._pool, _decode, silence)
                               for _ in range(self.workers)))

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        if self._pool is None:
            raise EngineError("sphinx engine not started")
        if options.language and not options.language.startswith("en"):
            raise EngineError(f"the sphinx engine only knows English, not {options.language!r}")
        loop = asyncio.get_running_loop()
        try:
            text, words = await loop.run_in_executor(self._pool, _decode, to_pcm16(audio))
        except Exception as exc:  # a crashed worker process, a broken pool
            raise EngineError(f"sphinx decode failed: {exc}") from exc
        return Transcription(
            text=text, language="en",
            words=[Word(w, s, e, p) for w, s, e, p in words] if options.word_timestamps else [],
            duration_s=audio.size / SAMPLE_RATE)

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.workers, "model": "pocketsphinx en-us"}
