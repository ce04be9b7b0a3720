"""Placeholder until the http engine lands (issue 3)."""

from __future__ import annotations

from ..config import Settings
from .base import Engine, EngineUnavailable


class HttpEngine(Engine):
    name = "http"

    @classmethod
    def from_settings(cls, settings: Settings) -> Engine:
        raise EngineUnavailable("the http engine is not built yet; use STT_ENGINE=sphinx")
