"""The composition of the datapath's arithmetic: which shift applies at which step, written once.

numerics.py defines the kernels (round_shift, quantize_act, rmsnorm, attention_head, swiglu, ...)
and the fixed formats (NORM_OUT_FRAC, ATT_OUT_FRAC, SCORE_FRAC, ...); bake.py calibrates a model's
formats (f_x, f_qk, f_h, e_k, e_v, f_g_*, eps_int) and quantize_matrix gives each weight matrix its
shift. This pass combines the two into the constant of every step of one forward pass. The golden
model (golden.py), the gateware (gateware/compiler.py -> Plan.steps -> core.py; attention.py) and
the 8B runner (llama8b/runner.py) take them from here and compute no shift of their own.

A matrix-vector step's output shift depends at run time only on the quantization shift k of its
int8 input (numerics.quantize_act): shift = Requant.base - k. The attention score shift likewise
depends on q's quantization shift kq: LayerSteps.score_base - kq. Every other constant is fixed per
layer (or per model) at bake time.

    steps = model_steps(baked_model)            # or make_steps(cfg, fmt, {(name, layer): shift})
    steps.layers[l].q.base, steps.embed, steps.cls ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bakedllama import numerics as nx

MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # per layer; tok_embeddings, wcls: one each
SCORE_SCALE_FRAC = 15  # numerics.score_scale(head_dim) is 1/sqrt(head_dim) in Q15


@dataclass(frozen=True)
class Requant:
    """One matrix-vector product's output: saturate(round_shift(acc, base - k), bits), frac `frac`.

    acc is the exact accumulator of the int8 input (frac frac_in - k) times the weights
    (frac: the matrix shift), so its frac is base + frac - k (acc_frac)."""

    base: int  # output shift when the input's quantization shift k is 0: w.shift + frac_in - frac
    frac: int  # frac of the result (the next step's format)
    bits: int  # signed width the result saturates to

    def shift(self, k):
        """The rounding shift applied to the accumulators of an input quantized with shift k."""
        return self.base - np.asarray(k, dtype=np.int64)

    def acc_frac(self, k):
        """frac of the accumulators themselves (the classifier's logits are kept as accumulators)."""
        return self.base + self.frac - np.asarray(k, dtype=np.int64)

    def apply(self, acc, k):
        """acc (..., rows) int64 of inputs quantized with shift k (...,) -> the result, frac `frac`."""
        return nx.requantize(acc, self.shift(k)[..., None], self.bits)


def requant(w_shift: int, frac_in: int, frac_out: int, bits: int) -> Requant:
    """The step of a matrix with shift w_shift on an input of frac frac_in (before its int8
    quantization) to frac_out, saturated to `bits`."""
    return Requant(int(w_shift) + int(frac_in) - int(frac_out), int(frac_out), int(bits))


def embed_shift(emb_shift: int, f_x: int) -> int:
    """Rounding shift of an embedding row's q * m (frac: the table's shift) into the residual (f_x)."""
    return int(emb_shift) - int(f_x)


def k_cache_shift(f_qk: int, e_k: int) -> int:
    """Rounding shift of a rotated key (int16, frac f_qk) to the int8 key cache (frac e_k)."""
    return int(f_qk) - int(e_k)


def score_base(f_qk: int, e_k: int) -> int:
    """Score shift at kq = 0 (numerics.attention_head): q8 (frac f_qk - kq) . k8 (frac e_k) times the
    Q15 score scale -> Q8 scores; the shift applied is score_base - kq."""
    return int(f_qk) + int(e_k) + SCORE_SCALE_FRAC - nx.SCORE_FRAC


def att_out_shift(e_v: int) -> int:
    """Shift of sum(e * v) * floor(2^ATT_RECIP_BITS / sum(e)) (values frac e_v) to ATT_OUT_FRAC."""
    return nx.ATT_RECIP_BITS + int(e_v) - nx.ATT_OUT_FRAC


def classifier_step(w_shift: int) -> Requant:
    """The classifier: normed input -> Q8 logits (the sampler's input), 32 bits; argmax works on the
    accumulators, whose frac is Requant.acc_frac(k)."""
    return requant(w_shift, nx.NORM_OUT_FRAC, nx.SCORE_FRAC, 32)


@dataclass(frozen=True)
class LayerSteps:
    """The constants of one decoder block, in the order the block applies them."""

    f_g_att: int  # frac of the attention RMSNorm's int16 gain (numerics.rmsnorm)
    wq: Requant  # wq: RMSNorm output (NORM_OUT_FRAC) -> q, int16 frac f_qk (RoPE's input)
    wk: Requant  # wk: -> k, int16 frac f_qk
    wv: Requant  # wv: -> v, int8 frac e_v, straight into the value cache
    k_cache: int  # rotated k (frac f_qk) -> int8 key cache (frac e_k): rounding shift, saturate 8
    q_frac: int  # frac of the rotated q before its int8 quantization (the score's q: q_frac - kq)
    e_k: int  # frac of this layer's int8 key cache
    e_v: int  # frac of this layer's int8 value cache
    score_base: int  # Q8 score shift at kq = 0 (score_base - kq), see score_base()
    att_out: int  # attention output shift to ATT_OUT_FRAC, see att_out_shift()
    wo: Requant  # wo: attention output (ATT_OUT_FRAC) -> residual frac f_x, 32 bits, then x += it
    f_g_ffn: int  # frac of the FFN RMSNorm's gain
    w1: Requant  # w1: RMSNorm output -> h1, int16 frac f_h
    w3: Requant  # w3: -> h3, int16 frac f_h
    h_frac: int  # frac of h1, h3 and of SwiGLU's output hb (numerics.swiglu's f_h)
    w2: Requant  # w2: hb (frac h_frac) -> residual frac f_x, 32 bits, then x += it


@dataclass(frozen=True)
class Steps:
    """The constants of one forward pass of a model."""

    f_x: int  # frac of the int16 residual stream
    eps_int: int  # RMSNorm epsilon in units of the sum of squares of x (frac 2 f_x)
    embed: int  # embedding row q * m -> residual x, see embed_shift()
    layers: tuple  # (LayerSteps,) one per decoder block
    f_g_final: int  # frac of the final RMSNorm's gain
    cls: Requant  # classifier: RMSNorm output -> Q8 logits, see classifier_step()

    def norm_fracs(self) -> list[int]:
        """Gain fracs in the order of the norms of a pass: att l, ffn l for each l, then final."""
        return [f for ls in self.layers for f in (ls.f_g_att, ls.f_g_ffn)] + [self.f_g_final]


def make_steps(cfg, fmt: dict, shifts: dict) -> Steps:
    """The pass: a model's formats (bake.py's fmt) and its weight shifts -> Steps.

    shifts: (name, layer) -> the matrix's shift, for name in MATRICES and layer 0 .. n_layers - 1,
    and (tok_embeddings, None), (wcls, None) (the embedding's shift when the classifier is tied)."""
    L = cfg.n_layers
    for key in ("f_x", "f_qk", "f_h", "e_k", "e_v", "eps_int", "f_g_rms_att_weight",
                "f_g_rms_ffn_weight", "f_g_rms_final_weight"):
        if key not in fmt:
            raise ValueError(f"the model's numerics formats have no '{key}'")
    for key in ("e_k", "e_v", "f_g_rms_att_weight", "f_g_rms_ffn_weight"):
        if len(fmt[key]) != L:
            raise ValueError(f"formats: '{key}' has {len(fmt[key])} entries for {L} layers")
    f_x, f_qk, f_h = int(fmt["f_x"]), int(fmt["f_qk"]), int(fmt["f_h"])
    N = nx.NORM_OUT_FRAC
    layers = []
    for l in range(L):
        s = {n: int(shifts[(n, l)]) for n in MATRICES}
        e_k, e_v = int(fmt["e_k"][l]), int(fmt["e_v"][l])
        layers.append(LayerSteps(
            f_g_att=int(fmt["f_g_rms_att_weight"][l]),
            wq=requant(s["wq"], N, f_qk, 16), wk=requant(s["wk"], N, f_qk, 16),
            wv=requant(s["wv"], N, e_v, 8),
            k_cache=k_cache_shift(f_qk, e_k), q_frac=f_qk, e_k=e_k, e_v=e_v,
            score_base=score_base(f_qk, e_k), att_out=att_out_shift(e_v),
            wo=requant(s["wo"], nx.ATT_OUT_FRAC, f_x, 32),
            f_g_ffn=int(fmt["f_g_rms_ffn_weight"][l]),
            w1=requant(s["w1"], N, f_h, 16), w3=requant(s["w3"], N, f_h, 16), h_frac=f_h,
            w2=requant(s["w2"], f_h, f_x, 32)))
    emb = int(shifts[("tok_embeddings", None)])
    wcls = int(shifts.get(("wcls", None), emb))
    return Steps(f_x, int(fmt["eps_int"]), embed_shift(emb, f_x), tuple(layers),
                 int(fmt["f_g_rms_final_weight"]), classifier_step(wcls))


def baked_shifts(model) -> dict:
    """(name, layer) -> shift of every matrix of a BakedModel (the wcls entry is the tied table's)."""
    W = model.weights
    out = {(n, l): int(W[n].shift[l]) for n in MATRICES for l in range(model.cfg.n_layers)}
    out[("tok_embeddings", None)] = int(W["tok_embeddings"].shift)
    out[("wcls", None)] = int(model.wcls.shift)
    return out


def model_steps(model) -> Steps:
    """The pass on a BakedModel."""
    return make_steps(model.cfg, model.fmt, baked_shifts(model))
