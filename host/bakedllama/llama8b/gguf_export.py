"""A Llama checkpoint as a llama.cpp GGUF, streamed tensor by tensor (the side-by-side bench).

`make bench` compares llama.cpp with run8b on the same weights: this writes the checkpoint the
project quantizes (synthetic:llama3.1-8b or any Llama) into a GGUF llama.cpp loads, F32 / F16 /
BF16 or quantized to Q8_0 / Q4_0 by gguf.quants (llama.cpp's own block formats, every matrix in
the one type, like the w8 / w4 schemes). That is llama.cpp's "convert + quantize" leg, timed.

  layout     GGUF's llama tensor names (checkpoint.GGUF_GLOBAL / GGUF_LAYER); wq / wk rows in
             interleaved RoPE pairs, which is what Checkpoint.tensor() returns and what llama.cpp's
             converter writes (its LlamaModel.permute), so nothing is permuted here
  rope       Llama 3.1's scaling as llama.cpp's rope_freqs tensor (per-pair divisors)
  tokenizer  the checkpoint's tokenizer.json as a "gpt2" BPE vocabulary, pre-tokenizer llama-bpe;
             a vocabulary without merges (the synthetic one) gets one placeholder merge, since
             llama.cpp refuses a BPE vocabulary with no merges key
  memory     tensors are read (pread, not the checkpoint's memory map), quantized and written in
             row chunks (~64 MiB of float32 at a time per thread; wq / wk whole), never the model;
             written to a temporary name, fsync'd, then renamed

The llama.cpp side (llama-cpp-python, the optional `bench` extra): `quantize` times
llama_model_quantize on an F16/BF16 GGUF, `decode` measures greedy decode steps; both run as
`python -m bakedllama.llama8b.gguf_export ...` so the bench keeps one engine in memory at a time."""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bakedllama.fileformat import ModelFileError
from bakedllama.llama8b.checkpoint import (
    GGUF_GLOBAL,
    GGUF_LAYER,
    Checkpoint,
    HFCheckpoint,
    hf_name,
    open_checkpoint,
    permute_reverse,
    tensor_list,
    tensor_shape,
)
from bakedllama.numerics import rope_inv_freq

CHUNK_FLOATS = 16 << 20  # float32 values read and quantized at once per thread (64 MiB)
PLACEHOLDER_MERGE = "Ġ w"  # "Ġw" is no token of the synthetic vocabulary: tokenizing is unchanged


def qtypes():
    """--type name -> (tensor type of matrices, llama.cpp file type)."""
    import gguf

    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (T.F32, F.ALL_F32), "f16": (T.F16, F.MOSTLY_F16), "bf16": (T.BF16, F.MOSTLY_BF16),
            "q8_0": (T.Q8_0, F.MOSTLY_Q8_0), "q4_0": (T.Q4_0, F.MOSTLY_Q4_0)}


def gguf_name(name: str, layer: int | None) -> str:
    return GGUF_GLOBAL[name] if layer is None else f"blk.{layer}.{GGUF_LAYER[name]}.weight"


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    if n % block:
        raise ValueError(f"{n} values are not a whole number of {qtype.name} blocks of {block}")
    return n // block * size


def _vocab(ck: Checkpoint) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) from the checkpoint's tokenizer.json."""
    import gguf

    tk = ck.tokenizer()  # ModelFileError when there is none
    v = tk.get_vocab(with_added_tokens=True)
    if len(v) != ck.cfg.vocab_size or sorted(v.values()) != list(range(ck.cfg.vocab_size)):
        raise ModelFileError(f"{ck.path}: tokenizer has {len(v)} tokens, the model {ck.cfg.vocab_size}")
    tokens = [""] * ck.cfg.vocab_size
    for t, i in v.items():
        tokens[i] = t
    special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
             for i in range(len(tokens))]
    model = json.loads(tk.to_str()).get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, types, merges or [PLACEHOLDER_MERGE]


def _rope_freqs(ck: Checkpoint) -> np.ndarray | None:
    """Llama 3.1 scaling as llama.cpp stores it: inv_freq / scaled inv_freq per rotated pair."""
    c = ck.cfg
    if not c.rope_scaling:
        return None
    base = rope_inv_freq(c.head_dim, c.rope_theta, None)
    return (base / rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)).astype(np.float32)


def _plan(ck: Checkpoint, qtype):
    """[(gguf name, shape, tensor type, source)]: source (name, layer), or an array to write."""
    import gguf

    out = []
    rf = _rope_freqs(ck)
    if rf is not None:
        out.append(("rope_freqs.weight", rf.shape, gguf.GGMLQuantizationType.F32, rf))
    for name, layer in tensor_list(ck.cfg):
        shape = tensor_shape(ck.cfg, name)
        t = qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32  # gains stay F32
        out.append((gguf_name(name, layer), shape, t, (name, layer)))
    return out


class _SafetensorsRows:
    """Rows of a Hugging Face checkpoint's tensors read with pread, as float32.

    HFCheckpoint.tensor() reads through safetensors' memory map, whose touched pages stay in the
    process's resident set until the checkpoint is closed (16 GB for the 8B in bf16); pread keeps
    the export at its chunks. Values are HFCheckpoint.tensor()'s (wq / wk un-permuted the same way)."""

    _DT = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

    def __init__(self, ck: HFCheckpoint):
        import ml_dtypes  # noqa: F401  (numpy's bfloat16)

        self.ck, self.where, self.fds = ck, {}, {}
        for f in sorted(ck.path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    self.where[k] = (f, 8 + n + v["data_offsets"][0], v["dtype"], tuple(v["shape"]))

    def rows(self, name: str, layer: int | None, r0: int, r1: int) -> np.ndarray:
        import ml_dtypes

        f, off, dt, shape = self.where[hf_name(name, layer)]
        dtype = np.dtype(ml_dtypes.bfloat16) if dt == "BF16" else np.dtype(self._DT[dt])
        cols = int(np.prod(shape[1:]))
        fd = self.fds.get(f)
        if fd is None:
            fd = self.fds[f] = os.open(f, os.O_RDONLY)
        lo, n = off + r0 * cols * dtype.itemsize, (r1 - r0) * cols * dtype.itemsize
        buf = os.pread(fd, n, lo)
        if len(buf) != n:
            raise ModelFileError(f"{f}: truncated tensor '{hf_name(name, layer)}'")
        os.posix_fadvise(fd, lo, n, os.POSIX_FADV_DONTNEED)  # read once: leave the page cache be
        w = np.frombuffer(buf, dtype).astype(np.float32).reshape((r1 - r0,) + tuple(shape[1:]))
        return w

    def tensor(self, name: str, layer: int | None) -> np.ndarray:
        w = self.rows(name, layer, 0, self.where[hf_name(name, layer)][3][0])
        if name in ("wq", "wk"):
            w = permute_reverse(w, self.ck.cfg.n_heads if name == "wq" else self.ck.cfg.n_kv_heads)
        return np.ascontiguousarray(w)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _chunks(ck: Checkpoint, src, shape, qtype, threads: int, reader=None):
    """The tensor's bytes in row chunks, quantized `threads` chunks at a time in parallel."""
    import gguf

    if isinstance(src, np.ndarray):
        yield gguf.quants.quantize(src, qtype).tobytes()
        return
    name, layer = src
    whole = reader.tensor if reader else ck.tensor
    if len(shape) == 1:
        yield gguf.quants.quantize(whole(name, layer), qtype).tobytes()
        return
    rows, cols = shape
    step = max(1, CHUNK_FLOATS // cols)
    if name in ("wq", "wk"):  # un-permuted whole: read once
        w = whole(name, layer)
        get = lambda r0: w[r0:r0 + step]  # noqa: E731
    elif reader:
        get = lambda r0: reader.rows(name, layer, r0, min(rows, r0 + step))  # noqa: E731
    else:
        get = lambda r0: ck.tensor(name, layer, slice(r0, min(rows, r0 + step)))  # noqa: E731

    def work(r0):
        return gguf.quants.quantize(np.ascontiguousarray(get(r0), dtype=np.float32), qtype).tobytes()

    starts = list(range(0, rows, step))
    if threads <= 1:
        for r0 in starts:
            yield work(r0)
        return
    with ThreadPoolExecutor(threads) as ex:  # numpy releases the GIL in the block arithmetic
        for i in range(0, len(starts), threads):
            yield from ex.map(work, starts[i:i + threads])


def write_gguf(ck: Checkpoint, out: str | Path, qtype: str = "q8_0", threads: int | None = None,
               show_progress: bool = True) -> dict:
    """Write `ck` as a llama.cpp GGUF of matrix type `qtype` (see qtypes()) to `out`.

    Returns {path, bytes, seconds, cpu_seconds (all threads), type, tensors, threads}. Streams
    tensor by tensor; the file appears under its name only when complete (temporary name, fsync,
    rename)."""
    import gguf
    from tqdm import tqdm

    if qtype not in qtypes():
        raise ValueError(f"--type must be one of {', '.join(qtypes())} (got {qtype!r})")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    mtype, ftype = qtypes()[qtype]
    threads = threads or os.cpu_count() or 1
    out = Path(out)
    c, sp = ck.cfg, ck.special
    tokens, types, merges = _vocab(ck)
    plan = _plan(ck, mtype)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"bakedllama export of {ck.path.name}")
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    max_pos = int(getattr(ck, "hf_config", {}).get("max_position_embeddings") or c.seq_len)
    w.add_context_length(max_pos)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if 0 <= sp.bos < c.vocab_size:
        w.add_bos_token_id(sp.bos)
        w.add_add_bos_token(True)
    if sp.stop:
        w.add_eos_token_id(sp.stop[0])
    for gname, shape, t, _src in plan:
        w.add_tensor_info(gname, shape, np.dtype(np.float32), _nbytes(shape, t), raw_dtype=t)
    total = sum(_nbytes(shape, t) for _, shape, t, _ in plan)
    reader = _SafetensorsRows(ck) if isinstance(ck, HFCheckpoint) else None
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        align = w.data_alignment
        f.write(b"\0" * (-f.tell() % align))
        base = f.tell()
        offset = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"gguf {qtype}",
                  disable=not show_progress) as bar:
            for gname, shape, t, src in plan:
                assert f.tell() - base == offset, gname
                n = 0
                for b in _chunks(ck, src, shape, t, threads, reader):
                    f.write(b)
                    n += len(b)
                    bar.update(len(b))
                if n != _nbytes(shape, t):
                    raise AssertionError(f"{gname}: wrote {n} bytes, expected {_nbytes(shape, t)}")
                f.write(b"\0" * (-n % align))
                offset += n + (-n % align)
        f.flush()
        os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if reader:
            reader.close()
    return dict(path=str(out), bytes=out.stat().st_size, seconds=round(time.perf_counter() - t_start, 2),
                cpu_seconds=round(time.process_time() - cpu_start, 2), type=qtype, tensors=len(plan),
                threads=threads)


# ----------------------------------------------------------------------------- llama.cpp (optional)
def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llamacpp_quantize(src: str | Path, dst: str | Path, qtype: str = "q8_0", threads: int = 0,
                      pure: bool = True) -> dict:
    """llama.cpp's own quantizer (llama-quantize's library call) from an F16/BF16/F32 GGUF.
    `pure`: every matrix in `qtype` (like write_gguf and the w8/w4 schemes; llama-quantize's
    default would put output.weight in Q6_K). Written to a temporary name, then renamed."""
    import llama_cpp

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(qtypes()[qtype][1])
    p.nthread = threads
    p.pure = pure
    t, cpu = time.perf_counter(), time.process_time()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), p)
        if rc != 0:
            raise ModelFileError(f"{src}: llama_model_quantize failed (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dict(path=str(dst), bytes=dst.stat().st_size, seconds=round(time.perf_counter() - t, 2),
                cpu_seconds=round(time.process_time() - cpu, 2), type=qtype,
                threads=threads or os.cpu_count())


def llamacpp_decode(path: str | Path, prompt_ids: list[int], max_tokens: int, threads: int,
                    context: int = 256, extra_bufts: bool = True) -> dict:
    """Greedy generation on llama.cpp from token ids (the prompt in one batch, then one
    llama_decode per token): tokens and the seconds of every decode step. extra_bufts=False:
    the weights stay in the mapped GGUF (llama_model_params.use_extra_bufts; no AMX or repacked
    CPU layouts)."""
    import llama_cpp
    import llama_cpp.llama as L

    default = llama_cpp.llama_model_default_params

    def params():
        x = default()
        x.use_extra_bufts = extra_bufts
        return x

    t = time.perf_counter()
    L.llama_cpp.llama_model_default_params = params  # (Llama() takes its model params from here)
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=min(512, context),
                              n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        L.llama_cpp.llama_model_default_params = default
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    llm.eval(prompt_ids)
    prefill = time.perf_counter() - t
    toks, steps = [], []
    for _ in range(max_tokens):
        # the last position's logits (Llama.scores is only filled with logits_all)
        lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tok = int(np.argmax(lg))
        toks.append(tok)
        if len(toks) == max_tokens:
            break
        t = time.perf_counter()
        llm.eval([tok])
        steps.append(time.perf_counter() - t)
    import resource

    return dict(tokens=toks, decode_seconds=steps, prefill_seconds=prefill, load_seconds=t_load,
                threads=threads, extra_bufts=extra_bufts,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bakedllama.llama8b.gguf_export",
                                description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="checkpoint -> GGUF (timed)")
    w.add_argument("checkpoint", metavar="DIR|synthetic:NAME")
    w.add_argument("out", metavar="OUT.gguf")
    w.add_argument("--type", default="q8_0", choices=("f32", "f16", "bf16", "q8_0", "q4_0"))
    w.add_argument("--threads", type=int, default=0, help="quantizing threads (0: all cores)")
    w.add_argument("--cache-dir", help="where synthetic checkpoints live (default weights/cache)")
    q = sub.add_parser("quantize", help="llama.cpp's llama_model_quantize (needs llama-cpp-python)")
    q.add_argument("src", metavar="IN.gguf")
    q.add_argument("out", metavar="OUT.gguf")
    q.add_argument("--type", default="q8_0", choices=("q8_0", "q4_0"))
    q.add_argument("--threads", type=int, default=0)
    d = sub.add_parser("decode", help="greedy decode on llama.cpp from token ids; prints JSON")
    d.add_argument("gguf", metavar="FILE.gguf")
    d.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    d.add_argument("--max-tokens", type=int, default=16)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--context", type=int, default=256)
    d.add_argument("--no-extra-bufts", action="store_true",
                   help="keep the weights in the mapped GGUF (no AMX / repacked CPU buffers)")
    a = p.parse_args(argv)
    try:
        if a.cmd == "write":
            kw = {"cache_dir": a.cache_dir} if a.cache_dir else {}
            ck = open_checkpoint(a.checkpoint, **kw)
            res = write_gguf(ck, a.out, a.type, a.threads or None, show_progress=sys.stderr.isatty())
        elif not llamacpp_available():
            raise ValueError("llama.cpp is not installed (pip install '.[bench]', or make bench-extra)")
        elif a.cmd == "quantize":
            if not Path(a.src).is_file():
                raise ModelFileError(f"{a.src}: no such file")
            res = llamacpp_quantize(a.src, a.out, a.type, a.threads)
        else:
            if not Path(a.gguf).is_file():
                raise ModelFileError(f"{a.gguf}: no such file")
            ids = [int(x) for x in a.ids.split(",") if x.strip()]
            if not ids:
                raise ValueError("--ids: empty prompt")
            res = llamacpp_decode(a.gguf, ids, a.max_tokens, a.threads, a.context,
                                  not a.no_extra_bufts)
    except (ModelFileError, ValueError, KeyError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
