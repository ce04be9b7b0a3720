"""Many replicas, every session on exactly one: partitions of the input subject, owned through
leases in a JetStream key-value bucket, with each session's format kept beside them.

Long because the protocol between replicas (leases, heartbeats, the balancing plan, handovers
and crash takeovers) is one state machine whose steps only make sense together; the plan is
pure functions (:func:`next_moves`) tested on their own.

How a session's messages reach one replica
------------------------------------------
nats-server maps ``ai.voice.stream.{id}`` to ``stt.in.{partition}.{id}`` with its
``partition(N,1)`` subject mapping (``k8s/nats/nats-server.conf``): the partition is FNV-1a of
the session id modulo N (:func:`partition_of` computes the same, and :meth:`Cluster.start` checks
the server agrees). A replica subscribes to the partitions it holds a lease on and to no other,
so every message of a session reaches the one replica that holds its partition. Front-ends
publish to the same subjects as before.

Leases (bucket ``{STT_CLUSTER_BUCKET}-leases``, max age ``STT_LEASE_TTL_S``)
--------------------------------------------------------------------------------
* ``p.{n}``: partition n's owner. Taken with *create* (fails if the key exists), renewed every
  TTL/4 with *update* on the revision last written (fails if anyone else wrote since). A replica
  that dies stops renewing; the server expires the key after the TTL and a replica below its
  fair share takes the partition. The server decides every race; no clock is compared.
* ``r.{replica}``: each replica's heartbeat (its partitions, its session count, what it is
  handing over and to whom, its liveness subject), rewritten every tick. The heartbeats are
  every replica's view of the others; a replica that stops writing drops out of it after the TTL.

A crash is noticed sooner than the TTL: each replica answers requests on its liveness subject
``{STT_CLUSTER_BUCKET}.alive.{replica}`` while its connection lives. A SIGKILLed (or OOM-killed)
process's socket closes at once and the server then answers "no responders"; the others ask
every lease round, and a replica that gives that answer twice is gone: its heartbeat is deleted
and its leases are taken at once (an update on the lease's revision, so one replica wins each).
A replica that is only slow or stopped (the request times out) is left to its lease, and
nothing is taken for gone for 2 x TTL after this replica's own reconnection (after a server
restart the others reconnect a moment later).

Balancing (:func:`next_moves`): free partitions go to the replicas below
``ceil(N / replicas)``; a replica holding more partitions than its share hands its excess,
emptiest first, to the replica with the fewest; a replica with clearly more sessions than the
least loaded hands that one a partition with a few sessions. Hash placement alone leaves 60
sessions on 3 replicas more than 1.5x apart 4 times in 10; this is what keeps them even. Damped
so that it settles instead of churning: moves by sessions one at a time across the cluster (none
while a heartbeat shows another), ``MOVE_SETTLE_S`` after a replica's moves for the heartbeats
to show them, and a partition received by a handover stays ``MOVE_COOLDOWN_S`` (it moves on by
sessions only after that), so no session is sent back to where it came from.

Handover (SIGTERM, a replica joining, load)
-------------------------------------------
1. The giver names the taker in its heartbeat.
2. The taker subscribes to the partition, holding what arrives, then writes ``p.{n}`` =
   ``taking`` (an update on the revision it read).
3. The giver's next renewal fails and reads why. It hands each session over as it reaches a
   pause between utterances (its later messages are the taker's, held there); one still
   speaking after ``STT_HANDOVER_WAIT_S`` on SIGTERM or ``REBALANCE_WAIT_S`` for a rebalancing
   move is handed when that utterance ends (cut only past the longest utterance). Then it
   unsubscribes and writes ``h.{n}``: every session's exact snapshot, with a digest of the
   last message the session handled there.
4. The taker resumes those sessions (format, state, ``sequence``, ``segment_id``, timeline) and
   handles the held messages, skipping those the giver had handled: up to the one with that
   digest (and chunks up to the giver's last ``seq``).
Every message is handled by exactly one replica and no utterance is cut. A taker that hears
nothing within ``HANDOVER_TIMEOUT_S`` (the giver died) carries on as after a crash.

Session formats (bucket ``{STT_CLUSTER_BUCKET}-sessions``)
------------------------------------------------------------
``{n}.{session}`` holds a snapshot written at the session's start, on a state change, on each
final and when the ``sequence``/``segment_id`` numbers it reserved run low, deleted when the
session ends. After a crash the taker of the partition resumes those sessions in their format
(an 8 kHz mu-law session stays one) from the reserved numbers, with the finals counted and the
last one as decoding context. The utterance in flight at the crash is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

from stt.config import Settings
from stt.config.cluster import ClusterSettings
from stt.core.snapshot import SessionSnapshot
from stt.core.vad import FRAME_S

log = logging.getLogger("stt.cluster")

REPLICA_HEADER = "Stt-Replica"  # on every message a replica publishes: its id
PROBE_PREFIX = "_stt-probe-"   # session ids the mapping check uses; workers ignore them
SEQUENCE_AHEAD = 200           # sequence numbers a snapshot reserves (a crash skips at most these)
SEGMENTS_AHEAD = 20            # segment ids it reserves
SESSION_TTL_S = 3600.0         # snapshots live this long unless rewritten (SESSION_REFRESH_S)
SESSION_REFRESH_S = 900.0
HANDOVER_TIMEOUT_S = 30.0      # a taker that hears nothing from the giver carries on without it
LOAD_SLACK = 2                 # sessions a replica may have above the least loaded one ...
LOAD_RATIO = 1.2               # ... and this ratio, before it hands one of its partitions over
MOVE_COOLDOWN_S = 60.0         # a partition received by a handover stays this long
REBALANCE_WAIT_S = 10.0        # a move not forced by SIGTERM waits this long for pauses
MOVE_SETTLE_S = 2.0            # after a handover, heartbeats are this long catching up
ALIVE_TIMEOUT_S = 0.5          # a liveness request's longest wait (a live replica answers at once)
GONE_CONFIRM_S = 0.1           # "no responders" twice, this far apart, before a replica is gone
_KEY_SAFE = re.compile(r"[-_=A-Za-z0-9]+")


def partition_of(session_id: str, partitions: int) -> int:
    """The server's ``partition(N, 1)``: 32-bit FNV-1a of the session id, modulo N."""
    h = 0x811C9DC5
    for byte in session_id.encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def session_key(partition: int, session_id: str) -> str:
    """A bucket key for the session (key-value keys allow fewer characters than subjects)."""
    token = session_id if _KEY_SAFE.fullmatch(session_id) else "x" + session_id.encode().hex()
    return f"{partition}.{token}"


# --- snapshots on the wire -----------------------------------------------------------------


def reserved(snap: SessionSnapshot) -> SessionSnapshot:
    """A snapshot with numbers reserved ahead of ``snap``'s, as a replica writes it before it
    publishes for the session: a crash resumes the session above anything published."""
    return replace(snap, next_sequence=snap.next_sequence + SEQUENCE_AHEAD,
                   next_segment_id=snap.next_segment_id + SEGMENTS_AHEAD, exact=False,
                   last_message=None)


# --- the view and the plan (pure) ------------------------------------------------------------


@dataclass
class Heartbeat:
    replica: str
    partitions: list[int] = field(default_factory=list)
    sessions: int = 0
    giving: dict[int, str] = field(default_factory=dict)  # partition -> taker
    leaving: bool = False
    alive: str = ""  # the subject the replica answers while connected ("": it does not)

    def encode(self) -> bytes:
        return json.dumps({"replica": self.replica, "partitions": sorted(self.partitions),
                           "sessions": self.sessions,
                           "giving": {str(p): t for p, t in self.giving.items()},
                           "leaving": self.leaving, "alive": self.alive}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Heartbeat:
        d = json.loads(data)
        return cls(str(d["replica"]), [int(p) for p in d.get("partitions", [])],
                   int(d.get("sessions", 0)),
                   {int(p): str(t) for p, t in (d.get("giving") or {}).items()},
                   bool(d.get("leaving")), str(d.get("alive") or ""))


def fair_share(partitions: int, replicas: int) -> int:
    return math.ceil(partitions / max(1, replicas))


def preferred(replica: str, candidates: Iterable[int]) -> list[int]:
    """Candidates in this replica's order of preference (rendezvous hashing), so replicas
    that claim at the same moment mostly reach for different partitions."""
    return sorted(candidates, key=lambda p: partition_of(f"{replica}/{p}", 1 << 30))


@dataclass(frozen=True)
class Move:
    partition: int
    to: str
    reason: str = "partitions"  # partitions (over the fair share) or sessions (load)


def next_moves(me: str, view: Mapping[str, Heartbeat], loads: Mapping[int, int],
               partitions: int, frozen: Iterable[int] = ()) -> list[Move]:
    """The partitions this replica should hand over now (``loads``: its sessions per
    partition; ``frozen``: partitions it received lately). Only replicas that are not leaving
    count and receive.

    By partitions, when it holds more than its share: the replica with the fewest takes up to
    the excess, emptiest first, as long as it then holds fewer partitions, and no more
    sessions, than this one; frozen ones go last. Exact on any view: each giver gives only
    its own excess, so a joining replica fills up from every giver at once.
    By sessions, one replica at a time across the cluster (none while a heartbeat shows another
    giving, as the loads in it are about to change): the least loaded replica takes partitions
    of at most half the difference in all, fullest first, never a frozen one, so no session is
    sent back where it was."""
    peers = {r: hb for r, hb in view.items() if r != me and not hb.leaving}
    if not peers or not loads:
        return []
    share = fair_share(partitions, len(peers) + 1)
    mine = sum(loads.values())
    stay = set(frozen)
    fewest = min(peers.values(), key=lambda hb: (len(hb.partitions), hb.sessions, hb.replica))
    room = min(len(loads) - share, (len(loads) - len(fewest.partitions)) // 2)
    moves: list[Move] = []
    moved = 0  # sessions
    for q in sorted(loads, key=lambda q: (q in stay, loads[q], q))[:max(0, room)]:
        moved += loads[q]
        # sessions move for the count only when it is off by more than one partition: one
        # over the share is what a move by sessions leaves, and undoing it would ping-pong
        if loads[q] and (fewest.sessions + moved > mine - moved or len(loads) - share < 2):
            break
        moves.append(Move(q, fewest.replica, "partitions"))
    if moves or any(hb.giving for hb in peers.values()):
        return moves
    least = min(peers.values(), key=lambda hb: (hb.sessions, len(hb.partitions), hb.replica))
    gap = mine - least.sessions
    if gap >= LOAD_SLACK and mine > LOAD_RATIO * least.sessions:
        budget = gap // 2
        room = share + 1 - len(least.partitions)  # never more than one over its share
        for q in sorted(loads, key=lambda q: (-loads[q], q)):  # the fullest that fit, at once
            if q not in stay and 0 < loads[q] <= budget and len(moves) < room:
                moves.append(Move(q, least.replica, "sessions"))
                budget -= loads[q]
    return moves


# --- the replica's side ------------------------------------------------------------------------


class PartitionHost(Protocol):
    """What the cluster asks of the worker (stt.transport.worker.Worker implements it)."""

    async def subscribe_partition(self, partition: int) -> None:
        """Subscribe, holding what arrives until :meth:`adopt_partition`."""

    async def unsubscribe_partition(self, partition: int) -> None: ...

    async def catch_up(self, partition: int) -> None:
        """Until the messages the server sent so far are held (before a handover's adopt)."""

    def adopt_partition(self, partition: int, snapshots: Mapping[str, SessionSnapshot],
                        written_at: Mapping[str, float], handed_over: bool = False) -> None:
        """Resume these sessions, then handle the held messages and go live (``handed_over``:
        the snapshots are all the giver's live sessions)."""

    async def give_partition(self, partition: int,
                             wait_s: float) -> dict[str, SessionSnapshot] | None:
        """Wait for quiet (at most ``wait_s``), stop taking messages, finish what is open;
        the sessions' exact snapshots (None: :meth:`drop_partition` was called meanwhile)."""

    def drop_partition(self, partition: int) -> None:
        """The lease was lost: forget the partition's sessions without a word (a handover of
        it under way included)."""

    def partition_loads(self) -> dict[int, int]: ...


class Cluster:
    """One replica's membership: leases, heartbeats, handovers and session snapshots."""

    def __init__(self, settings: Settings, host: PartitionHost,
                 replica_id: str | None = None) -> None:
        self.settings = settings
        self.host = host
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.partitions = settings.cluster.partitions
        self.period_s = settings.cluster.lease_ttl_s / 4
        self.owned: dict[int, int] = {}          # partition -> revision of our last write
        self.giving: dict[int, str] = {}         # partition -> taker named in our heartbeat
        self.taking: dict[int, tuple[str, float]] = {}  # partition -> (giver, since)
        self.view: dict[str, Heartbeat] = {}
        self.leaving = False
        self.joined = asyncio.Event()
        self.handovers = 0
        # partitions handed over, by why: partitions (over the fair share), sessions (load),
        # leaving (SIGTERM); every move is a chance for a session to lose or repeat words
        self.moves: dict[str, int] = {}
        self._reasons: dict[int, str] = {}
        self.takeovers = 0
        self._js: Any = None
        self._names = ("", "")  # the leases' and the sessions' buckets
        self._leases: Any = None
        self._store: Any = None
        self._nc: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy: set[int] = set()             # partitions with a handover step running
        self._received: dict[int, float] = {}    # partition -> when a handover brought it
        self._offered: dict[int, float] = {}     # partition -> when we named its taker
        self._settle_until = 0.0                 # no move of ours before this (monotonic)
        self._free_since: dict[int, float] = {}  # partition -> when this replica saw it free
        self._tasks: set[asyncio.Task[Any]] = set()
        self._saves: dict[str, tuple[int, dict[str, Any] | None]] = {}  # key -> (partition, value)
        self._saved: dict[str, float] = {}       # key -> monotonic time of the last write
        self._save_wake = asyncio.Event()
        self.alive_subject = f"{settings.cluster.cluster_bucket}.alive.{self.replica_id}"
        self.gone_seen = 0  # replicas found gone by their closed connection (not the lease TTL)
        self._gone: dict[str, float] = {}   # replica -> when it was found gone (monotonic)
        self._orphans: dict[int, str] = {}  # partition -> the gone replica whose lease it is
        self._takers: dict[int, str] = {}  # partition being given -> the replica taking it
        self._voided: set[int] = set()  # partitions given whose handover went void
        self._reconnects = 0
        self._probe_from = 0.0              # no replica is taken for gone before this

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, nc: Client) -> None:
        self._nc = nc
        js = nc.jetstream()
        prefix = self.settings.cluster.cluster_bucket
        self._js = js
        self._names = (f"{prefix}-leases", f"{prefix}-sessions")
        self._leases = await _bucket(js, self._names[0], self.settings.cluster.lease_ttl_s)
        self._store = await _bucket(js, self._names[1], SESSION_TTL_S)
        await self.check_mapping(nc)
        # answered while this replica's connection lives: the others probe it (_gone)
        await nc.subscribe(self.alive_subject, cb=self._on_alive)
        await _subscribed(nc)
        await self._beat()
        self._task = asyncio.create_task(self._run())
        self._spawn(self._writer())
        log.info("joined the replicas", extra={"replica": self.replica_id,
                                                "partitions": self.partitions,
                                                "lease_ttl_s": self.settings.cluster.lease_ttl_s})

    async def check_mapping(self, nc: Client) -> None:
        """Probe the server's mapping: each probe must arrive on the partition computed here."""
        s = self.settings
        ids = [f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}" for _ in range(6)]
        arrived: dict[str, str] = {}
        all_in = asyncio.Event()

        async def on_probe(msg: Any) -> None:
            arrived[msg.subject.rsplit(".", 1)[-1]] = msg.subject
            if len(arrived) == len(ids):
                all_in.set()

        source, target = s.nats.input_subject, s.cluster.partition_subject
        base = source.rsplit(".", 1)[0]
        subs = [await nc.subscribe(f"{target}.*.{i}", cb=on_probe) for i in ids]
        try:
            await _subscribed(nc)
            for i in ids:
                await nc.publish(f"{base}.{i}", b"")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_in.wait(), 2.0)
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        want = (f'"{source}": "{target}.{{{{partition({self.partitions},1)}}}}'
                f'.{{{{wildcard(1)}}}}"')
        if not arrived:
            raise ClusterConfigError(
                f"STT_PARTITIONS={self.partitions} needs the server mapping {want} "
                "(k8s/nats/nats-server.conf); messages to "
                f"{s.nats.input_subject} do not reach {s.cluster.partition_subject}.*")
        wrong = [i for i in ids if arrived.get(i) != f"{s.cluster.partition_subject}."
                 f"{partition_of(i, self.partitions)}.{i}"]
        if wrong:
            raise ClusterConfigError(
                f"the server's mapping does not split into STT_PARTITIONS={self.partitions} "
                f"partitions (a probe arrived on {arrived.get(wrong[0])!r}); set STT_PARTITIONS to "
                f"its N, or the mapping to {want}")

    async def leave(self, timeout_s: float) -> None:
        """SIGTERM: hand every partition to the other replicas; what none takes in time stays
        here (its sessions then end as on a single worker's shutdown)."""
        self.leaving = True
        deadline = time.monotonic() + timeout_s
        alone = False
        while time.monotonic() < deadline and (self.owned or self._busy):
            peers = sorted((hb for r, hb in self.view.items()
                            if r != self.replica_id and not hb.leaving),
                           key=lambda hb: (hb.sessions, hb.replica))
            if not peers:
                alone = True
                break
            loads = self.host.partition_loads()
            for i, p in enumerate(sorted(set(self.owned) - set(self.giving),
                                         key=lambda q: -loads.get(q, 0))):
                self._offer(p, peers[i % len(peers)].replica, "leaving")
            await asyncio.sleep(self.period_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        left = dict(self.owned)
        if left and alone:  # the last replica (or the others are leaving too)
            log.info("no other replica to hand the partitions to; their sessions end here",
                     extra={"partitions": sorted(left)})
        elif left:
            log.warning("partitions not handed over; their sessions end here",
                        extra={"partitions": sorted(left)})
        await self._flush_saves()
        for p in left:  # free them now rather than after the TTL (by the lease's own revision:
            with contextlib.suppress(Exception):  # a renewal cut short left ours stale)
                entry = await self._leases.get(f"p.{p}")
                if json.loads(entry.value or b"{}").get("owner") == self.replica_id:
                    await self._leases.delete(f"p.{p}", last=entry.revision)
        with contextlib.suppress(Exception):
            await self._leases.delete(f"r.{self.replica_id}")

    async def close(self) -> None:
        for task in [*self._tasks, *([self._task] if self._task else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._task] if self._task else []),
                             return_exceptions=True)
        self._task = None

    def status(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "partitions": sorted(self.owned),
                "replicas": len(self.view), "giving": dict(self.giving),
                "taking": sorted(self.taking), "handovers": self.handovers, "moves": dict(self.moves),
                "takeovers": self.takeovers, "replicas_gone": self.gone_seen}

    # --- session snapshots ---------------------------------------------------------------------

    def save(self, partition: int, session_id: str, snap: SessionSnapshot) -> None:
        """Write the session's snapshot soon (writes of one session coalesce)."""
        key = session_key(partition, session_id)
        self._saves[key] = (partition, snap.to_dict(session_id, time.time()))
        self._saved[key] = time.monotonic()
        self._save_wake.set()

    def forget(self, partition: int, session_id: str) -> None:
        key = session_key(partition, session_id)
        self._saves[key] = (partition, None)
        self._saved.pop(key, None)
        self._save_wake.set()

    def stale(self, partition: int, session_id: str) -> bool:
        """Not written for SESSION_REFRESH_S (the bucket would expire it)."""
        at = self._saved.get(session_key(partition, session_id))
        return at is None or time.monotonic() - at > SESSION_REFRESH_S

    async def _writer(self) -> None:
        while True:
            await self._save_wake.wait()
            self._save_wake.clear()
            await self._flush_saves()

    async def _flush_saves(self) -> None:
        while self._saves:
            key, (_, value) = next(iter(self._saves.items()))
            del self._saves[key]
            try:
                if value is None:
                    await self._store.purge(key)
                else:
                    await self._store.put(key, json.dumps(value).encode())
            except Exception as exc:  # NATS away: the session still runs; a crash would lose it
                log.warning("session snapshot not written: %s", exc, extra={"key": key})

    async def _load(self, partition: int) -> tuple[dict[str, SessionSnapshot], dict[str, float]]:
        """The snapshots kept for a partition's sessions."""
        snaps: dict[str, SessionSnapshot] = {}
        written: dict[str, float] = {}
        for key in await _keys(self._js, self._names[1], f"{partition}.>"):
            try:
                entry = await self._store.get(key)
                sid, snap, at = SessionSnapshot.from_dict(json.loads(entry.value))
            except (KeyNotFoundError, KeyError, ValueError, TypeError) as exc:
                log.debug("snapshot %s skipped: %s", key, exc)
                continue
            snaps[sid], written[sid] = snap, at
        return snaps, written

    # --- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or slow: the leases we hold run on, retried
                log.warning("lease round failed: %s", exc or type(exc).__name__)
            await asyncio.sleep(self.period_s)

    async def _beat(self) -> None:
        loads = self.host.partition_loads()
        hb = Heartbeat(self.replica_id, sorted(self.owned), sum(loads.values()),
                       dict(self.giving), self.leaving, self.alive_subject)
        await self._leases.put(f"r.{self.replica_id}", hb.encode())
        self.view[self.replica_id] = hb

    async def _tick(self) -> None:
        await self._beat()
        await self._renew()
        keys = set(await _keys(self._js, self._names[0], ">"))
        view = await self._without_gone(await _heartbeats_in(self._leases, keys))
        self.view = view
        self.joined.set()
        self._withdraw_stale_offers(view)
        await self._take_offered(view)
        await self._finish_takeovers(keys, view)
        if self.leaving:
            return
        held = {int(k[2:]) for k in keys if k.startswith("p.") and k[2:].isdigit()}
        held -= set(self._orphans)  # leases of replicas gone: free to take now
        free = [p for p in range(self.partitions) if p not in held and p not in self.owned]
        live = [hb for hb in view.values() if not hb.leaving]
        want = fair_share(self.partitions, len(live)) - len(self.owned) - len(self.taking)
        picks = preferred(self.replica_id, free)[:max(0, want)]
        # A partition nobody took within a lease round is taken whatever the shares (every
        # replica may be at its share while handovers run): its sessions' audio goes nowhere
        # meanwhile. Balancing moves it on later.
        now = time.monotonic()
        self._free_since = {p: self._free_since.get(p, now) for p in free}
        picks += [p for p in free if p not in picks and now - self._free_since[p] >= self.period_s]
        for p in picks:
            await self._claim(p)
        if picks:  # the others see them taken now, not a lease round later
            await self._beat()
        if not self.giving and not self.taking and not self._busy and now >= self._settle_until:
            frozen = [p for p, at in self._received.items() if now - at < MOVE_COOLDOWN_S]
            for move in next_moves(self.replica_id, view, self.host.partition_loads(),
                                   self.partitions, frozen):
                log.info("handing a partition over", extra={
                    "partition": move.partition, "to": move.to, "reason": move.reason})
                self._offer(move.partition, move.to, move.reason)

    def _offer(self, p: int, to: str, reason: str) -> None:
        """Step 1: name the taker (in the next heartbeat)."""
        self.giving[p] = to
        self._reasons[p] = reason
        self._offered[p] = time.monotonic()

    def _withdraw_stale_offers(self, view: Mapping[str, Heartbeat]) -> None:
        """An offer whose taker went away (or never answered) is withdrawn: the partition stays
        here, and balancing (or leave) offers it again, to someone who is there."""
        now = time.monotonic()
        for p, to in list(self.giving.items()):
            if p in self._busy:
                continue  # the taker answered: step 3 runs
            gone = to not in view or view[to].leaving
            if gone or now - self._offered.get(p, now) > HANDOVER_TIMEOUT_S:
                log.warning("handover offer withdrawn: the taker %s", "went away" if gone
                            else "did not answer", extra={"partition": p, "to": to})
                del self.giving[p]
                self._offered.pop(p, None)
                self._reasons.pop(p, None)

    async def _renew(self) -> None:
        for p, rev in list(self.owned.items()):
            if p in self._busy and p in self.owned:
                await self._check_giving(p)
            if p in self._busy or p not in self.owned:
                continue  # handing over, or handed over while this loop awaited another write
            lease_value: dict[str, Any] = {"owner": self.replica_id, "state": "owned"}
            if p in self.taking:  # the giver reads this until it has handed the partition over
                lease_value.update(state="taking", **{"from": self.taking[p][0]})
            value = json.dumps(lease_value).encode()
            try:
                self.owned[p] = await self._leases.update(f"p.{p}", value, last=rev)
                continue
            except KeyWrongLastSequenceError:
                pass
            try:  # someone else wrote it: a taker we named, or we lapsed
                lease = json.loads((await self._leases.get(f"p.{p}")).value)
            except (KeyNotFoundError, ValueError):
                lease = {}
            if lease.get("state") == "taking" and lease.get("from") == self.replica_id:
                self._busy.add(p)
                self._takers[p] = str(lease["owner"])
                self._spawn(self._give(p, self._takers[p]))
            else:
                log.warning("partition lease lost (this replica was too slow to renew it)",
                            extra={"partition": p, "owner": lease.get("owner")})
                del self.owned[p]
                self.giving.pop(p, None)
                self._offered.pop(p, None)
                self._received.pop(p, None)
                self.host.drop_partition(p)

    async def _check_giving(self, p: int) -> None:
        """A handover under way whose taker died: the replica that claimed the partition
        after it resumes the sessions from the bucket (and, durable, replays what was not
        acknowledged), so this one stops at once, without a word more for them; finishing
        its open utterances here would publish them twice."""
        to = self._takers.get(p)
        try:
            owner = json.loads((await self._leases.get(f"p.{p}")).value or b"{}").get("owner")
        except (KeyNotFoundError, ValueError):
            return  # lapsed, and not claimed yet
        if owner in (self.replica_id, to) or p in self._voided:
            return
        log.warning("handover void: the partition was claimed by another replica while "
                    "being handed over", extra={"partition": p, "to": to, "owner": owner})
        self._voided.add(p)
        self.host.drop_partition(p)

    async def _give(self, p: int, to: str) -> None:
        """Step 3 of a handover: finish here, then tell the taker."""
        try:
            wait_s = self.settings.cluster.handover_wait_s
            if not self.leaving:  # nothing hurries a rebalancing move: no utterance is cut
                wait_s = max(wait_s, REBALANCE_WAIT_S)
            snaps = await self.host.give_partition(p, wait_s)
            if snaps is None:
                return  # void (_check_giving): the partition is another replica's now
            wall = time.time()
            sessions = {sid: snap.to_dict(sid, wall) for sid, snap in snaps.items()}
            await self._leases.put(f"h.{p}", json.dumps({"from": self.replica_id, "to": to,
                                                         "sessions": sessions}).encode())
            self.handovers += 1
            reason = self._reasons.pop(p, "partitions")
            self.moves[reason] = self.moves.get(reason, 0) + 1
            log.info("partition handed over", extra={"partition": p, "to": to, "reason": reason,
                                                     "sessions": len(sessions)})
        except Exception as exc:
            log.warning("handover failed: %s", exc, extra={"partition": p, "to": to})
        finally:
            self.owned.pop(p, None)
            self.giving.pop(p, None)
            self._offered.pop(p, None)
            self._received.pop(p, None)
            self._busy.discard(p)
            self._takers.pop(p, None)
            self._voided.discard(p)
            self._settle_until = time.monotonic() + MOVE_SETTLE_S

    async def _take_offered(self, view: Mapping[str, Heartbeat]) -> None:
        """Step 2: partitions another replica offers this one."""
        if self.leaving:
            return
        for giver, hb in view.items():
            for p, to in hb.giving.items():
                if to != self.replica_id or p in self.owned or p in self.taking:
                    continue
                try:
                    entry = await self._leases.get(f"p.{p}")
                    lease = json.loads(entry.value)
                except (KeyNotFoundError, ValueError):
                    continue  # lapsed: it is free, and claimed as such
                if lease.get("owner") != giver or lease.get("state") != "owned":
                    continue
                await self.host.subscribe_partition(p)
                value = json.dumps({"owner": self.replica_id, "state": "taking",
                                    "from": giver}).encode()
                try:
                    self.owned[p] = await self._leases.update(f"p.{p}", value,
                                                              last=entry.revision)
                except KeyWrongLastSequenceError:  # the giver renewed meanwhile: next round
                    await self.host.unsubscribe_partition(p)
                    continue
                self.taking[p] = (giver, time.monotonic())

    async def _finish_takeovers(self, keys: set[str], view: Mapping[str, Heartbeat]) -> None:
        """Step 4: the giver's snapshots are there (or it is gone): resume and go live."""
        for p, (giver, since) in list(self.taking.items()):
            snaps: dict[str, SessionSnapshot] = {}
            written: dict[str, float] = {}
            handed = f"h.{p}" in keys
            if handed:
                try:
                    note = json.loads((await self._leases.get(f"h.{p}")).value)
                except (KeyNotFoundError, ValueError):
                    continue
                if note.get("to") != self.replica_id:
                    continue
                for d in (note.get("sessions") or {}).values():
                    with contextlib.suppress(KeyError, ValueError, TypeError):
                        sid, snap, at = SessionSnapshot.from_dict(d)
                        snaps[sid], written[sid] = snap, at
                with contextlib.suppress(Exception):
                    await self._leases.delete(f"h.{p}")
            elif giver in view and time.monotonic() - since < HANDOVER_TIMEOUT_S:
                continue  # still finishing
            else:
                log.warning("the giving replica went away mid-handover; carrying on from the "
                            "kept snapshots", extra={"partition": p, "from": giver})
                snaps, written = await self._load(p)
            del self.taking[p]
            # the giver's numbers, reserved ahead, written before the held messages are replayed:
            # a session whose ``end`` was among them is forgotten, not kept, and a crash of ours
            # from the first message on resumes above anything we published (no ``sequence``
            # twice)
            for sid, snap in snaps.items():
                self.save(p, sid, reserved(snap))
            await self._flush_saves()
            if handed:  # the giver's last messages are ours to skip: all of them here first
                await self.host.catch_up(p)
            self.host.adopt_partition(p, snaps, written, handed)
            self.takeovers += 1
            self._received[p] = self._settle_until = time.monotonic()
            self._settle_until += MOVE_SETTLE_S

    async def _claim(self, p: int) -> None:
        """A free partition (never held, or its replica died): subscribe, then take the lease.
        The lease of a replica whose connection closed (:attr:`_orphans`) is taken over at once
        (an update on its revision, so one replica wins) instead of after the TTL."""
        await self.host.subscribe_partition(p)
        value = json.dumps({"owner": self.replica_id, "state": "owned"}).encode()
        try:
            if p not in self._orphans:
                self.owned[p] = await self._leases.create(f"p.{p}", value)
            else:
                entry = await self._leases.get(f"p.{p}")
                owner = json.loads(entry.value or b"{}").get("owner")
                if owner in self._gone:  # else it moved on meanwhile: not an orphan
                    self.owned[p] = await self._leases.update(f"p.{p}", value,
                                                              last=entry.revision)
        except (KeyWrongLastSequenceError, KeyNotFoundError, ValueError):
            pass
        self._orphans.pop(p, None)  # ours now, or another replica's
        if p not in self.owned:
            await self.host.unsubscribe_partition(p)
            return
        snaps, written = await self._load(p)
        if snaps:
            log.info("partition taken over after its replica stopped renewing it",
                     extra={"partition": p, "sessions": len(snaps)})
            now = time.time()
            for sid, snap in snaps.items():  # as above, on the timeline as it ran on meanwhile
                ran = int(max(0.0, now - written.get(sid, now)) / FRAME_S)
                if self.settings.cluster.durable and snap.replay_from is not None:
                    ran = 0  # the stream replays the audio from there
                self.save(p, sid, replace(reserved(snap), frames=snap.frames + ran))
            await self._flush_saves()
        self.host.adopt_partition(p, snaps, written)

    # --- replicas gone ---------------------------------------------------------------------

    async def _on_alive(self, msg: Any) -> None:
        if msg.reply:
            await msg.respond(b"")

    async def _without_gone(self, view: dict[str, Heartbeat]) -> dict[str, Heartbeat]:
        """The heartbeats without the replicas found gone (until their leases would have lapsed
        anyway); the partitions those still hold are :attr:`_orphans`, free to take."""
        now = time.monotonic()
        ttl_s = self.settings.cluster.lease_ttl_s
        for r, at in list(self._gone.items()):
            if r in view or now - at > ttl_s + self.period_s:  # it wrote a heartbeat: back
                del self._gone[r]
        assert self._nc is not None
        reconnects = self._nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:  # we were away (a server restart, say): so may
            self._reconnects = reconnects  # the others be, reconnecting a moment later than
            self._probe_from = now + 2 * ttl_s  # us; leave them to their leases meanwhile
        for r in await self._probe(view) if now >= self._probe_from else ():
            self._gone[r] = now
            self._orphans.update(dict.fromkeys(view[r].partitions, r))
        self._orphans = {p: r for p, r in self._orphans.items()
                         if r in self._gone and p not in self.owned}
        return {r: hb for r, hb in view.items() if r not in self._gone}

    async def _probe(self, view: Mapping[str, Heartbeat]) -> set[str]:
        """Replicas whose NATS connection is gone, so their leases need not run out: a crashed
        process's socket closes at once, and the server then answers a request to its
        liveness subject with "no responders" (asked twice, GONE_CONFIRM_S apart). A replica
        that is only slow, or an older one that does not answer, is left to its lease TTL."""
        peers = [r for r, hb in view.items()
                 if r != self.replica_id and hb.alive and hb.partitions]
        suspects = [r for r, ok in zip(peers, await asyncio.gather(
            *(self._answers(view[r].alive) for r in peers)), strict=True) if not ok]
        if not suspects:
            return set()
        await asyncio.sleep(GONE_CONFIRM_S)
        gone = {r for r, ok in zip(suspects, await asyncio.gather(
            *(self._answers(view[r].alive) for r in suspects)), strict=True) if not ok}
        for r in gone:
            self.gone_seen += 1
            log.warning("replica gone (its NATS connection closed): its partitions are taken "
                        "over now", extra={"replica": r, "partitions": view[r].partitions})
            with contextlib.suppress(Exception):  # out of every replica's view now, not at
                await self._leases.delete(f"r.{r}")  # its TTL (back in it if it reconnects)
        return gone

    async def _answers(self, subject: str) -> bool:
        assert self._nc is not None
        try:
            await self._nc.request(subject, b"", timeout=ALIVE_TIMEOUT_S)
        except NoRespondersError:
            return False
        except Exception:  # slow, or NATS away: not proof of anything; the lease decides
            return True
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _subscribed(nc: Client) -> None:
    """Until the server holds this connection's subscriptions: two round trips, as
    stt.transport.connection.subscribed (which this layer may not import) explains; one
    ``flush()`` can come back before a SUB still in nats-py's buffer."""
    await nc.flush()
    await nc.flush()


async def poll_until(done: Callable[[], bool], timeout_s: float, step_s: float = 0.05) -> bool:
    """Wait until ``done()`` (state that no event announces, such as every session of a
    partition being quiet), at most ``timeout_s``; whether it came true."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step_s)
    return True


async def heartbeats(nc: Client,
                     bucket: str = ClusterSettings.cluster_bucket) -> dict[str, Heartbeat]:
    """The replicas' live heartbeats, by replica id, as an onlooker reads them (the tests, the
    benchmarks, ``stt demo``); empty before the first replica has created the bucket."""
    js, name = nc.jetstream(), f"{bucket}-leases"
    try:
        kv = await js.key_value(name)
    except NotFoundError:
        return {}
    return await _heartbeats_in(kv, await _keys(js, name, "r.*"))


async def wait_balanced(nc: Client, replicas: int, partitions: int, timeout_s: float = 90.0,
                        bucket: str = ClusterSettings.cluster_bucket) -> dict[str, Heartbeat]:
    """Until ``replicas`` replicas (not leaving) hold every partition, each its fair share."""
    share = fair_share(partitions, replicas)
    deadline = time.monotonic() + timeout_s
    while True:
        hbs = {r: hb for r, hb in (await heartbeats(nc, bucket)).items() if not hb.leaving}
        held = [p for hb in hbs.values() for p in hb.partitions]
        if (len(hbs) == replicas and len(held) == partitions
                and all(share - 1 <= len(hb.partitions) <= share for hb in hbs.values())):
            return hbs
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not balanced in {timeout_s:g} s: "
                               f"{ {r: hb.partitions for r, hb in hbs.items()} }")
        await asyncio.sleep(0.25)


class ClusterConfigError(RuntimeError):
    """The server is not set up for STT_PARTITIONS (retrying cannot fix it)."""


async def _bucket(js: Any, name: str, ttl_s: float) -> Any:
    """Create the bucket, or bind to it when it exists (every replica does this at start)."""
    from nats.js.api import KeyValueConfig

    try:
        return await js.create_key_value(KeyValueConfig(bucket=name, ttl=ttl_s, history=1))
    except BadRequestError:  # exists with another configuration (e.g. another TTL): use it
        return await js.key_value(name)


async def _heartbeats_in(kv: Any, keys: Iterable[str]) -> dict[str, Heartbeat]:
    """The heartbeats (``r.{replica}``) among ``keys``, by replica; one gone meanwhile is left out."""
    view: dict[str, Heartbeat] = {}
    for key in sorted(k for k in keys if k.startswith("r.")):
        try:
            hb = Heartbeat.decode((await kv.get(key)).value or b"")
        except (KeyNotFoundError, KeyError, ValueError, TypeError):
            continue
        view[hb.replica] = hb
    return view


async def _keys(js: Any, bucket: str, pattern: str) -> list[str]:
    """Live keys matching ``pattern`` in one request: the per-subject counts of the bucket's
    stream, named as ADR-8 defines a bucket (stream ``KV_{bucket}``, subjects
    ``$KV.{bucket}.{key}``). nats-py's ``KeyValue.keys()`` would read every entry through an
    ordered consumer instead."""
    prefix = f"$KV.{bucket}."
    try:
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + pattern)
    except NotFoundError:
        return []
    return [s[len(prefix):] for s in (info.state.subjects or {})]
