"""Analytic cycle model: expected clock cycles of one forward pass (sink accept -> source valid).

    expected_cycles(cfg, lanes, pos)      -> int
    breakdown(cfg, lanes, pos)            -> {step name: cycles}
    device_bounds(cfg, scheme)            -> weight-bandwidth and multiplier bounds (ECP5-85F)

It sums the compiler's schedule (compiler.make_schedule) with one formula per step, written from
the units' pipelines (latencies named after the registers they count). Pure Python: the 8B
projection imports it without Migen. The Verilator tests compare it with the hardware counter.
"""

from __future__ import annotations

import math

from bakedllama import numerics as nx
from bakedllama.config import ModelConfig

from gateware import compiler
from gateware import latency as lat

# pipeline constants of the units: defined once in gateware/latency.py, which the units build from
NORM_WAIT = lat.NORM_WAIT
NORM_LAT = lat.NORM_LAT
MV_LAT = lat.MV_LAT
POST_LAT = lat.POST
EXP_LAT = lat.SOFTMAX_EXP


tree_latency = lat.tree_latency


def _geometry(cfg, lanes, scheme, vlanes, kv_par, formats, dsp_pairs=None):
    formats = formats or compiler.matrix_formats(cfg, None, scheme)
    geo = compiler.make_geometry(cfg, lanes, formats, vlanes, kv_par, dsp_pairs)
    banks, place = compiler.build_banks(cfg, geo, formats, None)
    return formats, geo, banks, place


# One formula per step of the schedule. They take plain numbers (no geometry objects) so that the
# 8B projection (bakedllama.llama8b.projection) prices its partitions with the same formulas.

def mv_cycles(words: int, rowgroups: int, beats_per_rg: int, cols: int, kind: str,
              dsp_pairs: int = 0) -> int:
    """A matrix-vector pass: `words` ROM words issued over `rowgroups` row groups of `cols`
    columns per cycle. The output repacker emits beats_per_rg beats per row group; if that
    outruns the issue rate the FIFO credit throttles issuing to one row group per beats_per_rg
    cycles. Then the pipeline drains (MV_LAT, adder tree, the DSP product register if any slots
    use packed DSP pairs, post-processing)."""
    issue = max(words, rowgroups * beats_per_rg)
    return (issue + 2 + MV_LAT + tree_latency(cols) + (lat.MV_DSP if dsp_pairs else 0)
            + (beats_per_rg - 1) + lat.ROWPOST_IN + POST_LAT[kind])


def norm_cycles(dim: int, vlanes: int) -> int:
    """RMSNorm: sum of squares, wait for 1/sqrt, scale and quantize (three passes of dim/vlanes)."""
    return 3 * (dim // vlanes) + NORM_WAIT + lat.NORM_GAP + NORM_LAT + 1


def attn_cycles(pos: int, n_groups: int, head_dim: int, dim: int, vlanes: int) -> int:
    """Attention at position `pos`: n_groups KV groups in n_groups + 1 overlapped phases."""
    q_bits = nx.ATT_RECIP_BITS - int(math.log2(nx.EXP_ONE)) + 1
    q_iters = (q_bits + 1) // 2  # the divider makes two quotient bits per cycle
    lat_s = lat.ATT_SCORE + tree_latency(head_dim)
    # after a phase's pos + 1 issues: the score stage drains into the buffer and the max (lat_s);
    # the value stage's reciprocals come after the buffer read, exp, the sums and the divider
    recip_wait = 1 + EXP_LAT + 1 + q_iters + 2
    phases = 0
    for k in range(n_groups + 1):
        wait = max(lat_s if k < n_groups else 0, recip_wait if k > 0 else 0)
        phases += 1 + (pos + 1) + wait
    return (n_groups + 8 + 2 * lat.ATT_OUT_REGS + lat.ATT_MAX_REGS + lat.ATT_EMIT_REGS + phases
            + 2 * (dim // vlanes))


def embed_cycles(chunks: int, dim: int, vlanes: int, head_dim: int) -> int:
    return max(chunks + 2 + lat.ROM_ADR + lat.EMBED_RAW + lat.EMBED_MUX + dim // vlanes,
               head_dim // 2 + 1)


def qemit_cycles(dim: int, vlanes: int) -> int:
    """q is quantized while the k, v rows are still computed: its emission pipeline (ActQuant's
    lat.ACTQ_EMIT) is full by the time the attention takes it, one beat per cycle."""
    return dim // vlanes


def hemit_cycles(hidden_dim: int, vlanes: int) -> int:
    """ActQuant of the FFN hidden vector: 1 cycle for the shift, 1 to load its output register."""
    return hidden_dim // vlanes + 2 + lat.ACTQ_EMIT


def sample_cycles(vocab_size: int, sampled: int | None) -> int:
    """Greedy: the argmax result is already there; sampling: a max pass and a sum pass over the
    vocabulary (V issues each, then the lat.SAMPLER stages drain), the draw (33), then the search
    up to the token (its stages once more)."""
    return 1 if sampled is None else 2 * vocab_size + 38 + 3 * lat.SAMPLER + sampled


OUT_CYCLES = 2  # out: its state + the first cycle of the output (counted by `cycles`)


def breakdown(cfg: ModelConfig, lanes: int, pos: int, scheme: str = "w4e8",
              vlanes: int | None = None, kv_par: int | None = None, formats: dict | None = None,
              with_sampling: bool = True, sampled: int | None = None,
              dsp_pairs: int | None = None) -> dict:
    """Cycles per step of the forward pass at position `pos` (0-based).

    sampled: the token drawn when the pass samples (temperature != 0); None for greedy."""
    c = cfg
    formats, geo, banks, place = _geometry(c, lanes, scheme, vlanes, kv_par, formats, dsp_pairs)
    D, H, P, Q = c.dim, geo.hidden, geo.vlanes, geo.post  # hidden as padded to the tile
    out = {}

    def mv(key):
        p = place[key]
        b = banks[p.bank]
        kind, _ = compiler.split_key(key)
        return mv_cycles(p.chunks * p.rowgroups, p.rowgroups, max(1, b.rows_per_word // Q), geo.cols, kind,
                         geo.dsp_pairs)

    for step in compiler.make_schedule(c, with_sampling):
        k = step.kind
        if k == "embed":
            cyc = embed_cycles(place["emb"].chunks, D, P, c.head_dim)
        elif k == "norm":
            cyc = norm_cycles(D, P)
        elif k == "mv":
            cyc = mv(step.arg)
        elif k == "qemit":
            cyc = qemit_cycles(D, P)
        elif k == "attn":
            cyc = attn_cycles(pos, c.n_kv_heads // geo.kv_par, c.head_dim, D, P)
        elif k == "hemit":
            cyc = hemit_cycles(H, P)
        elif k == "sample":
            cyc = sample_cycles(c.vocab_size, sampled)
        else:
            cyc = OUT_CYCLES
        name = f"{k}{'' if step.layer < 0 else step.layer}{':' + step.arg if step.arg else ''}"
        out[name] = cyc
    return out


def expected_cycles(cfg: ModelConfig, lanes: int, pos: int, **kw) -> int:
    """Clock cycles of the forward pass at position `pos` (greedy), as the `cycles` CSR counts."""
    return sum(breakdown(cfg, lanes, pos, **kw).values())


def device_bounds(cfg: ModelConfig, scheme: str = "w4e8", formats: dict | None = None,
                  brams: int = 208, bram_bits_per_cycle: int = 36, multipliers: int = 156) -> dict:
    """Lower bounds on cycles per token for the LFE5U-85F: every weight bit must leave a block RAM
    (208 x 36 bits per cycle = 7,488) and every weight needs a multiply (156 MULT18X18D)."""
    formats = formats or compiler.matrix_formats(cfg, None, scheme)
    bits = compiler.weights_bits(cfg, formats)
    weights_used = sum(r * k for key, r, k, _ in compiler.virtual_matrices(cfg) if key != "emb")
    return dict(weight_bits=bits, bram_bound=bits / (brams * bram_bits_per_cycle),
                weights_per_token=weights_used, mult_bound=weights_used / multipliers)
