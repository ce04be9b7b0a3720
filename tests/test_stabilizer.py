"""The stabilizer alone: LocalAgreement-2 with a settled margin, on made-up hypotheses."""

from __future__ import annotations

import random

import pytest

from stt.core.stabilizer import SETTLED_MARGIN_S, Stabilizer, align_prefix, common_prefix, overlap
from stt.core.transcription import Word


def timed(text: str, step: float = 0.3, start: float = 0.0) -> tuple[list[str], list[Word]]:
    words = text.split()
    return words, [Word(w, start + i * step, start + (i + 1) * step) for i, w in enumerate(words)]


def test_a_word_is_committed_when_two_hypotheses_agree_and_audio_follows_it() -> None:
    st = Stabilizer()
    words, times = timed("the cat sat on")
    assert st.update(words, times, window_start_s=5.0, window_end_s=5.0 + 4.0,
                     from_start=True) == words  # one hypothesis: nothing agreed yet
    assert st.words == []
    words, times = timed("the cat sat on the mat")
    tail = st.update(words, times, window_start_s=5.0, window_end_s=5.0 + 4.0, from_start=True)
    assert st.words == ["the", "cat", "sat", "on"]  # all end > 1 s before the window's end
    assert tail == ["the", "mat"]
    # times move to the session timeline; the settled point is where the last one ends
    assert [w.start for w in st.timed] == pytest.approx([5.0, 5.3, 5.6, 5.9])
    assert st.settled_s == pytest.approx(5.0 + 1.2)
    assert st.text == "the cat sat on"


def test_agreed_words_too_close_to_the_window_end_wait() -> None:
    st = Stabilizer()
    words, times = timed("fresh n", step=0.4)
    st.update(words, times, window_start_s=0.0, window_end_s=1.2, from_start=True)
    tail = st.update(words, times, window_start_s=0.0, window_end_s=1.2, from_start=True)
    # "fresh" ends at 0.4 > 1.2 - SETTLED_MARGIN_S: not settled
    assert SETTLED_MARGIN_S > 0.8 and st.words == [] and tail == ["fresh", "n"]
    words, times = timed("fresh nelly is", step=0.4)
    st.update(words, times, window_start_s=0.0, window_end_s=2.0, from_start=True)
    assert st.words == ["fresh"]  # agreed with "fresh n" and ends at 0.4 <= 2.0 - 1.0
    words, times = timed("fresh nelly is here", step=0.4)
    tail = st.update(words, times, window_start_s=0.0, window_end_s=2.1, from_start=True)
    assert st.words == ["fresh", "nelly"]  # "is" agreed too, but ends at 1.2 > 2.1 - 1.0
    assert tail == ["is", "here"]


def test_a_hypothesis_from_the_start_is_aligned_past_the_committed_words() -> None:
    st = Stabilizer()
    for text in ("mister john dashwood had", "mister john dashwood had then"):
        words, times = timed(text)
        st.update(words, times, window_start_s=0.0, window_end_s=5.0, from_start=True)
    assert st.words == ["mister", "john", "dashwood", "had"]
    # the fresh decode spells the committed words differently: they are not repeated
    words, times = timed("mr john dashwood had then leisure")
    tail = st.update(words, times, window_start_s=0.0, window_end_s=5.0, from_start=True)
    assert st.words[:4] == ["mister", "john", "dashwood", "had"]
    assert st.words + tail == ["mister", "john", "dashwood", "had", "then", "leisure"]


def test_a_window_after_the_committed_words_drops_their_repetition() -> None:
    st = Stabilizer()
    for text in ("one two three", "one two three four"):
        words, times = timed(text)
        st.update(words, times, window_start_s=0.0, window_end_s=3.0, from_start=True)
    assert st.words == ["one", "two", "three"]
    words, times = timed("three four five")  # the window began inside "three"
    tail = st.update(words, times, window_start_s=0.8, window_end_s=4.0, from_start=False)
    # "four" agrees with the last hypothesis's tail: committed, and not repeated
    assert st.words == ["one", "two", "three", "four"] and tail == ["five"]


def test_without_word_times_words_commit_on_agreement_alone() -> None:
    st = Stabilizer()
    st.update(["a", "b"], [], window_start_s=0.0, window_end_s=0.5, from_start=True)
    st.update(["a", "b", "c"], [], window_start_s=0.0, window_end_s=0.6, from_start=True)
    assert st.words == ["a", "b"] and st.timed == [] and st.settled_s == 0.0


def test_committed_words_are_never_withdrawn_whatever_the_hypotheses() -> None:
    rng = random.Random(7)
    vocab = ["a", "b", "c", "d", "e"]
    for _ in range(200):
        st = Stabilizer()
        before: list[str] = []
        end = 0.0
        for _ in range(12):
            end += rng.uniform(0.2, 1.0)
            words, times = timed(" ".join(rng.choices(vocab, k=rng.randint(0, 8))),
                                 step=end / 9)
            tail = st.update(words, times if rng.random() < 0.7 else [],
                             window_start_s=0.0, window_end_s=end, from_start=rng.random() < 0.5)
            assert st.words[:len(before)] == before
            assert len(tail) <= len(words)
            before = list(st.words)


def test_helpers() -> None:
    assert common_prefix(["a", "b", "c"], ["a", "b", "x"]) == 2
    assert align_prefix([], ["x"]) == 0
    assert align_prefix(["a", "b"], ["a", "b", "c"]) == 2
    assert align_prefix(["a", "b"], ["a", "x", "b", "c"]) == 3
    assert overlap(["a", "b", "c"], ["b", "c", "d"]) == 2
    assert overlap(["a"], ["b"]) == 0

