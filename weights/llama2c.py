"""Karpathy's llama2.c checkpoints (`.bin`): import into and export from our float container.

Two float32 layouts exist (llama2.c export.py `legacy_export` and `version1_export`; run.c reads v0):

v0 (legacy), no magic:
    header  7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
            vocab_size < 0 means the classifier is NOT shared with the embedding table
    data    float32: tok_embeddings, rms_att (all layers), wq, wk, wv, wo, rms_ffn, w1, w2, w3,
            rms_final, freq_cis_real (seq_len, head_dim/2), freq_cis_imag (same), [wcls]
v1:
    header  256 bytes: uint32 magic 0x616b3432 ("ak42" little-endian), int32 version = 1,
            the same 7 x int32 (vocab_size positive), uint8 shared_classifier, zero padding
    data    float32: rms_att (all layers), rms_ffn (all layers), rms_final, tok_embeddings,
            wq, wk, wv, wo, w1, w2, w3 (each all layers), [wcls]

Weights are [out, in] and each per-layer tensor is all layers in layer order, exactly our float
checkpoint's layout. RoPE is llama2.c's interleaved-pair convention with theta 10000 and RMSNorm
eps 1e-5 (both hard-coded in run.c, not stored in the file), so no permutation is needed; configs
the format cannot express (other theta or eps, rope scaling) are refused on export.

Usage:
    python -m weights.llama2c import IN.bin OUT.bkl
    python -m weights.llama2c export IN.bkl OUT.bin [--version 0|1]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from bakedllama import fileformat
from bakedllama.config import ModelConfig
from bakedllama.fileformat import ModelFileError, atomic_write_bytes

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
V0_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256
LLAMA2C_NORM_EPS = 1e-5  # run.c rmsnorm
LLAMA2C_ROPE_THETA = 10000.0  # run.c RoPE
VERSIONS = (0, 1)

_PARAMS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_V0_ORDER = ("tok_embeddings", "rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight",
             "w1", "w2", "w3", "rms_final_weight", "freq_cis_real", "freq_cis_imag", "wcls")
_V1_ORDER = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight", "tok_embeddings",
             "wq", "wk", "wv", "wo", "w1", "w2", "w3", "wcls")
_FREQ = ("freq_cis_real", "freq_cis_imag")
_I32_MAX = 2**31 - 1


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of our float checkpoint's tensors for `cfg` (wcls only when not tied)."""
    L, d, kv, h, v = cfg.n_layers, cfg.dim, cfg.kv_dim, cfg.hidden_dim, cfg.vocab_size
    shapes = {
        "tok_embeddings": (v, d),
        "rms_att_weight": (L, d),
        "wq": (L, d, d),
        "wk": (L, kv, d),
        "wv": (L, kv, d),
        "wo": (L, d, d),
        "rms_ffn_weight": (L, d),
        "w1": (L, h, d),
        "w2": (L, d, h),
        "w3": (L, h, d),
        "rms_final_weight": (d,),
    }
    if not cfg.tied_embeddings:
        shapes["wcls"] = (v, d)
    return shapes


def _layout(cfg: ModelConfig, version: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 block in file order, freq_cis tables included for v0."""
    shapes = tensor_shapes(cfg)
    shapes.update({f: (cfg.seq_len, cfg.head_dim // 2) for f in _FREQ})
    order = _V0_ORDER if version == 0 else _V1_ORDER
    return [(n, shapes[n]) for n in order if n in shapes and (version == 0 or n not in _FREQ)]


def _nfloats(layout) -> int:
    return sum(math.prod(s) for _, s in layout)


def _header_bytes(version: int) -> int:
    return V0_HEADER_BYTES if version == 0 else V1_HEADER_BYTES


def expected_size(cfg: ModelConfig, version: int) -> int:
    """Exact byte length of a llama2.c file of this config and version."""
    return _header_bytes(version) + 4 * _nfloats(_layout(cfg, version))


@dataclass(frozen=True)
class _Header:
    version: int
    cfg: ModelConfig
    shared: bool


def _sniff_foreign(head: bytes) -> str | None:
    if head[:4] == fileformat.MAGIC:
        return "is a bakedllama container, not a llama2.c checkpoint"
    if head[:4] == b"GGUF":
        return "is a GGUF file, not a llama2.c checkpoint"
    if head[:2] == b"PK":
        return "looks like a zip/PyTorch checkpoint; convert it with llama2.c export.py first"
    return None


def _parse_header(head: bytes, name: str) -> _Header:
    """Validate a llama2.c header (`head` = the first <= 256 bytes of the file)."""
    if len(head) < 4:
        raise ModelFileError(f"{name}: file too short ({len(head)} bytes) for a llama2.c checkpoint")
    foreign = _sniff_foreign(head)
    if foreign:
        raise ModelFileError(f"{name}: {foreign}")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise ModelFileError(f"{name}: file too short ({len(head)} bytes) for the 256-byte "
                                 "llama2.c v1 header")
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            what = " (Q8_0 quantized)" if version == 2 else ""
            raise ModelFileError(f"{name}: llama2.c format version {version}{what} is not "
                                 "supported; only v0 and v1 (float32) are")
        params = struct.unpack_from("<7i", head, 8)
        flag = head[36]
        if flag not in (0, 1):
            raise ModelFileError(f"{name}: v1 shared_classifier flag is {flag}, expected 0 or 1")
        if any(head[37:V1_HEADER_BYTES]):
            raise ModelFileError(f"{name}: v1 header padding (bytes 37..255) is not all zero; "
                                 "not a llama2.c v1 file")
        shared = bool(flag)
        if params[5] <= 0:
            raise ModelFileError(f"{name}: vocab_size must be positive in a v1 header, got "
                                 f"{params[5]}")
    else:
        version = 0
        if len(head) < V0_HEADER_BYTES:
            raise ModelFileError(f"{name}: file too short ({len(head)} bytes) for a llama2.c "
                                 "header (28 bytes)")
        params = list(struct.unpack_from("<7i", head, 0))
        shared = params[5] > 0  # negative vocab_size flags an unshared classifier
        params[5] = abs(params[5])
    p = dict(zip(_PARAMS, params))
    what = f"{name}: bad llama2.c {'v1' if version else 'v0 (no v1 magic)'} header"
    for k, val in p.items():
        if val <= 0:
            raise ModelFileError(f"{what}: {k} = {val}; must be positive (not a llama2.c "
                                 "checkpoint, or a corrupt one)")
    if p["dim"] % p["n_heads"]:
        raise ModelFileError(f"{what}: dim {p['dim']} is not divisible by n_heads {p['n_heads']}")
    if p["n_heads"] % p["n_kv_heads"]:
        raise ModelFileError(f"{what}: n_heads {p['n_heads']} is not divisible by n_kv_heads "
                             f"{p['n_kv_heads']}")
    try:
        cfg = ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                          n_kv_heads=p["n_kv_heads"], hidden_dim=p["hidden_dim"],
                          vocab_size=p["vocab_size"], seq_len=p["seq_len"],
                          norm_eps=LLAMA2C_NORM_EPS, rope_theta=LLAMA2C_ROPE_THETA,
                          tied_embeddings=shared, rope_scaling=None)
    except ValueError as e:
        raise ModelFileError(f"{what}: {e}") from None
    return _Header(version, cfg, shared)


def _check_size(h: _Header, size: int, name: str) -> None:
    want = expected_size(h.cfg, h.version)
    if size == want:
        return
    c = h.cfg
    dims = (f"dim {c.dim}, hidden {c.hidden_dim}, layers {c.n_layers}, heads {c.n_heads}/"
            f"{c.n_kv_heads}, vocab {c.vocab_size}, seq_len {c.seq_len}, "
            f"{'shared' if h.shared else 'separate'} classifier")
    hint = ""
    other = ModelConfig(**{**c.to_dict(), "tied_embeddings": not c.tied_embeddings})
    if size == expected_size(other, h.version):
        hint = (f"; the length fits a {'separate' if h.shared else 'shared'} classifier, so the "
                f"{'vocab_size sign' if h.version == 0 else 'shared_classifier flag'} is wrong")
    if size < want:
        raise ModelFileError(f"{name}: truncated llama2.c v{h.version} file: header ({dims}) "
                             f"needs {want} bytes, file has {size}{hint}")
    raise ModelFileError(f"{name}: {size - want} bytes of trailing garbage after a llama2.c "
                         f"v{h.version} model ({dims}) of {want} bytes{hint}")


def _decode_body(h: _Header, raw: memoryview | bytes, name: str) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    off = _header_bytes(h.version)
    for tname, shape in _layout(h.cfg, h.version):
        n = math.prod(shape)
        if tname not in _FREQ:  # v0 RoPE tables: size checked, content ignored (we recompute)
            arr = np.frombuffer(raw, dtype="<f4", count=n, offset=off)
            bad = n - int(np.count_nonzero(np.isfinite(arr)))
            if bad:
                raise ModelFileError(f"{name}: tensor {tname} has {bad} NaN/inf value(s)")
            tensors[tname] = arr.reshape(shape).astype(np.float32)  # native, writable copy
        off += 4 * n
    return tensors


def decode_llama2c(raw: bytes, name: str = "<bytes>") -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Parse llama2.c v0/v1 bytes. Returns (config, tensors in our float-checkpoint naming)."""
    h = _parse_header(bytes(raw[:V1_HEADER_BYTES]), name)
    _check_size(h, len(raw), name)
    return h.cfg, _decode_body(h, raw, name)


def detect_version(path: str | Path) -> int:
    """0 or 1 from the header alone (validated); raises ModelFileError otherwise."""
    with _open(path) as f:
        return _parse_header(f.read(V1_HEADER_BYTES), str(path)).version


def _open(path: str | Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a llama2.c checkpoint") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None


def _read(path: str | Path) -> tuple[_Header, dict[str, np.ndarray], str]:
    name = str(path)
    with _open(path) as f:
        head = f.read(V1_HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
        h = _parse_header(head, name)
        _check_size(h, size, name)  # before reading the weights: garbage dims never load
        raw = head + f.read()
    if len(raw) != size:
        raise ModelFileError(f"{name}: file changed size while being read")
    return h, _decode_body(h, raw, name), hashlib.sha256(raw).hexdigest()


def read_llama2c(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a llama2.c v0 or v1 float32 checkpoint (detected by the v1 magic).

    Returns (ModelConfig, tensors) with our float checkpoint's names and shapes; wcls is present
    only for an unshared classifier. norm_eps and rope_theta are llama2.c's fixed 1e-5 / 10000.
    The header and the exact file length are checked before the weights are read; any problem
    raises ModelFileError.
    """
    h, tensors, _ = _read(path)
    return h.cfg, tensors


# ---------------------------------------------------------------------------------------------
# writing


def _rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """llama2.c model.py precompute_freqs_cis, float32: cos and sin of pos * theta^(-2i/hd)."""
    hd = cfg.head_dim
    freqs = np.float32(1.0) / (np.float32(cfg.rope_theta)
                               ** (np.arange(0, hd, 2)[: hd // 2].astype(np.float32) / np.float32(hd)))
    ang = np.outer(np.arange(cfg.seq_len).astype(np.float32), freqs).astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def check_representable(cfg: ModelConfig) -> None:
    """Raise ValueError if llama2.c's file format (and run.c) cannot express `cfg` exactly."""
    problems = []
    if cfg.norm_eps != LLAMA2C_NORM_EPS:
        problems.append(f"norm_eps {cfg.norm_eps:g} (llama2.c uses {LLAMA2C_NORM_EPS:g})")
    if cfg.rope_theta != LLAMA2C_ROPE_THETA:
        problems.append(f"rope_theta {cfg.rope_theta:g} (llama2.c uses {LLAMA2C_ROPE_THETA:g})")
    if cfg.rope_scaling is not None:
        problems.append("rope_scaling (llama2.c has none)")
    for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "seq_len"):
        if getattr(cfg, k) > _I32_MAX:
            problems.append(f"{k} {getattr(cfg, k)} does not fit an int32")
    if problems:
        raise ValueError("llama2.c format cannot represent " + ", ".join(problems))


def _checked_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    shapes = tensor_shapes(cfg)
    missing = [k for k in shapes if k not in tensors]
    if missing:
        raise ValueError(f"missing tensor(s): {', '.join(missing)}")
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        why = " (config has tied_embeddings=True)" if "wcls" in extra else ""
        raise ValueError(f"unexpected tensor(s): {', '.join(extra)}{why}")
    out = {}
    for k, shape in shapes.items():
        a = np.asarray(tensors[k])
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"tensor {k}: dtype {a.dtype} is not floating point")
        if a.shape != shape:
            raise ValueError(f"tensor {k}: shape {a.shape}, expected {shape}")
        a = np.ascontiguousarray(a, dtype="<f4")
        if not np.isfinite(a).all():
            raise ValueError(f"tensor {k}: contains NaN/inf")
        out[k] = a
    return out


def encode_llama2c(cfg: ModelConfig, tensors: dict[str, np.ndarray], version: int = 1) -> list[bytes]:
    """Validate and serialize to llama2.c v0/v1; returns the byte chunks (header first)."""
    if version not in VERSIONS:
        raise ValueError(f"llama2.c version must be 0 or 1, got {version!r}")
    check_representable(cfg)
    ts = _checked_tensors(cfg, tensors)
    p = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size,
         cfg.seq_len]
    shared = cfg.tied_embeddings
    if version == 0:
        if not shared:
            p[5] = -p[5]
        head = struct.pack("<7i", *p)
        cos, sin = _rope_tables(cfg)
        ts = {**ts, "freq_cis_real": cos, "freq_cis_imag": sin}
    else:
        head = struct.pack("<Ii7iB", MAGIC, 1, *p, int(shared))
        head += b"\0" * (V1_HEADER_BYTES - len(head))
    chunks = [head] + [ts[n].astype("<f4", copy=False).tobytes() for n, _ in _layout(cfg, version)]
    assert sum(map(len, chunks)) == expected_size(cfg, version)
    return chunks


def write_llama2c(path: str | Path, cfg: ModelConfig, tensors: dict[str, np.ndarray],
                  version: int = 1) -> None:
    """Write a llama2.c v0 or v1 float32 checkpoint atomically.

    Everything (config representable, every tensor present with the right shape, finite) is
    validated before a byte is written; ValueError on bad input, and no file or temp file remains.
    """
    atomic_write_bytes(path, encode_llama2c(cfg, tensors, version))


# ---------------------------------------------------------------------------------------------
# container conversion


def _import(bin_path, out_path) -> tuple[ModelConfig, int, str]:
    h, tensors, src_sha = _read(bin_path)
    meta = {"config": h.cfg.to_dict(), "tokenizer_sha256": None,
            "source": f"llama2c v{h.version}", "source_sha256": src_sha}
    return h.cfg, h.version, fileformat.save(out_path, "float", meta, tensors)


def import_to_bkl(bin_path: str | Path, out_path: str | Path) -> str:
    """llama2.c .bin (v0/v1) -> our float container ("float" kind); returns its sha256 (hex).

    meta: config, tokenizer_sha256 None (llama2.c keeps its tokenizer in a separate file),
    source "llama2c v0"/"llama2c v1", source_sha256 of the .bin.
    """
    return _import(bin_path, out_path)[2]


def export_from_bkl(bkl_path: str | Path, out_path: str | Path, version: int = 1) -> ModelConfig:
    """Our float container -> llama2.c .bin (v0 or v1). Returns the exported config.

    The tokenizer is not part of a llama2.c model file and is not exported.
    """
    header, tensors, _ = fileformat.load(bkl_path, kind="float")
    try:
        cfg = ModelConfig.from_dict(header["meta"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{bkl_path}: bad or missing model config in metadata: {e}") from None
    try:
        write_llama2c(out_path, cfg, tensors, version)
    except ValueError as e:
        raise ModelFileError(f"{bkl_path}: cannot export to llama2.c v{version}: {e}") from None
    return cfg


# ---------------------------------------------------------------------------------------------
# CLI


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _describe(cfg: ModelConfig) -> str:
    return (f"dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, "
            f"hidden {cfg.hidden_dim}, vocab {cfg.vocab_size}, seq_len {cfg.seq_len}, "
            f"{'tied' if cfg.tied_embeddings else 'untied'} classifier")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m weights.llama2c",
                                 description="Convert between llama2.c .bin checkpoints and "
                                             "bakedllama float containers.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="llama2.c .bin (v0 or v1) -> float .bkl")
    imp.add_argument("src", metavar="IN.bin")
    imp.add_argument("dst", metavar="OUT.bkl")
    exp = sub.add_parser("export", help="float .bkl -> llama2.c .bin")
    exp.add_argument("src", metavar="IN.bkl")
    exp.add_argument("dst", metavar="OUT.bin")
    exp.add_argument("--version", type=int, choices=VERSIONS, default=1,
                     help="llama2.c file version (default 1; 0 is what llama2.c run.c reads)")
    args = ap.parse_args(argv)
    try:
        if _same_file(args.src, args.dst):
            raise ModelFileError(f"{args.dst}: output would overwrite the input")
        if args.cmd == "import":
            cfg, version, digest = _import(args.src, args.dst)
            print(f"wrote {args.dst} (from llama2.c v{version}, {_describe(cfg)}; "
                  f"sha256 {digest[:16]})")
        else:
            cfg = export_from_bkl(args.src, args.dst, args.version)
            print(f"wrote {args.dst} (llama2.c v{args.version}, {_describe(cfg)}; sha256 "
                  f"{hashlib.sha256(Path(args.dst).read_bytes()).hexdigest()[:16]})")
    except (ModelFileError, ValueError, OSError) as e:
        if isinstance(e, OSError) and not isinstance(e, ModelFileError) and e.strerror:
            e = f"cannot write {args.dst}: {e.strerror}"  # reads already raise ModelFileError
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
