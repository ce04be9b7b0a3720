"""An engine that answers at once: BENCHMARK ONLY, never a product engine.

``bench.load --engine null`` runs the worker with ``STT_ENGINE=bench.null_engine:InstantEngine``
so that what is measured is the worker itself (NATS, parsing, decoding, resampling, VAD,
segmentation, publishing) and not a recognizer. It returns a short fixed text without
looking at the audio, so every voiced segment still produces partials and a final and the
whole output path is exercised.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stt.config import Settings
from stt.core.audio import SAMPLE_RATE
from stt.core.transcription import TranscribeOptions, Transcription
from stt.engines.base import Engine

TEXT = "benchmark"


class InstantEngine(Engine):
    """Returns ``TEXT`` immediately; constructed with the Settings like any ``module:Class``."""

    name = "instant"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        return Transcription(text=TEXT, language=options.language or "en",
                             duration_s=audio.size / SAMPLE_RATE)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "benchmark_only": True}
