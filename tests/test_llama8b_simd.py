"""simd.c's integer kernels and the batched prefill (host/bakedllama/llama8b): exact integers.

The kernels multiply packed weights by T activation rows with 8-bit integer multiply-adds; these
tests hold them to numerics.matvec at the extremes of every operand (where an int16 pair sum or an
int32 group sum would overflow if the bounds in simd.c were wrong), and the prompt's batched
passes to the position-by-position run."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama.llama8b import checkpoint, kernels, partition, quant, runner, simd


def _has_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return f" {flag} " in f.read().replace("\n", " ")
    except OSError:
        return False


def _has_avx2() -> bool:
    return _has_flag("avx2")


def test_simd_kernels_are_built_on_an_avx2_machine():
    """CI and this machine are x86-64 with AVX2 and gcc: the kernels must compile and load there
    (elsewhere the numba kernels run, and the tests below are skipped)."""
    if platform.machine() != "x86_64" or not _has_avx2():
        pytest.skip("not an x86-64 AVX2 machine")
    assert simd.available()
    # AVX-512 VNNI (vpdpbusd; with VBMI's vpermt2b for the nibbles) is used where the CPU has it,
    # and only there
    flags = ("avx512_vnni", "avx512vl", "avx512vbmi", "avx512dq")
    assert ("vnni" in simd.kernels()) == all(_has_flag(f) for f in flags), simd.kernels()


needs_simd = pytest.mark.skipif(not simd.available(), reason="no AVX2 kernels on this machine")


@needs_simd
@pytest.mark.parametrize("kernel", ["vnni", "avx2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_simd_matmat_equals_numerics_matvec(bits, kernel):
    if kernel not in simd.kernels():
        pytest.skip(f"no {kernel} on this CPU")
    rng = np.random.default_rng(bits)
    store = kernels.STORE_FAST[bits]
    qm = nx.qmax(bits)
    for rows, cols, group in ((130, 64, 32), (64, 256, 256), (200, 96, 32), (70, 512, 64)):
        for extreme in (False, True):
            if extreme:  # the largest sums: every weight at +-qmax, every multiplier at 65535
                q = np.where(rng.random((rows, cols)) < 0.5, qm, -qm).astype(np.int8)
                q[0], q[1] = qm, -qm
                m = np.full((rows, cols // group), 65535, np.uint16)
            else:
                q = rng.integers(-qm, qm + 1, (rows, cols)).astype(np.int8)
                m = rng.integers(0, 1 << 16, (rows, cols // group)).astype(np.uint16)
            p = kernels.pack(q, m, 7, bits, group, store)
            assert simd.supports(p)
            qt = nx.QTensor(q, m, np.int32(7), bits, group)
            for T in (1, 2, 5, simd.TOKEN_TILE + 6):
                a = rng.integers(-127, 128, (T, cols))
                a[0] = 127
                if T > 1:
                    a[1] = -127
                ref = nx.matvec(qt, a)
                for threads in (1, 2):
                    assert np.array_equal(simd.matmat(p, a, 0, rows, threads, kernel), ref)
                assert np.array_equal(simd.matmat(p, a, 3, rows - 5, 2, kernel), ref[:, 3:rows - 5])


@needs_simd
@pytest.mark.parametrize("store,mmax", [(4, 1), (4, 511), (4, (1 << 15) - 1),
                                        (8, 1), (8, 511), (8, ((1 << 31) - 1) // (32 * 128 * 127))])
def test_simd_int32_totals_at_their_bounds(store, mmax):
    """The kernels' int32 totals for groups of 32 (vpmulld; and the 4-bit prompts' int16 pairs on
    vpmaddwd, multipliers below 2^15): every group sum at its largest magnitude (q at the layout's
    most negative value against a = -127, and mixed signs), multipliers at the largest a path
    takes, enough groups that the int32 totals are flushed several times, an odd group count
    (the pair path's last group has no partner), a decode step and token tiles with a
    remainder."""
    if "vnni" not in simd.kernels():
        pytest.skip("no AVX-512 VNNI + VBMI on this CPU")
    rng = np.random.default_rng(mmax + store)
    rows, group = 130, 32
    lo, hi = (-8, 7) if store == 4 else (-128, 127)
    gsum = group * -lo * 127  # the largest |group sum|
    m = np.full((rows, 1), mmax, np.uint16)
    p = kernels.pack(np.zeros((rows, group), np.int8), m, 7, store, group, store)
    per = max(simd.flush_groups(p), 2 * simd.flush_pairs(p))  # groups per int32 total
    assert per > 0
    assert store == 8 or simd.flush_pairs(p) > 0
    ng = min(3 * per + 1, 401) | 1
    cols = ng * group
    q = np.where(rng.random((rows, cols)) < 0.5, hi, lo).astype(np.int8)
    q[0], q[1], q[2] = lo, lo, hi
    m = np.full((rows, ng), mmax, np.uint16)
    m[3] = rng.integers(0, mmax + 1, ng)
    p = kernels.pack(q, m, 7, store, group, store)
    qt = nx.QTensor(q, m, np.int32(7), store, group)
    for T in (1, 5):
        a = rng.integers(-127, 128, (T, cols))
        a[0] = -127
        if T > 1:
            a[1] = 127
        ref = nx.matvec(qt, a)
        assert np.abs(ref[:, :2]).max() == gsum * mmax * ng  # the bound is reached
        for threads in (1, 2):
            assert np.array_equal(simd.matmat(p, a, 0, rows, threads), ref)
    # one multiplier too large for even one group in int32 (or, 4-bit, for an int16): the int64
    # path takes the matrix, still exact
    m[4, 0] = (1 << 15) if store == 4 else (1 << 31) // (group * 128 * 127) + 1
    p = kernels.pack(q, m, 7, store, group, store)
    assert simd.flush_groups(p) == simd.flush_pairs(p) == 0
    ref = nx.matvec(nx.QTensor(q, m, np.int32(7), store, group), a)
    assert np.array_equal(simd.matmat(p, a, 0, rows), ref)


@needs_simd
def test_simd_refuses_what_it_cannot_multiply_exactly():
    q = np.zeros((64, 64), np.int8)
    p = kernels.pack(q, np.ones((64, 2), np.uint16), 0, 4, 32, 4)
    with pytest.raises(ValueError, match="-127, 127"):
        simd.matmat(p, np.full((1, 64), -128), 0, 64)
    with pytest.raises(ValueError, match="columns"):
        simd.matmat(p, np.zeros((1, 32)), 0, 64)
    # two bit planes (the tight 6-bit layout): not a layout the kernels know
    assert not simd.supports(kernels.pack(q, np.ones((64, 2), np.uint16), 0, 6, 32, 6))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b-simd")
    return d, checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, d, show_progress=False)


@pytest.mark.parametrize("bits", ["4", "8", "3/6"])
def test_batched_prefill_equals_position_by_position(tiny, bits):
    """generate()'s prompt in batched passes (chunks of 64, and of 3: several passes, each
    resuming where the last ended) gives the same tokens and the same logits at every position
    as one position per pass, partitioned and streaming."""
    d, ck = tiny
    qm = quant.quantized(ck, bits, cache_dir=d, show_progress=False)
    layer = sum(u.nbytes for u in partition.model_units(qm.cfg, qm.fmt)[1:10])
    prompt = [384, 72, 101, 108, 111, 300, 17, 250]
    outs = []
    for chunk in (1, 3, runner.PREFILL_CHUNK):
        r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, layer - 1), streaming=True)
        outs.append(runner.generate(r, prompt, 6, keep_logits=True, prefill_chunk=chunk))
        assert len(outs[-1]["prefill_seconds"]) == len(prompt)
    ref = outs[0]
    for o in outs[1:]:
        assert o["tokens"] == ref["tokens"]
        assert len(o["logits"]) == len(ref["logits"])
        for a, b in zip(o["logits"], ref["logits"]):
            assert np.array_equal(a.acc, b.acc) and np.array_equal(a.frac, b.frac)
    # without keep_logits the classifier runs for the last prompt position only: same tokens
    r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, None))
    assert runner.generate(r, prompt, 6)["tokens"] == ref["tokens"]
