"""Session logic with a fake clock: every flush rule, states, interrupts, bad input.

Speech is real (the bundled LibriVox sample); silence is digital zeros. Nothing here touches
NATS or an engine: jobs come out as actions and results are fed back by hand.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE

import stt.core.session as session_module
import stt.core.stabilizer as stabilizer_module
from bench.common import speech_bounds
from stt.config import Settings
from stt.core.actions import Cancel, Close, Job, Publish, Transcribe
from stt.core.audio import load_16k_mono, to_pcm16
from stt.core.session import Session
from stt.core.transcription import Transcription, Word
from stt.wire.protocol import (
    Chunk,
    End,
    EndReason,
    ProtocolError,
    SessionEnd,
    Start,
    State,
    StateChange,
    encode,
    parse,
)

SR = 16000
CHUNK_S = 0.04
SEED_FIELDS = {"session_id", "transcript", "sequence", "is_partial", "is_final", "timestamp",
               "speaker_id", "has_voice_activity", "state"}

_SPEECH = load_16k_mono(str(SAMPLE))
# spans of the sample (seconds) the VAD calls continuous speech, and one of pure silence
SENTENCE_1 = _SPEECH[int(0.55 * SR): int(7.2 * SR)]
SENTENCE_2 = _SPEECH[int(8.8 * SR): int(11.9 * SR)]
LONG_SPEECH = _SPEECH[int(19.4 * SR): int(25.2 * SR)]  # 5.8 s without a pause


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def settings(**overrides: Any) -> Settings:
    # speculative finals off unless a test asks: most tests count jobs at the endpoint
    values: dict[str, Any] = {"chunk_timeout_s": 0.6, "partial_interval_s": 0.0,
                              "endpointing": "silence",
                              "session_idle_timeout_s": 30.0, "speculative_ms": 0}
    values.update(overrides)
    return Settings.from_env(environ={}, overrides=values)


class Harness:
    """A session, a fake clock, and every action it returned."""

    def __init__(self, start: Start | None = None, **overrides: Any) -> None:
        self.now = 1000.0
        self.settings = settings(**overrides)
        self.session = Session("s1", self.settings.session_profile(), self.now)
        self.published: list[dict[str, Any]] = []
        self.jobs: list[Job] = []
        self.cancelled: list[int] = []
        self.closed: EndReason | None = None
        self.auto_answer = False  # answer every job as soon as it is asked for
        self.reply, self.answered = "", False
        self._answering = False
        if start is not None:
            self.apply(self.session.handle(start, self.now))

    def apply(self, actions: list[Any]) -> list[Any]:
        for a in actions:
            if isinstance(a, Publish):
                self.published.append(encode(a.message, a.sequence, self.now))
            elif isinstance(a, Transcribe):
                self.jobs.append(a.job)
            elif isinstance(a, Cancel):
                self.cancelled.append(a.job_id)
            elif isinstance(a, Close):
                self.closed = a.reason
        if self.auto_answer and not self._answering:
            self._answering = True
            while self.session.in_flight:
                self.answer(f"segment {self.session.in_flight[0].segment_id}")
            self._answering = False
        return actions

    def feed(self, audio: np.ndarray, rate: int = SR, chunk_s: float = CHUNK_S,
             seq_start: int | None = None) -> None:
        step = int(rate * chunk_s)
        for i, off in enumerate(range(0, len(audio), step)):
            self.now += chunk_s
            seq = None if seq_start is None else seq_start + i
            self.apply(self.session.handle(Chunk(to_pcm16(audio[off:off + step]), seq=seq),
                                           self.now))

    def answer(self, text: str = "hello world", **kw: Any) -> Job:
        """Complete the job in flight."""
        assert self.session.in_flight, "no job in flight"
        job = self.session.in_flight[0]
        self.now += 0.05
        self.apply(self.session.transcribed(job.job_id, Transcription(text=text, **kw), self.now))
        return job

    def answer_final(self, text: str, **kw: Any) -> Job:
        """Let any partial still in flight come back (it is stale), then answer the final."""
        (final,) = [j for j in self.session.in_flight if j.is_final]
        for job in self.session.in_flight:
            if not job.is_final:
                self.answer("stale partial")
        assert self.session.in_flight[0] is final
        return self.answer(text, **kw)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.published if m["type"] == kind]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.of("transcript") if m["is_final"]]

    @property
    def partials(self) -> list[dict[str, Any]]:
        return [m for m in self.of("transcript") if m["is_partial"]]


# --- segmentation -------------------------------------------------------------------------


def test_silence_alone_produces_nothing() -> None:
    h = Harness(Start())
    h.feed(silence(3.0))
    assert h.jobs == [] and h.published == []


def test_speech_then_silence_timeout_makes_one_final_with_seed_fields() -> None:
    h = Harness(Start(speaker_id="alice"), chunk_timeout_s=0.6)
    h.feed(silence(0.5))
    h.feed(SENTENCE_1)
    assert h.jobs == []  # still speaking
    h.feed(silence(0.5))
    assert h.jobs == []  # not yet chunk_timeout of silence
    h.feed(silence(0.3))
    assert len(h.jobs) == 1
    job = h.jobs[0]
    assert job.is_final
    # pre-roll: the segment starts before the first voiced frame, and covers the sentence
    assert 0.1 <= job.start_s <= 0.55
    assert job.end_s >= 0.5 + len(SENTENCE_1) / SR
    # the hangover keeps only some of the trailing silence
    assert job.end_s <= 0.5 + len(SENTENCE_1) / SR + 0.45
    h.answer("and mister john")
    (final,) = h.finals
    assert SEED_FIELDS <= final.keys()
    assert final["transcript"] == "and mister john"
    assert final["is_final"] is True and final["is_partial"] is False
    assert final["speaker_id"] == "alice" and final["state"] == "listening"
    assert final["has_voice_activity"] is True and final["sequence"] == 1
    assert final["segment_id"] == 1 and final["type"] == "transcript"


def test_chunk_timeout_sets_how_much_silence_ends_an_utterance() -> None:
    h = Harness(Start(), chunk_timeout_s=1.5)
    h.feed(SENTENCE_1)
    h.feed(silence(1.2))
    assert h.jobs == []
    h.feed(silence(0.5))
    assert len(h.jobs) == 1


def test_two_sentences_two_finals_in_order() -> None:
    h = Harness(Start())
    h.feed(SENTENCE_1)
    h.feed(silence(1.0))
    h.answer("one")
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    h.answer("two")
    assert [f["transcript"] for f in h.finals] == ["one", "two"]
    assert [f["segment_id"] for f in h.finals] == [1, 2]
    assert h.finals[1]["start"] > h.finals[0]["end"]


def test_audio_that_stops_mid_word_waits_for_the_stall_timeout() -> None:
    h = Harness(Start(), chunk_timeout_s=0.6, audio_gap_timeout_s=1.0, stall_timeout_s=5.0)
    h.feed(SENTENCE_1[: 2 * SR])  # the client stops mid-word
    assert h.session.segmenter.segment is not None
    assert h.session.segmenter.segment.trailing_silence * 0.03 < session_module.STALL_VOICED_TAIL_S
    h.apply(h.session.tick(h.now + 1.5))  # longer than the audio gap: a stall, not an end
    assert h.jobs == []
    assert h.session.deadline == pytest.approx(h.now + 5.0)
    h.apply(h.session.tick(h.now + 5.01))  # bounded: the client is gone
    assert len(h.jobs) == 1 and h.jobs[0].is_final


def test_a_stall_mid_word_then_a_burst_stays_one_utterance() -> None:
    h = Harness(Start(), chunk_timeout_s=0.6, audio_gap_timeout_s=1.0)
    h.feed(SENTENCE_1[: 2 * SR])
    h.now += 1.5  # nothing arrives for 1.5 s ...
    h.apply(h.session.tick(h.now))
    h.feed(SENTENCE_1[2 * SR:], chunk_s=0.01)  # ... then the held-back audio in a burst
    h.feed(silence(1.0))
    assert len(h.jobs) == 1
    assert h.jobs[0].duration_s == pytest.approx(len(SENTENCE_1) / SR, abs=0.5)


def test_audio_that_stops_during_a_pause_ends_the_utterance_after_the_gap() -> None:
    h = Harness(Start(), chunk_timeout_s=0.6, audio_gap_timeout_s=1.0)
    h.feed(SENTENCE_1)
    h.feed(silence(0.4))  # a pause, shorter than the endpoint, then nothing arrives
    assert h.jobs == []
    assert h.session.deadline == pytest.approx(h.now + 1.0)
    h.apply(h.session.tick(h.now + 0.8))  # longer than chunk_timeout: still no cut
    assert h.jobs == []
    h.apply(h.session.tick(h.now + 1.01))
    assert len(h.jobs) == 1 and h.jobs[0].is_final


def test_buffer_size_cuts_long_speech_at_a_quiet_point_and_continues() -> None:
    # 2 s worth of 16 kHz s16 bytes: the 5.8 s span must be cut at least twice
    h = Harness(Start(), buffer_size_bytes=2 * SR * 2)
    h.auto_answer = True
    h.feed(LONG_SPEECH)
    h.feed(silence(1.0))
    finals = [j for j in h.jobs if j.is_final]
    assert len(finals) >= 3
    assert all(j.duration_s <= 2.0 + 1e-6 for j in finals)
    # consecutive pieces tile the timeline: no gap, no overlap, nothing lost
    for a, b in itertools.pairwise(finals):
        assert b.start_s == pytest.approx(a.end_s, abs=1e-6)
    assert [f["segment_id"] for f in h.finals] == [j.segment_id for j in finals]


def test_buffer_size_means_the_same_length_of_speech_in_every_format() -> None:
    limits = {Session("a", settings(buffer_size_bytes=64000).session_profile(), 0.0, start).params.segmenter.max_frames
              for start in (Start(), Start(sample_rate=8000, encoding="mulaw"),
                            Start(sample_rate=48000, channels=2, encoding="pcm_f32le"))}
    assert limits == {66}  # 2 s of 30 ms frames


def test_partials_at_the_interval_while_speaking_then_final() -> None:
    h = Harness(Start(), partial_interval_s=0.5)
    h.feed(SENTENCE_1[: int(0.8 * SR)])
    partial_jobs = [j for j in h.jobs if not j.is_final]
    assert len(partial_jobs) == 1
    h.feed(SENTENCE_1[int(0.8 * SR): int(2.0 * SR)])
    assert len(h.jobs) == 1  # engine busy: no second partial piles up
    h.answer("and")
    assert [p["transcript"] for p in h.partials] == ["and"]
    assert h.partials[0]["is_partial"] and not h.partials[0]["is_final"]
    assert "stability" in h.partials[0]
    h.feed(SENTENCE_1[int(2.0 * SR): int(2.6 * SR)])
    assert len(h.jobs) == 2 and not h.jobs[1].is_final
    assert h.jobs[1].duration_s > h.jobs[0].duration_s  # the growing utterance
    h.answer("and mister")
    h.feed(silence(1.0))
    h.answer_final("and mister john")
    assert [m["transcript"] for m in h.of("transcript")] == ["and", "and mister", "and mister john"]
    assert [m["sequence"] for m in h.published] == [1, 2, 3]


def test_partial_running_when_the_segment_ends_is_withdrawn_and_its_answer_dropped() -> None:
    h = Harness(Start(), partial_interval_s=0.3)
    h.feed(SENTENCE_2)
    (partial,) = h.session.in_flight
    assert not partial.is_final
    h.feed(silence(1.0))  # the segment ends while the partial is still running
    assert h.cancelled == [partial.job_id]  # the engine may drop it: the final matters now
    (final,) = h.session.in_flight
    assert final.is_final
    # the engine answered it anyway: too late to matter
    h.apply(h.session.transcribed(partial.job_id, Transcription(text="stale partial"), h.now))
    assert h.partials == []
    h.answer("he was not")
    assert [f["transcript"] for f in h.finals] == ["he was not"]


def test_empty_final_is_published_only_when_partials_were_shown() -> None:
    h = Harness(Start())
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    h.answer("")
    assert h.published == []
    h2 = Harness(Start(), partial_interval_s=0.3)
    h2.feed(SENTENCE_2[: SR])
    h2.answer("he")
    h2.feed(silence(1.0))
    h2.answer_final("")
    assert h2.finals[0]["transcript"] == ""  # replaces the partial the client is showing


def test_words_are_on_the_session_timeline() -> None:
    h = Harness(Start(word_timestamps=True))
    h.feed(silence(2.0))
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    job = h.jobs[0]
    assert job.options.word_timestamps
    h.answer("he was", words=[Word("he", 0.1, 0.3, 0.9), Word("was", 0.3, 0.5, 0.8)])
    words = h.finals[0]["words"]
    assert words[0]["word"] == "he"
    assert words[0]["start"] == pytest.approx(job.start_s + 0.1, abs=1e-3)


def test_previous_final_is_context_for_the_next_segment() -> None:
    h = Harness(Start(language="en", prompt="Dashwood"))
    h.feed(SENTENCE_1)
    h.feed(silence(1.0))
    assert h.jobs[0].options.context is None
    assert h.jobs[0].options.prompt == "Dashwood" and h.jobs[0].options.language == "en"
    h.answer("first sentence")
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    assert h.jobs[1].options.context == "first sentence"


# --- end, idle, ordering ---------------------------------------------------------------------


def test_end_flushes_then_publishes_end_after_the_last_final() -> None:
    h = Harness(Start())
    h.feed(SENTENCE_1[: 3 * SR])
    h.apply(h.session.handle(End(), h.now))
    assert len(h.jobs) == 1 and h.jobs[0].is_final
    assert h.of("end") == [] and h.closed is None
    h.answer("and mister john")
    assert [m["type"] for m in h.published] == ["transcript", "end"]
    end = h.of("end")[0]
    assert end["reason"] == "end" and end["segments"] == 1
    assert end["audio_seconds"] == pytest.approx(3.0, abs=0.05)
    assert h.closed is EndReason.END and h.session.closed
    assert h.session.handle(Chunk(to_pcm16(SENTENCE_1[:640])), h.now) == []


def test_end_with_nothing_buffered_ends_at_once() -> None:
    h = Harness(Start())
    h.feed(silence(1.0))
    h.apply(h.session.handle(End(), h.now))
    assert [m["type"] for m in h.published] == ["end"] and h.closed is EndReason.END


def test_idle_timeout_ends_the_session_with_its_final() -> None:
    h = Harness(Start(), session_idle_timeout_s=5.0)
    h.feed(SENTENCE_1[: 2 * SR])
    t = h.now
    early = h.session.tick(t + 4.0)  # 4 s without audio: the utterance may be cut, no more
    assert not any(isinstance(a, Close) for a in early)
    assert not any(isinstance(a, Publish) and isinstance(a.message, SessionEnd) for a in early)
    h.apply(h.session.tick(t + 5.01))
    h.answer("and mister")
    assert h.of("end")[0]["reason"] == "idle_timeout"
    assert h.closed is EndReason.IDLE_TIMEOUT


def test_shutdown_finishes_like_end() -> None:
    h = Harness(Start())
    h.feed(SENTENCE_2)
    h.apply(h.session.finish(EndReason.SHUTDOWN, h.now))
    h.answer("he was")
    assert [m["type"] for m in h.published] == ["transcript", "end"]
    assert h.of("end")[0]["reason"] == "shutdown"


def test_sequence_increases_by_one_across_every_message_type() -> None:
    h = Harness(Start(claimed_session_id="other"))  # error 1
    h.apply(h.session.reject(ProtocolError(parse_error_code(), "bad"), h.now))  # error 2
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    h.answer("he was")  # final 3
    h.apply(h.session.handle(End(), h.now))  # end 4
    assert [m["sequence"] for m in h.published] == [1, 2, 3, 4]
    assert [m["type"] for m in h.published] == ["error", "error", "transcript", "end"]


def parse_error_code() -> Any:
    from stt.wire.protocol import ErrorCode

    return ErrorCode.BAD_MESSAGE


def test_finals_queue_is_bounded() -> None:
    h = Harness(Start(), max_pending_segments=1, buffer_size_bytes=SR * 2)
    h.feed(LONG_SPEECH)  # several cuts while the first final is still in flight
    errors = h.of("error")
    assert errors and errors[0]["code"] == "overloaded"
    assert len(h.session._jobs.queue) <= 1


def test_engine_failure_on_a_final_is_an_error_and_the_session_goes_on() -> None:
    h = Harness(Start())
    h.feed(SENTENCE_1)
    h.feed(silence(1.0))
    job = h.jobs[0]
    h.apply(h.session.transcription_failed(job.job_id, "service down", h.now))
    assert h.of("error")[0]["code"] == "engine_failed"
    assert "service down" in h.of("error")[0]["message"]
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    h.answer("he was")
    assert h.finals[0]["transcript"] == "he was"


# --- states and barge-in ---------------------------------------------------------------------


def test_state_change_to_responding_finalizes_the_utterance() -> None:
    h = Harness(Start())
    h.feed(SENTENCE_1[: 2 * SR])
    h.apply(h.session.handle(StateChange(State.RESPONDING), h.now))
    assert len(h.jobs) == 1 and h.jobs[0].is_final
    h.answer("and mister")
    assert h.finals[0]["state"] == "responding"
    assert h.session.state is State.RESPONDING


def test_interrupt_fires_on_sustained_speech_and_the_words_are_kept() -> None:
    h = Harness(Start(state=State.RESPONDING, speaker_id="bob"), interrupt_min_speech_ms=300)
    h.feed(silence(1.0))
    h.feed(SENTENCE_2[: int(0.2 * SR)])
    assert h.of("interrupt") == []
    h.feed(SENTENCE_2[int(0.2 * SR): int(0.6 * SR)])
    (interrupt,) = h.of("interrupt")
    assert interrupt["session_id"] == "s1" and interrupt["speaker_id"] == "bob"
    assert {"type", "timestamp"} <= interrupt.keys()
    assert h.session.state is State.LISTENING
    h.feed(SENTENCE_2[int(0.6 * SR):])
    h.feed(silence(1.0))
    (job,) = [j for j in h.jobs if j.is_final]
    # the speech that triggered the interrupt, with pre-roll, is in the final, to its last word
    assert job.start_s <= 1.0 and job.end_s >= 1.0 + speech_bounds(SENTENCE_2)[1]
    h.answer("he was not an ill disposed young man")
    assert h.finals[0]["state"] == "listening"
    assert h.published[0]["type"] == "interrupt"


def test_a_false_start_before_a_pause_does_not_delay_the_interrupt_that_follows() -> None:
    """A click opens a segment, a pause keeps it open, then the user talks: the interrupt is
    judged on the speech after the pause, so it fires as soon as for speech alone (its voiced
    share was once counted from the click, and the interrupt came a second late)."""
    h = Harness(Start(state=State.RESPONDING), interrupt_min_speech_ms=300)
    h.feed(silence(1.0))
    h.feed(SENTENCE_2[: int(0.12 * SR)])
    h.feed(silence(0.45))  # shorter than the endpoint: the click's segment is still open
    assert h.session._utt is not None and h.of("interrupt") == []
    speech_at = h.now
    for i in range(0, int(0.6 * SR), int(CHUNK_S * SR)):
        h.feed(SENTENCE_2[int(0.12 * SR) + i: int(0.12 * SR) + i + int(CHUNK_S * SR)])
        if h.of("interrupt"):
            break
    assert h.of("interrupt"), "no interrupt within 0.6 s of speech"
    assert h.now - speech_at <= 0.45


def test_a_click_while_responding_is_not_an_interrupt_and_not_transcribed() -> None:
    h = Harness(Start(state=State.RESPONDING), interrupt_min_speech_ms=300)
    click = SENTENCE_2[: int(0.12 * SR)]
    for _ in range(3):
        h.feed(silence(1.0))
        h.feed(click)
    h.feed(silence(1.5))
    assert h.of("interrupt") == [] and h.jobs == []
    assert h.session.state is State.RESPONDING


def test_without_interrupt_detection_responding_audio_is_not_transcribed() -> None:
    h = Harness(Start(state=State.RESPONDING), enable_interrupt_detection=False)
    h.feed(SENTENCE_1)
    h.feed(silence(1.0))
    assert h.jobs == [] and h.published == []
    h.apply(h.session.handle(StateChange(State.LISTENING), h.now))
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    assert len(h.jobs) == 1


def test_vad_off_counts_everything_as_voice() -> None:
    h = Harness(Start(), enable_vad=False)
    h.feed(silence(1.0))
    assert h.session.segmenter.segment is not None  # silence is "speech" with VAD off
    h.apply(h.session.tick(h.now + 1.01))  # ends when audio stops arriving
    assert len(h.jobs) == 1


# --- input handling ----------------------------------------------------------------------------


def test_start_with_another_session_id_is_an_error_and_the_subject_wins() -> None:
    h = Harness(Start(claimed_session_id="not-s1"))
    (err,) = h.of("error")
    assert err["code"] == "session_mismatch" and err["session_id"] == "s1"
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    assert len(h.jobs) == 1


@pytest.mark.parametrize("encoding,rate,channels", [
    ("pcm_s16le", 16000, 1), ("pcm_s16le", 22050, 1), ("pcm_s16le", 48000, 2),
    ("pcm_f32le", 44100, 1), ("mulaw", 8000, 1), ("alaw", 8000, 1)])
def test_every_encoding_and_rate_reaches_the_engine_as_16k_speech(encoding: str, rate: int,
                                                                   channels: int) -> None:
    import soxr
    from audio_util import encode

    speech = soxr.resample(SENTENCE_2, SR, rate).astype(np.float32) if rate != SR else SENTENCE_2
    quiet = np.zeros(rate, dtype=np.float32)
    signal = np.concatenate([quiet, speech, quiet, quiet])
    h = Harness(Start(sample_rate=rate, channels=channels, encoding=encoding))
    step = int(rate * CHUNK_S)
    for off in range(0, len(signal), step):
        h.now += CHUNK_S
        piece = signal[off:off + step]
        if channels == 2:
            piece = np.stack([piece, piece], axis=1)
        h.apply(h.session.handle(Chunk(encode(piece, encoding)), h.now))
    assert len(h.jobs) == 1
    job = h.jobs[0]
    assert job.audio.dtype == np.float32
    assert abs(job.duration_s - (len(SENTENCE_2) / SR + 0.3 + 0.15)) < 0.4  # pre-roll, hangover
    assert 0.5 < job.start_s < 1.05


def test_bad_chunks_get_errors_and_change_nothing_else() -> None:
    h = Harness(Start(), max_chunk_bytes=8000)
    h.feed(SENTENCE_2[: SR])
    before = h.session.segmenter.frames
    h.apply(h.session.handle(Chunk(b"\x01\x02\x03"), h.now))  # odd byte count
    h.apply(h.session.handle(Chunk(b"\x00" * 9000), h.now))  # too large
    codes = [m["code"] for m in h.of("error")]
    assert codes == ["bad_audio", "too_large"]
    assert h.session.segmenter.frames == before
    h.feed(SENTENCE_2[SR:])
    h.feed(silence(1.0))
    assert len([j for j in h.jobs if j.is_final]) == 1
    assert h.session.counters.chunks_dropped == 2


def test_duplicate_and_late_chunks_are_dropped_and_gaps_counted() -> None:
    h = Harness(Start())
    pcm = to_pcm16(SENTENCE_2[:640])
    for seq in (0, 1, 1, 2, 5, 3, 6):
        h.now += 0.04
        h.apply(h.session.handle(Chunk(pcm, seq=seq), h.now))
    c = h.session.counters
    assert c.chunks_ok == 5 and c.chunks_duplicate == 1 and c.chunks_late == 1
    assert c.seq_gaps == 2
    assert h.published == []  # dropped quietly: a retransmit is not the client's error


def test_late_start_after_audio_closes_the_utterance_and_reconfigures() -> None:
    h = Harness(None)  # adopted by a chunk, defaults (16 kHz s16)
    assert h.session.implicit_start
    h.feed(SENTENCE_1[: 2 * SR])
    h.apply(h.session.handle(Start(sample_rate=8000, encoding="mulaw"), h.now))
    assert len(h.jobs) == 1 and h.jobs[0].is_final
    assert h.session._converter.sample_rate == 8000 and not h.session.implicit_start


@pytest.mark.parametrize("message,code", [
    ({}, "bad_message"),
    ({"type": "bogus"}, "bad_message"),
    ({"type": "chunk"}, "bad_message"),
    ({"type": "chunk", "audio_b64": "***not base64***"}, "bad_audio"),
    ({"type": "chunk", "audio_b64": 12}, "bad_audio"),
    ({"type": "chunk", "audio": "text, not bytes"}, "bad_audio"),
    ({"type": "chunk", "audio_b64": "", "timestamp": "yesterday"}, "bad_message"),
    ({"type": "chunk", "audio_b64": "", "seq": 1.5}, "bad_message"),
    ({"type": "start", "sample_rate": 7}, "bad_message"),
    ({"type": "start", "sample_rate": "16000"}, "bad_message"),
    ({"type": "start", "channels": 0}, "bad_message"),
    ({"type": "start", "encoding": "opus"}, "bad_message"),
    ({"type": "start", "state": "sleeping"}, "bad_message"),
    ({"type": "start", "prompt": "x" * 5000}, "bad_message"),
    ({"type": "state_change", "state": None}, "bad_message"),
])
def test_malformed_messages_are_refused_with_a_code(message: dict[str, Any], code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(message)
    assert info.value.code.value == code


def test_well_formed_messages_parse_with_seed_defaults() -> None:
    start = parse({"type": "start", "session_id": "x"})
    assert isinstance(start, Start)
    assert (start.sample_rate, start.channels, start.state, start.encoding) == \
        (16000, 1, State.LISTENING, "pcm_s16le")
    pcm = to_pcm16(SENTENCE_2[:320])
    a = parse({"type": "chunk", "audio_b64": base64.b64encode(pcm).decode(), "timestamp": 1.5})
    b = parse({"type": "chunk", "audio": pcm, "seq": 7})
    assert isinstance(a, Chunk) and isinstance(b, Chunk)
    assert a.audio == b.audio == pcm and b.seq == 7
    assert isinstance(parse({"type": "end"}), End)


# --- stable partials (LocalAgreement-2) ------------------------------------------------------


def timed(text: str, start: float = 0.0, step: float = 0.3) -> list[Word]:
    return [Word(w, start + i * step, start + (i + 1) * step) for i, w in enumerate(text.split())]


def test_words_two_hypotheses_agree_on_become_stable_and_stay() -> None:
    h = Harness(Start(), partial_interval_s=0.3)
    hypotheses = ["and", "and mr", "and mister john", "and mister john guess",
                  "and mister jack guess would"]
    fed = 0
    for text in hypotheses:
        while not h.session.in_flight:
            h.feed(SENTENCE_1[fed: fed + int(0.12 * SR)])
            fed += int(0.12 * SR)
        h.answer(text)
    stable = [p["stable_text"] for p in h.partials]
    assert stable == ["", "and", "and", "and mister john", "and mister john guess"]
    for earlier, later in itertools.pairwise(h.partials):
        assert later["transcript"].startswith(earlier["stable_text"])
        assert later["stable_text"].startswith(earlier["stable_text"])
    # the last partial keeps "john": a stable word is never withdrawn
    assert h.partials[-1]["transcript"] == "and mister john guess would"
    assert h.partials[-1]["unstable_text"] == "would"
    assert h.partials[-1]["stability"] == pytest.approx(4 / 5)
    h.feed(silence(1.0))
    # without word times nothing tells where the stable words end: the final decodes the whole
    # utterance, and its text is the engine's best hypothesis
    h.answer_final("and mister jack guess would have been")
    assert h.finals[0]["transcript"] == "and mister jack guess would have been"


def make_and_mister_stable(h: Harness) -> int:
    """Two timed partials that agree on "and mister" (ending 0.25 s in); returns samples fed."""
    fed = 0
    for text in ("and mister", "and mister john"):
        while not h.session.in_flight:
            h.feed(SENTENCE_1[fed: fed + int(0.12 * SR)])
            fed += int(0.12 * SR)
        h.answer(text, words=timed(text, start=0.05, step=0.1))
    return fed


def test_the_final_keeps_the_stable_words_and_their_times_and_decodes_only_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stabilizer_module, "SETTLED_MARGIN_S", 0.0)  # these word times are made up
    h = Harness(Start(word_timestamps=True), partial_interval_s=0.3, final_window="tail")
    fed = make_and_mister_stable(h)
    assert h.partials[-1]["stable_text"] == "and mister"
    h.feed(SENTENCE_1[fed: fed + SR])
    h.feed(silence(1.0))
    (final_job,) = [j for j in h.session.in_flight if j.is_final]
    # only the audio after "and mister" (which ends 0.25 s in) is decoded, with it as context
    assert final_job.start_s == pytest.approx(final_job.segment_start_s + 0.25, abs=FRAME_S_TOL)
    assert final_job.options.context == "and mister"
    h.answer_final("mister jack guess", words=timed("mister jack guess", step=0.2))
    final = h.finals[0]
    assert final["transcript"] == "and mister jack guess"  # the boundary word is not doubled
    assert [w["word"] for w in final["words"]] == ["and", "mister", "jack", "guess"]
    start = final_job.segment_start_s
    assert final["words"][0]["start"] == pytest.approx(start + 0.05, abs=1e-3)  # from the partial
    assert final["words"][2]["start"] == pytest.approx(final_job.start_s + 0.2, abs=1e-3)


def test_a_prefix_window_final_asks_for_the_stable_words_as_its_prefix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stabilizer_module, "SETTLED_MARGIN_S", 0.0)
    h = Harness(Start(), partial_interval_s=0.3, final_window="prefix")
    make_and_mister_stable(h)
    h.feed(silence(1.0))
    (final_job,) = [j for j in h.session.in_flight if j.is_final]
    assert final_job.start_s == final_job.segment_start_s
    assert final_job.options.prefix == "and mister"
    h.answer_final("and mister jack")  # an engine that forces the prefix starts with it
    assert h.finals[0]["transcript"] == "and mister jack"
    # one that cannot (http) answers with its own best text: that is published


def test_past_the_window_partials_decode_only_the_audio_after_the_committed_words(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stabilizer_module, "SETTLED_MARGIN_S", 0.0)  # these word times are made up
    h = Harness(Start(), partial_interval_s=0.3, partial_window_s=1.0)
    first = None
    for text in ("and mister", "and mister john"):
        while not h.session.in_flight:
            h.feed(SENTENCE_1[: int(0.12 * SR)] if first is None else SENTENCE_1[SR: SR + 1920])
        job = h.session.in_flight[0]
        first = first or job
        h.answer(text, words=timed(text, start=0.05, step=0.1))
    while not h.session.in_flight or len(h.session.segmenter.segment or []) * 0.03 < 1.0:
        if h.session.in_flight:
            h.answer("and mister john")
        h.feed(SENTENCE_1[2 * SR: 2 * SR + 1920])
    trimmed = h.session.in_flight[0]
    assert trimmed.options.word_timestamps  # partials ask for word times
    # "and mister" committed, ending 0.05 + 2 * 0.1 s into the utterance: not decoded again
    assert trimmed.start_s == pytest.approx(trimmed.segment_start_s + 0.25, abs=FRAME_S_TOL)
    assert trimmed.options.context == "and mister john"  # the committed words
    h.answer("mister john guess", words=timed("mister john guess"))  # repeats the boundary word
    assert h.partials[-1]["transcript"] == "and mister john guess"
    assert h.partials[-1]["stable_text"] == "and mister john"


FRAME_S_TOL = 0.031


# --- noise and false interruptions --------------------------------------------------------------


def noise(seconds: float, level: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (level * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def test_noise_that_the_vad_calls_speech_is_not_transcribed() -> None:
    h = Harness(Start(), partial_interval_s=0.3)
    h.feed(noise(2.0))
    h.feed(silence(1.0))
    assert h.jobs == [] and h.published == []


def test_noise_bursts_while_responding_do_not_interrupt() -> None:
    h = Harness(Start(state=State.RESPONDING))
    for seconds in (0.2, 0.5, 1.0, 2.0):
        h.feed(noise(seconds, seed=int(seconds * 10)))
        h.feed(silence(1.0))
    assert h.of("interrupt") == [] and h.jobs == []
    h.feed(SENTENCE_2)  # real speech still does
    assert len(h.of("interrupt")) == 1


def test_wordless_interruption_is_cancelled_and_the_turn_handed_back() -> None:
    h = Harness(Start(state=State.RESPONDING, speaker_id="bob"))
    h.feed(SENTENCE_2[: int(0.8 * SR)])
    assert len(h.of("interrupt")) == 1 and h.session.state is State.LISTENING
    h.feed(silence(1.0))
    h.answer_final("")
    cancelled = h.of("interrupt_cancelled")
    assert len(cancelled) == 1 and cancelled[0]["speaker_id"] == "bob"
    assert cancelled[0]["segment_id"] == h.of("interrupt")[0]["segment_id"]
    assert h.session.state is State.RESPONDING and cancelled[0]["state"] == "responding"


def test_interruption_with_words_is_not_cancelled() -> None:
    h = Harness(Start(state=State.RESPONDING))
    h.feed(SENTENCE_2)
    h.feed(silence(1.0))
    h.answer_final("he was not")
    assert h.of("interrupt_cancelled") == [] and h.session.state is State.LISTENING


# --- speculative finals -------------------------------------------------------------------------


# ends mid-speech; webrtcvad keeps calling the first ~120 ms of silence after it voiced, so
# 210 ms of trailing silence is reached 0.33 s after it, the 0.6 s endpoint 0.72 s after it
SPEAKING = SENTENCE_1[: 3 * SR]


def spec_harness(**overrides: Any) -> Harness:
    values: dict[str, Any] = {"speculative_ms": 210, "chunk_timeout_s": 0.6, "hangover_ms": 150}
    values.update(overrides)
    return Harness(Start(), **values)


def test_the_final_decode_starts_at_the_first_silence_and_is_published_at_the_endpoint() -> None:
    h = spec_harness()
    h.feed(SPEAKING)
    h.feed(silence(0.4))  # past 210 ms of trailing silence
    (job,) = h.jobs
    assert job.is_final and h.finals == []
    h.answer("he was not")  # decoded before the endpoint: held, not published
    assert h.finals == []
    h.feed(silence(0.4))  # the endpoint: published at once, no second decode
    assert [f["transcript"] for f in h.finals] == ["he was not"] and len(h.jobs) == 1
    assert h.session.in_flight == []


def test_a_speculative_final_still_decoding_at_the_endpoint_becomes_the_final() -> None:
    h = spec_harness()
    h.feed(SPEAKING)
    h.feed(silence(1.0))
    (job,) = h.jobs
    assert [j.job_id for j in h.session.in_flight] == [job.job_id] and h.finals == []
    h.answer("he was not")
    assert [f["transcript"] for f in h.finals] == ["he was not"] and len(h.jobs) == 1


def test_the_size_limit_reached_in_the_pause_leaves_the_speculative_final_and_the_turn_alone() -> None:
    """An utterance whose size limit falls in its trailing silence: the speech is all in, so it
    is not cut there (a cut dropped the decode already running, decoded the same audio again and
    left the turn without a final that ends it); the endpoint ends it with that decode."""
    probe = spec_harness()
    probe.feed(SPEAKING)
    probe.feed(silence(0.4))
    assert probe.session._utt is not None
    limit_s = (len(probe.session._utt.segment) + 3) * 0.03  # 0.09 s after the decode started
    h = spec_harness(max_segment_s=limit_s)
    h.feed(SPEAKING)
    h.feed(silence(1.0))
    assert len(h.jobs) == 1  # the decode started in the pause, not a second one
    h.answer("he was not")
    (final,) = h.finals
    assert final["transcript"] == "he was not" and final["end_of_turn"] is True
    # speech that resumes after the limit is cut in the pause, within the limit
    h = spec_harness(max_segment_s=limit_s)
    h.auto_answer = True
    h.feed(SPEAKING)
    h.feed(silence(0.45))
    h.feed(SENTENCE_2)
    assert h.finals and h.finals[0]["end_of_turn"] is False
    assert all(j.end_s - j.start_s <= limit_s + 1e-6 for j in h.jobs if j.is_final)


def test_speech_that_resumes_withdraws_the_speculative_final() -> None:
    h = spec_harness()
    h.feed(SPEAKING)
    h.feed(silence(0.4))
    (first,) = h.jobs
    h.feed(SENTENCE_1[3 * SR:])  # the user only paused
    assert first.job_id in h.cancelled and h.session.in_flight[-1:] != [first]
    h.apply(h.session.transcribed(first.job_id, Transcription(text="half"), h.now))
    h.feed(silence(1.0))
    final = h.jobs[-1]
    assert final.is_final and final.job_id != first.job_id
    assert final.duration_s > first.duration_s + 2.0  # the whole utterance
    h.answer("the whole sentence")
    assert [f["transcript"] for f in h.finals] == ["the whole sentence"]


def test_end_after_the_speculation_publishes_its_result_then_ends() -> None:
    h = spec_harness()
    h.feed(SPEAKING)
    h.feed(silence(0.4))
    h.answer("he was not")
    h.apply(h.session.handle(End(), h.now))
    assert [m["type"] for m in h.published] == ["transcript", "end"]
    assert len(h.jobs) == 1 and h.closed is EndReason.END


def test_end_right_after_speech_decodes_at_once() -> None:
    h = spec_harness()
    h.feed(SPEAKING)
    h.apply(h.session.handle(End(), h.now))  # before any silence: no speculation to use
    (job,) = h.jobs
    assert job.is_final
    h.answer("he was not")
    assert [m["type"] for m in h.published] == ["transcript", "end"]


def test_a_speculative_final_is_timed_from_the_endpoint_decision() -> None:
    h = spec_harness()
    h.feed(SPEAKING)
    h.feed(silence(0.4))
    asked_at = h.now
    h.answer("he was not")
    actions = []
    for _ in range(0, int(0.5 * SR), int(0.04 * SR)):
        h.now += 0.04
        actions += h.apply(h.session.handle(Chunk(to_pcm16(silence(0.04))), h.now))
    (publish,) = [a for a in actions if isinstance(a, Publish)]
    # the endpoint: 0.6 s of silence, 0.2 s after the speculation was answered
    assert publish.speech_ended_at is not None and publish.speech_ended_at > asked_at + 0.15


def test_no_partial_in_trailing_silence_and_the_running_one_is_withdrawn() -> None:
    h = spec_harness(partial_interval_s=0.3)
    h.feed(SPEAKING)
    (partial,) = h.session.in_flight
    assert not partial.is_final
    h.feed(silence(0.4))
    assert partial.job_id in h.cancelled  # the speculation withdrew it
    (spec,) = h.session.in_flight
    assert spec.is_final
    h.answer("he was not")
    h.feed(silence(0.2))
    assert all(j.is_final for j in h.jobs[1:])  # nothing asked for during the silence


def test_a_stall_with_lost_chunks_ends_the_waiting_utterance_first() -> None:
    h = Harness(Start(), chunk_timeout_s=0.6, audio_gap_timeout_s=1.0)
    h.feed(SENTENCE_1[: 2 * SR], seq_start=0)  # 50 chunks, seq 0..49
    h.now += 1.5
    h.apply(h.session.tick(h.now))
    assert h.jobs == []  # waiting for the stalled audio
    h.feed(SENTENCE_1[3 * SR:], seq_start=75)  # 1 s of chunks never came: lost, not late
    assert h.jobs and h.jobs[0].is_final
    assert h.jobs[0].duration_s < 2.5  # the first utterance ended where its audio stopped


# --- adaptive endpointing -----------------------------------------------------------------------


def adaptive_harness() -> Harness:
    return spec_harness(endpointing="adaptive", endpoint_min_s=0.45, endpoint_max_s=1.2,
                        chunk_timeout_s=0.8)


def silence_until_final(h: Harness, limit_s: float = 2.0) -> float:
    """Feed silence 30 ms at a time; the trailing silence (s) when the final was published."""
    fed = 0.0
    while not h.finals and fed < limit_s:
        h.feed(silence(0.03), chunk_s=0.03)
        fed += 0.03
        if h.session.in_flight and h.session.in_flight[0].is_final and not h.answered:
            h.answered = True
            h.answer(h.reply)
    return fed


@pytest.mark.parametrize(("reply", "ends_after"), [
    ("He was not there.", (0.3, 0.65)),      # finished: the minimum (+ webrtcvad's hang-over)
    ("He was not there and", (1.2, 1.5)),    # mid-phrase: the maximum
    ("He went to the", (1.2, 1.5)),
])
def test_adaptive_endpointing_reads_the_speculative_final(reply: str,
                                                          ends_after: tuple[float, float]) -> None:
    h = adaptive_harness()
    h.reply, h.answered = reply, False
    h.feed(SPEAKING)
    fed = silence_until_final(h)
    assert h.finals and h.finals[0]["transcript"] == reply
    assert ends_after[0] <= fed <= ends_after[1], fed
    assert len(h.jobs) == 1  # the speculative decode was the final


def test_a_finished_hypothesis_that_comes_after_the_minimum_ends_the_utterance_at_once() -> None:
    h = adaptive_harness()
    h.feed(SPEAKING)
    h.feed(silence(0.6))  # past the 0.45 s minimum, the speculative decode still running
    assert not h.finals and h.session.segmenter.segment is not None
    h.answer("He was not there.")  # no more audio needed for the decision
    assert [f["transcript"] for f in h.finals] == ["He was not there."]
    assert h.session.segmenter.segment is None and len(h.jobs) == 1


def test_adaptive_endpointing_without_a_hypothesis_falls_back_to_the_fixed_timeout() -> None:
    h = adaptive_harness()
    h.feed(SPEAKING)
    h.feed(silence(0.93))  # past 0.8 s of silence as the VAD counts it (its hang-over: ~0.12 s)
    assert h.session.segmenter.segment is None  # ended at STT_CHUNK_TIMEOUT, not the maximum
    h.answer("He was not there and")
    assert [f["transcript"] for f in h.finals] == ["He was not there and"]
