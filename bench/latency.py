"""Final latency after end of speech, split into its parts, side by side in one run.

    python -m bench.latency                      # 1, 2, 4 sessions; three ways to make the final
    python -m bench.latency --sessions 1 2 --duration-s 20

For each number of concurrent real-time sessions of corpus speech (``bench.load``: a real
nats-server, the worker in its own process, the default engine), the same load runs with:

* ``speculative``: the default: the final's decode starts at STT_SPECULATIVE_MS of silence and
  is published when the endpoint is confirmed;
* ``at endpoint``: STT_SPECULATIVE_MS=0, the final's decode starts when the endpoint is
  confirmed (what the worker did before speculative finals);
* ``no partials``: speculative finals and STT_PARTIAL_INTERVAL=0: the floor partials cost.

Printed per run: final latency p50 / p95 from the end of speech (which includes the
STT_CHUNK_TIMEOUT of silence the endpoint needs), its parts (``bench.load.latency_parts``:
silence, queue, engine, publish) and what came after the endpoint decision (queue + engine +
publish, per final). Then the most sessions, with the default configuration, whose final p95
stays within STT_CHUNK_TIMEOUT + ``--margin-s`` of the end of speech, and within ``--margin-s``
of the endpoint decision (the end of speech as the worker's VAD heard it, plus the timeout).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from stt.config import Settings
from stt.transport.nats_server import NatsServer

from .common import DEFAULT_CORPUS, ROOT, CorpusUnavailable, header, load_corpus
from .load import LATENCY_PARTS, RunConfig, _f, run_once

CONFIGS: dict[str, dict[str, str]] = {
    "speculative": {},
    "at endpoint": {"STT_SPECULATIVE_MS": "0"},
    "no partials": {"STT_PARTIAL_INTERVAL": "0"},
}


def row(name: str, r: dict[str, Any]) -> str:
    lat = r["final_latency_s"]
    parts = lat.get("parts") or {}
    cells = " | ".join(f"{_f(parts.get(k, {}).get('p50'))} / {_f(parts.get(k, {}).get('p95'))}"
                       for k in LATENCY_PARTS)
    after = lat.get("after_endpoint") or {}
    return (f"| {r['sessions']} | {name} | {_f(lat['p50'])} / {_f(lat['p95'])} | {cells} | "
            f"{_f(after.get('p50'))} / {_f(after.get('p95'))} | {lat['missed']} | "
            f"{r['partials']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--duration-s", type=float, default=30.0)
    parser.add_argument("--chunk-ms", type=int, default=40)
    parser.add_argument("--margin-s", type=float, default=0.15,
                        help="capacity: final p95 at most STT_CHUNK_TIMEOUT + this")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        clips = load_corpus(args.corpus)
    except CorpusUnavailable as exc:
        print(str(exc), file=sys.stderr)
        return 2
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    base.setdefault("STT_DRAIN_TIMEOUT_S", "5")
    settings = Settings.from_env(environ=base)
    target = settings.session.chunk_timeout_s + args.margin_s
    print(header())
    print(f"engine: {settings.transcription.engine}, "
          f"STT_CHUNK_TIMEOUT {settings.session.chunk_timeout_s:g} s, "
          f"{len(clips)} clips, {args.duration_s:g} s per run, {args.chunk_ms} ms chunks",
          flush=True)
    table: list[str] = []
    within: dict[int, bool] = {}
    within_endpoint: dict[int, bool] = {}
    with NatsServer() as server:
        for n in args.sessions:
            for name in args.configs:
                env = {**base, **CONFIGS[name]}
                cfg = RunConfig(settings.transcription.engine, n, args.duration_s, args.chunk_ms,
                                args.corpus, False, 1, 30.0, args.seed, None, env)
                r = run_once(cfg, server, clips)
                table.append(row(name, r))
                p95 = r["final_latency_s"]["p95"]
                if name == "speculative":
                    missed = r["final_latency_s"]["missed"]
                    within[n] = p95 is not None and p95 <= target and not missed
                    after = (r["final_latency_s"].get("after_endpoint") or {}).get("p95")
                    within_endpoint[n] = (after is not None and after <= args.margin_s
                                          and not missed)
                print(table[-1], flush=True)
    print("\nfinal latency after end of speech, s, p50 / p95 (parts: silence, queue, engine, "
          "publish)\n")
    print("| sessions | final | latency | " + " | ".join(LATENCY_PARTS)
          + " | after endpoint | no final | partials |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in LATENCY_PARTS)
          + " | --- | --- | --- |")
    print("\n".join(table))
    tried = ", ".join(map(str, sorted(within)))
    ok = [n for n, good in sorted(within.items()) if good]
    print(f"\nmost sessions with final p95 <= {target:.2f} s after the end of speech "
          f"(STT_CHUNK_TIMEOUT + {args.margin_s:g} s), default configuration: "
          f"{max(ok) if ok else 'none'} (of {tried})")
    ok = [n for n, good in sorted(within_endpoint.items()) if good]
    print(f"most sessions with final p95 <= {args.margin_s:g} s after the endpoint decision, "
          f"default configuration: {max(ok) if ok else 'none'} (of {tried})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
