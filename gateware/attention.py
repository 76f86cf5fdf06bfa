"""Attention over the on-chip KV cache (numerics.attention_head for every head, bit-exact).

For each group of kv_par KV heads (HP = kv_par * kv_mul query heads), two stages:
  score   t = 0..pos: K row -> HP dot products (LUT bit planes) -> Q8 scores -> Softmax (running
          max) and the score buffer
  value   t = 0..pos: the buffered scores -> e = exp_neg(max - s) -> out[h] += e * V row (DSP
          blocks); sums; then recip[h] = floor(2^ATT_RECIP_BITS / sum) (Softmax's dividers) and the group's
          HP * head_dim accumulators are copied into the output vector
The stages overlap: the NG groups run in NG + 1 phases of pos + 1 issues, the score stage on group
k while the value stage is on group k - 1 (the score buffer holds two groups, the Softmax freezes a
group's max for its value stage). Then over the whole vector (rotated one beat of P per cycle, so
no wide read multiplexer): o = round_shift(out * recip, the layer's AttentionStep.out), one pass for
max |o|, one pass emitting quantize_act(o) (P int8 per beat) to the matrix-vector engine.

The KV cache is two block RAMs (keys, values): word = kv_par heads x head_dim int8, address
((layer * seq_len + t) * groups + group). The current position's K/V rows are collected from the
row post-processing (kv_sink) and written when a run starts.

The units (Attention wires them and runs the phases; latencies from gateware/latency.py):

    VectorRegs   q (q_sink)                     KVRows       the current K / V rows (kv_sink)
    KVCache      the two block RAMs             ScoreStage   K read, q x k, scaled, shifted scores
    ScoreBuffer  the scores of two groups       Softmax      running max, exp, sums, reciprocals
    ValueStage   V read, e x v, accumulators    OutputPass   out * recip, max pass, emit pass

Streams with ready: q_sink, kv_sink (always ready: register files), Softmax.source_e ->
ValueStage and Softmax.source_recip -> OutputPass (always ready: accumulators and registers that
take a beat every cycle), OutputPass.source = `source` (back-pressure stalls the emit pass). The
score stage, the buffer and the value stage's products are fixed-latency pipelines driven by the
one issue counter (both stages run in lockstep), so they hand over plain signals.
"""

from migen import *
from litex.gen import LiteXModule
from litex.soc.interconnect import stream

from bakedllama import numerics as nx

from gateware import latency as lat
from gateware.hw import (SHARED_A, SHARED_B, SHARED_P, absval, bit_length, clip, const_mul, delayed,
                         field, max_tree, plane_dot, round_shift, sbits, signed, ubits)
from gateware.units import Softmax, VectorRegs, lanes_of


class KVRows(LiteXModule):
    """The current position's K and V rows, collected from the row post-processing.

    kv_sink  Q int8 at element `idx` of the K row, or of the V row if `is_v`; always ready (a
             register file: a beat every cycle)
    k, v     out: the rows (kv_dim int8 each), a beat in them the cycle after it was taken"""

    def __init__(self, kv_dim: int, Q: int):
        self.kv_sink = sink = stream.Endpoint([("v", Q * 8), ("idx", ubits(kv_dim)), ("is_v", 1)])
        self.k = [Signal(8, name=f"krow{i}") for i in range(kv_dim)]
        self.v = [Signal(8, name=f"vrow{i}") for i in range(kv_dim)]

        # # #

        self.comb += sink.ready.eq(1)
        cases = {}
        for b in range(kv_dim // Q):
            cases[b * Q] = [If(sink.is_v, self.v[b * Q + j].eq(sink.v[8 * j:8 * j + 8])
                               ).Else(self.k[b * Q + j].eq(sink.v[8 * j:8 * j + 8]))
                            for j in range(Q)]
        self.sync += If(sink.valid, Case(sink.idx, cases))


class KVCache(LiteXModule):
    """The KV cache: two block RAMs (keys, values) of `depth` words of `width` bits.

    w_adr, k_w, v_w, we  in: one word of each written at the edge
    k_adr, v_adr         in: read addresses (their readers register them: lat.KV_ADR)
    k_dat, v_dat         out: the words read, a cycle after their address (synchronous read)"""

    def __init__(self, width: int, depth: int):
        ab = ubits(depth - 1)
        self.w_adr, self.k_adr, self.v_adr = Signal(ab), Signal(ab), Signal(ab)
        self.k_w, self.v_w = Signal(width), Signal(width)
        self.we = Signal()
        self.k_dat, self.v_dat = Signal(width), Signal(width)

        # # #

        kmem = Memory(width, depth)
        vmem = Memory(width, depth)
        kw, vw = kmem.get_port(write_capable=True), vmem.get_port(write_capable=True)
        kr, vr = kmem.get_port(has_re=True), vmem.get_port(has_re=True)
        self.specials += kmem, vmem, kw, vw, kr, vr
        self.comb += [kw.adr.eq(self.w_adr), vw.adr.eq(self.w_adr), kw.dat_w.eq(self.k_w),
                      vw.dat_w.eq(self.v_w), kw.we.eq(self.we), vw.we.eq(self.we),
                      kr.adr.eq(self.k_adr), kr.re.eq(1), vr.adr.eq(self.v_adr), vr.re.eq(1),
                      self.k_dat.eq(kr.dat_r), self.v_dat.eq(vr.dat_r)]


class ScoreStage(LiteXModule):
    """Scores of HP query heads against one KV group's keys, one position t per cycle.

    issue, first, last, t  in: position t of the group is issued (first: t = 0, last: t = pos)
    gs, base, layer, kq    in: the group, the layer's cache base, the layer, q's quantization shift
    q                      in: q8, the whole query vector (dim int8)
    k_adr out / k_dat in   the K cache read (the address registered here: lat.KV_ADR)
    valid, first_o, last_o, t_o, s   out: the HP scores of the position issued `latency` cycles
                           earlier (Q8, s_bits each, packed in s), with its flags and t

    K address -> K data (lat.KV_READ registers) -> operands -> q x k by bit planes of q (LUT
    logic: the DSP blocks do e x v meanwhile) -> scaled dot -> score. The score shift of layer l
    is att[l].score_shift(kq) = score_q + e_k[l] - kq: score_q wired in, e_k[l] added in hardware.
    Latency: lat.ATT_SCORE + tree_latency(head_dim); a fixed pipeline without back-pressure (its
    consumers, the score buffer and Softmax.sink_max, take every score)."""

    def __init__(self, cfg, att: list, kv_par: int, adr_bits: int, q_k_max: int):
        c = cfg
        D, hd, S, NL = c.dim, c.head_dim, c.seq_len, c.n_layers
        NG = c.n_kv_heads // kv_par
        HP = kv_par * c.kv_mul
        W = kv_par * hd
        self.issue, self.first, self.last = Signal(), Signal(), Signal()
        self.t = Signal(ubits(S))
        self.gs = Signal(ubits(max(1, NG - 1)))
        self.base = Signal(adr_bits)
        self.layer = Signal(ubits(max(1, NL - 1)))
        self.kq = Signal(ubits(q_k_max))
        self.q = [Signal((8, True)) for _ in range(D)]
        self.k_adr = Signal(adr_bits)
        self.k_dat = Signal(W * 8)
        scale = att[0].scale
        e_k = [a.e_k for a in att]
        sh_lo = min(a.score_base for a in att) - q_k_max
        sh_hi = max(a.score_base for a in att)
        dot_max = hd * 127 * 128
        s_max = max(-(-(dot_max * scale) >> sh_lo) if sh_lo >= 0 else (dot_max * scale) << -sh_lo, 1)
        self.s_bits = s_bits = sbits(s_max) + 1
        self.valid, self.first_o, self.last_o = Signal(), Signal(), Signal()
        self.t_o = Signal(len(self.t))
        self.s = Signal(HP * s_bits)

        # # #

        assert lat.KV_ADR == 1  # the read addresses registered (they fan out over a cascade)
        self.sync += self.k_adr.eq(self.base + self.t * NG + self.gs)
        qg = Signal(HP * hd * 8)
        self.comb += qg.eq(Array([Cat(*self.q[i * HP * hd:(i + 1) * HP * hd]) for i in range(NG)])[self.gs])
        qs = lanes_of(self, qg, HP * hd, 8, False)  # raw bits: plane_dot slices them
        ks = lanes_of(self, self.k_dat, W, 8)
        ek = Signal((sbits(min(e_k), max(e_k)) + 1, True))
        self.comb += ek.eq(Array([Constant(v, (len(ek), True)) for v in e_k])[self.layer])
        shift = Signal((sbits(sh_lo, sh_hi) + 1, True))
        self.comb += shift.eq(att[0].score_q + ek - self.kq)
        # operands registered at the KV cache's output (its clock-to-out is ~6 ns)
        # (lat.KV_READ registers: yosys folds the first into the block RAM's output register, so
        # the next one sits after the multiplexer of the RAM's depth cascade)
        assert lat.KV_READ == 2
        q_d = [Signal(8) for _ in range(HP * hd)]
        k_d = [Signal((8, True)) for _ in range(W)]
        q_in = [Signal(8) for _ in range(HP * hd)]
        k_in = [Signal((8, True)) for _ in range(W)]
        self.sync += [*[q_d[i].eq(qs[i]) for i in range(HP * hd)],
                      *[k_d[i].eq(ks[i]) for i in range(W)],
                      *[q_in[i].eq(q_d[i]) for i in range(HP * hd)],
                      *[k_in[i].eq(k_d[i]) for i in range(W)]]
        scores = []
        tl = 0
        for hh in range(HP):
            kk = hh // c.kv_mul
            dot, pl = plane_dot(self, q_in[hh * hd:(hh + 1) * hd], k_in[kk * hd:(kk + 1) * hd], 1)
            tl = pl - 1
            sc = Signal((len(dot) + ubits(scale) + 1, True))
            self.sync += sc.eq(const_mul(self, dot, scale))  # registered: the scale, then the shift
            s_ = round_shift(self, sc, shift, (sh_lo, sh_hi))
            sr = Signal((s_bits, True))
            self.sync += sr.eq(s_)
            scores.append(sr)
        # address -> K data -> operands -> bit-plane dot (tree + its register) -> scaled -> score
        self.latency = lat_s = lat.ATT_SCORE + tl
        assert lat_s == lat.KV_ADR + 1 + lat.KV_READ + (tl + 1) + 2
        self.comb += [self.valid.eq(delayed(self, self.issue, lat_s)),
                      self.first_o.eq(delayed(self, self.first, lat_s)),
                      self.last_o.eq(delayed(self, self.last, lat_s)),
                      self.t_o.eq(delayed(self, self.t, lat_s)), self.s.eq(Cat(*scores))]


class ScoreBuffer(LiteXModule):
    """One word of H scores per position, for two groups (by parity: the score stage writes one
    while the value stage reads the other; one group only if there is one).

    w_adr, w_grp, w_dat, we  in: a write at the edge
    r_adr, r_grp             in: a read address; r_dat out: its word a cycle later"""

    def __init__(self, width: int, t_bits: int, two: bool):
        self.w_adr, self.r_adr = Signal(t_bits), Signal(t_bits)
        self.w_grp, self.r_grp = Signal(), Signal()
        self.w_dat, self.r_dat = Signal(width), Signal(width)
        self.we = Signal()

        # # #

        sbuf = Memory(width, (2 if two else 1) << t_bits)  # the parity is the address's top bit
        sbw = sbuf.get_port(write_capable=True)
        sbr = sbuf.get_port(has_re=True)
        self.specials += sbuf, sbw, sbr
        if two:
            self.comb += [sbw.adr.eq(Cat(self.w_adr, self.w_grp)), sbr.adr.eq(Cat(self.r_adr, self.r_grp))]
        else:
            self.comb += [sbw.adr.eq(self.w_adr), sbr.adr.eq(self.r_adr)]
        self.comb += [sbw.dat_w.eq(self.w_dat), sbw.we.eq(self.we), sbr.re.eq(1),
                      self.r_dat.eq(sbr.dat_r)]


class ValueStage(LiteXModule):
    """acc[h] += e[h, t] * V[t] over one KV group's positions: HP * head_dim products.

    sink           e per head (Softmax.source_e), one position per beat; always ready (the
                   accumulators take a beat every cycle)
    base, gv       in: the layer's cache base, the group
    restart        in: a phase begins (the V prefetch restarts at t = 0)
    clear          in: the accumulators := 0
    v_adr out / v_dat in  the V cache read: V[t] is prefetched, at the RAM output when e[t] arrives
    acc            out: the group's HP * head_dim accumulators
    mul_a, mul_b / mul_p  the first mul_ext products' operands out, their registered products in

    Per product: e and the V lane registered (the V RAM's output register, as for K), then the
    multiplier's operand registers, then the product (one MULT18X18D each). Latency: a beat taken
    -> its products in acc 5 cycles later; a fixed pipeline."""

    def __init__(self, cfg, kv_par: int, adr_bits: int, mul_ext: int = 0):
        c = cfg
        hd, S = c.head_dim, c.seq_len
        NG = c.n_kv_heads // kv_par
        HP = kv_par * c.kv_mul
        W = kv_par * hd
        GW = HP * hd
        self.sink = stream.Endpoint([("e", HP * 17)])
        self.base = Signal(adr_bits)
        self.gv = Signal(ubits(max(1, NG - 1)))
        self.restart, self.clear = Signal(), Signal()
        self.v_adr = Signal(adr_bits)
        self.v_dat = Signal(W * 8)
        self.aw = aw = sbits(S * nx.EXP_ONE * 128)
        self.acc = [Signal((aw, True), name=f"att_acc{k}") for k in range(GW)]
        if mul_ext:
            self.mul_a = Signal(mul_ext * SHARED_A)
            self.mul_b = Signal(mul_ext * SHARED_B)
            self.mul_p = Signal(mul_ext * SHARED_P)

        # # #

        self.comb += self.sink.ready.eq(1)
        es = lanes_of(self, self.sink.e, HP, 17, False)
        vs = lanes_of(self, self.v_dat, W, 8)
        vt = Signal(ubits(S))
        consume = Signal()
        self.comb += consume.eq(self.sink.valid)
        self.sync += self.v_adr.eq(self.base + (vt + consume) * NG + self.gv)  # (lat.KV_ADR: e waits a cycle)
        consume_4 = delayed(self, consume, 4)
        self.sync += If(consume, vt.eq(vt + 1))
        prods = []
        for hh in range(HP):
            kk = hh // c.kv_mul
            e_s = signed(self, es[hh], 18)
            for d in range(hd):
                e_x, e_d = Signal((SHARED_A, True)), Signal((SHARED_A, True))
                v_d = Signal((SHARED_B, True))
                a_in = Signal((SHARED_A, True))
                b_in = Signal((SHARED_B, True))
                self.sync += [e_x.eq(e_s), e_d.eq(e_x), v_d.eq(vs[kk * hd + d]), a_in.eq(e_d),
                              b_in.eq(v_d)]
                n = len(prods)
                if n < mul_ext:
                    self.comb += [self.mul_a[SHARED_A * n:SHARED_A * (n + 1)].eq(a_in),
                                  self.mul_b[SHARED_B * n:SHARED_B * (n + 1)].eq(b_in)]
                    p = field(self, self.mul_p, SHARED_P * n, SHARED_P)
                else:
                    p = Signal((SHARED_P, True))
                    self.sync += p.eq(a_in * b_in)
                prods.append(p)
        for k in range(GW):
            self.sync += If(self.clear, self.acc[k].eq(0)).Elif(consume_4,
                                                                 self.acc[k].eq(self.acc[k] + prods[k]))
        self.sync += If(self.restart, vt.eq(0))


class OutputPass(LiteXModule):
    """o = round_shift(out * recip, the layer's AttentionStep.out) over the whole vector: a pass
    for max |o|, then a pass emitting quantize_act(o), P int8 per beat.

    recip    sink (Softmax.source_recip): a group's reciprocals; always ready: with them group
             `gv`'s accumulators `acc` are copied into the vector `out` (dim accumulators)
    acc, gv  in: the value stage's accumulators and their group
    layer    in: selects the output shift
    start    in: run the two passes (every group's accumulators are in `out`)
    source   P int8 per beat (first .. last) and their shift k; ready honoured: without it the
             emit pass stalls
    done     out: the last beat is taken

    The passes read `out` by rotating it one beat of P per cycle (word 0 is the beat): no wide
    read multiplexer, each product feeds one accumulator. A beat lies within one head (P divides
    head_dim), so one reciprocal serves the beat. Pipeline: the multiplier's inputs registered
    (lat.ATT_OUT_REGS), the product, the rounded o; the max pass then |o| and the beat's max tree
    registered (lat.ATT_MAX_REGS) before the running max; the emit pass o >> k registered
    (lat.ATT_EMIT_REGS), then the clip into the output register."""

    def __init__(self, cfg, att: list, kv_par: int, P: int, aw: int, r_bits: int):
        c = cfg
        D, hd = c.dim, c.head_dim
        NG = c.n_kv_heads // kv_par
        HP = kv_par * c.kv_mul
        GW = HP * hd
        # out in [-128, 127] * sum(e), recip <= 2^ATT_RECIP_BITS / sum(e): o in [-128, 127] shifted
        # left by ATT_RECIP_BITS - the output shift (a signed width for +-(127 * 2^that + 1) holds it)
        obound = max(127 * (1 << max(0, nx.ATT_RECIP_BITS - a.out)) + 1 for a in att)
        obw = sbits(obound)
        self.k_max = max(0, obw - 7)
        self.recip = stream.Endpoint([("recip", HP * r_bits)])
        self.acc = [Signal((aw, True)) for _ in range(GW)]
        self.gv = Signal(ubits(max(1, NG - 1)))
        self.layer = Signal(ubits(max(1, c.n_layers - 1)))
        self.start = Signal()
        self.source = src = stream.Endpoint([("a", P * 8), ("k", ubits(16))])
        self.done = Signal()

        # # #

        self.comb += self.recip.ready.eq(1)
        ce = Signal()  # the emit pass advances (the max pass never has a beat on `source`)
        self.comb += ce.eq(~src.valid | src.ready)
        out = [Signal((aw, True), name=f"att_out{i}") for i in range(D)]
        orun = Signal()
        rv = self.recip.valid
        self.sync += If(orun, If(ce, [out[i].eq(out[(i + P) % D]) for i in range(D)])).Else(
            [If(rv & (self.gv == grp), [out[grp * GW + k].eq(self.acc[k]) for k in range(GW)])
             for grp in range(NG)])
        recip = [Signal(r_bits, name=f"recip{h}") for h in range(c.n_heads)]
        rs = lanes_of(self, self.recip.recip, HP, r_bits, False)
        for h in range(c.n_heads):
            self.sync += If(rv & (self.gv == h // HP), recip[h].eq(rs[h % HP]))

        ob = Signal(ubits(D // P))
        outs = out[:P]
        rcur = Signal(r_bits)
        hsh = (hd // P).bit_length() - 1
        self.comb += rcur.eq(Array(recip)[ob[hsh:] if hsh else ob])
        sho = [a.out for a in att]
        osh = Signal((sbits(min(sho), max(sho)) + 1, True))
        self.comb += osh.eq(Array([Constant(v, (len(osh), True)) for v in sho])[self.layer])
        ophase = Signal()  # 0 max, 1 emit
        # stage 0 (lat.ATT_OUT_REGS): the multiplier's inputs registered (the beat's reciprocal
        # is a mux over the heads), then the wide product (several MULT18X18D and their adders)
        assert lat.ATT_OUT_REGS == 1
        outs0 = [Signal((aw, True)) for _ in range(P)]
        rcur0 = Signal(len(rcur))
        ovalid0, ophase0, olast0, ofirst0 = Signal(), Signal(), Signal(), Signal()
        self.sync += If(ce, *[outs0[j].eq(outs[j]) for j in range(P)], rcur0.eq(rcur),
                        ovalid0.eq(orun), ophase0.eq(ophase), olast0.eq(ob == D // P - 1),
                        ofirst0.eq(ob == 0))
        prod1 = [Signal((aw + r_bits + 1, True)) for _ in range(P)]
        ovalid1, ophase1, olast1, ofirst1 = Signal(), Signal(), Signal(), Signal()
        self.sync += If(ce, *[prod1[j].eq(outs0[j] * rcur0) for j in range(P)],
                        ovalid1.eq(ovalid0), ophase1.eq(ophase0), olast1.eq(olast0),
                        ofirst1.eq(ofirst0))
        o2 = [Signal((obw, True)) for _ in range(P)]
        ovalid2, ophase2, olast2, ofirst2 = Signal(), Signal(), Signal(), Signal()
        o2n = [round_shift(self, prod1[j], osh, (min(sho), max(sho))) for j in range(P)]
        self.sync += If(ce, *[o2[j].eq(o2n[j]) for j in range(P)],
                        ovalid2.eq(ovalid1), ophase2.eq(ophase1), olast2.eq(olast1),
                        ofirst2.eq(ofirst1))
        # max pass (lat.ATT_MAX_REGS): |o| registered, the beat's max tree registered, then the
        # running max (ce is high throughout it); the emit pass (lat.ATT_EMIT_REGS): o >> ko
        # registered, then the clip
        assert lat.ATT_MAX_REGS == 2 and lat.ATT_EMIT_REGS == 1
        omax = Signal(obw)
        ab3 = [Signal(obw) for _ in range(P)]
        self.sync += [ab3[j].eq(absval(self, o2[j])) for j in range(P)]
        bm4 = Signal(obw)
        mv3, mf3, mv4, mf4 = Signal(), Signal(), Signal(), Signal()
        self.sync += [bm4.eq(max_tree(self, ab3)), mv3.eq(ovalid2 & ~ophase2), mf3.eq(ofirst2),
                      mv4.eq(mv3), mf4.eq(mf3)]
        self.sync += If(mv4, If(mf4, omax.eq(bm4)).Elif(bm4 > omax, omax.eq(bm4)))
        ko = Signal(len(src.k))
        blo = bit_length(self, omax)
        sh3 = [Signal((obw + 1, True)) for _ in range(P)]
        sh3n = [round_shift(self, o2[j], ko, (0, obw)) for j in range(P)]
        ev3, el3, ef3 = Signal(), Signal(), Signal()
        self.sync += If(ce, *[sh3[j].eq(sh3n[j]) for j in range(P)],
                        ev3.eq(ovalid2 & ophase2), el3.eq(olast2), ef3.eq(ofirst2))
        aq = [clip(self, v, nx.ACT_MAX) for v in sh3]
        self.sync += If(ce,
            src.valid.eq(ev3), src.first.eq(ef3), src.last.eq(el3),
            src.a.eq(Cat(*[a[:8] for a in aq])), src.k.eq(ko),
        )

        self.fsm = fsm = FSM(reset_state="IDLE")
        fsm.act("IDLE",
            If(self.start, NextValue(ob, 0), NextValue(orun, 1), NextValue(ophase, 0),
               NextState("OMAX")))
        fsm.act("OMAX",
            If(ob == D // P - 1, NextValue(ob, 0), NextValue(orun, 0), NextState("KCALC")).Else(
                NextValue(ob, ob + 1)))
        kwait = Signal(ubits(2 + lat.ATT_OUT_REGS + lat.ATT_MAX_REGS))
        fsm.act("KCALC",  # wait for the last max update, then the shift
            NextValue(kwait, kwait + 1),
            If(kwait == 2 + lat.ATT_OUT_REGS + lat.ATT_MAX_REGS, NextValue(kwait, 0),
               NextValue(ko, Mux(blo > 7, blo - 7, 0)),
               NextValue(orun, 1), NextValue(ophase, 1), NextState("OEMIT")))
        fsm.act("OEMIT",
            If(ce,
                If(ob == D // P - 1, NextValue(ob, 0), NextValue(orun, 0), NextState("DRAIN")).Else(
                    NextValue(ob, ob + 1))))
        fsm.act("DRAIN",
            If(src.valid & src.last & src.ready, self.done.eq(1), NextState("IDLE")))


class Attention(LiteXModule):
    def __init__(self, cfg, att: list, kv_par: int, P: int, Q: int, q_k_max: int = 9,
                 mul_ext: int = 0):
        """att: each layer's steps.AttentionStep (one score scale and one score_q for all of them:
        the score shift's per-layer part is e_k).
        mul_ext: the first mul_ext e x v products are made outside (MatVec's lent packed-pair
        multipliers): their operands go out on mul_a / mul_b, the registered product comes back
        on mul_p, with the latency of the unit's own product register.

        q_sink   P int8 of q per beat (first .. last) and its shift k; always ready
        kv_sink  the current position's K / V rows (KVRows); always ready
        start    in: run at position `pos` of `layer` (the rows are written first)
        source   P int8 of quantize_act(attention) per beat, k; ready honoured
        busy     out: a run is under way (until its last beat is taken)"""
        c = cfg
        if len(att) != c.n_layers:
            raise ValueError(f"Attention: {len(att)} attention steps for {c.n_layers} layers")
        if len({(a.scale, a.score_q) for a in att}) != 1:
            raise ValueError("Attention: the layers' steps differ in score scale or score_q")
        D, hd, S, NL = c.dim, c.head_dim, c.seq_len, c.n_layers
        KP = kv_par
        NG = c.n_kv_heads // KP
        HP = KP * c.kv_mul
        W = KP * hd  # int8 per KV word
        if not 0 <= mul_ext <= HP * hd:
            raise ValueError(f"mul_ext {mul_ext}: the unit makes {HP * hd} e x v products")
        depth = NL * S * NG
        ab = ubits(depth - 1)
        self.qregs = qregs = VectorRegs(D, P, 8, name="q8_")
        self.rows = rows = KVRows(c.kv_dim, Q)
        self.cache = cache = KVCache(W * 8, depth)
        self.score = sc = ScoreStage(c, att, KP, ab, q_k_max)
        self.softmax = sm = Softmax(HP, sc.s_bits, S)
        self.sbuf = sbuf = ScoreBuffer(HP * sc.s_bits, len(sc.t), NG > 1)
        self.value = va = ValueStage(c, KP, ab, mul_ext)
        self.output = outp = OutputPass(c, att, KP, P, va.aw, len(sm.source_recip.recip) // HP)
        self.q_sink = stream.Endpoint([("a", P * 8), ("k", ubits(16))])
        self.kv_sink = rows.kv_sink
        self.start = Signal()
        self.layer = Signal(ubits(max(1, NL - 1)))
        self.pos = Signal(ubits(S))
        self.k_max = outp.k_max
        self.source = outp.source
        self.busy = Signal()
        self.mul_ext = mul_ext
        if mul_ext:
            self.mul_a, self.mul_b, self.mul_p = va.mul_a, va.mul_b, va.mul_p

        # # #

        # q8 (whole dim) and its quantization shift
        self.comb += self.q_sink.connect(qregs.sink, omit={"k"})
        self.sync += If(self.q_sink.valid, sc.kq.eq(self.q_sink.k))
        self.comb += [sc.q[i].eq(qregs.v[i]) for i in range(D)]

        # control: the passes run in NG + 1 phases over one issue counter t; in phase k the score
        # stage takes group k (if k < NG) while the value stage takes group k - 1 (if k >= 1)
        t = Signal(ubits(S))
        wcnt = Signal(ubits(NG))
        base = Signal(ubits(depth))
        self.comb += base.eq(self.layer * (S * NG))
        kph = Signal(ubits(NG))  # phase 0 .. NG
        gs = Signal(ubits(max(1, NG - 1)))  # the score stage's group
        gv = Signal(ubits(max(1, NG - 1)))  # the value stage's group
        sc_on, va_on = Signal(), Signal()
        issuing = Signal()
        self.fsm = fsm = FSM(reset_state="IDLE")
        lpos = Signal(ubits(S))  # positions 0 .. pos

        # KV write of the current position
        self.comb += [
            cache.w_adr.eq(base + self.pos * NG + wcnt),
            cache.k_w.eq(Array([Cat(*rows.k[i * W:(i + 1) * W]) for i in range(NG)])[wcnt]),
            cache.v_w.eq(Array([Cat(*rows.v[i * W:(i + 1) * W]) for i in range(NG)])[wcnt]),
        ]

        # score stage -> the buffer (group gs) and Softmax's running max
        self.comb += [sc.issue.eq(issuing & sc_on), sc.first.eq(t == 0), sc.last.eq(t == lpos),
                      sc.t.eq(t), sc.gs.eq(gs), sc.base.eq(base), sc.layer.eq(self.layer),
                      cache.k_adr.eq(sc.k_adr), sc.k_dat.eq(cache.k_dat)]
        lat_s = sc.latency
        self.comb += [sbuf.w_adr.eq(sc.t_o), sbuf.w_grp.eq(gs[0]), sbuf.w_dat.eq(sc.s),
                      sbuf.we.eq(sc.valid), sbuf.r_adr.eq(t), sbuf.r_grp.eq(gv[0])]
        self.comb += [sm.sink_max.valid.eq(sc.valid), sm.sink_max.first.eq(sc.first_o),
                      sm.sink_max.last.eq(sc.last_o), sm.sink_max.s.eq(sc.s)]
        # value stage: the buffer's scores (read at t, there a cycle later) -> Softmax -> e x V
        rv, rf, rl_ = Signal(), Signal(), Signal()
        self.sync += [rv.eq(issuing & va_on), rf.eq(t == 0), rl_.eq(t == lpos)]
        self.comb += [sm.sink.valid.eq(rv), sm.sink.first.eq(rf), sm.sink.last.eq(rl_),
                      sm.sink.s.eq(sbuf.r_dat)]
        phase_start = Signal()
        self.comb += [sm.source_e.connect(va.sink), va.base.eq(base), va.gv.eq(gv),
                      va.restart.eq(phase_start), va.clear.eq(phase_start & va_on),
                      cache.v_adr.eq(va.v_adr), va.v_dat.eq(cache.v_dat)]
        # the reciprocals -> the output pass, with the group's accumulators
        self.comb += [sm.source_recip.connect(outp.recip), outp.gv.eq(gv),
                      outp.layer.eq(self.layer), *[o.eq(a) for o, a in zip(outp.acc, va.acc)]]

        self.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        fsm.act("IDLE",
            If(self.start, NextValue(wcnt, 0), NextValue(lpos, self.pos), NextState("WRITE")))
        fsm.act("WRITE",
            cache.we.eq(1),
            NextValue(wcnt, wcnt + 1),
            If(wcnt == NG - 1, NextValue(kph, 0), NextValue(gs, 0), NextValue(sc_on, 1),
               NextValue(va_on, 0), NextState("PHASE")))
        fsm.act("PHASE",
            phase_start.eq(1),
            NextValue(t, 0), NextValue(issuing, 1), NextState("ISSUE"))
        wcnt2 = Signal(ubits(lat_s + 1))
        fsm.act("ISSUE",
            If(t == lpos, NextValue(issuing, 0), NextValue(wcnt2, 0), NextState("WAIT")).Else(
                NextValue(t, t + 1)))
        # the score stage's last score reaches the buffer and the max (lat_s), the value stage's
        # reciprocals arrive (rdone: they are valid for one cycle)
        rdone = Signal()
        self.sync += If(phase_start, rdone.eq(0)).Elif(sm.source_recip.valid, rdone.eq(1))
        s_ok = Signal()
        self.comb += s_ok.eq(~sc_on | (wcnt2 >= lat_s - 1))
        v_ok = Signal()
        self.comb += v_ok.eq(~va_on | rdone | sm.source_recip.valid)
        fsm.act("WAIT",
            If(wcnt2 < lat_s - 1, NextValue(wcnt2, wcnt2 + 1)),
            If(s_ok & v_ok,
                If(kph == NG, outp.start.eq(1), NextState("OUTPUT")).Else(
                    NextValue(kph, kph + 1), NextValue(gv, gs), NextValue(gs, gs + 1),
                    NextValue(va_on, 1), NextValue(sc_on, kph + 1 < NG), NextState("PHASE"))))
        fsm.act("OUTPUT", If(outp.done, NextState("IDLE")))
        self.lat_s = lat_s
        self.div_cycles = sm.div_cycles
