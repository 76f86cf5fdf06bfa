"""Run the quantized model pass by pass: each pass holds one partition's weights.

The arithmetic is the golden model's, step for step (golden.attention_block / ffn_block /
classifier, cut at the points where a partition boundary can fall): every value comes from
bakedllama.numerics, and the only substitution is the matrix-vector product, done by
kernels.matvec_packed (tested equal to numerics.matvec) on row slices of the packed weights.
Rows of a product are independent, so a row split gives the same rows of the result; the
partitioned run is therefore identical to the unpartitioned one, and to golden.Golden.forward.

Streaming: the weights are memory-mapped from the quantized cache; after each pass its pages are
released (MADV_DONTNEED), so the resident weights are about one partition; the KV cache stays."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import numpy as np

from bakedllama import numerics as nx
from bakedllama import steps
from bakedllama.golden import Logits, attention_core, embed
from bakedllama.llama8b import fastglue, simd
from bakedllama.llama8b.kernels import matvec_packed, unpack
from bakedllama.llama8b.partition import Partition
from bakedllama.llama8b.quant import QuantModel


@dataclass
class RunState:
    key_cache: np.ndarray  # (n_layers, 1, seq_len, kv_dim) int8, frac e_k[layer]
    value_cache: np.ndarray  # (n_layers, 1, seq_len, kv_dim) int8, frac e_v[layer]
    pos: int = 0


@dataclass
class Step:
    """What flows between the passes of T consecutive positions of one sequence (T = 1 when
    decoding): the pass-to-pass activations, one row per position."""

    tokens: list
    last_only: bool = False  # the classifier for the last position only
    x: np.ndarray | None = None  # (T, dim) residual, int16 values, frac f_x
    a: np.ndarray | None = None  # (T, cols) int8 activations of the current matrix group
    ka: np.ndarray | None = None  # (T,) their quantization shift (numerics.quantize_act)
    q: np.ndarray | None = None
    k: np.ndarray | None = None
    v: np.ndarray | None = None
    h1: np.ndarray | None = None
    h3: np.ndarray | None = None
    out_a: np.ndarray | None = None  # quantized input of wo / w2 (computed at their first rows)
    out_k: np.ndarray | None = None  # its quantization shift
    logits: np.ndarray | None = None
    logit_frac: np.ndarray | None = None
    pass_seconds: list = field(default_factory=list)


# float32 sums of int8 x int8 products are exact while |sum| < 2^24: a group of G products is below
# G * 128 * 128, so groups up to this size take float32 BLAS (else float64, exact below 2^53)
F32_MAX_GROUP = (1 << 24) // (128 * 128) - 1
GROUPED_CACHE_BYTES = 1 << 30  # grouped float weights kept across batched passes


def grouped(q: np.ndarray, m: np.ndarray, group: int):
    """(qg, m): q as (groups, rows, group) floats for batched products, m as int64 (rows, groups)."""
    rows, cols = q.shape
    dt = np.float32 if group <= F32_MAX_GROUP else np.float64
    qg = np.ascontiguousarray(q.reshape(rows, cols // group, group).transpose(1, 0, 2), dtype=dt)
    return qg, m.astype(np.int64)


def matmul_rows(p, a, r0: int, r1: int, unpacked=None) -> np.ndarray:
    """Accumulators of rows [r0, r1) of a packed matrix for T activation rows: (T, r1 - r0).
    T = 1 runs the packed kernel; T > 1 (a prompt, or a speculative pass) multiplies the whole
    block at once: on simd.c's integer kernel straight from the packed layout (each weight
    decoded once for all T rows), or else one BLAS matrix-matrix product per weight group on the
    grouped weights (`grouped`; every partial sum exact), then the group multipliers in int64.
    Either way the same integers as numerics.matvec."""
    if len(a) == 1:
        return matvec_packed(p, a[0], r0, r1)[None]
    if unpacked is None and simd.supports(p):
        import numba

        return simd.matmat(p, a, r0, r1, numba.get_num_threads())
    qg, m = unpacked if unpacked is not None else grouped(*unpack(p), p.group)
    a = np.asarray(a)
    T, ng = a.shape[0], qg.shape[0]
    ag = a.reshape(T, ng, p.group).transpose(1, 2, 0).astype(qg.dtype)  # (groups, group, T)
    partial = np.matmul(qg[:, r0:r1], ag).astype(np.int64)  # (groups, rows, T), exact
    return np.einsum("grt,rg->tr", partial, m[r0:r1])


def linear_rows(p, a, k, rq: steps.Requant, r0: int, r1: int, unpacked=None):
    """golden.linear_q on rows [r0, r1) of a packed matrix (T rows of activations, quantization
    shift k each; rq: the matrix's step, which carries its shift)."""
    return fastglue.requantize(matmul_rows(p, a, r0, r1, unpacked), rq.shift(k), rq.bits)


def residual_rows(x: np.ndarray, p, a, k, rq: steps.Requant, r0: int, r1: int, unpacked=None):
    """x[:, r0:r1] := saturate(x[:, r0:r1] + linear_rows(...), 16), in place (golden's residual
    add of wo / w2)."""
    xs = np.ascontiguousarray(x[:, r0:r1])
    fastglue.residual_add(xs, matmul_rows(p, a, r0, r1, unpacked), rq.shift(k), rq.bits)
    x[:, r0:r1] = xs



def check_tokens(c, pos: int, tokens) -> list[int]:
    """The tokens of a pass at position `pos` as ints; ValueError if none, past the context or
    outside the vocabulary (the in-process and the Ray runner check the same)."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("no tokens")
    if pos + len(tokens) > c.seq_len:
        raise ValueError(f"position {pos + len(tokens) - 1} is past the context length {c.seq_len}")
    for t in tokens:
        if not 0 <= t < c.vocab_size:
            raise ValueError(f"token {t} is outside the vocabulary of {c.vocab_size}")
    return tokens

class Runner:
    def __init__(self, qm: QuantModel, parts: list[Partition], streaming: bool = True):
        self.qm, self.parts, self.streaming = qm, parts, streaming
        c = qm.cfg
        self.cfg, self.fmt = c, qm.fmt
        shifts = {key: int(p.shift) for key, p in qm.mats.items()}
        shifts[("tok_embeddings", None)] = int(qm.embed.shift)
        self.steps = steps.make_steps(c, qm.fmt, shifts)  # every shift of the pass
        inv = nx.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        self.rope_cos, self.rope_sin = nx.rope_table(np.arange(c.seq_len), inv)
        self._unpacked_cache: dict = {}
        self._cache_bytes = 0

    def new_state(self) -> RunState:
        c = self.cfg
        shape = (c.n_layers, 1, c.seq_len, c.kv_dim)
        return RunState(np.zeros(shape, np.int8), np.zeros(shape, np.int8))

    # ------------------------------------------------------------------ one position
    def forward(self, s: RunState, token: int) -> Logits:
        """One position: token -> classifier logits, running every partition in turn."""
        return self.forward_many(s, [token])

    def forward_many(self, s: RunState, tokens, last_only: bool = False) -> Logits:
        """T consecutive positions in one pass over the weights (matrix-matrix products; the
        attention runs position by position): logits (T, vocab), identical to T calls of
        forward(); with last_only the classifier runs for the last position only (a prompt's
        prefill needs no other): logits (1, vocab). Where the packed layout has no simd kernel,
        unpacked weights are kept for the batched products (resident runs only)."""
        c = self.cfg
        tokens = check_tokens(c, s.pos, tokens)
        st = Step(tokens, last_only=last_only)
        for part in self.parts:
            t = time.perf_counter()
            for pc in part.pieces:
                self._piece(s, st, pc)
            if self.streaming:
                self._release(part)
            st.pass_seconds.append(time.perf_counter() - t)
        s.pos += len(tokens)
        self.last_pass_seconds = st.pass_seconds
        return Logits(st.logits, st.logit_frac)

    def _release(self, part: Partition) -> None:
        qm = self.qm
        for pc in part.pieces:
            if pc.name == "tok_embeddings":
                continue  # only one row was read
            if pc.name.startswith("rms_"):
                continue  # a few KiB
            p = qm.mats[(pc.name, pc.layer)]
            rb0, rb1 = p.block_range(pc.r0, pc.r1)
            for arr in [*p.planes, p.m]:
                per = arr.nbytes // arr.shape[0]
                qm.release(arr, rb0 * per, rb1 * per)

    def _piece(self, s: RunState, st: Step, pc) -> None:
        c, qm, n, l, sp = self.cfg, self.qm, pc.name, pc.layer, self.steps
        ls = sp.layers[l] if l is not None else None
        T = len(st.tokens)
        if n == "tok_embeddings":
            if pc.r0 == 0:  # (T, dim) frac f_x
                st.x = np.zeros((T, c.dim), np.int64)
            tk = np.asarray(st.tokens)
            here = (tk >= pc.r0) & (tk < pc.r1)
            if here.any():
                st.x[here] = embed(qm.embed, tk[here], sp.f_x)
            return
        if n in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight"):
            xb = nx.rmsnorm(st.x, qm.norms[(n, l)], sp.norm(n, l))
            st.a, st.ka = fastglue.quantize_act(xb)
            st.out_a = None
            if n == "rms_att_weight":
                st.q = np.zeros((T, c.dim), np.int64)
                st.k = np.zeros((T, c.kv_dim), np.int64)
                st.v = np.zeros((T, c.kv_dim), np.int64)
            elif n == "rms_ffn_weight":
                st.h1 = np.zeros((T, c.hidden_dim), np.int64)
                st.h3 = np.zeros((T, c.hidden_dim), np.int64)
            else:
                if st.last_only:
                    st.a, st.ka = st.a[-1:], st.ka[-1:]
                st.logits = np.zeros((len(st.a), c.vocab_size), np.int64)
            return
        p = qm.mats[(n, l)]
        r0, r1 = pc.r0, pc.r1
        u = self._unpacked(n, l, p) if T > 1 and not simd.supports(p) else None
        if n in ("wq", "wk"):
            (st.q if n == "wq" else st.k)[:, r0:r1] = linear_rows(p, st.a, st.ka, getattr(ls, n),
                                                                  r0, r1, u)
        elif n == "wv":
            st.v[:, r0:r1] = linear_rows(p, st.a, st.ka, ls.wv, r0, r1, u)
        elif n in ("w1", "w3"):
            (st.h1 if n == "w1" else st.h3)[:, r0:r1] = linear_rows(p, st.a, st.ka, getattr(ls, n),
                                                                    r0, r1, u)
        elif n == "wo":
            if st.out_a is None:  # all of q, k, v are there: the attention itself (no weights)
                st.out_a, st.out_k = fastglue.quantize_act(self._attention(s, st, l))
            st.x = st.x.copy() if r0 == 0 else st.x
            residual_rows(st.x, p, st.out_a, st.out_k, ls.wo, r0, r1, u)
        elif n == "w2":
            if st.out_a is None:
                st.out_a, st.out_k = fastglue.swiglu_act(st.h1, st.h3, ls.swiglu)
            st.x = st.x.copy() if r0 == 0 else st.x
            residual_rows(st.x, p, st.out_a, st.out_k, ls.w2, r0, r1, u)
        elif n == "wcls":
            st.logits[:, r0:r1] = matmul_rows(p, st.a, r0, r1, u)
            st.logit_frac = sp.cls.acc_frac(st.ka)
        else:
            raise ValueError(f"unknown piece {n}")

    def _unpacked(self, n: str, l, p):
        """The grouped weights of a matrix (`grouped`), kept for batched passes (not while
        streaming)."""
        key = (n, l)
        if key in self._unpacked_cache:
            return self._unpacked_cache[key]
        g = grouped(*unpack(p), p.group)
        size = g[0].nbytes + g[1].nbytes
        # kept while they fit a budget (a small target: all of it; the 8B: the first few, the rest
        # re-made per pass, one matrix at a time)
        if not self.streaming and self._cache_bytes + size <= GROUPED_CACHE_BYTES:
            self._unpacked_cache[key] = g
            self._cache_bytes += size
        return g

    def _attention(self, s: RunState, st: Step, l: int):
        """golden.attention_core between the qkv projections and wo, for the T positions of the
        pass at once (consecutive: each query over the positions up to its own)."""
        c = self.cfg
        T, p0 = len(st.tokens), s.pos
        return attention_core(c, self.steps.layers[l], st.q.reshape(T, c.n_heads, c.head_dim),
                              st.k.reshape(T, c.n_kv_heads, c.head_dim), st.v, s.key_cache[l],
                              s.value_cache[l], p0, self.rope_cos[p0:p0 + T],
                              self.rope_sin[p0:p0 + T], consecutive=True)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


PREFILL_CHUNK = 64  # prompt positions per batched pass (the kernels' token tile)


def generate(r: Runner, prompt_ids: list[int], max_tokens: int, stop_ids=(),
             keep_logits: bool = False, prefill_chunk: int = PREFILL_CHUNK) -> dict:
    """Greedy generation (argmax, lowest index on ties): the prompt in batched passes of up to
    prefill_chunk positions (Runner.forward_many: identical to one position at a time;
    prefill_chunk=1 runs it so), then decode. Returns tokens, per-step seconds (prefill: each
    position gets its pass's time / positions) and optionally the logits of every position."""
    if not prompt_ids:
        raise ValueError("empty prompt")
    if len(prompt_ids) + max_tokens > r.cfg.seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + {max_tokens} new tokens exceeds the "
                         f"context of {r.cfg.seq_len}")
    if prefill_chunk < 1:
        raise ValueError("prefill_chunk must be at least 1")
    s = r.new_state()
    out = dict(tokens=[], prefill_seconds=[], decode_seconds=[], logits=[], pass_seconds=[])
    logits = None
    for i in range(0, len(prompt_ids), prefill_chunk):
        chunk = prompt_ids[i:i + prefill_chunk]
        t0 = time.perf_counter()
        lg = r.forward_many(s, chunk, last_only=not keep_logits)
        out["prefill_seconds"] += [(time.perf_counter() - t0) / len(chunk)] * len(chunk)
        if keep_logits:
            out["logits"] += [Logits(lg.acc[j:j + 1], lg.frac[j:j + 1]) for j in range(len(chunk))]
        logits = Logits(lg.acc[-1:], lg.frac[-1:])
    for _ in range(max_tokens):
        tok = int(nx.argmax(logits.acc)[0])
        out["tokens"].append(tok)
        if tok in stop_ids or len(out["tokens"]) == max_tokens:
            break
        t0 = time.perf_counter()
        logits = r.forward(s, tok)
        out["decode_seconds"].append(time.perf_counter() - t0)
        out["pass_seconds"].append(list(r.last_pass_seconds))
        if keep_logits:
            out["logits"].append(logits)
    return out
