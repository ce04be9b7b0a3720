"""The ``stt`` command: worker, stream, tail, demo, live, doctor, convert (and serve and
realtime, with the serve extra). One module per command group; :mod:`stt.cli.wiring` is the
one place the worker is put together."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from stt import config
from stt.cli.client import cmd_stream, cmd_tail
from stt.cli.demo import cmd_demo, cmd_live
from stt.cli.doctor import cmd_doctor
from stt.cli.wiring import SAMPLE
from stt.cli.wiring import build_telemetry as build_telemetry
from stt.cli.wiring import check_http_engine as check_http_engine
from stt.cli.worker import cmd_worker
from stt.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stt", description=(
        "Streaming speech-to-text for voice assistants: worker, stream, tail, demo, live, "
        "doctor, convert (and serve and realtime, with the serve extra)."))
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

    from stt.engines.convert import add_parser as add_convert

    add_convert(sub)
    if importlib.util.find_spec("stt.api.serve") is not None:
        from stt.api.realtime import add_parser as add_realtime
        from stt.api.serve import add_parser as add_serve

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
