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

Layout ("lanes", like the accelerator's): rows are grouped in blocks of L = 64 (128 / 256 when a
2- / 1-bit plane exists); within a block, for each column, the block's L weights are contiguous,
so the inner loop is an L-wide vector multiply-add of one broadcast activation. Weights are
split into bit planes (8 | 4 | 2 | 1 bits): q = (top plane, signed) << low_bits | (lower planes,
unsigned). A w-bit plane stores 8/w values per byte: byte l of a column holds rows l + (L w / 8) s
at bits [s w, (s+1) w), stored with a bias that the kernel's decoding removes exactly
(`_slot_bias`): the kernel reads each byte as a signed int8 float and peels the slots off the top
with floor(), all in exact float arithmetic.
  8-bit: [8]   6-bit: [4, 2]   4-bit: [4]   3-bit: [2, 1]   (any 2..8 bits: 4/2/1 planes)
Per-group multipliers are stored per block as (n_blocks, n_groups, L) uint16."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bakedllama import numerics as nx
from bakedllama.llama8b import simd

LANES = 64  # rows per block (at 8/6/4 bits): one column of a block is 64 contiguous weights
CHUNK = 32  # columns summed in float32 before widening (32 * 127 * 127 < 2^24)
SERIAL_BELOW = 1 << 20  # weights: smaller products run on the calling thread only
PAR_CHUNK = 16  # row blocks handed out at a time to the threads (dynamic scheduling)


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

    planes: list  # per plane: uint8 (n_blocks, cols, lanes * w // 8), most significant first
    m: np.ndarray  # uint16 (n_blocks, n_groups, lanes)
    shift: int  # per-matrix shift: w = q * m * 2^-shift
    bits: int  # the arithmetic's weight width (|q| <= 2^(bits-1) - 1)
    group: int
    rows: int  # real rows (the last block is padded with zero weights)
    cols: int
    store_bits: int  # the layout's width (>= bits): see STORE_FAST

    @property
    def n_blocks(self) -> int:
        return self.m.shape[0]

    @property
    def lanes(self) -> int:
        return self.m.shape[-1]

    def block_range(self, r0: int, r1: int) -> tuple[int, int]:
        return r0 // self.lanes, -(-r1 // self.lanes)

    def row_bytes(self) -> int:
        """Storage of one row as the accelerator holds it (`bits` per weight + multipliers)."""
        return math.ceil((self.cols * self.bits + (self.cols // self.group) * nx.M_BITS) / 8)

    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.planes) + self.m.nbytes

    def m_max(self) -> int:
        """The largest multiplier (read once, then kept: the kernels size their sums by it)."""
        if getattr(self, "_m_max", None) is None:
            self._m_max = int(np.asarray(self.m).max(initial=0))
        return self._m_max


# Layout width per arithmetic width for speed: 3-bit weights in nibbles, 5..7-bit in bytes (the
# bit-plane decoders of 2- and 1-bit planes run at 1/2..1/4 of the nibble/byte ones on AVX2).
STORE_FAST = {2: 4, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}


def check_exact(bits: int, cols: int) -> None:
    """The kernel's float sums are exact only below 2^24 (chunks) and 2^53 (rows): assert both."""
    qm = nx.qmax(bits)
    if CHUNK * qm * nx.ACT_MAX >= 1 << 24:
        raise ValueError(f"a {CHUNK}-column chunk of {bits}-bit weights overflows float32")
    if cols * qm * nx.ACT_MAX * 0xFFFF >= 1 << 53:  # any uint16 multiplier
        raise ValueError(f"{cols} columns of {bits}-bit weights overflow the exact float64 total")


def pack(q: np.ndarray, m: np.ndarray, shift: int, bits: int, group: int,
         store_bits: int | None = None) -> Packed:
    """QTensor fields (q int8 (rows, cols), m uint16 (rows, cols // group)) -> lanes layout of
    `store_bits` per weight (default: `bits`, the tight layout)."""
    store_bits = bits if store_bits is None else store_bits
    if store_bits < bits:
        raise ValueError(f"cannot store {bits}-bit weights in {store_bits} bits")
    rows, cols = q.shape
    if cols % CHUNK or group % CHUNK:
        raise ValueError(f"cols ({cols}) and group ({group}) must be multiples of {CHUNK}")
    check_exact(bits, cols)
    L = lanes_for(store_bits)
    nb = -(-rows // L)
    pad = nb * L - rows
    qq = np.asarray(q, dtype=np.int16)
    mm = np.asarray(m, dtype=np.uint16)
    if pad:
        qq = np.concatenate([qq, np.zeros((pad, cols), np.int16)])
        mm = np.concatenate([mm, np.ones((pad, mm.shape[1]), np.uint16)])
    qb = qq.reshape(nb, L, cols).transpose(0, 2, 1)  # (nb, cols, L)
    planes = []
    for i, (w, low, k) in enumerate(plane_offsets(store_bits)):
        v = (qb >> low) & ((1 << w) - 1)  # this plane's bits (the top one's sign lives in them)
        nl = L // k
        byte = np.zeros((nb, cols, nl), np.uint8)
        for s in range(k):
            vs = (v[:, :, s * nl:(s + 1) * nl] + _slot_bias(i, s, w, k)) & ((1 << w) - 1)
            byte |= (vs << (s * w)).astype(np.uint8)
        planes.append(byte)
    mb = np.ascontiguousarray(mm.reshape(nb, L, -1).transpose(0, 2, 1))
    return Packed(planes, mb, int(shift), bits, group, rows, cols, store_bits)


def unpack(p: Packed) -> tuple[np.ndarray, np.ndarray]:
    """Back to (q int8 (rows, cols), m uint16 (rows, n_groups)): for tests and the golden model."""
    nb, cols = p.n_blocks, p.cols
    L = p.lanes
    q = np.zeros((nb, cols, L), np.int32)
    for i, ((w, low, k), byte) in enumerate(zip(plane_offsets(p.store_bits), p.planes)):
        nl = L // k
        b = np.asarray(byte, dtype=np.int32)
        for s in range(k):
            v = (b >> (s * w)) & ((1 << w) - 1)
            if s == k - 1:  # the top slot of a byte decodes signed (the kernel reads int8)
                v = np.where(v >= 1 << (w - 1), v - (1 << w), v)
            q[:, :, s * nl:(s + 1) * nl] += (v - _slot_bias(i, s, w, k)) << low
    q = q.transpose(0, 2, 1).reshape(nb * L, cols)[:p.rows].astype(np.int8)
    m = np.asarray(p.m).transpose(0, 2, 1).reshape(nb * L, -1)[:p.rows]
    return q, np.ascontiguousarray(m)


def lanes_for(bits: int) -> int:
    """Rows per block: 64, or more for 2- and 1-bit planes so that every plane has 32 bytes per
    column (the inner loops stay full vectors)."""
    return LANES * 4 // min(4, min(planes_for(bits)))


def plane_offsets(bits: int) -> list[tuple[int, int, int]]:
    """(width, low bit, values per byte) of each plane, most significant first."""
    out, low = [], bits
    for w in planes_for(bits):
        low -= w
        out.append((w, low, 8 // w))
    return out


def _slot_bias(plane: int, s: int, w: int, k: int) -> int:
    """What decoding adds to the stored value of slot s (see `pack`): the kernel decodes each
    byte as a signed int8 and peels slots off the top, so the top slot comes out signed and the
    others unsigned; values are stored with a bias that makes that exact."""
    top_plane, top_slot = plane == 0, s == k - 1
    if w == 8:
        return 0
    if top_plane and not top_slot:
        return 1 << (w - 1)  # signed value stored unsigned with +2^(w-1)
    if not top_plane and top_slot:
        return -(1 << (w - 1))  # unsigned value stored signed with -2^(w-1)
    return 0


def lane_bias(bits: int) -> np.ndarray:
    """Per lane: decoded value - q (a constant), removed once per chunk as bias * sum(a)."""
    L = lanes_for(bits)
    c = np.zeros(L, np.int64)
    for i, (w, low, k) in enumerate(plane_offsets(bits)):
        n = L // k
        for s in range(k):
            c[s * n:(s + 1) * n] += _slot_bias(i, s, w, k) << low
    return c


@lru_cache(maxsize=None)
def _kernel(bits: int):
    """A numba kernel specialised (at compile time) for one bit width's planes."""
    from numba import njit, prange, uint64

    po = plane_offsets(bits)
    P = len(po)
    (W0, L0, K0), (W1, L1, K1), (W2, L2, K2) = (po + [(8, 0, 1)] * 3)[:3]
    LN = lanes_for(bits)
    N0, N1, N2 = LN // K0, LN // K1, LN // K2
    S0, S1, S2 = np.float32(1 << L0), np.float32(1 << L1), np.float32(1 << L2)  # plane weights
    D0, D1, D2 = float(1 << W0), float(1 << W1), float(1 << W2)

    @njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
    def kern4(p0, p1, p2, m, a, bias, group, rb0, rb1, out):
        # p*: flat planes as int8 (n_blocks * cols * bytes_per_column); m: flat uint16
        # (n_blocks * n_groups * LN); a: float32 (cols,); bias: float32 (LN,);
        # out: float64 ((rb1 - rb0) * LN,)
        cols = a.shape[0]
        ng = cols // group
        for rb in prange(rb0, rb1):
            acc = np.empty(LN, np.float32)  # 32-column chunk sums (exact: < 2^24)
            gs = np.empty(LN, np.float64)  # group sums
            tot = np.zeros(LN, np.float64)  # sum_g m * group sum (exact: < 2^53)
            for g in range(ng):
                gs[:] = 0.0
                for c0 in range(g * group, (g + 1) * group, CHUNK):
                    acc[:] = 0.0
                    asum = np.float32(0.0)
                    for j in range(uint64(c0), uint64(c0 + CHUNK), uint64(4)):  # 4 columns a step
                        col = uint64(rb) * uint64(cols) + j
                        a0, a1, a2, a3 = a[j], a[j + 1], a[j + 2], a[j + 3]
                        asum += (a0 + a1) + (a2 + a3)
                        b = col * uint64(N0)
                        e0, e1, e2, e3 = a0 * S0, a1 * S0, a2 * S0, a3 * S0
                        for l in range(uint64(N0)):  # peel slots off the top of each byte
                            x0 = np.float32(p0[b + l])
                            x1 = np.float32(p0[b + uint64(N0) + l])
                            x2 = np.float32(p0[b + uint64(2 * N0) + l])
                            x3 = np.float32(p0[b + uint64(3 * N0) + l])
                            for sl in range(K0 - 1, 0, -1):
                                inv, dd = np.float32(1.0 / D0 ** sl), np.float32(D0 ** sl)
                                v0, v1 = np.floor(x0 * inv), np.floor(x1 * inv)
                                v2, v3 = np.floor(x2 * inv), np.floor(x3 * inv)
                                x0, x1, x2, x3 = x0 - v0 * dd, x1 - v1 * dd, x2 - v2 * dd, x3 - v3 * dd
                                acc[uint64(sl * N0) + l] += (v0 * e0 + v1 * e1) + (v2 * e2 + v3 * e3)
                            acc[l] += (x0 * e0 + x1 * e1) + (x2 * e2 + x3 * e3)
                        if P > 1:
                            b = col * uint64(N1)
                            e0, e1, e2, e3 = a0 * S1, a1 * S1, a2 * S1, a3 * S1
                            for l in range(uint64(N1)):  # peel slots off the top of each byte
                                x0 = np.float32(p1[b + l])
                                x1 = np.float32(p1[b + uint64(N1) + l])
                                x2 = np.float32(p1[b + uint64(2 * N1) + l])
                                x3 = np.float32(p1[b + uint64(3 * N1) + l])
                                for sl in range(K1 - 1, 0, -1):
                                    inv, dd = np.float32(1.0 / D1 ** sl), np.float32(D1 ** sl)
                                    v0, v1 = np.floor(x0 * inv), np.floor(x1 * inv)
                                    v2, v3 = np.floor(x2 * inv), np.floor(x3 * inv)
                                    x0, x1, x2, x3 = x0 - v0 * dd, x1 - v1 * dd, x2 - v2 * dd, x3 - v3 * dd
                                    acc[uint64(sl * N1) + l] += (v0 * e0 + v1 * e1) + (v2 * e2 + v3 * e3)
                                acc[l] += (x0 * e0 + x1 * e1) + (x2 * e2 + x3 * e3)
                        if P > 2:
                            b = col * uint64(N2)
                            e0, e1, e2, e3 = a0 * S2, a1 * S2, a2 * S2, a3 * S2
                            for l in range(uint64(N2)):  # peel slots off the top of each byte
                                x0 = np.float32(p2[b + l])
                                x1 = np.float32(p2[b + uint64(N2) + l])
                                x2 = np.float32(p2[b + uint64(2 * N2) + l])
                                x3 = np.float32(p2[b + uint64(3 * N2) + l])
                                for sl in range(K2 - 1, 0, -1):
                                    inv, dd = np.float32(1.0 / D2 ** sl), np.float32(D2 ** sl)
                                    v0, v1 = np.floor(x0 * inv), np.floor(x1 * inv)
                                    v2, v3 = np.floor(x2 * inv), np.floor(x3 * inv)
                                    x0, x1, x2, x3 = x0 - v0 * dd, x1 - v1 * dd, x2 - v2 * dd, x3 - v3 * dd
                                    acc[uint64(sl * N2) + l] += (v0 * e0 + v1 * e1) + (v2 * e2 + v3 * e3)
                                acc[l] += (x0 * e0 + x1 * e1) + (x2 * e2 + x3 * e3)
                    for l in range(LN):
                        gs[l] += acc[l] - bias[l] * asum
                mb = (uint64(rb) * uint64(ng) + uint64(g)) * uint64(LN)
                for l in range(uint64(LN)):
                    tot[l] += np.float64(m[mb + l]) * gs[l]
            o = (rb - rb0) * LN
            for l in range(LN):
                out[o + l] = tot[l]

    @njit(parallel=True, fastmath=True, boundscheck=False, cache=True, nogil=True)
    def kern1(p0, p1, p2, m, a, bias, group, rb0, rb1, out):
        # p*: flat planes as int8 (n_blocks * cols * bytes_per_column); m: flat uint16
        # (n_blocks * n_groups * LN); a: float32 (cols,); bias: float32 (LN,);
        # out: float64 ((rb1 - rb0) * LN,)
        cols = a.shape[0]
        ng = cols // group
        for rb in prange(rb0, rb1):
            acc = np.empty(LN, np.float32)  # 32-column chunk sums (exact: < 2^24)
            gs = np.empty(LN, np.float64)  # group sums
            tot = np.zeros(LN, np.float64)  # sum_g m * group sum (exact: < 2^53)
            for g in range(ng):
                gs[:] = 0.0
                for c0 in range(g * group, (g + 1) * group, CHUNK):
                    acc[:] = 0.0
                    asum = np.float32(0.0)
                    for j in range(uint64(c0), uint64(c0 + CHUNK)):
                        col = uint64(rb) * uint64(cols) + j
                        aj = a[j]
                        asum += aj
                        b0 = col * uint64(N0)
                        a0 = aj * S0
                        for l in range(uint64(N0)):
                            x = np.float32(p0[b0 + l])
                            for s in range(K0 - 1, 0, -1):
                                v = np.floor(x * np.float32(1.0 / D0 ** s))
                                x -= v * np.float32(D0 ** s)
                                acc[uint64(s * N0) + l] += v * a0
                            acc[l] += x * a0
                        if P > 1:
                            b1 = col * uint64(N1)
                            a1 = aj * S1
                            for l in range(uint64(N1)):
                                x = np.float32(p1[b1 + l])
                                for s in range(K1 - 1, 0, -1):
                                    v = np.floor(x * np.float32(1.0 / D1 ** s))
                                    x -= v * np.float32(D1 ** s)
                                    acc[uint64(s * N1) + l] += v * a1
                                acc[l] += x * a1
                        if P > 2:
                            b2 = col * uint64(N2)
                            a2 = aj * S2
                            for l in range(uint64(N2)):
                                x = np.float32(p2[b2 + l])
                                for s in range(K2 - 1, 0, -1):
                                    v = np.floor(x * np.float32(1.0 / D2 ** s))
                                    x -= v * np.float32(D2 ** s)
                                    acc[uint64(s * N2) + l] += v * a2
                                acc[l] += x * a2
                    for l in range(LN):
                        gs[l] += acc[l] - bias[l] * asum
                mb = (uint64(rb) * uint64(ng) + uint64(g)) * uint64(LN)
                for l in range(uint64(LN)):
                    tot[l] += np.float64(m[mb + l]) * gs[l]
            o = (rb - rb0) * LN
            for l in range(LN):
                out[o + l] = tot[l]

    # 4 columns a step saves accumulator traffic (8-bit +33%, 4-bit +20%, 4+2 +12% measured);
    # with a 1-bit plane (8 slots per byte) it runs out of registers (6x slower): 1 column.
    return kern1 if min(planes_for(bits)) == 1 else kern4


_EMPTY = np.zeros(1, np.int8)


@lru_cache(maxsize=None)
def _bias32(bits: int) -> np.ndarray:
    return lane_bias(bits).astype(np.float32)


def matvec_packed(p: Packed, a, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """acc for rows [r0, r1) of p: int64, exactly numerics.matvec(q[r0:r1], a) for 1-D int8 a.

    4-bit layouts (w4, w3) run on simd.c's integer kernel where the machine has it (the float
    decoding below is bound by unpacking nibbles, not by memory), and so does the 8-bit layout
    where the CPU has AVX-512 VNNI (one vpdpbusd per 32 products; its AVX2 kernel is slower than
    the numba one); the others on the numba kernel."""
    r1 = p.rows if r1 is None else r1
    a = np.asarray(a)
    if a.ndim != 1 or a.shape[0] != p.cols:
        raise ValueError(f"activation of shape {a.shape} for a matrix of {p.cols} columns")
    if simd.supports(p) and (p.store_bits == 4 or simd.default_kernel(p) == "vnni"):
        import numba

        big = (-(-r1 // p.lanes) - r0 // p.lanes) * p.lanes * p.cols >= SERIAL_BELOW
        return simd.matmat(p, a[None], r0, r1, numba.get_num_threads() if big else 1)[0]
    return matvec_numba(p, a, r0, r1)


def matvec_numba(p: Packed, a: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """matvec_packed on the numba kernel, whatever the layout (the benchmark compares both)."""
    rb0, rb1 = p.block_range(r0, r1)
    out = np.empty((rb1 - rb0) * p.lanes, np.float64)
    pl = [np.asarray(x).reshape(-1).view(np.int8) for x in p.planes] + [_EMPTY] * (3 - len(p.planes))
    args = (pl[0], pl[1], pl[2], np.asarray(p.m).reshape(-1), a.astype(np.float32),
            _bias32(p.store_bits), p.group, rb0, rb1, out)
    kern = _kernel(p.store_bits)
    if (rb1 - rb0) * p.lanes * p.cols < SERIAL_BELOW:  # waking the thread pool costs more
        import numba

        n = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            kern(*args)
        finally:
            numba.set_num_threads(n)
    else:
        import numba

        with numba.parallel_chunksize(PAR_CHUNK):  # dynamic: a descheduled thread does not stall
            kern(*args)
    o = r0 - rb0 * p.lanes
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
    def ksum(v):  # reads every byte once (wrapping integer sum)
        n = v.shape[0] // 8
        t = np.uint64(0)
        for i in prange(n):
            s = np.uint64(0)
            for k in range(8):
                s += v[i * 8 + k]
            t += s
        return t

    return ksum
