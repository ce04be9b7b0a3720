"""What the two local Whisper engines share around the model: the inference threads, the
cross-session micro-batcher, timed load and warm-up, and the path of a request from
``transcribe`` to a batch. Each engine (``whisper``, ``faster-whisper``) fills in how it loads,
warms up, names languages and decodes a group; the decoding rules are
:mod:`stt.engines.decoding`'s.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stt.config.transcription import TranscriptionSettings
from stt.core.audio import SAMPLE_RATE
from stt.core.transcription import TranscribeOptions, Transcription
from stt.engines.base import Engine, EngineError
from stt.engines.batching import MicroBatcher
from stt.engines.decoding import HOP, WINDOW_S, Guards, Request, context_prompt, is_digital_silence
from stt.engines.models import DEFAULT_MODEL, ModelSource

log = logging.getLogger("stt.engines")


class LocalWhisperEngine(Engine):
    """Subclasses fill ``_prepare``, ``_load``, ``_warm_up``, ``_language``, ``_request``,
    ``_decode_group`` and ``_transcribe_long``; ``_run_batch`` and ``_release`` optionally."""

    def __init__(self, model: str, *, device: str, download_root: str, cpu_threads: int,
                 batch_size: int, batch_wait_s: float, short_window: str, beam_size: int,
                 use_context: bool, guards: Guards, final_window_s: float = 30.0) -> None:
        self.model_name = model
        self.requested_device = device
        self.download_root = download_root
        self.cpu_threads = cpu_threads
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.short_window = short_window
        # finals: frames of the window they are encoded over (30 s = Whisper's own)
        self.final_window = round(final_window_s * SAMPLE_RATE / HOP)
        self.beam_size = beam_size
        self.use_context = use_context
        self.guards = guards
        self.batches = batch_size > 1
        self.slots = 1  # passes at once (inference threads): the whisper engine runs one
        self.per_pass = batch_size
        self.device = "cpu"
        self.threads = 0  # CPU inference threads (0 on GPU)
        self.model: Any = None
        self.source: ModelSource | None = None  # where a CTranslate2 model came from
        self.load_s = 0.0
        self.warmup_s = 0.0
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher[Request, Transcription] | None = None
        self._long_seq = 0
        self._pass_started: dict[int, float] = {}  # id(request) -> when its pass began
        #: Model passes by window length in mel frames (3000 = a full 30 s window).
        self.passes: collections.Counter[int] = collections.Counter()
        self._passes_lock = threading.Lock()  # several inference threads count

    @staticmethod
    def settings_kwargs(t: TranscriptionSettings) -> dict[str, Any]:
        """The constructor arguments both engines take, from the settings."""
        return {"model": t.whisper_model_size, "device": t.whisper_device,
                "download_root": t.whisper_download_root,
                "cpu_threads": t.whisper_cpu_threads,
                "batch_size": t.whisper_batch_size,
                "batch_wait_s": t.whisper_batch_wait_ms / 1000.0,
                "short_window": t.whisper_short_window,
                "final_window_s": t.whisper_final_window_s,
                "beam_size": t.whisper_beam_size,
                "use_context": t.whisper_use_context}

    # --- lifecycle ------------------------------------------------------------------------

    @abc.abstractmethod
    def _prepare(self) -> None:
        """Check the packages, pick the device, the passes at once (``slots``) and the threads
        of each (before the threads exist)."""

    @abc.abstractmethod
    def _load(self) -> None:
        """Load the model (on the inference thread); raise EngineUnavailable saying what to set."""

    @abc.abstractmethod
    def _warm_up(self) -> None:
        """One pass through every decode path, so the first session pays no set-up."""

    def _describe_model(self) -> dict[str, Any]:
        """Engine-specific fields for logs, /readyz and $SRV.INFO."""
        return {"device": self.device}

    def _release(self) -> None:
        """Free what the model held (GPU caches) after close."""

    async def start(self) -> None:
        self._prepare()
        self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix=self.name)
        loop = asyncio.get_running_loop()
        try:
            t0 = time.perf_counter()
            await loop.run_in_executor(self._executor, self._load)
            self.load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            await loop.run_in_executor(self._executor, self._warm_up)
            self.warmup_s = time.perf_counter() - t0
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        log.info(f"{self.name} model loaded", extra={
            "model": self.model_name or DEFAULT_MODEL, **(self.source.describe() if self.source else {}),
            **self._describe_model(), "cpu_threads": self.threads, "workers": self.slots,
            "load_s": round(self.load_s, 2), "warmup_s": round(self.warmup_s, 2)})
        self._batcher = MicroBatcher(self._run_batch, self._executor, max_batch=self.batch_size,
                                     max_wait_s=self.batch_wait_s, workers=self.slots)
        self._batcher.start()

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
            self._batcher = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self.model = None
        self._release()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "model": self.model_name or DEFAULT_MODEL,
                               **self._describe_model(), "batch_size": self.batch_size,
                               "short_window": self.short_window, "cpu_threads": self.threads,
                               "workers": self.slots,
                               "load_s": round(self.load_s, 2)}
        if self.source is not None:
            out.update(self.source.describe())
        if self._batcher is not None:
            s = self._batcher.stats
            out.update(batches=s.batches, mean_batch=round(s.mean_batch, 2), queued=self._batcher.queued)
        return out

    # --- requests -------------------------------------------------------------------------

    @abc.abstractmethod
    def _language(self, requested: str | None) -> str | None:
        """The session's language as the model's code (None = detect); may raise."""

    @abc.abstractmethod
    def _request(self, audio: np.ndarray, options: TranscribeOptions, language: str | None,
                 prompt: str | None, final: bool) -> tuple[Request, Hashable]:
        """A request of at most one window, and the key of the requests it can batch with."""

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        if self._batcher is None or self.model is None:
            raise EngineError(f"{self.name} engine not started")
        audio = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
        if audio.size < HOP or is_digital_silence(audio):
            return Transcription(text="", language=options.language, duration_s=audio.size / SAMPLE_RATE)
        language = self._language(options.language)
        final = not options.is_partial
        prompt = context_prompt(options, final, self.use_context)
        key: Hashable
        if audio.size > WINDOW_S * SAMPLE_RATE:
            request = Request(audio, options, language, prompt, final=True, short=False,
                              long_form=True)
            self._long_seq += 1
            key = ("long", self._long_seq)
        else:
            request, key = self._request(audio, options, language, prompt, final)
        submitted = time.perf_counter()
        try:
            result = await self._batcher.submit(request, key, priority=0 if final else 1)
        except EngineError:
            raise
        except Exception as exc:  # CUDA out of memory, a bad tensor: this request fails only
            raise EngineError(f"{self.name} inference failed: {type(exc).__name__}: "
                              f"{exc}") from exc
        finally:
            started = self._pass_started.pop(id(request), None)
        if started is None:
            return result
        return dataclasses.replace(result, queued_s=max(0.0, started - submitted))

    # --- the inference threads ------------------------------------------------------------

    @abc.abstractmethod
    def _decode_group(self, requests: list[Request]) -> list[Transcription | BaseException]:
        """One model pass over requests that share a key."""

    @abc.abstractmethod
    def _transcribe_long(self, request: Request) -> Transcription:
        """Audio longer than one window: the library's own sequential long-form decoding."""

    def _count_pass(self, frames: int) -> None:
        with self._passes_lock:
            self.passes[frames] += 1

    def _run_batch(self, requests: list[Request]) -> list[Transcription | BaseException]:
        started = time.perf_counter()  # on the inference thread: the pass begins
        for r in requests:
            self._pass_started[id(r)] = started
        if requests[0].long_form:
            return [self._transcribe_long(r) for r in requests]
        return self._decode_group(requests)
