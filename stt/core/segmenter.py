"""Where utterances begin and end: voice activity on 30 ms frames, as a small state machine.

Frames come in one at a time, each with its VAD decision made here; :meth:`Segmenter.push`
answers with a :class:`Boundary` when a segment opened or ended. The states
(:class:`VoiceState`):

* ``QUIET``: no speech. The last ``preroll_frames`` are kept, so first syllables survive.
* ``STARTING``: some frames of the onset window (``VAD_START_WINDOW_MS``) are voiced, not yet
  ``onset_frames`` of them. A cough or a click usually stays here and falls back to ``QUIET``.
* ``SPEAKING``: a segment is open (it starts with the pre-roll) and its last frame is speech.
* ``STOPPING``: a segment is open and silence trails it. ``endpoint_frames`` of trailing
  silence end it (:class:`Ended`); the last ``hangover_frames`` of that silence stay in the
  segment and the rest becomes the next segment's pre-roll. A voiced frame goes back to
  ``SPEAKING``.

Inside a segment, a voiced frame counts as speech only if it is ``gate_db`` above the noise
floor: webrtcvad hears breath, room noise and reverberation after the last word as voice,
which would hold the endpoint back by 0.1-0.5 s. The floor is learned from the unvoiced
frames between utterances (the quietest recent one, rising at most 10 dB/s, so it follows a
room that got louder; known after ``FLOOR_LEARN_FRAMES`` of them) and held while a segment is
open, so speech never sets its own bar. Digital silence (a muted or synthetic source) teaches
no floor; without one, or when the segment is not ``GATE_RANGE_DB`` louder than it (a noisy
room, where quiet speech is close to the noise), nothing is gated: a gated frame is always at
least 25 dB below the segment's loudest. Onsets are never gated.

A segment that reaches ``max_frames`` is cut at its quietest recent point (the middle of the
longest unvoiced run in the last ``CUT_SEARCH_S``, else the lowest-energy frame): the part
before is finalized and the rest carries on as a new open segment (:attr:`Ended.rest`).

Whether a segment is *speech* and not noise is a second question, answered lazily by
:meth:`Segment.pitched`: webrtcvad calls loud noise speech, and only voiced speech has a pitch.

No clock, no I/O, no protocol: frames in, boundaries out. The session decides what they mean
(finals, partials, interrupts).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

import numpy as np

from stt.core.audio import SAMPLE_RATE, to_pcm16
from stt.core.vad import FRAME_S, FRAME_SAMPLES, PERIODIC_THRESHOLD, FrameVAD, periodicity

VAD_START_WINDOW_MS = 150  # the window STT_VAD_START_MS of voiced audio must fall in
ONSET_WINDOW_FRAMES = round(VAD_START_WINDOW_MS / 1000 / FRAME_S)
# A pause this long inside a segment starts the onset over: speech after it is judged (for an
# interrupt) on its own frames, not diluted by a false start on noise long before it
ONSET_RESET_FRAMES = round(0.3 / FRAME_S)
CUT_SEARCH_S = 3.0               # how far back from the size limit to look for a quiet point
PITCH_CHECK_FRAMES = 3           # periodicity is computed in batches of this many new frames
BYTES_PER_SECOND_16K = SAMPLE_RATE * 2  # STT_BUFFER_SIZE_BYTES is counted in 16 kHz s16 mono
FLOOR_RISE = 10 ** (10.0 / 10 * FRAME_S)  # between utterances the floor rises 10 dB/s at most
FLOOR_MIN = 1e-10                # below -100 dBFS: digital silence, no noise floor to learn
GATE_RANGE_DB = 35.0             # and only in a segment this much louder than the floor
GATE_RANGE = 10 ** (GATE_RANGE_DB / 10)
FLOOR_LEARN_FRAMES = 10          # unvoiced frames between utterances before the floor is known
PCM_FRAME_BYTES = 2 * FRAME_SAMPLES


def frame_inputs(frames: np.ndarray) -> tuple[bytes, list[float]]:
    """What :meth:`Segmenter.push` takes besides the frame, for (n, 480) frames at once: their
    16-bit PCM (``PCM_FRAME_BYTES`` per frame) and each frame's mean energy."""
    energies = (np.einsum("ij,ij->i", frames, frames) / FRAME_SAMPLES).tolist()
    return to_pcm16(frames), energies


class VoiceState(enum.Enum):
    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    STOPPING = "stopping"


@dataclass(frozen=True)
class SegmenterParams:
    """Every segmentation rule in frames, derived once from the settings."""

    vad_enabled: bool = True
    vad_aggressiveness: int = 2
    onset_frames: int = 3        # voiced frames within the onset window that open a segment
    preroll_frames: int = 10     # kept before the onset
    endpoint_frames: int = 27    # trailing silence that ends a segment
    hangover_frames: int = 10    # of that silence, kept at the segment's end
    gate_db: float = 10.0        # a voiced frame this close to the noise floor is not speech
    max_frames: int = 500        # longest segment before it is cut
    pitch_frames: int = 3        # voiced frames with a pitch that make a segment speech


@dataclass
class Segment:
    """One utterance's audio and per-frame decisions, as it grows."""

    segment_id: int
    first_frame: int                  # index on the session's frame timeline
    # the audio, one growing buffer: a job takes a slice instead of joining a list of frames
    audio: np.ndarray = field(default_factory=lambda: np.empty(64 * FRAME_SAMPLES, np.float32))
    n_frames: int = 0
    voiced: list[bool] = field(default_factory=list)   # webrtcvad's word, per frame
    speech: list[bool] = field(default_factory=list)   # voiced and above the noise gate
    energy: list[float] = field(default_factory=list)
    speech_count: int = 0             # frames that were speech: what resets trailing_silence
    peak: float = 0.0                 # the loudest voiced frame's energy
    voiced_since_onset: int = 0
    frames_since_onset: int = 0
    trailing_silence: int = 0
    periodic: int = 0                 # voiced frames with a pitch, counted until there are enough
    pitch_checked: int = 0            # frames examined for pitch so far

    def append(self, frame: np.ndarray, voiced: bool, energy: float, speech: bool) -> None:
        n = self.n_frames
        at = n * FRAME_SAMPLES
        end = at + FRAME_SAMPLES
        audio = self.audio
        if end > audio.size:  # grow geometrically; memory follows speech
            grown = np.empty(audio.size * 2, dtype=np.float32)
            grown[:at] = audio[:at]
            self.audio = audio = grown  # slices handed to jobs keep the old buffer, still valid
        audio[at:end] = frame
        self.n_frames = n + 1
        self.voiced.append(voiced)
        self.energy.append(energy)
        self.speech.append(speech)
        if voiced and energy > self.peak:
            self.peak = energy
        if speech:
            self.speech_count += 1
            self.trailing_silence = 0
        else:
            self.trailing_silence += 1

    def __len__(self) -> int:
        return self.n_frames

    @property
    def start_s(self) -> float:
        return self.first_frame * FRAME_S

    def frame(self, i: int) -> np.ndarray:
        return self.audio[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]

    def samples(self, first: int, end: int) -> np.ndarray:
        """Frames ``first..end`` as one array: a view, never written again."""
        return self.audio[first * FRAME_SAMPLES:end * FRAME_SAMPLES]

    def pitched(self, need: int, upto: int | None = None, final: bool = False) -> bool:
        """Does the segment hold ``need`` voiced frames with a pitch: speech, not noise?

        Counted lazily, a few frames at a time, and no more once the answer is yes: speech
        qualifies within its first syllables, so only noise pays for looking further.
        """
        end = len(self) if upto is None else upto
        if self.periodic >= need:
            return True
        if not final and end - self.pitch_checked < PITCH_CHECK_FRAMES:
            return False
        idx = [i for i in range(self.pitch_checked, end) if self.voiced[i]]
        self.pitch_checked = max(self.pitch_checked, end)
        if idx:
            frames = self.samples(0, end).reshape(-1, FRAME_SAMPLES)
            scores = periodicity(frames[idx])
            self.periodic += int(np.count_nonzero(scores >= PERIODIC_THRESHOLD))
        return self.periodic >= need


@dataclass(frozen=True)
class Opened:
    segment: Segment


@dataclass(frozen=True)
class Ended:
    """A segment closed: its first ``n_frames`` are the utterance to finalize."""

    segment: Segment
    n_frames: int
    rest: Segment | None = None  # a cut at the size limit: the open segment that carries on


Boundary = Opened | Ended


class Segmenter:
    def __init__(self, params: SegmenterParams) -> None:
        self.params = params
        self.frames = 0                 # frames seen: the session's timeline
        self.segment: Segment | None = None
        self._next_segment_id = 1
        self._vad = FrameVAD(params.vad_enabled, params.vad_aggressiveness)
        self._is_speech = self._vad.is_speech_pcm
        # the rules push() reads on every frame, as plain attributes
        self._onset_frames = params.onset_frames
        self._endpoint_frames = params.endpoint_frames
        self._max_frames = params.max_frames
        self._gate = 10 ** (params.gate_db / 10) if params.gate_db > 0 else 0.0
        self._floor = 0.0               # the noise floor's energy, learned from
        self._floor_frames = 0          # this many unvoiced frames between utterances
        self._window: collections.deque[bool] = collections.deque(maxlen=ONSET_WINDOW_FRAMES)
        # the last preroll_frames frames (appending beyond that drops the oldest)
        self._preroll: collections.deque[tuple[np.ndarray, bool, float, bool]] = collections.deque(
            maxlen=params.preroll_frames)

    @property
    def state(self) -> VoiceState:
        seg = self.segment
        if seg is None:
            return VoiceState.STARTING if any(self._window) else VoiceState.QUIET
        return VoiceState.STOPPING if seg.trailing_silence else VoiceState.SPEAKING

    @property
    def next_segment_id(self) -> int:
        return self._next_segment_id

    def resume(self, frames: int, next_segment_id: int) -> None:
        """Carry on a session's timeline and utterance numbers (a session from another replica)."""
        self.frames = frames
        self._next_segment_id = next_segment_id

    def retune(self, params: SegmenterParams) -> None:
        """New endpoint and size rules (a start that chose another endpointing); the VAD, the
        noise floor and the open segment carry on."""
        self.params = params
        self._endpoint_frames = params.endpoint_frames
        self._max_frames = params.max_frames

    def skip(self) -> None:
        """A frame that is not listened to (half duplex): time passes, nothing is kept."""
        self.frames += 1

    def push(self, frame: np.ndarray, pcm: bytes, energy: float) -> Boundary | None:
        """One frame (float samples, its 16-bit PCM and mean energy)."""
        index = self.frames
        self.frames = index + 1
        voiced = self._is_speech(pcm)
        seg = self.segment
        if seg is None:
            if not voiced and energy > FLOOR_MIN:
                self._learn_floor(energy)
            # a bounded deque: drops the oldest
            self._preroll.append((frame, voiced, energy, voiced))
            window = self._window
            window.append(voiced)
            if voiced and sum(window) >= self._onset_frames:
                return Opened(self._open(index))
            return None
        floor = self._floor if self._floor_frames >= FLOOR_LEARN_FRAMES else 0.0
        speech = voiced and (energy >= floor * self._gate or seg.peak < floor * GATE_RANGE)
        seg.append(frame, voiced, energy, speech)
        if seg.trailing_silence >= ONSET_RESET_FRAMES:
            seg.frames_since_onset = seg.voiced_since_onset = 0
        else:
            seg.frames_since_onset += 1
            seg.voiced_since_onset += voiced
        if seg.trailing_silence >= self._endpoint_frames:
            return self.close()
        if seg.n_frames >= self._max_frames and not seg.trailing_silence:
            # in a pause the speech is all in: the endpoint (or the turn) ends the segment, its
            # final is the one already decoding; speech that resumes is cut at the pause
            return self._cut()
        return None

    def _learn_floor(self, energy: float) -> None:
        rose = self._floor * FLOOR_RISE
        self._floor = energy if self._floor == 0.0 or energy < rose else rose
        self._floor_frames += 1

    def close(self) -> Ended | None:
        """End the open segment now (endpoint, ``end``, a turn change, audio that stopped)."""
        seg = self.segment
        self.segment = None
        self._window.clear()
        if seg is None:
            return None
        keep = len(seg) - max(0, seg.trailing_silence - self.params.hangover_frames)
        # the dropped silence is the next segment's pre-roll
        for i in range(max(keep, len(seg) - self.params.preroll_frames), len(seg)):
            self._preroll.append((seg.frame(i).copy(), seg.voiced[i], seg.energy[i],
                                  seg.speech[i]))
        while len(self._preroll) > self.params.preroll_frames:
            self._preroll.popleft()
        return Ended(seg, keep)

    def forget_preroll(self) -> None:
        """Audio kept so far must not start the next segment (the turn changed hands)."""
        self._preroll.clear()

    def _new_segment(self, first_frame: int) -> Segment:
        seg = Segment(segment_id=self._next_segment_id, first_frame=first_frame)
        self._next_segment_id += 1
        return seg

    def _open(self, index: int) -> Segment:
        frames = list(self._preroll)
        self._preroll.clear()
        self._window.clear()
        seg = self._new_segment(index + 1 - len(frames))
        for frame, voiced, energy, speech in frames:
            seg.append(frame, voiced, energy, speech)
        # onset counts from the voiced frames of the onset window, not the quiet pre-roll
        seg.frames_since_onset = ONSET_WINDOW_FRAMES
        seg.voiced_since_onset = sum(v for _, v, _, _ in frames[-ONSET_WINDOW_FRAMES:])
        self.segment = seg
        return seg

    def _cut(self) -> Ended:
        """The segment reached the size limit: finalize up to its quietest recent point."""
        seg = self.segment
        assert seg is not None
        n = min(len(seg), self._max_frames)  # a pause may have carried it past the limit
        lo = max(1, n - int(CUT_SEARCH_S / FRAME_S), n // 2)
        best, best_run, run = None, 0, 0
        for i in range(lo, n):  # longest unvoiced run; cut in its middle
            run = run + 1 if not seg.voiced[i] else 0
            if run > best_run:
                best_run, best = run, i - run // 2
        if best is None:
            best = lo + int(np.argmin(seg.energy[lo:n]))
        cut = max(1, best)
        rest = self._new_segment(seg.first_frame + cut)
        for i in range(cut, len(seg)):
            rest.append(seg.frame(i), seg.voiced[i], seg.energy[i], seg.speech[i])
        rest.frames_since_onset = len(rest)
        rest.voiced_since_onset = sum(rest.voiced)
        self.segment = rest
        return Ended(seg, cut, rest=rest)
