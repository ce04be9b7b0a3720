"""The benchmark tools start and answer (their figures are measured by hand, not asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from bench.common import speech_bounds
from stt.audio import load_16k_mono


@pytest.mark.parametrize("module", ["bench.load", "bench.evaluate", "bench.bench_engines",
                                    "bench.abandon"])
def test_benchmark_commands_start(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout.lower()


def test_speech_bounds_find_the_sample_sentences() -> None:
    audio = load_16k_mono(str(ROOT / "stt" / "data" / "sample.flac"))
    onset, offset = speech_bounds(audio[: 16000 * 8])
    assert 0.3 < onset < 0.7 and 7.0 < offset < 7.8  # the first sentence, 0.4 s in
