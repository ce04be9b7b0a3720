"""A Whisper HTTP service behind the OpenAI-compatible ``POST /v1/audio/transcriptions``.

Long because of what a remote service needs: retries, a circuit breaker, a concurrency limit
and the answers of six different servers.

Works with OpenAI itself, speaches/faster-whisper-server, vLLM, whisper.cpp's server, LocalAI
and ``stt serve``. Each segment goes up as a 16 kHz mono WAV in a multipart form (``model``,
``language``, ``prompt``, ``response_format``, ``temperature``, and word timestamps when the
session asks for them).

Failure handling, in order of what a request meets:

* a cap on concurrent requests (``STT_ENGINE_WORKERS``), shared by every session, and one
  httpx connection pool of the same size;
* a circuit breaker: after ``WHISPER_BREAKER_FAILURES`` consecutive failures (no connection,
  timeout, 5xx) requests fail at once with ``whisper service unavailable`` instead of each
  waiting out its own timeouts, so sessions get ``engine_failed`` promptly; after
  ``WHISPER_BREAKER_COOLDOWN_S`` one probe request goes through, and its success closes the
  breaker: the worker recovers by itself when the service is back;
* retries for finals, with exponential backoff and jitter, on connection errors, timeouts,
  5xx and 429 (``Retry-After`` honoured), all within ``STT_ENGINE_TIMEOUT_S``. Partials are
  not retried: the next partial replaces a lost one;
* other 4xx fail at once with the service's own error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import io
import logging
import math
import random
import time
import wave
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from stt.config.transcription import TranscriptionSettings
from stt.core.audio import SAMPLE_RATE, to_pcm16
from stt.core.transcription import Segment, TranscribeOptions, Transcription, Word
from stt.engines.base import Engine, EngineError
from stt.engines.decoding import Guards, UnsupportedLanguage
from stt.engines.languages import LANGUAGE_CODES

log = logging.getLogger("stt.engines.http")

BACKOFF_CAP_S = 5.0
CONTEXT_MAX_CHARS = 300
DEADLINE_MARGIN_S = 0.5  # give up just before the worker's own STT_ENGINE_TIMEOUT_S does



class BreakerState(enum.Enum):
    CLOSED = "closed"        # requests flow
    OPEN = "open"            # requests fail at once until the cool-down has passed
    HALF_OPEN = "half_open"  # one probe request is out; the others fail at once


class CircuitBreaker:
    """Consecutive-failure breaker. No I/O and an injectable clock, so it is tested directly."""

    def __init__(self, failures: int = 5, cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.last_error = ""
        self.times_opened = 0

    def allow(self, may_probe: bool = True) -> bool:
        """May a request go out now? In OPEN after the cool-down, the caller becomes the probe.

        Partials pass ``may_probe=False``: the one probe after a cool-down belongs to a final,
        which the client waits for, not to a partial that a final may make moot meanwhile.
        """
        if self.state is BreakerState.CLOSED:
            return True
        if (may_probe and self.state is BreakerState.OPEN
                and self.clock() - self.opened_at >= self.cooldown_s):
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    def retry_in_s(self) -> float:
        return max(0.0, self.opened_at + self.cooldown_s - self.clock())

    def success(self) -> None:
        if self.state is not BreakerState.CLOSED:
            log.info("whisper service reachable again; circuit closed")
        self.state = BreakerState.CLOSED
        self.failures = 0

    def failure(self, error: str) -> None:
        self.failures += 1
        self.last_error = error
        if self.state is BreakerState.HALF_OPEN or (
                self.state is BreakerState.CLOSED and self.failures >= self.threshold):
            if self.state is BreakerState.CLOSED:
                self.times_opened += 1
                log.warning("whisper service failing; circuit open", extra={
                    "failures": self.failures, "error": error, "cooldown_s": self.cooldown_s})
            self.state = BreakerState.OPEN
            self.opened_at = self.clock()

    def abandon(self) -> None:
        """A probe was cancelled before it had an answer: let the next request probe."""
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.OPEN
            self.opened_at = self.clock() - self.cooldown_s


def encode_wav(audio: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Mono float32 -> 16-bit PCM WAV (what every server reads)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(to_pcm16(audio))
    return buffer.getvalue()


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After``: delta seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, base_s: float) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so retries from many
    sessions do not arrive in lockstep."""
    delay = min(BACKOFF_CAP_S, base_s * (2 ** attempt))
    return delay / 2 + random.uniform(0, delay / 2)


def error_message(response: httpx.Response) -> str:
    """The service's own words: OpenAI's ``{"error": {"message"}}``, FastAPI's ``detail``, text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if body.get("detail"):
            return str(body["detail"])[:300]
    return str(body)[:300]


def error_param(response: httpx.Response) -> str | None:
    """The request field an OpenAI-style error names (``{"error": {"param": "language"}}``)."""
    try:
        body = response.json()
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    param = err.get("param") if isinstance(err, dict) else None
    return param if isinstance(param, str) else None


class _Retryable(Exception):
    """One attempt failed in a way worth retrying (and counting against the breaker)."""

    def __init__(self, message: str, retry_after: float | None = None,
                 counts: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.counts = counts


DEFAULT_CONCURRENCY = 16  # requests in flight when STT_ENGINE_WORKERS is 0

class HttpEngine(Engine):
    name = "http"

    #: Extra headers per request (telemetry injects W3C ``traceparent`` here).
    extra_headers: Callable[[], dict[str, str]] | None = None

    def __init__(self, url: str, *, path: str = "/v1/audio/transcriptions", api_key: str = "",
                 model: str = "whisper-1", response_format: str = "verbose_json",
                 concurrency: int = 0, connect_timeout_s: float = 3.0,
                 read_timeout_s: float = 20.0, timeout_s: float = 30.0, retries: int = 2,
                 retry_backoff_s: float = 0.2, breaker_failures: int = 5,
                 breaker_cooldown_s: float = 5.0, no_speech_threshold: float = 0.6,
                 logprob_threshold: float = -1.0, use_context: bool = True) -> None:
        self.url = url.rstrip("/")
        self.path = "/" + path.lstrip("/")
        self.api_key = api_key
        self.model = model
        self.response_format = response_format
        # The service, not this container's CPUs, bounds useful concurrency: a batching GPU
        # server wants several requests at once even from a 1-CPU worker.
        self.concurrency = concurrency or DEFAULT_CONCURRENCY
        self.slots = self.concurrency
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.budget_s = max(1.0, timeout_s - DEADLINE_MARGIN_S)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.guards = Guards(no_speech_threshold, logprob_threshold)
        self.use_context = use_context
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self.extra_headers = None
        self.requests = 0
        self.failures = 0
        self.retried = 0
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None

    @classmethod
    def from_settings(cls, t: TranscriptionSettings) -> HttpEngine:
        return cls(t.whisper_url, path=t.whisper_path,
                   api_key=t.whisper_api_key, model=t.whisper_http_model,
                   response_format=t.whisper_response_format,
                   concurrency=t.engine_workers,
                   connect_timeout_s=t.whisper_connect_timeout_s,
                   read_timeout_s=t.whisper_read_timeout_s,
                   timeout_s=t.engine_timeout_s, retries=t.whisper_retries,
                   retry_backoff_s=t.whisper_retry_backoff_s,
                   breaker_failures=t.whisper_breaker_failures,
                   breaker_cooldown_s=t.whisper_breaker_cooldown_s,
                   no_speech_threshold=t.whisper_no_speech_threshold,
                   logprob_threshold=t.whisper_logprob_threshold,
                   use_context=t.whisper_use_context)

    @property
    def endpoint(self) -> str:
        return self.url + self.path

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=self.concurrency,
                                max_keepalive_connections=self.concurrency),
            timeout=httpx.Timeout(self.read_timeout_s, connect=self.connect_timeout_s))
        self._slots = asyncio.Semaphore(self.concurrency)
        # Not probed here: the service may start after the worker; the breaker handles that.
        log.info("whisper HTTP service", extra={"endpoint": self.endpoint, "model": self.model,
                                                "concurrency": self.concurrency})

    async def probe(self) -> str | None:
        """None if something answers HTTP at the service's base URL (any status counts), else
        why not. For the start-up check; requests themselves are never probed."""
        try:
            async with httpx.AsyncClient(timeout=self.connect_timeout_s) as client:
                await client.get(self.url + "/")
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as exc:
            return str(exc) or type(exc).__name__
        except httpx.HTTPError:  # it answered, slowly or oddly: it is there
            return None
        return None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint, "model": self.model,
                "concurrency": self.concurrency, "breaker": self.breaker.state.value,
                "requests": self.requests, "failures": self.failures, "retries": self.retried}

    # --- requests -------------------------------------------------------------------------

    async def transcribe(self, audio: np.ndarray, options: TranscribeOptions) -> Transcription:
        if self._client is None or self._slots is None:
            raise EngineError("http engine not started")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget_s
        fields, files = self._form(audio, options)
        attempts = 1 + (self.retries if not options.is_partial else 0)
        for attempt in range(attempts):
            if not self.breaker.allow(may_probe=not options.is_partial):
                raise EngineError(f"whisper service unavailable: {self.breaker.last_error} "
                                  f"(circuit open; next try in {self.breaker.retry_in_s():.1f} s)")
            remaining = deadline - loop.time()
            try:
                response = await self._post(fields, files, remaining)
            except _Retryable as exc:
                self.failures += 1
                if exc.counts:
                    self.breaker.failure(str(exc))
                else:
                    self.breaker.success()  # it answered: alive, only busy
                delay = backoff_s(attempt, self.retry_backoff_s)
                if exc.retry_after is not None:
                    delay = max(delay, exc.retry_after)
                if attempt + 1 >= attempts or loop.time() + delay + 0.1 >= deadline:
                    raise EngineError(f"whisper service failed: {exc}") from None
                self.retried += 1
                log.debug("retrying whisper request", extra={"error": str(exc),
                                                             "delay_s": round(delay, 2)})
                await asyncio.sleep(delay)
                continue
            self.breaker.success()
            return self._parse(response, options, audio.size / SAMPLE_RATE)
        raise AssertionError("unreachable")

    def _form(self, audio: np.ndarray, options: TranscribeOptions
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        fields: dict[str, Any] = {"model": self.model, "response_format": self.response_format,
                                  "temperature": str(options.temperature)}
        if options.language:  # ISO-639-1, as the API expects: "en-US" -> "en"
            fields["language"] = options.language.strip().lower().replace("_", "-").split("-")[0]
        prompt = self._prompt(options)
        if prompt:
            fields["prompt"] = prompt
        if options.word_timestamps and self.response_format == "verbose_json":
            fields["timestamp_granularities[]"] = ["word", "segment"]
        return fields, {"file": ("audio.wav", encode_wav(audio), "audio/wav")}

    def _prompt(self, options: TranscribeOptions) -> str | None:
        parts = [options.prompt.strip()] if options.prompt and options.prompt.strip() else []
        if self.use_context and options.context:
            parts.append(options.context.strip()[-CONTEXT_MAX_CHARS:])
        return " ".join(parts) or None

    async def _post(self, fields: dict[str, Any], files: dict[str, Any],
                    remaining_s: float) -> httpx.Response:
        """One attempt. Returns a 2xx response, raises _Retryable or EngineError."""
        assert self._client is not None and self._slots is not None
        if remaining_s <= 0:
            raise EngineError(f"whisper service failed: no time left within "
                              f"STT_ENGINE_TIMEOUT_S ({self.breaker.last_error or 'busy'})")
        headers = self.extra_headers() if self.extra_headers else None
        timeout = httpx.Timeout(min(self.read_timeout_s, remaining_s),
                                connect=min(self.connect_timeout_s, remaining_s))
        self.requests += 1
        settled = False
        try:
            async with self._slots:
                response = await self._client.post(self.endpoint, data=fields, files=files,
                                                   headers=headers, timeout=timeout)
            settled = True
        except httpx.TimeoutException as exc:
            settled = True
            raise _Retryable(f"no answer from {self.endpoint} in time "
                             f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            settled = True
            raise _Retryable(f"cannot reach {self.endpoint}: "
                             f"{str(exc) or type(exc).__name__}") from None
        finally:
            if not settled:  # cancelled (worker timeout, shutdown) while the probe was out
                self.breaker.abandon()
        status = response.status_code
        if status < 300:
            return response
        message = f"HTTP {status} from {self.endpoint}: {error_message(response)}"
        if status >= 500:
            raise _Retryable(message)
        if status == 429:
            raise _Retryable(message, retry_after_s(response.headers.get("retry-after")),
                             counts=False)
        self.breaker.success()  # the service is up; the request itself is wrong
        self.failures += 1
        if status in (401, 403):
            message += " (check WHISPER_API_KEY)"
        elif status == 404:
            message += " (check WHISPER_URL and WHISPER_PATH)"
        elif error_param(response) == "language":  # the client's mistake, not the service's
            raise UnsupportedLanguage(message)
        raise EngineError(message)

    def _parse(self, response: httpx.Response, options: TranscribeOptions,
               duration_s: float) -> Transcription:
        content_type = response.headers.get("content-type", "")
        if self.response_format == "text" or "json" not in content_type:
            return Transcription(text=response.text.strip(), language=options.language,
                                 duration_s=duration_s)
        try:
            body = response.json()
        except ValueError as exc:
            raise EngineError(f"whisper service sent bad JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise EngineError("whisper service answer has no 'text'")
        language = _language_code(body.get("language")) or options.language
        segments = [_segment(s) for s in body.get("segments") or [] if isinstance(s, dict)]
        kept = [s for s in segments
                if not self.guards.is_silence(s.no_speech_prob, s.avg_logprob, s.text)]
        text = body["text"].strip()
        if segments and len(kept) < len(segments):  # some services do not apply this guard
            text = " ".join(s.text for s in kept if s.text).strip()
        words = _words(body) if options.word_timestamps else []
        if not text:
            words = []
        no_speech = [s.no_speech_prob for s in segments if s.no_speech_prob is not None]
        return Transcription(text=text, language=language, segments=kept, words=words,
                             no_speech_prob=max(no_speech) if no_speech else None,
                             duration_s=float(body.get("duration") or duration_s))



def _num(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _segment(s: dict[str, Any]) -> Segment:
    return Segment(text=str(s.get("text", "")).strip(), start=_num(s.get("start")) or 0.0,
                   end=_num(s.get("end")) or 0.0, no_speech_prob=_num(s.get("no_speech_prob")),
                   avg_logprob=_num(s.get("avg_logprob")),
                   compression_ratio=_num(s.get("compression_ratio")))


def _words(body: dict[str, Any]) -> list[Word]:
    """Top-level ``words`` (OpenAI) or per-segment ``words`` (faster-whisper servers)."""
    raw = body.get("words")
    if not raw:
        raw = [w for s in body.get("segments") or [] if isinstance(s, dict)
               for w in s.get("words") or []]
    words = []
    for w in raw:
        if not isinstance(w, dict) or not str(w.get("word", "")).strip():
            continue
        start, end = _num(w.get("start")), _num(w.get("end"))
        if start is None or end is None:
            continue
        words.append(Word(str(w["word"]).strip(), start, end, _num(w.get("probability"))))
    return words


def _language_code(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    low = value.strip().lower()
    return LANGUAGE_CODES.get(low, low)  # some services (OpenAI) report names
