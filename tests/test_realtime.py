"""The OpenAI Realtime transcription websocket, spoken by the official ``openai`` client (its
websocket extra), through the bridge onto a real nats-server and a worker on the default engine
(faster-whisper, embedded tiny.en). Audio is sent at 3x real time to keep the suite short; the
worker's segmentation runs on audio time, so the utterances are the same."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import pytest
import soxr

pytest.importorskip("websockets")
pytest.importorskip("openai")

from audio_util import encode
from conftest import ROOT, SAMPLE, SAMPLE_TEXT, corpus_clips, eventually, make_settings
from realtime_util import bridge_server, openai_client

from bench.realtime import (
    COMPLETED,
    DELTA,
    PHRASES,
    RATE,
    clip_pcm,
    clip_through_websocket,
    sample_pcm,
    send_pcm,
)
from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.textnorm import wer
from stt.transport.client import stream_audio
from stt.transport.connection import subscribed
from stt.wire import protocol
from stt.wire.protocol import Subjects

INTENT = {"intent": "transcription"}
SPEED = 3.0


async def collect(conn: Any, until: int, timeout_s: float = 60.0) -> list[tuple[float, Any]]:
    """Server events with their arrival time, until ``until`` completed events."""
    events: list[tuple[float, Any]] = []

    async def read() -> None:
        async for event in conn:
            events.append((time.monotonic(), event))
            if sum(e.type == COMPLETED for _, e in events) >= until:
                return

    await asyncio.wait_for(read(), timeout_s)
    return events


async def test_the_official_client_gets_deltas_and_the_workers_finals(
        nats_server: Any, worker_factory: Any, nc: Any) -> None:
    worker = await worker_factory()
    pcm = sample_pcm()
    finals_on_nats: list[str] = []
    async with bridge_server(make_settings(nats_server.url), worker.status) as (url, _bridge):
        async with openai_client(url).realtime.connect(extra_query=INTENT) as conn:
            created = await conn.recv()
            assert created.type == "session.created"
            assert created.session.type == "transcription"
            sid = created.session.id.removeprefix("sess_")

            async def on_final(msg: Any) -> None:  # the same session, straight off NATS
                m = protocol.unpack(msg.data)
                if m["type"] == "transcript" and m["is_final"]:
                    finals_on_nats.append(m["transcript"])

            await nc.subscribe(Subjects().output(sid), cb=on_final)
            await subscribed(nc)
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": {"model": "gpt-4o-transcribe", "language": "en"},
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
            sent: list[tuple[float, float]] = []
            # the same audio over NATS as its own session, at the same time
            samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            direct = asyncio.create_task(stream_audio(nc, samples, RATE, speed=SPEED))
            sender = asyncio.create_task(send_pcm(
                conn, pcm, speed=SPEED, on_sent=lambda s: sent.append((s, time.monotonic()))))
            events = await collect(conn, until=len(PHRASES))
            await sender
            over_nats = await direct
    kinds = [e.type for _, e in events]
    assert kinds[0] == "session.updated"
    assert events[0][1].session.audio.input.format.rate == 24000
    completed = [e for _, e in events if e.type == COMPLETED]
    text = " ".join(e.transcript for e in completed)
    # one completed per utterance, each item announced, stopped and committed before it
    assert len(completed) == len(PHRASES) == len(finals_on_nats), kinds
    for e in completed:
        mine = [k for k, (_, x) in enumerate(events) if getattr(x, "item_id", None) == e.item_id]
        order = [events[k][1].type for k in mine]
        assert order[0] == "input_audio_buffer.speech_started", order
        assert order[-3:] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                              COMPLETED], order
    # the websocket says what the worker said: its session's finals, and the same audio over NATS
    assert [e.transcript for e in completed] == finals_on_nats
    assert wer([(over_nats.text, text)]) <= 0.02, (over_nats.text, text)
    assert wer([(" ".join(SAMPLE_TEXT), text)]) < 0.2, text
    # deltas: the new text only, before the end of speech, never contradicting what was said
    deltas = [(t, e) for t, e in events if e.type == DELTA]
    first_end_sent = next(t for s, t in sent if s >= PHRASES[0][1])
    assert deltas and deltas[0][0] < first_end_sent
    early = {e.item_id for t, e in deltas if t < next(
        t2 for t2, x in events if x.type == "input_audio_buffer.speech_stopped"
        and x.item_id == e.item_id)}
    assert len(early) >= 3, early
    assert all(e.delta for _, e in deltas)


async def test_held_out_recordings_through_the_official_client(
        nats_server: Any, worker_factory: Any, nc: Any, corpus: Any) -> None:
    """Recordings of the corpus (not the sample the tests are written around), each through
    its own connection and then as its own session over NATS; ``python -m bench.realtime
    --corpus`` runs 20 at real time."""
    worker = await worker_factory()
    clips = corpus_clips(corpus)[1::23]  # three, spread over the corpus's speakers
    assert len(clips) == 3
    ws, direct = [], []
    async with bridge_server(make_settings(nats_server.url), worker.status) as (url, _bridge):
        client = openai_client(url)
        for path, reference in clips:
            pcm, speech_end = clip_pcm(path)
            run = await clip_through_websocket(client, nc, pcm, speech_end, speed=SPEED)
            # one completed per utterance: each is one of the worker's finals, in order
            assert run.completed and run.completed == run.finals, run
            assert run.in_order and not run.errors, run
            # deltas before the end of speech (at 3x real time a short clip is over first)
            assert run.delta_before_end or speech_end < 6, path
            samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
            over_nats = await stream_audio(nc, samples, RATE, speed=SPEED)
            ws.append((reference, run.text))
            direct.append((reference, over_nats.text))
    assert wer(ws) <= wer(direct) + 0.02, (ws, direct)
    assert wer(ws) < 0.2, ws


async def test_bad_events_get_error_events_and_the_connection_goes_on(
        nats_server: Any, worker_factory: Any) -> None:
    worker = await worker_factory()
    async with bridge_server(make_settings(nats_server.url), worker.status) as (url, _bridge):
        async with openai_client(url).realtime.connect(extra_query=INTENT) as conn:
            await conn.recv()  # session.created
            bad: list[tuple[Any, str, str | None]] = [
                ("not json", "invalid_json", None),
                ({"event_id": "e1"}, "invalid_event", None),
                ({"type": "response.create"}, "invalid_value", "type"),
                ({"type": "input_audio_buffer.append", "audio": "@@not base64@@"},
                 "invalid_value", "audio"),
                ({"type": "input_audio_buffer.append"}, "missing_required_parameter", "audio"),
                ({"type": "session.update", "session": {"type": "transcription", "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": 44100}}}}},
                 "invalid_value", "session.audio.input.format.rate"),
                ({"type": "session.update", "session": {"type": "realtime"}},
                 "invalid_value", "session.type"),
                ({"type": "input_audio_buffer.commit", "event_id": "e2"},
                 "input_audio_buffer_commit_empty", None)]
            for event, code, param in bad:
                await conn.send_raw(event if isinstance(event, str) else json.dumps(event))
                err = await asyncio.wait_for(conn.recv(), 10)
                assert err.type == "error", err
                assert err.error.type == "invalid_request_error"
                assert (err.error.code, err.error.param) == (code, param), err
                if isinstance(event, dict) and "event_id" in event:
                    assert err.error.event_id == event["event_id"]
            # nothing else was affected: the first sentence still comes back whole
            await send_pcm(conn, sample_pcm(end_s=PHRASES[0][1] + 1.2), speed=SPEED)
            events = await collect(conn, until=1)
    text = next(e.transcript for _, e in events if e.type == COMPLETED)
    assert wer([(SAMPLE_TEXT[0], text)]) < 0.2, text
    assert not [e for _, e in events if e.type == "error"]


async def test_clients_that_disconnect_mid_utterance_leave_no_session(
        nats_server: Any, worker_factory: Any) -> None:
    worker = await worker_factory()
    async with bridge_server(make_settings(nats_server.url), worker.status) as (url, bridge):
        client = openai_client(url)
        speech = sample_pcm(end_s=1.5)  # mid-sentence

        async def drop() -> None:
            conn = await client.realtime.connect(extra_query=INTENT).enter()
            await conn.recv()
            await send_pcm(conn, speech, speed=0)
            await conn.close()  # no commit, no goodbye

        # each leaves the worker a final to decode on the full window (0.5 s of CPU here)
        await asyncio.gather(*(drop() for _ in range(20)))
        await eventually(lambda: worker.status().sessions_started >= 20, 30)
        await eventually(lambda: worker.status().sessions == 0 and bridge.open == 0, 60)


async def test_manual_commits_one_item_per_commit_and_g711(
        nats_server: Any, worker_factory: Any) -> None:
    """turn_detection null: the worker still cuts at silences, the commit makes the item."""
    worker = await worker_factory()
    two = sample_pcm(start_s=PHRASES[1][0] - 0.3, end_s=PHRASES[2][1] + 0.3)  # two sentences
    async with bridge_server(make_settings(nats_server.url), worker.status) as (url, _bridge):
        async with openai_client(url).realtime.connect(extra_query=INTENT) as conn:
            await conn.recv()
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "turn_detection": None}}})
            updated = await conn.recv()
            assert updated.session.audio.input.turn_detection is None
            await send_pcm(conn, two, speed=SPEED)
            await conn.input_audio_buffer.commit()
            events = await collect(conn, until=1)
            # G.711 mu-law at 8 kHz, the API's audio/pcmu, in the same session
            await conn.session.update(session={"type": "transcription", "audio": {"input": {
                "format": {"type": "audio/pcmu"}}}})
            sentence = soxr.resample(load_16k_mono(str(SAMPLE))[
                int((PHRASES[1][0] - 0.3) * SAMPLE_RATE): int((PHRASES[1][1] + 0.3) * SAMPLE_RATE)],
                SAMPLE_RATE, 8000)
            await send_pcm(conn, encode(sentence, "mulaw"), 8000, speed=SPEED, width=1)
            await conn.input_audio_buffer.commit()
            events2 = await collect(conn, until=1)
    kinds = [e.type for _, e in events]
    assert kinds.count("input_audio_buffer.committed") == 1 and kinds.count(COMPLETED) == 1
    assert "input_audio_buffer.speech_started" not in kinds  # no server VAD events
    committed = next(e for _, e in events if e.type == "input_audio_buffer.committed")
    completed = next(e for _, e in events if e.type == COMPLETED)
    assert committed.item_id == completed.item_id
    assert wer([(SAMPLE_TEXT[1] + " " + SAMPLE_TEXT[2], completed.transcript)]) < 0.25, (
        completed.transcript)
    later = next(e for _, e in events2 if e.type == COMPLETED)
    assert wer([(SAMPLE_TEXT[1], later.transcript)]) < 0.3, later.transcript


async def test_the_api_key_is_checked_when_one_is_set(nats_server: Any) -> None:
    import websockets

    settings = make_settings(nats_server.url, serve_api_key="s3cret")
    async with bridge_server(settings) as (url, _bridge):
        ws_url = url.replace("http", "ws") + "/v1/realtime?intent=transcription"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url):
                pass
        assert refused.value.response.status_code == 401
        assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
        async with openai_client(url, "s3cret").realtime.connect(extra_query=INTENT) as conn:
            assert (await conn.recv()).type == "session.created"
        # a browser cannot set headers: the key as OpenAI's subprotocol
        async with websockets.connect(ws_url, subprotocols=[
                "realtime", "openai-insecure-api-key.s3cret"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"


def test_stt_live_starts_everything_and_prints_the_url() -> None:
    """The README's one command: its own nats-server, a worker, the server; the URL to open."""
    proc = subprocess.Popen([sys.executable, "-m", "stt", "live", "--port", "0"], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(x.startswith("open ") for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        found = re.search(r"^open (http://127\.0\.0\.1:\d+/)", "".join(lines), re.M)
        assert found, lines
        health = httpx.get(found.group(1) + "health", timeout=5).json()
        assert health == {"status": "ok", "nats": True, "websockets": 0, "worker_sessions": 0}
        page = httpx.get(found.group(1), timeout=5)
        assert page.status_code == 200 and "Start microphone" in page.text
        assert httpx.get(found.group(1) + "mic-worklet.js", timeout=5).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
