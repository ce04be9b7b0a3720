"""Which engine jobs run when, for every engine: finals at once, partials into idle capacity.

A voice assistant waits for the final; a partial only keeps a display lively. So:

* a **final** (or a speculative final) goes to the engine the moment the session asks;
* a **partial** waits here until the engine has a pass to spare beyond what is kept for
  finals, and then starts together with the other waiting partials (oldest first), so a local
  engine batches them into one pass;
* a session withdraws its job with :meth:`Scheduler.cancel` (its segment ended, speech resumed
  after a speculative final, the session closed): a waiting partial is forgotten, a running
  job's task is cancelled (a local engine's batcher drops a request not yet in a pass; the http
  engine aborts the request).

Capacity is the engine's: ``slots`` passes at once (faster-whisper on CPU: one per CPU, side by side;
the http engine: its concurrency) of ``per_pass`` jobs each (a local engine's batch size).
With more than one slot, a quarter of them (at least one) is kept for finals: partials start
only while fewer than ``slots - reserve`` passes are busy. With one slot, partials start only
when the engine is idle. A final still waits for a pass already running (a CPU pass cannot be
interrupted); the session starts its final's decode early, at the first silence, to absorb that.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from stt.core.actions import Job

Runner = Callable[[Job], Coroutine[Any, Any, None]]


def final_reserve(slots: int) -> int:
    """Passes kept free of partials, so a final never queues behind them."""
    return 0 if slots <= 1 else max(1, slots // 4)


@dataclass
class SchedulerStats:
    started_finals: int = 0
    started_partials: int = 0
    cancelled: int = 0        # jobs withdrawn by their session, waiting or running
    waited_s: float = 0.0     # partials' total wait for capacity
    waiting_peak: int = 0


@dataclass
class _Waiting:
    job: Job
    run: Runner
    since: float


@dataclass
class Scheduler:
    slots: int = 1
    per_pass: int = 1
    clock: Callable[[], float] = field(default=lambda: 0.0)
    stats: SchedulerStats = field(default_factory=SchedulerStats)

    def __post_init__(self) -> None:
        self.resize(self.slots, self.per_pass)
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._waiting: dict[tuple[str, int], _Waiting] = {}  # partials, in arrival order

    def resize(self, slots: int, per_pass: int) -> None:
        """The engine's capacity, known once it has started (a local engine on CPU: a pass per
        CPU)."""
        self.slots = max(1, slots)
        self.per_pass = max(1, per_pass)
        self.reserve = final_reserve(self.slots)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._running.values())

    def submit(self, job: Job, run: Runner) -> None:
        """Run ``run(job)`` now (a final) or when capacity allows (a partial)."""
        if job.is_final:
            self.stats.started_finals += 1
            self._start(job, run)
            return
        self._waiting[(job.session_id, job.job_id)] = _Waiting(job, run, self.clock())
        self.stats.waiting_peak = max(self.stats.waiting_peak, len(self._waiting))
        self._admit()

    def cancel(self, session_id: str, job_id: int) -> None:
        key = (session_id, job_id)
        if self._waiting.pop(key, None) is not None:
            self.stats.cancelled += 1
            return
        task = self._running.get(key)
        if task is not None:
            self.stats.cancelled += 1
            task.cancel()

    def forget(self, session_id: str) -> None:
        """The session is gone: its waiting partials with it (running jobs finish or fail)."""
        for key in [k for k in self._waiting if k[0] == session_id]:
            del self._waiting[key]

    def _busy_passes(self) -> int:
        return math.ceil(len(self._running) / self.per_pass)

    def _admit(self) -> None:
        now = self.clock()
        while self._waiting and self._busy_passes() < self.slots - self.reserve:
            # a pass's worth of partials together, so a batching engine decodes them at once
            for key in list(self._waiting)[: self.per_pass]:
                waiting = self._waiting.pop(key)
                self.stats.started_partials += 1
                self.stats.waited_s += now - waiting.since
                self._start(waiting.job, waiting.run)

    def _start(self, job: Job, run: Runner) -> None:
        key = (job.session_id, job.job_id)
        task = asyncio.get_running_loop().create_task(run(job))
        self._running[key] = task
        task.add_done_callback(lambda _t: self._done(key))

    def _done(self, key: tuple[str, int]) -> None:
        self._running.pop(key, None)
        self._admit()
