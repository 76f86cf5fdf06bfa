"""Quantize a Llama checkpoint once into an on-disk, memory-mapped, checksummed cache.

One streaming pass over the checkpoint, tensor by tensor (peak memory ~ one matrix in float):
  1. calibration: the float path (the same maths as bakedllama.reference) runs the calibration
     tokens through each layer, recording max |value| per kind exactly as bake.calibrate does;
     each matrix is read when the float path needs it, and
  2. quantized on the way: numerics.quantize_matrix's bytes with bake.py's schemes ("w8", "w4",
     "w3/6"), computed by fastquant (compiled, parallel, tested equal to it), packed into the
     kernels' lanes layout, written to the layer's file and dropped. The embedding and the
     classifier go in row chunks (group scales and the shift first, then the rows).
The fixed-point formats are then derived with bake.py's rules (frac_for, rms_eps_int,
norm_weight_q): nothing about the arithmetic is decided here.

Cache directory (weights/cache/q-...), built as .q-...tmp-PID and renamed when complete (an error
or Ctrl-C removes it; a killed build's is removed by the next build):
  manifest.json   version, source identity, config, numerics formats, every array's file,
                  offset, dtype, shape, and each file's sha256; written last
  embed.bin       tok_embeddings as a plain QTensor (q int8 rows, m): one row is read per token
  layer-NN.bin    the packed matrices and int16 gains of layer NN
  head.bin        the final norm and the packed lm_head (wcls)
Arrays are 4096-byte aligned, so a partition's rows are whole pages that can be mapped and
released on their own."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bakedllama import numerics as nx
from bakedllama.bake import frac_for, scheme_format
from bakedllama.config import ModelConfig
from bakedllama.fileformat import ModelFileError
from bakedllama.llama8b import fastquant as fq
from bakedllama.llama8b import kernels as K
from bakedllama.llama8b.arch import Special
from bakedllama.llama8b.checkpoint import CACHE_DIR, Checkpoint, tensor_shape
from bakedllama.model import MATRICES, BakedModel

CACHE_VERSION = 1
ALIGN = 4096
BITS_TO_SCHEME = {"8": "w8", "4": "w4", "3/6": "w3/6"}
CALIB_TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, "
              "a small llama dreamed of silicon.")
CALIB_TOKENS = 32  # positions run through the float path for calibration (after BOS)
ERROR_ROWS = 512  # rows over which weight_rel_rms_error is reported (rel_rms_error's default)
CHUNK_ROWS = 8192  # embedding / classifier rows quantized at a time (a multiple of every lane count)


def scheme_for(bits: str) -> str:
    if bits in BITS_TO_SCHEME:
        return BITS_TO_SCHEME[bits]
    if bits in BITS_TO_SCHEME.values():
        return bits
    raise ValueError(f"--bits must be one of {', '.join(BITS_TO_SCHEME)} (got {bits!r})")


# ----------------------------------------------------------------------------- the float path
def rmsnorm_f(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope_f(v, cos, sin):
    """v (T, H, hd) interleaved pairs; cos, sin (T, hd/2)."""
    a, b = v[..., 0::2], v[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    out = np.empty_like(v)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def float_layer(cfg: ModelConfig, w: dict, x: np.ndarray, cos, sin, l: int, stats: dict | None):
    """One decoder block of the float reference over a whole sequence x (T, dim) at once
    (causal attention); the same maths and the same statistics as reference.FloatModel."""
    T, hd, H, KH = x.shape[0], cfg.head_dim, cfg.n_heads, cfg.n_kv_heads

    def track(name, v, layer=None):
        if stats is not None:
            key = name if layer is None else (name, layer)
            stats[key] = max(stats.get(key, 0.0), float(np.abs(v).max()))

    xb = rmsnorm_f(x, w["rms_att_weight"], cfg.norm_eps)
    q = rope_f((xb @ w["wq"].T).reshape(T, H, hd), cos, sin)
    k = rope_f((xb @ w["wk"].T).reshape(T, KH, hd), cos, sin)
    v = (xb @ w["wv"].T).reshape(T, KH, hd)
    track("qk", q), track("qk", k), track("k", k, l), track("v", v, l)
    kk = np.repeat(k, cfg.kv_mul, axis=1)  # (T, H, hd)
    vv = np.repeat(v, cfg.kv_mul, axis=1)
    att = np.einsum("thd,shd->hts", q, kk) / np.sqrt(hd)
    att = np.where(np.tril(np.ones((T, T), bool))[None], att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", att, vv).reshape(T, cfg.dim)
    x = x + o @ w["wo"].T
    track("x", x)
    xb = rmsnorm_f(x, w["rms_ffn_weight"], cfg.norm_eps)
    h1, h3 = xb @ w["w1"].T, xb @ w["w3"].T
    hb = h1 / (1 + np.exp(-h1)) * h3
    track("h", h1), track("h", h3), track("h", hb)
    x = x + hb @ w["w2"].T
    track("x", x)
    return x


def float_rope_tables(cfg: ModelConfig, T: int):
    inv = nx.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    ang = np.outer(np.arange(T), inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def layer_floats(ck: Checkpoint, l: int) -> dict:
    return {n: ck.tensor(n, l) for n in ("rms_att_weight", "wq", "wk", "wv", "wo",
                                         "rms_ffn_weight", "w1", "w3", "w2")}


def float_forward(ck: Checkpoint, tokens, stats: dict | None = None) -> np.ndarray:
    """Float logits (T, vocab) of a token sequence, streaming the checkpoint layer by layer."""
    cfg = ck.cfg
    tokens = np.asarray(tokens)
    cos, sin = float_rope_tables(cfg, len(tokens))
    x = ck.tensor("tok_embeddings")[tokens] if cfg.vocab_size * cfg.dim < 1 << 26 else \
        np.stack([ck.tensor("tok_embeddings", rows=slice(int(t), int(t) + 1))[0] for t in tokens])
    for l in range(cfg.n_layers):
        x = float_layer(cfg, layer_floats(ck, l), x, cos, sin, l, stats)
    xb = rmsnorm_f(x, ck.tensor("rms_final_weight"), cfg.norm_eps)
    return xb @ ck.tensor("tok_embeddings" if cfg.tied_embeddings else "wcls").T


# ----------------------------------------------------------------------------- quantization
def quantize_rows(get_rows, rows: int, cols: int, bits: int, group: int, chunk: int = 8192):
    """numerics.quantize_matrix of a matrix too large for float64 at once, chunk by chunk.

    Exactly equal to quantize_matrix(whole): its shift comes from the largest group scale, i.e.
    from the row holding max |w|; each chunk is quantized together with that pivot row, so every
    chunk sees the same shift, and per-row results do not depend on the other rows."""
    best, pivot = -1.0, None
    for r0 in range(0, rows, chunk):
        w = get_rows(r0, min(rows, r0 + chunk))
        i = int(np.abs(w).max(axis=1).argmax())
        if float(np.abs(w[i]).max()) > best:
            best, pivot = float(np.abs(w[i]).max()), w[i].copy()
    qs, ms, shift = [], [], None
    for r0 in range(0, rows, chunk):
        w = get_rows(r0, min(rows, r0 + chunk))
        qt = nx.quantize_matrix(np.vstack([w, pivot[None]]), bits, group)
        qs.append(qt.q[:-1])
        ms.append(qt.m[:-1])
        shift = int(qt.shift)
    return nx.QTensor(np.concatenate(qs), np.concatenate(ms), np.asarray(shift, np.int32), bits,
                      group)


def rel_rms_error(qt: nx.QTensor, w: np.ndarray, max_rows: int = 512) -> float:
    """Relative RMS quantization error on (up to) the first max_rows rows."""
    n = min(max_rows, w.shape[0])
    sub = nx.QTensor(qt.q[:n], qt.m[:n], qt.shift, qt.bits, qt.group)
    err = sub.dequantize() - w[:n]
    return round(float(np.sqrt((err ** 2).mean() / max((w[:n] ** 2).mean(), 1e-30))), 5)


# ----------------------------------------------------------------------------- the model in memory
@dataclass
class QuantModel:
    """The quantized model as the partitioned runner sees it (arrays may be memory-mapped)."""

    cfg: ModelConfig
    special: Special
    fmt: dict  # numerics formats: bake.py's keys (f_x, f_qk, f_h, e_k, e_v, eps_int, f_g_*, ...)
    embed: nx.QTensor  # tok_embeddings (vocab, dim) plain int8 q
    mats: dict  # (name, layer) -> kernels.Packed; wcls under ("wcls", None)
    norms: dict  # (name, layer) -> int16 gains (rms_att_weight / rms_ffn_weight per layer,
    #              rms_final_weight under layer None)
    meta: dict = field(default_factory=dict)
    path: Path | None = None
    maps: dict = field(default_factory=dict)  # file name -> mmap (cache-backed models)
    where: dict = field(default_factory=dict)  # id(array) -> (file name, offset, nbytes)

    def bits(self, name: str) -> tuple[int, int]:
        w = self.fmt["weights"][name]
        return w["bits"], w["group"]

    def weight_bytes(self) -> int:
        """Accelerator storage of all weights (packed bits + multipliers + gains)."""
        from bakedllama.llama8b.partition import model_units

        return sum(u.nbytes for u in model_units(self.cfg, self.fmt))

    def to_baked(self) -> BakedModel:
        """The same model as the golden model's BakedModel (unpacked; for tests on small models)."""
        c, L = self.cfg, self.cfg.n_layers
        weights = {"tok_embeddings": nx.QTensor(np.asarray(self.embed.q), np.asarray(self.embed.m),
                                                np.asarray(self.embed.shift, np.int32),
                                                self.embed.bits, self.embed.group)}
        for n in MATRICES:
            parts = [K.unpack(self.mats[(n, l)]) for l in range(L)]
            weights[n] = nx.QTensor(np.stack([q for q, _ in parts]), np.stack([m for _, m in parts]),
                                    np.array([self.mats[(n, l)].shift for l in range(L)], np.int32),
                                    *self.bits(n))
        if not c.tied_embeddings:
            q, m = K.unpack(self.mats[("wcls", None)])
            weights["wcls"] = nx.QTensor(q, m, np.asarray(self.mats[("wcls", None)].shift, np.int32),
                                         *self.bits("wcls"))
        norms = {n: np.stack([self.norms[(n, l)] for l in range(L)])
                 for n in ("rms_att_weight", "rms_ffn_weight")}
        norms["rms_final_weight"] = self.norms[("rms_final_weight", None)]
        return BakedModel(c, weights, norms, self.fmt, dict(self.meta))

    def pin(self, keys=None, huge: bool = True) -> int:
        """Copy the packed matrices (`keys` of mats, default all) out of the cache mapping into
        anonymous memory (huge pages where the kernel gives them) and drop the mapped pages:
        for a resident run. Returns the bytes copied. Measured on a Xeon VM: the decode kernels
        read the page-cache pages of the mapping ~20-30 % slower than anonymous memory (4.2 GB of
        w4: 390-410 ms a step mapped, 315 copied to 4 KiB pages, 310 to huge pages; the copy took
        4 s with huge pages, 16 s without)."""
        done = 0
        for key in (self.mats if keys is None else keys):
            p = self.mats[key]
            new = []
            for a in [*p.planes, p.m]:
                b = _anonymous_like(a, huge)
                b[...] = a
                self.release(a)
                self.where.pop(id(a), None)  # (keyed by id: a later array may reuse it)
                new.append(b)
                done += a.nbytes
            p.planes, p.m = new[:-1], new[-1]
        return done

    def release(self, a: np.ndarray, lo: int = 0, hi: int | None = None) -> None:
        """Drop bytes [lo, hi) of a cache-backed array from this process's memory (streaming:
        the pages stay in the OS page cache, so the next touch maps them again without I/O)."""
        loc = self.where.get(id(a))
        if loc is None:
            return
        fname, off, n = loc
        hi = n if hi is None else hi
        mm = self.maps[fname]
        start = (off + lo) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(mm), -(-(off + hi) // mmap.PAGESIZE) * mmap.PAGESIZE)
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _anonymous_like(a: np.ndarray, huge: bool) -> np.ndarray:
    """An uninitialised array of a's shape and dtype in its own anonymous mapping (MADV_HUGEPAGE
    asked for when `huge`)."""
    mm = mmap.mmap(-1, max(a.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(mm, dtype=a.dtype, count=a.size).reshape(a.shape)


def pack_policy(store: str):
    if store not in ("fast", "tight"):
        raise ValueError(f"unknown packing {store!r} (fast or tight)")
    return (lambda bits: K.STORE_FAST[bits]) if store == "fast" else (lambda bits: bits)


def from_baked(b: BakedModel, store: str = "fast", special: Special | None = None) -> QuantModel:
    """Pack a golden-model BakedModel (bake.py / synthetic.random_baked) for the runner."""
    c, sb = b.cfg, pack_policy(store)
    mats, norms = {}, {}
    for n in MATRICES:
        w = b.weights[n]
        for l in range(c.n_layers):
            mats[(n, l)] = K.pack(w.q[l], w.m[l], int(w.shift[l]), w.bits, w.group, sb(w.bits))
    wc = b.wcls
    mats[("wcls", None)] = K.pack(wc.q, wc.m, int(wc.shift), wc.bits, wc.group, sb(wc.bits))
    for n in ("rms_att_weight", "rms_ffn_weight"):
        for l in range(c.n_layers):
            norms[(n, l)] = b.norms[n][l]
    norms[("rms_final_weight", None)] = b.norms["rms_final_weight"]
    fmt = dict(b.fmt)
    if "wcls" not in fmt["weights"]:
        fmt["weights"] = dict(fmt["weights"], wcls=fmt["weights"]["tok_embeddings"])
    return QuantModel(c, special or Special(-1, ()), fmt, b.weights["tok_embeddings"], mats, norms,
                      dict(b.meta, store=store))


# ----------------------------------------------------------------------------- the on-disk cache
class _Writer:
    """Appends 4096-aligned arrays to one file, hashing as it goes. With `io` (a one-thread
    executor) the writing and hashing run there, in order, while the caller computes on; the
    arrays handed over must not change afterwards, and close() then returns a Future."""

    MAX_QUEUED = 8  # writes waiting at most (each holds its array)

    def __init__(self, path: Path, io=None):
        self.path, self.f, self.h, self.off, self.entries = path, open(path, "wb"), hashlib.sha256(), 0, []
        self.io, self.jobs = io, []

    def add(self, key: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        pad = (-self.off) % ALIGN
        if pad:
            self._write(b"\0" * pad)
        self.entries.append(dict(key=key, offset=self.off, dtype=a.dtype.name, shape=list(a.shape)))
        self._write(memoryview(a.reshape(-1).view(np.uint8)))

    def begin(self, key: str, dtype, shape) -> None:
        """Start an array whose bytes follow in pieces (write): the file is the same as add's."""
        pad = (-self.off) % ALIGN
        if pad:
            self._write(b"\0" * pad)
        self.entries.append(dict(key=key, offset=self.off, dtype=np.dtype(dtype).name,
                                 shape=[int(v) for v in shape]))

    def write(self, a: np.ndarray) -> None:
        self._write(memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))

    def _write(self, b) -> None:
        self.off += len(b)
        if self.io is None:
            self._put(b)
            return
        while self.jobs and self.jobs[0].done():
            self.jobs.pop(0).result()  # (raises a failed write's error)
        if len(self.jobs) >= self.MAX_QUEUED:
            self.jobs.pop(0).result()
        self.jobs.append(self.io.submit(self._put, b))

    def _put(self, b) -> None:
        self.f.write(b)
        self.h.update(b)

    def close(self, sync: bool = True):
        """Pad, close, and (sync) fsync; a build syncs all its files at its end instead (the
        kernel writes them back meanwhile, so no wait per file). -> the file's manifest entry
        (or a Future of it, with `io`)."""
        pad = (-self.off) % ALIGN
        if pad:
            self._write(b"\0" * pad)
        size, entries, jobs = self.off, self.entries, self.jobs

        def finish():
            for j in jobs:
                j.result()
            self.f.flush()
            if sync:
                os.fsync(self.f.fileno())
            self.f.close()
            return dict(sha256=self.h.hexdigest(), size=size, entries=entries)

        if self.io is None:
            return finish()
        return self.io.submit(finish)


def _add_packed(wr: _Writer, key: str, p: K.Packed) -> dict:
    for i, pl in enumerate(p.planes):
        wr.add(f"{key}.plane{i}", pl)
    wr.add(f"{key}.m", p.m)
    return dict(shift=p.shift, bits=p.bits, group=p.group, rows=p.rows, cols=p.cols,
                store_bits=p.store_bits, planes=len(p.planes))


def cache_key(ck: Checkpoint, scheme: str, store: str) -> str:
    s = json.dumps(dict(v=CACHE_VERSION, src=ck.identity(), scheme=scheme, store=store,
                        calib=CALIB_TEXT, n=CALIB_TOKENS, numerics=_numerics_identity()))
    return hashlib.sha256(s.encode()).hexdigest()


def _numerics_identity() -> str:
    """A digest of everything that decides the cache's contents (quantization and the format
    rules): a change there rebuilds caches; edits elsewhere in numerics do not."""
    import inspect

    from bakedllama import bake

    src = [inspect.getsource(f) for f in (nx.quantize_matrix, nx.norm_weight_q, nx.rms_eps_int,
                                          nx.qmax, bake.frac_for, bake.scheme_format)]
    src += [repr((nx.M_BITS, nx.ACT_MAX, nx.INT16_MAX, bake.HEADROOM, bake.SCHEMES))]
    return hashlib.sha256("\n".join(src).encode()).hexdigest()[:16]


def cache_path(ck: Checkpoint, scheme: str, store: str, cache_dir=CACHE_DIR) -> Path:
    tag = scheme.replace("/", "-")
    return Path(cache_dir) / f"q-{ck.path.name}-{tag}-{store}-{cache_key(ck, scheme, store)[:12]}"


def calibration_tokens(ck: Checkpoint) -> list[int]:
    ids = ck.tokenizer().encode(CALIB_TEXT, add_special_tokens=False).ids[:CALIB_TOKENS]
    bos = [ck.special.bos] if 0 <= ck.special.bos < ck.cfg.vocab_size else []
    return bos + [i for i in ids if i < ck.cfg.vocab_size]


def build_cache(ck: Checkpoint, scheme: str, store: str = "fast", cache_dir=CACHE_DIR,
                show_progress: bool = True, log=None) -> Path:
    """Quantize `ck` into the cache (once): returns the cache directory.

    Built in a temporary directory next to it and renamed into place when complete: an error or
    Ctrl-C leaves no cache (the temporary directory is removed)."""
    out = cache_path(ck, scheme, store, cache_dir)
    if (out / "manifest.json").exists():
        return out
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _build(ck, scheme, store, tmp, show_progress, t0)
        if out.exists() and not (out / "manifest.json").exists():
            shutil.rmtree(out)  # a half-built cache of an earlier version (built in place)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "manifest.json").exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if log:
        log(f"quantized cache built in {json.loads((out / 'manifest.json').read_text())['build_seconds']}"
            f" s: {out}")
    return out


def _remove_stale(out: Path) -> None:
    """Temporary directories of builds whose process is gone (killed without clean-up)."""
    for d in out.parent.glob(".q-*.tmp-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


class _Pool:
    """Named buffers reused from tensor to tensor: a fresh 0.5 GB array costs ~0.3 s of page
    faults, a reused one nothing. take() hands out a view; the slot's previous view is dead."""

    def __init__(self):
        self.bufs = {}

    def take(self, slot: str, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        buf = self.bufs.get(slot)
        if buf is None or buf.size < n:
            buf = self.bufs[slot] = np.empty(n, np.uint8)
        return buf[:n].view(dtype).reshape(shape)


class _MatrixT:
    """w.T for float_layer's `x @ w.T`, computed as numpy computes it (the product in the
    promoted type: x float64 casts w to float64) but with the cast into a reused buffer (numpy's
    own cast allocates a fresh 0.5 GB per FFN matrix). The same BLAS call on the same values."""

    __array_ufunc__ = None  # numpy hands `x @ self` to __rmatmul__

    def __init__(self, w: np.ndarray, pool: _Pool):
        self.w, self.pool = w, pool

    def __rmatmul__(self, x):
        if np.result_type(x, self.w) == np.float64 and self.w.dtype != np.float64:
            w64 = self.pool.take("f64", self.w.shape, np.float64)
            np.copyto(w64, self.w)
            return x @ w64.T
        return x @ self.w.T


class _Matrix:
    def __init__(self, w: np.ndarray, pool: _Pool):
        self.T = _MatrixT(w, pool)


class _Ahead:
    """Reads a known sequence of tensors one ahead, on a thread (`io`), each into one of two
    buffers used in turn: an array get() returned stays valid until the next-but-one get().
    A get() off the sequence is read there and then (correct, only not ahead)."""

    def __init__(self, io, seq: list, load):
        self.io, self.seq, self.load = io, seq, load  # load(key, buffer slot) -> array
        self.i, self.fut = 0, None

    def _job(self, i: int):
        return self.load(self.seq[i], f"ahead{i % 2}")

    def get(self, key):
        fut, self.fut = self.fut, None
        if self.i < len(self.seq) and self.seq[self.i] == key:
            a = fut.result() if fut is not None else self._job(self.i)
        else:
            if fut is not None:
                fut.result()
            a = self.load(key, f"ahead{self.i % 2}")
        self.i += 1
        if self.i < len(self.seq):
            self.fut = self.io.submit(self._job, self.i)
        return a


FLOAT_ORDER = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")  # the order float_layer asks for them


class _LayerWeights:
    """One layer's float tensors for float_layer, read from the checkpoint when float_layer asks
    (each once, read ahead into reused buffers), and quantized on the way (`hook`): one or two
    matrices in float at a time."""

    def __init__(self, ahead: _Ahead, l: int, norms: dict, hook, pool: _Pool):
        self.ahead, self.l, self.norms, self.hook, self.pool = ahead, l, norms, hook, pool

    def __getitem__(self, n: str):
        if n in self.norms:
            return self.norms[n]
        f = self.ahead.get((n, self.l))
        self.hook(n, f)
        return _Matrix(f, self.pool)


def _scales_and_shift(get_rows, rows: int, bits: int, group: int, chunk: int):
    """Pass 1 over a big matrix in row chunks: every group's scale and the matrix shift."""
    qm = float(nx.qmax(bits))
    scales = [fq.group_scales(get_rows(r0, min(rows, r0 + chunk)), group, qm)
              for r0 in range(0, rows, chunk)]
    return scales, fq.shift_for(max(float(sc.max()) for sc in scales))


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _build_resources(c0: float) -> dict:
    """What the build cost (the figures make bench reports): CPU seconds of all threads, the
    process's peak resident memory so far, and the threads the kernels ran on."""
    import numba

    return dict(cpu_seconds=round(_cpu_seconds() - c0, 1), threads=numba.get_num_threads(),
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _first_rows_error(first: list, shift: int, bits: int, group: int, get_rows) -> float:
    """rel_rms_error of a chunked matrix over its first ERROR_ROWS rows, as of the whole."""
    q, m = np.concatenate([a for a, _ in first]), np.concatenate([b for _, b in first])
    return rel_rms_error(nx.QTensor(q, m, np.asarray(shift, np.int32), bits, group),
                         get_rows(0, q.shape[0]), ERROR_ROWS)


def _build(ck: Checkpoint, scheme: str, store: str, out: Path, show_progress: bool, t0: float):
    """Write the cache files and (last) manifest.json into `out`: tensor by tensor, each read
    (one ahead, on a thread), quantized (fastquant: numerics.quantize_matrix's bytes), packed,
    written (on another thread) and dropped."""
    from concurrent.futures import ThreadPoolExecutor

    c0 = _cpu_seconds()
    rio, wio = (ThreadPoolExecutor(1, thread_name_prefix=f"cache-{k}") for k in ("read", "write"))
    try:
        files, manifest = _build_files(ck, scheme, store, out, show_progress, t0, rio, wio)
        files = {k: v.result() for k, v in files.items()}  # every write done (or its error)
    finally:
        for ex in (rio, wio):
            ex.shutdown(wait=True, cancel_futures=True)
    manifest["files"] = files
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    manifest["build"] = _build_resources(c0)
    for f in files:
        fd = os.open(out / f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _build_files(ck: Checkpoint, scheme: str, store: str, out: Path, show_progress: bool, t0: float,
                 rio, wio):
    from tqdm import tqdm

    cfg, sb = ck.cfg, pack_policy(store)
    files, tensors, errors, stats, wfmt = {}, {}, {}, {}, {}
    V, D, L = cfg.vocab_size, cfg.dim, cfg.n_layers
    for n in ("tok_embeddings",) + MATRICES + ("wcls",):  # the order the manifest lists them in
        cols = D if n in ("tok_embeddings", "wcls") else tensor_shape(cfg, n)[1]
        bits, group = scheme_format(scheme, n, cols)
        wfmt[n] = dict(bits=bits, group=group, acc_bits=nx.matvec_acc_bits(bits, group, cols))
    toks = calibration_tokens(ck)
    cos, sin = float_rope_tables(cfg, len(toks))
    total = 2 * V * D + L * sum(int(np.prod(tensor_shape(cfg, n))) for n in MATRICES)
    bar = tqdm(total=total, desc=f"quantize {scheme}", unit="w", unit_scale=True,
               disable=not show_progress, smoothing=0.05)
    chunk, pool = CHUNK_ROWS, _Pool()
    src = "tok_embeddings" if cfg.tied_embeddings else "wcls"
    chunks = [(r0, min(V, r0 + chunk)) for r0 in range(0, V, chunk)]
    # every read in order: embedding (scales pass, then quantize pass), layers, classifier
    seq = [("tok_embeddings", a, b) for a, b in chunks] * 2
    seq += [(n, l) for l in range(L) for n in FLOAT_ORDER] + [(src, a, b) for a, b in chunks] * 2

    def load(key, slot):
        if len(key) == 3:
            return ck.tensor(key[0], rows=slice(key[1], key[2]),
                             out=pool.take(slot, (key[2] - key[1], D), np.float32))
        return ck.tensor(key[0], key[1], out=pool.take(slot, tensor_shape(cfg, key[0]), np.float32))

    ahead = _Ahead(rio, seq, load)

    def rows_of(name):  # (a, b) -> rows a:b of a big matrix (read ahead)
        return lambda a, b: ahead.get((name, a, b))

    def qm_buffers(shape, group):  # q, m of a quantize_matrix, reused
        return pool.take("q", shape, np.int8), pool.take("m", (shape[0], shape[1] // group), np.uint16)

    def error_rows(name):
        return lambda a, b: ck.tensor(name, rows=slice(a, b))

    # embedding: a plain QTensor (row lookups), in row chunks: scales and shift, then quantized
    bits, group = wfmt["tok_embeddings"]["bits"], wfmt["tok_embeddings"]["group"]
    emb = rows_of("tok_embeddings")
    scales, shift = _scales_and_shift(emb, V, bits, group, chunk)
    wr = _Writer(out / "embed.bin", wio)
    wr.begin("tok_embeddings.q", np.int8, (V, D))
    ms, first = [], []
    for i, (r0, r1) in enumerate(chunks):
        w = emb(r0, r1)
        qt = fq.quantize_matrix(w, bits, group, shift, scales[i])  # (fresh q: written on a thread)
        if r0 < ERROR_ROWS:
            first.append((qt.q[:ERROR_ROWS - r0].copy(), qt.m[:ERROR_ROWS - r0].copy()))
        wr.write(qt.q)
        ms.append(qt.m)
        bar.update(w.size)
    wr.add("tok_embeddings.m", np.concatenate(ms))
    errors["tok_embeddings"] = _first_rows_error(first, shift, bits, group, error_rows("tok_embeddings"))
    files["embed.bin"] = wr.close(sync=False)
    tensors["tok_embeddings"] = dict(shift=int(shift), bits=bits, group=group)
    del ms, scales
    x = np.asarray(ck.tensor("tok_embeddings", rows=slice(0, V)) if V * D < 1 << 26 else
                   np.stack([ck.tensor("tok_embeddings", rows=slice(t, t + 1))[0] for t in toks]))
    if V * D < 1 << 26:
        x = x[toks]
    stats["x"] = float(np.abs(x).max())

    gains = {"rms_att_weight": [], "rms_ffn_weight": []}
    for l in range(L):
        name = f"layer-{l:02d}.bin"
        wr = _Writer(out / name, wio)
        norms = {n: ck.tensor(n, l) for n in gains}
        for n in gains:
            gq, fg = nx.norm_weight_q(norms[n])
            gains[n].append(fg)
            wr.add(f"{n}.{l}", gq)
        pending, order = {}, list(MATRICES)

        def hook(n, f, l=l, wr=wr, pending=pending, order=order):
            fb, fgr = wfmt[n]["bits"], wfmt[n]["group"]
            qt = fq.quantize_matrix(f, fb, fgr, out=qm_buffers(f.shape, fgr))
            pending[n] = (fq.pack(qt.q, qt.m, int(qt.shift), fb, fgr, sb(fb)),
                          rel_rms_error(qt, f) if l == 0 else None)
            bar.update(f.size)
            while order and order[0] in pending:  # the file keeps MATRICES order
                k = order.pop(0)
                p, err = pending.pop(k)
                if err is not None:
                    errors[k] = err
                tensors[f"{k}.{l}"] = _add_packed(wr, f"{k}.{l}", p)

        x = float_layer(cfg, _LayerWeights(ahead, l, norms, hook, pool), x, cos, sin, l, stats)
        assert not order and not pending, (order, list(pending))
        files[name] = wr.close(sync=False)

    wr = _Writer(out / "head.bin", wio)
    gq, f_g_final = nx.norm_weight_q(ck.tensor("rms_final_weight"))
    wr.add("rms_final_weight", gq)
    bits, group = wfmt["wcls"]["bits"], wfmt["wcls"]["group"]
    cls = rows_of(src)
    scales, shift = _scales_and_shift(cls, V, bits, group, chunk)
    later, first = [], []  # planes after the first and the multipliers, written after plane 0
    for i, (r0, r1) in enumerate(chunks):
        w = cls(r0, r1)
        qt = fq.quantize_matrix(w, bits, group, shift, scales[i], out=qm_buffers(w.shape, group))
        if r0 < ERROR_ROWS:
            first.append((qt.q[:ERROR_ROWS - r0].copy(), qt.m[:ERROR_ROWS - r0].copy()))
        p = fq.pack(qt.q, qt.m, shift, bits, group, sb(bits))
        if i == 0:
            wr.begin("wcls.plane0", p.planes[0].dtype, (-(-V // p.lanes),) + p.planes[0].shape[1:])
            later = [[] for _ in p.planes[1:]] + [[]]
        wr.write(p.planes[0])
        for lst, a in zip(later, p.planes[1:] + [p.m]):
            lst.append(a)
        bar.update(w.size)
    errors["wcls"] = _first_rows_error(first, shift, bits, group, error_rows(src))
    for j, lst in enumerate(later[:-1]):
        wr.add(f"wcls.plane{j + 1}", np.concatenate(lst))
    wr.add("wcls.m", np.concatenate(later[-1]))
    tensors["wcls"] = dict(shift=int(shift), bits=bits, group=group, rows=V, cols=D,
                           store_bits=sb(bits), planes=len(later))
    del later
    files["head.bin"] = wr.close(sync=False)
    bar.close()
    fmt = dict(
        f_x=frac_for(stats["x"], nx.INT16_MAX), f_qk=frac_for(stats["qk"], nx.INT16_MAX),
        f_h=frac_for(stats["h"], nx.INT16_MAX),
        e_k=[frac_for(stats[("k", l)], nx.ACT_MAX) for l in range(L)],
        e_v=[frac_for(stats[("v", l)], nx.ACT_MAX) for l in range(L)],
        scheme=scheme, weights=wfmt,
        calibration={str(k) if not isinstance(k, tuple) else f"{k[0]}{k[1]}": round(v, 4)
                     for k, v in stats.items()},
        f_g_rms_att_weight=gains["rms_att_weight"], f_g_rms_ffn_weight=gains["rms_ffn_weight"],
        f_g_rms_final_weight=f_g_final, weight_rel_rms_error=errors)
    fmt["eps_int"] = nx.rms_eps_int(cfg.norm_eps, cfg.dim, fmt["f_x"])
    manifest = dict(version=CACHE_VERSION, source=str(ck.path), source_identity=ck.identity(),
                    config=cfg.to_dict(), special=dict(bos=ck.special.bos, stop=list(ck.special.stop)),
                    numerics=fmt, tensors=tensors, files=None, store=store,
                    calibration=dict(text=CALIB_TEXT, tokens=toks, method="float path, streamed "
                                     "layer by layer; bake.py's frac_for/HEADROOM rules"),
                    build_seconds=None, numerics_identity=_numerics_identity(), build=None)
    return files, manifest


def _verify(path: Path, info: dict) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    if h.hexdigest() != info["sha256"]:
        raise ModelFileError(f"{path}: checksum mismatch (the quantized cache is corrupt; delete "
                             f"{path.parent} to rebuild it)")


def open_cache(path: str | Path, verify: bool = True) -> QuantModel:
    """Memory-map a built cache (checking every file's sha256 unless verify=False)."""
    path = Path(path)
    try:
        man = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no quantized cache here (manifest.json missing)") from None
    if man.get("version") != CACHE_VERSION:
        raise ModelFileError(f"{path}: cache version {man.get('version')}, expected {CACHE_VERSION}")
    cfg = ModelConfig.from_dict(man["config"])
    arrays, maps, where = {}, {}, {}
    for fname, info in man["files"].items():
        p = path / fname
        if not p.exists() or p.stat().st_size != info["size"]:
            raise ModelFileError(f"{p}: missing or truncated (delete {path} to rebuild the cache)")
        if verify:
            _verify(p, info)
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        maps[fname] = mm
        for e in info["entries"]:
            dt = np.dtype(e["dtype"])
            n = int(np.prod(e["shape"])) * dt.itemsize
            a = np.frombuffer(mm, dtype=dt, count=n // dt.itemsize, offset=e["offset"]).reshape(e["shape"])
            arrays[e["key"]] = a
            where[id(a)] = (fname, e["offset"], n)
    t = man["tensors"]

    def packed(key):
        d = t[key]
        planes = [arrays[f"{key}.plane{i}"] for i in range(d["planes"])]
        return K.Packed(planes, arrays[f"{key}.m"], d["shift"], d["bits"], d["group"], d["rows"],
                        d["cols"], d["store_bits"])

    e = t["tok_embeddings"]
    embed = nx.QTensor(arrays["tok_embeddings.q"], arrays["tok_embeddings.m"],
                       np.asarray(e["shift"], np.int32), e["bits"], e["group"])
    mats = {(n, l): packed(f"{n}.{l}") for n in MATRICES for l in range(cfg.n_layers)}
    mats[("wcls", None)] = packed("wcls")
    norms = {(n, l): arrays[f"{n}.{l}"] for n in ("rms_att_weight", "rms_ffn_weight")
             for l in range(cfg.n_layers)}
    norms[("rms_final_weight", None)] = arrays["rms_final_weight"]
    sp = Special(man["special"]["bos"], tuple(man["special"]["stop"]))
    return QuantModel(cfg, sp, man["numerics"], embed, mats, norms, man, path, maps, where)


def quantized(ck: Checkpoint, bits: str = "8", store: str = "fast", cache_dir=CACHE_DIR,
              verify: bool = True, show_progress: bool = True, log=None) -> QuantModel:
    """The checkpoint's quantized model: built into the cache the first time, then mapped."""
    path = build_cache(ck, scheme_for(bits), store, cache_dir, show_progress, log)
    qm = open_cache(path, verify)
    # the run's context, not the one the cache was built with
    qm.cfg = ModelConfig.from_dict(dict(qm.cfg.to_dict(), seq_len=ck.cfg.seq_len))
    return qm
