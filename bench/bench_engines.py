"""Engine benchmark, side by side in one run: real-time factor and WER on the corpus, cross-session
batching, and the most real-time sessions each engine sustains.

Usage (from the repository root)::

    python -m bench.bench_engines                                   # both local Whisper engines
    python -m bench.bench_engines --engines faster-whisper,whisper --limit 20 --no-capacity
    python -m bench.bench_engines --device cuda --json out.json     # where a GPU exists

Each engine is built from the settings exactly as ``stt worker`` builds it (``Settings`` and
``create_engine``: the embedded tiny.en, int8 for faster-whisper on CPU, fp32 for openai-whisper
on CPU, the default thread counts), with ``--set KEY=VALUE`` applied to all of them.

1. **Corpus**: every clip of ``../shared/corpus`` decoded whole, one at a time, as a final is:
   real-time factor (engine wall time / audio duration; below 1 is faster than real time) and
   word error rate against the human transcripts.
2. **Batching**: N concurrent 2 s partials (N sessions' segments
   arriving together) with ``WHISPER_BATCH_SIZE=16`` against one by one (batch size 1), in
   segments per second; and the first 12 clips as finals one at a time against two at once
   (two sessions ending their turns together), three rounds: how much longer each takes.
3. **Capacity**: ``python -m bench.load --engine E --find-max`` in a subprocess per engine:
   1, 2, 3, 4, 6, ... real-time sessions of corpus speech through nats-server and the worker,
   until final latency p95 exceeds ``STT_CHUNK_TIMEOUT`` + 0.5 s; the largest N that held.

Engines run one after the other, never two at once: they share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import DEFAULT_CORPUS, ROOT, CorpusUnavailable, corpus_rows, machine
from stt.config import Settings
from stt.core.audio import SAMPLE_RATE, load_16k_mono
from stt.core.textnorm import wer
from stt.engines import Engine, TranscribeOptions, create_engine

ENGINES = ("faster-whisper", "whisper")
CONCURRENCY = (1, 4, 8, 16)
BATCH_SEGMENT_S = 2.0
PAIR_CLIPS = 12                  # finals: one at a time, then two at once
PAIR_ROUNDS = 3
CURVE_STEPS = 2  # capacity steps run past the first that misses the target, to show the curve


def installed(engine: str) -> bool:
    import importlib.util

    module = {"faster-whisper": "faster_whisper", "whisper": "whisper"}[engine]
    return importlib.util.find_spec(module) is not None


def settings_for(engine: str, overrides: dict[str, str]) -> Settings:
    return Settings.from_env(environ={**overrides, "STT_ENGINE": engine})


async def started(settings: Settings) -> Engine:
    engine = create_engine(settings)
    await engine.start()
    return engine


async def bench_corpus(settings: Settings, audio: list[np.ndarray],
                       references: list[str]) -> dict[str, Any]:
    engine = await started(settings)
    try:
        options = TranscribeOptions(language="en")
        await engine.transcribe(audio[0], options)  # warm up
        texts, seconds = [], []
        for clip in audio:
            t0 = time.perf_counter()
            texts.append((await engine.transcribe(clip, options)).text)
            seconds.append(time.perf_counter() - t0)
        described = engine.describe()
    finally:
        await engine.close()
    audio_s = sum(a.size for a in audio) / SAMPLE_RATE
    return {"clips": len(audio), "audio_s": round(audio_s, 1),
            "engine_s": round(sum(seconds), 2), "rtf": round(sum(seconds) / audio_s, 4),
            "clip_p50_s": round(statistics.median(seconds), 3),
            "wer": round(wer(list(zip(references, texts, strict=True))), 4),
            "engine": {k: v for k, v in described.items() if isinstance(v, (str, int, float))}}


async def bench_batching(settings: Settings, speech: np.ndarray) -> dict[str, Any]:
    length = int(BATCH_SEGMENT_S * SAMPLE_RATE)
    stride = max(SAMPLE_RATE // 2, (speech.size - length) // max(CONCURRENCY))
    clips = [speech[i * stride: i * stride + length] for i in range(max(CONCURRENCY))]
    options = TranscribeOptions(language="en", is_partial=True)
    out: dict[str, Any] = {}
    for label, batch_size in (("one_by_one", 1), ("batched", max(CONCURRENCY))):
        engine = await started(settings.replace(whisper_batch_size=batch_size))
        try:
            await asyncio.gather(*(engine.transcribe(c, options) for c in clips[:4]))  # warm
            for n in CONCURRENCY:
                t0 = time.perf_counter()
                await asyncio.gather(*(engine.transcribe(c, options) for c in clips[:n]))
                out.setdefault(str(n), {})[f"{label}_seg_per_s"] = round(
                    n / (time.perf_counter() - t0), 2)
        finally:
            await engine.close()
    for n in CONCURRENCY:
        row = out[str(n)]
        row["speedup_x"] = round(row["batched_seg_per_s"] / row["one_by_one_seg_per_s"], 2)
    return out


async def bench_pairs(settings: Settings, audio: list[np.ndarray]) -> dict[str, Any]:
    """Finals one at a time against two at once (two sessions ending their turns together):
    how much longer each takes. 1.0 would be two cores fully used side by side."""
    engine = await started(settings)
    options = TranscribeOptions(language="en")

    async def timed(clip: np.ndarray) -> float:
        t0 = time.perf_counter()
        await engine.transcribe(clip, options)
        return time.perf_counter() - t0

    try:
        await timed(audio[0])  # warm up
        alone, paired = [], []
        for _ in range(PAIR_ROUNDS):
            alone += [await timed(clip) for clip in audio]
            for a, b in zip(audio[0::2], audio[1::2], strict=False):
                paired += await asyncio.gather(timed(a), timed(b))
    finally:
        await engine.close()
    return {"alone_s": round(statistics.mean(alone), 3),
            "two_at_once_s": round(statistics.mean(paired), 3),
            "ratio": round(statistics.mean(paired) / statistics.mean(alone), 2)}


def bench_capacity(engine: str, overrides: dict[str, str], duration_s: float,
                   corpus: Path) -> dict[str, Any]:
    """``bench.load --find-max`` in its own process tree (it starts nats-server and the worker)."""
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        out = Path(tmp) / "load.json"
        cmd = [sys.executable, "-m", "bench.load", "--engine", engine, "--find-max",
               "--duration-s", f"{duration_s:g}", "--corpus", str(corpus), "--json", str(out),
               "--steps-after-fail", str(CURVE_STEPS)]
        env = {**os.environ, **overrides}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True)
        if proc.returncode != 0 or not out.exists():
            return {"error": (proc.stderr or proc.stdout)[-2000:]}
        runs = json.loads(out.read_text())["runs"]
    best = None
    for line in proc.stdout.splitlines():
        if line.startswith("largest N"):
            tail = line.rsplit(":", 1)[1].strip()
            best = int(tail) if tail.isdigit() else None
    steps = [{"sessions": r["sessions"], "final_p50_s": r["final_latency_s"]["p50"],
              "final_p95_s": r["final_latency_s"]["p95"], "dropped": r["chunks_dropped"],
              "worker_cpu_pct": round(r["worker_cpu_pct"]["with_engine"]),
              "peak_rss_mib": round(r["worker_peak_rss_mb"]["with_engine"])} for r in runs]
    return {"max_sessions": best, "steps": steps}


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def print_report(report: dict[str, Any]) -> None:
    print(f"\ncommand: {report['command']}")
    print(f"machine: {json.dumps(report['machine'])}")
    results = report["results"]
    target = report["latency_target_s"]
    print("\n| engine | model, device, precision | corpus RTF | clip p50 s | WER | "
          f"real-time sessions with final p95 ≤ {target:g} s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        c = r.get("corpus", {})
        e = c.get("engine", {})
        precision = e.get("compute_type") or ("float16" if e.get("fp16") else "float32")
        what = (f"{e.get('model', '')}, {e.get('device', 'cpu')}, {precision}, "
                f"{e.get('cpu_threads') or 'default'} threads")
        cap = r.get("capacity", {})
        best = ("-" if not cap else "error" if "error" in cap
                else str(cap["max_sessions"] or "none"))
        print(f"| {name} | {what} | {_f(c.get('rtf'), '.3f')} | {_f(c.get('clip_p50_s'), '.3f')} "
              f"| {_f(c.get('wer'), '.3f')} | {best} |")
    for name, r in results.items():
        cap = r.get("capacity")
        if cap and "steps" in cap:
            print(f"\n{name}, capacity steps:  sessions → final latency p50 / p95 s "
                  "(dropped chunks, worker CPU %, peak RSS MiB)")
            for s in cap["steps"]:
                print(f"  {s['sessions']:>3} → {_f(s['final_p50_s'])} / {_f(s['final_p95_s'])}"
                      f"  ({s['dropped']}, {s['worker_cpu_pct']} %, {s['peak_rss_mib']})")
        elif cap:
            print(f"\n{name}, capacity: FAILED\n{cap['error']}")
    for name, r in results.items():
        pairs = r.get("pairs")
        if pairs:
            print(f"\n{name}: a final alone {pairs['alone_s']:.3f} s, two at once "
                  f"{pairs['two_at_once_s']:.3f} s each ({pairs['ratio']:.2f}x)")
    for name, r in results.items():
        b = r.get("batching")
        if b:
            print(f"\n{name}: concurrent {BATCH_SEGMENT_S:g} s partials   one by one seg/s   "
                  "batched seg/s   speedup")
            for n in CONCURRENCY:
                row = b[str(n)]
                print(f"  {n:>3}   {row['one_by_one_seg_per_s']:>16.2f}   "
                      f"{row['batched_seg_per_s']:>13.2f}   {row['speedup_x']:>6.2f}x")


async def measure(args: argparse.Namespace, overrides: dict[str, str],
                  engines: list[str]) -> dict[str, Any]:
    rows = corpus_rows(args.corpus)[: args.limit or None]
    audio = [load_16k_mono(str(args.corpus / rel)) for rel, _ in rows]
    references = [ref for _, ref in rows]
    speech = np.concatenate(audio[:8])
    results: dict[str, Any] = {}
    for name in engines:
        settings = settings_for(name, overrides)
        result: dict[str, Any] = {"corpus": await bench_corpus(settings, audio, references)}
        if not args.no_batching:
            result["batching"] = await bench_batching(settings, speech)
            result["pairs"] = await bench_pairs(settings, audio[:PAIR_CLIPS])
        results[name] = result
        print(f"{name}: corpus RTF {result['corpus']['rtf']}, WER {result['corpus']['wer']}",
              flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.bench_engines",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="comma-separated; those not installed are skipped")
    parser.add_argument("--device", default="", help="WHISPER_DEVICE for the Whisper engines")
    parser.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                        help="an environment setting for every engine (e.g. WHISPER_CPU_THREADS=1)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=0, help="first N corpus clips (0 = all)")
    parser.add_argument("--no-batching", action="store_true")
    parser.add_argument("--no-capacity", action="store_true")
    parser.add_argument("--capacity-duration-s", type=float, default=30.0,
                        help="audio per session in each capacity step")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    if args.device:
        overrides["WHISPER_DEVICE"] = args.device
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    engines = [e for e in wanted if installed(e)]
    for skipped in sorted(set(wanted) - set(engines)):
        print(f"{skipped}: not installed, skipped")
    info = machine()
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        target = Settings.from_env(environ=overrides).session.chunk_timeout_s + 0.5
        results = asyncio.run(measure(args, overrides, engines))
    except (CorpusUnavailable, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if not args.no_capacity:
        for name in engines:
            print(f"{name}: capacity (bench.load --find-max) ...", flush=True)
            results[name]["capacity"] = bench_capacity(name, overrides,
                                                       args.capacity_duration_s, args.corpus)
    report = {"command": " ".join(["python -m bench.bench_engines", *map(shlex.quote, argv)]),
              "machine": info, "settings": overrides, "latency_target_s": target,
              "results": results}
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
