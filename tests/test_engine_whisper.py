"""The local whisper engine, on a random-weight checkpoint written in openai-whisper's format.

The text is arbitrary (random weights); what is checked: the checkpoint loads through
``whisper.load_model`` like a named model, every path returns well-formed results, options are
honoured, short windows and batching are used, guards work, the event loop stays free, and the
whole NATS pipeline runs on it. GPU tests run only where PyTorch sees a CUDA/ROCm device.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE, loop_gaps, make_settings
from whisper_checkpoint import TEST_DIMS, TINY_DIMS, write_checkpoint

from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.transcription import Segment, TranscribeOptions, Word
from stt.engines import create_engine
from stt.engines.base import EngineError, EngineUnavailable
from stt.engines.batching import MicroBatcher
from stt.engines.decoding import (
    WINDOW_FRAMES,
    short_window_frames,
    split_segments,
    token_budget,
    trim_repetitions,
)
from stt.engines.whisper import WhisperEngine, resolve_device
from stt.transport.client import stream_audio

torch = pytest.importorskip("torch")
whisper = pytest.importorskip("whisper")

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("whisper") / "random-test.pt", TEST_DIMS)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_16k_mono(str(SAMPLE))


def engine_for(checkpoint: Path, **kwargs: Any) -> WhisperEngine:
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("cpu_threads", 1)  # other tests share the CPU
    return WhisperEngine(str(checkpoint), **kwargs)


@pytest.fixture
async def engine(checkpoint: Path) -> Any:
    e = engine_for(checkpoint)
    await e.start()
    yield e
    await e.close()


# --- pure helpers -------------------------------------------------------------------------


def test_trim_repetitions_cuts_loops_and_keeps_speech() -> None:
    assert trim_repetitions([1, 2, 3, 4]) == [1, 2, 3, 4]
    assert trim_repetitions([5, 7, 7, 7, 7, 7, 7]) == [5, 7]
    assert trim_repetitions([9, 1, 2, 1, 2, 1, 2, 1, 2, 3]) == [9, 1, 2]
    assert trim_repetitions([1, 1, 1, 2]) == [1, 1, 1, 2]  # three in a row can be speech


def test_split_segments_follows_timestamp_tokens() -> None:
    ts = 1000  # first timestamp token; 0.02 s per step
    tokens = [ts + 0, 11, 12, ts + 50, ts + 50, 13, ts + 100, 14]
    assert split_segments(tokens, ts, duration_s=3.0) == [
        (0.0, 1.0, [11, 12]), (1.0, 2.0, [13]), (2.0, 3.0, [14])]
    assert split_segments([ts + 900, 5], ts, duration_s=2.0) == [(2.0, 2.0, [5])]  # clamped


def test_short_windows_and_token_budgets() -> None:
    assert short_window_frames(2 * SAMPLE_RATE) == 400  # 2 s + 0.5 s tail, in 2 s steps
    assert short_window_frames(29 * SAMPLE_RATE) == WINDOW_FRAMES
    assert token_budget(2.0, 448) == 48
    assert token_budget(30.0, 448) == 224


def test_checkpoint_is_openai_whisper_format(checkpoint: Path) -> None:
    model = whisper.load_model(str(checkpoint), device="cpu")
    assert model.dims.n_audio_state == TEST_DIMS["n_audio_state"]
    assert model.is_multilingual


def test_from_settings_and_create_engine(checkpoint: Path) -> None:
    settings = make_settings("nats://127.0.0.1:1", engine="whisper",
                             whisper_model_size=str(checkpoint), whisper_device="cpu",
                             whisper_batch_size=4, whisper_batch_wait_ms=20,
                             whisper_short_window="all", whisper_no_speech_threshold=0.5)
    engine = create_engine(settings)
    assert isinstance(engine, WhisperEngine)
    assert (engine.model_name, engine.batch_size, engine.batch_wait_s, engine.short_window,
            engine.guards.no_speech_threshold) == (str(checkpoint), 4, 0.02, "all", 0.5)


def test_cuda_requested_without_gpu_says_what_to_set() -> None:
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
        return
    assert resolve_device("auto") == "cpu"
    with pytest.raises(EngineUnavailable, match="WHISPER_DEVICE"):
        resolve_device("cuda")


async def test_missing_checkpoint_fails_at_start_with_what_to_set(tmp_path: Path) -> None:
    engine = WhisperEngine(str(tmp_path / "nope.pt"), device="cpu")
    with pytest.raises(EngineUnavailable, match="WHISPER_MODEL_SIZE"):
        await engine.start()
    await engine.close()


# --- the engine ---------------------------------------------------------------------------


async def test_final_shapes_types_and_word_timings(engine: WhisperEngine,
                                                   speech: np.ndarray) -> None:
    audio = speech[: 3 * SAMPLE_RATE]
    result = await engine.transcribe(audio, TranscribeOptions(language="en", word_timestamps=True))
    assert isinstance(result.text, str) and result.text
    assert result.language == "en"
    assert result.duration_s == pytest.approx(3.0)
    assert isinstance(result.no_speech_prob, float) and 0.0 <= result.no_speech_prob <= 1.0
    assert result.segments and all(isinstance(s, Segment) for s in result.segments)
    assert all(0.0 <= s.start <= s.end <= 3.0 for s in result.segments)
    assert result.words and all(isinstance(w, Word) for w in result.words)
    for w in result.words:
        assert isinstance(w.start, float) and isinstance(w.end, float)
        assert 0.0 <= w.start <= w.end <= 3.0
    assert engine.passes[WINDOW_FRAMES] >= 1  # finals keep the full 30 s window by default

    plain = await engine.transcribe(audio, TranscribeOptions(language="en"))
    assert plain.words == []


async def test_partials_use_a_short_window(engine: WhisperEngine, speech: np.ndarray) -> None:
    before = dict(engine.passes)
    result = await engine.transcribe(speech[: 2 * SAMPLE_RATE],
                                     TranscribeOptions(language="en", is_partial=True))
    assert isinstance(result.text, str)
    assert engine.passes[400] == before.get(400, 0) + 1
    assert engine.passes[WINDOW_FRAMES] == before.get(WINDOW_FRAMES, 0)


async def test_language_options(engine: WhisperEngine, speech: np.ndarray) -> None:
    audio = speech[: 2 * SAMPLE_RATE]
    german = await engine.transcribe(audio, TranscribeOptions(language="de", prompt="Kaffee"))
    assert german.language == "de"
    named = await engine.transcribe(audio, TranscribeOptions(language="German", is_partial=True))
    assert named.language == "de"
    detected = await engine.transcribe(audio, TranscribeOptions(language=None))
    assert detected.language in whisper.tokenizer.LANGUAGES
    with pytest.raises(EngineError, match="unknown language"):
        await engine.transcribe(audio, TranscribeOptions(language="klingon"))


async def test_english_only_model_refuses_other_languages(tmp_path: Path,
                                                          speech: np.ndarray) -> None:
    path = write_checkpoint(tmp_path / "random.en.pt", {**TEST_DIMS, "n_vocab": 51864})
    engine = engine_for(path)
    await engine.start()
    try:
        ok = await engine.transcribe(speech[:SAMPLE_RATE], TranscribeOptions(language="en-US"))
        assert ok.language == "en"
        with pytest.raises(EngineError, match="English-only"):
            await engine.transcribe(speech[:SAMPLE_RATE], TranscribeOptions(language="fr"))
    finally:
        await engine.close()


async def test_guards_drop_silence_and_loops(checkpoint: Path, speech: np.ndarray) -> None:
    audio = speech[: 2 * SAMPLE_RATE]
    # Every random decode is "probably silence" with these thresholds: no text comes back.
    strict = engine_for(checkpoint, no_speech_threshold=0.0, logprob_threshold=1.0)
    # And here everything counts as a repetition loop.
    loopy = engine_for(checkpoint, compression_ratio_threshold=0.01, logprob_threshold=-1e9)
    for engine in (strict, loopy):
        await engine.start()
        try:
            final = await engine.transcribe(audio, TranscribeOptions(language="en"))
            partial = await engine.transcribe(audio, TranscribeOptions(language="en",
                                                                      is_partial=True))
            assert final.text == "" and final.segments == [] and partial.text == ""
        finally:
            await engine.close()


async def test_empty_and_tiny_audio(engine: WhisperEngine) -> None:
    result = await engine.transcribe(np.zeros(10, dtype=np.float32), TranscribeOptions())
    assert result.text == ""


async def test_long_audio_goes_through_long_form(checkpoint: Path, speech: np.ndarray) -> None:
    engine = engine_for(checkpoint, compression_ratio_threshold=0, logprob_threshold=-1e9)
    await engine.start()
    try:
        audio = np.concatenate([speech, speech[: 3 * SAMPLE_RATE]])  # over 30 s: two windows
        result = await engine.transcribe(audio, TranscribeOptions(language="en"))
        assert result.duration_s == pytest.approx(audio.size / SAMPLE_RATE)
        assert isinstance(result.text, str)
        duration_s = audio.size / SAMPLE_RATE
        assert duration_s > 30.0
        assert all(0.0 <= s.start <= s.end <= duration_s + 0.2 for s in result.segments)
    finally:
        await engine.close()


async def test_concurrent_partials_share_one_pass(checkpoint: Path, speech: np.ndarray) -> None:
    engine = engine_for(checkpoint, batch_size=8, batch_wait_s=0.05)
    await engine.start()
    try:
        clips = [speech[i * SAMPLE_RATE: (i + 2) * SAMPLE_RATE] for i in range(6)]
        results = await asyncio.gather(*(
            engine.transcribe(c, TranscribeOptions(language="en", is_partial=True))
            for c in clips))
        assert len(results) == 6 and all(isinstance(r.text, str) for r in results)
        assert engine._batcher is not None and engine._batcher.stats.largest == 6
        # Finals with different context (prompts) cannot share a pass; they still all finish.
        finals = await asyncio.gather(*(
            engine.transcribe(c, TranscribeOptions(language="en", context=f"previous {i}"))
            for i, c in enumerate(clips[:3])))
        assert len(finals) == 3
    finally:
        await engine.close()


async def test_inference_never_blocks_the_event_loop(engine: WhisperEngine,
                                                     speech: np.ndarray) -> None:
    # Different context: three separate model passes, one after the other.
    gaps, elapsed = await loop_gaps(asyncio.gather(*(
        engine.transcribe(speech[i * SAMPLE_RATE: (i + 4) * SAMPLE_RATE],
                          TranscribeOptions(language="en", context=str(i)))
        for i in range(3))))
    # A loop blocked by inference would stall for about a whole pass (elapsed / 3). On a
    # shared, oversubscribed CPU the OS alone can delay a tick now and then: allow that.
    assert gaps[-1] < max(0.25, elapsed / 6), f"loop stalled {gaps[-1]:.3f} s of {elapsed:.2f} s"
    assert gaps[int(len(gaps) * 0.95)] < 0.05, gaps[-20:]


async def test_worker_pipeline_on_the_whisper_engine(checkpoint: Path, worker_factory: Any,
                                                     nc: Any, speech: np.ndarray) -> None:
    engine = engine_for(checkpoint, compression_ratio_threshold=0, logprob_threshold=-1e9)
    await worker_factory(engine=engine)
    gap = np.zeros(SAMPLE_RATE, dtype=np.float32)
    audio = np.concatenate([speech[: 4 * SAMPLE_RATE], gap, speech[5 * SAMPLE_RATE: 8 * SAMPLE_RATE]])
    result = await stream_audio(nc, audio, SAMPLE_RATE, speed=0, end_timeout_s=60,
                                start_extra={"word_timestamps": True})
    assert not result.of_type("error"), result.of_type("error")
    assert result.finals and all(isinstance(m["transcript"], str) for m in result.finals)
    assert all(m["language"] == "en" for m in result.finals)
    assert any(m.get("words") for m in result.finals)
    assert result.of_type("end")[0]["reason"] == "end"


# --- the batcher ---------------------------------------------------------------------------


async def test_batcher_serves_finals_before_partials_and_groups_by_key() -> None:
    gate = threading.Event()
    passes: list[list[str]] = []

    def run(items: list[str]) -> list[str | BaseException]:
        if items == ["block"]:
            gate.wait(5)
        passes.append(items)
        return [RuntimeError("bad") if i == "fail" else i.upper() for i in items]

    with ThreadPoolExecutor(1) as pool:
        batcher: MicroBatcher[str, str] = MicroBatcher(run, pool, max_batch=2, max_wait_s=0)
        batcher.start()
        blocker = asyncio.ensure_future(batcher.submit("block", "x", 0))
        await asyncio.sleep(0.05)  # the model is busy: the rest queue up
        partial1 = asyncio.ensure_future(batcher.submit("p1", "en", priority=1))
        final1 = asyncio.ensure_future(batcher.submit("f1", "en", priority=0))
        other = asyncio.ensure_future(batcher.submit("f2", "de", priority=0))
        final3 = asyncio.ensure_future(batcher.submit("f3", "en", priority=0))
        failing = asyncio.ensure_future(batcher.submit("fail", "fr", priority=2))
        gone = asyncio.ensure_future(batcher.submit("gone", "en", priority=0))
        await asyncio.sleep(0.01)
        gone.cancel()  # its caller gave up: it never costs a pass
        gate.set()
        assert await blocker == "BLOCK"
        assert await asyncio.gather(partial1, final1, other, final3) == ["P1", "F1", "F2", "F3"]
        with pytest.raises(RuntimeError, match="bad"):
            await failing
        await batcher.close()
    assert passes == [["block"], ["f1", "f3"], ["f2"], ["p1"], ["fail"]]
    assert batcher.stats.dropped == 1


async def test_batcher_runs_as_many_passes_at_once_as_it_has_workers() -> None:
    """Two workers: a second group starts while the first is still in its pass (two sessions'
    finals side by side), a third waits for one of them; closing fails what never ran."""
    started: list[str] = []
    release = threading.Event()

    def run(items: list[str]) -> list[str]:
        started.append(items[0])
        release.wait(5)
        return [i.upper() for i in items]

    with ThreadPoolExecutor(2) as pool:
        batcher: MicroBatcher[str, str] = MicroBatcher(run, pool, max_batch=1, max_wait_s=0,
                                                       workers=2)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("a", "en"))
        second = asyncio.ensure_future(batcher.submit("b", "en"))
        third = asyncio.ensure_future(batcher.submit("c", "en"))
        for _ in range(100):
            if len(started) == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert sorted(started) == ["a", "b"]  # both in a pass, the third waits for a worker
        assert batcher.queued == 1
        release.set()
        assert await asyncio.gather(first, second, third) == ["A", "B", "C"]
        assert batcher.stats.batches == 3
        await batcher.close()


async def test_batcher_spreads_finals_over_idle_workers_and_keeps_partials_in_one_pass() -> None:
    """On a CPU with a thread per worker, a pass of two takes as long as the two one after the
    other: finals that find two idle workers go to both, and a worker that just finished counts
    as idle for the finals its callers send at once. Partials keep to one pass, leaving the
    other worker free for a final."""
    passes: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        passes.append(items)
        time.sleep(0.05)
        return [i.upper() for i in items]

    with ThreadPoolExecutor(2) as pool:
        batcher: MicroBatcher[str, str] = MicroBatcher(run, pool, max_batch=8, max_wait_s=0.01,
                                                       workers=2)
        batcher.start()
        for _ in range(3):  # each pair right after the last one's answers
            passes.clear()
            assert await asyncio.gather(batcher.submit("a", "en"), batcher.submit("b", "en")) \
                == ["A", "B"]
            assert sorted(passes) == [["a"], ["b"]]
        passes.clear()
        assert len(await asyncio.gather(*(batcher.submit(x, "en") for x in "cdefg"))) == 5
        assert sorted(map(len, passes)) == [2, 3]  # shared, not one pass of five
        passes.clear()
        partials = [batcher.submit(x, "en", priority=1) for x in "hijk"]
        assert len(await asyncio.gather(*partials)) == 4
        assert passes == [["h", "i", "j", "k"]]
        await batcher.close()


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
async def test_gpu_fp16_and_cross_session_batching(tmp_path: Path, speech: np.ndarray) -> None:
    path = write_checkpoint(tmp_path / "random-tiny.pt", TINY_DIMS)
    engine = WhisperEngine(str(path), device="auto", batch_size=8, batch_wait_s=0.05)
    await engine.start()
    try:
        assert engine.device == "cuda" and engine.fp16
        clips = [speech[i * SAMPLE_RATE: (i + 3) * SAMPLE_RATE] for i in range(8)]
        t0 = time.perf_counter()
        for c in clips:
            await engine.transcribe(c, TranscribeOptions(language="en", is_partial=True))
        one_by_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = await asyncio.gather(*(
            engine.transcribe(c, TranscribeOptions(language="en", is_partial=True))
            for c in clips))
        batched = time.perf_counter() - t0
        assert len(results) == 8 and engine._batcher is not None
        assert engine._batcher.stats.largest == 8
        assert batched < one_by_one, (batched, one_by_one)
        final = await engine.transcribe(clips[0], TranscribeOptions(language="en",
                                                                    word_timestamps=True))
        assert final.segments and isinstance(final.text, str)
    finally:
        await engine.close()
