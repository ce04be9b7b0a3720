"""Text rules: normalization, WER, and whether a hypothesis reads as a finished sentence."""

from __future__ import annotations

from stt.core.textnorm import normalize, reads_finished, wer


def test_normalize_and_wer() -> None:
    assert normalize("Mr. Dashwood's, HOUSE!") == "mr dashwoods house"
    assert wer([("a b c d", "a x c d")]) == 0.25


def test_reads_finished() -> None:
    assert reads_finished("He was not there.") and reads_finished("Is it? ")
    assert reads_finished('He said "stop."')
    assert not reads_finished("He was not there")       # no terminal punctuation
    assert not reads_finished("He went to the.")        # an article does not end a sentence
    assert not reads_finished("Coffee and.") and not reads_finished("Well, um.")
    assert not reads_finished("Wait...") and not reads_finished("")
