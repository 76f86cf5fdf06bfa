"""Attention over the on-chip KV cache (numerics.attention_head for every head, bit-exact).

For each group of kv_par KV heads (HP = kv_par * kv_mul query heads):
  pass 1  t = 0..pos: K row -> HP dot products -> Q8 scores -> Softmax (running max)
  pass 2  t = 0..pos: the same scores -> e = exp_neg(max - s) -> out[h] += e * V row; sums
  then    recip[h] = floor(2^40 / sum) (Softmax's dividers); the group's HP * head_dim
          accumulators are copied into the output vector
Then over the whole vector (rotated one beat of P per cycle, so no wide read multiplexer): o = round_shift(out * recip, 40 + e_v - 12), one pass for max |o|,
one pass emitting quantize_act(o) (P int8 per beat) to the matrix-vector engine.

The KV cache is two block RAMs (keys, values): word = kv_par heads x head_dim int8, address
((layer * seq_len + t) * groups + group). The current position's K/V rows are collected from the
row post-processing (kv_sink) and written when a run starts.
"""

from migen import *
from litex.soc.interconnect import stream

from bakedllama import numerics as nx

from gateware import latency as lat
from gateware.hw import (absval, adder_tree, bit_length, clip, const_mul, max_tree, round_shift,
                         sbits, signed, ubits)
from gateware.units import Softmax, lanes_of


class Attention(Module):
    def __init__(self, cfg, e_k: list, e_v: list, f_qk: int, kv_par: int, P: int, Q: int,
                 q_k_max: int = 9):
        c = cfg
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
        obound = max(127 * (1 << max(0, nx.ATT_OUT_FRAC - ev)) + 1 for ev in e_v)
        obw = sbits(obound)
        self.k_max = max(0, obw - 7)
        self.source = stream.Endpoint([("a", P * 8), ("k", ubits(16))])
        self.busy = Signal()

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

        # control
        g = Signal(ubits(max(1, NG - 1)))
        t = Signal(ubits(S))
        wcnt = Signal(ubits(NG))
        base = Signal(ubits(depth))
        self.comb += base.eq(self.layer * (S * NG))
        phase = Signal()  # 0: max pass, 1: exp pass
        issuing = Signal()
        self.submodules.fsm = fsm = FSM(reset_state="IDLE")
        lpos = Signal(ubits(S))  # positions 0 .. pos

        # KV write of the current position
        self.comb += [
            kw.adr.eq(base + self.pos * NG + wcnt), vw.adr.eq(base + self.pos * NG + wcnt),
            kw.dat_w.eq(Array([Cat(*krow[i * W:(i + 1) * W]) for i in range(NG)])[wcnt]),
            vw.dat_w.eq(Array([Cat(*vrow[i * W:(i + 1) * W]) for i in range(NG)])[wcnt]),
        ]

        # score pipeline: K address at cycle 0 -> K data at 1 -> products at 2 -> tree -> score
        self.comb += [kr.adr.eq(base + t * NG + g), kr.re.eq(1)]
        qg = Signal(HP * hd * 8)
        self.comb += qg.eq(Array([Cat(*q8[i * HP * hd:(i + 1) * HP * hd]) for i in range(NG)])[g])
        qs = lanes_of(self, qg, HP * hd, 8)
        ks = lanes_of(self, kr.dat_r, W, 8)
        scale = nx.score_scale(hd)
        sh_lo = f_qk - q_k_max + min(e_k) + 15 - nx.SCORE_FRAC
        sh_hi = f_qk + max(e_k) + 15 - nx.SCORE_FRAC
        dot_max = hd * 127 * 128
        s_max = max(-(-(dot_max * scale) >> sh_lo) if sh_lo >= 0 else (dot_max * scale) << -sh_lo, 1)
        s_bits = sbits(s_max) + 1
        ek = Signal((sbits(min(e_k), max(e_k)) + 1, True))
        self.comb += ek.eq(Array([Constant(v, (len(ek), True)) for v in e_k])[self.layer])
        shift = Signal((sbits(sh_lo, sh_hi) + 1, True))
        self.comb += shift.eq(f_qk + 15 - nx.SCORE_FRAC + ek - kq)
        # Shared multipliers (one MULT18X18D per product, kv_mul * head_dim of them):
        #   pass 1: q * k -> per-head dot -> Q8 score -> Softmax (max) and the score buffer
        #   pass 2: the score buffer -> Softmax -> e;  e * v -> out accumulators
        av_mode = Signal()  # products are e * v (pass 2)
        self.submodules.softmax = sm = Softmax(HP, s_bits, S)
        es = lanes_of(self, sm.source_e.e, HP, 17, False)
        vs = lanes_of(self, vr.dat_r, W, 8)
        prods = []
        for hh in range(HP):
            kk = hh // c.kv_mul
            e_s = signed(self, es[hh], 18)
            for d in range(hd):
                # operands registered at the KV cache's output (its clock-to-out is ~6 ns), then
                # the product: the block RAM, the mux and the multiplier are three paths
                a_in = Signal((18, True))
                b_in = Signal((8, True))
                self.sync += [a_in.eq(Mux(av_mode, e_s, qs[hh * hd + d])),
                              b_in.eq(Mux(av_mode, vs[kk * hd + d], ks[kk * hd + d]))]
                p = Signal((26, True))
                self.sync += p.eq(a_in * b_in)
                prods.append(p)
        scores = []
        tl = 0
        for hh in range(HP):
            dot, tl = adder_tree(self, prods[hh * hd:(hh + 1) * hd])
            sc = Signal((len(dot) + ubits(scale) + 1, True))
            self.sync += sc.eq(const_mul(self, dot, scale))  # registered: the scale, then the shift
            s = round_shift(self, sc, shift, (sh_lo, sh_hi))
            sr = Signal((s_bits, True))
            self.sync += sr.eq(s)
            scores.append(sr)
        # address -> K data -> operands -> product -> (tree) -> scaled -> registered score
        lat_s = lat.ATT_SCORE + tl
        assert lat_s == 1 + 1 + 1 + tl + 2
        vpipe = [issuing & ~phase]
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
        # score buffer: one word of HP scores per position
        sbuf = Memory(HP * s_bits, S)
        sbw = sbuf.get_port(write_capable=True)
        sbr = sbuf.get_port(has_re=True)
        self.specials += sbuf, sbw, sbr
        self.comb += [sbw.adr.eq(tpipe[-1]), sbw.dat_w.eq(Cat(*scores)), sbw.we.eq(vpipe[-1]),
                      sbr.adr.eq(t), sbr.re.eq(1)]
        rv, rf, rl_ = Signal(), Signal(), Signal()
        self.sync += [rv.eq(issuing & phase), rf.eq(t == 0), rl_.eq(t == lpos)]
        self.comb += [
            sm.sink.valid.eq(vpipe[-1] | rv),
            sm.sink.first.eq(Mux(rv, rf, fpipe[-1])), sm.sink.last.eq(Mux(rv, rl_, lpipe[-1])),
            sm.sink.phase.eq(rv), sm.sink.s.eq(Mux(rv, sbr.dat_r, Cat(*scores))),
            sm.source_e.ready.eq(1), sm.source_recip.ready.eq(1),
        ]

        # AV: V row prefetched so V[t] is at the RAM output when e[t] arrives; product a cycle later
        vt = Signal(ubits(S))
        consume = Signal()
        consume_d = Signal()
        self.comb += [consume.eq(sm.source_e.valid),
                      vr.adr.eq(base + (vt + consume) * NG + g), vr.re.eq(1)]
        consume_dd = Signal()  # e[t] and V[t]: operand registers, then the product
        self.sync += [If(consume, vt.eq(vt + 1)), consume_d.eq(consume), consume_dd.eq(consume_d)]
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
            self.sync += If(clear, acc[k].eq(0)).Elif(consume_dd, acc[k].eq(acc[k] + prods[k]))
        out = [Signal((aw, True), name=f"att_out{i}") for i in range(D)]
        orun = Signal()
        self.sync += If(orun, [out[i].eq(out[(i + P) % D]) for i in range(D)]).Else(
            [If(sm.source_recip.valid & (g == grp),
                [out[grp * GW + k].eq(acc[k]) for k in range(GW)]) for grp in range(NG)])
        recip = [Signal(len(sm.source_recip.recip) // HP, name=f"recip{h}") for h in range(c.n_heads)]
        rs = lanes_of(self, sm.source_recip.recip, HP, len(recip[0]), False)
        for h in range(c.n_heads):
            self.sync += If(sm.source_recip.valid & (g == h // HP), recip[h].eq(rs[h % HP]))

        # output passes over the vector: o = round_shift(out * recip, 40 + e_v - 12); a beat of P
        # lies within one head (P divides head_dim), so one reciprocal serves the beat
        ob = Signal(ubits(D // P))
        outs = out[:P]
        rcur = Signal(len(recip[0]))
        hsh = (hd // P).bit_length() - 1
        self.comb += rcur.eq(Array(recip)[ob[hsh:] if hsh else ob])
        rl = [rcur] * P
        sho = [nx.ATT_RECIP_BITS + ev - nx.ATT_OUT_FRAC for ev in e_v]
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
        omax = Signal(obw)
        bm = max_tree(self, [absval(self, o) for o in o2])
        self.sync += If(ovalid2 & ~ophase2, If(ofirst2, omax.eq(bm)).Elif(bm > omax, omax.eq(bm)))
        ko = Signal(len(self.source.k))
        blo = bit_length(self, omax)
        aq = [clip(self, round_shift(self, o, ko, (0, obw)), nx.ACT_MAX) for o in o2]
        src = self.source
        self.sync += [
            src.valid.eq(ovalid2 & ophase2), src.first.eq(ofirst2), src.last.eq(olast2),
            src.a.eq(Cat(*[a[:8] for a in aq])), src.k.eq(ko),
        ]
        # the consumer (matrix-vector activations) is always ready

        self.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        pass_start = Signal()
        fsm.act("IDLE",
            If(self.start, NextValue(wcnt, 0), NextValue(lpos, self.pos), NextState("WRITE")))
        fsm.act("WRITE",
            kw.we.eq(1), vw.we.eq(1),
            NextValue(wcnt, wcnt + 1),
            If(wcnt == NG - 1, NextValue(g, 0), NextState("PASS")))
        fsm.act("PASS",  # phase 0 then phase 1 for group g
            pass_start.eq(1),
            NextValue(t, 0), NextValue(issuing, 1), NextValue(phase, 0), NextValue(av_mode, 0),
            NextState("ISSUE0"))
        wcnt2 = Signal(ubits(lat_s + 1))
        fsm.act("ISSUE0",
            If(t == lpos, NextValue(t, 0), NextValue(issuing, 0), NextValue(wcnt2, 0),
               NextState("WAIT1")).Else(NextValue(t, t + 1)))
        fsm.act("WAIT1",  # the last score reaches the buffer and the softmax max
            NextValue(wcnt2, wcnt2 + 1),
            If(wcnt2 == lat_s - 1, NextValue(phase, 1), NextValue(issuing, 1), NextValue(av_mode, 1),
               NextState("ISSUE1")))
        fsm.act("ISSUE1",
            If(t == lpos, NextValue(issuing, 0), NextState("RECIP")).Else(NextValue(t, t + 1)))
        fsm.act("RECIP",
            If(sm.source_recip.valid,
                If(g == NG - 1, NextValue(ob, 0), NextValue(orun, 1), NextValue(ophase, 0),
                   NextState("OMAX")).Else(NextValue(g, g + 1), NextState("PASS"))))
        self.comb += clear.eq(pass_start)
        self.sync += If(pass_start, vt.eq(0))
        fsm.act("OMAX",
            If(ob == D // P - 1, NextValue(ob, 0), NextValue(orun, 0), NextState("KCALC")).Else(
                NextValue(ob, ob + 1)))
        kwait = Signal(3)
        fsm.act("KCALC",  # wait for the last max update, then the shift
            NextValue(kwait, kwait + 1),
            If(kwait == 2 + lat.ATT_OUT_REGS, NextValue(kwait, 0),
               NextValue(ko, Mux(blo > 7, blo - 7, 0)),
               NextValue(orun, 1), NextValue(ophase, 1), NextState("OEMIT")))
        fsm.act("OEMIT",
            If(ob == D // P - 1, NextValue(ob, 0), NextValue(orun, 0), NextState("DRAIN")).Else(
                NextValue(ob, ob + 1)))
        fsm.act("DRAIN",
            If(src.valid & src.last, NextState("IDLE")))
        self.lat_s = lat_s
        self.div_cycles = sm.div_cycles
