"""What a session asks of the world around it: publish a message, run an engine job (and
withdraw one), ask the end-of-turn model, close. The worker carries them out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stt.core.audio import SAMPLE_RATE
from stt.core.transcription import TranscribeOptions, Word
from stt.wire.protocol import EndReason, Outgoing


@dataclass(frozen=True)
class Job:
    """Audio for the engine, and what to do with the answer."""

    job_id: int
    session_id: str
    segment_id: int
    audio: np.ndarray
    is_final: bool
    start_s: float             # session-timeline time of audio[0] (word times are relative to it)
    end_s: float
    segment_start_s: float     # where the utterance began (partials may get only its tail)
    options: TranscribeOptions
    created_at: float
    speech_end_at: float | None = None  # when the end of speech was decided (finals)
    had_partials: bool = False  # partials were published for this segment: a final must follow
    interrupted: bool = False   # this utterance fired an interrupt
    speculative: bool = False   # a final decoded before its endpoint was certain
    committed: list[str] = field(default_factory=list)  # words already published as stable
    committed_words: tuple[Word, ...] = ()  # their times on the session timeline, when known
    end_of_turn: bool = True    # a final that ends the user's turn (a size cut does not)
    turn_probability: float | None = None  # the end-of-turn model's last answer for it

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


@dataclass(frozen=True)
class Publish:
    message: Outgoing
    sequence: int
    speech_ended_at: float | None = None  # a final: when its end of speech was decided


@dataclass(frozen=True)
class Transcribe:
    job: Job


@dataclass(frozen=True)
class Cancel:
    """A job asked for earlier is no longer wanted (its answer will be ignored)."""

    job_id: int


@dataclass(frozen=True)
class ScoreTurn:
    """Ask the end-of-turn model about ``audio`` (the utterance so far, its trailing silence
    included); the answer comes back through :meth:`Session.turn_scored`."""

    query_id: int
    session_id: str
    audio: np.ndarray


@dataclass(frozen=True)
class Close:
    reason: EndReason


Action = Publish | Transcribe | Cancel | ScoreTurn | Close
