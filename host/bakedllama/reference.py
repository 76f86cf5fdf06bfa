"""Float reference forward pass (numpy), the same maths as the training model in weights/train.py.

Used for the float validation loss, bake-time calibration and float-vs-golden agreement. Processes
a batch of sequences position by position with a KV cache, like the golden model."""

from __future__ import annotations

import numpy as np

from bakedllama.config import ModelConfig
from bakedllama.numerics import rope_inv_freq


class FloatModel:
    def __init__(self, cfg: ModelConfig, w: dict[str, np.ndarray]):
        self.cfg = cfg
        self.w = {k: np.asarray(v, dtype=np.float32) for k, v in w.items()}
        inv = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        ang = np.outer(np.arange(cfg.seq_len), inv)
        self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    @property
    def wcls(self):
        return self.w["tok_embeddings"] if self.cfg.tied_embeddings else self.w["wcls"]

    def rmsnorm(self, x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg.norm_eps) * g

    def rope(self, v, pos):  # v (B, H, hd), interleaved pairs
        c, s = self.cos[pos], self.sin[pos]
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def forward_sequence(self, tokens: np.ndarray, stats: dict | None = None) -> np.ndarray:
        """tokens (B, T) -> logits (B, T, vocab). `stats` collects max |value| per tensor kind."""
        c, w = self.cfg, self.w
        B, T = tokens.shape
        hd, H, KH = c.head_dim, c.n_heads, c.n_kv_heads
        kc = np.zeros((c.n_layers, B, T, KH, hd), np.float32)  # (n_layers, B, seq, kv_heads, hd)
        vc = np.zeros_like(kc)
        out = np.zeros((B, T, c.vocab_size), np.float32)

        def track(name, v, layer=None):
            if stats is not None:
                key = name if layer is None else (name, layer)
                stats[key] = max(stats.get(key, 0.0), float(np.abs(v).max()))

        for pos in range(T):
            x = w["tok_embeddings"][tokens[:, pos]]  # (B, dim)
            track("x", x)
            for l in range(c.n_layers):
                xb = self.rmsnorm(x, w["rms_att_weight"][l])
                q = self.rope((xb @ w["wq"][l].T).reshape(B, H, hd), pos)
                k = self.rope((xb @ w["wk"][l].T).reshape(B, KH, hd), pos)
                v = (xb @ w["wv"][l].T).reshape(B, KH, hd)
                track("qk", q), track("qk", k), track("k", k, l), track("v", v, l)
                kc[l, :, pos], vc[l, :, pos] = k, v
                kk = np.repeat(kc[l, :, :pos + 1], c.kv_mul, axis=2)  # (B, t, H, hd)
                vv = np.repeat(vc[l, :, :pos + 1], c.kv_mul, axis=2)
                att = np.einsum("bhd,bthd->bht", q, kk) / np.sqrt(hd)
                att = np.exp(att - att.max(-1, keepdims=True))
                att /= att.sum(-1, keepdims=True)
                o = np.einsum("bht,bthd->bhd", att, vv).reshape(B, c.dim)
                x = x + o @ w["wo"][l].T
                track("x", x)
                xb = self.rmsnorm(x, w["rms_ffn_weight"][l])
                h1, h3 = xb @ w["w1"][l].T, xb @ w["w3"][l].T
                hb = h1 / (1 + np.exp(-h1)) * h3
                track("h", h1), track("h", h3), track("h", hb)
                x = x + hb @ w["w2"][l].T
                track("x", x)
            out[:, pos] = self.rmsnorm(x, w["rms_final_weight"]) @ self.wcls.T
        return out


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean next-token loss in nats; logits (..., vocab) float, targets (...) int."""
    lg = logits.astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg).sum(-1))
    picked = np.take_along_axis(lg, targets[..., None], -1)[..., 0]
    return float((lse - picked).mean())
