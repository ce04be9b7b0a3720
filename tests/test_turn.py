"""End of turn: the decision unit alone, then the session with scripted model answers (fake
clock, real speech from the bundled sample), then the worker with the real Smart Turn model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_session import SENTENCE_1, SENTENCE_2, Harness, silence

from stt.core.actions import ScoreTurn
from stt.core.transcription import Transcription
from stt.core.turn import Turn, TurnParams, Verdict, words_signal
from stt.wire.protocol import End, Start, State, StateChange

PARAMS = TurnParams(query_s=(0.15, 0.45, 0.9), thresholds=((0.15, 0.9), (0.45, 0.8), (0.9, 0.6)),
                    finished_bonus=0.15, eager=0.6, max_silence_s=1.6, fallback_s=0.8)


# --- the unit ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "signal"), [
    ("I'd like a table for four.", 0.15), ("Is it open tomorrow?", 0.15),
    ("I'd like a table for", None), ("book it for the", None), ("and then, um", None),
    ("first the soup,", None), ("", None), ("well I think it works", 0.0), ("and so on...", None)])
def test_words_signal(text: str, signal: float | None) -> None:
    assert words_signal(text, 0.15) == signal


def test_the_model_is_asked_once_per_query_point_and_one_at_a_time() -> None:
    turn = Turn(PARAMS)
    assert not turn.query_due(0.12)
    assert turn.query_due(0.15)
    turn.asked(0.15)
    assert not turn.query_due(0.5)          # the first answer is not back
    turn.scored(0.2)
    assert turn.query_due(0.5)
    turn.asked(0.95)                        # late: 0.45 and 0.9 are both passed
    turn.scored(0.3)
    assert not turn.query_due(1.5)
    assert turn.queries == 2


def test_the_model_is_not_asked_when_the_words_already_decide() -> None:
    """Words that announce more hold the turn whatever the model says; words that end like a
    sentence and clear the threshold on their own end it with any probability: a query would
    only cost CPU the finals need."""
    params = TurnParams(query_s=(0.15, 0.45, 0.9), thresholds=((0.15, 0.9), (0.9, 0.1)),
                        finished_bonus=0.15)
    turn = Turn(params)
    assert turn.query_due(0.15, None)                     # no words yet: ask
    turn.asked(0.15)
    turn.scored(0.05)
    assert not turn.query_due(0.45, "Book a table for the")  # dangling: skipped ...
    assert turn.query_due(0.9, "Book a table for four")      # no full stop: 0.05 < 0.1, ask
    turn = Turn(params)
    turn.asked(0.15)
    turn.scored(0.3)
    assert turn.query_due(0.45, "Book a table for four.")    # 0.15 < 0.9: the model decides
    turn.asked(0.45)
    turn.scored(0.4)
    assert not turn.query_due(0.9, "Book a table for four.")  # 0.15 >= 0.1: the words end it
    assert turn.decide(0.9, "Book a table for four.") is Verdict.END
    assert turn.queries == 2


def test_a_confident_model_and_a_finished_sentence_end_the_turn_early() -> None:
    turn = Turn(PARAMS)
    turn.asked(0.15)
    turn.scored(0.8)
    assert turn.decide(0.2, None) is Verdict.HOLD             # the words are not decoded yet
    assert turn.decide(0.3, "Book a table for four.") is Verdict.END  # 0.8 + 0.15 >= 0.9


def test_an_early_answer_is_judged_at_its_own_silence_and_not_asked_again() -> None:
    """The thresholds rise with the silence because the model's probability does, for
    hesitations too. An answer asked at 0.06 s is held to the 0.06 s step even when the words
    it is combined with come in after 0.3 s (two sessions' decodes on two cores), and it is
    not asked again while it would end the turn with words that end a sentence: that query
    would only slow the decode the turn is waiting for."""
    params = TurnParams(query_s=(0.06, 0.3, 0.6), thresholds=((0.06, 0.8), (0.3, 1.1), (0.6, 0.3)),
                        finished_bonus=0.3)
    turn = Turn(params)
    assert turn.query_due(0.06)
    turn.asked(0.06)
    turn.scored(0.6)
    assert turn.bar(0.4) == 0.8
    assert not turn.query_due(0.3)                     # 0.6 + 0.3 >= 0.8: its answer is enough
    assert turn.decide(0.4, "Book a table for four") is not Verdict.END  # no full stop: 0.6
    assert turn.decide(0.45, "Book a table for four.") is Verdict.END   # 0.6 + 0.3 >= 0.8
    assert turn.queries == 1
    # an unsure first answer: asked again, and the new one is held to its own, higher step
    turn = Turn(params)
    turn.asked(0.06)
    turn.scored(0.3)
    assert turn.query_due(0.3)                         # 0.3 + 0.3 < 0.8
    turn.asked(0.3)
    assert turn.bar(0.35) == 0.8                       # the answer in is still the early one
    turn.scored(0.75)
    assert turn.bar(0.35) == 1.1
    assert turn.decide(0.4, "Book a table for four.") is not Verdict.END  # 1.05 < 1.1
    assert turn.decide(0.6, "Book a table for four.") is Verdict.END    # the last step: 0.3
    turn.resumed()
    assert turn.measured_at_s is None and turn.bar(0.4) == 1.1


def test_dangling_words_hold_the_turn_until_the_maximum_silence() -> None:
    turn = Turn(PARAMS)
    turn.asked(0.15)
    turn.scored(0.99)
    for t in (0.3, 0.6, 1.0, 1.5):
        assert turn.decide(t, "Book a table for the") is Verdict.HOLD
    assert turn.decide(1.6, "Book a table for the") is Verdict.END


def test_eager_once_then_resumed() -> None:
    turn = Turn(PARAMS)
    turn.asked(0.15)
    turn.scored(0.5)
    assert turn.decide(0.3, "Book a table.") is Verdict.EAGER   # 0.65: eager, not the end
    assert turn.decide(0.35, "Book a table.") is Verdict.HOLD   # said once
    assert turn.resumed() is True
    assert turn.resumed() is False
    assert turn.probability is None and turn.query_due(0.15)


def test_a_failed_query_falls_back_to_silence() -> None:
    turn = Turn(PARAMS)
    turn.asked(0.15)
    turn.failed()
    assert turn.decide(0.5, "Book a table.") is Verdict.HOLD
    assert turn.decide(0.8, "Book a table.") is Verdict.END
    assert turn.decide(0.8, "Book a table for") is Verdict.HOLD


def test_silence_mode_never_asks_and_ends_only_at_the_maximum() -> None:
    turn = Turn(TurnParams(mode="silence", max_silence_s=0.8))
    assert not turn.query_due(0.5)
    assert turn.decide(0.5, "Done.") is Verdict.HOLD


def test_sure_model_ends_before_the_words() -> None:
    turn = Turn(TurnParams(sure=0.95))
    turn.asked(0.15)
    turn.scored(0.97)
    assert turn.decide(0.2, None) is Verdict.END


def test_params_are_checked() -> None:
    with pytest.raises(ValueError):
        TurnParams(mode="magic")
    with pytest.raises(ValueError):
        TurnParams(query_s=(0.5, 0.2))


# --- the session ------------------------------------------------------------------------------


class TurnHarness(Harness):
    """Answers the model's queries from a script: probabilities in the order asked."""

    def __init__(self, probabilities: list[float], start: Start | None = None,
                 **overrides: Any) -> None:
        self.queries: list[ScoreTurn] = []
        self.script = list(probabilities)
        super().__init__(start, **{"endpointing": "model", "speculative_ms": 200,
                                   "turn_query_s": "0.15,0.45,0.9",
                                   "turn_thresholds": "0.15:0.9,0.45:0.8,0.9:0.6",
                                   "turn_finished_bonus": 0.15, "turn_max_silence_s": 1.6,
                                   **overrides})

    def apply(self, actions: list[Any]) -> list[Any]:
        super().apply(actions)
        for a in actions:
            if isinstance(a, ScoreTurn):
                self.queries.append(a)
                p = self.script.pop(0) if self.script else 0.0
                self.apply(self.session.turn_scored(a.query_id, p, self.now))
        return actions

    def spec_reply(self, text: str) -> None:
        job = [j for j in self.jobs if j.speculative][-1]
        self.apply(self.session.transcribed(job.job_id, Transcription(text=text), self.now))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.published if m["type"] == kind]

    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.published if m["type"] == "transcript" and m["is_final"]]


def test_a_finished_sentence_ends_the_turn_when_the_words_arrive() -> None:
    h = TurnHarness([0.95])
    h.feed(silence(0.3))
    h.feed(SENTENCE_1)
    h.feed(silence(0.3))
    assert len(h.queries) == 1 and h.queries[0].audio.size > 6 * 16000
    assert [j.speculative for j in h.jobs] == [True]  # the final's decode started with the query
    assert h.finals() == []
    h.spec_reply("He hoped there would be stew for dinner.")
    (final,) = h.finals()
    assert final["end_of_turn"] is True and final["turn_probability"] == 0.95
    assert final["transcript"] == "He hoped there would be stew for dinner."


def test_a_hesitation_keeps_one_utterance_and_resumes_the_eager_turn() -> None:
    h = TurnHarness([0.6, 0.2, 0.3, 0.95])
    h.feed(silence(0.3))
    h.feed(SENTENCE_1)
    h.feed(silence(0.3))
    h.spec_reply("He hoped there would be stew.")        # 0.75: eager, below 0.9
    (eager,) = h.of_type("eager_end_of_turn")
    assert eager["transcript"] == "He hoped there would be stew." and eager["turn_probability"] == 0.6
    h.feed(silence(0.9))                                  # asked at 0.45 and 0.9 s: 0.2, 0.3: hold
    assert h.finals() == []
    h.feed(SENTENCE_2)                                    # the user goes on
    assert len(h.of_type("turn_resumed")) == 1
    h.feed(silence(0.3))
    h.spec_reply("He hoped there would be stew for dinner and carrots.")
    (final,) = h.finals()
    assert final["end_of_turn"] is True
    assert final["start"] < 0.5 and final["end"] > 11.0  # both sentences, one final
    kinds = [m["type"] for m in h.published]
    assert kinds.index("eager_end_of_turn") < kinds.index("turn_resumed") < kinds.index("transcript")


def test_dangling_words_wait_for_the_maximum_silence() -> None:
    h = TurnHarness([0.99, 0.99, 0.99])
    h.feed(silence(0.3))
    h.feed(SENTENCE_1)
    h.feed(silence(0.4))
    h.spec_reply("He hoped there would be stew for the")
    h.feed(silence(1.0))
    assert h.finals() == []
    assert len(h.queries) == 1  # the words hold the turn: asking again would change nothing
    h.feed(silence(0.3))                                  # past 1.6 s
    (final,) = h.finals()
    assert final["end_of_turn"] is True


def test_a_start_can_ask_for_silence_endpointing() -> None:
    h = TurnHarness([0.99], Start(endpointing="silence"), chunk_timeout_s=0.6)
    h.feed(silence(0.3))
    h.feed(SENTENCE_1)
    h.feed(silence(0.7))
    assert h.queries == []
    assert len(h.jobs) == 1 and h.of_type("eager_end_of_turn") == []
    h.spec_reply("stew")
    assert h.finals()[0]["end_of_turn"] is True and h.finals()[0]["turn_probability"] is None


def test_without_the_model_the_session_ends_turns_on_silence() -> None:
    h = TurnHarness([0.99], chunk_timeout_s=0.6)
    h.session = type(h.session)("s2", h.settings.session_profile(model=False), h.now)
    assert not h.session.params.turn.uses_model
    assert h.session.params.segmenter.endpoint_frames == 20


def test_an_answer_for_a_silence_that_is_over_is_ignored() -> None:
    h = Harness(endpointing="model", speculative_ms=200)
    h.feed(silence(0.3))
    h.feed(SENTENCE_1)
    for _ in range(10):
        h.feed(silence(0.04))
    utt = h.session._utt
    assert utt is not None and utt.turn is not None and utt.turn.in_flight
    query = utt.turn_query
    h.feed(SENTENCE_2[:8000])                             # speech again before the answer
    assert not utt.turn.in_flight
    assert h.session.turn_scored(query, 0.99, h.now) == []


def test_size_cut_final_is_not_the_end_of_a_turn() -> None:
    h = TurnHarness([0.0] * 50, buffer_size_bytes=128000)  # 4 s segments
    h.auto_answer = True
    h.feed(silence(0.3))
    h.feed(SENTENCE_1)
    h.feed(silence(2.0))
    flags = [m["end_of_turn"] for m in h.finals()]
    assert flags[-1] is True and False in flags[:-1]


def test_state_change_and_end_finals_end_the_turn() -> None:
    h = TurnHarness([0.1, 0.1, 0.1])
    h.auto_answer = True
    h.feed(silence(0.3))
    h.feed(SENTENCE_1)
    h.apply(h.session.handle(StateChange(State.RESPONDING), h.now))
    assert h.finals()[-1]["end_of_turn"] is True
    h.apply(h.session.handle(End(), h.now))
    assert h.closed is not None


def test_queries_hear_at_most_eight_seconds() -> None:
    h = TurnHarness([0.0] * 10)
    h.feed(silence(0.3))
    h.feed(np.concatenate([SENTENCE_1, SENTENCE_1[: 3 * 16000]]))
    h.feed(silence(0.4))
    assert h.queries and h.queries[0].audio.size <= 8 * 16000


# --- the worker, the real model ---------------------------------------------------------------


async def test_worker_ends_turns_with_the_real_model_at_real_time(worker_factory: Any,
                                                                  nc: Any) -> None:
    from stt.transport.client import stream_audio

    worker = await worker_factory(endpointing="model", partial_interval_s=0.5)
    assert worker.turn_model is not None
    audio = np.concatenate([silence(0.3), SENTENCE_1, silence(1.8), SENTENCE_2, silence(1.8)])
    result = await stream_audio(nc, audio, 16000, session_id="turns", speed=1.0)
    finals = result.finals
    assert len(finals) == 2, result.messages
    assert all(f["end_of_turn"] is True for f in finals)
    assert all(0.0 <= f["turn_probability"] <= 1.0 for f in finals)
    assert "dashwood" in finals[0]["transcript"].lower()
    status = worker.status()
    assert status.turn_queries["scored"] >= 2 and status.turn_seconds > 0
    assert status.sessions == 0


def test_a_wordless_interrupt_is_cancelled_as_soon_as_its_decode_says_so() -> None:
    h = TurnHarness([0.1] * 5, Start(state=State.RESPONDING))
    h.feed(silence(0.3))
    h.feed(SENTENCE_1[: 16000])                           # loud enough, pitched: an interrupt
    assert h.of_type("interrupt")
    h.feed(silence(0.45))
    h.spec_reply("")                                      # ... but it had no words
    (cancelled,) = h.of_type("interrupt_cancelled")
    assert cancelled["state"] == "responding" and h.session.state is State.RESPONDING


def test_a_final_holds_the_same_audio_whenever_its_decode_starts() -> None:
    """The model's early "probably over" starts the final's decode once the final's tail of
    silence (STT_HANGOVER_MS) is in, not before: a final started by the model and one started at
    STT_SPECULATIVE_MS decode the same audio (Whisper's text can change with its length)."""
    jobs = []
    for p in (0.9, 0.05):
        h = TurnHarness([p], turn_query_s="0.06,0.45,0.9", hangover_ms=150, speculative_ms=300)
        h.feed(silence(0.3))
        h.feed(SENTENCE_1)
        h.feed(silence(0.15))  # the query was answered at 0.06 s of silence: too soon
        assert len(h.queries) == 1 and h.jobs == []
        h.feed(silence(0.09))   # 0.15 s of silence
        assert [j.speculative for j in h.jobs] == ([True] if p == 0.9 else [])
        h.feed(silence(0.15))   # 0.3 s
        (job,) = h.jobs
        jobs.append(job)
    assert jobs[0].audio.size == jobs[1].audio.size
    assert np.array_equal(jobs[0].audio, jobs[1].audio)


def test_a_pause_the_model_calls_mid_sentence_costs_no_early_decode() -> None:
    low = TurnHarness([0.05], speculative_ms=300)
    low.feed(silence(0.3))
    low.feed(SENTENCE_1)
    low.feed(silence(0.3))
    assert len(low.queries) == 1 and low.jobs == []       # asked, but no decode yet
    high = TurnHarness([0.8], speculative_ms=300)
    high.feed(silence(0.3))
    high.feed(SENTENCE_1)
    high.feed(silence(0.3))
    assert [j.speculative for j in high.jobs] == [True]   # probably the end: decode now
