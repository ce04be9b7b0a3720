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


# --- does a hypothesis read as a finished sentence? (adaptive endpointing) -----------------------
# Whisper punctuates: a hypothesis that ends in terminal punctuation, on a word that can end a
# sentence, most likely is one. These English words rarely end one: conjunctions, articles,
# prepositions, fillers, and words that announce more.
UNFINISHED_LAST_WORDS = frozenset("""
and or but so because if than that then when while although though unless until whether
the a an this these those my your his her its our their some any every no
of to in on at by for from with about into onto over under after before between through
um uh er erm ah hmm like well im i you we they is are was were be been am
""".split())
TERMINAL = (".", "?", "!")


def reads_finished(text: str) -> bool:
    """True when ``text`` ends like a finished sentence: terminal punctuation, and a last word
    that is not a conjunction, article, preposition or filler ("...and the." is not finished)."""
    stripped = text.rstrip().rstrip("\"')]")
    if not stripped.endswith(TERMINAL) or stripped.endswith("..."):
        return False
    words = normalize(stripped).split()
    return bool(words) and words[-1] not in UNFINISHED_LAST_WORDS
