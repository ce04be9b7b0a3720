"""What a transcription job asks and what an engine answers: the types the session builds and
reads, and every engine (:mod:`stt.engines.base`) implements against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None          # None = detect (where the engine can)
    prompt: str | None = None            # vocabulary hint from the session's start
    context: str | None = None           # previous final of the session
    word_timestamps: bool = False
    is_partial: bool = False             # partials may be decoded more cheaply
    # Timed segments wanted (an upload's verbose_json, srt, vtt): the final is decoded with
    # Whisper's timestamp tokens. A streaming final is one segment (its times are the
    # segmenter's, its words the alignment's), which decodes about a tenth sooner on CPU.
    segment_times: bool = False
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
