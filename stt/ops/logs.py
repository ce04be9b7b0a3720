"""Structured logs: ``text`` for people, ``json`` (one object per line) for collectors.

Pass context as ``extra={"session_id": ..., ...}``; every extra field is printed. Trace ids
are added by the telemetry module when tracing is on.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# uvicorn adds ``color_message`` (its message with ANSI colours) to every record: the same text
# as ``msg``, with escape codes that a collector shows as garbage.
_DROPPED = {"color_message"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(value: object) -> object:
    return _ANSI.sub("", value) if isinstance(value, str) else value


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: _clean(v) for k, v in record.__dict__.items()
            if k not in _STANDARD and k not in _DROPPED and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _clean(record.getMessage()),
        }
        out.update(_extras(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: {_clean(record.getMessage())}"
        if fields:
            line += "  " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
