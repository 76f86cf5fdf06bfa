"""BakedLlamaCore: the baked model as a LiteX module (see gateware/INTERFACE.md).

A next-token machine: each token taken on `sink` runs one forward pass at the current position and
puts one token on `source`. The forward pass is the compiler's fixed schedule (compiler.make_schedule)
run by the Sequencer's generated FSM - one state group per step, constants per step wired in - over
these units:

    Embedding (ROM reads through MatVec) --P-wide--> ResidualX (x, dim int16)
    ResidualX --NormFeed, 3 passes--> RMSNorm --int8--> ActRoute --> MatVec.act
    MatVec (lanes, banked weight ROMs) --rows--> Requant --> RowRoute, per matrix:
        qkv: RoPE (RopeTable's cos / sin) -> q -> ActQuant ; k, v -> Attention's KV rows
        wo, w2: x += rows (saturating) ; w13: SwiGLU -> hb -> ActQuant ; cls: Argmax / Sampler
    ActQuant --int8--> ActRoute --> Attention.q / MatVec.act ;  Attention --int8 o--> ActRoute

Every arrow is a stream.Endpoint whose ready is honoured, but Embedding -> ResidualX and the
residual add (fixed pipelines into a register file that takes a word every cycle: plain ports).

model_cfg packing (CSRStatus of 128 bits, 16 bits per field, field 0 in the low bits):
    dim, n_layers, n_heads, n_kv_heads, hidden_dim, vocab_size, seq_len, lanes.
Trace (with_trace=True): write `trace_index` = slot * dim + i, read `trace_data` (int16 sign-extended
to 32 bits) = x[i] of the last forward pass at slot 0 (embedding), 2l+1 (after layer l's attention
block), 2l+2 (after layer l's FFN block). The slots are captured while the next RMSNorm reads x.
"""

from migen import *
from litex.gen import LiteXModule
from litex.soc.interconnect import stream
from litex.soc.interconnect.csr import CSRField, CSRStatus, CSRStorage

from bakedllama import numerics as nx

from gateware import compiler
from gateware import latency as lat
from gateware.attention import Attention
from gateware.hw import (delayed, mul_lut, round_shift, round_shift_bits, saturate, sbits,
                         signed, ubits)
from gateware.matvec import MatVec
from gateware.units import ActQuant, Argmax, RMSNorm, Rope, Sampler, SwiGLU, lanes_of

KIND_QKV, KIND_WO, KIND_W13, KIND_W2, KIND_CLS = range(5)
_KINDS = {"qkv": KIND_QKV, "wo": KIND_WO, "w13": KIND_W13, "w2": KIND_W2, "cls": KIND_CLS}


def make_units(plan: compiler.Plan) -> dict:
    """The datapath's units, built from the plan (the Datapath wires them; gateware.area
    synthesizes each one alone for the per-unit area table)."""
    c, g, f, t = plan.cfg, plan.geo, plan.steps, plan.tables  # f: the pass's constants
    D, H, V, P, Q = c.dim, g.hidden, g.vocab, g.vlanes, g.post  # hidden, vocab: padded
    kmax = max(D, H)
    rope_side, swiglu_side = side_layouts(plan)  # what RowRoute sends through them
    return dict(
        mv=MatVec(plan.banks, g.cols, g.rows, P, kmax, plan.acc_bits, out_lanes=Q,
                  dsp_pairs=g.dsp_pairs, share=g.share),
        rms=RMSNorm(D, P, t["gains"], f.norms()),
        aq=ActQuant(kmax, Q, P),
        att=Attention(c, [s.att for s in f.layers], g.kv_par, P, Q, mul_ext=g.share),
        rope=Rope(Q, side=rope_side),
        swiglu=SwiGLU(Q, f.layers[0].swiglu, side=swiglu_side),  # (one f_h for all layers)
        argmax=Argmax(Q, plan.acc_bits, V, n_valid=c.vocab_size),  # never a pad row
        sampler=Sampler(c.vocab_size, Q, n_fill=V),
    )


class ResidualX(LiteXModule):
    """The residual x (dim int16) in P/Q banks of distributed RAM: bank b, word a holds
    x[a*P + b*Q + (0 .. Q-1)], so x is read P-wide (the norms) and Q-wide (the residual adds).

    p_adr -> p_dat        in / out: x[p_adr*P .. +P), read asynchronously
    q_adr -> q_dat        in / out: x[q_adr*Q .. +Q), read asynchronously
    p_we, p_wadr, p_wdat  in: the P-wide word p_wadr := p_wdat (the embedding; it has priority)
    q_we, q_wdat          in: x[q_adr*Q .. +Q) := q_wdat (a residual add: read, add, write back)
    Writes at the edge. A register file that takes a write every cycle: plain ports, no stream."""

    def __init__(self, D: int, P: int, Q: int):
        NBx = P // Q
        self.p_adr, self.p_wadr = Signal(ubits(D // P)), Signal(ubits(D // P))
        self.q_adr = Signal(ubits(D // Q))
        self.p_dat, self.p_wdat = Signal(P * 16), Signal(P * 16)
        self.q_dat, self.q_wdat = Signal(Q * 16), Signal(Q * 16)
        self.p_we, self.q_we = Signal(), Signal()

        # # #

        x_wa = Signal(ubits(D // P))  # write word
        q_word = self.q_adr >> ubits(NBx - 1) if NBx > 1 else self.q_adr
        xq_bank = Signal(ubits(max(1, NBx - 1)))
        self.comb += xq_bank.eq(self.q_adr & (NBx - 1) if NBx > 1 else 0)
        x_rd, x_qd = [], []
        for b in range(NBx):
            mem = Memory(Q * 16, D // P, name=f"xmem{b}")
            wp = mem.get_port(write_capable=True)
            r1 = mem.get_port(async_read=True)
            r2 = mem.get_port(async_read=True)
            self.specials += mem, wp, r1, r2
            self.comb += [wp.adr.eq(x_wa),
                          wp.dat_w.eq(Mux(self.p_we, self.p_wdat[b * Q * 16:(b + 1) * Q * 16],
                                          self.q_wdat)),
                          wp.we.eq(self.p_we | (self.q_we & (xq_bank == b))),
                          r1.adr.eq(self.p_adr), r2.adr.eq(q_word)]
            x_rd.append(r1.dat_r)
            x_qd.append(r2.dat_r)
        self.comb += [x_wa.eq(Mux(self.p_we, self.p_wadr, q_word)), self.p_dat.eq(Cat(*x_rd)),
                      self.q_dat.eq(Array(x_qd)[xq_bank] if NBx > 1 else x_qd[0])]


class RopeTable(LiteXModule):
    """cos / sin (Q14) of the position's RoPE angles, loaded from a block RAM table.

    pos       in: the position
    load      in: held high, loads one pair a cycle (low: the loader starts again)
    loaded    out: all head_dim / 2 pairs are in cos, sin
    cos, sin  out: head_dim / 2 int16 registers each
    Latency: loaded head_dim / 2 + 1 cycles after load rises (the RAM read, then the register)."""

    def __init__(self, rope_cos, rope_sin, seq_len: int, head_dim: int):
        S, half = seq_len, head_dim // 2
        self.pos = Signal(ubits(S))
        self.load = Signal()
        self.loaded = Signal()
        self.cos = [Signal((16, True), name=f"cos{i}") for i in range(half)]
        self.sin = [Signal((16, True), name=f"sin{i}") for i in range(half)]

        # # #

        rope_words = [(int(rope_sin[p, i]) & 0xFFFF) << 16 | (int(rope_cos[p, i]) & 0xFFFF)
                      for p in range(S) for i in range(half)]
        rope_mem = Memory(32, len(rope_words), init=rope_words)
        rope_rd = rope_mem.get_port(has_re=True)
        self.specials += rope_mem, rope_rd
        rope_i = Signal(ubits(half + 1))
        rope_load_d = Signal()
        rope_i_d = Signal(len(rope_i))
        load = self.load
        self.comb += [rope_rd.adr.eq(self.pos * half + rope_i), rope_rd.re.eq(1),
                      self.loaded.eq(rope_i == half)]
        self.sync += [rope_load_d.eq(load & (rope_i < half)), rope_i_d.eq(rope_i),
                      If(load & (rope_i < half), rope_i.eq(rope_i + 1)),
                      If(~load, rope_i.eq(0))]
        self.sync += If(rope_load_d, Case(rope_i_d, {i: [self.cos[i].eq(rope_rd.dat_r[:16]),
                                                         self.sin[i].eq(rope_rd.dat_r[16:])]
                                                     for i in range(half)}))


class Embedding(LiteXModule):
    """The token's embedding row, dequantized into x (the pass's embed step).

    start, token     in: look the token up (start: one pulse)
    raw_adr, raw_en  out: MatVec's direct ROM reads, one chunk (C weights + m share) a cycle
    word             in: the embedding bank's ROM word (MatVec.roms[bank].dat_r)
    wr, wadr, wdat   out: x's P-wide word wadr := wdat (P int16), a word a cycle
    done             out: the last word is written now

    The chunks' weights and multiplier shares are collected first (a chunk's word is at the ROM
    output lat.ROM_ADR + lat.EMBED_RAW cycles after its read), then dim / P beats are dequantized:
    the beat's weights and multipliers registered after the D/P-way mux (lat.EMBED_MUX), then the
    products and the shift into the write register. A fixed pipeline that x takes a word of every
    cycle, so the hand-off is a plain bundle (cycle_model.embed_cycles counts it)."""

    def __init__(self, plan, adr_bits: int):
        c, g, f = plan.cfg, plan.geo, plan.steps
        D, P, C = c.dim, g.vlanes, g.cols
        pe = plan.place["emb"]
        be = plan.banks[pe.bank]
        self.start = Signal()
        self.token = Signal(16)
        self.raw_adr = Signal(adr_bits)
        self.raw_en = Signal()
        self.word = Signal(be.width)
        self.wr = Signal()
        self.wadr = Signal(ubits(D // P))
        self.wdat = Signal(P * 16)
        self.done = Signal()

        # # #

        emb_q = [Signal((be.bits, True), name=f"eq{i}") for i in range(D)]
        emb_ms = [Signal(be.m_share, name=f"ems{i}") for i in range(pe.chunks)]
        e_ch = Signal(ubits(pe.chunks + 1))
        e_rd = Signal()
        e_rd_d = delayed(self, e_rd, lat.ROM_ADR + lat.EMBED_RAW)
        e_ch_d = delayed(self, e_ch, lat.ROM_ADR + lat.EMBED_RAW)
        Rw = be.rows_per_word
        slot = Signal(ubits(max(1, Rw - 1)))
        rowgroup = Signal(16)
        token = self.token
        self.comb += [slot.eq(token & (Rw - 1)) if Rw > 1 else slot.eq(0),
                      rowgroup.eq(token >> ubits(Rw - 1) if Rw > 1 else token),
                      self.raw_adr.eq(pe.base + rowgroup * pe.chunks + e_ch), self.raw_en.eq(e_rd)]
        self.sync += [If(self.start, e_ch.eq(0), e_rd.eq(1)).Elif(e_rd,
                          If(e_ch == pe.chunks - 1, e_rd.eq(0)), e_ch.eq(e_ch + 1))]
        sw, eb, lb = be.slot_width, be.ext_bits, be.lane_bits
        erom = self.word
        eword = Signal(sw)  # the row's slot: weight fields (their low part) + multiplier share
        self.comb += eword.eq(Array([erom[s * sw:(s + 1) * sw] for s in range(Rw)])[slot])
        if eb:  # the high parts from the slot's extension fields
            ehi = Signal(C * eb)
            self.comb += ehi.eq(Array([erom[be.ext_offset + s * C * eb:][:C * eb]
                                       for s in range(Rw)])[slot])
            lo = lanes_of(self, eword[:C * lb], C, lb, False)
            hi = lanes_of(self, ehi, C, eb)
            eq_now = [signed(self, (h << lb) + lo_, be.bits) for lo_, h in zip(lo, hi)]
        else:
            eq_now = lanes_of(self, eword, C, be.bits)
        self.sync += If(e_rd_d, Case(e_ch_d, {ch: [*[emb_q[ch * C + i].eq(eq_now[i]) for i in range(C)],
                                                   emb_ms[ch].eq(eword[C * lb:C * lb + be.m_share])]
                                              for ch in range(pe.chunks)}))
        cpg = be.chunks_per_group
        emb_m = []
        for gi in range(D // be.group):
            mg = Signal(nx.M_BITS, name=f"em{gi}")
            self.comb += mg.eq(Cat(*emb_ms[gi * cpg:(gi + 1) * cpg]))
            emb_m.append(mg)
        e_emit = Signal()
        e_b = Signal(ubits(D // P))
        e_sh = f.embed
        evals = []
        ewq = Signal(P * be.bits)
        self.comb += ewq.eq(Array([Cat(*emb_q[b * P:(b + 1) * P]) for b in range(D // P)])[e_b])
        ewm = Signal(P * nx.M_BITS)
        self.comb += ewm.eq(Array([Cat(*[emb_m[(b * P + j) // be.group] for j in range(P)])
                                   for b in range(D // P)])[e_b])
        # the beat's weights and multipliers registered after the D/P-way mux (lat.EMBED_MUX),
        # then the products and the shift into x's write register
        ewq1, ewm1 = Signal(len(ewq)), Signal(len(ewm))
        e_emit1, e_b1 = Signal(), Signal(len(e_b))
        self.sync += [ewq1.eq(ewq), ewm1.eq(ewm), e_emit1.eq(e_emit), e_b1.eq(e_b)]
        assert lat.EMBED_MUX == 1
        for j, (qv, mvv) in enumerate(zip(lanes_of(self, ewq1, P, be.bits),
                                          lanes_of(self, ewm1, P, nx.M_BITS, False))):
            prod = mul_lut(self, qv, signed(self, mvv, nx.M_BITS + 1))  # LUT logic, no DSP
            evals.append(saturate(self, round_shift(self, prod, e_sh, (e_sh, e_sh)), 16))
        e_vals = [Signal((16, True)) for _ in range(P)]
        self.sync += [self.wr.eq(e_emit1), self.wadr.eq(e_b1),
                      *[e_vals[j].eq(evals[j]) for j in range(P)],
                      If(e_emit, e_b.eq(e_b + 1), If(e_b == D // P - 1, e_emit.eq(0))),
                      If(e_rd_d & (e_ch_d == pe.chunks - 1), e_emit.eq(1), e_b.eq(0))]
        self.comb += [self.wdat.eq(Cat(*e_vals)),
                      self.done.eq(self.wr & (self.wadr == D // P - 1))]


class NormFeed(LiteXModule):
    """x -> RMSNorm: the whole vector three times (the norm's three passes), P values a beat.

    start, sel    in: begin (a pulse), with norm gain `sel` (compiler.norm_select)
    x_adr, x_dat  out / in: ResidualX's P-wide read
    source        out: the beats (first .. last each pass) for RMSNorm.sink; ready honoured
    nsel          out: the gain being used (RMSNorm.sel)
    trace_index, trace_data  in / out (with_trace): x as the first pass read it, per slot
                  (slot = sel; trace_index = slot * dim + i -> x[i], int16 sign-extended)"""

    def __init__(self, D: int, P: int, n_sel: int, with_trace: bool = False):
        self.start = Signal()
        self.sel = Signal(ubits(n_sel))
        self.nsel = Signal(ubits(n_sel))
        self.x_adr = Signal(ubits(D // P))
        self.x_dat = Signal(P * 16)
        self.source = src = stream.Endpoint([("x", P * 16)])
        self.trace_index = Signal(32)
        self.trace_data = Signal(32)

        # # #

        st_run = Signal()
        st_b = Signal(ubits(D // P))
        st_pass = Signal(2)
        xw = self.x_dat
        self.comb += [self.x_adr.eq(st_b), src.valid.eq(st_run), src.x.eq(xw),
                      src.first.eq(st_b == 0), src.last.eq(st_b == D // P - 1)]
        self.sync += If(src.valid & src.ready,
                        If(st_b == D // P - 1, st_b.eq(0), st_pass.eq(st_pass + 1),
                           If(st_pass == 2, st_run.eq(0))).Else(st_b.eq(st_b + 1)))
        self.sync += If(self.start, self.nsel.eq(self.sel), st_run.eq(1), st_b.eq(0),
                        st_pass.eq(0))
        # trace: x as the norm reads it in its first pass
        if with_trace:
            tmem = Memory(P * 16, n_sel * D // P)
            tw = tmem.get_port(write_capable=True)
            tr = tmem.get_port(async_read=True)
            self.specials += tmem, tw, tr
            self.comb += [tw.adr.eq(self.nsel * (D // P) + st_b), tw.dat_w.eq(xw),
                          tw.we.eq(src.valid & src.ready & (st_pass == 0))]
            self.comb += tr.adr.eq(self.trace_index >> ubits(P - 1))
            tsel = Signal((16, True))
            self.comb += tsel.eq(Array([tr.dat_r[16 * j:16 * j + 16] for j in range(P)])[
                self.trace_index[:ubits(P - 1)]])
            self.comb += self.trace_data.eq(tsel)


class ActRoute(LiteXModule):
    """Which vector fills MatVec's activations, and ActQuant's output to the attention's q.

    sel, en   in: the source (0 RMSNorm, 1 ActQuant, 2 Attention); en: it flows now
    to_att    in: ActQuant's output goes to the attention's q instead
    sinks     three streams of P int8 + k (the sources, in sel order); a source not selected
              (or not enabled) waits: ready honoured
    source    -> MatVec.act_sink;  q -> Attention.q_sink
    k         out: the shift of the last vector sent to MatVec (registered with its last beat)
    last      out: the last beat to MatVec is taken now;  q_last: the last beat of q is taken now
    Combinational (but for k)."""

    def __init__(self, P: int):
        layout = [("a", P * 8), ("k", ubits(16))]
        self.sel = Signal(2)
        self.en = Signal()
        self.to_att = Signal()
        self.sinks = [stream.Endpoint(layout) for _ in range(3)]
        self.source = stream.Endpoint([("a", P * 8)])
        self.q = stream.Endpoint(layout)
        self.k = Signal(5)
        self.last, self.q_last = Signal(), Signal()

        # # #

        srcs, sel, en, dst, q = self.sinks, self.sel, self.en, self.source, self.q
        self.comb += [
            dst.valid.eq(Array([s.valid for s in srcs])[sel] & en),
            dst.a.eq(Array([s.a for s in srcs])[sel]),
            dst.last.eq(Array([s.last for s in srcs])[sel]),
            dst.first.eq(Array([s.first for s in srcs])[sel]),
            srcs[0].ready.eq((sel == 0) & en & dst.ready),
            srcs[1].ready.eq(((sel == 1) & en & dst.ready) | (self.to_att & q.ready)),
            srcs[2].ready.eq((sel == 2) & en & dst.ready),
            q.valid.eq(srcs[1].valid & self.to_att), q.a.eq(srcs[1].a),
            q.k.eq(srcs[1].k), q.last.eq(srcs[1].last), q.first.eq(srcs[1].first),
        ]
        act_k = Signal(5)
        self.comb += act_k.eq(Array([s.k for s in srcs])[sel])
        self.comb += [self.last.eq(dst.valid & dst.ready & dst.last),
                      self.q_last.eq(q.valid & q.ready & q.last)]
        self.sync += If(self.last, self.k.eq(act_k))


def requant_bases(plan) -> dict:
    """C[kind, layer, seg]: the requantization shift is C - k_act (steps.Requant.base); the
    segments of qkv are q, k, v, those of w13 h1, h3."""
    f = plan.steps
    Cs = {}
    for l in range(plan.cfg.n_layers):
        L = f.layers[l]
        for sg, st in enumerate((L.wq, L.wk, L.wv)):
            Cs[(KIND_QKV, l, sg)] = st.base
        Cs[(KIND_WO, l, 0)] = L.wo.base
        Cs[(KIND_W13, l, 0)] = L.w1.base
        Cs[(KIND_W13, l, 1)] = L.w3.base
        Cs[(KIND_W2, l, 0)] = L.w2.base
    Cs[(KIND_CLS, 0, 0)] = f.cls.base
    return Cs


def post_layout(plan, rw: int) -> list:
    """Requant.source / RowRoute.sink: a beat of requantized rows."""
    Q = plan.geo.post
    return [("req", Q * rw), ("acc", Q * plan.acc_bits), ("seg", 2),
            ("r0", row_bits(plan)), ("beat", beat_bits(plan))]


def row_bits(plan) -> int:
    """Bits of a row index of any matrix (qkv rows are q, k, v one after another)."""
    c, g = plan.cfg, plan.geo
    return ubits(max(g.vocab, 2 * g.hidden, c.dim + 2 * c.kv_dim))


def beat_bits(plan) -> int:
    """Bits of MatVec.source.beat."""
    return ubits(max(b.depth * b.rows_per_word for b in plan.banks) // plan.geo.post)


def side_layouts(plan) -> tuple:
    """The side fields that travel through Rope (segment, row) and SwiGLU (row)."""
    return [("seg", 2), ("r0", row_bits(plan))], [("idx", row_bits(plan))]


class Requant(LiteXModule):
    """Row post-processing, first part: the engine's beats requantized (numerics.requantize).

    sink      MatVec.source: Q accumulators a beat, `beat` index, last
    kind, layer, k_act  in: the matrix running (KIND_*), its layer, its activations' shift
    source    out (post_layout): req (Q requantized values, before saturation), acc (the raw
              accumulators), seg (q / k / v of qkv, h1 / h3 of w13), r0 (the beat's first row),
              beat, last; ready honoured (both stages stall)

    shift = C[kind][layer][seg] - k_act (requant_bases). Stage 0 (lat.ROWPOST_IN): the beat and
    its shift registered, so the FIFO read, the shift selection and the barrel shifter are not
    one path; stage 1: the rounded shift. Latency: lat.ROWPOST_IN + 1 cycles."""

    def __init__(self, plan, k_hi: int, beat_layout: list):
        c, g = plan.cfg, plan.geo
        D, KVD, NL, Q = c.dim, c.kv_dim, c.n_layers, g.post
        acc_bits = plan.acc_bits
        Cs = requant_bases(plan)
        c_lo, c_hi = min(Cs.values()), max(Cs.values())
        sh_range = (c_lo - k_hi, c_hi)
        self.rw = rw = round_shift_bits(acc_bits, sh_range)
        self.sink = src = stream.Endpoint(beat_layout)
        self.kind = Signal(3)
        self.layer = Signal(ubits(max(1, NL - 1)))
        self.k_act = Signal(5)
        self.source = dst = stream.Endpoint(post_layout(plan, rw))

        # # #

        kind, layer = self.kind, self.layer
        r0 = Signal(row_bits(plan))
        self.comb += r0.eq(src.beat * Q)
        seg = Signal(2)
        self.comb += [
            If(kind == KIND_QKV,
                If(r0 < D, seg.eq(0)).Elif(r0 < D + KVD, seg.eq(1)).Else(seg.eq(2))
            ).Elif(kind == KIND_W13, seg.eq(src.beat[0])).Else(seg.eq(0)),
        ]
        csel = Signal((sbits(c_lo, c_hi) + 1, True))
        cases = {}
        for (kd, l, sg), v in Cs.items():
            cases.setdefault(kd, {}).setdefault(l, {})[sg] = csel.eq(v)
        self.comb += Case(kind, {kd: Case(layer, {l: Case(seg, sgs) for l, sgs in ls.items()})
                                 if kd != KIND_CLS else ls[0][0]
                                 for kd, ls in cases.items()})
        ce = Signal()
        self.comb += [ce.eq(~dst.valid | dst.ready), src.ready.eq(ce)]
        # stage 0 (lat.ROWPOST_IN)
        assert lat.ROWPOST_IN == 1
        rshift = Signal((sbits(*sh_range) + 1, True))
        acc0 = Signal(len(src.acc))
        v0, last0, seg0 = Signal(), Signal(), Signal(2)
        r00 = Signal(len(r0))
        beat0 = Signal(len(src.beat))
        self.sync += If(ce, rshift.eq(csel - self.k_act), acc0.eq(src.acc), v0.eq(src.valid),
                        last0.eq(src.last), seg0.eq(seg), r00.eq(r0), beat0.eq(src.beat))
        # stage 1: requantized values (wide) + control
        req = [round_shift(self, a, rshift, sh_range) for a in lanes_of(self, acc0, Q, acc_bits)]
        self.sync += If(ce, dst.valid.eq(v0), dst.last.eq(last0), dst.seg.eq(seg0),
                        dst.r0.eq(r00), dst.beat.eq(beat0), dst.req.eq(Cat(*req)),
                        dst.acc.eq(acc0))


class RowRoute(LiteXModule):
    """Row post-processing, second part: each kind of matrix's rows to their destination.

        qkv     -> RoPE (v with cos = 1, sin = 0: the identity) -> q: ActQuant;
                   k (quantized for the key cache), v: Attention.kv_sink
        w13     -> h1 held, with h3 -> SwiGLU -> hb: ActQuant
        wo, w2  -> x += rows (saturating), in place
        cls     -> Argmax (the accumulators) and the Sampler (the Q8 logits)

    sink        Requant.source; its ready is the kind's destination's (h1 beats: always)
    kind, layer in: the matrix running
    cos, sin    in: RopeTable's registers
    to_rope / from_rope, to_swiglu / from_swiglu  Rope's and SwiGLU's sink and source; the row
                index, the segment (side_layouts) and last travel through them beside the data
    to_aq       ActQuant.fill (q from RoPE, hb from SwiGLU);  to_kv: Attention.kv_sink
    to_argmax, to_sampler  Argmax.sink, Sampler.fill
    x_adr, x_dat, x_wdat, x_we  ResidualX's Q-wide port: the residual add reads, adds, writes back
    done        out: the matrix's last row reached its destination (Argmax's result aside)
    Every stream honours ready. Combinational, but for the held h1 beat."""

    def __init__(self, plan, rw: int):
        c, g, f = plan.cfg, plan.geo, plan.steps
        D, KVD, NL, hd = c.dim, c.kv_dim, c.n_layers, c.head_dim
        Q = g.post
        acc_bits = plan.acc_bits
        half = hd // 2
        rope_side, swiglu_side = side_layouts(plan)
        self.sink = src = stream.Endpoint(post_layout(plan, rw))
        self.kind = Signal(3)
        self.layer = Signal(ubits(max(1, NL - 1)))
        self.cos = [Signal((16, True)) for _ in range(half)]
        self.sin = [Signal((16, True)) for _ in range(half)]
        self.to_rope = to_rope = stream.Endpoint([("x", Q * 16), ("cos", Q // 2 * 16),
                                                  ("sin", Q // 2 * 16), *rope_side])
        self.from_rope = from_rope = stream.Endpoint([("x", Q * 16), *rope_side])
        self.to_swiglu = to_sw = stream.Endpoint([("h1", Q * 16), ("h3", Q * 16), *swiglu_side])
        self.from_swiglu = from_sw = stream.Endpoint([("hb", Q * 16), *swiglu_side])
        self.to_aq = to_aq = stream.Endpoint([("v", Q * 16), ("idx", ubits(max(D, g.hidden)))])
        self.to_kv = to_kv = stream.Endpoint([("v", Q * 8), ("idx", ubits(KVD)), ("is_v", 1)])
        self.to_argmax = stream.Endpoint([("v", Q * acc_bits)])
        self.to_sampler = stream.Endpoint([("v", Q * 32)])
        self.x_adr = Signal(ubits(D // Q))
        self.x_dat, self.x_wdat = Signal(Q * 16), Signal(Q * 16)
        self.x_we = Signal()
        self.done = Signal()

        # # #

        kind = self.kind
        req1 = lanes_of(self, src.req, Q, rw)
        acc1 = lanes_of(self, src.acc, Q, acc_bits)
        v1, last1, seg1, r01, beat1 = src.valid, src.last, src.seg, src.r0, src.beat
        sat16 = [saturate(self, r, 16) for r in req1]
        sat8 = [saturate(self, r, 8) for r in req1]
        is_qkv, is_w13, is_res, is_cls = Signal(), Signal(), Signal(), Signal()
        self.comb += [is_qkv.eq(v1 & (kind == KIND_QKV)), is_w13.eq(v1 & (kind == KIND_W13)),
                      is_res.eq(v1 & ((kind == KIND_WO) | (kind == KIND_W2))),
                      is_cls.eq(v1 & (kind == KIND_CLS))]
        self.comb += src.ready.eq(
            ((kind == KIND_QKV) & to_rope.ready) | ((kind == KIND_W13) & (~beat1[0] | to_sw.ready)) |
            (kind == KIND_WO) | (kind == KIND_W2) |
            ((kind == KIND_CLS) & self.to_argmax.ready & self.to_sampler.ready))
        take = Signal()
        self.comb += take.eq(src.valid & src.ready)
        # qkv: everything through RoPE (v with cos = 1, sin = 0: the identity)
        pair0 = Signal(ubits(half))
        self.comb += pair0.eq((r01 % hd) >> 1 if hd & (hd - 1) else r01[1:ubits(hd - 1)])
        rc, rsn = [], []
        for i in range(Q // 2):
            cv, sv = Signal((16, True)), Signal((16, True))
            self.comb += [
                cv.eq(Mux(seg1 == 2, 1 << nx.ROPE_FRAC, Array(self.cos)[pair0 + i])),
                sv.eq(Mux(seg1 == 2, 0, Array(self.sin)[pair0 + i])),
            ]
            rc.append(cv)
            rsn.append(sv)
        self.comb += [
            to_rope.valid.eq(is_qkv),
            to_rope.x.eq(Cat(*[Mux(seg1 == 2, sat8[j], sat16[j])[:16] for j in range(Q)])),
            to_rope.cos.eq(Cat(*rc)), to_rope.sin.eq(Cat(*rsn)),
            to_rope.seg.eq(seg1), to_rope.r0.eq(r01), to_rope.last.eq(last1),
        ]
        rv = lanes_of(self, from_rope.x, Q, 16)
        ekl = Array([Constant(f.layers[l].k_cache, (8, True)) for l in range(NL)])  # k -> key cache
        kshift = Signal((8, True))
        self.comb += kshift.eq(ekl[self.layer])
        ks_lo = min(f.layers[l].k_cache for l in range(NL))
        ks_hi = max(f.layers[l].k_cache for l in range(NL))
        kq8 = [saturate(self, round_shift(self, v, kshift, (ks_lo, ks_hi)), 8) for v in rv]
        qkv_seg, qkv_r0 = from_rope.seg, from_rope.r0
        self.comb += from_rope.ready.eq(Mux(qkv_seg == 0, to_aq.ready, to_kv.ready))
        # w13: h1 beat held, h3 beat -> SwiGLU
        h1_hold = Signal(Q * 16)
        self.sync += If(take & is_w13 & ~beat1[0], h1_hold.eq(Cat(*sat16)))
        self.comb += [
            to_sw.valid.eq(is_w13 & beat1[0]),
            to_sw.h1.eq(h1_hold), to_sw.h3.eq(Cat(*sat16)),
            to_sw.last.eq(last1), to_sw.idx.eq((beat1 >> 1) * Q),
        ]
        # ActQuant fill from q (qkv) or hb (w13)
        from_q = Signal()
        self.comb += from_q.eq(from_rope.valid & (qkv_seg == 0))
        self.comb += [
            to_aq.valid.eq(from_q | from_sw.valid),
            If(from_q,
                to_aq.v.eq(from_rope.x), to_aq.idx.eq(qkv_r0),
                to_aq.first.eq(qkv_r0 == 0), to_aq.last.eq(qkv_r0 == D - Q)
            ).Else(
                to_aq.v.eq(from_sw.hb), to_aq.idx.eq(from_sw.idx),
                to_aq.first.eq(from_sw.idx == 0), to_aq.last.eq(from_sw.last)),
            from_sw.ready.eq(to_aq.ready & ~from_q),
        ]
        # KV rows
        self.comb += [
            to_kv.valid.eq(from_rope.valid & (qkv_seg != 0)),
            to_kv.is_v.eq(qkv_seg == 2),
            to_kv.idx.eq(Mux(qkv_seg == 2, qkv_r0 - D - KVD, qkv_r0 - D)),
            to_kv.v.eq(Cat(*[Mux(qkv_seg == 2, rv[j], kq8[j])[:8] for j in range(Q)])),
        ]
        # wo / w2: residual add
        xnew = [saturate(self, signed(self, xv + r, rw + 1), 16)
                for xv, r in zip(lanes_of(self, self.x_dat, Q, 16), req1)]
        self.comb += [self.x_adr.eq(beat1), self.x_wdat.eq(Cat(*xnew)), self.x_we.eq(take & is_res)]
        # cls: argmax on the accumulators, Q8 logits to the sampler
        self.comb += [
            self.to_argmax.valid.eq(is_cls), self.to_argmax.v.eq(Cat(*acc1)),
            self.to_argmax.last.eq(last1), self.to_argmax.first.eq(r01 == 0),
            # greedy too: the logit readback
            self.to_sampler.valid.eq(is_cls), self.to_sampler.last.eq(last1),
            self.to_sampler.v.eq(Cat(*[saturate(self, r, 32) for r in req1])),
        ]
        # done: the last beat reached its destination
        self.comb += self.done.eq(
            (from_rope.valid & from_rope.ready & from_rope.last) |
            (from_sw.valid & from_sw.ready & from_sw.last) | (take & is_res & last1))


class Sequencer(LiteXModule):
    """The forward pass: the compiler's fixed schedule (compiler.make_schedule) as an FSM, one
    state group per step with the step's constants wired in; the position, reset and rewind, the
    pass's cycle counter.

    sink, source   a token in starts a pass; its output token out (BakedLlamaCore's streams)
    reset, rewind, rewind_pos, temperature  in: BakedLlamaCore's control (taken in IDLE)
    pos, busy, full, cycles  out: status
    token, inv_temp          out: the pass's token and 1/T
    emb_start / emb_done, rope_load / rope_loaded     the embed step (Embedding, RopeTable)
    norm_start, norm_sel     a norm step (NormFeed)
    act_sel, act_en, act_last, aq_to_att, q_last     the activation routing (ActRoute)
    cmd            a matrix for MatVec (stream, ready honoured); kind, layer: the matrix running
    post_done      in: its last row reached its destination
    att_start      the attention step (Attention: at `pos` of `layer`)
    argmax         sink: Argmax's result (always ready); smp_*: the Sampler's start, done, token,
                   reseed (on ctrl reset) and seeding"""

    def __init__(self, plan, n_sel: int, cmd_layout: list):
        c = plan.cfg
        S, NL = c.seq_len, c.n_layers
        sched = plan.schedule
        self.sink = sink = stream.Endpoint([("token", 16)])
        self.source = source = stream.Endpoint([("token", 16)])
        self.reset, self.rewind = Signal(), Signal()
        self.rewind_pos = Signal(16)
        self.temperature = Signal(16)
        self.pos = Signal(ubits(S))
        self.busy, self.full = Signal(), Signal()
        self.cycles = Signal(32)
        self.token = token = Signal(16)
        self.inv_temp = inv_temp = Signal(16)
        self.emb_start, self.emb_done = Signal(), Signal()
        self.rope_load, self.rope_loaded = Signal(), Signal()
        self.norm_start, self.norm_sel = Signal(), Signal(ubits(n_sel))
        self.act_sel = act_src = Signal(2)  # 0 RMSNorm, 1 ActQuant, 2 Attention
        self.act_en, self.act_last = Signal(), Signal()
        self.aq_to_att, self.q_last = Signal(), Signal()
        self.cmd = cmd = stream.Endpoint(cmd_layout)
        self.kind = kind = Signal(3)
        self.layer = layer = Signal(ubits(max(1, NL - 1)))
        self.post_done = Signal()
        self.att_start = Signal()
        self.argmax = stream.Endpoint([("index", 16)])
        self.smp_start, self.smp_done, self.smp_token = Signal(), Signal(), Signal(16)
        self.smp_reseed, self.smp_seeding = Signal(), Signal()

        # # #

        self.fsm = fsm = FSM(reset_state="IDLE")
        out_token = Signal(16)
        greedy = Signal()
        cnt = Signal(32)
        reset_pending = Signal()
        self.sync += If(self.reset, reset_pending.eq(1))
        # rewind: position := rewind_pos (only backwards; the KV cache past it is overwritten as
        # the next tokens come), taken in IDLE like the reset; the PRNG keeps its state
        rewind_pending = Signal()
        rw_pos = Signal(len(self.rewind_pos))
        self.sync += If(self.rewind, rewind_pending.eq(1), rw_pos.eq(self.rewind_pos))
        am = self.argmax
        am_token = Signal(16)
        self.comb += am.ready.eq(1)
        self.sync += If(am.valid, am_token.eq(am.index))
        post_done = Signal()
        self.comb += post_done.eq(self.post_done | am.valid)
        emb_fin = Signal()
        names = [f"S{i}_{s.kind}" for i, s in enumerate(sched)]
        self.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        self.comb += [self.full.eq(self.pos == S), sink.ready.eq(fsm.ongoing("IDLE") &
                      (self.pos != S) & ~reset_pending & ~rewind_pending & ~self.smp_seeding)]
        self.sync += If(~fsm.ongoing("IDLE") & ~fsm.ongoing("OUT"), cnt.eq(cnt + 1))
        fsm.act("IDLE",
            If(reset_pending,
                NextValue(self.pos, 0), NextValue(reset_pending, 0), self.smp_reseed.eq(1)
            ).Elif(rewind_pending,
                If(rw_pos <= self.pos, NextValue(self.pos, rw_pos)), NextValue(rewind_pending, 0)
            ).Elif(sink.valid & sink.ready,
                NextValue(token, sink.token), NextValue(cnt, 0),
                NextValue(greedy, self.temperature == 0), NextValue(inv_temp, self.temperature),
                NextState(names[0])))
        mv_sent = Signal()
        for i, step in enumerate(sched):
            name = names[i]
            nxt = names[i + 1] if i + 1 < len(sched) else "IDLE"
            k = step.kind
            if k == "embed":
                fsm.act(name, self.emb_start.eq(1), self.rope_load.eq(1), NextValue(emb_fin, 0),
                        NextState(name + "_w"))
                fsm.act(name + "_w", self.rope_load.eq(1),
                        If(self.emb_done, NextValue(emb_fin, 1)),
                        If((emb_fin | self.emb_done) & self.rope_loaded, NextState(nxt)))
            elif k == "norm":
                fsm.act(name,
                    self.norm_start.eq(1),
                    self.norm_sel.eq(compiler.norm_select(step.layer, step.arg, NL)),
                    NextValue(act_src, 0), NextState(name + "_w"))
                fsm.act(name + "_w", self.act_en.eq(1), If(self.act_last, NextState(nxt)))
            elif k == "mv":
                p = plan.place[step.arg]
                kd, lyr = compiler.split_key(step.arg)
                fsm.act(name,
                    NextValue(kind, _KINDS[kd]), NextValue(layer, max(lyr, 0)),
                    NextValue(mv_sent, 0), NextState(name + "_w"))
                fsm.act(name + "_w",
                    cmd.valid.eq(~mv_sent), cmd.bank.eq(p.bank), cmd.base.eq(p.base),
                    cmd.chunks.eq(p.chunks), cmd.rowgroups.eq(p.rowgroups),
                    If(cmd.ready, NextValue(mv_sent, 1)),
                    If(post_done, NextState(nxt)))
            elif k == "qemit":
                fsm.act(name, self.aq_to_att.eq(1), If(self.q_last, NextState(nxt)))
            elif k == "attn":
                fsm.act(name,
                    NextValue(layer, step.layer), NextValue(act_src, 2), NextState(name + "_s"))
                fsm.act(name + "_s", self.att_start.eq(1), NextState(name + "_w"))
                fsm.act(name + "_w", self.act_en.eq(1), If(self.act_last, NextState(nxt)))
            elif k == "hemit":
                fsm.act(name, NextValue(act_src, 1), NextState(name + "_w"))
                fsm.act(name + "_w", self.act_en.eq(1), If(self.act_last, NextState(nxt)))
            elif k == "sample":
                fsm.act(name,
                    If(greedy, NextValue(out_token, am_token), NextState(nxt)).Else(
                        self.smp_start.eq(1), NextState(name + "_w")))
                fsm.act(name + "_w", If(self.smp_done, NextValue(out_token, self.smp_token),
                                        NextState(nxt)))
            elif k == "out":
                fsm.act(name,
                    NextValue(self.cycles, cnt + 2), NextState("OUT"))
        fsm.act("OUT",
            source.valid.eq(1),
            If(source.ready, NextValue(self.pos, self.pos + 1), NextState("IDLE")))
        if not any(s.kind == "sample" for s in sched):
            self.sync += If(am.valid, out_token.eq(am.index))
        self.comb += [source.token.eq(out_token), source.last.eq(1)]


class Datapath(Module):
    """Everything with memories (weight ROMs, KV cache, tables) lives here, outside the AutoCSR core.

    A plain Module (not a LiteXModule), so LiteX's AutoCSR never reaches the memories of its units
    (it would give each a CSR port). It builds the units and wires them (the data flow at the top
    of this file); the Sequencer runs them."""

    def __init__(self, plan: compiler.Plan, sink, source, with_trace: bool = False):
        c, g = plan.cfg, plan.geo
        D, NL = c.dim, c.n_layers
        P, Q = g.vlanes, g.post
        t = plan.tables
        self.plan = plan
        n_sel = 2 * NL + 1

        # ---------------------------------------------------------------- units
        units = make_units(plan)
        for name, u in units.items():
            setattr(self.submodules, name, u)
        mv, rms, aq, att = units["mv"], units["rms"], units["aq"], units["att"]
        rope, swiglu, amax, smp = units["rope"], units["swiglu"], units["argmax"], units["sampler"]
        self.submodules.seq = seq = Sequencer(plan, n_sel, mv.cmd.description.payload_layout)
        self.submodules.x = xs = ResidualX(D, P, Q)
        self.submodules.rope_table = rt = RopeTable(t["rope_cos"], t["rope_sin"], c.seq_len,
                                                    c.head_dim)
        self.submodules.embedding = emb = Embedding(plan, len(mv.raw_adr))
        self.submodules.feed = feed = NormFeed(D, P, n_sel, with_trace)
        self.submodules.act = act = ActRoute(P)
        self.submodules.requant = rq = Requant(plan, max(rms.k_max, 16 - 7, att.k_max),
                                               mv.source.description.payload_layout)
        self.submodules.route = route = RowRoute(plan, rq.rw)

        # control / status (driven by the LiteX wrapper)
        self.reset, self.rewind, self.rewind_pos = seq.reset, seq.rewind, seq.rewind_pos
        self.temperature = seq.temperature
        self.seed = smp.seed
        self.busy, self.full, self.pos, self.cycles = seq.busy, seq.full, seq.pos, seq.cycles
        self.trace_index, self.trace_data = feed.trace_index, feed.trace_data
        self.logit_index, self.logit_data = smp.rd_index, smp.rd_data
        self.sample_base, self.sample_weight, self.sample_total = smp.base, smp.weight, smp.total

        # # #

        self.comb += [sink.connect(seq.sink), seq.source.connect(source)]
        if g.share:  # the attention's e x v on the engine's multipliers (the sequencer runs the
            # attention only while the engine is idle)
            self.comb += [mv.mul_sel.eq(att.busy), mv.mul_a.eq(att.mul_a), mv.mul_b.eq(att.mul_b),
                          att.mul_p.eq(mv.mul_p)]
        # embedding -> x (P-wide), with the position's RoPE table
        pe = plan.place["emb"]
        self.comb += [emb.start.eq(seq.emb_start), emb.token.eq(seq.token),
                      mv.raw_adr.eq(emb.raw_adr), mv.raw_en.eq(emb.raw_en),
                      emb.word.eq(mv.roms[pe.bank].dat_r), seq.emb_done.eq(emb.done),
                      xs.p_we.eq(emb.wr), xs.p_wadr.eq(emb.wadr), xs.p_wdat.eq(emb.wdat),
                      rt.pos.eq(seq.pos), rt.load.eq(seq.rope_load), seq.rope_loaded.eq(rt.loaded)]
        # x -> RMSNorm (three passes)
        self.comb += [feed.start.eq(seq.norm_start), feed.sel.eq(seq.norm_sel),
                      xs.p_adr.eq(feed.x_adr), feed.x_dat.eq(xs.p_dat),
                      feed.source.connect(rms.sink), rms.sel.eq(feed.nsel)]
        # activations: RMSNorm / ActQuant / Attention -> MatVec; ActQuant -> Attention's q
        self.comb += [act.sel.eq(seq.act_sel), act.en.eq(seq.act_en), act.to_att.eq(seq.aq_to_att),
                      rms.source.connect(act.sinks[0]), aq.source.connect(act.sinks[1]),
                      att.source.connect(act.sinks[2]), act.source.connect(mv.act_sink),
                      act.q.connect(att.q_sink),
                      seq.act_last.eq(act.last), seq.q_last.eq(act.q_last)]
        # MatVec -> row post-processing -> RoPE / SwiGLU / ActQuant / KV rows / x / Argmax, Sampler
        self.comb += [seq.cmd.connect(mv.cmd), mv.source.connect(rq.sink), rq.source.connect(route.sink),
                      rq.kind.eq(seq.kind), rq.layer.eq(seq.layer), rq.k_act.eq(act.k),
                      route.kind.eq(seq.kind), route.layer.eq(seq.layer),
                      *[a.eq(b) for a, b in zip(route.cos + route.sin, rt.cos + rt.sin)],
                      route.to_rope.connect(rope.sink), rope.source.connect(route.from_rope),
                      route.to_swiglu.connect(swiglu.sink), swiglu.source.connect(route.from_swiglu),
                      route.to_aq.connect(aq.fill), route.to_kv.connect(att.kv_sink),
                      route.to_argmax.connect(amax.sink), route.to_sampler.connect(smp.fill),
                      xs.q_adr.eq(route.x_adr), route.x_dat.eq(xs.q_dat),
                      xs.q_we.eq(route.x_we), xs.q_wdat.eq(route.x_wdat),
                      seq.post_done.eq(route.done), amax.source.connect(seq.argmax)]
        # attention, sampler
        self.comb += [att.start.eq(seq.att_start), att.layer.eq(seq.layer), att.pos.eq(seq.pos),
                      smp.start.eq(seq.smp_start), seq.smp_done.eq(smp.done),
                      seq.smp_token.eq(smp.token), smp.reseed.eq(seq.smp_reseed),
                      seq.smp_seeding.eq(smp.seeding), smp.inv_temp.eq(seq.inv_temp)]


class BakedLlamaCore(LiteXModule):
    """The baked model as a next-token machine (gateware/INTERFACE.md)."""

    def __init__(self, model=None, lanes: int = compiler.DEFAULT_LANES, with_trace: bool = False,
                 vlanes: int | None = None, kv_par: int | None = None, plan=None,
                 dsp_pairs: int | None = None):
        if plan is None:
            if model is None:
                raise ValueError("BakedLlamaCore needs a BakedModel (or a compiled plan)")
            plan = compiler.compile_model(model, lanes, vlanes, kv_par, dsp_pairs=dsp_pairs)
        c = plan.cfg
        self.plan = plan
        self.sink = stream.Endpoint([("token", 16)])
        self.source = stream.Endpoint([("token", 16)])
        self.ctrl = CSRStorage(fields=[
            CSRField("reset", size=1, pulse=True,
                     description="Start a new sequence: position := 0, PRNG := seeded from `seed`."),
            CSRField("rewind", size=1, pulse=True,
                     description="Set the position back to `rewind_pos` (ignored if it is past the "
                                 "current position); the PRNG keeps its state."),
        ], description="Control.")
        self.rewind_pos = CSRStorage(16, description="Position that ctrl.rewind sets (speculative "
                                     "decoding: continue from the last accepted token).")
        self.temperature = CSRStorage(16, description="1/T in Q8 (numerics.temperature_q8); 0 = greedy. "
                                      "The PRNG advances only on passes with temperature != 0.")
        self.seed = CSRStorage(32, description="PRNG seed, loaded on ctrl.reset (numerics.XorShift32).")
        self.status = CSRStatus(fields=[
            CSRField("busy", size=1, description="A forward pass is running."),
            CSRField("full", size=1, description="Position == seq_len: no token is accepted."),
            CSRField("pos", size=16, description="Position of the next token."),
        ], description="Status.")
        self.cycles = CSRStatus(32, description="Clock cycles of the last forward pass "
                                "(sink accept -> source valid).")
        self.model_id = CSRStatus(32, reset=plan.identity,
                                  description="Baked model identity (first 32 bits of its sha256).")
        cfg_fields = ["dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                      "seq_len", "lanes"]
        cfg_vals = dict(c.to_dict(), lanes=plan.geo.lanes)
        self.model_cfg = CSRStatus(fields=[CSRField(n, size=16, description=f"Model {n}.")
                                           for n in cfg_fields],
                                   description="Baked model configuration (16 bits per field).")
        self.logit_index = CSRStorage(16, description="Logit readback: vocabulary index (read "
                                      "`logit_data` while no pass runs).")
        self.logit_data = CSRStatus(32, description="The last pass's Q8 logit at `logit_index` "
                                    "(the sampler's input, numerics: Logits.q8).")
        # the last sampled token's draw (temperature != 0; numerics.sample_counts)
        self.sample_base = CSRStatus(32, description="Sampler: the weights' running sum before the "
                                     "last drawn token.")
        self.sample_weight = CSRStatus(32, description="Sampler: the last drawn token's weight.")
        self.sample_total = CSRStatus(32, description="Sampler: the sum of all weights of that draw.")
        if with_trace:
            self.trace_index = CSRStorage(32, description="Trace element: slot * dim + i "
                                          "(slot 0 embedding, 2l+1 after attention l, 2l+2 after FFN l).")
            self.trace_data = CSRStatus(32, description="Trace value x[i] at the slot (int16, "
                                        "sign-extended).")

        # # #

        self.dp = dp = Datapath(plan, self.sink, self.source, with_trace)
        self.comb += [
            dp.reset.eq(self.ctrl.fields.reset),
            dp.rewind.eq(self.ctrl.fields.rewind),
            dp.rewind_pos.eq(self.rewind_pos.storage),
            dp.temperature.eq(self.temperature.storage),
            dp.seed.eq(self.seed.storage),
            self.status.fields.busy.eq(dp.busy),
            self.status.fields.full.eq(dp.full),
            self.status.fields.pos.eq(dp.pos),
            self.cycles.status.eq(dp.cycles),
            self.model_id.status.eq(plan.identity),
            dp.logit_index.eq(self.logit_index.storage),
            self.logit_data.status.eq(dp.logit_data),
            self.sample_base.status.eq(dp.sample_base),
            self.sample_weight.status.eq(dp.sample_weight),
            self.sample_total.status.eq(dp.sample_total),
        ]
        for n in cfg_fields:
            self.comb += getattr(self.model_cfg.fields, n).eq(cfg_vals[n])
        if with_trace:
            self.comb += [dp.trace_index.eq(self.trace_index.storage),
                          self.trace_data.status.eq(dp.trace_data)]
