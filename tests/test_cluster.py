"""The pure parts of stt.cluster.membership: the partition function, snapshots on the wire, the
balancing plan; one handover step against a real server. The rest of the NATS side is
exercised by tests/test_replicas.py."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Mapping
from typing import Any

import nats
import pytest
from conftest import make_settings
from nats.js.errors import KeyNotFoundError

from stt.cluster.membership import (
    SEGMENTS_AHEAD,
    SEQUENCE_AHEAD,
    SESSION_TTL_S,
    Cluster,
    Heartbeat,
    Move,
    _bucket,
    fair_share,
    next_moves,
    partition_of,
    poll_until,
    preferred,
    session_key,
)
from stt.core.snapshot import SessionSnapshot
from stt.transport.nats_server import REPLICAS_PARTITIONS, NatsServer
from stt.wire.protocol import Start, State


def test_partition_of_is_fnv1a_modulo_n() -> None:
    # FNV-1a 32 of "" is the offset basis; of "a" the published test vector 0xe40c292c
    assert partition_of("", 1 << 32) == 0x811C9DC5
    assert partition_of("a", 1 << 32) == 0xE40C292C
    assert all(0 <= partition_of(f"s{i}", 32) < 32 for i in range(200))
    assert len({partition_of(f"s{i}", 32) for i in range(200)}) == 32


def test_session_keys_are_safe_for_the_bucket() -> None:
    assert session_key(3, "abc-1_2") == "3.abc-1_2"
    assert session_key(3, "a.b c") == "3.x" + b"a.b c".hex()


def test_a_snapshot_survives_the_wire() -> None:
    start = Start(sample_rate=8000, channels=1, encoding="mulaw", state=State.RESPONDING,
                  speaker_id="spk", language="de", prompt="names", word_timestamps=True,
                  endpointing="silence")  # a session's own endpointing goes with it
    snap = SessionSnapshot(start=start, next_sequence=12, next_segment_id=3, last_seq=41,
                           frames=900, finals=2, exact=True, last_message="9f" * 16,
                           context="the last final")
    sid, back, at = SessionSnapshot.from_dict(snap.to_dict("s1", 123.5))
    assert (sid, back, at) == ("s1", snap, 123.5)
    with pytest.raises(KeyError):
        SessionSnapshot.from_dict({"session_id": "s1"})


def test_heartbeats_survive_the_wire() -> None:
    hb = Heartbeat("r1", [3, 1], 7, {1: "r2"}, leaving=True)
    back = Heartbeat.decode(hb.encode())
    assert (back.replica, back.partitions, back.sessions, back.giving, back.leaving) == \
        ("r1", [1, 3], 7, {1: "r2"}, True)


def test_replicas_prefer_different_partitions() -> None:
    assert fair_share(32, 3) == 11 and fair_share(32, 0) == 32
    firsts = {preferred(f"r{i}", range(32))[0] for i in range(8)}
    assert len(firsts) > 4


def hb(replica: str, partitions: int, sessions: int, **kw: object) -> Heartbeat:
    return Heartbeat(replica, list(range(100, 100 + partitions)), sessions, **kw)  # type: ignore[arg-type]


def test_a_replica_over_its_share_hands_its_emptiest_partition_to_the_newcomer() -> None:
    loads = {p: (1 if p % 2 else 0) for p in range(16)}
    view = {"me": hb("me", 16, 8), "other": hb("other", 16, 8), "new": hb("new", 0, 0)}
    assert next_moves("me", view, loads, 32) == [Move(q, "new") for q in (0, 2, 4, 6, 8)]  # 16-11


def test_two_partitions_above_the_fewest_is_one_too_many() -> None:
    loads = dict.fromkeys(range(12), 0)
    view = {"me": hb("me", 12, 0), "a": hb("a", 10, 0), "b": hb("b", 10, 0)}
    assert next_moves("me", view, loads, 32) == [Move(0, "a")]  # 12/10/10 -> 11/11/10
    view = {"me": hb("me", 11, 0), "a": hb("a", 11, 0), "b": hb("b", 10, 0)}
    assert next_moves("me", view, dict.fromkeys(range(11), 0), 32) == []


def test_a_busier_replica_hands_a_partition_of_half_the_gap_to_the_least_loaded() -> None:
    loads = {0: 1, 1: 3, 2: 5, 3: 2}
    view = {"me": hb("me", 4, 11), "low": hb("low", 4, 4)}
    assert next_moves("me", view, loads, 8) == [Move(1, "low", "sessions")]  # gap 7: at most 3


def settle(seed: int, replicas: int = 3, sessions: int = 60, partitions: int = 32,
           rounds: int = 40, cooldown: int = 6) -> tuple[list[tuple[int, Move, int]], list[int]]:
    """The balancing plan played out: hashed sessions, every replica at its fair share of
    partitions (as they claim them), then round after round one replica's moves applied (the
    cluster's one-giver-at-a-time rule), partitions received lately frozen. The moves made
    (round, move, its sessions) and the sessions per replica at the end."""
    rng = random.Random(seed)
    names = [f"r{i}" for i in range(replicas)]
    owner = {p: names[i % replicas] for i, p in enumerate(rng.sample(range(partitions), partitions))}
    load = [0] * partitions
    for i in range(sessions):
        load[partition_of(f"s{i}-{rng.getrandbits(24):x}", partitions)] += 1
    received: dict[int, int] = {}
    made: list[tuple[int, Move, int]] = []
    for rnd in range(rounds):
        for r in rng.sample(names, replicas):
            view = {n: Heartbeat(n, sorted(q for q, o in owner.items() if o == n),
                                 sum(load[q] for q, o in owner.items() if o == n)) for n in names}
            moves = next_moves(r, view, {q: load[q] for q, o in owner.items() if o == r},
                               partitions, [q for q, at in received.items() if rnd - at < cooldown])
            for m in moves:
                owner[m.partition], received[m.partition] = m.to, rnd
                made.append((rnd, m, load[m.partition]))
            if moves:
                break
    return made, [sum(load[q] for q, o in owner.items() if o == n) for n in names]


def test_balancing_settles_and_never_sends_sessions_back() -> None:
    """200 random placements: the spread ends within 1.5x, the last move comes within a few
    rounds, and no partition with sessions moves twice (each move is a chance to lose or
    repeat words)."""
    last, moved = [], []
    for seed in range(200):
        made, per_replica = settle(seed)
        assert max(per_replica) <= 1.5 * min(per_replica), (seed, per_replica)
        loaded = [m.partition for _, m, n in made if n]
        assert len(loaded) == len(set(loaded)), (seed, made)
        assert {m.reason for _, m, _ in made} <= {"partitions", "sessions"}
        last.append(max((rnd for rnd, _, _ in made), default=0))
        moved.append(sum(n for _, _, n in made))
    assert max(last) <= 10, max(last)
    assert sum(moved) / len(moved) < 8, sum(moved) / len(moved)  # of 60 sessions


def test_balanced_enough_means_no_move() -> None:
    loads = {0: 5, 1: 5}
    assert next_moves("me", {"me": hb("me", 2, 10), "o": hb("o", 2, 9)}, loads, 4) == []
    assert next_moves("me", {"me": hb("me", 2, 10)}, loads, 4) == []  # alone


def test_partitions_received_lately_stay() -> None:
    loads = {0: 1, 1: 3, 2: 5, 3: 2}
    view = {"me": hb("me", 4, 11), "low": hb("low", 4, 4)}
    # "low" is at its share (4 of 8): one partition more at most, the fullest that fits
    assert next_moves("me", view, loads, 8, frozen=[1]) == [Move(3, "low", "sessions")]
    assert next_moves("me", view, loads, 8, frozen=[0, 1, 3]) == []


def test_no_move_by_sessions_while_another_replica_is_handing_over() -> None:
    loads = {0: 1, 1: 3, 2: 5, 3: 2}
    view = {"me": hb("me", 4, 11), "low": hb("low", 4, 4), "busy": hb("busy", 4, 9, giving={7: "low"})}
    assert next_moves("me", view, loads, 12) == []


def test_leaving_replicas_neither_count_nor_receive() -> None:
    loads = {0: 1, 1: 3, 2: 5, 3: 2}
    view = {"me": hb("me", 4, 11), "gone": hb("gone", 0, 0, leaving=True)}
    assert next_moves("me", view, loads, 8) == []


def test_a_newcomer_fills_up_from_givers_at_once_frozen_partitions_last() -> None:
    loads = dict.fromkeys(range(16), 0)
    view = {"me": hb("me", 16, 0), "o": hb("o", 16, 0, giving={20: "new"}), "new": hb("new", 1, 0)}
    moves = next_moves("me", view, loads, 32, frozen=range(8))
    assert moves == [Move(q, "new") for q in (8, 9, 10, 11, 12)]
    assert next_moves("me", view, loads, 32, frozen=range(14))[-3:] == [
        Move(q, "new") for q in (0, 1, 2)]


def test_a_move_by_partitions_never_leaves_the_taker_busier() -> None:
    loads = {p: 3 for p in range(14)}  # 42 sessions here, the newcomer has 36 already
    view = {"me": hb("me", 14, 42), "new": hb("new", 2, 36)}
    assert next_moves("me", view, loads, 16) == [Move(0, "new")]  # 39 vs 39, then no more


# --- against a real server ---------------------------------------------------------------------


class EndsWhatItAdopts:
    """A replica whose adopted sessions all end among the held messages it replays (their
    ``end`` came while the partition was being handed over)."""

    def __init__(self) -> None:
        self.cluster: Cluster | None = None
        self.adopted: list[str] = []

    async def subscribe_partition(self, partition: int) -> None:
        return None

    async def unsubscribe_partition(self, partition: int) -> None:
        return None

    async def catch_up(self, partition: int) -> None:
        return None

    def adopt_partition(self, partition: int, snapshots: Mapping[str, SessionSnapshot],
                        written_at: Mapping[str, float], handed_over: bool = False) -> None:
        assert self.cluster is not None
        for sid in snapshots:
            self.adopted.append(sid)
            self.cluster.forget(partition, sid)

    async def give_partition(self, partition: int, wait_s: float) -> dict[str, SessionSnapshot]:
        return {}

    def drop_partition(self, partition: int) -> None:
        return None

    def partition_loads(self) -> dict[int, int]:
        return {}


async def test_a_session_that_ended_during_its_handover_keeps_no_snapshot() -> None:
    """Otherwise the next replica to claim the partition would resume a session long over."""
    start = Start(sample_rate=16000, channels=1, encoding="pcm_s16le", state=State.LISTENING)
    snap = SessionSnapshot(start=start, next_sequence=40, next_segment_id=3, last_seq=500,
                           frames=900, finals=2, exact=True)
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        host = EndsWhatItAdopts()
        cluster = Cluster(make_settings(server.url, partitions=REPLICAS_PARTITIONS), host)
        host.cluster = cluster
        try:  # the buckets without the lease loop: step 4 of a handover, on its own
            await take_over_from_a_gone_replica(cluster, nc, snap)
            await cluster._flush_saves()
            assert host.adopted == ["s1"] and 5 not in cluster.taking
            with pytest.raises(KeyNotFoundError):
                await cluster._store.get(session_key(5, "s1"))
        finally:
            await nc.close()


async def take_over_from_a_gone_replica(cluster: Cluster, nc: Any, snap: SessionSnapshot) -> None:
    """Step 4 of a handover on its own: the buckets without the lease loop, a handover note for
    partition 5 from a replica that is gone, and the takeover it starts."""
    js = nc.jetstream()
    cluster._js, cluster._names = js, ("stt-leases", "stt-sessions")
    cluster._leases = await _bucket(js, "stt-leases", 2.0)
    cluster._store = await _bucket(js, "stt-sessions", SESSION_TTL_S)
    cluster.taking[5] = ("gone", time.monotonic())
    note = {"from": "gone", "to": cluster.replica_id,
            "sessions": {"s1": snap.to_dict("s1", time.time())}}
    await cluster._leases.put("h.5", json.dumps(note).encode())
    await cluster._finish_takeovers({"h.5"}, {})


class KeepsWhatItAdopts(EndsWhatItAdopts):
    def adopt_partition(self, partition: int, snapshots: Mapping[str, SessionSnapshot],
                        written_at: Mapping[str, float], handed_over: bool = False) -> None:
        self.adopted += list(snapshots)


async def test_a_taker_reserves_numbers_before_it_publishes() -> None:
    """The giver's exact numbers, written as they are, would let a crash of the taker right after
    its first messages resume below them: ``sequence`` twice."""
    start = Start(sample_rate=16000, channels=1, encoding="pcm_s16le", state=State.LISTENING)
    snap = SessionSnapshot(start=start, next_sequence=40, next_segment_id=3, last_seq=None,
                           frames=900, finals=2, exact=True, last_message="ab" * 16)
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        host = KeepsWhatItAdopts()
        cluster = Cluster(make_settings(server.url, partitions=REPLICAS_PARTITIONS), host)
        try:
            await take_over_from_a_gone_replica(cluster, nc, snap)
            assert host.adopted == ["s1"]
            _, kept, _ = SessionSnapshot.from_dict(json.loads((await cluster._store.get(
                session_key(5, "s1"))).value))
            assert kept.next_sequence == 40 + SEQUENCE_AHEAD and not kept.exact
            assert kept.next_segment_id == 3 + SEGMENTS_AHEAD and kept.frames == 900
        finally:
            await nc.close()


class GivesUntilDropped(EndsWhatItAdopts):
    """A giver whose handover waits on an utterance that never ends, until the partition is
    dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[int] = []
        self._gone = asyncio.Event()

    async def give_partition(self, partition: int,
                             wait_s: float) -> dict[str, SessionSnapshot] | None:
        await self._gone.wait()
        return None

    def drop_partition(self, partition: int) -> None:
        self.dropped.append(partition)
        self._gone.set()


async def test_a_handover_whose_taker_died_stops_when_another_replica_claims_the_partition() -> None:
    """The taker was SIGKILLed mid-handover and a third replica claimed the partition: it
    resumes the sessions (durable: replays what was not acknowledged), so the giver must not
    finish its open utterance, which would publish it twice, nor write a handover note."""
    with NatsServer.for_replicas() as server:
        nc = await nats.connect(server.url)
        host = GivesUntilDropped()
        cluster = Cluster(make_settings(server.url, partitions=REPLICAS_PARTITIONS), host)
        host.cluster = cluster
        try:
            js = nc.jetstream()
            cluster._js, cluster._names = js, ("stt-leases", "stt-sessions")
            cluster._leases = await _bucket(js, "stt-leases", 2.0)
            cluster._store = await _bucket(js, "stt-sessions", SESSION_TTL_S)
            me = cluster.replica_id
            cluster.owned[5] = await cluster._leases.create(
                "p.5", json.dumps({"owner": me, "state": "owned"}).encode())
            await cluster._leases.put("p.5", json.dumps(
                {"owner": "taker", "state": "taking", "from": me}).encode())
            cluster.giving[5] = "taker"
            await cluster._renew()  # step 3 starts: the giver finishes its sessions
            assert 5 in cluster._busy and not host.dropped
            await cluster._renew()  # the taker alive: the handover goes on
            assert not host.dropped
            await cluster._leases.put("p.5", json.dumps(
                {"owner": "third", "state": "owned"}).encode())  # the taker died; claimed
            await cluster._renew()
            await poll_until(lambda: 5 not in cluster._busy, 5.0)
            assert host.dropped == [5] and 5 not in cluster.owned
            with pytest.raises(KeyNotFoundError):
                await cluster._leases.get("h.5")
        finally:
            await nc.close()
