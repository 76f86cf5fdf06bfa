"""Speculative decoding (host/bakedllama/speculative.py): greedy output identical to the target
alone for every K, rewinds, the Hugging Face export the target is stored in, bad targets.

The test target is the tiny model's own float checkpoint exported to the Hugging Face layout and
run by the integer runner at 8 bits: close to the baked 4-bit draft but not identical, so both
accepted and rejected drafts occur (checked), which exercises every branch of the loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
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


@pytest.mark.parametrize("argv,pattern", [
    (["--draft-tokens", "2"], "needs --target"),
    (["--target", "/nonexistent/dir"], "no such checkpoint directory"),
    (["--target", "TARGET", "--temperature", "0.5"], "greedy only"),
    (["--target", "TARGET", "--draft-tokens", "-1"], ">= 0"),
    (["--target", "TARGET", "--top-k", "5"], "--top-k"),
])
def test_cli_target_bad_input_is_one_line(target_dir, capsys, argv, pattern):
    from bakedllama.cli import main

    argv = [str(target_dir) if a == "TARGET" else a for a in argv]
    assert main(["generate", "It was", "--max-tokens", "4", "--device", "golden", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err
