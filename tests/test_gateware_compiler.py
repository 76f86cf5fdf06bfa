"""The model compiler's passes (pure Python): geometry checks, weight bank images, tables, cycle model."""

from __future__ import annotations

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama.config import ModelConfig

from gateware import compiler, cycle_model
from gateware.testutil import SMALL, TINY, baked

REAL = ModelConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=192, vocab_size=512,
                   seq_len=256, tied_embeddings=True)


def decode_bank(bank: compiler.Bank, p: compiler.Placement):
    """Invert the bank layout: words -> (q, m) of the placed matrix."""
    Rw, C, lb, G = bank.rows_per_word, bank.cols, bank.lane_bits, bank.group
    q = np.zeros((p.rows, p.cols), np.int64)
    m = np.zeros((p.rows, p.cols // G), np.int64)
    cpg = bank.chunks_per_group

    def fld(word, lo, n, signed):
        v = (word >> lo) & ((1 << n) - 1)
        return v - (1 << n) if signed and v >> (n - 1) else v

    for rg in range(p.rowgroups):
        for ch in range(p.chunks):
            w = bank.words[p.base + rg * p.chunks + ch]
            for j in range(Rw):
                r = rg * Rw + j
                s0 = j * bank.slot_width
                eb = bank.ext_bits
                for i in range(C):
                    if eb:  # low part in the slot, high part in the extension field
                        lo = fld(w, s0 + i * lb, lb, False)
                        hi = fld(w, bank.ext_offset + (j * C + i) * eb, eb, True)
                        q[r, ch * C + i] = hi * (1 << lb) + lo
                    else:
                        q[r, ch * C + i] = fld(w, s0 + i * lb, lb, True)
                share = fld(w, s0 + C * lb, bank.m_share, False)
                m[r, ch // cpg] |= share << ((ch % cpg) * bank.m_share)
    return q, m


@pytest.mark.parametrize("lanes", [16, 64, 128])
@pytest.mark.parametrize("cfg", [TINY, SMALL], ids=["tiny", "small"])
def test_bank_layout_roundtrip(cfg, lanes):
    model = baked(cfg)
    plan = compiler.compile_model(model, lanes=lanes)
    for key, p in plan.place.items():
        q, m = compiler.virtual_rows(cfg, plan.geo, model.weights, key)
        dq, dm = decode_bank(plan.banks[p.bank], p)
        assert (dq == q).all(), key
        assert (dm == m).all(), key
    assert plan.geo.lanes == plan.geo.rows * plan.geo.cols


def test_geometry_errors():
    f = compiler.matrix_formats(REAL, None, "w4e8")
    with pytest.raises(ValueError, match="power of two"):
        compiler.make_geometry(REAL, 96, f)
    with pytest.raises(ValueError, match="vlanes"):
        compiler.make_geometry(REAL, 128, f, vlanes=3)
    with pytest.raises(ValueError, match="kv_par"):
        compiler.make_geometry(REAL, 128, f, kv_par=3)
    # hidden_dim is padded to the tile (tests/test_gateware_shapes.py); head_dim is not
    odd = ModelConfig(dim=96, n_layers=1, n_heads=8, n_kv_heads=2, hidden_dim=100, vocab_size=512,
                      seq_len=16)
    with pytest.raises(ValueError, match="head_dim"):
        compiler.make_geometry(odd, 128, compiler.matrix_formats(odd, None, "w4e8"))


def test_tables_come_from_numerics():
    plan = compiler.compile_model(baked(TINY), lanes=16)
    t = plan.tables
    assert t["rsqrt"] == list(nx.RSQRT_TABLE)
    assert t["exp_hi"] == list(nx.EXP_HI) and t["exp_lo"] == list(nx.EXP_LO)
    assert t["sigmoid"] == list(nx.SIGMOID_TABLE)
    cos, sin = nx.rope_table(np.arange(TINY.seq_len), nx.rope_inv_freq(TINY.head_dim, TINY.rope_theta))
    assert (t["rope_cos"] == cos).all() and (t["rope_sin"] == sin).all()
    assert t["score_scale"] == nx.score_scale(TINY.head_dim)


def test_acc_bits_cover_every_matrix():
    model = baked(SMALL)
    plan = compiler.compile_model(model, lanes=64)
    for _, _, cols, fname in compiler.virtual_matrices(SMALL):
        w = model.weights[fname if fname in model.weights else "tok_embeddings"]
        assert plan.acc_bits >= nx.matvec_acc_bits(w.bits, w.group, cols)


def test_cycle_model_shape():
    for lanes in (16, 64, 128, 256):
        c = [cycle_model.expected_cycles(REAL, lanes, p) for p in (0, 16, 128, 255)]
        assert c == sorted(c)  # attention grows with the position
    # more lanes, fewer cycles; the weight-bandwidth bound is far below (the multiplier bound
    # counts DSP blocks only: LUT lanes go past it)
    assert cycle_model.expected_cycles(REAL, 256, 16) < cycle_model.expected_cycles(REAL, 64, 16)
    b = cycle_model.device_bounds(REAL)
    assert b["bram_bound"] < cycle_model.expected_cycles(REAL, 256, 0)
    assert b["mult_bound"] < cycle_model.expected_cycles(REAL, 64, 0)
    # each matrix pass issues at least rows x cols / lanes words (one row slot per weight, the
    # wider ones too: their high bits are extension fields of the same word), and one more
    # position costs one more issue in each of the attention's groups + 1 overlapped phases (the
    # score stage on group k while the value stage is on group k - 1) per layer
    fmts = compiler.matrix_formats(REAL, None, "w4e8")
    geo = compiler.make_geometry(REAL, 128, fmts)
    assert any(b.ext_bits for b in compiler.build_banks(REAL, geo, fmts, None)[0])  # (8-bit cls)
    bd = cycle_model.breakdown(REAL, 128, 10)
    for key, rows, cols, _fname in compiler.virtual_matrices(REAL):
        step = next(v for k, v in bd.items() if k.startswith("mv") and k.endswith(":" + key))
        assert step >= rows * cols // 128, key
    groups = REAL.n_kv_heads // geo.kv_par
    for p in (0, 10, 200):
        d = cycle_model.expected_cycles(REAL, 128, p + 1) - cycle_model.expected_cycles(REAL, 128, p)
        assert d == (groups + 1) * REAL.n_layers, p
