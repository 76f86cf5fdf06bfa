"""The model compiler: passes from a BakedModel to everything the hardware needs, in plain Python.

    geometry   lanes -> tile of the matrix-vector engine (R rows x C columns per cycle), vector
               lanes P, attention parallelism; hidden_dim and vocab_size padded up to the tile
               (zero rows / columns: exact, see make_geometry); ValueError at once where the
               config cannot be padded (dim, head_dim, kv_dim) or cannot fit
    banks      weight matrices -> ROM images: one bank per weight format (bits, group), each
               matrix a run of words; a word holds R_b row slots of C weights + a share of the
               row's group multiplier, so one word is what the lanes consume in one cycle
    tables     lookup tables from bakedllama.numerics (rsqrt, exp, sigmoid, RoPE cos/sin, norm
               gains) - generated there, never copied here
    steps      every shift of the pass (bakedllama.steps.make_steps: requantization bases, the
               embedding, key cache, the attention's score scale and shifts, the norms' eps and
               shifts), the same constants the golden model and the 8B runner apply
    schedule   the fixed sequence of steps of one forward pass (which matrix, which unit, when)

Nothing here touches Migen, so the cycle model (and the 8B projection) can import it cheaply.
The hardware (core.py) is built from a Plan; the cycle model sums the same schedule.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from bakedllama import numerics as nx
from bakedllama import steps as st
from bakedllama.bake import scheme_format
from bakedllama.config import ModelConfig

# 64: 2 rows x 32 columns per cycle, on packed MULT18X18D pairs. Lanes 128 (all four rows on DSP
# pairs, the attention borrowing 23 of their multipliers) is exact in Verilator, but its SoC (61 %
# of the LUTs) did not route here in CI time: router2 was at 30k overused wires after 46 min
# (see the README)
DEFAULT_LANES = 64
M_BITS = nx.M_BITS  # group multipliers are unsigned 16-bit
BRAM_DEPTH = 512  # DP16KD in its widest (512 x 36) configuration
BRAM_BITS = 18432  # bits of one DP16KD
BRAMS = 208  # DP16KD blocks of the LFE5U-85F (the ULX3S default)
MULTS = 156  # MULT18X18D of the LFE5U-85F


# ----------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    lanes: int  # L: weight x activation products per cycle in the matrix-vector engine
    cols: int  # C: columns of one row consumed per cycle (C divides every group size)
    rows: int  # R: rows in flight per cycle (R * C = L)
    vlanes: int  # P: elements per cycle in the vector passes (norm, quantizer, attention output)
    post: int  # Q: matrix-vector results per cycle through the row post-processing (RoPE, SwiGLU)
    kv_par: int  # KV heads handled together by the attention unit (n_kv_heads / kv_par passes)
    bank_rows: tuple  # R_b per bank (a bank may use fewer row slots to keep its ROM deep)
    lane_bits: int = 8  # weight bits per lane multiplier; wider weights take two row slots
    hidden: int = 0  # FFN width as laid out: hidden_dim padded with zero rows of w1/w3, columns of w2
    vocab: int = 0  # classifier / embedding rows as laid out: vocab_size padded with zero rows
    dsp_pairs: int = 0  # row-slot pairs whose products run as packed pairs in MULT18X18D (C each)
    share: int = 0  # of those multipliers, how many the attention borrows for its e x v products
    # (the two units never run at once; a multiplexer in front of each shared block)


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _roundup(n: int, m: int) -> int:
    return -(-n // m) * m


def matrix_formats(cfg: ModelConfig, weights_fmt: dict | None = None, scheme: str = "w4e8") -> dict:
    """name -> (bits, group) for every weight matrix, from a baked model's fmt or from a scheme."""
    cols = dict(tok_embeddings=cfg.dim, wq=cfg.dim, wk=cfg.dim, wv=cfg.dim, wo=cfg.dim,
                w1=cfg.dim, w2=cfg.hidden_dim, w3=cfg.dim, wcls=cfg.dim)
    out = {}
    for name, c in cols.items():
        if weights_fmt is not None:
            src = "tok_embeddings" if (name == "wcls" and name not in weights_fmt) else name
            out[name] = (int(weights_fmt[src]["bits"]), int(weights_fmt[src]["group"]))
        else:
            out[name] = scheme_format(scheme, "tok_embeddings" if (name == "wcls" and cfg.tied_embeddings)
                                      else name, c)
    return out


def bank_key(fmt: tuple) -> tuple:
    return fmt  # one ROM bank per (bits, group)


def virtual_matrices(cfg: ModelConfig, geo: Geometry | None = None) -> list[tuple]:
    """(key, rows, cols, weight-format name) of every matrix the engine runs, in ROM order.

    With a geometry, the shapes as laid out (hidden_dim and vocab_size padded to the tile)."""
    return _matrices(cfg, geo.hidden if geo else cfg.hidden_dim, geo.vocab if geo else cfg.vocab_size)


def _matrices(cfg: ModelConfig, H: int, V: int) -> list[tuple]:
    c = cfg
    out = []
    for l in range(c.n_layers):
        out += [(f"qkv{l}", c.dim + 2 * c.kv_dim, c.dim, "wq"), (f"wo{l}", c.dim, c.dim, "wo"),
                (f"w13{l}", 2 * H, c.dim, "w1"), (f"w2{l}", c.dim, H, "w2")]
    out.append(("cls", V, c.dim, "wcls"))
    if not c.tied_embeddings:
        out.append(("emb", V, c.dim, "tok_embeddings"))
    return out


def padded_formats(cfg: ModelConfig, formats: dict, hidden: int) -> dict:
    """The formats as laid out: a w2 quantized per row (group = hidden_dim) keeps one multiplier
    per row over the padded row (the pad weights are 0, so the group sum is unchanged)."""
    out = dict(formats)
    bits, group = formats["w2"]
    if group == cfg.hidden_dim:
        out["w2"] = (bits, hidden)
    return out


def make_geometry(cfg: ModelConfig, lanes: int, formats: dict, vlanes: int | None = None,
                  kv_par: int | None = None, dsp_pairs: int | None = None,
                  share: int | None = None) -> Geometry:
    """Choose the engine tile for `lanes` and pad the config to it (ValueError where it cannot).

    Padding is exact: w1/w3 get zero rows (h1 = h3 = 0, SwiGLU(0, 0) = 0, and max |hb| is
    unchanged), w2 zero columns (they meet those zeros); the classifier and embedding get zero rows,
    which Argmax and the Sampler never pick (they stop at the real vocab_size). dim, head_dim and
    kv_dim are not padded: RMSNorm divides by the real dim, and a head's lanes hold its real width."""
    c = cfg
    if not _pow2(lanes):
        raise ValueError(f"lanes must be a power of two, got {lanes}")
    if formats["wq"] != formats["wk"] or formats["wq"] != formats["wv"] or formats["w1"] != formats["w3"]:
        raise ValueError("wq/wk/wv and w1/w3 must share a weight format (they run as one matrix)")
    for name in ("dim", "hidden_dim", "vocab_size", "seq_len"):
        if getattr(c, name) > 0xFFFF:
            raise ValueError(f"{name} = {getattr(c, name)} does not fit the 16-bit token / config "
                             f"fields of the core")
    groups = {g for _, g in formats.values()}
    C = lanes
    while C > 1 and any(g % C for g in groups):
        C //= 2
    R = lanes // C
    vlanes_auto = vlanes is None
    if vlanes is None:
        vlanes = max(2, min(16, lanes // 16, c.head_dim))
    P = vlanes
    if not _pow2(P) or P < 2:
        raise ValueError(f"vlanes must be a power of two >= 2, got {P}")
    for name, n in (("dim", c.dim), ("kv_dim", c.kv_dim), ("head_dim", c.head_dim)):
        if n % P:
            raise ValueError(f"{name} = {n} is not a multiple of vlanes = {P} (the compiler pads "
                             f"hidden_dim and vocab_size, not {name}: choose vlanes dividing it)")
    if kv_par is None:
        kv_par = 1  # one KV head per pass: kv_mul * head_dim e*v products (DSP blocks) per cycle
    if kv_par <= 0 or c.n_kv_heads % kv_par:
        raise ValueError(f"kv_par {kv_par} must divide n_kv_heads {c.n_kv_heads}")
    min_cols = min(c.dim, c.hidden_dim)
    Q = 2
    while Q < P and Q * min_cols < lanes:
        Q *= 2
    for name, n in (("dim", c.dim), ("kv_dim", c.kv_dim)):
        if n % Q:
            raise ValueError(f"{name} = {n} is not a multiple of the post-processing lanes {Q}")
    # padding: hidden to the vector lanes, the post lanes (w1/w3 interleave in blocks of Q), C
    # (w2's columns) and w2's group; vocab to the vector and post lanes; then both to the rows per
    # word of their banks (which may grow with the padding: repeat until nothing moves)
    g2 = formats["w2"][1]
    Hp = _roundup(c.hidden_dim, math.lcm(P, Q, C, g2 if g2 != c.hidden_dim else 1))
    Vp = _roundup(c.vocab_size, math.lcm(P, Q))
    for _ in range(2 * lanes.bit_length() + 2):
        mats = _matrices(c, Hp, Vp)
        lane_bits, bank_rows, rpw = _bank_rows(mats, padded_formats(c, formats, Hp), R, C)
        Hn = _roundup(Hp, max(1, rpw["w1"] // 2))
        Vn = _roundup(Vp, max(rpw["wcls"], 1 if c.tied_embeddings else rpw["tok_embeddings"]))
        if (Hn, Vn) == (Hp, Vp):
            break
        Hp, Vp = Hn, Vn
    else:  # pragma: no cover - the rows per word only grow, up to R
        raise ValueError("hidden_dim / vocab_size padding did not converge")
    auto_p, auto_d, auto_s = vlanes_auto, dsp_pairs is None, share is None
    if dsp_pairs is None:  # every slot pair on packed DSP multipliers (4-bit lanes only) ...
        dsp_pairs = R // 2 if lane_bits <= 4 else 0
    if dsp_pairs < 0 or 2 * dsp_pairs > R or (dsp_pairs and lane_bits > 4):
        raise ValueError(f"dsp_pairs {dsp_pairs}: needs 0 <= 2 * dsp_pairs <= rows per cycle ({R}) "
                         f"and lanes of <= 4 weight bits (here {lane_bits})")
    HPd = kv_par * c.kv_mul * c.head_dim  # the attention's e x v products
    share = 0 if share is None else share
    if not 0 <= share <= min(HPd, dsp_pairs * C):
        raise ValueError(f"share {share}: at most min(e x v products {HPd}, packed-pair "
                         f"multipliers {dsp_pairs * C})")
    # ... within the device's multipliers: first the attention borrows the engine's (no cost in
    # cycles: the two never run at once), then narrower vector lanes (each costs ~8 of them), then
    # fewer DSP slot pairs, where those were left to the compiler
    while True:
        over = sum(multipliers(c, R, C, P, Q, kv_par, dsp_pairs, share).values()) - MULTS
        if over <= 0:
            break
        if auto_s and share < min(HPd, dsp_pairs * C):
            share = min(HPd, dsp_pairs * C, share + over)
        elif auto_p and P > 4 and P // 2 >= Q:
            P //= 2
        elif auto_d and dsp_pairs > 0:
            dsp_pairs -= 1
            share = min(share, dsp_pairs * C)
        else:
            break
    for key2, r, _, f in mats:
        if r % rpw[f]:
            raise ValueError(f"matrix {key2} has {r} rows, not a multiple of the {rpw[f]} rows per "
                             f"cycle of lanes = {lanes} (dim and kv_dim are not padded: choose other "
                             f"lanes)")
    return Geometry(lanes, C, R, P, Q, kv_par, tuple(bank_rows), lane_bits, Hp, Vp, dsp_pairs, share)


def _bank_rows(mats: list, formats: dict, R: int, C: int) -> tuple[int, list, dict]:
    """lane_bits, R_b per bank (sorted bank keys) and rows per word per weight format name, for
    the matrices `mats`."""
    # lanes multiply lane_bits-bit weights; a bank of wider weights (at most twice as wide) keeps
    # the low lane_bits of each weight in its row slot and the high bits in an extension field
    # after the slots (LUT bit planes, added after the adder trees): one slot per row
    banks = sorted({bank_key(formats[f]) for _, _, _, f in mats})
    lane_bits = min(b for b, _ in banks)
    if any(b > 2 * lane_bits for b, _ in banks):
        lane_bits = max(b for b, _ in banks)
    # per bank: rows slots, reduced while the bank would be shallower than one block RAM
    bank_rows = []
    for key in banks:
        bits, group = key
        bm = [(r, k) for _, r, k, f in mats if bank_key(formats[f]) == key]
        Rb = R
        while Rb > 1:
            depth = sum(-(-r // Rb) * (k // C) for r, k in bm)
            total_bits = sum(r * k for r, k in bm) * (bits + M_BITS / group)
            if depth >= BRAM_DEPTH or total_bits <= 18432:
                break
            Rb //= 2
        bank_rows.append(Rb)
    rpw = {f: bank_rows[banks.index(bank_key(formats[f]))] for _, _, _, f in mats}
    return lane_bits, bank_rows, rpw


# ----------------------------------------------------------------------------- banks
@dataclass
class Bank:
    bits: int  # weight bits
    group: int  # weights per multiplier
    slots: int  # R_b row slots per word
    cols: int  # C weights per slot per word
    m_share: int  # bits of the group multiplier carried per slot per word
    lane_bits: int = 0  # bits per weight field in a slot (= bits, or the low part of wider ones)
    words: list = field(default_factory=list)  # ROM image (ints of `width` bits)

    def __post_init__(self):
        self.lane_bits = self.lane_bits or self.bits

    @property
    def ext_bits(self) -> int:
        """0, or the high bits of each weight (signed) when the weights are wider than the lanes:
        the slot then holds the low lane_bits (unsigned) and the extension field after all slots
        the rest (ext_offset)."""
        return self.bits - self.lane_bits

    @property
    def rows_per_word(self) -> int:
        return self.slots

    @property
    def slot_width(self) -> int:
        return self.cols * self.lane_bits + self.m_share

    @property
    def ext_offset(self) -> int:
        """First bit of the extension fields: slot j, column i at ext_offset + (j C + i) ext_bits."""
        return self.slots * self.slot_width

    @property
    def width(self) -> int:
        return self.ext_offset + self.slots * self.cols * self.ext_bits

    @property
    def chunks_per_group(self) -> int:
        return self.group // self.cols

    @property
    def depth(self) -> int:
        return len(self.words)


@dataclass
class Placement:
    """One matrix (or stack of row blocks run as one matrix) in a bank."""
    bank: int
    base: int  # first word
    rows: int
    cols: int
    chunks: int  # words per row group (cols / C)
    rowgroups: int  # rows / R_b

    @property
    def words(self) -> int:
        return self.chunks * self.rowgroups


def _encode_rows(q: np.ndarray, m: np.ndarray, bank: Bank) -> list[int]:
    """Rows (rows, cols) int8 + multipliers (rows, cols/group) -> bank words, row-group major.

    Slot j of a word holds row j's C weight fields of lane_bits and a share of its multiplier. In
    a bank with ext_bits, the slot's fields are the low lane_bits of each weight (unsigned) and the
    high ext_bits (signed) sit in the extension fields after all slots."""
    rows, cols = q.shape
    Rw, C, lb = bank.rows_per_word, bank.cols, bank.lane_bits
    chunks = cols // C
    cpg = bank.chunks_per_group
    qq = q.astype(np.int64).reshape(rows // Rw, Rw, chunks, C)
    mm = np.repeat(m.astype(np.int64), cpg, axis=-1).reshape(rows // Rw, Rw, chunks)
    kidx = np.arange(chunks) % cpg
    share = (mm >> (kidx * bank.m_share)) & ((1 << bank.m_share) - 1)
    eb = bank.ext_bits
    lo, hi = qq & ((1 << lb) - 1), (qq >> lb) & ((1 << eb) - 1)
    words = []
    for rg in range(rows // Rw):
        for ch in range(chunks):
            w = 0
            for j in range(Rw):
                slot = 0
                for i in range(C - 1, -1, -1):
                    slot = (slot << lb) | int(lo[rg, j, ch, i])
                slot |= int(share[rg, j, ch]) << (C * lb)
                w |= slot << (j * bank.slot_width)
                for i in range(C if eb else 0):
                    w |= int(hi[rg, j, ch, i]) << (bank.ext_offset + (j * C + i) * eb)
            words.append(w)
    return words


# ----------------------------------------------------------------------------- plan
@dataclass
class Plan:
    cfg: ModelConfig
    geo: Geometry
    identity: int  # BakedModel.identity()
    fmt: dict  # the baked model's numerics formats
    banks: list  # [Bank]
    place: dict  # key -> Placement (cls, emb, qkv{l}, wo{l}, w13{l}, w2{l})
    steps: st.Steps  # every shift / format constant of the pass (bakedllama.steps)
    acc_bits: int  # matrix-vector accumulator width (numerics.matvec_acc_bits, max over matrices)
    tables: dict  # numerics tables (see compile_model)
    schedule: list  # [Step]

    @property
    def tied(self) -> bool:
        return self.cfg.tied_embeddings


@dataclass(frozen=True)
class Step:
    kind: str  # embed | norm | mv | qemit | attn | hemit | sample | out
    layer: int = -1
    arg: str = ""  # matrix key for mv, norm selector for norm


def make_schedule(cfg: ModelConfig, with_sampling: bool = False) -> list[Step]:
    """The fixed order of one forward pass (the sequencer's states, the cycle model's terms)."""
    s = [Step("embed")]
    for l in range(cfg.n_layers):
        s += [Step("norm", l, "att"), Step("mv", l, f"qkv{l}"), Step("qemit", l), Step("attn", l),
              Step("mv", l, f"wo{l}"), Step("norm", l, "ffn"), Step("mv", l, f"w13{l}"),
              Step("hemit", l), Step("mv", l, f"w2{l}")]
    s += [Step("norm", -1, "final"), Step("mv", -1, "cls")]
    if with_sampling:
        s.append(Step("sample"))
    s.append(Step("out"))
    return s


def build_banks(cfg: ModelConfig, geo: Geometry, formats: dict, weights: dict | None):
    """Lay out every virtual matrix (padded to the geometry) in its bank. With weights=None only
    the placement is computed."""
    formats = padded_formats(cfg, formats, geo.hidden)
    mats = virtual_matrices(cfg, geo)
    keys = sorted({bank_key(formats[f]) for _, _, _, f in mats})
    banks = []
    for i, (bits, group) in enumerate(keys):
        cpg = group // geo.cols
        banks.append(Bank(bits, group, geo.bank_rows[i], geo.cols, -(-M_BITS // cpg),
                          min(bits, geo.lane_bits)))
    place = {}
    depth = [0] * len(banks)
    for key, rows, cols, f in mats:
        bi = keys.index(bank_key(formats[f]))
        bk = banks[bi]
        p = Placement(bi, depth[bi], rows, cols, cols // geo.cols, rows // bk.rows_per_word)
        place[key] = p
        depth[bi] += p.words
        if weights is not None:
            q, m = virtual_rows(cfg, geo, weights, key)
            bk.words += _encode_rows(q, m, bk)
    if cfg.tied_embeddings:
        place["emb"] = place["cls"]
    return banks, place


def _pad_rows(q: np.ndarray, m: np.ndarray, rows: int):
    """Zero rows (weights and multipliers) up to `rows`."""
    n = rows - q.shape[0]
    return np.pad(q, ((0, n), (0, 0))), np.pad(m, ((0, n), (0, 0)))


def virtual_rows(cfg: ModelConfig, geo: Geometry, W: dict, key: str):
    """The (q, m) rows of a virtual matrix as laid out: qkv = [wq; wk; wv]; w13 = w1, w3 (zero rows
    up to geo.hidden) interleaved in blocks of Q rows (so the SwiGLU unit sees a beat of h1 then the
    matching beat of h3); w2 with zero columns up to geo.hidden; cls and emb with zero rows up to
    geo.vocab."""
    if key == "cls":
        w = W["wcls"] if "wcls" in W else W["tok_embeddings"]
        return _pad_rows(w.q, w.m, geo.vocab)
    if key == "emb":
        return _pad_rows(W["tok_embeddings"].q, W["tok_embeddings"].m, geo.vocab)
    kind, l = split_key(key)
    if kind == "qkv":
        parts = [W["wq"][l], W["wk"][l], W["wv"][l]]
        return np.concatenate([p.q for p in parts]), np.concatenate([p.m for p in parts])
    if kind == "w13":
        P = geo.post
        (q1, m1), (q3, m3) = (_pad_rows(w.q, w.m, geo.hidden) for w in (W["w1"][l], W["w3"][l]))
        qs, ms = [], []
        for b in range(geo.hidden // P):
            sl = slice(b * P, (b + 1) * P)
            qs += [q1[sl], q3[sl]]
            ms += [m1[sl], m3[sl]]
        return np.concatenate(qs), np.concatenate(ms)
    w = W[kind][l]  # wo, w2
    if kind == "w2" and geo.hidden != cfg.hidden_dim:
        n = geo.hidden - cfg.hidden_dim
        q = np.pad(w.q, ((0, 0), (0, n)))
        # per-row multipliers cover the padded row; per-group ones get zero groups
        m = w.m if w.group == cfg.hidden_dim else np.pad(w.m, ((0, 0), (0, n // w.group)))
        return q, m
    return w.q, w.m


def split_key(key: str) -> tuple[str, int]:
    """'w13' + '2' -> ('w13', 2); 'cls' -> ('cls', -1)."""
    mt = re.fullmatch(r"(qkv|wo|w13|w2)(\d+)", key)
    return (mt.group(1), int(mt.group(2))) if mt else (key, -1)


def compile_model(model, lanes: int = DEFAULT_LANES, vlanes: int | None = None,
                  kv_par: int | None = None, with_sampling: bool = True,
                  brams: int | None = BRAMS, dsp_pairs: int | None = None,
                  share: int | None = None) -> Plan:
    """BakedModel -> Plan (geometry, bank images, tables, schedule).

    brams: block RAMs of the device (None: no check); a model whose padded weight ROMs and KV cache
    hold more bits than all of them is refused (ValueError) before any image is built."""
    c, f = model.cfg, model.fmt
    formats = matrix_formats(c, f["weights"])
    geo = make_geometry(c, lanes, formats, vlanes, kv_par, dsp_pairs, share)
    if brams is not None:
        check_bram_budget(c, geo, formats, brams)
    banks, place = build_banks(c, geo, formats, model.weights)
    steps = st.model_steps(model)
    pf = padded_formats(c, formats, geo.hidden)
    acc_bits = max(nx.matvec_acc_bits(*pf[fn], k) for _, _, k, fn in virtual_matrices(c, geo))
    inv = nx.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    cos, sin = nx.rope_table(np.arange(c.seq_len), inv)  # (seq_len, head_dim/2) Q14
    N = model.norms
    gains = [N["rms_att_weight"][l] if i == 0 else N["rms_ffn_weight"][l]
             for l in range(c.n_layers) for i in range(2)] + [N["rms_final_weight"]]
    tables = dict(
        rsqrt=[int(v) for v in nx.RSQRT_TABLE],
        exp_hi=[int(v) for v in nx.EXP_HI],
        exp_lo=[int(v) for v in nx.EXP_LO],
        sigmoid=[int(v) for v in nx.SIGMOID_TABLE],
        rope_cos=cos.astype(np.int64), rope_sin=sin.astype(np.int64),
        gains=np.stack([np.asarray(g, dtype=np.int64) for g in gains]),  # (2L+1, dim) int16, in the
        # order of norm_select and of steps.norms()
        score_scale=nx.score_scale(c.head_dim),
    )
    for b in banks:
        assert all(0 <= w < (1 << b.width) for w in b.words)
    return Plan(c, geo, model.identity(), f, banks, place, steps, acc_bits, tables,
                make_schedule(c, with_sampling))


def multipliers(cfg: ModelConfig, R: int, C: int, P: int, Q: int, kv_par: int,
                dsp_pairs: int, share: int = 0) -> dict:
    """MULT18X18D per unit, as yosys maps the units' products (checked against `gateware.area`):
    a product of operands wider than 18 bits takes one block per 18 x 18 piece. `share` e x v
    products run on the engine's packed-pair blocks (counted there)."""
    def pieces(bits: int) -> int:  # signed operand: 18 bits, then 17 more per block
        return 1 if bits <= 18 else 1 + -(-(bits - 18) // 17)
    aw = (cfg.seq_len * nx.EXP_ONE * 128).bit_length() + 1  # attention accumulator
    rbits = ((1 << nx.ATT_RECIP_BITS) // nx.EXP_ONE).bit_length() + 1  # reciprocal, signed
    HP = kv_par * cfg.kv_mul
    return dict(matvec=dsp_pairs * C + R,  # packed pairs + the group multipliers m x partial
                attention=HP * cfg.head_dim - share + P * pieces(aw) * pieces(rbits) + HP,  # e x v,
                # out x recip, Softmax's exp (hi x lo)
                rmsnorm=2 * P, rope=2 * Q, swiglu=2 * Q, sampler=3)


def check_bram_budget(cfg: ModelConfig, geo: Geometry, formats: dict, brams: int = BRAMS):
    """ValueError if the weight ROMs (as laid out) and the KV cache cannot fit `brams` block RAMs
    even when packed without waste (a lower bound: the real mapping needs more)."""
    banks, place = build_banks(cfg, geo, formats, None)
    rom = sum(p.words * banks[p.bank].width for k, p in place.items()
              if not (k == "emb" and cfg.tied_embeddings))
    kv = 2 * cfg.n_layers * cfg.seq_len * cfg.kv_dim * 8
    have = brams * BRAM_BITS
    if rom + kv > have:
        raise ValueError(f"the model does not fit: weight ROMs {rom / 1024:.0f} kbit + KV cache "
                         f"{kv / 1024:.0f} kbit > {brams} block RAMs x 18 kbit = {have / 1024:.0f} "
                         f"kbit (fewer layers, a shorter seq_len or fewer weight bits)")


def norm_select(layer: int, which: str, n_layers: int) -> int:
    """Index into the gain table: 2l (attention), 2l+1 (FFN), 2L (final)."""
    return 2 * n_layers if which == "final" else 2 * layer + (which == "ffn")


def weights_bits(cfg: ModelConfig, formats: dict) -> int:
    """Bits of all weights + multipliers the engine stores (the ROM contents, unpadded)."""
    n = 0
    for _, rows, cols, fname in virtual_matrices(cfg):
        bits, group = formats[fname]
        n += rows * cols * bits + rows * (cols // group) * M_BITS
    return n


def ceil_log2(n: int) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0
