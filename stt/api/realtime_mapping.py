"""One OpenAI Realtime transcription session over one worker session: client events in, worker
messages out; worker messages in, server events out. No I/O, no clock (times are arguments);
:mod:`stt.api.realtime` does the websocket and NATS around it.

The bridge translates, it never transcribes. The mapping:

* ``input_audio_buffer.append`` -> worker ``chunk`` (the worker's ``start`` goes first, from the
  session's format, language and prompt; again when they change);
* worker partial -> ``conversation.item.input_audio_transcription.delta``: the text beyond what
  this item's deltas already said, word by word (case and punctuation aside: Whisper writes
  "he was" then "He was not."); a partial that revises earlier words sends nothing (a delta
  is never withdrawn; the ``completed`` has the final text). A partial's last word waits for
  the next partial (or the final) unless it is stable: it is the one Whisper most often
  changes ("still?" -> "still more"), and one wrong word would hold every later delta back; The first partial of an utterance
  also sends ``input_audio_buffer.speech_started`` (the worker publishes no speech-start: the
  event comes with the first partial, STT_PARTIAL_INTERVAL of speech plus a decode late, its
  ``audio_start_ms`` the utterance's true start);
* worker final -> ``...transcription.completed`` (``speech_stopped`` and ``committed`` first,
  with server turn detection). A final with ``end_of_turn: false`` (a size cut) is an item too;
* ``input_audio_buffer.commit`` / ``.clear`` -> the worker's ``start`` sent again, the
  documented way to end the utterance so far without ending the session (a ``state_change``
  to the same state is ignored; ``end`` frees the session). The audio sent is first padded with
  silence to a whole 30 ms frame, so the worker's timeline and the bridge's agree at every cut
  and a final's ``end`` says on which side of a cut its audio lies;
* ``turn_detection: null``: the worker still cuts utterances at silences; every final whose
  audio ends before a commit's cut joins that commit's item, so one commit is one item and one
  ``completed``. It is sent when a final reaches the cut, when one lies beyond it, or, if the
  audio before the commit ended in silence, COMMIT_GRACE_S after the commit (a final still
  decoding then becomes an item of its own: no text is lost);
* worker ``end`` that the bridge did not ask for (idle timeout, worker shutdown): the next audio
  starts a new worker session; worker ``error`` -> ``error``. Other worker messages
  (``interrupt``, ``eager_end_of_turn``, ``turn_resumed``, types not known yet) have no Realtime
  event; with ``worker_events`` every worker message is also sent as ``stt.worker`` (the page).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from stt.api.realtime_config import ClientError, SessionConfig, update, update_beta

FRAME_S = 0.03          # the worker's VAD frame: cuts are padded to a whole one
CHUNK_MAX_S = 1.0       # an append longer than this goes to the worker in pieces
MIN_COMMIT_S = 0.1      # the API refuses to commit less audio than this
COMMIT_GRACE_S = 1.0    # turn_detection null: wait this long for a final no partial announced
KNOWN_WAIT_S = 15.0     # ... and at most this long for one a partial did announce
EPS_S = 0.016           # the worker rounds times to 1 ms; frames are 30 ms
_NOT_WORD = re.compile(r"[^\w']+")
CLIENT_EVENTS = ("session.update", "transcription_session.update", "input_audio_buffer.append",
                 "input_audio_buffer.commit", "input_audio_buffer.clear")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def word_key(word: str) -> str:
    """A word as deltas compare it: lower case, no punctuation."""
    return _NOT_WORD.sub("", word.lower())


def settled(partial: str, stable: str) -> str:
    """The part of a partial a delta may say: all but its last word, unless that is stable."""
    words = partial.split()
    return partial if len(stable.split()) >= len(words) else " ".join(words[:-1])


def error_event(err: ClientError, event_id: str | None = None) -> dict[str, Any]:
    return {"type": "error", "event_id": new_id("event"),
            "error": {"type": err.type, "code": err.code, "message": err.message,
                      "param": err.param, "event_id": event_id}}


@dataclass
class Actions:
    client: list[dict[str, Any]] = field(default_factory=list)  # server events, in order
    worker: list[dict[str, Any]] = field(default_factory=list)  # worker messages, in order

    def event(self, type_: str, **fields: Any) -> None:
        self.client.append({"type": type_, "event_id": new_id("event"), **fields})


@dataclass
class Item:
    id: str
    sent: list[str] = field(default_factory=list)      # the words its deltas said, normalized
    texts: list[str] = field(default_factory=list)     # finals gathered (commit mode)
    start_s: float | None = None
    end_s: float = 0.0
    started: bool = False                              # speech_started sent


@dataclass
class Pending:
    """A commit whose item waits for the finals of the audio before its cut."""
    item: Item
    cut_s: float
    due: float
    waiting: set[tuple[int, int]]  # utterances a partial announced before the cut


class RealtimeSession:
    def __init__(self, session_id: str, *, worker_events: bool = False,
                 config: SessionConfig | None = None) -> None:
        self.session_id = session_id      # the worker's session id (the NATS subjects' token)
        self.api_id = "sess_" + session_id
        self.config = config or SessionConfig()
        self.worker_events = worker_events
        self.started = False              # the worker has this session's start
        self.ending = False               # the bridge sent end
        self.gen = 0                      # worker sessions so far (its segment ids restart)
        self.origin_s = 0.0               # bridge time where the worker's timeline begins
        self.audio_s = 0.0                # audio sent to the worker, padding included
        self.buffered_s = 0.0             # audio since the last cut
        self.since_start = 0              # bytes sent since the last start (frame padding)
        self.carry = b""                  # a partial sample, for the next append
        self.seq = 0
        self.dropped_until_s = -1.0       # cleared audio: transcripts ending before are dropped
        self.last_cut_s = -1.0            # the last commit's cut (turn_detection null)
        self.previous_item: str | None = None
        self.items: dict[tuple[int, int], Item] = {}  # server turn detection: one per utterance
        self.open: Item | None = None                  # turn_detection null: the uncommitted one
        self.pending: list[Pending] = []
        self.announced: set[tuple[int, int]] = set()   # utterances with a partial, no final yet

    # --- client events -----------------------------------------------------------------------

    def created(self) -> dict[str, Any]:
        return {"type": "session.created", "event_id": new_id("event"),
                "session": self.config.as_api(self.api_id)}

    def on_client(self, raw: str | bytes, wall: float, now: float) -> Actions:
        out = Actions()
        event_id = None
        try:
            event = json.loads(raw)
            if not isinstance(event, dict):
                raise ClientError("Expected a JSON object.", code="invalid_event")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            kind = event.get("type")
            if kind is None:
                raise ClientError("The 'type' field is missing.", code="invalid_event")
            if kind == "input_audio_buffer.append":
                self._append(event.get("audio"), wall, out)
            elif kind in ("session.update", "transcription_session.update"):
                self._update(kind, event.get("session"), wall, out)
            elif kind == "input_audio_buffer.commit":
                self._commit(wall, now, out)
            elif kind == "input_audio_buffer.clear":
                self._clear(wall, out)
            else:
                supported = ", ".join(f"'{k}'" for k in CLIENT_EVENTS)
                raise ClientError(f"Invalid value: {str(kind)[:100]!r}. A transcription session "
                                  f"supports {supported}.", param="type")
        except json.JSONDecodeError as exc:
            out.client.append(error_event(ClientError(
                f"The event is not valid JSON: {exc.msg} at position {exc.pos}.",
                code="invalid_json")))
        except UnicodeDecodeError:
            out.client.append(error_event(ClientError("The event is not UTF-8 text.",
                                                      code="invalid_json")))
        except ClientError as err:
            out.client.append(error_event(err, event_id))
        return out

    def _update(self, kind: str, session: Any, wall: float, out: Actions) -> None:
        old = self.config
        self.config = (update_beta if kind == "transcription_session.update" else update)(
            old, session)
        if self.started and self.config.worker_start(self.session_id) != old.worker_start(
                self.session_id):
            self._cut(wall, out, old)  # the audio so far in the old format, then the new one
        if kind == "transcription_session.update":
            out.event("transcription_session.updated",
                      session=self.config.as_beta(self.api_id))
        else:
            out.event("session.updated", session=self.config.as_api(self.api_id))

    def _append(self, audio: Any, wall: float, out: Actions) -> None:
        if not isinstance(audio, str):
            raise ClientError("Missing required parameter: 'audio' (base64 audio bytes).",
                              code="missing_required_parameter", param="audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ClientError("Invalid 'audio': not valid base64.", param="audio") from None
        fmt = self.config.format
        data = self.carry + data
        usable = len(data) - len(data) % fmt.width
        self.carry = data[usable:]
        step = int(fmt.rate * CHUNK_MAX_S) * fmt.width
        for at in range(0, usable, step):
            self._send_audio(data[at:min(usable, at + step)], wall, out)

    def _send_audio(self, pcm: bytes, wall: float, out: Actions,
                    config: SessionConfig | None = None) -> None:
        if not pcm:
            return
        if not self.started:
            out.worker.append(self.config.worker_start(self.session_id))
            self.started, self.since_start = True, 0
            self.origin_s = self.audio_s
        fmt = (config or self.config).format
        out.worker.append({"type": "chunk", "audio": pcm, "timestamp": wall, "seq": self.seq})
        self.seq += 1
        self.since_start += len(pcm)
        seconds = len(pcm) / fmt.width / fmt.rate
        self.audio_s += seconds
        self.buffered_s += seconds

    def _cut(self, wall: float, out: Actions, config: SessionConfig | None = None) -> None:
        """End the worker's utterance here: pad to a whole frame, then send the start again."""
        if not self.started:
            self.carry = b""
            return
        fmt = (config or self.config).format
        short = -self.since_start % (round(fmt.rate * FRAME_S) * fmt.width)
        self.carry = b""  # half a sample: nothing
        self._send_audio(fmt.silence * (short // fmt.width), wall, out, config)
        out.worker.append(self.config.worker_start(self.session_id))
        self.since_start, self.buffered_s = 0, 0.0

    def _commit(self, wall: float, now: float, out: Actions) -> None:
        if self.buffered_s + 1e-9 < MIN_COMMIT_S:
            raise ClientError(
                f"Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_S * 1000:.0f}ms of audio, but buffer only has "
                f"{self.buffered_s * 1000:.2f}ms of audio.", code="input_audio_buffer_commit_empty")
        self._cut(wall, out)
        if not self.config.manual:
            return  # the final of the utterance just cut is an item as every other
        item = self.open or Item(new_id("item"))
        self.open = None
        out.event("input_audio_buffer.committed", item_id=item.id,
                  previous_item_id=self.previous_item)
        self.previous_item = item.id
        waiting = set(self.announced)
        self.last_cut_s = self.audio_s
        self.pending.append(Pending(item, self.audio_s, now + (KNOWN_WAIT_S if waiting
                                                               else COMMIT_GRACE_S), waiting))

    def _clear(self, wall: float, out: Actions) -> None:
        self._cut(wall, out)
        self.dropped_until_s = self.audio_s
        self.open = None
        self.items, self.announced = {}, set()  # nothing of it becomes an item
        out.event("input_audio_buffer.cleared")

    def close(self) -> Actions:
        """The websocket closed: free the worker's session."""
        out = Actions()
        if self.started and not self.ending:
            out.worker.append({"type": "end"})
        self.ending = True
        return out

    # --- worker messages ---------------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        return self.pending[0].due if self.pending else None

    def tick(self, now: float) -> Actions:
        out = Actions()
        while self.pending and self.pending[0].due <= now:
            self._complete(self.pending.pop(0), out)
        return out

    def on_worker(self, message: dict[str, Any], now: float) -> Actions:
        out = Actions()
        if self.worker_events:
            out.event("stt.worker", message=message)
        kind = message.get("type")
        if kind == "transcript" and not self.ending:
            self._transcript(message, now, out)
        elif kind == "error":
            code = str(message.get("code") or "worker_error")
            type_ = "server_error" if code in ("engine_failed", "overloaded") else (
                "invalid_request_error")
            out.client.append(error_event(ClientError(str(message.get("message") or code),
                                                      code=code, type_=type_)))
        elif kind == "end" and not self.ending:
            while self.pending:  # the worker finalized everything it had
                self._complete(self.pending.pop(0), out)
            self.started, self.items, self.announced = False, {}, set()
            self.gen += 1
            if message.get("reason") == "shutdown":
                out.client.append(error_event(ClientError(
                    "The transcription worker shut down; audio that follows starts a new "
                    "session.", code="session_restarted", type_="server_error")))
        return out

    def _transcript(self, m: dict[str, Any], now: float, out: Actions) -> None:
        key = (self.gen, int(m.get("segment_id") or 0))
        start = self.origin_s + float(m.get("start") or 0.0)
        end = self.origin_s + float(m.get("end") or 0.0)
        final = bool(m.get("is_final"))
        text = str(m.get("transcript") or "").strip()
        if not final:
            text = settled(text, str(m.get("stable_text") or ""))
        if final:
            self.announced.discard(key)
        # a final past the first pending cut: every utterance before that cut is in
        while self.pending and end > self.pending[0].cut_s + EPS_S:
            self._complete(self.pending.pop(0), out)
        owner = next((p for p in self.pending if end <= p.cut_s + EPS_S), None)
        if owner is None and end <= self.dropped_until_s + EPS_S:
            return  # cleared audio
        if owner is not None:
            self._gather(owner.item, text, final, start, end, out)
            if final:
                owner.waiting.discard(key)
                if end >= owner.cut_s - 0.1:  # it reaches the cut: nothing else fits before
                    self.pending.remove(owner)
                    self._complete(owner, out)
                elif not owner.waiting:
                    owner.due = min(owner.due, now + COMMIT_GRACE_S)
            return
        if not final:
            self.announced.add(key)
        if end <= self.last_cut_s + EPS_S:  # a commit's utterance, after its item completed
            if final:
                self._own_item(text, start, end, out)
            return
        if self.config.manual and key not in self.items:
            self.open = self.open or Item(new_id("item"))
            self._gather(self.open, text, final, start, end, out)
            return
        item = self.items.setdefault(key, Item(new_id("item")))
        if not item.started:
            item.started = True
            out.event("input_audio_buffer.speech_started", item_id=item.id,
                      audio_start_ms=max(0, round(start * 1000)))
        self._delta(item, text, out)
        if final:
            del self.items[key]
            out.event("input_audio_buffer.speech_stopped", item_id=item.id,
                      audio_end_ms=round(end * 1000))
            out.event("input_audio_buffer.committed", item_id=item.id,
                      previous_item_id=self.previous_item)
            self.previous_item = item.id
            item.texts, item.start_s, item.end_s = [text] if text else [], start, end
            self._completed(item, out)

    def _own_item(self, text: str, start: float, end: float, out: Actions) -> None:
        """A final that came after its commit's item was completed: an item of its own."""
        if not text:
            return
        item = Item(new_id("item"), texts=[text], start_s=start, end_s=end)
        out.event("input_audio_buffer.committed", item_id=item.id,
                  previous_item_id=self.previous_item)
        self.previous_item = item.id
        self._complete(Pending(item, end, 0.0, set()), out)

    def _gather(self, item: Item, text: str, final: bool, start: float, end: float,
                out: Actions) -> None:
        """Commit mode: a partial or final of one of the item's utterances."""
        item.start_s = start if item.start_s is None else min(item.start_s, start)
        item.end_s = max(item.end_s, end)
        self._delta(item, " ".join([*item.texts, text]).strip(), out)
        if final and text:
            item.texts.append(text)

    def _delta(self, item: Item, text: str, out: Actions) -> None:
        words = text.split()
        said = len(item.sent)
        if len(words) <= said or [word_key(w) for w in words[:said]] != item.sent:
            return  # nothing new, or a revision of what was said
        out.event("conversation.item.input_audio_transcription.delta", item_id=item.id,
                  content_index=0, delta=(" " if said else "") + " ".join(words[said:]))
        item.sent = [word_key(w) for w in words]

    def _complete(self, pending: Pending, out: Actions) -> None:
        item = pending.item
        self._delta(item, " ".join(item.texts), out)
        self._completed(item, out)

    def _completed(self, item: Item, out: Actions) -> None:
        seconds = max(0.0, item.end_s - (item.start_s or item.end_s))
        out.event("conversation.item.input_audio_transcription.completed", item_id=item.id,
                  content_index=0, transcript=" ".join(item.texts),
                  usage={"type": "duration", "seconds": round(seconds, 3)})
