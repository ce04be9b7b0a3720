"""A session's engine jobs: one final, one partial and one speculative final at a time, and the
finals waiting behind the one running. Every legal move is one row of ``MOVES``; the session
makes them only through :meth:`JobSlots.move`, which refuses anything else with an error naming
the slot, its state and the move (as h11's ``_state.py`` does for HTTP).

Why these rules: a voice assistant waits for the final, so a final never waits behind a partial
(a partial starts only when no final is running, queued or being decoded early), and finals run
one at a time, in order. The speculative final (decoded during the trailing silence, before the
endpoint is certain) is withdrawn when speech resumes, and becomes the final when the endpoint
comes before its answer.
"""

from __future__ import annotations

import collections
import enum

from stt.core.actions import Job


class Slot(enum.Enum):
    FINAL = "final"
    PARTIAL = "partial"
    SPECULATIVE = "speculative"


class Move(enum.Enum):
    START = "start"          # handed to the engine
    ANSWERED = "answered"    # its result came back, or its failure
    CANCEL = "cancel"        # withdrawn: its answer will be ignored
    PROMOTE = "promote"      # the speculative final is the final (the FINAL slot takes it)


IDLE, BUSY = "idle", "busy"

# (slot, state, move) -> state afterwards
MOVES: dict[tuple[Slot, str, Move], str] = {
    (Slot.FINAL, IDLE, Move.START): BUSY,
    (Slot.FINAL, BUSY, Move.ANSWERED): IDLE,
    (Slot.PARTIAL, IDLE, Move.START): BUSY,
    (Slot.PARTIAL, BUSY, Move.ANSWERED): IDLE,
    (Slot.PARTIAL, BUSY, Move.CANCEL): IDLE,
    (Slot.SPECULATIVE, IDLE, Move.START): BUSY,
    (Slot.SPECULATIVE, BUSY, Move.ANSWERED): IDLE,
    (Slot.SPECULATIVE, BUSY, Move.CANCEL): IDLE,
    (Slot.SPECULATIVE, BUSY, Move.PROMOTE): IDLE,
}

# What must be idle (and whether the finals' queue must be empty) for a slot's job to start.
START_NEEDS: dict[Slot, tuple[frozenset[Slot], bool]] = {
    Slot.FINAL: (frozenset(), False),
    Slot.PARTIAL: (frozenset({Slot.FINAL, Slot.SPECULATIVE}), True),
    Slot.SPECULATIVE: (frozenset({Slot.FINAL}), True),
}


class SlotError(RuntimeError):
    """A move the table does not allow: a bug in the session, never a client's doing."""


class JobSlots:
    def __init__(self) -> None:
        self._jobs: dict[Slot, Job | None] = dict.fromkeys(Slot)
        self.queue: collections.deque[Job] = collections.deque()  # finals waiting, in order

    def job(self, slot: Slot) -> Job | None:
        return self._jobs[slot]

    def idle(self, *slots: Slot) -> bool:
        return all(self._jobs[s] is None for s in slots)

    def may_start(self, slot: Slot) -> bool:
        others, no_queue = START_NEEDS[slot]
        return self.idle(slot, *others) and not (no_queue and self.queue)

    def holding(self, job_id: int) -> Slot | None:
        """The slot whose job this is, if any (an answer to a withdrawn job has none)."""
        return next((s for s, j in self._jobs.items() if j is not None and j.job_id == job_id),
                    None)

    @property
    def in_flight(self) -> list[Job]:
        """Jobs handed to the engine and not answered yet, oldest first."""
        return sorted((j for j in self._jobs.values() if j is not None), key=lambda j: j.job_id)

    def move(self, slot: Slot, move: Move, job: Job | None = None) -> Job:
        """Make a move; returns the job that entered (START, PROMOTE: ``job``) or left the
        slot."""
        state = IDLE if self._jobs[slot] is None else BUSY
        after = MOVES.get((slot, state, move))
        if after is None:
            raise SlotError(f"{move.value} on the {slot.value} slot while it is {state}")
        if move is Move.START:
            if job is None or not self.may_start(slot):
                raise SlotError(f"start on the {slot.value} slot while "
                                f"{self._blocking(slot) or 'no job is given'}")
            self._jobs[slot] = job
            return job
        left = self._jobs[slot]
        assert left is not None
        self._jobs[slot] = None
        if move is Move.PROMOTE:
            if job is None or self._jobs[Slot.FINAL] is not None:
                raise SlotError("promote on the speculative slot while the final slot is busy")
            self._jobs[Slot.FINAL] = job
            return job
        return left

    def _blocking(self, slot: Slot) -> str:
        others, no_queue = START_NEEDS[slot]
        busy = [s.value for s in (slot, *others) if self._jobs[s] is not None]
        if busy:
            return f"the {', '.join(busy)} slot is busy"
        return "finals are queued" if no_queue and self.queue else ""
