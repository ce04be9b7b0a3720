"""Smart Turn v3.2 (stt/engines/turn_model.py): the installed model is the pinned file, a different one
is refused with the fix named, and ``features``/``predict`` give the reference's numbers.

The reference is pipecat's own code, extracted from the pinned wheel by ``install()`` into
``reference/`` beside the model: ``_whisper_features.py`` (numpy only) is loaded by file path,
and the pipeline steps of ``local_smart_turn_v3.py`` (truncate/pad to the last 8 s, features
with ``do_normalize=True``, add the batch axis, run, ``outputs[0][0]``) are taken from its
source where they are plain functions and checked against its text where they are not.
"""

from __future__ import annotations

import ast
import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE, corpus_clips

from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.engines import turn_model
from stt.engines.turn_model import TurnModel, TurnModelError, features, install, verify

FEATURE_TOL = 1e-4      # max abs difference of the log-mel features (observed: 0, bit-identical)
PROBABILITY_TOL = 1e-4  # of P(complete) (observed: 0)


@pytest.fixture(scope="module")
def model_path() -> Path:
    return verify(turn_model.default_path())  # installed by script/setup


@pytest.fixture(scope="module")
def model(model_path: Path) -> TurnModel:
    return TurnModel(model_path)


@pytest.fixture(scope="module")
def sample() -> np.ndarray:
    return load_16k_mono(str(SAMPLE))


@pytest.fixture(scope="module")
def reference(model_path: Path) -> Callable[[np.ndarray], tuple[np.ndarray, float]]:
    """The reference pipeline: audio -> (its features with the batch axis, its probability)."""
    import onnxruntime as ort

    folder = turn_model.reference_dir(model_path)
    spec = importlib.util.spec_from_file_location("smart_turn_reference_features",
                                                  folder / "_whisper_features.py")
    assert spec is not None and spec.loader is not None
    whisper_features: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(whisper_features)

    source = (folder / "local_smart_turn_v3.py").read_text()
    for step in ("audio_array = truncate_audio_to_last_n_seconds(audio_array, n_seconds=8)",
                 "compute_whisper_log_mel_features(audio_array, do_normalize=True)",
                 "np.expand_dims(log_mel, axis=0)",
                 'self._session.run(None, {"input_features": input_features})',
                 "probability = cast(np.ndarray, outputs[0])[0].item()"):
        assert step in source, f"the reference pipeline changed: {step!r} not found"
    truncate_def = next(node for node in ast.walk(ast.parse(source))
                        if isinstance(node, ast.FunctionDef)
                        and node.name == "truncate_audio_to_last_n_seconds")
    namespace: dict[str, Any] = {"np": np, "_MODEL_SAMPLE_RATE": SAMPLE_RATE}
    exec(compile(ast.Module([truncate_def], []), str(folder / "local_smart_turn_v3.py"), "exec"),
         namespace)
    truncate = namespace["truncate_audio_to_last_n_seconds"]

    options = ort.SessionOptions()  # as the reference builds its session
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model_path), sess_options=options,
                                   providers=["CPUExecutionProvider"])

    def run(audio: np.ndarray) -> tuple[np.ndarray, float]:
        log_mel = whisper_features.compute_whisper_log_mel_features(truncate(audio, n_seconds=8),
                                                                    do_normalize=True)
        input_features = np.expand_dims(log_mel, axis=0)
        outputs = session.run(None, {"input_features": input_features})
        return input_features, outputs[0][0].item()

    return run


def assert_like_reference(model: TurnModel, reference: Callable[..., Any],
                          audio: np.ndarray) -> None:
    ref_features, ref_probability = reference(audio)
    ours = features(audio)
    assert ours.shape == ref_features.shape == (1, 80, 800)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref_features).max() <= FEATURE_TOL
    probability = model.predict(audio)
    assert isinstance(probability, float) and 0.0 <= probability <= 1.0
    assert abs(probability - ref_probability) <= PROBABILITY_TOL


def test_the_model_input_is_what_features_gives(model: TurnModel) -> None:
    (model_input,) = model._session.get_inputs()
    assert model_input.name == "input_features" and model_input.shape[1:] == [80, 800]


@pytest.mark.parametrize("seconds", [0.5, 2.0, 8.0, 12.0])  # front-padded, exact, truncated
def test_sample_cuts_match_the_reference(model: TurnModel, reference: Callable[..., Any],
                                         sample: np.ndarray, seconds: float) -> None:
    assert_like_reference(model, reference, sample[: int(seconds * SAMPLE_RATE)])


def test_silence_and_other_dtypes_match_the_reference(model: TurnModel,
                                                      reference: Callable[..., Any],
                                                      sample: np.ndarray) -> None:
    assert_like_reference(model, reference, np.zeros(SAMPLE_RATE, dtype=np.float32))
    assert_like_reference(model, reference, sample[: 3 * SAMPLE_RATE].astype(np.float64))


@pytest.mark.corpus
def test_corpus_clips_match_the_reference(model: TurnModel, reference: Callable[..., Any],
                                          corpus: Path) -> None:
    clips = corpus_clips(corpus)
    picked = [p for p, _ in clips if "librispeech" in str(p)][:2]
    picked += [p for p, _ in clips if "ljspeech" in str(p)][:1]
    assert picked
    for path in picked:
        assert_like_reference(model, reference, load_16k_mono(str(path)))


def test_faster_whisper_features_agree_within_float32(sample: np.ndarray) -> None:
    """Why features() is our own numpy: faster-whisper's extractor computes the same features in
    float32 (observed max difference 4.5e-6), not bit for bit like the reference's float64."""
    fw = pytest.importorskip("faster_whisper.feature_extractor")
    audio = sample[4 * SAMPLE_RATE: 12 * SAMPLE_RATE]
    normalised = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    theirs = fw.FeatureExtractor(feature_size=80, chunk_length=8)(normalised, padding=0)
    assert np.abs(features(audio)[0] - theirs).max() <= 1e-5


# End of a sentence vs inside one (word times from Whisper's alignment of the sample); the
# observed probabilities are > 0.8 and < 0.1. 31 s is the whole sample.
@pytest.mark.parametrize(("seconds", "complete"), [
    (8.5, True), (18.8, True), (26.0, True), (31.0, True),
    (5.0, False), (15.5, False), (23.5, False), (28.0, False)])
def test_sentence_ends_are_complete_and_middles_are_not(model: TurnModel, sample: np.ndarray,
                                                        seconds: float, complete: bool) -> None:
    assert (model.predict(sample[: int(seconds * SAMPLE_RATE)]) > 0.5) is complete


@pytest.fixture
def copy(model_path: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "model" / "smart-turn.onnx"
    dest.parent.mkdir()
    shutil.copyfile(model_path, dest)
    shutil.copytree(turn_model.reference_dir(model_path), turn_model.reference_dir(dest))
    return dest


def assert_refused(path: Path, problem: str) -> None:
    for load in (verify, TurnModel):
        with pytest.raises(TurnModelError) as error:
            load(path)
        message = str(error.value)
        assert str(path) in message and problem in message, message
        assert "script/setup" in message and "python -m stt.engines.turn_model install" in message


def test_a_corrupted_model_is_refused(copy: Path) -> None:
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))
    assert_refused(copy, "wrong checksum")


def test_a_truncated_model_is_refused(copy: Path) -> None:
    copy.write_bytes(copy.read_bytes()[:-1000])
    assert_refused(copy, "wrong size")


def test_a_missing_model_is_refused(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nowhere.onnx", "missing")


def test_install_is_idempotent_and_offline_when_installed(copy: Path, tmp_path: Path) -> None:
    no_pip = tmp_path / "no-pip"
    no_pip.write_text("#!/bin/sh\nexit 3\n")
    no_pip.chmod(0o755)
    assert install(copy, python=str(no_pip)) == copy  # no download: pip would have failed
    assert verify(copy) == copy
    with pytest.raises(TurnModelError, match="could not download"):  # ... as here, where it runs
        install(tmp_path / "empty" / "model.onnx", python=str(no_pip))
    assert not (tmp_path / "empty" / "model.onnx").exists()


def test_the_command_line_predicts_a_file(model_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(turn_model.ENV_PATH, str(model_path))
    assert turn_model.main(["verify"]) == 0
    assert turn_model.main(["predict", str(SAMPLE)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"turn model {model_path} verified"
    assert float(lines[1]) > 0.5  # the sample ends a sentence (observed 0.82)
