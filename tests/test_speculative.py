"""Speculative decoding (host/bakedllama/speculative.py): greedy output identical to the target
alone for every K, rewinds, the Hugging Face export the target is stored in, bad targets.

The test target is the tiny model's own float checkpoint exported to the Hugging Face layout and
run by the integer runner at 8 bits: close to the baked 4-bit draft but not identical, so both
accepted and rejected drafts occur (checked), which exercises every branch of the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama import speculative as S
from bakedllama.model import load_baked, load_float
from bakedllama.tokenizer import Tokenizer

from weights import hf_export

PROMPTS = ["It was", "Mr. Darcy", "She could not", "Elizabeth", "The next morning",
           "Emma", "\"My dear", "Lady Catherine", "In the evening", "Her sister"]


@pytest.fixture(scope="module")
def baked():
    return load_baked()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load("weights/tiny/tokenizer.json")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, tok):
    cfg, tensors, _ = load_float()
    d = tmp_path_factory.mktemp("target")
    hf_export.write_hf(d, cfg, tensors, tok, dict(note="test target: the tiny float model"))
    return d


@pytest.fixture(scope="module")
def target(target_dir, tmp_path_factory):
    t, ck = S.open_target(target_dir, cache_dir=tmp_path_factory.mktemp("cache"))
    return t, ck


def test_export_round_trips_through_the_checkpoint_loader(target_dir, target):
    cfg, tensors, _ = load_float()
    _, ck = target
    assert ck.cfg.to_dict() == cfg.to_dict()
    assert hf_export.verify(target_dir) == []
    for name in ("wq", "wk", "wv", "w2"):  # wq / wk are permuted for rotate_half and back
        got = ck.tensor(name, 1)
        want = tensors[name][1]
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) <= np.max(np.abs(want)) * 2 ** -8  # bf16 rounding
    # a changed byte is caught by the checksums
    p = target_dir / "train.json"
    old = p.read_bytes()
    p.write_bytes(old.replace(b"test", b"best"))
    try:
        assert hf_export.verify(target_dir) == ["train.json"]
    finally:
        p.write_bytes(old)


def test_greedy_identical_to_the_target_alone_for_every_k(baked, tok, target):
    t, ck = target
    S.check_shared_vocab(baked, ck, tok)
    accepted = rejected = 0
    for prompt in PROMPTS[:4]:
        ids = tok.encode(prompt, bos=True)
        ref = S.greedy_reference(t.r, ids, 20)
        for k in (0, 1, 2, 3, 5, 8):
            d, tg = S.GoldenDraft(baked), S.RunnerTarget(t.r)
            r = S.speculate(d, tg, ids, 20, k)
            assert r.tokens == ref, (prompt, k)
            assert r.accepted <= r.drafted
            assert sum(r.per_round) == r.accepted
            # every round emits its accepted drafts plus the target's own token
            assert r.accepted + r.rounds == len(r.tokens)
            if k == 0:
                assert r.drafted == 0 and r.rounds == 20 and d.passes == 0
            accepted += r.accepted
            rejected += r.drafted - r.accepted
    assert accepted > 0 and rejected > 0  # both branches of the loop ran


def test_rewind_reuses_the_cache_and_recomputes_past_it(baked):
    d = S.GoldenDraft(baked)
    ctx = [1, 50, 60, 70]
    a = d.draft(ctx, 4)
    assert d.passes == len(ctx) + 3
    # the same context again: only its last token is fed again (its logits are not kept)
    assert d.draft(ctx, 4) == a
    assert d.passes == len(ctx) + 3 + 1 + 3
    # a context that leaves the drafted path: rewound to the common prefix, identical to a fresh run
    other = ctx + [a[0], (a[1] + 1) % baked.cfg.vocab_size]
    got = d.draft(other, 3)
    assert got == S.GoldenDraft(baked).draft(other, 3)


def test_the_context_bounds_every_round(baked, target, tok):
    t, _ = target
    ids = tok.encode("It was", bos=True)
    n = baked.cfg.seq_len - len(ids)
    with pytest.raises(ValueError, match="exceeds the context"):
        S.speculate(S.GoldenDraft(baked), S.RunnerTarget(t.r), ids, n + 1, 4)
    with pytest.raises(ValueError, match=">= 0"):
        S.speculate(S.GoldenDraft(baked), S.RunnerTarget(t.r), ids, 4, -1)


def test_a_target_with_another_vocabulary_or_tokenizer_is_refused(baked, tok, target_dir, tmp_path):
    _, ck = S.open_target(target_dir, cache_dir=tmp_path / "c")
    other = tmp_path / "other"
    other.mkdir()
    # same vocabulary size, other merges: a tokenizer trained on another text
    from bakedllama.tokenizer import train_tokenizer

    rng = np.random.default_rng(7)
    words = ["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(3000)]
    alien = train_tokenizer(" ".join(words[i % 3000] for i in rng.integers(0, 3000, 60000)),
                            baked.cfg.vocab_size)
    (target_dir / "tokenizer.json").rename(other / "saved.json")
    try:
        alien.save(target_dir / "tokenizer.json")
        with pytest.raises(ValueError, match="tokenizer differs"):
            S.check_shared_vocab(baked, ck, tok)
    finally:
        (other / "saved.json").replace(target_dir / "tokenizer.json")
    # another vocabulary size: refused before the tokenizer is looked at
    import dataclasses
    import types

    wide = types.SimpleNamespace(cfg=dataclasses.replace(ck.cfg, vocab_size=2 * baked.cfg.vocab_size),
                                 special=ck.special, tokenizer=ck.tokenizer)
    with pytest.raises(ValueError, match="vocabulary has 1024 tokens"):
        S.check_shared_vocab(baked, wide, tok)


def test_cli_target_on_golden(target_dir, target, tok, capsys):
    from bakedllama.cli import main

    t, _ = target
    assert main(["generate", "Mr. Darcy", "--max-tokens", "12", "--device", "golden", "--target",
                 str(target_dir), "--draft-tokens", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    ids = tok.encode("Mr. Darcy", bos=True)
    assert r["tokens"] == S.greedy_reference(t.r, ids, 12)
    assert r["target_passes"] + r["accepted"] == 12 and r["draft_tokens"] == 3
    assert r["draft_cycles"] > 0 and r["projected_speedup"] > 0
    assert r["target_alone_seconds"] > 0 and r["draft_clock_hz"] > 0


def test_cli_target_sampled_on_golden(target_dir, capsys):
    """--temperature with --target: speculative sampling, its figures in --json."""
    from bakedllama.cli import main

    assert main(["generate", "Mr. Darcy", "--max-tokens", "12", "--device", "golden", "--target",
                 str(target_dir), "--draft-tokens", "3", "--temperature", "0.8", "--top-k", "40",
                 "--seed", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["tokens"]) == 12 and (r["temperature"], r["top_k"], r["seed"]) == (0.8, 40, 3)
    assert r["target_passes"] + r["accepted"] == 12 and 0 <= r["acceptance_rate"] <= 1
    assert r["draft_cycles"] > 0 and r["projected_speedup"] > 0
    # one rerun (the rejected draft's distribution) per round with a rejection, none otherwise
    assert (r["draft_reruns"] > 0) == (r["drafted"] > r["accepted"])
    assert r["draft_reruns"] <= r["target_passes"]


@pytest.mark.parametrize("argv,pattern", [
    (["--draft-tokens", "2"], "needs --target"),
    (["--target", "/nonexistent/dir"], "no such checkpoint directory"),
    (["--target", "TARGET", "--temperature", "nan"], "finite number"),
    (["--target", "TARGET", "--draft-tokens", "-1"], ">= 0"),
    (["--target", "TARGET", "--top-k", "5"], "--top-k needs --temperature"),
    (["--target", "TARGET", "--top-k", "-1", "--temperature", "1"], "--top-k must be >= 0"),
])
def test_cli_target_bad_input_is_one_line(target_dir, capsys, argv, pattern):
    from bakedllama.cli import main

    argv = [str(target_dir) if a == "TARGET" else a for a in argv]
    assert main(["generate", "It was", "--max-tokens", "4", "--device", "golden", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err


# ---------------------------------------------------------------- speculative sampling

def _chi2_pvalue(samples, counts) -> float:
    """Chi-square goodness of fit of token samples against exact integer counts (of 2^32); the
    tokens expected fewer than 5 times are pooled into one bin. A sample of a token with count 0
    (impossible under the distribution) gives 0."""
    from scipy.stats import chisquare

    counts = np.array([int(c) for c in counts], dtype=np.float64)
    obs = np.bincount(np.asarray(samples), minlength=len(counts)).astype(np.float64)
    if np.any(obs[counts == 0]):
        return 0.0
    exp = counts / 2.0 ** 32 * len(samples)
    big = exp >= 5
    o, e = list(obs[big]), list(exp[big])
    if exp[~big].sum() > 0:
        o.append(obs[~big].sum())
        e.append(exp[~big].sum())
    return float(chisquare(o, e).pvalue)


def test_sample_counts_are_the_draws_of_sample():
    """numerics.sample_counts: token i is drawn by exactly counts[i] of the 2^32 generator values.
    Checked at the edges of every interval: the first and last value of each token's range of r
    make numerics.sample pick it (through a generator stub that returns that r)."""
    rng = np.random.default_rng(3)

    class Fixed:
        def __init__(self, r):
            self.r = r

        def next(self):
            return self.r

    for _ in range(20):
        q8 = rng.integers(-3000, 3000, size=int(rng.integers(2, 40)))
        inv_t = int(rng.integers(64, 1024))
        top_k = int(rng.integers(0, 6))
        c = nx.sample_counts(q8, inv_t, top_k)
        assert sum(c) == 1 << 32
        start = 0
        for i, n in enumerate(c):
            if n:
                assert nx.sample(q8, inv_t, Fixed(start), top_k) == i
                assert nx.sample(q8, inv_t, Fixed(start + n - 1), top_k) == i
            start += n


def test_speculative_sampling_is_distributed_as_the_target(baked, tok, target):
    """With a temperature the output is the target's own distribution (chi-square against the exact
    integer counts): the first token, and the second given the most frequent first. The draft
    samples hotter than the target (T 1.6 against 0.8), so it is far from the target: about half
    its drafts are rejected and the residual path draws many tokens; the same test rejects the
    draft's own distribution outright, so it has the power to see a wrong loop."""
    t, _ = target
    g = S.GoldenDraft(baked)
    ids = tok.encode("It was", bos=True)
    T, TD, N, K = 0.8, 1.6, 1500, 3
    firsts, pairs, drafted, accepted = [], [], 0, 0
    for seed in range(N):
        r = S.speculate(g, t, ids, K + 1, K, temperature=T, seed=seed, draft_temperature=TD)
        firsts.append(r.tokens[0])
        pairs.append(tuple(r.tokens[:2]))
        drafted, accepted = drafted + r.drafted, accepted + r.accepted
    assert 0.2 < accepted / drafted < 0.8, (accepted, drafted)
    inv_t = nx.temperature_q8(T)
    p1 = nx.sample_counts(t.logits(ids, [])[0], inv_t)
    assert _chi2_pvalue(firsts, p1) > 1e-3
    x1 = int(np.bincount(firsts).argmax())
    p2 = nx.sample_counts(t.logits(ids + [x1], [])[0], inv_t)
    seconds = [b for a, b in pairs if a == x1]
    assert len(seconds) > 100
    assert _chi2_pvalue(seconds, p2) > 1e-3
    # the draft's own distribution at the first position fails the same test
    g.reseed(0)
    g.draft(ids, 1, nx.temperature_q8(TD))
    q1 = g.counts(0)
    draws = np.random.default_rng(0).choice(len(q1), size=N, p=np.array(q1, dtype=float) / 2 ** 32)
    assert _chi2_pvalue(draws, p1) < 1e-6
