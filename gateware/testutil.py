"""Test helpers for the gateware (used by tests/test_gateware*.py): stream drivers with random gaps / back-pressure and
waits, small random baked models (cached per session)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
from bakedllama.config import ModelConfig
from bakedllama.synthetic import random_baked

# A small model with the real one's shape ratios (GQA, hidden = 1.5 dim, w4e8 format).
SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=64,
                    seq_len=64, tied_embeddings=False)
TINY = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=64,
                   seq_len=16, tied_embeddings=False)


@functools.lru_cache(maxsize=None)
def baked(cfg: ModelConfig, scheme: str = "w4e8", seed: int = 0):
    d = Path(tempfile.mkdtemp(prefix="bkl-gw-"))
    return random_baked(d / "m.bkl", cfg, scheme=scheme, seed=seed)


class Stalled(AssertionError):
    pass


def send(ep, beats, rng, p_valid=0.7, timeout=2000, name="sink"):
    """Drive `beats` (dicts of field -> value, incl. first/last) into a stream endpoint."""
    for b in beats:
        while rng.random() > p_valid:
            yield ep.valid.eq(0)
            yield
        for k, v in b.items():
            yield getattr(ep, k).eq(int(v))
        yield ep.valid.eq(1)
        yield
        n = 0
        while not (yield ep.ready):
            yield
            n += 1
            if n > timeout:
                raise Stalled(f"{name}: not ready for {timeout} cycles")
    yield ep.valid.eq(0)


def recv(ep, n_beats, out, fields, rng, p_ready=0.7, timeout=5000, name="source"):
    """Collect n_beats beats (dicts of the given fields + first/last) with random back-pressure."""
    idle = 0
    while len(out) < n_beats:
        yield ep.ready.eq(1 if rng.random() < p_ready else 0)
        yield
        if (yield ep.valid) and (yield ep.ready):
            beat = {}
            for f in fields:
                beat[f] = (yield getattr(ep, f))
            beat["first"] = (yield ep.first)
            beat["last"] = (yield ep.last)
            out.append(beat)
            idle = 0
        else:
            idle += 1
            if idle > timeout:
                raise Stalled(f"{name}: stalled after {timeout} cycles with {len(out)}/{n_beats} beats")
    yield ep.ready.eq(0)


def pack(values, width):
    """List of signed ints -> one packed unsigned int (lane 0 in the low bits)."""
    w = 0
    for i, v in enumerate(values):
        w |= (int(v) & ((1 << width) - 1)) << (i * width)
    return w


def unpack(word, n, width, signed=True):
    out = []
    for i in range(n):
        v = (word >> (i * width)) & ((1 << width) - 1)
        if signed and v >> (width - 1):
            v -= 1 << width
        out.append(v)
    return np.array(out, dtype=np.int64)
