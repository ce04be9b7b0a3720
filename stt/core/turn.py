"""End of turn: has the user finished, or only paused? No I/O, no clock: silence, the end-of-turn
model's probability and the words in; decisions out.

A voice assistant cannot answer before it knows the user has finished. Silence alone cannot tell
a hesitation ("I'd like to book a table for ... four") from an end, so an utterance's trailing
silence is judged from two sources:

* the **audio**: Smart Turn v3.2 (:mod:`stt.engines.turn_model`), asked at fixed points of the trailing
  silence (``TurnParams.query_s``). It tells a pause from an end best early in the silence:
  later, its probability rises for hesitations too (``docs``: the figures it was fitted on);
* the **words**: the speculative final, decoded during the same silence. A transcript that ends
  on a word that announces more ("the", "to", "and", "um": :data:`stt.core.textnorm.UNFINISHED_LAST_WORDS`)
  or on a comma is never a finished turn; one that ends on terminal punctuation adds
  ``finished_bonus`` to the model's probability.

:meth:`Turn.decide` ends the turn when the combined score clears the threshold for the silence
so far (``thresholds``: a step function of the silence; an answer of the model is held to the
step of the silence it was asked at, when that one is lower: :meth:`Turn.bar`), sends an
*eager* end of turn once when it clears ``eager`` first (an assistant can start preparing its
answer), and ends the turn regardless after ``max_silence_s``. Fixed silence endpointing
(``mode == "silence"``) never asks the model: the segmenter's ``STT_CHUNK_TIMEOUT`` ends the
utterance, as before.

One :class:`Turn` per utterance; the session feeds it and carries out what it says.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Protocol

from stt.core.textnorm import TERMINAL, UNFINISHED_LAST_WORDS, normalize

MODES = ("model", "silence")


class TurnScorer(Protocol):
    """What the worker asks (stt.engines.turn_model.TurnModel): P(the turn is over) for 16 kHz audio."""

    def predict(self, audio: Any) -> float: ...


class Verdict(enum.Enum):
    HOLD = "hold"      # keep listening
    EAGER = "eager"    # probably finished: say so once, keep listening
    END = "end"        # the turn is over


@dataclass(frozen=True)
class TurnParams:
    """How the end of a turn is decided, in seconds of trailing silence."""

    mode: str = "model"
    query_s: tuple[float, ...] = (0.06, 0.3, 0.6, 0.8)  # the model is asked at these silences
    # (from this silence on, this combined score ends the turn), ascending in silence; an
    # answer of the model is held to the step of the silence it was asked at (Turn.bar)
    thresholds: tuple[tuple[float, float], ...] = ((0.06, 0.8), (0.3, 1.1), (0.6, 0.3))
    finished_bonus: float = 0.3    # added when the words end like a finished sentence
    eager: float = 0.6             # combined score that sends eager_end_of_turn
    sure: float = 2.0              # the model alone this sure ends the turn before the words
    speculate_p: float = 0.3       # the model this sure starts the final's decode at once
    max_silence_s: float = 1.3     # ends the turn whatever the model and the words say
    fallback_s: float = 0.8        # when the model cannot answer: silence alone, as before

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"turn mode must be one of {MODES}, not {self.mode!r}")
        if list(self.query_s) != sorted(self.query_s) or any(q <= 0 for q in self.query_s):
            raise ValueError("query_s must be positive and ascending")
        steps = [s for s, _ in self.thresholds]
        if steps != sorted(steps):
            raise ValueError("thresholds must be ascending in silence")

    @property
    def uses_model(self) -> bool:
        return self.mode == "model"

    @property
    def first_query_s(self) -> float:
        return self.query_s[0] if self.query_s else math.inf

    def threshold(self, silence_s: float) -> float:
        """The score that ends the turn after ``silence_s`` of silence (inf: not yet)."""
        out = math.inf
        for since, value in self.thresholds:
            if silence_s + 1e-9 >= since:
                out = value
        return out


# Words that leave a sentence hanging even when the recognizer put a full stop after them
# ("I'd like a table for the." is a hesitation): articles, conjunctions, fillers, determiners,
# "of" and "to". Other function words ("her", "be", "on", "from") end sentences often enough
# ("...who approached her.") that only a missing full stop makes them count.
DANGLING = frozenset("""
the a an and or but because if than although though unless whether while
um uh er erm ah hmm my your our their its of to
""".split())


def words_signal(text: str, bonus: float) -> float | None:
    """What the words add to the model's probability: None when they announce more (a trailing
    comma or dash, a :data:`DANGLING` word, a function word without a full stop, nothing at
    all), ``bonus`` when they end like a finished sentence, 0 otherwise."""
    stripped = text.rstrip().rstrip("\"')]")
    words = normalize(stripped).split()
    if not words or stripped.endswith((",", ";", ":", "-", "...")) or words[-1] in DANGLING:
        return None
    if stripped.endswith(TERMINAL):
        return bonus
    return None if words[-1] in UNFINISHED_LAST_WORDS else 0.0


class Turn:
    """One utterance's end-of-turn state: which queries were asked, what came back, whether an
    eager event went out."""

    def __init__(self, params: TurnParams) -> None:
        self.params = params
        self.probability: float | None = None   # the latest answer of the model
        self.asked_at_s: float | None = None    # the silence the latest query was asked at
        self.measured_at_s: float | None = None  # the silence ``probability`` was asked at
        self.in_flight = False
        self.eager_sent = False
        self.model_failed = False  # no answer for this pause: silence and words decide
        self.queries = 0
        self._next_query = 0

    def query_due(self, silence_s: float, words: str | None = None) -> bool:
        """Ask the model now? Once per query point reached, one query at a time, and not when
        its answer cannot change what happens: ``words`` (the speculative final's text)
        announce more, or they end the turn at this silence with any probability, or the
        answer already in ends it with any words that end a sentence. A query costs 30-150 ms
        of a CPU that two sessions' finals are decoding on (the final it would delay is the
        one the turn waits for)."""
        p = self.params
        if not p.uses_model or self.in_flight or self._next_query >= len(p.query_s):
            return False
        if silence_s + 1e-9 < p.query_s[self._next_query]:
            return False
        if not self._worth_asking(silence_s, words):
            self._next_query += 1  # this point is passed, unasked
            return False
        return True

    def _worth_asking(self, silence_s: float, words: str | None) -> bool:
        bonus = self.params.finished_bonus
        if words is None:  # the words may still end a sentence: would this answer do then?
            return self.probability is None or self.probability + bonus < self.bar(silence_s)
        signal = words_signal(words, bonus)
        if signal is None:
            return False
        return self.probability is None or (signal < self.params.threshold(silence_s)
                                            and self.probability + signal < self.bar(silence_s))

    def bar(self, silence_s: float) -> float:
        """The score that ends the turn at this silence: the threshold for the silence so far,
        or for the silence the model's answer was asked at when that one is lower. The
        thresholds step with the silence because the model's probability rises with it, for
        hesitations too; an answer asked early is judged as early, however late the words it
        is combined with come in."""
        bar = self.params.threshold(silence_s)
        if self.probability is not None and self.measured_at_s is not None:
            bar = min(bar, self.params.threshold(self.measured_at_s))
        return bar

    def asked(self, silence_s: float) -> None:
        self.in_flight = True
        self.asked_at_s = silence_s
        self.queries += 1
        p = self.params
        while self._next_query < len(p.query_s) and silence_s + 1e-9 >= p.query_s[self._next_query]:
            self._next_query += 1  # points passed while a query was in flight are not re-asked

    def scored(self, probability: float) -> None:
        self.in_flight = False
        self.probability = probability
        self.measured_at_s = self.asked_at_s

    def failed(self) -> None:
        self.in_flight = False
        self.model_failed = True

    def resumed(self) -> bool:
        """Speech came back: the silence starts over. True when an eager end of turn was sent
        (the client must hear that the turn goes on)."""
        if not self._next_query and not self.in_flight:
            return False  # never asked in this silence: nothing to undo (every speech frame)
        eager, self.eager_sent = self.eager_sent, False
        self.probability = self.asked_at_s = self.measured_at_s = None
        self.in_flight = self.model_failed = False  # an answer still in flight is for a silence that is over
        self._next_query = 0
        return eager

    def score(self, words: str | None) -> float | None:
        """The model's probability combined with the words; None while either is missing or
        when the words announce more."""
        if self.probability is None or words is None:
            return None
        signal = words_signal(words, self.params.finished_bonus)
        return None if signal is None else self.probability + signal

    def decide(self, silence_s: float, words: str | None) -> Verdict:
        """``words``: the speculative final's text, None until it is decoded."""
        p = self.params
        if silence_s + 1e-9 >= p.max_silence_s:
            return Verdict.END
        if not p.uses_model:
            return Verdict.HOLD
        if self.model_failed and self.probability is None:
            finished = words is not None and words_signal(words, 0.0) is not None
            return Verdict.END if finished and silence_s + 1e-9 >= p.fallback_s else Verdict.HOLD
        if (words is None and self.probability is not None and self.probability >= p.sure
                and p.threshold(silence_s) < math.inf):
            return Verdict.END  # the words would come too late to matter
        score = self.score(words)
        if score is None:
            return Verdict.HOLD
        if score >= self.bar(silence_s):
            return Verdict.END
        if not self.eager_sent and score >= p.eager:
            self.eager_sent = True
            return Verdict.EAGER
        return Verdict.HOLD
