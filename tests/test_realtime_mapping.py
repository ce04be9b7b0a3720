"""The Realtime <-> worker translation on its own: no websocket, no NATS, no clock."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from stt.api.realtime_config import ClientError, SessionConfig, update, update_beta
from stt.api.realtime_mapping import COMMIT_GRACE_S, Actions, RealtimeSession, settled


def client(rs: RealtimeSession, event: dict[str, Any], now: float = 0.0) -> Actions:
    return rs.on_client(json.dumps(event), 1000.0 + now, now)


def append(rs: RealtimeSession, n_bytes: int, now: float = 0.0) -> Actions:
    audio = base64.b64encode(b"\x01" * n_bytes).decode()
    return client(rs, {"type": "input_audio_buffer.append", "audio": audio}, now)


def transcript(seg: int, text: str, start: float, end: float, final: bool = False,
               stable: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "transcript", "segment_id": seg, "transcript": text, "start": start,
            "end": end, "is_final": final, "is_partial": not final, "stable_text": stable,
            **extra}


def types(actions: Actions) -> list[str]:
    return [e["type"] for e in actions.client]


def deltas(actions: Actions) -> list[str]:
    return [e["delta"] for e in actions.client if e["type"].endswith(".delta")]


def test_a_partials_last_word_waits_unless_it_is_stable() -> None:
    assert settled("He was not.", "") == "He was"
    assert settled("He was not.", "He was not.") == "He was not."
    assert settled("He", "") == ""


def test_server_turn_detection_one_item_per_utterance() -> None:
    rs = RealtimeSession("abc")
    first = append(rs, 48000)  # 1 s at 24 kHz
    assert [m["type"] for m in first.worker] == ["start", "chunk"]
    assert first.worker[0] | {"sample_rate": 24000, "encoding": "pcm_s16le"} == first.worker[0]
    a = rs.on_worker(transcript(1, "he was", 0.3, 1.0), 1.0)
    assert types(a) == ["input_audio_buffer.speech_started",
                        "conversation.item.input_audio_transcription.delta"]
    assert deltas(a) == ["he"]  # "was" waits for the next partial
    assert a.client[0]["audio_start_ms"] == 300
    item = a.client[0]["item_id"]
    b = rs.on_worker(transcript(1, "He was not an ill-", 0.3, 2.0), 2.0)
    assert deltas(b) == [" was not an"]  # case and punctuation aside, it continues
    c = rs.on_worker(transcript(1, "He was not a nil.", 0.3, 2.5), 2.5)
    assert deltas(c) == []  # a revision: nothing, nothing withdrawn
    d = rs.on_worker(transcript(1, "He was not an ill-disposed young man.", 0.3, 3.6,
                                final=True), 3.6)
    assert types(d) == ["conversation.item.input_audio_transcription.delta",
                        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                        "conversation.item.input_audio_transcription.completed"]
    assert deltas(d) == [" ill-disposed young man."]
    assert {e["item_id"] for e in d.client} == {item}
    assert d.client[-1]["transcript"] == "He was not an ill-disposed young man."
    assert d.client[-1]["usage"] == {"type": "duration", "seconds": 3.3}
    assert d.client[1]["audio_end_ms"] == 3600 and d.client[2]["previous_item_id"] is None
    # a final with no partial before it (a short word) is a whole item at once
    e = rs.on_worker(transcript(2, "Yes.", 4.0, 4.5, final=True, end_of_turn=False), 5.0)
    assert types(e)[0] == "input_audio_buffer.speech_started"
    assert e.client[-2]["previous_item_id"] == item


def test_commit_with_server_turn_detection_ends_the_utterance_and_pads_a_frame() -> None:
    rs = RealtimeSession("abc")
    assert client(rs, {"type": "input_audio_buffer.commit"}).client[0]["error"]["code"] == (
        "input_audio_buffer_commit_empty")
    append(rs, 4801)  # 100 ms and half a sample
    a = client(rs, {"type": "input_audio_buffer.commit"})
    assert [m["type"] for m in a.worker] == ["chunk", "start"]  # padding, then the cut
    assert (4800 + len(a.worker[0]["audio"])) % 1440 == 0  # whole 30 ms frames at 24 kHz
    assert a.client == []


def test_manual_commit_gathers_every_final_before_its_cut() -> None:
    rs = RealtimeSession("abc", config=SessionConfig(turn_detection=None))
    append(rs, 48000 * 6)
    assert rs.on_worker(transcript(1, "one two three", 0.2, 2.0, final=True), 2.0).client
    rs.on_worker(transcript(2, "four five", 3.0, 4.0), 4.0)
    commit = client(rs, {"type": "input_audio_buffer.commit"}, 6.0)
    assert types(commit) == ["input_audio_buffer.committed"]
    item = commit.client[0]["item_id"]
    # the final of the utterance the commit cut reaches the cut: the item is complete at once
    done = rs.on_worker(transcript(2, "four five six", 3.0, 5.99, final=True), 6.5)
    assert types(done) == ["conversation.item.input_audio_transcription.delta",
                           "conversation.item.input_audio_transcription.completed"]
    assert done.client[-1] | {"item_id": item, "transcript": "one two three four five six"} == (
        done.client[-1])
    assert rs.deadline is None


def test_manual_commit_after_silence_completes_after_the_grace() -> None:
    rs = RealtimeSession("abc", config=SessionConfig(turn_detection=None))
    append(rs, 48000 * 5)
    rs.on_worker(transcript(1, "hello there", 0.2, 2.0, final=True), 3.0)
    client(rs, {"type": "input_audio_buffer.commit"}, 5.0)
    assert rs.deadline == pytest.approx(5.0 + COMMIT_GRACE_S)
    assert rs.tick(5.5).client == []
    done = rs.tick(5.0 + COMMIT_GRACE_S)
    assert done.client[-1]["transcript"] == "hello there"
    # a final that was still decoding then is an item of its own, not lost
    late = rs.on_worker(transcript(2, "yes", 4.6, 4.9, final=True), 7.0)
    assert types(late) == ["input_audio_buffer.committed",
                           "conversation.item.input_audio_transcription.delta",
                           "conversation.item.input_audio_transcription.completed"]
    assert late.client[0]["previous_item_id"] == done.client[-1]["item_id"]


def test_a_final_beyond_the_cut_completes_the_commit() -> None:
    rs = RealtimeSession("abc", config=SessionConfig(turn_detection=None))
    append(rs, 48000 * 3)
    client(rs, {"type": "input_audio_buffer.commit"}, 3.0)
    append(rs, 48000 * 3, 3.0)
    out = rs.on_worker(transcript(1, "later words", 3.2, 5.0, final=True), 5.5)
    assert types(out)[0] == "conversation.item.input_audio_transcription.completed"
    assert out.client[0]["transcript"] == ""  # the committed audio had no words
    assert "later" in " ".join(deltas(out))  # the next item's


def test_clear_drops_the_audio_so_far() -> None:
    rs = RealtimeSession("abc")
    append(rs, 48000 * 2)
    rs.on_worker(transcript(1, "scratch that one", 0.2, 1.5), 1.5)
    cleared = client(rs, {"type": "input_audio_buffer.clear"})
    assert types(cleared) == ["input_audio_buffer.cleared"]
    assert cleared.worker[-1]["type"] == "start"
    assert rs.on_worker(transcript(1, "scratch that one", 0.2, 1.9, final=True), 2.0).client == []
    append(rs, 48000)
    kept = rs.on_worker(transcript(2, "new words here", 1.9, 2.9, final=True), 3.0)
    assert kept.client[-1]["transcript"] == "new words here"


def test_formats_updates_and_a_restarted_worker_session() -> None:
    rs = RealtimeSession("abc")
    append(rs, 48000)
    upd = client(rs, {"type": "session.update", "session": {
        "type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}})
    assert types(upd) == ["session.updated"]
    assert upd.client[0]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    assert upd.worker[-1] | {"sample_rate": 8000, "encoding": "mulaw"} == upd.worker[-1]
    big = append(rs, 8000 * 3)  # 3 s of mu-law in one append: 1 s chunks
    assert [len(m["audio"]) for m in big.worker] == [8000] * 3
    # the worker ended the session (idle timeout): the next audio starts a new one, whose
    # times count from where it began
    rs.on_worker({"type": "end", "reason": "idle_timeout"}, 10.0)
    again = append(rs, 800)
    assert [m["type"] for m in again.worker] == ["start", "chunk"]
    started = rs.on_worker(transcript(1, "hi there you", 0.1, 0.5), 11.0)
    assert started.client[0]["audio_start_ms"] == 4120  # 1 s padded to 34 frames, 3 s, 0.1 s
    assert [m["type"] for m in rs.close().worker] == ["end"] and rs.close().worker == []
    assert RealtimeSession("x").close().worker == []  # no audio, no worker session to free


def test_bad_events_and_worker_errors() -> None:
    rs = RealtimeSession("abc")
    for raw, code in (("{", "invalid_json"), ("[]", "invalid_event"), ('{"a": 1}', "invalid_event"),
                      ('{"type": "conversation.item.create"}', "invalid_value")):
        err = rs.on_client(raw, 0.0, 0.0).client[0]
        assert err["type"] == "error" and err["error"]["code"] == code, (raw, err)
    worker = rs.on_worker({"type": "error", "code": "engine_failed", "message": "boom"}, 0.0)
    assert worker.client[0]["error"] | {"type": "server_error", "code": "engine_failed"} == (
        worker.client[0]["error"])
    assert rs.on_worker({"type": "eager_end_of_turn", "turn_probability": 0.9}, 0.0).client == []
    page = RealtimeSession("abc", worker_events=True)
    assert types(page.on_worker({"type": "turn_resumed", "segment_id": 1}, 0.0)) == [
        "stt.worker"]


def test_session_configuration_ga_and_beta() -> None:
    cfg = update(SessionConfig(), {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}, "turn_detection": None,
        "transcription": {"model": "gpt-4o-transcribe", "language": "de", "prompt": "Namen"}}}})
    assert (cfg.format.rate, cfg.manual, cfg.language, cfg.prompt) == (16000, True, "de", "Namen")
    assert cfg.worker_start("s") | {"language": "de", "prompt": "Namen"} == cfg.worker_start("s")
    beta = update_beta(cfg, {"input_audio_format": "g711_alaw",
                             "turn_detection": {"type": "server_vad"}})
    assert beta.format.encoding == "alaw" and not beta.manual
    assert beta.as_beta("s")["input_audio_format"] == "g711_alaw"
    for bad in ({"type": "realtime"}, {"audio": {"input": {"format": {"type": "audio/ogg"}}}},
                {"audio": {"input": {"turn_detection": {"type": "push"}}}},
                {"audio": {"input": {"transcription": {"language": "not a language!"}}}},
                {"audio": "pcm"}, {"input_audio_format": "mp3"}):
        with pytest.raises(ClientError):
            update(SessionConfig(), bad)
