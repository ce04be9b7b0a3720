"""The http engine against ``stt serve`` (a real process) and against a small OpenAI-compatible
server written here that can misbehave on request: 500s, 429s, stalls, slowness, refused
connections. Retries, the concurrency cap, the circuit breaker and recovery are checked on
real sockets."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import wave
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE
from test_serve import API_KEY, ServeProcess

from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.textnorm import normalize
from stt.core.transcription import TranscribeOptions, Word
from stt.engines.base import EngineError
from stt.engines.http import (
    BreakerState,
    CircuitBreaker,
    HttpEngine,
    backoff_s,
    encode_wav,
    retry_after_s,
)
from stt.transport.nats_server import free_port

VERBOSE = {
    "task": "transcribe", "language": "english", "duration": 1.0, "text": " hello world",
    "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": 1.0, "text": " hello world",
                  "tokens": [1, 2], "temperature": 0.0, "avg_logprob": -0.2,
                  "compression_ratio": 1.1, "no_speech_prob": 0.01}],
    "words": [{"word": " hello", "start": 0.0, "end": 0.4},
              {"word": " world", "start": 0.5, "end": 0.9}],
}


class FakeWhisperServer:
    """An OpenAI-compatible transcription endpoint (Starlette + uvicorn, own thread and loop).

    ``mode``: ``ok``; ``500``; ``429`` (with ``Retry-After``); ``400``; ``stall`` (never
    answers); ``slow`` (answers after ``delay_s``). ``fail_next`` makes the next N requests
    answer 500 whatever the mode. Every request's form fields and headers are recorded.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.mode = "ok"
        self.fail_next = 0
        self.retry_after = "0.3"
        self.delay_s = 0.3
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, PlainTextResponse, Response
        from starlette.routing import Route

        async def transcriptions(request: Any) -> Response:
            form = await request.form()
            upload = form["file"]
            record = {"fields": {k: form.getlist(k) for k in form if k != "file"},
                      "headers": dict(request.headers), "file": await upload.read(),
                      "filename": upload.filename}
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                if self.fail_next > 0:
                    self.fail_next -= 1
                    return JSONResponse({"error": {"message": "flaky"}}, status_code=500)
                if self.mode == "500":
                    return JSONResponse({"error": {"message": "boom", "type": "server_error"}},
                                        status_code=500)
                if self.mode == "429":
                    self.mode = "ok"  # once
                    return JSONResponse({"error": {"message": "slow down"}}, status_code=429,
                                        headers={"Retry-After": self.retry_after})
                if self.mode == "400":
                    return JSONResponse({"error": {"message": "Invalid language 'xx'",
                                                   "param": "language"}}, status_code=400)
                if self.mode == "stall":
                    await asyncio.sleep(30)
                if self.mode == "slow":
                    await asyncio.sleep(self.delay_s)
                fmt = record["fields"].get("response_format", ["json"])[0]
                if fmt == "text":
                    return PlainTextResponse("hello world\n")
                if fmt == "json":
                    return JSONResponse({"text": "hello world"})
                return JSONResponse(VERBOSE)
            finally:
                self.in_flight -= 1

        return Starlette(routes=[Route("/v1/audio/transcriptions", transcriptions,
                                       methods=["POST"]),
                                 Route("/custom/asr", transcriptions, methods=["POST"])])

    def start(self) -> FakeWhisperServer:
        import uvicorn

        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="error",
                                timeout_graceful_shutdown=1, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake whisper server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = True  # do not wait for stalled requests
        if self._thread is not None:
            self._thread.join(10)
        self._server = self._thread = None


@pytest.fixture
def fake() -> Iterator[FakeWhisperServer]:
    server = FakeWhisperServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def serve_local() -> Iterator[ServeProcess]:
    with ServeProcess("--engine", "faster-whisper", "--serve-api-key", API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_16k_mono(str(SAMPLE))


async def started(url: str, **kwargs: Any) -> HttpEngine:
    kwargs.setdefault("retry_backoff_s", 0.01)
    engine = HttpEngine(url, **kwargs)
    await engine.start()
    return engine


@pytest.fixture
async def engines() -> AsyncIterator[list[HttpEngine]]:
    made: list[HttpEngine] = []
    yield made
    for e in made:
        await e.close()


FINAL = TranscribeOptions(language="en")
PARTIAL = TranscribeOptions(language="en", is_partial=True)
AUDIO = np.zeros(SAMPLE_RATE, dtype=np.float32)


# --- pure parts ------------------------------------------------------------------------------


def test_circuit_breaker_states() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown_s=5.0, clock=lambda: now[0])
    for _ in range(2):
        breaker.failure("down")
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.success()  # successes reset the count: only consecutive failures open it
    for _ in range(3):
        breaker.failure("down")
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    assert breaker.retry_in_s() == 5.0
    now[0] = 5.0
    assert not breaker.allow(may_probe=False)  # a partial does not take the probe
    assert breaker.state is BreakerState.OPEN
    assert breaker.allow() and breaker.state is BreakerState.HALF_OPEN  # a final probes
    assert not breaker.allow()  # only one probe at a time
    breaker.failure("still down")
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    breaker.abandon()  # the probe was cancelled: the next request probes at once
    assert breaker.state is BreakerState.OPEN and breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0
    assert breaker.times_opened == 1


def test_retry_after_backoff_and_wav() -> None:
    assert retry_after_s("2") == 2.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None
    assert 0 <= retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # type: ignore[operator]
    for attempt in range(6):
        delay = backoff_s(attempt, 0.2)
        assert min(5.0, 0.2 * 2 ** attempt) / 2 <= delay <= min(5.0, 0.2 * 2 ** attempt)
    with wave.open(io.BytesIO(encode_wav(np.zeros(1600, dtype=np.float32)))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()) == \
            (16000, 1, 2, 1600)


# --- against stt serve (a real process) --------------------------------------------------------


async def test_against_stt_serve(serve_local: ServeProcess, speech: np.ndarray,
                                 engines: list[HttpEngine]) -> None:
    audio = speech[: 4 * SAMPLE_RATE]
    engine = await started(serve_local.url, api_key=API_KEY)
    engines.append(engine)
    final = await engine.transcribe(audio, TranscribeOptions(language="en", word_timestamps=True,
                                                             prompt="a novel", context="earlier"))
    assert len(final.text.split()) >= 3 and final.language == "en"
    assert final.words and all(isinstance(w, Word) and 0 <= w.start <= w.end <= 4.01
                               for w in final.words)
    assert final.segments and final.duration_s == pytest.approx(4.0, abs=0.01)
    plain = await engine.transcribe(audio, FINAL)  # no prompt: it may change casing, punctuation
    assert normalize(plain.text) == normalize(final.text)
    partial = await engine.transcribe(audio, PARTIAL)
    assert partial.text == plain.text and partial.words == []
    for fmt in ("json", "text"):
        other = await started(serve_local.url, api_key=API_KEY, response_format=fmt)
        engines.append(other)
        assert (await other.transcribe(audio, FINAL)).text == plain.text

    wrong_key = await started(serve_local.url, api_key="wrong")
    engines.append(wrong_key)
    with pytest.raises(EngineError, match=r"HTTP 401.*WHISPER_API_KEY"):
        await wrong_key.transcribe(audio, FINAL)
    assert wrong_key.requests == 1 and wrong_key.breaker.state is BreakerState.CLOSED
    wrong_path = await started(serve_local.url, api_key=API_KEY, path="/v2/nothing")
    engines.append(wrong_path)
    with pytest.raises(EngineError, match=r"HTTP 404.*WHISPER_PATH"):
        await wrong_path.transcribe(audio, FINAL)


# --- against a misbehaving server ----------------------------------------------------------------


async def test_request_form_headers_and_parsing(fake: FakeWhisperServer,
                                                engines: list[HttpEngine]) -> None:
    engine = await started(fake.url, api_key="k", model="my-model", path="custom/asr")
    engine.extra_headers = lambda: {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    engines.append(engine)
    audio = np.full(12345, 0.1, dtype=np.float32)
    result = await engine.transcribe(audio, TranscribeOptions(
        language="de-DE", prompt="Kaffee", context="Guten Morgen", word_timestamps=True,
        temperature=0.2))
    assert result.text == "hello world" and result.language == "en"  # "english" -> "en"
    assert [w.word for w in result.words] == ["hello", "world"]
    assert result.segments[0].no_speech_prob == 0.01
    request = fake.requests[-1]
    assert request["fields"] == {
        "model": ["my-model"], "response_format": ["verbose_json"], "temperature": ["0.2"],
        "language": ["de"], "prompt": ["Kaffee Guten Morgen"],
        "timestamp_granularities[]": ["word", "segment"]}
    assert request["headers"]["authorization"] == "Bearer k"
    assert request["headers"]["traceparent"].startswith("00-111")
    with wave.open(io.BytesIO(request["file"])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (16000, 1, 12345)
    plain = await engine.transcribe(audio, PARTIAL)
    assert plain.words == [] and "timestamp_granularities[]" not in fake.requests[-1]["fields"]


async def test_silent_segments_are_dropped(fake: FakeWhisperServer,
                                           engines: list[HttpEngine]) -> None:
    engine = await started(fake.url, no_speech_threshold=0.001, logprob_threshold=0.0)
    engines.append(engine)
    result = await engine.transcribe(AUDIO, FINAL)
    assert result.text == "" and result.segments == []


async def test_5xx_retried_for_finals_only(fake: FakeWhisperServer,
                                           engines: list[HttpEngine]) -> None:
    fake.mode = "500"
    engine = await started(fake.url, retries=2, breaker_failures=100)
    engines.append(engine)
    with pytest.raises(EngineError, match=r"HTTP 500.*boom"):
        await engine.transcribe(AUDIO, FINAL)
    assert len(fake.requests) == 3
    with pytest.raises(EngineError, match="HTTP 500"):
        await engine.transcribe(AUDIO, PARTIAL)
    assert len(fake.requests) == 4  # a partial is not retried: the next one replaces it
    fake.mode, fake.fail_next = "ok", 2
    assert (await engine.transcribe(AUDIO, FINAL)).text == "hello world"  # third try works
    assert len(fake.requests) == 7 and engine.retried == 4


async def test_429_honours_retry_after(fake: FakeWhisperServer,
                                       engines: list[HttpEngine]) -> None:
    fake.mode, fake.retry_after = "429", "0.4"
    engine = await started(fake.url, breaker_failures=1)
    engines.append(engine)
    t0 = time.monotonic()
    assert (await engine.transcribe(AUDIO, FINAL)).text == "hello world"
    assert time.monotonic() - t0 >= 0.4
    assert engine.breaker.state is BreakerState.CLOSED  # busy is not down


async def test_4xx_fails_at_once_with_the_services_message(fake: FakeWhisperServer,
                                                           engines: list[HttpEngine]) -> None:
    fake.mode = "400"
    engine = await started(fake.url, breaker_failures=1)
    engines.append(engine)
    with pytest.raises(EngineError, match="Invalid language 'xx'"):
        await engine.transcribe(AUDIO, FINAL)
    assert len(fake.requests) == 1 and engine.breaker.state is BreakerState.CLOSED


async def test_stalled_service_times_out(fake: FakeWhisperServer,
                                         engines: list[HttpEngine]) -> None:
    fake.mode = "stall"
    engine = await started(fake.url, read_timeout_s=0.3, retries=1)
    engines.append(engine)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="no answer"):
        await engine.transcribe(AUDIO, FINAL)
    assert 0.6 <= time.monotonic() - t0 < 3.0 and len(fake.requests) == 2
    # The overall budget (STT_ENGINE_TIMEOUT_S) bounds retries too.
    short = await started(fake.url, read_timeout_s=5, timeout_s=1.5, retries=5)
    engines.append(short)
    t0 = time.monotonic()
    with pytest.raises(EngineError):
        await short.transcribe(AUDIO, FINAL)
    assert time.monotonic() - t0 < 1.5


async def test_concurrency_cap(fake: FakeWhisperServer, engines: list[HttpEngine]) -> None:
    fake.mode, fake.delay_s = "slow", 0.2
    engine = await started(fake.url, concurrency=2)
    engines.append(engine)
    results = await asyncio.gather(*(engine.transcribe(AUDIO, FINAL) for _ in range(6)))
    assert len(results) == 6 and fake.max_in_flight == 2


async def test_breaker_fails_fast_while_down_and_recovers(engines: list[HttpEngine]) -> None:
    port = free_port()  # nothing listens here yet
    engine = await started(f"http://127.0.0.1:{port}", retries=0, breaker_failures=2,
                           breaker_cooldown_s=1.5)
    engines.append(engine)
    for _ in range(2):
        with pytest.raises(EngineError, match="cannot reach"):
            await engine.transcribe(AUDIO, FINAL)
    assert engine.breaker.state is BreakerState.OPEN
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=r"whisper service unavailable.*circuit open"):
        await engine.transcribe(AUDIO, FINAL)
    assert time.monotonic() - t0 < 0.05 and engine.requests == 2  # no request went out
    server = FakeWhisperServer(port).start()
    try:
        if engine.breaker.retry_in_s() > 0.2:
            with pytest.raises(EngineError, match="unavailable"):  # still cooling down
                await engine.transcribe(AUDIO, FINAL)
        await asyncio.sleep(engine.breaker.retry_in_s() + 0.05)
        assert (await engine.transcribe(AUDIO, FINAL)).text == "hello world"  # the probe
        assert engine.breaker.state is BreakerState.CLOSED
        assert (await engine.transcribe(AUDIO, PARTIAL)).text == "hello world"
    finally:
        server.stop()
    with pytest.raises(EngineError, match="cannot reach"):  # down again: noticed again
        await engine.transcribe(AUDIO, FINAL)
