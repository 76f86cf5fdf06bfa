"""Bake a float checkpoint into the integer model: quantize weights, calibrate fixed-point formats.

Formats chosen here (stored in the baked file's meta["numerics"], read by golden model and gateware):
  f_x        residual stream frac (int16), from the largest |x| seen in calibration x HEADROOM
  f_qk, f_h  frac of q/k (after RoPE) and of the FFN hidden values (int16), likewise
  e_k, e_v   per-layer frac of the int8 KV cache, likewise
  f_g_*      frac of each int16 RMSNorm gain (g * sqrt(dim)), the largest that fits
  eps_int    RMSNorm epsilon in units of the sum of squares
  weights    per tensor: bits and group size
"""

from __future__ import annotations

import math

import numpy as np

from bakedllama import fileformat
from bakedllama.config import ModelConfig
from bakedllama.model import MATRICES
from bakedllama.numerics import (
    ACT_MAX,
    INT16_MAX,
    matvec_acc_bits,
    norm_weight_q,
    quantize_matrix,
    quantize_stack,
    rms_eps_int,
)
from bakedllama.reference import FloatModel

HEADROOM = 2.0  # calibrated range x 2: one bit of margin against saturation on unseen text

# Weight schemes: tensor -> (bits, group); group None means one group per row.
SCHEMES = {
    "w8": {"*": (8, None)},
    "w4": {"*": (4, 32)},
    "w4e6": {"*": (4, 32), "tok_embeddings": (6, 32), "wcls": (6, 32)},
    "w4e8": {"*": (4, 32), "tok_embeddings": (8, 32), "wcls": (8, 32)},
    # Taalas-like: 3-bit base, 6-bit for the sensitive tensors (embedding/classifier, wv, w2)
    "w3/6": {"*": (3, 32), "tok_embeddings": (6, 32), "wcls": (6, 32), "wv": (6, 32), "w2": (6, 32)},
}
DEFAULT_SCHEME = "w4e6"  # measured: +0.040 nats over float, fits the 85F (weights/tiny/README.md)


def scheme_format(scheme: str, name: str, cols: int) -> tuple[int, int]:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weight scheme '{scheme}' (choose from {', '.join(SCHEMES)})")
    bits, group = SCHEMES[scheme].get(name, SCHEMES[scheme]["*"])
    group = cols if group is None or cols % group else group
    return bits, group


def frac_for(max_abs: float, limit: int) -> int:
    """Largest frac such that max_abs * HEADROOM still fits in [-limit, limit]."""
    return int(math.floor(math.log2(limit / (max(max_abs, 1e-6) * HEADROOM))))


def calibrate(cfg: ModelConfig, w: dict, tokens: np.ndarray) -> dict:
    """Run the float model over calibration windows (B, T) and return max |value| per kind."""
    stats: dict = {}
    FloatModel(cfg, w).forward_sequence(tokens, stats)
    return stats


def bake(cfg: ModelConfig, w: dict[str, np.ndarray], calib_tokens: np.ndarray, scheme: str,
         meta_extra: dict | None = None):
    """Returns (meta, tensors) of the baked model."""
    stats = calibrate(cfg, w, calib_tokens)
    L = cfg.n_layers
    fmt = dict(
        f_x=frac_for(stats["x"], INT16_MAX),
        f_qk=frac_for(stats["qk"], INT16_MAX),
        f_h=frac_for(stats["h"], INT16_MAX),
        e_k=[frac_for(stats[("k", l)], ACT_MAX) for l in range(L)],
        e_v=[frac_for(stats[("v", l)], ACT_MAX) for l in range(L)],
        scheme=scheme,
        weights={},
        calibration={str(k) if not isinstance(k, tuple) else f"{k[0]}{k[1]}": round(v, 4)
                     for k, v in stats.items()},
    )
    fmt["eps_int"] = rms_eps_int(cfg.norm_eps, cfg.dim, fmt["f_x"])
    tensors: dict[str, np.ndarray] = {}
    errors = {}
    names = ["tok_embeddings", *MATRICES] + ([] if cfg.tied_embeddings else ["wcls"])
    for name in names:
        f = w[name]
        bits, group = scheme_format(scheme, name, f.shape[-1])
        qt = quantize_stack(f, bits, group) if f.ndim == 3 else quantize_matrix(f, bits, group)
        fmt["weights"][name] = dict(bits=bits, group=group,
                                    acc_bits=matvec_acc_bits(bits, group, f.shape[-1]))
        tensors[f"{name}.q"], tensors[f"{name}.m"] = qt.q, qt.m
        tensors[f"{name}.shift"] = np.asarray(qt.shift, dtype=np.int32)
        err = qt.dequantize() - f
        errors[name] = round(float(np.sqrt((err**2).mean() / (f**2).mean())), 5)  # relative RMS
    for name in ("rms_att_weight", "rms_ffn_weight"):
        gqs = [norm_weight_q(g) for g in w[name]]
        tensors[name] = np.stack([g for g, _ in gqs])
        fmt[f"f_g_{name}"] = [f for _, f in gqs]
    tensors["rms_final_weight"], fmt["f_g_rms_final_weight"] = norm_weight_q(w["rms_final_weight"])
    fmt["weight_rel_rms_error"] = errors
    meta = dict(config=cfg.to_dict(), numerics=fmt, **(meta_extra or {}))
    return meta, tensors


def calibration_windows(train_ids: np.ndarray, seq_len: int, n: int = 8) -> np.ndarray:
    """n windows of seq_len tokens at evenly spaced, fixed offsets of the training split."""
    starts = np.linspace(0, len(train_ids) - seq_len - 1, n).astype(int)
    return np.stack([train_ids[s:s + seq_len] for s in starts])


def write_baked(path, meta: dict, tensors: dict) -> str:
    return fileformat.save(path, "baked", meta, tensors)
