"""Cut the quantized model into chip-sized partitions (passes).

A chip holds `chip_bytes` of weights (packed bits + per-group multipliers + int16 gains, as the
accelerator stores them; the KV cache is counted apart). The model is a sequence of units:

    embedding | layer 0 | layer 1 | ... | layer L-1 | head (final norm + lm_head)

The embedding and the head are partitions of their own. Layers go whole, several to a partition
while they fit; a layer that does not fit on one chip is cut into its tensors in execution order
(rms_att wq wk wv wo rms_ffn w1 w3 w2), and a matrix that does not fit in what is left of a
partition is split by rows (every output row of a matrix-vector product is independent, so a row
slice computes the same rows of the result). A chip that cannot hold one row is an error."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bakedllama import numerics as nx
from bakedllama.config import ModelConfig

LAYER_ORDER = ("rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight", "w1", "w3", "w2")
NORMS = ("rms_att_weight", "rms_ffn_weight", "rms_final_weight")

# Chip presets (on-chip bytes for weights). See projection.py for where the numbers come from.
ULX3S_85F_BYTES = 208 * 18 * 1024 // 8  # 208 DP16KD x 18 Kbit (x9 / x18 ports use all 18 Kbit)
HC1_BYTES = 5 << 30  # assumption: an HC1-like chip holds the whole 3/6-bit 8B (see projection)
CHIPS = {"ulx3s": ULX3S_85F_BYTES, "hc1": HC1_BYTES}


class PartitionError(ValueError):
    """The model cannot be cut for this chip (one clear line)."""


@dataclass(frozen=True)
class Piece:
    """Rows [r0, r1) of one tensor of one layer (layer None: embedding / head)."""

    name: str
    layer: int | None
    r0: int
    r1: int
    nbytes: int

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    def label(self) -> str:
        where = "" if self.layer is None else f"L{self.layer}."
        return f"{where}{self.name}[{self.r0}:{self.r1}]"


@dataclass
class Partition:
    index: int
    kind: str  # "embed" | "layers" | "split" | "head"
    pieces: list = field(default_factory=list)
    nbytes: int = 0

    def describe(self) -> str:
        layers = sorted({p.layer for p in self.pieces if p.layer is not None})
        if self.kind == "layers":
            what = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        elif self.kind == "split":
            what = f"{self.pieces[0].label()} .. {self.pieces[-1].label()}"
        else:
            what = " + ".join(p.label() for p in self.pieces)
        return f"#{self.index} {self.kind}: {what} ({self.nbytes:,} B)"


@dataclass(frozen=True)
class Unit:
    name: str
    layer: int | None
    rows: int
    row_bytes: int  # per row (matrices) or the whole vector (norm gains: rows = 1)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes


def row_bytes(cols: int, bits: int, group: int) -> int:
    """One row as the accelerator stores it: packed weights and M_BITS-bit group multipliers."""
    return math.ceil((cols * bits + (cols // group) * nx.M_BITS) / 8)


def _shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    d, kv, h, v = cfg.dim, cfg.kv_dim, cfg.hidden_dim, cfg.vocab_size
    return dict(tok_embeddings=(v, d), wcls=(v, d), wq=(d, d), wk=(kv, d), wv=(kv, d), wo=(d, d),
                w1=(h, d), w3=(h, d), w2=(d, h))[name]


def _unit(cfg: ModelConfig, fmt: dict, name: str, layer) -> Unit:
    if name in NORMS:
        return Unit(name, layer, 1, cfg.dim * 2)
    rows, cols = _shape(cfg, name)
    w = fmt["weights"][name]
    return Unit(name, layer, rows, row_bytes(cols, w["bits"], w["group"]))


def model_units(cfg: ModelConfig, fmt: dict) -> list[Unit]:
    out = [_unit(cfg, fmt, "tok_embeddings", None)]
    out += [_unit(cfg, fmt, n, l) for l in range(cfg.n_layers) for n in LAYER_ORDER]
    out += [_unit(cfg, fmt, "rms_final_weight", None), _unit(cfg, fmt, "wcls", None)]
    return out


def plan(cfg: ModelConfig, fmt: dict, chip_bytes: int | None) -> list[Partition]:
    """Partitions in execution order; chip_bytes None = unpartitioned (one pass for the layers)."""
    units = model_units(cfg, fmt)
    embed, layers, head = units[0], units[1:-2], units[-2:]
    parts: list[Partition] = []

    def new(kind):
        parts.append(Partition(len(parts), kind))
        return parts[-1]

    if chip_bytes is None:
        p = new("embed")
        p.pieces.append(Piece(embed.name, None, 0, embed.rows, embed.nbytes))
        p.nbytes = embed.nbytes
        p = new("layers")
        for u in layers:
            p.pieces.append(Piece(u.name, u.layer, 0, u.rows, u.nbytes))
            p.nbytes += u.nbytes
        p = new("head")
        for u in head:
            p.pieces.append(Piece(u.name, None, 0, u.rows, u.nbytes))
            p.nbytes += u.nbytes
        return parts
    chip_bytes = int(chip_bytes)
    if chip_bytes <= 0:
        raise PartitionError(f"chip of {chip_bytes} bytes: must be positive")
    need = max(u.row_bytes for u in units)
    if chip_bytes < need:
        u = max(units, key=lambda u: u.row_bytes)
        raise PartitionError(f"a chip of {chip_bytes:,} bytes is too small for one row of "
                             f"{u.name} ({u.row_bytes:,} bytes)")

    def fill(kind, items, cur=None):
        """Greedy: items in order, splitting matrices by rows at the partition boundary."""
        cur = cur or new(kind)
        for u in items:
            r = 0
            while r < u.rows:
                room = (chip_bytes - cur.nbytes) // u.row_bytes
                if room == 0:  # (a gain vector is one "row": it never splits)
                    cur = new(kind)
                    continue
                n = min(room, u.rows - r)
                cur.pieces.append(Piece(u.name, u.layer, r, r + n, n * u.row_bytes))
                cur.nbytes += n * u.row_bytes
                r += n
        return cur

    fill("embed", [embed])
    L = cfg.n_layers
    per = [layers[l * len(LAYER_ORDER):(l + 1) * len(LAYER_ORDER)] for l in range(L)]
    cur = None
    for l in range(L):
        lb = sum(u.nbytes for u in per[l])
        if lb <= chip_bytes:
            if cur is None or cur.kind != "layers" or cur.nbytes + lb > chip_bytes:
                cur = new("layers")
            for u in per[l]:
                cur.pieces.append(Piece(u.name, u.layer, 0, u.rows, u.nbytes))
            cur.nbytes += lb
        else:
            fill("split", per[l])
            cur = None
    fill("head", head)
    return parts


def summary(parts: list[Partition]) -> dict:
    kinds = {}
    for p in parts:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    return dict(partitions=len(parts), by_kind=kinds, largest_bytes=max(p.nbytes for p in parts),
                total_bytes=sum(p.nbytes for p in parts))


def parse_bytes(s: str | int | None) -> int | None:
    """'ulx3s' | 'hc1' | '468k' | '1.5G' | '4096' | 'none' -> bytes (None = unpartitioned)."""
    if s is None or isinstance(s, int):
        return s
    t = str(s).strip().lower()
    if t in CHIPS:
        return CHIPS[t]
    if t in ("none", "inf"):
        return None
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if t[-1] in mult:
            return int(float(t[:-1]) * mult[t[-1]])
        return int(t)
    except (ValueError, IndexError):
        raise PartitionError(f"bad chip size {s!r} (bytes, e.g. 468k, 1.5G, ulx3s, hc1)") from None
