"""What both local Whisper engines (``whisper`` on PyTorch, ``faster-whisper`` on CTranslate2)
share: the request they batch, prompts, windows, token budgets and the guards against invented
text. One home for each rule, so the two engines cannot drift apart.

Guards, in the order a final meets them (Whisper's own transcribe() does the same):

* a token budget proportional to the audio's duration, so a looping decode stops early;
* a final whose text looks like a loop (gzip compression ratio) or a guess (average token
  log-probability) is decoded again, hotter (``FALLBACK_TEMPERATURES``), unless it looks like
  silence, where a hotter decode would only invent words;
* text is dropped when it looks like silence (high no-speech probability *and* low
  log-probability) or is still a loop; runs of a repeated n-gram are cut to one.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stt.config.transcription import TranscriptionSettings
from stt.core.audio import SAMPLE_RATE
from stt.core.textnorm import normalize
from stt.core.transcription import Segment, TranscribeOptions, Transcription, Word
from stt.engines.base import EngineError

WINDOW_S = 30                 # Whisper's input window (whisper.audio.CHUNK_LENGTH)
HOP = 160                     # samples per mel frame (10 ms)
WINDOW_FRAMES = WINDOW_S * SAMPLE_RATE // HOP
SHORT_STEP_FRAMES = 200       # short windows grow in 2 s steps: few distinct shapes to batch
SHORT_TAIL_FRAMES = 50        # >= 0.5 s of silence after the speech, or the last word suffers
FITTED_TAIL_FRAMES = 300      # finals padded with silence's encoding: their audio + 3 s ...
FITTED_STEP_FRAMES = 100      # ... in 1 s steps (+0.5 s in 0.5 s steps: corpus WER 0.058 vs 0.050)
FALLBACK_TEMPERATURES = (0.4, 0.8)  # finals only; two retries bound the worst-case latency
CONTEXT_MAX_CHARS = 300       # previous final given as context: its end matters, keep it short
TOKENS_PER_S = 12             # token budget: fast speech is ~4 tokens/s in English, more in CJK
TOKENS_BASE = 24
REPEAT_MAX_PERIOD = 12        # loops of up to 12 tokens ...
REPEAT_MIN_RUNS = 4           # ... seen 4 times in a row are cut to one


def available_cpus() -> int:
    """CPUs this process may use: affinity mask and cgroup v2 quota (containers), not the host's."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def trim_repetitions(tokens: Sequence[int], max_period: int = REPEAT_MAX_PERIOD,
                     min_runs: int = REPEAT_MIN_RUNS) -> list[int]:
    """Cut a decoding loop: the first n-gram (n <= max_period) repeated ``min_runs`` times in a
    row is kept once and everything after it dropped (what follows a loop is not trustworthy)."""
    tokens = list(tokens)
    n = len(tokens)
    for i in range(n):
        for period in range(1, max_period + 1):
            if i + period * min_runs > n:
                break
            gram = tokens[i:i + period]
            if all(tokens[i + k * period:i + (k + 1) * period] == gram for k in range(1, min_runs)):
                return tokens[:i + period]
    return tokens


def split_segments(tokens: Sequence[int], timestamp_begin: int, duration_s: float,
                   precision_s: float = 0.02) -> list[tuple[float, float, list[int]]]:
    """Timestamp tokens -> (start, end, text tokens) spans, clamped to the audio."""
    spans: list[tuple[float, float, list[int]]] = []
    start = 0.0
    text: list[int] = []
    for token in tokens:
        if token >= timestamp_begin:
            at = min((token - timestamp_begin) * precision_s, duration_s)
            if text:
                spans.append((start, max(at, start), text))
                text = []
            start = at
        else:
            text.append(token)
    if text:
        spans.append((start, max(duration_s, start), text))
    return spans


def short_window_frames(n_samples: int) -> int:
    """Mel frames of the short window for ``n_samples`` of audio."""
    frames = n_samples // HOP + SHORT_TAIL_FRAMES
    return min(WINDOW_FRAMES, math.ceil(frames / SHORT_STEP_FRAMES) * SHORT_STEP_FRAMES)


def fitted_frames(n_samples: int) -> int:
    """Mel frames a final is encoded over when the rest of its window is silence's encoding."""
    frames = n_samples // HOP + FITTED_TAIL_FRAMES
    return min(WINDOW_FRAMES, math.ceil(frames / FITTED_STEP_FRAMES) * FITTED_STEP_FRAMES)


def token_budget(duration_s: float, n_text_ctx: int) -> int:
    return min(n_text_ctx // 2, TOKENS_BASE + math.ceil(TOKENS_PER_S * duration_s))


def compression_ratio(text: str) -> float:
    """gzip ratio of the text: a decoding loop compresses far better than speech."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


#: What Whisper writes on silence and noise (subtitle credits of its training data), normalized.
STOCK_PHRASES = frozenset({
    "you", "thank you", "thanks", "thank you very much", "thanks for watching",
    "thank you for watching", "thank you so much for watching", "please subscribe", "bye",
    "bye bye", "so", "okay", "oh", "um", "uh", "hmm", "the end", "subtitles by the amara org community",
})
#: Below this RMS (-70 dBFS) audio is digital silence: not worth a decode, which would invent.
SILENCE_RMS = 10 ** (-70 / 20)


def is_stock_phrase(text: str) -> bool:
    return normalize(text) in STOCK_PHRASES


def is_digital_silence(audio: np.ndarray) -> bool:
    return not audio.size or float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < SILENCE_RMS


@dataclass(frozen=True)
class Guards:
    """Thresholds against invented text (``WHISPER_*_THRESHOLD``); see the module docstring."""

    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4  # 0 = off

    @classmethod
    def from_settings(cls, t: TranscriptionSettings) -> Guards:
        return cls(t.whisper_no_speech_threshold, t.whisper_logprob_threshold,
                   t.whisper_compression_ratio_threshold)

    def is_silence(self, no_speech_prob: float | None, avg_logprob: float | None,
                   text: str = "") -> bool:
        """Whisper's rule (probably no speech, and an improbable text), plus the phrases it
        invents on silence and noise ("you", "Thank you."), dropped when it says "no speech"."""
        if no_speech_prob is None or no_speech_prob <= self.no_speech_threshold:
            return False
        return (avg_logprob is not None and avg_logprob < self.logprob_threshold) \
            or is_stock_phrase(text)

    def is_loop(self, text: str) -> bool:
        cr = self.compression_ratio_threshold
        return bool(cr and text and compression_ratio(text) > cr)

    def needs_fallback(self, text: str, avg_logprob: float, no_speech_prob: float) -> bool:
        """Decode again, hotter? Not for silence: a hotter decode would only invent words."""
        if self.is_silence(no_speech_prob, avg_logprob):
            return False
        return self.is_loop(text) or avg_logprob < self.logprob_threshold


def context_prompt(options: TranscribeOptions, final: bool, use_context: bool) -> str | None:
    """The session's prompt, plus its previous final as context (finals only)."""
    parts = [options.prompt.strip()] if options.prompt and options.prompt.strip() else []
    if final and use_context and options.context:
        context = options.context.strip()
        if len(context) > CONTEXT_MAX_CHARS:  # keep the end, from a word boundary
            context = context[-CONTEXT_MAX_CHARS:].partition(" ")[2] or context[-CONTEXT_MAX_CHARS:]
        parts.append(context)
    return " ".join(parts) or None


@dataclass(frozen=True)
class Request:
    """One segment on its way through an engine's micro-batcher."""

    audio: np.ndarray
    options: TranscribeOptions
    language: str | None
    prompt: str | None
    final: bool
    short: bool
    long_form: bool = False
    prompt_tokens: tuple[int, ...] = ()  # engines that tokenize before batching
    prefix_tokens: tuple[int, ...] = ()  # forced start of the text (TranscribeOptions.prefix)
    window: int = WINDOW_FRAMES          # a full window's frames (WHISPER_FINAL_WINDOW_S)
    pad_encoding: bool = False           # encoded over its audio, the rest silence's encoding

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE

    @property
    def timed(self) -> bool:
        """Decoded with Whisper's timestamp tokens into timed segments: a final whose caller
        asked for them (TranscribeOptions.segment_times) and has no forced prefix."""
        return self.final and self.options.segment_times and not self.options.prefix

    @property
    def n_frames(self) -> int:
        """Mel frames this request is encoded over: a short window, its audio's fitted one (the
        rest of the window is silence's encoding), or the full one (Whisper's 30 s, or
        WHISPER_FINAL_WINDOW_S when that is shorter and the audio fits)."""
        if self.pad_encoding:
            return fitted_frames(self.audio.size)
        frames = short_window_frames(self.audio.size)
        return frames if self.short else min(WINDOW_FRAMES, max(frames, self.window))


def window_frames(requests: Sequence[Request]) -> int:
    """One window for a whole batch: the longest any of its requests needs."""
    return max(r.n_frames for r in requests)


def uses_short_window(setting: str, language: str | None, final: bool) -> bool:
    """``WHISPER_SHORT_WINDOW``: language detection reads the full window, so short windows
    need a known language."""
    return language is not None and (setting == "all" or (setting == "partials" and not final))


class UnsupportedLanguage(EngineError):
    """The session asked for a language the model cannot transcribe (a client error)."""


def pick_language(requested: str | None, *, multilingual: bool, model_name: str,
                  codes: Collection[str], names: Mapping[str, str]) -> str | None:
    """A session's language (a code such as ``en``/``pt-BR`` or a name such as ``german``) ->
    the model's code; None = detect. English-only models answer ``en`` or refuse."""
    if not multilingual:
        if requested and not requested.lower().startswith(("en", "english")):
            raise UnsupportedLanguage(f"model {model_name} is English-only; language "
                                      f"{requested!r} is not available")
        return "en"
    if not requested:
        return None
    code = requested.strip().lower().replace("_", "-")
    if code in names:
        return names[code]
    code = code.split("-")[0]
    if code not in codes:
        raise UnsupportedLanguage(f"unknown language {requested!r}")
    return code


def join_words(timings: Iterable[tuple[str, float, float, float]], duration_s: float) -> list[Word]:
    """Alignment timings (word as decoded, start, end, probability) -> words as the text splits.

    The aligners split "Mr." into " Mr" and "." and "flower-fat" into three: a piece that does
    not begin with a space belongs to the word before it, so the words are exactly the
    transcript's whitespace-separated words. Times are clamped to the audio.
    """
    out: list[Word] = []
    for raw, start, end, probability in timings:
        text = raw.strip()
        if not text:
            continue
        start_s, end_s = round(min(start, duration_s), 3), round(min(end, duration_s), 3)
        if out and not raw[:1].isspace():
            last = out[-1]
            out[-1] = Word(last.word + text, last.start, max(last.end, end_s),
                           round(min(last.probability or 1.0, probability), 4))
        else:
            out.append(Word(text, start_s, end_s, round(probability, 4)))
    return out


@dataclass(frozen=True)
class LongFormSegment:
    """One segment of a library's own long-form decode (openai-whisper or faster-whisper)."""

    tokens: Sequence[int]
    start: float
    end: float
    no_speech_prob: float
    avg_logprob: float
    words: Sequence[tuple[str, float, float, float]]  # word, start, end, probability


def long_form_transcription(segments: Iterable[LongFormSegment], decode: Callable[[list[int]], str],
                            eot: int, guards: Guards, language: str | None,
                            duration_s: float) -> Transcription:
    """The same clean-up as for single windows: cut loops, drop what still looks like one."""
    kept_segments: list[Segment] = []
    words: list[Word] = []
    for seg in segments:
        tokens = [t for t in seg.tokens if t < eot]
        kept = trim_repetitions(tokens)
        text = decode(kept).strip()
        if not text or guards.is_loop(text):
            continue
        kept_segments.append(Segment(text, float(seg.start), float(seg.end),
                                     float(seg.no_speech_prob), float(seg.avg_logprob),
                                     compression_ratio(text)))
        if len(kept) == len(tokens):  # word timings of a cut segment would not match
            words += [Word(w.strip(), float(s), float(e), float(p))
                      for w, s, e, p in seg.words if w.strip()]
    return Transcription(text=" ".join(s.text for s in kept_segments), language=language,
                         segments=kept_segments, words=words,
                         no_speech_prob=kept_segments[0].no_speech_prob if kept_segments else None,
                         duration_s=duration_s)
