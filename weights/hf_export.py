"""Write a trained float model in the Hugging Face Llama layout: what `run8b` (and any Llama loader)
reads. config.json, model.safetensors (bf16), tokenizer.json, train.json and SHA256SUMS, each
written atomically, SHA256SUMS last (a directory without it is incomplete).

The tensors arrive in the golden model's names and layout (llama2.c's interleaved RoPE pairs);
Hugging Face keeps q/k rows half-split per head, so wq / wk are permuted forward here and back by
the loader (bakedllama.llama8b.checkpoint)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ml_dtypes
import numpy as np
from bakedllama.config import ModelConfig
from bakedllama.fileformat import atomic_write_bytes
from bakedllama.llama8b.checkpoint import hf_name, permute_forward, tensor_list, write_safetensors

FILES = ("config.json", "model.safetensors", "tokenizer.json", "train.json")


def hf_config(cfg: ModelConfig, bos: int, eos: int) -> dict:
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.dim,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                intermediate_size=cfg.hidden_dim, vocab_size=cfg.vocab_size,
                rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                max_position_embeddings=cfg.seq_len, tie_word_embeddings=cfg.tied_embeddings,
                attention_bias=False, mlp_bias=False, hidden_act="silu", torch_dtype="bfloat16",
                bos_token_id=bos, eos_token_id=eos)


def _hf_tensor(cfg: ModelConfig, tensors: dict, name: str, layer) -> np.ndarray:
    w = tensors[name] if layer is None else tensors[name][layer]
    if name in ("wq", "wk"):
        w = permute_forward(w, cfg.n_heads if name == "wq" else cfg.n_kv_heads)
    return np.ascontiguousarray(w, dtype=np.float32).astype(ml_dtypes.bfloat16)


def write_hf(out: str | Path, cfg: ModelConfig, tensors: dict, tok, train_meta: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "SHA256SUMS").unlink(missing_ok=True)  # incomplete until rewritten below
    ents = []
    for name, layer in tensor_list(cfg):
        a = _hf_tensor(cfg, tensors, name, layer)
        ents.append((hf_name(name, layer), a.shape, "BF16", lambda a=a: iter([a.tobytes()])))
    write_safetensors(out / "model.safetensors", ents, {"format": "pt"})
    cfg_json = hf_config(cfg, tok.bos_id, tok.eos_id)
    atomic_write_bytes(out / "config.json", [json.dumps(cfg_json, indent=1).encode()])
    tok.save(out / "tokenizer.json")
    atomic_write_bytes(out / "train.json", [json.dumps(train_meta, indent=1).encode()])
    sums = "".join(f"{hashlib.sha256((out / f).read_bytes()).hexdigest()}  {f}\n" for f in FILES)
    atomic_write_bytes(out / "SHA256SUMS", [sums.encode()])


def verify(out: str | Path) -> list[str]:
    """Files of `out` whose checksum does not match its SHA256SUMS (or that are missing)."""
    out = Path(out)
    bad = []
    try:
        lines = (out / "SHA256SUMS").read_text().splitlines()
    except FileNotFoundError:
        return ["SHA256SUMS"]
    for line in lines:
        digest, name = line.split(maxsplit=1)
        p = out / name.strip()
        if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != digest:
            bad.append(name.strip())
    return bad
