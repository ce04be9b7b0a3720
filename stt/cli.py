"""The ``stt`` command: worker, stream, tail, demo, live, doctor, convert (and serve and
realtime, with the serve extra)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from . import config, logs
from .cluster import ClusterConfigError
from .config import ConfigError, Settings
from .connection import ConnectError
from .engines.base import Engine, EngineUnavailable
from .telemetry import Telemetry

SAMPLE = Path(__file__).parent / "data" / "sample.flac"
log = logging.getLogger("stt")


def _settings(args: argparse.Namespace, **forced: Any) -> Settings:
    overrides = config.overrides_from_args(args)
    overrides.update({k: v for k, v in forced.items() if v is not None})
    return Settings.from_env(overrides=overrides)


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


def build_telemetry(settings: Settings, engine: Engine) -> Telemetry:
    """The cheapest telemetry that does what the settings ask for.

    * ``OTEL_ENABLED`` or ``HYPERDX_ENABLED``: OpenTelemetry traces and OTLP metrics (and the
      ``/metrics`` recorder); the http engine's requests then carry the trace context;
    * else, with ``STT_HEALTH_PORT`` set: the ``/metrics`` recorder (no exporter thread);
    * else the no-op.
    """
    if settings.otel_enabled or settings.hyperdx_enabled:
        try:
            from .otel import OtelTelemetry, current_trace_headers
        except ImportError as exc:
            variable = "OTEL_ENABLED" if settings.otel_enabled else "HYPERDX_ENABLED"
            raise ConfigError(variable, f"needs the otel extra: pip install "
                                        f"'stt-streaming[otel]' ({exc})") from None
        from .engines.http import HttpEngine

        if isinstance(engine, HttpEngine):
            engine.extra_headers = current_trace_headers
        return OtelTelemetry(settings, engine.name)
    if settings.health_port:
        from .metrics import MetricsTelemetry

        return MetricsTelemetry()
    return Telemetry()


async def check_http_engine(settings: Settings, engine: Engine) -> None:
    """``--engine http``: is the Whisper service there? With ``WHISPER_URL`` left at its
    loopback default nothing can work, so say which variable to set and stop; with a URL that
    was chosen, warn (the service may start after the worker; the circuit breaker copes)."""
    from .engines.http import HttpEngine

    if not isinstance(engine, HttpEngine):
        return
    reason = await engine.probe()
    if reason is None:
        return
    default = dataclasses.fields(Settings)  # the field's own default, not a copy of it
    is_default = settings.whisper_url == next(f.default for f in default
                                              if f.name == "whisper_url")
    if is_default:
        raise EngineUnavailable(
            f"nothing answers at {settings.whisper_url}, WHISPER_URL's default ({reason}): set "
            f"WHISPER_URL (--whisper-url) to the Whisper HTTP service's base URL")
    log.warning("the Whisper HTTP service does not answer yet; requests will retry",
                extra={"whisper_url": settings.whisper_url, "error": reason,
                       "hint": "check WHISPER_URL (--whisper-url)"})


async def run_worker(settings: Settings) -> int:
    """Everything the worker needs, wired here and only here."""
    from .discovery import Discovery
    from .engines import create_engine
    from .worker import Worker

    engine = create_engine(settings)
    await check_http_engine(settings, engine)
    telemetry = build_telemetry(settings, engine)
    worker = Worker(settings, engine, telemetry=telemetry)
    stop = asyncio.Event()
    _stop_on_signals(stop)
    health = None
    if settings.health_port:
        from .health import HealthServer
        from .metrics import MetricsTelemetry

        assert isinstance(telemetry, MetricsTelemetry)  # build_telemetry with a health port
        # Up before the model loads and NATS connects: /livez answers, /readyz says why not.
        health = HealthServer(worker.status, telemetry, settings.health_host,
                              settings.health_port)
        await health.start()
    discovery = Discovery(settings, worker.status)
    try:
        if not await worker.start(stop):
            return 0  # SIGTERM/SIGINT before NATS answered: nothing to drain
        try:
            await discovery.start(worker.nc)
        except Exception as exc:  # discovery is a convenience; the worker runs without it
            log.warning("NATS service discovery unavailable: %s", exc)
        await stop.wait()
    finally:
        await discovery.stop()
        await worker.shutdown()
        if health is not None:
            await health.stop()
    return 0


def cmd_worker(args: argparse.Namespace, engine: str | None = None) -> int:
    settings = _settings(args, engine=engine)
    logs.setup(settings.log_level, settings.log_format)
    log.info("starting worker", extra={"settings": config.settings_summary(settings)})
    try:
        return asyncio.run(run_worker(settings))
    except EngineUnavailable as exc:
        log.error("engine unavailable: %s", exc)
        return 2
    except ConnectError as exc:  # what retrying cannot fix (see stt.connection)
        log.error("cannot connect to NATS: %s", exc, extra={"variable": exc.variable})
        return 1
    except ClusterConfigError as exc:  # STT_PARTITIONS against a server not set up for it
        log.error("cannot join the replicas: %s", exc)
        return 1


CLIENT_TRIES = 3  # `stt stream`/`stt tail`: tries while NATS does not answer (0.5 + 1 s apart)


def client_settings(args: argparse.Namespace, name: str) -> Settings:
    """The worker's NATS settings (environment, then the NATS flags) for a client command:
    the same credentials, TLS files and subjects as the worker, read by the same code."""
    nats_fields = {f.name for f in dataclasses.fields(Settings)
                   if f.metadata["group"] == "nats"}
    overrides = {k: v for k, v in config.overrides_from_args(args).items() if k in nats_fields}
    if "nats_name" not in overrides and "NATS_CLIENT_NAME" not in os.environ:
        overrides["nats_name"] = name
    return Settings.from_env(overrides=overrides)


def _quiet_logs() -> None:
    """Client commands print their own one-line errors; library chatter only when asked."""
    level = os.environ.get("STT_LOG_LEVEL", "ERROR")
    logs.setup(level if level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "ERROR")


async def _connect(settings: Settings, stop: asyncio.Event | None = None) -> Any:
    from .connection import connect

    return await connect(settings, stop=stop, max_tries=CLIENT_TRIES, max_reconnect_attempts=3)


def _printer(quiet_partials: bool = False) -> Any:
    from .client import describe

    tty = sys.stdout.isatty()

    def show(message: dict[str, Any]) -> None:
        if message.get("type") == "transcript" and message.get("is_partial"):
            if quiet_partials:
                return
            if tty:
                print("\r\033[K" + describe(message)[:200], end="", flush=True)
                return
        elif tty:
            print("\r\033[K", end="")
        print(describe(message), flush=True)

    return show


def read_audio(path: str) -> tuple[Any, int]:
    """The file as (samples, rate), or :class:`CommandError` saying why not in one line."""
    from .audio import load_file

    if not os.path.exists(path):
        raise CommandError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a directory, not an audio file")
    try:
        samples, rate = load_file(path)
    except Exception as exc:  # libsndfile: unknown format, truncated, unreadable
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CommandError(f"{path}: not an audio file libsndfile can read (WAV, FLAC, OGG, "
                           f"MP3): {reason}") from None
    if len(samples) == 0:
        raise CommandError(f"{path}: has no audio frames")
    return samples, rate


class CommandError(Exception):
    """A client command's failure, printed as one line (no traceback)."""


async def _stream(args: argparse.Namespace, settings: Settings) -> int:
    from nats.errors import Error as NatsError

    from .client import stream_audio
    from .protocol import Subjects

    url = settings.nats_url
    samples, rate = read_audio(args.file)
    subjects = Subjects.of(settings)
    nc = await _connect(settings)
    try:
        result = await stream_audio(
            nc, samples, rate, subjects=subjects, session_id=args.session_id,
            chunk_ms=args.chunk_ms, speed=args.speed, raw_bytes=args.raw,
            state=args.state, language=args.language, speaker_id=args.speaker_id,
            end_timeout_s=args.timeout, on_message=_printer(args.no_partials))
    except TimeoutError:
        print(f"no 'end' message within {args.timeout} s: is a worker running on {url}?",
              file=sys.stderr)
        return 1
    except NatsError as exc:  # the connection went away mid-stream
        raise CommandError(f"NATS connection lost while streaming: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    if args.print_text:
        print(result.text)
    return 0


def _run_client(name: str, args: argparse.Namespace, run: Any) -> int:
    """Settings, logging and the one-line errors shared by ``stt stream`` and ``stt tail``."""
    settings = client_settings(args, f"stt-{name}")
    _quiet_logs()
    try:
        return int(asyncio.run(run(args, settings)))
    except (ConnectError, CommandError) as exc:
        print(f"stt {name}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CommandError) else 1


def cmd_stream(args: argparse.Namespace) -> int:
    return _run_client("stream", args, _stream)


async def _tail(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from . import protocol
    from .client import describe

    url = settings.nats_url
    subject = args.subject or settings.output_subject_prefix + ".>"
    stop = asyncio.Event()
    _stop_on_signals(stop)
    nc = await _connect(settings, stop)
    if nc is None:  # Ctrl-C while connecting
        return 0

    async def cb(msg: Any) -> None:
        try:
            message = protocol.unpack(msg.data)
        except protocol.ProtocolError as exc:
            print(f"{msg.subject}: undecodable payload ({exc.message})", flush=True)
            return
        if args.json:
            print(json.dumps({"subject": msg.subject, **message}, default=repr), flush=True)
        else:
            print(time.strftime("%H:%M:%S ") + describe(message), flush=True)

    await nc.subscribe(subject, cb=cb)
    await nc.flush()
    print(f"listening on {subject} at {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await nc.close()
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    return _run_client("tail", args, _tail)


@contextlib.asynccontextmanager
async def embedded(engine: str | None, log_level: str,
                   replicas: int = 1) -> AsyncIterator[tuple[Any, Settings, list[Any]]]:
    """Its own nats-server and ``replicas`` started workers (``stt demo``, ``stt live``):
    yields (server, settings, workers); the workers shut down and the server stops after."""
    from .engines import create_engine
    from .nats_server import REPLICAS_PARTITIONS, NatsServer
    from .worker import Worker

    many = replicas > 1
    with NatsServer.for_replicas() if many else NatsServer() as server:
        settings = Settings.from_env(overrides={
            "nats_url": server.url, "engine": engine, "log_level": log_level,
            **({"partitions": REPLICAS_PARTITIONS} if many else {})})
        workers = [Worker(settings, create_engine(settings)) for _ in range(replicas)]
        try:
            for worker in workers:
                await worker.start()
            yield server, settings, workers
        finally:
            for worker in workers:
                await worker.shutdown()


async def _demo(args: argparse.Namespace) -> int:
    from .audio import load_file
    from .client import stream_audio
    from .cluster import partition_of, wait_balanced
    from .nats_server import REPLICAS_PARTITIONS

    path = args.file or str(SAMPLE)
    many = args.replicas > 1
    async with embedded(args.engine, args.log_level, args.replicas) as (server, settings,
                                                                        workers):
        print(f"nats-server {server.url} · engine {settings.engine} · streaming {path} "
              f"at {args.speed:g}x real time", flush=True)
        sid = "demo-" + uuid.uuid4().hex[:6]
        nc = await _connect(settings)
        if many:  # every replica holds its share of the partitions before the session starts
            await wait_balanced(nc, args.replicas, REPLICAS_PARTITIONS, 60)
            p = partition_of(sid, REPLICAS_PARTITIONS)
            for w in workers:
                assert w.cluster is not None
                print(f"replica {w.cluster.replica_id}: {len(w.cluster.owned)} partitions"
                      f"{f' (with {sid}, partition {p})' if p in w.cluster.owned else ''}")
        try:
            samples, rate = load_file(path)
            t0 = time.monotonic()
            result = await stream_audio(nc, samples, rate, session_id=sid,
                                        speed=args.speed, on_message=_printer())
            took = time.monotonic() - t0
        finally:
            await nc.close()
    print(f"\n{len(result.finals)} finals, {len(result.partials)} partials, "
          f"{len(samples) / rate:.1f} s of audio in {took:.1f} s")
    print("transcript:", result.text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if not 1 <= args.replicas <= 8:
        print("stt demo: --replicas must be between 1 and 8", file=sys.stderr)
        return 2
    logs.setup(args.log_level, "text")
    return asyncio.run(_demo(args))


async def _live(args: argparse.Namespace) -> int:
    from .nats_server import free_port, port_free
    from .realtime import serve_realtime

    async with embedded(args.engine, args.log_level) as (server, settings, workers):
        host = args.host or settings.serve_host
        port = settings.serve_port if args.port is None else args.port
        if not port or not port_free(host, port):
            port = free_port()
        settings = dataclasses.replace(settings, serve_host=host, serve_port=port)

        def ready(url: str) -> None:
            print(f"nats-server {server.url} · worker ready (engine {settings.engine})\n"
                  f"open {url}  (Realtime websocket {url.replace('http', 'ws', 1)}v1/realtime"
                  f"?intent=transcription; Ctrl-C to stop)", flush=True)

        return await serve_realtime(settings, worker_status=workers[0].status, on_ready=ready)


def cmd_live(args: argparse.Namespace) -> int:
    from .realtime import SERVER_MODULES
    from .serve import missing_extra

    if missing_extra("stt live", SERVER_MODULES):
        return 2
    logs.setup(args.log_level, "text")
    try:
        return asyncio.run(_live(args))
    except KeyboardInterrupt:
        return 130


def _describe_model(name: str) -> str:
    """WHISPER_MODEL_SIZE resolved as the faster-whisper engine would, without downloading."""
    from .models import DEFAULT_MODEL, EMBEDDED, resolve_ct2

    shown = name or f"{DEFAULT_MODEL} (default)"
    if name and not os.path.isdir(name) and name not in EMBEDDED:
        return f"{shown}: downloaded by name on first start (needs network)"
    try:
        source = resolve_ct2(name)
    except EngineUnavailable as exc:
        return f"{shown}: NOT USABLE: {exc}"
    return (f"{shown}: {source.path}, {source.origin}, model.bin checksum {source.checksum}")


def cmd_doctor(args: argparse.Namespace) -> int:
    from .models import EMBEDDED
    from .nats_server import find_binary
    from .turn_model import TurnModelError, default_path, verify

    def has(mod: str) -> bool:
        return importlib.util.find_spec(mod) is not None

    print(f"python      {sys.version.split()[0]} ({sys.executable})")
    print(f"nats-server {find_binary() or 'not found (pip install stt-streaming[nats-server])'}")
    settings = Settings.from_env()
    print(f"engine      {settings.engine} (STT_ENGINE)")
    if has("faster_whisper"):
        import ctranslate2

        cuda = ctranslate2.get_cuda_device_count()
        print(f"faster-whisper ok; CTranslate2 {ctranslate2.__version__}, "
              f"{f'{cuda} CUDA device(s)' if cuda else 'no CUDA GPU, CPU only'}")
    else:
        print("faster-whisper missing (extra: faster-whisper)")
    print(f"model       {_describe_model(settings.whisper_model_size)}")
    for name, model in EMBEDDED.items():
        print(f"  embedded {name:8} {'installed' if model.installed() else 'not installed'} "
              f"({model.requirement})")
    print(f"whisper     {'ok' if has('whisper') else 'missing (extra: local)'}")
    if has("torch"):
        import torch

        gpu = torch.cuda.is_available()
        kind = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
        print(f"torch       {torch.__version__}; "
              f"{kind + ' ' + torch.cuda.get_device_name(0) if gpu else 'no GPU, CPU only'}")
    else:
        print("torch       missing (extra: local)")
    print(f"demo sample {SAMPLE if SAMPLE.exists() else 'missing'}")
    try:
        print(f"turn model  {verify(default_path())} (verified)")
    except TurnModelError as e:
        print(f"turn model  {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="run the streaming worker",
                       description="Run the worker. Every flag has an environment variable.")
    config.add_arguments(p)
    p.set_defaults(func=cmd_worker)

    nats_help = ("NATS connection and subjects: the worker's variables and flags (NATS_URL, "
                 "NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_NKEY_SEED, NATS_CREDS, "
                 "NATS_TLS_CA/CERT/KEY, ...)")
    p = sub.add_parser("stream", help="stream an audio file as a live session and print transcripts",
                       description="Stream an audio file as a live session. " + nats_help + ".")
    p.add_argument("file", help="WAV/FLAC/OGG at any sample rate")
    p.add_argument("--session-id", default=None)
    p.add_argument("--speed", type=float, default=1.0,
                   help="multiple of real time (2 = twice as fast, 0 = as fast as possible)")
    p.add_argument("--chunk-ms", type=int, default=40, help="audio per chunk message")
    p.add_argument("--raw", action="store_true", help="send raw bytes (`audio`) not base64")
    p.add_argument("--state", default="listening", choices=("listening", "responding"))
    p.add_argument("--language", default=None)
    p.add_argument("--speaker-id", default=None)
    p.add_argument("--no-partials", action="store_true", help="print finals only")
    p.add_argument("--print-text", action="store_true", help="print the joined finals at the end")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for 'end'")
    config.add_arguments(p, groups=("nats",))
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("tail", help="print decoded transcription messages as they arrive",
                       description="Print decoded transcription messages. " + nats_help + ".")
    p.add_argument("--subject", default=None,
                   help="subject to watch (default: STT_OUTPUT_SUBJECT_PREFIX + '.>')")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    config.add_arguments(p, groups=("nats",))
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("demo", help="embedded nats-server + worker + a streamed sample, offline")
    p.add_argument("--file", help=f"audio to stream (default: {SAMPLE.name}, bundled)")
    p.add_argument("--engine", default=None,
                   help="engine (default: $STT_ENGINE, else faster-whisper with the embedded "
                        "tiny.en)")
    p.add_argument("--speed", type=float, default=1.0, help="multiple of real time")
    p.add_argument("--replicas", type=int, default=1,
                   help="workers sharing the sessions (STT_PARTITIONS with the server "
                        "configuration k8s/nats/nats-server.conf)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("live", help="embedded nats-server + worker + the Realtime websocket "
                                     "and the live microphone page; prints the URL to open")
    p.add_argument("--engine", default=None,
                   help="engine (default: $STT_ENGINE, else faster-whisper with the embedded "
                        "tiny.en)")
    p.add_argument("--host", default=None, help="address to bind (default: $STT_SERVE_HOST, "
                                                "127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: $STT_SERVE_PORT, 8000; a free one if it is taken)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_live)

    p = sub.add_parser("doctor", help="say which engines, devices and binaries are available")
    p.set_defaults(func=cmd_doctor)

    from .convert import add_parser as add_convert

    add_convert(sub)
    if importlib.util.find_spec("stt.serve") is not None:
        from .realtime import add_parser as add_realtime
        from .serve import add_parser as add_serve

        add_serve(sub)
        add_realtime(sub)
    return parser


def main(argv: list[str] | None = None, engine: str | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.func is cmd_worker:
            return cmd_worker(args, engine=engine)
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
