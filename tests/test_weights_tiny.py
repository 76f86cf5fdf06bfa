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
    m = load_baked()
    assert m.meta["val_loss_golden"] - m.meta["val_loss_float"] <= 0.05
    assert sum(r[2] for r in bram_budget(m)) <= ULX3S_85F_DP16KD
    assert m.cfg.seq_len >= 256
