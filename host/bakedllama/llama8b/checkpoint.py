"""Llama checkpoints: Hugging Face directories (safetensors, memory-mapped), GGUF, synthetic.

Internal names are the golden model's (tok_embeddings, wq .. w3, rms_*, wcls), one matrix per
layer. Hugging Face stores wq/wk rows for the half-split ("rotate_half") RoPE; the golden model
rotates interleaved pairs (llama2.c), so `tensor()` permutes their rows back per head, exactly as
llama2.c's export.py `permute_reverse`. GGUF files from llama.cpp already hold the interleaved
layout (llama.cpp permutes at conversion), so they are read as they are.

`synthetic:llama3.1-8b` / `synthetic:llama3-tiny` write (once, cached) a deterministic seeded
Hugging Face directory of the real shapes in bf16, so the real loading code is what runs."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np

from bakedllama.config import ModelConfig
from bakedllama.fileformat import ModelFileError
from bakedllama.llama8b.arch import DEFAULT_CONTEXT, SPECS, Special, from_hf_config
from bakedllama.numerics import rope_inv_freq as nx_rope

REPO = Path(__file__).resolve().parents[3]
CACHE_DIR = REPO / "weights" / "cache"
SYNTHETIC_SEED = 20240723  # Llama 3.1's release date

GLOBAL_NAMES = {"tok_embeddings": "model.embed_tokens.weight", "rms_final_weight": "model.norm.weight",
                "wcls": "lm_head.weight"}
LAYER_NAMES = {"rms_att_weight": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
               "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
               "wo": "self_attn.o_proj.weight", "rms_ffn_weight": "post_attention_layernorm.weight",
               "w1": "mlp.gate_proj.weight", "w3": "mlp.up_proj.weight", "w2": "mlp.down_proj.weight"}
LAYER_ORDER = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w3", "w2")
GGUF_GLOBAL = {"tok_embeddings": "token_embd.weight", "rms_final_weight": "output_norm.weight",
               "wcls": "output.weight"}
GGUF_LAYER = {"rms_att_weight": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
              "wo": "attn_output", "rms_ffn_weight": "ffn_norm", "w1": "ffn_gate", "w3": "ffn_up",
              "w2": "ffn_down"}


def tensor_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Shape of one tensor (one layer's matrix for per-layer names)."""
    d, kv, h, v = cfg.dim, cfg.kv_dim, cfg.hidden_dim, cfg.vocab_size
    return dict(tok_embeddings=(v, d), wcls=(v, d), rms_final_weight=(d,), rms_att_weight=(d,),
                rms_ffn_weight=(d,), wq=(d, d), wk=(kv, d), wv=(kv, d), wo=(d, d), w1=(h, d),
                w3=(h, d), w2=(d, h))[name]


def tensor_list(cfg: ModelConfig) -> list[tuple[str, int | None]]:
    """(name, layer) of every tensor in checkpoint order; layer None for the global ones."""
    out = [("tok_embeddings", None)]
    out += [(n, l) for l in range(cfg.n_layers) for n in LAYER_ORDER]
    out.append(("rms_final_weight", None))
    if not cfg.tied_embeddings:
        out.append(("wcls", None))
    return out


def hf_name(name: str, layer: int | None) -> str:
    return GLOBAL_NAMES[name] if layer is None else f"model.layers.{layer}.{LAYER_NAMES[name]}"


def permute_reverse(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Hugging Face half-split q/k rows -> interleaved pairs: row h*hd + c*hd/2 + i -> h*hd + 2i + c."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def permute_forward(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse (interleaved -> Hugging Face), used to write synthetic checkpoints and tests."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


class Checkpoint:
    """A float checkpoint: cfg, special tokens, tokenizer path, and tensors on demand (float32)."""

    cfg: ModelConfig
    special: Special
    path: Path

    def tensor(self, name: str, layer: int | None = None, rows: slice | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
        """float32 (rows of) one tensor; `out`: a float32 array of that shape to fill and return
        (a streamed pass reuses its buffers instead of faulting in fresh pages per tensor)."""
        raise NotImplementedError

    @staticmethod
    def _into(w: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return w
        np.copyto(out, w)
        return out

    def identity(self) -> str:
        raise NotImplementedError

    def tokenizer(self):
        from tokenizers import Tokenizer

        p = self.path / "tokenizer.json" if self.path.is_dir() else self.path.with_name("tokenizer.json")
        if not p.exists():
            raise ModelFileError(f"{p}: no such tokenizer file")
        try:
            return Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises plain Exceptions
            raise ModelFileError(f"{p}: not a valid tokenizer ({str(e).splitlines()[0]})") from None

    def _check_shapes(self, get_shape) -> None:
        """Every tensor present with the right shape: one clear error for the first that is not."""
        for name, layer in tensor_list(self.cfg):
            want = tensor_shape(self.cfg, name)
            got = get_shape(name, layer)
            label = self._label(name, layer)
            if got is None:
                raise ModelFileError(f"{self.path}: missing tensor '{label}'")
            if tuple(got) != want:
                raise ModelFileError(f"{self.path}: tensor '{label}' has shape {tuple(got)}, "
                                     f"expected {want}")

    def _label(self, name: str, layer: int | None) -> str:
        return hf_name(name, layer)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data begin."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


class HFCheckpoint(Checkpoint):
    """A Hugging Face Llama directory: config.json, *.safetensors (+ index), tokenizer.json."""

    def __init__(self, path: str | Path, context: int = DEFAULT_CONTEXT):
        import ml_dtypes  # noqa: F401  (registers numpy's bfloat16 for safetensors' numpy frames)
        from safetensors import safe_open

        self.path = p = Path(path)
        if not p.is_dir():
            raise ModelFileError(f"{p}: no such checkpoint directory")
        try:
            hf = json.loads((p / "config.json").read_text())
        except FileNotFoundError:
            raise ModelFileError(f"{p}: no config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFileError(f"{p / 'config.json'}: not valid JSON") from None
        self.hf_config = hf
        self.cfg, self.special = from_hf_config(hf, context, str(p / "config.json"))
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise ModelFileError(f"{p}: no *.safetensors files")
        self._files, self._where = {}, {}
        for f in files:
            try:
                h = safe_open(str(f), framework="numpy")
            except Exception as e:  # safetensors raises its own SafetensorError
                raise ModelFileError(f"{f}: not a safetensors file ({str(e).splitlines()[0]})") from None
            self._files[f.name] = h
            for k in h.keys():
                self._where[k] = f.name
        self._hdr = {f.name: _safetensors_header(f) for f in files}  # for plain reads
        self._local = threading.local()  # per thread: reused read buffers
        self._check_shapes(self._shape)

    def _shape(self, name, layer):
        k = hf_name(name, layer)
        if k not in self._where:
            return None
        sl = self._files[self._where[k]].get_slice(k)
        if sl.get_dtype() not in ("F32", "F16", "BF16"):
            raise ModelFileError(f"{self.path}: tensor '{k}' has dtype {sl.get_dtype()}, "
                                 "expected F32, F16 or BF16")
        return sl.get_shape()

    def tensor(self, name, layer=None, rows=None, out=None):
        k = hf_name(name, layer)
        if name in ("wq", "wk"):
            heads = self.cfg.n_heads if name == "wq" else self.cfg.n_kv_heads
            w = self._read(k, None, self._scratch("perm", self._hdr_shape(k), np.float32))
            if rows is None:
                r, c = w.shape
                if out is None:
                    out = np.empty((r, c), np.float32)
                np.copyto(out.reshape(heads, r // heads // 2, 2, c),  # = permute_reverse(w)
                          w.reshape(heads, 2, r // heads // 2, c).transpose(0, 2, 1, 3))
                return out
            return self._into(np.ascontiguousarray(permute_reverse(w, heads)[rows]), out)
        if rows is None or (isinstance(rows, slice) and rows.step in (None, 1)):
            return self._read(k, rows, out)
        return self._into(self._read(k)[rows], out)

    def _hdr_shape(self, k: str) -> tuple[int, ...]:
        return tuple(self._hdr[self._where[k]][0][k]["shape"])

    def _scratch(self, slot: str, shape, dtype) -> np.ndarray:
        """A reused buffer of this checkpoint and thread (grown when too small)."""
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        bufs = self._local.__dict__.setdefault("buffers", {})
        buf = bufs.get(slot)
        if buf is None or buf.size < n:
            buf = bufs[slot] = np.empty(n, np.uint8)
        return buf[:n].view(dtype).reshape(shape)

    def _read(self, k: str, rows: slice | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor k (or its rows) as float32, read from the file with plain reads: nothing stays
        mapped, so streaming a checkpoint through costs no resident memory (the pages are the OS
        page cache's). bf16 widens exactly (its bits are float32's top half)."""
        from bakedllama.llama8b.fastquant import bf16_to_f32

        fname = self._where[k]
        hdr, data0 = self._hdr[fname]
        info = hdr[k]
        dt = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[info["dtype"]]
        shape = list(info["shape"])
        start = data0 + info["data_offsets"][0]
        if rows is not None and shape:
            r0, r1, _ = rows.indices(shape[0])
            r1 = max(r0, r1)
            start += r0 * int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dt).itemsize
            shape[0] = r1 - r0
        if out is not None and (out.dtype != np.float32 or out.shape != tuple(shape)):
            raise ValueError(f"out: float32 {tuple(shape)} expected, got {out.dtype} {out.shape}")
        if dt is np.float32:
            a = out if out is not None else np.empty(shape, np.float32)
        else:
            a = self._scratch("raw", shape, dt)
        buf = memoryview(a.reshape(-1).view(np.uint8))
        with open(self.path / fname, "rb", buffering=0) as f:
            n = 0
            while n < len(buf):
                got = os.preadv(f.fileno(), [buf[n:n + (1 << 30)]], start + n)
                if got <= 0:
                    raise ModelFileError(f"{self.path / fname}: truncated (tensor '{k}')")
                n += got
        if dt is np.float32:
            return a
        if info["dtype"] == "BF16":
            return bf16_to_f32(a, out)
        return self._into(a.astype(np.float32), out)

    def identity(self) -> str:
        h = hashlib.sha256(json.dumps(self.hf_config, sort_keys=True).encode())
        for f in sorted(self._files):
            st = (self.path / f).stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file (general.architecture = llama) through the `gguf` package.

    Tensors are memory-mapped by gguf's reader; F32/F16 are used as they are, quantized types
    (Q8_0, Q4_K, ...) go through gguf.quants.dequantize. llama.cpp's converter already permuted
    wq/wk to interleaved pairs. The tokenizer is read from a tokenizer.json next to the file
    (GGUF's embedded vocabulary is not converted)."""

    def __init__(self, path: str | Path, context: int = DEFAULT_CONTEXT):
        import gguf

        self.path = p = Path(path)
        try:
            self.r = r = gguf.GGUFReader(str(p))
        except FileNotFoundError:
            raise ModelFileError(f"{p}: no such file") from None
        except Exception as e:  # gguf raises ValueError and friends on bad files
            raise ModelFileError(f"{p}: not a GGUF file ({str(e).splitlines()[0]})") from None
        kv = {f.name: f for f in r.fields.values()}

        def val(key, default=None):
            f = kv.get(key)
            return default if f is None else f.contents()

        def f32(v):  # GGUF stores eps and theta as float32: back to the decimal they came from
            return float(f"{float(v):.7g}")

        arch = val("general.architecture")
        if arch != "llama":
            raise ModelFileError(f"{p}: not a Llama model (general.architecture={arch!r})")
        dim, heads = val("llama.embedding_length"), val("llama.attention.head_count")
        tensors = {t.name: t for t in r.tensors}
        if "token_embd.weight" not in tensors:
            raise ModelFileError(f"{p}: missing tensor 'token_embd.weight'")
        vocab = val("llama.vocab_size") or int(tensors["token_embd.weight"].shape[-1])
        hf = dict(model_type="llama", hidden_size=dim, num_hidden_layers=val("llama.block_count"),
                  num_attention_heads=heads, num_key_value_heads=val("llama.attention.head_count_kv"),
                  intermediate_size=val("llama.feed_forward_length"), vocab_size=vocab,
                  rms_norm_eps=f32(val("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                  rope_theta=f32(val("llama.rope.freq_base", 10000.0)), rope_scaling=None,
                  tie_word_embeddings="output.weight" not in tensors,
                  bos_token_id=val("tokenizer.ggml.bos_token_id"),
                  eos_token_id=val("tokenizer.ggml.eos_token_id"))
        if "rope_freqs.weight" in tensors:  # llama3 scaling, stored as per-pair divisors
            hf["rope_scaling"] = self._llama3_scaling(hf, np.asarray(tensors["rope_freqs.weight"].data))
        self.hf_config = hf
        self.cfg, self.special = from_hf_config(hf, context, str(p))
        self._t = tensors
        self._check_shapes(self._shape)

    def _llama3_scaling(self, hf: dict, freqs: np.ndarray) -> dict:
        """llama.cpp writes Llama 3.1's scaling as rope_freqs (inv_freq / scaled inv_freq);
        accept them when they are the llama3 rule's (factor 8, 1, 4, 8192), as in every 3.1."""
        from bakedllama.llama8b.arch import LLAMA3_ROPE_SCALING

        hd = hf["hidden_size"] // hf["num_attention_heads"]
        base = nx_rope(hd, hf["rope_theta"], None)
        want = base / nx_rope(hd, hf["rope_theta"], LLAMA3_ROPE_SCALING)
        if freqs.shape != want.shape or not np.allclose(freqs, want, rtol=1e-3):
            raise ModelFileError(f"{self.path}: rope_freqs are not Llama 3.1's llama3 scaling")
        return dict(rope_type="llama3", **LLAMA3_ROPE_SCALING)

    def _label(self, name, layer):
        return GGUF_GLOBAL[name] if layer is None else f"blk.{layer}.{GGUF_LAYER[name]}.weight"

    def _shape(self, name, layer):
        t = self._t.get(self._label(name, layer))
        return None if t is None else tuple(int(s) for s in reversed(t.shape))

    def tensor(self, name, layer=None, rows=None, out=None):
        import gguf

        t = self._t[self._label(name, layer)]
        shape = tuple(int(s) for s in reversed(t.shape))
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w = np.asarray(t.data).reshape(shape)
        else:
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        w = w if rows is None else w[rows]
        w = np.array(w, dtype=np.float32) if out is None else self._into(w, out)  # a copy: then
        self._release(t)  # unmap
        return w

    def _release(self, t) -> None:
        """Drop a tensor's file pages from this process (a streamed pass over the whole file must
        not leave it all resident); the OS page cache keeps them for a next read."""
        mm = getattr(self.r.data, "_mmap", None)
        if mm is None:
            return
        lo = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(mm), int(t.data_offset) + int(t.n_bytes))
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def identity(self) -> str:
        st = self.path.stat()
        return hashlib.sha256(f"{self.path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()

    def tokenizer(self):
        return super().tokenizer()


# ----------------------------------------------------------------------------- synthetic checkpoints
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (what tokenizers' ByteLevel pre-tokenizer and decoder use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


LLAMA3_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                   6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                   10: "<|python_tag|>"}


def synthetic_tokenizer(vocab_size: int, bos: int) -> str:
    """A byte-level tokenizer.json: 256 byte tokens, filler words ' w<i>' up to `bos`, then
    Llama 3's special tokens from `bos` on (<|begin_of_text|>, <|end_of_text|>, <|eot_id|>, ...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update({f"Ġw{i}": i for i in range(256, bos)})
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    names, r = [], 0
    for i in range(vocab_size - bos):
        if i in LLAMA3_SPECIALS:
            names.append(LLAMA3_SPECIALS[i])
        else:
            names.append(f"<|reserved_special_token_{r}|>")
            r += 1
    tk.add_special_tokens([AddedToken(n, special=True) for n in names])
    assert tk.get_vocab_size() == vocab_size and tk.token_to_id(names[0]) == bos
    return tk.to_str()


_ST_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}


def write_safetensors(path: Path, entries: list, metadata: dict | None = None, progress=None) -> None:
    """Write a safetensors file tensor by tensor: entries = [(name, shape, dtype, chunks())].

    The header (all offsets) is known up front from the shapes, so no tensor is ever held whole;
    each chunks() yields the tensor's bytes in row order. Written to a temporary name, then renamed."""
    header, off = {}, 0
    for name, shape, dt, _ in entries:
        n = int(np.prod(shape)) * _ST_DTYPES[dt]
        header[name] = dict(dtype=dt, shape=list(shape), data_offsets=[off, off + n])
        off += n
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb)
        for name, _shape, _dt, chunks in entries:
            n = 0
            for c in chunks():
                f.write(c)
                n += len(c)
                if progress is not None:
                    progress.update(len(c))
            assert n == header[name]["data_offsets"][1] - header[name]["data_offsets"][0], name
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _synthetic_chunks(name: str, layer, shape, seed: int):
    """bf16 bytes of one synthetic tensor, in row chunks, each from its own seeded generator.

    Like a trained Llama's scale: matrices and embeddings N(0, 0.02), norm gains N(1, 0.1)."""
    import ml_dtypes

    def gen():
        key = zlib.crc32(f"{name}.{layer}".encode())
        if len(shape) == 1:
            rng = np.random.default_rng([seed, key, 0])
            x = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
            yield x.astype(ml_dtypes.bfloat16).tobytes()
            return
        rows, cols = shape
        step = max(1, (1 << 23) // cols)
        for i, r0 in enumerate(range(0, rows, step)):
            rng = np.random.default_rng([seed, key, i + 1])
            x = rng.standard_normal((min(step, rows - r0), cols), dtype=np.float32)
            x *= np.float32(0.02)
            yield x.astype(ml_dtypes.bfloat16).tobytes()

    return gen


def write_synthetic(path: str | Path, spec: str, seed: int = SYNTHETIC_SEED,
                    shard_bytes: int = 5 << 30, show_progress: bool = True) -> Path:
    """Write the deterministic synthetic Hugging Face directory of `spec` (see arch.SPECS)."""
    from tqdm import tqdm

    hf = dict(SPECS[spec])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, special = from_hf_config(hf)
    ents = []
    for name, layer in tensor_list(cfg):
        shape = tensor_shape(cfg, name)
        ents.append((hf_name(name, layer), shape, "BF16", _synthetic_chunks(name, layer, shape, seed)))
    shards, cur, size = [], [], 0
    for e in ents:
        n = int(np.prod(e[1])) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    total = sum(int(np.prod(e[1])) * 2 for e in ents)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"synthetic {spec}",
              disable=not show_progress) as bar:
        for fname, sh in zip(names, shards):
            write_safetensors(path / fname, sh, {"format": "pt"}, bar)
    if len(shards) > 1:
        wm = {e[0]: fname for fname, sh in zip(names, shards) for e in sh}
        (path / "model.safetensors.index.json").write_text(
            json.dumps(dict(metadata=dict(total_size=total), weight_map=wm), indent=1))
    (path / "tokenizer.json").write_text(synthetic_tokenizer(cfg.vocab_size, special.bos))
    (path / "config.json").write_text(json.dumps(dict(hf, synthetic_seed=seed), indent=1))
    (path / "SYNTHETIC-COMPLETE").write_text(f"{spec} seed {seed}\n")  # written last
    return path


def synthetic_dir(spec: str, cache_dir: str | Path = CACHE_DIR, seed: int = SYNTHETIC_SEED) -> Path:
    return Path(cache_dir) / f"synthetic-{spec}-s{seed}"


def open_checkpoint(spec: str, context: int = DEFAULT_CONTEXT, cache_dir: str | Path = CACHE_DIR,
                    show_progress: bool = True) -> Checkpoint:
    """DIR | FILE.gguf | synthetic:NAME -> Checkpoint (synthetic ones are written once, cached).
    A bare `synthetic` means synthetic:llama3.1-8b."""
    if spec == "synthetic":
        spec = "synthetic:llama3.1-8b"
    if spec.startswith("synthetic:"):
        name = spec.split(":", 1)[1]
        if name not in SPECS:
            raise ModelFileError(f"unknown synthetic checkpoint '{name}' (choose from "
                                 f"{', '.join(SPECS)})")
        d = synthetic_dir(name, cache_dir)
        if not (d / "SYNTHETIC-COMPLETE").exists():
            write_synthetic(d, name, show_progress=show_progress)
        return HFCheckpoint(d, context)
    p = Path(spec)
    if p.suffix == ".gguf":
        return GGUFCheckpoint(p, context)
    if p.is_file():
        raise ModelFileError(f"{p}: expected a Hugging Face checkpoint directory or a .gguf file")
    return HFCheckpoint(p, context)
