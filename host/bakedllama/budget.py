"""Block-RAM budget of a baked model on an ECP5 (DP16KD: 16 Kbit of data each at x1..x16 widths).

This is the planning estimate written down for the board; the gateware compiler reports the real
bank layout (lanes-wide banks can round each matrix up)."""

from __future__ import annotations

import math

from bakedllama import numerics as nx
from bakedllama.model import BakedModel

DP16KD_BITS = 16 * 1024
ULX3S_85F_DP16KD = 208
# SoC: VexRiscv "minimal" (register file in 1 block), 16 KiB ROM (firmware), 8 KiB SRAM, UART FIFOs
SOC_BLOCKS = {"cpu register file": 1, "ROM 16 KiB": 8, "SRAM 8 KiB": 4, "UART FIFOs": 2}


def blocks(bits: int) -> int:
    return math.ceil(bits / DP16KD_BITS)


def bram_budget(m: BakedModel) -> list[tuple[str, int, int]]:
    """Rows of (item, bits, DP16KD blocks)."""
    c = m.cfg
    rows = []
    for name, w in m.weights.items():
        rows.append((f"{name} ({w.bits}-bit, group {w.group})", w.storage_bits(),
                     blocks(w.storage_bits())))
    norm_bits = sum(v.size * 16 for v in m.norms.values())
    rows.append(("RMSNorm gains (int16)", norm_bits, blocks(norm_bits)))
    kv = 2 * c.n_layers * c.seq_len * c.kv_dim * 8
    rows.append((f"KV cache ({c.seq_len} positions, int8)", kv, blocks(kv)))
    tables = 16 * (len(nx.RSQRT_TABLE) + len(nx.EXP_HI) + len(nx.EXP_LO) + len(nx.SIGMOID_TABLE)
                   + c.seq_len * c.head_dim)  # rope: cos + sin, seq_len x hd/2 each
    rows.append(("tables (rsqrt, exp, sigmoid, RoPE)", tables, blocks(tables)))
    for k, n in SOC_BLOCKS.items():
        rows.append((f"SoC: {k}", n * DP16KD_BITS, n))
    return rows


def format_budget(m: BakedModel) -> str:
    rows = bram_budget(m)
    total = sum(r[2] for r in rows)
    w = max(len(r[0]) for r in rows)
    lines = [f"{'item':<{w}}  {'Kbit':>8}  {'DP16KD':>6}"]
    lines += [f"{r[0]:<{w}}  {r[1] / 1024:>8.1f}  {r[2]:>6}" for r in rows]
    lines.append(f"{'total':<{w}}  {sum(r[1] for r in rows) / 1024:>8.1f}  {total:>6}  "
                 f"of {ULX3S_85F_DP16KD} on the LFE5U-85F ({100 * total / ULX3S_85F_DP16KD:.0f}%)")
    return "\n".join(lines)
