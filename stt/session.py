"""One streaming session as a plain object: events and the current time in, actions out.

Theory of operation
-------------------
Everything that decides *what happens to a session* lives in this file; nothing here does
I/O, reads a clock or knows about NATS. The worker feeds it:

* ``handle(event, now)``        a parsed input message (start, chunk, state_change, end);
* ``reject(error, now)``        a message for this session that could not be parsed;
* ``tick(now)``                 the passage of time (idle timeout, audio that stopped arriving);
* ``transcribed(job_id, ...)``  an engine result for a job this session asked for;
* ``finish(reason, now)``       end it (``end``, idle timeout, worker shutdown).

and executes the returned actions in order: :class:`Publish` (a message, already numbered
with the session's ``sequence``), :class:`Transcribe` (a :class:`Job` for the engine) and
:class:`Close` (forget the session).

Audio path: each chunk is decoded and resampled to 16 kHz, cut into 30 ms frames, and each
frame gets one VAD decision. While QUIET, the last ``preroll_ms`` of frames are kept; speech
opens a segment when ``vad_start_ms`` of the last 150 ms (``VAD_START_WINDOW_MS``) are voiced,
and the segment starts with that pre-roll. While SPEAKING, the segment ends (a *final*) on ``chunk_timeout_s`` of trailing
silence, on no audio arriving for ``audio_gap_timeout_s``, on a ``state_change``, ``end`` or idle
timeout; when it reaches the size limit it is cut at its quietest recent point and the rest
carries on as the next segment. Every ``partial_interval_s`` of new audio, a *partial* of the
growing segment is requested.

Ordering: at most one engine job per session is in flight; finals wait in a bounded queue and
partials are only requested when nothing is waiting, so results come back in order and a
session's messages are published in order. A partial that returns after its segment was
finalized is dropped.

Barge-in: while ``responding`` (with interrupt detection on) speech still opens a segment,
but as a *candidate*: once it holds ``interrupt_min_speech_ms`` of voiced frames (and most of
its frames since onset are voiced), an ``interrupt`` is published, the session switches to
``listening`` and the candidate, pre-roll included, carries on as a normal utterance. A
candidate that ends before that (a cough, a click) is discarded. With detection off, audio
received while ``responding`` is dropped (half duplex).
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE, Converter, to_pcm16
from .config import VAD_START_WINDOW_MS, Settings
from .engines.base import TranscribeOptions, Transcription, Word
from .protocol import (
    Chunk,
    End,
    EndReason,
    ErrorCode,
    Event,
    ProtocolError,
    Start,
    State,
    StateChange,
    end_message,
    error_message,
    interrupt_cancelled_message,
    interrupt_message,
    transcript_message,
)
from .textnorm import edit_row
from .vad import FRAME_S, FRAME_SAMPLES, PERIODIC_THRESHOLD, Framer, FrameVAD, periodicity

START_WINDOW_FRAMES = round(VAD_START_WINDOW_MS / 1000 / FRAME_S)  # the speech-onset window
INTERRUPT_MIN_VOICED_RATIO = 0.6  # of frames since onset, so a few loud clicks do not qualify
CUT_SEARCH_S = 3.0               # how far back from the size limit to look for a quiet point
SEEN_SEQ_WINDOW = 256            # recent chunk seq numbers kept to tell duplicates from late ones
BYTES_PER_SECOND_16K = SAMPLE_RATE * 2  # STT_BUFFER_SIZE_BYTES is counted in 16 kHz s16 mono
PITCH_CHECK_FRAMES = 3           # periodicity is computed in batches of this many new frames
# Stable partials: LocalAgreement-2 (a word two consecutive hypotheses agree on is committed).
# Measured with sphinx on 30 corpus clips at real time (bench/evaluate.py and README): waiting
# for 3 agreeing hypotheses or holding back the newest agreed word did not lower the finals' WER
# further, and decoding partials only after the committed words (trimming) raised it from +0.008
# to +0.053 over offline decoding, so trimming is kept for utterances past STT_PARTIAL_WINDOW_S.
AGREEMENT = 2
HOLDBACK_WORDS = 0
# With real Whisper (tiny.en, short-window partials; tests/test_accuracy.py) LocalAgreement-2
# alone committed words that two early partials agreed on wrongly ("Fresh N" for "fresh Nelly"):
# finals +0.038 WER over whole-clip decoding. A word is committed only once this much audio
# follows it.
SETTLED_MARGIN_S = 1.0


class VADState(enum.Enum):
    QUIET = "quiet"
    SPEAKING = "speaking"


# --- actions ---------------------------------------------------------------------------------


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
    speech_end_at: float | None = None  # wall clock when the end of speech was decided (finals)
    had_partials: bool = False  # partials were published for this segment: a final must follow
    interrupted: bool = False   # this utterance fired an interrupt
    committed: list[str] = field(default_factory=list)  # words already published as stable
    committed_words: tuple[Word, ...] = ()  # their times on the session timeline, when known

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


@dataclass(frozen=True)
class Publish:
    message: dict[str, Any]


@dataclass(frozen=True)
class Transcribe:
    job: Job


@dataclass(frozen=True)
class Close:
    reason: EndReason


Action = Publish | Transcribe | Close


@dataclass
class Counters:
    """Per-session tallies the worker turns into metrics (never labelled by session)."""

    chunks_ok: int = 0
    chunks_duplicate: int = 0
    chunks_late: int = 0
    chunks_dropped: int = 0
    seq_gaps: int = 0
    audio_in_s: float = 0.0
    interrupts: int = 0
    finals: int = 0
    partials: int = 0


@dataclass
class _Segment:
    segment_id: int
    first_frame: int                  # index on the session's frame timeline
    # the audio, one growing buffer: a job takes a slice instead of joining a list of frames
    audio: np.ndarray = field(default_factory=lambda: np.empty(64 * FRAME_SAMPLES, np.float32))
    n_frames: int = 0
    voiced: list[bool] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    voiced_count: int = 0
    voiced_since_onset: int = 0
    frames_since_onset: int = 0
    trailing_silence: int = 0
    partial_at_frames: int = 0        # segment length when the last partial was requested
    partial_at_voiced: int = 0        # voiced frames then: no partial without new speech
    partials_published: int = 0
    last_partial_text: str = ""
    candidate: bool = False           # opened while responding; becomes real on interrupt
    interrupted: bool = False         # fired an interrupt (a wordless final cancels it)
    periodic: int = 0                 # voiced frames with a pitch, counted until there are enough
    pitch_checked: int = 0            # frames examined for pitch so far
    # stable partials (LocalAgreement-2): words two consecutive hypotheses agreed on are
    # committed and never withdrawn; the audio they cover is not decoded again for partials
    committed: list[str] = field(default_factory=list)
    committed_frames: int = 0         # segment frames covered by the committed words (if timed)
    committed_words: list[Word] = field(default_factory=list)  # their times, session timeline
    previous_tails: list[list[str]] = field(default_factory=list)  # newest last

    def append(self, frame: np.ndarray, voiced: bool, energy: float) -> None:
        at = self.n_frames * FRAME_SAMPLES
        if at + FRAME_SAMPLES > self.audio.size:  # grow geometrically; memory follows speech
            grown = np.empty(self.audio.size * 2, dtype=np.float32)
            grown[:at] = self.audio[:at]
            self.audio = grown  # slices handed to jobs keep the old buffer, which stays valid
        self.audio[at:at + FRAME_SAMPLES] = frame
        self.n_frames += 1
        self.voiced.append(voiced)
        self.energy.append(energy)
        if voiced:
            self.voiced_count += 1
            self.trailing_silence = 0
        else:
            self.trailing_silence += 1

    def __len__(self) -> int:
        return self.n_frames

    def frame(self, i: int) -> np.ndarray:
        return self.audio[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]

    def samples(self, first: int, end: int) -> np.ndarray:
        """Frames ``first..end`` as one array: a view, never written again."""
        return self.audio[first * FRAME_SAMPLES:end * FRAME_SAMPLES]


class Session:
    def __init__(self, session_id: str, settings: Settings, now: float,
                 start: Start | None = None) -> None:
        self.session_id = session_id
        self.settings = settings
        self.created_at = now
        self.last_message_at = now
        self.last_audio_at = now
        self.counters = Counters()
        self.closed = False
        self.implicit_start = start is None
        self._sequence = 1
        self._next_segment_id = 1
        self._next_job_id = 1
        self._frame_index = 0          # frames processed on the session timeline
        self._vad_state = VADState.QUIET
        self._segment: _Segment | None = None
        self._window: collections.deque[bool] = collections.deque(maxlen=START_WINDOW_FRAMES)
        self._preroll: collections.deque[tuple[np.ndarray, bool, float]] = collections.deque()
        # At most one final and one partial in flight: a final never waits behind a partial
        # (whose result it makes moot), and finals run one at a time, in order.
        self._final_job: Job | None = None
        self._partial_job: Job | None = None
        self._queue: collections.deque[Job] = collections.deque()
        self._closing: EndReason | None = None
        self._last_seq: int | None = None
        self._seen_seq: collections.deque[int] = collections.deque(maxlen=SEEN_SEQ_WINDOW)
        self._last_final_text = ""
        self._finals_published = 0
        self._interrupt_segment: int | None = None  # utterance that took the turn, until final
        # frame counts derived from settings
        s = settings
        self._silence_frames = max(1, math.ceil(s.chunk_timeout_s / FRAME_S))
        self._audio_gap_s = max(s.audio_gap_timeout_s, s.chunk_timeout_s)
        self._partial_window_frames = round(s.partial_window_s / FRAME_S)
        self._hangover_frames = max(0, round(s.hangover_ms / 1000 / FRAME_S))
        self._preroll_frames = max(START_WINDOW_FRAMES, round(s.preroll_ms / 1000 / FRAME_S))
        self._start_frames = max(1, math.ceil(s.vad_start_ms / 1000 / FRAME_S)) \
            if s.enable_vad else 1
        self._partial_frames = (round(s.partial_interval_s / FRAME_S)
                                if s.partial_interval_s > 0 else 0)
        self._interrupt_frames = max(1, math.ceil(s.interrupt_min_speech_ms / 1000 / FRAME_S))
        self._pitch_frames = (math.ceil(s.min_pitched_ms / 1000 / FRAME_S)
                              if s.enable_vad else 0)
        self._vad = FrameVAD(s.enable_vad, s.vad_aggressiveness)
        self._state = State.LISTENING
        self.speaker_id: str | None = None
        self._configure(start or Start())

    # --- public API ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def in_flight(self) -> list[Job]:
        """Jobs handed to the engine and not answered yet, oldest first."""
        jobs = [j for j in (self._final_job, self._partial_job) if j is not None]
        return sorted(jobs, key=lambda j: j.job_id)

    @property
    def deadline(self) -> float:
        """Earliest time at which ``tick`` may have something to do."""
        t = self.last_message_at + self.settings.session_idle_timeout_s
        if self._vad_state is VADState.SPEAKING:
            t = min(t, self.last_audio_at + self._audio_gap_s)
        return t

    def handle(self, event: Event, now: float) -> list[Action]:
        if self.closed or self._closing is not None:
            return []
        self.last_message_at = now
        if isinstance(event, Chunk):
            return self._on_chunk(event, now)
        if isinstance(event, Start):
            return self._on_start(event, now)
        if isinstance(event, StateChange):
            return self._on_state_change(event.state, now)
        if isinstance(event, End):
            return self.finish(EndReason.END, now)
        raise TypeError(f"not an event: {event!r}")

    def reject(self, error: ProtocolError, now: float) -> list[Action]:
        """Report a bad message for this session; nothing else changes."""
        if self.closed:
            return []
        self.last_message_at = now
        return [self._error(error.code, error.message)]

    def tick(self, now: float) -> list[Action]:
        if self.closed or self._closing is not None:
            return []
        if now - self.last_message_at >= self.settings.session_idle_timeout_s:
            return self.finish(EndReason.IDLE_TIMEOUT, now)
        if (self._vad_state is VADState.SPEAKING
                and now - self.last_audio_at >= self._audio_gap_s):
            # The client stopped sending audio mid-utterance (push-to-talk released, network).
            return self._end_segment(now)
        return []

    def finish(self, reason: EndReason, now: float) -> list[Action]:
        """Flush what is buffered; the ``end`` message follows the last final."""
        if self.closed or self._closing is not None:
            return []
        actions: list[Action] = []
        actions += self._on_frames(self._drain_audio(), now)
        actions += self._end_segment(now)
        self._closing = reason
        actions += self._pump(now)
        return actions

    def transcribed(self, job_id: int, result: Transcription, now: float) -> list[Action]:
        job = self._take_inflight(job_id)
        if job is None:
            return []
        actions = self._final(job, result) if job.is_final else self._partial(job, result)
        return actions + self._pump(now)

    def _final(self, job: Job, result: Transcription) -> list[Action]:
        words = result.text.split()
        timed = self._words(job, result)
        if job.committed and job.start_s != job.segment_start_s:
            # Only the audio after the stable words was decoded (STT_FINAL_WINDOW=tail): the
            # final is the stable words and what the decode adds after them, so a stable word
            # is never withdrawn. Its times: the stable words' from the partials, then the tail's.
            skip = overlap(job.committed, words)
            all_timed = (len(job.committed_words) == len(job.committed)
                         and len(result.words) == len(words))
            words = job.committed + words[skip:]
            if timed is not None:
                timed = ([w.as_dict() for w in job.committed_words] + timed[skip:]
                         if all_timed else None)
        # STT_FINAL_WINDOW=full (the default): decoded whole, the final is the engine's best
        # hypothesis for the utterance and may revise a stable word (bench/evaluate.py counts
        # how often); "prefix" forces the stable words as its start where the engine can.
        text = " ".join(words)
        actions: list[Action] = []
        if text or job.had_partials:
            actions.append(self._emit(transcript_message(
                self.session_id, text=text, is_final=True, state=self._state,
                speaker_id=self.speaker_id, has_voice_activity=True,
                segment_id=job.segment_id, start_s=job.segment_start_s, end_s=job.end_s,
                language=result.language or job.options.language, words=timed)))
            self.counters.finals += 1
            self._finals_published += 1
        if text:
            self._last_final_text = text
        elif job.interrupted:
            # The "speech" that stopped the assistant had no words (a cough, a laugh, the TV):
            # say so, and hand the turn back unless the client changed state meanwhile.
            if self._interrupt_segment == job.segment_id and self._state is State.LISTENING:
                self._state = State.RESPONDING
            actions.append(self._emit(interrupt_cancelled_message(
                self.session_id, self.speaker_id, segment_id=job.segment_id,
                state=self._state.value)))
        if self._interrupt_segment == job.segment_id:
            self._interrupt_segment = None
        return actions

    def _partial(self, job: Job, result: Transcription) -> list[Action]:
        seg = self._segment
        if seg is None or seg.segment_id != job.segment_id:
            return []  # the utterance ended while this partial was decoded
        decoded = result.text.split()
        hypothesis = decoded
        if seg.committed:
            if job.start_s == job.segment_start_s:  # decoded from the start: drop what is committed
                hypothesis = hypothesis[align_prefix(seg.committed, hypothesis):]
            else:  # decoded from the last committed word's end, which word timing only estimates
                hypothesis = hypothesis[overlap(seg.committed, hypothesis):]
        # LocalAgreement-n: what this hypothesis and the n-1 before it agree on is stable,
        # but for the last HOLDBACK_WORDS (an utterance's newest words are the least settled).
        agreed = 0
        if len(seg.previous_tails) >= AGREEMENT - 1:
            agreed = min(common_prefix(t, hypothesis) for t in seg.previous_tails[-(AGREEMENT - 1):]) \
                if AGREEMENT > 1 else len(hypothesis)
            agreed = max(0, agreed - HOLDBACK_WORDS)
        if agreed and len(result.words) == len(decoded):
            # Settled only with enough audio after it: Whisper rewrites its newest words
            # (a word cut by the window's end, a guess from too little context).
            first = len(decoded) - len(hypothesis)
            limit = (job.end_s - job.start_s) - SETTLED_MARGIN_S
            while agreed and result.words[first + agreed - 1].end > limit:
                agreed -= 1
        if agreed:
            seg.committed += hypothesis[:agreed]
            if len(result.words) == len(decoded):  # word times are relative to the window
                first = len(decoded) - len(hypothesis)
                seg.committed_words += [
                    Word(w.word, w.start + job.start_s, w.end + job.start_s, w.probability)
                    for w in result.words[first:first + agreed]]
                last = result.words[first + agreed - 1]
                offset = job.start_s - job.segment_start_s + last.end
                seg.committed_frames = min(len(seg), max(seg.committed_frames,
                                                         int(offset / FRAME_S)))
        tail = hypothesis[agreed:]
        # earlier hypotheses share the committed words: keep what follows them
        seg.previous_tails = [t[agreed:] for t in seg.previous_tails[-(AGREEMENT - 2):]] \
            if AGREEMENT > 2 else []
        seg.previous_tails.append(tail)
        text = " ".join(seg.committed + tail)
        if not text or text == seg.last_partial_text:
            return []
        seg.last_partial_text = text
        seg.partials_published += 1
        self.counters.partials += 1
        total = len(seg.committed) + len(tail)
        return [self._emit(transcript_message(
            self.session_id, text=text, is_final=False, state=self._state,
            speaker_id=self.speaker_id, has_voice_activity=True, segment_id=job.segment_id,
            start_s=job.segment_start_s, end_s=job.end_s,
            language=result.language or job.options.language, words=self._words(job, result),
            extra={"stable_text": " ".join(seg.committed), "unstable_text": " ".join(tail),
                   "stability": round(len(seg.committed) / total, 3)}))]

    def _words(self, job: Job, result: Transcription) -> list[dict[str, Any]] | None:
        if not self._start.word_timestamps or not result.words:
            return None
        return [w.as_dict(job.start_s) for w in result.words]

    def transcription_failed(self, job_id: int, message: str, now: float) -> list[Action]:
        job = self._take_inflight(job_id)
        if job is None:
            return []
        actions: list[Action] = []
        if job.is_final:  # a failed partial is simply superseded by the next one
            actions.append(self._error(ErrorCode.ENGINE_FAILED,
                                       f"segment {job.segment_id}: {message}"))
        return actions + self._pump(now)

    # --- configuration -------------------------------------------------------------------

    def _configure(self, start: Start) -> None:
        self._start = start
        self._state = start.state
        self.speaker_id = start.speaker_id
        self._converter = Converter(start.sample_rate, start.channels, start.encoding)
        self._framer = Framer()
        # Bytes of 16 kHz 16-bit mono, the seed's format: the limit is a length of speech
        # that does not shrink 12x when a browser sends 48 kHz stereo float.
        seconds = min(self.settings.buffer_size_bytes / BYTES_PER_SECOND_16K,
                      self.settings.max_segment_s)
        self._max_segment_frames = max(self._silence_frames + 2, int(seconds / FRAME_S))
        self._language = start.language or self.settings.language or None

    def _on_start(self, start: Start, now: float) -> list[Action]:
        actions: list[Action] = []
        if start.claimed_session_id is not None and start.claimed_session_id != self.session_id:
            actions.append(self._error(
                ErrorCode.SESSION_MISMATCH,
                f"start.session_id {start.claimed_session_id!r} differs from the subject's "
                f"{self.session_id!r}; using the subject's"))
        if self._frame_index or self._segment is not None:
            # A start for a session that already has audio: close the current utterance,
            # then carry on in the new format.
            actions += self._on_frames(self._drain_audio(), now)
            actions += self._end_segment(now)
        self.implicit_start = False
        self._configure(start)
        return actions

    def _on_state_change(self, state: State, now: float) -> list[Action]:
        if state is self._state:
            return []
        # The turn changed hands: whatever the user said so far is one finished utterance.
        actions = self._end_segment(now)
        self._state = state
        self._interrupt_segment = None  # the client decides the turn from here on
        if state is State.RESPONDING:
            self._preroll.clear()  # audio from the user's turn is not an interruption's pre-roll
        return actions

    # --- audio -----------------------------------------------------------------------------

    def _on_chunk(self, chunk: Chunk, now: float) -> list[Action]:
        if chunk.seq is not None:
            verdict = self._check_seq(chunk.seq)
            if verdict is not None:
                return []
        if len(chunk.audio) > self.settings.max_chunk_bytes:
            self.counters.chunks_dropped += 1
            return [self._error(ErrorCode.TOO_LARGE,
                                f"chunk of {len(chunk.audio)} bytes exceeds the limit of "
                                f"{self.settings.max_chunk_bytes} (STT_MAX_CHUNK_BYTES)")]
        duration = len(chunk.audio) / self._converter.bytes_per_second
        if duration > self.settings.max_segment_s:
            self.counters.chunks_dropped += 1
            return [self._error(ErrorCode.TOO_LARGE,
                                f"chunk of {duration:.1f} s exceeds the limit of "
                                f"{self.settings.max_segment_s} s (STT_MAX_SEGMENT_SECONDS)")]
        try:
            samples = self._converter.convert(chunk.audio)
        except ProtocolError as exc:
            self.counters.chunks_dropped += 1
            return [self._error(exc.code, exc.message)]
        self.counters.chunks_ok += 1
        self.counters.audio_in_s += duration
        self.last_audio_at = now
        return self._on_frames(self._framer.push(samples), now)

    def _check_seq(self, seq: int) -> str | None:
        """None for a chunk to use; 'duplicate' or 'late' for one to drop."""
        last = self._last_seq
        if last is not None and seq <= last:
            if seq in self._seen_seq:
                self.counters.chunks_duplicate += 1
                return "duplicate"
            self.counters.chunks_late += 1
            return "late"
        if last is not None and seq > last + 1:
            self.counters.seq_gaps += seq - last - 1
        self._last_seq = seq
        self._seen_seq.append(seq)
        return None

    def _drain_audio(self) -> np.ndarray:
        """Frames still inside the resampler and framer, at the end of a stream."""
        tail = self._converter.flush()
        frames = self._framer.push(tail)
        last = self._framer.flush()
        return frames if last is None else np.concatenate((frames, last[None, :]))

    def _on_frames(self, frames: np.ndarray, now: float) -> list[Action]:
        """(n, 480) frames: conversion and energy for the chunk at once, decisions per frame."""
        if not len(frames):
            return []
        pcm = to_pcm16(frames)
        width = 2 * FRAME_SAMPLES
        energies = (np.einsum("ij,ij->i", frames, frames) / FRAME_SAMPLES).tolist()
        actions: list[Action] = []
        for i, energy in enumerate(energies):
            actions += self._on_frame(frames[i], pcm[i * width:(i + 1) * width], energy, now)
        return actions

    def _on_frame(self, frame: np.ndarray, pcm: bytes, energy: float,
                  now: float) -> list[Action]:
        index = self._frame_index
        self._frame_index += 1
        responding = self._state is State.RESPONDING
        if responding and not self.settings.enable_interrupt_detection:
            return []  # half duplex: the assistant is speaking, the user is not transcribed
        voiced = self._vad.is_speech_pcm(pcm)
        if self._vad_state is VADState.QUIET:
            self._preroll.append((frame, voiced, energy))
            if len(self._preroll) > self._preroll_frames:
                self._preroll.popleft()
            self._window.append(voiced)
            if voiced and sum(self._window) >= self._start_frames:
                self._open_segment(index, candidate=responding)
            return []
        seg = self._segment
        assert seg is not None
        seg.append(frame, voiced, energy)
        seg.frames_since_onset += 1
        seg.voiced_since_onset += voiced
        actions: list[Action] = []
        if seg.candidate:
            if (seg.voiced_since_onset >= self._interrupt_frames and seg.voiced_since_onset
                    >= INTERRUPT_MIN_VOICED_RATIO * seg.frames_since_onset
                    and self._pitched(seg)):
                actions.append(self._fire_interrupt(seg))
        if seg.trailing_silence >= self._silence_frames:
            actions += self._end_segment(now)
        elif len(seg) >= self._max_segment_frames:
            actions += self._cut_segment(now)
        elif self._partial_due(seg):
            actions += self._request_partial(seg, now)
        return actions

    def _open_segment(self, index: int, candidate: bool) -> None:
        frames = list(self._preroll)
        self._preroll.clear()
        self._window.clear()
        seg = _Segment(segment_id=self._next_segment_id, first_frame=index + 1 - len(frames),
                       candidate=candidate)
        self._next_segment_id += 1
        for frame, voiced, energy in frames:
            seg.append(frame, voiced, energy)
        # onset counts from the voiced frames of the start window, not the quiet pre-roll
        seg.frames_since_onset = START_WINDOW_FRAMES
        seg.voiced_since_onset = sum(v for _, v, _ in frames[-START_WINDOW_FRAMES:])
        self._segment = seg
        self._vad_state = VADState.SPEAKING

    def _fire_interrupt(self, seg: _Segment) -> Publish:
        seg.candidate = False
        seg.interrupted = True
        self._interrupt_segment = seg.segment_id
        self._state = State.LISTENING
        self.counters.interrupts += 1
        return self._emit(interrupt_message(
            self.session_id, self.speaker_id, segment_id=seg.segment_id,
            start=round(seg.first_frame * FRAME_S, 3)))

    # --- segments and jobs -------------------------------------------------------------------

    def _end_segment(self, now: float) -> list[Action]:
        """Close the open segment (if any) and queue its final."""
        seg = self._segment
        self._segment = None
        self._vad_state = VADState.QUIET
        self._window.clear()
        if seg is None:
            return []
        keep = len(seg) - max(0, seg.trailing_silence - self._hangover_frames)
        # the dropped silence is the next segment's pre-roll
        for i in range(max(keep, len(seg) - self._preroll_frames), len(seg)):
            self._preroll.append((seg.frame(i).copy(), seg.voiced[i], seg.energy[i]))
        while len(self._preroll) > self._preroll_frames:
            self._preroll.popleft()
        if seg.candidate:
            return []  # speech while responding that never became an interrupt: noise
        return self._queue_final(seg, keep, now)

    def _cut_segment(self, now: float) -> list[Action]:
        """The segment reached the size limit: finalize up to its quietest recent point."""
        seg = self._segment
        assert seg is not None
        n = len(seg)
        lo = max(1, n - int(CUT_SEARCH_S / FRAME_S), n // 2)
        best, best_run, run = None, 0, 0
        for i in range(lo, n):  # longest unvoiced run; cut in its middle
            run = run + 1 if not seg.voiced[i] else 0
            if run > best_run:
                best_run, best = run, i - run // 2
        if best is None:
            best = lo + int(np.argmin(seg.energy[lo:n]))
        cut = max(1, best)
        actions: list[Action] = []
        if seg.candidate:  # a very long candidate is speech: it fires before the cut
            actions.append(self._fire_interrupt(seg))
        actions += self._queue_final(seg, cut, now)
        rest = _Segment(segment_id=self._next_segment_id, first_frame=seg.first_frame + cut)
        self._next_segment_id += 1
        for i in range(cut, n):
            rest.append(seg.frame(i), seg.voiced[i], seg.energy[i])
        rest.frames_since_onset = len(rest)
        rest.voiced_since_onset = rest.voiced_count
        self._segment = rest
        return actions

    def _queue_final(self, seg: _Segment, n_frames: int, now: float) -> list[Action]:
        if seg.voiced_count == 0 or n_frames <= 0:
            return []
        if not self._pitched(seg, upto=n_frames, final=True):
            return []  # noise the VAD took for speech (no pitch anywhere): nothing to transcribe
        if len(self._queue) >= self.settings.max_pending_segments:
            return [self._error(ErrorCode.OVERLOADED,
                                f"segment {seg.segment_id} dropped: {len(self._queue)} segments "
                                f"already wait for the engine (STT_MAX_PENDING_SEGMENTS)")]
        # With final_window "tail", the final decodes only what follows the stable words (its cost
        # is the unsettled tail, not the utterance); "full" decodes the whole utterance.
        first = seg.committed_frames if self.settings.final_window == "tail" else 0
        self._queue.append(self._job(seg, n_frames, is_final=True, now=now, first=first))
        return self._pump(now)

    def _partial_due(self, seg: _Segment) -> bool:
        return (self._partial_frames > 0 and not seg.candidate and self._partial_job is None
                and self._final_job is None and not self._queue and seg.voiced_count > 0
                and seg.voiced_count > seg.partial_at_voiced
                and len(seg) - seg.partial_at_frames >= self._partial_frames
                and self._pitched(seg))

    def _pitched(self, seg: _Segment, upto: int | None = None, final: bool = False) -> bool:
        """Does the segment hold enough voiced frames with a pitch to be speech, not noise?

        Counted lazily, a few frames at a time, and no more once the answer is yes: speech
        qualifies within its first syllables, so only noise pays for looking further.
        """
        need = self._pitch_frames
        end = len(seg) if upto is None else upto
        if seg.periodic >= need:
            return True
        if not final and end - seg.pitch_checked < PITCH_CHECK_FRAMES:
            return False
        idx = [i for i in range(seg.pitch_checked, end) if seg.voiced[i]]
        seg.pitch_checked = max(seg.pitch_checked, end)
        if idx:
            frames = seg.samples(0, end).reshape(-1, FRAME_SAMPLES)
            scores = periodicity(frames[idx])
            seg.periodic += int(np.count_nonzero(scores >= PERIODIC_THRESHOLD))
        return seg.periodic >= need

    def _request_partial(self, seg: _Segment, now: float) -> list[Action]:
        seg.partial_at_frames = len(seg)
        seg.partial_at_voiced = seg.voiced_count
        # Past the partial window, only the audio after the committed words is decoded again:
        # a long utterance then costs what its unsettled tail costs, not its whole length.
        first = seg.committed_frames if len(seg) > self._partial_window_frames else 0
        job = self._job(seg, len(seg), is_final=False, now=now, first=first)
        self._partial_job = job
        return [Transcribe(job)]

    def _job(self, seg: _Segment, n_frames: int, *, is_final: bool, now: float,
             first: int = 0) -> Job:
        audio = seg.samples(first, n_frames)
        segment_start_s = seg.first_frame * FRAME_S
        start_s = segment_start_s + first * FRAME_S
        context = " ".join(seg.committed) if first else self._last_final_text
        job = Job(
            job_id=self._next_job_id, session_id=self.session_id, segment_id=seg.segment_id,
            audio=audio, is_final=is_final, start_s=start_s,
            end_s=segment_start_s + n_frames * FRAME_S, segment_start_s=segment_start_s,
            options=TranscribeOptions(language=self._language, prompt=self._start.prompt,
                                      context=context or None,
                                      # partials need word times to commit and trim audio
                                      word_timestamps=self._start.word_timestamps or not is_final,
                                      is_partial=not is_final,
                                      # STT_FINAL_WINDOW=prefix: the final over the whole
                                      # utterance starts with the stable words
                                      prefix=(" ".join(seg.committed)
                                              if is_final and not first and seg.committed
                                              and self.settings.final_window == "prefix"
                                              else None)),
            created_at=now, speech_end_at=now if is_final else None,
            had_partials=is_final and seg.partials_published > 0, interrupted=seg.interrupted,
            committed=list(seg.committed) if is_final else [],
            committed_words=tuple(seg.committed_words) if is_final else ())
        self._next_job_id += 1
        return job

    def _pump(self, now: float) -> list[Action]:
        """Start the next queued final; when nothing is left and the session is ending, end it."""
        if self._final_job is not None:
            return []
        if self._queue:
            self._final_job = self._queue.popleft()
            return [Transcribe(self._final_job)]
        if self._closing is not None:  # a partial still decoding no longer matters
            self.closed = True
            return [self._emit(end_message(self.session_id, self._closing,
                                           self._frame_index * FRAME_S, self._finals_published,
                                           self.speaker_id)),
                    Close(self._closing)]
        seg = self._segment
        if seg is not None and self._partial_due(seg):
            return self._request_partial(seg, now)
        return []

    def _take_inflight(self, job_id: int) -> Job | None:
        if self.closed:
            return None
        if self._final_job is not None and self._final_job.job_id == job_id:
            job, self._final_job = self._final_job, None
            return job
        if self._partial_job is not None and self._partial_job.job_id == job_id:
            job, self._partial_job = self._partial_job, None
            return job
        return None

    # --- messages ---------------------------------------------------------------------------

    def _emit(self, message: dict[str, Any]) -> Publish:
        message["sequence"] = self._sequence
        self._sequence += 1
        return Publish(message)

    def _error(self, code: ErrorCode, message: str) -> Publish:
        return self._emit(error_message(self.session_id, code, message))


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def align_prefix(prefix: list[str], words: list[str]) -> int:
    """How many of ``words`` the ``prefix`` covers: the cut with the fewest word edits.

    A fresh decode of the whole utterance may spell its beginning a little differently from
    the words already committed; this finds where the committed words end in it.
    """
    if not prefix:
        return 0
    row = edit_row(prefix, words)
    best = min(row)
    return max(j for j, d in enumerate(row) if d == best)


def overlap(committed: list[str], words: list[str], longest: int = 3) -> int:
    """Words at the start of ``words`` that repeat the end of ``committed``."""
    for k in range(min(longest, len(committed), len(words)), 0, -1):
        if committed[-k:] == words[:k]:
            return k
    return 0
