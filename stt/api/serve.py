"""``stt serve``: the OpenAI-compatible transcription API, served by this project's engines.

The GPU tier of the HTTP variant can be this project too: ``stt serve`` on the GPU machine
(``Dockerfile.rocm``), ``stt_streaming.py`` workers pointing ``WHISPER_URL`` at it.

* ``POST /v1/audio/transcriptions``: multipart ``file`` (WAV, FLAC, OGG, MP3: anything
  libsndfile reads, any rate and channel count), ``model`` (any name is accepted: one model is
  served), ``language``, ``prompt``, ``response_format`` (``json``, ``text``, ``srt``,
  ``verbose_json``, ``vtt``), ``temperature``, ``timestamp_granularities[]`` (``word``,
  ``segment``; words need ``verbose_json``, as with OpenAI).
* ``GET /v1/models``, ``GET /v1/models/{id}``; ``GET /health``, ``/healthz``, ``/readyz``.
* Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``; bodies over
  ``STT_SERVE_MAX_BYTES`` get 413; with ``STT_SERVE_API_KEY`` set, ``Authorization: Bearer``
  is required (except for health).

The engine is ``STT_ENGINE`` (``--engine``), by default faster-whisper with the embedded tiny.en;
``whisper`` is the PyTorch path (CUDA, ROCm). Requests from many clients share the engine, so
the local Whisper engines batch them exactly as they batch sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import importlib.util
import io
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from stt import config
from stt.config import Settings
from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.transcription import Segment, TranscribeOptions
from stt.engines.base import Engine, EngineError, EngineUnavailable
from stt.engines.decoding import UnsupportedLanguage
from stt.engines.languages import LANGUAGE_NAMES
from stt.engines.models import DEFAULT_MODEL
from stt.ops import logs

log = logging.getLogger("stt.serve")

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
GRANULARITIES = ("word", "segment")
MIN_AUDIO_S = 0.1  # OpenAI refuses shorter audio ("audio_too_short") too
WORD_GAP_S = 0.6   # segments made from word timings break at pauses this long ...
SEGMENT_MAX_S = 10.0  # ... or at this length



_LANGUAGE_FIELD = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$|^[A-Za-z ]{4,30}$")


class ApiError(Exception):
    """An error the client sees, OpenAI-shaped."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)

    def response(self) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def model_id(settings: Settings) -> str:
    if settings.transcription.engine in ("whisper", "faster-whisper"):
        model = settings.transcription.whisper_model_size or DEFAULT_MODEL
        name = os.path.basename(os.path.normpath(model))
        return name[:-3] if name.endswith(".pt") else name
    return settings.transcription.engine


def decode_audio(data: bytes) -> np.ndarray:
    """Uploaded file -> 16 kHz mono float32."""
    try:
        return load_16k_mono(io.BytesIO(data))
    except Exception:  # libsndfile's error: unknown format, truncated file
        raise ApiError(400, "Could not decode the audio file: unknown format or damaged file. "
                       "Supported formats: wav, flac, ogg, mp3.", param="file",
                       code="invalid_audio") from None


def segments_for(text: str, segments: list[Segment], words: list[Any],
                 duration_s: float) -> list[Segment]:
    """The engine's segments; else segments cut from word timings at pauses; else one."""
    if segments:
        return segments
    if words:
        out: list[Segment] = []
        group = [words[0]]
        for w in words[1:]:
            if w.start - group[-1].end >= WORD_GAP_S or w.end - group[0].start > SEGMENT_MAX_S:
                out.append(Segment(" ".join(x.word for x in group), group[0].start, group[-1].end))
                group = []
            group.append(w)
        out.append(Segment(" ".join(x.word for x in group), group[0].start, group[-1].end))
        return out
    return [Segment(text, 0.0, duration_s)] if text else []


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def to_srt(segments: list[Segment]) -> str:
    blocks = [f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
              for i, s in enumerate(segments, 1)]
    return "\n".join(blocks)


def to_vtt(segments: list[Segment]) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n"
              for s in segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


async def _read_body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:  # chunked uploads declare no length: count as it arrives
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Maximum content size limit ({limit} bytes) exceeded.",
                    code="request_too_large")


def create_app(engine: Engine, settings: Settings) -> Any:
    """The Starlette app over an engine that is already started (the caller owns its life)."""
    from starlette.applications import Starlette
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    served = model_id(settings)
    created = int(time.time())
    api_key = settings.serve.serve_api_key
    state = {"requests": 0, "errors": 0, "draining": False}

    def check_auth(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_key):
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def transcriptions(request: Request) -> Response:
        state["requests"] += 1
        try:
            check_auth(request)
            body = await _read_body(request, settings.serve.serve_max_bytes)
            return await _transcribe(request, body)
        except ApiError as err:
            state["errors"] += 1
            if err.status >= 500:
                log.warning("%s", err.message, extra={"code": err.code})
            return err.response()

    async def _transcribe(request: Request, body: bytes) -> Response:
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=2, max_fields=50)
        except Exception as exc:  # not multipart, a broken boundary
            raise ApiError(400, f"Expected a multipart/form-data body: {exc}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "Missing required parameter: 'file'.", param="file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in RESPONSE_FORMATS:
            raise ApiError(400, f"Invalid response_format {fmt!r}; choose one of "
                           f"{', '.join(RESPONSE_FORMATS)}.", param="response_format")
        try:
            temperature = float(str(form.get("temperature") or 0))
        except ValueError:
            temperature = -1.0
        if not 0.0 <= temperature <= 1.0:
            raise ApiError(400, "temperature must be a number between 0 and 1.",
                           param="temperature")
        granularities = [str(g) for key in ("timestamp_granularities[]", "timestamp_granularities")
                         for g in form.getlist(key)]
        if any(g not in GRANULARITIES for g in granularities):
            raise ApiError(400, "timestamp_granularities must be 'word' and/or 'segment'.",
                           param="timestamp_granularities")
        if granularities and fmt != "verbose_json":
            raise ApiError(400, "timestamp_granularities requires response_format=verbose_json.",
                           param="timestamp_granularities")
        language = str(form.get("language") or "").strip() or None
        if language is not None and not _LANGUAGE_FIELD.match(language):
            raise ApiError(400, f"Invalid language {language!r}: use ISO-639-1 (e.g. 'en').",
                           param="language")
        prompt = str(form.get("prompt") or "").strip() or None
        audio = await asyncio.to_thread(decode_audio, await upload.read())
        await form.close()
        duration = audio.size / SAMPLE_RATE
        if duration < MIN_AUDIO_S:
            raise ApiError(400, f"Audio file is too short. Minimum audio length is {MIN_AUDIO_S} "
                           "seconds.", param="file", code="audio_too_short")
        words_wanted = "word" in granularities
        t0 = time.perf_counter()
        try:
            result = await engine.transcribe(audio, TranscribeOptions(
                language=language, prompt=prompt, word_timestamps=words_wanted,
                temperature=temperature, segment_times=True))
        except UnsupportedLanguage as exc:
            raise ApiError(400, str(exc), param="language",
                           code="unsupported_language") from None
        except EngineError as exc:
            raise ApiError(500, f"Transcription failed: {exc}", type_="server_error",
                           code="engine_failed") from None
        log.info("transcribed", extra={"audio_s": round(duration, 2), "format": fmt,
                                       "engine_s": round(time.perf_counter() - t0, 3)})
        text = result.text.strip()
        if fmt == "json":
            return JSONResponse({"text": text})
        if fmt == "text":
            return PlainTextResponse(text + "\n")
        segments = segments_for(text, result.segments, result.words, duration)
        if fmt == "srt":
            return PlainTextResponse(to_srt(segments))
        if fmt == "vtt":
            return PlainTextResponse(to_vtt(segments), media_type="text/vtt")
        code = result.language or language or ""
        verbose: dict[str, Any] = {
            "task": "transcribe", "language": LANGUAGE_NAMES.get(code, code),
            "duration": round(duration, 3), "text": text,
            "segments": [{"id": i, "seek": int(s.start * 100), "start": s.start, "end": s.end,
                          "text": s.text, "tokens": [], "temperature": temperature,
                          "avg_logprob": s.avg_logprob if s.avg_logprob is not None else 0.0,
                          "compression_ratio": (s.compression_ratio
                                                if s.compression_ratio is not None else 0.0),
                          "no_speech_prob": (s.no_speech_prob if s.no_speech_prob is not None
                                             else result.no_speech_prob or 0.0)}
                         for i, s in enumerate(segments)]}
        if words_wanted:
            verbose["words"] = [w.as_dict() for w in result.words]
        return JSONResponse(verbose)

    def model_card() -> dict[str, Any]:
        return {"id": served, "object": "model", "created": created, "owned_by": "stt-streaming"}

    async def models(request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as err:
            return err.response()
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as err:
            return err.response()
        if request.path_params["model"] != served:
            return ApiError(404, f"The model '{request.path_params['model']}' does not exist.",
                            param="model", code="model_not_found").response()
        return JSONResponse(model_card())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": served, "engine": engine.describe(),
                             "requests": state["requests"], "errors": state["errors"]})

    async def readyz(request: Request) -> Response:
        ready = not state["draining"]
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        state["draining"] = True

    routes = [Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/healthz", health, methods=["GET"]),
              Route("/readyz", readyz, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                     lifespan=contextlib.asynccontextmanager(lifespan))


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, which kills the
            # process before the engine is closed (orphaned engine processes, exit -15): stop
            # serving, then return normally.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

    return Server


async def serve(settings: Settings) -> int:
    import uvicorn

    from stt.engines import create_engine

    try:
        engine = create_engine(settings, partials=False)  # uploads are decoded as finals
        await engine.start()
    except EngineUnavailable as exc:
        log.error("engine unavailable: %s", exc)
        return 2
    app = create_app(engine, settings)
    server = _server_class()(uvicorn.Config(
        app, host=settings.serve.serve_host, port=settings.serve.serve_port, log_config=None,
        timeout_graceful_shutdown=max(1, int(settings.limits.drain_timeout_s)),
        server_header=False))
    log.info("serving the OpenAI-compatible transcription API", extra={
        "url": f"http://{settings.serve.serve_host}:{settings.serve.serve_port}"
               "/v1/audio/transcriptions",
        "model": model_id(settings), "engine": engine.describe()})
    try:
        await server.serve()
    finally:
        await engine.close()
    return 0 if server.started else 1


def missing_extra(command: str, modules: tuple[str, ...]) -> bool:
    """Whether a module of the serve extra is missing; if so, one line on stderr says which."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{command} needs {', '.join(missing)}: pip install 'stt-streaming[serve]'",
              file=sys.stderr)
    return bool(missing)


def add_server_parser(sub: Any, name: str, func: Any, groups: tuple[str, ...],
                      **texts: str) -> None:
    """A server command: ``--host``/``--port`` and the settings of ``groups`` as flags."""
    p = sub.add_parser(name, **texts)
    p.add_argument("--host", dest="serve_host", default=None, metavar="STT_SERVE_HOST",
                   help="Address to bind (same as --serve-host).")
    p.add_argument("--port", dest="serve_port", default=None, metavar="STT_SERVE_PORT",
                   help="Port to listen on (same as --serve-port).")
    config.add_arguments(p, groups=groups)
    p.set_defaults(func=func)


def cmd_serve(args: argparse.Namespace) -> int:
    if missing_extra("stt serve", ("starlette", "uvicorn", "multipart")):
        return 2
    overrides = config.overrides_from_args(args)
    settings = Settings.from_env(overrides=overrides)
    logs.setup(settings.ops.log_level, settings.ops.log_format)
    log.info("starting stt serve", extra={"settings": config.settings_summary(settings)})
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 130


def add_parser(sub: Any) -> None:
    """Add ``stt serve`` to the CLI's subcommands."""
    add_server_parser(
        sub, "serve", cmd_serve, ("engine", "serve", "ops"),
        help="OpenAI-compatible transcription API (/v1/audio/transcriptions)",
        description="Serve POST /v1/audio/transcriptions over a local engine (STT_ENGINE: "
                    "faster-whisper with the embedded tiny.en by default, whisper for "
                    "PyTorch/ROCm). Every flag has an environment variable.")
