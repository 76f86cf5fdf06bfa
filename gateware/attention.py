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
"""

from migen import *
from litex.soc.interconnect import stream

from bakedllama import numerics as nx

from gateware import latency as lat
from gateware.hw import (SHARED_A, SHARED_B, SHARED_P, absval, bit_length, clip, const_mul, field,
                         max_tree, plane_dot, round_shift, sbits, signed, ubits)
from gateware.units import Softmax, lanes_of


class Attention(Module):
    def __init__(self, cfg, att: list, kv_par: int, P: int, Q: int, q_k_max: int = 9,
                 mul_ext: int = 0):
        """att: each layer's steps.AttentionStep (one score scale and one score_q for all of them:
        the score shift's per-layer part is e_k).
        mul_ext: the first mul_ext e x v products are made outside (MatVec's lent packed-pair
        multipliers): their operands go out on mul_a / mul_b, the registered product comes back
        on mul_p, with the latency of the unit's own product register."""
        c = cfg
        if len(att) != c.n_layers:
            raise ValueError(f"Attention: {len(att)} attention steps for {c.n_layers} layers")
        if len({(a.scale, a.score_q) for a in att}) != 1:
            raise ValueError("Attention: the layers' steps differ in score scale or score_q")
        D, hd, S, NL = c.dim, c.head_dim, c.seq_len, c.n_layers
        KVD = c.kv_dim
        KP = kv_par
        NG = c.n_kv_heads // KP
        HP = KP * c.kv_mul
        W = KP * hd  # int8 per KV word
        self.q_sink = stream.Endpoint([("a", P * 8), ("k", ubits(16))])
        self.kv_sink = stream.Endpoint([("v", Q * 8), ("idx", ubits(KVD)), ("is_v", 1)])
        self.start = Signal()
        self.layer = Signal(ubits(max(1, NL - 1)))
        self.pos = Signal(ubits(S))
        # out in [-128, 127] * sum(e), recip <= 2^ATT_RECIP_BITS / sum(e): o in [-128, 127] shifted
        # left by ATT_RECIP_BITS - the output shift (a signed width for +-(127 * 2^that + 1) holds it)
        obound = max(127 * (1 << max(0, nx.ATT_RECIP_BITS - a.out)) + 1 for a in att)
        obw = sbits(obound)
        self.k_max = max(0, obw - 7)
        self.source = stream.Endpoint([("a", P * 8), ("k", ubits(16))])
        self.busy = Signal()
        if not 0 <= mul_ext <= HP * hd:
            raise ValueError(f"mul_ext {mul_ext}: the unit makes {HP * hd} e x v products")
        self.mul_ext = mul_ext
        if mul_ext:
            self.mul_a = Signal(mul_ext * SHARED_A)
            self.mul_b = Signal(mul_ext * SHARED_B)
            self.mul_p = Signal(mul_ext * SHARED_P)

        # # #

        # q8 (whole dim) and its quantization shift
        q8 = [Signal((8, True), name=f"q8_{i}") for i in range(D)]
        kq = Signal(ubits(q_k_max))
        qfill = Signal(ubits(D // P))
        self.comb += self.q_sink.ready.eq(1)
        self.sync += If(self.q_sink.valid,
                        Case(qfill, {b: [q8[b * P + j].eq(self.q_sink.a[8 * j:8 * j + 8])
                                         for j in range(P)] for b in range(D // P)}),
                        kq.eq(self.q_sink.k),
                        If(self.q_sink.last, qfill.eq(0)).Else(qfill.eq(qfill + 1)))
        # current K / V rows
        krow = [Signal(8, name=f"krow{i}") for i in range(KVD)]
        vrow = [Signal(8, name=f"vrow{i}") for i in range(KVD)]
        self.comb += self.kv_sink.ready.eq(1)
        kvcases = {}
        for b in range(KVD // Q):
            kvcases[b * Q] = [If(self.kv_sink.is_v, vrow[b * Q + j].eq(self.kv_sink.v[8 * j:8 * j + 8])
                                 ).Else(krow[b * Q + j].eq(self.kv_sink.v[8 * j:8 * j + 8]))
                              for j in range(Q)]
        self.sync += If(self.kv_sink.valid, Case(self.kv_sink.idx, kvcases))

        # KV cache
        depth = NL * S * NG
        kmem = Memory(W * 8, depth)
        vmem = Memory(W * 8, depth)
        kw, vw = kmem.get_port(write_capable=True), vmem.get_port(write_capable=True)
        kr, vr = kmem.get_port(has_re=True), vmem.get_port(has_re=True)
        self.specials += kmem, vmem, kw, vw, kr, vr
        self.kmem, self.vmem = kmem, vmem

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
        self.submodules.fsm = fsm = FSM(reset_state="IDLE")
        lpos = Signal(ubits(S))  # positions 0 .. pos

        # KV write of the current position
        self.comb += [
            kw.adr.eq(base + self.pos * NG + wcnt), vw.adr.eq(base + self.pos * NG + wcnt),
            kw.dat_w.eq(Array([Cat(*krow[i * W:(i + 1) * W]) for i in range(NG)])[wcnt]),
            vw.dat_w.eq(Array([Cat(*vrow[i * W:(i + 1) * W]) for i in range(NG)])[wcnt]),
        ]

        # score stage: K address at cycle 0 -> K data at 1 -> operands at 2 -> q x k by bit planes
        # of q (LUT logic: the DSP blocks do e x v meanwhile) -> scaled dot -> score
        assert lat.KV_ADR == 1  # the read addresses registered (they fan out over a cascade)
        kadr = Signal(len(kr.adr))
        self.sync += kadr.eq(base + t * NG + gs)
        self.comb += [kr.adr.eq(kadr), kr.re.eq(1)]
        qg = Signal(HP * hd * 8)
        self.comb += qg.eq(Array([Cat(*q8[i * HP * hd:(i + 1) * HP * hd]) for i in range(NG)])[gs])
        qs = lanes_of(self, qg, HP * hd, 8, False)  # raw bits: plane_dot slices them
        ks = lanes_of(self, kr.dat_r, W, 8)
        scale = att[0].scale
        # the score shift of layer l is att[l].score_shift(kq) = score_q + e_k[l] - kq: score_q
        # wired in, e_k[l] added in hardware (a per-layer mux of e_k)
        e_k = [a.e_k for a in att]
        sh_lo = min(a.score_base for a in att) - q_k_max
        sh_hi = max(a.score_base for a in att)
        dot_max = hd * 127 * 128
        s_max = max(-(-(dot_max * scale) >> sh_lo) if sh_lo >= 0 else (dot_max * scale) << -sh_lo, 1)
        s_bits = sbits(s_max) + 1
        ek = Signal((sbits(min(e_k), max(e_k)) + 1, True))
        self.comb += ek.eq(Array([Constant(v, (len(ek), True)) for v in e_k])[self.layer])
        shift = Signal((sbits(sh_lo, sh_hi) + 1, True))
        self.comb += shift.eq(att[0].score_q + ek - kq)
        self.submodules.softmax = sm = Softmax(HP, s_bits, S)
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
        lat_s = lat.ATT_SCORE + tl
        assert lat_s == lat.KV_ADR + 1 + lat.KV_READ + (tl + 1) + 2
        vpipe = [issuing & sc_on]
        fpipe = [t == 0]
        lpipe = [t == lpos]
        tpipe = [t]
        for _ in range(lat_s):
            nv, nf, nl, nt = Signal(), Signal(), Signal(), Signal(len(t))
            self.sync += [nv.eq(vpipe[-1]), nf.eq(fpipe[-1]), nl.eq(lpipe[-1]), nt.eq(tpipe[-1])]
            vpipe.append(nv)
            fpipe.append(nf)
            lpipe.append(nl)
            tpipe.append(nt)
        # score buffer: one word of HP scores per position, two groups (by parity): the score stage
        # writes group gs while the value stage reads group gv
        nbuf = 2 if NG > 1 else 1
        sbuf = Memory(HP * s_bits, nbuf << len(t))  # the parity is the address's top bit
        sbw = sbuf.get_port(write_capable=True)
        sbr = sbuf.get_port(has_re=True)
        self.specials += sbuf, sbw, sbr
        if nbuf == 2:
            self.comb += [sbw.adr.eq(Cat(tpipe[-1], gs[0])), sbr.adr.eq(Cat(t, gv[0]))]
        else:
            self.comb += [sbw.adr.eq(tpipe[-1]), sbr.adr.eq(t)]
        self.comb += [sbw.dat_w.eq(Cat(*scores)), sbw.we.eq(vpipe[-1]), sbr.re.eq(1)]
        self.comb += [sm.sink_max.valid.eq(vpipe[-1]), sm.sink_max.first.eq(fpipe[-1]),
                      sm.sink_max.last.eq(lpipe[-1]), sm.sink_max.s.eq(Cat(*scores))]
        # value stage: the buffer's scores (read at t, there a cycle later) -> Softmax -> e
        rv, rf, rl_ = Signal(), Signal(), Signal()
        self.sync += [rv.eq(issuing & va_on), rf.eq(t == 0), rl_.eq(t == lpos)]
        self.comb += [
            sm.sink.valid.eq(rv), sm.sink.first.eq(rf), sm.sink.last.eq(rl_), sm.sink.s.eq(sbr.dat_r),
            sm.source_e.ready.eq(1), sm.source_recip.ready.eq(1),
        ]
        es = lanes_of(self, sm.source_e.e, HP, 17, False)
        vs = lanes_of(self, vr.dat_r, W, 8)
        # AV: V row prefetched so V[t] is at the RAM output when e[t] arrives; operand registers,
        # then the product (one MULT18X18D each, kv_mul * head_dim of them per KV head)
        vt = Signal(ubits(S))
        consume = Signal()
        consume_d = Signal()
        vadr = Signal(len(vr.adr))
        self.comb += [consume.eq(sm.source_e.valid),
                      vr.adr.eq(vadr), vr.re.eq(1)]
        self.sync += vadr.eq(base + (vt + consume) * NG + gv)  # (lat.KV_ADR: e waits a cycle)
        consume_dd, consume_3, consume_4 = Signal(), Signal(), Signal()
        self.sync += [If(consume, vt.eq(vt + 1)), consume_d.eq(consume), consume_dd.eq(consume_d),
                      consume_3.eq(consume_dd), consume_4.eq(consume_3)]
        prods = []
        for hh in range(HP):
            kk = hh // c.kv_mul
            e_s = signed(self, es[hh], 18)
            for d in range(hd):
                # e and the V lane: a register each (the V RAM's output register, as for K),
                # then the multiplier's operand registers
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
        acc_max = S * nx.EXP_ONE * 128
        aw = sbits(acc_max)
        # one group's accumulators (HP * hd); when the group's reciprocals arrive they are copied
        # into the whole vector `out`, which the output passes then read by rotating it one beat
        # of P per cycle (word 0 is the beat): no wide read multiplexer, each product feeds one
        # accumulator
        GW = HP * hd
        acc = [Signal((aw, True), name=f"att_acc{k}") for k in range(GW)]
        clear = Signal()
        for k in range(GW):
            self.sync += If(clear, acc[k].eq(0)).Elif(consume_4, acc[k].eq(acc[k] + prods[k]))
        out = [Signal((aw, True), name=f"att_out{i}") for i in range(D)]
        orun = Signal()
        self.sync += If(orun, [out[i].eq(out[(i + P) % D]) for i in range(D)]).Else(
            [If(sm.source_recip.valid & (gv == grp),
                [out[grp * GW + k].eq(acc[k]) for k in range(GW)]) for grp in range(NG)])
        recip = [Signal(len(sm.source_recip.recip) // HP, name=f"recip{h}") for h in range(c.n_heads)]
        rs = lanes_of(self, sm.source_recip.recip, HP, len(recip[0]), False)
        for h in range(c.n_heads):
            self.sync += If(sm.source_recip.valid & (gv == h // HP), recip[h].eq(rs[h % HP]))

        # output passes over the vector: o = round_shift(out * recip, att[layer].out); a beat of P
        # lies within one head (P divides head_dim), so one reciprocal serves the beat
        ob = Signal(ubits(D // P))
        outs = out[:P]
        rcur = Signal(len(recip[0]))
        hsh = (hd // P).bit_length() - 1
        self.comb += rcur.eq(Array(recip)[ob[hsh:] if hsh else ob])
        rl = [rcur] * P
        sho = [a.out for a in att]
        osh = Signal((sbits(min(sho), max(sho)) + 1, True))
        self.comb += osh.eq(Array([Constant(v, (len(osh), True)) for v in sho])[self.layer])
        prod1 = [Signal((aw + len(recip[0]) + 1, True)) for _ in range(P)]
        ovalid1, ophase1, olast1, ofirst1 = Signal(), Signal(), Signal(), Signal()
        ophase = Signal()  # 0 max, 1 emit
        # stage 0 (lat.ATT_OUT_REGS): the multiplier's inputs registered (the beat's reciprocal
        # is a mux over the heads), then the wide product (several MULT18X18D and their adders)
        outs0 = [Signal((aw, True)) for _ in range(P)]
        rcur0 = Signal(len(rcur))
        ovalid0, ophase0, olast0, ofirst0 = Signal(), Signal(), Signal(), Signal()
        self.sync += [*[outs0[j].eq(outs[j]) for j in range(P)], rcur0.eq(rl[0]),
                      ovalid0.eq(orun), ophase0.eq(ophase), olast0.eq(ob == D // P - 1),
                      ofirst0.eq(ob == 0)]
        assert lat.ATT_OUT_REGS == 1
        self.sync += [prod1[j].eq(outs0[j] * rcur0) for j in range(P)]
        self.sync += [ovalid1.eq(ovalid0), ophase1.eq(ophase0), olast1.eq(olast0),
                      ofirst1.eq(ofirst0)]
        o2 = [Signal((obw, True)) for _ in range(P)]
        ovalid2, ophase2, olast2, ofirst2 = Signal(), Signal(), Signal(), Signal()
        self.sync += [o2[j].eq(round_shift(self, prod1[j], osh, (min(sho), max(sho))))
                      for j in range(P)]
        self.sync += [ovalid2.eq(ovalid1), ophase2.eq(ophase1), olast2.eq(olast1), ofirst2.eq(ofirst1)]
        # max pass (lat.ATT_MAX_REGS): |o| registered, the beat's max tree registered, then the
        # running max; the emit pass (lat.ATT_EMIT_REGS): o >> ko registered, then the clip
        assert lat.ATT_MAX_REGS == 2 and lat.ATT_EMIT_REGS == 1
        omax = Signal(obw)
        ab3 = [Signal(obw) for _ in range(P)]
        self.sync += [ab3[j].eq(absval(self, o2[j])) for j in range(P)]
        bm4 = Signal(obw)
        mv3, mf3, mv4, mf4 = Signal(), Signal(), Signal(), Signal()
        self.sync += [bm4.eq(max_tree(self, ab3)), mv3.eq(ovalid2 & ~ophase2), mf3.eq(ofirst2),
                      mv4.eq(mv3), mf4.eq(mf3)]
        self.sync += If(mv4, If(mf4, omax.eq(bm4)).Elif(bm4 > omax, omax.eq(bm4)))
        ko = Signal(len(self.source.k))
        blo = bit_length(self, omax)
        sh3 = [Signal((obw + 1, True)) for _ in range(P)]
        self.sync += [sh3[j].eq(round_shift(self, o2[j], ko, (0, obw))) for j in range(P)]
        ev3, el3, ef3 = Signal(), Signal(), Signal()
        self.sync += [ev3.eq(ovalid2 & ophase2), el3.eq(olast2), ef3.eq(ofirst2)]
        aq = [clip(self, v, nx.ACT_MAX) for v in sh3]
        src = self.source
        self.sync += [
            src.valid.eq(ev3), src.first.eq(ef3), src.last.eq(el3),
            src.a.eq(Cat(*[a[:8] for a in aq])), src.k.eq(ko),
        ]
        # the consumer (matrix-vector activations) is always ready

        self.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        phase_start = Signal()
        fsm.act("IDLE",
            If(self.start, NextValue(wcnt, 0), NextValue(lpos, self.pos), NextState("WRITE")))
        fsm.act("WRITE",
            kw.we.eq(1), vw.we.eq(1),
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
                If(kph == NG, NextValue(ob, 0), NextValue(orun, 1), NextValue(ophase, 0),
                   NextState("OMAX")).Else(
                    NextValue(kph, kph + 1), NextValue(gv, gs), NextValue(gs, gs + 1),
                    NextValue(va_on, 1), NextValue(sc_on, kph + 1 < NG), NextState("PHASE"))))
        self.comb += clear.eq(phase_start & va_on)
        self.sync += If(phase_start, vt.eq(0))
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
            If(ob == D // P - 1, NextValue(ob, 0), NextValue(orun, 0), NextState("DRAIN")).Else(
                NextValue(ob, ob + 1)))
        fsm.act("DRAIN",
            If(src.valid & src.last, NextState("IDLE")))
        self.lat_s = lat_s
        self.div_cycles = sm.div_cycles
