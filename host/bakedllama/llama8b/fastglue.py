"""The vector steps between the 8B runner's matrix products, compiled (numba) and fused.

A compiled copy of numerics' arithmetic, like simd.c for matvec: numba cannot run the numpy
array code of numerics at this speed, so the same integer steps are written here once more, with
numerics' constants and tables, and tests/test_llama8b_fastglue.py holds every function to its
numerics original. The golden model and the gateware tables use numerics only.

bakedllama.numerics stays the one definition of the arithmetic; these are the same integers in
one pass over the data instead of numpy's several (each numpy step of numerics.requantize,
quantize_act, swiglu reads and writes a whole int64 array: at a prompt's 64 x 14,336 that is the
prefill's largest cost after the weights). tests/test_llama8b_fastglue.py holds each to its
numerics original on random values and at the edges (rounding ties, saturation, shifts <= 0).

    requantize(acc (T, R) int64, shift (T,) int64, bits) -> (T, R) int64
    quantize_act(v (T, N) int64) -> (a (T, N) int64, k (T,) int64)
    swiglu_act(h1, h3 (T, H) int64, step) -> (a, k): quantize_act(numerics.swiglu(h1, h3, step))
    residual_add(x (T, R) int64, acc (T, R) int64, shift (T,), bits) -> x + requantize, saturated
        to 16 bits, in place

Rows run in parallel (prange) when an array is large enough to pay for waking the threads."""

from __future__ import annotations

import types
from functools import lru_cache

import numpy as np

from bakedllama import numerics as nx

PARALLEL_FROM = 1 << 16  # elements: smaller arrays run on the calling thread
# numerics' formats, not literals: int8 activations, the int16 saturation, the Q15 sigmoid
ACT = nx.ACT_MAX
ACT_BITS = nx.ACT_MAX.bit_length()  # quantize_act's shift: bit_length(max |v|) - ACT_BITS
I16 = nx.INT16_MAX
SIG_FRAC = nx.EXP_ONE.bit_length() - 1  # the sigmoid table's Q15


@lru_cache(maxsize=None)
def _kernels():
    from numba import njit, prange

    def rs(x, s):  # numerics.round_shift for one integer
        if s <= 0:
            return x << -s
        return (x + (np.int64(1) << (s - 1))) >> s

    def clamp(v, lo, hi):
        return lo if v < lo else (hi if v > hi else v)

    def quant_row(v, a):  # numerics.quantize_act of one row into a; returns its shift
        mx = np.int64(0)
        for j in range(v.shape[0]):
            x = v[j]
            x = -x if x < 0 else x
            if x > mx:
                mx = x
        n = 0  # bit length of mx
        while mx >> n:
            n += 1
        k = n - ACT_BITS if n > ACT_BITS else 0
        for j in range(v.shape[0]):
            a[j] = clamp(rs(v[j], k), -ACT, ACT)
        return k

    rs, clamp = njit(inline="always")(rs), njit(inline="always")(clamp)
    quant_row = njit(inline="always")(quant_row)

    def body_requant(acc, shift, lo, hi, out):
        T, R = acc.shape
        for t in prange(T):
            for r in range(R):
                out[t, r] = clamp(rs(acc[t, r], shift[t]), lo, hi)

    def body_residual(x, acc, shift, lo, hi):
        T, R = acc.shape
        for t in prange(T):
            for r in range(R):
                x[t, r] = clamp(x[t, r] + clamp(rs(acc[t, r], shift[t]), lo, hi), -I16 - 1, I16)

    def body_quant(v, a, k):
        for t in prange(v.shape[0]):
            k[t] = quant_row(v[t], a[t])

    def body_swiglu(h1, h3, index, out_shift, table, half, a, k):
        T, N = h1.shape
        top = table.shape[0] - 1
        for t in prange(T):
            hb = np.empty(N, np.int64)
            for j in range(N):
                x = h1[t, j]
                silu = rs(x * table[clamp(rs(x, index) + half, 0, top)], SIG_FRAC)
                hb[j] = clamp(rs(silu * h3[t, j], out_shift), -I16 - 1, I16)
            k[t] = quant_row(hb, a[t])

    def variant(f, suffix: str):
        # numba's cache keys a function by its qualified name and line, not by its compile
        # options: the serial and the parallel build of one body must not share a name, or one
        # loads the other's machine code (the "serial" one then waited at OpenMP barriers)
        g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + suffix, f.__defaults__,
                               f.__closure__)
        g.__qualname__ = f.__qualname__ + suffix
        return g

    out = {}
    for name, f in (("requant", body_requant), ("residual", body_residual), ("quant", body_quant),
                    ("swiglu", body_swiglu)):
        out[name] = (njit(cache=True, nogil=True, boundscheck=False)(variant(f, "_serial")),
                     njit(cache=True, nogil=True, boundscheck=False, parallel=True)(variant(f, "_par")))
    return out


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel, serial and parallel, before anything is
    timed: a first call otherwise costs a decode step its load time."""
    x = np.zeros((1, 4), np.int64)
    sh = np.zeros(1, np.int64)
    for name in ("requant", "residual", "quant", "swiglu"):
        for f in _kernels()[name]:
            if name == "requant":
                f(x, sh, -1, 1, np.empty_like(x))
            elif name == "residual":
                f(np.zeros_like(x), x, sh, -1, 1)
            elif name == "quant":
                f(x, np.empty_like(x), np.empty(1, np.int64))
            else:
                f(x, x, 0, 0, nx.SIGMOID_TABLE, nx.SIG_ENTRIES // 2, np.empty_like(x),
                  np.empty(1, np.int64))


def _pick(name: str, size: int):
    serial, parallel = _kernels()[name]
    return parallel if size >= PARALLEL_FROM else serial


def _rows(x) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.int64)


def _shifts(shift, T: int) -> np.ndarray:
    # a writable copy: a read-only array is another numba type (one more compile at first use)
    s = np.array(np.broadcast_to(np.asarray(shift, dtype=np.int64).reshape(-1), (T,)))
    if s.max(initial=0) > 62 or s.min(initial=0) < -62:
        raise ValueError(f"shift out of range: {s.min()}..{s.max()}")
    return s


def requantize(acc, shift, bits: int = 16) -> np.ndarray:
    """numerics.requantize(acc, shift[:, None], bits) for acc (T, R), one shift per row."""
    acc = _rows(acc)
    T = acc.shape[0]
    lim = (1 << (bits - 1)) - 1
    out = np.empty_like(acc)
    _pick("requant", acc.size)(acc, _shifts(shift, T), -lim - 1, lim, out)
    return out


def residual_add(x: np.ndarray, acc, shift, bits: int) -> None:
    """x := saturate(x + numerics.requantize(acc, shift[:, None], bits), 16), in place; x (T, R)
    int64 contiguous (a column slice of the residual is copied back by the caller)."""
    acc = _rows(acc)
    if x.dtype != np.int64 or not x.flags.c_contiguous or x.shape != acc.shape:
        raise ValueError("residual_add needs a contiguous int64 x of the accumulators' shape")
    lim = (1 << (bits - 1)) - 1
    _pick("residual", acc.size)(x, acc, _shifts(shift, acc.shape[0]), -lim - 1, lim)


def quantize_act(v) -> tuple[np.ndarray, np.ndarray]:
    """numerics.quantize_act for v (T, N): per row, a int64 in [-127, 127] and its shift k."""
    v = _rows(v)
    a = np.empty_like(v)
    k = np.empty(v.shape[0], np.int64)
    _pick("quant", v.size)(v, a, k)
    return a, k


def swiglu_act(h1, h3, step) -> tuple[np.ndarray, np.ndarray]:
    """numerics.quantize_act(numerics.swiglu(h1, h3, step)) for (T, H) rows, in one pass."""
    h1, h3 = _rows(h1), _rows(h3)
    if h1.shape != h3.shape:
        raise ValueError("h1 and h3 differ in shape")
    a = np.empty_like(h1)
    k = np.empty(h1.shape[0], np.int64)
    _pick("swiglu", h1.size)(h1, h3, int(step.index), int(step.out), nx.SIGMOID_TABLE,
                             nx.SIG_ENTRIES // 2, a, k)
    return a, k
