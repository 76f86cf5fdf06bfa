"""The matrix-vector engine: `lanes` weight x activation products per cycle from banked weight ROMs.

Tile: each cycle one ROM word per bank is read; a word holds R_b row slots of C consecutive weights
of one row (plus a share of that row's group multiplier). Slot j of row group g is row g*R_b + j.
Per slot: C products -> adder tree -> group partial (over group/C cycles) -> x multiplier m ->
row accumulator (over cols/C cycles). Finished rows are repacked into P-wide beats in row order.

    acc[r] = sum_g m[r, g] * sum_{j in g} q[r, j] * a[j]      (numerics.matvec, exact)

No stalls inside the pipeline: a row group is only issued while the output FIFO has room for
everything in flight (credit counter), so back-pressure on `source` just pauses issuing.

The units, in pipeline order (MatVec wires them; their latencies are gateware/latency.py's):

    MatVecIssue     command registers, issue counters, the ROM address of the next cycle
    WeightRom       one per bank: lat.ROM_ADR address registers, then the word
    MatVecOperands  activation registers (act_sink); the word and the chunk's activations registered
    MatVecDots      per row slot: C products -> adder tree (+ extension fields); m shares alongside
    RowAccumulate   group partial, m x partial, row accumulator: one queue entry per row group
    CreditFifo      the output queue and its credits
    Repack          queue entries -> Q-wide beats in row order (source)

Streams with ready: cmd (taken while not busy), act_sink (always ready), queue -> Repack -> source
(back-pressure honoured). From the issue to the queue the pipeline has a fixed latency and cannot
stall: the control (ctrl_layout) travels beside the data as a Record, delayed by each unit.
"""

from migen import *
from litex.gen import LiteXModule
from litex.soc.interconnect import stream

from bakedllama import numerics as nx

from gateware import latency as lat
from gateware.hw import (SHARED_A, SHARED_B, SHARED_P, field, packed_pair_dot, plane_dot,
                         signed, ubits)
from gateware.latency import tree_latency
from gateware.units import VectorRegs


class WeightRom(Module):
    """One bank's ROM (block RAM init contents), synchronous read, always enabled.

    `adr_next` is the address of the next cycle; the word is at `dat_r` lat.ROM_ADR + 1 cycles
    after it. The address goes through a two-level tree of registers, so that no net drives more
    than a handful of block RAMs: the word is split into column slices of `slice_bits` (two
    DP16KD wide), each with its own copy of the address (level 1), and each slice into depth
    segments of `seg_depth` words (one DP16KD deep at 1K x 18), each with its own copy of the low
    address bits (level 2, next to its block RAMs). The segment's word is chosen after the read,
    by the high address bits registered alongside. All copies are kept apart in synthesis. Direct
    reads (the embedding) go through the same registers: the engine puts their address on
    `adr_next` (lat.EMBED_RAW). A last segment that holds at most half a segment's words is
    half as deep (a DP16KD of 512 x 36 holds what two of 1K x 18 would, half empty: at lanes 128
    the 4-bit bank is 3.5 segments deep)."""

    def __init__(self, width: int, words: list, slice_bits: int = 72, seg_depth: int = 1024):
        assert lat.ROM_ADR == 2
        depth = max(2, len(words))
        ab = ubits(depth - 1)
        self.adr_next = Signal(ab)
        self.dat_r = Signal(width)
        # # #
        seg_depth = min(seg_depth, 1 << ab)
        sb = ubits(seg_depth - 1)  # low address bits inside a segment
        nseg = -(-depth // seg_depth)
        words_in = words
        words = list(words) + [0] * (nseg * seg_depth - len(words))
        for lo in range(0, width, slice_bits):
            w = min(slice_bits, width - lo)
            adr1 = Signal(ab, attr={("keep", 1)})
            self.sync += adr1.eq(self.adr_next)
            outs = []
            for sg in range(nseg):
                seg = words[sg * seg_depth:(sg + 1) * seg_depth]
                sbs = sb  # address bits of this segment
                if sg == nseg - 1 and nseg > 1 and len(words_in) - sg * seg_depth <= seg_depth // 2:
                    sbs, seg = sb - 1, seg[:seg_depth // 2]
                mem = Memory(w, len(seg), init=[(v >> lo) & ((1 << w) - 1) for v in seg])
                port = mem.get_port()
                adr2 = Signal(sbs, attr={("keep", 1)})
                self.specials += mem, port
                self.sync += adr2.eq(adr1[:sbs])
                self.comb += port.adr.eq(adr2)
                outs.append(port.dat_r)
            if nseg == 1:
                self.comb += self.dat_r[lo:lo + w].eq(outs[0])
            else:
                sel2 = Signal(ab - sb, attr={("keep", 1)})  # with adr2
                sel3 = Signal(ab - sb)  # with the data
                self.sync += [sel2.eq(adr1[sb:]), sel3.eq(sel2)]
                self.comb += self.dat_r[lo:lo + w].eq(Array(outs)[sel3])


def cmd_layout(banks, max_rows_beats: int, tag_bits: int):
    depth = max(b.depth for b in banks)
    return [("bank", ubits(max(1, len(banks) - 1))), ("base", ubits(max(1, depth - 1))),
            ("chunks", ubits(max(b.depth for b in banks))),
            ("rowgroups", ubits(max(b.depth for b in banks))), ("tag", tag_bits)]


def ctrl_layout(banks, tag_bits: int):
    """The control that travels beside one issued ROM word through the pipeline."""
    return [("v", 1), ("chunk", ubits(max(b.depth for b in banks))), ("gfirst", 1), ("glast", 1),
            ("rfirst", 1), ("rlast", 1), ("kidx", ubits(max(b.chunks_per_group for b in banks))),
            ("bank", ubits(max(1, len(banks) - 1))), ("tag", tag_bits), ("clast", 1)]


def delay(m, rec, n: int = 1):
    """`rec` (a Record) through n registers of m."""
    for _ in range(n):
        r = Record(rec.layout)
        m.sync += r.raw_bits().eq(rec.raw_bits())
        rec = r
    return rec


class MatVecIssue(LiteXModule):
    """Stage 0: the command registers and the issue counters, one ROM word per cycle.

    cmd       stream: one matrix (bank, base word, chunks per row group, row groups, tag). Taken
              at once into registers (ready = not busy), so the sequencer's command fields never
              reach the issue logic or the ROM addresses directly
    room      in: the output queue has room for one more row group (CreditFifo); the last word
              of a row group is issued only then
    raw_adr, raw_en  in: a direct ROM read (the embedding, while idle) on the same address path
    adr_next  out: the ROM address of the next cycle (WeightRom.adr_next)
    ctrl      out: the control of the word issued now (ctrl_layout; v = issued), combinational
    reserve   out: the last word of a row group is issued now (it takes one credit)
    busy      out: a command is being issued

    Latency: cmd accepted -> its first word issued: 1 cycle (the command registers)."""

    latency = 1

    def __init__(self, banks, tag_bits: int):
        cl = ctrl_layout(banks, tag_bits)
        self.cmd = cmd = stream.Endpoint(cmd_layout(banks, 0, tag_bits))
        self.room = Signal()
        self.raw_adr = Signal(len(cmd.base))
        self.raw_en = Signal()
        self.adr_next = Signal(len(cmd.base))
        self.ctrl = c0 = Record(cl)
        self.reserve = Signal()
        self.busy = busy = Signal()

        # # #

        base_r = Signal(len(cmd.base))
        chunks_m1 = Signal(len(cmd.chunks))
        rgs_m1 = Signal(len(cmd.rowgroups))
        bank_r = Signal(len(cmd.bank))
        tag_r = Signal(tag_bits)
        cpg_m1 = Signal(len(c0.kidx))
        self.comb += cmd.ready.eq(~busy)
        offset = Signal(len(cmd.base))
        chunk = Signal(len(cmd.chunks))
        rg = Signal(len(cmd.rowgroups))
        kidx = Signal(len(cpg_m1))
        rlast0 = Signal()
        issue = Signal()
        clast = Signal()
        self.comb += [
            rlast0.eq(chunk == chunks_m1),
            issue.eq(busy & (~rlast0 | self.room)),
            clast.eq(issue & rlast0 & (rg == rgs_m1)),
            self.reserve.eq(issue & rlast0),
        ]
        self.sync += If(cmd.valid & cmd.ready,
            busy.eq(1), base_r.eq(cmd.base), chunks_m1.eq(cmd.chunks - 1),
            rgs_m1.eq(cmd.rowgroups - 1), bank_r.eq(cmd.bank), tag_r.eq(cmd.tag),
            cpg_m1.eq(Array([b.chunks_per_group - 1 for b in banks])[cmd.bank]),
            offset.eq(0), chunk.eq(0), rg.eq(0), kidx.eq(0)
        ).Elif(issue,
            If(clast, busy.eq(0)),
            offset.eq(offset + 1),
            If(rlast0, chunk.eq(0), rg.eq(rg + 1), kidx.eq(0)).Else(
                chunk.eq(chunk + 1),
                If(kidx == cpg_m1, kidx.eq(0)).Else(kidx.eq(kidx + 1))))
        # the address of the next cycle: a direct read (the embedding, while the engine is idle),
        # the first word of a command taken now, the next word after an issue, or the current word
        assert lat.EMBED_RAW == 1
        self.comb += If(self.raw_en, self.adr_next.eq(self.raw_adr)).Elif(cmd.valid & cmd.ready,
            self.adr_next.eq(cmd.base)).Elif(issue,
            self.adr_next.eq(base_r + offset + 1)).Else(self.adr_next.eq(base_r + offset))
        self.comb += [
            c0.v.eq(issue), c0.chunk.eq(chunk), c0.gfirst.eq(kidx == 0),
            c0.glast.eq(kidx == cpg_m1), c0.rfirst.eq(chunk == 0), c0.rlast.eq(rlast0),
            c0.kidx.eq(kidx), c0.bank.eq(bank_r), c0.tag.eq(tag_r), c0.clast.eq(clast),
        ]


class MatVecOperands(LiteXModule):
    """The activation registers and the operand registers of the products (stage 2).

    act_sink  stream: P int8 per beat (first .. last) fill a[0 .. k_max); always ready (a
              register file that takes a beat every cycle)
    words     in: each bank's ROM word (WeightRom.dat_r)
    ctrl_in   in: the control of the words at the ROM outputs (bank, chunk)
    word      out: the bank's word, registered
    a         out: the chunk's C activations (int8), registered
    ctrl      out: ctrl_in, registered with them

    Latency: 1 cycle (a fixed pipeline stage, no back-pressure)."""

    latency = 1

    def __init__(self, banks, k_max: int, P: int, C: int, tag_bits: int):
        if k_max % C or k_max % P:
            raise ValueError("activation length must be a multiple of C and P")
        self.acts = acts = VectorRegs(k_max, P, 8, name="act")
        self.act_sink = acts.sink
        self.words = [Signal(b.width) for b in banks]
        self.ctrl_in = Record(ctrl_layout(banks, tag_bits))
        self.word = Signal(max(b.width for b in banks))
        aslice = Signal(C * 8)
        self.a = [field(self, aslice, 8 * i, 8) for i in range(C)]

        # # #

        act = acts.v
        c1 = self.ctrl_in
        self.sync += self.word.eq(Array(self.words)[c1.bank])
        nch = k_max // C
        self.sync += aslice.eq(Array([Cat(*act[c * C:(c + 1) * C]) for c in range(nch)])[c1.chunk])
        self.ctrl = delay(self, c1)


class MatVecDots(LiteXModule):
    """Per row slot: the C weight x activation products and their adder tree (stage 3).

    word, a, bank  in: the operands (MatVecOperands) and the word's bank (field layout)
    dots      out: per slot j, sum_i w[j, i] * a[i] (signed; wider weights: the low fields'
              dot + the extension fields' dot << lane_bits)
    ms        out: per slot, its share of the group multiplier, delayed alongside
    mul_*     `share` of the packed-pair multipliers lent out (see MatVec)

    Each lane multiplies a lane_bits field: signed (sign-extended for narrower banks), or unsigned
    where it is the low part of wider weights (a positive top bit); their high parts (the
    extension fields) go through LUT bit planes of their own. Slots 0 .. 2*dsp_pairs-1 go in pairs
    through packed MULT18X18D (hw.packed_pair_dot), the rest through LUT bit-plane trees
    (hw.plane_dot); the shorter paths are delayed so every slot arrives together.
    Latency: lat.MV_PRODUCTS (+ lat.MV_DSP with DSP pairs) + tree_latency(C), no back-pressure."""

    def __init__(self, banks, C: int, R: int, dsp_pairs: int = 0, share: int = 0):
        nb = len(banks)
        self.word = word = Signal(max(b.width for b in banks))
        self.a = a2 = [Signal((8, True)) for _ in range(C)]
        self.bank = bank = Signal(ubits(max(1, nb - 1)))
        m_share_max = max(b.m_share for b in banks)
        self.ms = msl = [Signal(m_share_max) for _ in range(R)]
        self.mul_sel = Signal()
        if share:
            self.mul_a = Signal(share * SHARED_A)
            self.mul_b = Signal(share * SHARED_B)
            self.mul_p = Signal(share * SHARED_P)

        # # #

        lw = max(b.lane_bits for b in banks)
        if dsp_pairs and (2 * dsp_pairs > R or lw > 4):
            raise ValueError(f"dsp_pairs {dsp_pairs}: needs 2 * dsp_pairs <= rows ({R}) and "
                             f"weights of <= 4 bits per lane (lane_bits {lw})")
        wsl, negs, mshares = [], [], []
        for j in range(R):
            top_neg = Signal()  # the slot's fields are the low part of wider weights: unsigned
            self.comb += top_neg.eq(Array([int(not b.ext_bits) for b in banks])[bank]
                                    if nb > 1 else int(not banks[0].ext_bits))
            ws = []
            # banks with the same slot geometry share the weight fields (no per-lane bank mux)
            same = all(b.lane_bits == lw and b.slot_width == banks[0].slot_width and j < b.slots
                       for b in banks)
            for i in range(C):
                wj = Signal(lw)  # raw bits (sign-extended for narrower banks); top_neg gives the sign
                if same:
                    self.comb += wj.eq(word[j * banks[0].slot_width + i * lw:][:lw])
                else:
                    opts = []
                    for b in banks:
                        if j < b.slots:
                            opts.append(field(self, word, j * b.slot_width + i * b.lane_bits,
                                              b.lane_bits, is_signed=not b.ext_bits))
                        else:
                            opts.append(Constant(0, (b.lane_bits, True)))
                    self.comb += wj.eq(Array(opts)[bank] if nb > 1 else opts[0])
                ws.append(wj)
            wsl.append(ws)
            negs.append(top_neg)
            ms = Signal(m_share_max)
            if same and all(b.m_share == banks[0].m_share for b in banks):
                self.comb += ms.eq(word[j * banks[0].slot_width + C * lw:][:banks[0].m_share])
            else:
                mopts = []
                for b in banks:
                    if j < b.slots:
                        mopts.append(field(self, word, j * b.slot_width + C * b.lane_bits, b.m_share,
                                           False))
                    else:
                        mopts.append(Constant(0, b.m_share))
                self.comb += ms.eq(Array(mopts)[bank] if nb > 1 else mopts[0])
            mshares.append(ms)
        # the shared multipliers: the select registered, one copy per 8 of them (fan-out)
        sel_r = []
        for n in range(0, share, 8):
            r = Signal(attr={("keep", 1)})
            self.sync += r.eq(self.mul_sel)
            sel_r.append(r)

        def mul(base):
            def f(i, b, a):
                n = base + i
                p = Signal((SHARED_P, True))
                if n >= share:
                    self.sync += p.eq(b * a)
                    return p
                ea = field(self, self.mul_a, SHARED_A * n, SHARED_A)
                eb = field(self, self.mul_b, SHARED_B * n, SHARED_B)
                oa, ob = Signal((SHARED_A, True)), Signal((SHARED_B, True))
                self.comb += [oa.eq(Mux(sel_r[n // 8], ea, b)), ob.eq(Mux(sel_r[n // 8], eb, a))]
                self.sync += p.eq(oa * ob)
                self.comb += self.mul_p[SHARED_P * n:SHARED_P * (n + 1)].eq(p)
                return p
            return f

        dots, lats = [], []
        for j in range(0, 2 * dsp_pairs, 2):
            d0, d1, la = packed_pair_dot(self, wsl[j], negs[j], wsl[j + 1], negs[j + 1], a2,
                                         mul=mul((j // 2) * C))
            dots += [d0, d1]
            lats += [la, la]
        for j in range(2 * dsp_pairs, R):
            dot, la = plane_dot(self, wsl[j], a2, negs[j])
            dots.append(dot)
            lats.append(la)
        # the high parts of wider weights: per slot, a dot product of the extension fields
        # (signed, ext_bits planes; zero for the other banks), weighted 2^lane_bits after the trees
        eb = max(b.ext_bits for b in banks)
        hdots = []
        ext = [b for b in banks if b.ext_bits]
        if len({b.lane_bits for b in ext}) > 1:
            raise ValueError("banks with extension fields must share their lane_bits")
        # one bank with extension fields: they are zero in the other banks' (narrower) words if
        # those end before the fields, so no multiplexer is needed
        direct = len(ext) == 1 and all(b.width <= ext[0].ext_offset
                                       for b in banks if not b.ext_bits)
        if eb:
            for j in range(R):
                hs = []
                for i in range(C):
                    opts = []
                    for b in banks:
                        if b.ext_bits and j < b.slots:
                            opts.append(field(self, word, b.ext_offset + (j * C + i) * b.ext_bits,
                                              b.ext_bits))
                        else:
                            opts.append(Constant(0, (eb, True)))
                    hf = Signal((eb, True))
                    if direct or nb == 1:
                        self.comb += hf.eq(opts[banks.index(ext[0])])
                    else:
                        self.comb += hf.eq(Array(opts)[bank])
                    hs.append(hf)
                hd, la = plane_dot(self, hs, a2, 1)
                hdots.append(hd)
                lats.append(la)
        # every slot's dot product arrives after the same latency (the shorter paths delayed), all
        # of one width
        dlat = max(lats)

        def align(d, la):
            for _ in range(dlat - la):
                r = Signal((len(d), True))
                self.sync += r.eq(d)
                d = r
            return d
        lb = min(b.lane_bits for b in banks if b.ext_bits) if eb else 0
        dw = max([len(d) for d in dots] + [len(d) + lb + 1 for d in hdots])
        for j in range(R):
            dots[j] = signed(self, align(dots[j], lats[j]), dw)
        for j, hd in enumerate(hdots):
            hdots[j] = signed(self, align(hd, lats[R + j]), dw)
        if dlat != lat.MV_PRODUCTS + (lat.MV_DSP if dsp_pairs else 0) + tree_latency(C):
            raise ValueError(f"MatVec products take {dlat} cycles, gateware.latency says "
                             f"{lat.MV_PRODUCTS} (+ {lat.MV_DSP} with DSP pairs) + the tree's")
        self.latency = dlat
        # the m shares travel along the product + tree latency
        ms_d = [Cat(*mshares)]
        for _ in range(dlat):
            r = Signal(len(ms_d[0]))
            self.sync += r.eq(ms_d[-1])
            ms_d.append(r)
        msA = ms_d[-1]
        self.comb += [msl[j].eq(msA[j * m_share_max:(j + 1) * m_share_max]) for j in range(R)]
        # rows: slot j (+ its extension fields' dot << lane_bits)
        self.dots = [signed(self, dots[j] + (hdots[j] << lb), dw + 1) if eb else dots[j]
                     for j in range(R)]


class RowAccumulate(LiteXModule):
    """Group partials, m x partial, row accumulators: one queue entry per finished row group.

    ctrl_in   in: the control of the slots' dot products (gfirst/glast open and close a group of
              the multiplier, rfirst/rlast a row, kidx places the m share)
    dots, ms  in: per slot, the chunk's dot product and its share of the group multiplier
    source    out: R row accumulators, bank, tag of a finished row group; last on a command's final
              row group. No back-pressure: the issuer's credits keep room in the queue for every
              row group in flight, so the queue's sink is ready whenever this is valid

    Latency: ctrl_in -> source 2 cycles (the group sum register, the m x partial register; the
    row sum goes combinationally into the queue's write, the third cycle of lat.MV_LAT's three)."""

    latency = 2

    def __init__(self, banks, R: int, dw: int, acc_bits: int, tag_bits: int):
        m_share_max = max(b.m_share for b in banks)
        self.ctrl_in = cA = Record(ctrl_layout(banks, tag_bits))
        self.dots = [Signal((dw, True)) for _ in range(R)]
        self.ms = [Signal(m_share_max) for _ in range(R)]
        self.source = stream.Endpoint(queue_layout(banks, R, acc_bits, tag_bits))

        # # #

        ms_of = Array([b.m_share for b in banks])
        # stage A: group partial (over chunks of a group) and multiplier assembly
        part_max = max(b.group * nx.qmax(b.bits) * nx.ACT_MAX for b in banks)
        pw = ubits(part_max) + 1
        gsum_B = [Signal((pw, True)) for _ in range(R)]
        m_B = [Signal(nx.M_BITS) for _ in range(R)]
        cB = Record(cA.layout)
        grfirst = Signal()  # this group opens its row
        for j in range(R):
            gp = Signal((pw, True))
            mreg = Signal(nx.M_BITS)
            gsum = signed(self, Mux(cA.gfirst, 0, gp) + self.dots[j], pw)
            mshare = self.ms[j]
            mfull = Signal(nx.M_BITS)
            self.comb += mfull.eq(Mux(cA.gfirst, 0, mreg) | (mshare << (cA.kidx * ms_of[cA.bank])))
            self.sync += If(cA.v, gp.eq(gsum), mreg.eq(mfull))
            self.sync += [gsum_B[j].eq(gsum), m_B[j].eq(mfull)]
        self.sync += If(cA.v & cA.gfirst, grfirst.eq(cA.rfirst))
        self.sync += [cB.raw_bits().eq(cA.raw_bits()), cB.v.eq(cA.v & cA.glast),
                      cB.rfirst.eq(Mux(cA.gfirst, cA.rfirst, grfirst))]
        # stage C: group product m * partial
        gw = pw + nx.M_BITS + 1
        prod_C = [Signal((gw, True)) for _ in range(R)]
        for j in range(R):
            self.sync += prod_C[j].eq(gsum_B[j] * m_B[j])
        cC = delay(self, cB)
        # stage D: row accumulation -> the queue
        racc = [Signal((acc_bits, True)) for _ in range(R)]
        outs = []
        for j in range(R):
            nxt = signed(self, Mux(cC.rfirst, 0, racc[j]) + prod_C[j], acc_bits)
            self.sync += If(cC.v, racc[j].eq(nxt))
            outs.append(nxt)
        self.comb += [
            self.source.valid.eq(cC.v & cC.rlast),
            self.source.acc.eq(Cat(*outs)),
            self.source.bank.eq(cC.bank),
            self.source.tag.eq(cC.tag),
            self.source.last.eq(cC.clast),
        ]


def queue_layout(banks, R: int, acc_bits: int, tag_bits: int):
    return [("acc", R * acc_bits), ("bank", ubits(max(1, len(banks) - 1))), ("tag", tag_bits)]


class CreditFifo(LiteXModule):
    """The output queue, written without back-pressure under a credit count.

    sink      entries; the producer reserves one (`reserve`) for each entry it will write, only
              while `room` is high, so the FIFO is never full when an entry arrives
    source    the entries in order (ready honoured)
    reserve   in: one entry reserved now
    room      out: fewer than `depth` entries reserved or queued
    drained   out: none reserved or queued

    Latency: stream.SyncFIFO's (buffered=False): an entry written at one edge is on source after it."""

    def __init__(self, layout, depth: int):
        self.fifo = fifo = stream.SyncFIFO(layout, depth, buffered=False)
        self.sink, self.source = fifo.sink, fifo.source
        self.reserve = Signal()
        self.room = Signal()
        self.drained = Signal()

        # # #

        pending = Signal(ubits(depth + 1))  # one credit per entry in flight or queued
        self.sync += pending.eq(pending + self.reserve - (fifo.source.valid & fifo.source.ready))
        self.comb += [self.room.eq(pending < depth), self.drained.eq(pending == 0)]


class Repack(LiteXModule):
    """Queue entries of R_b row accumulators -> Q-wide beats in row order.

    sink      entries (acc: R row slots, bank, tag; last on a command's final entry)
    source    Q accumulators per beat, `beat` index from 0, tag; last on the command's final beat

    By the entry's bank: R_b >= Q splits an entry into R_b / Q beats, R_b < Q gathers Q / R_b
    entries into one (the earlier ones held in registers). Ready is honoured both ways.
    Latency: 0 (the beat is combinational from the entry)."""

    def __init__(self, banks, R: int, Q: int, acc_bits: int, tag_bits: int, max_rows: int):
        nb = len(banks)
        self.sink = sink = stream.Endpoint(queue_layout(banks, R, acc_bits, tag_bits))
        self.source = src = stream.Endpoint([("acc", Q * acc_bits), ("beat", ubits(max_rows // Q)),
                                             ("tag", tag_bits)])

        # # #

        accs = [sink.acc[j * acc_bits:(j + 1) * acc_bits] for j in range(R)]
        sub = Signal(ubits(max(R // Q, Q) + 1))
        gather = [Signal(acc_bits) for _ in range(Q)]
        beat = Signal(len(src.beat))
        pop = Signal()
        emit = Signal()
        self.comb += [src.tag.eq(sink.tag), src.beat.eq(beat), sink.ready.eq(pop)]
        bank_cases = {}
        for bi, b in enumerate(banks):
            Rb = b.rows_per_word
            if Rb >= Q:  # split one entry into Rb/Q beats
                n = Rb // Q
                bank_cases[bi] = [
                    src.valid.eq(sink.valid),
                    src.acc.eq(Array([Cat(*accs[s * Q:(s + 1) * Q]) for s in range(n)])[sub]),
                    src.last.eq(sink.last & (sub == n - 1)),
                    emit.eq(src.valid & src.ready),
                    pop.eq(emit & (sub == n - 1)),
                ]
            else:  # gather Q/Rb entries into one beat
                n = Q // Rb
                bank_cases[bi] = [
                    src.valid.eq(sink.valid & (sub == n - 1)),
                    src.acc.eq(Cat(*[accs[j % Rb] if j // Rb == n - 1 else gather[j]
                                     for j in range(Q)])),
                    src.last.eq(sink.last),
                    emit.eq(src.valid & src.ready),
                    pop.eq(sink.valid & ((sub != n - 1) | src.ready)),
                ]
        self.comb += Case(sink.bank, bank_cases) if nb > 1 else bank_cases[0]
        seq_cases = {}
        for bi, b in enumerate(banks):
            Rb = b.rows_per_word
            if Rb >= Q:
                n = Rb // Q
                seq_cases[bi] = If(emit, If(sub == n - 1, sub.eq(0)).Else(sub.eq(sub + 1)))
            else:
                n = Q // Rb
                seq_cases[bi] = If(pop,
                    Case(sub, {s: [gather[s * Rb + j].eq(accs[j]) for j in range(Rb)]
                               for s in range(n - 1)}),
                    If(sub == n - 1, sub.eq(0)).Else(sub.eq(sub + 1)))
        self.sync += Case(sink.bank, seq_cases) if nb > 1 else seq_cases[0]
        self.sync += If(emit, If(src.last, beat.eq(0)).Else(beat.eq(beat + 1)))


class MatVec(LiteXModule):
    """Matrix-vector engine: the units above in a row, the control beside the data.

        cmd -> MatVecIssue -> WeightRom (per bank) -> MatVecOperands -> MatVecDots
            -> RowAccumulate -> CreditFifo -> Repack -> source

    act_sink  P-wide int8 beats (first .. last) fill the activation registers a[0 .. k)
    cmd       (bank, base word, chunks per row group, row groups, tag): one matrix
    source    Q-wide beats of row accumulators in row order, `beat` index, `tag`; last on the
              final beat of a command (ready honoured: back-pressure fills the queue, and its
              credits pause issuing)
    raw_*     direct ROM reads (the embedding lookup) while the engine is idle: the address
              is registered with the engine's own (lat.EMBED_RAW), the word is at `roms[b].dat_r`
              two cycles after raw_en
    mul_*     `share` of the packed-pair multipliers lent to another unit (Attention's e x v):
              while mul_sel is high (it is registered here) multiplier n takes the operands
              mul_a[n], mul_b[n] (hw.SHARED_A / SHARED_B bits, signed) and mul_p[n] is their product
              a cycle later. The engine must be idle then: the sequencer never overlaps the two.
    latency   issue -> queue write (lat.MV_LAT + the adder tree's registers + lat.MV_DSP with
              DSP pairs: what cycle_model.mv_cycles drains)
    """

    def __init__(self, banks, cols: int, rows: int, vlanes: int, k_max: int, acc_bits: int,
                 out_lanes: int = 2, tag_bits: int = 8, dsp_pairs: int = 0, share: int = 0):
        C, R, P, Q = cols, rows, vlanes, out_lanes
        if not 0 <= share <= dsp_pairs * C:
            raise ValueError(f"share {share}: the engine has {dsp_pairs * C} packed-pair "
                             f"multipliers")
        self.share = share
        self.banks = banks
        max_rows = max(b.depth * b.rows_per_word for b in banks)
        self.issue = issue = MatVecIssue(banks, tag_bits)
        self.operands = ops = MatVecOperands(banks, k_max, P, C, tag_bits)
        self.dots = dots = MatVecDots(banks, C, R, dsp_pairs, share)
        self.accumulate = acc = RowAccumulate(banks, R, len(dots.dots[0]), acc_bits, tag_bits)
        self.queue = queue = CreditFifo(queue_layout(banks, R, acc_bits, tag_bits), 24)
        self.repack = repack = Repack(banks, R, Q, acc_bits, tag_bits, max_rows)
        self.act_sink = ops.act_sink
        self.cmd = issue.cmd
        self.source = repack.source
        self.idle = Signal()
        self.raw_adr, self.raw_en = issue.raw_adr, issue.raw_en
        self.mul_sel = dots.mul_sel
        if share:
            self.mul_a, self.mul_b, self.mul_p = dots.mul_a, dots.mul_b, dots.mul_p

        # # #

        # the ROMs (plain Modules: see WeightRom), their word lat.ROM_ADR cycles after the issue
        self.roms = roms = [WeightRom(b.width, b.words) for b in banks]
        self.submodules += roms
        self.comb += [rom.adr_next.eq(issue.adr_next) for rom in roms]
        self.comb += [w.eq(rom.dat_r) for w, rom in zip(ops.words, roms)]
        c1 = delay(self, issue.ctrl, lat.ROM_ADR)
        self.comb += [ops.ctrl_in.raw_bits().eq(c1.raw_bits()),
                      dots.word.eq(ops.word), dots.bank.eq(ops.ctrl.bank),
                      *[d.eq(a) for d, a in zip(dots.a, ops.a)]]
        cA = delay(self, ops.ctrl, dots.latency)
        self.comb += [acc.ctrl_in.raw_bits().eq(cA.raw_bits()),
                      *[d.eq(s) for d, s in zip(acc.dots, dots.dots)],
                      *[d.eq(s) for d, s in zip(acc.ms, dots.ms)]]
        self.comb += [acc.source.connect(queue.sink), queue.source.connect(repack.sink),
                      issue.room.eq(queue.room), queue.reserve.eq(issue.reserve)]
        self.comb += self.idle.eq(~issue.cmd.valid & ~issue.busy & queue.drained)
        # issue -> queue write: command registers, ROM, operands, products + tree, accumulation
        self.latency = (issue.latency + lat.ROM_ADR + ops.latency + dots.latency + acc.latency
                        + 1)  # (+1: the queue's write)
        if self.latency != lat.MV_LAT + tree_latency(C) + (lat.MV_DSP if dsp_pairs else 0):
            raise ValueError(f"MatVec pipeline is {self.latency} cycles, gateware.latency says "
                             f"{lat.MV_LAT} + the adder tree's {tree_latency(C)}")
