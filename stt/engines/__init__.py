"""Engines behind one interface (see :mod:`stt.engines.base`); one module per engine."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from stt.config import Settings
from stt.core.transcription import TranscribeOptions, Transcription, Word
from stt.engines.base import Engine, EngineError, EngineUnavailable

__all__ = ["Engine", "EngineError", "EngineUnavailable", "TranscribeOptions", "Transcription",
           "Word", "create_engine"]


def create_engine(settings: Settings, *, partials: bool = True) -> Engine:
    """Build (not start) the engine named by ``STT_ENGINE``. ``partials``: whether it will be
    asked for partials (the worker, unless STT_PARTIAL_INTERVAL=0; not an upload server), so
    that faster-whisper loads its low-priority copy for them only then.

    ``module:Class`` loads any :class:`Engine` subclass, constructed with the settings; the
    benchmarks use that for an engine that answers at once.
    """
    name = settings.transcription.engine
    if name == "faster-whisper":
        from stt.engines.faster_whisper import FasterWhisperEngine

        return FasterWhisperEngine.from_settings(
            settings.transcription, partials=partials and settings.session.partial_interval_s > 0)
    if name == "whisper":
        from stt.engines.whisper import WhisperEngine

        return WhisperEngine.from_settings(settings.transcription)
    if name == "http":
        from stt.engines.http import HttpEngine

        return HttpEngine.from_settings(settings.transcription)
    module_name, _, class_name = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise EngineUnavailable(f"STT_ENGINE={name!r}: cannot load {class_name} from "
                                f"{module_name}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Engine)):
        raise EngineUnavailable(f"STT_ENGINE={name!r} is not an Engine subclass")
    factory = cast(Callable[[Settings], Engine], cls)  # plug-in engines take the settings
    return factory(settings)
