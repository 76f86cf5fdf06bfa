"""The checked-in tiny model: checksums, provenance links, and fit on the board."""

import hashlib

from bakedllama import fileformat
from bakedllama.budget import ULX3S_85F_DP16KD, bram_budget
from bakedllama.model import DEFAULT_DIR, load_baked, load_float
from bakedllama.tokenizer import Tokenizer


def test_sha256sums_match_the_files():
    lines = (DEFAULT_DIR / "SHA256SUMS").read_text().split("\n")
    entries = [line.split() for line in lines if line.strip()]
    assert {name for _, name in entries} == {"model-f32.bkl", "model-q.bkl", "tokenizer.json"}
    for digest, name in entries:
        assert hashlib.sha256((DEFAULT_DIR / name).read_bytes()).hexdigest() == digest, name


def test_baked_model_links_to_its_float_checkpoint_and_tokenizer():
    m = load_baked()
    cfg, _, fmeta = load_float()
    assert m.cfg == cfg
    assert m.meta["float_sha256"] == fileformat.file_sha256(DEFAULT_DIR / "model-f32.bkl")
    tok = Tokenizer.load(DEFAULT_DIR / "tokenizer.json", m.meta["tokenizer_sha256"])
    assert tok.sha256 == fmeta["tokenizer_sha256"] and tok.vocab_size == cfg.vocab_size


def test_quantized_loss_within_goal_and_fits_the_board():
    """Recompute the held-out loss (the first 16 windows of the validation split, 4,096 tokens) with
    the float reference and the golden integer path: the baked model stays within the +0.05 nats goal."""
    from bakedllama.evaluate import evaluate

    from weights.quantize import load_dir

    cfg, w, _, _, _, val_ids = load_dir(DEFAULT_DIR, None)
    m = load_baked()
    n = 16
    ev = evaluate(cfg, w, m, val_ids[:n * cfg.seq_len + 1], progress=False)
    assert ev["windows"] == n
    assert ev["val_loss_golden"] - ev["val_loss_float"] <= 0.05, ev
    assert ev["val_loss_float"] < 3.0, ev  # a trained model, not a uniform guess (ln 512 = 6.24)
    assert sum(r[2] for r in bram_budget(m)) <= ULX3S_85F_DP16KD
    assert m.cfg.seq_len >= 256
