"""Voice activity detection on fixed 30 ms frames of 16 kHz audio (webrtcvad).

:class:`Framer` turns arbitrary chunk lengths into whole frames; :class:`FrameVAD` says
whether one frame is speech. With VAD disabled every frame counts as speech, so utterances
end only on a gap in arriving audio, size, state change, ``end`` or idle timeout.
"""

from __future__ import annotations

import numpy as np
import webrtcvad

from .audio import SAMPLE_RATE, to_pcm16

FRAME_MS = 30
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 480
FRAME_S = FRAME_MS / 1000.0


class Framer:
    """Accumulates samples and yields whole frames; keeps the remainder for the next chunk."""

    __slots__ = ("_rest",)

    def __init__(self) -> None:
        self._rest = np.zeros(0, dtype=np.float32)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        if self._rest.size:
            samples = np.concatenate((self._rest, samples))
        whole = samples.size - samples.size % FRAME_SAMPLES
        self._rest = samples[whole:].copy()
        if whole == 0:
            return []
        return list(samples[:whole].reshape(-1, FRAME_SAMPLES))

    def flush(self) -> np.ndarray | None:
        """The partial frame left over, zero-padded to a whole frame (or None)."""
        if not self._rest.size:
            return None
        frame = np.zeros(FRAME_SAMPLES, dtype=np.float32)
        frame[: self._rest.size] = self._rest
        self._rest = np.zeros(0, dtype=np.float32)
        return frame


class FrameVAD:
    __slots__ = ("_vad",)

    def __init__(self, enabled: bool, aggressiveness: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness) if enabled else None

    def is_speech(self, frame: np.ndarray) -> bool:
        if self._vad is None:
            return True
        return bool(self._vad.is_speech(to_pcm16(frame), SAMPLE_RATE))


def frame_energy(frame: np.ndarray) -> float:
    """Mean square amplitude; used to find the quietest point to cut a long segment."""
    return float(np.dot(frame, frame)) / frame.size
