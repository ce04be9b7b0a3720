"""``stt doctor``: what is available here."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from stt.cli.wiring import SAMPLE
from stt.config import Settings
from stt.engines.base import EngineUnavailable


def _describe_model(name: str) -> str:
    """WHISPER_MODEL_SIZE resolved as the faster-whisper engine would, without downloading."""
    from stt.engines.models import DEFAULT_MODEL, EMBEDDED, resolve_ct2

    shown = name or f"{DEFAULT_MODEL} (default)"
    if name and not os.path.isdir(name) and name not in EMBEDDED:
        return f"{shown}: downloaded by name on first start (needs network)"
    try:
        source = resolve_ct2(name)
    except EngineUnavailable as exc:
        return f"{shown}: NOT USABLE: {exc}"
    return (f"{shown}: {source.path}, {source.origin}, model.bin checksum {source.checksum}")


def cmd_doctor(args: argparse.Namespace) -> int:
    from stt.engines.models import EMBEDDED
    from stt.engines.turn_model import TurnModelError, default_path, verify
    from stt.transport.nats_server import find_binary

    def has(mod: str) -> bool:
        return importlib.util.find_spec(mod) is not None

    print(f"python      {sys.version.split()[0]} ({sys.executable})")
    print(f"nats-server {find_binary() or 'not found (pip install stt-streaming[nats-server])'}")
    settings = Settings.from_env()
    print(f"engine      {settings.transcription.engine} (STT_ENGINE)")
    if has("faster_whisper"):
        import ctranslate2

        cuda = ctranslate2.get_cuda_device_count()
        print(f"faster-whisper ok; CTranslate2 {ctranslate2.__version__}, "
              f"{f'{cuda} CUDA device(s)' if cuda else 'no CUDA GPU, CPU only'}")
    else:
        print("faster-whisper missing (extra: faster-whisper)")
    print(f"model       {_describe_model(settings.transcription.whisper_model_size)}")
    for name, model in EMBEDDED.items():
        print(f"  embedded {name:8} {'installed' if model.installed() else 'not installed'} "
              f"({model.requirement})")
    print(f"whisper     {'ok' if has('whisper') else 'missing (extra: local)'}")
    if has("torch"):
        import torch

        gpu = torch.cuda.is_available()
        kind = "ROCm" if getattr(torch.version, "hip", None) else "CUDA"
        print(f"torch       {torch.__version__}; "
              f"{kind + ' ' + torch.cuda.get_device_name(0) if gpu else 'no GPU, CPU only'}")
    else:
        print("torch       missing (extra: local)")
    print(f"demo sample {SAMPLE if SAMPLE.exists() else 'missing'}")
    try:
        print(f"turn model  {verify(default_path())} (verified)")
    except TurnModelError as e:
        print(f"turn model  {e}")
    return 0
