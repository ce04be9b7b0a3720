"""A session handed from one replica to another publishes every word once (issue 26).

Two in-process workers share one partition subject on a real nats-server, and the test plays
stt.cluster.membership's part by hand, step by step, so every interleaving is deterministic: the taker
subscribes and holds, the giver keeps serving (it consumes chunks the taker also holds), hands
over, the taker adopts. The engine reads words the test can count (bench.tone): each "word" is a 0.3 s
harmonic tone whose pitch names it (``w{k}``), so a repeated or dropped word shows in the
finals' text exactly. Chunks come as the seed sends them (``audio_b64`` and a capture
``timestamp``, no ``seq``) and, separately, with the ``seq`` extension.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from conftest import SAMPLE, eventually, make_settings, speak_live, words_of

from bench.replicas import PHRASES
from bench.tone import ToneEngine, read_words, silence, utter, word
from stt.cli.wiring import build_worker
from stt.core.audio import load_16k_mono
from stt.core.session import Session
from stt.core.transcription import Transcription
from stt.core.vad import FRAME_S
from stt.engines import create_engine
from stt.transport.connection import subscribed
from stt.transport.nats_server import NatsServer
from stt.transport.worker import Worker
from stt.wire import protocol
from stt.wire.protocol import Chunk, Start

pytestmark = pytest.mark.timeout(120)

SR = 16000
P = 7  # the partition both workers serve
CHUNK_S = 0.04


async def test_a_subscription_reaches_the_server_before_subscribed_returns() -> None:
    """The handover rests on it: the taker subscribes, and from then on every message of the
    partition reaches it. nats-py's flush() alone returned before the server had the SUB a few
    times in a thousand (tests/test_handover.py's fixture lost its first utterance so)."""
    with NatsServer() as server:
        a, b = await nats.connect(server.url), await nats.connect(server.url)
        try:
            missed = []
            for i in range(400):
                got = asyncio.Event()

                async def on(msg: Any, got: asyncio.Event = got) -> None:
                    got.set()

                sub = await a.subscribe(f"t.{i}.*", cb=on)
                await subscribed(a)
                await b.publish(f"t.{i}.x", b"")
                try:
                    await asyncio.wait_for(got.wait(), 2.0)
                except TimeoutError:
                    missed.append(i)
                await sub.unsubscribe()
            assert not missed
        finally:
            await a.close()
            await b.close()


def test_the_tone_words_read_back() -> None:
    assert read_words(utter(1, 2, 3, 9, 12)) == "w1 w2 w3 w9 w12"


class Client:
    """One front-end: seed chunks (base64, capture timestamp) or with ``seq``; the session's
    output as it arrives."""

    def __init__(self, nc: Any, sid: str, seq: bool) -> None:
        self.nc, self.sid, self.use_seq = nc, sid, seq
        self.seq = 0
        self.captured = time.time()
        self.sent_s = 0.0
        self.chunks = 0
        self.out: list[dict[str, Any]] = []

    async def listen(self) -> None:
        async def on(msg: Any) -> None:
            self.out.append(msgpack.unpackb(msg.data))

        await self.nc.subscribe(f"ai.voice.transcription.{self.sid}", cb=on)
        await subscribed(self.nc)

    async def publish(self, body: dict[str, Any]) -> None:
        await self.nc.publish(f"stt.in.{P}.{self.sid}", protocol.pack(body))

    async def send(self, audio: np.ndarray) -> None:
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        step = int(CHUNK_S * SR) * 2
        for i in range(0, len(pcm), step):
            body: dict[str, Any] = {"type": "chunk", "timestamp": self.captured,
                                    "audio_b64": base64.b64encode(pcm[i:i + step]).decode()}
            if self.use_seq:
                self.seq += 1
                body["seq"] = self.seq
            self.captured += CHUNK_S
            self.chunks += 1
            await self.publish(body)
        self.sent_s += len(audio) / SR
        await self.nc.flush()

    def finals(self) -> list[str]:
        return [m["transcript"] for m in self.out if m.get("type") == "transcript"
                and m.get("is_final") and m["transcript"]]

    def ended(self) -> bool:
        return any(m.get("type") == "end" for m in self.out)


async def adopt(taker: Worker, snaps: dict[str, Any]) -> None:
    """Step 4 as stt.cluster.membership takes it: what the server sent is held, then the sessions resume."""
    await taker.catch_up(P)
    taker.adopt_partition(P, snaps, {}, handed_over=True)


async def handled(worker: Worker, client: Client) -> None:
    """Until the worker has handled every chunk the client sent (they are on their way): the
    session's timeline, continuous across replicas, is as long as the audio sent."""
    def done() -> bool:
        session = worker.sessions.get(client.sid)
        return session is not None and session.segmenter.frames * FRAME_S > client.sent_s - 0.031

    await eventually(done)


def check_output(client: Client) -> dict[str, Any]:
    """One ``end``, last; ``sequence`` 1, 2, 3 ... across both replicas; the end's counters."""
    sequences = [m["sequence"] for m in client.out]
    assert sequences == list(range(1, len(sequences) + 1)), sequences
    ends = [m for m in client.out if m.get("type") == "end"]
    assert len(ends) == 1 and client.out[-1] is ends[0], client.out[-3:]
    return ends[0]


async def two_workers(url: str) -> tuple[Worker, Worker]:
    workers = []
    for _ in range(2):
        w = build_worker(make_settings(url, partial_interval_s=0.3), ToneEngine(),
                   turn_model=None)
        await w.start()
        workers.append(w)
    giver = workers[0]
    await giver.subscribe_partition(P)
    giver.adopt_partition(P, {}, {})  # live on it
    return giver, workers[1]


@contextlib.asynccontextmanager
async def one_final_then_a_taker(seq: bool) -> AsyncIterator[tuple[Worker, Worker, Client]]:
    """A giver that published s1's first final ("w1 w2 w3") and a taker that holds the
    partition's messages from then on; both stopped afterwards."""
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        giver, taker = await two_workers(server.url)
        try:
            c = Client(nc, "s1", seq)
            await c.listen()
            await c.publish({"type": "start", "sample_rate": SR})
            await c.send(np.concatenate([silence(0.5), utter(1, 2, 3), silence(1.5)]))
            await eventually(lambda: len(c.finals()) == 1)
            await taker.subscribe_partition(P)
            yield giver, taker, c
        finally:
            for w in (giver, taker):
                await w.shutdown()
            await nc.close()


@pytest.mark.parametrize("seq", [False, True], ids=["seed-chunks", "seq"])
async def test_chunks_the_giver_handled_are_not_replayed(seq: bool) -> None:
    """The taker holds everything from its subscription on; the giver goes on handling chunks
    (a whole utterance here) until it hands over. Without ``seq`` those chunks were replayed by
    the taker: the utterance was transcribed twice."""
    async with one_final_then_a_taker(seq) as (giver, taker, c):  # the taker holds from here on
        await c.send(np.concatenate([utter(4, 5, 6), silence(1.5)]))
        await eventually(lambda: len(c.finals()) == 2)  # the giver handled all of it
        await handled(giver, c)
        snaps = await giver.give_partition(P, 2.0)
        assert snaps["s1"].exact and snaps["s1"].last_message
        await c.send(np.concatenate([utter(7, 8), silence(1.5)]))  # held by the taker
        await asyncio.sleep(0.3)
        await adopt(taker, snaps)
        await c.send(np.concatenate([utter(9, 10), silence(1.5)]))
        await c.publish({"type": "end"})
        await eventually(c.ended)
    assert c.finals() == ["w1 w2 w3", "w4 w5 w6", "w7 w8", "w9 w10"]
    end = check_output(c)
    assert end["segments"] == 4
    assert abs(end["audio_seconds"] - c.sent_s) < 0.1, (end["audio_seconds"], c.sent_s)


@pytest.mark.parametrize("seq", [False, True], ids=["seed-chunks", "seq"])
async def test_an_utterance_in_progress_ends_on_the_giver_in_one_final(seq: bool) -> None:
    """The wait for a pause runs out mid-utterance: the giver finishes that utterance (its
    final has every word, published there), then hands over; nothing is cut or dropped."""
    async with one_final_then_a_taker(seq) as (giver, taker, c):
        await c.send(utter(4, 5, 6, 7))  # no pause yet
        await handled(giver, c)
        giving = asyncio.create_task(giver.give_partition(P, 0.3))
        await asyncio.sleep(0.6)  # past the wait: the old code cut here
        await c.send(np.concatenate([utter(8, 9), silence(1.5)]))
        snaps = await giving
        await eventually(lambda: len(c.finals()) == 2)
        await c.send(np.concatenate([utter(10, 11), silence(1.5)]))
        await adopt(taker, snaps)
        await c.publish({"type": "end"})
        await eventually(c.ended)
    assert c.finals() == ["w1 w2 w3", "w4 w5 w6 w7 w8 w9", "w10 w11"]
    assert check_output(c)["segments"] == 3


async def test_a_giver_whose_partition_was_claimed_meanwhile_stops_without_a_word() -> None:
    """The taker died mid-handover and a third replica claimed the partition (the membership
    drops it here): the giver's open utterance is the claimer's to transcribe, from its replay
    or from what reaches it, so the giver publishes nothing more and hands over nothing."""
    async with one_final_then_a_taker(False) as (giver, _taker, c):
        await c.send(utter(4, 5, 6, 7))  # no pause yet
        await handled(giver, c)
        giving = asyncio.create_task(giver.give_partition(P, 0.3))
        await asyncio.sleep(0.2)
        giver.drop_partition(P)
        await c.send(np.concatenate([utter(8, 9), silence(1.5)]))
        assert await giving is None
        await asyncio.sleep(0.5)
        assert c.finals() == ["w1 w2 w3"] and c.sid not in giver.sessions


def test_an_onset_under_way_is_not_a_pause() -> None:
    """Voiced frames that have not opened an utterance yet would be lost to both replicas."""
    session = Session("s", make_settings("nats://x").session_profile(model=False), 0.0, Start())
    pcm = (np.concatenate([silence(1.0), word(3)[:int(0.06 * SR)]]) * 32767).astype("<i2")
    session.handle(Chunk(pcm[:SR].tobytes()), 1.0)
    assert session.quiet
    session.handle(Chunk(pcm[SR:].tobytes()), 1.1)
    assert not session.quiet


async def test_an_end_is_answered_once_whichever_replica_had_it() -> None:
    """s1's ``end`` comes after its handover (held by the taker, answered there); s2's before
    (answered by the giver; the taker's held copy is dropped): one ``end`` each, numbered on."""
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        giver, taker = await two_workers(server.url)
        try:
            c1, c2 = Client(nc, "s1", False), Client(nc, "s2", False)
            for c in (c1, c2):
                await c.listen()
                await c.publish({"type": "start", "sample_rate": SR})
                await c.send(np.concatenate([silence(0.3), utter(1, 2), silence(1.5)]))
            await eventually(lambda: len(c1.finals()) == len(c2.finals()) == 1)
            await taker.subscribe_partition(P)
            await c2.send(np.concatenate([utter(3, 6), silence(1.0)]))
            await c2.publish({"type": "end"})
            await eventually(c2.ended)
            await handled(giver, c1)
            snaps = await giver.give_partition(P, 1.0)
            assert set(snaps) == {"s1"}
            await c1.send(np.concatenate([utter(4, 5), silence(0.3)]))
            await c1.publish({"type": "end"})
            await asyncio.sleep(0.3)
            assert not c1.ended()
            await adopt(taker, snaps)
            await eventually(c1.ended)
            await asyncio.sleep(0.3)
        finally:
            for w in (giver, taker):
                await w.shutdown()
            await nc.close()
    assert c1.finals() == ["w1 w2", "w4 w5"] and c2.finals() == ["w1 w2", "w3 w6"]
    assert check_output(c1)["segments"] == 2 and check_output(c2)["segments"] == 2


def test_the_next_final_decodes_with_the_same_context_on_the_taker() -> None:
    """The previous final is the next one's decoding context; a handover keeps it, so the
    taker's words are the ones a single replica would have decoded."""
    from stt.core.actions import Transcribe

    settings = make_settings("nats://x")
    giver = Session("s", settings.session_profile(model=False), 0.0, Start())
    pcm = (np.concatenate([utter(1, 2), silence(1.5)]) * 32767).astype("<i2").tobytes()
    (job,) = [a.job for a in giver.handle(Chunk(pcm), 1.0)
              if isinstance(a, Transcribe) and a.job.is_final]
    giver.transcribed(job.job_id, Transcription("one two."), 1.1)
    giver.hand_over(1.2)
    taker = Session.resume("s", settings.session_profile(model=False), 2.0,
                           giver.snapshot(exact=True))
    (job,) = [a.job for a in taker.handle(Chunk(pcm), 3.0)
              if isinstance(a, Transcribe) and a.job.is_final]
    assert job.options.context == "one two."


# --- real Whisper, real speech ------------------------------------------------------------------


async def alone(w: Worker, nc: Any, sid: str, clips: list[np.ndarray], gap_s: float) -> Client:
    """The sentences on one worker alone, at a talker's pace: each sentence's final before the
    next sentence (the previous final is the next one's context)."""
    await w.subscribe_partition(P)
    w.adopt_partition(P, {}, {})
    one = Client(nc, sid, False)
    await one.listen()
    await one.publish({"type": "start", "sample_rate": SR})
    for clip in clips:
        await one.send(np.concatenate([silence(0.5), clip, silence(gap_s)]))
        await settled(w, one)
    return one


async def settled(w: Worker, client: Client) -> None:
    """Until the worker has heard all the client sent, every utterance in it is final and
    published (not "until n finals": a sentence can end in more or fewer finals than expected,
    and the comparison that follows should show which)."""
    await handled(w, client)

    def done() -> bool:
        session = w.sessions[client.sid]
        return (session.settled_frames >= session.segmenter.frames
                - session.params.segmenter.preroll_frames and w.pending_outbound == 0)

    await eventually(done, 90)
    await client.nc.flush()
    await asyncio.sleep(0.2)  # the last final on its way back through the server


async def test_real_speech_moved_twice_reads_as_on_one_replica() -> None:
    """The sample's sentences with 2 s pauses, seed chunks, faster-whisper tiny.en, each sentence's
    final awaited before the next (a talker's pace: the previous final is the next one's
    context). Once on one worker alone; once moved twice, each time while a sentence is under
    way and the wait for a pause runs out (the giver finishes that sentence). The finals must
    match word for word (conftest.words_of: a comma is no word), no other tolerance: the
    hand-over falls between utterances and carries the decoding context, so each utterance is
    decoded from the same prompt. The taker's segment edges can differ by a frame or two (its
    VAD and noise floor start afresh; measured: 90,240 vs 91,200 samples), which tiny.en reads
    as the same words here (with a comma more or less: "woman, he"). Greedy decoding on CPU is
    repeatable; silence endpointing, no speculative finals or partials, so nothing depends on
    timing."""
    speech = load_16k_mono(str(SAMPLE))
    clips = [speech[int(a * SR):int(b * SR)] for a, b in PHRASES[:4]]
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        settings = make_settings(server.url, partial_interval_s=0, speculative_ms=0)
        engine = create_engine(settings)
        workers = []
        for _ in range(2):
            w = build_worker(settings, engine, turn_model=None)
            await w.start()
            workers.append(w)
        a, b = workers
        try:
            one = await alone(a, nc, "one", clips, 2.0)
            await one.publish({"type": "end"})
            await eventually(one.ended, 60)
            # moved a -> b and b -> a, each while a sentence is under way
            c = Client(nc, "moved", False)
            await c.listen()
            await c.publish({"type": "start", "sample_rate": SR})
            await c.send(np.concatenate([silence(0.5), clips[0], silence(2.0)]))
            await eventually(lambda: len(c.finals()) >= 1, 60)
            for giver, taker, first, second, said in ((a, b, clips[1], clips[2], 2),
                                                      (b, a, clips[3], None, 4)):
                await taker.subscribe_partition(P)
                half = len(first) // 2
                await c.send(np.concatenate([silence(0.5), first[:half]]))
                await handled(giver, c)
                giving = asyncio.create_task(giver.give_partition(P, 0.2))
                await asyncio.sleep(0.5)  # the wait has run out: the giver finishes the sentence
                await c.send(np.concatenate([first[half:], silence(2.0)]))
                snaps = await giving
                await eventually(lambda said=said: len(c.finals()) >= said, 60)  # type: ignore[misc]
                if second is not None:  # the next sentence, held by the taker meanwhile
                    await c.send(np.concatenate([silence(0.5), second, silence(2.0)]))
                else:
                    await c.publish({"type": "end"})
                await adopt(taker, snaps)
            await eventually(c.ended, 60)
        finally:
            for w in workers:
                await w.shutdown()
            await nc.close()
    assert len(one.finals()) == 4, one.finals()
    print("one replica:", one.finals())
    print("moved twice:", c.finals())
    assert words_of(c.finals()) == words_of(one.finals())
    check_output(c)


# --- real Whisper, replica processes, moved by a join and by a SIGTERM ----------------------------


async def reference_finals(url: str, clips: list[np.ndarray]) -> list[str]:
    """The sentences on one worker alone, each final awaited before the next sentence."""
    nc = await nats.connect(url)
    settings = make_settings(url, partial_interval_s=0, speculative_ms=0)
    w = build_worker(settings, turn_model=None)
    await w.start()
    try:
        return (await alone(w, nc, "reference", clips, GAP_S)).finals()
    finally:
        await w.shutdown()
        await nc.close()


GAP_S = 2.5


@pytest.mark.timeout(300)
async def test_real_whisper_sessions_moved_by_a_join_and_a_sigterm_read_as_on_one_replica(
        tmp_path: Any) -> None:
    """Replica processes on the shipped server configuration, faster-whisper tiny.en, the seed's
    chunks (``audio_b64`` and ``timestamp``, no ``seq``) at real time: four sessions speak the
    sample's first four sentences with 2.5 s pauses. Replica A is alone; B joins 5 s in and
    balancing hands it sessions (each at a pause between its sentences); 20 s in B is
    SIGTERMed and hands them back. Every session's finals equal the same sentences on one
    worker, word for word (conftest.words_of; no other tolerance: the hand-over falls between
    utterances and carries the decoding context; greedy decoding on CPU repeats itself; silence
    endpointing, no partials, no speculative finals, so nothing depends on timing). Every session ends once,
    its ``sequence`` unbroken; the moves are counted by reason."""
    from bench.replicas import Replica
    from stt.cluster.membership import partition_of, wait_balanced
    from stt.transport.nats_server import REPLICAS_PARTITIONS

    speech = load_16k_mono(str(SAMPLE))
    clips = [speech[int(a * SR):int(b * SR)] for a, b in PHRASES[:4]]
    script = np.concatenate([np.concatenate([silence(0.5), c, silence(GAP_S)]) for c in clips])
    pcm = (np.clip(script, -1, 1) * 32767).astype("<i2").tobytes()
    sids: list[str] = []
    p = 0
    while len(sids) < 4:  # four sessions in four partitions, so balancing can split them
        sid = f"moved{p}"
        if partition_of(sid, REPLICAS_PARTITIONS) not in {partition_of(s, REPLICAS_PARTITIONS)
                                                          for s in sids}:
            sids.append(sid)
        p += 1
    env = {"STT_ENDPOINTING": "silence", "STT_SPECULATIVE_MS": "0", "WHISPER_CPU_THREADS": "1",
           "OMP_NUM_THREADS": "1", "STT_DRAIN_TIMEOUT_S": "30"}
    with NatsServer.for_replicas() as server:
        expected = await reference_finals(server.url, clips)
        nc = await nats.connect(server.url)
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in sids}

        async def on(msg: Any) -> None:
            out[msg.subject.rsplit(".", 1)[-1]].append(msgpack.unpackb(msg.data))

        await nc.subscribe("ai.voice.transcription.*", cb=on)
        a = Replica(server.url, tmp_path / "a.log", "faster-whisper", **env)
        b: Any = None
        term_sent = False

        async def join_then_stop(t: float) -> None:
            nonlocal b, term_sent
            if b is None and t >= 5.0:
                b = Replica(server.url, tmp_path / "b.log", "faster-whisper", **env)
            elif b is not None and not term_sent and t >= 20.0:
                b.proc.send_signal(signal.SIGTERM)  # waited for below, off the loop
                term_sent = True

        try:
            await wait_balanced(nc, 1, REPLICAS_PARTITIONS, 120)
            await speak_live(nc, dict.fromkeys(sids, pcm), join_then_stop)
            await eventually(lambda: all(any(m.get("type") == "end" for m in out[s])
                                         for s in sids), 120)
            assert await asyncio.to_thread(b.proc.wait, 60) == 0
        finally:
            for r in (a, b):
                if r is not None:
                    r.stop()
            await nc.close()
    served_by_b = [s for s in sids if any(r.get("msg") == "session resumed from another replica"
                                          and r.get("session_id") == s for r in b.logs())]
    moves = [r for r in (*a.logs(), *b.logs()) if r.get("msg") == "partition handed over"
             and r.get("sessions")]
    print("reference:", expected)
    print("sessions moved to B and back:", served_by_b, "; moves with sessions:",
          [(r["reason"], r["sessions"]) for r in moves])
    assert served_by_b, "balancing moved no session to the joining replica"
    assert {r["reason"] for r in moves} <= {"partitions", "sessions", "leaving"}
    for sid in sids:
        finals = [m["transcript"] for m in out[sid] if m.get("type") == "transcript"
                  and m.get("is_final") and m["transcript"]]
        assert words_of(finals) == words_of(expected), (sid, sid in served_by_b, finals)
        sequences = [m["sequence"] for m in out[sid]]
        assert sequences == list(range(1, len(sequences) + 1)), (sid, sequences)
        assert [m["type"] for m in out[sid]].count("end") == 1 and out[sid][-1]["type"] == "end"
