"""The HTTP side (`stt serve`, `stt realtime`, `stt live`) and operations: health port,
logs, OpenTelemetry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from stt.config.base import Area, setting


@dataclass(frozen=True)
class ServeSettings(Area):
    area: ClassVar[str] = "serve"
    help_group: ClassVar[str] = "serve"  # its section of `stt worker --help`

    serve_host: str = setting("127.0.0.1", "STT_SERVE_HOST",
                              "Address `stt serve`, `stt realtime` and `stt live` bind.")
    serve_port: int = setting(8000, "STT_SERVE_PORT",
                              "Port `stt serve`, `stt realtime` and `stt live` listen on (`stt "
                              "live` takes a free one if it is taken).")
    serve_max_bytes: int = setting(25 * 1024 * 1024, "STT_SERVE_MAX_BYTES",
                                   "Largest request body `stt serve` accepts (413 beyond).")
    serve_api_key: str = setting("", "STT_SERVE_API_KEY",
                                 "If set, `stt serve` and the Realtime websocket require "
                                 "'Authorization: Bearer KEY' (a browser: the subprotocol "
                                 "'openai-insecure-api-key.KEY').",
                                 secret=True)

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(0 < self.serve_port <= 65535, "serve_port", "must be a TCP port")
        need(self.serve_max_bytes >= 1024, "serve_max_bytes", "must be at least 1024 bytes")


@dataclass(frozen=True)
class OpsSettings(Area):
    area: ClassVar[str] = "ops"
    help_group: ClassVar[str] = "ops"  # its section of `stt worker --help`

    health_port: int = setting(0, "STT_HEALTH_PORT",
                               "Port for /livez, /readyz and /metrics (0 = off).")
    health_host: str = setting("0.0.0.0", "STT_HEALTH_HOST", "Address the health port binds.")
    log_level: str = setting("INFO", "STT_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR.")
    log_format: str = setting("text", "STT_LOG_FORMAT", "text or json.", choices=("text", "json"))
    otel_enabled: bool = setting(False, "OTEL_ENABLED",
                                 "OpenTelemetry traces and metrics over OTLP.")
    hyperdx_enabled: bool = setting(False, "HYPERDX_ENABLED",
                                    "Send telemetry to HyperDX (needs HYPERDX_API_KEY).")
    hyperdx_api_key: str = setting("", "HYPERDX_API_KEY", "HyperDX ingestion key.", secret=True)

    def check(self, need: Callable[[bool, str, str], None]) -> None:
        need(0 <= self.health_port <= 65535, "health_port", "must be a TCP port or 0")
        need(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
             "must be DEBUG, INFO, WARNING or ERROR")
        need(not (self.hyperdx_enabled and not self.hyperdx_api_key), "hyperdx_api_key",
             "HYPERDX_ENABLED is set but HYPERDX_API_KEY is empty")
