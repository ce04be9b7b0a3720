"""Smart Turn v3.2: has the user finished their turn? P(complete) from the last 8 s of audio.

pipecat's Smart Turn v3.2 (BSD-2-Clause, Daily) is a small Whisper-encoder classifier: the last
8 s of 16 kHz mono audio (zero-padded at the front when shorter), normalised to zero mean and
unit variance, as 80 Whisper log-mel bands (1, 80, 800) in; P(the user finished) out (the graph
ends in a sigmoid, though its output is named ``logits``); above 0.5 means complete.

Its CPU ONNX file ships inside the ``pipecat-ai`` wheel. Depending on pipecat would pull its
whole dependency tree for one 8.7 MB file, so ``install()`` (run by ``script/setup``) downloads
the pinned wheel alone (``pip download --no-deps``), checks the wheel's SHA-256, extracts the
ONNX file into the venv and checks its SHA-256 again before every load: a different file is
refused with a clear message, never loaded. The reference feature code and pipeline
(``_whisper_features.py``, ``local_smart_turn_v3.py``) are kept beside it in ``reference/``
for ``tests/test_turn_model.py``, which proves ``features()`` equal to them; this package never
imports them.

``features()`` is the reference's numpy log-mel, step for step (float32 normalisation, float64
STFT), so the numbers are the same bit for bit. faster-whisper's ``FeatureExtractor`` computes
the same thing in float32 and agrees within 5e-6; it is not used, so the turn model does not
depend on the engine's internals.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

WHEEL_REQUIREMENT = "pipecat-ai==1.14.0"
WHEEL_NAME = "pipecat_ai-1.14.0-py3-none-any.whl"
WHEEL_SHA256 = "0352f504b44e78bdf524e45af4bc759601c835b9b7dc195efe5e03384b974a44"
MEMBER_DIR = "pipecat/audio/turn/smart_turn/"
MEMBER = MEMBER_DIR + "data/smart-turn-v3.2-cpu.onnx"
SIZE = 8_679_182
SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"
REFERENCE_FILES = ("_whisper_features.py", "local_smart_turn_v3.py")  # tests only
ENV_PATH = "STT_TURN_MODEL_PATH"
FIX = "run script/setup, or: python -m stt.engines.turn_model install"

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 8 * SAMPLE_RATE  # the model sees the last 8 s
N_FFT, HOP, N_MELS = 400, 160, 80
_MEL_FLOOR, _VARIANCE_EPS = 1e-10, 1e-7  # the reference's constants


class TurnModelError(RuntimeError):
    """The Smart Turn model file is missing or is not the pinned one."""


def default_path() -> Path:
    """``STT_TURN_MODEL_PATH``, else ``<venv>/share/stt-streaming/smart-turn-v3.2-cpu.onnx``."""
    env = os.environ.get(ENV_PATH)
    return Path(env) if env else Path(sys.prefix) / "share" / "stt-streaming" / Path(MEMBER).name


def reference_dir(path: Path | None = None) -> Path:
    """Where ``install()`` puts the reference sources: ``reference/`` beside the model."""
    return (path or default_path()).parent / "reference"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path | str | None = None) -> Path:
    """The model file, checked: exists, pinned size, pinned SHA-256; else ``TurnModelError``."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise TurnModelError(f"Smart Turn model {path}: missing; {FIX}")
    size = path.stat().st_size
    if size != SIZE:
        raise TurnModelError(f"Smart Turn model {path}: wrong size ({size:,} bytes, expected "
                             f"{SIZE:,} from {WHEEL_REQUIREMENT}); {FIX}")
    digest = _sha256(path)
    if digest != SHA256:
        raise TurnModelError(f"Smart Turn model {path}: wrong checksum (SHA-256 {digest}, "
                             f"expected {SHA256} from {WHEEL_REQUIREMENT}); {FIX}")
    return path


def _staged(dest: Path, data: bytes) -> Path:
    """``data`` written beside ``dest`` under a temporary name, for an atomic ``os.replace``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.with_name(f".{dest.name}.partial")
    staged.write_bytes(data)
    return staged


def install(dest: Path | str | None = None, python: str = sys.executable) -> Path:
    """Download the pinned pipecat wheel (no dependencies), extract the model and the reference
    sources, verify, and return the model's path. Returns at once, offline, when the model is
    already there and verified (and the reference sources beside it)."""
    dest = Path(dest) if dest is not None else default_path()
    ref = reference_dir(dest)
    try:
        verify(dest)
        if all((ref / name).is_file() for name in REFERENCE_FILES):
            return dest
    except TurnModelError:
        pass
    with tempfile.TemporaryDirectory(prefix="stt-turn-model-") as tmp:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
               WHEEL_REQUIREMENT, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / WHEEL_NAME
        if done.returncode != 0 or not wheel.is_file():
            raise TurnModelError(f"could not download {WHEEL_REQUIREMENT} ({' '.join(cmd)} exited "
                                 f"{done.returncode}): {done.stderr.strip()[-2000:]}")
        if (digest := _sha256(wheel)) != WHEEL_SHA256:
            raise TurnModelError(f"{WHEEL_NAME}: wrong checksum (SHA-256 {digest}, expected "
                                 f"{WHEEL_SHA256}); not installing it")
        with zipfile.ZipFile(wheel) as zf:
            for name in REFERENCE_FILES:
                os.replace(_staged(ref / name, zf.read(MEMBER_DIR + name)), ref / name)
            staged = _staged(dest, zf.read(MEMBER))
    try:
        verify(staged)
    except TurnModelError:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, dest)
    return dest


def _mel_filters() -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangles, (n_fft/2+1, 80), as the reference builds them."""
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        mel = 3.0 * f / 200.0
        log = f >= 1000.0
        mel[log] = 15.0 + np.log(f[log] / 1000.0) * (27.0 / np.log(6.4))
        return mel

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        f = 200.0 * m / 3.0
        log = m >= 15.0
        f[log] = 1000.0 * np.exp(np.log(6.4) / 27.0 * (m[log] - 15.0))
        return f

    top = float(hz_to_mel(np.array([SAMPLE_RATE / 2.0]))[0])
    edges = mel_to_hz(np.linspace(0.0, top, N_MELS + 2))
    bins = np.linspace(0, SAMPLE_RATE // 2, N_FFT // 2 + 1)
    slopes = edges[None, :] - bins[:, None]
    diff = np.diff(edges)
    tri = np.maximum(np.zeros(1), np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))
    return tri * (2.0 / (edges[2:] - edges[:-2]))[None, :]


_MEL_T = np.ascontiguousarray(_mel_filters().T)  # (80, 201)
_WINDOW = np.hanning(N_FFT + 1)[:-1]  # periodic Hann


def features(audio: np.ndarray) -> np.ndarray:
    """16 kHz mono audio -> the model's input, float32 (1, 80, 800): the last 8 s (zero-padded
    at the front), zero-mean/unit-variance, Whisper log-mel (log10, floored at max - 8,
    (x + 4) / 4), the trailing STFT frame dropped."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected 1-D audio, got shape {x.shape}")
    if x.size > WINDOW_SAMPLES:
        x = x[-WINDOW_SAMPLES:]
    elif x.size < WINDOW_SAMPLES:
        x = np.pad(x, (WINDOW_SAMPLES - x.size, 0))
    x = (x - x.mean()) / np.sqrt(x.var() + _VARIANCE_EPS)  # float32, as the reference
    padded = np.pad(x.astype(np.float64), (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = (np.abs(np.fft.rfft(frames * _WINDOW, axis=-1)) ** 2).T  # (201, 801)
    log_spec = np.log10(np.maximum(_MEL_FLOOR, _MEL_T @ power))[:, :-1]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)[None]


class TurnModel:
    """The verified ONNX model on onnxruntime's CPU provider. ``predict`` keeps no state between
    calls and onnxruntime's ``run`` is thread-safe, so any thread may call it."""

    def __init__(self, path: Path | str | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = verify(path)
        options = ort.SessionOptions()
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session: Any = ort.InferenceSession(str(self.path), sess_options=options,
                                                  providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name  # "input_features"

    def predict(self, audio: np.ndarray) -> float:
        """P(the user finished their turn), 0..1, from 16 kHz mono float32 audio."""
        (probability,) = self._session.run(None, {self._input: features(audio)})
        return float(probability[0, 0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stt.engines.turn_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("install", help=f"download {WHEEL_REQUIREMENT}, extract and verify")
    p.add_argument("--dest", type=Path, default=None, help=f"default: ${ENV_PATH} or the venv")
    p = sub.add_parser("verify", help="check the installed model's size and SHA-256")
    p.add_argument("path", type=Path, nargs="?", default=None)
    p = sub.add_parser("predict", help="P(turn complete) at the end of an audio file")
    p.add_argument("file", help="WAV/FLAC/OGG at any sample rate")
    p.add_argument("--model", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(f"turn model {install(args.dest)} verified")
        elif args.command == "verify":
            print(f"turn model {verify(args.path)} verified")
        else:
            from stt.core.audio import load_16k_mono

            print(f"{TurnModel(args.model).predict(load_16k_mono(args.file)):.4f}")
    except TurnModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
