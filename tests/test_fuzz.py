"""Property-based fuzzing of the protocol parser and the session (hypothesis).

Random byte strings and random msgpack maps go through the parser: only ProtocolError may come
out. Random sequences of messages, clock ticks and engine answers go through a session, with
these invariants checked after every step:

* no exception escapes;
* ``sequence`` numbers are 1, 2, 3, ... with no gap or repeat;
* at most one ``end``, and nothing after it; once ``end`` was asked for and every job answered,
  the session has closed;
* a stable word is never withdrawn: every later partial of a segment starts with the stable
  words of the earlier ones;
* memory stays bounded: the open segment within the size limit (plus the trailing silence of
  a pause that reached it), the final queue within
  ``STT_MAX_PENDING_SEGMENTS``, at most three jobs in flight.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from stt.config import Settings
from stt.core.actions import Cancel, Close, Publish, ScoreTurn, Transcribe
from stt.core.session import Session
from stt.core.transcription import Transcription, Word
from stt.wire import protocol
from stt.wire.protocol import Chunk, End, ProtocolError, Start, State, StateChange, encode

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FIELDS = ["type", "audio", "audio_b64", "seq", "timestamp", "state", "sample_rate", "channels",
          "encoding", "language", "prompt", "speaker_id", "session_id", "word_timestamps"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(),
                   st.text(max_size=30), st.binary(max_size=64),
                   st.sampled_from(["start", "chunk", "end", "state_change", "listening",
                                    "responding", "pcm_s16le", "mulaw", "pcm_f32le", "AAAA"]),
                   st.lists(st.integers(-2**63, 2**63 - 1), max_size=3))


@FUZZ
@given(st.binary(max_size=2000))
def test_any_bytes_parse_or_raise_a_protocol_error(payload: bytes) -> None:
    try:
        protocol.parse(protocol.unpack(payload))
    except ProtocolError as err:
        assert err.code and err.message


@FUZZ
@given(st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), VALUES,
                       max_size=8))
def test_any_map_parses_or_raises_a_protocol_error(message: dict[str, Any]) -> None:
    try:
        event = protocol.parse(protocol.unpack(msgpack.packb(message, use_bin_type=True)))
    except ProtocolError as err:
        assert err.code and err.message
    else:
        assert isinstance(event, Start | Chunk | StateChange | End)


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "left", "."]

chunk_op = st.tuples(st.just("chunk"), st.integers(0, 9600), st.integers(0, 2**32 - 1),
                     st.one_of(st.none(), st.integers(0, 60)))
answer_op = st.tuples(st.just("answer"), st.integers(0, 2),
                      st.lists(st.sampled_from(WORDS), max_size=8), st.booleans())
op = st.one_of(
    chunk_op, chunk_op, chunk_op, answer_op, answer_op,  # audio and answers most of the time
    st.tuples(st.just("start"), st.sampled_from([(16000, 1, "pcm_s16le"), (8000, 1, "mulaw"),
                                                 (48000, 2, "pcm_f32le"), (22050, 1, "alaw")]),
              st.sampled_from(list(State)), st.booleans()),
    st.tuples(st.just("state"), st.sampled_from(list(State))),
    st.tuples(st.just("tick"), st.floats(0.0, 3.0)),
    st.tuples(st.just("fail"), st.integers(0, 2)),
    st.tuples(st.just("bad"),),
    # the end-of-turn model's answer to the oldest question asked (None: the query failed)
    st.tuples(st.just("score"), st.one_of(st.none(), st.floats(0.0, 1.0))),
)  # and ``end`` at the end of every example, with what is in flight answered


def chunk_audio(size: int, seed: int, loud: bool) -> bytes:
    rng = np.random.default_rng(seed)
    if not loud:
        return bytes(size)
    return rng.integers(-20000, 20000, size // 2 * 2 // 2, dtype=np.int16).tobytes()


class Checked:
    """A session, every message it published (as wire maps), and the invariants."""

    def __init__(self, s: Settings) -> None:
        self.now = 100.0
        self.session = Session("fuzz", s.session_profile(), self.now)
        self.settings = s
        self.messages: list[dict[str, Any]] = []
        self.closed = False
        self.end_asked = False
        self.queries: list[int] = []  # end-of-turn questions not answered yet

    def apply(self, actions: list[Any]) -> None:
        for a in actions:
            assert not self.closed, "an action after Close"
            if isinstance(a, Publish):
                self.messages.append(encode(a.message, a.sequence, self.now))
            elif isinstance(a, Close):
                self.closed = True
            elif isinstance(a, ScoreTurn):
                assert a.audio.size > 0
                self.queries.append(a.query_id)
            else:
                assert isinstance(a, Transcribe | Cancel)
        self.check()

    def check(self) -> None:
        seqs = [m["sequence"] for m in self.messages]
        assert seqs == list(range(1, len(seqs) + 1))
        ends = [i for i, m in enumerate(self.messages) if m["type"] == "end"]
        assert len(ends) <= 1 and (not ends or ends[0] == len(self.messages) - 1)
        seg, sp = self.session.segmenter.segment, self.session.params.segmenter
        # the size limit cuts speech; a pause that reaches it runs on to its endpoint (43f268d),
        # so the trailing silence may carry a segment past it, never by more than that
        assert seg is None or len(seg) < sp.max_frames + sp.endpoint_frames
        assert len(self.session._jobs.queue) <= self.settings.limits.max_pending_segments
        assert len(self.session.in_flight) <= 3
        partials: dict[int, list[dict[str, Any]]] = {}
        for m in self.messages:
            if m["type"] == "transcript" and m["is_partial"]:
                partials.setdefault(m["segment_id"], []).append(m)
        for ps in partials.values():
            for i, earlier in enumerate(ps):
                stable = earlier["stable_text"].split()
                for later in ps[i + 1:]:
                    assert later["transcript"].split()[:len(stable)] == stable


@settings(FUZZ, max_examples=1000)
# a loud 0.7 s, then mu-law zero bytes (loud, and unvoiced): a pause that reaches the size limit
@example([("start", (8000, 1, "mulaw"), State.LISTENING, False), ("chunk", 5404, 1, None),
          ("chunk", 6313, 0, None), ("state", State.LISTENING)], True, "full")
@given(st.lists(op, min_size=10, max_size=80), st.sampled_from([False, False, True]), st.sampled_from(["full", "prefix", "tail"]))
def test_random_sessions_keep_every_invariant(ops: list[Any], vad: bool, window: str) -> None:
    s = Settings.from_env(environ={}, overrides={
        "enable_vad": vad, "partial_interval_s": 0.1, "buffer_size_bytes": 32000,
        "chunk_timeout_s": 0.3, "max_pending_segments": 2, "final_window": window,
        "speculative_ms": 60, "session_idle_timeout_s": 5.0})
    c = Checked(s)
    for o in ops:
        if c.closed:
            break
        sess = c.session
        kind = o[0]
        if kind == "chunk":
            c.now += o[1] / 32000
            c.apply(sess.handle(Chunk(chunk_audio(o[1], o[2], o[2] % 3 != 0), seq=o[3]), c.now))
        elif kind == "start":
            (rate, channels, encoding), state, words = o[1], o[2], o[3]
            c.apply(sess.handle(Start(sample_rate=rate, channels=channels, encoding=encoding,
                                      state=state, word_timestamps=words), c.now))
        elif kind == "state":
            c.apply(sess.handle(StateChange(o[1]), c.now))
        elif kind == "tick":
            c.now += o[1]
            c.apply(sess.tick(c.now))
        elif kind in ("answer", "fail") and sess.in_flight:
            job = sess.in_flight[o[1] % len(sess.in_flight)]
            c.now += 0.01
            if kind == "fail":
                c.apply(sess.transcription_failed(job.job_id, "boom", c.now))
                continue
            text = " ".join(o[2])
            step = job.duration_s / max(1, len(o[2]))
            timed = [Word(w, i * step, (i + 1) * step) for i, w in enumerate(o[2])] if o[3] else []
            c.apply(sess.transcribed(job.job_id, Transcription(text=text, words=timed), c.now))
        elif kind == "end":
            c.end_asked = True
            c.apply(sess.handle(End(), c.now))
        elif kind == "bad":
            c.apply(sess.reject(ProtocolError(protocol.ErrorCode.BAD_MESSAGE, "bad"), c.now))
        elif kind == "score" and c.queries:
            query, c.now = c.queries.pop(0), c.now + 0.01
            c.apply(sess.turn_failed(query, c.now) if o[1] is None
                    else sess.turn_scored(query, o[1], c.now))
    if not c.closed:  # answer whatever is in flight, then end: it must close
        c.end_asked = True
        c.apply(c.session.handle(End(), c.now))
        for _ in range(20):
            if not c.session.in_flight:
                break
            job = c.session.in_flight[0]
            c.apply(c.session.transcribed(job.job_id, Transcription(text="the end"), c.now))
    assert c.closed and c.messages[-1]["type"] == "end"
    kinds = {"partial" if m.get("is_partial") else m["type"] for m in c.messages}
    for k in sorted(kinds):  # --hypothesis-show-statistics: what the examples reached
        event(k)
