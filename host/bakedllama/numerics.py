"""The integer arithmetic of bakedllama: the one definition (golden model, gateware tables, 8B sim).

Every function here is exact integer arithmetic on numpy int64 arrays; floats appear only when
tables and bake-time constants are generated. Nothing else in the project re-implements these,
except the 8B runner's compiled hot path (llama8b/simd.c for matvec, llama8b/fastglue.py for
requantize, quantize_act and swiglu), which its tests hold to these functions.

Formats (a "frac" is the number of fractional bits of a fixed-point integer):
  weights      int{bits} symmetric, |q| <= 2^(bits-1)-1, per-group unsigned multipliers m (M_BITS)
               and a per-matrix shift: w = q * m * 2^-shift.
  activations  int8, |a| <= 127, quantized per vector at run time with a power-of-two shift
               (max-abs -> leading-one detect -> shift): a = v >> k, frac(a) = frac(v) - k.
  residual x   int16, frac f_x (bake-time calibrated), saturating adds.
  q, k, h      int16, frac f_qk / f_h (bake-time calibrated), saturating.
  KV cache     int8, per-layer frac e_k / e_v (bake-time calibrated), saturating.
  scores       Q8 (frac 8); exp output Q15 (1.0 = 32768); sigmoid Q15; cos/sin Q14; rsqrt Q22.
Rounding is round-half-up (add half, arithmetic shift right) everywhere: `round_shift`.
Which shift applies at which step (the composition of these formats) is bakedllama.steps': the
kernels that need a model's shifts (rmsnorm, attention_head, swiglu) take their step from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACT_MAX = 127  # int8 activations are symmetric: [-127, 127]
M_BITS = 9  # per-group weight multipliers: unsigned 9-bit (a DP16KD x9 lane; 0.28 bit/weight at g32)
INT16_MAX = 32767
SCORE_FRAC = 8  # attention scores and sampling logits, Q8
EXP_ONE = 1 << 15  # exp(0) in the Q15 exp output
EXP_IN_MAX = (1 << 12) - 1  # exp input (Q8) saturates at 16.0 - 1/256: exp(-16)*2^15 < 0.5
SIG_FRAC_IN = 6  # sigmoid table input resolution 1/64 ...
SIG_ENTRIES = 1024  # ... over [-8, 8)
ROPE_FRAC = 14  # cos/sin in Q14
RSQRT_FRAC = 22  # rsqrt table: 1/sqrt(mant) in Q22 for mant in [2^14, 2^16)
RSQRT_ENTRIES = 768  # indexed by (mant >> 6) - 256
U_FRAC = 15  # RMSNorm's unit-normalized value x/sqrt(sum x^2) in Q15
# softmax normalizer: floor(2^31 / sum(exp)). The sum is >= EXP_ONE (the max contributes 1.0), so
# the reciprocal has at most 17 bits and out x recip takes 2 MULT18X18D per vector lane instead of
# 4 (2^40 took 26 bits); the baked model's validation loss moved by +0.0004 nats (48 windows)
ATT_RECIP_BITS = 31
NORM_OUT_FRAC = 12  # RMSNorm output (before int8 quantization)
SCORE_SCALE_FRAC = 15  # the attention score scale 1/sqrt(head_dim) in Q15 (score_scale)
ATT_OUT_FRAC = 12  # attention output (before int8 quantization)


# ----------------------------------------------------------------------------- primitives
def round_shift(x, s):
    """x * 2^-s rounded half up, for integer x and integer shift s (s <= 0 shifts left)."""
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    if s.ndim == 0:
        s = int(s)
        if s <= 0:
            return x << -s
        return (x + (1 << (s - 1))) >> s
    if s.size and s.min() > 0:  # (the usual case, in fewer array passes than the general one)
        r = x + np.left_shift(1, s - 1)
        return np.right_shift(r, s, out=r)
    if s.size and s.max() <= 0:
        return x << -s
    pos = np.maximum(s, 0)
    half = np.where(pos > 0, np.left_shift(1, np.maximum(pos - 1, 0)), 0)
    return np.where(s > 0, (x + half) >> pos, x << np.maximum(-s, 0))


def saturate(x, bits: int):
    """Clamp to the signed `bits`-bit range."""
    lim = (1 << (bits - 1)) - 1
    return np.clip(x, -lim - 1, lim)


def bit_length(x):
    """Per-element bit length of non-negative integers (leading-one position + 1; 0 for 0)."""
    x = np.asarray(x, dtype=np.int64)
    if x.size and x.max() < (1 << 53):  # exact as float64: frexp's exponent is the bit length
        return np.frexp(x.astype(np.float64))[1].astype(np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    v = x.copy()
    for b in (32, 16, 8, 4, 2, 1):
        m = v >= (1 << b)
        out += np.where(m, b, 0)
        v = np.where(m, v >> b, v)
    return out + (v > 0)


# ----------------------------------------------------------------------------- weights
@dataclass
class QTensor:
    """A quantized matrix (or a stack of them): w[..., r, c] = q * m[..., r, c // group] * 2^-shift[...]."""

    q: np.ndarray  # int8 (..., rows, cols), |q| <= qmax
    m: np.ndarray  # uint16 storage of M_BITS-bit multipliers (..., rows, cols // group)
    shift: np.ndarray  # int32 (...,) one per matrix
    bits: int
    group: int

    @property
    def rows(self) -> int:
        return self.q.shape[-2]

    @property
    def cols(self) -> int:
        return self.q.shape[-1]

    def __getitem__(self, i) -> "QTensor":  # one matrix of a stack
        return QTensor(self.q[i], self.m[i], self.shift[i], self.bits, self.group)

    def dequantize(self) -> np.ndarray:
        m = np.repeat(self.m.astype(np.float64), self.group, axis=-1)
        sh = np.asarray(self.shift, dtype=np.float64)[..., None, None]
        return self.q * m * 2.0 ** -sh

    def storage_bits(self) -> int:
        return self.q.size * self.bits + self.m.size * M_BITS


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def quantize_matrix(w: np.ndarray, bits: int, group: int, clip_search: bool = True) -> QTensor:
    """Symmetric per-group quantization of one float matrix (rows, cols); group = cols is per row.

    Each group's scale is an M_BITS multiplier m times 2^-shift (one shift per matrix). With
    clip_search, m is the one among the clipping ratios 0.50..1.00 of max|w|/qmax (rounded to
    integers) that minimises the group's squared error; q = round(w / (m 2^-shift)) absorbs the
    multiplier's rounding. This is bake-time only: the integer arithmetic does not change."""
    if bits < 2 or bits > 8:
        raise ValueError(f"weight bits must be 2..8, got {bits}")
    w = np.asarray(w, dtype=np.float64)
    rows, cols = w.shape
    if group <= 0 or cols % group:
        raise ValueError(f"group {group} does not divide {cols} columns")
    qm = qmax(bits)
    g = w.reshape(rows, cols // group, group)
    scale = np.abs(g).max(axis=-1) / qm  # (rows, ngroups)
    smax = float(scale.max())
    shift = 0 if smax == 0.0 else int(math.floor(math.log2(((1 << M_BITS) - 1) / smax)))
    best_m, best_err = None, None
    for ratio in (np.linspace(0.5, 1.0, 26) if clip_search else [1.0]):
        m = np.clip(np.round(scale * ratio * 2.0**shift), 1, (1 << M_BITS) - 1)
        s = (m * 2.0**-shift)[..., None]
        err = ((np.clip(np.round(g / s), -qm, qm) * s - g) ** 2).sum(-1)
        if best_m is None:
            best_m, best_err = m, err
        else:
            better = err < best_err
            best_m, best_err = np.where(better, m, best_m), np.where(better, err, best_err)
    s = best_m * 2.0**-shift
    q = np.clip(np.round(g / s[..., None]), -qm, qm).astype(np.int8).reshape(rows, cols)
    return QTensor(q, best_m.astype(np.uint16), np.asarray(shift, dtype=np.int32), bits, group)


def quantize_stack(w: np.ndarray, bits: int, group: int) -> QTensor:
    """Quantize each matrix of a (n, rows, cols) stack on its own (one shift per matrix)."""
    parts = [quantize_matrix(wi, bits, group) for wi in w]
    return QTensor(np.stack([p.q for p in parts]), np.stack([p.m for p in parts]),
                   np.array([int(p.shift) for p in parts], dtype=np.int32), bits, group)


def matvec_acc_bits(bits: int, group: int, cols: int) -> int:
    """Signed accumulator width that can never overflow for this weight format."""
    partial = group * qmax(bits) * ACT_MAX
    total = partial * ((1 << M_BITS) - 1) * (cols // group)
    return int(total).bit_length() + 1


# ----------------------------------------------------------------------------- activations
def quantize_act(v):
    """Per-vector int8 quantization along the last axis with a power-of-two shift k >= 0.

    Returns (a int64 in [-127, 127], k int64 per vector): frac(a) = frac(v) - k."""
    v = np.asarray(v, dtype=np.int64)
    mx = np.abs(v).max(axis=-1)
    k = np.maximum(bit_length(mx) - 7, 0)
    a = np.clip(round_shift(v, k[..., None]), -ACT_MAX, ACT_MAX)
    return a, k


def matvec(w: QTensor, a):
    """acc[..., r] = sum_g m[r, g] * sum_{j in g} q[r, j] * a[..., j]   (exact integers).

    a: (..., cols) int8 values. The group partial sums are < 2^53, so float64 BLAS is exact."""
    a = np.asarray(a)
    rows, cols, G = w.rows, w.cols, w.group
    ng = cols // G
    qf = w.q.reshape(rows, ng, G).astype(np.float64)
    af = a.reshape(*a.shape[:-1], ng, G).astype(np.float64)
    partial = np.einsum("rgj,...gj->...rg", qf, af).astype(np.int64)
    return (partial * w.m.astype(np.int64)).sum(axis=-1)


def requantize(acc, shift, bits: int = 16):
    """Accumulator -> fixed point by a rounding shift, saturated to `bits`."""
    r = round_shift(acc, shift)  # (always a fresh array: it is clamped in place)
    if not isinstance(r, np.ndarray) or r.ndim == 0:
        return saturate(r, bits)
    lim = (1 << (bits - 1)) - 1
    np.minimum(r, lim, out=r)
    return np.maximum(r, -lim - 1, out=r)


# ----------------------------------------------------------------------------- RMSNorm
def rsqrt_table() -> np.ndarray:
    """1/sqrt(mant) in Q22 at the centre of each bucket of 64, for mant in [2^14, 2^16)."""
    centre = (np.arange(RSQRT_ENTRIES) + 256 + 0.5) * 64
    return np.round(2.0**RSQRT_FRAC / np.sqrt(centre)).astype(np.int64)


RSQRT_TABLE = rsqrt_table()


def rsqrt_parts(ss):
    """1/sqrt(ss) ~= r * 2^-(RSQRT_FRAC + k) for ss > 0: normalise ss by 4^k into [2^14, 2^16)."""
    ss = np.asarray(ss, dtype=np.int64)
    k = (bit_length(ss) - 15) // 2  # floor division: even shift 2k puts the leading one at bit 14/15
    mant = np.where(k >= 0, ss >> np.maximum(2 * k, 0), ss << np.maximum(-2 * k, 0))
    return RSQRT_TABLE[(mant >> 6) - 256], k


def norm_weight_q(g: np.ndarray) -> tuple[np.ndarray, int]:
    """RMSNorm gain g * sqrt(dim) as int16 with the largest frac that fits: (gq, f_g)."""
    g = np.asarray(g, dtype=np.float64) * math.sqrt(g.shape[-1])
    mx = float(np.abs(g).max()) or 1.0
    f_g = int(math.floor(math.log2(INT16_MAX / mx)))
    return np.clip(np.round(g * 2.0**f_g), -INT16_MAX, INT16_MAX).astype(np.int16), f_g


def rms_eps_int(eps: float, dim: int, f_x: int) -> int:
    return int(round(eps * dim * 2.0 ** (2 * f_x)))


def rmsnorm(x, gq, step):
    """x (..., dim) int16 frac f_x -> x / rms(x) * g, frac NORM_OUT_FRAC (int64).

    gq: the int16 gain; step (steps.NormStep): eps_int and the two rounding shifts."""
    x = np.asarray(x, dtype=np.int64)
    ss = (x * x).sum(axis=-1) + step.eps_int  # (...,)
    r, k = rsqrt_parts(np.maximum(ss, 1))
    u = round_shift(x * r[..., None], step.u_shift(k)[..., None])  # x/sqrt(ss), Q15
    return round_shift(u * np.asarray(gq, dtype=np.int64), step.out)


# ----------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Per-pair inverse frequencies, with Llama 3.1's frequency scaling when `scaling` is given."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling:
        factor = scaling["factor"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


def rope_table(positions, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin in Q14 for each position: (len(positions), head_dim/2) int16."""
    ang = np.outer(np.asarray(positions, dtype=np.float64), inv_freq)
    one = 1 << ROPE_FRAC
    return (np.round(np.cos(ang) * one).astype(np.int16), np.round(np.sin(ang) * one).astype(np.int16))


def rope(v, cos, sin):
    """Rotate interleaved pairs (2i, 2i+1) of v (..., n_heads, head_dim) by Q14 cos/sin (head_dim/2,)."""
    v = np.asarray(v, dtype=np.int64)
    a, b = v[..., 0::2], v[..., 1::2]
    c, s = np.asarray(cos, dtype=np.int64), np.asarray(sin, dtype=np.int64)
    out = np.empty_like(v)
    out[..., 0::2] = round_shift(a * c - b * s, ROPE_FRAC)
    out[..., 1::2] = round_shift(a * s + b * c, ROPE_FRAC)
    return saturate(out, 16)


# ----------------------------------------------------------------------------- softmax
def exp_tables() -> tuple[np.ndarray, np.ndarray]:
    """exp(-d) for d in Q8, split as d = 16*hi + lo: T_hi[hi] = e^(-hi/16), T_lo[lo] = e^(-lo/256), Q15."""
    hi = np.round(EXP_ONE * np.exp(-np.arange(256) / 16.0)).astype(np.int64)
    lo = np.round(EXP_ONE * np.exp(-np.arange(16) / 256.0)).astype(np.int64)
    return hi, lo


EXP_HI, EXP_LO = exp_tables()


def exp_neg(d):
    """exp(-d) in Q15 for d >= 0 in Q8; 0 beyond EXP_IN_MAX."""
    d = np.asarray(d, dtype=np.int64)
    dc = np.clip(d, 0, EXP_IN_MAX)
    e = round_shift(EXP_HI[dc >> 4] * EXP_LO[dc & 15], 15)
    return np.where(d > EXP_IN_MAX, 0, e)


def score_scale(head_dim: int) -> int:
    """1/sqrt(head_dim) in Q15 (SCORE_SCALE_FRAC)."""
    return int(round(2.0**SCORE_SCALE_FRAC / math.sqrt(head_dim)))


def attention_head(q8, kq, k8, v8, step, mask=None):
    """One head at one position over T cached positions.

    q8 (..., hd) int8, quantized with shift kq (per vector); k8, v8 (..., T, hd) int8 cache rows;
    step (steps.AttentionStep): the score scale, the score shift for kq, the output shift.
    mask (..., T) bool, optional: the positions a query sees (several positions of one sequence
    at once, causally); the others get weight 0 and do not enter the max, exactly as if they
    were not there. Returns the head output (..., hd), frac ATT_OUT_FRAC."""
    # the integer products as float BLAS products, exact: |q k| <= 127 * 128 per term, so the dot
    # (head_dim terms) is below 2^24 for head_dim <= 1032 (float32), and the weighted sum of v
    # (Q15 weights <= 2^15 times |v| <= 128, T terms) below 2^53 for any T < 2^31 (float64)
    k8 = np.asarray(k8)
    head_dim = k8.shape[-1]
    dt = np.float32 if head_dim * 127 * 128 < (1 << 24) else np.float64
    dot = np.matmul(k8.astype(dt), np.asarray(q8, dtype=dt)[..., None])[..., 0].astype(np.int64)
    s = round_shift(dot * step.scale, step.score_shift(kq)[..., None])  # Q8 scores
    if mask is not None:
        s = np.where(mask, s, np.iinfo(np.int64).min // 4)  # exp_neg(max - s) = 0 there
    e = exp_neg(s.max(axis=-1, keepdims=True) - s)  # Q15 weights, the max is exactly 1.0
    total = e.sum(axis=-1)
    out = np.matmul(e[..., None, :].astype(np.float64),
                    np.asarray(v8, dtype=np.float64))[..., 0, :].astype(np.int64)
    recip = (1 << ATT_RECIP_BITS) // total
    return round_shift(out * recip[..., None], step.out)


# ----------------------------------------------------------------------------- SiLU
def sigmoid_table() -> np.ndarray:
    x = (np.arange(SIG_ENTRIES) - SIG_ENTRIES // 2) / float(1 << SIG_FRAC_IN)
    return np.round(EXP_ONE / (1.0 + np.exp(-x))).astype(np.int64)


SIGMOID_TABLE = sigmoid_table()


def swiglu(h1, h3, step):
    """silu(h1) * h3 for int16 h1, h3 of frac f_h -> int16 frac f_h.

    step (steps.SwiGLUStep): the shifts of h1 to the table index and of silu * h3."""
    h1 = np.asarray(h1, dtype=np.int64)
    idx = np.clip(round_shift(h1, step.index) + SIG_ENTRIES // 2, 0, SIG_ENTRIES - 1)
    silu = round_shift(h1 * SIGMOID_TABLE[idx], 15)  # the sigmoid is Q15: silu has h1's frac
    return saturate(round_shift(silu * np.asarray(h3, dtype=np.int64), step.out), 16)


# ----------------------------------------------------------------------------- sampling
def argmax(logits) -> np.ndarray:
    """Greedy choice along the last axis; the lowest index wins ties (np.argmax does exactly that)."""
    return np.argmax(np.asarray(logits), axis=-1)


class XorShift32:
    """Marsaglia xorshift32 (13, 17, 5); the state is never 0."""

    def __init__(self, seed: int):
        s = (int(seed) * 2654435761 + 0x6D2B79F5) & 0xFFFFFFFF
        self.state = s or 0x9E3779B9

    def next(self) -> int:
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x


def temperature_q8(temperature: float) -> int:
    """1/T in Q8 (the integer the hardware receives); T must be > 0."""
    if not temperature > 0:
        raise ValueError("temperature must be > 0 (use greedy for 0)")
    return max(1, min(65535, int(round(256.0 / temperature))))


def sample(logit_q8, inv_temp_q8: int, rng: XorShift32, top_k: int = 0) -> int:
    """Seeded integer sampling from Q8 logits (1-D): exp table weights, one 32-bit draw.

    Weights w_i = exp_neg(max - t_i) with t = logit * inv_temp (Q8); the draw r picks the first i
    whose running sum exceeds (r * sum) >> 32. With top_k > 0 only the k largest t (lowest index on
    ties) keep their weight."""
    csum = np.cumsum(sample_weights(logit_q8, inv_temp_q8, top_k))
    target = (rng.next() * int(csum[-1])) >> 32
    return int(np.searchsorted(csum, target, side="right"))


def sample_weights(logit_q8, inv_temp_q8: int, top_k: int = 0) -> np.ndarray:
    """The integer weights `sample` draws from (int64, 1-D): exp_neg(max - t), top-k applied."""
    t = round_shift(np.asarray(logit_q8, dtype=np.int64) * inv_temp_q8, 8)
    w = exp_neg(t.max() - t)
    if 0 < top_k < len(t):
        order = np.lexsort((np.arange(len(t)), -t))  # by t descending, then index ascending
        keep = np.zeros(len(t), dtype=bool)
        keep[order[:top_k]] = True
        w = np.where(keep, w, 0)
    return w.astype(np.int64)


def draw_count(base: int, weight: int, total: int) -> int:
    """How many of the 2^32 draws r make `sample` pick the token whose weights' running sum before
    it is `base` and whose weight is `weight` (total: the sum of all weights): the r with
    base <= (r * total) >> 32 < base + weight. Its probability is exactly this / 2^32."""
    def below(c):  # r with (r * total) >> 32 < c, i.e. r * total < c * 2^32
        return min(1 << 32, -(-(c << 32) // total))
    return below(base + weight) - below(base)


def sample_counts(logit_q8, inv_temp_q8: int, top_k: int = 0) -> np.ndarray:
    """The exact distribution of `sample` as integer counts (object array of Python ints, one per
    token, summing to 2^32): token i is drawn by draw_count(c_{i-1}, w_i, total) of the 2^32
    values of the PRNG's draw."""
    w = [int(x) for x in sample_weights(logit_q8, inv_temp_q8, top_k)]
    total = sum(w)
    out, base = [], 0
    for x in w:
        out.append(draw_count(base, x, total))
        base += x
    return np.array(out, dtype=object)
