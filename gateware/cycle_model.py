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

# pipeline constants of the units (see the comments at each use)
NORM_WAIT = 6  # RMSNorm: after the sum-of-squares pass, until 1/sqrt is ready (pass 2 follows pass 1)
NORM_LAT = 5  # RMSNorm: input beat -> output beat registers
MV_LAT = 6  # MatVec: issue -> ROM -> word/act regs -> products -> (tree) -> group -> m* -> FIFO
POST_LAT = {"qkv": 2, "wo": 0, "w13": 4, "w2": 0, "cls": 1}  # RowPost: RoPE 2, SwiGLU 4, Argmax 1
EXP_LAT = 4  # Softmax: d register + ExpNeg's 3


def tree_latency(n: int, regs_every: int = 2) -> int:
    """Registers in hw.adder_tree over n inputs."""
    levels = math.ceil(math.log2(n)) if n > 1 else 0
    return levels // regs_every


def _geometry(cfg, lanes, scheme, vlanes, kv_par, formats):
    formats = formats or compiler.matrix_formats(cfg, None, scheme)
    geo = compiler.make_geometry(cfg, lanes, formats, vlanes, kv_par)
    banks, place = compiler.build_banks(cfg, geo, formats, None)
    return formats, geo, banks, place


def breakdown(cfg: ModelConfig, lanes: int, pos: int, scheme: str = "w4e8",
              vlanes: int | None = None, kv_par: int | None = None, formats: dict | None = None,
              with_sampling: bool = True, sampled: int | None = None) -> dict:
    """Cycles per step of the forward pass at position `pos` (0-based).

    sampled: the token drawn when the pass samples (temperature != 0); None for greedy."""
    c = cfg
    formats, geo, banks, place = _geometry(c, lanes, scheme, vlanes, kv_par, formats)
    D, H, P, Q = c.dim, c.hidden_dim, geo.vlanes, geo.post
    tl_mv = tree_latency(geo.cols)
    out = {}

    def mv(key):
        p = place[key]
        b = banks[p.bank]
        words = p.chunks * p.rowgroups
        # the output repacker emits Rb/Q beats per row group; if that outruns the issue rate
        # the FIFO credit throttles issuing to one row group per Rb/Q cycles
        beats_per_rg = max(1, b.rows_per_word // Q)
        issue = max(words, p.rowgroups * beats_per_rg)
        kind, _ = compiler.split_key(key)
        return issue + 2 + MV_LAT + tl_mv + (beats_per_rg - 1) + POST_LAT[kind]

    hd = c.head_dim
    NG = c.n_kv_heads // geo.kv_par
    q_bits = nx.ATT_RECIP_BITS - int(math.log2(nx.EXP_ONE)) + 1
    q_iters = (q_bits + 1) // 2  # the divider makes two quotient bits per cycle
    lat_s = 3 + tree_latency(hd)
    norm = 3 * (D // P) + NORM_WAIT + NORM_LAT + 1
    pe = place["emb"]
    embed = max(pe.chunks + 3 + D // P, hd // 2 + 1)
    # per KV group: pass 1 (pos+1 issues) + drain into the score buffer (lat_s) + pass 2 (pos+1) +
    # buffer read, exp, divider; then two passes over the output vector
    group = 1 + 2 * (pos + 1) + lat_s + 1 + EXP_LAT + 1 + q_iters + 2
    attn = NG + 8 + NG * group + 2 * (D // P)
    for step in compiler.make_schedule(c, with_sampling):
        k = step.kind
        if k == "embed":
            cyc = embed
        elif k == "norm":
            cyc = norm
        elif k == "mv":
            cyc = mv(step.arg)
        elif k == "qemit":
            cyc = D // P
        elif k == "attn":
            cyc = attn
        elif k == "hemit":  # ActQuant: 1 cycle for the shift, 1 to load its output register
            cyc = H // P + 2
        elif k == "sample":
            # greedy: the argmax result is already there; sampling: a max pass and a sum pass
            # over the vocabulary (V issues + 3 to drain each), then the search up to the token
            cyc = 1 if sampled is None else 2 * c.vocab_size + 44 + sampled  # + 33: the draw
        else:  # out: its state + the first cycle of the output (counted by `cycles`)
            cyc = 2
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
