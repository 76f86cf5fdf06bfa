"""Model configuration shared by training, the float reference, the golden model and the gateware."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 128  # transformer width
    n_layers: int = 4  # decoder blocks
    n_heads: int = 8  # query heads
    n_kv_heads: int = 2  # key/value heads (GQA: n_heads % n_kv_heads == 0)
    hidden_dim: int = 192  # SwiGLU inner width
    vocab_size: int = 512  # byte-level BPE vocabulary
    seq_len: int = 256  # context length (KV cache positions)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    tied_embeddings: bool = True  # classifier reuses the token embedding table
    # Llama 3.1 rope scaling, or None: dict(factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings)
    rope_scaling: dict | None = None

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def kv_mul(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def param_count(self) -> int:
        c = self
        per_layer = (
            c.dim * c.dim  # wq
            + 2 * c.dim * c.kv_dim  # wk, wv
            + c.dim * c.dim  # wo
            + 3 * c.dim * c.hidden_dim  # w1, w2, w3
            + 2 * c.dim  # rms_att, rms_ffn
        )
        n = c.vocab_size * c.dim + c.n_layers * per_layer + c.dim
        if not c.tied_embeddings:
            n += c.vocab_size * c.dim
        return n
