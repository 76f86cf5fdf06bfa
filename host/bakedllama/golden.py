"""Golden model: the integer forward pass of the baked model, bit-exact with the gateware.

llama2.c's shape: config, weights (BakedModel), run state with the KV cache, forward(). It runs a
batch of B independent sequences at the same position (B = 1 for generation; larger B only to
evaluate the validation set faster; every row is computed exactly as it would be alone).
All arithmetic comes from bakedllama.numerics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bakedllama import numerics as nx
from bakedllama.model import BakedModel


@dataclass
class RunState:
    key_cache: np.ndarray  # (n_layers, B, seq_len, kv_dim) int8, frac e_k[layer]
    value_cache: np.ndarray  # (n_layers, B, seq_len, kv_dim) int8, frac e_v[layer]
    pos: int = 0


@dataclass
class Logits:
    acc: np.ndarray  # (B, vocab) int64 classifier accumulators (argmax works on these directly)
    frac: np.ndarray  # (B,) their frac: logit = acc * 2^-frac

    def q8(self) -> np.ndarray:
        """Logits in Q8 (the sampler's input), saturated to 32 bits."""
        return nx.saturate(nx.round_shift(self.acc, (self.frac - nx.SCORE_FRAC)[:, None]), 32)

    def as_float(self) -> np.ndarray:
        """For measuring only (losses, agreement): never used inside the datapath."""
        return self.acc.astype(np.float64) * 2.0 ** -self.frac[:, None].astype(np.float64)


@dataclass
class Trace:
    """Per-layer values, for finding the first layer where two implementations diverge."""

    layers: list = field(default_factory=list)  # per layer: dict(x_att, x_ffn) (B, dim) int16
    embedding: np.ndarray | None = None
    final_xb: np.ndarray | None = None


class Golden:
    def __init__(self, model: BakedModel):
        self.m = model
        c = model.cfg
        self.cfg = c
        self.fmt = model.fmt
        inv = nx.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.rope_cos, self.rope_sin = nx.rope_table(np.arange(c.seq_len), inv)  # (seq_len, hd/2) Q14

    def new_state(self, batch: int = 1) -> RunState:
        c = self.cfg
        shape = (c.n_layers, batch, c.seq_len, c.kv_dim)
        return RunState(np.zeros(shape, np.int8), np.zeros(shape, np.int8))

    # -- small kernels -------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """Dequantize embedding rows into the residual format (int16, frac f_x)."""
        e = self.m.weights["tok_embeddings"]
        q = e.q[tokens].astype(np.int64)  # (B, dim)
        m = np.repeat(e.m[tokens].astype(np.int64), e.group, axis=-1)
        return nx.requantize(q * m, int(e.shift) - self.fmt["f_x"])

    def linear(self, w, x_fixed, frac_in: int, frac_out: int, bits: int = 16):
        """int8-quantize x (per row), multiply by w, requantize to frac_out."""
        a, k = nx.quantize_act(x_fixed)
        acc = nx.matvec(w, a)
        shift = (int(w.shift) + frac_in - k - frac_out)[:, None]
        return nx.requantize(acc, shift, bits)

    # -- the forward pass ----------------------------------------------------------------------
    def forward(self, s: RunState, tokens, trace: Trace | None = None) -> Logits:
        """One position for a batch: tokens (B,) -> classifier logits; advances s.pos."""
        c, f, W, N = self.cfg, self.fmt, self.m.weights, self.m.norms
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        B, pos, hd = len(tokens), s.pos, c.head_dim
        if pos >= c.seq_len:
            raise ValueError(f"position {pos} is past the context length {c.seq_len}")
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = self.embed(tokens)  # (B, dim) int16 frac f_x
        if trace is not None:
            trace.embedding = x.copy()
        for l in range(c.n_layers):
            # attention: rmsnorm -> qkv -> rope -> cache -> scores/softmax/weighted sum -> wo
            xb = nx.rmsnorm(x, N["rms_att_weight"][l], f["f_g_rms_att_weight"][l], f["eps_int"])
            q = self.linear(W["wq"][l], xb, nx.NORM_OUT_FRAC, f["f_qk"]).reshape(B, c.n_heads, hd)
            k = self.linear(W["wk"][l], xb, nx.NORM_OUT_FRAC, f["f_qk"]).reshape(B, c.n_kv_heads, hd)
            v = self.linear(W["wv"][l], xb, nx.NORM_OUT_FRAC, f["e_v"][l], bits=8)
            q, k = nx.rope(q, cos, sin), nx.rope(k, cos, sin)
            s.key_cache[l, :, pos] = nx.saturate(nx.round_shift(k, f["f_qk"] - f["e_k"][l]), 8).reshape(B, -1)
            s.value_cache[l, :, pos] = v
            q8, kq = nx.quantize_act(q.reshape(B, c.dim))  # one shift for all heads of q
            q8 = q8.reshape(B, c.kv_dim // hd, c.kv_mul, hd)  # heads grouped by their kv head
            kk = s.key_cache[l, :, :pos + 1].reshape(B, pos + 1, c.n_kv_heads, hd).transpose(0, 2, 1, 3)
            vv = s.value_cache[l, :, :pos + 1].reshape(B, pos + 1, c.n_kv_heads, hd).transpose(0, 2, 1, 3)
            fq = (f["f_qk"] - kq)[:, None, None]
            att = nx.attention_head(q8, fq, kk[:, :, None], vv[:, :, None], f["e_k"][l], f["e_v"][l], hd)
            o = att.reshape(B, c.dim)  # frac ATT_OUT_FRAC
            x = nx.saturate(x + self.linear(W["wo"][l], o, nx.ATT_OUT_FRAC, f["f_x"], bits=32), 16)
            x_att = x.copy()
            # feed-forward: rmsnorm -> w1, w3 -> silu(w1) * w3 -> w2
            xb = nx.rmsnorm(x, N["rms_ffn_weight"][l], f["f_g_rms_ffn_weight"][l], f["eps_int"])
            h1 = self.linear(W["w1"][l], xb, nx.NORM_OUT_FRAC, f["f_h"])
            h3 = self.linear(W["w3"][l], xb, nx.NORM_OUT_FRAC, f["f_h"])
            hb = nx.swiglu(h1, h3, f["f_h"])
            x = nx.saturate(x + self.linear(W["w2"][l], hb, f["f_h"], f["f_x"], bits=32), 16)
            if trace is not None:
                trace.layers.append(dict(x_att=x_att, x_ffn=x.copy()))
        xb = nx.rmsnorm(x, N["rms_final_weight"], f["f_g_rms_final_weight"], f["eps_int"])
        if trace is not None:
            trace.final_xb = xb.copy()
        a, k = nx.quantize_act(xb)
        acc = nx.matvec(self.m.wcls, a)
        s.pos += 1
        return Logits(acc, int(self.m.wcls.shift) + nx.NORM_OUT_FRAC - k)


def generate(g: Golden, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0,
             seed: int = 0, top_k: int = 0, stop_ids=()):
    """Yield generated token ids: prefill the prompt one position at a time, then decode."""
    c = g.cfg
    if not prompt_ids:
        raise ValueError("empty prompt")
    if len(prompt_ids) + max_tokens > c.seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + {max_tokens} new tokens exceeds the "
                         f"context of {c.seq_len}")
    s = g.new_state(1)
    rng = nx.XorShift32(seed)
    inv_t = nx.temperature_q8(temperature) if temperature > 0 else 0
    logits = None
    for t in prompt_ids:
        logits = g.forward(s, [t])
    for _ in range(max_tokens):
        if inv_t:
            tok = nx.sample(logits.q8()[0], inv_t, rng, top_k)
        else:
            tok = int(nx.argmax(logits.acc)[0])
        yield tok
        if tok in stop_ids:
            return
        logits = g.forward(s, [tok])
