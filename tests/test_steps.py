"""steps.make_steps: the per-step constants of the default baked model mean what the data flow says.

Each matrix step's shift is checked against a float computation of the same product (the result
must be the rounded value at the frac the data flow gives it: q at f_qk, v at e_v, ...), the norms'
and the attention's shifts likewise (u at U_FRAC, the norm at NORM_OUT_FRAC, scores at Q8, the
attention at ATT_OUT_FRAC), numerics.rmsnorm and attention_head are shown to apply their step's
constants, and the golden model and the 8B runner to take their shifts from the pass: a perturbed
constant changes their output."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama import steps
from bakedllama.golden import Golden, embed
from bakedllama.model import DEFAULT_BAKED, load_baked


@pytest.fixture(scope="module")
def model():
    return load_baked(DEFAULT_BAKED)


def _round_half_up(v, bits):
    return nx.saturate(np.floor(v + 0.5).astype(np.int64), bits)


def _data_flow(fmt, l):
    """(input frac before int8 quantization, output frac, output bits) of each matrix of layer l,
    as bake.py / numerics document the formats: the norms emit NORM_OUT_FRAC, the attention
    ATT_OUT_FRAC, SwiGLU f_h; q/k are int16 at f_qk, v goes to the int8 value cache (e_v), h1/h3
    are int16 at f_h, wo/w2 add into the residual (f_x) from 32-bit accumulations."""
    N = nx.NORM_OUT_FRAC
    return dict(wq=(N, fmt["f_qk"], 16), wk=(N, fmt["f_qk"], 16), wv=(N, fmt["e_v"][l], 8),
                wo=(nx.ATT_OUT_FRAC, fmt["f_x"], 32), w1=(N, fmt["f_h"], 16),
                w3=(N, fmt["f_h"], 16), w2=(fmt["f_h"], fmt["f_x"], 32))


def test_matrix_steps_put_each_product_at_its_format(model):
    """For every matrix of every layer and the classifier: the step's integer result is the float
    product (dequantized weights x the input at its frac) rounded half up at the output frac.
    float64 is exact here (integers below 2^53 times powers of two)."""
    st, fmt, rng = steps.model_steps(model), model.fmt, np.random.default_rng(0)
    cases = []
    for l, ls in enumerate(st.layers):
        for name, flow in _data_flow(fmt, l).items():
            cases.append((model.weights[name][l], getattr(ls, name), flow))
    cases.append((model.wcls, st.cls, (nx.NORM_OUT_FRAC, nx.SCORE_FRAC, 32)))
    for w, rq, (frac_in, frac_out, bits) in cases:
        assert (rq.frac, rq.bits) == (frac_out, bits)
        a = rng.integers(-127, 128, (3, w.cols))
        k = np.array([0, 2, 5])  # the input's quantization shifts: its frac is frac_in - k
        got = rq.apply(nx.matvec(w, a), k)
        ref = (a * 2.0 ** -(frac_in - k)[:, None]) @ w.dequantize().T
        assert (got == _round_half_up(ref * 2.0**frac_out, bits)).all()
        # the accumulators' frac (the classifier keeps them as logits)
        assert (nx.matvec(w, a) * 2.0 ** -rq.acc_frac(k)[:, None] == ref).all()


def test_embedding_and_key_cache_shifts(model):
    st, e, rng = steps.model_steps(model), model.weights["tok_embeddings"], np.random.default_rng(1)
    tokens = rng.integers(0, model.cfg.vocab_size, 20)
    q = e.q[tokens].astype(np.int64) * np.repeat(e.m[tokens].astype(np.int64), e.group, axis=-1)
    want = _round_half_up(e.dequantize()[tokens] * 2.0 ** st.f_x, 16)
    assert (nx.requantize(q, st.embed) == want).all()  # the gateware's embedding shift
    assert (embed(e, tokens, st.f_x) == want).all()  # the golden model's
    k = rng.integers(-32768, 32768, 500)  # rotated keys, int16 frac f_qk
    for l, ls in enumerate(st.layers):
        got = nx.saturate(nx.round_shift(k, ls.k_cache), 8)
        assert (got == _round_half_up(k * 2.0 ** (model.fmt["e_k"][l] - model.fmt["f_qk"]), 8)).all()


def test_norm_steps_put_u_and_the_output_at_their_formats(model):
    """For every norm of the pass (in Steps.norms() order, the gains' frac from the formats):
    x * r (1/sqrt(ss) = r 2^-(RSQRT_FRAC + k)) rounded at u_shift(k) is x / sqrt(ss) at U_FRAC, and
    u * g rounded at `out` is the product at NORM_OUT_FRAC, both rounded half up; numerics.rmsnorm
    applies exactly these, with the step's eps_int, and takes them from the step."""
    st, fmt, rng = steps.model_steps(model), model.fmt, np.random.default_rng(3)
    L = model.cfg.n_layers
    f_g = [f for l in range(L) for f in (fmt["f_g_rms_att_weight"][l], fmt["f_g_rms_ffn_weight"][l])]
    f_g.append(fmt["f_g_rms_final_weight"])
    gains = [model.norms[n][l] for l in range(L) for n in ("rms_att_weight", "rms_ffn_weight")]
    gains.append(model.norms["rms_final_weight"])
    norms = st.norms()
    assert len(norms) == len(f_g) == 2 * L + 1
    for ns, fg, g in zip(norms, f_g, gains):
        assert ns.eps_int == fmt["eps_int"]
        x = rng.integers(-3000, 3000, (4, model.cfg.dim)) >> rng.integers(0, 8, (4, 1))
        r, k = nx.rsqrt_parts((x * x).sum(-1) + ns.eps_int)
        u = nx.round_shift(x * r[:, None], ns.u_shift(k)[:, None])
        want_u = np.floor(x * r[:, None] * 2.0 ** -(nx.RSQRT_FRAC + k[:, None] - nx.U_FRAC) + 0.5)
        assert (u == want_u).all()
        xb = nx.round_shift(u * g.astype(np.int64), ns.out)
        want = np.floor(u * 2.0**-nx.U_FRAC * g * 2.0 ** (nx.NORM_OUT_FRAC - fg) + 0.5)
        assert (xb == want).all()
        assert (nx.rmsnorm(x, g, ns) == xb).all()
        for other in (replace(ns, u_base=ns.u_base + 1), replace(ns, out=ns.out - 1),
                      replace(ns, eps_int=ns.eps_int + (1 << 30))):
            assert (nx.rmsnorm(x, g, other) != xb).any(), other


def test_attention_steps_put_scores_and_output_at_their_formats(model):
    """For every layer: the score shift for kq turns q8 (frac f_qk - kq) . k8 (frac e_k) times the
    Q15 scale into Q8 scores, and the output shift turns sum(e * v) (values frac e_v) times the
    2^ATT_RECIP_BITS reciprocal into ATT_OUT_FRAC, both rounded half up (float64 is exact here);
    numerics.attention_head applies exactly these and takes them from the step: one off in either
    gives other values on the same inputs."""
    st, fmt, rng = steps.model_steps(model), model.fmt, np.random.default_rng(2)
    hd = model.cfg.head_dim
    for l, ls in enumerate(st.layers):
        a, e_k, e_v = ls.att, fmt["e_k"][l], fmt["e_v"][l]
        assert (a.scale, a.e_k) == (nx.score_scale(hd), e_k)
        for kq in (0, 1, 4):
            q8 = rng.integers(-127, 128, hd)
            k8, v8 = rng.integers(-127, 128, (9, hd)), rng.integers(-127, 128, (9, hd))
            dot = k8 @ q8
            s = nx.round_shift(dot * a.scale, a.score_shift(kq))
            real = dot * 2.0 ** -(fmt["f_qk"] - kq + e_k) * a.scale * 2.0**-nx.SCORE_SCALE_FRAC
            assert (s == np.floor(real * 2.0**nx.SCORE_FRAC + 0.5)).all()
            e = nx.exp_neg(s.max() - s)
            w = (e @ v8) * ((1 << nx.ATT_RECIP_BITS) // e.sum())
            o = nx.round_shift(w, a.out)
            want = np.floor(w * 2.0 ** -(nx.ATT_RECIP_BITS + e_v - nx.ATT_OUT_FRAC) + 0.5)
            assert (o == want).all()
            assert (nx.attention_head(q8, kq, k8, v8, a) == o).all()
            assert (nx.attention_head(q8, kq, k8, v8, replace(a, score_q=a.score_q + 1)) != o).any()
            assert (nx.attention_head(q8, kq, k8, v8, replace(a, out=a.out - 1)) != o).any()


def test_swiglu_steps_put_the_index_and_hb_at_their_formats(model):
    """The SwiGLU step of every layer: h1 (frac f_h) rounded at `index` is h1 at the sigmoid
    table's resolution SIG_FRAC_IN, silu * h3 rounded at `out` is the product at f_h (silu, from
    the Q15 sigmoid, has h1's frac); numerics.swiglu applies exactly these and takes them from
    the step."""
    st, f_h, rng = steps.model_steps(model), model.fmt["f_h"], np.random.default_rng(4)
    for ls in st.layers:
        sw = ls.swiglu
        h1, h3 = rng.integers(-32768, 32768, (2, 500))
        h1[:100] >>= 6  # inside the table's range
        t = nx.round_shift(h1, sw.index)
        assert (t == np.floor(h1 * 2.0 ** (nx.SIG_FRAC_IN - f_h) + 0.5)).all()
        idx = np.clip(t + nx.SIG_ENTRIES // 2, 0, nx.SIG_ENTRIES - 1)
        silu = nx.round_shift(h1 * nx.SIGMOID_TABLE[idx], 15)
        hb = nx.saturate(nx.round_shift(silu * h3, sw.out), 16)
        assert (hb == _round_half_up(silu * 2.0**-f_h * h3 * 2.0**-f_h * 2.0**f_h, 16)).all()
        assert (nx.swiglu(h1, h3, sw) == hb).all()
        for other in (replace(sw, index=sw.index + 1), replace(sw, out=sw.out + 1)):
            assert (nx.swiglu(h1, h3, other) != hb).any(), other


def _bump(rq: steps.Requant) -> steps.Requant:
    return replace(rq, base=rq.base + 1)


MATRIX_STEPS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
LAYER_CONSTANTS = ("k_cache", "rms_att.eps_int", "rms_att.u_base", "rms_att.out", "rms_ffn.out",
                   "att.scale", "att.score_q", "att.e_k", "att.out", "swiglu.index", "swiglu.out")
BUMP = {"eps_int": 1 << 30}  # eps_int: a change that is not lost in the sum of squares


def _bumped(step, field: str):
    return replace(step, **{field: getattr(step, field) + BUMP.get(field, 1)})


def _perturbed(s: steps.Steps, what: str) -> steps.Steps:
    """The pass with one constant changed: f_x, the final norm's output shift, a matrix step of
    layer 1, or a constant of layer 0 (part.field: a field of one of its steps)."""
    if what == "f_x":
        return replace(s, f_x=s.f_x - 1)
    if what == "rms_final.out":
        return replace(s, rms_final=_bumped(s.rms_final, "out"))
    layers = list(s.layers)
    if what in MATRIX_STEPS:
        layers[1] = replace(layers[1], **{what: _bump(getattr(layers[1], what))})
    elif "." in what:
        part, field = what.split(".")
        layers[0] = replace(layers[0], **{part: _bumped(getattr(layers[0], part), field)})
    else:
        layers[0] = _bumped(layers[0], what)
    return replace(s, layers=tuple(layers))


@pytest.mark.parametrize("what", ["f_x", *MATRIX_STEPS, *LAYER_CONSTANTS, "rms_final.out"])
def test_golden_forward_takes_its_shifts_from_the_pass(model, what):
    """The golden model computes no shift of its own: a constant changed in Golden.steps changes
    the logits (or, for the classifier step, their frac)."""
    toks = [3, 100, 7, 42]
    g = Golden(model)
    s = g.new_state(1)
    ref = [g.forward(s, [t]) for t in toks]
    g2 = Golden(model)
    g2.steps = _perturbed(g2.steps, what)
    s2 = g2.new_state(1)
    out = [g2.forward(s2, [t]) for t in toks]
    assert any((a.acc != b.acc).any() or (a.frac != b.frac).any() for a, b in zip(ref, out)), what


def test_classifier_step_gives_the_golden_q8_logits(model):
    """The gateware turns the classifier's accumulators into the sampler's Q8 logits with
    cls.shift(k); the golden model's Logits.q8 does it from the logits' frac: the same integers."""
    g = Golden(model)
    s = g.new_state(2)
    for t in ([1, 2], [300, 4], [77, 77]):
        lg = g.forward(s, t)
        k = g.steps.cls.acc_frac(0) - lg.frac  # the classifier input's quantization shift
        assert ((k >= 0) & (k <= 16)).all()
        assert (lg.q8() == g.steps.cls.apply(lg.acc, k)).all()
        assert (lg.q8() != replace(g.steps.cls, base=g.steps.cls.base - 1).apply(lg.acc, k)).any()


@pytest.mark.parametrize("what", ["w2", "rms_att.out", "att.score_q", "rms_final.out"])
def test_runner_takes_its_shifts_from_the_pass(model, what):
    """The 8B runner likewise: equal to the golden model with the pass as it is, different with
    one constant changed (a matrix step, a norm's, the attention's)."""
    from bakedllama.llama8b import partition, quant, runner

    qm = quant.from_baked(model)
    r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, None))
    g = Golden(model)
    gs = g.new_state(1)
    toks = [5, 9, 300]
    want = [g.forward(gs, [t]) for t in toks]
    s = r.new_state()
    assert all((r.forward(s, t).acc == w.acc).all() for t, w in zip(toks, want))
    r.steps = _perturbed(r.steps, what)
    s = r.new_state()
    got = [r.forward(s, t) for t in toks]
    assert any((a.acc != b.acc).any() or (a.frac != b.frac).any() for a, b in zip(got, want)), what


def test_bad_formats_are_refused(model):
    shifts = steps.baked_shifts(model)
    fmt = {k: v for k, v in model.fmt.items() if k != "f_qk"}
    with pytest.raises(ValueError, match="no 'f_qk'"):
        steps.make_steps(model.cfg, fmt, shifts)
    with pytest.raises(ValueError, match="'e_k' has 3 entries for 4 layers"):
        steps.make_steps(model.cfg, dict(model.fmt, e_k=[1, 2, 3]), shifts)
