"""What a session is built from: its parameters in frames, per endpointing mode, and its limits
(``stt.config.Settings.session_profile`` builds them from the settings)."""

from __future__ import annotations

from dataclasses import dataclass, field

from stt.core.segmenter import SegmenterParams
from stt.core.turn import TurnParams


@dataclass(frozen=True)
class SessionParams:
    """The settings a session reads, in frames where they count frames."""

    segmenter: SegmenterParams
    audio_gap_s: float           # no audio arriving for this long ends an open segment
    partial_frames: int          # new frames between partials (0 = no partials)
    partial_window_frames: int   # longest segment a partial decodes from its start
    interrupt_frames: int        # voiced frames since onset before an interrupt fires
    speculative_frames: int      # trailing silence at which the final's decode starts (0 = off)
    stall_s: float               # longest wait for audio after a stall mid-speech
    # adaptive endpointing: the segmenter waits endpoint_max; the session ends a segment at
    # endpoint_min when the speculative final reads as finished, at endpoint_fixed without one
    adaptive: bool = False
    endpoint_fixed_frames: int = 27
    endpoint_min_frames: int = 27
    # model endpointing (stt.core.turn): the segmenter waits turn.max_silence_s; the session asks
    # the end-of-turn model during the silence and ends the turn when it and the words agree
    turn: TurnParams = field(default_factory=lambda: TurnParams(mode="silence"))


@dataclass(frozen=True)
class SessionProfile:
    """Everything a session reads, decided once for a worker (``Settings.session_profile``): the
    parameters for each endpointing mode a start may ask for, and the limits."""

    params: dict[str, SessionParams]  # per endpointing mode (model, silence, adaptive)
    endpointing: str = "silence"      # the mode of a session whose start names none
    idle_timeout_s: float = 30.0      # no message for this long ends the session
    language: str | None = None       # a start that names none
    max_chunk_bytes: int = 1 << 20
    max_segment_s: float = 30.0       # the longest chunk, in seconds of audio
    interrupts: bool = True           # detect the user talking over the assistant
    final_window: str = "full"        # what a final decodes: full, prefix or tail
    max_pending_segments: int = 8     # finals queued per session before one is refused

    def params_for(self, endpointing: str | None) -> SessionParams:
        return self.params[endpointing or self.endpointing]
