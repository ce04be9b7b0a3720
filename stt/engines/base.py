"""The engine interface: 16 kHz mono float32 audio and options in, text (and details) out.

An engine is started once (load weights, warm up), then ``transcribe`` is awaited from the
event loop; implementations must not block the loop (threads, processes or async I/O).
Failures raise :class:`EngineError`; the worker turns it into an ``engine_failed`` message and
keeps the session.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class EngineError(Exception):
    """Transcription failed; the message is safe to show to the client."""


class EngineUnavailable(EngineError):
    """The engine cannot be used at all (missing package, missing model): a start-up error."""


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None          # None = detect (where the engine can)
    prompt: str | None = None            # vocabulary hint from the session's start
    context: str | None = None           # previous final of the session
    word_timestamps: bool = False
    is_partial: bool = False             # partials may be decoded more cheaply
    temperature: float = 0.0
    # Words the text must start with (a final after stable partial words): the local engines
    # force it as the decoder prefix and decode the rest after it, over the whole audio; the
    # http engine ignores it.
    prefix: str | None = None


@dataclass(frozen=True)
class Word:
    word: str
    start: float  # seconds from the start of the audio given to the engine
    end: float
    probability: float | None = None

    def as_dict(self, offset_s: float = 0.0) -> dict[str, Any]:
        out: dict[str, Any] = {"word": self.word, "start": round(self.start + offset_s, 3),
                               "end": round(self.end + offset_s, 3)}
        if self.probability is not None:
            out["probability"] = round(self.probability, 4)
        return out


@dataclass(frozen=True)
class Segment:
    text: str
    start: float
    end: float
    no_speech_prob: float | None = None
    avg_logprob: float | None = None
    compression_ratio: float | None = None


@dataclass(frozen=True)
class Transcription:
    text: str
    language: str | None = None
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    no_speech_prob: float | None = None
    duration_s: float = 0.0
    queued_s: float = 0.0  # how long the request waited inside the engine before its pass


class Engine(abc.ABC):
    """Subclasses fill ``transcribe``; ``start`` and ``close`` are optional."""

    name: str = "engine"
    #: True when several sessions' segments can usefully share one pass (GPU batching).
    batches: bool = False
    #: Passes the engine runs at once, and jobs one pass takes (the scheduler's capacity).
    slots: int = 1
    per_pass: int = 1

    async def start(self) -> None:  # noqa: B027 - optional hook, most engines need it
        """Load and warm up. Raise :class:`EngineUnavailable` with what to set if impossible."""

    @abc.abstractmethod
    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        """Transcribe 16 kHz mono float32 audio."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release processes, threads, connections."""

    def describe(self) -> dict[str, Any]:
        """What /readyz, logs and $SRV.INFO say about this engine."""
        return {"name": self.name}
