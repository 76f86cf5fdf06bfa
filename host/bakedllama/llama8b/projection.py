"""Performance projection for the partitioned model on real chips (an analytic cycle model).

Until the gateware's own cycle model (gateware/) covers full-size layers, the projection uses
the explicit parameters below; every number in a ChipSpec is either a datasheet fact or an
assumption, and says which.

Cycle model of one pass (one partition on one chip):
  weights   each piece of rows x cols: ceil(rows * cols / lanes) cycles (lanes MACs per cycle)
  attention per layer whose attention runs in the pass: 2 * dim * context MACs / lanes
  overhead  PASS_OVERHEAD_CYCLES per pass (norms, quantize, pipeline fill)
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
from dataclasses import asdict, dataclass

from bakedllama.bake import scheme_format
from bakedllama.config import ModelConfig
from bakedllama.llama8b.partition import HC1_BYTES, ULX3S_85F_BYTES, Partition, plan

PASS_OVERHEAD_CYCLES = 64
TAALAS_HC1_TOKENS_PER_S = 17000  # published per-user figure for Llama 3.1 8B (Taalas, 2025)


@dataclass(frozen=True)
class ChipSpec:
    name: str
    mem_bytes: int  # on-chip bytes for weights
    lanes: int  # MACs per cycle
    clock_hz: float
    link_bytes_per_s: float  # activations between chips
    link_latency_s: float
    load_bytes_per_s: float  # weights into a chip (the reloaded mode)
    notes: str


ULX3S = ChipSpec(
    "ULX3S 85F", ULX3S_85F_BYTES, 156, 60e6, 50e6, 2e-6, 3e6 / 10,
    "fact: LFE5U-85F has 208 DP16KD (18 Kbit each, all usable through x9/x18 ports) and 156 "
    "MULT18X18D; ~60 MHz is what a "
    "LiteX SoC with wide BRAM reads closes at (TOOLCHAIN-NOTES: 63-71 MHz); assumptions: one MAC "
    "per MULT18X18D per cycle, all BRAM for weights, 50 MB/s board-to-board link (8 GPIO pins at "
    "~50 MHz), reload through the FT231X UART at 3 Mbaud (0.3 MB/s)")
HC1 = ChipSpec(
    "HC1-like", HC1_BYTES, 1 << 17, 1e9, 64e9, 1e-6, 100e9,
    "assumptions (not Taalas data): on-chip weight storage sized to hold the 3/6-bit 8B with its "
    "multipliers (~4.7 GB); 2^17 MAC lanes at 1 GHz (hardwired constant-coefficient multipliers "
    "are cheap; 53 B transistors on TSMC N6); PCIe-5 x16-class link (64 GB/s, 1 us); a reloadable "
    "variant loading at 100 GB/s (Taalas' chip is hardwired: it never reloads)")
CHIP_SPECS = {"ulx3s": ULX3S, "hc1": HC1}


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


def pass_cycles(cfg: ModelConfig, part: Partition, lanes: int, context: int) -> int:
    cyc = PASS_OVERHEAD_CYCLES
    for pc in part.pieces:
        if pc.name.startswith("rms_") or pc.name == "tok_embeddings":
            continue
        cols = cfg.hidden_dim if pc.name == "w2" else cfg.dim
        cyc += math.ceil(pc.rows * cols / lanes)
        if pc.name == "wo" and pc.r0 == 0:  # the layer's attention runs before its wo
            cyc += math.ceil(2 * cfg.dim * context / lanes)
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
    comp = [pass_cycles(cfg, p, chip.lanes, context) / chip.clock_hz for p in parts]
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
