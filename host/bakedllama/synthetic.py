"""Deterministic random models for tests: the real baking and loading code runs on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bakedllama.bake import bake, write_baked
from bakedllama.config import ModelConfig
from bakedllama.model import BakedModel, expected_float_shapes, load_baked


def random_float_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights drawn like a trained model's scale: matrices ~ N(0, 1/fan_in), gains ~ 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_float_shapes(cfg).items():
        if name.startswith("rms_"):
            out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name == "tok_embeddings":
            out[name] = rng.normal(0, 1.0, shape).astype(np.float32)
        else:
            out[name] = (rng.normal(0, 1, shape) / np.sqrt(shape[-1])).astype(np.float32)
    return out


def random_baked(path: str | Path, cfg: ModelConfig, scheme: str = "w4", seed: int = 0) -> BakedModel:
    """Bake a random model (calibrated on random tokens) to `path` and load it back."""
    w = random_float_weights(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    calib = rng.integers(0, cfg.vocab_size, (2, min(cfg.seq_len, 32)))
    meta, tensors = bake(cfg, w, calib, scheme, dict(tokenizer_sha256=None, source=f"random seed {seed}"))
    write_baked(path, meta, tensors)
    return load_baked(path)
