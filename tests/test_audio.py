"""Decoding and resampling against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from audio_util import audioop, encode

from stt.core.audio import Converter, decode
from stt.wire.protocol import ProtocolError


@pytest.mark.parametrize("encoding,reference", [("mulaw", audioop.ulaw2lin),
                                                 ("alaw", audioop.alaw2lin)])
def test_g711_tables_match_the_stdlib_for_every_code(encoding: str, reference: object) -> None:
    codes = bytes(range(256))
    expected = np.frombuffer(reference(codes, 2), dtype="<i2") / 32768.0  # type: ignore[operator]
    assert np.allclose(decode(codes, encoding, 1), expected, atol=1e-6)


def test_stereo_is_downmixed() -> None:
    left = np.full(100, 0.5, dtype=np.float32)
    right = np.full(100, -0.25, dtype=np.float32)
    mono = decode(encode(np.stack([left, right], axis=1), "pcm_s16le"), "pcm_s16le", 2)
    assert mono.shape == (100,) and np.allclose(mono, 0.125, atol=1e-3)


def test_f32_rejects_nan() -> None:
    with pytest.raises(ProtocolError):
        decode(np.array([0.0, np.nan], dtype="<f4").tobytes(), "pcm_f32le", 1)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_streaming_resampler_keeps_duration_and_pitch_across_chunks(rate: int) -> None:
    t = np.arange(rate * 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    conv = Converter(rate, 1, "pcm_f32le")
    step = rate // 50  # 20 ms chunks
    out = np.concatenate([conv.convert(encode(tone[i:i + step], "pcm_f32le"))
                          for i in range(0, len(tone), step)] + [conv.flush()])
    assert abs(len(out) - 32000) <= 2
    spectrum = np.abs(np.fft.rfft(out[4000:-4000]))
    peak_hz = np.argmax(spectrum) * 16000 / len(out[4000:-4000])
    assert abs(peak_hz - 440) < 3
