"""The live microphone page in a real headless Chromium (Debian's ``chromium``, driven by
Playwright; no browser download), its microphone a fake device playing the bundled sample:
what the page shows is what the worker heard, through the Realtime websocket and NATS.

The run saves a screenshot of the page in ``build/live-page.png`` (the README's
``docs/live-page.png`` is one, scaled down)."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
import soundfile
import soxr
from conftest import ROOT, SAMPLE, SAMPLE_TEXT, make_settings
from realtime_util import bridge_server

from bench.replicas import PHRASES
from stt.textnorm import wer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (script/setup installs it with "
                             "apt-get when it runs as root; browser downloads are not possible)")
SCREENSHOT = ROOT / "build" / "live-page.png"


def microphone_wav(path: Any, end_s: float) -> None:
    """The sample's first sentences, then silence, as the 48 kHz WAV Chromium's fake device
    plays."""
    data, rate = soundfile.read(str(SAMPLE), dtype="float32")
    speech = data[: int(end_s * rate)]
    audio = np.concatenate([speech, np.zeros(int(1.5 * rate), np.float32)])
    soundfile.write(str(path), soxr.resample(audio, rate, 48000), 48000, subtype="PCM_16")


async def test_the_page_shows_the_words_spoken_into_the_microphone(
        nats_server: Any, worker_factory: Any, tmp_path: Any) -> None:
    playwright = pytest.importorskip("playwright.async_api")
    worker = await worker_factory()
    wav = tmp_path / "microphone.wav"
    microphone_wav(wav, PHRASES[1][1] + 0.3)
    problems: list[str] = []
    async with bridge_server(make_settings(nats_server.url), worker.status) as (url, bridge):
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
                finals = page.locator("#finals .final .text")
                await finals.nth(1).wait_for(timeout=45_000)
                texts = await finals.all_inner_texts()
                await page.wait_for_timeout(300)  # the timeline's next frame
                SCREENSHOT.parent.mkdir(exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
                status = await page.locator("#status").inner_text()
                timeline_events = await page.locator("#events").inner_text()
            finally:
                await browser.close()
        assert bridge.open <= 1
    assert not problems, problems
    assert status.startswith("listening at"), status
    assert len(texts) == 2, texts
    assert wer([(SAMPLE_TEXT[0], texts[0])]) < 0.2, texts
    assert wer([(SAMPLE_TEXT[1], texts[1])]) < 0.3, texts
    assert "speech_started" in timeline_events and "speech_stopped" in timeline_events
    assert SCREENSHOT.stat().st_size > 10_000
