"""Golden model: float agreement, batch invariance, traces, generation limits, float reference = torch."""

import numpy as np
import pytest
from bakedllama.bake import bake, write_baked
from bakedllama.evaluate import evaluate
from bakedllama.golden import Golden, Trace, generate
from bakedllama.model import load_baked
from bakedllama.synthetic import random_float_weights


def test_golden_tracks_the_float_model_at_8_bits(small_cfg, small_baked):
    w = random_float_weights(small_cfg, seed=3)
    ids = np.random.default_rng(0).integers(0, small_cfg.vocab_size, 4 * small_cfg.seq_len + 1)
    ev = evaluate(small_cfg, w, small_baked, ids, progress=False)
    assert ev["kl_float_golden"] < 0.02, ev
    assert ev["top1_agreement"] > 0.9, ev
    assert abs(ev["val_loss_golden"] - ev["val_loss_float"]) < 0.05, ev


def test_batch_rows_equal_single_runs(small_baked):
    g = Golden(small_baked)
    toks = np.random.default_rng(1).integers(0, 64, (3, 12))
    sb = g.new_state(3)
    batch = [g.forward(sb, toks[:, p]) for p in range(12)]
    for b in range(3):
        s1 = g.new_state(1)
        for p in range(12):
            one = g.forward(s1, toks[b:b + 1, p])
            assert (one.acc[0] == batch[p].acc[b]).all() and one.frac[0] == batch[p].frac[b]


def test_trace_has_every_layer_and_matches_residual(small_baked, small_cfg):
    """The trace holds the residual stream itself: the embedding, each block's output as the next
    block computes from it, and the last layer's output is what the classifier turned into logits."""
    from bakedllama.golden import attention_block, classifier, embed, ffn_block

    g = Golden(small_baked)
    f = g.fmt
    s, tr = g.new_state(1), Trace()
    g.forward(s, [7])  # position 0, so position 1 attends over two cache rows
    out = g.forward(s, [5], trace=tr)
    assert len(tr.layers) == small_cfg.n_layers
    assert (tr.embedding == embed(small_baked.weights["tok_embeddings"], [5], f["f_x"])).all()
    # replay the blocks on a copy of the cache as it was before position 1, from the traced inputs
    s2 = g.new_state(1)
    g.forward(s2, [7])
    x = tr.embedding
    cos, sin = g.rope_cos[1], g.rope_sin[1]
    for l, layer in enumerate(tr.layers):
        lw = g.layer(l)
        assert layer["x_att"].shape == (1, small_cfg.dim)
        x_att = attention_block(small_cfg, lw, x, s2.key_cache[l], s2.value_cache[l], 1, cos, sin)
        assert (x_att == layer["x_att"]).all(), f"layer {l}: x_att is not the attention block's output"
        assert (ffn_block(small_cfg, lw, layer["x_att"]) == layer["x_ffn"]).all(), f"layer {l}: x_ffn"
        assert not (layer["x_att"] == x).all()  # each block changes the residual
        x = layer["x_ffn"]
    want = classifier(small_baked.norms["rms_final_weight"], g.steps.rms_final, small_baked.wcls, x)
    assert (want.acc == out.acc).all() and (want.frac == out.frac).all()


def test_generation_is_deterministic_and_bounded(small_baked, small_cfg):
    g = Golden(small_baked)
    a = list(generate(g, [1, 2, 3], 10))
    assert a == list(generate(g, [1, 2, 3], 10))
    s1 = list(generate(g, [1, 2, 3], 10, temperature=1.0, seed=9))
    assert s1 == list(generate(g, [1, 2, 3], 10, temperature=1.0, seed=9))
    assert all(0 <= t < small_cfg.vocab_size for t in a + s1)
    with pytest.raises(ValueError, match="exceeds the context"):
        list(generate(g, [1] * 30, 3))
    with pytest.raises(ValueError, match="empty"):
        list(generate(g, [], 3))


def test_bad_scheme_is_refused(small_cfg):
    w = random_float_weights(small_cfg)
    with pytest.raises(ValueError, match="unknown weight scheme"):
        bake(small_cfg, w, np.zeros((1, 4), dtype=np.int64), "w5")


def test_3_6_scheme_uses_6_bits_for_sensitive_tensors(tmp_path, small_cfg):
    w = random_float_weights(small_cfg)
    meta, t = bake(small_cfg, w, np.zeros((1, 8), dtype=np.int64), "w3/6")
    write_baked(tmp_path / "m.bkl", meta, t)
    m = load_baked(tmp_path / "m.bkl")
    assert m.weights["wq"].bits == 3 and m.weights["w2"].bits == 6 and m.weights["wcls"].bits == 6
    assert np.abs(m.weights["wq"].q).max() <= 3


def test_float_reference_equals_the_torch_training_model(small_cfg):
    import torch
    from bakedllama.reference import FloatModel

    from weights.train import build_model, state_to_numpy

    torch.manual_seed(0)
    model = build_model(small_cfg)
    for p in model.parameters():  # break the symmetric init of the norms
        p.data += 0.05 * torch.randn_like(p)
    toks = torch.randint(0, small_cfg.vocab_size, (2, 20))
    with torch.no_grad():
        want = model(toks).numpy()
    got = FloatModel(small_cfg, state_to_numpy(model, small_cfg)).forward_sequence(toks.numpy())
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
