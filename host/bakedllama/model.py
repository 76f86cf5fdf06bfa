"""Loading the float checkpoint and the baked (quantized) model with their tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bakedllama import fileformat
from bakedllama.config import ModelConfig
from bakedllama.fileformat import ModelFileError
from bakedllama.numerics import QTensor

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "weights" / "tiny"
DEFAULT_FLOAT = DEFAULT_DIR / "model-f32.bkl"
DEFAULT_BAKED = DEFAULT_DIR / "model-q.bkl"
DEFAULT_TOKENIZER = DEFAULT_DIR / "tokenizer.json"
MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
NORMS = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight")


def expected_float_shapes(c: ModelConfig) -> dict[str, tuple]:
    L = c.n_layers
    s = dict(tok_embeddings=(c.vocab_size, c.dim), rms_att_weight=(L, c.dim),
             wq=(L, c.dim, c.dim), wk=(L, c.kv_dim, c.dim), wv=(L, c.kv_dim, c.dim),
             wo=(L, c.dim, c.dim), rms_ffn_weight=(L, c.dim), w1=(L, c.hidden_dim, c.dim),
             w2=(L, c.dim, c.hidden_dim), w3=(L, c.hidden_dim, c.dim), rms_final_weight=(c.dim,))
    if not c.tied_embeddings:
        s["wcls"] = (c.vocab_size, c.dim)
    return s


def check_shapes(path, tensors: dict, shapes: dict) -> None:
    for name, shape in shapes.items():
        if name not in tensors:
            raise ModelFileError(f"{path}: missing tensor '{name}'")
        if tuple(tensors[name].shape) != tuple(shape):
            raise ModelFileError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(shape)}")


def load_float(path=DEFAULT_FLOAT) -> tuple[ModelConfig, dict[str, np.ndarray], dict]:
    header, tensors, _ = fileformat.load(path, kind="float")
    try:
        cfg = ModelConfig.from_dict(header["meta"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: bad model config ({e})") from None
    check_shapes(path, tensors, expected_float_shapes(cfg))
    for k, v in tensors.items():
        if not np.isfinite(v).all():
            raise ModelFileError(f"{path}: tensor '{k}' has NaN or inf values")
    return cfg, tensors, header["meta"]


@dataclass
class BakedModel:
    """The quantized model: integer weights, norm gains and the fixed-point formats (numerics)."""

    cfg: ModelConfig
    weights: dict[str, QTensor]  # tok_embeddings, wq .. w3, wcls (alias of tok_embeddings if tied)
    norms: dict[str, np.ndarray]  # int16 gains: rms_att_weight (L, dim), rms_ffn_weight, rms_final
    fmt: dict  # fixed-point formats, see bake.py
    meta: dict = field(default_factory=dict)
    sha256: str = ""

    @property
    def wcls(self) -> QTensor:
        return self.weights["wcls"] if "wcls" in self.weights else self.weights["tok_embeddings"]

    def storage_bits(self) -> dict[str, int]:
        out = {k: w.storage_bits() for k, w in self.weights.items()}
        out["norms"] = sum(v.size * 16 for v in self.norms.values())
        return out

    def identity(self) -> int:
        """32-bit model identity (first 8 hex digits of the baked file's sha256)."""
        return int(self.sha256[:8], 16)


def load_baked(path=DEFAULT_BAKED) -> BakedModel:
    header, t, digest = fileformat.load(path, kind="baked")
    meta = header["meta"]
    try:
        cfg = ModelConfig.from_dict(meta["config"])
        fmt = meta["numerics"]
        names = ["tok_embeddings", *MATRICES] + ([] if cfg.tied_embeddings else ["wcls"])
        weights = {n: QTensor(t[f"{n}.q"], t[f"{n}.m"], t[f"{n}.shift"], fmt["weights"][n]["bits"],
                              fmt["weights"][n]["group"]) for n in names}
        norms = {n: t[n] for n in NORMS}
    except KeyError as e:
        raise ModelFileError(f"{path}: baked model lacks {e}") from None
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path}: bad baked model ({e})") from None
    shapes = expected_float_shapes(cfg)
    for n, w in weights.items():
        if tuple(w.q.shape) != shapes[n]:
            raise ModelFileError(f"{path}: tensor '{n}' has shape {w.q.shape}, expected {shapes[n]}")
        if w.m.shape[-1] * w.group != w.q.shape[-1]:
            raise ModelFileError(f"{path}: tensor '{n}' multipliers do not match its group size")
    check_shapes(path, norms, {n: shapes[n] for n in NORMS})
    return BakedModel(cfg, weights, norms, fmt, meta, digest)
