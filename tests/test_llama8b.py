"""Llama 3.1 8B in partitioned passes (host/bakedllama/llama8b): exactness, loading, bad input.

Everything runs on synthetic:llama3-tiny (the 8B's architecture at small dims, written into a
tmp dir) and on tiny random baked models; nothing needs a real 8B download."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama.config import ModelConfig
from bakedllama.fileformat import ModelFileError
from bakedllama.golden import Golden
from bakedllama.golden import generate as golden_generate
from bakedllama.llama8b import checkpoint, cli, kernels, partition, projection, quant, runner
from bakedllama.synthetic import random_baked


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b")
    checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, d, show_progress=False)
    return d


@pytest.fixture(scope="module")
def tiny_ck(tiny_dir):
    return checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, tiny_dir, show_progress=False)


# ----------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("bits,store", [(8, 8), (4, 4), (3, 4), (6, 8), (6, 6), (3, 3)])
def test_packed_matvec_equals_numerics_matvec(bits, store):
    rng = np.random.default_rng(bits * 10 + store)
    qm = nx.qmax(bits)
    for rows, cols, group in ((100, 64, 32), (257, 128, 128), (64, 96, 32)):
        q = rng.integers(-qm, qm + 1, (rows, cols)).astype(np.int8)
        m = rng.integers(1, 1 << 16, (rows, cols // group)).astype(np.uint16)
        p = kernels.pack(q, m, 7, bits, group, store)
        q2, m2 = kernels.unpack(p)
        assert np.array_equal(q2, q) and np.array_equal(m2, m)
        qt = nx.QTensor(q, m, np.int32(7), bits, group)
        for a in (rng.integers(-127, 128, cols), np.full(cols, 127), np.full(cols, -127)):
            ref = nx.matvec(qt, a)
            assert np.array_equal(kernels.matvec_packed(p, a), ref)
            assert np.array_equal(kernels.matvec_packed(p, a, 3, rows - 5), ref[3:rows - 5])
        # extremes: every weight at +-qmax, every multiplier at its maximum (largest sums)
        qe = np.where(rng.random((rows, cols)) < 0.5, qm, -qm).astype(np.int8)
        qe[0], qe[1] = qm, -qm
        me = np.full((rows, cols // group), (1 << 16) - 1, np.uint16)
        pe = kernels.pack(qe, me, 0, bits, group, store)
        for a in (np.full(cols, 127), np.full(cols, -127), rng.integers(-127, 128, cols)):
            assert np.array_equal(kernels.matvec_packed(pe, a),
                                  nx.matvec(nx.QTensor(qe, me, 0, bits, group), a))


def test_exactness_bound_is_enforced():
    kernels.check_exact(8, 1 << 23)  # 2^23 * 127 * 127 * 65535 < 2^53
    with pytest.raises(ValueError, match="overflow"):
        kernels.check_exact(8, 1 << 24)


def test_chunked_quantization_equals_quantize_matrix():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.02, (300, 64)).astype(np.float32)
    w[177, 5] = 0.3  # the pivot row lies in a later chunk
    for bits, group in ((8, 64), (3, 32), (6, 32)):
        ref = nx.quantize_matrix(w, bits, group)
        got = quant.quantize_rows(lambda a, b: w[a:b], 300, 64, bits, group, chunk=64)
        assert np.array_equal(got.q, ref.q) and np.array_equal(got.m, ref.m)
        assert int(got.shift) == int(ref.shift)


# ----------------------------------------------------------------------------- exactness
def _run(qm, chip, tokens):
    r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, chip))
    s = r.new_state()
    return [r.forward(s, t) for t in tokens]


@pytest.mark.parametrize("bits", ["8", "3/6"])
def test_partitioned_equals_unpartitioned(tiny_ck, tiny_dir, bits):
    qm = quant.quantized(tiny_ck, bits, cache_dir=tiny_dir, show_progress=False)
    layer = sum(u.nbytes for u in partition.model_units(qm.cfg, qm.fmt)[1:10])
    tokens = [384, 72, 101, 108, 111, 300]
    ref = _run(qm, None, tokens)
    for chip in (2 * layer + 100, layer - 1, 3000, 700):
        parts = partition.plan(qm.cfg, qm.fmt, chip)
        assert all(p.nbytes <= chip for p in parts)
        if chip < layer:  # split inside a layer, and rows of one matrix over several passes
            assert any(p.kind == "split" for p in parts)
            assert any(pc.r0 > 0 for p in parts for pc in p.pieces if pc.name.startswith("w"))
        got = _run(qm, chip, tokens)
        for a, b in zip(ref, got):
            assert np.array_equal(a.acc, b.acc) and np.array_equal(a.frac, b.frac), chip
        # batched passes (a prompt, a speculative pass): one pass over the weights for several
        # positions, identical to position by position, also when resuming at a later position
        r = runner.Runner(qm, partition.plan(qm.cfg, qm.fmt, chip), streaming=chip == 700)
        s = r.new_state()
        first = r.forward_many(s, tokens[:4])
        rest = r.forward_many(s, tokens[4:])
        assert s.pos == len(tokens)
        acc = np.concatenate([first.acc, rest.acc])
        frac = np.concatenate([first.frac, rest.frac])
        assert np.array_equal(acc, np.concatenate([a.acc for a in ref]))
        assert np.array_equal(frac, np.concatenate([a.frac for a in ref]))
    # the runner equals the golden model on the same quantized weights
    g = Golden(qm.to_baked())
    s = g.new_state()
    for t, a in zip(tokens, ref):
        b = g.forward(s, [t])
        assert np.array_equal(a.acc, b.acc) and np.array_equal(a.frac, b.frac)


@pytest.mark.parametrize("scheme", ["w4", "w8", "w3/6"])
def test_tiny_baked_model_partitioned_equals_golden(tmp_path, scheme):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=128,
                      seq_len=24)
    b = random_baked(tmp_path / "m.bkl", cfg, scheme=scheme)
    qm = quant.from_baked(b)
    g = Golden(b)
    prompt = [1, 7, 42, 99]
    want = list(golden_generate(g, prompt, 8))
    for chip in (None, 4000, 900):
        r = runner.Runner(qm, partition.plan(cfg, qm.fmt, chip))
        out = runner.generate(r, prompt, 8, keep_logits=True)
        assert out["tokens"] == want, chip
        s = g.new_state()
        for t, lg in zip(prompt + want, out["logits"]):
            gl = g.forward(s, [t])
            assert np.array_equal(gl.acc, lg.acc) and np.array_equal(gl.frac, lg.frac)


# ----------------------------------------------------------------------------- loading
def test_hf_permutation_round_trip():
    w = np.arange(8 * 16 * 3).reshape(8 * 16, 3)
    assert np.array_equal(checkpoint.permute_reverse(checkpoint.permute_forward(w, 8), 8), w)
    # head 0, pair 1: HF rows 1 (first half) and 9 (second half) -> interleaved rows 2 and 3
    assert np.array_equal(checkpoint.permute_reverse(w, 8)[2:4], w[[1, 9]])


def test_float_path_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=8192),
                        tie_word_embeddings=False, bos_token_id=0, eos_token_id=[1, 2])
    model = tf.LlamaForCausalLM(hc).eval()
    with torch.no_grad():  # non-trivial norm gains (the init leaves them at 1)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ck = checkpoint.HFCheckpoint(tmp_path, context=128)
    assert ck.cfg.rope_scaling == projection_scaling()
    tokens = np.random.default_rng(0).integers(0, 256, 40)
    with torch.no_grad():
        want = model(torch.tensor(tokens[None])).logits[0].double().numpy()
    got = quant.float_forward(ck, tokens)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    # and the project's float reference (reference.FloatModel) on the loaded weights
    from bakedllama.reference import FloatModel

    w = {n: np.stack([ck.tensor(n, l) for l in range(ck.cfg.n_layers)])
         for n in ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2", "w3")}
    for n in ("tok_embeddings", "rms_final_weight", "wcls"):
        w[n] = ck.tensor(n)
    ref = FloatModel(ck.cfg, w).forward_sequence(tokens[None])[0]
    assert np.abs(ref - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    # numerics' llama3 inverse frequencies are transformers' own
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hc, "cpu")
    mine = nx.rope_inv_freq(ck.cfg.head_dim, ck.cfg.rope_theta, ck.cfg.rope_scaling)
    assert np.allclose(inv.double().numpy(), mine, rtol=1e-6, atol=0)


def projection_scaling():
    return dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)


def test_synthetic_checkpoint_is_deterministic_bf16(tiny_ck, tmp_path):
    from safetensors import safe_open

    d = checkpoint.write_synthetic(tmp_path / "again", "llama3-tiny", show_progress=False)
    a = (tiny_ck.path / "model.safetensors").read_bytes()
    assert a == (d / "model.safetensors").read_bytes()
    f = safe_open(str(d / "model.safetensors"), framework="numpy")
    assert f.get_slice("model.layers.1.mlp.down_proj.weight").get_dtype() == "BF16"
    assert tiny_ck.cfg.n_kv_heads == 2 and not tiny_ck.cfg.tied_embeddings
    assert tiny_ck.special.bos == 384 and tiny_ck.special.stop == (385, 392, 393)
    w = tiny_ck.tensor("w1", 0)
    assert 0.015 < w.std() < 0.025 and abs(tiny_ck.tensor("rms_att_weight", 1).mean() - 1) < 0.1


def test_cache_is_checksummed(tiny_ck, tmp_path):
    path = quant.build_cache(tiny_ck, "w4", cache_dir=tmp_path, show_progress=False)
    quant.open_cache(path)
    f = path / "layer-01.bin"
    b = bytearray(f.read_bytes())
    b[100] ^= 1
    f.write_bytes(bytes(b))
    with pytest.raises(ModelFileError, match="checksum mismatch"):
        quant.open_cache(path)


# ----------------------------------------------------------------------------- the CLI and bad input
def _cli(*argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_json(tiny_dir, capsys):
    rc = cli.run(_cli("--checkpoint", "synthetic:llama3-tiny", "--cache-dir", str(tiny_dir),
                      "--bits", "3/6", "--chip-bytes", "2k", "--max-tokens", "4", "--context", "32",
                      "--check", "--agree", "8", "--json", "Hi"))
    out = capsys.readouterr().out
    assert rc == 0 and out.count("\n") == 1
    res = json.loads(out)
    assert res["check"]["tokens_identical"] and res["check"]["logits_identical"]
    assert res["partitions"] > 10 and len(res["token_ids"]) >= 1
    assert res["prompt_ids"][0] == 384 and res["peak_rss_bytes"] > 0
    assert res["bandwidth"]["ratio_to_bound"] > 0 and "hc1" in res["projection"]
    a = res["agreement"]
    assert a["positions"] == len(res["prompt_ids"]) + len(res["token_ids"]) - 1
    assert 0 <= a["top1_agreement"] <= 1 and a["kl_mean"] >= 0


def test_cli_text(tiny_dir, tmp_path, capsys):
    png = tmp_path / "proj.png"
    rc = cli.run(_cli("--checkpoint", "synthetic:llama3-tiny", "--cache-dir", str(tiny_dir),
                      "--max-tokens", "3", "--context", "16", "--plot", str(png), "Hello"))
    out = capsys.readouterr().out
    assert rc == 0 and png.exists()
    for key in ("partitions:", "text:", "seconds per token:", "peak RSS:", "memory bandwidth:",
                "HC1-like", "17,000"):
        assert key in out


def test_cli_runs_a_given_quantized_cache(tiny_ck, tiny_dir, capsys):
    path = quant.build_cache(tiny_ck, "w4", cache_dir=tiny_dir, show_progress=False)
    rc = cli.run(_cli("--checkpoint", "synthetic:llama3-tiny", "--cache-dir", str(tiny_dir),
                      "--quantized", str(path), "--max-tokens", "2", "--json", "Hi"))
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["scheme"] == "w4" and res["cache"] == str(path)
    assert res["cache_note"] is None


def test_agreement_of_identical_logits_is_perfect():
    from bakedllama.llama8b import agreement

    x = np.random.default_rng(0).normal(size=(5, 50))
    r = agreement.compare(x, x)
    assert r["top1_agreement"] == 1.0 and abs(r["kl_mean"]) < 1e-12


def _copy_ck(tiny_ck, dst, drop=None, reshape=None, config=None):
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import save_file

    dst.mkdir()
    from safetensors import safe_open

    f = safe_open(str(tiny_ck.path / "model.safetensors"), framework="numpy")
    t = {k: f.get_tensor(k).astype(np.float32) for k in f.keys() if k != drop}
    if reshape:
        t[reshape] = t[reshape][:-1]
    save_file(t, str(dst / "model.safetensors"))
    cfg = json.loads((tiny_ck.path / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, **(config or {}))))
    (dst / "tokenizer.json").write_text((tiny_ck.path / "tokenizer.json").read_text())
    return dst


@pytest.mark.parametrize("case,expect", [
    ("missing", "missing tensor 'model.layers.1.self_attn.k_proj.weight'"),
    ("shape", "tensor 'model.layers.0.mlp.up_proj.weight' has shape (159, 64), expected (160, 64)"),
    ("notllama", "not a Llama model"),
    ("chip", "too small for one row"),
    ("nodir", "no such checkpoint directory"),
    ("bits", "invalid choice"),
])
def test_bad_input_one_clear_line(tiny_ck, tiny_dir, tmp_path, capsys, case, expect):
    d = str(tiny_ck.path)
    extra = []
    if case == "missing":
        d = str(_copy_ck(tiny_ck, tmp_path / "c", drop="model.layers.1.self_attn.k_proj.weight"))
    elif case == "shape":
        d = str(_copy_ck(tiny_ck, tmp_path / "c", reshape="model.layers.0.mlp.up_proj.weight"))
    elif case == "notllama":
        d = str(_copy_ck(tiny_ck, tmp_path / "c", config=dict(model_type="gpt2",
                                                                architectures=["GPT2LMHeadModel"])))
    elif case == "chip":
        extra = ["--chip-bytes", "100"]
    elif case == "nodir":
        d = str(tmp_path / "nothing")
    if case == "bits":
        with pytest.raises(SystemExit):
            _cli("--checkpoint", d, "--bits", "5", "x")
        assert expect in capsys.readouterr().err
        return
    rc = cli.run(_cli("--checkpoint", d, "--cache-dir", str(tiny_dir), "--max-tokens", "1", *extra,
                      "x"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err


# ----------------------------------------------------------------------------- the memory bound
def test_pinned_weights_give_the_same_run(tiny_ck, tiny_dir):
    """--resident copies the matrices out of the cache mapping (QuantModel.pin): the same bytes in
    anonymous memory, no longer backed by the cache file, and the same logits at every position."""
    qm = quant.quantized(tiny_ck, "4", cache_dir=tiny_dir, show_progress=False)
    tokens = [384, 72, 101, 108]
    ref = _run(qm, None, tokens)
    before = {k: [np.array(a) for a in [*p.planes, p.m]] for k, p in qm.mats.items()}
    assert all(id(p.m) in qm.where for p in qm.mats.values())  # cache-backed before
    nbytes = qm.pin()
    assert nbytes == sum(p.nbytes() for p in qm.mats.values())
    for k, p in qm.mats.items():
        assert id(p.m) not in qm.where and not any(id(a) in qm.where for a in p.planes)
        for a, b in zip([*p.planes, p.m], before[k]):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    for a, b in zip(ref, _run(qm, None, tokens)):
        assert np.array_equal(a.acc, b.acc) and np.array_equal(a.frac, b.frac)


@pytest.fixture(scope="module")
def timing_model():
    """Random packed w8 weights, ~60 MiB (about twice a 32 MiB last-level cache: decode and bound
    both stream from DRAM here, as the 8B does); built directly, no checkpoint (~2 s)."""
    from bakedllama.llama8b import bandwidth

    cfg = ModelConfig(dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=3584,
                      vocab_size=8192, seq_len=16, tied_embeddings=False)
    return bandwidth.timing_model(cfg, "w8", seed=5)


@pytest.mark.parametrize("threads", [1, 2])
def test_bound_is_not_below_the_measured_decode_time(timing_model, threads):
    """The bytes a decode step reads, at the read bandwidth bandwidth.measure reports (resident
    buffer, the same threads, best of passes), take no longer than a measured decode step on the
    same threads: the bound is one. Both measured here, three interleaved rounds, the best of each
    (a busy 2-core machine slows either; the physical inequality holds for their best runs)."""
    from bakedllama.llama8b import bandwidth

    qm = timing_model
    nbytes = bandwidth.decode_bytes(qm)
    # every packed matrix + the gains + one embedding row (int8 weights, uint16 multipliers)
    assert nbytes == sum(p.nbytes() for p in qm.mats.values()) + (2 * 4 + 1) * 1024 * 2 \
        + 1024 + 2 * qm.embed.m.shape[1]
    decode, bound = [], None
    for _ in range(3):
        decode += bandwidth.time_decode(qm, threads, steps=2)
        b = bandwidth.measure(nbytes, threads)
        bound = b if bound is None else bandwidth.best(bound, b)
    assert bound.threads == threads and bound.runs == 3 * bandwidth.RUNS
    assert bound.buffer_bytes == bandwidth.buffer_bytes(nbytes)
    assert bound.seconds_for(nbytes) <= min(decode), (bound, decode)


def test_a_decode_faster_than_its_bound_is_reported_with_its_reason():
    from bakedllama.llama8b import bandwidth

    b = bandwidth.Bound(1e9, 1 << 20, 2, 2, 1, 32 << 20, ((2, (1 << 20) / 1e9),), 3.5)
    ok = bandwidth.compare(2e-3, 10 ** 6, b)  # 1 ms of reading: 2 ms is 2x the bound
    assert ok["ratio_to_bound"] == pytest.approx(2.0) and ok["warning"] is None
    bad = bandwidth.compare(0.5e-3, 10 ** 6, b)
    assert bad["ratio_to_bound"] == pytest.approx(0.5)
    assert "ratio 0.500 < 1" in bad["warning"] and "load average 3.5" in bad["warning"]


# ----------------------------------------------------------------------------- partitions, projection
def test_partitioner_8b_shapes():
    from bakedllama.llama8b.arch import LLAMA31_8B, from_hf_config

    cfg, _ = from_hf_config(LLAMA31_8B)
    fmt = projection.scheme_fmt(cfg, "w8")
    layer = sum(u.nbytes for u in partition.model_units(cfg, fmt)[1:10])
    # w8: one M_BITS multiplier per row; two int16 gain vectors
    mb = -(-(4096 * 8 + nx.M_BITS) // 8)
    assert layer == (2 * 4096 + 2 * 1024 + 2 * 14336) * mb + 4096 * -(-(14336 * 8 + nx.M_BITS) // 8) \
        + 2 * 8192
    parts = partition.plan(cfg, fmt, partition.HC1_BYTES)
    assert [p.kind for p in parts][0] == "embed" and parts[-1].kind == "head"
    assert sum(p.nbytes for p in parts) == sum(u.nbytes for u in partition.model_units(cfg, fmt))
    ulx = partition.plan(cfg, fmt, partition.parse_bytes("ulx3s"))
    assert len(ulx) > 10000 and all(p.nbytes <= partition.ULX3S_85F_BYTES for p in ulx)
    with pytest.raises(partition.PartitionError, match="too small for one row"):
        partition.plan(cfg, fmt, 10000)


def _llama31_8b():
    from bakedllama.llama8b.arch import LLAMA31_8B, from_hf_config

    return from_hf_config(LLAMA31_8B)[0]


def test_projection_table_and_plot(tmp_path):
    rows = projection.table(_llama31_8b())
    assert {(r["chip"], r["scheme"]) for r in rows} == {(c, s) for c in ("HC1-like", "ULX3S 85F")
                                                        for s in ("w8", "w3/6")}
    assert "17,000" in projection.format_table(rows)
    png = projection.plot(_llama31_8b(), tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_projection_of_the_8b_against_hand_counts():
    """Llama 3.1 8B at w8 (one multiplier per row) on the HC1-like spec, against figures derived
    here from the architecture: the partitions, the engine's tile and the ROM words each
    matrix-vector command issues (priced by gateware.cycle_model.mv_cycles), and the bounds that
    follow (one word per cycle; reloading every byte)."""
    from gateware import cycle_model as cm

    cfg = _llama31_8b()
    fmt = projection.scheme_fmt(cfg, "w8")
    d, kv, h, v, L = 4096, 1024, 14336, 128256, 32
    # bytes: a row of c int8 weights + one 16-bit multiplier; a layer = its 7 matrices + 2 gains
    layer = (2 * d + 2 * kv + 2 * h) * (d + 2) + d * (h + 2) + 2 * 2 * d  # wq wo wk wv w1 w3, w2
    embed, head = v * (d + 2), 2 * d + v * (d + 2)
    per = partition.HC1_BYTES // layer  # 24 whole layers fit 5 GiB
    pr = projection.project(cfg, fmt, projection.HC1, [1, 3], 512)
    assert per == 24 and pr["partitions"] == 1 + -(-L // per) + 1  # embed | 0-23 | 24-31 | head
    assert pr["weight_bytes"] == embed + L * layer + head
    # chips: the embedding alone (it and 24 layers exceed 5 GiB); layers 0-23; 24-31 + the head
    assert embed + per * layer > partition.HC1_BYTES >= (L - per) * layer + head
    assert pr["chips_to_hold"] == 3
    # the tile: columns = the largest power of two dividing every group (per-row groups: 4096
    # and w2's 14336 = 7 x 2^11) = 2048; rows = 2^17 lanes / 2048 = 64; the post lanes: the
    # compiler doubles them from 2 while Q * min(dim, hidden) < lanes: 32
    g = projection.engine(cfg, fmt, projection.HC1).geo
    assert (g.lanes, g.cols, g.rows, g.post, g.vlanes, g.kv_par) == (1 << 17, 2048, 64, 32, 128, 8)
    # words of each command: (rows / 64 row groups) x (columns / 2048 words per row group); the
    # output repacker's 64 / 32 = 2 beats per row group never outrun the words
    words = dict(qkv=((d + 2 * kv) // 64, d // 2048), wo=(d // 64, d // 2048),
                 w13=(2 * h // 64, d // 2048), w2=(d // 64, h // 2048), cls=(v // 64, d // 2048))
    one = partition.plan(cfg, fmt, None)  # embedding | all layers | head: one pass each
    got = {}
    for p in one:
        got.update(projection.pass_breakdown(cfg, fmt, p, projection.HC1, 512))
    for l in range(L):
        for k in ("qkv", "wo", "w13", "w2"):
            rg, ch = words[k]
            assert got[f"mv{l}:{k}{l}"] == cm.mv_cycles(rg * ch, rg, 2, 2048, k, 0), (l, k)
    assert got["mv:cls"] == cm.mv_cycles(words["cls"][0] * 2, words["cls"][0], 2, 2048, "cls", 0)
    issue = L * sum(rg * ch for k, (rg, ch) in words.items() if k != "cls") + words["cls"][0] * 2
    assert issue == 57256
    rows = {r["chips"]: r for r in pr["rows"]}
    # resident on 3 chips: at most one word per cycle at 1 GHz
    assert rows[3]["mode"] == "resident" and rows[3]["tokens_per_s"] < 1e9 / issue
    # one chip reloading all 8.03 GB per token at 100 GB/s: the compute (~0.1 ms) is < 1 %
    load = 100e9 / pr["weight_bytes"]
    assert rows[1]["mode"] == "reloaded" and load / 1.01 < rows[1]["tokens_per_s"] < load


def test_projection_takes_the_widest_tile_the_compiler_builds():
    """Groups of 32 columns on 2^17 lanes would be 4,096 rows per cycle, which the 8B's 6,144 qkv
    rows are not a multiple of (the compiler pads neither dim nor kv_dim): 2^16 lanes, 2,048 rows."""
    cfg = _llama31_8b()
    g = projection.engine(cfg, projection.scheme_fmt(cfg, "w4"), projection.HC1).geo
    assert (g.lanes, g.cols, g.rows) == (1 << 16, 32, 2048)
    # the vocabulary (beyond the core's 16-bit fields, folded for the compiler) padded to 2048 rows
    assert g.vocab == -(-128256 // 2048) * 2048 and g.hidden == 14336
    # the ULX3S engine: lanes 64 on 32-column groups, 2 rows; packed DSP pairs were given up for
    # the 8B's 4 x 128 attention products within the 156 MULT18X18D
    u = projection.engine(cfg, projection.scheme_fmt(cfg, "w4"), projection.ULX3S).geo
    assert (u.lanes, u.cols, u.rows, u.dsp_pairs) == (64, 32, 2, 0)
    # 64 ROM words per 4096-column row of the 8-bit engine at one row per word: every weight of the
    # model passes through it once per token (45 MHz)
    w8 = projection.scheme_fmt(cfg, "w8")
    words = 32 * (2 * 4096 + 2 * 1024 + 2 * 14336) * 64 + 32 * 4096 * 224 + 128256 * 64
    pr = projection.project(cfg, w8, projection.ULX3S, [], 512)
    assert pr["compute_seconds_per_token"] > words / 45e6


def test_projection_prices_passes_with_the_gateware_cycle_model():
    """The tiny baked model on the ULX3S spec (the ULX3S build's engine) costs what
    gateware.cycle_model says its forward pass costs (which the Verilator tests tie to the
    hardware counter), plus one hand-off of the residual (dim / vlanes cycles) per pass: exactly,
    unpartitioned (3 passes) and with one layer per chip (L + 2 passes)."""
    from bakedllama.model import load_baked

    from gateware import compiler, cycle_model

    m = load_baked()
    cfg = m.cfg
    fmt = dict(m.fmt, weights=dict(m.fmt["weights"], wcls=m.fmt["weights"]["tok_embeddings"]))
    formats = compiler.matrix_formats(cfg, m.fmt["weights"])
    from soc.common import LANES, VLANES

    spec = projection.ULX3S
    geo = compiler.make_geometry(cfg, LANES or compiler.DEFAULT_LANES, formats, VLANES)
    assert (spec.lanes, spec.vlanes, spec.kv_par) == (geo.lanes, geo.vlanes, geo.kv_par)
    assert projection.engine(cfg, fmt, spec).geo == geo
    units = partition.model_units(cfg, fmt)
    layer = sum(u.nbytes for u in units[1:10])
    chip = max(layer, units[0].nbytes, units[-1].nbytes + units[-2].nbytes)
    for parts, n in ((partition.plan(cfg, fmt, None), 3), (partition.plan(cfg, fmt, chip), cfg.n_layers + 2)):
        assert len(parts) == n
        for ctx in (17, 129, cfg.seq_len):
            proj = sum(projection.pass_cycles(cfg, fmt, p, spec, ctx) for p in parts)
            gw = cycle_model.expected_cycles(cfg, geo.lanes, ctx - 1, formats=formats, vlanes=geo.vlanes)
            assert proj == gw + n * (cfg.dim // geo.vlanes), (n, ctx, proj, gw)


def test_the_projection_and_the_gateware_compiler_import_without_migen(tmp_path):
    """bakedllama.llama8b.projection imports gateware.compiler / cycle_model as a package (no
    sys.path patch), and neither pulls in Migen or LiteX; pyproject installs `gateware` too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from setuptools.config.pyprojecttoml import read_configuration

    code = ("import sys\n"
            "class NoMigen:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('migen', 'litex'):\n"
            "            raise ImportError('no ' + name)\n"
            "sys.meta_path.insert(0, NoMigen())\n"
            "import bakedllama.llama8b.projection, gateware.compiler, gateware.cycle_model\n"
            "print(sorted(m for m in sys.modules if m.startswith(('migen', 'litex'))))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    root = Path(__file__).resolve().parents[1]
    st = read_configuration(root / "pyproject.toml", expand=True)["tool"]["setuptools"]
    assert "gateware" in st["packages"] and st["package-dir"]["gateware"] == "gateware"
    assert "bakedllama.llama8b" in st["packages"] and not any(p.startswith(("tests", "soc", "host"))
                                                             for p in st["packages"])


def test_gguf_checkpoint_reads_like_hf(tiny_ck, tmp_path):
    gguf = pytest.importorskip("gguf")
    c = tiny_ck.cfg
    p = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(c.n_layers)
    w.add_context_length(2048)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(tiny_ck.special.bos)
    w.add_eos_token_id(tiny_ck.special.stop[0])
    for name, layer in checkpoint.tensor_list(c):
        label = checkpoint.GGUF_GLOBAL[name] if layer is None else \
            f"blk.{layer}.{checkpoint.GGUF_LAYER[name]}.weight"
        t = tiny_ck.tensor(name, layer)  # interleaved q/k, as llama.cpp's converter writes them
        w.add_tensor(label, t.astype(np.float16) if name == "w2" else t)
    inv = nx.rope_inv_freq(c.head_dim, c.rope_theta, None)
    w.add_tensor("rope_freqs.weight",
                 (inv / nx.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "tokenizer.json").write_text((tiny_ck.path / "tokenizer.json").read_text())
    g = checkpoint.open_checkpoint(str(p), 64)
    assert isinstance(g, checkpoint.GGUFCheckpoint) and g.cfg == tiny_ck.cfg
    assert g.special.bos == 384
    for name, layer in checkpoint.tensor_list(c):
        a, b = g.tensor(name, layer), tiny_ck.tensor(name, layer)
        assert np.array_equal(a, b.astype(np.float16).astype(np.float32) if name == "w2" else b)
    assert g.tokenizer().encode("Hi").ids == [72, 105]


@pytest.mark.parametrize("G", [32, 256, 1023, 2048])
def test_batched_products_are_exact_at_the_extremes(G):
    """runner.matmul_rows' grouped BLAS products (float32 while a group's sums stay below 2^24,
    float64 beyond) equal numerics.matvec's integers with every operand at +-128 / 127."""
    from bakedllama import numerics as nx
    from bakedllama.llama8b import runner as R

    rng = np.random.default_rng(G)
    rows, cols, T = 40, G * 3, 7
    q = rng.choice([-128, 127, -127, 5], size=(rows, cols)).astype(np.int8)
    m = rng.integers(1, 511, size=(rows, cols // G)).astype(np.uint16)
    a = rng.choice([-128, 127], size=(T, cols)).astype(np.int64)

    class P:
        group = G

    g = R.grouped(q, m, G)
    assert g[0].dtype == (np.float32 if G <= R.F32_MAX_GROUP else np.float64)
    want = nx.matvec(nx.QTensor(q[3:30], m[3:30], 0, 8, G), a)
    assert np.array_equal(R.matmul_rows(P, a, 3, 30, g), want)
