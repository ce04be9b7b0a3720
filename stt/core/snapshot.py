"""A session as another replica needs it to carry on, and its form in the sessions' bucket."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stt.wire.protocol import Start, State


@dataclass(frozen=True)
class SessionSnapshot:
    """What another replica needs to carry the session on (stt.cluster.membership keeps it in a bucket).

    ``exact`` snapshots are taken at a handover, after the session's last message: the next
    replica continues ``sequence`` and ``segment_id`` without a gap and drops the messages it
    received while the handover ran that this replica had handled: those up to the one whose
    payload digest is ``last_message`` (the worker fills it in; any client, with or without
    ``seq``), and the chunks up to ``last_seq``. The others are written ahead while
    the session runs (at its start, on a state change, when the numbers it reserved run low):
    after a crash, the next replica starts at the reserved numbers, above anything published,
    so ``sequence`` shows a gap where messages were lost and a ``segment_id`` is never reused.
    """

    start: Start           # the session's format, with its current state
    next_sequence: int
    next_segment_id: int
    last_seq: int | None
    frames: int            # the audio timeline, in frames
    finals: int
    exact: bool = False
    last_message: str | None = None  # digest of the last input message handled (exact only)
    context: str = ""      # the last final's text, the next final's decoding context
    # durable mode (STT_DURABLE): the audio stream's sequence of the first message this state
    # has not taken in (``frames`` and ``last_seq`` are the session's just before it); a
    # replica resuming the session replays the stream from there and skips what lies before
    replay_from: int | None = None
    ended: bool = False    # durable mode: the session ended; its messages before replay_from are
                           # not replayed (kept until the stream is acknowledged past them)

    def to_dict(self, session_id: str, wall: float) -> dict[str, Any]:
        """The JSON-able form, with the session's id and when it was written (epoch s)."""
        st = self.start
        return {"session_id": session_id, "sample_rate": st.sample_rate, "channels": st.channels,
                "encoding": st.encoding, "state": st.state.value, "speaker_id": st.speaker_id,
                "language": st.language, "prompt": st.prompt,
                "word_timestamps": st.word_timestamps, "endpointing": st.endpointing,
                "next_sequence": self.next_sequence, "next_segment_id": self.next_segment_id,
                "last_seq": self.last_seq, "frames": self.frames, "finals": self.finals,
                "exact": self.exact, "last_message": self.last_message, "context": self.context,
                "replay_from": self.replay_from, "ended": self.ended, "written_at": wall}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> tuple[str, SessionSnapshot, float]:
        """(session id, snapshot, wall time written); KeyError/ValueError/TypeError if
        malformed."""
        start = Start(sample_rate=int(d["sample_rate"]), channels=int(d["channels"]),
                      encoding=str(d["encoding"]), state=State(d["state"]),
                      speaker_id=d.get("speaker_id"), language=d.get("language"),
                      prompt=d.get("prompt"), word_timestamps=bool(d.get("word_timestamps")),
                      endpointing=d.get("endpointing") or None)
        last, replay = d.get("last_seq"), d.get("replay_from")
        snap = cls(start=start, next_sequence=int(d["next_sequence"]),
                   next_segment_id=int(d["next_segment_id"]),
                   last_seq=None if last is None else int(last), frames=int(d["frames"]),
                   finals=int(d["finals"]), exact=bool(d.get("exact")),
                   last_message=d.get("last_message") or None,
                   context=str(d.get("context") or ""),
                   replay_from=None if replay is None else int(replay),
                   ended=bool(d.get("ended")))
        return str(d["session_id"]), snap, float(d.get("written_at") or 0.0)
