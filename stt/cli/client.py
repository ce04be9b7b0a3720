"""``stt stream`` and ``stt tail``: clients of the NATS subjects, connected as the worker is."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from typing import Any

from stt import config
from stt.cli.wiring import stop_on_signals
from stt.config import Settings
from stt.config.nats import NatsSettings
from stt.ops import logs
from stt.transport.connection import ConnectError, subscribed

CLIENT_TRIES = 3  # `stt stream`/`stt tail`: tries while NATS does not answer (0.5 + 1 s apart)


def client_settings(args: argparse.Namespace, name: str) -> Settings:
    """The worker's NATS settings (environment, then the NATS flags) for a client command:
    the same credentials, TLS files and subjects as the worker, read by the same code."""
    nats_fields = {f.name for f in dataclasses.fields(NatsSettings)}
    overrides = {k: v for k, v in config.overrides_from_args(args).items() if k in nats_fields}
    if "nats_name" not in overrides and "NATS_CLIENT_NAME" not in os.environ:
        overrides["nats_name"] = name
    return Settings.from_env(overrides=overrides)


def quiet_logs() -> None:
    """Client commands print their own one-line errors; library chatter only when asked."""
    level = os.environ.get("STT_LOG_LEVEL", "ERROR")
    logs.setup(level if level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else "ERROR")


async def connect_client(settings: Settings, stop: asyncio.Event | None = None) -> Any:
    from stt.transport.connection import connect

    return await connect(settings.nats, stop=stop, max_tries=CLIENT_TRIES, max_reconnect_attempts=3)


def printer(quiet_partials: bool = False) -> Any:
    from stt.transport.client import describe

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
    from stt.core.audio import load_file

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

    from stt.transport.client import stream_audio

    url = settings.nats.nats_url
    samples, rate = read_audio(args.file)
    subjects = settings.nats.subjects
    nc = await connect_client(settings)
    try:
        result = await stream_audio(
            nc, samples, rate, subjects=subjects, session_id=args.session_id,
            chunk_ms=args.chunk_ms, speed=args.speed, raw_bytes=args.raw,
            state=args.state, language=args.language, speaker_id=args.speaker_id,
            end_timeout_s=args.timeout, on_message=printer(args.no_partials))
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


def run_client(name: str, args: argparse.Namespace, run: Any) -> int:
    """Settings, logging and the one-line errors shared by ``stt stream`` and ``stt tail``."""
    settings = client_settings(args, f"stt-{name}")
    quiet_logs()
    try:
        return int(asyncio.run(run(args, settings)))
    except (ConnectError, CommandError) as exc:
        print(f"stt {name}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CommandError) else 1


def cmd_stream(args: argparse.Namespace) -> int:
    return run_client("stream", args, _stream)


async def _tail(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from stt.transport.client import describe
    from stt.wire import protocol

    url = settings.nats.nats_url
    subject = args.subject or settings.nats.output_subject_prefix + ".>"
    stop = asyncio.Event()
    stop_on_signals(stop)
    nc = await connect_client(settings, stop)
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
    await subscribed(nc)
    print(f"listening on {subject} at {url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    await stop.wait()
    with contextlib.suppress(Exception):
        await nc.close()
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    return run_client("tail", args, _tail)
