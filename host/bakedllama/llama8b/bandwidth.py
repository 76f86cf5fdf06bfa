"""The memory bound of a decode step, measured the way the decode step reads its weights.

A decode step reads every weight byte once (`decode_bytes`), from resident pages, on numba's
thread pool at the run's thread count, the threads taking row blocks in dynamic chunks
(kernels.PAR_CHUNK). No decode can read them faster than this process can read that many
resident bytes, so the bound is measured on exactly that:

  - a buffer allocated and written before any timing (every page touched: no page faults, no
    shared zero page behind an untouched allocation; numpy may give it huge pages where the
    mapped weights have 4 KiB ones, which only makes the buffer faster: still a bound),
  - of the decode's own size up to CAP (at least 8 x the last-level cache): a model larger than
    the LLC streams from DRAM on every step, and so does the buffer; a model that fits the LLC is
    bounded by the LLC's rate, measured the same way,
  - read on the same threads (numba.get_num_threads()), in blocks and dynamic chunks like the
    kernels, and on one thread too (the faster counts: the fastest read with at most the run's
    threads; small products run on one thread in the kernels as well),
  - best of several passes in this process (a pass slowed by another process is discarded).

bound seconds per token = decode_bytes / best rate; the run reports its decode time as a ratio to
it. A ratio below 1.0 cannot be physical; `compare` then carries a warning that names the reason
(another process slowing the bound's passes, or fewer bytes read than counted).

The measurement this replaces read the model's mapped weights in 64 MiB pieces released after each
read (so every pass re-faulted its pages) with a reduction numba did not vectorise (4-5 GB/s on
this machine, where one thread reads ~25 GB/s): decodes ran at 0.30-0.40 of that "bound"."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from bakedllama.llama8b.kernels import PAR_CHUNK

BLOCK = 1 << 15  # uint64 words per work item (256 KiB: one 8-bit row block of a 4096-column matrix)
MIN_CAP = 256 << 20  # the buffer is at most max(MIN_CAP, 8 x LLC) bytes (DRAM's rate is flat there)
RUNS = 5  # timed passes (the best counts)


def llc_bytes() -> int:
    """Size of the largest cache level of CPU 0 (sysfs; 32 MiB if it cannot be read)."""
    best = (0, 32 << 20)
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((d / "level").read_text())
            if (d / "type").read_text().strip() == "Instruction":
                continue
            s = (d / "size").read_text().strip().upper()
            n = int(s.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(s[-1:], 0)
        except (OSError, ValueError):
            continue
        best = max(best, (level, n))
    return best[1]


def buffer_bytes(decode_bytes: int, llc: int | None = None) -> int:
    """Bytes of the buffer the bound reads: the decode's own, at most max(MIN_CAP, 8 x LLC)."""
    llc = llc_bytes() if llc is None else llc
    cap = max(MIN_CAP, 8 * llc)
    return max(BLOCK * 8, min(int(decode_bytes), cap)) // (BLOCK * 8) * (BLOCK * 8)


@lru_cache(maxsize=None)
def _read_kernel():
    from numba import njit, prange

    @njit(parallel=True, nogil=True, cache=True)
    def kread(v, out):  # every word read once; one wrapping sum per block (vectorised loads)
        for b in prange(out.shape[0]):
            w = v[b * BLOCK:(b + 1) * BLOCK]
            s = np.uint64(0)
            for i in range(w.shape[0]):  # from 0: no negative-index check, so LLVM vectorises
                s += w[i]
            out[b] = s

    return kread


@dataclass(frozen=True)
class Bound:
    bytes_per_s: float  # best read rate over the buffer, on `threads` or (if faster) 1 thread
    buffer_bytes: int
    threads: int  # the run's thread count
    best_threads: int  # the count that read fastest
    runs: int
    llc_bytes: int
    pass_seconds: tuple  # (threads, seconds) of every timed pass
    load_average: float  # highest 1-minute load average seen while measuring (os.getloadavg)

    def seconds_for(self, nbytes: int) -> float:
        return nbytes / self.bytes_per_s


def measure(decode_bytes: int, threads: int | None = None, runs: int = RUNS,
            buf: np.ndarray | None = None) -> Bound:
    """Best read rate of `runs` passes over a resident buffer sized for `decode_bytes`
    (buffer_bytes) on `threads` numba threads (default: the current count, restored after).
    With threads > 1, every round also reads on one thread (as the kernels do for small
    products, kernels.SERIAL_BELOW) and the faster of the two counts: the bound is the fastest
    read this process achieves with at most the run's threads (waking the pool for a buffer of a
    few blocks costs more than the read). `buf` (uint8, its pages written) reuses a buffer."""
    import numba

    n0 = numba.get_num_threads()
    threads = n0 if not threads else int(threads)
    llc = llc_bytes()
    size = buffer_bytes(decode_bytes, llc)
    if buf is None or buf.nbytes < size:
        buf = np.ones(size, np.uint8)  # written: every page is mapped before the timing
    v = buf[:size].view(np.uint64)
    out = np.zeros(v.size // BLOCK, np.uint64)
    f = _read_kernel()
    counts = sorted({threads, 1}, reverse=True)
    secs, load = [], os.getloadavg()[0]
    try:
        with numba.parallel_chunksize(PAR_CHUNK):  # dynamic, like the kernels
            for n in counts:
                numba.set_num_threads(n)
                f(v, out)  # compile (or load) and warm the pool
            for _ in range(max(1, runs)):
                for n in counts:
                    numba.set_num_threads(n)
                    t = time.perf_counter()
                    f(v, out)
                    secs.append((n, time.perf_counter() - t))
    finally:
        numba.set_num_threads(n0)
    return _bound(size, threads, llc, tuple(secs), max(load, os.getloadavg()[0]))


def _bound(size: int, threads: int, llc: int, secs: tuple, load: float) -> Bound:
    n, t = min(secs, key=lambda p: p[1])
    rounds = sum(1 for s in secs if s[0] == threads)
    return Bound(size / t, size, threads, n, rounds, llc, secs, load)


def best(a: Bound, b: Bound) -> Bound:
    """Two measurements of the same buffer and threads as one: every pass counts, the best wins."""
    if (a.buffer_bytes, a.threads) != (b.buffer_bytes, b.threads):
        raise ValueError("bounds of different buffers or thread counts")
    return _bound(a.buffer_bytes, a.threads, a.llc_bytes, a.pass_seconds + b.pass_seconds,
                  max(a.load_average, b.load_average))


def compare(decode_seconds: float, decode_bytes: int, bound: Bound) -> dict:
    """Decode time as a ratio to the bound (>= 1.0 when both are measured right), with a warning
    naming the reason when it is not."""
    bsec = bound.seconds_for(decode_bytes)
    ratio = decode_seconds / bsec
    warning = None
    if ratio < 1.0:
        cores = os.cpu_count() or 1
        warning = (f"decode read faster than the measured bound (ratio {ratio:.3f} < 1): the bound's "
                   f"passes were slowed (load average {bound.load_average:.1f} on {cores} cores: "
                   f"other processes took CPU time or memory bandwidth from its {bound.threads} "
                   f"threads), or the step read fewer than the {decode_bytes:,} bytes counted; "
                   f"re-run on an idle machine")
    return dict(measured_bytes_per_s=round(bound.bytes_per_s), bytes_per_decode_step=int(decode_bytes),
                bound_seconds_per_token=bsec, ratio_to_bound=ratio, warning=warning,
                over_bytes=bound.buffer_bytes, threads=bound.threads, best_threads=bound.best_threads,
                runs=bound.runs, llc_bytes=bound.llc_bytes, load_average=round(bound.load_average, 2))


# ----------------------------------------------------------------------------- decode against it
def timing_model(cfg, scheme: str = "w8", seed: int = 0, store: str = "fast"):
    """A QuantModel of random integer weights in the runner's packed layout, for timing decode
    steps against the bound (no float checkpoint, no calibration: a decode step reads the same
    bytes and does the same work whatever the weights are). Weights are uniform in the format's
    range, multipliers in [2^15, 2^16), shifts giving rows of rms ~ 1/sqrt(cols) (embedding rows
    ~ 1); the activation formats are nominal (those of a baked model: f_x 9, f_qk 10, f_h 9), the
    norm gains 1.0."""
    import math

    from bakedllama import numerics as nx
    from bakedllama.bake import scheme_format
    from bakedllama.llama8b import kernels, quant
    from bakedllama.llama8b.arch import Special
    from bakedllama.model import MATRICES

    rng = np.random.default_rng(seed)
    c, L = cfg, cfg.n_layers
    shapes = dict(wq=(c.dim, c.dim), wk=(c.kv_dim, c.dim), wv=(c.kv_dim, c.dim), wo=(c.dim, c.dim),
                  w1=(c.hidden_dim, c.dim), w2=(c.dim, c.hidden_dim), w3=(c.hidden_dim, c.dim),
                  wcls=(c.vocab_size, c.dim), tok_embeddings=(c.vocab_size, c.dim))
    store_bits = quant.pack_policy(store)

    def qtensor(name):
        rows, cols = shapes[name]
        bits, group = scheme_format(scheme, name, cols)
        qm = nx.qmax(bits)
        q = rng.integers(-qm, qm + 1, (rows, cols), dtype=np.int8)
        m = rng.integers(1 << 15, 1 << 16, (rows, cols // group), dtype=np.uint16)
        rms = 1.0 if name == "tok_embeddings" else 1 / math.sqrt(cols)  # of the dequantized rows
        shift = round(math.log2(qm / math.sqrt(3) * 0.75 * 65536 / rms))
        fmt = dict(bits=bits, group=group, acc_bits=nx.matvec_acc_bits(bits, group, cols))
        return q, m, shift, fmt

    mats, fmt_w = {}, {}
    for n in (*MATRICES, "wcls"):
        for l in ([None] if n == "wcls" else range(L)):
            q, m, shift, fmt_w[n] = qtensor(n)
            mats[(n, l)] = kernels.pack(q, m, shift, fmt_w[n]["bits"], fmt_w[n]["group"],
                                        store_bits(fmt_w[n]["bits"]))
    q, m, shift, fmt_w["tok_embeddings"] = qtensor("tok_embeddings")
    embed = nx.QTensor(q, m, np.int32(shift), fmt_w["tok_embeddings"]["bits"],
                       fmt_w["tok_embeddings"]["group"])
    gain, f_g = nx.norm_weight_q(np.ones(c.dim))
    norms = {(n, l): gain for n in ("rms_att_weight", "rms_ffn_weight") for l in range(L)}
    norms[("rms_final_weight", None)] = gain
    f_x = 9
    fmt = dict(f_x=f_x, f_qk=10, f_h=9, e_k=[2] * L, e_v=[4] * L,
               eps_int=nx.rms_eps_int(c.norm_eps, c.dim, f_x), f_g_rms_att_weight=[f_g] * L,
               f_g_rms_ffn_weight=[f_g] * L, f_g_rms_final_weight=f_g, scheme=scheme, weights=fmt_w)
    return quant.QuantModel(c, Special(-1, ()), fmt, embed, mats, norms,
                            dict(store=store, source=f"bandwidth.timing_model seed {seed}"))


def decode_bytes(qm) -> int:
    """Bytes one decode step reads: every packed matrix and gain, and one embedding row."""
    n = sum(p.nbytes() for p in qm.mats.values())
    n += sum(g.nbytes for g in qm.norms.values())
    return n + qm.embed.q.shape[1] + qm.embed.m.shape[1] * 2


def time_decode(qm, threads: int, steps: int = 4, token: int = 1) -> list[float]:
    """Seconds of `steps` decode steps (Runner.forward, one position each, every partition
    resident: one pass over the unpartitioned model) on `threads` numba threads, after one
    untimed step (which maps every page and compiles the kernels)."""
    import numba

    from bakedllama.llama8b import partition, runner

    n0 = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, None), streaming=False)
        s = r.new_state()
        r.forward(s, token)
        out = []
        for _ in range(min(steps, qm.cfg.seq_len - 1)):
            t = time.perf_counter()
            r.forward(s, token)
            out.append(time.perf_counter() - t)
        return out
    finally:
        numba.set_num_threads(n0)
