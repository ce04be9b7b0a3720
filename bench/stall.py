"""A network stall in the middle of a word: does the utterance stay one final?

    python -m bench.stall                    # 12 corpus clips, a 1.5 s stall, 2 sessions at once
    python -m bench.stall --limit 0 --stall-s 2.5

For each clip, two sessions stream it at once through a real nats-server and the worker (in
this process, built from the environment as ``stt worker`` builds it): one as a microphone
would, one whose audio is held back for ``--stall-s`` at the loudest 30 ms of the middle of the
speech (inside a word) and then delivered in a burst, as a mobile network does, after which it
carries on in real time. Every chunk still arrives, in order, with consecutive ``seq``.

Printed: how many utterances came back as more than one final with words (split), and the WER
of the finals against the reference for both sessions. ``STT_STALL_TIMEOUT_S`` governs it;
``--set stall_timeout_s=0`` shows the behaviour without the wait (the audio gap of
``STT_AUDIO_GAP_TIMEOUT`` then cuts the utterance).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
from pathlib import Path
from typing import Any

import nats
import numpy as np

from stt.cli.wiring import build_worker
from stt.config import Settings
from stt.core.audio import SAMPLE_RATE, to_pcm16
from stt.core.textnorm import wer
from stt.transport.client import Listener, send
from stt.transport.nats_server import NatsServer
from stt.wire.protocol import Subjects

from .common import DEFAULT_CORPUS, header
from .evaluate import parse_assignment
from .scenarios import CorpusClip, load_corpus, select

CHUNK_MS = 40
TAIL_S = 1.5


def stall_point(clip: CorpusClip) -> float:
    """The loudest 30 ms frame in the middle third of the speech: inside a word."""
    frame = SAMPLE_RATE * 30 // 1000
    lo = int((clip.onset_s + (clip.offset_s - clip.onset_s) / 3) * SAMPLE_RATE)
    hi = int((clip.onset_s + 2 * (clip.offset_s - clip.onset_s) / 3) * SAMPLE_RATE)
    n = max(1, (hi - lo) // frame)
    energy = np.mean(clip.audio[lo:lo + n * frame].reshape(n, frame) ** 2, axis=1)
    return (lo + int(np.argmax(energy)) * frame) / SAMPLE_RATE


async def stream(nc: Any, subjects: Subjects, sid: str, audio: np.ndarray,
                 stall: tuple[float, float] | None) -> list[dict[str, Any]]:
    """Real-time chunks; those captured during ``stall`` (at, seconds) leave when it ends."""
    async with Listener(nc, subjects, sid) as listener:
        await send(nc, subjects, sid, {"type": "start", "sample_rate": SAMPLE_RATE})
        step = SAMPLE_RATE * CHUNK_MS // 1000
        t0 = time.monotonic()
        for i, off in enumerate(range(0, audio.size, step)):
            due = (off + step) / SAMPLE_RATE  # a chunk leaves once it has been captured
            if stall is not None and stall[0] <= due < stall[0] + stall[1]:
                due = stall[0] + stall[1]
            delay = t0 + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pcm = to_pcm16(audio[off:off + step])
            await send(nc, subjects, sid, {"type": "chunk", "seq": i, "timestamp": time.time(),
                                           "audio_b64": base64.b64encode(pcm).decode()})
        await send(nc, subjects, sid, {"type": "end"})
        result = await listener.wait_end(60)
    return [m for m in result.messages if m.get("type") == "transcript" and m.get("is_final")]


async def run(args: argparse.Namespace) -> int:
    clips = select(load_corpus(args.corpus), args.limit)
    settings = Settings.from_env(overrides=dict(args.set))
    print(header())
    print(f"engine {settings.transcription.engine}; stall {args.stall_s:g} s mid-word; "
          f"{len(clips)} clips; "
          f"STT_AUDIO_GAP_TIMEOUT {settings.session.audio_gap_timeout_s:g} s, STT_STALL_TIMEOUT_S "
          f"{settings.session.stall_timeout_s:g} s", flush=True)
    subjects = settings.nats.subjects
    rows = []
    with NatsServer() as server:
        settings = Settings.from_env(overrides={**dict(args.set), "nats_url": server.url})
        worker = build_worker(settings)
        await worker.start()
        nc = await nats.connect(server.url)
        try:
            for i, clip in enumerate(clips):
                audio = np.concatenate([clip.audio, np.zeros(int(TAIL_S * SAMPLE_RATE),
                                                             np.float32)])
                at = stall_point(clip)
                plain, stalled = await asyncio.gather(
                    stream(nc, subjects, f"plain{i}", audio, None),
                    stream(nc, subjects, f"stall{i}", audio, (at, args.stall_s)))
                rows.append((clip, plain, stalled))
                n = sum(1 for f in stalled if f["transcript"].strip())
                print(f"{clip.name}: stall at {at:.2f} s -> {n} final(s)", flush=True)
        finally:
            await nc.close()
            await worker.shutdown()
    text = [(c.reference, " ".join(f["transcript"] for f in p)) for c, p, _ in rows]
    text_stalled = [(c.reference, " ".join(f["transcript"] for f in s)) for c, _, s in rows]
    split = sum(1 for _, _, s in rows if sum(1 for f in s if f["transcript"].strip()) > 1)
    print(f"\nutterances split by the stall: {split} of {len(rows)}")
    print(f"WER vs reference: without the stall {wer(text):.3f}, with it {wer(text_stalled):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--limit", type=int, default=12, help="clips (0 = all)")
    p.add_argument("--stall-s", type=float, default=1.5)
    p.add_argument("--set", action="append", type=parse_assignment, default=[], metavar="FIELD=VALUE",
                   help="a Settings field for the worker, e.g. stall_timeout_s=0")
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
