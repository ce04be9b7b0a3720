"""Wiring: the settings from flags, signals, telemetry, the worker with everything it
needs (``stt worker``), and the embedded stack of ``stt demo`` / ``stt live``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stt import config
from stt.config import ConfigError, Settings
from stt.config.transcription import TranscriptionSettings
from stt.engines.base import Engine, EngineUnavailable
from stt.ops.telemetry import Telemetry

if TYPE_CHECKING:
    from stt.transport.worker import Worker

SAMPLE = Path(__file__).parent.parent / "data" / "sample.flac"


log = logging.getLogger("stt")


def settings_from(args: argparse.Namespace, **forced: Any) -> Settings:
    overrides = config.overrides_from_args(args)
    overrides.update({k: v for k, v in forced.items() if v is not None})
    return Settings.from_env(overrides=overrides)


def stop_on_signals(stop: asyncio.Event) -> None:
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
    if settings.ops.otel_enabled or settings.ops.hyperdx_enabled:
        try:
            from stt.ops.otel import OtelTelemetry, current_trace_headers
        except ImportError as exc:
            variable = "OTEL_ENABLED" if settings.ops.otel_enabled else "HYPERDX_ENABLED"
            raise ConfigError(variable, f"needs the otel extra: pip install "
                                        f"'stt-streaming[otel]' ({exc})") from None
        from stt.engines.http import HttpEngine

        if isinstance(engine, HttpEngine):
            engine.extra_headers = current_trace_headers
        return OtelTelemetry(settings, engine.name)
    if settings.ops.health_port:
        from stt.ops.metrics import MetricsTelemetry

        return MetricsTelemetry()
    return Telemetry()


async def check_http_engine(settings: Settings, engine: Engine) -> None:
    """``--engine http``: is the Whisper service there? With ``WHISPER_URL`` left at its
    loopback default nothing can work, so say which variable to set and stop; with a URL that
    was chosen, warn (the service may start after the worker; the circuit breaker copes)."""
    from stt.engines.http import HttpEngine

    if not isinstance(engine, HttpEngine):
        return
    reason = await engine.probe()
    if reason is None:
        return
    is_default = settings.transcription.whisper_url == TranscriptionSettings.whisper_url
    if is_default:
        raise EngineUnavailable(
            f"nothing answers at {settings.transcription.whisper_url}, WHISPER_URL's default "
            f"({reason}): set WHISPER_URL (--whisper-url) to the Whisper HTTP service's base URL")
    log.warning("the Whisper HTTP service does not answer yet; requests will retry",
                extra={"whisper_url": settings.transcription.whisper_url, "error": reason,
                       "hint": "check WHISPER_URL (--whisper-url)"})


def build_worker(settings: Settings, engine: Engine | None = None, *,
                 telemetry: Telemetry | None = None, turn_model: Any = True,
                 clock: Callable[[], float] = time.monotonic) -> Worker:
    """The worker and what it is built from, the one place they are put together: ``stt
    worker``, ``stt demo``, ``stt live``, the benchmarks and the tests all call this. By default
    the engine comes from the settings (STT_ENGINE), the telemetry too (build_telemetry), and the
    end-of-turn model loads at start; a test or benchmark passes its own engine, clock, telemetry
    or ``turn_model=None`` (silence endpointing)."""
    from stt.engines import create_engine
    from stt.transport.worker import Worker

    engine = engine or create_engine(settings)
    telemetry = telemetry or build_telemetry(settings, engine)
    return Worker(settings, engine, clock=clock, telemetry=telemetry, turn_model=turn_model)


async def run_worker(settings: Settings) -> int:
    """``stt worker``: the worker, its health port and discovery, until SIGTERM/SIGINT."""
    from stt.transport.discovery import Discovery

    worker = build_worker(settings)
    engine, telemetry = worker.engine, worker.telemetry
    await check_http_engine(settings, engine)
    stop = asyncio.Event()
    stop_on_signals(stop)
    health = None
    if settings.ops.health_port:
        from stt.ops.health import HealthServer
        from stt.ops.metrics import MetricsTelemetry

        assert isinstance(telemetry, MetricsTelemetry)  # build_telemetry with a health port
        # Up before the model loads and NATS connects: /livez answers, /readyz says why not.
        health = HealthServer(worker.status, telemetry, settings.ops.health_host,
                              settings.ops.health_port)
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


@contextlib.asynccontextmanager
async def embedded(engine: str | None, log_level: str,
                   replicas: int = 1) -> AsyncIterator[tuple[Any, Settings, list[Any]]]:
    """Its own nats-server and ``replicas`` started workers (``stt demo``, ``stt live``):
    yields (server, settings, workers); the workers shut down and the server stops after."""
    from stt.transport.nats_server import REPLICAS_PARTITIONS, NatsServer

    many = replicas > 1
    with NatsServer.for_replicas() if many else NatsServer() as server:
        settings = Settings.from_env(overrides={
            "nats_url": server.url, "engine": engine, "log_level": log_level,
            **({"partitions": REPLICAS_PARTITIONS} if many else {})})
        workers = [build_worker(settings) for _ in range(replicas)]
        try:
            for worker in workers:
                await worker.start()
            yield server, settings, workers
        finally:
            for worker in workers:
                await worker.shutdown()
