"""End to end through a real nats-server: the worker as a client would see it."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from conftest import ROOT, SAMPLE, eventually

from stt.core.audio import load_16k_mono, to_pcm16
from stt.transport.client import Listener, send, stream_audio
from stt.transport.connection import subscribed
from stt.transport.nats_server import NatsServer, free_port
from stt.wire import protocol
from stt.wire.protocol import Subjects

SR = 16000
SPEECH = load_16k_mono(str(SAMPLE))
FIRST_TWO = SPEECH[: int(12.8 * SR)]  # two sentences and the pause after them
SENTENCE_2 = SPEECH[int(8.6 * SR): int(12.2 * SR)]
SUBJECTS = Subjects()
SEED_FIELDS = {"session_id", "transcript", "sequence", "is_partial", "is_final", "timestamp",
               "speaker_id", "has_voice_activity", "state"}


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def check_sequences(messages: list[dict[str, Any]]) -> None:
    """A session's messages are numbered 1, 2, 3...; errors about messages that arrived while
    no session existed (before its start) carry sequence 0."""
    numbered = [m["sequence"] for m in messages if m["sequence"] != 0]
    assert numbered == list(range(1, len(numbered) + 1))
    assert all(m["type"] == "error" for m in messages if m["sequence"] == 0)


async def test_full_session_partials_while_speaking_then_finals(worker_factory: Any,
                                                                 nc: Any) -> None:
    worker = await worker_factory(partial_interval_s=0.5, engine_workers=2)
    # the scheduler plans for the started engine's passes (two side by side), one kept for finals
    assert (worker.engine.slots, worker.scheduler.slots, worker.scheduler.reserve) == (2, 2, 1)
    result = await stream_audio(nc, FIRST_TWO, SR, session_id="full", speed=2.0,
                                speaker_id="alice", raw_bytes=False)
    finals, partials = result.finals, result.partials
    assert len(finals) == 2, result.messages
    assert partials, "no partial while speaking"
    for m in finals + partials:
        assert SEED_FIELDS <= m.keys()
        assert m["session_id"] == "full" and m["speaker_id"] == "alice"
        assert m["has_voice_activity"] is True and m["state"] == "listening"
    # the first partial arrived before its utterance was over (sentence 1 ends at ~7.3 s of audio)
    first_partial_at = result.arrivals[result.messages.index(partials[0])] - result.started_at
    assert first_partial_at < 7.3 / 2.0
    assert partials[0]["segment_id"] == finals[0]["segment_id"]
    assert "john" in finals[0]["transcript"].lower() and "young man" in finals[1]["transcript"].lower()
    end = result.messages[-1]
    assert end["type"] == "end" and end["reason"] == "end" and end["segments"] == 2
    check_sequences(result.messages)


async def test_raw_audio_bytes_and_22khz_stereo_input(worker_factory: Any, nc: Any) -> None:
    import soxr

    await worker_factory(partial_interval_s=0)
    at22k = soxr.resample(SENTENCE_2, SR, 22050).astype(np.float32)
    stereo = np.stack([at22k, at22k], axis=1)
    result = await stream_audio(nc, stereo, 22050, session_id="raw", speed=0, raw_bytes=True)
    assert "young man" in result.text


async def test_barge_in_interrupts_and_keeps_the_words(worker_factory: Any, nc: Any) -> None:
    await worker_factory(partial_interval_s=0, interrupt_min_speech_ms=300)
    audio = np.concatenate([silence(1.0), SENTENCE_2, silence(1.0)])
    listening = await stream_audio(nc, audio, SR, session_id="calm", speed=0)
    barge = await stream_audio(nc, audio, SR, session_id="barge", speed=4.0, state="responding",
                               speaker_id="bob")
    kinds = [m["type"] for m in barge.messages]
    assert kinds[0] == "interrupt", kinds
    interrupt = barge.messages[0]
    assert {"session_id", "type", "timestamp", "speaker_id"} <= interrupt.keys()
    assert interrupt["speaker_id"] == "bob"
    # detected within 0.5 s (of audio) after the speech began at 1.0 s
    detected_at = (barge.arrivals[0] - barge.started_at) * 4.0
    assert detected_at < 1.0 + 0.5 + 0.2
    # the words of the interruption are transcribed as well as when listening
    assert barge.text == listening.text and "young man" in barge.text
    assert barge.finals[0]["state"] == "listening"


async def test_state_change_ends_the_utterance_and_half_duplex_drops_responding_audio(
        worker_factory: Any, nc: Any) -> None:
    await worker_factory(partial_interval_s=0, enable_interrupt_detection=False)
    sid = "turns"
    async with Listener(nc, SUBJECTS, sid) as listener:
        await send(nc, SUBJECTS, sid, {"type": "start", "session_id": sid})
        for i in range(0, len(SENTENCE_2), 640):
            await send(nc, SUBJECTS, sid, {"type": "chunk", "audio": to_pcm16(SENTENCE_2[i:i + 640])})
        await send(nc, SUBJECTS, sid, {"type": "state_change", "state": "responding"})
        for i in range(0, len(SENTENCE_2), 640):  # the user talks while the assistant does
            await send(nc, SUBJECTS, sid, {"type": "chunk", "audio": to_pcm16(SENTENCE_2[i:i + 640])})
        await send(nc, SUBJECTS, sid, {"type": "end"})
        result = await listener.wait_end(30)
    assert len(result.finals) == 1 and "young man" in result.finals[0]["transcript"]
    assert result.finals[0]["state"] == "responding"


async def test_malformed_messages_interleaved_do_not_change_a_good_session(
        worker_factory: Any, nc: Any) -> None:
    worker = await worker_factory(partial_interval_s=0)
    clean = await stream_audio(nc, FIRST_TWO, SR, session_id="clean", speed=0)
    rng = random.Random(7)
    good_chunk = protocol.pack({"type": "chunk", "audio": to_pcm16(SENTENCE_2[:640])})
    bad_payloads: list[bytes] = [
        b"", b"\xc1", b"not msgpack at all", msgpack.packb([1, 2, 3]), msgpack.packb("chunk"),
        protocol.pack({"type": "chunk"}), protocol.pack({"type": "chunk", "audio_b64": "%%%"}),
        protocol.pack({"type": "chunk", "audio": b"\x01"}),
        protocol.pack({"type": "start", "sample_rate": -1}),
        protocol.pack({"type": "start", "encoding": "mp3"}),
        protocol.pack({"type": "state_change", "state": "dancing"}),
        protocol.pack({"type": 17}), protocol.pack({"type": "chunk", "audio": b"\x00" * 300_000}),
    ]

    def mutate(payload: bytes) -> bytes:
        data = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    errors_before = sum(worker.stats.errors.values())
    stop = asyncio.Event()

    async def flood() -> int:
        sent = 0
        while not stop.is_set():
            for _ in range(20):
                payload = rng.choice(bad_payloads) if rng.random() < 0.7 else mutate(good_chunk)
                target = rng.choice(["dirty", f"junk{rng.randrange(50)}"])
                if target == "dirty" and payload.startswith(good_chunk[:3]):
                    continue  # a mutated *valid* chunk would change the audio itself
                await nc.publish(SUBJECTS.input(target), payload)
                sent += 1
            await asyncio.sleep(0.005)
        return sent

    flooder = asyncio.create_task(flood())
    dirty = await stream_audio(nc, FIRST_TWO, SR, session_id="dirty", speed=4.0)
    stop.set()
    sent = await flooder
    assert sent > 1000
    assert dirty.text == clean.text and dirty.text
    errors = dirty.of_type("error")
    assert errors and {e["code"] for e in errors} <= {"bad_message", "bad_audio", "too_large"}
    assert sum(worker.stats.errors.values()) - errors_before >= len(errors)
    check_sequences(dirty.messages)
    # the worker is still fine
    again = await stream_audio(nc, SENTENCE_2, SR, session_id="after", speed=0)
    assert "young man" in again.text


async def test_chunk_for_unknown_session_starts_one_with_defaults(worker_factory: Any,
                                                                  nc: Any) -> None:
    await worker_factory(partial_interval_s=0)
    sid = "adopted"
    async with Listener(nc, SUBJECTS, sid) as listener:
        audio = np.concatenate([SENTENCE_2, silence(1.0)])
        for seq, i in enumerate(range(0, len(audio), 640)):
            b64 = base64.b64encode(to_pcm16(audio[i:i + 640])).decode()
            await send(nc, SUBJECTS, sid, {"type": "chunk", "audio_b64": b64, "seq": seq})
        await send(nc, SUBJECTS, sid, {"type": "end"})
        result = await listener.wait_end(30)
    assert "young man" in result.text


async def test_session_limit_answers_overloaded(worker_factory: Any, nc: Any) -> None:
    await worker_factory(max_sessions=1)
    async with Listener(nc, SUBJECTS, "second") as listener:
        await send(nc, SUBJECTS, "first", {"type": "start"})
        await send(nc, SUBJECTS, "second", {"type": "start"})
        await eventually(lambda: bool(listener.result.messages))
    assert listener.result.messages[0]["code"] == "overloaded"


async def test_nats_server_killed_and_restarted_mid_session(nats_server: NatsServer,
                                                            worker_factory: Any, nc: Any) -> None:
    worker = await worker_factory(partial_interval_s=0)
    task = asyncio.create_task(stream_audio(nc, FIRST_TWO, SR, session_id="outage", speed=2.0,
                                            end_timeout_s=60))
    await asyncio.sleep(2.0)
    nats_server.kill()
    await asyncio.sleep(1.5)
    nats_server.start()
    result = await task
    assert worker.stats.reconnects >= 1
    assert "session" not in worker.sessions
    assert len(result.finals) == 2 and "young man" in result.text
    assert result.messages[-1]["type"] == "end"


async def test_a_worker_busy_for_a_while_does_not_cut_the_utterance_it_has_not_read(
        worker_factory: Any, nc: Any, nats_server: NatsServer) -> None:
    """The worker's event loop blocked for 1.5 s (a taken partition's held messages, a
    CPU-starved process) during a pause in a sentence, while the client goes on sending: what
    it has not read yet did arrive, so the pause is no audio gap and the sentence one final."""
    from bench.null_engine import InstantEngine

    worker = await worker_factory(engine=InstantEngine(None))  # type: ignore[arg-type]
    split = int(1.8 * SR)
    audio = np.concatenate([SENTENCE_2[:split], silence(0.5), SENTENCE_2[split:], silence(1.5)])
    sid = "busy-" + os.urandom(3).hex()
    finals: list[dict[str, Any]] = []

    async def on(msg: Any) -> None:
        m = protocol.unpack(msg.data)
        if m["type"] == "transcript" and m["is_final"]:
            finals.append(m)

    await nc.subscribe(SUBJECTS.output(sid), cb=on)
    await subscribed(nc)
    sent = [0.0]

    def client() -> None:  # another thread: it goes on while the worker's loop is blocked
        async def run() -> None:
            other = await nats.connect(nats_server.url)
            await send(other, SUBJECTS, sid, {"type": "start", "sample_rate": SR})
            t0, step = time.monotonic(), int(0.04 * SR)
            for at in range(0, audio.size, step):
                await asyncio.sleep(max(0.0, t0 + at / SR - time.monotonic()))
                await send(other, SUBJECTS, sid, {"type": "chunk",
                                                  "audio": to_pcm16(audio[at:at + step])})
                sent[0] = (at + step) / SR
            await send(other, SUBJECTS, sid, {"type": "end"})
            await other.flush()
            await other.close()
        asyncio.run(run())

    thread = threading.Thread(target=client)
    thread.start()
    try:
        await eventually(lambda: sent[0] >= 1.8 + 0.4, 10)  # 0.4 s into the pause
        time.sleep(1.5)  # noqa: ASYNC251  (the point: the loop is busy, nothing is read or ticks)
        await eventually(lambda: worker.status().sessions == 0, 20)
    finally:
        await asyncio.to_thread(thread.join)
    assert len(finals) == 1, [(f["start"], f["end"]) for f in finals]
    assert finals[0]["end"] - finals[0]["start"] == pytest.approx(SENTENCE_2.size / SR + 0.5,
                                                                  abs=0.6)


async def test_abandoned_sessions_are_ended_by_the_idle_timeout(worker_factory: Any,
                                                                nc: Any) -> None:
    worker = await worker_factory(session_idle_timeout_s=1.0, max_sessions=5000)
    ends: list[str] = []

    async def on_end(msg: Any) -> None:
        m = protocol.unpack(msg.data)
        if m["type"] == "end":
            ends.append(m["reason"])

    await nc.subscribe(SUBJECTS.output_prefix + ".>", cb=on_end)
    chunk = protocol.pack({"type": "chunk", "audio": to_pcm16(SENTENCE_2[:1600])})
    for i in range(2000):
        await nc.publish(SUBJECTS.input(f"gone{i}"), protocol.pack({"type": "start"}))
        await nc.publish(SUBJECTS.input(f"gone{i}"), chunk)
    await nc.flush()
    await eventually(lambda: worker.stats.sessions_started >= 2000, 20)
    await eventually(lambda: not worker.sessions and len(ends) == 2000, 30)
    assert set(ends) == {"idle_timeout"}


def _worker_process(url: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NATS_URL": url, "STT_ENGINE": "faster-whisper",
           "STT_PARTIAL_INTERVAL": "0", "STT_LOG_FORMAT": "json"}
    return subprocess.Popen([sys.executable, "-m", "stt", "worker", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def _wait_listening(proc: subprocess.Popen[bytes]) -> list[bytes]:
    lines: list[bytes] = []
    loop = asyncio.get_running_loop()
    while True:
        assert proc.stdout is not None
        line = await loop.run_in_executor(None, proc.stdout.readline)
        if not line:
            raise AssertionError(b"worker exited:\n" + b"".join(lines))
        lines.append(line)
        if b'"listening"' in line:
            return lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_mid_session_publishes_finals_and_end_then_exits_0(
        nats_server: NatsServer, nc: Any, sig: signal.Signals) -> None:
    proc = _worker_process(nats_server.url)
    try:
        await _wait_listening(proc)
        audio = np.concatenate([SENTENCE_2, silence(1.0), SENTENCE_2[: int(1.5 * SR)]])
        sid = "sigterm"
        async with Listener(nc, SUBJECTS, sid) as listener:
            await stream_audio(nc, audio, SR, session_id=sid, speed=0, send_end=False)
            await asyncio.sleep(0.5)
            proc.send_signal(sig)
            result = await listener.wait_end(30)
        code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0
    assert [m["type"] for m in result.messages] == ["transcript", "transcript", "end"]
    assert result.messages[-1]["reason"] == "shutdown"
    assert all(m["is_final"] for m in result.messages[:2])


def test_worker_refuses_bad_configuration_naming_the_variable() -> None:
    env = {**os.environ, "STT_VAD_AGGRESSIVENESS": "7"}
    out = subprocess.run([sys.executable, "-m", "stt", "worker"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "STT_VAD_AGGRESSIVENESS" in out.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_a_worker_that_cannot_reach_nats_stops_at_once_on_a_signal(
        sig: signal.Signals) -> None:
    proc = _worker_process(f"nats://127.0.0.1:{free_port()}")  # nothing listens there
    lines: list[bytes] = []
    try:
        assert proc.stdout is not None
        loop = asyncio.get_running_loop()
        while b"cannot reach NATS" not in b"".join(lines):
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 120)
            assert line, b"worker exited:\n" + b"".join(lines)
            lines.append(line)
        sent = time.monotonic()
        proc.send_signal(sig)
        code = await loop.run_in_executor(None, proc.wait, 10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and took < 5.0, (code, took)
