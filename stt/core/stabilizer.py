"""Stable partials: which words of a growing utterance will not change any more.

A partial is Whisper's hypothesis for the utterance so far; the next one, decoded with more
audio, may spell its words differently. The rule here is LocalAgreement-2 (as in
whisper_streaming): a word two consecutive hypotheses agree on is *committed*, published as
``stable_text`` and never withdrawn by a later partial. Two guards on top:

* **settled margin**: a word is committed only once ``SETTLED_MARGIN_S`` of audio follows it.
  With tiny.en and short partial windows, two early hypotheses agreed on wrong words ("Fresh N"
  for "fresh Nelly": finals +0.038 WER over whole-clip decoding, tests/test_accuracy.py);
  Whisper rewrites the newest words of a window, not the settled ones.
* **alignment**: a hypothesis decoded from the utterance's start may spell the committed words a
  little differently; the cut with the fewest word edits (:func:`align_prefix`) finds where they
  end. One decoded from the last committed word's end (long utterances, see the session) may
  repeat a committed word or two (:func:`overlap`).

Measured earlier (bench/evaluate.py, README): waiting for 3 agreeing hypotheses, or holding back
the newest agreed word, did not lower the finals' WER further.

This module knows words and times only: no audio, no clock, no protocol.
"""

from __future__ import annotations

from stt.core.textnorm import edit_row
from stt.core.transcription import Word

SETTLED_MARGIN_S = 1.0


class Stabilizer:
    """The committed words of one utterance, updated with each partial hypothesis."""

    __slots__ = ("_previous", "settled_s", "timed", "words")

    def __init__(self) -> None:
        self.words: list[str] = []     # committed, in order
        self.timed: list[Word] = []    # their times on the session timeline, when known
        self.settled_s: float = 0.0    # session time where the last committed word ends (if timed)
        self._previous: list[str] | None = None  # the last hypothesis's uncommitted words

    def update(self, decoded: list[str], words: list[Word], *,
               window_start_s: float, window_end_s: float, from_start: bool) -> list[str]:
        """Take a hypothesis for the window; return its words after the committed ones.

        ``decoded`` is the window's text split into words, ``words`` their times relative to
        ``window_start_s`` (empty or of another length when the engine has no word times:
        then words are committed without the settled margin and without times).
        ``from_start``: the window began at the utterance's start, so the hypothesis repeats
        the committed words; otherwise it began where they end.
        """
        hypothesis = decoded
        if self.words:
            skip = (align_prefix(self.words, hypothesis) if from_start
                    else overlap(self.words, hypothesis))
            hypothesis = hypothesis[skip:]
        first = len(decoded) - len(hypothesis)  # index of hypothesis[0] in decoded
        timed = len(words) == len(decoded)
        agreed = common_prefix(self._previous, hypothesis) if self._previous is not None else 0
        if agreed and timed:
            limit = (window_end_s - window_start_s) - SETTLED_MARGIN_S
            while agreed and words[first + agreed - 1].end > limit:
                agreed -= 1
        if agreed:
            self.words += hypothesis[:agreed]
            if timed:
                self.timed += [Word(w.word, w.start + window_start_s, w.end + window_start_s,
                                    w.probability) for w in words[first:first + agreed]]
                self.settled_s = max(self.settled_s,
                                     window_start_s + words[first + agreed - 1].end)
        tail = hypothesis[agreed:]
        self._previous = tail
        return tail

    @property
    def text(self) -> str:
        return " ".join(self.words)


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
