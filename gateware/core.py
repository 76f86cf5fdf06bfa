"""BakedLlamaCore: the baked model as a LiteX module (see gateware/INTERFACE.md).

A next-token machine: each token taken on `sink` runs one forward pass at the current position and
puts one token on `source`. The forward pass is the compiler's fixed schedule (compiler.make_schedule)
run by a generated FSM - one state group per step, constants per step wired in - over these units:

    x (residual, dim x int16 registers) --3 passes--> RMSNorm --int8--> MatVec.act
    MatVec (lanes, banked weight ROMs) --rows--> RowPost: requantize, then per matrix:
        qkv: RoPE -> q -> ActQuant ; k, v -> Attention's KV rows
        wo, w2: x += rows (saturating) ; w13: SwiGLU -> hb -> ActQuant ; cls: Argmax / Sampler
    ActQuant --int8--> Attention.q / MatVec.act ;  Attention --int8 o--> MatVec.act

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
from gateware.hw import mul_lut, round_shift, saturate, sbits, signed, ubits
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
    return dict(
        mv=MatVec(plan.banks, g.cols, g.rows, P, kmax, plan.acc_bits, out_lanes=Q,
                  dsp_pairs=g.dsp_pairs, share=g.share),
        rms=RMSNorm(D, P, t["gains"], f.norms()),
        aq=ActQuant(kmax, Q, P),
        att=Attention(c, [s.att for s in f.layers], g.kv_par, P, Q, mul_ext=g.share),
        rope=Rope(Q),
        swiglu=SwiGLU(Q, f.layers[0].swiglu),  # (one f_h for all layers)
        argmax=Argmax(Q, plan.acc_bits, V, n_valid=c.vocab_size),  # never a pad row
        sampler=Sampler(c.vocab_size, Q, n_fill=V),
    )


class Datapath(Module):
    """Everything with memories (weight ROMs, KV cache, tables) lives here, outside the AutoCSR core."""

    def __init__(self, plan: compiler.Plan, sink, source, with_trace: bool = False):
        c, g, f = plan.cfg, plan.geo, plan.steps  # f: every shift of the pass (steps.Steps)
        D, KVD, S, NL = c.dim, c.kv_dim, c.seq_len, c.n_layers
        H, V = g.hidden, g.vocab  # padded to the tile (compiler.make_geometry)
        hd = c.head_dim
        P, Q = g.vlanes, g.post
        t = plan.tables
        self.plan = plan
        # control / status (driven by the LiteX wrapper)
        self.reset = Signal()
        self.rewind = Signal()
        self.rewind_pos = Signal(16)
        self.temperature = Signal(16)
        self.seed = Signal(32)
        self.busy = Signal()
        self.full = Signal()
        self.pos = Signal(ubits(S))
        self.cycles = Signal(32)
        self.trace_index = Signal(32)
        self.trace_data = Signal(32)
        self.logit_index = Signal(16)
        self.logit_data = Signal(32)
        self.sample_base = Signal(32)
        self.sample_weight = Signal(32)
        self.sample_total = Signal(32)

        # # #

        # ---------------------------------------------------------------- units
        units = make_units(plan)
        for name, u in units.items():
            setattr(self.submodules, name, u)
        mv, rms, aq, att = units["mv"], units["rms"], units["aq"], units["att"]
        rope, swiglu, amax, smp = units["rope"], units["swiglu"], units["argmax"], units["sampler"]
        if g.share:  # the attention's e x v on the engine's multipliers (the sequencer runs the
            # attention only while the engine is idle)
            self.comb += [mv.mul_sel.eq(att.busy), mv.mul_a.eq(att.mul_a), mv.mul_b.eq(att.mul_b),
                          att.mul_p.eq(mv.mul_p)]

        # ---------------------------------------------------------------- residual x
        # P/Q banks of distributed RAM; bank b, word a = x[a*P + b*Q + (0 .. Q-1)]. Written P-wide
        # (embedding) or Q-wide (residual adds); read P-wide (RMSNorm) and Q-wide (residual adds).
        NBx = P // Q
        x_wa = Signal(ubits(D // P))  # write word
        x_wd = [Signal(Q * 16) for _ in range(NBx)]
        x_we = [Signal() for _ in range(NBx)]
        x_ra = Signal(ubits(D // P))  # P-wide read word
        x_qa = Signal(ubits(D // Q))  # Q-wide read / write index (element / Q)
        x_rd, x_qd = [], []
        for b in range(NBx):
            mem = Memory(Q * 16, D // P, name=f"xmem{b}")
            wp = mem.get_port(write_capable=True)
            r1 = mem.get_port(async_read=True)
            r2 = mem.get_port(async_read=True)
            self.specials += mem, wp, r1, r2
            self.comb += [wp.adr.eq(x_wa), wp.dat_w.eq(x_wd[b]), wp.we.eq(x_we[b]),
                          r1.adr.eq(x_ra), r2.adr.eq(x_qa >> ubits(NBx - 1) if NBx > 1 else x_qa)]
            x_rd.append(r1.dat_r)
            x_qd.append(r2.dat_r)
        xq_bank = Signal(ubits(max(1, NBx - 1)))
        self.comb += xq_bank.eq(x_qa & (NBx - 1) if NBx > 1 else 0)

        # ---------------------------------------------------------------- sequencer state
        fsm = FSM(reset_state="IDLE")
        self.submodules.fsm = fsm
        token = Signal(16)
        out_token = Signal(16)
        layer = Signal(ubits(max(1, NL - 1)))
        kind = Signal(3)
        k_act = Signal(5)  # quantization shift of the activations in MatVec.act
        greedy = Signal()
        inv_temp = Signal(16)
        cnt = Signal(32)
        reset_pending = Signal()
        self.sync += If(self.reset, reset_pending.eq(1))
        # rewind: position := rewind_pos (only backwards; the KV cache past it is overwritten as
        # the next tokens come), taken in IDLE like the reset; the PRNG keeps its state
        rewind_pending = Signal()
        rw_pos = Signal(len(self.rewind_pos))
        self.sync += If(self.rewind, rewind_pending.eq(1), rw_pos.eq(self.rewind_pos))

        # ---------------------------------------------------------------- RoPE cos/sin of pos
        half = hd // 2
        rope_words = [(int(t["rope_sin"][p, i]) & 0xFFFF) << 16 | (int(t["rope_cos"][p, i]) & 0xFFFF)
                      for p in range(S) for i in range(half)]
        rope_mem = Memory(32, len(rope_words), init=rope_words)
        rope_rd = rope_mem.get_port(has_re=True)
        self.specials += rope_mem, rope_rd
        cosr = [Signal((16, True), name=f"cos{i}") for i in range(half)]
        sinr = [Signal((16, True), name=f"sin{i}") for i in range(half)]
        rope_i = Signal(ubits(half + 1))
        rope_load = Signal()
        rope_load_d = Signal()
        rope_i_d = Signal(len(rope_i))
        self.comb += [rope_rd.adr.eq(self.pos * half + rope_i), rope_rd.re.eq(1)]
        self.sync += [rope_load_d.eq(rope_load & (rope_i < half)), rope_i_d.eq(rope_i),
                      If(rope_load & (rope_i < half), rope_i.eq(rope_i + 1)),
                      If(~rope_load, rope_i.eq(0))]
        self.sync += If(rope_load_d, Case(rope_i_d, {i: [cosr[i].eq(rope_rd.dat_r[:16]),
                                                         sinr[i].eq(rope_rd.dat_r[16:])]
                                                     for i in range(half)}))

        # ---------------------------------------------------------------- embedding
        pe = plan.place["emb"]
        be = plan.banks[pe.bank]
        C = g.cols
        emb_start = Signal()
        emb_done = Signal()
        emb_fin = Signal()
        emb_q = [Signal((be.bits, True), name=f"eq{i}") for i in range(D)]
        emb_ms = [Signal(be.m_share, name=f"ems{i}") for i in range(pe.chunks)]
        e_ch = Signal(ubits(pe.chunks + 1))
        e_rd = Signal()
        # the word of chunk e_ch is at the ROM output lat.ROM_ADR + lat.EMBED_RAW cycles after e_rd
        e_rd_p = [e_rd]
        e_ch_p = [e_ch]
        for _ in range(lat.ROM_ADR + lat.EMBED_RAW):
            e_rd_p.append(Signal())
            e_ch_p.append(Signal(len(e_ch)))
            self.sync += [e_rd_p[-1].eq(e_rd_p[-2]), e_ch_p[-1].eq(e_ch_p[-2])]
        e_rd_d, e_ch_d = e_rd_p[-1], e_ch_p[-1]
        Rw = be.rows_per_word
        slot = Signal(ubits(max(1, Rw - 1)))
        rowgroup = Signal(16)
        self.comb += [slot.eq(token & (Rw - 1)) if Rw > 1 else slot.eq(0),
                      rowgroup.eq(token >> ubits(Rw - 1) if Rw > 1 else token),
                      mv.raw_adr.eq(pe.base + rowgroup * pe.chunks + e_ch), mv.raw_en.eq(e_rd)]
        self.sync += [If(emb_start, e_ch.eq(0), e_rd.eq(1)).Elif(e_rd,
                          If(e_ch == pe.chunks - 1, e_rd.eq(0)), e_ch.eq(e_ch + 1))]
        sw, eb, lb = be.slot_width, be.ext_bits, be.lane_bits
        erom = mv.roms[pe.bank].dat_r
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
        e_wr = Signal()
        e_wb = Signal(len(e_b))
        e_vals = [Signal((16, True)) for _ in range(P)]
        self.sync += [e_wr.eq(e_emit1), e_wb.eq(e_b1), *[e_vals[j].eq(evals[j]) for j in range(P)],
                      If(e_emit, e_b.eq(e_b + 1), If(e_b == D // P - 1, e_emit.eq(0))),
                      If(e_rd_d & (e_ch_d == pe.chunks - 1), e_emit.eq(1), e_b.eq(0))]
        self.comb += emb_done.eq(e_wr & (e_wb == D // P - 1))
        emb_x_wr = e_wr  # the embedding writes whole words of x (all banks)

        # ---------------------------------------------------------------- x -> RMSNorm streamer
        n_sel = 2 * NL + 1
        st_run = Signal()
        st_b = Signal(ubits(D // P))
        st_pass = Signal(2)
        nsel = Signal(ubits(n_sel))
        xw = Signal(P * 16)
        self.comb += [x_ra.eq(st_b), xw.eq(Cat(*x_rd))]
        self.comb += [
            rms.sel.eq(nsel),
            rms.sink.valid.eq(st_run), rms.sink.x.eq(xw),
            rms.sink.first.eq(st_b == 0), rms.sink.last.eq(st_b == D // P - 1),
        ]
        self.sync += If(rms.sink.valid & rms.sink.ready,
                        If(st_b == D // P - 1, st_b.eq(0), st_pass.eq(st_pass + 1),
                           If(st_pass == 2, st_run.eq(0))).Else(st_b.eq(st_b + 1)))
        # trace: x as the norm reads it in its first pass
        if with_trace:
            tmem = Memory(P * 16, n_sel * D // P)
            tw = tmem.get_port(write_capable=True)
            tr = tmem.get_port(async_read=True)
            self.specials += tmem, tw, tr
            self.comb += [tw.adr.eq(nsel * (D // P) + st_b), tw.dat_w.eq(xw),
                          tw.we.eq(rms.sink.valid & rms.sink.ready & (st_pass == 0))]
            self.comb += tr.adr.eq(self.trace_index >> ubits(P - 1))
            tsel = Signal((16, True))
            self.comb += tsel.eq(Array([tr.dat_r[16 * j:16 * j + 16] for j in range(P)])[
                self.trace_index[:ubits(P - 1)]])
            self.comb += self.trace_data.eq(tsel)

        # ---------------------------------------------------------------- activation routing
        act_src = Signal(2)  # 0 RMSNorm, 1 ActQuant, 2 Attention
        act_en = Signal()  # the selected source fills MatVec.act (set by the sequencer's states)
        aq_to_att = Signal()
        srcs = [rms.source, aq.source, att.source]
        self.comb += [
            mv.act_sink.valid.eq(Array([s.valid for s in srcs])[act_src] & act_en),
            mv.act_sink.a.eq(Array([s.a for s in srcs])[act_src]),
            mv.act_sink.last.eq(Array([s.last for s in srcs])[act_src]),
            mv.act_sink.first.eq(Array([s.first for s in srcs])[act_src]),
            rms.source.ready.eq((act_src == 0) & act_en),
            aq.source.ready.eq(((act_src == 1) & act_en) | aq_to_att),
            att.source.ready.eq(1),
            att.q_sink.valid.eq(aq.source.valid & aq_to_att), att.q_sink.a.eq(aq.source.a),
            att.q_sink.k.eq(aq.source.k), att.q_sink.last.eq(aq.source.last),
            att.q_sink.first.eq(aq.source.first),
        ]
        act_k = Signal(5)
        self.comb += act_k.eq(Array([s.k for s in srcs])[act_src])
        act_last = Signal()
        self.comb += act_last.eq(mv.act_sink.valid & mv.act_sink.ready & mv.act_sink.last)
        self.sync += If(act_last, k_act.eq(act_k))
        q_last = Signal()
        self.comb += q_last.eq(att.q_sink.valid & att.q_sink.last)

        # ---------------------------------------------------------------- RowPost
        src = mv.source
        self.comb += src.ready.eq(1)
        r0 = Signal(ubits(max(V, 2 * H, D + 2 * KVD)))
        self.comb += r0.eq(src.beat * Q)
        # requantization constants C[kind][layer][seg]: shift = C - k_act (steps.Requant.base;
        # the segments of qkv are q, k, v, those of w13 h1, h3)
        Cs = {}
        for l in range(NL):
            sq, sk, sv = f.layers[l].wq, f.layers[l].wk, f.layers[l].wv
            Cs[(KIND_QKV, l, 0)] = sq.base
            Cs[(KIND_QKV, l, 1)] = sk.base
            Cs[(KIND_QKV, l, 2)] = sv.base
            Cs[(KIND_WO, l, 0)] = f.layers[l].wo.base
            s1, s3 = f.layers[l].w1, f.layers[l].w3
            Cs[(KIND_W13, l, 0)] = s1.base
            Cs[(KIND_W13, l, 1)] = s3.base
            Cs[(KIND_W2, l, 0)] = f.layers[l].w2.base
        Cs[(KIND_CLS, 0, 0)] = f.cls.base
        c_lo, c_hi = min(Cs.values()), max(Cs.values())
        k_hi = max(rms.k_max, 16 - 7, att.k_max)
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
        # stage 0 (lat.ROWPOST_IN): the engine's beat and its shift registered, so the FIFO read,
        # the shift selection and the barrel shifter are not one path
        rshift = Signal((sbits(c_lo - k_hi, c_hi) + 1, True))
        acc0 = Signal(len(src.acc))
        v0, last0, seg0 = Signal(), Signal(), Signal(2)
        r00 = Signal(len(r0))
        beat0 = Signal(len(src.beat))
        self.sync += [rshift.eq(csel - k_act), acc0.eq(src.acc), v0.eq(src.valid), last0.eq(src.last),
                      seg0.eq(seg), r00.eq(r0), beat0.eq(src.beat)]
        assert lat.ROWPOST_IN == 1
        accs = lanes_of(self, acc0, Q, plan.acc_bits)
        # stage 1: requantized values (wide) + control
        req = [round_shift(self, a, rshift, (c_lo - k_hi, c_hi)) for a in accs]
        rw = max(len(r) for r in req)
        req1 = [Signal((rw, True), name=f"req{j}") for j in range(Q)]
        acc1 = [Signal((plan.acc_bits, True)) for _ in range(Q)]
        v1, last1, seg1 = Signal(), Signal(), Signal(2)
        r01 = Signal(len(r0))
        beat1 = Signal(len(src.beat))
        self.sync += [v1.eq(v0), last1.eq(last0), seg1.eq(seg0), r01.eq(r00),
                      beat1.eq(beat0), *[req1[j].eq(req[j]) for j in range(Q)],
                      *[acc1[j].eq(accs[j]) for j in range(Q)]]
        sat16 = [saturate(self, r, 16) for r in req1]
        sat8 = [saturate(self, r, 8) for r in req1]
        post_done = Signal()
        # qkv: everything through RoPE (v with cos = 1, sin = 0: the identity)
        is_qkv = Signal()
        self.comb += is_qkv.eq(v1 & (kind == KIND_QKV))
        pair0 = Signal(ubits(half))
        self.comb += pair0.eq((r01 % hd) >> 1 if hd & (hd - 1) else r01[1:ubits(hd - 1)])
        rc, rsn = [], []
        for i in range(Q // 2):
            cv, sv = Signal((16, True)), Signal((16, True))
            self.comb += [
                cv.eq(Mux(seg1 == 2, 1 << nx.ROPE_FRAC, Array(cosr)[pair0 + i])),
                sv.eq(Mux(seg1 == 2, 0, Array(sinr)[pair0 + i])),
            ]
            rc.append(cv)
            rsn.append(sv)
        self.comb += [
            rope.sink.valid.eq(is_qkv),
            rope.sink.x.eq(Cat(*[Mux(seg1 == 2, sat8[j], sat16[j])[:16] for j in range(Q)])),
            rope.sink.cos.eq(Cat(*rc)), rope.sink.sin.eq(Cat(*rsn)),
            rope.source.ready.eq(1),
        ]
        rp_seg, rp_r0, rp_last = [seg1], [r01], [last1]
        for _ in range(Rope.latency):
            a, b_, c_ = Signal(2), Signal(len(r0)), Signal()
            self.sync += [a.eq(rp_seg[-1]), b_.eq(rp_r0[-1]), c_.eq(rp_last[-1])]
            rp_seg.append(a)
            rp_r0.append(b_)
            rp_last.append(c_)
        rv = lanes_of(self, rope.source.x, Q, 16)
        ekl = Array([Constant(f.layers[l].k_cache, (8, True)) for l in range(NL)])  # k -> key cache
        kshift = Signal((8, True))
        self.comb += kshift.eq(ekl[layer])
        ks_lo = min(f.layers[l].k_cache for l in range(NL))
        ks_hi = max(f.layers[l].k_cache for l in range(NL))
        kq8 = [saturate(self, round_shift(self, v, kshift, (ks_lo, ks_hi)), 8) for v in rv]
        rvalid = rope.source.valid
        qkv_seg, qkv_r0, qkv_last = rp_seg[-1], rp_r0[-1], rp_last[-1]
        # w13: h1 beat held, h3 beat -> SwiGLU
        h1_hold = Signal(Q * 16)
        is_w13 = Signal()
        self.comb += is_w13.eq(v1 & (kind == KIND_W13))
        self.sync += If(is_w13 & ~beat1[0], h1_hold.eq(Cat(*sat16)))
        self.comb += [
            swiglu.sink.valid.eq(is_w13 & beat1[0]),
            swiglu.sink.h1.eq(h1_hold), swiglu.sink.h3.eq(Cat(*sat16)),
            swiglu.sink.last.eq(last1), swiglu.source.ready.eq(1),
        ]
        sw_idx = [Signal(len(r0)) for _ in range(SwiGLU.latency + 1)]
        self.comb += sw_idx[0].eq((beat1 >> 1) * Q)
        for i in range(SwiGLU.latency):
            self.sync += sw_idx[i + 1].eq(sw_idx[i])
        # ActQuant fill from q (qkv) or hb (w13)
        from_q = Signal()
        self.comb += from_q.eq(rvalid & (qkv_seg == 0))
        self.comb += [
            aq.fill.valid.eq(from_q | swiglu.source.valid),
            If(from_q,
                aq.fill.v.eq(rope.source.x), aq.fill.idx.eq(qkv_r0),
                aq.fill.first.eq(qkv_r0 == 0), aq.fill.last.eq(qkv_r0 == D - Q)
            ).Else(
                aq.fill.v.eq(swiglu.source.hb), aq.fill.idx.eq(sw_idx[-1]),
                aq.fill.first.eq(sw_idx[-1] == 0), aq.fill.last.eq(swiglu.source.last)),
        ]
        # KV rows
        self.comb += [
            att.kv_sink.valid.eq(rvalid & (qkv_seg != 0)),
            att.kv_sink.is_v.eq(qkv_seg == 2),
            att.kv_sink.idx.eq(Mux(qkv_seg == 2, qkv_r0 - D - KVD, qkv_r0 - D)),
            att.kv_sink.v.eq(Cat(*[Mux(qkv_seg == 2, rv[j], kq8[j])[:8] for j in range(Q)])),
        ]
        # wo / w2: residual add
        is_res = Signal()
        self.comb += is_res.eq(v1 & ((kind == KIND_WO) | (kind == KIND_W2)))
        xq = Signal(Q * 16)
        self.comb += [x_qa.eq(beat1), xq.eq(Array(x_qd)[xq_bank] if NBx > 1 else x_qd[0])]
        xnew = [saturate(self, signed(self, xv + r, rw + 1), 16)
                for xv, r in zip(lanes_of(self, xq, Q, 16), req1)]
        # x write port: the embedding (P-wide) or a residual add (Q-wide, one bank)
        for b in range(NBx):
            self.comb += [
                x_wd[b].eq(Mux(emb_x_wr, Cat(*e_vals[b * Q:(b + 1) * Q]), Cat(*xnew))),
                x_we[b].eq(emb_x_wr | (is_res & (xq_bank == b))),
            ]
        self.comb += x_wa.eq(Mux(emb_x_wr, e_wb, x_qa >> ubits(NBx - 1) if NBx > 1 else x_qa))
        # cls: argmax on the accumulators, Q8 logits to the sampler
        is_cls = Signal()
        self.comb += is_cls.eq(v1 & (kind == KIND_CLS))
        self.comb += [
            amax.sink.valid.eq(is_cls), amax.sink.v.eq(Cat(*acc1)), amax.sink.last.eq(last1),
            amax.sink.first.eq(r01 == 0),
            smp.fill.valid.eq(is_cls), smp.fill.last.eq(last1),  # greedy too: the logit readback
            smp.fill.v.eq(Cat(*[saturate(self, r, 32) for r in req1])),
            smp.inv_temp.eq(inv_temp), smp.seed.eq(self.seed),
            smp.rd_index.eq(self.logit_index), self.logit_data.eq(smp.rd_data),
            self.sample_base.eq(smp.base), self.sample_weight.eq(smp.weight),
            self.sample_total.eq(smp.total),
            amax.source.ready.eq(1),
        ]
        # done: the last beat reached its destination
        self.comb += post_done.eq(
            (rvalid & qkv_last) | (swiglu.source.valid & swiglu.source.last) |
            (is_res & last1) | amax.source.valid)
        am_token = Signal(16)
        self.sync += If(amax.source.valid, am_token.eq(amax.source.index))

        # ---------------------------------------------------------------- sequencer
        sched = plan.schedule
        names = [f"S{i}_{s.kind}" for i, s in enumerate(sched)]
        self.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        self.comb += [self.full.eq(self.pos == S), sink.ready.eq(fsm.ongoing("IDLE") &
                      (self.pos != S) & ~reset_pending & ~rewind_pending & ~smp.seeding)]
        self.sync += If(~fsm.ongoing("IDLE") & ~fsm.ongoing("OUT"), cnt.eq(cnt + 1))
        fsm.act("IDLE",
            If(reset_pending,
                NextValue(self.pos, 0), NextValue(reset_pending, 0), smp.reseed.eq(1)
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
                fsm.act(name, emb_start.eq(1), rope_load.eq(1), NextValue(emb_fin, 0),
                        NextState(name + "_w"))
                fsm.act(name + "_w", rope_load.eq(1),
                        If(emb_done, NextValue(emb_fin, 1)),
                        If((emb_fin | emb_done) & (rope_i == half), NextState(nxt)))
            elif k == "norm":
                sel = compiler.norm_select(step.layer, step.arg, NL)
                fsm.act(name,
                    NextValue(nsel, sel), NextValue(st_run, 1), NextValue(st_b, 0),
                    NextValue(st_pass, 0), NextValue(act_src, 0), NextState(name + "_w"))
                fsm.act(name + "_w", act_en.eq(1), If(act_last, NextState(nxt)))
            elif k == "mv":
                p = plan.place[step.arg]
                kd, lyr = compiler.split_key(step.arg)
                fsm.act(name,
                    NextValue(kind, _KINDS[kd]), NextValue(layer, max(lyr, 0)),
                    NextValue(mv_sent, 0), NextState(name + "_w"))
                fsm.act(name + "_w",
                    mv.cmd.valid.eq(~mv_sent), mv.cmd.bank.eq(p.bank), mv.cmd.base.eq(p.base),
                    mv.cmd.chunks.eq(p.chunks), mv.cmd.rowgroups.eq(p.rowgroups),
                    If(mv.cmd.ready, NextValue(mv_sent, 1)),
                    If(post_done, NextState(nxt)))
            elif k == "qemit":
                fsm.act(name, aq_to_att.eq(1), If(q_last, NextState(nxt)))
            elif k == "attn":
                fsm.act(name,
                    NextValue(layer, step.layer), NextValue(act_src, 2), NextState(name + "_s"))
                fsm.act(name + "_s", att.start.eq(1), NextState(name + "_w"))
                fsm.act(name + "_w", act_en.eq(1), If(act_last, NextState(nxt)))
            elif k == "hemit":
                fsm.act(name, NextValue(act_src, 1), NextState(name + "_w"))
                fsm.act(name + "_w", act_en.eq(1), If(act_last, NextState(nxt)))
            elif k == "sample":
                fsm.act(name,
                    If(greedy, NextValue(out_token, am_token), NextState(nxt)).Else(
                        smp.start.eq(1), NextState(name + "_w")))
                fsm.act(name + "_w", If(smp.done, NextValue(out_token, smp.token), NextState(nxt)))
            elif k == "out":
                fsm.act(name,
                    NextValue(self.cycles, cnt + 2), NextState("OUT"))
        fsm.act("OUT",
            source.valid.eq(1),
            If(source.ready, NextValue(self.pos, self.pos + 1), NextState("IDLE")))
        if not any(s.kind == "sample" for s in sched):
            self.sync += If(amax.source.valid, out_token.eq(amax.source.index))
        self.comb += [source.token.eq(out_token), source.last.eq(1),
                      att.layer.eq(layer), att.pos.eq(self.pos)]


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
