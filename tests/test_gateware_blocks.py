"""Each gateware block in Migen simulation against its bakedllama.numerics function.

Random inputs, random gaps on the input, random back-pressure on the output, bounded waits."""

from __future__ import annotations

import random

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama import steps
from migen import run_simulation

from gateware import compiler, units
from gateware.matvec import MatVec
from gateware.testutil import TINY, argmax_indices, baked, drive_sampler, pack, recv, send, unpack


# ----------------------------------------------------------------------------- weight ROM
@pytest.mark.parametrize("depth", [40, 48, 33, 16, 5])
def test_weight_rom_reads_every_word(depth):
    """WeightRom in segments of 16 words (the last one half as deep when it holds at most 8:
    depths 40, 33), column slices of 24 bits: every address reads its word lat.ROM_ADR + 1
    cycles later, in a random order."""
    from migen import Module

    from gateware import latency as lat
    from gateware.matvec import WeightRom

    rng = np.random.default_rng(depth)
    width = 60
    words = [int.from_bytes(rng.bytes(8), "little") & ((1 << width) - 1) for _ in range(depth)]
    m = Module()
    rom = WeightRom(width, words, slice_bits=24, seg_depth=16)
    m.submodules += rom
    from migen import Memory
    depths = {mem.depth for mem in rom._fragment.specials if isinstance(mem, Memory)}
    assert ({8, 16} <= depths) == (depth > 16 and 0 < depth % 16 <= 8)  # a half-deep last segment
    order = [int(a) for a in rng.integers(0, depth, 3 * depth)] + list(range(depth))
    got = []

    def gen():
        for a in order + [0] * (lat.ROM_ADR + 2):
            yield rom.adr_next.eq(a)
            yield
            got.append((yield rom.dat_r))

    run_simulation(m, gen())
    d = lat.ROM_ADR + 1  # set before clock edge n, read after edge n + d
    assert got[d:d + len(order)] == [words[a] for a in order]


# ----------------------------------------------------------------------------- round_shift
@pytest.mark.parametrize("lo,hi", [(28, 35), (-3, 4), (0, 9), (5, 5)])
def test_round_shift_runtime_amount(lo, hi):
    """hw.round_shift with the shift a signal in [lo, hi] (the fixed part shifted as a constant)."""
    from migen import Module, Signal

    from gateware.hw import round_shift
    w = 40
    m = Module()
    x = Signal((w, True))
    n = Signal((8, True))
    y = round_shift(m, x, n, (lo, hi))
    rng = np.random.default_rng((lo + 100) * 100 + hi)
    xs = [int(v) for v in rng.integers(-(1 << (w - 1)), 1 << (w - 1), 200)]
    xs += [-(1 << (w - 1)), (1 << (w - 1)) - 1, 0, 1, -1]
    cases = [(v, int(rng.integers(lo, hi + 1))) for v in xs] + [(v, k) for v in xs[-5:]
                                                                 for k in (lo, hi)]
    got = []

    def gen():
        for v, k in cases:
            yield x.eq(v)
            yield n.eq(k)
            yield
            got.append((yield y))

    run_simulation(m, gen())
    want = [int(nx.round_shift(np.array([v], dtype=object), k)[0]) for v, k in cases]
    assert got == want


@pytest.mark.parametrize("width", [1, 2, 7, 16, 23, 34])
def test_bit_length_tree(width):
    """hw.bit_length (a balanced leading-one tree) against numerics.bit_length, every bit set alone
    and random values."""
    from migen import Module, Signal

    from gateware.hw import bit_length
    m = Module()
    v = Signal(width)
    y = bit_length(m, v)
    rng = np.random.default_rng(width)
    vals = [0, (1 << width) - 1] + [1 << i for i in range(width)]
    vals += [int(rng.integers(0, 1 << width)) for _ in range(100)]
    got = []

    def gen():
        for x in vals:
            yield v.eq(x)
            yield
            got.append((yield y))

    run_simulation(m, gen())
    assert got == [int(nx.bit_length(np.array([x]))[0]) for x in vals]


@pytest.mark.parametrize("neg0,neg1", [(1, 1), (0, 1), (1, 0), (0, 0)])
def test_packed_pair_dot(neg0, neg1):
    """hw.packed_pair_dot (two int4 x int8 products per 18 x 18 multiply) against the plain dot
    products: every pair of 4-bit fields (signed or unsigned) with the extreme activations, then
    random vectors; the stated latency."""
    from migen import Module, Signal

    from gateware.hw import packed_pair_dot
    n = 8
    m = Module()
    w0 = [Signal(4) for _ in range(n)]
    w1 = [Signal(4) for _ in range(n)]
    a = [Signal((8, True)) for _ in range(n)]
    d0, d1, lat = packed_pair_dot(m, w0, neg0, w1, neg1, a)
    val = lambda f, neg: f - 16 if neg and f >= 8 else f  # noqa: E731
    rng = np.random.default_rng(7 + 2 * neg0 + neg1)
    cases = [([f0] * n, [f1] * n, [x] * n) for f0 in range(16) for f1 in range(16)
             for x in (-128, -127, 127, 1)]
    cases += [(list(rng.integers(0, 16, n)), list(rng.integers(0, 16, n)),
               list(rng.integers(-128, 128, n))) for _ in range(200)]
    got = []

    def gen():
        for i in range(len(cases) + lat):
            if i < len(cases):
                f0, f1, xs = cases[i]
                for s_, v in zip(w0 + w1 + a, list(f0) + list(f1) + list(xs)):
                    yield s_.eq(int(v))
            yield
            if i >= lat:  # the case set `lat` cycles ago
                got.append(((yield d0), (yield d1)))

    run_simulation(m, gen())
    want = [(sum(val(int(f), neg0) * int(x) for f, x in zip(f0, xs)),
             sum(val(int(f), neg1) * int(x) for f, x in zip(f1, xs))) for f0, f1, xs in cases]
    assert got == want


# ----------------------------------------------------------------------------- matvec
@pytest.mark.parametrize("lanes,dsp_pairs", [(16, 0), (64, 0), (64, 1), (128, 1), (128, 2)])
def test_matvec(lanes, dsp_pairs):
    """The engine against numerics.matvec (4-bit, 6-bit with extension fields and per-row
    banks), with LUT lanes, packed DSP pairs, or both, under random back-pressure."""
    model = baked(TINY)
    plan = compiler.compile_model(model, lanes=lanes, dsp_pairs=dsp_pairs)
    g = plan.geo
    Q = 2
    dut = MatVec(plan.banks, g.cols, g.rows, g.vlanes, max(TINY.dim, TINY.hidden_dim), plan.acc_bits,
                 out_lanes=Q, dsp_pairs=g.dsp_pairs)
    rng = random.Random(lanes + dsp_pairs)
    nrng = np.random.default_rng(lanes)
    jobs = []
    for key in ("qkv0", "cls", "w20"):
        p = plan.place[key]
        q, m = compiler.virtual_rows(TINY, g, model.weights, key)
        a = nrng.integers(-127, 128, p.cols)
        a_full = np.zeros(max(TINY.dim, TINY.hidden_dim), dtype=np.int64)
        a_full[:p.cols] = a
        w = nx.QTensor(q, m, np.int32(0), 8, plan.banks[p.bank].group)
        jobs.append((p, a_full, nx.matvec(w, a)))
    results = []
    done = []

    def driver():
        for p, a_full, ref in jobs:
            P = g.vlanes
            beats = [dict(a=pack(a_full[i:i + P], 8), first=i == 0, last=i + P >= len(a_full))
                     for i in range(0, len(a_full), P)]
            yield from send(dut.act_sink, beats, rng)
            for _ in range(3):
                yield
            yield from send(dut.cmd, [dict(bank=p.bank, base=p.base, chunks=p.chunks,
                                           rowgroups=p.rowgroups, tag=5)], rng)
            while len(done) < len(results) + 1 and len(done) <= jobs.index((p, a_full, ref)):
                yield

    def receiver():
        for p, _, _ in jobs:
            out = []
            yield from recv(dut.source, p.rows // Q, out, ["acc", "beat", "tag"], rng)
            results.append(out)
            done.append(1)

    run_simulation(dut, [driver(), receiver()])
    for (p, _, ref), out in zip(jobs, results):
        got = np.concatenate([unpack(b["acc"], Q, plan.acc_bits) for b in out])
        assert [b["beat"] for b in out] == list(range(p.rows // Q))
        assert out[-1]["last"] == 1 and sum(b["last"] for b in out) == 1
        bad = np.nonzero(got != ref)[0]
        assert len(bad) == 0, f"rows {bad[:8]} differ: got {got[bad[:4]]}, want {ref[bad[:4]]}"


# ----------------------------------------------------------------------------- RMSNorm
def test_rmsnorm():
    plan = compiler.compile_model(baked(TINY), lanes=16)
    D, P = TINY.dim, 4
    t = plan.tables
    norms = plan.steps.norms()
    dut = units.RMSNorm(D, P, t["gains"], norms)
    rng = random.Random(1)
    nrng = np.random.default_rng(1)
    vecs = [nrng.integers(-32768, 32768, D), nrng.integers(-300, 300, D), np.zeros(D, np.int64),
            nrng.integers(-3, 4, D), np.full(D, -32768), nrng.normal(0, 2000, D).astype(np.int64)]
    sels = [int(nrng.integers(0, len(norms))) for _ in vecs]
    out = []

    def driver():
        for x, sel in zip(vecs, sels):
            while (yield dut.busy):
                yield
            yield dut.sel.eq(sel)
            beats = []
            for _ in range(3):
                beats += [dict(x=pack(x[i:i + P], 16), first=i == 0, last=i + P == D)
                          for i in range(0, D, P)]
            yield from send(dut.sink, beats, rng)

    def receiver():
        yield from recv(dut.source, len(vecs) * D // P, out, ["a", "k"], rng, p_ready=0.6)

    run_simulation(dut, [driver(), receiver()])
    for n, (x, sel) in enumerate(zip(vecs, sels)):
        ref_xb = nx.rmsnorm(x, t["gains"][sel], norms[sel])
        ref_a, ref_k = nx.quantize_act(ref_xb)
        beats = out[n * D // P:(n + 1) * D // P]
        got = np.concatenate([unpack(b["a"], P, 8) for b in beats])
        assert all(b["k"] == ref_k for b in beats), (n, [b["k"] for b in beats], ref_k)
        assert (got == ref_a).all(), (n, got, ref_a)


# ----------------------------------------------------------------------------- ActQuant
def test_actquant():
    n_max, Q, P = 96, 2, 8
    dut = units.ActQuant(n_max, Q, P)
    rng = random.Random(2)
    nrng = np.random.default_rng(2)
    vecs = [nrng.integers(-32768, 32768, 96), nrng.integers(-100, 100, 64), np.zeros(64, np.int64),
            nrng.integers(-1000, 1000, 96), np.full(64, -32768)]
    out = []

    def driver():
        want = 0
        for v in vecs:
            beats = [dict(v=pack(v[i:i + Q], 16), idx=i, first=i == 0, last=i + Q == len(v))
                     for i in range(0, len(v), Q)]
            yield from send(dut.fill, beats, rng)
            want += len(v) // P
            while len(out) < want:  # the next vector may only start once this one is out
                yield

    def receiver():
        yield from recv(dut.source, sum(len(v) // P for v in vecs), out, ["a", "k"], rng)

    run_simulation(dut, [driver(), receiver()])
    pos = 0
    for v in vecs:
        ref_a, ref_k = nx.quantize_act(v)
        beats = out[pos:pos + len(v) // P]
        pos += len(v) // P
        got = np.concatenate([unpack(b["a"], P, 8) for b in beats])
        assert beats[0]["first"] and beats[-1]["last"]
        assert all(b["k"] == ref_k for b in beats)
        assert (got == ref_a).all()


# ----------------------------------------------------------------------------- RoPE
def test_rope():
    Q, hd = 4, 16
    dut = units.Rope(Q)
    rng = random.Random(3)
    nrng = np.random.default_rng(3)
    inv = nx.rope_inv_freq(hd, 10000.0)
    cos, sin = nx.rope_table(np.arange(256), inv)
    n = 60
    xs = nrng.integers(-32768, 32768, (n, Q))
    xs[:5] = 32767
    xs[5:10] = -32768
    pos = nrng.integers(0, 256, n)
    pair = nrng.integers(0, hd // 2 - Q // 2 + 1, n)
    out = []

    def driver():
        beats = [dict(x=pack(xs[i], 16), cos=pack(cos[pos[i], pair[i]:pair[i] + Q // 2], 16),
                      sin=pack(sin[pos[i], pair[i]:pair[i] + Q // 2], 16), first=1, last=1)
                 for i in range(n)]
        yield from send(dut.sink, beats, rng)

    def receiver():
        yield from recv(dut.source, n, out, ["x"], rng)

    run_simulation(dut, [driver(), receiver()])
    for i in range(n):
        ref = nx.rope(xs[i], cos[pos[i], pair[i]:pair[i] + Q // 2], sin[pos[i], pair[i]:pair[i] + Q // 2])
        assert (unpack(out[i]["x"], Q, 16) == ref).all(), i


# ----------------------------------------------------------------------------- SwiGLU (SiLU)
@pytest.mark.parametrize("f_h", [10, 5])
def test_swiglu(f_h):
    Q = 2
    step = steps.swiglu_step(f_h)
    dut = units.SwiGLU(Q, step)
    rng = random.Random(4)
    nrng = np.random.default_rng(4)
    n = 80
    h1 = nrng.integers(-32768, 32768, (n, Q))
    h1[:20] = nrng.integers(-1 << (f_h + 4), 1 << (f_h + 4), (20, Q))  # around the table's range
    h3 = nrng.integers(-32768, 32768, (n, Q))
    out = []

    def driver():
        yield from send(dut.sink, [dict(h1=pack(h1[i], 16), h3=pack(h3[i], 16), first=1, last=1)
                                   for i in range(n)], rng)

    def receiver():
        yield from recv(dut.source, n, out, ["hb"], rng)

    run_simulation(dut, [driver(), receiver()])
    for i in range(n):
        assert (unpack(out[i]["hb"], Q, 16) == nx.swiglu(h1[i], h3[i], step)).all(), i


# ----------------------------------------------------------------------------- softmax
def test_softmax():
    H, sb, T = 2, 20, 24
    dut = units.Softmax(H, sb, 64)
    rng = random.Random(5)
    nrng = np.random.default_rng(5)
    cases = [nrng.integers(-3000, 3000, (T, H)), nrng.integers(-(1 << 19), 1 << 19, (T, H)),
             np.zeros((5, H), np.int64), nrng.integers(-20, 20, (1, H))]
    e_out, r_out = [], []

    def driver():
        for s in cases:
            beats = [dict(s=pack(s[t], sb), first=t == 0, last=t == len(s) - 1) for t in range(len(s))]
            yield from send(dut.sink_max, beats, rng)
            yield from send(dut.sink, beats, rng)

    def recv_e():
        yield from recv(dut.source_e, sum(len(s) for s in cases), e_out, ["e"], rng)

    def recv_r():
        yield from recv(dut.source_recip, len(cases), r_out, ["recip"], rng, timeout=20000)

    run_simulation(dut, [driver(), recv_e(), recv_r()])
    pos = 0
    for n, s in enumerate(cases):
        e_ref = nx.exp_neg(s.max(axis=0) - s)  # (T, H)
        got = np.stack([unpack(b["e"], H, 17, signed=False) for b in e_out[pos:pos + len(s)]])
        pos += len(s)
        assert (got == e_ref).all(), n
        recip_ref = (1 << nx.ATT_RECIP_BITS) // e_ref.sum(axis=0)
        qb = len(dut.source_recip.recip) // H
        assert (unpack(r_out[n]["recip"], H, qb, signed=False) == recip_ref).all(), n


# ----------------------------------------------------------------------------- argmax
def test_argmax():
    Q, w, n = 4, 24, 64
    dut = units.Argmax(Q, w, n)
    rng = random.Random(6)
    nrng = np.random.default_rng(6)
    cases = [nrng.integers(-(1 << 23), 1 << 23, n), nrng.integers(-3, 3, n), np.zeros(n, np.int64),
             np.full(n, -(1 << 23))]
    cases[1][[7, 40]] = 5  # a tie: the lower index wins
    assert argmax_indices(dut, cases, Q, w, rng) == [int(nx.argmax(v)) for v in cases]


# ----------------------------------------------------------------------------- sampler
def test_sampler():
    n, Q = 32, 2
    dut = units.Sampler(n, Q)
    nrng = np.random.default_rng(7)
    seed = 1234
    rng_ref = nx.XorShift32(seed)
    cases = [(nrng.integers(-4000, 4000, n), 256), (nrng.integers(-200, 200, n), 1000),
             (nrng.integers(-(1 << 20), 1 << 20, n), 3)]
    got = []

    run_simulation(dut, drive_sampler(dut, seed, cases, n, Q, got))
    want = [nx.sample(lg, t, rng_ref) for lg, t in cases]
    assert got == want


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("kv_par", [2, 1])
def test_attention(kv_par):
    from gateware.attention import Attention
    cfg = TINY
    P, Q = 4, 2
    att = steps.attention_step(f_qk=10, e_k=4, e_v=3, head_dim=cfg.head_dim)
    dut = Attention(cfg, [att], kv_par, P, Q)
    nrng = np.random.default_rng(8 + kv_par)
    T = 6
    D, KVD, hd = cfg.dim, cfg.kv_dim, cfg.head_dim
    kc = nrng.integers(-128, 128, (T, KVD))
    vc = nrng.integers(-128, 128, (T, KVD))
    qs = [nx.quantize_act(nrng.integers(-32768, 32768, D) >> int(nrng.integers(0, 8))) for _ in range(T)]
    outs = []

    def gen():
        for pos in range(T):
            for i in range(0, KVD, Q):
                for is_v, src in ((0, kc), (1, vc)):
                    yield dut.kv_sink.v.eq(pack(src[pos, i:i + Q], 8))
                    yield dut.kv_sink.idx.eq(i)
                    yield dut.kv_sink.is_v.eq(is_v)
                    yield dut.kv_sink.valid.eq(1)
                    yield
            yield dut.kv_sink.valid.eq(0)
            a, k = qs[pos]
            for i in range(0, D, P):
                yield dut.q_sink.a.eq(pack(a[i:i + P], 8))
                yield dut.q_sink.k.eq(int(k))
                yield dut.q_sink.last.eq(i + P == D)
                yield dut.q_sink.valid.eq(1)
                yield
            yield dut.q_sink.valid.eq(0)
            yield dut.layer.eq(0)
            yield dut.pos.eq(pos)
            yield dut.start.eq(1)
            yield
            yield dut.start.eq(0)
            got = []
            for _ in range(5000):
                yield
                if (yield dut.source.valid):
                    got.append(((yield dut.source.a), (yield dut.source.k)))
                    if (yield dut.source.last):
                        break
            else:
                raise AssertionError("attention: stalled")
            outs.append(got)
            for _ in range(4):
                yield

    run_simulation(dut, gen())
    for pos in range(T):
        a, k = qs[pos]
        q8 = a.reshape(cfg.n_kv_heads, cfg.kv_mul, hd)
        kk = kc[:pos + 1].reshape(pos + 1, cfg.n_kv_heads, hd).transpose(1, 0, 2)
        vv = vc[:pos + 1].reshape(pos + 1, cfg.n_kv_heads, hd).transpose(1, 0, 2)
        o = nx.attention_head(q8, np.int64(k), kk[:, None], vv[:, None], att)
        ref_a, ref_k = nx.quantize_act(o.reshape(D))
        got = np.concatenate([unpack(w, P, 8) for w, _ in outs[pos]])
        assert all(kk_ == ref_k for _, kk_ in outs[pos]), (pos, outs[pos][0][1], ref_k)
        assert (got == ref_a).all(), (pos, got[:8], ref_a[:8])
