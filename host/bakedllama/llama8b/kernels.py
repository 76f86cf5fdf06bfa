"""Packed weight formats and the fast exact matrix-vector kernel (numba) for the 8B simulator.

The heavy lifting is done by numba: LLVM-compiled loops, vectorised with AVX2 FMAs, parallel over
row blocks (prange). It is a drop-in for `numerics.matvec`:

    acc[r] = sum_g m[r, g] * sum_{j in g} q[r, j] * a[j]          (exact integers)

and is tested equal to it on random and extreme inputs. Why floats are exact here: the weights and
activations are small integers; each 32-column chunk's sum of products is bounded by
32 * 127 * 127 < 2^24, so float32 adds (in any order) are exact; chunk sums, multipliers
(< 2^16) and the row total are bounded by cols * 127 * 127 * 65535 < 2^53 and are summed in
float64, exact again (asserted per tensor in `pack`). This is the same argument as
numerics.matvec's float64 einsum, at 1/8 of the memory traffic and with vector FMAs.

Layout ("lanes", like the accelerator's): rows are grouped in blocks of LANES = 64; within a block,
for each column, the block's 64 weights are contiguous, so the inner loop is a 64-wide vector
multiply-add of one broadcast activation. Weights are split into bit planes (8 | 4 | 2 | 1 bits):
q = (top plane, signed) << low_bits | (lower planes, unsigned). A w-bit plane stores 8/w values per
byte: byte l of a column holds rows l + (64 w / 8) s at bits [s w, (s+1) w).
  8-bit: [8]   6-bit: [4, 2]   4-bit: [4]   3-bit: [2, 1]   (any 2..8 bits: 4/2/1 planes)
Per-group multipliers are stored per block as (n_blocks, n_groups, 64) uint16."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bakedllama import numerics as nx

LANES = 64  # rows per block: one column of a block is 64 contiguous weights
CHUNK = 32  # columns summed in float32 before widening (32 * 127 * 127 < 2^24)


def planes_for(bits: int) -> tuple[int, ...]:
    """Bit-plane widths, most significant first (the first one is signed)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"weight bits must be 2..8, got {bits}")
    if bits == 8:
        return (8,)
    out, rest = [], bits
    for w in (4, 2, 1):
        if rest >= w:
            out.append(w)
            rest -= w
    return tuple(out)


@dataclass
class Packed:
    """One matrix in the lanes layout. Arrays may be memory-mapped views of the cache."""

    planes: list  # per plane: uint8 (n_blocks, cols, LANES * w // 8), most significant first
    m: np.ndarray  # uint16 (n_blocks, n_groups, LANES)
    shift: int  # per-matrix shift: w = q * m * 2^-shift
    bits: int
    group: int
    rows: int  # real rows (the last block is padded with zero weights)
    cols: int

    @property
    def n_blocks(self) -> int:
        return self.m.shape[0]

    def block_range(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 // LANES, -(-r1 // LANES)

    def row_bytes(self) -> int:
        """Storage of one row as the accelerator holds it (packed bits + multipliers)."""
        return math.ceil(self.cols * self.bits / 8) + (self.cols // self.group) * nx.M_BITS // 8

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.planes) + self.m.nbytes


def pack(q: np.ndarray, m: np.ndarray, shift: int, bits: int, group: int) -> Packed:
    """QTensor fields (q int8 (rows, cols), m uint16 (rows, cols // group)) -> lanes layout."""
    rows, cols = q.shape
    if cols % CHUNK or group % CHUNK:
        raise ValueError(f"cols ({cols}) and group ({group}) must be multiples of {CHUNK}")
    qm = nx.qmax(bits)
    if cols * qm * nx.ACT_MAX * ((1 << nx.M_BITS) - 1) >= 1 << 53:
        raise ValueError(f"{cols} columns of {bits}-bit weights overflow the exact float64 total")
    nb = -(-rows // LANES)
    pad = nb * LANES - rows
    qq = np.asarray(q, dtype=np.int16)
    mm = np.asarray(m, dtype=np.uint16)
    if pad:
        qq = np.concatenate([qq, np.zeros((pad, cols), np.int16)])
        mm = np.concatenate([mm, np.ones((pad, mm.shape[1]), np.uint16)])
    qb = qq.reshape(nb, LANES, cols).transpose(0, 2, 1)  # (nb, cols, LANES)
    planes, low = [], bits
    for w in planes_for(bits):
        low -= w
        v = (qb >> low) & ((1 << w) - 1)  # this plane's bits (the top one's sign lives in them)
        k = 8 // w  # values per byte
        nl = LANES // k
        byte = np.zeros((nb, cols, nl), np.uint8)
        for s in range(k):
            byte |= (v[:, :, s * nl:(s + 1) * nl] << (s * w)).astype(np.uint8)
        planes.append(byte)
    mb = np.ascontiguousarray(mm.reshape(nb, LANES, -1).transpose(0, 2, 1))
    return Packed(planes, mb, int(shift), bits, group, rows, cols)


def unpack(p: Packed) -> tuple[np.ndarray, np.ndarray]:
    """Back to (q int8 (rows, cols), m uint16 (rows, n_groups)): for tests and the golden model."""
    nb, cols = p.n_blocks, p.cols
    q = np.zeros((nb, cols, LANES), np.int32)
    low = p.bits
    for i, (w, byte) in enumerate(zip(planes_for(p.bits), p.planes)):
        low -= w
        k, nl = 8 // w, LANES // (8 // w)
        b = np.asarray(byte, dtype=np.int32)
        for s in range(k):
            v = (b >> (s * w)) & ((1 << w) - 1)
            if i == 0:  # signed top plane
                v = np.where(v >= 1 << (w - 1), v - (1 << w), v)
            q[:, :, s * nl:(s + 1) * nl] += v << low
    q = q.transpose(0, 2, 1).reshape(nb * LANES, cols)[:p.rows].astype(np.int8)
    m = np.asarray(p.m).transpose(0, 2, 1).reshape(nb * LANES, -1)[:p.rows]
    return q, np.ascontiguousarray(m)


@lru_cache(maxsize=None)
def _kernel(plane_widths: tuple[int, ...]):
    """A numba kernel specialised (at compile time) for one bit-plane layout."""
    import numba
    from numba import njit, prange, uint64

    P = len(plane_widths)
    W0 = plane_widths[0]
    W1 = plane_widths[1] if P > 1 else 0
    W2 = plane_widths[2] if P > 2 else 0
    L0, L1 = sum(plane_widths[1:]), W2  # bit offsets of planes 0 and 1
    K0, K1, K2 = 8 // W0, (8 // W1 if W1 else 1), (8 // W2 if W2 else 1)
    N0, N1, N2 = LANES // K0, LANES // K1, LANES // K2
    H0, M1, M2 = (1 << W0) - 1, (1 << W1) - 1, (1 << W2) - 1
    S0, S1 = 1 << L0, 1 << L1  # plane weights (the top plane is signed)

    @njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
    def kern(p0, p1, p2, m, a, group, rb0, rb1, out):
        # p*: flat uint8 planes (n_blocks * cols * bytes_per_column); m: flat uint16
        # (n_blocks * n_groups * LANES); a: float32 (cols,); out: float64 ((rb1 - rb0) * LANES,)
        cols = a.shape[0]
        ng = cols // group
        for rb in prange(rb0, rb1):
            tmp = np.empty(LANES, np.float32)  # one column of the block, unpacked
            acc = np.empty(LANES, np.float32)  # 32-column chunk sums (exact: < 2^24)
            gs = np.empty(LANES, np.float64)  # group sums
            tot = np.zeros(LANES, np.float64)  # sum_g m * group sum (exact: < 2^53)
            for g in range(ng):
                gs[:] = 0.0
                for c0 in range(g * group, (g + 1) * group, CHUNK):
                    acc[:] = 0.0
                    for j in range(uint64(c0), uint64(c0 + CHUNK)):
                        col = uint64(rb) * uint64(cols) + j
                        b0 = col * uint64(N0)
                        for s in range(K0):
                            for l in range(uint64(N0)):
                                u = (np.int32(p0[b0 + l]) >> (s * W0)) & H0
                                tmp[uint64(s * N0) + l] = np.float32((u - ((u >> (W0 - 1)) << W0)) * S0)
                        if P > 1:
                            b1 = col * uint64(N1)
                            for s in range(K1):
                                for l in range(uint64(N1)):
                                    tmp[uint64(s * N1) + l] += np.float32(
                                        ((np.int32(p1[b1 + l]) >> (s * W1)) & M1) * S1)
                        if P > 2:
                            b2 = col * uint64(N2)
                            for s in range(K2):
                                for l in range(uint64(N2)):
                                    tmp[uint64(s * N2) + l] += np.float32(
                                        (np.int32(p2[b2 + l]) >> (s * W2)) & M2)
                        aj = a[j]
                        for l in range(LANES):
                            acc[l] += tmp[l] * aj
                    for l in range(LANES):
                        gs[l] += acc[l]
                mb = (uint64(rb) * uint64(ng) + uint64(g)) * uint64(LANES)
                for l in range(uint64(LANES)):
                    tot[l] += np.float64(m[mb + l]) * gs[l]
            o = (rb - rb0) * LANES
            for l in range(LANES):
                out[o + l] = tot[l]

    del numba
    return kern


_EMPTY = np.zeros(1, np.uint8)


def matvec_packed(p: Packed, a, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """acc for rows [r0, r1) of p: int64, exactly numerics.matvec(q[r0:r1], a) for 1-D int8 a."""
    r1 = p.rows if r1 is None else r1
    a = np.asarray(a)
    if a.ndim != 1 or a.shape[0] != p.cols:
        raise ValueError(f"activation of shape {a.shape} for a matrix of {p.cols} columns")
    rb0, rb1 = p.block_range(r0, r1)
    out = np.empty((rb1 - rb0) * LANES, np.float64)
    pl = [np.asarray(x).reshape(-1) for x in p.planes] + [_EMPTY] * (3 - len(p.planes))
    _kernel(planes_for(p.bits))(pl[0], pl[1], pl[2], np.asarray(p.m).reshape(-1),
                                a.astype(np.float32), p.group, rb0, rb1, out)
    o = r0 - rb0 * LANES
    return out[o:o + r1 - r0].astype(np.int64)


def read_bandwidth(buf: np.ndarray, repeats: int = 3) -> float:
    """Measured read bandwidth (bytes/s) of this machine over `buf` (which should be far larger
    than the last-level cache): the best of `repeats` parallel streaming sums."""
    import time

    v = np.asarray(buf).reshape(-1).view(np.uint8)
    v = v[:v.size // 64 * 64].view(np.uint64)
    f = _sum_kernel()
    f(v[:1024])
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        f(v)
        best = max(best, v.nbytes / (time.perf_counter() - t))
    return best


@lru_cache(maxsize=None)
def _sum_kernel():
    from numba import njit, prange

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def ksum(v):
        n = v.shape[0] // 8
        t = np.uint64(0)
        for i in prange(n):
            s = np.uint64(0)
            for k in range(8):
                s ^= v[i * 8 + k]
            t ^= s
        return t

    return ksum
