"""The live microphone page in a real headless Chromium (Debian's ``chromium``, driven by
Playwright; no browser download), its microphone a fake device playing the bundled sample:
what the page shows is what the worker heard, through the Realtime websocket and NATS; the
sample, and a held-out recording of the corpus.

The run saves a screenshot of the page in ``build/live-page.png`` (the README's
``docs/live-page.png`` is one, scaled down)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import soundfile
import soxr
from conftest import ROOT, SAMPLE, SAMPLE_TEXT, corpus_clips, make_settings
from realtime_util import bridge_server

from bench.replicas import PHRASES
from stt.core.textnorm import wer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (script/setup installs it with "
                             "apt-get when it runs as root; browser downloads are not possible)")
SCREENSHOT = ROOT / "build" / "live-page.png"


def microphone_wav(source: Any, path: Any, end_s: float | None = None) -> None:
    """A recording (up to ``end_s``), then silence, as the 48 kHz mono WAV Chromium's fake
    device plays."""
    data, rate = soundfile.read(str(source), dtype="float32", always_2d=True)
    speech = data.mean(axis=1, dtype=np.float32)[: None if end_s is None else int(end_s * rate)]
    audio = np.concatenate([speech, np.zeros(int(1.5 * rate), np.float32)])
    soundfile.write(str(path), soxr.resample(audio, rate, 48000), 48000, subtype="PCM_16")


@dataclass
class PageRun:
    texts: list[str]
    status: str
    timeline: str
    problems: list[str]


async def speak_into_the_page(nats_url: str, worker: Any, wav: Any, finals: int,
                              wait_s: float = 45.0, screenshot: bool = False) -> PageRun:
    """Open the page in headless Chromium, its microphone playing ``wav``, press start and
    read the finals once ``finals`` are shown and no more come for 3 s."""
    playwright = pytest.importorskip("playwright.async_api")
    problems: list[str] = []
    async with bridge_server(make_settings(nats_url), worker.status) as (url, bridge):
        async with playwright.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop",
                "--autoplay-policy=no-user-gesture-required"])
            try:
                page = await browser.new_page(viewport={"width": 900, "height": 600})
                page.on("pageerror", lambda exc: problems.append(str(exc)))
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                await page.goto(url + "/")
                await page.click("#start")
                shown = page.locator("#finals .final .text")
                await shown.nth(finals - 1).wait_for(timeout=wait_s * 1000)
                while True:  # until no more finals come
                    count = await shown.count()
                    await page.wait_for_timeout(3000)
                    if await shown.count() == count:
                        break
                texts = await shown.all_inner_texts()
                if screenshot:
                    SCREENSHOT.parent.mkdir(exist_ok=True)
                    await page.screenshot(path=str(SCREENSHOT), full_page=True)
                status = await page.locator("#status").inner_text()
                timeline_events = await page.locator("#events").inner_text()
            finally:
                await browser.close()
        assert bridge.open <= 1
    return PageRun(texts, status, timeline_events, problems)


async def test_the_page_shows_the_words_spoken_into_the_microphone(
        nats_server: Any, worker_factory: Any, tmp_path: Any) -> None:
    worker = await worker_factory()
    wav = tmp_path / "microphone.wav"
    microphone_wav(SAMPLE, wav, PHRASES[1][1] + 0.3)
    run = await speak_into_the_page(nats_server.url, worker, wav, finals=2, screenshot=True)
    assert not run.problems, run.problems
    assert run.status.startswith("listening at"), run.status
    assert len(run.texts) == 2, run.texts
    assert wer([(SAMPLE_TEXT[0], run.texts[0])]) < 0.2, run.texts
    assert wer([(SAMPLE_TEXT[1], run.texts[1])]) < 0.3, run.texts
    assert "speech_started" in run.timeline and "speech_stopped" in run.timeline
    assert SCREENSHOT.stat().st_size > 10_000


async def test_the_page_shows_a_held_out_recordings_words(
        nats_server: Any, worker_factory: Any, tmp_path: Any, corpus: Any) -> None:
    """A recording of the corpus, not the sample the page was written around."""
    worker = await worker_factory()
    path, reference = corpus_clips(corpus)[40]
    wav = tmp_path / "microphone.wav"
    microphone_wav(path, wav)
    run = await speak_into_the_page(nats_server.url, worker, wav, finals=1)
    assert not run.problems, run.problems
    assert wer([(reference, " ".join(run.texts))]) < 0.25, (reference, run.texts)
