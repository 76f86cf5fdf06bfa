"""steps.make_steps: the per-step constants of the default baked model mean what the data flow says.

Each matrix step's shift is checked against a float computation of the same product (the result
must be the rounded value at the frac the data flow gives it: q at f_qk, v at e_v, ...), the
attention's score and output shifts (which the gateware applies) against numerics.attention_head
(which the golden model calls), and the golden model and the 8B runner are shown to take their
shifts from the pass: a perturbed constant changes their output."""

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
    for ls in st.layers:
        got = nx.saturate(nx.round_shift(k, ls.k_cache), 8)
        assert (got == _round_half_up(k * 2.0 ** (ls.e_k - ls.q_frac), 8)).all()


def _head(q8, kq, k8, v8, ls, hd, score_base, att_out):
    """One head with the shifts applied as the gateware applies them (attention.py): Q8 scores at
    score_base - kq, exp table weights, the reciprocal, the output shift att_out."""
    dot = k8 @ q8
    s = nx.round_shift(dot * nx.score_scale(hd), score_base - kq)
    e = nx.exp_neg(s.max() - s)
    recip = (1 << nx.ATT_RECIP_BITS) // e.sum()
    return nx.round_shift((e @ v8) * recip, att_out)


def test_attention_shifts_are_those_of_attention_head(model):
    """The score and output shifts of the pass, applied step by step, give exactly
    numerics.attention_head's output (the golden model's attention) for every layer's formats;
    one off in either gives other values on the same inputs."""
    st, hd, rng = steps.model_steps(model), model.cfg.head_dim, np.random.default_rng(2)
    for ls in st.layers:
        for kq in (0, 1, 4):
            q8 = rng.integers(-127, 128, hd)
            k8, v8 = rng.integers(-127, 128, (9, hd)), rng.integers(-127, 128, (9, hd))
            want = nx.attention_head(q8, np.int64(ls.q_frac - kq), k8, v8, ls.e_k, ls.e_v, hd)
            assert (_head(q8, kq, k8, v8, ls, hd, ls.score_base, ls.att_out) == want).all()
            assert (_head(q8, kq, k8, v8, ls, hd, ls.score_base + 1, ls.att_out) != want).any()
            assert (_head(q8, kq, k8, v8, ls, hd, ls.score_base, ls.att_out - 1) != want).any()


def _bump(rq: steps.Requant) -> steps.Requant:
    return replace(rq, base=rq.base + 1)


MATRIX_STEPS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")
LAYER_CONSTANTS = ("k_cache", "q_frac", "e_k", "e_v", "h_frac", "f_g_att", "f_g_ffn")


def _perturbed(s: steps.Steps, what: str) -> steps.Steps:
    """The pass with one constant changed: f_x, a matrix step of layer 1, or a constant of layer 0."""
    if what == "f_x":
        return replace(s, f_x=s.f_x - 1)
    layers = list(s.layers)
    if what in MATRIX_STEPS:
        layers[1] = replace(layers[1], **{what: _bump(getattr(layers[1], what))})
    else:
        layers[0] = replace(layers[0], **{what: getattr(layers[0], what) + 1})
    return replace(s, layers=tuple(layers))


@pytest.mark.parametrize("what", ["f_x", *MATRIX_STEPS, *LAYER_CONSTANTS])
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


def test_runner_takes_its_shifts_from_the_pass(model):
    """The 8B runner likewise: equal to the golden model with the pass as it is, different with
    one matrix step's shift changed."""
    from bakedllama.llama8b import partition, quant, runner

    qm = quant.from_baked(model)
    r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, None))
    g = Golden(model)
    gs = g.new_state(1)
    toks = [5, 9, 300]
    want = [g.forward(gs, [t]).acc for t in toks]
    s = r.new_state()
    assert all((r.forward(s, t).acc == w).all() for t, w in zip(toks, want))
    r.steps = replace(r.steps, layers=(replace(r.steps.layers[0], w2=_bump(r.steps.layers[0].w2)),
                                       *r.steps.layers[1:]))
    s = r.new_state()
    got = [r.forward(s, t).acc for t in toks]
    assert any((a != b).any() for a, b in zip(got, want))


def test_bad_formats_are_refused(model):
    shifts = steps.baked_shifts(model)
    fmt = {k: v for k, v in model.fmt.items() if k != "f_qk"}
    with pytest.raises(ValueError, match="no 'f_qk'"):
        steps.make_steps(model.cfg, fmt, shifts)
    with pytest.raises(ValueError, match="'e_k' has 3 entries for 4 layers"):
        steps.make_steps(model.cfg, dict(model.fmt, e_k=[1, 2, 3]), shifts)
