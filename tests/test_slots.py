"""The table of a session's job slots: what may happen, and a clear error for what may not."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stt.core.actions import Job
from stt.core.slots import BUSY, IDLE, MOVES, JobSlots, Move, Slot, SlotError
from stt.core.transcription import TranscribeOptions


def job(job_id: int, is_final: bool = True) -> Job:
    return Job(job_id=job_id, session_id="s", segment_id=1, audio=np.zeros(160, np.float32),
               is_final=is_final, start_s=0.0, end_s=0.01, segment_start_s=0.0,
               options=TranscribeOptions(), created_at=0.0)


def slots_with(*busy: Slot) -> JobSlots:
    slots = JobSlots()
    for i, slot in enumerate(busy):
        slots._jobs[slot] = job(100 + i)
    return slots


@pytest.mark.parametrize(("slot", "state", "move"),
                         list(itertools.product(Slot, (IDLE, BUSY), Move)))
def test_every_move_the_table_lacks_is_refused_naming_slot_state_and_move(
        slot: Slot, state: str, move: Move) -> None:
    slots = slots_with(slot) if state == BUSY else JobSlots()
    if (slot, state, move) in MOVES:
        return
    with pytest.raises(SlotError) as err:
        slots.move(slot, move, job(1))
    assert str(err.value) == f"{move.value} on the {slot.value} slot while it is {state}"


def test_a_partial_waits_for_finals_and_a_final_never_waits_for_a_partial() -> None:
    slots = JobSlots()
    slots.queue.append(job(1))
    assert not slots.may_start(Slot.PARTIAL) and not slots.may_start(Slot.SPECULATIVE)
    with pytest.raises(SlotError, match="start on the partial slot while finals are queued"):
        slots.move(Slot.PARTIAL, Move.START, job(2, is_final=False))
    slots.move(Slot.FINAL, Move.START, slots.queue.popleft())
    with pytest.raises(SlotError, match="the final slot is busy"):
        slots.move(Slot.SPECULATIVE, Move.START, job(3))
    slots = slots_with(Slot.PARTIAL)
    assert slots.may_start(Slot.FINAL)  # beside a running partial


def test_the_speculative_final_becomes_the_final() -> None:
    slots = JobSlots()
    spec = slots.move(Slot.SPECULATIVE, Move.START, job(1))
    assert slots.holding(1) is Slot.SPECULATIVE and slots.in_flight == [spec]
    final = job(1)
    assert slots.move(Slot.SPECULATIVE, Move.PROMOTE, final) is final
    assert slots.holding(1) is Slot.FINAL and slots.idle(Slot.SPECULATIVE)
    assert slots.move(Slot.FINAL, Move.ANSWERED) is final and slots.in_flight == []
    assert slots.holding(1) is None  # an answer to a job no slot holds is ignored
