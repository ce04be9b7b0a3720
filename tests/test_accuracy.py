"""Recognition quality through the streaming pipeline, on real recorded speech.

With the same recognizer (sphinx), streaming a clip through NATS and the worker must give
(almost) the same word error rate as decoding the whole clip at once: a worse figure means
segmentation cut words or context.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import corpus_clips

from stt.audio import load_16k_mono
from stt.client import stream_audio
from stt.engines.base import TranscribeOptions
from stt.engines.sphinx import SphinxEngine
from stt.textnorm import normalize, wer, word_errors

pytestmark = pytest.mark.corpus


def test_word_errors_counts_edits_after_normalization() -> None:
    assert normalize("He said: \"Stop!\"  Don't.") == "he said stop dont"
    assert word_errors("a b c d", "a x c") == (2, 4)
    assert wer([("a b", "a b"), ("c d", "c")]) == 0.25


async def test_streaming_wer_is_within_0_03_of_offline_decoding(corpus: Path, worker_factory: Any,
                                                                 nc: Any) -> None:
    clips = corpus_clips(corpus)
    audio = {path: load_16k_mono(str(path)) for path, _ in clips}

    offline_engine = SphinxEngine(workers=2)
    await offline_engine.start()
    try:
        offline = await asyncio.gather(*(offline_engine.transcribe(audio[p], TranscribeOptions())
                                         for p, _ in clips))
    finally:
        await offline_engine.close()

    await worker_factory(partial_interval_s=0, engine_workers=2)
    gate = asyncio.Semaphore(4)

    async def run(index: int, path: Path) -> str:
        async with gate:
            result = await stream_audio(nc, audio[path], 16000, session_id=f"clip{index}",
                                        speed=0, end_timeout_s=120)
            return result.text

    streamed = await asyncio.gather(*(run(i, p) for i, (p, _) in enumerate(clips)))
    refs = [ref for _, ref in clips]
    offline_wer = wer(list(zip(refs, [t.text for t in offline], strict=True)))
    streaming_wer = wer(list(zip(refs, streamed, strict=True)))
    print(f"\n{len(clips)} clips: offline WER {offline_wer:.3f}, streaming WER {streaming_wer:.3f}")
    assert offline_wer < 0.35  # sanity: the recognizer and the corpus are what we think
    assert streaming_wer - offline_wer <= 0.03
