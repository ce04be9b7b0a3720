"""``stt convert``: a CTranslate2 Whisper model (faster-whisper's format) to an openai-whisper
checkpoint, so a model that only ships for faster-whisper runs on the local ``whisper`` engine.

``model.bin`` is read here with numpy rather than through ctranslate2, which can run a model
but not hand its weights back. The layout is the one ``ModelSpec._serialize`` writes, all
little-endian: u32 binary version, string spec name, u32 spec revision, u32 variable count;
per variable a string name, u8 rank, u32 per dimension, u8 dtype id (the order of
``DataType`` in ctranslate2/types.h), u32 byte count and the raw data; then u32 alias count
and (alias, target) string pairs, for variables the writer found equal to an earlier one.
Strings are u16 length (with the NUL) + UTF-8 + NUL. Quantized weights keep a per-row
``<name>_scale`` (int8: ``q = rint(w * scale)``), so they are divided back to float32; float16
and bfloat16 widen exactly, so a float16 model converts without any loss.

The mapping follows from how each library lays out the same network:

* CT2 fuses self-attention's query, key and value into one ``linear_0`` and cross-attention's
  key and value into ``linear_1`` (its query is ``linear_0``, its output ``linear_2``): the
  rows are split back in that order. Whisper's key projection has no bias; CT2 stores zeros
  for it, which are checked and dropped (a nonzero one would mean this is not Whisper).
* Both libraries compute the same attention (softmax(q k^T / sqrt(d))), so no rescaling.
* ``decoder/projection`` is an alias of the token embedding; openai-whisper ties the two.
* ``gamma``/``beta`` are LayerNorm's ``weight``/``bias``; the conv weights share one layout.
* The head counts are the spec's ``num_heads`` scalars (Whisper's head size, 64, otherwise).
* ``alignment_heads`` (which cross-attention heads follow the audio, for word timestamps) come
  from config.json. openai-whisper keeps them in a non-persistent buffer, so they cannot be in
  the state dict, and ``whisper.load_model`` applies heads only to its named models (a file
  gets the default: every head of the upper half of the layers). The checkpoint stores them
  under ``"alignment_heads"`` in ``set_alignment_heads``'s own encoding; ``load_model`` below
  applies them.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from whisper.model import Whisper

# Index = ctranslate2's DataType id; bfloat16 (5) is read as its upper float32 half.
_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, np.uint16)
_VERSIONS = range(4, 7)  # one layout since 4 (the dtype id); 5 and 6 changed semantics only


class ConvertError(Exception):
    """A model directory or file that cannot be converted (message is for the user)."""


def _read_raw(data: bytes) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def number(fmt: str = "I") -> int:
        return int(take(fmt)[0])

    def string() -> str:
        nonlocal pos
        n = number("H")
        if pos + n > len(data):
            raise ValueError("a name runs past the end of the file")
        text = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return text

    try:
        version = number()
        if version not in _VERSIONS:
            raise ConvertError(f"not a CTranslate2 model.bin (binary version {version})")
        spec, _revision, count = string(), number(), number()
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = string()
            shape = take(f"{number('B')}I")
            dtype, nbytes = _DTYPES[number("B")], number()
            if pos + nbytes > len(data):
                raise ValueError(f"{name}: data runs past the end of the file")
            array = np.frombuffer(data, dtype, nbytes // np.dtype(dtype).itemsize, pos)
            if dtype is np.uint16:
                array = (array.astype(np.uint32) << 16).view(np.float32)
            variables[name] = array.reshape(shape)
            pos += nbytes
        aliases = {}
        for _ in range(number()):
            alias, target = string(), string()
            aliases[alias] = target
    except (struct.error, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise ConvertError(f"not a CTranslate2 model.bin ({type(exc).__name__}: {exc})") from exc
    if pos != len(data):
        raise ConvertError(f"not a CTranslate2 model.bin ({len(data) - pos} trailing bytes)")
    missing = set(aliases.values()) - set(variables)
    if missing:
        raise ConvertError(f"not a CTranslate2 model.bin (aliases of missing {sorted(missing)})")
    return spec, variables, aliases


def _dequantize(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        scale = variables.get(name + "_scale")
        if scale is not None and value.dtype in (np.int8, np.int16):
            per_row = np.asarray(scale, np.float32).reshape((-1,) + (1,) * (value.ndim - 1))
            value = value.astype(np.float32) / per_row
        elif value.dtype == np.float16:
            value = value.astype(np.float32)
        out[name] = value
    return out


def _model_bytes(ct2_dir: Path) -> bytes:
    single = ct2_dir / "model.bin"
    if single.is_file():
        return single.read_bytes()
    parts = sorted(ct2_dir.glob("model.bin.part*"),
                   key=lambda p: int(re.sub(r"\D", "", p.name.rsplit("part", 1)[1]) or 0))
    if not parts:
        raise ConvertError(f"{ct2_dir}: no model.bin (nor model.bin.part1, .part2, ...)")
    return b"".join(p.read_bytes() for p in parts)


def read_spec(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """The spec name (``"WhisperSpec"``) and variables of a ``model.bin`` or model directory."""
    path = Path(path)
    spec, variables, aliases = _read_raw(
        _model_bytes(path) if path.is_dir() else path.read_bytes())
    out = _dequantize(variables)  # before resolving aliases: an alias has no scale of its own
    out.update((alias, out[target]) for alias, target in aliases.items())
    return spec, out


def read_model_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin`` by name, aliases resolved, quantized
    weights and float16 as float32 (scalars such as ``encoder/num_heads`` keep their type)."""
    return read_spec(path)[1]


def _state_dict(v: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    sd: dict[str, np.ndarray] = {}

    def layer_count(prefix: str) -> int:
        return len({m[1] for k in v if (m := re.match(prefix + r"/layer_(\d+)/", k))})

    def linear(src: str, dst: str, parts: tuple[str, ...] = ("",)) -> None:
        weights = np.split(v[src + "/weight"], len(parts))
        biases = np.split(v[src + "/bias"], len(parts))
        for part, w, b in zip(parts, weights, biases, strict=True):
            sd[f"{dst}{part}.weight"] = w
            if part == ".key":  # openai-whisper's key projection has no bias
                if np.any(b):
                    raise ConvertError(f"{src}: nonzero key bias, not a Whisper model")
            else:
                sd[f"{dst}{part}.bias"] = b

    def norm(src: str, dst: str) -> None:
        sd[dst + ".weight"], sd[dst + ".bias"] = v[src + "/gamma"], v[src + "/beta"]

    qkv = (".query", ".key", ".value")
    for side in ("encoder", "decoder"):
        for i in range(layer_count(side)):
            src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(src + "/self_attention/layer_norm", dst + ".attn_ln")
            linear(src + "/self_attention/linear_0", dst + ".attn", qkv)
            linear(src + "/self_attention/linear_1", dst + ".attn.out")
            if side == "decoder":
                norm(src + "/attention/layer_norm", dst + ".cross_attn_ln")
                linear(src + "/attention/linear_0", dst + ".cross_attn.query")
                linear(src + "/attention/linear_1", dst + ".cross_attn", (".key", ".value"))
                linear(src + "/attention/linear_2", dst + ".cross_attn.out")
            norm(src + "/ffn/layer_norm", dst + ".mlp_ln")
            linear(src + "/ffn/linear_0", dst + ".mlp.0")
            linear(src + "/ffn/linear_1", dst + ".mlp.2")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"encoder.{conv}")
    sd["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    norm("encoder/layer_norm", "encoder.ln_post")
    sd["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    projection = v.get("decoder/projection/weight", v["decoder/embeddings/weight"])
    if not np.array_equal(projection, v["decoder/embeddings/weight"]):
        raise ConvertError("decoder/projection differs from the embedding, not a Whisper model")
    sd["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    norm("decoder/layer_norm", "decoder.ln")

    def heads(side: str, state: int) -> int:
        return int(v[side + "/num_heads"]) if side + "/num_heads" in v else state // 64

    (audio_ctx, audio_state), (vocab, text_state) = (
        sd["encoder.positional_embedding"].shape, sd["decoder.token_embedding.weight"].shape)
    dims = {"n_mels": sd["encoder.conv1.weight"].shape[1], "n_audio_ctx": audio_ctx,
            "n_audio_state": audio_state, "n_audio_head": heads("encoder", audio_state),
            "n_audio_layer": layer_count("encoder"), "n_vocab": vocab,
            "n_text_ctx": sd["decoder.positional_embedding"].shape[0], "n_text_state": text_state,
            "n_text_head": heads("decoder", text_state), "n_text_layer": layer_count("decoder")}
    return sd, {k: int(n) for k, n in dims.items()}


def convert(ct2_dir: str | Path, out_path: str | Path) -> Path:
    """Write ``out_path`` (``{"dims", "model_state_dict", "alignment_heads"}``); returns it."""
    import torch

    ct2_dir, out_path = Path(ct2_dir), Path(out_path)
    if not ct2_dir.is_dir():
        raise ConvertError(f"{ct2_dir}: no such directory")
    spec, variables = read_spec(ct2_dir)
    if spec != "WhisperSpec":
        raise ConvertError(f"{ct2_dir}: a CTranslate2 {spec or 'unnamed'} model, not Whisper")
    try:
        state, dims = _state_dict(variables)
    except KeyError as exc:
        raise ConvertError(f"{ct2_dir}: model.bin lacks Whisper variable {exc}") from exc
    config_file = ct2_dir / "config.json"
    mask = np.zeros((dims["n_text_layer"], dims["n_text_head"]), dtype=bool)
    try:
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        for layer, head in config.get("alignment_heads") or []:
            mask[layer, head] = True
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise ConvertError(f"{config_file}: unreadable alignment_heads ({exc})") from exc
    if not mask.any():
        mask[dims["n_text_layer"] // 2:] = True  # openai-whisper's own default
    heads = base64.b85encode(gzip.compress(mask.tobytes(), mtime=0))  # set_alignment_heads' form
    checkpoint = {"dims": dims, "alignment_heads": heads,
                  "model_state_dict": {k: torch.from_numpy(np.array(a, np.float32))
                                       for k, a in state.items()}}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def load_model(path: str | Path, device: str = "cpu") -> Whisper:
    """``whisper.load_model(path)`` plus the checkpoint's alignment heads (which it ignores)."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    checkpoint = torch.load(path, map_location=device, weights_only=True)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    if checkpoint.get("alignment_heads") is not None:
        model.set_alignment_heads(checkpoint["alignment_heads"])
    return model.to(device)


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        out = convert(args.ct2_dir, args.out)
    except (ConvertError, OSError) as exc:
        print(f"stt convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def add_parser(sub: Any) -> None:
    """Add ``stt convert CT2_DIR OUT.pt`` to the CLI's subcommands."""
    p = sub.add_parser(
        "convert", help="convert a CTranslate2 (faster-whisper) model to an openai-whisper .pt",
        description="Read CT2_DIR/model.bin (or model.bin.part1, .part2, ...) and config.json, "
                    "write an openai-whisper checkpoint for WHISPER_MODEL_SIZE=OUT.pt.")
    p.add_argument("ct2_dir", metavar="CT2_DIR", help="CTranslate2 Whisper model directory")
    p.add_argument("out", metavar="OUT.pt", help="checkpoint file to write")
    p.set_defaults(func=cmd_convert)
