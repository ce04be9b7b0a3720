"""The segmenter alone: frames in, boundaries out, every state of the voice state machine.

Speech is real (the bundled LibriVox sample), silence is digital zeros, noise is seeded white
noise. Frames are the only clock.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import SAMPLE

from stt.config import Settings
from stt.core.audio import load_16k_mono, to_pcm16
from stt.core.segmenter import (
    Ended,
    Opened,
    Segmenter,
    SegmenterParams,
    VoiceState,
)
from stt.core.vad import FRAME_S, FRAME_SAMPLES, PERIODIC_THRESHOLD, periodicity

SR = 16000
_SPEECH = load_16k_mono(str(SAMPLE))
SPEECH = _SPEECH[int(0.55 * SR): int(7.2 * SR)]   # continuous speech for the VAD
LONG_SPEECH = _SPEECH[int(19.4 * SR): int(25.2 * SR)]


def frames(audio: np.ndarray) -> np.ndarray:
    n = len(audio) // FRAME_SAMPLES
    return audio[: n * FRAME_SAMPLES].reshape(n, FRAME_SAMPLES)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SR), dtype=np.float32)


def push_all(seg: Segmenter, audio: np.ndarray) -> list[tuple[int, object, VoiceState]]:
    """(frame index, boundary or None, state after) for every frame of ``audio``."""
    out = []
    for f in frames(audio):
        index = seg.frames
        boundary = seg.push(f, to_pcm16(f), float(np.mean(f * f)))
        out.append((index, boundary, seg.state))
    return out


def params(**overrides: object) -> SegmenterParams:
    values: dict[str, object] = {"chunk_timeout_s": 0.6}
    values.update(overrides)
    return Settings.from_env(environ={}, overrides=values).segmenter_params()


def test_params_are_derived_from_the_settings_in_frames() -> None:
    p = params(chunk_timeout_s=0.8, hangover_ms=300, preroll_ms=300, vad_start_ms=90,
               buffer_size_bytes=64000, min_pitched_ms=90)
    assert (p.endpoint_frames, p.hangover_frames, p.preroll_frames, p.onset_frames,
            p.max_frames, p.pitch_frames) == (27, 10, 10, 3, 66, 3)
    off = params(enable_vad=False)
    assert off.onset_frames == 1 and off.pitch_frames == 0
    # the size limit is the smaller of the two settings, and never below the endpoint
    assert params(max_segment_s=1.0).max_frames == 33
    assert params(buffer_size_bytes=3200, chunk_timeout_s=0.6).max_frames == 22


def test_silence_stays_quiet_and_keeps_only_the_preroll() -> None:
    seg = Segmenter(params())
    steps = push_all(seg, silence(2.0))
    assert all(b is None and st is VoiceState.QUIET for _, b, st in steps)
    assert seg.segment is None and seg.frames == len(steps)
    assert len(seg._preroll) == seg.params.preroll_frames


def test_an_utterance_goes_quiet_starting_speaking_stopping_and_ends_on_the_endpoint() -> None:
    p = params()
    seg = Segmenter(p)
    steps = push_all(seg, np.concatenate([silence(1.0), SPEECH, silence(1.5)]))
    states = [st for _, _, st in steps]
    seen = [states[0]] + [b for a, b in itertools.pairwise(states) if a != b]
    # the order of states, collapsed: quiet, (starting), speaking/stopping alternating, quiet
    assert seen[0] is VoiceState.QUIET and seen[-1] is VoiceState.QUIET
    assert VoiceState.SPEAKING in seen and VoiceState.STOPPING in seen
    boundaries = [(i, b) for i, b, _ in steps if b is not None]
    (i_open, opened), (i_end, ended) = boundaries
    assert isinstance(opened, Opened) and isinstance(ended, Ended) and ended.rest is None
    segment = opened.segment
    assert ended.segment is segment and seg.segment is None
    # the segment starts with the pre-roll: onset - preroll + 1
    assert segment.first_frame == i_open + 1 - p.preroll_frames
    assert segment.first_frame * FRAME_S < 1.0 < (i_open + 1) * FRAME_S
    # it ended after endpoint_frames of silence; the hangover of it is kept
    assert segment.trailing_silence == p.endpoint_frames
    assert ended.n_frames == len(segment) - (p.endpoint_frames - p.hangover_frames)
    assert i_end == segment.first_frame + len(segment) - 1
    assert (segment.first_frame + ended.n_frames) * FRAME_S == pytest.approx(
        1.0 + len(SPEECH) / SR + p.hangover_frames * FRAME_S, abs=0.4)
    assert segment.pitched(p.pitch_frames, final=True)


def test_voiced_frames_short_of_the_onset_are_starting_not_speaking() -> None:
    seg = Segmenter(params(vad_start_ms=150))  # every frame of the onset window must be voiced
    push_all(seg, silence(0.5))
    states = []
    for f in frames(SPEECH):
        if isinstance(seg.push(f, to_pcm16(f), float(np.mean(f * f))), Opened):
            break
        states.append(seg.state)
    assert VoiceState.STARTING in states and VoiceState.SPEAKING not in states
    assert seg.state is VoiceState.SPEAKING
    # one voiced frame in a window of silence falls back to quiet once it leaves the window
    seg = Segmenter(params(vad_start_ms=150))
    push_all(seg, silence(0.5))
    for f in frames(SPEECH):
        seg.push(f, to_pcm16(f), float(np.mean(f * f)))
        if seg.state is VoiceState.STARTING:
            break
    steps = push_all(seg, silence(0.5))
    assert steps[-1][2] is VoiceState.QUIET and seg.segment is None


def test_white_noise_may_open_a_segment_but_has_no_pitch() -> None:
    p = params()
    seg = Segmenter(p)
    noise = np.random.default_rng(1).normal(0, 0.3, int(1.5 * SR)).astype(np.float32)
    steps = push_all(seg, np.concatenate([noise, silence(1.0)]))
    ended = [b for _, b, _ in steps if isinstance(b, Ended)]
    assert ended, "webrtcvad calls loud white noise speech"
    assert not ended[0].segment.pitched(p.pitch_frames, upto=ended[0].n_frames, final=True)


def test_the_size_limit_cuts_at_a_quiet_point_and_the_rest_carries_on() -> None:
    p = params(buffer_size_bytes=64000)  # 2 s
    seg = Segmenter(p)
    steps = push_all(seg, np.concatenate([silence(0.3), LONG_SPEECH]))
    cuts = [b for _, b, _ in steps if isinstance(b, Ended)]
    assert len(cuts) >= 2 and all(c.rest is not None for c in cuts)
    for a, b in itertools.pairwise(cuts):
        assert a.rest is b.segment  # each cut's rest is the next one cut
    for c in cuts:
        assert c.rest is not None and 1 <= c.n_frames <= p.max_frames
        assert c.rest.first_frame == c.segment.first_frame + c.n_frames  # no gap, no overlap
    ids = [c.segment.segment_id for c in cuts]
    assert ids == sorted(set(ids))


def test_close_keeps_the_hangover_and_the_dropped_silence_becomes_preroll() -> None:
    p = params()
    seg = Segmenter(p)
    push_all(seg, np.concatenate([SPEECH[: 2 * SR], silence(0.45)]))  # less than the endpoint
    assert seg.state is VoiceState.STOPPING
    ended = seg.close()
    assert isinstance(ended, Ended) and seg.segment is None and seg.state is VoiceState.QUIET
    trailing = ended.segment.trailing_silence
    assert ended.n_frames == len(ended.segment) - (trailing - p.hangover_frames)
    assert len(seg._preroll) == min(p.preroll_frames, trailing - p.hangover_frames)
    assert seg.close() is None


def test_forget_preroll_starts_the_next_segment_at_its_onset() -> None:
    seg = Segmenter(params())
    push_all(seg, silence(1.0))
    seg.forget_preroll()
    steps = push_all(seg, SPEECH[: SR])
    (index, opened, _), = [s for s in steps if isinstance(s[1], Opened)]
    assert isinstance(opened, Opened)
    # without the silence before it, the segment holds only the frames since the reset
    assert index - int(1.0 / FRAME_S) < seg.params.preroll_frames  # onset soon after the reset
    assert opened.segment.first_frame == int(1.0 / FRAME_S)


def test_vad_off_opens_on_the_first_frame_and_skip_advances_time() -> None:
    seg = Segmenter(params(enable_vad=False))
    seg.skip()
    seg.skip()
    f = silence(0.03)
    boundary = seg.push(f, to_pcm16(f), 0.0)
    assert isinstance(boundary, Opened) and boundary.segment.first_frame == 2
    assert seg.state is VoiceState.SPEAKING  # with VAD off, silence counts as speech
    assert seg.frames == 3


@pytest.mark.parametrize("freq_hz", [500.0, 880.0, 1500.0])
def test_a_notification_tone_opens_no_speech(freq_hz: float) -> None:
    """A beep is periodic like a voice but machine-exact: no pitch, so no interrupt and no
    transcription (it stays a segment webrtcvad may open)."""
    from bench.scenarios import beep

    p = params()
    tone = beep(0.4, freq_hz, 0.1)
    assert np.count_nonzero(periodicity(frames(tone)) >= PERIODIC_THRESHOLD) < p.pitch_frames
    assert np.count_nonzero(periodicity(frames(SPEECH)) >= PERIODIC_THRESHOLD) > 0.5 * len(
        frames(SPEECH))  # while most frames of speech have a pitch
    seg = Segmenter(p)
    steps = push_all(seg, np.concatenate([silence(0.3), tone, silence(1.0)]))
    for _, b, _ in steps:
        if isinstance(b, Ended):
            assert not b.segment.pitched(p.pitch_frames, upto=b.n_frames, final=True)


# --- the noise gate ------------------------------------------------------------------------

def noise(seconds: float, db: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * SR)) * 10 ** (db / 20)).astype(np.float32)


def always_voiced(seg: Segmenter, *, between: bool = True) -> Segmenter:
    """webrtcvad replaced by a detector that hears voice in everything inside an utterance
    (and, unless ``between`` is False, only in sound louder than -40 dBFS between them): the
    gate alone decides where an utterance ends."""
    def is_speech(pcm: bytes) -> bool:
        level = np.frombuffer(pcm, dtype=np.int16).astype(np.float64) / 32768
        return between or seg.segment is not None or float(np.mean(level * level)) > 1e-4

    seg._is_speech = is_speech
    return seg


def test_voiced_frames_near_the_noise_floor_do_not_hold_the_endpoint() -> None:
    loud_end = int(2.0 / FRAME_S)  # its last frame: 1 s of room noise, 1 s of loud sound, room
    audio = np.concatenate([noise(1.0, -60), noise(1.0, -20, seed=1), noise(2.0, -57, seed=2)])
    gated = always_voiced(Segmenter(params(chunk_timeout_s=0.6)), between=False)
    (end,) = [i for i, b, _ in push_all(gated, audio) if isinstance(b, Ended)]
    assert end - loud_end == gated.params.endpoint_frames  # timed from the loud sound's end
    ungated = always_voiced(Segmenter(params(chunk_timeout_s=0.6, noise_gate_db=0)), between=False)
    assert not [b for _, b, _ in push_all(ungated, audio) if isinstance(b, Ended)]


def test_no_gate_before_a_floor_was_heard_between_utterances() -> None:
    # a session that starts in the middle of steady voice has no floor below it: never gated
    seg = always_voiced(Segmenter(params(chunk_timeout_s=0.6)))
    assert not [b for _, b, _ in push_all(seg, noise(3.0, -30)) if isinstance(b, Ended)]
    assert seg.segment is not None and seg.segment.trailing_silence == 0


def test_a_noisy_room_is_not_gated() -> None:
    # speech only 30 dB above the room: its quiet syllables are near the noise, keep them all
    audio = np.concatenate([noise(1.0, -50), noise(1.0, -20, seed=1), noise(2.0, -48, seed=2)])
    seg = always_voiced(Segmenter(params(chunk_timeout_s=0.6)), between=False)
    assert not [b for _, b, _ in push_all(seg, audio) if isinstance(b, Ended)]


def test_real_speech_ends_sooner_with_the_gate_than_webrtcvad_alone_would() -> None:
    """webrtcvad keeps calling a few frames of room noise after speech voiced."""
    audio = np.concatenate([noise(1.0, -60), SPEECH + noise(len(SPEECH) / SR, -60, seed=1),
                            noise(2.0, -60, seed=2)])

    def end_frame(**overrides: object) -> int:
        seg = Segmenter(params(chunk_timeout_s=0.6, **overrides))
        return [i for i, b, _ in push_all(seg, audio) if isinstance(b, Ended)][-1]

    speech_end = (SR + len(SPEECH)) // FRAME_SAMPLES
    gated, ungated = end_frame(), end_frame(noise_gate_db=0)
    assert gated < ungated
    assert gated - speech_end <= params(chunk_timeout_s=0.6).endpoint_frames


def test_digital_silence_teaches_no_floor() -> None:
    audio = np.concatenate([silence(1.0), SPEECH, silence(1.0), SPEECH, silence(1.0)])

    def ends(**overrides: object) -> list[int]:
        seg = Segmenter(params(chunk_timeout_s=0.6, **overrides))
        return [i for i, b, _ in push_all(seg, audio) if isinstance(b, Ended)]

    assert ends() == ends(noise_gate_db=0)
