"""Engine benchmark: real-time factor, short-window encoder savings, cross-session batching.

Usage (from the repository root)::

    python -m bench.bench_engines                       # random tiny-dims checkpoint, all devices
    python -m bench.bench_engines --model tiny          # a real model (download cache or path)
    python -m bench.bench_engines --devices cpu --engines whisper --reps 3 --json out.json

What runs, per engine and device available (``whisper`` on ``cpu`` and, where PyTorch sees one,
``cuda``; ``http`` = the http engine through a local ``stt serve`` subprocess running the same
whisper checkpoint on CPU; ``sphinx``):

1. Encoder cost: the whisper encoder alone on a short window (2, 5, 15 s: speech + 0.5 s,
   rounded up to 2 s steps, as partials get it) against the full 30 s window every Whisper
   model is trained on; batch of one, median of ``2 * --reps + 1`` runs.
2. Real-time factor (engine time / audio duration; below 1 is faster than real time) for 2, 5
   and 15 s segments of the bundled speech sample, as finals (full window) and partials (short
   window), one at a time.
3. Throughput of N concurrent 2 s partials (N = 1, 4, 8, 16: N sessions' segments arriving
   together) batched (``WHISPER_BATCH_SIZE=16``) against one by one (batch size 1), in
   segments per second, and the ratio.

All ratios compare figures measured in the same run, on the same machine state.

Without ``--model``, the checkpoint has random weights with the real dimensions of ``tiny``
(written by ``tests/whisper_checkpoint.py``): compute per pass is that of ``tiny``. Random
weights never emit end-of-text, so every decode runs to its token budget; the benchmark sets
that budget to a realistic English rate (``--tokens-per-s``, default 4, plus 4) so decode
lengths match real speech, and turns the fallback guards off (a real model rarely falls back).
The text produced is meaningless; only time is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import ROOT, machine

sys.path.insert(0, str(ROOT / "tests"))

SEGMENTS_S = (2, 5, 15)
CONCURRENCY = (1, 4, 8, 16)


def reproduce_command(argv: list[str]) -> str:
    return " ".join(["python -m bench.bench_engines", *argv])


def speech_slices(seconds: float, n: int) -> list[np.ndarray]:
    """``n`` different slices of the bundled sample (looped if needed), ``seconds`` long."""
    from stt.audio import SAMPLE_RATE, load_16k_mono

    speech = load_16k_mono(str(ROOT / "stt" / "data" / "sample.flac"))
    speech = np.concatenate([speech] * 3)
    length = int(seconds * SAMPLE_RATE)
    stride = max(SAMPLE_RATE // 2, (speech.size - length) // max(1, n))
    return [speech[i * stride: i * stride + length].copy() for i in range(n)]


async def timed(coro: Any) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


def devices(requested: str) -> list[str]:
    import torch

    wanted = [d.strip() for d in requested.split(",") if d.strip()]
    return [d for d in wanted if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]


def whisper_engine(model: str, device: str, batch_size: int, threads: int) -> Any:
    from stt.engines.whisper import WhisperEngine

    return WhisperEngine(model, device=device, cpu_threads=threads, batch_size=batch_size,
                         batch_wait_s=0.005, compression_ratio_threshold=0,
                         logprob_threshold=-1e9)


async def bench_encoder(engine: Any, reps: int) -> dict[str, Any]:
    import torch

    from stt.engines.decoding import WINDOW_FRAMES, short_window_frames

    out: dict[str, Any] = {}
    windows = {f"{s}s": short_window_frames(s * 16000) for s in SEGMENTS_S}
    windows["30s (padded)"] = WINDOW_FRAMES
    for label, frames in windows.items():
        mel = torch.zeros(1, engine.model.dims.n_mels, frames, device=engine.device)

        def run(mel: Any = mel) -> None:
            engine.encode(mel)
            if engine.device == "cuda":
                torch.cuda.synchronize()

        run()
        times = []
        for _ in range(2 * reps + 1):  # cheap, and the ratio is the headline: more samples
            times.append(await asyncio.get_running_loop().run_in_executor(
                engine._executor, _timer(run)))
        out[label] = {"frames": frames, "ms": round(1000 * statistics.median(times), 2)}
    full = out["30s (padded)"]["ms"]
    for label in list(out)[:-1]:
        out[label]["padded_30s_costs_x"] = round(full / out[label]["ms"], 1)
    return out


def _timer(fn: Any) -> Any:
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return run


async def bench_rtf(engine: Any, reps: int, partials: bool = True) -> dict[str, Any]:
    from stt.engines.base import TranscribeOptions

    out: dict[str, Any] = {}
    kinds = [("final", False), ("partial", True)] if partials else [("final", False)]
    for seconds in SEGMENTS_S:
        clip = speech_slices(seconds, 1)[0]
        row: dict[str, Any] = {}
        for kind, is_partial in kinds:
            options = TranscribeOptions(language="en", is_partial=is_partial)
            await engine.transcribe(clip, options)  # warm this shape
            times = [await timed(engine.transcribe(clip, options)) for _ in range(reps)]
            row[f"{kind}_rtf"] = round(statistics.median(times) / seconds, 4)
        out[f"{seconds}s"] = row
    return out


async def bench_batching(model: str, device: str, threads: int) -> dict[str, Any]:
    from stt.engines.base import TranscribeOptions

    options = TranscribeOptions(language="en", is_partial=True)
    clips = speech_slices(2, max(CONCURRENCY))
    out: dict[str, Any] = {}
    for label, batch_size in (("one_by_one", 1), ("batched", max(CONCURRENCY))):
        engine = whisper_engine(model, device, batch_size, threads)
        await engine.start()
        try:
            await asyncio.gather(*(engine.transcribe(c, options) for c in clips[:4]))  # warm
            for n in CONCURRENCY:
                elapsed = await timed(asyncio.gather(
                    *(engine.transcribe(c, options) for c in clips[:n])))
                out.setdefault(str(n), {})[f"{label}_seg_per_s"] = round(n / elapsed, 2)
            out["mean_batch_" + label] = round(engine._batcher.stats.mean_batch, 2)
        finally:
            await engine.close()
    for n in CONCURRENCY:
        row = out[str(n)]
        row["batched_speedup_x"] = round(row["batched_seg_per_s"] / row["one_by_one_seg_per_s"], 2)
    return out


def start_serve(model: str, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    """``stt serve`` (same checkpoint, CPU) in its own interpreter, with this process's decode
    budget; returns the process and its URL once it answers."""
    import httpx

    import stt.engines.decoding as whisper_module
    from stt.nats_server import free_port

    port = free_port()
    serve_args = ["serve", "--port", str(port), "--whisper-model-size", model,
                  "--whisper-device", "cpu", "--whisper-compression-ratio-threshold", "0",
                  "--whisper-logprob-threshold=-1e9", "--log-level", "WARNING"]
    if threads:
        serve_args += ["--whisper-cpu-threads", str(threads)]
    launcher = ("import sys, stt.engines.decoding as w; from stt.cli import main; "
                f"w.TOKENS_PER_S = {whisper_module.TOKENS_PER_S}; "
                f"w.TOKENS_BASE = {whisper_module.TOKENS_BASE}; sys.exit(main({serve_args!r}))")
    log = tempfile.NamedTemporaryFile(prefix="bench-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-c", launcher], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("stt serve did not start: " + Path(log.name).read_text()[-2000:])
        time.sleep(0.2)


async def bench_http(model: str, reps: int, threads: int) -> dict[str, Any]:
    """The http engine against ``stt serve`` running the same checkpoint."""
    from stt.engines.http import HttpEngine

    proc, url = await asyncio.to_thread(start_serve, model, threads)
    try:
        engine = HttpEngine(url, timeout_s=300, read_timeout_s=300)
        await engine.start()
        try:
            return await bench_rtf(engine, reps, partials=False)
        finally:
            await engine.close()
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)


async def bench_sphinx(reps: int) -> dict[str, Any]:
    from stt.engines.sphinx import SphinxEngine

    engine = SphinxEngine(workers=1)
    await engine.start()
    try:
        return await bench_rtf(engine, reps, partials=False)
    finally:
        await engine.close()


def print_report(report: dict[str, Any]) -> None:
    print(f"\ncommand: {report['command']}")
    print(f"machine: {json.dumps(report['machine'])}")
    print(f"model:   {report['model']}  (decode budget {report['tokens_per_s']} tokens/s + 4)")
    for key, result in report["results"].items():
        print(f"\n== {key} ==")
        if "encoder" in result:
            print("encoder (batch 1)      ms     padded 30 s costs")
            for label, row in result["encoder"].items():
                extra = f"{row['padded_30s_costs_x']:>6}x" if "padded_30s_costs_x" in row else ""
                print(f"  {label:<18} {row['ms']:>8.2f}   {extra}")
        if "rtf" in result:
            print("real-time factor      final    partial")
            for label, row in result["rtf"].items():
                partial = f"{row['partial_rtf']:>9.4f}" if "partial_rtf" in row else "        -"
                print(f"  {label:<16} {row['final_rtf']:>9.4f}  {partial}")
        if "batching" in result:
            b = result["batching"]
            print("concurrent 2 s partials  one-by-one seg/s  batched seg/s  speedup")
            for n in CONCURRENCY:
                row = b[str(n)]
                print(f"  {n:>3}                   {row['one_by_one_seg_per_s']:>10.2f}"
                      f"  {row['batched_seg_per_s']:>13.2f}  {row['batched_speedup_x']:>6.2f}x")
            print(f"  mean batch: one-by-one {b['mean_batch_one_by_one']}, "
                  f"batched {b['mean_batch_batched']}")


async def main_async(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    import torch

    import stt.engines.decoding as whisper_module

    # Random weights decode to the budget: make the budget a realistic decode length.
    whisper_module.TOKENS_PER_S = args.tokens_per_s
    whisper_module.TOKENS_BASE = 4
    if args.model:
        model = args.model
    else:
        from whisper_checkpoint import TINY_DIMS, write_checkpoint

        model = str(write_checkpoint(Path(tempfile.mkdtemp()) / "random-tiny.pt", TINY_DIMS))
    info = machine()
    info["torch"] = torch.__version__
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report: dict[str, Any] = {"command": reproduce_command(argv), "machine": info,
                              "model": args.model or "random weights, tiny dims",
                              "tokens_per_s": args.tokens_per_s, "results": {}}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "whisper" in engines:
        for device in devices(args.devices):
            engine = whisper_engine(model, device, 1, args.cpu_threads)
            await engine.start()
            try:
                result = {"threads": engine.threads or None,
                          "encoder": await bench_encoder(engine, args.reps),
                          "rtf": await bench_rtf(engine, args.reps)}
            finally:
                await engine.close()
            result["batching"] = await bench_batching(model, device, args.cpu_threads)
            report["results"][f"whisper/{device}"] = result
            print_report({**report, "results": {f"whisper/{device}": result}})
    if "http" in engines:
        report["results"]["http->stt serve/cpu"] = {"rtf": await bench_http(
            model, args.reps, args.cpu_threads)}
    if "sphinx" in engines:
        report["results"]["sphinx/cpu"] = {"rtf": await bench_sphinx(args.reps)}
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.bench_engines",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="whisper model name or checkpoint path "
                                        "(default: random weights with tiny's dimensions)")
    parser.add_argument("--engines", default="whisper,http,sphinx")
    parser.add_argument("--devices", default="cpu,cuda", help="whisper devices to try")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per figure (median)")
    parser.add_argument("--cpu-threads", type=int, default=0, help="0 = all available CPUs")
    parser.add_argument("--tokens-per-s", type=float, default=4.0,
                        help="decode budget per second of audio (random weights only)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args, argv))
    print("\n==== summary ====")
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
