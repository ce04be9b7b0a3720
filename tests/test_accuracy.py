"""Recognition quality through the streaming pipeline, on real recorded speech and real Whisper
(the default engine: faster-whisper with the embedded tiny.en).

With the same recognizer, streaming a clip through NATS and the worker must give (almost) the
same word error rate as decoding the whole clip at once: a worse figure means segmentation cut
words or context. And what Whisper invents on silence and noise must never reach a client.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import corpus_clips

from bench.common import speech_bounds
from bench.scenarios import click_train, db, door_slam, pink, white
from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.textnorm import normalize, wer, word_errors
from stt.core.transcription import TranscribeOptions
from stt.engines.faster_whisper import FasterWhisperEngine
from stt.transport.client import stream_audio

pytestmark = pytest.mark.corpus

CHUNK_SIZES_MS = (20, 100, 40, 60, 80, 30, 100, 20)  # what a real network delivers: uneven


def test_word_errors_counts_edits_after_normalization() -> None:
    assert normalize("He said: \"Stop!\"  Don't.") == "he said stop dont"
    assert word_errors("a b c d", "a x c") == (2, 4)
    assert wer([("a b", "a b"), ("c d", "c")]) == 0.25


async def decode_whole(audio: list[np.ndarray]) -> list[str]:
    engine = FasterWhisperEngine()
    await engine.start()
    try:
        results = [await engine.transcribe(a, TranscribeOptions(language="en")) for a in audio]
    finally:
        await engine.close()
    return [r.text for r in results]


async def test_streaming_wer_matches_whole_clip_decoding(corpus: Path, worker_factory: Any,
                                                        nc: Any) -> None:
    """All 70 clips, as fast as the worker takes them, partials off: only segmentation counts."""
    clips = corpus_clips(corpus)
    audio = [load_16k_mono(str(path)) for path, _ in clips]
    offline = await decode_whole(audio)

    await worker_factory(partial_interval_s=0)
    gate = asyncio.Semaphore(4)

    async def run(index: int) -> str:
        async with gate:
            result = await stream_audio(nc, audio[index], SAMPLE_RATE, session_id=f"clip{index}",
                                        speed=0, end_timeout_s=120)
            return result.text

    streamed = await asyncio.gather(*(run(i) for i in range(len(clips))))
    refs = [ref for _, ref in clips]
    offline_wer = wer(list(zip(refs, offline, strict=True)))
    streaming_wer = wer(list(zip(refs, streamed, strict=True)))
    print(f"\n{len(clips)} clips: whole-clip WER {offline_wer:.3f}, streaming WER "
          f"{streaming_wer:.3f}")
    assert offline_wer < 0.06  # the recognizer and the corpus are what we think (tiny.en: ~0.05)
    assert streaming_wer <= offline_wer + 0.01
    assert streaming_wer <= 0.06


async def test_real_time_two_sessions_uneven_chunks_with_partials(corpus: Path,
                                                                 worker_factory: Any,
                                                                 nc: Any) -> None:
    """Two sessions at once at real-time pace, chunks of 20-100 ms, partials on (the defaults):
    the finals' WER stays within 0.01 of whole-clip decoding, and every clip of 3 s or more gets
    a partial with words before its speech ends."""
    clips = [(p, ref) for p, ref in corpus_clips(corpus)]
    audio = {p: load_16k_mono(str(p)) for p, _ in clips}
    long = [(p, ref) for p, ref in clips if audio[p].size >= 3 * SAMPLE_RATE]
    # 21 of the 60, spread over both speakers (LibriSpeech, LJ Speech): with fewer, one clip
    # tiny.en reads either way decides the comparison ("Beatitude" or "be attitude", 4 errors,
    # flips with 0.1 s more or less of the clip's edges, streamed or not, in both encodings)
    chosen = long[::3]
    offline = await decode_whole([audio[p] for p, _ in chosen])
    await worker_factory()

    async def run(session: int, part: list[tuple[Path, str]]) -> list[tuple[str, bool]]:
        out = []
        for k, (path, _) in enumerate(part):
            result = await stream_audio(nc, audio[path], SAMPLE_RATE,
                                        session_id=f"rt{session}-{k}", chunk_ms=CHUNK_SIZES_MS,
                                        speed=1.0, end_timeout_s=60)
            speech_end = result.started_at + speech_bounds(audio[path])[1]
            early = any(m["transcript"] for m, at in zip(result.messages, result.arrivals,
                                                          strict=True)
                        if m.get("is_partial") and at < speech_end)
            out.append((result.text, early))
        return out

    halves = await asyncio.gather(run(0, chosen[0::2]), run(1, chosen[1::2]))
    streamed = [x for pair in itertools.zip_longest(*halves) for x in pair if x is not None]
    refs = [ref for _, ref in chosen]
    offline_wer = wer(list(zip(refs, offline, strict=True)))
    streaming_wer = wer(list(zip(refs, [t for t, _ in streamed], strict=True)))
    print(f"\n{len(chosen)} clips at real time, 2 sessions: whole-clip WER {offline_wer:.3f}, "
          f"streaming WER {streaming_wer:.3f}")
    assert all(early for _, early in streamed), [p.name for (p, _), (_, e) in
                                                 zip(chosen, streamed, strict=True) if not e]
    assert offline_wer < 0.08  # the recognizer is what we think (tiny.en on these 21: 0.067)
    assert streaming_wer <= offline_wer + 0.01


def breathing(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Slow breaths: low-passed noise swelling in and out every 1.6 s."""
    x = pink(seconds, db(-38), rng)
    t = np.arange(x.size) / SAMPLE_RATE
    return (x * np.sin(np.pi * t / 1.6) ** 2).astype(np.float32)


async def test_silence_hiss_noise_clicks_and_breathing_produce_no_words(worker_factory: Any,
                                                                       nc: Any) -> None:
    """Real Whisper invents "you" and "Thank you." on such audio: none of it may come out."""
    rng = np.random.default_rng(7)
    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    pieces = [np.zeros(3 * SAMPLE_RATE, dtype=np.float32),      # digital silence
              white(3.0, db(-45), rng), gap,                     # hiss
              white(0.6, db(-12), rng), gap, pink(0.8, db(-14), rng), gap,  # noise bursts
              click_train(db(-6), 12, 6.0, rng), gap,            # typing
              door_slam(db(-3), rng), gap,
              breathing(4.8, rng), np.zeros(SAMPLE_RATE, dtype=np.float32)]
    session = np.concatenate(pieces)
    await worker_factory()
    result = await stream_audio(nc, session, SAMPLE_RATE, session_id="noise", speed=0,
                                end_timeout_s=60)
    words = [m["transcript"] for m in result.of_type("transcript") if m["transcript"]]
    assert words == []
    assert result.of_type("end")
