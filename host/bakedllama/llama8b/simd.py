"""The integer kernels of simd.c: compiled once per machine with the system C compiler, loaded
with ctypes, threaded over row blocks (ctypes releases the GIL). Two instruction sets: AVX-512
VNNI + VBMI ("vnni": vpdpbusd, and vpermt2b to gather the nibbles; used where the CPU has both)
and AVX2 (vpmaddubsw, everywhere else on x86-64).

    available() -> bool
    kernels() -> ("vnni", "avx2") or ("avx2",) or ()
    matmat(p, a (T, cols) int8-valued, r0, r1, threads, kernel=None) -> (T, r1 - r0) int64

Exact: the same integers as numerics.matvec (tests/test_llama8b_simd.py). Packed layouts of 4 bits
(w4, w3 in nibbles) and 8 bits (w8, 5..7-bit weights in bytes) run here; the others, or a machine
without AVX2 or a C compiler, use the numba kernels (kernels.matvec_packed)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

SRC = Path(__file__).with_name("simd.c")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-std=c11"]
CHUNK_BLOCKS = 8  # row blocks a thread takes at a time (bk_dyn), at most
TOKEN_TILE = 64  # activation rows per call (the kernel's int32 / int64 sums live on its stack)
LAYOUTS = (4, 8)  # store_bits with a kernel here


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bakedllama"


@lru_cache(maxsize=None)
def _lib():
    """The compiled library, or None (not x86-64, no compiler, no AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("BAKEDLLAMA_NO_SIMD"):
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None
    src = SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join(CFLAGS).encode()).hexdigest()[:16]
    so = _cache_dir() / f"simd-{tag}.so"
    if not so.exists():
        so.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *CFLAGS, "-o", tmp, str(SRC)], capture_output=True, text=True)
            if r.returncode != 0:
                return None
            os.replace(tmp, so)  # atomic: a concurrent process sees the old file or the new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    if not lib.bk_has_avx2():
        return None
    P = ctypes.c_void_p
    I = ctypes.c_int
    # every kernel is called through bk_dyn (its threads' shared chunk counter)
    lib.bk_dyn.argtypes = [I, P, P, P, P, I, I, I, I, I, P, I, I, I, P, I]
    lib.bk_dyn.restype = None
    return lib


def available() -> bool:
    return _lib() is not None


@lru_cache(maxsize=None)
def kernels() -> tuple:
    """The instruction sets with a kernel on this machine, the default (fastest) first."""
    lib = _lib()
    if lib is None:
        return ()
    return ("vnni", "avx2") if lib.bk_has_vnni() and lib.bk_has_vbmi() else ("avx2",)


VNNI_MAX_GROUP = (1 << 31) // (255 * 127)  # a group's biased int32 sum stays exact below this


def supports(p) -> bool:
    """A kernel here for this packed matrix (and the machine has them)."""
    step = 16 if p.store_bits == 4 else 4
    return (p.store_bits in LAYOUTS and len(p.planes) == 1 and p.lanes == 64
            and p.group % step == 0 and available())


_pool: dict = {}


def _executor(n: int) -> ThreadPoolExecutor:
    if n not in _pool:
        _pool[n] = ThreadPoolExecutor(n, thread_name_prefix="bk-simd")
    return _pool[n]


def default_kernel(p) -> str:
    """The kernel matmat runs for packed matrix p by default ("vnni" where it has one, else "avx2")."""
    return "vnni" if "vnni" in kernels() and p.group < VNNI_MAX_GROUP else "avx2"


PAIR_SUM_MAX = 32 * 8 * 127  # |sum q a| of a group of 32 nibble weights (|q| <= 8, |a| <= 127)
BYTE_SUM_MAX = 128 * 127  # |q a| per weight: 8-bit layout (|q| <= 128), nibbles' high half (16 x 8)


def flush_groups(p) -> int:
    """Groups per int32 total in the kernels (simd.c's mvz: each group's sum times its multiplier
    by vpmulld, exact while the total stays below 2^31; 0: int64 totals, for groups or
    multipliers too large for even one product in int32)."""
    return ((1 << 31) - 1) // (max(p.m_max(), 1) * p.group * BYTE_SUM_MAX)


def flush_pairs(p) -> int:
    """Pairs of groups per int32 total on the 4-bit prompt path (simd.c's mv16: int16 pairs, which
    need groups of 32 and multipliers below 2^15); 0: that path is not taken."""
    mmax = max(p.m_max(), 1)
    if p.store_bits != 4 or p.group != 32 or mmax >= 1 << 15:
        return 0
    return ((1 << 31) - 1) // (2 * mmax * PAIR_SUM_MAX)


def matmat(p, a, r0: int, r1: int, threads: int = 1, kernel: str | None = None) -> np.ndarray:
    """Accumulators of rows [r0, r1) of packed matrix p for each activation row of a: (T, r1 - r0)
    int64, exactly numerics.matvec (|a| <= 127). kernel: "vnni" or "avx2" (None: the default)."""
    lib = _lib()
    if kernel is None:
        kernel = default_kernel(p)
    if kernel not in kernels() or (kernel == "vnni" and default_kernel(p) != "vnni"):
        raise ValueError(f"no {kernel} kernel for this matrix on this machine (have {kernels()})")
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != p.cols:
        raise ValueError(f"activations of shape {a.shape} for a matrix of {p.cols} columns")
    if np.abs(a).max(initial=0) > 127:
        raise ValueError("activations outside [-127, 127]")
    a8 = np.ascontiguousarray(a, dtype=np.int8)
    T = a8.shape[0]
    rb0, rb1 = p.block_range(r0, r1)
    nblk = rb1 - rb0
    ldo = nblk * 64
    out = np.empty((T, ldo), np.int64)
    planes = np.ascontiguousarray(p.planes[0])
    m = np.ascontiguousarray(p.m)
    ng = p.cols // p.group
    asum = (a8.reshape(T, ng, p.group).sum(-1, dtype=np.int64).astype(np.int32)
            if p.store_bits == 4 or kernel == "vnni" else None)
    flush = (flush_groups(p), flush_pairs(p)) if kernel == "vnni" else (0, 0)
    n = max(1, min(threads, nblk))
    which = (2 if p.store_bits == 4 else 3) if kernel == "vnni" else (0 if p.store_bits == 4 else 1)
    chunk = max(1, min(CHUNK_BLOCKS, -(-nblk // (2 * n))))  # >= 2 chunks per thread
    null = ctypes.c_void_p(0)
    for t0 in range(0, T, TOKEN_TILE):  # each tile: the threads share its row blocks dynamically
        t1 = min(T, t0 + TOKEN_TILE)
        nxt = ctypes.c_int(0)
        call = partial(lib.bk_dyn, which, planes.ctypes.data, m.ctypes.data, a8[t0:t1].ctypes.data,
                       asum[t0:t1].ctypes.data if asum is not None else null, t1 - t0, p.cols,
                       p.group, rb0, rb1, out[t0:t1].ctypes.data, ldo, *flush,
                       ctypes.byref(nxt), chunk)
        helpers = [_executor(n - 1).submit(call) for _ in range(n - 1)]
        call()  # the calling thread takes chunks too
        for f in helpers:
            f.result()
    o = r0 - rb0 * 64
    return out[:, o:o + r1 - r0]
