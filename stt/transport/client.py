"""A front-end in a box: stream audio as a live session and collect what comes back.

Used by ``stt stream``, ``stt demo``, the end-to-end tests and the benchmarks, so they all
speak the protocol the same way.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nats.aio.client import Client

from stt.core.audio import to_pcm16
from stt.transport.connection import subscribed
from stt.wire import protocol
from stt.wire.protocol import Subjects


@dataclass
class StreamResult:
    session_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # monotonic receive time per message
    started_at: float = 0.0      # monotonic time of the first chunk
    ended_at: float | None = None  # monotonic time the end message was sent

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.of_type("transcript") if m["is_final"]]

    @property
    def partials(self) -> list[dict[str, Any]]:
        return [m for m in self.of_type("transcript") if m["is_partial"]]

    @property
    def text(self) -> str:
        return " ".join(m["transcript"] for m in self.finals if m["transcript"]).strip()


class Listener:
    """Subscribes to one session's output subject and gathers its messages."""

    def __init__(self, nc: Client, subjects: Subjects, session_id: str,
                 on_message: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.nc, self.subjects, self.session_id = nc, subjects, session_id
        self.result = StreamResult(session_id)
        self.done = asyncio.Event()
        self._on_message = on_message
        self._sub: Any = None

    async def __aenter__(self) -> Listener:
        async def cb(msg: Any) -> None:
            message = protocol.unpack(msg.data)
            self.result.messages.append(message)
            self.result.arrivals.append(time.monotonic())
            if self._on_message:
                self._on_message(message)
            if message.get("type") == "end":
                self.done.set()

        self._sub = await self.nc.subscribe(self.subjects.output(self.session_id), cb=cb)
        await subscribed(self.nc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def wait_end(self, timeout_s: float) -> StreamResult:
        await asyncio.wait_for(self.done.wait(), timeout_s)
        return self.result


async def send(nc: Client, subjects: Subjects, session_id: str, message: dict[str, Any],
               headers: dict[str, str] | None = None) -> None:
    await nc.publish(subjects.input(session_id), protocol.pack(message), headers=headers)


async def stream_audio(nc: Client, samples: np.ndarray, sample_rate: int, *,
                       subjects: Subjects | None = None, session_id: str | None = None,
                       chunk_ms: int | Sequence[int] = 40, speed: float = 1.0,
                       raw_bytes: bool = False,
                       state: str = "listening", language: str | None = None,
                       speaker_id: str | None = None, send_end: bool = True,
                       end_timeout_s: float = 60.0,
                       on_message: Callable[[dict[str, Any]], None] | None = None,
                       start_extra: dict[str, Any] | None = None) -> StreamResult:
    """Publish ``samples`` (float32, (frames,) or (frames, channels)) as one live session.

    Chunks leave on an absolute schedule (``speed`` times real time; 0 = as fast as possible)
    so pacing does not drift. ``chunk_ms`` may be a sequence of sizes, used in turn (a network
    does not deliver even chunks). Returns every message received for the session.
    """
    subjects = subjects or Subjects()
    session_id = session_id or uuid.uuid4().hex[:12]
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    async with Listener(nc, subjects, session_id, on_message) as listener:
        start = {"type": "start", "session_id": session_id, "sample_rate": sample_rate,
                 "channels": channels, "state": state, "encoding": "pcm_s16le"}
        if speaker_id is not None:
            start["speaker_id"] = speaker_id
        if language is not None:
            start["language"] = language
        start.update(start_extra or {})
        await send(nc, subjects, session_id, start)
        sizes = [chunk_ms] if isinstance(chunk_ms, int) else list(chunk_ms)
        t0 = time.monotonic()
        listener.result.started_at = t0
        offset = 0
        for i in itertools.count():
            if offset >= len(samples):
                break
            step = max(1, sample_rate * sizes[i % len(sizes)] // 1000)
            if speed > 0:
                delay = t0 + (offset / sample_rate) / speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            pcm = to_pcm16(samples[offset: offset + step])
            offset += step
            chunk: dict[str, Any] = {"type": "chunk", "timestamp": time.time(), "seq": i}
            if raw_bytes:
                chunk["audio"] = pcm
            else:
                chunk["audio_b64"] = base64.b64encode(pcm).decode("ascii")
            await send(nc, subjects, session_id, chunk)
        if speed > 0:  # let the last chunk's worth of real time pass, as a microphone would
            delay = t0 + (len(samples) / sample_rate) / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        if not send_end:
            return listener.result
        await send(nc, subjects, session_id, {"type": "end"})
        listener.result.ended_at = time.monotonic()
        return await listener.wait_end(end_timeout_s)


def describe(message: dict[str, Any]) -> str:
    """One readable line for a protocol message (``stt tail``, ``stt stream``)."""
    kind = message.get("type", "?")
    sid = message.get("session_id", "?")
    seq = message.get("sequence", "-")
    if kind == "transcript":
        tag = "FINAL  " if message.get("is_final") else "partial"
        span = f"{message.get('start', 0):7.2f}-{message.get('end', 0):7.2f}s"
        turn = ""
        if message.get("is_final") and "end_of_turn" in message:
            p = message.get("turn_probability")
            turn = ("  [end of turn" + (f", p={p:.2f}]" if p is not None else "]")
                    if message["end_of_turn"] else "  [turn goes on]")
        return (f"[{sid} #{seq}] {tag} seg {message.get('segment_id')} {span}  "
                f"{message.get('transcript', '')}{turn}")
    if kind == "eager_end_of_turn":
        return (f"[{sid} #{seq}] eager end of turn seg {message.get('segment_id')} "
                f"(p={message.get('turn_probability')}, {message.get('silence')} s of silence)  "
                f"{message.get('transcript', '')}")
    if kind == "turn_resumed":
        return f"[{sid} #{seq}] turn resumed seg {message.get('segment_id')}"
    if kind == "interrupt":
        return f"[{sid} #{seq}] INTERRUPT (user started speaking at {message.get('start', '?')} s)"
    if kind == "error":
        return f"[{sid} #{seq}] ERROR {message.get('code')}: {message.get('message')}"
    if kind == "end":
        return (f"[{sid} #{seq}] END reason={message.get('reason')} audio={message.get('audio_seconds')}s "
                f"segments={message.get('segments')}")
    return f"[{sid} #{seq}] {kind} {message}"
