"""Vector and nonlinear units, each a stream block with a reference function in bakedllama.numerics.

    RMSNorm    quantize_act(rmsnorm(x))            3 passes over x: sum of squares, max, output
    ActQuant   quantize_act(v)                     fill (buffer + max-abs), then emit int8 + shift
    Rope       numerics.rope on interleaved pairs  fixed latency
    SwiGLU     numerics.swiglu                     fixed latency
    ExpNeg     numerics.exp_neg                    fixed latency
    Softmax    max, exp(max - s), sum, floor(2^ATT_RECIP_BITS / sum) per head (attention's normalizer)
    Argmax     numerics.argmax (lowest index on ties)
    Sampler    numerics.sample (top_k = 0) with XorShift32

Pipelines stall as a whole when their output is not taken (ce = ~source.valid | source.ready).
"""

import numpy as np
from migen import *
from litex.soc.interconnect import stream

from bakedllama import numerics as nx

from gateware import latency as lat
from gateware.hw import (absval, bit_length, clip, field, max_tree, round_shift, saturate, sbits,
                         signed, ubits)


def pipe_ctrl(m, sink, source, latency: int):
    """Valid/first/last through `latency` registers with a global clock enable; returns ce."""
    ce = Signal()
    v = [sink.valid]
    f = [sink.first]
    la = [sink.last]
    for _ in range(latency):
        nv, nf, nl = Signal(), Signal(), Signal()
        m.sync += If(ce, nv.eq(v[-1]), nf.eq(f[-1]), nl.eq(la[-1]))
        v.append(nv)
        f.append(nf)
        la.append(nl)
    m.comb += [ce.eq(~source.valid | source.ready), sink.ready.eq(ce),
               source.valid.eq(v[-1]), source.first.eq(f[-1]), source.last.eq(la[-1])]
    return ce


def lanes_of(m, word, n: int, width: int, is_signed: bool = True) -> list:
    return [field(m, word, i * width, width, is_signed) for i in range(n)]


def rom(m, values: list, width: int, nports: int = 1) -> list:
    """A constant table read combinationally (LUT ROM); returns [(adr, dat)] per port."""
    mem = Memory(width, len(values), init=[int(v) & ((1 << width) - 1) for v in values])
    m.specials += mem
    ports = []
    for _ in range(nports):
        p = mem.get_port(async_read=True)
        m.specials += p
        ports.append((p.adr, p.dat_r))
    return ports


# ----------------------------------------------------------------------------- RMSNorm
def rsqrt_u_max(u_base: int) -> int:
    """Bound on |u| = |x| * r >> (u_base + k) over all mantissas (x^2 <= sum of squares)."""
    mant = np.arange(1 << 14, 1 << 16)
    r = nx.RSQRT_TABLE[(mant >> 6) - 256]
    return int(np.ceil((np.sqrt(mant + 1.0) * r / 2.0**u_base).max())) + 1


def _ceil_shift(v: int, s: int) -> int:
    return -(-v >> s) if s >= 0 else v << -s


class RMSNorm(Module):
    """quantize_act(rmsnorm(x, gains[sel], norms[sel])) for x of `dim` int16 values.

    norms: the steps.NormStep of each gain (one eps_int and one u_base for all of them).
    sink: the vector x, sent three times (P values per beat, `last` ends each pass).
    source: dim/P beats of P int8 activations, with k (the quantization shift) on every beat."""

    def __init__(self, dim: int, P: int, gains, norms: list):
        n_sel = len(norms)
        if len(gains) != n_sel:
            raise ValueError(f"RMSNorm: {len(gains)} gains for {n_sel} norm steps")
        if len({(n.eps_int, n.u_base) for n in norms}) != 1:
            raise ValueError("RMSNorm: the norm steps differ in eps_int or u_base (one each here)")
        eps_int, sh_u = norms[0].eps_int, norms[0].u_base
        nb = dim // P
        self.sel = Signal(ubits(max(1, n_sel - 1)))
        self.sink = stream.Endpoint([("x", P * 16)])
        kmax = 16  # generous: xb < 2^23, k <= 16
        self.source = stream.Endpoint([("a", P * 8), ("k", ubits(kmax))])
        self.busy = Signal()

        # # #

        ss_max = dim * (1 << 30) + eps_int
        ss_bits = ubits(ss_max)
        k_rs_max = (ss_bits - 15) // 2  # rsqrt exponent range [-7, k_rs_max]
        u_max = rsqrt_u_max(sh_u)
        uw = sbits(u_max)
        g_max = int(np.abs(np.asarray(gains)).max())
        xb_max = max(_ceil_shift(u_max * g_max, n.out) + 1 for n in norms)
        xbw = sbits(xb_max)
        if xbw - 7 > kmax:
            raise ValueError("RMSNorm output too wide for the quantizer")
        self.k_max = max(0, xbw - 7)

        phase = Signal(2)  # 0 sum of squares, 1 max, 2 output
        beat = Signal(ubits(nb))
        wait = Signal()  # between passes, while the pass result settles
        ce = Signal()
        sink, source = self.sink, self.source
        take = Signal()
        self.comb += [take.eq(sink.valid & sink.ready), sink.ready.eq(ce & ~wait)]
        self.sync += If(take, If(sink.last, beat.eq(0)).Else(beat.eq(beat + 1)))

        xs = lanes_of(self, sink.x, P, 16)
        # gains: (n_sel * nb) words of P x int16, read combinationally
        gwords = []
        for s in range(n_sel):
            for b in range(nb):
                w = 0
                for j in reversed(range(P)):
                    w = (w << 16) | (int(gains[s][b * P + j]) & 0xFFFF)
                gwords.append(w)
        [(gadr, gdat)] = rom(self, gwords, P * 16)
        self.comb += gadr.eq(self.sel * nb + beat)

        # stage 1: products x^2 (pass 0) and x*r (passes 1, 2); gains
        r = Signal(16)
        krs = Signal((ubits(k_rs_max + 8) + 1, True))  # rsqrt exponent k
        v1, ph1, last1 = Signal(), Signal(2), Signal()
        # one multiplier per lane: x * x in pass 0, x * r in passes 1 and 2
        xr1 = [Signal((34, True)) for _ in range(P)]
        g1 = Signal(P * 16)
        mb = [signed(self, Mux(phase == 0, xs[j], r), 17) for j in range(P)]
        self.sync += If(ce, v1.eq(take), ph1.eq(phase), last1.eq(take & sink.last), g1.eq(gdat),
                        *[xr1[j].eq(xs[j] * mb[j]) for j in range(P)])
        # pass 0: accumulate the sum of squares
        ss = Signal(ss_bits)
        sq_sum = Signal(ss_bits)
        self.comb += sq_sum.eq(sum(xr1))
        self.sync += If(ce & v1 & (ph1 == 0), ss.eq(ss + sq_sum))
        # stage 2: u = round_shift(x*r, u_shift(k) = sh_u + k)
        v2, ph2, last2 = Signal(), Signal(2), Signal()
        u2 = [Signal((uw, True)) for _ in range(P)]
        g2 = Signal(P * 16)
        us = [round_shift(self, xr1[j], krs + sh_u, (sh_u - 7, sh_u + k_rs_max)) for j in range(P)]
        self.sync += If(ce, v2.eq(v1 & (ph1 != 0)), ph2.eq(ph1), last2.eq(last1), g2.eq(g1),
                        *[u2[j].eq(us[j]) for j in range(P)])
        # stage 3: u * g
        v3, ph3, last3 = Signal(), Signal(2), Signal()
        ug3 = [Signal((uw + 16, True)) for _ in range(P)]
        gs = lanes_of(self, g2, P, 16)
        self.sync += If(ce, v3.eq(v2), ph3.eq(ph2), last3.eq(last2),
                        *[ug3[j].eq(u2[j] * gs[j]) for j in range(P)])
        # stage 4: xb = round_shift(u*g, out) (the selected norm's step)
        fgs = [n.out for n in norms]
        fsel = Signal((sbits(min(fgs), max(fgs)) + 1, True))
        self.comb += fsel.eq(Array([Constant(v, (len(fsel), True)) for v in fgs])[self.sel])
        v4, ph4, last4 = Signal(), Signal(2), Signal()
        xb4 = [Signal((xbw, True)) for _ in range(P)]
        xbs = [round_shift(self, ug3[j], fsel, (min(fgs), max(fgs))) for j in range(P)]
        self.sync += If(ce, v4.eq(v3), ph4.eq(ph3), last4.eq(last3),
                        *[xb4[j].eq(xbs[j]) for j in range(P)])
        # pass 1: max |xb|; pass 2: quantize with k (straight from the max: pass 2 follows pass 1
        # at once, its first beat reaches this stage after the last max update)
        mx = Signal(xbw)
        ka = Signal(len(source.k))
        beat_max = max_tree(self, [absval(self, xb4[j]) for j in range(P)])
        bm5, vm5 = Signal(xbw), Signal()  # the beat's max registered, then the running max
        self.sync += If(ce, bm5.eq(beat_max), vm5.eq(v4 & (ph4 == 1)))
        self.sync += If(ce & vm5, If(bm5 > mx, mx.eq(bm5)))
        blm = bit_length(self, mx)
        # registered: the first pass-2 beat comes lat.NORM_GAP cycles after the last pass-1 beat
        self.sync += ka.eq(Mux(blm > 7, blm - 7, 0))
        aq = [clip(self, round_shift(self, xb4[j], ka, (0, xbw)), nx.ACT_MAX) for j in range(P)]
        v5, last5 = Signal(), Signal()
        a5 = Signal(P * 8)
        self.sync += If(ce, v5.eq(v4 & (ph4 == 2)), last5.eq(last4),
                        a5.eq(Cat(*[a[:8] for a in aq])))
        self.comb += [ce.eq(~source.valid | source.ready), source.valid.eq(v5),
                      source.last.eq(last5), source.a.eq(a5), source.k.eq(ka)]

        # between passes: rsqrt of the sum of squares (registered steps), then the quant shift
        ss_tot = Signal(ss_bits)
        self.sync += ss_tot.eq(ss + eps_int)
        bl = Signal((ubits(ss_bits) + 1, True))
        self.sync += bl.eq(bit_length(self, ss_tot))
        kk = Signal((len(krs), True))
        ss_d = Signal(ss_bits)
        self.sync += [kk.eq((bl - 15) >> 1), ss_d.eq(ss_tot)]  # floor((bl - 15) / 2)
        mant = Signal(ss_bits + 16)
        kk_d = Signal((len(krs), True))
        self.sync += kk_d.eq(kk), If(kk >= 0, mant.eq(ss_d >> (kk << 1))).Else(
            mant.eq(ss_d << ((-kk) << 1)))
        [(radr, rdat)] = rom(self, nx.RSQRT_TABLE, 16)
        self.comb += radr.eq(mant[6:16] - 256)
        cnt = Signal(4)
        drain = lat.NORM_WAIT - 1  # last pass-0 beat -> sum (2) -> ss_tot, bl, kk, mant (4) -> r
        self.sync += [
            If(take & sink.last,
                cnt.eq(0),
                If(phase == 0, phase.eq(1), wait.eq(1)).Elif(phase == 1, phase.eq(2), wait.eq(1)).Else(
                    phase.eq(0), wait.eq(1))),  # after pass 2: wait for the pipeline to drain
            If(wait & (phase == 2),  # the gap before pass 2 (the beat max and ka registers)
                cnt.eq(cnt + 1), If(cnt == lat.NORM_GAP - 1, wait.eq(0))),
            If(wait & ce & (phase == 1),
                cnt.eq(cnt + 1),
                If(cnt == drain, wait.eq(0), r.eq(rdat), krs.eq(kk_d))),
            If(wait & (phase == 0) & source.valid & source.ready & source.last,
                wait.eq(0), ss.eq(0), mx.eq(0)),
        ]
        self.comb += self.busy.eq((phase != 0) | wait | v1 | v2 | v3 | v4 | v5)
        self.wait_cycles = drain + 1
        assert lat.NORM_GAP >= 2  # bm5, mx, ka: the last pass-1 beat's max is in ka by then
        self.latency = len((v1, v2, v3, v4, v5))  # the stages above, input beat -> output beat
        if self.latency != lat.NORM_LAT:
            raise ValueError(f"RMSNorm has {self.latency} stages, gateware.latency says {lat.NORM_LAT}")


# ----------------------------------------------------------------------------- ActQuant
class ActQuant(Module):
    """quantize_act(v) of a vector of int16 values that arrives in any order of Q-wide beats.

    fill: beats of Q values at element index `idx` (a multiple of Q); `last` on the final beat.
    source: n/P beats of P int8 values (n = number of values filled), k on every beat."""

    def __init__(self, n_max: int, Q: int, P: int, width: int = 16):
        self.fill = stream.Endpoint([("v", Q * width), ("idx", ubits(n_max))])
        self.source = stream.Endpoint([("a", P * 8), ("k", ubits(width))])

        # # #

        # the buffer: P/Q banks of distributed RAM; bank b, word a = elements a*P + b*Q + [0, Q)
        NB = P // Q
        n = Signal(ubits(n_max))  # values filled
        mx = Signal(width)
        fill, source = self.fill, self.source
        self.comb += fill.ready.eq(1)
        vs = lanes_of(self, fill.v, Q, width)
        bmax = max_tree(self, [absval(self, v) for v in vs])
        emitting = Signal()
        calc = Signal()
        k = Signal(len(source.k))
        rd = Signal(ubits(n_max // P))
        fb = Signal(ubits(max(1, NB - 1)))
        self.comb += fb.eq((fill.idx >> ubits(Q - 1)) & (NB - 1) if NB > 1 else 0)
        reads = []
        for b in range(NB):
            mem = Memory(Q * width, n_max // P)
            wp = mem.get_port(write_capable=True)
            rp = mem.get_port(async_read=True)
            self.specials += mem, wp, rp
            self.comb += [wp.adr.eq(fill.idx >> ubits(P - 1)), wp.dat_w.eq(fill.v),
                          wp.we.eq(fill.valid & (fb == b)), rp.adr.eq(rd)]
            reads.append(rp.dat_r)
        self.sync += If(fill.valid,
                        If(fill.first, mx.eq(bmax)).Elif(bmax > mx, mx.eq(bmax)),
                        If(fill.first, n.eq(Q)).Else(n.eq(n + Q)))
        bl = bit_length(self, mx)
        self.sync += calc.eq(fill.valid & fill.last)
        self.sync += If(calc, emitting.eq(1), rd.eq(0), k.eq(Mux(bl > 7, bl - 7, 0)))
        # emit: P values per beat, output register
        cur = Signal(P * width)
        self.comb += cur.eq(Cat(*reads))
        # emit: the buffer word registered (lat.ACTQ_EMIT), then quantized into the output register
        cur1 = Signal(P * width)
        v1, first1, last1 = Signal(), Signal(), Signal()
        aq = [clip(self, round_shift(self, v, k, (0, width)), nx.ACT_MAX)
              for v in lanes_of(self, cur1, P, width)]
        ce = Signal()
        self.comb += ce.eq(~source.valid | source.ready)
        last_rd = Signal()
        self.comb += last_rd.eq((rd + 1) * P >= n)
        assert lat.ACTQ_EMIT == 1
        self.sync += If(ce,
                        cur1.eq(cur), v1.eq(emitting), first1.eq(rd == 0), last1.eq(last_rd),
                        source.valid.eq(v1),
                        source.first.eq(first1),
                        source.last.eq(last1),
                        source.a.eq(Cat(*[a[:8] for a in aq])),
                        source.k.eq(k),
                        If(emitting, rd.eq(rd + 1), If(last_rd, emitting.eq(0))))


# ----------------------------------------------------------------------------- RoPE
class Rope(Module):
    """numerics.rope on Q/2 interleaved pairs per beat, cos/sin (Q14) given with each beat."""

    latency = lat.ROPE

    def __init__(self, Q: int):
        self.sink = stream.Endpoint([("x", Q * 16), ("cos", Q // 2 * 16), ("sin", Q // 2 * 16)])
        self.source = stream.Endpoint([("x", Q * 16)])

        # # #

        ce = pipe_ctrl(self, self.sink, self.source, self.latency)
        xs = lanes_of(self, self.sink.x, Q, 16)
        cs = lanes_of(self, self.sink.cos, Q // 2, 16)
        sn = lanes_of(self, self.sink.sin, Q // 2, 16)
        outs = []
        for i in range(Q // 2):
            a, b = xs[2 * i], xs[2 * i + 1]
            ac, bs, as_, bc = [Signal((32, True)) for _ in range(4)]
            self.sync += If(ce, ac.eq(a * cs[i]), bs.eq(b * sn[i]), as_.eq(a * sn[i]), bc.eq(b * cs[i]))
            d0 = signed(self, ac - bs, 33)
            d1 = signed(self, as_ + bc, 33)
            o0 = saturate(self, round_shift(self, d0, nx.ROPE_FRAC, (0, 0)), 16)
            o1 = saturate(self, round_shift(self, d1, nx.ROPE_FRAC, (0, 0)), 16)
            r0, r1 = Signal((16, True)), Signal((16, True))
            self.sync += If(ce, r0.eq(o0), r1.eq(o1))
            outs += [r0, r1]
        self.comb += self.source.x.eq(Cat(*outs))


# ----------------------------------------------------------------------------- SwiGLU
class SwiGLU(Module):
    """numerics.swiglu(h1, h3, step): silu(h1) * h3 for Q lanes of int16 (step: steps.SwiGLUStep)."""

    latency = lat.SWIGLU

    def __init__(self, Q: int, step):
        self.sink = stream.Endpoint([("h1", Q * 16), ("h3", Q * 16)])
        self.source = stream.Endpoint([("hb", Q * 16)])

        # # #

        ce = pipe_ctrl(self, self.sink, self.source, self.latency)
        h1 = lanes_of(self, self.sink.h1, Q, 16)
        h3 = lanes_of(self, self.sink.h3, Q, 16)
        # the sigmoid table in block RAM: synchronous read ports, address one stage early
        sig_mem = Memory(16, nx.SIG_ENTRIES, init=[int(v) for v in nx.SIGMOID_TABLE])
        sig_ports = []
        for _ in range(Q):
            sp = sig_mem.get_port(has_re=True)
            self.specials += sp
            self.comb += sp.re.eq(ce)
            sig_ports.append((sp.adr, sp.dat_r))
        self.specials += sig_mem
        half = nx.SIG_ENTRIES // 2
        outs = []
        sh_in, sh_out = step.index, step.out
        for j in range(Q):
            t = round_shift(self, h1[j], sh_in, (sh_in, sh_in))
            i0 = signed(self, t + half, len(t) + 2)
            idx = Signal(ubits(nx.SIG_ENTRIES - 1))
            self.comb += If(i0 < 0, idx.eq(0)).Elif(i0 > nx.SIG_ENTRIES - 1,
                                                    idx.eq(nx.SIG_ENTRIES - 1)).Else(idx.eq(i0))
            a1, b1 = Signal((16, True)), Signal((16, True))
            self.sync += If(ce, a1.eq(h1[j]), b1.eq(h3[j]))
            adr, dat = sig_ports[j]
            self.comb += adr.eq(idx)  # read at the stage-1 edge, data with a1 / b1
            p2, b2 = Signal((33, True)), Signal((16, True))
            self.sync += If(ce, p2.eq(a1 * dat), b2.eq(b1))
            silu = round_shift(self, p2, 15, (15, 15))
            p3 = Signal((48, True))
            self.sync += If(ce, p3.eq(silu * b2))
            o = saturate(self, round_shift(self, p3, sh_out, (sh_out, sh_out)), 16)
            r = Signal((16, True))
            self.sync += If(ce, r.eq(o))
            outs.append(r)
        self.comb += self.source.hb.eq(Cat(*outs))


# ----------------------------------------------------------------------------- exp
class ExpNeg(Module):
    """numerics.exp_neg: d >= 0 (Q8) -> exp(-d) in Q15, for H lanes; fixed latency, ce given."""

    latency = lat.EXPNEG

    def __init__(self, H: int, d_bits: int, ce=None):
        self.d = [Signal(d_bits) for _ in range(H)]
        self.e = [Signal(16 + 1) for _ in range(H)]
        self.ce = ce if ce is not None else Signal(reset=1)

        # # #

        ce = self.ce
        # EXP_HI (256 entries) in block RAM, read at the stage-1 edge; EXP_LO (16) in LUTs
        hi_mem = Memory(16, len(nx.EXP_HI), init=[int(v) for v in nx.EXP_HI])
        self.specials += hi_mem
        hi_ports = []
        for _ in range(H):
            hp = hi_mem.get_port(has_re=True)
            self.specials += hp
            self.comb += hp.re.eq(ce)
            hi_ports.append((hp.adr, hp.dat_r))
        lo_ports = rom(self, nx.EXP_LO, 16, nports=H)
        for j in range(H):
            d = self.d[j]
            over = Signal()
            dc = Signal(12)
            self.comb += [over.eq(d > nx.EXP_IN_MAX), dc.eq(d)]
            (ha, hd), (la, ld) = hi_ports[j], lo_ports[j]
            over1, dc1 = Signal(), Signal(12)
            self.sync += If(ce, over1.eq(over), dc1.eq(dc))
            self.comb += [ha.eq(dc[4:12]), la.eq(dc1[0:4])]
            p2, over2 = Signal(32), Signal()
            self.sync += If(ce, p2.eq(hd * ld), over2.eq(over1))
            e = Signal(17)
            self.comb += e.eq((p2 + (1 << 14)) >> 15)
            self.sync += If(ce, self.e[j].eq(Mux(over2, 0, e)))


# ----------------------------------------------------------------------------- divider
class RecipDivider(Module):
    """floor(2^num_exp / den) by restoring division, two quotient bits per cycle.

    Valid for den in [den_min, den_max]: start with the quotient's leading bits already known."""

    def __init__(self, num_exp: int, den_min: int, den_max: int):
        q_bits = ubits((1 << num_exp) // den_min)
        q_bits += q_bits % 2  # whole steps of two bits
        if (1 << num_exp) >> q_bits >= den_min:
            raise ValueError("divider start remainder must be below the smallest divisor")
        self.den = Signal(ubits(den_max))
        self.start = Signal()
        self.q = Signal(q_bits)
        self.done = Signal()
        self.cycles = q_bits // 2 + 1

        # # #

        self.busy = busy = Signal()
        rw = ubits(den_max) + 2
        rem = Signal(rw)
        den = Signal(len(self.den))
        cnt = Signal(ubits(q_bits))
        r1 = Signal(rw + 1)
        r1n = Signal(rw + 1)
        b1 = Signal()
        r2 = Signal(rw + 1)
        r2n = Signal(rw + 1)
        b2 = Signal()
        self.comb += [  # two restoring steps (the numerator's low bits are all zero)
            r1.eq(rem << 1), b1.eq(r1 >= den), r1n.eq(Mux(b1, r1 - den, r1)),
            r2.eq(r1n << 1), b2.eq(r2 >= den), r2n.eq(Mux(b2, r2 - den, r2)),
        ]
        self.sync += [
            self.done.eq(0),
            If(self.start,
                rem.eq((1 << num_exp) >> q_bits), cnt.eq(q_bits // 2), busy.eq(1), self.q.eq(0),
                den.eq(self.den)
            ).Elif(busy,
                rem.eq(r2n), self.q.eq(Cat(b2, b1, self.q)),
                cnt.eq(cnt - 1),
                If(cnt == 1, busy.eq(0), self.done.eq(1)))
        ]


# ----------------------------------------------------------------------------- softmax
class Softmax(Module):
    """Attention's softmax normalizer for H heads at once (numerics.attention_head).

    sink_max: scores s (Q8), first..last -> running max per head (always ready); on `last` the max
              is frozen for the exp stream, so the next group's scores may stream in meanwhile.
    sink:     the same scores again -> source_e: e = exp_neg(max - s) (Q15) per beat, and the
              sums; after `last`, source_recip: floor(2^ATT_RECIP_BITS / sum) per head."""

    def __init__(self, H: int, s_bits: int, max_len: int):
        self.sink_max = stream.Endpoint([("s", H * s_bits)])
        self.sink = stream.Endpoint([("s", H * s_bits)])
        self.source_e = stream.Endpoint([("e", H * 17)])
        tot_max = max_len * nx.EXP_ONE
        self.div_cycles = 0
        den_min = nx.EXP_ONE  # the max score contributes exactly 1.0
        q_bits = ubits((1 << nx.ATT_RECIP_BITS) // den_min)
        self.source_recip = stream.Endpoint([("recip", H * q_bits)])

        # # #

        sink = self.sink
        ce = Signal()
        pending = Signal()  # a normalizer is being computed or waits to be taken
        self.comb += [ce.eq(~self.source_e.valid | self.source_e.ready),
                      sink.ready.eq(ce & ~pending), self.sink_max.ready.eq(1)]
        ms = lanes_of(self, self.sink_max.s, H, s_bits)
        ss = lanes_of(self, sink.s, H, s_bits)
        mx = [Signal((s_bits, True)) for _ in range(H)]  # running max
        mxv = [Signal((s_bits, True)) for _ in range(H)]  # the max the exp stream uses
        take = Signal()
        self.comb += take.eq(sink.valid & sink.ready)
        # stage 1: d = max - s (the exp stream)
        d_bits = s_bits + 1
        d1 = [Signal(d_bits) for _ in range(H)]
        v1, l1, f1 = Signal(), Signal(), Signal()
        for j in range(H):
            mnew = Signal((s_bits, True))
            self.comb += mnew.eq(Mux(self.sink_max.first | (ms[j] > mx[j]), ms[j], mx[j]))
            self.sync += If(self.sink_max.valid, mx[j].eq(mnew),
                            If(self.sink_max.last, mxv[j].eq(mnew)))
            self.sync += If(ce, d1[j].eq(mxv[j] - ss[j]))
        self.sync += If(ce, v1.eq(take), l1.eq(sink.last), f1.eq(sink.first))
        self.submodules.exp = ex = ExpNeg(H, d_bits, ce)
        self.comb += [ex.d[j].eq(d1[j]) for j in range(H)]
        vv, ll, ff = [v1], [l1], [f1]
        for _ in range(ExpNeg.latency):
            nv, nl, nf = Signal(), Signal(), Signal()
            self.sync += If(ce, nv.eq(vv[-1]), nl.eq(ll[-1]), nf.eq(ff[-1]))
            vv.append(nv)
            ll.append(nl)
            ff.append(nf)
        self.comb += [self.source_e.valid.eq(vv[-1]), self.source_e.last.eq(ll[-1]),
                      self.source_e.first.eq(ff[-1]),
                      self.source_e.e.eq(Cat(*ex.e))]
        # sums and reciprocals
        tot = [Signal(ubits(tot_max)) for _ in range(H)]
        out_take = Signal()
        self.comb += out_take.eq(self.source_e.valid & self.source_e.ready)
        for j in range(H):
            self.sync += If(out_take, If(self.source_e.first, tot[j].eq(ex.e[j])).Else(
                tot[j].eq(tot[j] + ex.e[j])))
        divs = [RecipDivider(nx.ATT_RECIP_BITS, den_min, tot_max) for _ in range(H)]
        self.submodules += divs
        self.div_cycles = divs[0].cycles
        start = Signal()
        self.sync += start.eq(out_take & self.source_e.last)
        have = Signal()
        for j, dv in enumerate(divs):
            self.comb += [dv.start.eq(start), dv.den.eq(tot[j])]
        self.sync += [
            If(take & sink.last, pending.eq(1)),
            If(divs[0].done, have.eq(1)),
            If(self.source_recip.valid & self.source_recip.ready, have.eq(0), pending.eq(0)),
        ]
        self.comb += [self.source_recip.valid.eq(have), self.source_recip.last.eq(1),
                      self.source_recip.recip.eq(Cat(*[dv.q[:q_bits] for dv in divs]))]
        # (a divider makes whole steps of two bits: its q may be one bit wider than the value)


# ----------------------------------------------------------------------------- argmax
class Argmax(Module):
    """numerics.argmax over a stream of Q-wide beats of signed values (lowest index on ties).

    n_max: values streamed; n_valid (<= n_max): only indices below it can win (the rest are the
    padding of a vocabulary to the tile: their lanes are forced to the most negative value, which
    a real lane, lower in index, wins on a tie)."""

    def __init__(self, Q: int, width: int, n_max: int, n_valid: int | None = None):
        self.sink = stream.Endpoint([("v", Q * width)])
        self.source = stream.Endpoint([("index", ubits(n_max))])

        # # #

        sink, source = self.sink, self.source
        base = Signal(ubits(n_max))
        vs = lanes_of(self, sink.v, Q, width)
        if n_valid is not None and n_valid < n_max:
            lo = Constant(-(1 << (width - 1)), (width, True))
            vm = []
            for j, v in enumerate(vs):
                m = Signal((width, True))
                self.comb += m.eq(Mux(base + j < n_valid, v, lo))
                vm.append(m)
            vs = vm
        # reduce within the beat: (value, lane), the lower lane wins ties
        cand = [(v, Constant(j, ubits(Q))) for j, v in enumerate(vs)]
        while len(cand) > 1:
            nxt = []
            for i in range(0, len(cand) - 1, 2):
                (va, ia), (vb, ib) = cand[i], cand[i + 1]
                v = Signal((width, True))
                ix = Signal(ubits(Q))
                self.comb += If(vb > va, v.eq(vb), ix.eq(ib)).Else(v.eq(va), ix.eq(ia))
                nxt.append((v, ix))
            if len(cand) % 2:
                nxt.append(cand[-1])
            cand = nxt
        bv, bi = cand[0]
        best = Signal((width, True))
        besti = Signal(len(source.index))
        self.comb += sink.ready.eq(~source.valid)
        self.sync += [
            If(source.valid & source.ready, source.valid.eq(0)),
            If(sink.valid & sink.ready,
                If(sink.first | (bv > best), best.eq(bv), besti.eq(base + bi)),
                If(sink.last,
                    base.eq(0), source.valid.eq(1),
                    If(sink.first | (bv > best), source.index.eq(base + bi)).Else(
                        source.index.eq(besti))
                ).Else(base.eq(base + Q))),
        ]
        self.comb += source.last.eq(1)


# ----------------------------------------------------------------------------- sampler
def xorshift32_next(m, x) -> Signal:
    """numerics.XorShift32.next as logic."""
    a = Signal(32)
    b = Signal(32)
    c = Signal(32)
    m.comb += [a.eq(x ^ (x << 13)), b.eq(a ^ (a >> 17)), c.eq(b ^ (b << 5))]
    return c


class Sampler(Module):
    """numerics.sample(logit_q8, inv_temp_q8, rng, top_k=0) over `n` logits, one per cycle per pass.

    Fill the Q8 logits through `fill` (Q values per beat, in order; n_fill >= n values, the ones past
    n - a vocabulary's padding - are stored but never read), then pulse `start`; `token` is
    valid with the `done` pulse. Passes: max of t = logit * inv_temp >> 8, sum of exp_neg(max - t),
    one draw, cumulative search. The PRNG is seeded from `seed` on `reseed` (XorShift32's seeding,
    32 shift-add cycles) and advances once per sample."""

    def __init__(self, n: int, Q: int, n_fill: int | None = None):
        self.fill = stream.Endpoint([("v", Q * 32)])
        self.inv_temp = Signal(16)
        self.start = Signal()
        self.done = Signal()
        self.token = Signal(ubits(n))
        self.seed = Signal(32)
        self.reseed = Signal()
        self.seeding = Signal()
        # what the host needs for exact speculative sampling (numerics.sample_counts), latched with
        # `done`: the running sum before the drawn token, its weight and the sum of all weights
        self.base = Signal(32)
        self.weight = Signal(32)
        self.total = Signal(32)
        # logit readback while idle: `rd_index` -> `rd_data` (the Q8 logit stored by the last fill)
        self.rd_index = Signal(16)
        self.rd_data = Signal((32, True))

        # # #

        nw = -(-(n_fill or n) // Q)
        mem = Memory(Q * 32, nw)
        wp = mem.get_port(write_capable=True)
        rp = mem.get_port()  # synchronous read: a block RAM, not distributed RAM
        self.specials += mem, wp, rp
        fidx = Signal(ubits(nw))
        fill = self.fill
        self.comb += [fill.ready.eq(1), wp.adr.eq(fidx), wp.dat_w.eq(fill.v), wp.we.eq(fill.valid)]
        self.sync += If(fill.valid, If(fill.last, fidx.eq(0)).Else(fidx.eq(fidx + 1)))

        # PRNG seeding: s = seed * 2654435761 + 0x6D2B79F5 (mod 2^32), 0 -> 0x9E3779B9
        K = 2654435761
        state = Signal(32, reset=0x9E3779B9)
        mul_acc = Signal(32)
        mul_a = Signal(32)
        mul_k = Signal(32)
        mul_n = Signal(6)
        fin = Signal(32)
        self.comb += [self.seeding.eq(mul_n != 0), fin.eq(mul_acc + 0x6D2B79F5)]
        self.sync += [
            If(self.reseed, mul_acc.eq(0), mul_a.eq(self.seed), mul_k.eq(K), mul_n.eq(33)
            ).Elif(mul_n > 1,
                If(mul_a[0], mul_acc.eq(mul_acc + mul_k)),
                mul_a.eq(mul_a >> 1), mul_k.eq(mul_k << 1), mul_n.eq(mul_n - 1)
            ).Elif(mul_n == 1,
                state.eq(Mux(fin == 0, 0x9E3779B9, fin)), mul_n.eq(0))
        ]
        draw = xorshift32_next(self, state)

        # one element per cycle: address i -> R (the RAM word) -> L (the logit) -> A (t) ->
        # D (d = tmax - t, clipped) -> E (the exp tables) -> B (w = exp_neg(d)); lat.SAMPLER
        # stages, each a register so no path holds two of the wide steps
        lq = max(1, ubits(Q - 1)) if Q > 1 else 0
        i = Signal(ubits(n))
        running = Signal()
        rd_lo = Signal(max(1, lq))
        self.comb += rp.adr.eq(Mux(running, i[lq:] if Q > 1 else i,
                                   self.rd_index[lq:] if Q > 1 else self.rd_index))
        self.sync += rd_lo.eq(self.rd_index[:lq] if Q > 1 else 0)
        self.comb += self.rd_data.eq(Array([rp.dat_r[32 * j:32 * j + 32] for j in range(Q)])[rd_lo]
                                     if Q > 1 else rp.dat_r)
        vR, iR = Signal(), Signal(ubits(n))
        lsel = Signal((32, True))
        self.comb += lsel.eq(Array([rp.dat_r[32 * j:32 * j + 32] for j in range(Q)])[iR[:lq]]
                             if Q > 1 else rp.dat_r)
        lL = Signal((32, True))
        vL, iL = Signal(), Signal(ubits(n))
        tw = 32 + 17
        prod = signed(self, lL * self.inv_temp, tw)
        t = round_shift(self, prod, 8, (8, 8))
        tA = Signal((tw, True))
        vA, iA = Signal(), Signal(ubits(n))
        tmax = Signal((tw, True))
        d = signed(self, tmax - tA, tw + 1)
        dcl = Signal(13)
        self.comb += If(d > nx.EXP_IN_MAX, dcl.eq(nx.EXP_IN_MAX + 1)).Else(dcl.eq(d))
        dD = Signal(13)
        vD, iD = Signal(), Signal(ubits(n))
        [(ha, hd)] = rom(self, nx.EXP_HI, 16)
        [(la, ld)] = rom(self, nx.EXP_LO, 16)
        self.comb += [ha.eq(dD[4:12]), la.eq(dD[0:4])]
        hE, lE, overE = Signal(16), Signal(16), Signal()
        vE, iE = Signal(), Signal(ubits(n))
        pE = Signal(32)
        self.comb += pE.eq(hE * lE)
        w = Signal(17)
        self.comb += w.eq(Mux(overE, 0, (pE + (1 << 14)) >> 15))  # numerics.exp_neg
        wB = Signal(17)
        vB, iB = Signal(), Signal(ubits(n))
        assert lat.SAMPLER == len((vR, vL, vA, vD, vE, vB))
        total = Signal(ubits(n * nx.EXP_ONE))
        assert len(total) <= 32, "the sum of the sampler's weights must fit its 32-bit report"
        csum = Signal(len(total))
        target = Signal(len(total))
        phase = Signal(2)  # 0 max, 1 sum, 2 search
        issuing = Signal()
        self.sync += [
            vR.eq(issuing), iR.eq(i),
            lL.eq(lsel), vL.eq(vR), iL.eq(iR),
            tA.eq(t), vA.eq(vL), iA.eq(iL),
            dD.eq(dcl), vD.eq(vA), iD.eq(iA),
            hE.eq(hd), lE.eq(ld), overE.eq(dD > nx.EXP_IN_MAX), vE.eq(vD), iE.eq(iD),
            wB.eq(w), vB.eq(vE), iB.eq(iE),
            self.done.eq(0),
        ]
        drained = Signal()
        self.comb += drained.eq(~issuing & ~vR & ~vL & ~vA & ~vD & ~vE & ~vB)
        drawing = Signal()
        dr_r = Signal(32)
        dr_acc = Signal(32 + len(total))
        dr_n = Signal(6)
        self.sync += [
            If(self.start,
                running.eq(1), issuing.eq(1), phase.eq(0), i.eq(0), tmax.eq(-(1 << (tw - 1))),
                total.eq(0), csum.eq(0)
            ).Elif(running,
                If(issuing, If(i == n - 1, issuing.eq(0), i.eq(0)).Else(i.eq(i + 1))),
                If(phase == 0,
                    If(vA & (tA > tmax), tmax.eq(tA)),
                    If(drained, phase.eq(1), issuing.eq(1))
                ).Elif(phase == 1,
                    If(vB, total.eq(total + wB)),
                    If(drained & ~drawing,
                        drawing.eq(1), state.eq(draw), dr_r.eq(draw), dr_acc.eq(0), dr_n.eq(32)),
                    If(drawing,  # target = (r * total) >> 32, one bit of r per cycle
                        If(dr_n == 0,
                            drawing.eq(0), phase.eq(2), issuing.eq(1), target.eq(dr_acc[32:])
                        ).Else(
                            dr_acc.eq((dr_acc >> 1) + Mux(dr_r[0], total << 31, 0)),
                            dr_r.eq(dr_r >> 1), dr_n.eq(dr_n - 1)))
                ).Else(
                    If(vB,
                        csum.eq(csum + wB),
                        If(csum + wB > target,
                            running.eq(0), issuing.eq(0), self.done.eq(1), self.token.eq(iB),
                            self.base.eq(csum), self.weight.eq(wB), self.total.eq(total))))),
        ]
