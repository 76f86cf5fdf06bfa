"""numerics.quantize_matrix at the speed of the data: the same bytes, compiled (numba), parallel.

`numerics.quantize_matrix` is the definition (the spec); this module computes exactly the same
q, m and shift, and is tested equal to it on random matrices of the 8B's shapes and on whole
caches (tests/test_llama8b_cache.py). It exists because the spec's numpy form evaluates each of
the 26 clipping ratios over float64 temporaries of the whole matrix (~35 minutes and ~20 GB for
Llama 3.1 8B); here each group is searched in registers, rows in parallel.

Why it is the same, step by step (the spec's expression, then what is done here):
  scale = max|g| / qmax                 the same max and the same float64 division;
  shift from max(scale)                 the same Python expression (`shift_for`);
  m = clip(round(scale r 2^shift))      the same float64 products and round-half-even (rint);
  err = sum((clip(round(g / s)) s - g)^2): where it decides, computed as the spec computes it
      (true division; (q s - g)^2 unfused: numba without fastmath does not contract; numpy's
      pairwise summation, 8 accumulators, blocks of 128, halves rounded to multiples of 8,
      reproduced by `_pairwise`); elsewhere only bounded (below);
  best: the first ratio, replaced only where err is strictly smaller (np.where(err < best));
      a ratio whose m equals the previous ratio's gives the same err and is skipped. Each err
      is first computed approximately (any order of additions, q by the reciprocal) with a
      bound B on its distance to the spec's value; the winner is decided on those bounds, and
      only when two candidates' bounds overlap does the spec's own arithmetic (true division,
      unfused, pairwise) decide between them, smallest ratio first. Ratios are visited from the
      largest down; once the largest element's own clipping error (max|g| - qmax s)^2 exceeds a
      visited candidate's upper bound, this ratio and every smaller one (smaller s) lose;
  q = clip(round(g / s_best)): as rint(g * fl(1/s)), within a few ulps of fl(g / s) (< 2^-50
      relative): the same integer unless g / s lies that near a half-integer; a group holding
      such an element is redone with the true division.
Float32 w in groups of G = 32 (the 8B schemes' 3/4/6-bit groups; |shift| <= SHIFT32) is searched
in float32 first (`_search32`: half the vector work of float64), each step still the spec's:
  |g| is exact in float32, and so are s = m 2^-shift (9-bit m) and q s (q m < 2^16); for
      |shift| <= 40, s^2 and g^2 stay normal and finite (an underflowed tiny term errs by < 2^-149,
      far inside the bound's s^2 part);
  q by t = fl32(|g| inv), inv = fl32(fl64(1/s)): |t - g/s| <= 2^-22.98 g/s. It is the spec's q
      unless g/s lies that near a half-integer k + 1/2 below qmax, where the term moves by
      2 s^2 |g/s - k - 1/2| < qmax s^2 2^-21.98: TERM_TOL32 = 2^-21 per element, / (qmax s^2);
  each term (q s - |g|)^2 is otherwise the exact square rounded at most twice (3 2^-24), and G of
      them summed in any order in float32 add (G - 1) 2^-24: within G err 2^-22 (SUM_TOL32);
      the float64 bound arithmetic (B, A -+ B) rounds far inside those margins;
  a group whose float32 bounds do not single out one candidate is bounded again in float64
      (TERM_TOL, SUM_TOL, as above), then decided by the spec's arithmetic if still needed;
  candidates are computed four at a time, the clipping cut tested per four (a candidate past
      the cut enters the decision with valid bounds; the cut only saves work), and the cut uses
      fl(scale qmax)(1 - 2^-50) <= max|g| (scale = fl(max|g| / qmax)): a weaker cut, as sound;
  the final q by the same t, a group with a quotient within TIE_TOL32 = 2^-21 t of a
      half-integer (2x the distance t can be from fl(g / s)) redone with the true division.
The float inputs may be float32 (a checkpoint's bf16 / f16 / f32 read as float32): each element is
widened to float64 exactly, as np.asarray(w, float64) does."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from bakedllama import numerics as nx

RATIOS = np.linspace(0.5, 1.0, 26)  # numerics.quantize_matrix's clipping ratios
TERM_TOL = 2.0 ** -40  # per element, / s^2: a quotient near a half-integer rounded the other way
SUM_TOL = 2.0 ** -50  # per element, relative: another order of additions
TIE_TOL = 2.0 ** -48  # relative distance to a half-integer below which the true division decides
# the same in float32 (group G, float32 w, |shift| <= SHIFT32): TERM_TOL32 per element / (qm s^2)
TERM_TOL32, SUM_TOL32, TIE_TOL32 = 2.0 ** -21, 2.0 ** -22, 2.0 ** -21
G = 32  # the group width searched in float32 (the 8B schemes' 3/4/6-bit groups)
SHIFT32 = 40  # float32 holds s, s^2, w^2 of such matrices without overflow or underflow
TOL = (TERM_TOL, SUM_TOL, TIE_TOL, TERM_TOL32, SUM_TOL32, TIE_TOL32)


def shift_for(smax: float) -> int:
    """numerics.quantize_matrix's per-matrix shift from the largest group scale."""
    return 0 if smax == 0.0 else int(math.floor(math.log2(((1 << nx.M_BITS) - 1) / smax)))


@njit(cache=True, nogil=True)
def _leaf(a, lo, n):
    """numpy's pairwise_sum for n <= 128: 8 accumulators, then the rest in order."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    end = n - n % 8
    while i < end:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True, nogil=True)
def _pairwise(a, n):
    """numpy's pairwise sum of a[:n] (float64): the same tree of additions. Above 128 elements
    numpy recurses on halves rounded down to a multiple of 8; here the recursion is an explicit
    stack (numba's cache cannot hold a self-recursive function)."""
    los = np.empty(192, np.int64)
    ns = np.empty(192, np.int64)  # n of a task; -1: add the top two values
    vals = np.empty(64, np.float64)
    top, nv = 1, 0
    los[0], ns[0] = 0, n
    while top:
        top -= 1
        lo, m = los[top], ns[top]
        if m < 0:
            nv -= 1
            vals[nv - 1] = vals[nv - 1] + vals[nv]
        elif m <= 128:
            vals[nv] = _leaf(a, lo, m)
            nv += 1
        else:
            m2 = m // 2
            m2 -= m2 % 8
            los[top], ns[top] = 0, -1  # then add: left + right
            los[top + 1], ns[top + 1] = lo + m2, m - m2  # then the right half
            los[top + 2], ns[top + 2] = lo, m2  # the left half first
            top += 3
    return vals[0]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _group_amax(w, group, out):
    """max |w| per group, in w's own type (a max is exact in any order; w finite)."""
    rows, cols = w.shape
    for r in prange(rows):
        for j in range(cols // group):
            a = abs(w[r, j * group])
            for i in range(j * group + 1, (j + 1) * group):
                a = max(a, abs(w[r, i]))
            out[r, j] = a


def group_scales(w: np.ndarray, group: int, qm: float) -> np.ndarray:
    """numerics.quantize_matrix's scale: max |w| / qmax per group, (rows, cols // group) float64
    (the division by numpy, correctly rounded: fastmath would multiply by a reciprocal)."""
    amax = np.empty((w.shape[0], w.shape[1] // group), w.dtype)
    _group_amax(w, group, amax)
    return amax.astype(np.float64) / qm


# The kernels below see a row as (groups, group) and index it [j, i] with loop variables only:
# numba then knows each index is >= 0 (no negative-index wrap-around, which turns vector loads
# into gathers) and no slice (a reference count) is made per group.


@njit(fastmath=True, cache=True, nogil=True)
def _abs_max(w, r, j, n, a):
    """a[j] = |w[r, j]| in a's type (exact: float32 -> float32 or -> float64); returns their max
    as float64 (exact in any order)."""
    amax = a.dtype.type(0)
    for i in range(n):
        a[j, i] = abs(a.dtype.type(w[r, j, i]))
        amax = max(amax, a[j, i])
    return np.float64(amax)


@njit(fastmath=True, cache=True, nogil=True)
def _err_approx(a, j, n, s, qm):
    """The squared error of group a[j] (w or |w|, float32 or float64) at step s, roughly, in
    float64: any order of additions, q by the reciprocal. Within n (s^2 TERM_TOL + err SUM_TOL)
    of the spec's value."""
    inv = 1.0 / s
    acc = 0.0
    for i in range(n):
        x = abs(np.float64(a[j, i]))
        x = min(np.rint(x * inv), qm) * s - x
        acc += x * x
    return acc


@njit(fastmath=True, cache=True, nogil=True)
def _err32(w, r, j, s, inv, qm):
    """The squared error of group w[r, j] (float32, G wide) at step s, roughly, in float32 (half
    the vector work of float64): s, inv = fl32(1/s), qm float32. Within
    G (qm s^2 TERM_TOL32 + err SUM_TOL32) of the spec's value (the module docstring says why)."""
    acc = np.float32(0)
    for i in range(G):  # a constant trip count: straight-line vector code
        x = abs(w[r, j, i])
        x = min(np.rint(x * inv), qm) * s - x
        acc += x * x
    return np.float64(acc)


@njit(cache=True, nogil=True)
def _err_exact(a, j, n, s, qm, e):
    """The spec's squared error of group a[j] (w or |w|, widened to float64 exactly) at step s: true
    division, unfused, numpy's pairwise sum."""
    for i in range(n):
        x = abs(np.float64(a[j, i]))
        x = min(np.rint(x / s), qm) * s - x
        e[i] = x * x
    return _pairwise(e, n)


@njit(cache=True, nogil=True)
def _choose(a, j, n, ms, lo, nc, best_hi, down, qm, refine, term_tol, sum_tol, e):
    """The spec's winner among the nc candidates ms (distinct m, largest first), whose errors
    are bounded by lo[k] <= err_k and by best_hi >= the smallest: those whose lower bound is
    above best_hi lose. More than one left: (refine) float64 bounds, then the spec's own
    arithmetic in the spec's order (smallest ratio first, replaced only where strictly smaller)."""
    best_m, n_in = 0.0, 0
    for k in range(nc):
        if lo[k] <= best_hi:
            n_in += 1
            best_m = ms[k]
    if n_in > 1 and refine:
        hi2 = np.inf
        for k in range(nc):
            if lo[k] <= best_hi:
                s = ms[k] * down
                A = _err_approx(a, j, n, s, qm)
                B = n * (s * s * term_tol + A * sum_tol)
                lo[k] = A - B
                hi2 = min(hi2, A + B)
            else:
                lo[k] = np.inf
        best_hi, n_in = hi2, 0
        for k in range(nc):
            if lo[k] <= best_hi:
                n_in += 1
                best_m = ms[k]
    if n_in > 1:  # too close to call on the bounds: the spec's arithmetic decides
        best_err = np.inf
        for k in range(nc - 1, -1, -1):
            if lo[k] <= best_hi:
                err = _err_exact(a, j, n, ms[k] * down, qm, e)
                if err < best_err:
                    best_m, best_err = ms[k], err
    return best_m


@njit(cache=True, nogil=True)
def _q_exact(w, r, j, n, s, qm, q_out):
    """q_out[r, j] = sign(w) min(rint(|w| / s), qm), the spec's true division."""
    for i in range(n):
        x = np.float64(w[r, j, i])
        q = np.int8(min(np.rint(abs(x) / s), qm))
        q_out[r, j, i] = q if x >= 0 else -q


@njit(cache=True, nogil=True)
def _q_group(w, r, j, n, a, s, qm, tie_tol, q_out):
    """q_out[r, j] = sign(w) min(rint(|w| / s), qm), q by the reciprocal (in a's type); a group
    with a quotient within tie_tol (relative) of a half-integer, where the true division might
    round the other way, is redone by the true division."""
    ty = a.dtype.type
    si, qt, half, tol = ty(1.0 / s), ty(qm), ty(0.5), ty(tie_tol)
    near = 0
    for i in range(n):
        t = a[j, i] * si
        q = np.rint(t)
        near += abs(abs(t - q) - half) <= tol * t
        qi = np.int8(min(q, qt))
        q_out[r, j, i] = qi if w[r, j, i] >= 0 else -qi
    if near:
        _q_exact(w, r, j, n, s, qm, q_out)


@njit(parallel=True, cache=True, nogil=True)
def _search(w, scale, qm, mmax, up, down, ratios, tol, q_out, m_out):
    """w, q_out: (rows, groups, group); scale, m_out: (rows, groups). Errors bounded in float64."""
    rows, ng, group = w.shape
    nr = ratios.shape[0]
    term_tol, sum_tol, tie_tol = tol[0], tol[1], tol[2]
    for r in prange(rows):
        a = np.empty((ng, group), np.float64)
        e = np.empty(group, np.float64)
        ms = np.empty(nr, np.float64)
        lo = np.empty(nr, np.float64)
        for j in range(ng):
            amax = _abs_max(w, r, j, group, a)
            # the distinct m of the ratios, largest ratio first (m never decreases with the
            # ratio; an equal m has an equal error and never replaces the earlier one), each
            # error within +-B of the spec's. Below a ratio whose largest element alone errs more
            # than a candidate's whole error can, no ratio can win (their steps only shrink).
            nc, best_hi = 0, np.inf
            for kk in range(nr):
                m = min(max(np.rint(scale[r, j] * ratios[nr - 1 - kk] * up), 1.0), mmax)
                if nc and m == ms[nc - 1]:
                    continue
                s = m * down
                d = amax - qm * s  # (q s <= qm s: that element's |q s - w| >= d)
                if d > 0.0 and d * d * (1.0 - (group + 3) * 2.0 ** -52) > best_hi:
                    break
                A = _err_approx(a, j, group, s, qm)
                B = group * (s * s * term_tol + A * sum_tol)
                ms[nc], lo[nc] = m, A - B
                best_hi = min(best_hi, A + B)
                nc += 1
            best_m = _choose(a, j, group, ms, lo, nc, best_hi, down, qm, False, term_tol,
                             sum_tol, e)
            m_out[r, j] = np.uint16(best_m)
            _q_group(w, r, j, group, a, best_m * down, qm, tie_tol, q_out)


@njit(cache=True, nogil=True)
def _q_row32(w, r, m, down, inv32, qm, tie_tol, q_out):
    """q_out[r] = sign(w) min(rint(|w| / s), qm) for a float32 row in groups of G (s = m down),
    q by the float32 reciprocal inv32[m] = fl32(1/s); a group with a quotient within tie_tol
    (relative) of a half-integer, where the true division might round the other way, is redone
    by the true division."""
    qt, half, tol = np.float32(qm), np.float32(0.5), np.float32(tie_tol)
    for j in range(w.shape[1]):
        si = inv32[m[r, j]]
        near = 0
        for i in range(G):
            x = w[r, j, i]
            t = abs(x) * si
            q = np.rint(t)
            near += abs(abs(t - q) - half) <= tol * t
            qf = min(q, qt)
            q_out[r, j, i] = np.int8(qf if x >= 0 else -qf)
        if near:
            _q_exact(w, r, j, G, m[r, j] * down, qm, q_out)


def _steps32(down: float, mmax: int, qm: float, term32: float):
    """Per m = 0..mmax: fl32(s), fl32(1/s) (as np.float32(m down), np.float32(1.0 / (m down))
    would compute them) and G qm s^2 TERM_TOL32 (the q-rounding part of the float32 bound)."""
    s = np.arange(mmax + 1) * down
    with np.errstate(divide="ignore"):
        inv = (1.0 / s).astype(np.float32)
    return s.astype(np.float32), inv, G * (s * s * (term32 * qm))


@njit(parallel=True, cache=True, nogil=True)
def _search32(w, scale, qm, mmax, up, down, ratios, tol, s32, inv32, bq32, q_out, m_out):
    """_search for float32 w in groups of G: each candidate's error first bounded in float32
    (tol[3:5]; s, 1/s and the q-rounding bound read from tables by m), four candidates at a
    time (independent work in flight); where that cannot decide, in float64 (tol[0:2]), then
    exactly. q by a float32 reciprocal (tol[5]), near a half-integer by the true division."""
    rows, ng, _ = w.shape
    nr = ratios.shape[0]
    term_tol, sum_tol, tie32 = tol[0], tol[1], tol[5]
    bsum = G * tol[4]
    qm32 = np.float32(qm)
    clip = 1.0 - (G + 3) * 2.0 ** -52
    desc = np.empty(nr + 3, np.float64)  # largest first, the smallest repeated (padding)
    for k in range(nr + 3):
        desc[k] = ratios[max(nr - 1 - k, 0)]
    nb = min(rows, 256)  # row blocks (a task each): the buffers are made once per block
    for b in prange(nb):
        e = np.empty(G, np.float64)
        ms = np.empty(nr + 3, np.float64)  # the distinct m, largest first (+ padding)
        mi = np.empty(nr + 3, np.uint64)  # (unsigned indices: no negative-index wrap-around)
        lo = np.empty(nr + 3, np.float64)
        for r in range(b * rows // nb, (b + 1) * rows // nb):
            for j in range(ng):
                sc = scale[r, j]
                # the m of the ratios, largest first, each once (a repeat would only tie with
                # itself and go to _choose): where the ratios' steps in m are >= 1.2, all differ
                if sc * up >= 60.0:
                    for k in range(nr + 3):
                        m = min(max(np.rint(sc * desc[k] * up), 1.0), mmax)
                        ms[k], mi[k] = m, np.uint64(m)
                    nc = nr
                else:  # m never decreases with the ratio: repeats are adjacent
                    nc = 0
                    for k in range(nr):
                        m = min(max(np.rint(sc * desc[k] * up), 1.0), mmax)
                        ms[nc] = m
                        nc += nc == 0 or m != ms[nc - 1]
                    for k in range(nc, nc + 3):
                        ms[k] = ms[nc - 1]
                    for k in range(nc + 3):
                        mi[k] = np.uint64(ms[k])
                # Below a ratio whose largest element alone errs more than a candidate's whole
                # error can, no ratio can win (their steps only shrink): checked per four.
                amax = sc * qm * (1.0 - 2.0 ** -50)  # <= max |w| (sc = fl(max |w| / qm))
                best_hi, kn = np.inf, nc
                for k in range(0, nc, 4):
                    d = amax - qm * (ms[k] * down)
                    if d > 0.0 and d * d * clip > best_hi:
                        kn = k
                        break
                    i0, i1, i2, i3 = mi[k], mi[k + 1], mi[k + 2], mi[k + 3]
                    A0 = _err32(w, r, j, s32[i0], inv32[i0], qm32)
                    A1 = _err32(w, r, j, s32[i1], inv32[i1], qm32)
                    A2 = _err32(w, r, j, s32[i2], inv32[i2], qm32)
                    A3 = _err32(w, r, j, s32[i3], inv32[i3], qm32)
                    B0, B1 = bq32[i0] + A0 * bsum, bq32[i1] + A1 * bsum
                    B2, B3 = bq32[i2] + A2 * bsum, bq32[i3] + A3 * bsum
                    lo[k], lo[k + 1], lo[k + 2], lo[k + 3] = A0 - B0, A1 - B1, A2 - B2, A3 - B3
                    best_hi = min(best_hi, min(min(A0 + B0, A1 + B1), min(A2 + B2, A3 + B3)))
                nc = kn  # (the padding repeats the last candidate: the same bounds)
                best_m, n_in = 0.0, 0
                for k in range(nc):
                    if lo[k] <= best_hi:
                        n_in += 1
                        best_m = ms[k]
                if n_in > 1:  # too close to call in float32
                    best_m = _choose(w[r], j, G, ms, lo, nc, best_hi, down, qm, True, term_tol,
                                     sum_tol, e)
                m_out[r, j] = np.uint16(best_m)
            _q_row32(w, r, m_out, down, inv32, qm, tie32, q_out)


def quantize_matrix(w: np.ndarray, bits: int, group: int, shift: int | None = None,
                    scale: np.ndarray | None = None, tol=None, out=None) -> nx.QTensor:
    """Exactly numerics.quantize_matrix(w, bits, group) (clip_search=True), for float32 or float64
    w. `shift` given: the rows are quantized with that matrix shift (a chunk of a larger matrix
    whose shift came from shift_for(max of group_scales over all its rows)); `scale`: these
    rows' group_scales, when already computed. `tol`: TOL by default (TERM_TOL, SUM_TOL,
    TIE_TOL, TERM_TOL32, SUM_TOL32, TIE_TOL32); larger values only send more groups to the
    float64 and exact paths (tests use that to exercise them).
    `out`: (q int8 (rows, cols), m uint16 (rows, cols // group)) to fill (reused buffers)."""
    if bits < 2 or bits > 8:
        raise ValueError(f"weight bits must be 2..8, got {bits}")
    w = np.ascontiguousarray(w)
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float64)
    rows, cols = w.shape
    if group <= 0 or cols % group:
        raise ValueError(f"group {group} does not divide {cols} columns")
    qm = nx.qmax(bits)
    if scale is None:
        scale = group_scales(w, group, float(qm))
    if shift is None:
        shift = shift_for(float(scale.max()) if scale.size else 0.0)
    q, m = out if out is not None else (np.empty((rows, cols), np.int8),
                                        np.empty((rows, cols // group), np.uint16))
    tol = np.array(tol or TOL, np.float64)
    args = (w.reshape(rows, cols // group, group), scale, float(qm), float((1 << nx.M_BITS) - 1),
            2.0 ** shift, 2.0 ** -shift, RATIOS, tol)
    if w.dtype == np.float32 and group == G and abs(shift) <= SHIFT32:
        _search32(*args, *_steps32(2.0 ** -shift, (1 << nx.M_BITS) - 1, float(qm), tol[3]),
                  q.reshape(rows, cols // group, group), m)
    else:
        _search(*args, q.reshape(rows, cols // group, group), m)
    return nx.QTensor(q, m, np.asarray(shift, dtype=np.int32), bits, group)


# ----------------------------------------------------------------------------- packing
@njit(parallel=True, cache=True, nogil=True)
def _pack_plane(q, rows, lanes, w, low, k, bias, out):
    """One bit plane of kernels.pack: out[b, c, l] |= ((q[b L + s nl + l, c] >> low) & mask
    + bias[s]) & mask << (s w) over the k slots s of a byte; rows past `rows` are zero weights."""
    nb, cols, nl = out.shape
    mask = (1 << w) - 1
    for b in prange(nb):
        for c in range(cols):
            for l in range(nl):
                out[b, c, l] = 0
        for s in range(k):
            for l in range(nl):
                r = b * lanes + s * nl + l
                if r < rows:
                    for c in range(cols):
                        v = ((np.int32(q[r, c]) >> low) & mask) + bias[s]
                        out[b, c, l] |= np.uint8((v & mask) << (s * w))
                else:
                    vs = np.uint8((bias[s] & mask) << (s * w))
                    for c in range(cols):
                        out[b, c, l] |= vs


@njit(parallel=True, cache=True, nogil=True)
def _pack_m(m, rows, lanes, out):
    nb, ng, _ = out.shape
    for b in prange(nb):
        for lane in range(lanes):
            r = b * lanes + lane
            for g in range(ng):
                out[b, g, lane] = m[r, g] if r < rows else 1


def pack(q: np.ndarray, m: np.ndarray, shift: int, bits: int, group: int,
         store_bits: int | None = None):
    """Exactly kernels.pack (the same Packed arrays), compiled and parallel."""
    from bakedllama.llama8b import kernels as K

    store_bits = bits if store_bits is None else store_bits
    if store_bits < bits:
        raise ValueError(f"cannot store {bits}-bit weights in {store_bits} bits")
    rows, cols = q.shape
    if cols % K.CHUNK or group % K.CHUNK:
        raise ValueError(f"cols ({cols}) and group ({group}) must be multiples of {K.CHUNK}")
    K.check_exact(bits, cols)
    L = K.lanes_for(store_bits)
    nb = -(-rows // L)
    q = np.ascontiguousarray(q, dtype=np.int8)
    planes = []
    for i, (w, low, k) in enumerate(K.plane_offsets(store_bits)):
        out = np.empty((nb, cols, L // k), np.uint8)
        bias = np.array([K._slot_bias(i, s, w, k) for s in range(k)], np.int32)
        _pack_plane(q, rows, L, w, low, k, bias, out)
        planes.append(out)
    mb = np.empty((nb, m.shape[1], L), np.uint16)
    _pack_m(np.ascontiguousarray(m, dtype=np.uint16), rows, L, mb)
    return K.Packed(planes, mb, int(shift), bits, group, rows, cols, store_bits)


# ----------------------------------------------------------------------------- reading
@njit(parallel=True, cache=True, nogil=True)
def _bf16_bits_to_f32(a, out):
    for i in prange(a.shape[0]):
        out[i] = np.uint32(a[i]) << 16


def bf16_to_f32(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 bits (uint16, any shape) -> float32 (exact: bf16 is float32's top half)."""
    out = np.empty(a.shape, np.float32) if out is None else out
    _bf16_bits_to_f32(np.ascontiguousarray(a).reshape(-1), out.reshape(-1).view(np.uint32))
    return out
