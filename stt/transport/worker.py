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
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from stt.cluster.membership import (
    PROBE_PREFIX,
    REPLICA_HEADER,
    Cluster,
)
from stt.config import Settings
from stt.core.actions import Action, Cancel, Close, Job, Publish, ScoreTurn, Transcribe
from stt.core.params import SessionProfile
from stt.core.session import Session
from stt.core.turn import TurnScorer
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
from stt.transport.durable import ACK
from stt.transport.partitions import SUBSCRIPTION_LIMITS, PartitionSide
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


class Worker(PartitionSide):
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
        self.subjects = settings.nats.subjects
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
        self._last_refresh = 0.0
        self._init_partitions(settings)

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
        self.scheduler.resize(self.engine.slots, self.engine.per_pass)
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
        if self.settings.cluster.partitions:  # the cluster subscribes to the partitions it takes
            if self.audio_log is not None:
                await self.audio_log.start(self.nc)
            self.cluster = Cluster(self.settings, self)
            await self.cluster.start(self.nc)
        else:
            self._sub = await self.nc.subscribe(
                self.settings.nats.input_subject, queue=self.settings.nats.queue_group,
                cb=self._on_msg, **SUBSCRIPTION_LIMITS)
        await connection.subscribed(self.nc)
        log.info("listening", extra={"subject": self.settings.nats.input_subject,
                                     "output": self.subjects.output_wildcard,
                                     "nats": self.nc.connected_url.netloc if self.nc.connected_url else None})
        return True

    def _start_turn_model(self) -> None:
        if self._load_turn_model:
            self._load_turn_model = False
            try:
                from stt.engines.turn_model import TurnModel
                self.turn_model = TurnModel(self.settings.turn.turn_model_path or None,
                                            threads=1)
            except Exception as exc:  # a missing file or onnxruntime: silence endpointing
                log_at = log.warning if self.settings.turn.endpointing == "model" else log.info
                log_at("end-of-turn model unavailable, turns end on silence "
                       "(STT_CHUNK_TIMEOUT): %s", exc)
            self.profile = self.settings.session_profile(self.turn_model is not None)
        if self.turn_model is not None and self._turn_pool is None:
            self._turn_pool = concurrent.futures.ThreadPoolExecutor(
                self.settings.turn.turn_threads, thread_name_prefix="turn")
            log.info("end-of-turn model ready", extra={
                "model": str(getattr(self.turn_model, "path", type(self.turn_model).__name__)),
                "endpointing": self.settings.turn.endpointing})

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
            await self.cluster.leave(self.settings.limits.drain_timeout_s)
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
                await asyncio.wait_for(self._all_closed.wait(),
                                       self.settings.limits.drain_timeout_s)
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
            self.settings.nats, stop=stop, allow_reconnect=True, max_reconnect_attempts=-1,
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
        if len(self.sessions) >= self.settings.limits.max_sessions:
            self._send_error(session_id, ErrorCode.OVERLOADED,
                             f"worker at its limit of {self.settings.limits.max_sessions} sessions "
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
        published = final = False
        for action in actions:
            if isinstance(action, Publish):
                published = True
                message = action.message
                final = final or (isinstance(message, protocol.Transcript) and message.is_final)
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
        if final and self.audio_log is not None:
            # durable mode: the acknowledgement right behind the final, not at the next tick, so
            # a crash between the two (the final published, its audio replayed) is all but ruled out
            self._acknowledge()

    async def _run_job(self, session: Session, job: Job) -> None:
        """One engine job; a final that fails is retried with backoff for STT_FINAL_RETRY_S
        (an engine restart or a rolling update takes seconds), a partial is not."""
        token = self.telemetry.job_started(job)
        started = time.perf_counter()
        give_up_at = self.clock() + (self.settings.limits.final_retry_s if job.is_final else 0.0)
        delay = FIRST_RETRY_S
        while True:
            attempt = time.perf_counter()
            try:
                result = await asyncio.wait_for(self.engine.transcribe(job.audio, job.options),
                                                self.settings.transcription.engine_timeout_s)
                break
            except asyncio.CancelledError:  # withdrawn by the session, or shutdown
                self.telemetry.job_finished(token, job, engine_s=time.perf_counter() - started,
                                            error=CANCELLED)
                raise
            except Exception as exc:  # EngineError, TimeoutError, or an engine bug: a clean error
                self.stats.engine_failures += 1
                limit_s = self.settings.transcription.engine_timeout_s
                reason = (f"engine timed out after {limit_s:.0f} s"
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
                self._turn_pending >= TURN_BACKLOG * self.settings.turn.turn_threads:
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
            max_sessions=self.settings.limits.max_sessions, sessions_started=s.sessions_started,
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
