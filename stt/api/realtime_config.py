"""The OpenAI Realtime transcription session's configuration: what ``session.update`` (and the
beta ``transcription_session.update``) may set, checked, and the session object sent back.

No I/O. What is applied: the input audio format (``audio/pcm`` at 24 kHz as the API defines it,
16 kHz as well; ``audio/pcmu`` and ``audio/pcma``, G.711 at 8 kHz), the transcription's
``language`` and ``prompt`` (passed to the worker's ``start``) and ``turn_detection``
(``server_vad`` / ``semantic_vad``: the worker's endpointing; ``null``: the client commits). The
turn detection's tuning (``threshold``, ``silence_duration_ms`` ...), ``noise_reduction``,
``model`` and ``include`` are accepted and echoed, not applied: one worker configuration
(``STT_CHUNK_TIMEOUT``, ``STT_ENDPOINTING``) serves every session.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from typing import Any

from stt.wire.protocol import MAX_PROMPT_CHARS

DEFAULT_TURN_DETECTION: dict[str, Any] = {
    "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
TURN_TYPES = ("server_vad", "semantic_vad")
PCM_RATES = (24000, 16000)  # 24 kHz is the API's; 16 kHz (the worker's own rate) is accepted too
BETA_FORMATS = {"pcm16": ("audio/pcm", 24000), "g711_ulaw": ("audio/pcmu", 8000),
                "g711_alaw": ("audio/pcma", 8000)}
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$|^[A-Za-z ]{4,16}$")


class ClientError(Exception):
    """A client event the server refuses; sent back as an ``error`` event of the API's shape."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type_


@dataclass(frozen=True)
class AudioFormat:
    type: str = "audio/pcm"
    rate: int = 24000

    @property
    def encoding(self) -> str:
        """The worker's ``start.encoding`` for it."""
        return {"audio/pcm": "pcm_s16le", "audio/pcmu": "mulaw", "audio/pcma": "alaw"}[self.type]

    @property
    def width(self) -> int:
        return 2 if self.type == "audio/pcm" else 1

    @property
    def silence(self) -> bytes:
        """One sample of silence (G.711 codes zero as 0xFF in mu-law, 0xD5 in A-law)."""
        return {"audio/pcm": b"\0\0", "audio/pcmu": b"\xff", "audio/pcma": b"\xd5"}[self.type]

    def as_api(self) -> dict[str, Any]:
        return {"type": self.type, "rate": self.rate} if self.type == "audio/pcm" else {
            "type": self.type}


@dataclass(frozen=True)
class SessionConfig:
    format: AudioFormat = AudioFormat()
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    turn_detection: dict[str, Any] | None = field(
        default_factory=lambda: dict(DEFAULT_TURN_DETECTION))
    noise_reduction: dict[str, Any] | None = None
    include: list[str] | None = None

    @property
    def manual(self) -> bool:
        """``turn_detection: null``: the client decides where an item ends (commit)."""
        return self.turn_detection is None

    def worker_start(self, session_id: str) -> dict[str, Any]:
        """The worker's ``start`` for this configuration."""
        start: dict[str, Any] = {"type": "start", "session_id": session_id,
                                 "sample_rate": self.format.rate, "channels": 1,
                                 "state": "listening", "encoding": self.format.encoding}
        if self.language:
            start["language"] = self.language
        if self.prompt:
            start["prompt"] = self.prompt
        return start

    def transcription(self) -> dict[str, Any]:
        return {"model": self.model or "whisper-1", "language": self.language,
                "prompt": self.prompt or ""}

    def as_api(self, session_id: str) -> dict[str, Any]:
        """The GA session object (``session.created`` / ``session.updated``)."""
        return {"object": "realtime.transcription_session", "type": "transcription",
                "id": session_id, "expires_at": 0,
                "audio": {"input": {"format": self.format.as_api(),
                                    "transcription": self.transcription(),
                                    "turn_detection": copy.deepcopy(self.turn_detection),
                                    "noise_reduction": copy.deepcopy(self.noise_reduction)}},
                "include": self.include}

    def as_beta(self, session_id: str) -> dict[str, Any]:
        """The beta session object (``transcription_session.updated``)."""
        name = next((k for k, v in BETA_FORMATS.items()
                     if v == (self.format.type, self.format.rate)), "pcm16")
        return {"object": "realtime.transcription_session", "id": session_id,
                "input_audio_format": name, "input_audio_transcription": self.transcription(),
                "turn_detection": copy.deepcopy(self.turn_detection),
                "input_audio_noise_reduction": copy.deepcopy(self.noise_reduction),
                "include": self.include}


def _dict(value: Any, param: str, nullable: bool = False) -> dict[str, Any] | None:
    if value is None and nullable:
        return None
    if not isinstance(value, dict):
        raise ClientError(f"Invalid type for '{param}': expected an object"
                          f"{' or null' if nullable else ''}, but got {_kind(value)}.",
                          code="invalid_type", param=param)
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a decimal", type(None): "null"}.get(type(value), "a value")


def _format(value: Any, param: str) -> AudioFormat:
    fmt = _dict(value, param)
    assert fmt is not None
    kind = fmt.get("type", "audio/pcm")
    if kind == "audio/pcm":
        rate = fmt.get("rate", 24000)
        if rate not in PCM_RATES or isinstance(rate, bool):
            raise ClientError(f"Invalid value: {rate!r}. Supported values are: 24000 (the "
                              "API's rate) and 16000.", param=f"{param}.rate")
        return AudioFormat("audio/pcm", int(rate))
    if kind in ("audio/pcmu", "audio/pcma"):
        return AudioFormat(kind, 8000)
    raise ClientError(f"Invalid value: {kind!r}. Supported values are: 'audio/pcm', "
                      "'audio/pcmu', and 'audio/pcma'.", param=f"{param}.type")


def _transcription(cfg: SessionConfig, value: Any, param: str) -> SessionConfig:
    t = _dict(value, param, nullable=True)
    if t is None:  # transcription cannot be turned off here: transcribing is all this does
        return replace(cfg, model=None, language=None, prompt=None)
    language, prompt, model = t.get("language"), t.get("prompt"), t.get("model", cfg.model)
    if language is not None and (not isinstance(language, str)
                                 or (language and not _LANGUAGE.match(language))):
        raise ClientError(f"Invalid value: {language!r}. Use an ISO-639-1 code such as 'en'.",
                          param=f"{param}.language")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
        raise ClientError(f"Invalid 'prompt': a string of at most {MAX_PROMPT_CHARS} "
                          "characters.", param=f"{param}.prompt")
    if model is not None and not isinstance(model, str):
        raise ClientError("Invalid 'model': expected a string.", code="invalid_type",
                          param=f"{param}.model")
    return replace(cfg, model=model, language=language or None, prompt=prompt or None)


def _turn_detection(value: Any, param: str) -> dict[str, Any] | None:
    turn = _dict(value, param, nullable=True)
    if turn is None:
        return None
    kind = turn.get("type", "server_vad")
    if kind not in TURN_TYPES:
        raise ClientError(f"Invalid value: {kind!r}. Supported values are: 'server_vad' and "
                          "'semantic_vad'.", param=f"{param}.type")
    base = dict(DEFAULT_TURN_DETECTION) if kind == "server_vad" else {"type": kind}
    return {**base, **turn, "type": kind}


def update(cfg: SessionConfig, session: Any) -> SessionConfig:
    """``session.update``'s ``session`` (the GA shape: ``type: transcription``, ``audio.input``)
    applied to ``cfg``; only the fields present change. Raises :class:`ClientError`."""
    session = _dict(session, "session")
    assert session is not None
    if any(k in session for k in ("input_audio_format", "input_audio_transcription")):
        return update_beta(cfg, session)
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise ClientError(f"Invalid value: {kind!r}. This server serves transcription sessions "
                          "only (connect with ?intent=transcription): session.type must be "
                          "'transcription'.", param="session.type")
    if "include" in session:
        cfg = replace(cfg, include=_include(session["include"], "session.include"))
    audio = _dict(session.get("audio", {}), "session.audio")
    assert audio is not None
    inp = _dict(audio.get("input", {}), "session.audio.input")
    assert inp is not None
    param = "session.audio.input"
    if "format" in inp:
        cfg = replace(cfg, format=_format(inp["format"], f"{param}.format"))
    if "transcription" in inp:
        cfg = _transcription(cfg, inp["transcription"], f"{param}.transcription")
    if "turn_detection" in inp:
        cfg = replace(cfg, turn_detection=_turn_detection(inp["turn_detection"],
                                                          f"{param}.turn_detection"))
    if "noise_reduction" in inp:
        cfg = replace(cfg, noise_reduction=_dict(inp["noise_reduction"],
                                                 f"{param}.noise_reduction", nullable=True))
    return cfg


def update_beta(cfg: SessionConfig, session: Any) -> SessionConfig:
    """The beta ``transcription_session.update``'s ``session`` (``input_audio_format``:
    ``pcm16`` | ``g711_ulaw`` | ``g711_alaw``, ``input_audio_transcription``, ...)."""
    session = _dict(session, "session")
    assert session is not None
    if "input_audio_format" in session:
        name = session["input_audio_format"]
        if name not in BETA_FORMATS:
            raise ClientError(f"Invalid value: {name!r}. Supported values are: 'pcm16', "
                              "'g711_ulaw', and 'g711_alaw'.", param="session.input_audio_format")
        cfg = replace(cfg, format=AudioFormat(*BETA_FORMATS[name]))
    if "input_audio_transcription" in session:
        cfg = _transcription(cfg, session["input_audio_transcription"],
                             "session.input_audio_transcription")
    if "turn_detection" in session:
        cfg = replace(cfg, turn_detection=_turn_detection(session["turn_detection"],
                                                          "session.turn_detection"))
    if "input_audio_noise_reduction" in session:
        cfg = replace(cfg, noise_reduction=_dict(session["input_audio_noise_reduction"],
                                                 "session.input_audio_noise_reduction",
                                                 nullable=True))
    if "include" in session:
        cfg = replace(cfg, include=_include(session["include"], "session.include"))
    return cfg


def _include(value: Any, param: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ClientError(f"Invalid type for '{param}': expected an array of strings.",
                          code="invalid_type", param=param)
    return list(value)
