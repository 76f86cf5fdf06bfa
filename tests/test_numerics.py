"""The integer primitives against plain Python integers and against float maths (error bounds)."""

import math

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama import steps

rng = np.random.default_rng(1234)


def test_round_shift_matches_python_integers():
    xs = rng.integers(-(1 << 40), 1 << 40, 2000)
    ss = rng.integers(-8, 30, 2000)
    got = nx.round_shift(xs, ss)
    for x, s, g in zip(xs.tolist(), ss.tolist(), got.tolist()):
        want = x << -s if s <= 0 else (x + (1 << (s - 1))) >> s  # floor((x + half) / 2^s)
        assert g == want
        if s > 0:
            assert g == math.floor(x / 2**s + 0.5)  # round half up, also for negatives
    assert nx.round_shift(np.array([5, -5, 6, -6]), 1).tolist() == [3, -2, 3, -3]
    # all shifts right, all left, per-row shifts broadcast: the shorter paths, the same integers
    for lo, hi in ((1, 30), (-8, 1)):
        ss = rng.integers(lo, hi, 2000)
        want = [x << -s if s <= 0 else (x + (1 << (s - 1))) >> s for x, s in zip(xs.tolist(), ss.tolist())]
        assert nx.round_shift(xs, ss).tolist() == want
    rows = xs[:12].reshape(3, 4)
    for k in ([[3], [0], [7]], [[3], [1], [7]], [[-2], [0], [-1]]):
        want = [[v << -kk[0] if kk[0] <= 0 else (v + (1 << (kk[0] - 1))) >> kk[0] for v in r]
                for r, kk in zip(rows.tolist(), k)]
        assert nx.round_shift(rows, np.array(k)).tolist() == want


def test_requantize_rounds_and_saturates_without_touching_its_input():
    acc = rng.integers(-(1 << 40), 1 << 40, (4, 500))
    keep = acc.copy()
    for shift in (12, np.array([[20], [3], [0], [-2]]), np.array([[20], [-1], [5], [9]])):
        s = np.broadcast_to(shift, acc.shape)
        want = [[max(-32768, min(32767, x << -k if k <= 0 else (x + (1 << (k - 1))) >> k))
                 for x, k in zip(r, ks)] for r, ks in zip(acc.tolist(), s.tolist())]
        assert nx.requantize(acc, shift).tolist() == want
        assert np.array_equal(acc, keep)
    assert int(nx.requantize(np.int64(1 << 30), 3, 8)) == 127
    assert int(nx.requantize(-(1 << 30), 3, 8)) == -128


def test_bit_length_matches_python():
    xs = np.concatenate([np.arange(0, 600), rng.integers(0, 1 << 62, 500)])
    assert nx.bit_length(xs).tolist() == [int(x).bit_length() for x in xs.tolist()]
    # below 2^53 (the float64 path): every power of two and its neighbours, up to 2^53 - 1
    p2 = np.array([(1 << b) + d for b in range(54) for d in (-1, 0, 1) if 0 <= (1 << b) + d < (1 << 53)])
    for xs in (p2, rng.integers(0, 1 << 53, 2000), np.array([0, 0])):
        assert nx.bit_length(xs).tolist() == [int(x).bit_length() for x in xs.tolist()]


def test_quantize_act_range_and_shift():
    for scale in (1, 100, 127, 128, 255, 256, 30000, 1 << 30):
        v = rng.integers(-scale, scale + 1, (5, 64))
        v[:, 0] = scale  # make the max exactly `scale`
        a, k = nx.quantize_act(v)
        assert np.abs(a).max() <= 127
        assert (k == max(0, scale.bit_length() - 7)).all()
        assert (np.abs(a - v / 2.0 ** k[:, None]) <= 0.5 + 1e-9).all() or scale >= 255
    a, k = nx.quantize_act(np.zeros((2, 8), dtype=np.int64))
    assert (a == 0).all() and (k == 0).all()


@pytest.mark.parametrize("bits,group", [(8, 48), (4, 16), (3, 16), (6, 8)])
def test_matvec_exact_against_python_loops(bits, group):
    w = rng.normal(0, 0.05, (7, 48))
    qt = nx.quantize_matrix(w, bits, group)
    assert np.abs(qt.q).max() <= nx.qmax(bits)
    a = rng.integers(-127, 128, (3, 48))
    a[0] = 127  # extremes
    got = nx.matvec(qt, a)
    for b in range(3):
        for r in range(7):
            want = sum(int(qt.m[r, g]) * sum(int(qt.q[r, j]) * int(a[b, j])
                                             for j in range(g * group, (g + 1) * group))
                       for g in range(48 // group))
            assert got[b, r] == want
            assert abs(want) < 2 ** (nx.matvec_acc_bits(bits, group, 48) - 1)


def test_weight_quantization_error_is_reported_and_small():
    w = rng.normal(0, 0.02, (64, 128))
    e8 = nx.quantize_matrix(w, 8, 128).dequantize() - w
    e4 = nx.quantize_matrix(w, 4, 32).dequantize() - w
    rel8, rel4 = np.sqrt((e8**2).mean() / (w**2).mean()), np.sqrt((e4**2).mean() / (w**2).mean())
    assert rel8 < 0.02 and rel4 < 0.15 and rel8 < rel4


def test_rmsnorm_against_float():
    x = rng.normal(0, 2, (16, 128))
    f_x = 10
    xi = np.round(x * 2**f_x).astype(np.int64)
    g = rng.uniform(0.3, 3, 128)
    gq, f_g = nx.norm_weight_q(g)
    step = steps.norm_step(f_g, nx.rms_eps_int(1e-5, 128, f_x))
    y = nx.rmsnorm(xi, gq, step) / 2.0**nx.NORM_OUT_FRAC
    xr = xi / 2.0**f_x
    ref = xr / np.sqrt((xr**2).mean(-1, keepdims=True) + 1e-5) * g
    assert np.abs(y - ref).max() < 0.004 * np.abs(ref).max()


def test_rsqrt_table_relative_error():
    ss = np.unique(rng.integers(1, 1 << 45, 5000))
    r, k = nx.rsqrt_parts(ss)
    approx = r * 2.0 ** -(nx.RSQRT_FRAC + k)
    assert np.abs(approx * np.sqrt(ss) - 1).max() < 2.5e-3


def test_exp_and_sigmoid_tables():
    d = np.arange(0, 6000)
    assert np.abs(nx.exp_neg(d) / nx.EXP_ONE - np.exp(-d / 256)).max() < 5e-5
    assert nx.exp_neg(np.array([0]))[0] == nx.EXP_ONE
    f_h = 10
    h1 = rng.integers(-12 << f_h, 12 << f_h, 4000)
    h3 = np.full_like(h1, 1 << f_h)
    got = nx.swiglu(h1, h3, steps.swiglu_step(f_h)) / 2.0**f_h
    x = h1 / 2.0**f_h
    assert np.abs(got - x / (1 + np.exp(-x))).max() < 0.03


def test_rope_rotation_against_float():
    inv = nx.rope_inv_freq(16, 10000.0)
    cos, sin = nx.rope_table(np.arange(256), inv)
    v = rng.integers(-20000, 20000, (256, 3, 16))
    out = np.stack([nx.rope(v[p], cos[p], sin[p]) for p in range(256)])
    ang = np.outer(np.arange(256), inv)[:, None, :]
    a, b = v[..., 0::2], v[..., 1::2]
    ref_a, ref_b = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
    assert np.abs(out[..., 0::2] - ref_a).max() < 4 and np.abs(out[..., 1::2] - ref_b).max() < 4


def test_llama3_rope_scaling_matches_reference_formula():
    s = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    inv = nx.rope_inv_freq(128, 500000.0, s)
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    for f, b in zip(inv, base):  # the published apply_scaling, element by element
        wl = 2 * math.pi / b
        if wl < 8192 / 4:
            want = b
        elif wl > 8192 / 1:
            want = b / 8
        else:
            sm = (8192 / wl - 1) / (4 - 1)
            want = (1 - sm) * b / 8 + sm * b
        assert f == pytest.approx(want, rel=1e-12)


def test_attention_head_against_float_softmax():
    hd, T = 16, 40
    q8 = rng.integers(-127, 128, hd)
    k8 = rng.integers(-127, 128, (T, hd))
    v8 = rng.integers(-127, 128, (T, hd))
    f_qk, kq, e_k, e_v = 9, 2, 6, 5
    fq = f_qk - kq  # q8's frac
    step = steps.attention_step(f_qk, e_k, e_v, hd)
    out = nx.attention_head(q8, kq, k8, v8, step) / 2.0**nx.ATT_OUT_FRAC
    s = (k8 / 2.0**e_k) @ (q8 / 2.0**fq) / math.sqrt(hd)
    p = np.exp(s - s.max())
    p /= p.sum()
    ref = p @ (v8 / 2.0**e_v)
    assert np.abs(out - ref).max() < 0.02


def _attention_head_by_integers(q8, kq, k8, v8, step, mask=None):
    """attention_head's arithmetic with its two products as exact int64 sums (no float BLAS)."""
    dot = (np.asarray(k8, np.int64) * np.asarray(q8, np.int64)[..., None, :]).sum(-1)
    s = nx.round_shift(dot * step.scale, step.score_shift(kq)[..., None])
    if mask is not None:
        s = np.where(mask, s, np.iinfo(np.int64).min // 4)
    e = nx.exp_neg(s.max(axis=-1, keepdims=True) - s)
    out = (e[..., :, None] * np.asarray(v8, np.int64)).sum(-2)
    recip = (1 << nx.ATT_RECIP_BITS) // e.sum(axis=-1)
    return nx.round_shift(out * recip[..., None], step.out)


@pytest.mark.parametrize("hd", [16, 128, 2048])
def test_attention_head_products_are_exact_at_the_extremes(hd):
    """The float BLAS products inside attention_head are exact integers: the largest dots
    (q = 127 against k = -128 in every element) and weighted sums (every weight 1.0, v = -128)
    give what int64 sums give, for one query and for causally masked queries over many positions."""
    T = 300
    step = steps.attention_step(f_qk=11, e_k=3, e_v=4, head_dim=hd)  # q8's frac: 11 - kq
    for trial in range(3):
        q8 = rng.integers(-127, 128, (2, 3, hd))
        k8 = rng.integers(-128, 128, (2, 1, T, hd))
        v8 = rng.integers(-128, 128, (2, 1, T, hd))
        if trial:  # the extremes: every score equal and largest, every v at -128
            q8[:] = -127 if trial == 2 else 127
            k8[:], v8[:] = -128, -128
        mask = np.arange(T)[None, None, :] <= np.array([[5, T - 1, 200]])[..., None]
        for kq, mk in ((np.array([[7, 7, 7], [2, 2, 2]]), None), (4, mask)):
            got = nx.attention_head(q8, kq, k8, v8, step, mk)
            assert np.array_equal(got, _attention_head_by_integers(q8, kq, k8, v8, step, mk))


def test_argmax_lowest_index_on_ties():
    assert nx.argmax(np.array([[1, 5, 5, 2], [7, 7, 7, 7]])).tolist() == [1, 0]


def test_xorshift32_reference_sequence():
    r = nx.XorShift32(0)
    r.state = 2463534242  # Marsaglia (2003), "Xorshift RNGs": first output 723471715
    assert r.next() == 723471715
    a, b = nx.XorShift32(42), nx.XorShift32(42)
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]
    assert nx.XorShift32(0).state != 0


def test_sampling_follows_the_softmax():
    logits = np.array([0.0, 1.0, 2.0, -1.0, 2.0])
    q8 = np.round(logits * 256).astype(np.int64)
    inv_t = nx.temperature_q8(1.0)
    rng32 = nx.XorShift32(7)
    n = 20000
    counts = np.bincount([nx.sample(q8, inv_t, rng32) for _ in range(n)], minlength=5)
    p = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(counts / n - p).max() < 0.015
    # top-k keeps the k largest, lowest index first on ties: k=1 -> index 2
    assert {nx.sample(q8, inv_t, rng32, top_k=1) for _ in range(50)} == {2}
    with pytest.raises(ValueError):
        nx.temperature_q8(0)
