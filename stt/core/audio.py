"""Audio in: decode a chunk in the session's encoding, downmix, resample to 16 kHz mono float32.

Resampling is libsoxr's streaming resampler (one per session, so chunk boundaries leave no
clicks or phase jumps). G.711 mu-law/A-law expand through 256-entry tables built once from
the ITU-T G.711 definition.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
import soxr

from stt.wire.protocol import ErrorCode, ProtocolError

SAMPLE_RATE = 16000  # what VAD and every engine get

_SAMPLE_WIDTH = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}


def _mulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.uint8)
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = ((mantissa.astype(np.int32) << 3) + 0x84) << exponent
    values = np.where(sign != 0, 0x84 - magnitude, magnitude - 0x84)
    return (values / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint8) ^ 0x55
    sign = codes & 0x80
    exponent = ((codes >> 4) & 0x07).astype(np.int32)
    mantissa = (codes & 0x0F).astype(np.int32)
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8,
                         ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    values = np.where(sign != 0, magnitude, -magnitude)
    return (values / 32768.0).astype(np.float32)


_MULAW = _mulaw_table()
_ALAW = _alaw_table()

# The hot path (every chunk, every 30 ms frame) calls the ufuncs themselves: np.clip and
# ndarray.astype(...) * k go through Python-level wrappers and an extra temporary that cost
# more than the arithmetic on arrays this small. The results are bit-identical.
_F32 = np.dtype(np.float32)
_I16 = np.dtype("<i2")
_S16_SCALE = np.float32(1.0 / 32768.0)  # a power of two: exact, as the float64 scalar was
_clip: Any = getattr(getattr(np, "_core", None), "umath", np).clip  # the ufunc (NumPy 2)
_multiply = np.multiply


def frame_bytes(encoding: str, channels: int) -> int:
    """Bytes in one sample frame (all channels)."""
    return _SAMPLE_WIDTH[encoding] * channels


def decode(raw: bytes, encoding: str, channels: int) -> np.ndarray:
    """Raw chunk bytes -> mono float32 in [-1, 1] at the source rate."""
    width = frame_bytes(encoding, channels)
    if len(raw) % width:
        raise ProtocolError(ErrorCode.BAD_AUDIO,
                            f"chunk of {len(raw)} bytes is not a whole number of {encoding} frames "
                            f"({width} bytes for {channels} channel(s))")
    if encoding == "pcm_s16le":
        samples = _multiply(np.frombuffer(raw, dtype=_I16), _S16_SCALE, dtype=_F32)
    elif encoding == "pcm_f32le":
        samples = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            raise ProtocolError(ErrorCode.BAD_AUDIO, "pcm_f32le chunk contains NaN or infinity")
        np.clip(samples, -1.0, 1.0, out=samples)
    elif encoding == "mulaw":
        samples = _MULAW[np.frombuffer(raw, dtype=np.uint8)]
    elif encoding == "alaw":
        samples = _ALAW[np.frombuffer(raw, dtype=np.uint8)]
    else:  # parse() already refused it; keep the error explicit anyway
        raise ProtocolError(ErrorCode.BAD_AUDIO, f"unsupported encoding {encoding!r}")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


class Converter:
    """Per-session decode + downmix + streaming resample to 16 kHz."""

    def __init__(self, sample_rate: int, channels: int, encoding: str) -> None:
        self.sample_rate = sample_rate
        self.channels = channels
        self.encoding = encoding
        self._resampler = (None if sample_rate == SAMPLE_RATE else
                           soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32",
                                               quality="HQ"))
        # ResampleStream.resample_chunk checks the type and reshapes around the C call; decode()
        # always hands it float32 mono, so the C call is made directly where soxr has one
        process = getattr(self._resampler, "_process", None)
        self._process: Any = process if callable(process) else None

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * frame_bytes(self.encoding, self.channels)

    def convert(self, raw: bytes) -> np.ndarray:
        samples = decode(raw, self.encoding, self.channels)
        if self._resampler is None:
            return samples
        if self._process is not None:
            out: np.ndarray = self._process(samples.reshape(-1, 1), False)
            return out.reshape(-1)
        return self._resampler.resample_chunk(samples)

    def flush(self) -> np.ndarray:
        """The resampler's delayed tail, at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, dtype=np.float32)
        return self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 (frames,) or (frames, channels) -> interleaved little-endian int16 bytes."""
    if samples.dtype is _F32:  # the hot path: one temporary, written in place
        scaled = _clip(samples, -1.0, 1.0)
        _multiply(scaled, 32767.0, out=scaled)
        return scaled.astype(_I16).tobytes()
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def load_file(source: str | BinaryIO) -> tuple[np.ndarray, int]:
    """Read WAV/FLAC/OGG/MP3 (anything libsndfile reads), from a path or a file object, as
    float32 (frames, channels)."""
    import soundfile

    data, rate = soundfile.read(source, dtype="float32", always_2d=True)
    return data, int(rate)


def load_16k_mono(source: str | BinaryIO) -> np.ndarray:
    """A file as 16 kHz mono float32 (libsndfile decodes, libsoxr resamples)."""
    data, rate = load_file(source)
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE and mono.size:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(mono)
