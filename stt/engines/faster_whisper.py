"""Whisper on CTranslate2 through faster-whisper: the default engine (int8 on CPU, float16 on
CUDA), with OpenAI's tiny.en embedded from the package registry (:mod:`stt.engines.models`).

Theory of operation
-------------------
* The model loads once (the embedded default, a directory, or a name downloaded into the Hugging
  Face cache), then every decode path is warmed up. Model work runs on inference threads
  (on CPU one pass per core, ``STT_ENGINE_WORKERS``, of ``WHISPER_CPU_THREADS`` each), so the
  event loop only awaits. On CPU (Linux) partials decode on a second copy of the model whose
  threads run at ``WHISPER_PARTIAL_NICE``: the kernel gives a partial only the CPU that finals
  and the turn model leave, since a CPU pass, once started, cannot be interrupted.
* Segments from all sessions go through a :class:`~stt.engines.batching.MicroBatcher` and are
  decoded in one CTranslate2 ``encode`` + ``generate`` call per group (at most
  ``WHISPER_BATCH_SIZE``), finals ahead of partials. CTranslate2 takes one prompt per item, but
  its start-of-transcript token must sit at the same position in every item: requests are
  grouped by the length of their prompt (partials, without context, batch across sessions).
* Partials are encoded over a short window (speech + at least 0.5 s of silence, 2 s steps), as
  whisper.cpp's ``audio_ctx`` does. Finals (``WHISPER_FINAL_ENCODE=audio``, the default on
  CPU) encode only their audio plus 3 s of silence, in 1 s steps, each at its own length
  whatever it is batched with, and the rest of Whisper's 30 s window is filled from a cached
  encoding of a silent window: the decoder still sees the 1500 positions it was trained on (a
  window merely cut short costs accuracy: corpus WER 0.15 against 0.05), for about half the CPU
  time of encoding the whole window (``docs/engines.md``). ``window`` (and every GPU) encodes
  ``WHISPER_FINAL_WINDOW_S`` (30 s = Whisper's own). Mel
  features come from the audio padded with zeros, as openai-whisper does, so both local engines
  see the same input.
* Word timings come from CTranslate2's cross-attention alignment (the model's alignment heads),
  for every request of a group in one ``align`` call.
* Guards against invented text and the prompt rules are :mod:`stt.engines.decoding`'s, shared
  with the ``whisper`` engine. Audio longer than one window (``stt serve`` uploads) goes through
  faster-whisper's own sequential long-form ``transcribe``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import numpy as np

from stt.config.transcription import TranscriptionSettings
from stt.core.audio import SAMPLE_RATE
from stt.core.transcription import Segment, TranscribeOptions, Transcription
from stt.engines.base import EngineError, EngineUnavailable
from stt.engines.decoding import (
    FALLBACK_TEMPERATURES,
    HOP,
    WINDOW_FRAMES,
    Guards,
    LongFormSegment,
    Request,
    available_cpus,
    compression_ratio,
    join_words,
    long_form_transcription,
    pick_language,
    split_segments,
    token_budget,
    trim_repetitions,
    uses_short_window,
    window_frames,
)
from stt.engines.languages import LANGUAGE_CODES
from stt.engines.local import LocalWhisperEngine
from stt.engines.models import DEFAULT_MODEL, resolve_ct2

MAX_LENGTH = 448                 # Whisper's text context
AUTO_CPU_WORKERS = 4             # STT_ENGINE_WORKERS=0 on CPU: one pass per CPU, up to this
MAX_INITIAL_TIMESTAMP_INDEX = 50  # the first timestamp within 1 s, as Whisper's transcribe()
log = logging.getLogger("stt.engines")
# A Linux thread has its own nice value and passes it to the threads it creates.
LOW_PRIORITY_THREADS = sys.platform.startswith("linux")

T = TypeVar("T")


def at_low_priority(nice: int, build: Callable[[], T]) -> T:
    """``build()`` on a thread of its own at ``nice``, so that the threads it starts (a
    CTranslate2 model's inference workers) run at that priority for good. Raising a nice value
    needs no privilege; the calling thread keeps its own."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:  # nothing built: say why, as a permission problem
            box["error"] = PermissionError(f"setpriority: {exc}")
            return
        try:
            box["value"] = build()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name="low-priority-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when CTranslate2 sees an NVIDIA GPU, else ``cpu``."""
    import ctranslate2

    if requested == "cpu":
        return "cpu"
    if ctranslate2.get_cuda_device_count() > 0:
        return "cuda"
    if requested == "cuda":
        raise EngineUnavailable("WHISPER_DEVICE=cuda but CTranslate2 sees no CUDA GPU; set "
                                "WHISPER_DEVICE=cpu or auto (on AMD GPUs use STT_ENGINE=whisper: "
                                "PyTorch's ROCm build)")
    return "cpu"


class FasterWhisperEngine(LocalWhisperEngine):
    name = "faster-whisper"

    def __init__(self, model: str = "", *, device: str = "auto", compute_type: str = "auto",
                 download_root: str = "", cpu_threads: int = 0, batch_size: int = 8,
                 batch_wait_s: float = 0.005, short_window: str = "partials",
                 beam_size: int = 1, use_context: bool = True,
                 guards: Guards | None = None, final_window_s: float = 30.0,
                 final_encode: str = "audio", workers: int = 0, partial_nice: int = 0) -> None:
        super().__init__(model, device=device, download_root=download_root,
                         cpu_threads=cpu_threads, batch_size=batch_size,
                         batch_wait_s=batch_wait_s, short_window=short_window,
                         beam_size=beam_size, use_context=use_context, guards=guards or Guards(),
                         final_window_s=final_window_s)
        self.requested_workers = workers  # STT_ENGINE_WORKERS (0: one pass per CPU, up to 4)
        self.partial_nice = partial_nice  # WHISPER_PARTIAL_NICE (0: partials share the finals' copy)
        self.partial_model: Any = None
        self.requested_compute_type = compute_type
        self.compute_type = ""
        self.final_encode = final_encode  # "audio": finals pad a fitted encoding with silence's
        self._tokenizers: dict[str | None, Any] = {}
        self._silence: np.ndarray | None = None  # encoder output of a silent 30 s window

    @classmethod
    def from_settings(cls, t: TranscriptionSettings, partials: bool = True) -> FasterWhisperEngine:
        return cls(**cls.settings_kwargs(t), compute_type=t.whisper_compute_type,
                   guards=Guards.from_settings(t), final_encode=t.whisper_final_encode,
                   workers=t.engine_workers,
                   partial_nice=t.whisper_partial_nice if partials else 0)

    # --- lifecycle ------------------------------------------------------------------------

    def _prepare(self) -> None:
        try:
            import ctranslate2  # noqa: F401
            import faster_whisper  # noqa: F401
        except ImportError:
            raise EngineUnavailable("the faster-whisper engine needs faster-whisper: "
                                    "pip install 'stt-streaming[faster-whisper]'") from None
        self.device = resolve_device(self.requested_device)
        self.compute_type = (self.requested_compute_type if self.requested_compute_type != "auto"
                             else "float16" if self.device == "cuda" else "int8")
        if self.device == "cpu":
            # Passes side by side, one thread each: a pass of one segment gains little from a
            # second thread (the decoder's steps are small), two sessions' finals gain a core each
            cpus = available_cpus()
            self.slots = self.requested_workers or min(cpus, AUTO_CPU_WORKERS)
            self.threads = self.cpu_threads or max(1, cpus // self.slots)
        else:
            self.slots = self.requested_workers or 1
            self.threads = 0
            self.final_encode = "window"  # a GPU encodes the whole window in milliseconds

    def _describe_model(self) -> dict[str, Any]:
        return {"device": self.device, "compute_type": self.compute_type,
                "final_encode": self.final_encode,
                "partial_nice": self.partial_nice if self.partial_model is not self.model else 0}

    def _load(self) -> None:
        from faster_whisper import WhisperModel

        self.source = source = resolve_ct2(self.model_name, self.download_root)

        def load() -> Any:
            return WhisperModel(str(source.path), device=self.device,
                                compute_type=self.compute_type, cpu_threads=self.threads,
                                num_workers=self.slots)

        try:
            self.model = load()
            self.partial_model = self.model
            if self.device == "cpu" and self.partial_nice and LOW_PRIORITY_THREADS:
                # Partials on a copy of their own whose inference threads run at a lower
                # priority: on a CPU short of cores, a partial decoding when a final (or the
                # turn model) needs the core gets only what they leave.
                try:
                    self.partial_model = at_low_priority(self.partial_nice, load)
                except PermissionError as exc:  # a sandbox that refuses setpriority
                    log.warning("partials share the finals' model copy: cannot lower a "
                                f"thread's priority here ({exc}); WHISPER_PARTIAL_NICE=0 "
                                "silences this")
        except Exception as exc:  # a damaged directory, an unsupported compute type
            raise EngineUnavailable(f"cannot load Whisper model {self.source.name!r} from "
                                    f"{self.source.path} ({self.compute_type} on {self.device}): "
                                    f"{exc}") from exc

    def _warm_up(self) -> None:
        """One pass through every path (short and full windows, alignment)."""
        second = np.zeros(SAMPLE_RATE, dtype=np.float32)
        for final in (False, True):
            options = TranscribeOptions(language="en", is_partial=not final, word_timestamps=True)
            self._decode_group([Request(second, options, "en", None, final=final,
                                        short=not final, window=self.final_window,
                                        pad_encoding=self._pads(final, short=not final))])

    # --- requests -------------------------------------------------------------------------

    def _language(self, requested: str | None) -> str | None:
        return pick_language(requested, multilingual=self.model.model.is_multilingual,
                             model_name=self.model_name or DEFAULT_MODEL, codes=self._codes(),
                             names=LANGUAGE_CODES)

    def _request(self, audio: np.ndarray, options: TranscribeOptions, language: str | None,
                 prompt: str | None, final: bool) -> tuple[Request, Hashable]:
        # One prompt per item, but <|startoftranscript|> at the same position in all of them:
        # the prompt's length is part of the key.
        short = uses_short_window(self.short_window, language, final)
        prefix = self._prompt_prefix(prompt)
        forced = (tuple(self._tokenizer(None).encode(" " + options.prefix.strip()))
                  [:MAX_LENGTH // 2 - 1] if options.prefix and final else ())
        return (Request(audio, options, language, prompt, final=final, short=short,
                        prompt_tokens=tuple(prefix), prefix_tokens=forced,
                        window=self.final_window, pad_encoding=self._pads(final, short)),
                (short, final, options.word_timestamps, options.segment_times, len(prefix),
                 len(forced), options.temperature))

    def _pads(self, final: bool, short: bool) -> bool:
        """Is this request's encoding its audio's, the rest a silent window's? (WHISPER_FINAL_ENCODE)"""
        return final and not short and self.final_encode == "audio"

    def _codes(self) -> tuple[str, ...]:
        return tuple(self.model.supported_languages)  # ["en"] for an English-only model

    def _tokenizer(self, language: str | None) -> Any:
        tokenizer = self._tokenizers.get(language)
        if tokenizer is None:
            from faster_whisper.tokenizer import Tokenizer

            tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual,
                                  task="transcribe", language=language or "en")
            self._tokenizers[language] = tokenizer
        return tokenizer

    def _prompt_prefix(self, prompt: str | None) -> list[int]:
        """``<|startofprev|>`` and the prompt's last tokens, as Whisper's own decoder does."""
        if not prompt:
            return []
        tokenizer = self._tokenizer(None)
        tokens = tokenizer.encode(" " + prompt.strip())[-(MAX_LENGTH // 2 - 1):]
        return [tokenizer.sot_prev, *tokens]

    # --- the inference threads ------------------------------------------------------------

    def _for(self, requests: list[Request]) -> Any:
        """The model copy a group decodes on: partials' own (WHISPER_PARTIAL_NICE) or the finals'."""
        return self.model if requests[0].final else self.partial_model

    def _features(self, requests: list[Request], n_frames: int) -> Any:
        import ctranslate2

        extractor = self.model.feature_extractor
        batch = np.empty((len(requests), self.model.model.n_mels, n_frames), dtype=np.float32)
        for i, request in enumerate(requests):
            padded = np.zeros(n_frames * HOP, dtype=np.float32)
            n = min(request.audio.size, padded.size)
            padded[:n] = request.audio[:n]
            batch[i] = extractor(padded, padding=0)[:, :n_frames]
        return ctranslate2.StorageView.from_array(batch)

    def _encode(self, requests: list[Request], n_frames: int) -> Any:
        if not requests[0].pad_encoding:
            self._count_pass(n_frames)
            return self._for(requests).model.encode(self._features(requests, n_frames),
                                                    to_cpu=False)
        import ctranslate2

        # Each request's audio positions, encoded at its own fitted length (never its batchmates':
        # what a final reads must not depend on what else was decoded with it), then a silent
        # window's positions for the rest of the 30 s (CPU only).
        silence = self._silent_window()
        out = np.empty((len(requests), *silence.shape[1:]), dtype=silence.dtype)
        for frames in sorted({r.n_frames for r in requests}):
            rows = [i for i, r in enumerate(requests) if r.n_frames == frames]
            self._count_pass(frames)
            encoded = np.asarray(self.model.model.encode(
                self._features([requests[i] for i in rows], frames), to_cpu=True))
            out[rows, :encoded.shape[1]] = encoded
            out[rows, encoded.shape[1]:] = silence[0, encoded.shape[1]:]
        return ctranslate2.StorageView.from_array(out)

    def _silent_window(self) -> np.ndarray:
        """The encoder's output for 30 s of silence (digital zeros, as the padding), once."""
        if self._silence is None:
            silent = Request(np.zeros(0, dtype=np.float32), TranscribeOptions(), None, None,
                             final=True, short=False)
            self._silence = np.asarray(self.model.model.encode(
                self._features([silent], WINDOW_FRAMES), to_cpu=True)).copy()
        return self._silence

    def _detect(self, encoded: Any, requests: list[Request]) -> list[str]:
        languages = [r.language for r in requests]
        if any(lang is None for lang in languages):
            detected = self._for(requests).model.detect_language(encoded)
            languages = [lang or d[0][0][2:-2] for lang, d in zip(languages, detected, strict=True)]
        return [lang or "en" for lang in languages]

    def _generate(self, encoded: Any, requests: list[Request], languages: list[str],
                  temperature: float) -> list[tuple[list[int], float, float]]:
        """(tokens, avg log-prob, no-speech prob) per request."""
        prompts = []
        for request, language in zip(requests, languages, strict=True):
            tokenizer = self._tokenizer(language)
            prompts.append([*request.prompt_tokens, *tokenizer.sot_sequence,
                            *self._forced(request, tokenizer)])
        budget = max(token_budget(r.duration_s, MAX_LENGTH) for r in requests)
        sampling: dict[str, Any] = (
            {"beam_size": 1, "sampling_topk": 0, "sampling_temperature": temperature}
            if temperature > 0 else
            {"beam_size": self.beam_size if requests[0].final else 1})
        results = self._for(requests).model.generate(
            encoded, prompts, max_length=min(MAX_LENGTH, max(map(len, prompts)) + budget),
            return_scores=True, return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=[-1], max_initial_timestamp_index=MAX_INITIAL_TIMESTAMP_INDEX,
            **sampling)
        out = []
        for result in results:
            tokens = list(result.sequences_ids[0])
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
            # CTranslate2 returns a forced prefix as the start of the sequence: it is kept,
            # timed and guarded with the rest
            out.append((tokens, float(avg_logprob), float(result.no_speech_prob)))
        return out

    @staticmethod
    def _forced(request: Request, tokenizer: Any) -> list[int]:
        """What follows the start-of-transcript sequence in the prompt.

        Only a final that wants timed segments is decoded with timestamps; the rest are one
        segment, as partials are (their words are still timed by alignment).
        """
        if not request.timed:
            return [tokenizer.no_timestamps, *request.prefix_tokens]
        return []

    def _decode_group(self, requests: list[Request]) -> list[Transcription | BaseException]:
        n_frames = window_frames(requests)
        encoded = self._encode(requests, n_frames)
        languages = self._detect(encoded, requests)
        decoded = self._generate(encoded, requests, languages, requests[0].options.temperature)
        if requests[0].final:
            self._fall_back(requests, languages, decoded, n_frames)
        out: list[Transcription | BaseException] = []
        texts: list[list[int]] = []
        for request, language, (tokens, avg_logprob, no_speech) in zip(
                requests, languages, decoded, strict=True):
            try:
                transcription, text_tokens = self._finish(request, language, tokens,
                                                          avg_logprob, no_speech)
            except Exception as exc:
                out.append(EngineError(f"faster-whisper post-processing failed: {exc}"))
                texts.append([])
                continue
            out.append(transcription)
            texts.append(text_tokens)
        if requests[0].options.word_timestamps:
            self._add_words(requests, languages, out, texts, encoded, n_frames)
        return out

    def _fall_back(self, requests: list[Request], languages: list[str],
                   decoded: list[tuple[list[int], float, float]], n_frames: int) -> None:
        """Decode again, hotter, the finals that look like loops or guesses."""
        for temperature in FALLBACK_TEMPERATURES:
            if temperature <= requests[0].options.temperature:
                continue
            retry = [i for i, (tokens, logprob, no_speech) in enumerate(decoded)
                     if self.guards.needs_fallback(self._text(languages[i], tokens), logprob,
                                                   no_speech)]
            if not retry:
                return
            subset = [requests[i] for i in retry]
            encoded = self._encode(subset, n_frames)
            hotter = self._generate(encoded, subset, [languages[i] for i in retry], temperature)
            for i, result in zip(retry, hotter, strict=True):
                decoded[i] = result

    def _text(self, language: str, tokens: list[int]) -> str:
        tokenizer = self._tokenizer(language)
        return str(tokenizer.decode([t for t in tokens if t < tokenizer.eot])).strip()

    def _finish(self, request: Request, language: str, tokens: list[int], avg_logprob: float,
                no_speech: float) -> tuple[Transcription, list[int]]:
        tokenizer = self._tokenizer(language)
        duration = request.duration_s
        spans = (split_segments(tokens, tokenizer.timestamp_begin, duration)
                 if request.timed else [(0.0, duration, tokens)])
        segments: list[Segment] = []
        text_tokens: list[int] = []
        for start, end, span in spans:
            kept = trim_repetitions([t for t in span if t < tokenizer.eot])
            text = tokenizer.decode(kept).strip()
            if not text:
                continue
            text_tokens += kept
            segments.append(Segment(text, round(start, 3), round(end, 3), no_speech,
                                    avg_logprob, compression_ratio(text)))
        text = tokenizer.decode(text_tokens).strip()
        if self.guards.is_silence(no_speech, avg_logprob, text) or self.guards.is_loop(text):
            text, segments, text_tokens = "", [], []
        return (Transcription(text=text, language=language, segments=segments,
                              no_speech_prob=no_speech, duration_s=duration), text_tokens)

    def _add_words(self, requests: list[Request], languages: list[str],
                   out: list[Transcription | BaseException], texts: list[list[int]],
                   encoded: Any, n_frames: int) -> None:
        """Word timings for every request with text, in one alignment pass."""
        wanted = [i for i, tokens in enumerate(texts) if tokens]
        for language in sorted({languages[i] for i in wanted}):
            group = [i for i in wanted if languages[i] == language]
            # align takes one encoder output per text: re-encode when some had no text
            sub = encoded if len(group) == len(requests) else self._encode(
                [requests[i] for i in group], n_frames)
            tokenizer = self._tokenizer(language)
            alignments = self._for(requests).find_alignment(
                tokenizer, [texts[i] for i in group], sub,
                [requests[i].audio.size // HOP for i in group])
            for i, alignment in zip(group, alignments, strict=True):
                duration = requests[i].duration_s
                result = out[i]
                if not isinstance(result, Transcription):
                    continue
                words = join_words(((w["word"], float(w["start"]), float(w["end"]),
                                     float(w["probability"])) for w in alignment), duration)
                out[i] = dataclasses.replace(result, words=words)

    def _transcribe_long(self, request: Request) -> Transcription:
        """Audio longer than one window: faster-whisper's own sequential long-form decoding."""
        guards = self.guards
        t0 = request.options.temperature
        segments_iter, info = self.model.transcribe(
            request.audio, language=request.language, beam_size=self.beam_size, best_of=1,
            temperature=[t0, *(t for t in FALLBACK_TEMPERATURES if t > t0)],
            compression_ratio_threshold=guards.compression_ratio_threshold or None,
            log_prob_threshold=guards.logprob_threshold,
            no_speech_threshold=guards.no_speech_threshold,
            condition_on_previous_text=self.use_context, initial_prompt=request.prompt,
            word_timestamps=request.options.word_timestamps, vad_filter=False)
        tokenizer = self._tokenizer(info.language)
        return long_form_transcription(
            (LongFormSegment(seg.tokens, seg.start, seg.end, seg.no_speech_prob, seg.avg_logprob,
                             [(w.word, w.start, w.end, w.probability) for w in seg.words or []])
             for seg in segments_iter),
            tokenizer.decode, tokenizer.eot, guards, info.language, request.duration_s)
