"""Local Whisper: openai-whisper on PyTorch, on NVIDIA CUDA, AMD ROCm (PyTorch's ``cuda``
device) or CPU.

Long because openai-whisper decodes one file at a time: batched decoding, short windows and
word alignment are done here.

Theory of operation
-------------------
* The model loads once at start-up (by name into the download cache, or from a checkpoint
  path), then is warmed up (every decode path, and the word-alignment JIT) before the worker
  takes sessions. All model work runs on one inference thread; the event loop only awaits.
* Segments from all sessions go through a :class:`~stt.engines.batching.MicroBatcher`:
  requests that can share a decoder pass (same language, prompt, window, temperature) are
  decoded together (at most ``WHISPER_BATCH_SIZE``), finals ahead of partials. On a GPU one
  pass of 8 costs little more than a pass of 1; on a CPU batching still works, with less gain.
* Whisper's encoder is trained on 30 s windows, so a 2 s partial normally pays for 30 s of
  padding. With ``WHISPER_SHORT_WINDOW=partials`` (default) partials are encoded over a short
  window instead (speech + at least 0.5 s of silence, rounded up to 2 s), slicing the encoder's
  sinusoidal position embedding as whisper.cpp's ``audio_ctx`` does. Much cheaper, somewhat
  less accurate (the model never saw short windows), so finals keep the full window unless
  ``all`` is chosen. ``bench/bench_engines.py`` measures the difference.
* Prompts: the session's ``prompt`` always; its previous final as context for finals only
  (``WHISPER_USE_CONTEXT``). Whisper's batched decode takes one prompt per pass, so requests
  are grouped by prompt: partials (no context) batch well across sessions, finals with context
  mostly run alone. Turn context off to batch finals too.
* Guards against invented text, after Whisper's own transcribe(): a final whose text looks like
  a loop (gzip compression ratio) or is improbable (average log-probability) is decoded again
  at a higher temperature; text is dropped when the no-speech probability is high and the
  log-probability low (silence, noise), or when it is still a loop; repeated n-gram runs are
  cut. Every decode has a token budget proportional to the audio's duration, so a looping
  model stops early.
* Audio longer than one window (``stt serve`` uploads) goes through Whisper's own long-form
  ``transcribe`` (sequential 30 s windows), as a batch of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import types
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stt.config.transcription import TranscriptionSettings
from stt.core.audio import SAMPLE_RATE
from stt.core.transcription import Segment, TranscribeOptions, Transcription, Word
from stt.engines.base import EngineError, EngineUnavailable
from stt.engines.decoding import (
    FALLBACK_TEMPERATURES,
    HOP,
    Guards,
    LongFormSegment,
    Request,
    available_cpus,
    compression_ratio,
    join_words,
    long_form_transcription,
    pick_language,
    short_window_frames,
    split_segments,
    token_budget,
    trim_repetitions,
    uses_short_window,
    window_frames,
)
from stt.engines.local import LocalWhisperEngine
from stt.engines.models import EMBEDDED, ModelSource, cache_dir, resolve_ct2

if TYPE_CHECKING:
    import torch

log = logging.getLogger("stt.engines.whisper")

def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when PyTorch sees a GPU (NVIDIA, or AMD through ROCm), else ``cpu``."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        build = f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else \
            f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise EngineUnavailable(f"WHISPER_DEVICE=cuda but PyTorch ({torch.__version__}, {build} "
                                "build) sees no GPU; set WHISPER_DEVICE=cpu or auto")
    return "cpu"


def device_label(device: str) -> str:
    import torch

    if device != "cuda":
        return "cpu"
    kind = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
    return f"{kind} {torch.cuda.get_device_name(0)}"


def _flexible_encoder_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``AudioEncoder.forward`` for any window up to 30 s (the original asserts exactly 30 s).

    The position embedding is a fixed sinusoid table, so a shorter input uses its first rows;
    for a full window this is the original computation.
    """
    import torch.nn.functional as F

    x = F.gelu(self.conv1(x))
    x = F.gelu(self.conv2(x))
    x = x.permute(0, 2, 1)
    n = x.shape[1]
    if n > self.positional_embedding.shape[0]:
        raise ValueError(f"audio window of {n} frames exceeds the model's "
                         f"{self.positional_embedding.shape[0]}")
    x = (x + self.positional_embedding[:n]).to(x.dtype)
    for block in self.blocks:
        x = block(x)
    return self.ln_post(x)


def converted_checkpoint(source: ModelSource) -> Path:
    """The openai-whisper checkpoint of a CTranslate2 model, converted once into the cache
    (keyed by the checksum of embedded models, by path, size and time of a directory's)."""
    from stt.engines.convert import convert

    model_bin = source.path / "model.bin"
    stat = model_bin.stat()
    key = hashlib.sha256(f"{model_bin.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache_dir() / f"{source.name}-{key.hexdigest()[:12]}.pt"
    if not out.is_file():
        log.info("converting the CTranslate2 model for openai-whisper",
                 extra={"model_path": str(source.path), "checkpoint": str(out)})
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(source.path, out)
    return out


class WhisperEngine(LocalWhisperEngine):
    name = "whisper"

    def __init__(self, model: str = "", *, device: str = "auto", download_root: str = "",
                 cpu_threads: int = 0, batch_size: int = 8, batch_wait_s: float = 0.005,
                 short_window: str = "partials", beam_size: int = 1, use_context: bool = True,
                 no_speech_threshold: float = 0.6, logprob_threshold: float = -1.0,
                 compression_ratio_threshold: float = 2.4, final_window_s: float = 30.0) -> None:
        super().__init__(model, device=device, download_root=download_root,
                         cpu_threads=cpu_threads, batch_size=batch_size,
                         batch_wait_s=batch_wait_s, short_window=short_window,
                         beam_size=beam_size, use_context=use_context,
                         guards=Guards(no_speech_threshold, logprob_threshold,
                                       compression_ratio_threshold),
                         final_window_s=final_window_s)
        self.fp16 = False

    @classmethod
    def from_settings(cls, t: TranscriptionSettings) -> WhisperEngine:
        return cls(**cls.settings_kwargs(t),
                   no_speech_threshold=t.whisper_no_speech_threshold,
                   logprob_threshold=t.whisper_logprob_threshold,
                   compression_ratio_threshold=t.whisper_compression_ratio_threshold)

    # --- lifecycle ------------------------------------------------------------------------

    def _prepare(self) -> None:
        try:
            import torch
            import whisper  # noqa: F401
        except ImportError:
            raise EngineUnavailable("the whisper engine needs openai-whisper and PyTorch: "
                                    "pip install 'stt-streaming[local]'") from None
        self.device = resolve_device(self.requested_device)
        self.fp16 = self.device == "cuda"  # whisper computes in fp16 on GPU, fp32 on CPU
        if self.device == "cpu":
            self.threads = self.cpu_threads or available_cpus()
            torch.set_num_threads(self.threads)  # before the inference thread exists

    def _release(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _describe_model(self) -> dict[str, Any]:
        return {"device": device_label(self.device) if self.model else self.device,
                "fp16": self.fp16}

    def _load(self) -> None:
        import whisper

        from stt.engines.convert import load_model

        name = self.model_name.strip()
        try:
            if not name or os.path.isdir(name) or (name in EMBEDDED and EMBEDDED[name].installed()):
                # A CTranslate2 model (the embedded default, or a directory): converted once
                # into the model cache, loaded with its alignment heads.
                self.source = resolve_ct2(name)
                model = load_model(converted_checkpoint(self.source), device=self.device)
            elif os.path.isfile(name):
                model = load_model(name, device=self.device)
            else:
                model = whisper.load_model(name, device=self.device,
                                           download_root=self.download_root or None)
        except EngineUnavailable:
            raise
        except Exception as exc:  # offline download, unknown name, bad file
            raise EngineUnavailable(self._load_error(exc)) from exc
        model.eval()
        # Short windows: let the encoder take any length up to 30 s (this instance only).
        model.encoder.forward = types.MethodType(_flexible_encoder_forward, model.encoder)
        self.model = model

    def _load_error(self, exc: Exception) -> str:
        import whisper

        name = self.model_name
        if name in whisper.available_models():
            # the file a name downloads to: openai-whisper (20250625) has no public table of its
            # URLs, only _MODELS ("turbo" is large-v3-turbo.pt); a release without it: NAME.pt
            url = getattr(whisper, "_MODELS", {}).get(name, f"/{name}.pt")
            root = self.download_root or os.path.join(
                os.getenv("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "whisper")
            return (f"cannot load Whisper model {name!r} ({exc}). Without internet access, put "
                    f"{os.path.basename(url)} in WHISPER_DOWNLOAD_ROOT (now {root}) or set "
                    "WHISPER_MODEL_SIZE to the path of a checkpoint file")
        if not os.path.exists(name):
            return (f"WHISPER_MODEL_SIZE={name!r} is neither a Whisper model name "
                    f"({', '.join(whisper.available_models())}) nor an existing checkpoint file")
        return f"WHISPER_MODEL_SIZE={name!r}: cannot load this checkpoint: {exc}"

    def _warm_up(self) -> None:
        """One pass through every path, so the first session pays no kernel selection or JIT."""
        import torch
        from whisper.timing import find_alignment

        second = np.zeros(SAMPLE_RATE, dtype=np.float32)
        requests = [Request(second, TranscribeOptions(is_partial=True), "en", None,
                             final=False, short=True),
                    Request(second, TranscribeOptions(), "en", None, final=True, short=False)]
        for request in requests:
            self._decode_group([request], sample_len=4)
        tokenizer = self._tokenizer("en")
        mel = self._mel(second, short_window_frames(second.size))
        with torch.no_grad():
            find_alignment(self.model, tokenizer, tokenizer.encode(" warm up"), mel, second.size // HOP)
        self._pin_threads()

    def _pin_threads(self) -> None:
        """Re-assert the CPU thread count in the inference thread. numba (word alignment's
        DTW) resets this thread's OpenMP team to every core on its first run; PyTorch's pool
        keeps its own size, and the two then spin against each other (measured: 10x slower
        decoding on a busy 2-core machine)."""
        if self.device == "cpu" and self.threads:
            import torch

            torch.set_num_threads(self.threads)

    # --- requests -------------------------------------------------------------------------

    def _request(self, audio: np.ndarray, options: TranscribeOptions, language: str | None,
                 prompt: str | None, final: bool) -> tuple[Request, Hashable]:
        # Whisper's batched decode takes one prompt per pass: the prompt is part of the key.
        short = uses_short_window(self.short_window, language, final)
        return (Request(audio, options, language, prompt, final=final, short=short,
                        window=self.final_window),
                (short, final, language, prompt, options.temperature,
                 options.prefix if final else None, options.segment_times))

    def _language(self, requested: str | None) -> str | None:
        from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        return pick_language(requested, multilingual=self.model.is_multilingual,
                             model_name=self.model_name, codes=LANGUAGES, names=TO_LANGUAGE_CODE)

    # --- the inference thread -------------------------------------------------------------

    def _run_batch(self, requests: list[Request]) -> list[Transcription | BaseException]:
        import torch

        with torch.no_grad():
            return super()._run_batch(requests)

    def _tokenizer(self, language: str | None) -> Any:
        from whisper.tokenizer import get_tokenizer

        return get_tokenizer(self.model.is_multilingual, num_languages=self.model.num_languages,
                             language=language or "en", task="transcribe")

    def _mel(self, audio: np.ndarray, n_frames: int) -> torch.Tensor:
        import torch
        import whisper

        padded = np.zeros(n_frames * HOP, dtype=np.float32)
        padded[:min(audio.size, padded.size)] = audio[:padded.size]
        mel = whisper.log_mel_spectrogram(torch.from_numpy(padded), self.model.dims.n_mels,
                                          device=self.device)
        return mel[:, :n_frames]

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """The encoder alone on a (batch, n_mels, frames) mel; for the benchmark."""
        import torch

        with torch.no_grad():
            return self.model.encoder(mel.half() if self.fp16 else mel)

    def _decode_group(self, requests: list[Request], sample_len: int | None = None
                      ) -> list[Transcription | BaseException]:
        import torch
        import whisper

        first = requests[0]
        n_frames = window_frames(requests)
        mels = [self._mel(r.audio, n_frames) for r in requests]
        mel = torch.stack(mels)
        self._count_pass(n_frames)
        prefix = self._prefix(first)
        options = whisper.DecodingOptions(
            task="transcribe", language=first.language, temperature=first.options.temperature,
            sample_len=sample_len or max(token_budget(r.duration_s, self.model.dims.n_text_ctx)
                                         for r in requests),
            prompt=first.prompt, prefix=prefix, without_timestamps=not first.timed,
            fp16=self.fp16,
            beam_size=(self.beam_size if first.final and self.beam_size > 1
                       and first.options.temperature == 0 else None))
        results = list(whisper.decode(self.model, mel, options))
        if first.final:
            self._fall_back(mel, options, results)
        out: list[Transcription | BaseException] = []
        for request, result, one_mel in zip(requests, results, mels, strict=True):
            try:
                out.append(self._finish(request, result, one_mel))
            except Exception as exc:
                out.append(EngineError(f"whisper post-processing failed: {exc}"))
        return out

    def _fall_back(self, mel: torch.Tensor, options: Any, results: list[Any]) -> None:
        """Decode again, hotter, the finals that look like loops or guesses (as transcribe() does)."""
        import whisper

        for temperature in FALLBACK_TEMPERATURES:
            if temperature <= options.temperature:
                continue
            retry = [i for i, r in enumerate(results) if self.guards.needs_fallback(r.text, r.avg_logprob,
                                                                     r.no_speech_prob)]
            if not retry:
                return
            hotter = dataclasses.replace(options, temperature=temperature, beam_size=None)
            for i, result in zip(retry, whisper.decode(self.model, mel[retry], hotter), strict=True):
                results[i] = result

    @staticmethod
    def _prefix(request: Request) -> str | None:
        """A final's forced start (its stable words), decoded without timestamps like partials."""
        return request.options.prefix.strip() if request.final and request.options.prefix \
            else None

    def _finish(self, request: Request, result: Any, mel: torch.Tensor) -> Transcription:
        tokenizer = self._tokenizer(result.language)
        duration = request.duration_s
        prefix = self._prefix(request)
        # openai-whisper leaves a forced prefix out of the result: it is the text's start
        tokens = [*tokenizer.encode(" " + prefix), *result.tokens] if prefix else result.tokens
        spans = (split_segments(tokens, tokenizer.timestamp_begin, duration)
                 if request.timed else [(0.0, duration, list(tokens))])
        segments: list[Segment] = []
        text_tokens: list[int] = []
        for start, end, tokens in spans:
            tokens = trim_repetitions([t for t in tokens if t < tokenizer.eot])
            text = tokenizer.decode(tokens).strip()
            if not text:
                continue
            text_tokens += tokens
            segments.append(Segment(text, round(start, 3), round(end, 3), result.no_speech_prob,
                                    result.avg_logprob, compression_ratio(text)))
        text = tokenizer.decode(text_tokens).strip()
        if self.guards.is_silence(result.no_speech_prob, result.avg_logprob, text) \
                or self.guards.is_loop(text):
            text, segments, text_tokens = "", [], []
        words: list[Word] = []
        if request.options.word_timestamps and text_tokens:
            words = self._words(tokenizer, text_tokens, mel, request.audio.size // HOP, duration)
        return Transcription(text=text, language=result.language, segments=segments, words=words,
                             no_speech_prob=float(result.no_speech_prob), duration_s=duration)

    def _words(self, tokenizer: Any, tokens: list[int], mel: torch.Tensor, n_frames: int,
               duration_s: float) -> list[Word]:
        from whisper.timing import find_alignment

        timings = find_alignment(self.model, tokenizer, tokens, mel.half() if self.fp16 else mel,
                                 n_frames)
        self._pin_threads()
        return join_words(((t.word, float(t.start), float(t.end), float(t.probability))
                           for t in timings), duration_s)

    def _transcribe_long(self, request: Request) -> Transcription:
        """Audio longer than one window: Whisper's own sequential long-form transcription."""
        import whisper

        guards = self.guards
        t0 = request.options.temperature
        result = whisper.transcribe(
            self.model, request.audio, verbose=None, language=request.language,
            temperature=(t0, *(t for t in FALLBACK_TEMPERATURES if t > t0)),
            compression_ratio_threshold=guards.compression_ratio_threshold or None,
            logprob_threshold=guards.logprob_threshold,
            no_speech_threshold=guards.no_speech_threshold,
            condition_on_previous_text=self.use_context, initial_prompt=request.prompt,
            word_timestamps=request.options.word_timestamps, fp16=self.fp16,
            **({"beam_size": self.beam_size} if self.beam_size > 1 else {}))
        self._pin_threads()
        # The same clean-up as for single windows: cut loops, drop what still looks like one.
        tokenizer = self._tokenizer(result.get("language"))
        return long_form_transcription(
            (LongFormSegment(seg["tokens"], seg["start"], seg["end"], seg["no_speech_prob"],
                             seg["avg_logprob"],
                             [(w["word"], w["start"], w["end"], w["probability"])
                              for w in seg.get("words", [])])
             for seg in result["segments"]),
            tokenizer.decode, tokenizer.eot, guards, result.get("language"), request.duration_s)
