"""Shared fixtures: a real nats-server per test, an in-process worker, the corpus."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import nats
import pytest

from stt.cli.wiring import build_worker
from stt.config import Settings
from stt.core.textnorm import normalize
from stt.engines.base import Engine
from stt.transport.nats_server import NatsServer
from stt.transport.worker import Worker
from stt.wire import protocol

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "stt" / "data" / "sample.flac"
SAMPLE_TEXT = (ROOT / "stt" / "data" / "sample.txt").read_text().split("\n")
CORPUS = Path(os.environ.get("STT_CORPUS", ROOT.parent / "shared" / "corpus"))


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
def corpus() -> Path:
    if not (CORPUS / "references.tsv").exists():
        pytest.skip(f"corpus not available at {CORPUS}")
    return CORPUS


def corpus_clips(corpus: Path) -> list[tuple[Path, str]]:
    rows = (corpus / "references.tsv").read_text().splitlines()[1:]
    return [(corpus / p, ref) for p, ref in (r.split("\t", 1) for r in rows if r.strip())]


def make_settings(nats_url: str, **overrides: Any) -> Settings:
    # Silence endpointing unless a test asks for the model: most tests stream faster than real
    # time, and the end-of-turn decision waits on wall-clock decodes (tests/test_turn.py and
    # the benchmarks run the model at real time).
    values: dict[str, Any] = {"nats_url": nats_url, "engine": "faster-whisper", "engine_workers": 1,
                              "drain_timeout_s": 10.0, "endpointing": "silence"}
    values.update(overrides)
    return Settings.from_env(environ={}, overrides=values)


WorkerFactory = Callable[..., Any]


def words_of(finals: list[str]) -> list[list[str]]:
    """Each final's words (stt.core.textnorm.normalize: no case, no punctuation): what "word for
    word" compares. A comma is not a word, and tiny.en places one differently when a segment's
    edge moves by a frame or the batch it was decoded in differs."""
    return [normalize(f).split() for f in finals]


@pytest.fixture
async def worker_factory(nats_server: NatsServer) -> AsyncIterator[WorkerFactory]:
    """``await make(engine=None, **settings)`` starts a worker on the test's nats-server."""
    started: list[Worker] = []

    async def make(engine: Engine | None = None, **overrides: Any) -> Worker:
        settings = make_settings(nats_server.url, **overrides)
        worker = build_worker(settings, engine)
        await worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        await worker.shutdown()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Any]:
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    yield client
    with contextlib.suppress(Exception):
        await client.close()


async def speak_live(nc: Any, pcm: Mapping[str, bytes],
                     at_second: Callable[[float], Awaitable[None]] | None = None,
                     chunk_s: float = 0.04) -> None:
    """Sessions speaking as the seed's front-ends do: ``start`` (16 kHz), then each session's
    16-bit PCM in ``chunk_s`` chunks at real time (``audio_b64`` and a capture ``timestamp``, no
    ``seq``), every session each tick, then ``end``. ``at_second(t)`` runs after each tick's
    chunks, ``t`` seconds in (kill a replica, start one)."""
    for sid in pcm:
        await nc.publish(f"ai.voice.stream.{sid}",
                         protocol.pack({"type": "start", "sample_rate": 16000}))
    step = int(chunk_s * 16000) * 2
    t0, captured = time.monotonic(), time.time()
    for tick, at in enumerate(range(0, max(map(len, pcm.values()), default=0), step)):
        await asyncio.sleep(max(0.0, t0 + tick * chunk_s - time.monotonic()))
        for sid, audio in pcm.items():
            if at < len(audio):
                await nc.publish(f"ai.voice.stream.{sid}", protocol.pack({
                    "type": "chunk", "timestamp": captured + tick * chunk_s,
                    "audio_b64": base64.b64encode(audio[at:at + step]).decode()}))
        if at_second is not None:
            await at_second(tick * chunk_s)
    for sid in pcm:
        await nc.publish(f"ai.voice.stream.{sid}", protocol.pack({"type": "end"}))


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def loop_gaps(work: Awaitable[Any]) -> tuple[list[float], float]:
    """Run ``work`` beside a 5 ms ticker: the sorted gaps between ticks, and the seconds it
    took. A loop blocked by inference shows a gap as long as a model pass."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await work
    elapsed = time.perf_counter() - t0
    stop.set()
    await task
    return sorted(gaps), elapsed
