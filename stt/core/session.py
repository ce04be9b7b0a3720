"""One streaming session as a plain object: events and the current time in, actions out.

Long because it is the one place the parts meet: where utterances begin and end
(:mod:`stt.core.segmenter`), stable words (:mod:`stt.core.stabilizer`), the end of a turn
(:mod:`stt.core.turn`) and the engine jobs (:mod:`stt.core.slots`) are their own units; what
stays here is their interplay with the protocol (partials, finals, speculation, interrupts,
states, numbering), which reads best in order.

Theory of operation
-------------------
This file ties the parts of a session to the protocol; nothing here does I/O, reads a clock or
knows about NATS. The worker feeds it:

* ``handle(event, now)``        a parsed input message (start, chunk, state_change, end);
* ``reject(error, now)``        a message for this session that could not be parsed;
* ``tick(now)``                 the passage of time (idle timeout, audio that stopped arriving);
* ``transcribed(job_id, ...)``  an engine result for a job this session asked for;
* ``finish(reason, now)``       end it (``end``, idle timeout, worker shutdown).

and executes the returned actions in order: :class:`Publish` (a typed outgoing message with
the session's ``sequence``), :class:`Transcribe` (a :class:`Job` for the engine) and
:class:`Close` (forget the session).

The parts:

* audio: each chunk is decoded and resampled to 16 kHz (:mod:`stt.core.audio`) and cut into 30 ms
  frames (:mod:`stt.core.vad`);
* where utterances begin and end: :mod:`stt.core.segmenter` (voice activity, pre-roll, endpoint
  silence, the size cut). Besides its endpoint, a segment also ends on no audio arriving for
  ``audio_gap_timeout_s``, on a ``state_change``, ``end`` or idle timeout (decided here);
* which words of a partial are stable: :mod:`stt.core.stabilizer`.

Every ``partial_interval_s`` of new speech a *partial* of the growing segment is requested; a
segment's end queues its *final*.

Ordering: at most one final and one partial per session are in flight; finals wait in a
bounded queue and partials are only requested when nothing is waiting, so a session's
messages are published in order. A partial that returns after its segment ended is dropped.

Barge-in: while ``responding`` (with interrupt detection on) speech still opens a segment,
but as a *candidate*: once it holds ``interrupt_min_speech_ms`` of voiced frames (and most of
its frames since onset are voiced) and has a pitch, an ``interrupt`` is published, the session
switches to ``listening`` and the candidate, pre-roll included, carries on as a normal
utterance. A candidate that ends before that (a cough, a click) is discarded. With detection
off, audio received while ``responding`` is dropped (half duplex).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field, replace

import numpy as np

from stt.core.actions import Action, Cancel, Close, Job, Publish, ScoreTurn, Transcribe
from stt.core.audio import Converter
from stt.core.params import SessionProfile
from stt.core.segmenter import (
    PCM_FRAME_BYTES,
    Ended,
    Opened,
    Segment,
    Segmenter,
    VoiceState,
    frame_inputs,
)
from stt.core.slots import JobSlots, Move, Slot
from stt.core.snapshot import SessionSnapshot
from stt.core.stabilizer import Stabilizer, overlap
from stt.core.textnorm import reads_finished
from stt.core.transcription import TranscribeOptions, Transcription
from stt.core.turn import Turn, Verdict
from stt.core.vad import FRAME_S, Framer
from stt.wire.protocol import (
    Chunk,
    EagerEndOfTurn,
    End,
    EndReason,
    Error,
    ErrorCode,
    Event,
    Interrupt,
    InterruptCancelled,
    Outgoing,
    ProtocolError,
    SessionEnd,
    Start,
    State,
    StateChange,
    Transcript,
    TurnResumed,
)

INTERRUPT_MIN_VOICED_RATIO = 0.6  # of frames since onset, so a few loud clicks do not qualify
# Audio that stops arriving while the segment ends in less silence than this was cut off
# mid-speech (a network stall, not the user pausing): the segment waits STT_STALL_TIMEOUT_S.
STALL_VOICED_TAIL_S = 0.3
SEEN_SEQ_WINDOW = 256            # recent chunk seq numbers kept to tell duplicates from late ones
TURN_AUDIO_S = 8.0               # the end-of-turn model hears the last 8 s of the utterance


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
class _Utterance:
    """An open segment and what the session keeps about it."""

    segment: Segment
    candidate: bool = False           # opened while responding; becomes real on interrupt
    interrupted: bool = False         # fired an interrupt (a wordless final cancels it)
    stable: Stabilizer = field(default_factory=Stabilizer)
    partial_at_frames: int = 0        # segment length when the last partial was requested
    partial_at_speech: int = 0        # speech frames then: no partial without new speech
    partials_published: int = 0
    last_partial_text: str = ""
    # speculative final: decoded at the first silence, published if the endpoint follows
    speculative: Job | None = None
    spec_result: Transcription | None = None
    spec_speech: int = 0              # speech frames when it was asked for
    spec_stable: int = 0              # stable words then
    turn: Turn | None = None          # end of turn (model endpointing)
    turn_query: int = 0               # the query in flight, by id

    @property
    def committed_frames(self) -> int:
        """Segment frames the stable words cover (0 unless their times are known)."""
        if not self.stable.timed:
            return 0
        seg = self.segment
        return max(0, min(len(seg), int((self.stable.settled_s - seg.start_s) / FRAME_S)))


class Session:
    def __init__(self, session_id: str, profile: SessionProfile, now: float,
                 start: Start | None = None) -> None:
        self.session_id = session_id
        self.profile = profile
        self.params = profile.params_for(start.endpointing if start else None)
        self.created_at = now
        self.last_message_at = now
        self.last_audio_at = now
        self.counters = Counters()
        self.closed = False
        self.implicit_start = start is None
        self._sequence = 1
        self._next_job_id = 1
        self._next_query_id = 1
        self._segmenter = Segmenter(self.params.segmenter)
        self._utt: _Utterance | None = None
        # At most one final and one partial in flight: a final never waits behind a partial
        # (whose result it makes moot), and finals run one at a time, in order.
        self._jobs = JobSlots()
        self._closing: EndReason | None = None
        self._last_seq: int | None = None
        self._seen_seq: collections.deque[int] = collections.deque(maxlen=SEEN_SEQ_WINDOW)
        self._handled_seq: int | None = None  # chunks up to here were handled by another replica
        self._last_final_text = ""
        self._finals_published = 0
        self._interrupt_segment: int | None = None  # utterance that took the turn, until final
        self._state = State.LISTENING
        self.speaker_id: str | None = None
        self._configure(start or Start())

    @classmethod
    def resume(cls, session_id: str, profile: SessionProfile, now: float, snap: SessionSnapshot,
               frames: int | None = None) -> Session:
        """A session carried on from ``snap`` (a handover, or a crashed replica's reservation);
        ``frames`` overrides the snapshot's timeline (the worker estimates it after a crash)."""
        session = cls(session_id, profile, now, snap.start)
        session._sequence = snap.next_sequence
        session._segmenter.resume(snap.frames if frames is None else frames,
                                  snap.next_segment_id)
        session._last_seq = snap.last_seq
        session._handled_seq = snap.last_seq if snap.exact else None
        session._finals_published = snap.finals
        session._last_final_text = snap.context
        return session

    def snapshot(self, *, exact: bool = False, sequence_ahead: int = 0,
                 segments_ahead: int = 0) -> SessionSnapshot:
        """The session now; ``*_ahead`` reserves numbers for what it may publish after."""
        return SessionSnapshot(
            start=replace(self._start, state=self._state, claimed_session_id=None),
            next_sequence=self._sequence + sequence_ahead,
            next_segment_id=self._segmenter.next_segment_id + segments_ahead,
            last_seq=self._last_seq, frames=self._segmenter.frames,
            finals=self._finals_published, exact=exact, context=self._last_final_text)

    @property
    def quiet(self) -> bool:
        """Between utterances, no onset under way: a handover now cuts nothing (the next
        replica hears the next syllable from its start); a final still decoding is published
        before the session closes here."""
        return self._utt is None and self._segmenter.state is VoiceState.QUIET

    @property
    def position(self) -> tuple[int, int | None, State]:
        """Where the session's input stands: its timeline in frames, the last chunk ``seq`` used
        and its state (what a replay of its later messages starts from)."""
        return self._segmenter.frames, self._last_seq, self._state

    @property
    def settled_frames(self) -> int:
        """Frames of the timeline whose words are published or that hold none: audio before
        this is never needed again. The open utterance, every final not yet published and,
        between utterances, the pre-roll the next one would start with lie after it."""
        seg = self._segmenter
        settled = seg.frames - self.params.segmenter.preroll_frames
        if self._utt is not None:
            settled = min(settled, self._utt.segment.first_frame)
        for job in (*self._jobs.in_flight, *self._jobs.queue):  # a partial's utterance is open
            if job.is_final:
                settled = min(settled, round(job.segment_start_s / FRAME_S))
        return max(0, settled)

    def hand_over(self, now: float) -> list[Action]:
        """Another replica carries the session on: finish the utterance in progress (its
        final is published here), then close without an ``end``."""
        return self.finish(EndReason.HANDOVER, now)

    # --- public API ----------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def segmenter(self) -> Segmenter:
        return self._segmenter

    @property
    def in_flight(self) -> list[Job]:
        """Jobs handed to the engine and not answered yet, oldest first."""
        return self._jobs.in_flight

    @property
    def deadline(self) -> float:
        """Earliest time at which ``tick`` may have something to do."""
        t = self.last_message_at + self.profile.idle_timeout_s
        if self._utt is not None:
            t = min(t, self.last_audio_at + self._audio_gap_limit(self._utt))
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
        if now - self.last_message_at >= self.profile.idle_timeout_s:
            return self.finish(EndReason.IDLE_TIMEOUT, now)
        utt = self._utt
        if utt is not None and now - self.last_audio_at >= self._audio_gap_limit(utt):
            # The client stopped sending audio mid-utterance (push-to-talk released, gone).
            return self._end_segment(now)
        return []

    def _audio_gap_limit(self, utt: _Utterance) -> float:
        """How long an open segment waits for audio that stopped arriving."""
        if (self.params.segmenter.vad_enabled
                and utt.segment.trailing_silence * FRAME_S < STALL_VOICED_TAIL_S):
            # cut off mid-speech: a stall; the burst that follows continues the utterance
            return max(self.params.audio_gap_s, self.params.stall_s)
        return self.params.audio_gap_s

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
        slot = None if self.closed else self._jobs.holding(job_id)
        if slot is None:
            return []
        if slot is Slot.SPECULATIVE:
            spec = self._jobs.move(slot, Move.ANSWERED)
            utt = self._utt
            if utt is not None and utt.speculative is spec:
                utt.spec_result = result  # published at the endpoint, if speech does not resume
                if self.params.adaptive and self._adaptive_endpoint(utt):
                    return self._end_segment(now)  # it reads finished: no need to wait a frame
                if utt.turn is not None:  # the words the end of turn waited for
                    return self._judge_turn(utt, now) + self._pump(now)
            return self._pump(now)
        job = self._jobs.move(slot, Move.ANSWERED)
        actions = self._final(job, result) if job.is_final else self._partial(job, result)
        return actions + self._pump(now)

    def transcription_failed(self, job_id: int, message: str, now: float) -> list[Action]:
        slot = None if self.closed else self._jobs.holding(job_id)
        if slot is None:
            return []
        job = self._jobs.move(slot, Move.ANSWERED)
        if slot is Slot.SPECULATIVE:  # the endpoint then queues an ordinary final
            if self._utt is not None and self._utt.speculative is job:
                self._utt.speculative = None
            return self._pump(now)
        actions: list[Action] = []
        if job.is_final:  # a failed partial is simply superseded by the next one
            actions.append(self._error(ErrorCode.ENGINE_FAILED,
                                       f"segment {job.segment_id}: {message}"))
        return actions + self._pump(now)

    # --- results ---------------------------------------------------------------------------

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
            actions.append(self._emit(Transcript(
                self.session_id, text=text, is_final=True, state=self._state,
                speaker_id=self.speaker_id, segment_id=job.segment_id,
                start_s=job.segment_start_s, end_s=job.end_s,
                language=result.language or job.options.language, words=timed,
                end_of_turn=job.end_of_turn, turn_probability=job.turn_probability),
                speech_ended_at=job.speech_end_at))
            self.counters.finals += 1
            self._finals_published += 1
        if text:
            self._last_final_text = text
        elif job.interrupted:
            # The "speech" that stopped the assistant had no words (a cough, a laugh, the TV):
            # say so, and hand the turn back unless the client changed state meanwhile.
            if self._interrupt_segment == job.segment_id and self._state is State.LISTENING:
                self._state = State.RESPONDING
            actions.append(self._emit(InterruptCancelled(
                self.session_id, self.speaker_id, segment_id=job.segment_id, state=self._state)))
        if self._interrupt_segment == job.segment_id:
            self._interrupt_segment = None
        return actions

    def _partial(self, job: Job, result: Transcription) -> list[Action]:
        utt = self._utt
        if utt is None or utt.segment.segment_id != job.segment_id:
            return []  # the utterance ended while this partial was decoded
        tail = utt.stable.update(result.text.split(), result.words, window_start_s=job.start_s,
                                 window_end_s=job.end_s,
                                 from_start=job.start_s == job.segment_start_s)
        stable = utt.stable.words
        text = " ".join(stable + tail)
        if not text or text == utt.last_partial_text:
            return []
        utt.last_partial_text = text
        utt.partials_published += 1
        self.counters.partials += 1
        return [self._emit(Transcript(
            self.session_id, text=text, is_final=False, state=self._state,
            speaker_id=self.speaker_id, segment_id=job.segment_id,
            start_s=job.segment_start_s, end_s=job.end_s,
            language=result.language or job.options.language, words=self._words(job, result),
            stable_text=" ".join(stable), unstable_text=" ".join(tail),
            stability=round(len(stable) / (len(stable) + len(tail)), 3)))]

    def _words(self, job: Job, result: Transcription) -> list[dict[str, object]] | None:
        if not self._start.word_timestamps or not result.words:
            return None
        return [w.as_dict(job.start_s) for w in result.words]

    # --- configuration -------------------------------------------------------------------

    def _configure(self, start: Start) -> None:
        self._start = start
        self._state = start.state
        self.speaker_id = start.speaker_id
        self._converter = Converter(start.sample_rate, start.channels, start.encoding)
        self._framer = Framer()
        self._language = start.language or self.profile.language or None

    def _on_start(self, start: Start, now: float) -> list[Action]:
        actions: list[Action] = []
        if start.claimed_session_id is not None and start.claimed_session_id != self.session_id:
            actions.append(self._error(
                ErrorCode.SESSION_MISMATCH,
                f"start.session_id {start.claimed_session_id!r} differs from the subject's "
                f"{self.session_id!r}; using the subject's"))
        if self._segmenter.frames or self._utt is not None:
            # A start for a session that already has audio: close the current utterance,
            # then carry on in the new format.
            actions += self._on_frames(self._drain_audio(), now)
            actions += self._end_segment(now)
        self.implicit_start = False
        if start.endpointing != self._start.endpointing:
            self.params = self.profile.params_for(start.endpointing)
            self._segmenter.retune(self.params.segmenter)
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
            self._segmenter.forget_preroll()  # the user's turn is not an interruption's pre-roll
        return actions

    # --- audio -----------------------------------------------------------------------------

    def _on_chunk(self, chunk: Chunk, now: float) -> list[Action]:
        actions: list[Action] = []
        if chunk.seq is not None:
            gaps = self.counters.seq_gaps
            if not self._use_seq(chunk.seq):
                return []
            if (self.counters.seq_gaps > gaps and self._utt is not None
                    and now - self.last_audio_at >= self.params.audio_gap_s):
                # audio stopped arriving and some of it is lost, not late: what follows does not
                # continue the utterance that was waiting for it
                actions += self._end_segment(now)
        if len(chunk.audio) > self.profile.max_chunk_bytes:
            self.counters.chunks_dropped += 1
            return [*actions, self._error(
                ErrorCode.TOO_LARGE, f"chunk of {len(chunk.audio)} bytes exceeds the limit of "
                f"{self.profile.max_chunk_bytes} (STT_MAX_CHUNK_BYTES)")]
        duration = len(chunk.audio) / self._converter.bytes_per_second
        if duration > self.profile.max_segment_s:
            self.counters.chunks_dropped += 1
            return [*actions, self._error(
                ErrorCode.TOO_LARGE, f"chunk of {duration:.1f} s exceeds the limit of "
                f"{self.profile.max_segment_s} s (STT_MAX_SEGMENT_SECONDS)")]
        try:
            samples = self._converter.convert(chunk.audio)
        except ProtocolError as exc:
            self.counters.chunks_dropped += 1
            return [*actions, self._error(exc.code, exc.message)]
        self.counters.chunks_ok += 1
        self.counters.audio_in_s += duration
        self.last_audio_at = now
        return actions + self._on_frames(self._framer.push(samples), now)

    def _use_seq(self, seq: int) -> bool:
        """Whether a chunk with this ``seq`` is used: a duplicate or a late one is dropped
        (counted as such), a gap before it counted."""
        last = self._last_seq
        if self._handled_seq is not None and seq <= self._handled_seq:
            self.counters.chunks_duplicate += 1  # the previous replica handled it
            return False
        if last is not None and seq <= last:
            if seq in self._seen_seq:
                self.counters.chunks_duplicate += 1
            else:
                self.counters.chunks_late += 1
            return False
        if last is not None and seq > last + 1:
            self.counters.seq_gaps += seq - last - 1
        self._last_seq = seq
        self._seen_seq.append(seq)
        return True

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
        pcm, energies = frame_inputs(frames)
        width = PCM_FRAME_BYTES
        actions: list[Action] = []
        for i, energy in enumerate(energies):
            actions += self._on_frame(frames[i], pcm[i * width:(i + 1) * width], energy, now)
        return actions

    def _on_frame(self, frame: np.ndarray, pcm: bytes, energy: float,
                  now: float) -> list[Action]:
        responding = self._state is State.RESPONDING
        if responding and not self.profile.interrupts:
            self._segmenter.skip()
            return []  # half duplex: the assistant is speaking, the user is not transcribed
        boundary = self._segmenter.push(frame, pcm, energy)
        if isinstance(boundary, Opened):
            self._utt = self._utterance(boundary.segment, candidate=responding)
            return []
        utt = self._utt
        if utt is None:
            return []
        actions: list[Action] = []
        if utt.candidate and self._interrupting(utt):
            actions.append(self._fire_interrupt(utt))
        if boundary is not None:
            return actions + self._segment_ended(boundary, now)
        if utt.speculative is not None and utt.segment.speech_count != utt.spec_speech:
            actions += self._drop_speculation(utt)  # speech resumed: that decode is moot
        if self.params.adaptive and self._adaptive_endpoint(utt):
            return actions + self._end_segment(now)
        if utt.turn is not None and not utt.candidate:
            actions += self._turn_step(utt)
            if utt.segment.trailing_silence:
                actions += self._judge_turn(utt, now)
                if self._utt is not utt:
                    return actions  # the turn ended
        if self._speculation_due(utt):
            actions += self._speculate(utt, now)
        elif self._partial_due(utt):
            actions += self._request_partial(utt, now)
        return actions

    def _interrupting(self, utt: _Utterance) -> bool:
        seg = utt.segment
        return (seg.voiced_since_onset >= self.params.interrupt_frames
                and seg.voiced_since_onset >= INTERRUPT_MIN_VOICED_RATIO * seg.frames_since_onset
                and self._pitched(seg))

    def _fire_interrupt(self, utt: _Utterance) -> Publish:
        utt.candidate = False
        utt.interrupted = True
        self._interrupt_segment = utt.segment.segment_id
        self._state = State.LISTENING
        self.counters.interrupts += 1
        return self._emit(Interrupt(self.session_id, self.speaker_id,
                                    segment_id=utt.segment.segment_id, start_s=utt.segment.start_s))

    # --- end of turn (model endpointing; stt.core.turn decides) -----------------------------------

    def _utterance(self, segment: Segment, candidate: bool = False) -> _Utterance:
        turn = self.params.turn
        return _Utterance(segment, candidate=candidate,
                          turn=Turn(turn) if turn.uses_model else None)

    def _turn_step(self, utt: _Utterance) -> list[Action]:
        """Per frame: speech came back (the pause was not the end), or the model is due."""
        turn, seg = utt.turn, utt.segment
        assert turn is not None
        if not seg.trailing_silence:
            utt.turn_query = 0  # an answer still coming is for a silence that is over
            if turn.resumed():
                return [self._emit(TurnResumed(self.session_id, self.speaker_id,
                                               segment_id=seg.segment_id))]
            return []
        silence_s = seg.trailing_silence * FRAME_S
        if (not turn.query_due(silence_s, self._spec_words(utt)) or not seg.speech_count
                or not self._pitched(seg)):
            return []
        n = len(seg)
        query = ScoreTurn(self._next_query_id, self.session_id,
                          seg.samples(max(0, n - int(TURN_AUDIO_S / FRAME_S)), n))
        turn.asked(silence_s)
        utt.turn_query = self._next_query_id
        self._next_query_id += 1
        return [query]

    def _judge_turn(self, utt: _Utterance, now: float) -> list[Action]:
        """End the turn, say it is probably over, or keep listening (stt.core.turn.Turn.decide)."""
        turn, seg = utt.turn, utt.segment
        if turn is None or utt.candidate or self._utt is not utt or not seg.trailing_silence:
            return []
        words = self._spec_words(utt)
        if words is not None and not words.strip():
            # no words at all (a cough, a click, the TV): nothing to wait for; an interrupt it
            # raised is cancelled now instead of after the longest silence
            return self._end_segment(now)
        verdict = turn.decide(seg.trailing_silence * FRAME_S, words)
        if verdict is Verdict.END:
            return self._end_segment(now)
        if verdict is Verdict.EAGER and words is not None:
            return [self._emit(EagerEndOfTurn(
                self.session_id, self.speaker_id, segment_id=seg.segment_id, text=words,
                turn_probability=turn.probability, silence_s=seg.trailing_silence * FRAME_S))]
        return []

    def _spec_words(self, utt: _Utterance) -> str | None:
        """The speculative final's text while it still holds; None before it is decoded."""
        return (utt.spec_result.text if utt.spec_result is not None
                and self._speculation_holds(utt) else None)

    def turn_scored(self, query_id: int, probability: float, now: float) -> list[Action]:
        """The end-of-turn model's answer to a :class:`ScoreTurn`."""
        utt = self._utt
        if (self.closed or self._closing is not None or utt is None or utt.turn is None
                or utt.turn_query != query_id):
            return []  # the utterance ended or speech came back meanwhile
        utt.turn_query = 0
        utt.turn.scored(probability)
        actions: list[Action] = []
        if (self._model_says_over(utt) and self._may_speculate(utt)
                and utt.segment.trailing_silence >= self.params.segmenter.hangover_frames):
            # probably the end: the final's decode starts now, not at STT_SPECULATIVE_MS (a
            # pause the model calls mid-sentence costs no decode that speech would waste); an
            # answer that came before the final's tail of silence starts it once the tail is
            # in (_speculation_due)
            actions += self._speculate(utt, now)
        return actions + self._judge_turn(utt, now) + self._pump(now)

    def turn_failed(self, query_id: int, now: float) -> list[Action]:
        """The model could not answer (overloaded, an error): silence decides this pause."""
        utt = self._utt
        if utt is None or utt.turn is None or utt.turn_query != query_id or self.closed:
            return []
        utt.turn_query = 0
        utt.turn.failed()
        return self._judge_turn(utt, now) + self._pump(now)

    # --- segments and jobs -------------------------------------------------------------------

    def _end_segment(self, now: float) -> list[Action]:
        """Close the open segment (if any) and queue its final."""
        ended = self._segmenter.close()
        return [] if ended is None else self._segment_ended(ended, now)

    def _segment_ended(self, ended: Ended, now: float) -> list[Action]:
        utt = self._utt
        assert utt is not None and utt.segment is ended.segment
        actions: list[Action] = []
        partial = self._jobs.job(Slot.PARTIAL)
        if partial is not None and partial.segment_id == utt.segment.segment_id:
            # its answer would come too late to matter: free the engine for the final
            actions.append(Cancel(self._jobs.move(Slot.PARTIAL, Move.CANCEL).job_id))
        if ended.rest is None:
            self._utt = None
            if utt.candidate:
                return actions + self._drop_speculation(utt)  # never an interrupt: noise
            return actions + self._queue_final(utt, ended.n_frames, now, endpoint=True)
        # cut at the size limit: the rest carries on as the next utterance
        actions += self._drop_speculation(utt)
        if utt.candidate:  # a very long candidate is speech: it fires before the cut
            actions.append(self._fire_interrupt(utt))
        actions += self._queue_final(utt, ended.n_frames, now, end_of_turn=False)
        self._utt = self._utterance(ended.rest)
        return actions

    # --- speculative finals ----------------------------------------------------------------

    def _speculation_due(self, utt: _Utterance) -> bool:
        """At STT_SPECULATIVE_MS of silence, or as soon as the final's tail is in when the model
        asked for it sooner; never before: every final of an utterance then ends exactly
        ``hangover_frames`` after its last voiced frame, whatever the timing (Whisper's text
        can change with the audio's length)."""
        at, tail = self.params.speculative_frames, self.params.segmenter.hangover_frames
        silence = utt.segment.trailing_silence
        due = silence == max(at, tail) or (silence == tail and self._model_says_over(utt))
        return at > 0 and due and self._may_speculate(utt)

    @staticmethod
    def _model_says_over(utt: _Utterance) -> bool:
        """The model's answer in this silence (Turn forgets it when speech resumes) says the
        turn is probably over (STT_TURN_SPECULATE_P): start the final's decode early."""
        turn = utt.turn
        return (turn is not None and turn.probability is not None
                and turn.probability >= turn.params.speculate_p)

    def _may_speculate(self, utt: _Utterance) -> bool:
        seg = utt.segment
        return (seg.trailing_silence > 0 and not utt.candidate
                and utt.speculative is None and self._jobs.may_start(Slot.SPECULATIVE)
                and seg.speech_count > 0 and self._pitched(seg, final=True))

    def _speculate(self, utt: _Utterance, now: float) -> list[Action]:
        """Silence began: start the final's decode now, on the audio the endpoint would keep."""
        seg = utt.segment
        n_frames = len(seg) - max(0, seg.trailing_silence - self.params.segmenter.hangover_frames)
        job = replace(self._final_job_for(utt, n_frames, now), speculative=True)
        utt.speculative, utt.spec_result = job, None
        utt.spec_speech, utt.spec_stable = seg.speech_count, len(utt.stable.words)
        actions: list[Action] = []
        if not self._jobs.idle(Slot.PARTIAL):  # no partial once trailing silence has begun
            actions.append(Cancel(self._jobs.move(Slot.PARTIAL, Move.CANCEL).job_id))
        actions.append(Transcribe(self._jobs.move(Slot.SPECULATIVE, Move.START, job)))
        return actions

    def _drop_speculation(self, utt: _Utterance) -> list[Action]:
        job, utt.speculative, utt.spec_result = utt.speculative, None, None
        if job is None or self._jobs.job(Slot.SPECULATIVE) is not job:
            return []
        return [Cancel(self._jobs.move(Slot.SPECULATIVE, Move.CANCEL).job_id)]

    def _adaptive_endpoint(self, utt: _Utterance) -> bool:
        """STT_ENDPOINTING=adaptive: end now? A speculative final that reads as a finished
        sentence ends the segment after STT_ENDPOINT_MIN_S of silence; one that does not waits
        for the segmenter's STT_ENDPOINT_MAX_S; without one yet, STT_CHUNK_TIMEOUT applies."""
        silence = utt.segment.trailing_silence
        p = self.params
        if silence < p.endpoint_min_frames:
            return False
        if utt.spec_result is None or not self._speculation_holds(utt):
            return silence >= p.endpoint_fixed_frames
        return reads_finished(utt.spec_result.text)

    def _speculation_holds(self, utt: _Utterance) -> bool:
        """No voiced audio since, and the words it was decoded with are still the stable ones."""
        return (utt.speculative is not None and utt.segment.speech_count == utt.spec_speech
                and (self.profile.final_window == "full"
                     or len(utt.stable.words) == utt.spec_stable)
                and self._jobs.idle(Slot.FINAL) and not self._jobs.queue)

    def _queue_final(self, utt: _Utterance, n_frames: int, now: float,
                     endpoint: bool = False, end_of_turn: bool = True) -> list[Action]:
        seg = utt.segment
        turn_p = utt.turn.probability if utt.turn is not None else None
        if endpoint and self._speculation_holds(utt):
            assert utt.speculative is not None
            # the decode started at the first silence is this final: publish it as soon as it is
            # done (now, if it is); its latency counts from this endpoint decision
            job = replace(utt.speculative, speech_end_at=now,
                          had_partials=utt.partials_published > 0, interrupted=utt.interrupted,
                          end_of_turn=end_of_turn, turn_probability=turn_p)
            result, utt.speculative, utt.spec_result = utt.spec_result, None, None
            if result is not None:
                return self._final(job, result) + self._pump(now)
            self._jobs.move(Slot.SPECULATIVE, Move.PROMOTE, job)
            return []
        actions = self._drop_speculation(utt)
        if seg.speech_count == 0 or n_frames <= 0:
            return actions
        if not self._pitched(seg, upto=n_frames, final=True):
            return actions  # noise the VAD took for speech (no pitch anywhere): nothing to say
        if len(self._jobs.queue) >= self.profile.max_pending_segments:
            actions.append(self._error(
                ErrorCode.OVERLOADED, f"segment {seg.segment_id} dropped: {len(self._jobs.queue)} "
                "segments already wait for the engine (STT_MAX_PENDING_SEGMENTS)"))
            return actions
        self._jobs.queue.append(replace(self._final_job_for(utt, n_frames, now),
                                   end_of_turn=end_of_turn, turn_probability=turn_p))
        return actions + self._pump(now)

    def _final_job_for(self, utt: _Utterance, n_frames: int, now: float) -> Job:
        # With final_window "tail", the final decodes only what follows the stable words (its cost
        # is the unsettled tail, not the utterance); "full" decodes the whole utterance.
        first = utt.committed_frames if self.profile.final_window == "tail" else 0
        return self._job(utt, n_frames, is_final=True, now=now, first=first)

    def _partial_due(self, utt: _Utterance) -> bool:
        seg = utt.segment
        every = self.params.partial_frames
        return (every > 0 and not utt.candidate and self._jobs.may_start(Slot.PARTIAL)
                and seg.trailing_silence == 0 and seg.speech_count > 0
                and seg.speech_count > utt.partial_at_speech
                and len(seg) - utt.partial_at_frames >= every
                and self._pitched(seg))

    def _pitched(self, seg: Segment, upto: int | None = None, final: bool = False) -> bool:
        return seg.pitched(self.params.segmenter.pitch_frames, upto, final)

    def _request_partial(self, utt: _Utterance, now: float) -> list[Action]:
        seg = utt.segment
        utt.partial_at_frames = len(seg)
        utt.partial_at_speech = seg.speech_count
        # Past the partial window, only the audio after the committed words is decoded again:
        # a long utterance then costs what its unsettled tail costs, not its whole length.
        first = utt.committed_frames if len(seg) > self.params.partial_window_frames else 0
        job = self._job(utt, len(seg), is_final=False, now=now, first=first)
        return [Transcribe(self._jobs.move(Slot.PARTIAL, Move.START, job))]

    def _job(self, utt: _Utterance, n_frames: int, *, is_final: bool, now: float,
             first: int = 0) -> Job:
        seg = utt.segment
        committed = utt.stable.words
        audio = seg.samples(first, n_frames)
        start_s = seg.start_s + first * FRAME_S
        context = " ".join(committed) if first else self._last_final_text
        job = Job(
            job_id=self._next_job_id, session_id=self.session_id, segment_id=seg.segment_id,
            audio=audio, is_final=is_final, start_s=start_s,
            end_s=seg.start_s + n_frames * FRAME_S, segment_start_s=seg.start_s,
            options=TranscribeOptions(language=self._language, prompt=self._start.prompt,
                                      context=context or None,
                                      # partials need word times to commit and trim audio
                                      word_timestamps=self._start.word_timestamps or not is_final,
                                      is_partial=not is_final,
                                      # STT_FINAL_WINDOW=prefix: the final over the whole
                                      # utterance starts with the stable words
                                      prefix=(" ".join(committed)
                                              if is_final and not first and committed
                                              and self.profile.final_window == "prefix"
                                              else None)),
            created_at=now, speech_end_at=now if is_final else None,
            had_partials=is_final and utt.partials_published > 0, interrupted=utt.interrupted,
            committed=list(committed) if is_final else [],
            committed_words=tuple(utt.stable.timed) if is_final else ())
        self._next_job_id += 1
        return job

    def _pump(self, now: float) -> list[Action]:
        """Start the next queued final; when nothing is left and the session is ending, end it."""
        if not self._jobs.idle(Slot.FINAL):
            return []
        if self._jobs.queue:
            return [Transcribe(self._jobs.move(Slot.FINAL, Move.START, self._jobs.queue.popleft()))]
        if self._closing is EndReason.HANDOVER:  # the next replica publishes from here
            self.closed = True
            return [Close(self._closing)]
        if self._closing is not None:  # a partial still decoding no longer matters
            self.closed = True
            return [self._emit(SessionEnd(self.session_id, self._closing,
                                          self._segmenter.frames * FRAME_S,
                                          self._finals_published, self.speaker_id)),
                    Close(self._closing)]
        utt = self._utt
        if utt is not None and self._partial_due(utt):
            return self._request_partial(utt, now)
        return []

    # --- messages ---------------------------------------------------------------------------

    def _emit(self, message: Outgoing, speech_ended_at: float | None = None) -> Publish:
        action = Publish(message, self._sequence, speech_ended_at)
        self._sequence += 1
        return action

    def _error(self, code: ErrorCode, message: str) -> Publish:
        return self._emit(Error(self.session_id, code, message))
