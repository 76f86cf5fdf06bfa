"""Golden model: the integer forward pass of the baked model, bit-exact with the gateware.

llama2.c's shape: config, weights (BakedModel), run state with the KV cache, forward(). It runs a
batch of B independent sequences at the same position (B = 1 for generation; larger B only to
evaluate the validation set faster; every row is computed exactly as it would be alone).
All arithmetic comes from bakedllama.numerics."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bakedllama import numerics as nx
from bakedllama import steps
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


def embed(e: nx.QTensor, tokens, f_x: int):
    """Dequantize embedding rows into the residual format: (B,) ids -> (B, dim) int16, frac f_x."""
    q = e.q[tokens].astype(np.int64)
    m = np.repeat(e.m[tokens].astype(np.int64), e.group, axis=-1)
    return nx.requantize(q * m, steps.embed_shift(e.shift, f_x))


def linear(w: nx.QTensor, x_fixed, rq: steps.Requant):
    """int8-quantize x (per row), multiply by w, requantize (the step rq of matrix w)."""
    a, k = nx.quantize_act(x_fixed)
    return linear_q(w, a, k, rq)


def linear_q(w: nx.QTensor, a, k, rq: steps.Requant):
    """The matrix-vector product on already-quantized activations a (quantization shift k per row),
    requantized by the step rq (which carries w's shift).

    Rows are independent, so a row slice of w gives the same rows of the result (row splits)."""
    return rq.apply(nx.matvec(w, a), k)


@dataclass
class LayerWeights:
    """One decoder block's baked weights (what a partition carries for a whole layer)."""

    rms_att: np.ndarray  # (dim,) int16 gain (its step: st.rms_att)
    wq: nx.QTensor
    wk: nx.QTensor
    wv: nx.QTensor
    wo: nx.QTensor
    rms_ffn: np.ndarray  # (dim,) int16 gain (its step: st.rms_ffn)
    w1: nx.QTensor
    w2: nx.QTensor
    w3: nx.QTensor
    st: steps.LayerSteps  # the block's shifts and formats (steps.make_steps)


def attention_core(c, st: steps.LayerSteps, q, k, v, key_cache, value_cache, pos: int, cos, sin,
                   consecutive: bool = False):
    """Between the q/k/v projections and wo: RoPE, KV cache write, scores, softmax, weighted sum.

    q (B, n_heads, hd), k (B, n_kv_heads, hd) int16 frac f_qk; v (B, kv_dim) int8 frac e_v.
    B sequences at position `pos` (cos, sin: that position's rows); or, consecutive=True, B
    consecutive positions pos .. pos + B - 1 of the caches' one sequence (cos, sin: (B, hd/2)),
    each query over the positions up to its own: the same integers as B calls in turn.
    Returns the attention output (B, dim), frac ATT_OUT_FRAC."""
    B, hd = q.shape[0], c.head_dim
    if consecutive:
        cos, sin = cos[:, None], sin[:, None]
    q, k = nx.rope(q, cos, sin), nx.rope(k, cos, sin)
    k8 = nx.saturate(nx.round_shift(k, st.k_cache), 8).reshape(B, -1)
    if consecutive:
        key_cache[0, pos:pos + B], value_cache[0, pos:pos + B] = k8, v
    else:
        key_cache[:, pos], value_cache[:, pos] = k8, v
    n = pos + B if consecutive else pos + 1  # cached positions read
    S = key_cache.shape[0]  # sequences in the caches
    q8, kq = nx.quantize_act(q.reshape(B, c.dim))  # one shift for all heads of q
    q8 = q8.reshape(B, c.n_kv_heads, c.kv_mul, hd)  # query heads grouped by their kv head
    kk = key_cache[:, :n].reshape(S, n, c.n_kv_heads, hd).transpose(0, 2, 1, 3)
    vv = value_cache[:, :n].reshape(S, n, c.n_kv_heads, hd).transpose(0, 2, 1, 3)
    mask = None
    if consecutive and B > 1:  # query i sees positions 0 .. pos + i
        mask = (np.arange(n)[None, :] <= (pos + np.arange(B))[:, None])[:, None, None, :]
    att = nx.attention_head(q8, kq[:, None, None], kk[:, :, None], vv[:, :, None], st.att, mask)
    return att.reshape(B, c.dim)


def attention_block(c, lw: LayerWeights, x, key_cache, value_cache, pos: int, cos, sin):
    """x (B, dim) int16 -> x + attention(x); writes position `pos` of this layer's cache.

    key_cache / value_cache: (B, seq_len, kv_dim) int8 views of this layer's cache."""
    B, hd, st = x.shape[0], c.head_dim, lw.st
    xb = nx.rmsnorm(x, lw.rms_att, st.rms_att)
    a, k_a = nx.quantize_act(xb)
    q = linear_q(lw.wq, a, k_a, st.wq).reshape(B, c.n_heads, hd)
    k = linear_q(lw.wk, a, k_a, st.wk).reshape(B, c.n_kv_heads, hd)
    v = linear_q(lw.wv, a, k_a, st.wv)
    o = attention_core(c, st, q, k, v, key_cache, value_cache, pos, cos, sin)
    return nx.saturate(x + linear(lw.wo, o, st.wo), 16)


def ffn_block(c, lw: LayerWeights, x):
    """x (B, dim) int16 -> x + w2(silu(w1 xb) * w3 xb)."""
    st = lw.st
    xb = nx.rmsnorm(x, lw.rms_ffn, st.rms_ffn)
    a, k_a = nx.quantize_act(xb)
    h1 = linear_q(lw.w1, a, k_a, st.w1)
    h3 = linear_q(lw.w3, a, k_a, st.w3)
    hb = nx.swiglu(h1, h3, st.swiglu)
    return nx.saturate(x + linear(lw.w2, hb, st.w2), 16)


def classifier(rms_final, norm: steps.NormStep, wcls: nx.QTensor, x) -> "Logits":
    """Final RMSNorm (gain rms_final, step norm) and the classifier: x (B, dim) -> Logits."""
    xb = nx.rmsnorm(x, rms_final, norm)
    a, k = nx.quantize_act(xb)
    return Logits(nx.matvec(wcls, a), steps.classifier_step(wcls.shift).acc_frac(k))


class Golden:
    def __init__(self, model: BakedModel):
        self.m = model
        c = model.cfg
        self.cfg = c
        self.fmt = model.fmt
        self.steps = steps.model_steps(model)  # every shift of the pass (steps.make_steps)
        inv = nx.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.rope_cos, self.rope_sin = nx.rope_table(np.arange(c.seq_len), inv)  # (seq_len, hd/2) Q14

    def new_state(self, batch: int = 1) -> RunState:
        c = self.cfg
        shape = (c.n_layers, batch, c.seq_len, c.kv_dim)
        return RunState(np.zeros(shape, np.int8), np.zeros(shape, np.int8))

    def layer(self, l: int) -> LayerWeights:
        W, N = self.m.weights, self.m.norms
        return LayerWeights(N["rms_att_weight"][l], W["wq"][l], W["wk"][l], W["wv"][l], W["wo"][l],
                            N["rms_ffn_weight"][l], W["w1"][l], W["w2"][l], W["w3"][l],
                            self.steps.layers[l])

    def forward(self, s: RunState, tokens, trace: Trace | None = None) -> Logits:
        """One position for a batch: tokens (B,) -> classifier logits; advances s.pos."""
        c = self.cfg
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        pos = s.pos
        if pos >= c.seq_len:
            raise ValueError(f"position {pos} is past the context length {c.seq_len}")
        cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        x = embed(self.m.weights["tok_embeddings"], tokens, self.steps.f_x)  # (B, dim) int16 frac f_x
        if trace is not None:
            trace.embedding = x.copy()
        for l in range(c.n_layers):
            lw = self.layer(l)
            x = attention_block(c, lw, x, s.key_cache[l], s.value_cache[l], pos, cos, sin)
            x_att = x.copy()
            x = ffn_block(c, lw, x)
            if trace is not None:
                trace.layers.append(dict(x_att=x_att, x_ffn=x.copy()))
        s.pos += 1
        return classifier(self.m.norms["rms_final_weight"], self.steps.rms_final, self.m.wcls, x)


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
