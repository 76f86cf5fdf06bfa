"""The bakedllama CLI on the golden model, and its one-line errors for bad input."""

import json
import shutil
import subprocess
import sys

import pytest
from bakedllama.golden import Golden, generate
from bakedllama.model import DEFAULT_BAKED, DEFAULT_TOKENIZER, load_baked
from bakedllama.tokenizer import Tokenizer


def run_cli(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "bakedllama.cli", *args], capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def test_generate_json_matches_golden():
    rc, out, err = run_cli("generate", "It was", "--device", "golden", "--max-tokens", "12", "--json")
    assert rc == 0, err
    res = json.loads(out)
    model = load_baked()
    tok = Tokenizer.load(DEFAULT_TOKENIZER, model.meta["tokenizer_sha256"])
    ids = tok.encode("It was")
    assert res["prompt_tokens"] == ids
    assert res["tokens"] == list(generate(Golden(model), ids, 12))
    assert res["text"] == tok.decode(res["tokens"]) and res["tokens_per_s"] > 0
    assert res["prompt"] == "It was"


def test_seeded_sampling_is_reproducible():
    a = run_cli("generate", "Emma", "--device", "golden", "--max-tokens", "8", "--temperature", "0.8",
                "--seed", "5", "--json")
    b = run_cli("generate", "Emma", "--device", "golden", "--max-tokens", "8", "--temperature", "0.8",
                "--seed", "5", "--json")
    assert a[0] == 0 and json.loads(a[1])["tokens"] == json.loads(b[1])["tokens"]


def test_streaming_text_output():
    rc, out, err = run_cli("generate", "It was", "--device", "golden", "--max-tokens", "6")
    assert rc == 0 and out.startswith("It was") and "tokens/s" in err


def test_info_shows_budget():
    rc, out, err = run_cli("info")
    assert rc == 0, err
    assert "parameters" in out and "DP16KD" in out and "of 208" in out


def _one_line_error(rc, out, err):
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("args", [
    ["generate", "", "--device", "golden"],
    ["generate", "   ", "--device", "golden"],
    ["generate", "word " * 400, "--device", "golden"],
    ["generate", "It was", "--device", "golden", "--max-tokens", "0"],
    ["generate", "It was", "--device", "golden", "--max-tokens", "1000"],
    ["generate", "It was", "--device", "nonsense"],
    ["generate", "It was", "--device", "golden", "--temperature", "-1"],
    ["generate", "It was", "--model", "/nonexistent/model.bkl"],
    ["info", "--tokenizer", "/nonexistent/tok.json"],
])
def test_bad_input_gives_one_line(args):
    _one_line_error(*run_cli(*args))


def test_corrupt_model_and_foreign_tokenizer(tmp_path):
    bad = tmp_path / "m.bkl"
    raw = bytearray(DEFAULT_BAKED.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    bad.write_bytes(bytes(raw))
    _one_line_error(*run_cli("generate", "It was", "--device", "golden", "--model", str(bad)))
    other = tmp_path / "tok.json"
    shutil.copy(DEFAULT_TOKENIZER, other)
    other.write_text(other.read_text().replace('"<s>"', '"<S>"'))
    _one_line_error(*run_cli("info", "--tokenizer", str(other)))
