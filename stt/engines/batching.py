"""Cross-session micro-batching: many sessions' segments through the model in one pass.

Requests are awaited from the event loop; one task takes them off a queue in groups and runs
each group on an inference thread, at most ``workers`` groups at once (a CPU model with one
worker per core decodes two sessions' finals side by side instead of one after the other). A
group holds requests with the same ``key`` (those that can share one decoder pass: same
language, prompt, window), at most ``max_batch`` of them, lowest ``priority`` first (finals
before partials), oldest first within a priority.

Finals (priority 0) are spread over the idle workers before they are grouped: with two idle
workers, two finals go to a pass each, side by side (on a CPU with a thread per worker, a pass
of two takes about as long as the two one after the other while the other core waits). Partials
keep to one pass, so the other workers stay free for finals. When a worker takes a request that
arrived alone and no other worker is idle for it (or it is a partial), the batcher waits up to
``max_wait_s`` for others to join (a few milliseconds: the price of batching when load is
light). When every worker is busy, requests pile up on their own and the next group leaves as
soon as one is free, as large as ``max_batch`` allows. A request whose caller gave up (timeout,
cancellation) is dropped before it costs a pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: What ``run_batch`` returns per request: a result, or the exception for that request alone.
Outcome = Any


@dataclass(order=True)
class _Pending(Generic[T]):
    priority: int
    seq: int
    key: Hashable = field(compare=False)
    item: T = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    dropped: int = 0  # callers that gave up before their turn
    largest: int = 0

    @property
    def mean_batch(self) -> float:
        return self.requests / self.batches if self.batches else 0.0


class MicroBatcher(Generic[T, R]):
    """``await submit(item, key, priority)``; ``run_batch(items)`` runs on ``executor``.

    ``run_batch`` returns one outcome per item, in order: the result, or an exception
    instance that fails that request only. An exception raised by ``run_batch`` itself fails
    the whole group.
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R | BaseException]],
                 executor: Executor, *, max_batch: int = 8, max_wait_s: float = 0.005,
                 workers: int = 1) -> None:
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch = max(1, max_batch)
        self.workers = max(1, workers)  # groups in the executor at once
        self.max_wait_s = max(0.0, max_wait_s)
        self.stats = BatchStats()
        self._pending: list[_Pending[T]] = []
        self._arrived = asyncio.Event()
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._passes: set[asyncio.Task[None]] = set()
        self._running = 0  # passes whose results are not handed out yet

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._passes):
            task.cancel()
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("engine closed"))
        self._pending.clear()

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, item: T, key: Hashable, priority: int = 0) -> R:
        if self._task is None:
            raise RuntimeError("batcher not started")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(priority, next(self._seq), key, item, future))
        self._arrived.set()
        return await future

    # --- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.workers)
        while True:
            await free.acquire()
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
                idle = self.workers - self._running  # a pass may have ended meanwhile
                if not self._spreads(idle, min(p.priority for p in self._pending)):
                    await self._gather_companions(loop)
            batch = self._take(idle=self.workers - self._running)
            if not batch:
                free.release()
                continue
            self._running += 1
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.largest = max(self.stats.largest, len(batch))
            task = loop.create_task(self._pass(loop, batch), name="micro-batch")
            self._passes.add(task)

            def done(finished: asyncio.Task[None]) -> None:
                self._passes.discard(finished)
                free.release()

            task.add_done_callback(done)

    async def _pass(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T]]) -> None:
        try:
            outcomes = await loop.run_in_executor(self.executor, self.run_batch,
                                                  [p.item for p in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outcomes)} outcomes "
                                   f"for {len(batch)} requests")
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:
            outcomes = [exc] * len(batch)
        finally:
            # counted free before the callers hear back: a request they send at once is
            # spread as if this worker were idle (it is, as soon as this task ends)
            self._running -= 1
        for p, outcome in zip(batch, outcomes, strict=True):
            if p.future.done():
                continue
            if isinstance(outcome, BaseException):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome)

    async def _gather_companions(self, loop: asyncio.AbstractEventLoop) -> None:
        """A worker was idle: give other sessions' requests a moment to join this pass."""
        if self.max_batch == 1 or self.max_wait_s == 0:
            return
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    @staticmethod
    def _spreads(idle: int, priority: int) -> bool:
        """Share a group of this priority among the idle workers? Only finals (priority 0): a
        lower one (partials) keeps to one pass, leaving the others free for the finals that may
        come (``stt.transport.scheduler`` keeps passes for them too)."""
        return idle > 1 and priority <= 0

    def _take(self, idle: int = 1) -> list[_Pending[T]]:
        """The next group: requests with the first one's key, shared among the ``idle``
        workers when they are finals (:meth:`_spreads`)."""
        live = [p for p in self._pending if not p.future.done()]
        self.stats.dropped += len(self._pending) - len(live)
        if not live:
            self._pending = []
            return []
        live.sort()
        key = live[0].key
        same = [p for p in live if p.key == key]
        share = idle if self._spreads(idle, live[0].priority) else 1
        batch = same[: min(self.max_batch, -(-len(same) // share))]
        chosen = {id(p) for p in batch}
        self._pending = [p for p in live if id(p) not in chosen]
        return batch
