"""The compiler pads llama2.c-shaped models to its tile: hidden_dim and vocab_size of any size,
kv_mul = 1, context lengths that are not powers of two. Fast: the padded bank images decode back to
the model's weights (zeros in the pad), the refusals say why, Argmax and the Sampler never pick a
pad index. Verilator (sim): whole padded models, bit-exact with the golden model, cycles exact."""

from __future__ import annotations

import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama.config import ModelConfig
from migen import run_simulation
from test_gateware_compiler import decode_bank

from gateware import compiler, cycle_model, units
from gateware.testutil import argmax_indices, baked, drive_sampler, run_and_compare

# (config, scheme, compile_model keyword arguments): each pads hidden_dim and/or vocab_size
# kv_mul = 1, seq_len 48; vlanes 8 pads hidden 100 -> 104 and vocab 100 -> 104
KV1 = (ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=100, vocab_size=100,
                   seq_len=48, tied_embeddings=False), "w4e8", dict(lanes=64, vlanes=8))
# GQA, tied embeddings, w4e6; vocab 250 -> 252, seq_len 100; all 32 e x v products of the
# attention on the engine's packed-pair multipliers (share)
TIED = (ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=88, vocab_size=250,
                    seq_len=100, tied_embeddings=True), "w4e6", dict(lanes=64, share=32))
# stories260K's hidden_dim: 172 -> 176 (w2 per-row groups over the padded row); vocab 70 -> 72;
# 9 of the 16 e x v products shared (two copies of the select)
H172 = (ModelConfig(dim=64, n_layers=1, n_heads=8, n_kv_heads=4, hidden_dim=172, vocab_size=70,
                    seq_len=24, tied_embeddings=False), "w4e8", dict(lanes=64, share=9))
SHAPES = {"kv1": KV1, "tied": TIED, "h172": H172}
# more shapes for the pure-Python checks
EXTRA = {
    "h90": (ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=90, vocab_size=100,
                        seq_len=48, tied_embeddings=False), "w4e6", dict(lanes=64)),
    "h200-16": (ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=200,
                            vocab_size=37, seq_len=20, tied_embeddings=True), "w4e8", dict(lanes=16)),
    "w8-h100": (ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=100,
                            vocab_size=250, seq_len=33, tied_embeddings=False), "w8", dict(lanes=64)),
}


def _deinterleave(q, Q):
    """w13 rows (blocks of Q rows of w1, then of w3) -> (w1 rows, w3 rows)."""
    b = q.reshape(-1, 2, Q, q.shape[-1])
    return b[:, 0].reshape(-1, q.shape[-1]), b[:, 1].reshape(-1, q.shape[-1])


@pytest.mark.parametrize("name", list(SHAPES) + list(EXTRA))
def test_padded_banks_decode_to_the_weights(name):
    cfg, scheme, kw = {**SHAPES, **EXTRA}[name]
    model = baked(cfg, scheme)
    plan = compiler.compile_model(model, **kw)
    g, W = plan.geo, model.weights
    H, V = cfg.hidden_dim, cfg.vocab_size
    assert g.hidden >= H and g.vocab >= V
    assert name == "w8-h100" or (g.hidden, g.vocab) != (H, V)  # the shapes do pad
    for key, p in plan.place.items():
        q, m = decode_bank(plan.banks[p.bank], p)
        kind, layer = compiler.split_key(key)
        if kind in ("cls", "emb"):
            w = model.wcls if kind == "cls" else W["tok_embeddings"]
            assert q.shape[0] == g.vocab
            assert (q[:V] == w.q).all() and (m[:V] == w.m).all(), key
            assert not q[V:].any() and not m[V:].any(), key
        elif kind == "w13":
            for (dq, dm), w in zip(zip(_deinterleave(q, g.post), _deinterleave(m, g.post)),
                                   (W["w1"][layer], W["w3"][layer])):
                assert (dq[:H] == w.q).all() and (dm[:H] == w.m).all(), key
                assert not dq[H:].any() and not dm[H:].any(), key
        elif kind == "w2":
            w = W["w2"][layer]
            assert q.shape[1] == g.hidden
            assert (q[:, :H] == w.q).all() and not q[:, H:].any(), key
            if w.group == H:  # one multiplier per row, over the padded row
                assert (m == w.m).all(), key
            else:
                assert (m[:, :H // w.group] == w.m).all() and not m[:, H // w.group:].any(), key
        else:
            vq, vm = compiler.virtual_rows(cfg, g, W, key)
            assert (q == vq).all() and (m == vm).all(), key
        # the padded matrix gives the golden products on the real rows (pads meet zeros)
        a = np.random.default_rng(1).integers(-127, 128, q.shape[1])
        if kind == "w2":
            a[H:] = 0
        grp = plan.banks[p.bank].group
        acc = nx.matvec(nx.QTensor(q, m, np.int32(0), plan.banks[p.bank].bits, grp), a)
        if kind in ("cls", "emb"):
            assert not acc[V:].any()
        if kind == "w2":
            assert (acc == nx.matvec(W["w2"][layer], a[:H])).all()
    # the cycle model prices the same padded placements
    formats = compiler.matrix_formats(cfg, model.fmt["weights"])
    _, geo, _, place = cycle_model._geometry(cfg, g.lanes, scheme, kw.get("vlanes"), None, formats)
    assert replace(geo, share=g.share) == g and place == plan.place  # (share: no cycles)


def test_default_shapes_are_not_padded():
    from gateware.testutil import SMALL, TINY
    real = ModelConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=192, vocab_size=512,
                       seq_len=256, tied_embeddings=True)
    for cfg in (SMALL, TINY, real):
        for lanes in (16, 64, 128):
            g = compiler.make_geometry(cfg, lanes, compiler.matrix_formats(cfg, None, "w4e6"))
            assert (g.hidden, g.vocab) == (cfg.hidden_dim, cfg.vocab_size)


def test_refusals_say_why():
    c = ModelConfig(dim=96, n_layers=1, n_heads=8, n_kv_heads=2, hidden_dim=100, vocab_size=100,
                    seq_len=16)  # head_dim 12
    with pytest.raises(ValueError, match="head_dim = 12 is not a multiple of vlanes = 8"):
        compiler.make_geometry(c, 128, compiler.matrix_formats(c, None, "w4e8"))
    c = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=70000,
                    seq_len=16)
    with pytest.raises(ValueError, match="vocab_size = 70000 does not fit the 16-bit"):
        compiler.make_geometry(c, 64, compiler.matrix_formats(c, None, "w4e8"))
    big = ModelConfig(dim=256, n_layers=8, n_heads=8, n_kv_heads=8, hidden_dim=700, vocab_size=1000,
                      seq_len=1000, tied_embeddings=False)
    f = compiler.matrix_formats(big, None, "w4e8")
    g = compiler.make_geometry(big, 64, f)  # the geometry (and the cycle model) still work
    assert cycle_model.expected_cycles(big, 64, 0) > 0
    with pytest.raises(ValueError, match="does not fit: weight ROMs .* KV cache .* 208 block RAMs"):
        compiler.check_bram_budget(big, g, f)


# ----------------------------------------------------------------------------- pad masking
def test_argmax_never_picks_a_pad():
    Q, w, n, nv = 4, 24, 24, 21
    dut = units.Argmax(Q, w, n, n_valid=nv)
    rng = random.Random(3)
    nrng = np.random.default_rng(3)
    cases = [nrng.integers(-(1 << 20), 1 << 20, n), np.full(n, -5), np.full(n, -(1 << 23)),
             nrng.integers(-3, 3, n)]
    for v in cases:
        v[nv:] = (1 << 23) - 1  # the pad would win everything
    cases[3][[2, 20]] = 9  # a tie at the last real index: the lower one wins
    assert argmax_indices(dut, cases, Q, w, rng) == [int(nx.argmax(v[:nv])) for v in cases]


def test_sampler_draws_from_the_real_vocabulary():
    n, Q, n_fill = 27, 2, 32
    dut = units.Sampler(n, Q, n_fill=n_fill)
    nrng = np.random.default_rng(9)
    seed = 77
    rng_ref = nx.XorShift32(seed)
    cases = [(nrng.integers(-4000, 4000, n_fill), 256), (nrng.integers(-300, 300, n_fill), 700),
             (np.full(n_fill, -1000), 256)]
    for lg, _ in cases:
        lg[n:] = 1 << 20  # pads that would take all the mass
    got = []

    passes = [c for c in cases for _ in range(8)]  # the draws of several passes over the same logits
    run_simulation(dut, drive_sampler(dut, seed, passes, n_fill, Q, got))
    want = [nx.sample(lg[:n], t, rng_ref) for lg, t in cases for _ in range(8)]
    assert got == want and max(got) < n


# ----------------------------------------------------------------------------- Verilator
sim = pytest.mark.sim
needs_verilator = pytest.mark.skipif(shutil.which("verilator") is None,
                                     reason="verilator not installed")


@pytest.fixture(scope="module", params=list(SHAPES))
def shape_sim(request):
    from gateware.sim import VerilatorSim
    cfg, scheme, kw = SHAPES[request.param]
    model = baked(cfg, scheme, seed=5)
    plan = compiler.compile_model(model, **kw)
    return request.param, model, plan, VerilatorSim(plan, with_trace=True, jobs=2)


@sim
@needs_verilator
def test_padded_shape_bit_exact(shape_sim):
    """Greedy over the whole context (tokens, traces, cycles), then a sampled run (temperature
    4: a random model with tied embeddings is peaked) on the non-power-of-two vocabulary."""
    name, model, plan, vs = shape_sim
    cfg, lanes = model.cfg, plan.geo.lanes
    outs, _ = run_and_compare(vs, model, [t % cfg.vocab_size for t in (7, 77, 30, 12)],
                              cfg.seq_len - 4, lanes)
    assert len(outs) == cfg.seq_len - 4
    outs, _ = run_and_compare(vs, model, [5, cfg.vocab_size - 1], 14, lanes, temperature=4.0,
                              seed=4321)
    assert len(set(outs)) > 1 and max(outs) < cfg.vocab_size
