"""Test-side audio encoders, independent of stt.core.audio (G.711 through the stdlib's audioop)."""

from __future__ import annotations

import warnings

import numpy as np

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # removed in Python 3.13; the tests run on 3.11/3.12


def encode(samples: np.ndarray, encoding: str) -> bytes:
    """float32 (frames,) or (frames, channels) -> bytes in ``encoding``, interleaved."""
    pcm16 = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    if encoding == "pcm_s16le":
        return pcm16
    if encoding == "pcm_f32le":
        return np.ascontiguousarray(samples, dtype="<f4").tobytes()
    if encoding == "mulaw":
        return audioop.lin2ulaw(pcm16, 2)
    if encoding == "alaw":
        return audioop.lin2alaw(pcm16, 2)
    raise ValueError(encoding)
