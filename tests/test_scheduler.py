"""The scheduler alone: finals at once, partials into idle capacity, withdrawals."""

from __future__ import annotations

import asyncio

import numpy as np

from stt.core.actions import Job
from stt.core.transcription import TranscribeOptions
from stt.transport.scheduler import Scheduler, final_reserve


def job(job_id: int, final: bool, session: str = "s") -> Job:
    return Job(job_id=job_id, session_id=session, segment_id=1, audio=np.zeros(160, np.float32),
               is_final=final, start_s=0.0, end_s=0.01, segment_start_s=0.0,
               options=TranscribeOptions(), created_at=0.0)


class Engine:
    """Jobs that run until released, recording the order they started in."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.release: dict[int, asyncio.Event] = {}
        self.cancelled: list[int] = []

    async def run(self, j: Job) -> None:
        self.started.append(j.job_id)
        self.release[j.job_id] = asyncio.Event()
        try:
            await self.release[j.job_id].wait()
        except asyncio.CancelledError:
            self.cancelled.append(j.job_id)
            raise

    async def finish(self, job_id: int) -> None:
        self.release[job_id].set()
        for _ in range(3):
            await asyncio.sleep(0)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def stop(sched: Scheduler) -> None:
    for task in sched.tasks:
        task.cancel()
    await asyncio.gather(*sched.tasks, return_exceptions=True)


def test_reserve_for_finals() -> None:
    assert [final_reserve(n) for n in (1, 2, 4, 8, 16)] == [0, 1, 1, 2, 4]


async def test_one_slot_partials_wait_for_an_idle_engine_finals_never_wait() -> None:
    engine, sched = Engine(), Scheduler(slots=1, per_pass=8)
    sched.submit(job(1, final=False, session="a"), engine.run)
    await settle()
    assert engine.started == [1]
    sched.submit(job(2, final=False, session="b"), engine.run)
    sched.submit(job(3, final=False, session="c"), engine.run)
    sched.submit(job(4, final=True, session="d"), engine.run)  # busy engine: a final goes in
    await settle()
    assert engine.started == [1, 4] and sched.waiting == 2
    await engine.finish(1)
    assert engine.started == [1, 4]  # the final still runs: no partial beside it
    await engine.finish(4)
    assert sorted(engine.started[2:]) == [2, 3]  # together: one batch for a batching engine
    assert sched.stats.started_partials == 3 and sched.stats.started_finals == 1
    await stop(sched)


async def test_several_slots_keep_a_reserve_for_finals() -> None:
    engine, sched = Engine(), Scheduler(slots=4, per_pass=1)
    for i in range(1, 6):
        sched.submit(job(i, final=False, session=str(i)), engine.run)
    await settle()
    assert engine.started == [1, 2, 3] and sched.waiting == 2  # one of four slots kept
    sched.submit(job(9, final=True, session="f"), engine.run)
    await settle()
    assert engine.started[-1] == 9
    await engine.finish(1)
    assert sched.waiting == 2  # 3 running (2 partials and the final): still no room
    await engine.finish(9)
    assert engine.started[-1] == 4 and sched.waiting == 1
    await stop(sched)


async def test_cancel_forgets_a_waiting_partial_and_cancels_a_running_job() -> None:
    engine, sched = Engine(), Scheduler(slots=1, per_pass=1)
    sched.submit(job(1, final=True), engine.run)
    sched.submit(job(2, final=False), engine.run)
    await settle()
    sched.cancel("s", 2)
    sched.cancel("s", 1)
    await settle()
    assert engine.cancelled == [1] and engine.started == [1]
    assert sched.running == 0 and sched.waiting == 0 and sched.stats.cancelled == 2
    sched.submit(job(3, final=False, session="x"), engine.run)
    sched.submit(job(4, final=False, session="y"), engine.run)
    sched.forget("y")
    await settle()
    assert engine.started == [1, 3] and sched.waiting == 0
    await stop(sched)
