"""The engine interface: 16 kHz mono float32 audio and options in, text (and details) out.

An engine is started once (load weights, warm up), then ``transcribe`` is awaited from the
event loop; implementations must not block the loop (threads, processes or async I/O).
Failures raise :class:`EngineError`; the worker turns it into an ``engine_failed`` message and
keeps the session.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np

from stt.core.transcription import TranscribeOptions, Transcription


class EngineError(Exception):
    """Transcription failed; the message is safe to show to the client."""


class EngineUnavailable(EngineError):
    """The engine cannot be used at all (missing package, missing model): a start-up error."""


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
