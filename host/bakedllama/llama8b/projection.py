"""Performance projection for the partitioned model on real chips, priced with the accelerator's
own compiler and cycle model (gateware/compiler.py, gateware/cycle_model.py: the formulas the
Verilator tests check against the hardware cycle counter on the tiny model).

A chip is the gateware's engine at some size: the compiler's knobs `lanes` (weight x activation
products per cycle), `vlanes` (elements per cycle in the vector units: norms, quantizer,
attention output) and `kv_par` (KV heads per attention pass). compiler.make_geometry turns them
and the model's weight formats into the engine, as it does for a build: the tile (C columns x R
rows per cycle), the post-processing lanes Q (RoPE, SwiGLU, argmax), the rows per ROM word of
each bank, the packed DSP pairs, and hidden_dim / vocab_size padded to the tile. Each number in
a ChipSpec is a datasheet fact, a measurement, or an assumption, and says which.

Cycles of one pass (one partition on one chip), step by step as cycle_model.breakdown prices the
compiler's schedule: the consecutive pieces of one of the engine's matrices in the pass (wq wk wv
-> qkv, w1 w3 -> w13, wo, w2, the classifier) run as one matrix-vector command
(cycle_model.mv_cycles over their ROM words and row groups, padding included where a piece ends
its matrix); cycle_model.norm_cycles for each RMSNorm; the layer's qemit + attention
(cycle_model.attn_cycles at the context position) before its wo, the hidden-vector quantizer
(hemit) before its w2, the embedding lookup, and the argmax and output after the head; plus
HANDOFF: streaming the residual in from the previous chip (dim / vlanes). The unpartitioned tiny
model is therefore cycle_model.expected_cycles + 3 hand-offs (tested).
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

import dataclasses
import math
from dataclasses import asdict, dataclass

from bakedllama.bake import scheme_format
from bakedllama.config import ModelConfig
from bakedllama.llama8b.partition import HC1_BYTES, ULX3S_85F_BYTES, Partition, plan
from gateware import compiler
from gateware import cycle_model as cm

TAALAS_HC1_TOKENS_PER_S = 17000  # published per-user figure for Llama 3.1 8B (Taalas, 2025)
ULX3S_VLANES = 8  # soc/common.py VLANES, the ULX3S build's (soc/ imports Migen: a test compares)


@dataclass(frozen=True)
class ChipSpec:
    name: str
    mem_bytes: int  # on-chip bytes for weights
    lanes: int  # weight x activation products per cycle (the compiler's `lanes`)
    vlanes: int  # elements per cycle in the vector units (the compiler's `vlanes`)
    kv_par: int  # KV heads per attention pass (the compiler's `kv_par`)
    clock_hz: float
    link_bytes_per_s: float  # activations between chips
    link_latency_s: float
    load_bytes_per_s: float  # weights into a chip (the reloaded mode)
    notes: str
    dsp_pairs: int | None = None  # packed-DSP row-slot pairs; None: the compiler chooses (within
    # the LFE5U-85F's MULT18X18D, as for the ULX3S build)


ULX3S = ChipSpec(
    "ULX3S 85F", ULX3S_85F_BYTES, compiler.DEFAULT_LANES, ULX3S_VLANES, 1, 45e6, 50e6, 2e-6, 3e6 / 10,
    "fact: LFE5U-85F, 208 DP16KD; the engine is the ULX3S build of gateware/ (soc/common.py: "
    "lanes compiler.DEFAULT_LANES, vlanes 8, kv_par 1; the compiler derives the rest for the "
    "model) at the SoC's 45 MHz system clock (nextpnr Fmax: README); assumptions: all BRAM for "
    "weights, 50 MB/s board-to-board link (8 GPIO pins at ~50 MHz), reload through the FT231X "
    "UART at 3 Mbaud (0.3 MB/s)")
HC1 = ChipSpec(
    "HC1-like", HC1_BYTES, 1 << 17, 128, 8, 1e9, 64e9, 1e-6, 100e9,
    "assumptions (not Taalas data): on-chip weight storage sized to hold the 3/6-bit 8B with its "
    "multipliers (~4.7 GB); the gateware's engine scaled up: 2^17 lanes (hardwired "
    "constant-coefficient multipliers are cheap; 53 B transistors on TSMC N6), vlanes 128 (the "
    "widest the compiler lays out for head_dim 128: vlanes must divide it), all 8 KV heads per "
    "attention pass, no DSP blocks (dsp_pairs 0), the compiler's geometry for the rest, 1 GHz; "
    "PCIe-5 x16-class link (64 GB/s, 1 us); a reloadable variant loading at 100 GB/s (Taalas' "
    "chip is hardwired: it never reloads)", 0)
CHIP_SPECS = {"ulx3s": ULX3S, "hc1": HC1}
HANDOFF = "residual in from the previous chip: dim / vlanes cycles"
CORE_FIELD_MAX = 0xFFFF  # the core's 16-bit token / config fields (compiler.make_geometry checks)


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


# the engine's matrix (compiler.virtual_matrices, layer 0's key) that each tensor's rows are in
_MATRIX = dict(wq="qkv0", wk="qkv0", wv="qkv0", wo="wo0", w1="w130", w3="w130", w2="w20", wcls="cls")
_NORMS = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight")


@dataclass(frozen=True)
class Engine:
    """The compiler's engine for one model on one chip."""

    geo: compiler.Geometry
    rows_per_word: dict  # engine matrix kind (qkv wo w13 w2 cls) -> R_b of its bank
    emb_chunks: int  # ROM words per embedding row (the lookup streams one row)


def _fold(n: int) -> int:
    """n, or a number below the core's 16-bit fields with n's residue modulo 2^15 (so the
    compiler pads it by as many rows: every tile size it pads to is a power of two <= 2^15)."""
    return n if n <= CORE_FIELD_MAX else (n % (1 << 15)) + (1 << 15)


_ENGINES: dict = {}


def _widest(cfg: ModelConfig, formats: dict, chip: ChipSpec) -> compiler.Geometry:
    """compiler.make_geometry at the chip's knobs, or the largest below them that the compiler
    accepts for this model: lanes first (halved), then vlanes (halved: they must divide dim,
    kv_dim and head_dim), then kv_par (a divisor of n_kv_heads). The first refusal is raised if
    nothing fits."""
    first = None
    lanes = chip.lanes
    while lanes >= 2:
        vl = chip.vlanes
        while vl >= 2:
            for kp in range(min(chip.kv_par, cfg.n_kv_heads), 0, -1):
                try:
                    return compiler.make_geometry(cfg, lanes, formats, vl, kp, chip.dsp_pairs)
                except ValueError as err:
                    first = first or err
            vl //= 2
        lanes //= 2
    raise first


def engine(cfg: ModelConfig, fmt: dict, chip: ChipSpec) -> Engine:
    """compiler.make_geometry + build_banks (placement only) for the model on `chip`'s knobs,
    or the widest below them that the compiler accepts for this model (`_widest`; it pads
    neither dim nor kv_dim: 2^17 lanes of 32-column groups would be 4,096 rows per cycle, which
    the 8B's 6,144 qkv rows are not a multiple of, so 2^16 lanes are used then).

    Two adaptations, both without effect on the cycles: (1) the core's 16-bit token / config
    fields are a limit of its CSRs, not of the engine: a vocab_size beyond them (the 8B's 128,256
    tokens) is folded below with the same residue modulo 2^15 (`_fold`: the same padding) and the
    padded size is added back, a seq_len beyond them clamped (it only sizes the attention
    accumulator, in the ECP5 multiplier budget); (2) the engine runs wq/wk/wv (and w1/w3) as one
    matrix in one format: where a scheme gives them different ones (w3/6's 6-bit wv) they are
    laid out in the widest (the cycles depend on the tile and the groups, not on the bits)."""
    key = (repr(cfg), repr(fmt.get("weights")), chip)
    if key in _ENGINES:
        return _ENGINES[key]
    formats = compiler.matrix_formats(cfg, fmt["weights"])
    for names in (("wq", "wk", "wv"), ("w1", "w3")):
        widest = max((formats[n] for n in names), key=lambda f: f[0])
        formats.update({n: widest for n in names})
    c = dataclasses.replace(cfg, vocab_size=_fold(cfg.vocab_size), seq_len=min(cfg.seq_len, CORE_FIELD_MAX))
    g = _widest(c, formats, chip)
    if max(g.vlanes, g.post, g.rows) > 1 << 15 and c.vocab_size != cfg.vocab_size:
        raise ValueError(f"{chip.name}: a tile of {g.rows} rows cannot fold vocab_size {cfg.vocab_size}")
    banks, place = compiler.build_banks(c, g, formats, None)
    rpw = {compiler.split_key(k)[0]: banks[place[k].bank].rows_per_word for k in _MATRIX.values()}
    geo = dataclasses.replace(g, vocab=g.vocab - c.vocab_size + cfg.vocab_size)
    if len(_ENGINES) > 16:
        _ENGINES.clear()
    _ENGINES[key] = Engine(geo, rpw, place["emb"].chunks)
    return _ENGINES[key]


def pass_breakdown(cfg: ModelConfig, fmt: dict, part: Partition, chip: ChipSpec, context: int) -> dict:
    """Clock cycles of one pass, step by step (names like cycle_model.breakdown's; see the
    module text)."""
    e = engine(cfg, fmt, chip)
    g = e.geo
    P, D = g.vlanes, cfg.dim
    out = {"handoff": D // P}
    run: list = []  # consecutive pieces of one engine matrix: (kind, layer, rows)

    def flush():
        if not run:
            return
        kind, l, _ = run[0]
        rows = sum(r for _, _, r in run)
        rpw = e.rows_per_word[kind]
        chunks = (g.hidden if kind == "w2" else D) // g.cols
        rg = -(-rows // rpw)
        name = f"mv{'' if l is None else l}:{kind}{'' if l is None else l}"
        out[name] = out.get(name, 0) + cm.mv_cycles(rg * chunks, rg, max(1, rpw // g.post), g.cols,
                                                    kind, g.dsp_pairs)
        run.clear()

    for pc in part.pieces:
        n, l = pc.name, pc.layer
        kind = compiler.split_key(_MATRIX[n])[0] if n in _MATRIX else None
        if run and (kind, l) != run[0][:2]:
            flush()
        if n in _NORMS:
            which = {"rms_att_weight": "att", "rms_ffn_weight": "ffn", "rms_final_weight": "final"}[n]
            out[f"norm{'' if l is None else l}:{which}"] = cm.norm_cycles(D, P)
        elif n == "tok_embeddings":
            out["embed"] = cm.embed_cycles(e.emb_chunks, D, P, cfg.head_dim)
        else:
            if n == "wo" and pc.r0 == 0:  # the layer's q emit and attention run before its wo
                out[f"qemit{l}"] = cm.qemit_cycles(D, P)
                out[f"attn{l}"] = cm.attn_cycles(context - 1, cfg.n_kv_heads // g.kv_par,
                                                 cfg.head_dim, D, P)
            if n == "w2" and pc.r0 == 0:  # the hidden vector is quantized before w2
                out[f"hemit{l}"] = cm.hemit_cycles(g.hidden, P)
            rows = pc.rows
            if n in ("w1", "w3") and pc.r1 == cfg.hidden_dim:  # the zero rows the compiler pads
                rows += g.hidden - cfg.hidden_dim
            if n == "wcls" and pc.r1 == cfg.vocab_size:
                rows += g.vocab - cfg.vocab_size
            run.append((kind, l, rows))
            if n == "wcls" and pc.r1 == cfg.vocab_size:
                flush()
                out["sample"] = cm.sample_cycles(cfg.vocab_size, None)
                out["out"] = cm.OUT_CYCLES
    flush()
    return out


def pass_cycles(cfg: ModelConfig, fmt: dict, part: Partition, chip: ChipSpec, context: int) -> int:
    """Clock cycles of one pass (pass_breakdown's sum)."""
    return sum(pass_breakdown(cfg, fmt, part, chip, context).values())


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
    geo = engine(cfg, fmt, chip).geo
    return dict(chip=asdict(chip), engine=dict(asdict(geo), bank_rows=list(geo.bank_rows)),
                partitions=P, chips_to_hold=R,
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
