"""Durable mode (``STT_DURABLE``): the session audio rides a JetStream stream, and a replica
acknowledges it only once the words it holds are published.

Core NATS delivers a message once, to whoever listens then: audio a replica had taken in when it
was SIGKILLed is gone with it, and the utterance it was hearing is lost. Here the server keeps
every partition message in the stream ``{STT_CLUSTER_BUCKET}-audio`` (``max_age`` and
``max_bytes`` bound it) and each partition has one durable consumer, ``p{n}``, with
``AckPolicy.ALL``, read by the replica holding the partition's lease. The replica acknowledges
up to the last message before the oldest audio it still needs (an open utterance, a final not
yet published, the pre-roll of the next); the consumer's ack floor is then the server's record
of where a replay must start.

A replica that takes a partition (a handover, a crash takeover) reads that floor, recreates the
consumer from the message after it and replays: each session is resumed from its snapshot,
which says the stream sequence of the first message its state has not taken in
(``SessionSnapshot.replay_from``), so a session skips what it had already heard and re-hears
exactly the audio whose words were never published. A session that ended leaves a marker
(``ended``) until the floor passes its last message, so its messages are not taken for a new
session. The window left: a crash between a final's publish and its snapshot's write (the
write follows the publish within milliseconds) repeats that final.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from stt.cluster.membership import ClusterConfigError
from stt.config.cluster import ClusterSettings
from stt.wire.protocol import State

log = logging.getLogger("stt.worker")

ACK = b"+ACK"
# A partition's messages delivered and not acknowledged: an open utterance holds the floor, and
# a session whose front-end went quiet holds it until its idle timeout ends it.
MAX_ACK_PENDING = 100_000
# A message unacknowledged this long is delivered again (and dropped here as already seen): far
# longer than the longest utterance or idle timeout, so this happens only to a replica that
# stopped acknowledging.
ACK_WAIT_S = 300.0
PENDING_MSGS, PENDING_BYTES = 200_000, 512 * 1024 * 1024  # a replay's burst, held by the client


def stream_name(settings: ClusterSettings) -> str:
    return f"{settings.cluster_bucket}-audio"


@dataclass
class _Mark:
    """A message a session took in: its stream sequence, and the session's input position
    before it (timeline frames, last chunk ``seq``, state: a replay from here re-applies a
    ``state_change`` that came later)."""

    seq: int
    frames: int
    last_seq: int | None
    state: State | None = None


@dataclass
class _Partition:
    sub: Any = None
    last: int = 0                   # the highest stream sequence handled (redeliveries below)
    frozen: bool = False            # being handed over: the taker replays from the floor
    delivered: collections.deque[tuple[int, str]] = field(default_factory=collections.deque)
    sessions: set[str] = field(default_factory=set)
    skip: dict[str, int] = field(default_factory=dict)  # session -> its replay_from


class AudioLog:
    """The worker's side of the durable stream: per partition, one consumer, what each session
    took in, and the acknowledgements."""

    def __init__(self, settings: ClusterSettings,
                 on_message: Callable[[int, Msg], Awaitable[None]]) -> None:
        self.settings = settings
        self.stream = stream_name(settings)
        self._on_message = on_message
        self._nc: Client | None = None
        self._js: Any = None
        self._parts: dict[int, _Partition] = {}
        self._marks: dict[str, collections.deque[_Mark]] = {}
        self._after: dict[str, _Mark] = {}  # session -> the position after its last message
        self._current: tuple[str, int] | None = None  # the message being handled
        self.acks = 0
        self.replayed = 0                   # messages skipped as taken in before (by a replay)

    async def start(self, nc: Client) -> None:
        """Create the stream (or bring its limits up to date)."""
        self._nc, self._js = nc, nc.jetstream()
        s = self.settings
        config = StreamConfig(
            name=self.stream, subjects=[f"{s.partition_subject}.*.*"],
            retention=RetentionPolicy.LIMITS, discard=DiscardPolicy.OLD,
            max_age=s.durable_max_age_s, max_bytes=s.durable_max_bytes,
            storage=StorageType.MEMORY if s.durable_storage == "memory" else StorageType.FILE,
            description="stt session audio (STT_DURABLE), one consumer per partition")
        try:
            try:
                await self._js.add_stream(config)
            except BadRequestError:  # there, with other limits: ours (every replica writes them)
                await self._js.update_stream(config)
        except APIError as exc:
            raise ClusterConfigError(
                f"STT_DURABLE: the server refused the stream {self.stream} "
                f"({s.durable_storage}, {s.durable_max_bytes} bytes): {exc.description}; lower "
                "STT_DURABLE_MAX_BYTES or raise the server's jetstream max_file_store / "
                "max_memory_store") from None
        log.info("durable audio stream ready", extra={
            "stream": self.stream, "storage": s.durable_storage,
            "max_age_s": s.durable_max_age_s, "max_bytes": s.durable_max_bytes})

    # --- partitions ----------------------------------------------------------------------------

    async def open(self, partition: int, skip: dict[str, int]) -> None:
        """Consume the partition from the message after its ack floor, skipping per session
        what its resumed state already holds (``skip``: session -> replay_from)."""
        assert self._nc is not None and self._js is not None
        await self.close(partition)
        part = self._parts[partition] = _Partition(skip=dict(skip))
        name = f"p{partition}"
        floor = 0
        try:
            info = await self._js.consumer_info(self.stream, name)
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            await self._js.delete_consumer(self.stream, name)
        except NotFoundError:
            pass
        inbox = self._nc.new_inbox()

        async def deliver(msg: Msg) -> None:
            await self._on_message(partition, msg)

        part.sub = await self._nc.subscribe(inbox, cb=deliver, pending_msgs_limit=PENDING_MSGS,
                                            pending_bytes_limit=PENDING_BYTES)
        await self._js.add_consumer(self.stream, ConsumerConfig(
            durable_name=name, deliver_subject=inbox,
            filter_subject=f"{self.settings.partition_subject}.{partition}.*",
            ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT_S, max_ack_pending=MAX_ACK_PENDING,
            **({"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": floor + 1}
               if floor else {"deliver_policy": DeliverPolicy.ALL})))
        log.info("partition consumed from the durable stream", extra={
            "partition": partition, "from_seq": floor + 1, "sessions_resumed": len(skip)})

    async def close(self, partition: int) -> None:
        """Stop consuming (the consumer and its floor stay for the next owner). What its
        sessions took in is kept until each is forgotten (a handover's snapshots need it)."""
        part = self._parts.pop(partition, None)
        if part is None:
            return
        if part.sub is not None:
            with contextlib.suppress(Exception):  # connection already gone
                await part.sub.unsubscribe()

    def freeze(self, partition: int) -> None:
        """Acknowledge nothing more here: the partition is being handed over, and the taker
        replays from the floor, skipping what each handed session took in here."""
        part = self._parts.get(partition)
        if part is not None:
            part.frozen = True

    def pending_msgs(self) -> int:
        """Messages delivered to this replica and not handled yet."""
        return sum(int(getattr(p.sub, "pending_msgs", 0) or 0) for p in self._parts.values())

    # --- messages ------------------------------------------------------------------------------

    def admit(self, partition: int, session_id: str, seq: int, reply: str) -> bool:
        """Whether the message is to be handled: not a redelivery, not audio the session's
        resumed state already holds. Every message delivered is acknowledged in its turn."""
        part = self._parts.get(partition)
        if part is None:
            return False  # closed meanwhile
        if seq <= part.last:
            return False
        part.last = seq
        part.delivered.append((seq, reply))
        self._current = (session_id, seq)
        replay_from = part.skip.get(session_id)
        if replay_from is not None:
            if seq < replay_from:
                self.replayed += 1
                return False
            del part.skip[session_id]
        return True

    def took(self, partition: int, session_id: str, seq: int,
             before: tuple[int, int | None, State | None],
             after: tuple[int, int | None, State | None] | None) -> None:
        """The session took the message in (``before``/``after``: its position around it;
        ``after`` None when the message closed it)."""
        self._current = None
        part = self._parts.get(partition)
        if part is None:
            return
        if after is None:
            self.forget(session_id)
            part.sessions.discard(session_id)
            return
        part.sessions.add(session_id)
        marks = self._marks.get(session_id)
        if marks is None:
            marks = self._marks[session_id] = collections.deque()
        marks.append(_Mark(seq, *before))
        self._after[session_id] = _Mark(seq + 1, *after)

    def replay_point(self, session_id: str, where: tuple[int, int] | None = None,
                     exact: bool = False) -> _Mark | None:
        """Where a replica resuming the session replays from: the first message holding audio
        it may still need (``where``: the session's settled frame and timeline, as for
        :meth:`settle`), or (``exact``, at a handover's pause) the one after its last."""
        marks = self._marks.get(session_id)
        if marks and not exact:
            if where is not None:  # what was settled since the last acknowledgement
                self._needed(session_id, *where)
            if marks:  # (unless all of it has settled)
                return marks[0]
        after = self._after.get(session_id)
        if self._current is not None and self._current[0] == session_id:
            # asked while the session handles a message (its start, its end): from the next
            if after is None:
                return _Mark(self._current[1] + 1, 0, None)
            return dataclasses.replace(after, seq=self._current[1] + 1)
        return after

    def resumed(self, session_id: str, replay_from: int, frames: int,
                last_seq: int | None, state: State) -> None:
        """A session resumed from a snapshot: until it takes a message in here, its replay
        point stays the snapshot's (handed on again, it skips what it had before)."""
        self._marks.pop(session_id, None)
        self._after[session_id] = _Mark(replay_from, frames, last_seq, state)

    def forget(self, session_id: str) -> None:
        self._marks.pop(session_id, None)
        self._after.pop(session_id, None)

    # --- acknowledgements ------------------------------------------------------------------------

    def settle(self, settled: Callable[[str], tuple[int, int] | None]
               ) -> dict[int, tuple[int, str]]:
        """Per partition, the last message before the oldest one a session still needs, if that
        moved on: partition -> (its stream sequence, the subject acknowledging it and every
        message before). ``settled(session)``: (the frame before which its audio is never needed
        again, its timeline now), None if the session is gone. The caller publishes the
        acknowledgements after what it has already queued (the finals holding that audio)."""
        floors: dict[int, tuple[int, str]] = {}
        for partition, part in self._parts.items():
            if part.frozen or not part.delivered:
                continue
            limit: int | None = None
            for sid in list(part.sessions):
                where = settled(sid)
                if where is None:
                    part.sessions.discard(sid)
                    self.forget(sid)
                    continue
                need = self._needed(sid, *where)
                if need is not None and (limit is None or need < limit):
                    limit = need
            last = None
            while part.delivered and (limit is None or part.delivered[0][0] < limit):
                last = part.delivered.popleft()
            if last is not None:
                floors[partition] = last
        return floors

    def _needed(self, session_id: str, settled: int, frames: int) -> int | None:
        marks = self._marks.get(session_id)
        if not marks:
            return None
        while len(marks) > 1 and marks[1].frames <= settled:
            marks.popleft()  # the message after it starts before the settled point: done
        if frames <= settled:
            marks.clear()
            return None
        return marks[0].seq

    def status(self) -> dict[str, Any]:
        return {"stream": self.stream, "acks": self.acks, "replay_skipped": self.replayed}
