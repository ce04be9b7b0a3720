"""Many replicas sharing sessions (STT_PARTITIONS) against a real nats-server started with
k8s/nats/nats-server.conf, worker processes started, killed and stopped as an orchestrator would.

``test_three_replicas_sixty_sessions_kill_stop_join`` is the issue's check at scale: 60 sessions
of real speech (a third 8 kHz mu-law) on three replicas, one SIGKILLed, one SIGTERMed, a fourth
started. Its engine is the instant benchmark engine, so 60 real-time sessions fit on 2 cores:
what is tested is affinity, failover and handover; the format a session keeps shows in its
finals' timeline (a mu-law 8 kHz session read as 16 kHz PCM would be a quarter as long).
``test_failover_keeps_the_format_with_real_whisper`` checks the words themselves after a crash.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from audio_util import encode
from conftest import ROOT, SAMPLE

from bench.replicas import CHUNK_S, GAP_S, INSTANT, PHRASES  # the sample's sentences, 1.4 s apart
from bench.replicas import Replica as ReplicaProcess
from stt.cluster import membership as cluster
from stt.cluster.membership import REPLICA_HEADER, Heartbeat, heartbeats, partition_of, poll_until
from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.textnorm import normalize
from stt.transport.nats_server import REPLICAS_CONFIG, REPLICAS_PARTITIONS, NatsServer
from stt.wire import protocol

pytestmark = pytest.mark.timeout(420)


def test_the_shipped_server_configuration_is_the_packaged_one() -> None:
    shipped = (ROOT / "k8s" / "nats" / "nats-server.conf").read_text()
    assert shipped == REPLICAS_CONFIG.read_text()
    assert f"partition({REPLICAS_PARTITIONS},1)" in shipped
    # and the Helm values carry the same mapping (the chart does not template plain strings)
    yaml = pytest.importorskip("yaml")
    values = yaml.safe_load((ROOT / "k8s" / "nats" / "values.yaml").read_text())
    ((subject, target),) = values["config"]["merge"]["mappings"].items()
    assert f'"{subject}": "{target}"' in shipped
    assert values["config"]["jetstream"]["enabled"] is True


def test_a_server_without_the_mapping_is_one_clear_error(tmp_path: Path) -> None:
    with NatsServer(extra_args=["-js", "-sd", str(tmp_path / "js")]) as server:
        worker = Replica(server.url, "w", INSTANT, tmp_path)
        assert worker.proc.wait(60) == 1
    text = worker.log_path.read_text()
    errors = [r for r in worker.logs() if r.get("level") == "error"]
    assert len(errors) == 1 and "cannot join the replicas" in errors[0]["msg"], text
    assert "nats-server.conf" in errors[0]["msg"] and "Traceback" not in text, text


async def test_a_killed_replica_is_noticed_by_its_closed_connection_not_its_lease(
        tmp_path: Path) -> None:
    """SIGKILL closes the replica's socket; the server then answers a request to its liveness
    subject with "no responders", and the survivor takes its partitions over at once. The
    leases here run 8 s (a lease round every 2 s): the killed replica's last renewal lapses 6-8 s
    after the kill, so a takeover sooner than 6 s is that path's. A replica that is merely
    stopped (SIGSTOP for 5 s: connection open, nothing answering) is not gone: its partitions
    stay its own."""
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        env = {"STT_LEASE_TTL_S": "8"}
        a = Replica(server.url, "a", INSTANT, tmp_path, **env)
        b = Replica(server.url, "b", INSTANT, tmp_path, **env)
        try:
            replica_ids([a, b], await wait_balanced(nc, 2))
            b.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(5)  # a's lease rounds ask b twice: no answer, but not gone
            hbs = await heartbeats(nc)
            assert len(hbs[a.id].partitions) < REPLICAS_PARTITIONS, hbs[a.id]
            b.proc.send_signal(signal.SIGCONT)
            replica_ids([a, b], await wait_balanced(nc, 2))
            b.proc.kill()
            b.proc.wait()
            killed_at = time.time()
            alone = {r: hb for r, hb in (await cluster.wait_balanced(
                nc, 1, REPLICAS_PARTITIONS, 15)).items() if r != b.id}
            took_s = time.time() - killed_at
        finally:
            await stop_all([a, b], nc)
    assert list(alone) == [a.id] and len(alone[a.id].partitions) == REPLICAS_PARTITIONS
    gone = [r for r in a.logs() if r.get("msg", "").startswith("replica gone")]
    assert [r["replica"] for r in gone] == [b.id], gone
    print(f"the killed replica's partitions were all held by the other {took_s:.2f} s after "
          "the kill (lease TTL 8 s)")
    assert took_s < 6.0


# --- harness ---------------------------------------------------------------------------------


DRAIN_S = 15.0
TERM_LIMIT_S = 0.6 * DRAIN_S  # how long a SIGTERMed replica waits for its sessions' pauses
QUIET_S = 8.0    # no partition moved for this long: balancing has settled ...
STEADY_S = 15.0  # ... and nothing moves in this much steady load after


class Replica(ReplicaProcess):
    """One replica of the tests: one engine thread, a 15 s drain, silence endpointing (the
    checks count one final per sentence; the end-of-turn model may end a turn at a sentence's
    own pause, and is tested in tests/test_turn.py)."""

    def __init__(self, url: str, name: str, engine: str, tmp: Path, **env: str) -> None:
        super().__init__(url, tmp / f"{name}.log", engine, WHISPER_CPU_THREADS="1",
                         OMP_NUM_THREADS="1", STT_DRAIN_TIMEOUT_S=str(DRAIN_S),
                         **{"STT_ENDPOINTING": "silence", **env})
        self.name = name

    def sessions_held(self, until_wall: float) -> set[str]:
        """Sessions this replica had started or taken, and not ended or handed on, at a time
        (``time.time()``): from its log, which is written line by line."""
        held: set[str] = set()
        for rec in self.logs():
            if rec.get("ts", 0.0) > until_wall:
                break
            if rec.get("msg") in ("session started", "session resumed from another replica"):
                held.add(rec["session_id"])
            elif rec.get("msg") == "session ended":
                held.discard(rec["session_id"])
        return held


async def stop_all(replicas: list[Replica], nc: Any) -> None:
    for r in replicas:
        r.stop()
    await nc.close()


async def wait_balanced(nc: Any, replicas: int) -> dict[str, Heartbeat]:
    return await cluster.wait_balanced(nc, replicas, REPLICAS_PARTITIONS)


def replica_ids(replicas: list[Replica], hbs: dict[str, Any]) -> None:
    """Which heartbeat is which process (from the id each logs when it joins)."""
    for r in replicas:
        r.learn_id()
    assert {r.id for r in replicas} <= set(hbs), (hbs, [r.id for r in replicas])


@dataclass
class Utterance:
    start_wall: float
    end_wall: float       # when its last chunk was published
    duration_s: float     # speech + trailing context the endpoint keeps, roughly
    text: str = ""


@dataclass
class Stream:
    """One session: phrases of the sample with silence between, in its own format."""

    sid: str
    encoding: str
    rate: int
    phrases: list[int]
    started_at: float = 0.0
    utterances: list[Utterance] = field(default_factory=list)
    payload: bytes = b""
    bounds: list[tuple[int, int]] = field(default_factory=list)  # byte ranges of speech
    pos: int = 0
    seq: int = 0

    def build(self, speech: np.ndarray) -> None:
        parts, at = [], 0
        bps = self.rate * (1 if self.encoding in ("mulaw", "alaw") else 2)
        for i in self.phrases:
            a, b = PHRASES[i]
            clip = speech[int(a * SAMPLE_RATE):int(b * SAMPLE_RATE)]
            if self.rate != SAMPLE_RATE:
                clip = clip[::SAMPLE_RATE // self.rate]
            audio = encode(np.concatenate([clip, np.zeros(int(GAP_S * self.rate), np.float32)]),
                           self.encoding)
            parts.append(audio)
            self.bounds.append((at, at + len(clip) * bps // self.rate))
            at += len(audio)
        self.payload = b"".join(parts)
        self.bps = bps
        self.chunk = int(CHUNK_S * bps)


class Load:
    """Streams every session in real time (one 40 ms clock for all) and records the output."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.streams: dict[str, Stream] = {}
        self.received: dict[str, list[tuple[float, dict[str, Any], str | None]]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None

    async def listen(self) -> None:
        async def on_msg(msg: Any) -> None:
            sid = msg.subject.rsplit(".", 1)[-1]
            replica = (msg.headers or {}).get(REPLICA_HEADER)
            self.received[sid].append((time.monotonic(), msgpack.unpackb(msg.data), replica))

        await self.nc.subscribe("ai.voice.transcription.*", cb=on_msg)

    async def add(self, stream: Stream) -> None:
        await self.nc.publish(f"ai.voice.stream.{stream.sid}", protocol.pack({
            "type": "start", "sample_rate": stream.rate, "encoding": stream.encoding}))
        stream.started_at = time.monotonic()
        self.streams[stream.sid] = stream

    def run(self) -> None:
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        t0 = time.monotonic()
        tick = 0
        while True:
            tick += 1
            for s in list(self.streams.values()):
                if s.pos >= len(s.payload):
                    s.pos = 0  # loop the script
                piece = s.payload[s.pos:s.pos + s.chunk]
                now = time.monotonic()
                for a, b in s.bounds:  # record when each phrase's speech was sent in full
                    if s.pos < b <= s.pos + len(piece):
                        s.utterances.append(Utterance(now - (b - a) / s.bps, now,
                                                      (b - a) / s.bps))
                s.pos += len(piece)
                s.seq += 1
                await self.nc.publish(f"ai.voice.stream.{s.sid}", protocol.pack(
                    {"type": "chunk", "audio": piece, "seq": s.seq, "timestamp": time.time()}))
            await asyncio.sleep(max(0.0, t0 + tick * CHUNK_S - time.monotonic()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def end_all(self, timeout_s: float = 30.0) -> None:
        for sid in self.streams:
            await self.nc.publish(f"ai.voice.stream.{sid}", protocol.pack({"type": "end"}))
        await poll_until(lambda: all(self.ended(s) for s in self.streams), timeout_s)

    async def finish(self) -> None:
        """Stop streaming, send every session its ``end``, wait for the answers."""
        await self.stop()
        await self.end_all()

    def ended(self, sid: str) -> bool:
        return any(m.get("type") == "end" for _, m, _ in self.received[sid])

    def finals(self, sid: str) -> list[tuple[float, dict[str, Any], str | None]]:
        return [(t, m, r) for t, m, r in self.received[sid]
                if m.get("type") == "transcript" and m.get("is_final")]

    def final_for(self, sid: str, u: Utterance, within_s: float = 6.0,
                  since: float | None = None) -> tuple[float, dict[str, Any], str | None] | None:
        """The final that answers an utterance: arrived after its speech (or ``since``),
        before the next's."""
        stream = self.streams[sid]
        later = [v.end_wall for v in stream.utterances if v.end_wall > u.end_wall]
        until = min([u.end_wall + within_s, *later])
        after = u.end_wall if since is None else since
        for f in self.finals(sid):
            if after < f[0] <= until:
                return f
        return None


def runs(replicas: list[str | None]) -> list[str | None]:
    """Replicas in the order they spoke, consecutive repeats folded."""
    out: list[str | None] = []
    for r in replicas:
        if not out or out[-1] != r:
            out.append(r)
    return out


async def partitions_held(nc: Any, replica: Replica) -> set[int]:
    hb = (await heartbeats(nc)).get(replica.id or "")
    return set(hb.partitions) if hb else set()


def on_replica(load: Load, replica: Replica, at: float, at_wall: float,
               partitions: set[int]) -> set[str]:
    """The sessions a replica served at a moment: those it last spoke for, those its log says it
    held, those in the partitions its heartbeat listed (a session moved by balancing may not
    have spoken from its new replica yet; one in the middle of a handover is in neither log)."""
    held = replica.sessions_held(at_wall)
    return {sid for sid in load.streams
            if [r for t, _, r in load.received[sid] if t < at][-1:] == [replica.id]
            or sid in held or partition_of(sid, REPLICAS_PARTITIONS) in partitions}


def timeline(load: Load, replicas: list[Replica], sid: str, u: Utterance,
             marks: dict[str, float]) -> str:
    """What a session received around an utterance, and what the replicas logged of it (to tell
    a failure's cause from the assertion alone)."""
    def at(t: float) -> str:
        return " ".join(f"{k}{t - v:+.1f}" for k, v in marks.items())
    names = {r.id: r.name for r in replicas}
    lines = [f"utterance sent {at(u.start_wall)} .. {at(u.end_wall)}"]
    for t, m, r in load.received[sid]:
        if u.start_wall - 10 < t < u.end_wall + 10 and (
                m.get("type") != "transcript" or m.get("is_final")):
            lines.append(f"  {at(t)} {names.get(r, r)} {m.get('type')} seq={m.get('sequence')} "
                         f"{m.get('start', '')}-{m.get('end', '')} {m.get('reason', '')}")
    offset = time.time() - time.monotonic()
    for r in replicas:
        for rec in r.logs():
            if rec.get("session_id") == sid and abs(rec.get("ts", 0) - offset - u.end_wall) < 15:
                lines.append(f"  log {r.name} {at(rec['ts'] - offset)} {rec.get('msg')} "
                             f"{ {k: v for k, v in rec.items() if k not in ('ts', 'msg', 'session_id', 'level')} }")
    return "\n".join(lines)


def last_move(replicas: list[Replica]) -> float:
    """When a partition was last offered or handed over (``time.time()``), from the logs."""
    return max((rec.get("ts", 0.0) for r in replicas for rec in r.logs() if rec.get("msg") in
                ("handing a partition over", "partition handed over")), default=0.0)


def moves_since(replicas: list[Replica], since_wall: float) -> dict[str, int]:
    """Partitions handed over since a time (``time.time()``), by reason, from the logs."""
    moves: dict[str, int] = defaultdict(int)
    for r in replicas:
        for rec in r.logs():
            if rec.get("msg") == "partition handed over" and rec.get("ts", 0) > since_wall:
                moves[rec.get("reason", "?")] += 1
    return dict(moves)


def check_sequences(load: Load, sid: str, crash_at: float | None = None) -> None:
    """``sequence`` +1 for every message; across a crash strictly increasing (a gap)."""
    msgs = load.received[sid]
    for (t0, a, _), (_t1, b, _) in itertools.pairwise(msgs):
        if crash_at is not None and t0 <= crash_at + 10:
            assert b["sequence"] > a["sequence"], (sid, a, b)
        else:
            assert b["sequence"] == a["sequence"] + 1, (sid, a["sequence"], b["sequence"])


# --- the scale check ---------------------------------------------------------------------------


async def test_three_replicas_sixty_sessions_kill_stop_join(tmp_path: Path) -> None:
    speech = load_16k_mono(str(SAMPLE))
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        replicas = [Replica(server.url, f"r{i}", INSTANT, tmp_path) for i in range(3)]
        try:
            hbs = await wait_balanced(nc, 3)
            replica_ids(replicas, hbs)
            load = Load(nc)
            await load.listen()
            for i in range(60):
                mulaw = i % 3 == 0
                stream = Stream(f"s{i:02d}-{os.urandom(3).hex()}", "mulaw" if mulaw else "pcm_s16le",
                                8000 if mulaw else SAMPLE_RATE,
                                [(i + k) % len(PHRASES) for k in range(len(PHRASES))])
                stream.build(speech)
                await load.add(stream)
            load.run()
            await asyncio.sleep(12)

            # --- 1. one replica per session, evenly spread once balancing has moved a few
            # partitions (one move at a time, each waiting for its sessions' pauses)
            settle_by = time.monotonic() + 90
            while True:
                first = {sid: [r for _, _, r in load.received[sid]] for sid in load.streams}
                assert all(first.values()), [s for s, v in first.items() if not v]
                per_replica: dict[str | None, int] = defaultdict(int)
                for sid, spoke in first.items():  # a session may move (balancing), never back
                    assert len(runs(spoke)) == len(set(spoke)), (sid, runs(spoke))
                    per_replica[spoke[-1]] += 1
                counts = sorted(per_replica.values())
                if len(counts) == 3 and counts[-1] <= 1.5 * counts[0]:
                    break
                assert time.monotonic() < settle_by, dict(per_replica)
                await asyncio.sleep(1)
            print(f"sessions per replica after {time.monotonic() - settle_by + 90:.0f} s:",
                  dict(per_replica))
            # a steady load: balancing settles (every move is a chance to lose or repeat words).
            # Once no partition has moved for QUIET_S (within a minute), none moves in the
            # next STEADY_S.
            settled_by = time.time() + 60
            while time.time() - last_move(replicas) < QUIET_S:
                assert time.time() < settled_by, "balancing did not settle in a minute"
                await asyncio.sleep(0.5)
            steady_from = time.time()
            await asyncio.sleep(STEADY_S)
            steady = moves_since(replicas, steady_from)
            print(f"settled {steady_from - settled_by + 60:.0f} s after the spread; partitions "
                  f"moved in the next {STEADY_S:.0f} s of steady load: {steady}")
            assert not steady, steady

            # --- 2. SIGKILL the replica with the most sessions
            killed = max(replicas, key=lambda r: per_replica.get(r.id, 0))
            held_by_killed = await partitions_held(nc, killed)
            killed.proc.kill()
            killed.proc.wait()
            kill_at, kill_wall = time.monotonic(), time.time()
            victims = on_replica(load, killed, kill_at, kill_wall, held_by_killed)
            await asyncio.sleep(20)  # an utterance starts 3 s after the kill and ends

            # --- 3. SIGTERM another
            stopped = next(r for r in replicas if r is not killed)
            held_by_stopped = await partitions_held(nc, stopped)
            term_at, term_wall = time.monotonic(), time.time()
            stopped.proc.send_signal(signal.SIGTERM)
            # waited for off the event loop: the load goes on streaming meanwhile (a blocking
            # wait here stalled every session's audio until the replica exited)
            assert await asyncio.to_thread(stopped.proc.wait, 30) == 0
            stopped_logs = stopped.logs()

            # --- 4. a fourth replica joins; new sessions arrive
            joined = Replica(server.url, "r3", INSTANT, tmp_path)
            replicas.append(joined)
            await wait_balanced(nc, 2)
            replica_ids([r for r in replicas if r.proc.poll() is None], await heartbeats(nc))
            join_at = time.monotonic()
            for i in range(60, 80):
                stream = Stream(f"s{i:02d}-{os.urandom(3).hex()}", "pcm_s16le", SAMPLE_RATE,
                                [(i + k) % len(PHRASES) for k in range(len(PHRASES))])
                stream.build(speech)
                await load.add(stream)
            await asyncio.sleep(14)
            await load.finish()
        finally:
            await stop_all(replicas, nc)

    # every session got its end, from one replica at a time
    assert all(load.ended(s) for s in load.streams), [s for s in load.streams if not load.ended(s)]
    for sid in load.streams:
        # one replica at a time: two speaking at once would repeat or skip a ``sequence``
        # (checked below); a session moves only on a kill, a stop or a rebalancing step
        spoke = runs([r for _, _, r in load.received[sid]])
        assert len(spoke) <= 6, (sid, spoke)
        assert killed.id not in [r for t, _, r in load.received[sid] if t > kill_at + 0.5]
        check_sequences(load, sid, kill_at if sid in victims else None)

    # its partitions were claimed by the others after the lease TTL (2 s) and a lease round: 1.6-2.5 s
    # measured, once 5 s on a loaded machine; utterances begun before that lose their start
    claims = [t for r in replicas if r is not killed for t in r.claims(kill_wall, 15).values()]
    takeover_s = max([*claims, 3.0])
    # every utterance has its final, except the killed replica's in flight at the kill
    stopped_sessions = on_replica(load, stopped, term_at, term_wall, held_by_stopped)
    lost, cut = [], 0
    for sid, stream in load.streams.items():
        for u in stream.utterances:
            if u.end_wall > time.monotonic() - 1 or u.end_wall < stream.started_at + 0.5:
                continue
            if sid in victims and u.start_wall < kill_at + takeover_s and u.end_wall > kill_at - 2.0:
                continue  # in flight when its replica died (or spoken before the takeover)
            # SIGTERM hands each session over at a pause, but within 0.6 x the drain timeout
            # (Worker.give_partition): an utterance still going then is cut, its first part's
            # final published before the speech was sent in full
            in_term = (sid in stopped_sessions and u.start_wall < term_at + TERM_LIMIT_S + 1.5
                       and u.end_wall > term_at)
            f = load.final_for(sid, u, since=u.start_wall if in_term else None)
            if f is None:
                lost.append((sid, round(u.end_wall - kill_at, 1)))
                continue
            # the format was kept: the final spans the phrase (a mu-law 8 kHz session read as
            # 16 kHz PCM would span a quarter of it)
            span = f[1]["end"] - f[1]["start"]
            if abs(span - u.duration_s) >= 1.2 and in_term:
                cut += 1  # SIGTERM's time ran out before a pause: the first part published
                continue
            if abs(span - u.duration_s) >= 1.2:
                print(timeline(load, replicas, sid, u,
                               {"kill": kill_at, "term": term_at, "join": join_at}))
            assert abs(span - u.duration_s) < 1.2, (sid, stream.encoding, span, u.duration_s)
    assert not lost, f"{len(lost)} utterances without a final (session, s after kill): {lost[:10]}"

    # the killed replica's sessions went on elsewhere, each its next utterance after 3 s
    for sid in victims:
        after = [r for t, _, r in load.received[sid] if t > kill_at]
        assert after and killed.id not in after, (sid, runs(after))
        later = [u for u in load.streams[sid].utterances if u.start_wall >= kill_at + takeover_s
                 and u.end_wall < term_at]
        assert later and load.final_for(sid, later[0]) is not None, sid

    # the SIGTERMed replica handed over (not ended) its sessions; the new one took sessions
    assert not [r for r in stopped_logs if r.get("msg") == "partitions not handed over; their sessions end here"]
    assert any(r.get("msg") == "partition handed over" for r in stopped_logs)
    joined_sessions = {sid for sid in load.streams
                       if any(r == joined.id for t, _, r in load.received[sid] if t > join_at)}
    print(f"victims {len(victims)}, lost 0, cut by the SIGTERM {cut} of the "
          f"{len(stopped_sessions)} sessions there, joined replica served {len(joined_sessions)}, "
          f"partitions claimed {min(claims):.2f}-{max(claims):.2f} s after the kill")
    assert claims and max(claims) < 6.0, claims
    assert joined_sessions


# --- the words after a crash --------------------------------------------------------------------


async def test_failover_keeps_the_format_with_real_whisper(tmp_path: Path) -> None:
    """Two replicas with the default engine; 4 sessions (two 8 kHz mu-law) all on one of them
    (each replica holds its share of partitions; the sessions' ids are chosen in its share).
    The owner is SIGKILLed mid-session: the next utterances come from the other, in words."""
    speech = load_16k_mono(str(SAMPLE))
    reference = normalize(" ".join((ROOT / "stt" / "data" / "sample.txt").read_text().split()))
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        replicas = [Replica(server.url, f"w{i}", "faster-whisper", tmp_path) for i in range(2)]
        try:
            hbs = await wait_balanced(nc, 2)
            replica_ids(replicas, hbs)
            owner = replicas[0]
            mine = set(hbs[owner.id].partitions)
            ids = []
            n = 0
            while len(ids) < 4:
                n += 1
                sid = f"f{n}"
                if partition_of(sid, REPLICAS_PARTITIONS) in mine:
                    ids.append(sid)
            load = Load(nc)
            await load.listen()
            for i, sid in enumerate(ids):
                mulaw = i % 2 == 0
                stream = Stream(sid, "mulaw" if mulaw else "pcm_s16le",
                                8000 if mulaw else SAMPLE_RATE, [1, 4, 1, 4, 1, 4])
                stream.build(speech)
                await load.add(stream)
            load.run()
            # every session's first final, from the owner (a slow machine takes its time)
            assert await poll_until(lambda: all(load.finals(s) for s in ids), 60), \
                {s: len(load.finals(s)) for s in ids}
            assert all({r for _, _, r in load.received[s]} == {owner.id} for s in ids), \
                {s: runs([r for _, _, r in load.received[s]]) for s in ids}
            owner.proc.kill()
            owner.proc.wait()
            kill_at, kill_wall = time.monotonic(), time.time()
            await asyncio.sleep(20)
            await load.finish()
        finally:
            await stop_all(replicas, nc)
    other = replicas[1].id
    claims = list(replicas[1].claims(kill_wall).values())
    assert claims and max(claims) < 6.0, claims
    for sid in ids:
        stream = load.streams[sid]
        later = [u for u in stream.utterances if u.start_wall >= kill_at + max(3.0, *claims)]
        assert later, sid
        for u in later[:2]:
            f = load.final_for(sid, u, within_s=8)
            assert f is not None and f[2] == other, (sid, stream.encoding, f)
            words = normalize(f[1]["transcript"]).split()
            hits = sum(w in reference.split() for w in words)
            assert words and hits >= 0.7 * len(words), (sid, stream.encoding, f[1]["transcript"])
        assert load.ended(sid)
    resumed = [r for r in replicas[1].logs() if r.get("msg") == "session resumed from another replica"]
    assert {r["session_id"] for r in resumed} == set(ids)
    assert {r["encoding"] for r in resumed if r["session_id"] in ids[::2]} == {"mulaw"}
    assert {r["sample_rate"] for r in resumed if r["session_id"] in ids[::2]} == {8000}
