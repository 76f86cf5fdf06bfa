"""The composition of the datapath's arithmetic: which shift applies at which step, written once.

numerics.py defines the kernels (round_shift, quantize_act, rmsnorm, attention_head, swiglu, ...)
and the fixed formats (NORM_OUT_FRAC, ATT_OUT_FRAC, SCORE_FRAC, ...); bake.py calibrates a model's
formats (f_x, f_qk, f_h, e_k, e_v, f_g_*, eps_int) and quantize_matrix gives each weight matrix its
shift. This pass combines the two into the constant of every step of one forward pass. The golden
model (golden.py), the gateware (gateware/compiler.py -> Plan.steps -> core.py; units.RMSNorm,
units.SwiGLU, attention.py) and the 8B runner (llama8b/runner.py) take them from here and compute
no shift of their own; numerics.rmsnorm, attention_head and swiglu take their step (NormStep,
AttentionStep, SwiGLUStep).

Some shifts depend on a value known only at run time, and the step gives them as a method of it:
a matrix-vector step's output shift on the quantization shift k of its int8 input
(numerics.quantize_act): Requant.shift(k) = base - k; the attention score shift on q's
quantization shift kq: AttentionStep.score_shift(kq) = score_base - kq; the RMSNorm's x * rsqrt
shift on the exponent k of the rsqrt (numerics.rsqrt_parts): NormStep.u_shift(k) = u_base + k.
Every other constant is fixed per layer (or per model) at bake time.

    steps = model_steps(baked_model)            # or make_steps(cfg, fmt, {(name, layer): shift})
    steps.layers[l].wq.base, steps.layers[l].att.score_base, steps.rms_final.out, steps.embed ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bakedllama import numerics as nx

MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # per layer; tok_embeddings, wcls: one each


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


@dataclass(frozen=True)
class NormStep:
    """One RMSNorm (numerics.rmsnorm): x (int16) -> x / rms(x) * g, frac NORM_OUT_FRAC.

    The sum of squares of x plus eps_int gives 1/sqrt(ss) ~= r * 2^-(RSQRT_FRAC + k), k at run
    time (numerics.rsqrt_parts); x * r rounded at u_shift(k) is u = x / sqrt(ss) in Q15 (U_FRAC),
    and u times the gain (int16, frac f_g) rounded at `out` is the output."""

    eps_int: int  # epsilon in units of the sum of squares of x (frac 2 f_x)
    u_base: int  # x * r -> u (Q15) when the rsqrt exponent k is 0: RSQRT_FRAC - U_FRAC
    out: int  # u * g -> NORM_OUT_FRAC: U_FRAC + f_g - NORM_OUT_FRAC

    def u_shift(self, k):
        """The rounding shift of x * r for a sum of squares whose rsqrt exponent is k."""
        return self.u_base + np.asarray(k, dtype=np.int64)


def norm_step(f_g: int, eps_int: int) -> NormStep:
    """The step of an RMSNorm whose gain has frac f_g."""
    return NormStep(int(eps_int), nx.RSQRT_FRAC - nx.U_FRAC, nx.U_FRAC + int(f_g) - nx.NORM_OUT_FRAC)


@dataclass(frozen=True)
class AttentionStep:
    """One layer's attention heads (numerics.attention_head), in the order it applies them:

    scores  dot(q8, k8) * scale rounded at score_shift(kq) -> Q8 (SCORE_FRAC): q8 has frac
            f_qk - kq (kq: its int8 quantization shift, at run time), k8 the key cache's e_k,
            scale is Q15 (SCORE_SCALE_FRAC)
    output  sum_t exp_neg(max - s_t) * v8_t (values frac e_v) times the reciprocal
            floor(2^ATT_RECIP_BITS / sum_t exp_neg(max - s_t)), rounded at `out` -> ATT_OUT_FRAC."""

    scale: int  # 1/sqrt(head_dim) in Q15 (numerics.score_scale)
    score_q: int  # the score shift's part from q and the scale: f_qk + SCORE_SCALE_FRAC - SCORE_FRAC
    e_k: int  # ... and its part from the keys: the key cache's frac (score_base = score_q + e_k)
    out: int  # sum(e * v) * recip -> ATT_OUT_FRAC: ATT_RECIP_BITS + e_v - ATT_OUT_FRAC

    @property
    def score_base(self) -> int:
        """The score shift when q's quantization shift kq is 0."""
        return self.score_q + self.e_k

    def score_shift(self, kq):
        """The rounding shift of dot * scale for a q quantized with shift kq."""
        return self.score_base - np.asarray(kq, dtype=np.int64)


def attention_step(f_qk: int, e_k: int, e_v: int, head_dim: int) -> AttentionStep:
    """The attention of a layer whose q / k have frac f_qk before quantization, key cache frac e_k,
    value cache frac e_v."""
    return AttentionStep(nx.score_scale(head_dim), int(f_qk) + nx.SCORE_SCALE_FRAC - nx.SCORE_FRAC,
                         int(e_k), nx.ATT_RECIP_BITS + int(e_v) - nx.ATT_OUT_FRAC)


@dataclass(frozen=True)
class SwiGLUStep:
    """SwiGLU (numerics.swiglu) on h1, h3 of frac f_h: h1 rounded at `index` addresses the sigmoid
    table (SIG_FRAC_IN), silu(h1) = h1 * sigmoid (Q15) keeps h1's frac, silu * h3 rounded at `out`
    is hb at f_h."""

    index: int  # h1 -> the sigmoid table's input resolution: f_h - SIG_FRAC_IN
    out: int  # silu (frac f_h) * h3 (frac f_h) -> f_h: f_h


def swiglu_step(f_h: int) -> SwiGLUStep:
    """The SwiGLU of h1, h3 (and its output hb) at frac f_h."""
    return SwiGLUStep(int(f_h) - nx.SIG_FRAC_IN, int(f_h))


def classifier_step(w_shift: int) -> Requant:
    """The classifier: normed input -> Q8 logits (the sampler's input), 32 bits; argmax works on the
    accumulators, whose frac is Requant.acc_frac(k)."""
    return requant(w_shift, nx.NORM_OUT_FRAC, nx.SCORE_FRAC, 32)


@dataclass(frozen=True)
class LayerSteps:
    """The constants of one decoder block, in the order the block applies them."""

    rms_att: NormStep  # the attention RMSNorm: x (f_x) -> NORM_OUT_FRAC
    wq: Requant  # wq: RMSNorm output (NORM_OUT_FRAC) -> q, int16 frac f_qk (RoPE's input)
    wk: Requant  # wk: -> k, int16 frac f_qk
    wv: Requant  # wv: -> v, int8 frac e_v, straight into the value cache
    k_cache: int  # rotated k (frac f_qk) -> int8 key cache (frac e_k): rounding shift, saturate 8
    att: AttentionStep  # scores of the int8-quantized rotated q and the output, see attention_step()
    wo: Requant  # wo: attention output (ATT_OUT_FRAC) -> residual frac f_x, 32 bits, then x += it
    rms_ffn: NormStep  # the FFN RMSNorm
    w1: Requant  # w1: RMSNorm output -> h1, int16 frac f_h
    w3: Requant  # w3: -> h3, int16 frac f_h
    swiglu: SwiGLUStep  # h1, h3 -> hb, all int16 frac f_h, see swiglu_step()
    w2: Requant  # w2: hb (frac f_h) -> residual frac f_x, 32 bits, then x += it


@dataclass(frozen=True)
class Steps:
    """The constants of one forward pass of a model."""

    f_x: int  # frac of the int16 residual stream
    embed: int  # embedding row q * m -> residual x, see embed_shift()
    layers: tuple  # (LayerSteps,) one per decoder block
    rms_final: NormStep  # the final RMSNorm
    cls: Requant  # classifier: RMSNorm output -> Q8 logits, see classifier_step()

    def norms(self) -> list[NormStep]:
        """The norms of a pass in order: att l, ffn l for each l, then final."""
        return [n for ls in self.layers for n in (ls.rms_att, ls.rms_ffn)] + [self.rms_final]

    def norm(self, name: str, layer: int | None) -> NormStep:
        """The step of the norm whose gain is `name` (rms_att_weight, rms_ffn_weight of `layer`;
        rms_final_weight)."""
        if name == "rms_final_weight":
            return self.rms_final
        if name not in ("rms_att_weight", "rms_ffn_weight"):
            raise ValueError(f"no norm '{name}'")
        ls = self.layers[layer]
        return ls.rms_att if name == "rms_att_weight" else ls.rms_ffn


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
    f_x, f_qk, f_h, eps = int(fmt["f_x"]), int(fmt["f_qk"]), int(fmt["f_h"]), int(fmt["eps_int"])
    N = nx.NORM_OUT_FRAC
    layers = []
    for l in range(L):
        s = {n: int(shifts[(n, l)]) for n in MATRICES}
        e_k, e_v = int(fmt["e_k"][l]), int(fmt["e_v"][l])
        layers.append(LayerSteps(
            rms_att=norm_step(fmt["f_g_rms_att_weight"][l], eps),
            wq=requant(s["wq"], N, f_qk, 16), wk=requant(s["wk"], N, f_qk, 16),
            wv=requant(s["wv"], N, e_v, 8),
            k_cache=k_cache_shift(f_qk, e_k), att=attention_step(f_qk, e_k, e_v, cfg.head_dim),
            wo=requant(s["wo"], nx.ATT_OUT_FRAC, f_x, 32),
            rms_ffn=norm_step(fmt["f_g_rms_ffn_weight"][l], eps),
            w1=requant(s["w1"], N, f_h, 16), w3=requant(s["w3"], N, f_h, 16),
            swiglu=swiglu_step(f_h),
            w2=requant(s["w2"], f_h, f_x, 32)))
    emb = int(shifts[("tok_embeddings", None)])
    wcls = int(shifts.get(("wcls", None), emb))
    return Steps(f_x, embed_shift(emb, f_x), tuple(layers),
                 norm_step(fmt["f_g_rms_final_weight"], eps), classifier_step(wcls))


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
