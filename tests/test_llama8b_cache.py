"""The 8B path's quantized cache build (llama8b.quant + fastquant): the same bytes as before, fast.

The reference is the cache builder as it was before fastquant (numerics.quantize_matrix per matrix,
quant.quantize_rows for the embedding and classifier, kernels.pack, the same writer), kept here
verbatim; the new builder must write byte-identical files. fastquant's kernels are also compared
with numerics.quantize_matrix and kernels.pack directly on the 8B's shapes, with their exact
fall-back paths forced on. Speed is measured in scripts/bench.py, not here."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama.bake import frac_for, scheme_format
from bakedllama.llama8b import checkpoint, fastquant, kernels, quant
from bakedllama.model import MATRICES

ALIGN = 4096


class ReferenceWriter:
    """quant._Writer as it was (main at 251d32b)."""

    def __init__(self, path: Path):
        self.path, self.f, self.h, self.off, self.entries = path, open(path, "wb"), hashlib.sha256(), 0, []

    def add(self, key: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a)
        pad = (-self.off) % ALIGN
        if pad:
            self._write(b"\0" * pad)
        self.entries.append(dict(key=key, offset=self.off, dtype=a.dtype.name, shape=list(a.shape)))
        self._write(memoryview(a.reshape(-1).view(np.uint8)))

    def _write(self, b) -> None:
        self.f.write(b)
        self.h.update(b)
        self.off += len(b)

    def close(self) -> dict:
        pad = (-self.off) % ALIGN
        if pad:
            self._write(b"\0" * pad)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return dict(sha256=self.h.hexdigest(), size=self.off, entries=self.entries)


def reference_build_cache(ck, scheme: str, store: str, cache_dir) -> Path:
    """quant.build_cache as it was before fastquant (main at 251d32b), verbatim but for the
    progress bar and the log: numerics.quantize_matrix, quant.quantize_rows, kernels.pack."""
    out = quant.cache_path(ck, scheme, store, cache_dir)
    if (out / "manifest.json").exists():
        return out
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cfg, sb = ck.cfg, quant.pack_policy(store)
    files, tensors, errors, stats = {}, {}, {}, {}
    wfmt = {}

    def fmt_of(name, cols):
        bits, group = scheme_format(scheme, name, cols)
        wfmt[name] = dict(bits=bits, group=group, acc_bits=nx.matvec_acc_bits(bits, group, cols))
        return bits, group

    toks = quant.calibration_tokens(ck)
    cos, sin = quant.float_rope_tables(cfg, len(toks))
    V, D = cfg.vocab_size, cfg.dim
    # embedding: a plain QTensor (row lookups), quantized in row chunks
    bits, group = fmt_of("tok_embeddings", D)
    qt = quant.quantize_rows(lambda a, b: ck.tensor("tok_embeddings", rows=slice(a, b)), V, D, bits,
                             group)
    errors["tok_embeddings"] = quant.rel_rms_error(qt, ck.tensor("tok_embeddings",
                                                                 rows=slice(0, 512)))
    x = np.asarray(ck.tensor("tok_embeddings", rows=slice(0, V)) if V * D < 1 << 26 else
                   np.stack([ck.tensor("tok_embeddings", rows=slice(t, t + 1))[0] for t in toks]))
    if V * D < 1 << 26:
        x = x[toks]
    stats["x"] = float(np.abs(x).max())
    wr = ReferenceWriter(out / "embed.bin")
    wr.add("tok_embeddings.q", qt.q)
    wr.add("tok_embeddings.m", qt.m)
    files["embed.bin"] = wr.close()
    tensors["tok_embeddings"] = dict(shift=int(qt.shift), bits=bits, group=group)
    del qt
    gains = {"rms_att_weight": [], "rms_ffn_weight": []}
    for l in range(cfg.n_layers):
        w = quant.layer_floats(ck, l)
        x = quant.float_layer(cfg, w, x, cos, sin, l, stats)
        name = f"layer-{l:02d}.bin"
        wr = ReferenceWriter(out / name)
        for n in ("rms_att_weight", "rms_ffn_weight"):
            gq, fg = nx.norm_weight_q(w[n])
            gains[n].append(fg)
            wr.add(f"{n}.{l}", gq)
        for n in MATRICES:
            f = w.pop(n)
            bits, group = fmt_of(n, f.shape[1])
            qt = nx.quantize_matrix(f, bits, group)
            if l == 0:
                errors[n] = quant.rel_rms_error(qt, f)
            tensors[f"{n}.{l}"] = quant._add_packed(wr, f"{n}.{l}", kernels.pack(
                qt.q, qt.m, int(qt.shift), bits, group, sb(bits)))
            del f, qt
        files[name] = wr.close()
    wr = ReferenceWriter(out / "head.bin")
    gq, f_g_final = nx.norm_weight_q(ck.tensor("rms_final_weight"))
    wr.add("rms_final_weight", gq)
    src = "tok_embeddings" if cfg.tied_embeddings else "wcls"
    bits, group = fmt_of("wcls", D)
    step = 16384
    qt = quant.quantize_rows(lambda a, b: ck.tensor(src, rows=slice(a, b)), V, D, bits, group, step)
    errors["wcls"] = quant.rel_rms_error(qt, ck.tensor(src, rows=slice(0, 512)))
    tensors["wcls"] = quant._add_packed(wr, "wcls", kernels.pack(qt.q, qt.m, int(qt.shift), bits,
                                                                 group, sb(bits)))
    del qt
    files["head.bin"] = wr.close()
    L = cfg.n_layers
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
    manifest = dict(version=quant.CACHE_VERSION, source=str(ck.path), source_identity=ck.identity(),
                    config=cfg.to_dict(), special=dict(bos=ck.special.bos, stop=list(ck.special.stop)),
                    numerics=fmt, tensors=tensors, files=files, store=store,
                    calibration=dict(text=quant.CALIB_TEXT, tokens=toks, method="float path, streamed "
                                     "layer by layer; bake.py's frac_for/HEADROOM rules"),
                    build_seconds=round(time.perf_counter() - t0, 1),
                    numerics_identity=quant._numerics_identity())
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return out



@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b_cache")
    return checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, d, show_progress=False)


def _same_cache(a: Path, b: Path) -> None:
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma.pop("build_seconds") >= 0 and mb.pop("build_seconds") >= 0
    assert mb.pop("build")["peak_rss_bytes"] > 0  # the new builder reports its costs
    assert ma == mb
    assert json.dumps(ma) == json.dumps(mb)  # the same key order too
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) == sorted(["manifest.json", *ma["files"]])
    for f in ma["files"]:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize("scheme,store,chunk", [("w8", "fast", 8192), ("w4", "fast", 256),
                                                ("w3/6", "fast", 8192), ("w3/6", "tight", 256)])
def test_cache_is_byte_identical_to_the_reference(tiny_ck, tmp_path, monkeypatch, scheme, store, chunk):
    """The tiny synthetic model's cache, old builder vs new (chunk 256: the embedding and the
    classifier in two pieces; tight 3/6: several bit planes, the later ones written after)."""
    ref = reference_build_cache(tiny_ck, scheme, store, tmp_path / "ref")
    monkeypatch.setattr(quant, "CHUNK_ROWS", chunk)
    new = quant.build_cache(tiny_ck, scheme, store, tmp_path / "new", show_progress=False)
    assert new.name == ref.name
    _same_cache(ref, new)  # (ref first: the reference has no 'build' entry)
    qm = quant.open_cache(new)  # and it opens (checksums verified)
    assert qm.fmt["scheme"] == scheme


def _bf16(x):
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _matrices(rng):
    """8B-shaped row blocks (bf16 like the checkpoints, and plain float32), with rows that make
    ties: zeros, one spike, small integers times powers of two (exactly representable steps)."""
    for rows, cols in ((48, 4096), (16, 14336), (40, 160)):
        w = _bf16(rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02))
        w[1] = 0
        w[2] = 0
        w[2, 7] = 0.25
        w[3] = rng.integers(-16, 17, cols) * 2.0 ** -10
        w[4, : cols // 2] = 2.0 ** -9
        w[5] *= 40  # a row far above the others: the shift follows it
        yield w
        yield rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)


@pytest.mark.parametrize("bits,group", [(8, None), (6, 32), (4, 32), (3, 32), (2, 32), (8, 32)])
def test_fastquant_equals_quantize_matrix(bits, group):
    rng = np.random.default_rng(bits * 100 + (group or 0))
    for w in _matrices(rng):
        g = w.shape[1] if group is None else group
        ref = nx.quantize_matrix(w, bits, g)
        # default bounds; every search decided in float64 (float32 bounds too wide to call);
        # every search by the spec's arithmetic; every q by true division
        T = fastquant.TOL
        for tol in (None, T[:3] + (1.0, 1.0, T[5]), (1.0, 1.0, T[2], 1.0, 1.0, T[5]),
                    (T[0], T[1], 1.0, T[3], T[4], 1.0)):
            got = fastquant.quantize_matrix(w, bits, g, tol=tol)
            assert np.array_equal(got.q, ref.q) and got.q.dtype == ref.q.dtype
            assert np.array_equal(got.m, ref.m) and got.m.dtype == ref.m.dtype
            assert int(got.shift) == int(ref.shift)
        # a chunk quantized with the whole matrix's shift and scales is the whole's rows
        scale = fastquant.group_scales(w, g, float(nx.qmax(bits)))
        part = fastquant.quantize_matrix(w[8:24], bits, g, int(ref.shift), scale[8:24])
        assert np.array_equal(part.q, ref.q[8:24]) and np.array_equal(part.m, ref.m[8:24])


@pytest.mark.parametrize("bits", [4, 3])
def test_fastquant_float32_search_limits(bits):
    """The float32 search (float32 w, groups of 32, |shift| <= SHIFT32) and the float64 one beside
    it: float64 w; matrices scaled so the shift lands on the limit (float32 search, its tiniest
    and largest steps) and one past it (float64 search); tiny values whose squares underflow."""
    rng = np.random.default_rng(bits)
    w = _bf16(rng.standard_normal((24, 4096), dtype=np.float32) * np.float32(0.02))
    w[3, :64] = 2.0 ** -140  # subnormal float32 weights in a normal matrix
    qm = float(nx.qmax(bits))
    lim = fastquant.SHIFT32
    base = fastquant.shift_for(float(fastquant.group_scales(w, 32, qm).max()))
    seen = set()
    cases = [(w.astype(np.float64), "f64"), (w, "f32")]
    for k, path in ((base - lim, "f32"), (base - lim - 1, "f64"), (base + lim, "f32"),
                    (base + lim + 1, "f64")):
        cases.append((w * np.float32(2.0 ** k), path))  # shift = base - k
    for x, path in cases:
        ref = nx.quantize_matrix(x, bits, 32)
        shift = int(ref.shift)
        assert (x.dtype == np.float32 and abs(shift) <= lim) == (path == "f32"), shift
        seen.add((path, abs(shift) == lim))
        for tol in (None, fastquant.TOL[:3] + (1.0, 1.0, 1.0)):
            got = fastquant.quantize_matrix(x, bits, 32, tol=tol)
            assert np.array_equal(got.q, ref.q) and np.array_equal(got.m, ref.m), (shift, tol)
            assert int(got.shift) == shift
    assert seen == {("f64", False), ("f32", False), ("f32", True)}


def test_pairwise_sum_is_numpys():
    rng = np.random.default_rng(5)
    for n in (1, 7, 8, 9, 32, 127, 128, 129, 160, 1000, 4096, 14336):
        x = rng.random((3, n)) ** 4
        for row, want in zip(x, x.sum(-1)):
            assert fastquant._pairwise(row, n) == want, n


@pytest.mark.parametrize("bits,store", [(8, 8), (4, 4), (3, 4), (6, 8), (6, 6), (3, 3), (2, 2)])
def test_fastquant_pack_equals_kernels_pack(bits, store):
    rng = np.random.default_rng(bits * 10 + store)
    qm = nx.qmax(bits)
    for rows, cols, group in ((100, 64, 32), (257, 128, 128), (300, 96, 32), (64, 32, 32)):
        q = rng.integers(-qm, qm + 1, (rows, cols)).astype(np.int8)
        m = rng.integers(1, 512, (rows, cols // group)).astype(np.uint16)
        a, b = kernels.pack(q, m, 5, bits, group, store), fastquant.pack(q, m, 5, bits, group, store)
        assert len(a.planes) == len(b.planes)
        for x, y in zip(a.planes + [a.m], b.planes + [b.m]):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert (a.shift, a.bits, a.group, a.rows, a.cols, a.store_bits) == \
            (b.shift, b.bits, b.group, b.rows, b.cols, b.store_bits)


def test_checkpoint_reads_what_safetensors_reads(tiny_ck):
    from safetensors import safe_open

    f = safe_open(str(tiny_ck.path / "model.safetensors"), framework="numpy")
    c = tiny_ck.cfg
    for name, layer in checkpoint.tensor_list(c):
        want = np.asarray(f.get_slice(checkpoint.hf_name(name, layer))[:], dtype=np.float32)
        if name in ("wq", "wk"):
            want = checkpoint.permute_reverse(want, c.n_heads if name == "wq" else c.n_kv_heads)
        got = tiny_ck.tensor(name, layer)
        assert got.dtype == np.float32 and np.array_equal(got, want), (name, layer)
        buf = np.full(want.shape, np.nan, np.float32)
        assert tiny_ck.tensor(name, layer, out=buf) is buf and np.array_equal(buf, want)
        if want.ndim == 2:
            assert np.array_equal(tiny_ck.tensor(name, layer, rows=slice(3, 17)), want[3:17])
    assert tiny_ck.tensor("tok_embeddings", rows=slice(500, 600)).shape == (12, c.dim)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_an_interrupted_build_leaves_no_cache(tiny_ck, tmp_path, monkeypatch):
    calls = []
    real = fastquant.pack

    def pack(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fastquant, "pack", pack)
    with pytest.raises(KeyboardInterrupt):
        quant.build_cache(tiny_ck, "w8", cache_dir=tmp_path, show_progress=False)
    assert _leftovers(tmp_path) == []
    monkeypatch.setattr(fastquant, "pack", real)
    path = quant.build_cache(tiny_ck, "w8", cache_dir=tmp_path, show_progress=False)
    assert _leftovers(tmp_path) == [path.name]
    quant.open_cache(path)


def test_a_failed_write_leaves_no_cache(tiny_ck, tmp_path, monkeypatch):
    calls = []
    real = quant._Writer._put

    def put(self, b):  # runs on the writer thread: its error must reach the build
        calls.append(1)
        if len(calls) == 12:
            raise OSError(28, "No space left on device")
        return real(self, b)

    monkeypatch.setattr(quant._Writer, "_put", put)
    with pytest.raises(OSError, match="No space left"):
        quant.build_cache(tiny_ck, "w4", cache_dir=tmp_path, show_progress=False)
    assert _leftovers(tmp_path) == []


def test_a_killed_builds_temporary_directory_is_removed(tiny_ck, tmp_path):
    out = quant.cache_path(tiny_ck, "w4", "fast", tmp_path)
    dead = tmp_path / f".{out.name}.tmp-999999999"  # no such process
    dead.mkdir()
    (dead / "layer-00.bin").write_bytes(b"half")
    half = out  # a half-built cache of the earlier in-place builder: no manifest
    half.mkdir()
    (half / "embed.bin").write_bytes(b"half")
    path = quant.build_cache(tiny_ck, "w4", cache_dir=tmp_path, show_progress=False)
    assert path == out and _leftovers(tmp_path) == [out.name]
    assert (out / "manifest.json").exists() and quant.open_cache(out).fmt["scheme"] == "w4"

