"""The bakedllama container: one versioned, checksummed file for float checkpoints and baked models.

Layout (little-endian):
    magic   4 bytes  b"BKLM"
    version u32      FORMAT_VERSION
    hlen    u32      length of the JSON header
    header  hlen     UTF-8 JSON: {"kind", "meta", "tensors": [{name, dtype, shape, offset, nbytes}]}
    pad     to 64 bytes
    data    tensor bytes, each 64-byte aligned, offsets relative to the data start
    sha256  32 bytes of everything before it

Writers go to a temporary name and rename, so no half-written file is ever left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

MAGIC = b"BKLM"
FORMAT_VERSION = 1
_ALIGN = 64
_DTYPES = {"float32", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32"}


class ModelFileError(Exception):
    """A model or checkpoint file that is missing, corrupt or of the wrong kind."""


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def atomic_write_bytes(path: str | Path, chunks) -> None:
    """Write byte chunks to `path` through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save(path: str | Path, kind: str, meta: dict, tensors: dict[str, np.ndarray]) -> str:
    """Save tensors + metadata; returns the file's sha256 (hex)."""
    entries, blobs, off = [], [], 0
    for name, arr in tensors.items():
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # (ascontiguousarray would turn 0-d into 1-d)
        if arr.dtype.name not in _DTYPES:
            raise ValueError(f"tensor {name}: unsupported dtype {arr.dtype}")
        b = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append(dict(name=name, dtype=arr.dtype.name, shape=list(arr.shape), offset=off,
                            nbytes=len(b)))
        blobs.append(b + b"\0" * _pad(len(b)))
        off += len(b) + _pad(len(b))
    header = json.dumps(dict(kind=kind, meta=meta, tensors=entries), sort_keys=True).encode()
    head = MAGIC + struct.pack("<II", FORMAT_VERSION, len(header)) + header
    head += b"\0" * _pad(len(head))
    h = hashlib.sha256(head)
    for b in blobs:
        h.update(b)
    digest = h.digest()
    atomic_write_bytes(path, [head, *blobs, digest])
    return digest.hex()


def load(path: str | Path, kind: str | None = None) -> tuple[dict, dict[str, np.ndarray], str]:
    """Load and verify a container. Returns (header, tensors, sha256 hex)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a directory, not a model file") from None
    except PermissionError:
        raise ModelFileError(f"{path}: permission denied") from None
    if len(raw) < 12 + 32 or raw[:4] != MAGIC:
        raise ModelFileError(f"{path}: not a bakedllama file (bad magic)")
    version, hlen = struct.unpack("<II", raw[4:12])
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: format version {version}, this build reads {FORMAT_VERSION}")
    body, digest = raw[:-32], raw[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise ModelFileError(f"{path}: checksum mismatch (file is corrupt or truncated)")
    try:
        header = json.loads(raw[12:12 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: header is not valid JSON") from None
    _check_header(path, header)
    if kind is not None and header.get("kind") != kind:
        raise ModelFileError(f"{path}: is a '{header.get('kind')}' file, expected '{kind}'")
    start = 12 + hlen
    start += _pad(start)
    tensors = {}
    for e in header["tensors"]:
        a, b = start + e["offset"], start + e["offset"] + e["nbytes"]
        if b > len(body):
            raise ModelFileError(f"{path}: tensor {e['name']} runs past the end of the file")
        arr = np.frombuffer(raw[a:b], dtype=np.dtype(e["dtype"]).newbyteorder("<"))
        tensors[e["name"]] = arr.reshape(e["shape"]).astype(e["dtype"])
    return header, tensors, digest.hex()


def _check_header(path, header) -> None:
    """The header's structure, before anything is read through it: a checksum only proves that
    the file is what its writer wrote, not that the writer followed the format."""
    def bad(why):
        raise ModelFileError(f"{path}: malformed header ({why})")

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(header, dict):
        bad(f"a JSON {type(header).__name__}, not an object")
    if not isinstance(header.get("meta"), dict):
        bad("no 'meta' object")
    if not isinstance(header.get("tensors"), list):
        bad("no 'tensors' list")
    names = set()
    for i, e in enumerate(header["tensors"]):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            bad(f"tensor entry {i} is not an object with a name")
        n = e["name"]
        if n in names:
            bad(f"tensor '{n}' appears twice")
        names.add(n)
        if e.get("dtype") not in _DTYPES:
            bad(f"tensor '{n}' has dtype {e.get('dtype')!r}")
        shape = e.get("shape")
        if not isinstance(shape, list) or not all(count(d) for d in shape):
            bad(f"tensor '{n}' has shape {shape!r}")
        if not count(e.get("offset")) or not count(e.get("nbytes")):
            bad(f"tensor '{n}' has offset {e.get('offset')!r}, nbytes {e.get('nbytes')!r}")
        if e["nbytes"] != int(np.prod(shape, dtype=np.int64)) * np.dtype(e["dtype"]).itemsize:
            bad(f"tensor '{n}': {e['nbytes']} bytes do not hold shape {shape} of {e['dtype']}")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
