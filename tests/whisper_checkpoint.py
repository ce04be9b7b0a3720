"""Write a random-weight Whisper checkpoint in openai-whisper's own file format.

No Whisper weights can be downloaded where the tests run, so the ``whisper`` engine is tested
with a checkpoint made here: ``torch.save({"dims": ..., "model_state_dict": ...})`` exactly as
``whisper.load_model(path)`` reads it, so the engine loads it through the same code path as a
named model. The text it produces is arbitrary; shapes, types and timings are real.

``TINY_DIMS`` are the real dimensions of ``tiny`` (for representative timings, in the benchmark);
``TEST_DIMS`` are much smaller, for fast tests. Both keep the multilingual vocabulary (51865
tokens), which the bundled tokenizer needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_DIMS: dict[str, int] = {
    "n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6,
    "n_audio_layer": 4, "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": 384,
    "n_text_head": 6, "n_text_layer": 4,
}

TEST_DIMS: dict[str, int] = {
    "n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 2,
    "n_audio_layer": 2, "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": 64,
    "n_text_head": 2, "n_text_layer": 2,
}


def write_checkpoint(path: str | Path, dims: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Save a randomly initialised model; returns the path."""
    import torch
    from whisper.model import ModelDimensions, Whisper

    dims = dict(dims or TEST_DIMS)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Whisper(ModelDimensions(**dims))
        # The decoder's positional embedding is created with torch.empty (the real values come
        # from the checkpoint): give it small finite values so decoding is well defined.
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
        # Silence the special tokens (end of text, timestamps, language, <|notimestamps|>):
        # left random, a random model mostly emits them, and the engine drops special tokens,
        # so tests would see empty text. With zero embeddings their logits are 0 and ordinary
        # text tokens win: decoding runs to its token budget and produces (arbitrary) text.
        with torch.no_grad():
            eot = 50257 if dims["n_vocab"] >= 51865 else 50256  # multilingual / English-only
            model.decoder.token_embedding.weight[eot:] = 0.0
        state: dict[str, Any] = model.state_dict()
    finally:
        torch.random.set_rng_state(generator_state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dims, "model_state_dict": state}, path)
    return path
