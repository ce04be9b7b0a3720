"""Placeholder until the whisper engine lands (issue 3)."""

from __future__ import annotations

from ..config import Settings
from .base import Engine, EngineUnavailable


class WhisperEngine(Engine):
    name = "whisper"

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        raise EngineUnavailable("the whisper engine is not built yet; use STT_ENGINE=sphinx")
