"""What a session is built from: segmentation and VAD, partials and interrupts
(:class:`SessionSettings`), the end of a turn (:class:`TurnSettings`) and the limits that
protect the worker (:class:`LimitSettings`); and :func:`session_profile`, which turns them into
the sans-I/O core's own typed parameters (the core never sees these classes)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from stt.config.base import Area, setting
from stt.core.params import SessionParams, SessionProfile
from stt.core.segmenter import (
    BYTES_PER_SECOND_16K,
    ONSET_WINDOW_FRAMES,
    VAD_START_WINDOW_MS,
    SegmenterParams,
)
from stt.core.turn import TurnParams
from stt.core.vad import FRAME_S
from stt.wire.protocol import ENDPOINTING


@dataclass(frozen=True)
class SessionSettings(Area):
    area: ClassVar[str] = "session"
    help_group: ClassVar[str] = "worker"  # its section of `stt worker --help`

    buffer_size_bytes: int = setting(480_000, "STT_BUFFER_SIZE_BYTES",
                                     "Longest segment before it is cut (at a quiet point) and "
                                     "finalized, in bytes of 16 kHz 16-bit mono audio (32000 "
                                     "per second) whatever the session's format. Reached in a "
                                     "pause, the pause's end of utterance decides instead.")
    chunk_timeout_s: float = setting(0.8, "STT_CHUNK_TIMEOUT",
                                     "Seconds of silence that end an utterance.")
    audio_gap_timeout_s: float = setting(1.0, "STT_AUDIO_GAP_TIMEOUT",
                                         "Seconds without any audio arriving that end an utterance "
                                         "in progress (push-to-talk released, client gone); the "
                                         "larger of this and STT_CHUNK_TIMEOUT applies, so network "
                                         "jitter does not cut speech.")
    stall_timeout_s: float = setting(5.0, "STT_STALL_TIMEOUT_S",
                                     "Longest wait for audio that stops arriving while the last "
                                     "frames are voiced (a network stall mid-word): the "
                                     "utterance resumes with the burst that follows, and ends "
                                     "after this long without audio.")
    enable_vad: bool = setting(True, "STT_ENABLE_VAD",
                               "Voice activity detection; off = every frame counts as speech.")
    vad_aggressiveness: int = setting(2, "STT_VAD_AGGRESSIVENESS", "webrtcvad mode, 0-3.")
    vad_start_ms: int = setting(90, "STT_VAD_START_MS",
                                f"Voiced audio within a {VAD_START_WINDOW_MS} ms window that "
                                "opens an utterance.")
    preroll_ms: int = setting(300, "STT_PREROLL_MS",
                              "Audio kept before detected speech, so first syllables survive.")
    hangover_ms: int = setting(150, "STT_HANGOVER_MS",
                               "Silence kept after speech in a finalized segment (every final "
                               "of an utterance ends exactly this long after its last voiced "
                               "frame).")
    noise_gate_db: float = setting(10.0, "STT_NOISE_GATE_DB",
                                   "A voiced frame less than this far above the noise floor "
                                   "does not hold an utterance open (breath, room noise after "
                                   "the last word); 0 = off.")
    partial_interval_s: float = setting(0.5, "STT_PARTIAL_INTERVAL",
                                        "Seconds of new speech between partial transcripts "
                                        "(0 = no partials).")
    partial_window_s: float = setting(10.0, "STT_PARTIAL_WINDOW_S",
                                      "Longest utterance a partial decodes from its start; past "
                                      "it, partials decode only the audio after the stable words.")
    final_window: str = setting("full", "STT_FINAL_WINDOW",
                                "What a final decodes once partials have made words stable: full "
                                "(the whole utterance; the most accurate, may revise a stable "
                                "word), prefix (the whole utterance with the stable words forced "
                                "as its start: never revises them; local engines) or tail (only "
                                "the audio after them: cheapest, soonest, least accurate).",
                                choices=("full", "prefix", "tail"))
    enable_interrupt_detection: bool = setting(True, "STT_ENABLE_INTERRUPT_DETECTION",
                                               "Detect the user talking over the assistant while "
                                               "'responding'; off = half duplex.")
    min_pitched_ms: int = setting(90, "STT_MIN_PITCHED_MS",
                                  "Voiced audio with a pitch an utterance needs before it is "
                                  "transcribed or can interrupt: noise, clicks and door slams have "
                                  "none (0 = off).")
    interrupt_min_speech_ms: int = setting(300, "STT_INTERRUPT_MIN_SPEECH_MS",
                                           "Voiced audio needed before an interrupt fires.")

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(0 <= self.vad_aggressiveness <= 3, "vad_aggressiveness", "must be 0, 1, 2 or 3")
        need(self.chunk_timeout_s > 0, "chunk_timeout_s", "must be > 0 seconds")
        need(self.audio_gap_timeout_s > 0, "audio_gap_timeout_s", "must be > 0 seconds")
        need(self.buffer_size_bytes >= 3200, "buffer_size_bytes", "must be at least 3200 bytes")
        need(self.partial_interval_s >= 0, "partial_interval_s", "must be >= 0")
        need(self.stall_timeout_s >= 0, "stall_timeout_s", "must be >= 0")
        need(self.partial_window_s >= 1.0, "partial_window_s", "must be at least 1 s")
        need(self.interrupt_min_speech_ms >= 30, "interrupt_min_speech_ms", "must be >= 30 ms")
        need(0 <= self.min_pitched_ms <= 1000, "min_pitched_ms", "must be between 0 and 1000 ms")
        need(0 <= self.vad_start_ms <= VAD_START_WINDOW_MS, "vad_start_ms",
             f"must be between 0 and {VAD_START_WINDOW_MS} ms")
        need(0 <= self.preroll_ms <= 2000, "preroll_ms", "must be between 0 and 2000 ms")
        need(0 <= self.hangover_ms <= 2000, "hangover_ms", "must be between 0 and 2000 ms")
        need(0 <= self.noise_gate_db <= 40, "noise_gate_db", "must be between 0 and 40 dB")


@dataclass(frozen=True)
class TurnSettings(Area):
    area: ClassVar[str] = "turn"
    help_group: ClassVar[str] = "worker"  # its section of `stt worker --help`

    endpointing: str = setting("model", "STT_ENDPOINTING",
                               "How a turn's end is found: model (the end-of-turn model on the "
                               "trailing silence, combined with the speculative final's words; "
                               "STT_TURN_* below), silence (STT_CHUNK_TIMEOUT of silence) or "
                               "adaptive (STT_ENDPOINT_MIN_S once the speculative final reads as "
                               "a finished sentence, STT_ENDPOINT_MAX_S when it does not). A "
                               "start may ask for model or silence; without the model file, "
                               "silence.", choices=ENDPOINTING)
    endpoint_min_s: float = setting(0.5, "STT_ENDPOINT_MIN_S",
                                    "Adaptive endpointing: the silence that ends a finished "
                                    "sentence.")
    endpoint_max_s: float = setting(1.2, "STT_ENDPOINT_MAX_S",
                                    "Adaptive endpointing: the silence that ends an utterance "
                                    "that reads as unfinished.")
    turn_query_s: str = setting("0.06,0.3,0.6,0.8", "STT_TURN_QUERY_S",
                                "Model endpointing: the trailing silences (seconds, ascending) "
                                "at which the end-of-turn model is asked.")
    turn_thresholds: str = setting("0.06:0.8,0.3:1.1,0.6:0.3", "STT_TURN_THRESHOLDS",
                                   "Model endpointing: silence:score pairs; from that much "
                                   "silence on, a combined score (the model's probability, plus "
                                   "STT_TURN_FINISHED_BONUS when the words end a sentence; never "
                                   "when they end on 'the', 'to', 'and', 'um' or a comma) at "
                                   "least this high ends the turn. A probability is held to the "
                                   "pair of the silence it was asked at when that one is lower.")
    turn_finished_bonus: float = setting(0.3, "STT_TURN_FINISHED_BONUS",
                                         "Model endpointing: added to the model's probability "
                                         "when the speculative final ends like a finished "
                                         "sentence.")
    turn_eager: float = setting(0.6, "STT_TURN_EAGER",
                                "Model endpointing: the combined score that sends an "
                                "eager_end_of_turn (once per pause; turn_resumed if speech "
                                "comes back); above 1.5 = never.")
    turn_speculate_p: float = setting(0.3, "STT_TURN_SPECULATE_P",
                                      "Model endpointing: a probability at least this high "
                                      "starts the final's decode at once instead of at "
                                      "STT_SPECULATIVE_MS (a pause the model calls mid-sentence "
                                      "costs no decode).")
    turn_max_silence_s: float = setting(1.3, "STT_TURN_MAX_SILENCE_S",
                                        "Model endpointing: the silence that ends a turn "
                                        "whatever the model and the words say.")
    turn_model_path: str = setting("", "STT_TURN_MODEL_PATH",
                                   "The Smart Turn v3.2 ONNX file (empty: the copy script/setup "
                                   "installs in the environment); its SHA-256 is checked before "
                                   "loading.")
    turn_threads: int = setting(1, "STT_TURN_THREADS",
                                "Threads that run end-of-turn model queries (one query per "
                                "session at a time; queries never delay a final).")
    speculative_ms: int = setting(200, "STT_SPECULATIVE_MS",
                                  "Silence after speech at which the final's decode starts, "
                                  "before the endpoint is certain; published at the endpoint if "
                                  "no speech came back, discarded if it did (0 = off: decode at "
                                  "the endpoint).")

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(0 <= self.speculative_ms <= 10_000, "speculative_ms", "must be between 0 and 10000")
        need(self.turn_max_silence_s >= 0.1, "turn_max_silence_s", "must be at least 0.1 s")
        need(1 <= self.turn_threads <= 16, "turn_threads", "must be between 1 and 16")
        try:
            self.steps()
        except ValueError as exc:
            need(False, "turn_thresholds", str(exc))
        need(0.1 <= self.endpoint_min_s <= self.endpoint_max_s <= 10, "endpoint_min_s",
             "must be at least 0.1 s and at most STT_ENDPOINT_MAX_S (at most 10 s)")

    def steps(self) -> tuple[tuple[float, ...], tuple[tuple[float, float], ...]]:
        """STT_TURN_QUERY_S and STT_TURN_THRESHOLDS, parsed."""
        try:
            query = tuple(float(x) for x in self.turn_query_s.split(",") if x.strip())
            steps = tuple((float(a), float(b)) for a, b in
                          (pair.split(":") for pair in self.turn_thresholds.split(",")
                           if pair.strip()))
        except ValueError:
            raise ValueError("STT_TURN_QUERY_S is comma-separated seconds and "
                             "STT_TURN_THRESHOLDS comma-separated silence:score pairs") from None
        return query, steps

    def params(self, mode: str | None, silence_s: float) -> TurnParams:
        """The end-of-turn rules (``mode``: a start's choice, else STT_ENDPOINTING's);
        ``silence_s``: STT_CHUNK_TIMEOUT, what ends a turn without the model."""
        mode = mode or self.endpointing
        query, steps = self.steps()
        return TurnParams(mode="model" if mode == "model" else "silence", query_s=query,
                          thresholds=steps, finished_bonus=self.turn_finished_bonus,
                          eager=self.turn_eager, max_silence_s=self.turn_max_silence_s,
                          speculate_p=self.turn_speculate_p,
                          fallback_s=min(silence_s, self.turn_max_silence_s))


@dataclass(frozen=True)
class LimitSettings(Area):
    area: ClassVar[str] = "limits"
    help_group: ClassVar[str] = "limits"  # its section of `stt worker --help`

    session_idle_timeout_s: float = setting(30.0, "STT_SESSION_IDLE_TIMEOUT",
                                            "Seconds without any message before a session is ended "
                                            "(reason idle_timeout).")
    max_sessions: int = setting(2000, "STT_MAX_SESSIONS",
                                "Concurrent sessions per worker; more get 'overloaded'.")
    max_chunk_bytes: int = setting(256 * 1024, "STT_MAX_CHUNK_BYTES",
                                   "Largest decoded audio chunk; larger get 'too_large'.")
    max_segment_s: float = setting(30.0, "STT_MAX_SEGMENT_SECONDS",
                                   "Hard cap on one segment sent to the engine and on one chunk's "
                                   "duration.")
    final_retry_s: float = setting(10.0, "STT_FINAL_RETRY_S",
                                   "How long a final whose engine call failed is retried (with "
                                   "backoff) before the session gets engine_failed; partials "
                                   "are not retried.")
    max_pending_segments: int = setting(8, "STT_MAX_PENDING_SEGMENTS",
                                        "Finals queued per session while the engine is busy; more "
                                        "are dropped with 'overloaded'.")
    drain_timeout_s: float = setting(20.0, "STT_DRAIN_TIMEOUT_S",
                                     "On SIGTERM, longest wait for live sessions' finals.")

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(self.final_retry_s >= 0, "final_retry_s", "must be >= 0")
        need(self.session_idle_timeout_s > 0, "session_idle_timeout_s", "must be > 0")
        need(self.max_sessions > 0, "max_sessions", "must be > 0")
        need(self.max_chunk_bytes > 0, "max_chunk_bytes", "must be > 0")
        need(1.0 <= self.max_segment_s <= 600, "max_segment_s", "must be between 1 and 600 s")
        need(self.max_pending_segments > 0, "max_pending_segments", "must be > 0")
        need(self.drain_timeout_s >= 0, "drain_timeout_s", "must be >= 0")


def segmenter_params(s: SessionSettings, limits: LimitSettings,
                     endpoint_s: float | None = None) -> SegmenterParams:
    """Every segmentation rule in frames. ``endpoint_s``: the longest trailing silence (the
    session's endpointing decides it: the model's or adaptive endpointing's maximum, which
    the session usually undercuts); by default STT_CHUNK_TIMEOUT."""
    endpoint = max(1, math.ceil((endpoint_s or s.chunk_timeout_s) / FRAME_S))
    # STT_BUFFER_SIZE_BYTES is bytes of 16 kHz 16-bit mono, the seed's format: the limit is a
    # length of speech that does not shrink 12x when a browser sends 48 kHz stereo float.
    longest_s = min(s.buffer_size_bytes / BYTES_PER_SECOND_16K, limits.max_segment_s)
    vad = s.enable_vad
    return SegmenterParams(
        vad_enabled=vad, vad_aggressiveness=s.vad_aggressiveness,
        onset_frames=max(1, math.ceil(s.vad_start_ms / 1000 / FRAME_S)) if vad else 1,
        preroll_frames=max(ONSET_WINDOW_FRAMES, round(s.preroll_ms / 1000 / FRAME_S)),
        endpoint_frames=endpoint,
        hangover_frames=max(0, round(s.hangover_ms / 1000 / FRAME_S)),
        gate_db=s.noise_gate_db if vad else 0.0,
        max_frames=max(endpoint + 2, int(longest_s / FRAME_S)),
        pitch_frames=math.ceil(s.min_pitched_ms / 1000 / FRAME_S) if vad else 0)


def session_params(s: SessionSettings, turn_settings: TurnSettings, limits: LimitSettings,
                   mode: str) -> SessionParams:
    """A session's parameters under one endpointing mode (model, silence or adaptive)."""
    turn = turn_settings.params(mode, s.chunk_timeout_s)
    speculative = (max(1, round(turn_settings.speculative_ms / 1000 / FRAME_S))
                   if turn_settings.speculative_ms > 0 else 0)
    if mode == "adaptive":
        endpoint_s = turn_settings.endpoint_max_s
    elif turn.uses_model:
        # the final's decode starts at STT_SPECULATIVE_MS, or sooner when the model says
        # the turn is probably over (Session.turn_scored)
        endpoint_s = turn.max_silence_s
    else:
        endpoint_s = s.chunk_timeout_s
    return SessionParams(
        segmenter=segmenter_params(s, limits, endpoint_s),
        audio_gap_s=max(s.audio_gap_timeout_s, s.chunk_timeout_s),
        partial_frames=(round(s.partial_interval_s / FRAME_S)
                        if s.partial_interval_s > 0 else 0),
        partial_window_frames=round(s.partial_window_s / FRAME_S),
        interrupt_frames=max(1, math.ceil(s.interrupt_min_speech_ms / 1000 / FRAME_S)),
        speculative_frames=speculative,
        stall_s=s.stall_timeout_s,
        adaptive=mode == "adaptive",
        endpoint_fixed_frames=max(1, math.ceil(s.chunk_timeout_s / FRAME_S)),
        endpoint_min_frames=max(1, math.ceil(turn_settings.endpoint_min_s / FRAME_S)),
        turn=turn)


def session_profile(s: SessionSettings, turn: TurnSettings, limits: LimitSettings,
                    language: str, model: bool = True) -> SessionProfile:
    """What every session of a worker reads. ``model``: whether the end-of-turn model can be
    asked (without it, a session that asks for model endpointing gets silence)."""
    params = {mode: session_params(s, turn, limits,
                                   mode if mode != "model" or model else "silence")
              for mode in ENDPOINTING}
    return SessionProfile(
        params=params, endpointing=turn.endpointing, idle_timeout_s=limits.session_idle_timeout_s,
        language=language or None, max_chunk_bytes=limits.max_chunk_bytes,
        max_segment_s=limits.max_segment_s, interrupts=s.enable_interrupt_detection,
        final_window=s.final_window, max_pending_segments=limits.max_pending_segments)
