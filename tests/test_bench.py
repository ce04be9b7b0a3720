"""The benchmark tools start and answer (their figures are measured by hand, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from bench.common import speech_bounds
from stt.core.audio import load_16k_mono


@pytest.mark.parametrize("module", ["bench.load", "bench.evaluate", "bench.bench_engines",
                                    "bench.abandon", "bench.replicas", "bench.endpoint",
                                    "bench.turn", "bench.turn_live"])
def test_benchmark_commands_start(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_speech_bounds_find_the_sample_sentences() -> None:
    audio = load_16k_mono(str(ROOT / "stt" / "data" / "sample.flac"))
    onset, offset = speech_bounds(audio[: 16000 * 8])
    assert 0.3 < onset < 0.7 and 7.0 < offset < 7.8  # the first sentence, 0.4 s in


def test_the_endpoint_bench_times_the_segmenter_from_the_end_of_speech() -> None:
    import numpy as np

    from bench.endpoint import measure
    from stt.config import Settings

    sentence = load_16k_mono(str(ROOT / "stt" / "data" / "sample.flac"))[: 16000 * 8]
    _, end = speech_bounds(sentence)
    audio = np.concatenate([sentence, np.zeros(16000 * 2, dtype=np.float32)])
    m = measure(audio, [end], Settings.from_env(environ={}, overrides={"chunk_timeout_s": 0.8}))
    assert m["segments"] == 1
    assert m["p50"] is not None and 0.8 <= m["p50"] < 1.2


def test_word_time_errors_match_words_in_order_on_the_session_timeline() -> None:
    from bench.evaluate import word_time_errors

    finals = [{"words": [{"word": " Hello", "start": 2.05, "end": 2.4},
                         {"word": " big", "start": 2.5, "end": 2.7}]},
              {"words": [{"word": " world.", "start": 3.3, "end": 3.6}]}]
    offline = [("Hello", 0.0, 0.3), ("world", 0.8, 1.1)]  # relative to the clip's first speech
    errors = word_time_errors(finals, offline, shift_s=2.0)
    assert [round(e, 3) for e in errors] == [0.05, 0.5]  # "big" has no match, so it is not timed


@pytest.mark.corpus
def test_engine_benchmark_runs_on_the_corpus(corpus: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "bench.bench_engines", "--engines",
                          "faster-whisper", "--limit", "2", "--no-batching", "--no-capacity",
                          "--corpus", str(corpus)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("| faster-whisper"))
    assert "tiny.en, cpu, int8" in row
