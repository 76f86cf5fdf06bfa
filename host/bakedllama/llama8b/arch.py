"""Llama 3.1 architecture: the Hugging Face config <-> bakedllama ModelConfig, and the named specs.

The golden model's ModelConfig already carries everything Llama 3.1 needs (GQA, untied lm_head,
rope_theta, llama3 rope scaling); this module only reads and writes Hugging Face `config.json`.
`seq_len` is the context the run allocates (KV cache and RoPE table), not the model's 131072."""

from __future__ import annotations

from dataclasses import dataclass

from bakedllama.config import ModelConfig
from bakedllama.fileformat import ModelFileError

LLAMA3_ROPE_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)
DEFAULT_CONTEXT = 1024  # KV cache positions allocated by a run (int8: 64 KiB per position for 8B)


@dataclass(frozen=True)
class Special:
    """Token ids the runner needs: BOS prepended to the prompt, generation stops on `stop`."""

    bos: int
    stop: tuple[int, ...]


# Hugging Face config.json of Llama 3.1 8B (the fields this project reads).
LLAMA31_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5,
    rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **LLAMA3_ROPE_SCALING),
    max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=False,
    mlp_bias=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    torch_dtype="bfloat16")

# Llama 3.1 70B: the 8B's config.json with the 70B's widths (80 layers, GQA 64/8, ffn 28672);
# 70,553,706,496 parameters. For the projection and for a cluster (--cluster): bf16 141 GB, w8 ~71 GB.
LLAMA31_70B = dict(LLAMA31_8B, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                   num_key_value_heads=8, intermediate_size=28672)

# The same architecture at small dims (tests): GQA 4/2, head_dim 16, group-32-friendly widths.
# Its vocabulary: 256 byte tokens, 128 filler tokens, 128 specials laid out like Llama 3's.
LLAMA3_TINY = dict(LLAMA31_8B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, intermediate_size=160, vocab_size=512,
                   bos_token_id=384, eos_token_id=[385, 392, 393], max_position_embeddings=2048)

SPECS = {"llama3.1-8b": LLAMA31_8B, "llama3.1-70b": LLAMA31_70B, "llama3-tiny": LLAMA3_TINY}


def _rope_scaling(hf: dict) -> dict | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")  # transformers >= 5 writes the latter
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelFileError(f"rope scaling '{kind}' is not supported (only llama3)")
    try:
        return {k: float(rs[k]) if k != "original_max_position_embeddings" else int(rs[k])
                for k in LLAMA3_ROPE_SCALING}
    except KeyError as e:
        raise ModelFileError(f"llama3 rope scaling lacks {e}") from None


def from_hf_config(hf: dict, context: int = DEFAULT_CONTEXT,
                   where: str = "config.json") -> tuple[ModelConfig, Special]:
    """Hugging Face Llama config -> (ModelConfig with seq_len = context, special tokens)."""
    if not isinstance(hf, dict):
        raise ModelFileError(f"{where}: not a JSON object")
    mt, arch = hf.get("model_type"), hf.get("architectures") or []
    if mt != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise ModelFileError(f"{where}: not a Llama model (model_type={mt!r}, architectures={arch})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelFileError(f"{where}: hidden_act {hf['hidden_act']!r} is not silu")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ModelFileError(f"{where}: biases in attention/MLP are not supported")
    try:
        dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        hd = hf.get("head_dim") or dim // heads
        if hd * heads != dim:
            raise ModelFileError(f"{where}: head_dim {hd} x {heads} heads != hidden_size {dim}")
        theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        max_pos = int(hf.get("max_position_embeddings", context))
        cfg = ModelConfig(dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
                          n_kv_heads=int(hf.get("num_key_value_heads") or heads),
                          hidden_dim=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
                          seq_len=min(int(context), max_pos), norm_eps=float(hf["rms_norm_eps"]),
                          rope_theta=float(theta),
                          tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                          rope_scaling=_rope_scaling(hf))
    except KeyError as e:
        raise ModelFileError(f"{where}: Llama config lacks {e}") from None
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: bad Llama config ({e})") from None
    eos = hf.get("eos_token_id")
    stop = tuple(int(t) for t in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    bos = hf.get("bos_token_id")
    return cfg, Special(int(bos) if bos is not None else -1, stop)
