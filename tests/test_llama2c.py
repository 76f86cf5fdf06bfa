"""llama2.c checkpoint interchange (weights/llama2c.py): v0 and v1, import and export."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bakedllama import fileformat
from bakedllama.config import ModelConfig
from bakedllama.fileformat import ModelFileError

from weights import llama2c

ROOT = Path(__file__).resolve().parents[1]

NAMES = ("tok_embeddings", "rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w2",
         "w3", "rms_final_weight")


def make_model(tied: bool, seed: int = 0) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=64,
                      seq_len=16, tied_embeddings=tied)
    rng = np.random.default_rng(seed)
    tensors = {k: rng.standard_normal(s).astype(np.float32)
               for k, s in llama2c.tensor_shapes(cfg).items()}
    return cfg, tensors


def n_floats(cfg: ModelConfig, v0: bool) -> int:
    L, d, kv, h, v = cfg.n_layers, cfg.dim, cfg.kv_dim, cfg.hidden_dim, cfg.vocab_size
    n = v * d + L * (2 * d + 2 * d * d + 2 * kv * d + 3 * h * d) + d
    if not cfg.tied_embeddings:
        n += v * d
    if v0:
        n += cfg.seq_len * cfg.head_dim  # freq_cis_real + freq_cis_imag
    return n


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request):
    return make_model(request.param, seed=int(request.param))


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, x in a.items():
        assert x.dtype == np.float32 and x.shape == b[k].shape, k
        assert np.array_equal(x, b[k]), k


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("version", [0, 1])
def test_round_trip_exact(tmp_path, model, version):
    cfg, tensors = model
    p = tmp_path / f"m.v{version}.bin"
    llama2c.write_llama2c(p, cfg, tensors, version=version)
    assert p.stat().st_size == (28 if version == 0 else 256) + 4 * n_floats(cfg, version == 0)
    assert p.stat().st_size == llama2c.expected_size(cfg, version)
    assert llama2c.detect_version(p) == version
    cfg2, t2 = llama2c.read_llama2c(p)
    assert cfg2 == cfg
    assert set(t2) == set(NAMES) | (set() if cfg.tied_embeddings else {"wcls"})
    assert_same(t2, tensors)
    assert all(a.flags.writeable for a in t2.values())


def test_v0_and_v1_decode_identically(tmp_path, model):
    cfg, tensors = model
    llama2c.write_llama2c(tmp_path / "a.bin", cfg, tensors, version=0)
    llama2c.write_llama2c(tmp_path / "b.bin", cfg, tensors, version=1)
    c0, t0 = llama2c.read_llama2c(tmp_path / "a.bin")
    c1, t1 = llama2c.read_llama2c(tmp_path / "b.bin")
    assert c0 == c1 == cfg
    assert_same(t0, t1)
    assert (tmp_path / "a.bin").read_bytes() != (tmp_path / "b.bin").read_bytes()


@pytest.mark.parametrize("version", [0, 1])
def test_bkl_import_export_is_byte_identical(tmp_path, model, version):
    cfg, tensors = model
    src = tmp_path / "src.bin"
    llama2c.write_llama2c(src, cfg, tensors, version=version)
    digest = llama2c.import_to_bkl(src, tmp_path / "m.bkl")
    header, t, sha = fileformat.load(tmp_path / "m.bkl", kind="float")
    assert sha == digest
    meta = header["meta"]
    assert meta["source"] == f"llama2c v{version}"
    assert meta["tokenizer_sha256"] is None
    assert ModelConfig.from_dict(meta["config"]) == cfg
    assert_same(t, tensors)
    out = llama2c.export_from_bkl(tmp_path / "m.bkl", tmp_path / "back.bin", version)
    assert out == cfg
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()


# ---------------------------------------------------------------------------------------------
# byte layout


def test_v1_header_layout(tmp_path):
    for tied in (True, False):
        cfg, tensors = make_model(tied)
        p = tmp_path / f"v1-{tied}.bin"
        llama2c.write_llama2c(p, cfg, tensors, version=1)
        raw = p.read_bytes()
        assert raw[:4] == b"24ka"  # uint32 0x616b3432 little-endian
        assert struct.unpack_from("<I", raw, 0)[0] == 0x616B3432
        assert struct.unpack_from("<i", raw, 4)[0] == 1
        assert struct.unpack_from("<7i", raw, 8) == (32, 48, 2, 4, 2, 64, 16)
        assert raw[36] == int(tied)
        assert raw[37:256] == bytes(219)
        # data: rms_att (L, dim) first, then rms_ffn, rms_final, tok_embeddings, wq, ...
        f = np.frombuffer(raw, "<f4", offset=256)
        assert np.array_equal(f[:64], tensors["rms_att_weight"].ravel())
        assert np.array_equal(f[64:128], tensors["rms_ffn_weight"].ravel())
        assert np.array_equal(f[128:160], tensors["rms_final_weight"])
        assert np.array_equal(f[160:160 + 64 * 32], tensors["tok_embeddings"].ravel())
        assert np.array_equal(f[160 + 64 * 32:160 + 64 * 32 + 2 * 32 * 32], tensors["wq"].ravel())
        tail = tensors["w3"] if tied else tensors["wcls"]
        assert np.array_equal(f[-tail.size:], tail.ravel())


def test_v0_header_and_layout(tmp_path):
    for tied in (True, False):
        cfg, tensors = make_model(tied)
        p = tmp_path / f"v0-{tied}.bin"
        llama2c.write_llama2c(p, cfg, tensors, version=0)
        raw = p.read_bytes()
        hdr = struct.unpack_from("<7i", raw, 0)
        assert hdr == (32, 48, 2, 4, 2, 64 if tied else -64, 16)  # negative vocab = untied
        f = np.frombuffer(raw, "<f4", offset=28)
        assert np.array_equal(f[:64 * 32], tensors["tok_embeddings"].ravel())
        assert np.array_equal(f[64 * 32:64 * 32 + 64], tensors["rms_att_weight"].ravel())
        # freq_cis_real/imag (seq_len, head_dim/2) right after the final norm
        n = 16 * 4
        end = f.size - (0 if tied else 64 * 32)
        real, imag = f[end - 2 * n:end - n].reshape(16, 4), f[end - n:end].reshape(16, 4)
        assert np.array_equal(f[end - 2 * n - 32:end - 2 * n], tensors["rms_final_weight"])
        ang = np.outer(np.arange(16), 10000.0 ** (-np.arange(0, 8, 2) / 8))
        np.testing.assert_allclose(real, np.cos(ang), atol=1e-5)
        np.testing.assert_allclose(imag, np.sin(ang), atol=1e-5)
        if not tied:
            assert np.array_equal(f[end:], tensors["wcls"].ravel())


# ---------------------------------------------------------------------------------------------
# corrupt input


@pytest.fixture
def files(tmp_path):
    cfg, tensors = make_model(tied=False)
    out = {}
    for v in (0, 1):
        out[v] = tmp_path / f"good.v{v}.bin"
        llama2c.write_llama2c(out[v], cfg, tensors, version=v)
    return out


def bad(tmp_path, data: bytes, match: str):
    p = tmp_path / "bad.bin"
    p.write_bytes(data)
    with pytest.raises(ModelFileError, match=match) as e:
        llama2c.read_llama2c(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("version", [0, 1])
def test_truncated_and_trailing(tmp_path, files, version):
    raw = files[version].read_bytes()
    bad(tmp_path, raw[:-4], "truncated")
    bad(tmp_path, raw[: len(raw) // 2], "truncated")
    bad(tmp_path, raw + b"\0" * 4, "4 bytes of trailing garbage")
    bad(tmp_path, raw[:20], "too short")


def test_too_short_and_missing(tmp_path, files):
    bad(tmp_path, b"", "too short")
    bad(tmp_path, b"\x01\x02", "too short")
    bad(tmp_path, files[1].read_bytes()[:100], "too short .* 256-byte")
    with pytest.raises(ModelFileError, match="no such file"):
        llama2c.read_llama2c(tmp_path / "nope.bin")
    with pytest.raises(ModelFileError, match="directory"):
        llama2c.read_llama2c(tmp_path)


def test_wrong_magic_and_version(tmp_path, files):
    raw = bytearray(files[1].read_bytes())
    wrong = bytes([raw[0] ^ 0xFF]) + raw[1:]  # no magic: read as v0, header is nonsense
    bad(tmp_path, wrong, r"bad llama2.c v0 \(no v1 magic\) header: dim 1634415821")
    for v, msg in ((2, "version 2 .Q8_0"), (0, "version 0 "), (7, "version 7"), (-1, "version -1")):
        raw[4:8] = struct.pack("<i", v)
        bad(tmp_path, bytes(raw), msg)
    raw[4:8] = struct.pack("<i", 1)
    raw[36] = 2
    bad(tmp_path, bytes(raw), "shared_classifier flag is 2")
    raw[36] = 0
    raw[100] = 1
    bad(tmp_path, bytes(raw), "padding")
    bad(tmp_path, fileformat.MAGIC + bytes(60), "bakedllama container")


def patch_header(raw: bytes, version: int, field: int, value: int) -> bytes:
    off = (0 if version == 0 else 8) + 4 * field
    return raw[:off] + struct.pack("<i", value) + raw[off + 4:]


@pytest.mark.parametrize("version", [0, 1])
def test_garbage_dims(tmp_path, files, version):
    raw = files[version].read_bytes()
    # fields: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    bad(tmp_path, patch_header(raw, version, 0, 0), "dim = 0; must be positive")
    bad(tmp_path, patch_header(raw, version, 2, -3), "n_layers = -3")
    bad(tmp_path, patch_header(raw, version, 3, 0), "n_heads = 0")
    bad(tmp_path, patch_header(raw, version, 0, 30), "dim 30 is not divisible by n_heads 4")
    bad(tmp_path, patch_header(raw, version, 4, 3), "n_heads 4 is not divisible by n_kv_heads 3")
    bad(tmp_path, patch_header(raw, version, 6, 0), "seq_len = 0")
    bad(tmp_path, patch_header(raw, version, 0, 36), "head_dim 9 must be even")
    bad(tmp_path, patch_header(raw, version, 2, 2**31 - 1), "truncated.*needs")  # no huge read
    bad(tmp_path, patch_header(raw, version, 1, 49), "truncated")
    huge = patch_header(patch_header(raw, version, 0, 2**30), version, 2, 2**31 - 1)
    bad(tmp_path, huge, "truncated")  # sizes far beyond int64 must not wrap around
    if version == 1:
        bad(tmp_path, patch_header(raw, 1, 5, -64), "vocab_size must be positive")
    else:
        bad(tmp_path, patch_header(raw, 0, 5, 0), "vocab_size = 0")
        # untied file with the sign flipped to "shared": size no longer adds up, and says why
        msg = bad(tmp_path, patch_header(raw, 0, 5, 64), "trailing garbage")
        assert "vocab_size sign" in msg
    if version == 0:  # seq_len only sizes the freq_cis tables
        bad(tmp_path, patch_header(raw, 0, 6, 17), "truncated")


@pytest.mark.parametrize("version", [0, 1])
def test_nonfinite_weights(tmp_path, files, version):
    raw = bytearray(files[version].read_bytes())
    raw[-4:] = struct.pack("<f", float("nan"))  # last value of wcls
    bad(tmp_path, bytes(raw), "wcls has 1 NaN/inf")
    raw = bytearray(files[version].read_bytes())
    off = 28 if version == 0 else 256
    raw[off:off + 4] = struct.pack("<f", float("inf"))
    bad(tmp_path, bytes(raw), ("tok_embeddings" if version == 0 else "rms_att_weight") + " has 1")


# ---------------------------------------------------------------------------------------------
# writing: validation happens before anything lands on disk


def test_bad_write_leaves_nothing(tmp_path):
    cfg, tensors = make_model(tied=False)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "m.bin"
    target.write_bytes(b"old")
    cases = [
        ({k: v for k, v in tensors.items() if k != "wq"}, cfg, "missing tensor.*wq"),
        ({k: v for k, v in tensors.items() if k != "wcls"}, cfg, "missing tensor.*wcls"),
        (tensors, ModelConfig(**{**cfg.to_dict(), "tied_embeddings": True}), "unexpected.*wcls"),
        ({**tensors, "w1": tensors["w1"][:, :-1]}, cfg, "w1: shape"),
        ({**tensors, "wo": tensors["wo"].astype(np.int32)}, cfg, "not floating"),
        ({**tensors, "w2": np.full_like(tensors["w2"], np.nan)}, cfg, "w2: contains NaN"),
        (tensors, ModelConfig(**{**cfg.to_dict(), "rope_theta": 500000.0}), "rope_theta"),
        (tensors, ModelConfig(**{**cfg.to_dict(), "norm_eps": 1e-6}), "norm_eps"),
    ]
    for ts, c, match in cases:
        for version in (0, 1):
            with pytest.raises(ValueError, match=match):
                llama2c.write_llama2c(target, c, ts, version=version)
    with pytest.raises(ValueError, match="version must be 0 or 1"):
        llama2c.write_llama2c(target, cfg, tensors, version=2)
    assert sorted(os.listdir(out)) == ["m.bin"]
    assert target.read_bytes() == b"old"


def test_export_rejects_wrong_container(tmp_path):
    cfg, tensors = make_model(tied=True)
    fileformat.save(tmp_path / "q.bkl", "baked", {"config": cfg.to_dict()}, tensors)
    with pytest.raises(ModelFileError, match="expected 'float'"):
        llama2c.export_from_bkl(tmp_path / "q.bkl", tmp_path / "o.bin")
    fileformat.save(tmp_path / "f.bkl", "float", {"config": cfg.to_dict()},
                    {k: v for k, v in tensors.items() if k != "w3"})
    with pytest.raises(ModelFileError, match="missing tensor.*w3"):
        llama2c.export_from_bkl(tmp_path / "f.bkl", tmp_path / "o.bin")
    assert not (tmp_path / "o.bin").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_round_trip(tmp_path, capsys):
    cfg, tensors = make_model(tied=False)
    llama2c.write_llama2c(tmp_path / "a.bin", cfg, tensors, version=0)
    assert llama2c.main(["import", str(tmp_path / "a.bin"), str(tmp_path / "a.bkl")]) == 0
    assert llama2c.main(["export", str(tmp_path / "a.bkl"), str(tmp_path / "b.bin"),
                         "--version", "0"]) == 0
    assert llama2c.main(["export", str(tmp_path / "a.bkl"), str(tmp_path / "c.bin")]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 3
    assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()
    assert llama2c.detect_version(tmp_path / "c.bin") == 1
    assert_same(llama2c.read_llama2c(tmp_path / "c.bin")[1], tensors)


def test_cli_bad_input_in_process(tmp_path, capsys):
    (tmp_path / "junk.bin").write_bytes(b"\x07" * 100)
    assert llama2c.main(["import", str(tmp_path / "junk.bin"), str(tmp_path / "o.bkl")]) == 2
    assert llama2c.main(["export", str(tmp_path / "junk.bin"), str(tmp_path / "o.bin")]) == 2
    assert llama2c.main(["import", str(tmp_path / "junk.bin"), str(tmp_path / "junk.bin")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert "overwrite" in err[2]
    assert sorted(os.listdir(tmp_path)) == ["junk.bin"]


def test_cli_subprocess_exit_2_one_line(tmp_path):
    cfg, tensors = make_model(tied=True)
    llama2c.write_llama2c(tmp_path / "a.bin", cfg, tensors, version=1)
    raw = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(raw[:-10])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "host"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "weights.llama2c", "import", str(tmp_path / "t.bin"),
                        str(tmp_path / "o.bkl")], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=60, check=False)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated" in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.bkl").exists()
