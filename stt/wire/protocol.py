"""Wire protocol: msgpack maps on ``ai.voice.stream.{id}`` in, ``ai.voice.transcription.{id}`` out.

Long because it is every message of the protocol, in and out, with its checks.

This module is the only place that knows field names, subjects and the msgpack codec.
Input is parsed into small typed events (:class:`Start`, :class:`Chunk`, :class:`StateChange`,
:class:`End`); anything malformed raises :class:`ProtocolError`, whose ``code`` and ``message``
travel back to the client in an ``error`` message. Output messages are built by the
typed classes (:class:`Transcript`, :class:`Interrupt`, ...) and turned into wire maps by
:func:`encode`, so every message of a kind carries the same fields.
"""

from __future__ import annotations

import binascii
import enum
import math
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_SESSION_ID_LEN = 128
MAX_PROMPT_CHARS = 2000
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 192_000
MAX_CHANNELS = 8


class State(str, enum.Enum):
    LISTENING = "listening"
    RESPONDING = "responding"


class ErrorCode(str, enum.Enum):
    BAD_MESSAGE = "bad_message"
    BAD_AUDIO = "bad_audio"
    SESSION_MISMATCH = "session_mismatch"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    ENGINE_FAILED = "engine_failed"


class EndReason(str, enum.Enum):
    END = "end"
    IDLE_TIMEOUT = "idle_timeout"
    SHUTDOWN = "shutdown"
    HANDOVER = "handover"  # carried on by another replica (never sent: no `end` is published)


class ProtocolError(Exception):
    """A message the worker cannot use; reported to the client as ``type: error``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


ENCODINGS = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
ENDPOINTING = ("model", "silence", "adaptive")  # a start's "endpointing" (and STT_ENDPOINTING)

# --- subjects -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subjects:
    input_subject: str = "ai.voice.stream.*"
    output_prefix: str = "ai.voice.transcription"

    def session_id(self, subject: str) -> str:
        """The session id is the last token of the input subject."""
        token = subject.rsplit(".", 1)[-1]
        if not token or len(token) > MAX_SESSION_ID_LEN:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"bad session id in subject {subject[:200]!r}")
        return token

    def output(self, session_id: str) -> str:
        return f"{self.output_prefix}.{session_id}"

    def input(self, session_id: str) -> str:
        return f"{self.input_subject.rsplit('.', 1)[0]}.{session_id}"

    @property
    def input_template(self) -> str:
        return self.input("{session_id}")

    @property
    def output_template(self) -> str:
        return self.output("{session_id}")

    @property
    def output_wildcard(self) -> str:
        return self.output("*")


# --- codec ------------------------------------------------------------------------------------


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(payload: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises many types for garbage
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"payload is not msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"payload must be a msgpack map, got {type(message).__name__}")
    return message


# --- input events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    sample_rate: int = 16000
    channels: int = 1
    encoding: str = "pcm_s16le"
    state: State = State.LISTENING
    speaker_id: str | None = None
    language: str | None = None
    prompt: str | None = None
    word_timestamps: bool = False
    claimed_session_id: str | None = None  # the body's session_id, if any
    endpointing: str | None = None  # "model" | "silence": how this session's turns end


@dataclass(frozen=True)
class Chunk:
    """Audio. The chunk's ``timestamp`` (capture time) is checked but not kept: the session's
    timeline is the samples themselves, which jitter and bursts cannot shift."""

    audio: bytes
    seq: int | None = None


@dataclass(frozen=True)
class StateChange:
    state: State


@dataclass(frozen=True)
class End:
    pass


Event = Start | Chunk | StateChange | End


def parse(message: dict[str, Any]) -> Event:
    kind = message.get("type")
    if kind == "chunk":  # the hot path first
        return _parse_chunk(message)
    if kind == "start":
        return _parse_start(message)
    if kind == "state_change":
        return StateChange(state=_state(message.get("state"), "state_change"))
    if kind == "end":
        return End()
    if kind is None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message has no 'type'")
    raise ProtocolError(ErrorCode.BAD_MESSAGE,
                        f"unknown type {str(kind)[:40]!r}; expected start, chunk, state_change or end")


def _state(value: Any, where: str) -> State:
    try:
        return State(value)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"{where}: state must be 'listening' or 'responding', "
                            f"got {str(value)[:40]!r}") from None


def _optional_str(message: dict[str, Any], key: str, limit: int) -> str | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start: {key} must be a string")
    if len(value) > limit:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start: {key} longer than {limit} characters")
    return value or None


def _int_field(message: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = message.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start: {key} must be an integer")
    if not low <= value <= high:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"start: {key} must be in {low}..{high}, got {value}")
    return int(value)


def _parse_start(message: dict[str, Any]) -> Start:
    encoding = message.get("encoding") or "pcm_s16le"
    if encoding not in ENCODINGS:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"start: encoding {str(encoding)[:40]!r} not supported; "
                            f"use one of {', '.join(ENCODINGS)}")
    claimed = message.get("session_id")
    speaker = message.get("speaker_id")
    if speaker is not None and not isinstance(speaker, str | int):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start: speaker_id must be a string")
    return Start(
        sample_rate=_int_field(message, "sample_rate", 16000, MIN_SAMPLE_RATE, MAX_SAMPLE_RATE),
        channels=_int_field(message, "channels", 1, 1, MAX_CHANNELS),
        encoding=encoding,
        state=_state(message.get("state") or "listening", "start"),
        speaker_id=None if speaker is None else str(speaker)[:MAX_SESSION_ID_LEN],
        language=_optional_str(message, "language", 16),
        prompt=_optional_str(message, "prompt", MAX_PROMPT_CHARS),
        word_timestamps=bool(message.get("word_timestamps", False)),
        claimed_session_id=None if claimed is None else str(claimed)[:MAX_SESSION_ID_LEN],
        endpointing=_endpointing(message.get("endpointing")),
    )


def _endpointing(value: Any) -> str | None:
    if value is None:
        return None
    if value not in ENDPOINTING:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"start: endpointing must be one of {', '.join(ENDPOINTING)}, "
                            f"got {str(value)[:40]!r}")
    return str(value)


def _parse_chunk(message: dict[str, Any]) -> Chunk:
    # Every message of every session comes through here: the common types are checked first
    # with ``type(x) is``, the general checks (subclasses, bool) only for the rest.
    get = message.get
    audio = get("audio")
    if audio is None:
        b64 = get("audio_b64")
        if b64 is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "chunk has neither 'audio_b64' nor 'audio'")
        if not isinstance(b64, str | bytes):
            raise ProtocolError(ErrorCode.BAD_AUDIO, "chunk: audio_b64 must be a base64 string")
        try:
            # what b64decode(validate=True) accepts, without its regular expression pass
            audio = _a2b_base64(b64, strict_mode=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(ErrorCode.BAD_AUDIO, "chunk: audio_b64 is not valid base64") from None
    elif type(audio) is not bytes and not isinstance(audio, bytes):
        raise ProtocolError(ErrorCode.BAD_AUDIO, "chunk: audio must be msgpack bin (raw bytes)")
    timestamp = get("timestamp")
    if timestamp is not None and not (type(timestamp) is float and timestamp - timestamp == 0.0) \
            and (isinstance(timestamp, bool) or not isinstance(timestamp, int | float)
                 or not math.isfinite(timestamp)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "chunk: timestamp must be a number (epoch seconds)")
    seq = get("seq")
    if seq is not None and type(seq) is not int and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "chunk: seq must be an integer")
    return Chunk(audio=audio, seq=seq)


_a2b_base64 = binascii.a2b_base64


# --- output messages --------------------------------------------------------------------------
# Typed, as the input is: the session makes these, the worker numbers nothing and reads their
# fields; :func:`encode` turns one into the wire map, with the session's ``sequence`` and the
# publication ``timestamp`` stamped there, at the edge.


@dataclass(frozen=True)
class Transcript:
    session_id: str
    text: str
    is_final: bool
    state: State
    speaker_id: str | None
    segment_id: int
    start_s: float
    end_s: float
    language: str | None
    words: list[dict[str, Any]] | None = None
    # partials only: the committed words, the rest, and the share committed
    stable_text: str | None = None
    unstable_text: str | None = None
    stability: float | None = None
    # finals only: does it end the user's turn (not a size cut), and the end-of-turn model's
    # last probability for it (None: not asked)
    end_of_turn: bool | None = None
    turn_probability: float | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "transcript": self.text, "is_partial": not self.is_final, "is_final": self.is_final,
            "speaker_id": self.speaker_id, "has_voice_activity": True, "state": self.state.value,
            "segment_id": self.segment_id, "start": round(self.start_s, 3),
            "end": round(self.end_s, 3), "language": self.language}
        if self.words:
            out["words"] = self.words
        if self.stable_text is not None:
            out.update(stable_text=self.stable_text, unstable_text=self.unstable_text,
                       stability=self.stability)
        if self.end_of_turn is not None:
            out.update(end_of_turn=self.end_of_turn, turn_probability=_round(self.turn_probability))
        return out


def _round(p: float | None) -> float | None:
    return None if p is None else round(p, 3)


@dataclass(frozen=True)
class _SegmentEvent:
    """A message about one utterance of the session (the fields they all carry)."""

    session_id: str
    speaker_id: str | None
    segment_id: int

    def fields(self) -> dict[str, Any]:
        return {"speaker_id": self.speaker_id, "segment_id": self.segment_id}


@dataclass(frozen=True)
class EagerEndOfTurn(_SegmentEvent):
    """The user has probably finished: the speculative transcript, so an assistant can start
    preparing its answer. A ``turn_resumed`` follows if they go on; the final with
    ``end_of_turn`` if they do not."""

    text: str
    turn_probability: float | None
    silence_s: float

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "transcript": self.text,
                "turn_probability": _round(self.turn_probability),
                "silence": round(self.silence_s, 3)}


@dataclass(frozen=True)
class TurnResumed(_SegmentEvent):
    """Speech came back after an ``eager_end_of_turn``: discard what was prepared."""


@dataclass(frozen=True)
class Interrupt(_SegmentEvent):
    start_s: float  # session time where the interrupting speech began

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "start": round(self.start_s, 3)}


@dataclass(frozen=True)
class InterruptCancelled(_SegmentEvent):
    """The speech behind an interrupt had no words: the assistant may resume."""

    state: State  # the session's state after it (responding, unless the client changed it)

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "state": self.state.value}


@dataclass(frozen=True)
class SessionEnd:
    session_id: str
    reason: EndReason
    audio_s: float
    segments: int
    speaker_id: str | None = None

    def fields(self) -> dict[str, Any]:
        return {"reason": self.reason.value, "audio_seconds": round(self.audio_s, 3),
                "segments": self.segments, "speaker_id": self.speaker_id}


@dataclass(frozen=True)
class Error:
    session_id: str
    code: ErrorCode
    message: str

    def fields(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message}


Outgoing = (Transcript | Interrupt | InterruptCancelled | EagerEndOfTurn | TurnResumed
            | SessionEnd | Error)

OUTGOING_TYPES: dict[type, str] = {Transcript: "transcript", Interrupt: "interrupt",
                                   InterruptCancelled: "interrupt_cancelled",
                                   EagerEndOfTurn: "eager_end_of_turn",
                                   TurnResumed: "turn_resumed", SessionEnd: "end",
                                   Error: "error"}


def kind(message: Outgoing) -> str:
    """The wire ``type`` of an outgoing message."""
    return OUTGOING_TYPES[type(message)]


def encode(message: Outgoing, sequence: int, timestamp: float) -> dict[str, Any]:
    """The wire map: ``sequence`` is the session's count (0 for a message outside a live
    session), ``timestamp`` the publication time in epoch seconds."""
    return {"type": kind(message), "session_id": message.session_id, "sequence": sequence,
            "timestamp": timestamp, **message.fields()}
