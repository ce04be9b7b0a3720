"""Text normalization and word error rate, as the corpus README prescribes."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w\s']|_")


def normalize(text: str) -> str:
    """Lower case, punctuation stripped, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).replace("'", "").split())


def edit_row(a: list[str], b: list[str]) -> list[int]:
    """Word edit distance from all of ``a`` to each prefix ``b[:j]`` (index j)."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        nxt = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            nxt[j] = min(row[j] + 1, nxt[j - 1] + 1, row[j - 1] + (x != y))
        row = nxt
    return row


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after normalization."""
    ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
    return edit_row(ref, hyp)[-1], len(ref)


def wer(pairs: list[tuple[str, str]]) -> float:
    """Corpus-level WER over (reference, hypothesis) pairs."""
    errors = total = 0
    for ref, hyp in pairs:
        e, n = word_errors(ref, hyp)
        errors, total = errors + e, total + n
    return errors / max(total, 1)
