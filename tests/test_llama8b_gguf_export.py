"""GGUF export (llama8b/gguf_export.py): the synthetic tiny model written for llama.cpp reads back
through the project's own GGUF reader (checkpoint.GGUFCheckpoint) with the same model and tensors.
llama.cpp itself is not needed (it is the optional `bench` extra)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from bakedllama.llama8b import checkpoint, gguf_export

T = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-export")
    return checkpoint.open_checkpoint("synthetic:llama3-tiny", 64, d, show_progress=False)


@pytest.fixture(scope="module")
def written(tiny_ck, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-out")
    return {t: gguf_export.write_gguf(tiny_ck, d / f"tiny-{t}.gguf", t, threads=1, show_progress=False)
            for t in ("f32", "q8_0", "q4_0")}


def _blocks(a):
    return np.asarray(a, np.float64).reshape(-1, 32)


def test_f32_reads_back_exactly(tiny_ck, written):
    """F32: every tensor as HFCheckpoint.tensor() gives it (the export reads the safetensors with
    its own pread path; wq / wk in interleaved RoPE pairs, as llama.cpp's converter writes them)."""
    g = checkpoint.GGUFCheckpoint(written["f32"]["path"], 64)
    assert g.cfg == tiny_ck.cfg  # dims, eps, theta, and Llama 3.1's rope scaling from rope_freqs
    assert g.special.bos == tiny_ck.special.bos == 384 and g.special.stop == tiny_ck.special.stop[:1]
    for name, layer in checkpoint.tensor_list(tiny_ck.cfg):
        a, b = tiny_ck.tensor(name, layer), g.tensor(name, layer)
        assert b.shape == a.shape and np.array_equal(a, b), (name, layer)


def test_q8_0_within_its_rounding(tiny_ck, written):
    """Matrices in Q8_0 (per block of 32: d = max|x| / 127, x = d * round(x / d), d stored in
    float16): every value within half a step plus the float16 rounding of d; gains exact F32."""
    g = checkpoint.GGUFCheckpoint(written["q8_0"]["path"], 64)
    assert g.cfg == tiny_ck.cfg
    kinds = {t.name: t.tensor_type for t in g.r.tensors}
    for name, layer in checkpoint.tensor_list(tiny_ck.cfg):
        a, b = tiny_ck.tensor(name, layer), g.tensor(name, layer)
        label = gguf_export.gguf_name(name, layer)
        if a.ndim == 1:
            assert kinds[label] == T.F32 and np.array_equal(a, b), label
            continue
        assert kinds[label] == T.Q8_0, label
        x, y = _blocks(a), _blocks(b)
        d = np.abs(x).max(axis=1, keepdims=True) / 127
        bound = d * (0.5 + 127 * 2.0 ** -11) + 1e-12
        assert np.all(np.abs(x - y) <= bound), label
        assert not np.array_equal(a, b), label  # it was quantized (random bf16 is not on the grid)


def test_q4_0_within_its_rounding(tiny_ck, written):
    """Q4_0: d = -(the signed value of largest magnitude) / 8, 16 levels: within one step
    (the far end of a block saturates at 7 d), plus d's float16 rounding."""
    g = checkpoint.GGUFCheckpoint(written["q4_0"]["path"], 64)
    for name, layer in checkpoint.tensor_list(tiny_ck.cfg):
        a, b = tiny_ck.tensor(name, layer), g.tensor(name, layer)
        if a.ndim == 1:
            assert np.array_equal(a, b)
            continue
        x, y = _blocks(a), _blocks(b)
        d = np.abs(x).max(axis=1, keepdims=True) / 8
        assert np.all(np.abs(x - y) <= d * (1 + 8 * 2.0 ** -11) + 1e-12), (name, layer)
    assert written["q4_0"]["bytes"] < written["q8_0"]["bytes"] < written["f32"]["bytes"]


def test_llama_cpp_metadata(tiny_ck, written):
    """What llama.cpp's loader needs: the llama keys, a gpt2 vocabulary of vocab_size tokens
    (specials marked control) with a merges key, and the rope_freqs tensor."""
    r = gguf.GGUFReader(written["q8_0"]["path"])
    kv = {f.name: f.contents() for f in r.fields.values()}
    c = tiny_ck.cfg
    assert kv["general.architecture"] == "llama"
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (kv["llama.block_count"], kv["llama.embedding_length"], kv["llama.feed_forward_length"],
            kv["llama.attention.head_count"], kv["llama.attention.head_count_kv"],
            kv["llama.rope.dimension_count"]) == (c.n_layers, c.dim, c.hidden_dim, c.n_heads,
                                                  c.n_kv_heads, c.head_dim)
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "llama-bpe"
    toks = kv["tokenizer.ggml.tokens"]
    assert len(toks) == c.vocab_size and toks[384] == "<|begin_of_text|>" and toks[ord("a")] == "a"
    types = kv["tokenizer.ggml.token_type"]
    assert types[384] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert kv["tokenizer.ggml.merges"] == [gguf_export.PLACEHOLDER_MERGE]
    names = [t.name for t in r.tensors]
    assert names[0] == "rope_freqs.weight" and "output.weight" in names
    assert len(names) == 1 + len(checkpoint.tensor_list(c))


def test_chunked_threaded_write_is_the_same_file(tiny_ck, written, tmp_path, monkeypatch):
    """Row chunks (here 4 rows of 64 at a time, several per tensor) on 2 threads write the bytes
    of the one-piece write."""
    monkeypatch.setattr(gguf_export, "CHUNK_FLOATS", 4 * 64)
    r = gguf_export.write_gguf(tiny_ck, tmp_path / "chunked.gguf", "q8_0", threads=2,
                               show_progress=False)
    with open(r["path"], "rb") as f, open(written["q8_0"]["path"], "rb") as g:
        assert f.read() == g.read()


def test_failed_write_leaves_nothing(tiny_ck, tmp_path, monkeypatch):
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match="--type"):
        gguf_export.write_gguf(tiny_ck, out, "q5_k", show_progress=False)
    calls = []
    real = gguf_export._SafetensorsRows.rows

    def failing(self, name, layer, r0, r1):  # a read error halfway through the tensors
        calls.append(name)
        if len(calls) > 5:
            raise OSError("disk read failed")
        return real(self, name, layer, r0, r1)

    monkeypatch.setattr(gguf_export._SafetensorsRows, "rows", failing)
    with pytest.raises(OSError, match="disk read failed"):
        gguf_export.write_gguf(tiny_ck, out, "q8_0", show_progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_cli_bad_input(tmp_path, capsys):
    rc = gguf_export.main(["write", str(tmp_path / "nope"), str(tmp_path / "o.gguf")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1
    assert not (tmp_path / "o.gguf").exists()


def test_llama_cpp_reads_the_same_model(tiny_ck, written):
    """Only where llama.cpp is installed (the optional bench extra): llama.cpp's logits on the F32
    export are the project's float reference (quant.float_forward) over 16 positions, which checks
    the layout (wq / wk pairs, GQA), rope_freqs and the norms as llama.cpp interprets them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from bakedllama.llama8b import quant

    ids = [384, 73, 116, 32, 119, 97, 115, 478, 480, 208, 158, 231, 453, 50, 28, 102]
    ref = np.asarray(quant.float_forward(tiny_ck, ids)).reshape(len(ids), -1)
    llm = llama_cpp.Llama(model_path=written["f32"]["path"], n_ctx=64, n_threads=1, verbose=False,
                          logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()
    assert np.array_equal(got.argmax(1), ref.argmax(1))
