"""Performance projection for the partitioned model on real chips, priced with the accelerator's
own cycle model (gateware/cycle_model.py: the formulas the Verilator tests check against the
hardware cycle counter on the tiny model).

A chip is the gateware's engine at some size: `lanes` weight x activation products per cycle
(tiles of `cols` columns x lanes/cols rows), `vlanes` elements per cycle in the vector units
(norms, quantizer, attention output), `post` matrix-vector results per cycle through the row
post-processing (RoPE, SwiGLU, argmax), `kv_par` KV heads per attention pass. Each number in a
ChipSpec is a datasheet fact, a measurement, or an assumption, and says which.

Cycles of one pass (one partition on one chip): for each piece (rows r0..r1 of one matrix),
cycle_model.mv_cycles with the piece's ROM words and row groups; cycle_model.norm_cycles for each
RMSNorm; the layer's qemit + attention (cycle_model.attn_cycles at the context position) before
its wo, the hidden-vector quantizer (hemit) before its w2, the embedding lookup, and the argmax
after the head; plus HANDOFF: streaming the residual in from the previous chip (dim / vlanes).
Tokens per second for one user (one sequence, decode):
  resident (chips >= the R needed to hold every partition, consecutive partitions sharing a
     chip while they fit): a token flows through all passes in turn:
     t = sum(compute) + sum over chip boundaries of (live bytes / link + link latency)
     (live bytes: the int16 residual plus the layer's partial results in flight, `live_bytes`)
  reloaded (chips < R): chip j runs passes j, j+N, ...; before each pass it loads that
     partition's weights (load_bytes_per_s); loads overlap other chips' compute:
     t = max(sum(compute) + every hop, sum(load + compute) / N)   (N = 1: sum(load + compute))
Throughput with many users in flight (a full pipeline) is 1 / the slowest chip's time per token."""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bakedllama.bake import scheme_format
from bakedllama.config import ModelConfig
from bakedllama.llama8b.partition import HC1_BYTES, ULX3S_85F_BYTES, Partition, plan

TAALAS_HC1_TOKENS_PER_S = 17000  # published per-user figure for Llama 3.1 8B (Taalas, 2025)


def cycle_model():
    """gateware.cycle_model (pure Python, no Migen); the repository root holds the gateware."""
    repo = str(Path(__file__).resolve().parents[3])
    if repo not in sys.path:
        sys.path.insert(0, repo)
    from gateware import cycle_model as cm

    return cm


@dataclass(frozen=True)
class ChipSpec:
    name: str
    mem_bytes: int  # on-chip bytes for weights
    lanes: int  # weight x activation products per cycle (the gateware's `lanes`)
    vlanes: int  # elements per cycle in the vector units (the gateware's `vlanes`)
    post: int  # matrix-vector results per cycle through RoPE / SwiGLU / argmax (`post`)
    kv_par: int  # KV heads per attention pass (`kv_par`)
    clock_hz: float
    link_bytes_per_s: float  # activations between chips
    link_latency_s: float
    load_bytes_per_s: float  # weights into a chip (the reloaded mode)
    notes: str
    dsp_pairs: int = 0  # matrix row-slot pairs on packed DSP multipliers (the gateware's `dsp_pairs`)


ULX3S = ChipSpec(
    "ULX3S 85F", ULX3S_85F_BYTES, 64, 8, 2, 1, 45e6, 50e6, 2e-6, 3e6 / 10,
    "fact: LFE5U-85F, 208 DP16KD; the engine is the ULX3S build of gateware/ (soc/common.py: "
    "lanes 64 on one packed-DSP slot pair, vlanes 8, post 2, kv_par 1) at the SoC's 45 MHz "
    "system clock (nextpnr Fmax: README); assumptions: all BRAM for weights, 50 MB/s "
    "board-to-board link (8 GPIO pins at ~50 MHz), reload through the FT231X UART at 3 Mbaud "
    "(0.3 MB/s)", 1)
HC1 = ChipSpec(
    "HC1-like", HC1_BYTES, 1 << 17, 256, 128, 8, 1e9, 64e9, 1e-6, 100e9,
    "assumptions (not Taalas data): on-chip weight storage sized to hold the 3/6-bit 8B with its "
    "multipliers (~4.7 GB); the gateware's engine scaled up: 2^17 lanes (hardwired "
    "constant-coefficient multipliers are cheap; 53 B transistors on TSMC N6), vlanes 256, post "
    "128, all 8 KV heads per attention pass, 1 GHz; PCIe-5 x16-class link (64 GB/s, 1 us); a "
    "reloadable variant loading at 100 GB/s (Taalas' chip is hardwired: it never reloads)")
CHIP_SPECS = {"ulx3s": ULX3S, "hc1": HC1}
HANDOFF = "residual in from the previous chip: dim / vlanes cycles"


def scheme_fmt(cfg: ModelConfig, scheme: str) -> dict:
    """Weight formats of a scheme without quantizing anything (for planning and projection)."""
    cols = dict(tok_embeddings=cfg.dim, wcls=cfg.dim, wq=cfg.dim, wk=cfg.dim, wv=cfg.dim,
                wo=cfg.dim, w1=cfg.dim, w3=cfg.dim, w2=cfg.hidden_dim)
    return dict(weights={n: dict(zip(("bits", "group"), scheme_format(scheme, n, c)))
                         for n, c in cols.items()})


def live_bytes(cfg: ModelConfig, part: Partition) -> int:
    """Bytes handed to the next chip after this pass: the int16 residual plus whatever partial
    results of the current layer are in flight (q/k/v, or the FFN's hidden vectors)."""
    last = part.pieces[-1].name
    d, kv, h = cfg.dim, cfg.kv_dim, cfg.hidden_dim
    extra = {"rms_att_weight": d, "wq": 2 * d, "wk": 2 * (d + kv), "wv": 2 * (d + 2 * kv),
             "wo": d, "rms_ffn_weight": d, "w1": 2 * h, "w3": 4 * h, "w2": h}.get(last, 0)
    return 2 * d + extra


# which post-processing a matrix's rows go through (gateware.cycle_model.POST_LAT keys)
_KIND = dict(wq="qkv", wk="qkv", wv="qkv", wo="wo", w1="w13", w3="w13", w2="w2", wcls="cls")


def _tile_cols(chip: ChipSpec, fmt: dict) -> int:
    """Columns per cycle: the largest power of two <= lanes dividing every group (as the gateware)."""
    groups = {w["group"] for w in fmt["weights"].values()}
    c = chip.lanes
    while c > 1 and any(g % c for g in groups):
        c //= 2
    return c


def pass_cycles(cfg: ModelConfig, fmt: dict, part: Partition, chip: ChipSpec, context: int) -> int:
    """Clock cycles of one pass, from the gateware's per-step formulas (see the module text)."""
    cm = cycle_model()
    C = _tile_cols(chip, fmt)
    R = max(1, chip.lanes // C)
    P = chip.vlanes
    cyc = cfg.dim // P  # HANDOFF
    for pc in part.pieces:
        n = pc.name
        if n in ("rms_att_weight", "rms_ffn_weight", "rms_final_weight"):
            cyc += cm.norm_cycles(cfg.dim, P)
            continue
        cols = cfg.hidden_dim if n == "w2" else cfg.dim
        if n == "tok_embeddings":
            cyc += cm.embed_cycles(math.ceil(cols / C), cfg.dim, P, cfg.head_dim)
            continue
        if n == "wo" and pc.r0 == 0:  # the layer's q emit and attention run before its wo
            cyc += cm.qemit_cycles(cfg.dim, P)
            cyc += cm.attn_cycles(context - 1, math.ceil(cfg.n_kv_heads / chip.kv_par), cfg.head_dim,
                                  cfg.dim, P)
        if n == "w2" and pc.r0 == 0:  # the hidden vector is quantized before w2
            cyc += cm.hemit_cycles(cfg.hidden_dim, P)
        # a weight wider than the lane multipliers (the narrowest format) keeps one row slot: its
        # high bits sit in the word's extension fields (gateware.compiler.Bank.ext_bits)
        rows_per_word = R
        rowgroups = math.ceil(pc.rows / rows_per_word)
        cyc += cm.mv_cycles(rowgroups * math.ceil(cols / C), rowgroups,
                            max(1, rows_per_word // chip.post), C, _KIND[n], chip.dsp_pairs)
        if n == "wcls" and pc.r1 == cfg.vocab_size:
            cyc += cm.sample_cycles(cfg.vocab_size, None) + cm.OUT_CYCLES
    return cyc


_PLANS: dict = {}


def _plan(cfg: ModelConfig, fmt: dict, mem_bytes: int) -> list[Partition]:
    key = (repr(cfg), repr(fmt.get("weights")), mem_bytes)
    if key not in _PLANS:
        _PLANS.clear()  # keep one (a ULX3S plan of the 8B has ~20k partitions)
        _PLANS[key] = plan(cfg, fmt, mem_bytes)
    return _PLANS[key]


def project(cfg: ModelConfig, fmt: dict, chip: ChipSpec, n_chips: list[int],
            context: int = 512, parts: list[Partition] | None = None) -> dict:
    """Tokens/s for each chip count, plus the partition facts."""
    parts = parts if parts is not None else _plan(cfg, fmt, chip.mem_bytes)
    P = len(parts)
    comp = [pass_cycles(cfg, fmt, p, chip, context) / chip.clock_hz for p in parts]
    load = [p.nbytes / chip.load_bytes_per_s for p in parts]
    hops = [live_bytes(cfg, p) / chip.link_bytes_per_s + chip.link_latency_s for p in parts[:-1]]
    R = chips_to_hold(parts, chip.mem_bytes)
    rows = []
    for n in n_chips:
        if n >= R:  # resident: consecutive partitions spread over min(n, P) chips
            used = min(n, P)
            per_chip = [0.0] * used
            for i, c in enumerate(comp):
                per_chip[i * used // P] += c
            cut = [hops[i] for i in range(P - 1) if i * used // P != (i + 1) * used // P]
            t, mode = sum(comp) + sum(cut), "resident"
            thr = 1.0 / max(max(per_chip), max(cut, default=0.0))
        else:
            serial = sum(comp) + (sum(hops) if n > 1 else 0.0)  # round robin: every pass hops
            work = sum(l + c for l, c in zip(load, comp))
            t, mode = (work if n == 1 else max(serial, work / n)), "reloaded"
            thr = n / work
        rows.append(dict(chips=n, mode=mode, tokens_per_s=1.0 / t, seconds_per_token=t,
                         pipelined_tokens_per_s=max(thr, 1.0 / t)))
    return dict(chip=asdict(chip), partitions=P, chips_to_hold=R,
                weight_bytes=sum(p.nbytes for p in parts),
                compute_seconds_per_token=sum(comp), context=context, rows=rows)


def chips_to_hold(parts: list[Partition], mem_bytes: int) -> int:
    """Chips needed to keep every partition resident (consecutive partitions share a chip)."""
    n, used = 1, 0
    for p in parts:
        if used and used + p.nbytes > mem_bytes:
            n, used = n + 1, 0
        used += p.nbytes
    return n


def chip_counts(P: int) -> list[int]:
    out = sorted({1, 2, 4, 8, 16, 64, 256, 1024, 4096, 16384, P, 2 * P} | {2 ** k for k in range(
        int(math.log2(max(P, 1))) + 2)})
    return [n for n in out if n <= 2 * P]


def table(cfg: ModelConfig, schemes=("w8", "w3/6"), chips=(HC1, ULX3S), context: int = 512):
    """Projection rows for the report: per chip and scheme, N = 1 (reloaded), a few N, N = P."""
    out = []
    for chip in chips:
        for scheme in schemes:
            pr = project(cfg, scheme_fmt(cfg, scheme), chip, [], context)
            P, R = pr["partitions"], pr["chips_to_hold"]
            ns = sorted({1, min(8, R), R, P})
            pr = project(cfg, scheme_fmt(cfg, scheme), chip, ns, context)
            for r in pr["rows"]:
                out.append(dict(chip=chip.name, scheme=scheme, partitions=P, chips_to_hold=R, **r))
    return out


def format_table(rows: list[dict]) -> str:
    lines = [f"{'chip':<10} {'scheme':<6} {'parts':>6} {'chips':>6} {'mode':<9} "
             f"{'tok/s/user':>12} {'tok/s pipelined':>16}  {'Taalas HC1':>10}"]
    for r in rows:
        taalas = f"{TAALAS_HC1_TOKENS_PER_S:,}" if r["chip"].startswith("HC1") else ""
        lines.append(f"{r['chip']:<10} {r['scheme']:<6} {r['partitions']:>6} {r['chips']:>6} "
                     f"{r['mode']:<9} {r['tokens_per_s']:>12.4g} {r['pipelined_tokens_per_s']:>16.4g}"
                     f"  {taalas:>10}")
    return "\n".join(lines)


def plot(cfg: ModelConfig, path, schemes=("w8", "w3/6"), chips=(HC1, ULX3S), context: int = 512):
    """PNG: tokens/s (one user, and pipelined) against the number of chips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for chip in chips:
        for scheme in schemes:
            fmt = scheme_fmt(cfg, scheme)
            P = project(cfg, fmt, chip, [], context)["partitions"]
            ns = chip_counts(P)
            pr = project(cfg, fmt, chip, ns, context)
            ln, = ax.plot(ns, [r["tokens_per_s"] for r in pr["rows"]], marker="o", ms=3,
                          label=f"{chip.name} {scheme} ({P} partitions), one user")
            ax.plot(ns, [r["pipelined_tokens_per_s"] for r in pr["rows"]], ls="--",
                    color=ln.get_color(), lw=1, label=f"{chip.name} {scheme}, pipelined users")
    ax.axhline(TAALAS_HC1_TOKENS_PER_S, color="k", ls=":", lw=1)
    ax.text(1.1, TAALAS_HC1_TOKENS_PER_S * 1.3, "Taalas HC1 published: ~17,000 tok/s/user", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chips")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Llama 3.1 8B decode, projected (context {context})")
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
