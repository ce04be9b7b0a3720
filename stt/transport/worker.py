"""The NATS worker: subscribes to the input subject, feeds sessions, runs engine jobs, publishes.

Long because it is all the I/O of a session in one event loop: messages in, actions carried out
(engine jobs with their retries, the end-of-turn pool, the outbound queue), timeouts, shutdown,
and the partition side of a replica (hold, adopt, give), which shares the sessions' state.

All session decisions are in :mod:`stt.core.session`; this module only does I/O around it:

* one subscription callback parses each message and hands it to its session (created on
  ``start``, or adopted on a ``chunk``/``state_change`` for an unknown id);
* actions come back in order: messages go onto one outbound queue drained by a single
  publisher task, so each session's messages leave in the order they were made; engine jobs
  run as tasks (the engine keeps the event loop free), so a slow transcription never delays
  any session's chunks;
* a ticker drives idle timeouts and "audio stopped arriving" cuts;
* SIGTERM/SIGINT: stop taking messages, finalize every session, publish finals and ``end``,
  drain the connection, return.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from stt.cluster.membership import (
    PROBE_PREFIX,
    REPLICA_HEADER,
    SEGMENTS_AHEAD,
    SEQUENCE_AHEAD,
    Cluster,
    poll_until,
    reserved,
)
from stt.config import Settings
from stt.core.actions import Action, Cancel, Close, Job, Publish, ScoreTurn, Transcribe
from stt.core.params import SessionProfile
from stt.core.segmenter import BYTES_PER_SECOND_16K
from stt.core.session import Session
from stt.core.snapshot import SessionSnapshot
from stt.core.turn import TurnScorer
from stt.core.vad import FRAME_S
from stt.engines.base import Engine
from stt.ops.status import (
    CHUNK_RESULTS,
    SESSION_TOTALS,
    Status,
    not_ready_reasons,
    package_version,
)
from stt.ops.telemetry import CANCELLED, Telemetry
from stt.transport import connection
from stt.transport.durable import ACK, AudioLog
from stt.transport.scheduler import Scheduler
from stt.wire import protocol
from stt.wire.protocol import EndReason, ErrorCode, ProtocolError

log = logging.getLogger("stt.worker")

TICK_S = 0.1  # idle and audio-gap timeouts are checked this often
# A ticker round this late means the event loop was busy (a taken partition's held messages, a
# CPU-starved process): audio that arrived meanwhile may still be unread, so no session's silence
# is judged until the input is caught up, for at most BACKLOG_HOLD_S under sustained overload.
LATE_TICK_S = 0.25
BACKLOG_HOLD_S = 1.0
TRIM_INTERVAL_S = 5.0  # after sessions close, hand freed heap back to the OS at most this often
REFRESH_INTERVAL_S = 60.0  # STT_PARTITIONS: how often snapshots about to expire are rewritten
HELD_LIMIT = 100_000  # messages held per partition while it is being taken over
TURN_BACKLOG = 4  # end-of-turn queries waiting per model thread before new ones are refused


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim, or None elsewhere.

    Session audio buffers are freed when a session ends, but glibc keeps the heap pages: after
    2,000 abandoned sessions the worker stayed at 185 MiB, 53 MiB once trimmed (bench/abandon.py).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


FIRST_RETRY_S, LAST_RETRY_S = 0.5, 4.0  # backoff between tries of a failed final
OUTBOX_LIMIT = 200_000  # messages held while NATS is unreachable; oldest dropped beyond
SUBSCRIPTION_LIMITS: dict[str, Any] = {"pending_msgs_limit": 1_000_000,
                                       "pending_bytes_limit": 1024 * 1024 * 1024}


class Stats:
    """Worker-wide counters (no per-session labels); others read them through :meth:`Worker.status`."""

    def __init__(self) -> None:
        self.messages_in = 0
        self.bad_messages = 0
        self.published = 0
        self.publish_failures = 0
        self.sessions_started = 0
        self.sessions_resumed = 0  # carried on from another replica (STT_PARTITIONS)
        self.sessions_ended: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.engine_jobs = 0
        self.engine_failures = 0
        self.engine_retries = 0
        self.engine_seconds = 0.0
        self.audio_transcribed_s = 0.0
        self.turn_queries = {"scored": 0, "failed": 0}
        self.turn_seconds = 0.0
        self.reconnects = 0
        self.disconnects = 0
        self.slow_consumers = 0
        self.audio_ended_s = 0.0  # audio received by sessions that have ended
        self.chunk_handling_s: list[float] = []  # filled only when sampling is on (benchmarks)
        self.sample_chunk_handling = False

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


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


class Worker:
    def __init__(self, settings: Settings, engine: Engine,
                 clock: Callable[[], float] = time.monotonic,
                 telemetry: Telemetry | None = None,
                 turn_model: TurnScorer | bool | None = True) -> None:
        """``turn_model``: the end-of-turn model (anything with ``predict(audio) -> float``);
        True loads Smart Turn from STT_TURN_MODEL_PATH at start, None/False runs without one
        (sessions then end turns on silence)."""
        self.settings = settings
        self.engine = engine
        self.turn_model: TurnScorer | None = None
        self._load_turn_model = turn_model is True
        if turn_model is not True and turn_model:
            self.turn_model = turn_model
        # what every session here reads; rebuilt once the end-of-turn model is known (start)
        self.profile: SessionProfile = settings.session_profile(self.turn_model is not None)
        self._turn_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._turn_pending = 0
        self.clock = clock
        self.version = package_version()
        self.telemetry = telemetry or Telemetry()
        self.telemetry.attach(self.status)
        self.subjects = settings.subjects
        self.sessions: dict[str, Session] = {}
        self.stats = Stats()
        self.nc: Client | None = None
        self.engine_ready = False
        self.draining = False
        self._sub: Any = None
        self._outbox: asyncio.Queue[tuple[str, bytes, dict[str, str] | None]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.scheduler = Scheduler(engine.slots, engine.per_pass, clock)
        self._stopped = asyncio.Event()
        self._all_closed = asyncio.Event()  # set when the last session closes (for the drain)
        self._session_totals: dict[str, int] = {}  # chunk outcome totals of ended sessions
        self._trim = _malloc_trim()
        self._closed_since_trim = 0
        self._last_trim = 0.0
        # STT_PARTITIONS: the partitions this replica holds (stt.cluster.membership decides which)
        self.cluster: Cluster | None = None
        self._partition: dict[str, int] = {}       # session id -> its partition
        self._psubs: dict[int, Any] = {}           # partition -> subscription
        self._held: dict[int, list[tuple[str, bytes, dict[str, str] | None]]] = {}
        self._saved: dict[str, SessionSnapshot] = {}  # last snapshot written, per session
        self._handed: dict[str, SessionSnapshot] = {}  # sessions closed for a handover
        self._given: dict[int, dict[str, Session]] = {}  # partition -> its sessions handed so far
        self._last_in: dict[str, bytes] = {}  # session -> payload of the last message it handled
        self._last_refresh = 0.0
        # STT_DURABLE: the partitions' audio from a JetStream stream, acknowledged once final
        self.audio_log = AudioLog(settings, self._on_log_msg) if settings.durable else None
        self._ended: dict[int, dict[str, int]] = {}  # partition -> ended session -> its last message

    # --- lifecycle ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def ready(self) -> bool:
        return not not_ready_reasons(engine_ready=self.engine_ready, connected=self.connected,
                                     draining=self.draining)

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Load the engine, connect, subscribe. False when ``stop`` was set before it was
        connected (SIGTERM while NATS is unreachable); raises stt.transport.connection.ConnectionFatal
        for what retrying cannot fix."""
        t0 = time.perf_counter()
        await self.engine.start()
        self._start_turn_model()
        self.engine_ready = True
        log.info("engine ready", extra={"engine": self.engine.describe(),
                                        "load_s": round(time.perf_counter() - t0, 2)})
        nc = await self._connect(stop)
        if nc is None:
            return False
        self.nc = nc
        self._spawn(self._publisher())
        self._spawn(self._ticker())
        if self.settings.partitions:  # the cluster subscribes to the partitions it takes
            if self.audio_log is not None:
                await self.audio_log.start(self.nc)
            self.cluster = Cluster(self.settings, self)
            await self.cluster.start(self.nc)
        else:
            self._sub = await self.nc.subscribe(
                self.settings.input_subject, queue=self.settings.queue_group, cb=self._on_msg,
                **SUBSCRIPTION_LIMITS)
        await self.nc.flush()
        log.info("listening", extra={"subject": self.settings.input_subject,
                                     "output": self.subjects.output_wildcard,
                                     "nats": self.nc.connected_url.netloc if self.nc.connected_url else None})
        return True

    def _start_turn_model(self) -> None:
        if self._load_turn_model:
            self._load_turn_model = False
            try:
                from stt.engines.turn_model import TurnModel
                self.turn_model = TurnModel(self.settings.turn_model_path or None,
                                            threads=1)
            except Exception as exc:  # a missing file or onnxruntime: silence endpointing
                log_at = log.warning if self.settings.endpointing == "model" else log.info
                log_at("end-of-turn model unavailable, turns end on silence "
                       "(STT_CHUNK_TIMEOUT): %s", exc)
            self.profile = self.settings.session_profile(self.turn_model is not None)
        if self.turn_model is not None and self._turn_pool is None:
            self._turn_pool = concurrent.futures.ThreadPoolExecutor(
                self.settings.turn_threads, thread_name_prefix="turn")
            log.info("end-of-turn model ready", extra={
                "model": str(getattr(self.turn_model, "path", type(self.turn_model).__name__)),
                "endpointing": self.settings.endpointing})

    def new_session(self, session_id: str, now: float) -> Session:
        return Session(session_id, self.profile, now)

    async def run(self, stop: asyncio.Event) -> None:
        """Start, serve until ``stop`` is set, then shut down gracefully."""
        try:
            if await self.start(stop):
                await stop.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        if self._stopped.is_set():
            return
        log.info("shutting down", extra={"sessions": len(self.sessions)})
        if self.cluster is not None:  # hand the partitions to the other replicas first
            await self.cluster.leave(self.settings.drain_timeout_s)
        self.draining = True
        for p in list(self._psubs):
            await self.unsubscribe_partition(p)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # connection already gone
                log.debug("unsubscribe failed: %s", exc)
        now = self.clock()
        for session in list(self.sessions.values()):
            self._execute(session, session.finish(EndReason.SHUTDOWN, now))
        if self.sessions:
            self._all_closed.clear()
            try:
                await asyncio.wait_for(self._all_closed.wait(), self.settings.drain_timeout_s)
            except TimeoutError:
                log.warning("drain timeout: sessions still waiting for the engine",
                            extra={"sessions": len(self.sessions)})
        if self.audio_log is not None:  # what the sessions' last finals settled
            self._acknowledge()
        try:  # every message handed to the NATS client before it drains
            await asyncio.wait_for(self._outbox.join(), 5)
        except TimeoutError:
            log.warning("outbound messages not flushed", extra={"pending": self._outbox.qsize()})
        jobs = self.scheduler.tasks
        for task in list(self._tasks) + jobs:
            task.cancel()
        await asyncio.gather(*self._tasks, *jobs, return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            try:
                await asyncio.wait_for(self.nc.drain(), timeout=5)
            except Exception as exc:
                log.warning("NATS drain failed: %s", exc)
                await self.nc.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self.engine.close()
        if self._turn_pool is not None:
            self._turn_pool.shutdown(wait=False, cancel_futures=True)
        await self.telemetry.shutdown()
        self._stopped.set()
        log.info("stopped")

    async def _connect(self, stop: asyncio.Event | None) -> Client | None:
        """Connect (stt.transport.connection: backoff, stop, errors retrying cannot fix); None if stopped."""
        return await connection.connect(
            self.settings, stop=stop, allow_reconnect=True, max_reconnect_attempts=-1,
            reconnect_time_wait=1, ping_interval=10, max_outstanding_pings=3,
            pending_size=32 * 1024 * 1024, error_cb=self._on_error,
            disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # the subscription's buffer overflowed: messages were dropped by the client
            self.stats.slow_consumers += 1
        log.warning("NATS error: %s", exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if self.draining:
            return
        self.stats.disconnects += 1
        log.warning("NATS disconnected; sessions kept, reconnecting")

    async def _on_reconnected(self) -> None:
        self.stats.reconnects += 1
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else None
        log.info("NATS reconnected", extra={"nats": url})

    async def _on_closed(self) -> None:
        log.info("NATS connection closed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- input ---------------------------------------------------------------------------------

    async def _on_msg(self, msg: Msg, partition: int | None = None) -> None:
        started = time.perf_counter() if self.stats.sample_chunk_handling else 0.0
        self.stats.messages_in += 1
        try:
            self.handle(msg.subject, msg.data, msg.headers, partition)
        except Exception:  # a bug must not take the subscription down
            log.exception("unexpected error handling a message", extra={"subject": msg.subject})
        if started:
            self.stats.chunk_handling_s.append(time.perf_counter() - started)

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
        before = session.position if session is not None else (0, None)
        await self._on_msg(msg, partition)
        session = self.sessions.get(sid)
        log_.took(partition, sid, seq, before, None if session is None else session.position)

    def handle(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
               partition: int | None = None) -> None:
        """One input message (synchronous: nothing here waits)."""
        now = self.clock()
        try:
            session_id = self.subjects.session_id(subject)
        except ProtocolError as err:
            self.stats.bad_messages += 1
            log.warning("message on a bad subject dropped: %s", err.message)
            return
        if session_id.startswith(PROBE_PREFIX):
            return  # a replica checking the server's partition mapping
        session = self.sessions.get(session_id)
        try:
            event = protocol.parse(protocol.unpack(data))
        except ProtocolError as err:
            self.stats.bad_messages += 1
            if session is not None:
                self._execute(session, session.reject(err, now))  # counted and logged there
            else:
                self._send_error(session_id, err.code, err.message)
            return
        if not isinstance(event, protocol.Chunk):
            self.telemetry.control_message(session_id, type(event).__name__.lower(), headers)
        if session is None:
            session = self._open(session_id, event, now)
            if session is None:
                return
            if partition is not None:
                self._partition[session_id] = partition
        if partition is not None:  # what a handover's taker skips up to (by its digest)
            self._last_in[session_id] = data
        self._execute(session, session.handle(event, now))
        if self.cluster is not None and not isinstance(event, protocol.Chunk):
            self._save(session)

    def _open(self, session_id: str, event: protocol.Event, now: float) -> Session | None:
        if isinstance(event, protocol.End):
            # Already ended (idle timeout, another worker) or never started: say it is over.
            self._send(protocol.SessionEnd(session_id, EndReason.END, 0.0, 0))
            return None
        if self.draining:
            self._send_error(session_id, ErrorCode.OVERLOADED,
                             "worker is shutting down; retry on another")
            return None
        if len(self.sessions) >= self.settings.max_sessions:
            self._send_error(session_id, ErrorCode.OVERLOADED,
                             f"worker at its limit of {self.settings.max_sessions} sessions "
                             "(STT_MAX_SESSIONS)")
            return None
        session = self.new_session(session_id, now)
        self.sessions[session_id] = session
        self.stats.sessions_started += 1
        if isinstance(event, protocol.Start):
            log.info("session started", extra={
                "session_id": session_id, "sample_rate": event.sample_rate,
                "channels": event.channels, "encoding": event.encoding, "state": event.state.value,
                "speaker_id": event.speaker_id})
        else:
            log.info("session adopted without start (lost or late start); using defaults",
                     extra={"session_id": session_id, "first": type(event).__name__.lower()})
        return session

    # --- actions -------------------------------------------------------------------------------

    def _execute(self, session: Session, actions: list[Action]) -> None:
        published = False
        for action in actions:
            if isinstance(action, Publish):
                published = True
                message = action.message
                if isinstance(message, protocol.Error):
                    self.stats.count_error(message.code.value)
                    log.warning("error sent: %s", message.message,
                                extra={"session_id": session.session_id, "code": message.code.value})
                elif isinstance(message, protocol.Interrupt):
                    log.info("interrupt", extra={"session_id": session.session_id})
                if action.speech_ended_at is not None and isinstance(message, protocol.Transcript):
                    self.telemetry.final_published(message, self.clock() - action.speech_ended_at)
                self._send(message, action.sequence)
            elif isinstance(action, Transcribe):
                self.scheduler.submit(action.job, functools.partial(self._run_job, session))
            elif isinstance(action, Cancel):
                self.scheduler.cancel(session.session_id, action.job_id)
            elif isinstance(action, ScoreTurn):
                self._score_turn(session, action)
            elif isinstance(action, Close):
                self.sessions.pop(session.session_id, None)
                self.scheduler.forget(session.session_id)
                self._closed_in_cluster(session, action.reason)
                self._closed_since_trim += 1
                if not self.sessions:
                    self._all_closed.set()
                self.stats.sessions_ended[action.reason.value] = \
                    self.stats.sessions_ended.get(action.reason.value, 0) + 1
                c = session.counters
                log.info("session ended", extra={
                    "session_id": session.session_id, "reason": action.reason.value,
                    "audio_s": round(c.audio_in_s, 2), "finals": c.finals, "partials": c.partials,
                    "interrupts": c.interrupts, "chunks": c.chunks_ok,
                    "duplicates": c.chunks_duplicate, "late": c.chunks_late,
                    "dropped": c.chunks_dropped, "gaps": c.seq_gaps})
                for key in SESSION_TOTALS:
                    self._session_totals[key] = self._session_totals.get(key, 0) + getattr(c, key)
                self.stats.audio_ended_s += c.audio_in_s
                self.telemetry.session_closed(session.session_id, action.reason.value)
        if published and self.cluster is not None and not session.closed:
            self._save(session)

    # --- partitions (STT_PARTITIONS; stt.cluster.membership calls these) -----------------------------------

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
        return dataclasses.replace(snap, replay_from=mark.seq, frames=mark.frames,
                                   last_seq=mark.last_seq)

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
            f"{self.settings.partition_subject}.{partition}.*",
            cb=functools.partial(self._on_partition_msg, partition), **SUBSCRIPTION_LIMITS)
        await self.nc.flush()  # the server has it: what is published from now on reaches us

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
                self.audio_log.resumed(sid, snap.replay_from, snap.frames, snap.last_seq)
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

    async def give_partition(self, partition: int, wait_s: float) -> dict[str, SessionSnapshot]:
        """Hand the partition's sessions over, each as it reaches a pause between utterances
        (its final, if one is decoding, is published here first). One still speaking after
        ``wait_s`` is handed when that utterance ends (an utterance is at most
        STT_BUFFER_SIZE_BYTES long); only one still going after that, or past the time a
        SIGTERM leaves, is cut: its finals so far published here, the rest the taker's. A
        session handed early is silent until the taker resumes the partition."""
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
            limit = min(limit, max(wait_s, 0.6 * self.settings.drain_timeout_s))
        try:
            await poll_until(hand_over_the_quiet, limit)
            await self.unsubscribe_partition(partition)
        finally:
            self._given.pop(partition, None)
        sessions = self._sessions_in(partition)
        now = self.clock()
        for session in sessions:
            self._execute(session, session.hand_over(now))
        await poll_until(lambda: all(s.closed for s in sessions), self.settings.drain_timeout_s)
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
        return (min(s.buffer_size_bytes / BYTES_PER_SECOND_16K, s.max_segment_s)
                + max(s.chunk_timeout_s, s.turn_max_silence_s, s.endpoint_max_s))

    def drop_partition(self, partition: int) -> None:
        """The lease went to another replica: this one says nothing more for these sessions."""
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

    async def _run_job(self, session: Session, job: Job) -> None:
        """One engine job; a final that fails is retried with backoff for STT_FINAL_RETRY_S
        (an engine restart or a rolling update takes seconds), a partial is not."""
        token = self.telemetry.job_started(job)
        started = time.perf_counter()
        give_up_at = self.clock() + (self.settings.final_retry_s if job.is_final else 0.0)
        delay = FIRST_RETRY_S
        while True:
            attempt = time.perf_counter()
            try:
                result = await asyncio.wait_for(self.engine.transcribe(job.audio, job.options),
                                                self.settings.engine_timeout_s)
                break
            except asyncio.CancelledError:  # withdrawn by the session, or shutdown
                self.telemetry.job_finished(token, job, engine_s=time.perf_counter() - started,
                                            error=CANCELLED)
                raise
            except Exception as exc:  # EngineError, TimeoutError, or an engine bug: a clean error
                self.stats.engine_failures += 1
                reason = (f"engine timed out after {self.settings.engine_timeout_s:.0f} s"
                          if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__)
                where = {"session_id": session.session_id, "segment_id": job.segment_id,
                         "final": job.is_final}
                left = give_up_at - self.clock()
                if left > 0 and not session.closed:  # the last try falls on the deadline
                    wait = min(delay, left)
                    self.stats.engine_retries += 1
                    log.warning("transcription failed, retrying: %s", reason,
                                extra={**where, "retry_s": round(wait, 2)})
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, LAST_RETRY_S)
                    continue
                log.warning("transcription failed: %s", reason, extra=where)
                self.telemetry.job_finished(token, job, engine_s=time.perf_counter() - started,
                                            error=reason)
                self._execute(session, session.transcription_failed(job.job_id, reason,
                                                                    self.clock()))
                return
        elapsed = time.perf_counter() - attempt
        self.telemetry.job_finished(token, job, engine_s=elapsed, error=None,
                                    queued_s=result.queued_s)
        self.stats.engine_jobs += 1
        self.stats.engine_seconds += elapsed
        self.stats.audio_transcribed_s += job.duration_s
        if job.is_final:
            log.info("final", extra={"session_id": session.session_id,
                                     "segment_id": job.segment_id,
                                     "audio_s": round(job.duration_s, 2),
                                     "engine_s": round(elapsed, 3)})
        self._execute(session, session.transcribed(job.job_id, result, self.clock()))

    def _score_turn(self, session: Session, query: ScoreTurn) -> None:
        """One end-of-turn query on the model's own threads: never on the event loop, never
        in the engine's way; refused (the session falls back to silence) when they are behind."""
        loop = asyncio.get_running_loop()
        pool, model = self._turn_pool, self.turn_model
        if pool is None or model is None or \
                self._turn_pending >= TURN_BACKLOG * self.settings.turn_threads:
            self.stats.turn_queries["failed"] += 1
            loop.call_soon(self._turn_answer, session, query, None)
            return
        self._turn_pending += 1

        def predict() -> tuple[float, float]:
            t0 = time.perf_counter()
            return float(model.predict(query.audio)), time.perf_counter() - t0

        future = loop.run_in_executor(pool, predict)
        future.add_done_callback(lambda f: self._turn_done(session, query, f))

    def _turn_done(self, session: Session, query: ScoreTurn,
                   future: asyncio.Future[tuple[float, float]]) -> None:
        self._turn_pending -= 1
        if future.cancelled() or future.exception() is not None:
            self.stats.turn_queries["failed"] += 1
            if not future.cancelled():
                log.warning("end-of-turn query failed: %s", future.exception(),
                            extra={"session_id": session.session_id})
            self._turn_answer(session, query, None)
            return
        probability, elapsed = future.result()
        self.stats.turn_queries["scored"] += 1
        self.stats.turn_seconds += elapsed
        self._turn_answer(session, query, probability)

    def _turn_answer(self, session: Session, query: ScoreTurn, probability: float | None) -> None:
        if session.closed:
            return
        now = self.clock()
        self._execute(session, session.turn_failed(query.query_id, now) if probability is None
                      else session.turn_scored(query.query_id, probability, now))

    def _send_error(self, session_id: str, code: ErrorCode, message: str) -> None:
        """An error about a message that belongs to no live session (so: sequence 0)."""
        self.stats.count_error(code.value)
        log.warning("error sent: %s", message, extra={"session_id": session_id, "code": code.value})
        self._send(protocol.Error(session_id, code, message))

    def _send(self, message: protocol.Outgoing, sequence: int = 0) -> None:
        """Pack and queue one message; its timestamp is the time it is packed."""
        if self._outbox.qsize() >= OUTBOX_LIMIT:
            self._outbox.get_nowait()
            self._outbox.task_done()
            self.stats.publish_failures += 1
        session_id = message.session_id
        headers = self.telemetry.publish_headers(message, sequence)
        if self.cluster is not None:  # which replica spoke (a session moves between them)
            headers = {**(headers or {}), REPLICA_HEADER: self.cluster.replica_id}
        payload = protocol.pack(protocol.encode(message, sequence, time.time()))
        self._outbox.put_nowait((self.subjects.output(session_id), payload, headers))

    async def _publisher(self) -> None:
        """The only place that publishes: one queue, so per-session order is kept."""
        assert self.nc is not None
        while True:
            subject, payload, headers = await self._outbox.get()
            while True:
                try:
                    await self.nc.publish(subject, payload, headers=headers)
                    if payload is ACK and self.audio_log is not None:
                        self.audio_log.acks += 1
                    else:
                        self.stats.published += 1
                    break
                except nats.errors.OutboundBufferLimitError:
                    await asyncio.sleep(0.1)  # disconnected and the client buffer is full: wait
                except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                    self.stats.publish_failures += 1
                    break
                except Exception as exc:
                    self.stats.publish_failures += 1
                    log.warning("publish failed: %s", exc)
                    break
            self._outbox.task_done()

    def tick(self, now: float) -> None:
        """The sessions' timeouts (idle, audio gap) due at ``now``."""
        for session in list(self.sessions.values()):
            if now >= session.deadline:
                self._execute(session, session.tick(now))

    def take_outbound(self) -> list[tuple[str, bytes, dict[str, str] | None]]:
        """What is waiting to be published, taken off the queue (a run without NATS)."""
        out = []
        while not self._outbox.empty():
            out.append(self._outbox.get_nowait())
            self._outbox.task_done()
        return out

    def _input_backlog(self) -> bool:
        """Messages received and not handled yet (their sessions' audio did arrive)."""
        return (any(sub.pending_msgs for sub in [self._sub, *self._psubs.values()]
                    if sub is not None)
                or (self.audio_log is not None and self.audio_log.pending_msgs() > 0))

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

    async def _ticker(self) -> None:
        due = self.clock() + TICK_S
        held_since: float | None = None
        while True:
            await asyncio.sleep(max(0.0, due - self.clock()))
            now = self.clock()
            late, due = now - due, now + TICK_S
            if late >= LATE_TICK_S or self._input_backlog():
                # a gap seen now may be audio not read yet, not audio that stopped arriving
                held_since = now if held_since is None else held_since
                if now - held_since < BACKLOG_HOLD_S:
                    if late >= LATE_TICK_S:
                        log.debug("event loop busy for %.2f s; silences judged once the input "
                                  "is read", late)
                    continue
            held_since = None
            self.tick(now)
            if self.audio_log is not None:
                self._acknowledge()
            if self.cluster is not None and now - self._last_refresh >= REFRESH_INTERVAL_S:
                self._last_refresh = now
                for session in list(self.sessions.values()):
                    p = self._partition.get(session.session_id)
                    if p is not None and self.cluster.stale(p, session.session_id):
                        self._save(session, force=True)
            if (self._trim is not None and self._closed_since_trim
                    and now - self._last_trim >= TRIM_INTERVAL_S):
                self._closed_since_trim, self._last_trim = 0, now
                self._trim()

    # --- introspection --------------------------------------------------------------------------

    def session_totals(self) -> dict[str, int]:
        """Sessions' own tallies (chunks, finals, partials, interrupts): ended plus live ones."""
        totals = dict(self._session_totals)
        for s in list(self.sessions.values()):
            for key in SESSION_TOTALS:
                totals[key] = totals.get(key, 0) + getattr(s.counters, key)
        return totals

    def status(self) -> Status:
        """A read-only snapshot for metrics, health and discovery (built on demand).

        The OpenTelemetry reader calls this from its own thread while the event loop changes
        the session table: a dict that changes size mid-iteration raises, and a retry succeeds.
        """
        for attempt in range(3):
            try:
                return self._status()
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _status(self) -> Status:
        s = self.stats
        totals = self.session_totals()
        return Status(
            version=self.version, engine=self.engine.describe(), engine_ready=self.engine_ready,
            connected=self.connected, draining=self.draining, sessions=len(self.sessions),
            max_sessions=self.settings.max_sessions, sessions_started=s.sessions_started,
            sessions_ended=dict(s.sessions_ended), audio_received_s=self.audio_received_s(),
            audio_transcribed_s=s.audio_transcribed_s,
            chunks={r: totals.get("chunks_" + r, 0) for r in CHUNK_RESULTS},
            transcripts={"partial": totals.get("partials", 0), "final": totals.get("finals", 0)},
            interrupts=totals.get("interrupts", 0),
            messages_in=s.messages_in, bad_messages=s.bad_messages, published=s.published,
            publish_failures=s.publish_failures, errors=dict(s.errors), engine_jobs=s.engine_jobs,
            engine_failures=s.engine_failures, engine_seconds=s.engine_seconds,
            turn_queries=dict(s.turn_queries), turn_seconds=s.turn_seconds,
            reconnects=s.reconnects, disconnects=s.disconnects, slow_consumers=s.slow_consumers,
            pending_inbound=self.pending_inbound, pending_outbound=self.pending_outbound,
            cluster=None if self.cluster is None else {
                **self.cluster.status(),
                **({"durable": self.audio_log.status()} if self.audio_log is not None else {})})

    def audio_received_s(self) -> float:
        return self.stats.audio_ended_s + sum(s.counters.audio_in_s
                                              for s in list(self.sessions.values()))

    @property
    def pending_outbound(self) -> int:
        return self._outbox.qsize()

    @property
    def pending_inbound(self) -> int:
        """Messages received from NATS and not yet handled (the event loop is behind)."""
        subs = [self._sub, *self._psubs.values()]
        return (sum(int(getattr(sub, "pending_msgs", 0) or 0) for sub in subs)
                + (self.audio_log.pending_msgs() if self.audio_log is not None else 0))
