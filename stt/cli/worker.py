"""``stt worker``."""

from __future__ import annotations

import argparse
import asyncio

from stt import config
from stt.cli.wiring import log, run_worker, settings_from
from stt.cluster.membership import ClusterConfigError
from stt.engines.base import EngineUnavailable
from stt.ops import logs
from stt.transport.connection import ConnectError


def cmd_worker(args: argparse.Namespace, engine: str | None = None) -> int:
    settings = settings_from(args, engine=engine)
    logs.setup(settings.ops.log_level, settings.ops.log_format)
    log.info("starting worker", extra={"settings": config.settings_summary(settings)})
    try:
        return asyncio.run(run_worker(settings))
    except EngineUnavailable as exc:
        log.error("engine unavailable: %s", exc)
        return 2
    except ConnectError as exc:  # what retrying cannot fix (see stt.transport.connection)
        log.error("cannot connect to NATS: %s", exc, extra={"variable": exc.variable})
        return 1
    except ClusterConfigError as exc:  # STT_PARTITIONS against a server not set up for it
        log.error("cannot join the replicas: %s", exc)
        return 1
