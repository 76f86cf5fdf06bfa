"""Validation loss of the float reference and of the golden integer model, and their agreement.

The held-out tokens are cut into windows of seq_len; each window is run from position 0 (as the
hardware runs a sequence), all windows at once as a batch. The golden loss is computed from the
golden model's own integer logits (converted to float only to take the log-softmax)."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from bakedllama.golden import Golden
from bakedllama.model import BakedModel
from bakedllama.reference import FloatModel, cross_entropy


def windows(ids: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    n = (len(ids) - 1) // T
    x = np.asarray(ids[: n * T], dtype=np.int64).reshape(n, T)
    y = np.asarray(ids[1: n * T + 1], dtype=np.int64).reshape(n, T)
    return x, y


def golden_logits(baked: BakedModel, x: np.ndarray, progress: bool = True) -> np.ndarray:
    g = Golden(baked)
    B, T = x.shape
    s = g.new_state(B)
    out = np.zeros((B, T, baked.cfg.vocab_size), np.float64)
    for p in tqdm(range(T), desc="golden", unit="pos", disable=not progress, leave=False):
        out[:, p] = g.forward(s, x[:, p]).as_float()
    return out


def float_logits(cfg, w, x: np.ndarray, batch: int = 64) -> np.ndarray:
    fm = FloatModel(cfg, w)
    return np.concatenate([fm.forward_sequence(x[i:i + batch]) for i in range(0, len(x), batch)])


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(P || Q) in nats over positions."""
    def logsoftmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lp, lq = logsoftmax(p_logits.astype(np.float64)), logsoftmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def evaluate(cfg, w, baked: BakedModel, ids: np.ndarray, T: int | None = None,
             progress: bool = True, float_cache: dict | None = None) -> dict:
    """`float_cache` (a dict) keeps the float logits between calls on the same weights and ids."""
    x, y = windows(ids, T or cfg.seq_len)
    if float_cache is not None and "logits" in float_cache:
        fl = float_cache["logits"]
    else:
        fl = float_logits(cfg, w, x)
        if float_cache is not None:
            float_cache["logits"] = fl
    gl = golden_logits(baked, x, progress)
    return dict(windows=len(x), tokens=int(y.size),
                val_loss_float=cross_entropy(fl, y), val_loss_golden=cross_entropy(gl, y),
                top1_agreement=float((fl.argmax(-1) == gl.argmax(-1)).mean()),
                kl_float_golden=kl_divergence(fl, gl))
