"""Durable mode (STT_DURABLE, issue 26): a replica SIGKILLed mid-utterance loses no words.

Replica processes on the shipped server configuration with ``STT_DURABLE=1``; the engine reads
tone words the test can count (bench.tone), so a word lost or said twice shows exactly. The
sessions speak at real time in the seed's chunks (``audio_b64`` and ``timestamp``, no ``seq``).
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from conftest import SAMPLE, eventually, speak_live, words_of

from bench.replicas import Replica
from bench.tone import silence, utter
from stt.cluster.membership import heartbeats, partition_of, wait_balanced
from stt.transport.nats_server import REPLICAS_PARTITIONS, NatsServer

SR = 16000
CHUNK_S = 0.04
TONE = "bench.tone:ToneEngine"
ENV = {"STT_DURABLE": "1", "STT_ENDPOINTING": "silence", "STT_PARTIAL_INTERVAL": "0.3",
       "STT_DRAIN_TIMEOUT_S": "20"}


def script(n: int) -> tuple[np.ndarray, list[str]]:
    """Session n's audio (22 s): seven utterances of 3-6 words with 1.2 s pauses; its words."""
    parts, words = [silence(0.5)], []
    k = 1 + n
    for size in (3, 6, 4, 6, 3, 5, 4):
        ks = [(k + i) % 9 + 4 for i in range(size)]  # w4..w12 (bench.tone.RELIABLE)
        k += size
        parts += [utter(*ks), silence(1.2)]
        words += [f"w{x}" for x in ks]
    return np.concatenate(parts), words


def distinct_partitions(count: int) -> list[str]:
    sids: list[str] = []
    i = 0
    while len(sids) < count:
        sid = f"durable{i}"
        if partition_of(sid, REPLICAS_PARTITIONS) not in {
                partition_of(s, REPLICAS_PARTITIONS) for s in sids}:
            sids.append(sid)
        i += 1
    return sids


@pytest.mark.timeout(240)
async def test_sigkill_mid_utterance_then_sigterm_loses_and_repeats_no_word(tmp_path: Any) -> None:
    """Three replicas, six sessions. 7 s in, the replica serving the most of them is SIGKILLed
    while they are mid-utterance: its partitions' leases lapse, another replica replays their
    audio from the stream's ack floor, and every word is published once. 9 s later another
    replica is SIGTERMed and hands its sessions over at pauses (the taker replays from the
    floor, skipping what the giver took in). Every session's finals hold its words in order,
    each once; one ``end``; ``sequence`` never repeats or goes back."""
    sids = distinct_partitions(6)
    audio = {}
    expected = {}
    for n, sid in enumerate(sids):
        audio[sid], expected[sid] = script(n)
    pcm = {sid: (np.clip(a, -1, 1) * 32767).astype("<i2").tobytes() for sid, a in audio.items()}
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in sids}

        async def on(msg: Any) -> None:
            sid = msg.subject.rsplit(".", 1)[-1]
            if sid in out:
                out[sid].append(msgpack.unpackb(msg.data))

        await nc.subscribe("ai.voice.transcription.*", cb=on)
        replicas = [Replica(server.url, tmp_path / f"r{i}.log", TONE, **ENV) for i in range(3)]
        killed: Any = None
        stopped: Any = None
        term_rc: Any = None
        waiting: Any = None

        async def kill_then_stop(t: float) -> None:
            nonlocal killed, stopped, waiting
            if killed is None and t >= 7.0:  # mid-way through the third utterance
                killed = await busiest(nc, replicas, sids)
                killed.proc.kill()
            elif killed is not None and stopped is None and t >= 16.0:  # in the sixth
                stopped = await busiest(nc, [r for r in replicas if r is not killed], sids)
                stopped.proc.send_signal(signal.SIGTERM)
                waiting = asyncio.create_task(asyncio.to_thread(stopped.proc.wait, 60))

        try:
            await wait_balanced(nc, 3, REPLICAS_PARTITIONS, 120)
            for r in replicas:
                r.learn_id()
            await speak_live(nc, pcm, kill_then_stop)
            await eventually(lambda: all(any(m.get("type") == "end" for m in out[s])
                                         for s in sids), 60)
            assert waiting is not None
            term_rc = await waiting
        finally:
            for r in replicas:
                r.stop()
            await nc.close()
    assert term_rc == 0
    for sid in sids:
        finals = [m["transcript"] for m in out[sid] if m.get("type") == "transcript"
                  and m.get("is_final") and m["transcript"]]
        assert " ".join(finals).split() == expected[sid], (sid, finals)
        sequences = [m["sequence"] for m in out[sid]]
        assert sequences == sorted(set(sequences)), (sid, sequences)
        assert [m["type"] for m in out[sid]].count("end") == 1 and out[sid][-1]["type"] == "end"
    replayed = [r for r in (*replicas[0].logs(), *replicas[1].logs(), *replicas[2].logs())
                if r.get("msg") == "partition consumed from the durable stream"
                and r.get("sessions_resumed")]
    assert replayed, "no partition with sessions was taken over"


async def busiest(nc: Any, replicas: list[Replica], sids: list[str]) -> Replica:
    """The replica whose partitions hold the most of these sessions."""
    hbs = await heartbeats(nc)
    wanted = [partition_of(s, REPLICAS_PARTITIONS) for s in sids]
    return max(replicas, key=lambda r: sum(p in hbs[r.id].partitions for p in wanted)
               if r.id in hbs else -1)


# --- the bookkeeping, without a server ------------------------------------------------------------


def settings_durable() -> Any:
    from conftest import make_settings
    return make_settings("nats://x", partitions=32, durable=True)


def test_the_floor_stops_before_the_oldest_audio_a_session_needs() -> None:
    """Two sessions in one partition: the floor acknowledged is the last message before the
    first one a session still needs; a session that is gone no longer holds it."""
    from stt.transport.durable import AudioLog, _Partition

    log_ = AudioLog(settings_durable().cluster,
                    on_message=lambda p, m: None)  # type: ignore[arg-type,return-value]
    log_._parts[3] = _Partition()
    frames = {"a": 0, "b": 0}
    for seq in range(1, 21):  # a and b alternate, each message 10 frames
        sid = "a" if seq % 2 else "b"
        assert log_.admit(3, sid, seq, f"ack.{seq}")
        before = (frames[sid], None)
        frames[sid] += 10
        log_.took(3, sid, seq, before, (frames[sid], None))
    settled = {"a": (45, 100), "b": (100 - 10, 100)}  # a needs its audio from frame 45 on
    floors = log_.settle(lambda sid: settled.get(sid))
    # a's message holding frame 45 is its fifth (frames 40-50): seq 9; the floor is seq 8
    assert floors == {3: (8, "ack.8")}
    assert log_.replay_point("a").seq == 9 and log_.replay_point("a").frames == 40
    assert log_.replay_point("b", exact=True).seq == 21  # after b's last (seq 20)
    del settled["a"]  # a ended: only b's pre-roll holds the floor now
    floors = log_.settle(lambda sid: settled.get(sid))
    assert floors == {3: (19, "ack.19")}  # all but b's last message (seq 20, frames 90-100)
    assert log_.settle(lambda sid: settled.get(sid)) == {}  # nothing new: no acknowledgement
    assert not log_.admit(3, "b", 20, "again")  # a redelivery is dropped


async def test_a_replay_skips_what_the_resumed_session_took_in() -> None:
    from stt.transport.durable import AudioLog, _Partition

    log_ = AudioLog(settings_durable().cluster,
                    on_message=lambda p, m: None)  # type: ignore[arg-type,return-value]
    log_._parts[3] = _Partition(skip={"a": 7})
    assert [log_.admit(3, "a", seq, "r") for seq in (5, 6, 7, 8)] == [False, False, True, True]
    assert log_.admit(3, "b", 9, "r")  # another session: not skipped
    assert log_.replayed == 2


def test_a_replay_starts_in_the_state_the_session_had_there() -> None:
    """A ``state_change`` after the replay point is replayed too, so the snapshot says the state
    before it: the replayed audio is heard in the state it was spoken in."""
    from stt.transport.durable import AudioLog, _Partition
    from stt.wire.protocol import State

    log_ = AudioLog(settings_durable().cluster,
                    on_message=lambda p, m: None)  # type: ignore[arg-type,return-value]
    log_._parts[3] = _Partition()
    listening, responding = State.LISTENING, State.RESPONDING
    assert log_.admit(3, "a", 1, "r1")  # audio of an utterance still open
    log_.took(3, "a", 1, (0, None, listening), (10, None, listening))
    assert log_.admit(3, "a", 2, "r2")  # then the assistant starts speaking
    log_.took(3, "a", 2, (10, None, listening), (10, None, responding))
    mark = log_.replay_point("a", (5, 10))  # the utterance is still needed from frame 5 on
    assert mark is not None and (mark.seq, mark.state) == (1, listening)
    after = log_.replay_point("a", exact=True)
    assert after is not None and (after.seq, after.state) == (3, responding)


def test_a_session_settles_up_to_its_open_utterance_or_its_preroll() -> None:
    from conftest import make_settings

    from bench.tone import utter
    from stt.core.session import Session
    from stt.wire.protocol import Chunk, Start

    profile = make_settings("nats://x", endpointing="silence").session_profile(model=False)
    session = Session("s", profile, 0.0, Start())
    preroll = profile.params_for(None).segmenter.preroll_frames
    pcm = (np.concatenate([silence(1.0), utter(1, 2)]) * 32767).astype("<i2").tobytes()
    session.handle(Chunk(pcm[:SR * 2]), 1.0)  # the first second: silence
    frames = session.position[0]
    assert session.settled_frames == frames - preroll
    session.handle(Chunk(pcm[SR * 2:]), 2.0)  # the utterance, still open
    assert session.settled_frames < frames  # from its first frame (pre-roll included) on
    assert session.settled_frames >= frames - preroll - 1


# --- real Whisper, real speech: SIGKILL mid-sentence ------------------------------------------------


@pytest.mark.timeout(300)
async def test_real_whisper_sessions_on_a_sigkilled_replica_read_as_on_one_replica(
        tmp_path: Any) -> None:
    """Two replica processes with STT_DURABLE=1 and faster-whisper tiny.en on the shipped server
    configuration; four sessions speak the sample's first four sentences with 2.5 s pauses in
    the seed's chunks (no ``seq``), two on each replica. In the middle of the second sentence the
    replica serving two of them is SIGKILLed: the other claims its partitions when the leases
    lapse and replays their audio from the stream. Every session's finals equal the same
    sentences on one worker, word for word (conftest.words_of; no other tolerance: the replayed
    sentence is decoded from the same audio with the same context, the previous final, kept in
    the snapshot; greedy decoding on CPU repeats itself; silence endpointing, no partials, no
    speculative finals).
    Without durable mode the killed replica's sessions lose that sentence."""
    from test_handover import GAP_S, reference_finals

    from bench.replicas import PHRASES
    from stt.core.audio import load_16k_mono

    speech = load_16k_mono(str(SAMPLE))
    clips = [speech[int(a * SR):int(b * SR)] for a, b in PHRASES[:4]]
    parts = [np.concatenate([silence(0.5), c, silence(GAP_S)]) for c in clips]
    kill_s = (len(parts[0]) + SR * 0.5 + len(clips[1]) / 2) / SR  # mid-way through sentence 2
    pcm = (np.clip(np.concatenate(parts), -1, 1) * 32767).astype("<i2").tobytes()
    env = {"STT_DURABLE": "1", "STT_ENDPOINTING": "silence", "STT_SPECULATIVE_MS": "0",
           "STT_PARTIAL_INTERVAL": "0", "WHISPER_CPU_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with NatsServer.for_replicas() as server:
        expected = await reference_finals(server.url, clips)
        nc = await nats.connect(server.url)
        replicas = [Replica(server.url, tmp_path / f"r{i}.log", "faster-whisper", **env)
                    for i in range(2)]
        out: dict[str, list[dict[str, Any]]] = {}
        try:
            hbs = await wait_balanced(nc, 2, REPLICAS_PARTITIONS, 120)
            for r in replicas:
                r.learn_id()
            victim, other = replicas
            sids: list[str] = []
            used: set[int] = set()
            for r in (victim, other):  # two sessions in two partitions of each replica
                i = 0
                while len(sids) < 2 * (1 + (r is other)):
                    sid, i = f"whisper{i}", i + 1
                    p = partition_of(sid, REPLICAS_PARTITIONS)
                    if p in hbs[r.id].partitions and p not in used:
                        sids.append(sid)
                        used.add(p)
            out = {s: [] for s in sids}

            async def on(msg: Any) -> None:
                sid = msg.subject.rsplit(".", 1)[-1]
                if sid in out:
                    out[sid].append(msgpack.unpackb(msg.data))

            await nc.subscribe("ai.voice.transcription.*", cb=on)

            async def kill(t: float) -> None:
                if victim.proc.poll() is None and t >= kill_s:
                    victim.proc.kill()

            await speak_live(nc, dict.fromkeys(sids, pcm), kill)
            await eventually(lambda: all(any(m.get("type") == "end" for m in out[s])
                                         for s in sids), 120)
        finally:
            for r in replicas:
                r.stop()
            await nc.close()
    print("reference:", expected)
    resumed = [r.get("session_id") for r in other.logs()
               if r.get("msg") == "session resumed from another replica"]
    assert sorted(resumed) == sorted(sids[:2]), resumed
    for sid in sids:
        finals = [m["transcript"] for m in out[sid] if m.get("type") == "transcript"
                  and m.get("is_final") and m["transcript"]]
        assert words_of(finals) == words_of(expected), (sid, sid in resumed, finals)
        sequences = [m["sequence"] for m in out[sid]]
        assert sequences == sorted(set(sequences)), (sid, sequences)
        assert [m["type"] for m in out[sid]].count("end") == 1 and out[sid][-1]["type"] == "end"
