"""Text normalization and word error rate, as the corpus README prescribes."""

from __future__ import annotations

import re

_PUNCT = re.compile(r"[^\w\s']|_")


def normalize(text: str) -> str:
    """Lower case, punctuation stripped, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).replace("'", "").split())


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, reference length) after normalization."""
    ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1], len(ref)


def wer(pairs: list[tuple[str, str]]) -> float:
    """Corpus-level WER over (reference, hypothesis) pairs."""
    errors = total = 0
    for ref, hyp in pairs:
        e, n = word_errors(ref, hyp)
        errors, total = errors + e, total + n
    return errors / max(total, 1)
