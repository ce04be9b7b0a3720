"""The worker's partition side (STT_PARTITIONS): what stt.cluster.membership asks of a replica.

Subscribing to a partition (or, in durable mode, consuming it from the stream), resuming its
sessions from snapshots, handing them over at pauses, dropping them when the lease is lost, and
keeping each session's snapshot up to date in the sessions' bucket. :class:`PartitionSide` is a
part of :class:`stt.transport.worker.Worker` (it shares the worker's sessions and executes
their actions through it); it lives here so that the worker's own file is the message path.
Long because a handover has three paths (graceful, lease lost, crash takeover) and the
durable mode a fourth; each is short, and they share the snapshot code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from stt.cluster.membership import (
    SEGMENTS_AHEAD,
    SEQUENCE_AHEAD,
    Cluster,
    poll_until,
    reserved,
)
from stt.config import Settings
from stt.core.params import SessionProfile
from stt.core.segmenter import BYTES_PER_SECOND_16K
from stt.core.session import Session
from stt.core.snapshot import SessionSnapshot
from stt.core.vad import FRAME_S
from stt.transport.connection import subscribed
from stt.transport.durable import ACK, AudioLog
from stt.transport.scheduler import Scheduler
from stt.wire import protocol
from stt.wire.protocol import EndReason, ProtocolError

if TYPE_CHECKING:
    from stt.core.actions import Action

log = logging.getLogger("stt.worker")

HELD_LIMIT = 100_000  # messages held per partition while it is being taken over
SUBSCRIPTION_LIMITS: dict[str, Any] = {"pending_msgs_limit": 1_000_000,
                                       "pending_bytes_limit": 1024 * 1024 * 1024}


def message_digest(data: bytes) -> str:
    """An input message's identity across replicas: every replica subscribed to a partition
    receives the same payload bytes (audio, ``timestamp``, ``seq`` if any)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _handled_there(held: list[tuple[str, bytes, dict[str, str] | None]],
                   last: Mapping[str, str]) -> set[int]:
    """Indexes of held messages the giving replica handled: for each session, those up to the
    first held one whose digest is the last it handled. The giver handled a prefix of the
    session's stream and the taker holds a suffix of it from its subscription on, so they
    overlap in exactly that run (none when the giver's last message came before it). A seed
    chunk carries its capture ``timestamp``, so two chunks' payloads differ; byte-identical
    ones (no seq, no timestamp, digital silence) match at the first, replaying identical audio."""
    ids = [subject.rsplit(".", 1)[-1] for subject, _, _ in held]
    skip: set[int] = set()
    for sid, digest in last.items():
        mine = [i for i, s in enumerate(ids) if s == sid]
        for n, i in enumerate(mine):
            if message_digest(held[i][1]) == digest:
                skip.update(mine[:n + 1])
                break
    return skip


def _settled(session: Session) -> tuple[int, int]:
    """Durable mode: the frame before which the session's audio is never needed again, and its
    timeline now."""
    return session.settled_frames, session.position[0]


def _starts(data: bytes) -> bool:
    """Whether a raw input message is a ``start``."""
    try:
        msg = protocol.unpack(data)
    except ProtocolError:
        return False
    return isinstance(msg, dict) and msg.get("type") == "start"


class PartitionSide:
    """The partition state and moves of a worker (a mixin of :class:`Worker`, which provides
    what is declared below)."""

    settings: Settings
    sessions: dict[str, Session]
    cluster: Cluster | None
    nc: Client | None
    profile: SessionProfile
    stats: Any
    clock: Callable[[], float]
    scheduler: Scheduler
    _all_closed: asyncio.Event
    _outbox: asyncio.Queue[tuple[str, bytes, dict[str, str] | None]]

    if TYPE_CHECKING:
        def _execute(self, session: Session, actions: list[Action]) -> None: ...
        def handle(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                   partition: int | None = None) -> None: ...
        async def _on_msg(self, msg: Msg, partition: int | None = None) -> None: ...
        def _spawn(self, coro: Any) -> None: ...

    def _init_partitions(self, settings: Settings) -> None:
        self._partition: dict[str, int] = {}       # session id -> its partition
        self._psubs: dict[int, Any] = {}           # partition -> subscription
        self._held: dict[int, list[tuple[str, bytes, dict[str, str] | None]]] = {}
        self._saved: dict[str, SessionSnapshot] = {}  # last snapshot written, per session
        self._handed: dict[str, SessionSnapshot] = {}  # sessions closed for a handover
        self._given: dict[int, dict[str, Session]] = {}  # partition -> its sessions handed so far
        self._void: set[int] = set()  # partitions claimed by a third replica while being given
        self._last_in: dict[str, bytes] = {}  # session -> payload of the last message it handled
        # STT_DURABLE: the partitions' audio from a JetStream stream, acknowledged once final
        self.audio_log = (AudioLog(settings.cluster, self._on_log_msg)
                          if settings.cluster.durable else None)
        self._ended: dict[int, dict[str, int]] = {}  # partition -> ended session -> its last message

    async def _on_partition_msg(self, partition: int, msg: Msg) -> None:
        held = self._held.get(partition)
        given = self._given.get(partition)
        if given and msg.subject.rsplit(".", 1)[-1] in given:
            return  # handed over already: the taker holds this one
        if held is None:
            await self._on_msg(msg, partition)
        elif len(held) < HELD_LIMIT:  # being taken over: handled once the sessions are resumed
            held.append((msg.subject, msg.data, msg.headers))

    async def _on_log_msg(self, partition: int, msg: Msg) -> None:
        """A partition message from the durable stream (STT_DURABLE)."""
        log_ = self.audio_log
        assert log_ is not None
        sid = msg.subject.rsplit(".", 1)[-1]
        given = self._given.get(partition)
        if given and sid in given:
            return  # handed over already: the taker replays it from the stream
        try:
            seq = msg.metadata.sequence.stream
        except Exception:  # not a JetStream delivery: nothing to acknowledge or replay by
            log.warning("message without stream metadata on the durable consumer",
                        extra={"subject": msg.subject})
            return
        if not log_.admit(partition, sid, seq, msg.reply):
            session = self.sessions.get(sid)
            if session is not None:
                session.counters.chunks_duplicate += 1
            return
        session = self.sessions.get(sid)
        before = session.position if session is not None else (0, None, None)
        await self._on_msg(msg, partition)
        session = self.sessions.get(sid)
        log_.took(partition, sid, seq, before, None if session is None else session.position)

    def _save(self, session: Session, force: bool = False) -> None:
        """Write the session's snapshot when its format or state changed, a final was
        published or the numbers it reserved run low: a replica that takes over after a crash
        starts above them, with the finals counted so far and the last one as context."""
        assert self.cluster is not None
        p = self._partition.get(session.session_id)
        if p is None:
            return
        now = session.snapshot()
        saved = self._saved.get(session.session_id)
        if (not force and saved is not None and saved.start == now.start
                and now.finals == saved.finals
                and now.next_sequence < saved.next_sequence - SEQUENCE_AHEAD // 2
                and now.next_segment_id < saved.next_segment_id - SEGMENTS_AHEAD // 2):
            return
        ahead = self._replayable(
            session, session.snapshot(sequence_ahead=SEQUENCE_AHEAD, segments_ahead=SEGMENTS_AHEAD))
        self._saved[session.session_id] = ahead
        self.cluster.save(p, session.session_id, ahead)

    def _replayable(self, session: Session, snap: SessionSnapshot,
                    exact: bool = False) -> SessionSnapshot:
        """In durable mode, the snapshot as of the first stream message a replay gives the
        session again: its timeline and last ``seq`` then (``exact``: after its last message)."""
        if self.audio_log is None:
            return snap
        mark = self.audio_log.replay_point(session.session_id, _settled(session), exact)
        if mark is None:
            return snap
        start = snap.start if mark.state is None else dataclasses.replace(snap.start,
                                                                          state=mark.state)
        return dataclasses.replace(snap, replay_from=mark.seq, frames=mark.frames,
                                   last_seq=mark.last_seq, start=start)

    def _closed_in_cluster(self, session: Session, reason: EndReason) -> None:
        sid = session.session_id
        p = self._partition.pop(sid, None)
        self._saved.pop(sid, None)
        if reason is EndReason.HANDOVER:
            self._handed[sid] = self._exact_snapshot(session)
            if self.audio_log is not None:
                self.audio_log.forget(sid)
            return
        self._last_in.pop(sid, None)
        if self.cluster is None or p is None:
            return
        after = self.audio_log.replay_point(sid, exact=True) if self.audio_log else None
        if self.audio_log is None or after is None:
            self.cluster.forget(p, sid)
            return
        # durable mode: a marker, so that a replay from an older floor does not take the
        # session's messages for a new one; forgotten once the floor passes its last message
        self._ended.setdefault(p, {})[sid] = after.seq - 1
        self.cluster.save(p, sid, dataclasses.replace(
            session.snapshot(exact=True), replay_from=after.seq, ended=True))
        self.audio_log.forget(sid)

    def _exact_snapshot(self, session: Session, sequence_ahead: int = 0) -> SessionSnapshot:
        """The session as the next replica continues it after a handover: its numbers, and the
        digest of the last message it handled, so the taker skips what it holds up to there."""
        last = self._last_in.pop(session.session_id, None)
        snap = self._replayable(session, session.snapshot(exact=True, sequence_ahead=sequence_ahead),
                                exact=True)
        return dataclasses.replace(snap, last_message=None if last is None else message_digest(last))

    def _sessions_in(self, partition: int) -> list[Session]:
        return [s for sid, s in list(self.sessions.items())
                if self._partition.get(sid) == partition]

    async def subscribe_partition(self, partition: int) -> None:
        if partition in self._psubs or self.nc is None or self.audio_log is not None:
            return  # durable: the stream keeps what arrives; consumed from adopt_partition on
        self._held[partition] = []
        self._psubs[partition] = await self.nc.subscribe(
            f"{self.settings.cluster.partition_subject}.{partition}.*",
            cb=functools.partial(self._on_partition_msg, partition), **SUBSCRIPTION_LIMITS)
        await subscribed(self.nc)  # the server has it: what is published from now on reaches us

    async def unsubscribe_partition(self, partition: int) -> None:
        if self.audio_log is not None:
            await self.audio_log.close(partition)
        sub = self._psubs.pop(partition, None)
        self._held.pop(partition, None)
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # connection already gone
                log.debug("unsubscribe failed: %s", exc)

    async def catch_up(self, partition: int) -> None:
        """Until every message the server sent before now is in the partition's held list:
        a giver's last message reached the server before its handover note, and so before our
        PING; the client reads in order, then its callback moves each into the list."""
        sub = self._psubs.get(partition)
        if sub is None or self.nc is None:
            return  # (durable mode: the stream has it all)
        with contextlib.suppress(Exception):  # NATS away: adopt with what arrived
            await self.nc.flush(timeout=5)
        await poll_until(lambda: not getattr(sub, "pending_msgs", 0), 5.0, step_s=0.005)
        await asyncio.sleep(0)  # the callback appends what it took last

    def adopt_partition(self, partition: int, snapshots: Mapping[str, SessionSnapshot],
                        written_at: Mapping[str, float], handed_over: bool = False) -> None:
        """Resume the partition's sessions, then handle what arrived meanwhile, then go live.
        After a handover, the giver had every live session: a held message of any other
        ended there (it sent its ``end`` meanwhile) and is dropped, unless it starts anew; and
        a held message the giver handled itself (up to its last, by digest) is dropped."""
        now, wall = self.clock(), time.time()
        resumed: dict[str, str] = {}
        skip: dict[str, int] = {}  # durable mode: session -> the first stream message it needs
        for sid, snap in snapshots.items():
            if sid in self.sessions:
                continue
            if self.audio_log is not None and snap.replay_from is not None:
                skip[sid] = snap.replay_from
            if snap.ended:  # its messages up to its end are not replayed
                if snap.replay_from is not None:
                    self._ended.setdefault(partition, {})[sid] = snap.replay_from - 1
                continue
            frames = None  # after a crash: the timeline ran on in real time since it was written
            if not snap.exact and sid not in skip:  # (a replay gives it that audio again)
                frames = snap.frames + int(max(0.0, wall - written_at.get(sid, wall)) / FRAME_S)
            session = Session.resume(sid, self.profile, now, snap, frames)
            if self.audio_log is not None and snap.replay_from is not None:
                self.audio_log.resumed(sid, snap.replay_from, snap.frames, snap.last_seq,
                                       snap.start.state)
            self.sessions[sid] = session
            self._partition[sid] = partition
            self._saved[sid] = snap
            self.stats.sessions_resumed += 1
            if snap.exact and snap.last_message:
                resumed[sid] = snap.last_message
            log.info("session resumed from another replica", extra={
                "session_id": sid, "partition": partition, "handover": snap.exact,
                "sample_rate": snap.start.sample_rate, "encoding": snap.start.encoding,
                "state": snap.start.state.value})
        if self.audio_log is not None:
            self._spawn(self._consume(partition, skip))
            return
        held = self._held.pop(partition, [])
        handled = _handled_there(held, resumed)
        for i, (subject, data, headers) in enumerate(held):
            sid = subject.rsplit(".", 1)[-1]
            if i in handled:
                self.sessions[sid].counters.chunks_duplicate += 1
                continue
            if handed_over and sid not in self.sessions and not _starts(data):
                continue
            self.stats.messages_in += 1
            try:
                self.handle(subject, data, headers, partition)
            except Exception:  # a bug must not take the partition down
                log.exception("unexpected error handling a message", extra={"subject": subject})

    async def _consume(self, partition: int, skip: dict[str, int]) -> None:
        """Durable mode: read the partition from the stream, from its ack floor on (retried
        while this replica holds the partition and NATS is away)."""
        assert self.audio_log is not None
        while self.cluster is not None and partition in self.cluster.owned:
            try:
                await self.audio_log.open(partition, skip)
                return
            except Exception as exc:
                log.warning("durable consumer not opened, retrying: %s", exc,
                            extra={"partition": partition})
                await asyncio.sleep(1.0)

    async def give_partition(self, partition: int,
                             wait_s: float) -> dict[str, SessionSnapshot] | None:
        """Hand the partition's sessions over, each as it reaches a pause between utterances
        (its final, if one is decoding, is published here first). One still speaking after
        ``wait_s`` is handed when that utterance ends (an utterance is at most
        STT_BUFFER_SIZE_BYTES long); only one still going after that, or past the time a
        SIGTERM leaves, is cut: its finals so far published here, the rest the taker's. A
        session handed early is silent until the taker resumes the partition. None: the
        partition was dropped meanwhile (:meth:`drop_partition`; the taker died and another
        replica claimed it), and nothing is handed or saved."""
        given: dict[str, Session] = {}
        self._given[partition] = given
        if self.audio_log is not None:  # the taker replays from the floor as it stands now
            self.audio_log.freeze(partition)

        def hand_over_the_quiet() -> bool:
            # one by one as each reaches a pause, so no utterance is cut even when the sessions
            # never pause together; the taker holds what they send meanwhile
            for session in self._sessions_in(partition):
                if session.quiet:
                    given[session.session_id] = session
                    self._execute(session, session.hand_over(self.clock()))
            return not self._sessions_in(partition)

        limit = wait_s + self._longest_utterance_s()
        if self.cluster is not None and self.cluster.leaving:  # within the drain, with a margin
            limit = min(limit, max(wait_s, 0.6 * self.settings.limits.drain_timeout_s))
        try:
            await poll_until(hand_over_the_quiet, limit)
            await self.unsubscribe_partition(partition)
        finally:
            self._given.pop(partition, None)
        sessions = self._sessions_in(partition)
        now = self.clock()
        for session in sessions:
            self._execute(session, session.hand_over(now))
        await poll_until(lambda: all(s.closed for s in sessions),
                         self.settings.limits.drain_timeout_s)
        if partition in self._void:
            self._void.discard(partition)
            return None  # the claimer resumed from the bucket; our snapshots would undo its
        snaps: dict[str, SessionSnapshot] = {}
        for session in [*given.values(), *sessions]:
            sid = session.session_id
            if not session.closed:  # its final never came: the next replica starts after it
                log.warning("final not published before the handover",
                            extra={"session_id": sid, "partition": partition})
                snaps[sid] = self._exact_snapshot(session, sequence_ahead=2)
                self._forget_session(session)
            else:
                snaps[sid] = (self._handed.pop(sid) if sid in self._handed
                              else self._exact_snapshot(session))
        for sid, last in self._ended.pop(partition, {}).items():  # durable: still replayable
            snaps.setdefault(sid, SessionSnapshot(start=protocol.Start(), next_sequence=1,
                                                  next_segment_id=1, last_seq=None, frames=0,
                                                  finals=0, replay_from=last + 1, ended=True))
        if self.cluster is not None:  # kept too: should the taker die before it writes them, the
            for sid, snap in snaps.items():  # replica that claims the partition starts from here
                self.cluster.save(partition, sid, reserved(snap))
        return snaps

    def _longest_utterance_s(self) -> float:
        """How long an utterance open now may still take to end: the size limit, then the
        longest silence that ends it."""
        s = self.settings
        return (min(s.session.buffer_size_bytes / BYTES_PER_SECOND_16K, s.limits.max_segment_s)
                + max(s.session.chunk_timeout_s, s.turn.turn_max_silence_s,
                      s.turn.endpoint_max_s))

    def drop_partition(self, partition: int) -> None:
        """The lease went to another replica: this one says nothing more for these sessions
        (a handover under way stops: :meth:`give_partition` returns None)."""
        if partition in self._given:
            self._void.add(partition)
        self._ended.pop(partition, None)
        self._spawn(self.unsubscribe_partition(partition))
        for session in self._sessions_in(partition):
            self._forget_session(session)

    def _forget_session(self, session: Session) -> None:
        session.closed = True
        if self.audio_log is not None:
            self.audio_log.forget(session.session_id)
        self._last_in.pop(session.session_id, None)
        self.sessions.pop(session.session_id, None)
        self.scheduler.forget(session.session_id)
        self._partition.pop(session.session_id, None)
        self._saved.pop(session.session_id, None)
        if not self.sessions:
            self._all_closed.set()

    def partition_loads(self) -> dict[int, int]:
        """Sessions per partition held (0 for the empty ones)."""
        loads = dict.fromkeys(self.cluster.owned if self.cluster else (), 0)
        for p in self._partition.values():
            if p in loads:
                loads[p] += 1
        return loads

    def _acknowledge(self) -> None:
        """Durable mode: acknowledge the stream up to what no session needs any more (queued
        behind the finals that hold the audio before it), and forget the ended sessions'
        markers the floor has passed."""
        assert self.audio_log is not None

        def settled(sid: str) -> tuple[int, int] | None:
            session = self.sessions.get(sid)
            return None if session is None or session.closed else _settled(session)

        for p, (floor, reply) in self.audio_log.settle(settled).items():
            self._outbox.put_nowait((reply, ACK, None))
            ended = self._ended.get(p, {})
            for sid in [sid for sid, last in ended.items() if last <= floor]:
                del ended[sid]
                if self.cluster is not None:
                    self.cluster.forget(p, sid)
