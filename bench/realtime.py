"""What the Realtime websocket adds: end of speech to ``completed`` through the bridge, against
the same session's finals straight off NATS, side by side in one run.

    python -m bench.realtime                 # 3 passes of the bundled sample at real time
    python -m bench.realtime --passes 5

A real nats-server, the worker (``stt worker``, default engine) and the bridge (``stt
realtime``) each in its own process. Each pass streams the sample (5 sentences, 30.7 s, and
1.5 s of silence) at real time through the official ``openai`` client's Realtime connection (24 kHz PCM, server turn
detection) while this process also subscribes to that session's NATS output subject. Per
utterance, from the moment the audio holding its end of speech was sent (the sample's phrase
table, ``bench.replicas.PHRASES``):

* ``nats``: the worker's final arriving on ``ai.voice.transcription.{id}``;
* ``websocket``: the ``conversation.item.input_audio_transcription.completed`` event;
* ``bridge``: the difference, utterance by utterance (what NATS -> bridge -> websocket adds).

And the same audio as a session of its own straight over NATS (``stt.transport.client.stream_audio``, no
bridge; before or after the websocket's, alternately), end of speech to its final: what a
front-end on NATS sees.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np
import soundfile
import soxr

from stt.core.audio import SAMPLE_RATE, to_pcm16
from stt.core.textnorm import wer
from stt.transport.connection import subscribed
from stt.transport.nats_server import NatsServer, free_port
from stt.wire import protocol
from stt.wire.protocol import Subjects

from .common import DEFAULT_CORPUS, ROOT, corpus_rows, header, percentile, speech_bounds
from .replicas import PHRASES, SAMPLE

RATE = 24000  # the Realtime API's audio/pcm
TAIL_S = 1.5


def sample_pcm(rate: int = RATE, start_s: float = 0.0, end_s: float | None = None) -> bytes:
    """The bundled sample (or a stretch of it) as mono 16-bit PCM at ``rate``."""
    data, sr = soundfile.read(str(SAMPLE), dtype="float32")
    data = data[int(start_s * sr): None if end_s is None else int(end_s * sr)]
    return to_pcm16(np.asarray(soxr.resample(data, sr, rate) if sr != rate else data,
                               dtype=np.float32))


async def send_pcm(conn: Any, pcm: bytes, rate: int = RATE, *, speed: float = 1.0,
                   chunk_ms: int = 40, width: int = 2,
                   on_sent: Callable[[float], None] | None = None) -> None:
    """``input_audio_buffer.append`` the audio on an absolute real-time schedule (``speed`` times
    real time, 0 = at once); ``on_sent(seconds of audio sent)`` after each append."""
    step = rate * chunk_ms // 1000 * width
    t0 = time.monotonic()
    for at in range(0, len(pcm), step):
        if speed > 0:
            delay = t0 + at / width / rate / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await conn.input_audio_buffer.append(
            audio=base64.b64encode(pcm[at:at + step]).decode("ascii"))
        if on_sent is not None:
            on_sent(min(len(pcm), at + step) / width / rate)


def _speech_ends(sent: list[tuple[float, float]]) -> list[float]:
    """When the audio of each phrase's end of speech had been sent (monotonic)."""
    return [next(t for s, t in sent if s >= end) for _, end in PHRASES]


async def websocket_pass(base_url: str, nats_url: str, pcm: bytes) -> dict[str, list[float]]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="unused", base_url=base_url, max_retries=0)
    nc = await nats.connect(nats_url)
    subjects = Subjects()
    sent: list[tuple[float, float]] = []
    finals: list[float] = []
    completed: list[float] = []
    try:
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            created = await conn.recv()
            sid = created.session.id.removeprefix("sess_")  # type: ignore[union-attr]

            async def on_final(msg: Any) -> None:
                m = protocol.unpack(msg.data)
                if m.get("type") == "transcript" and m.get("is_final"):
                    finals.append(time.monotonic())

            await nc.subscribe(subjects.output(sid), cb=on_final)
            await subscribed(nc)
            sender = asyncio.create_task(send_pcm(
                conn, pcm, on_sent=lambda s: sent.append((s, time.monotonic()))))
            async for event in conn:
                if event.type == "conversation.item.input_audio_transcription.completed":
                    completed.append(time.monotonic())
                    if len(completed) == len(PHRASES):
                        break
            await sender
    finally:
        await nc.close()
    ends = _speech_ends(sent)
    return {"nats": [f - e for f, e in zip(finals, ends, strict=False)],
            "websocket": [c - e for c, e in zip(completed, ends, strict=False)],
            "bridge": [c - f for c, f in zip(completed, finals, strict=False)]}


async def nats_pass(nats_url: str, pcm: bytes) -> list[float]:
    from stt.transport.client import stream_audio

    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    nc = await nats.connect(nats_url)
    try:
        result = await stream_audio(nc, samples, RATE, session_id=uuid.uuid4().hex)
    finally:
        await nc.close()
    arrivals = [a for m, a in zip(result.messages, result.arrivals, strict=True)
                if m.get("type") == "transcript" and m.get("is_final")]
    # stream_audio's 40 ms chunks leave on the same absolute schedule as send_pcm's appends:
    # the chunk holding the end of speech is sent when its first sample is due
    step = RATE * 40 // 1000
    ends = [result.started_at + (end * RATE // step) * step / RATE for _, end in PHRASES]
    return [a - e for a, e in zip(arrivals, ends, strict=False)]


# --- held-out recordings --------------------------------------------------------------------

COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


@dataclass
class ClipRun:
    """One recording through the websocket, beside the same session's finals off NATS."""

    completed: list[str] = field(default_factory=list)  # the transcripts, in order
    finals: list[str] = field(default_factory=list)     # the worker's finals for that session
    in_order: bool = True      # every item: speech_started first, then stopped, committed, completed
    delta_before_end: bool = False  # a delta arrived before the audio's end of speech was sent
    errors: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(t for t in self.completed if t)


def clip_pcm(path: Path, rate: int = RATE, tail_s: float = TAIL_S) -> tuple[bytes, float]:
    """A recording as mono 16-bit PCM at ``rate`` with ``tail_s`` of silence after it (a live
    microphone stays open), and where its speech ends (seconds)."""
    data, sr = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32)
    at16k = mono if sr == SAMPLE_RATE else soxr.resample(mono, sr, SAMPLE_RATE)
    _, speech_end = speech_bounds(np.asarray(at16k, dtype=np.float32))
    audio = np.asarray(soxr.resample(mono, sr, rate) if sr != rate else mono, dtype=np.float32)
    return to_pcm16(np.concatenate([audio, np.zeros(int(tail_s * rate), np.float32)])), speech_end


async def clip_through_websocket(client: Any, nc: Any, pcm: bytes, speech_end_s: float, *,
                                 speed: float = 1.0, timeout_s: float = 60.0) -> ClipRun:
    """Stream one recording through a new Realtime connection (server turn detection) at
    ``speed`` times real time; wait until every item it announced is completed."""
    run = ClipRun()
    sent: list[tuple[float, float]] = []
    first_delta: list[float] = []
    async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        created = await conn.recv()
        sid = created.session.id.removeprefix("sess_")

        async def on_final(msg: Any) -> None:
            m = protocol.unpack(msg.data)
            if m.get("type") == "transcript" and m.get("is_final"):
                run.finals.append(m["transcript"])

        sub = await nc.subscribe(Subjects().output(sid), cb=on_final)
        await subscribed(nc)
        sender = asyncio.create_task(send_pcm(
            conn, pcm, speed=speed, on_sent=lambda s: sent.append((s, time.monotonic()))))
        order: dict[str, list[str]] = {}

        def done() -> bool:  # all audio sent, every announced item completed, NATS agrees
            return (sender.done() and bool(order)
                    and all(o[-1] == COMPLETED for o in order.values())
                    and len(run.finals) == len(run.completed))

        async def read() -> None:
            while not done():
                try:  # the last event may come before the last audio is sent: look again
                    event = await asyncio.wait_for(conn.recv(), 0.25)
                except TimeoutError:
                    continue
                item = getattr(event, "item_id", None)
                if item is not None:
                    order.setdefault(item, []).append(event.type)
                if event.type == "error":
                    run.errors.append(event.error.message)
                elif event.type == DELTA and not first_delta:
                    first_delta.append(time.monotonic())
                elif event.type == COMPLETED:
                    run.completed.append(event.transcript)

        try:
            await asyncio.wait_for(read(), timeout_s)
        finally:
            sender.cancel()
            await sub.unsubscribe()
    end_sent = next((t for s, t in sent if s >= speech_end_s), math.inf)
    run.delta_before_end = bool(first_delta) and first_delta[0] < end_sent
    run.in_order = all(o[0] == "input_audio_buffer.speech_started" and o[-3:] == [
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", COMPLETED]
        for o in order.values())
    return run


async def held_out(base_url: str, nats_url: str, limit: int, corpus: Path) -> None:
    """The corpus's recordings (not the bundled sample) through the official client at real
    time, each then as a session of its own straight over NATS."""
    from openai import AsyncOpenAI

    from stt.transport.client import stream_audio

    client = AsyncOpenAI(api_key="unused", base_url=base_url, max_retries=0)
    nc = await nats.connect(nats_url)
    pairs_ws, pairs_nats, pairs_same = [], [], []
    utterances = completed_ok = deltas_early = in_order = 0
    try:
        rows = corpus_rows(corpus)
        for rel, reference in rows[::max(1, len(rows) // limit)][:limit]:  # spread, both speakers
            pcm, speech_end = clip_pcm(corpus / rel)
            run = await clip_through_websocket(client, nc, pcm, speech_end)
            samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            direct = await stream_audio(nc, samples, RATE)
            pairs_ws.append((reference, run.text))
            pairs_nats.append((reference, direct.text))
            pairs_same.append((direct.text, run.text))
            utterances += len(run.completed)
            completed_ok += run.completed == run.finals
            deltas_early += run.delta_before_end
            in_order += run.in_order
            print(f"{rel}: {len(run.completed)} completed, delta before end of speech "
                  f"{'yes' if run.delta_before_end else 'no'}, WER websocket "
                  f"{wer([pairs_ws[-1]]):.3f} / NATS {wer([pairs_nats[-1]]):.3f}"
                  + (f", errors {run.errors}" if run.errors else ""), flush=True)
    finally:
        await nc.close()
    n = len(pairs_ws)
    print()
    print(f"| {n} held-out recordings at real time | |")
    print("| --- | --- |")
    print(f"| `completed` events (one per worker final, same text) | {utterances} "
          f"({completed_ok} of {n} recordings match NATS exactly) |")
    print(f"| items in order (started, stopped, committed, completed) | {in_order} of {n} |")
    print(f"| a delta before the end of speech was sent | {deltas_early} of {n} |")
    print(f"| WER through the websocket | {wer(pairs_ws):.3f} |")
    print(f"| WER of the same audio as its own NATS session | {wer(pairs_nats):.3f} |")
    print(f"| websocket against NATS (difference in words) | {wer(pairs_same):.3f} |")


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "stt", *args], cwd=ROOT, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


async def _wait_ready(nats_url: str, health: str, procs: list[subprocess.Popen[bytes]],
                      timeout_s: float = 120.0) -> None:
    """The worker answers an ``end`` for an unknown session; the bridge's /health says NATS."""
    import httpx

    nc = await nats.connect(nats_url)
    subjects, sid = Subjects(), "ready-" + uuid.uuid4().hex[:8]
    answered = asyncio.Event()

    async def on(msg: Any) -> None:
        answered.set()

    await nc.subscribe(subjects.output(sid), cb=on)
    deadline = time.monotonic() + timeout_s
    try:
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("the worker or the bridge exited; see their logs")
                await nc.publish(subjects.input(sid), protocol.pack({"type": "end"}))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), 0.5)
                with contextlib.suppress(httpx.HTTPError):
                    if answered.is_set() and (await http.get(health)).json().get("nats"):
                        return
        raise RuntimeError(f"not ready within {timeout_s:.0f} s")
    finally:
        await nc.close()


def _list(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return " ".join(f"{v * scale:.{digits}f}" for v in values)


def row(name: str, values: list[float], scale: float = 1.0, unit: str = "s") -> str:
    p50, p95 = percentile(values, 50), percentile(values, 95)
    fmt = (lambda v: f"{v * scale:.1f} {unit}") if unit == "ms" else (lambda v: f"{v:.2f} s")
    if p50 is None or p95 is None:
        return f"| {name} | 0 | - | - | - |"
    return f"| {name} | {len(values)} | {fmt(p50)} | {fmt(p95)} | {fmt(max(values))} |"


async def run(passes: int, corpus: Path | None = None, limit: int = 0) -> None:
    # 1.5 s of silence after the last sentence, as a live microphone has: every utterance ends
    # on the endpoint, in both passes (the NATS pass's `end` would otherwise finalize the last
    # one early, while the websocket, kept open, waits for STT_AUDIO_GAP_TIMEOUT)
    pcm = sample_pcm() + bytes(2 * int(TAIL_S * RATE))
    tmp = Path(tempfile.mkdtemp(prefix="stt-bench-realtime-"))
    with NatsServer() as server:
        port = free_port()
        env = {**os.environ, "NATS_URL": server.url, "STT_LOG_FORMAT": "json",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        procs = [_spawn(["worker"], tmp / "worker.log", env),
                 _spawn(["realtime", "--port", str(port)], tmp / "bridge.log", env)]
        try:
            await _wait_ready(server.url, f"http://127.0.0.1:{port}/health", procs)
            if corpus is not None:
                await held_out(f"http://127.0.0.1:{port}/v1", server.url, limit, corpus)
                return
            got: dict[str, list[float]] = {"nats": [], "websocket": [], "bridge": [],
                                           "direct": []}
            for i in range(passes):  # which goes first alternates
                direct = await nats_pass(server.url, pcm) if i % 2 else []
                ws = await websocket_pass(f"http://127.0.0.1:{port}/v1", server.url, pcm)
                direct = direct or await nats_pass(server.url, pcm)
                for k, v in ws.items():
                    got[k] += v
                got["direct"] += direct
                print(f"pass {i + 1}/{passes}: final over NATS, the websocket's session "
                      f"{_list(ws['nats'])} s; its own session {_list(direct)} s; bridge added "
                      f"{_list(ws['bridge'], 1000, 1)} ms", flush=True)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
    if corpus is not None:
        print(f"\nlogs: {tmp}")
        return
    print()
    print("| end of speech to ... | utterances | p50 | p95 | max |")
    print("| --- | --- | --- | --- | --- |")
    print(row("final over NATS, its own session (no bridge)", got["direct"]))
    print(row("final over NATS, the websocket's session", got["nats"]))
    print(row("`completed` through the websocket", got["websocket"]))
    print(row("bridge: `completed` minus the same final on NATS", got["bridge"], 1000, "ms"))
    print(f"\nlogs: {tmp}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.realtime",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--corpus", type=Path, nargs="?", const=DEFAULT_CORPUS, default=None,
                        help="stream the corpus's held-out recordings instead (default corpus: "
                             f"{DEFAULT_CORPUS}): WER, completed events, deltas before the end")
    parser.add_argument("--limit", type=int, default=20, help="recordings with --corpus")
    args = parser.parse_args(argv)
    print(header("python -m bench.realtime " + " ".join(argv or sys.argv[1:]), load=True),
          flush=True)
    if args.corpus is not None:
        asyncio.run(run(0, args.corpus, args.limit))
        return 0
    print(f"sample: {SAMPLE.name}, {len(PHRASES)} utterances per pass, {args.passes} passes at "
          f"real time, 24 kHz PCM in 40 ms appends", flush=True)
    asyncio.run(run(args.passes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
