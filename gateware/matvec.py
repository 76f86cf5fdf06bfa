"""The matrix-vector engine: `lanes` weight x activation products per cycle from banked weight ROMs.

Tile: each cycle one ROM word per bank is read; a word holds R_b row slots of C consecutive weights
of one row (plus a share of that row's group multiplier). Slot j of row group g is row g*R_b + j.
Per slot: C products -> adder tree -> group partial (over group/C cycles) -> x multiplier m ->
row accumulator (over cols/C cycles). Finished rows are repacked into P-wide beats in row order.

    acc[r] = sum_g m[r, g] * sum_{j in g} q[r, j] * a[j]      (numerics.matvec, exact)

No stalls inside the pipeline: a row group is only issued while the output FIFO has room for
everything in flight (credit counter), so back-pressure on `source` just pauses issuing.
"""

from migen import *
from litex.soc.interconnect import stream

from bakedllama import numerics as nx

from gateware import latency as lat
from gateware.hw import (SHARED_A, SHARED_B, SHARED_P, field, packed_pair_dot, plane_dot,
                         signed, ubits)
from gateware.latency import tree_latency


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


class MatVec(Module):
    """Matrix-vector engine.

    act_sink  P-wide int8 beats (first .. last) fill the activation registers a[0 .. k)
    cmd       (bank, base word, chunks per row group, row groups, tag): one matrix
    source    Q-wide beats of row accumulators in row order, `beat` index, `tag`; last on the
              final beat of a command
    raw_*     direct ROM reads (the embedding lookup) while the engine is idle: the address
              is registered with the engine's own (lat.EMBED_RAW), the word is at `roms[b].dat_r`
              two cycles after raw_en
    mul_*     `share` of the packed-pair multipliers lent to another unit (Attention's e x v):
              while mul_sel is high (it is registered here) multiplier n takes the operands
              mul_a[n], mul_b[n] (hw.SHARED_A / SHARED_B bits, signed) and mul_p[n] is their product
              a cycle later. The engine must be idle then: the sequencer never overlaps the two.
    """

    def __init__(self, banks, cols: int, rows: int, vlanes: int, k_max: int, acc_bits: int,
                 out_lanes: int = 2, tag_bits: int = 8, dsp_pairs: int = 0, share: int = 0):
        C, R, P = cols, rows, vlanes
        if not 0 <= share <= dsp_pairs * C:
            raise ValueError(f"share {share}: the engine has {dsp_pairs * C} packed-pair "
                             f"multipliers")
        self.share = share
        self.mul_sel = Signal()
        if share:
            self.mul_a = Signal(share * SHARED_A)
            self.mul_b = Signal(share * SHARED_B)
            self.mul_p = Signal(share * SHARED_P)
        self.banks = banks
        nb = len(banks)
        max_rows = max(b.depth * b.rows_per_word for b in banks)
        self.act_sink = stream.Endpoint([("a", P * 8)])
        self.cmd = stream.Endpoint(cmd_layout(banks, max_rows, tag_bits))
        Q = out_lanes
        self.source = stream.Endpoint([("acc", Q * acc_bits), ("beat", ubits(max_rows // Q)),
                                       ("tag", tag_bits)])
        self.idle = Signal()
        self.raw_adr = Signal(len(self.cmd.base))
        self.raw_en = Signal()
        self.latency = 0  # issue -> FIFO write, set below

        # # #

        # activation registers, filled P at a time
        if k_max % C or k_max % P:
            raise ValueError("activation length must be a multiple of C and P")
        act = [Signal((8, True), name=f"act{i}") for i in range(k_max)]
        fill = Signal(ubits(k_max // P))
        self.comb += self.act_sink.ready.eq(1)
        fill_cases = {}
        for b in range(k_max // P):
            fill_cases[b] = [act[b * P + j].eq(self.act_sink.a[8 * j:8 * j + 8]) for j in range(P)]
        self.sync += If(self.act_sink.valid,
                        Case(fill, fill_cases),
                        If(self.act_sink.last, fill.eq(0)).Else(fill.eq(fill + 1)))

        # ROMs
        self.roms = roms = [WeightRom(b.width, b.words) for b in banks]
        self.submodules += roms

        # output FIFO and credits
        fifo_depth = 24
        fifo = stream.SyncFIFO([("acc", R * acc_bits), ("bank", ubits(max(1, nb - 1))),
                                ("tag", tag_bits)], fifo_depth, buffered=False)
        self.submodules.fifo = fifo
        pending = Signal(ubits(fifo_depth + 1))

        # command registers: a command is taken at once and issued from these registers (the
        # sequencer's command fields never reach the issue logic or the ROM addresses directly)
        cmd = self.cmd
        busy = Signal()
        base_r = Signal(len(cmd.base))
        chunks_m1 = Signal(len(cmd.chunks))
        rgs_m1 = Signal(len(cmd.rowgroups))
        bank_r = Signal(len(cmd.bank))
        tag_r = Signal(tag_bits)
        cpg_m1 = Signal(ubits(max(b.chunks_per_group for b in banks)))
        self.comb += cmd.ready.eq(~busy)
        # issue (stage 0)
        offset = Signal(len(cmd.base))
        chunk = Signal(len(cmd.chunks))
        rg = Signal(len(cmd.rowgroups))
        kidx = Signal(len(cpg_m1))
        rlast0 = Signal()
        issue = Signal()
        clast = Signal()
        self.comb += [
            rlast0.eq(chunk == chunks_m1),
            issue.eq(busy & (~rlast0 | (pending < fifo_depth))),
            clast.eq(issue & rlast0 & (rg == rgs_m1)),
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
        adr_next = Signal(len(cmd.base))
        assert lat.EMBED_RAW == 1
        self.comb += If(self.raw_en, adr_next.eq(self.raw_adr)).Elif(cmd.valid & cmd.ready,
            adr_next.eq(cmd.base)).Elif(issue,
            adr_next.eq(base_r + offset + 1)).Else(adr_next.eq(base_r + offset))
        for rom in roms:
            self.comb += rom.adr_next.eq(adr_next)
        # control that travels with the data
        ctrl_layout = [("v", 1), ("chunk", len(chunk)), ("gfirst", 1), ("glast", 1),
                       ("rfirst", 1), ("rlast", 1), ("kidx", len(kidx)), ("bank", len(cmd.bank)),
                       ("tag", tag_bits), ("clast", 1)]
        c0 = Record(ctrl_layout)
        self.comb += [
            c0.v.eq(issue), c0.chunk.eq(chunk), c0.gfirst.eq(kidx == 0),
            c0.glast.eq(kidx == cpg_m1), c0.rfirst.eq(chunk == 0), c0.rlast.eq(rlast0),
            c0.kidx.eq(kidx), c0.bank.eq(bank_r), c0.tag.eq(tag_r), c0.clast.eq(clast),
        ]

        def delay(rec, n=1):
            for _ in range(n):
                r = Record(ctrl_layout)
                self.sync += r.raw_bits().eq(rec.raw_bits())
                rec = r
            return rec

        c1 = delay(c0, lat.ROM_ADR)  # ROM data valid
        # stage 2: word and activation slice registers
        wmax = max(b.width for b in banks)
        word = Signal(wmax)
        self.sync += word.eq(Array([r.dat_r for r in roms])[c1.bank])
        nch = k_max // C
        aslice = Signal(C * 8)
        self.sync += aslice.eq(Array([Cat(*act[c * C:(c + 1) * C]) for c in range(nch)])[c1.chunk])
        c2 = delay(c1)
        a2 = [field(self, aslice, 8 * i, 8) for i in range(C)]

        # stage 3: products. Each lane multiplies a lane_bits field: signed (sign-extended for
        # narrower banks), or unsigned where it is the low part of wider weights (a positive top
        # bit); their high parts (the extension fields) go through LUT bit planes of their own.
        # Slots 0 .. 2*dsp_pairs-1 go in pairs through packed MULT18X18D (hw.packed_pair_dot),
        # the rest through LUT bit-plane trees (hw.plane_dot)
        lw = max(b.lane_bits for b in banks)
        m_share_max = max(b.m_share for b in banks)
        if dsp_pairs and (2 * dsp_pairs > R or lw > 4):
            raise ValueError(f"dsp_pairs {dsp_pairs}: needs 2 * dsp_pairs <= rows ({R}) and "
                             f"weights of <= 4 bits per lane (lane_bits {lw})")
        wsl, negs, mshares = [], [], []
        for j in range(R):
            top_neg = Signal()  # the slot's fields are the low part of wider weights: unsigned
            self.comb += top_neg.eq(Array([int(not b.ext_bits) for b in banks])[c2.bank]
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
                    self.comb += wj.eq(Array(opts)[c2.bank] if nb > 1 else opts[0])
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
                self.comb += ms.eq(Array(mopts)[c2.bank] if nb > 1 else mopts[0])
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
                        self.comb += hf.eq(Array(opts)[c2.bank])
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
        tree_lat = dlat - 1  # counted below with the products register
        if dlat != lat.MV_PRODUCTS + (lat.MV_DSP if dsp_pairs else 0) + tree_latency(C):
            raise ValueError(f"MatVec products take {dlat} cycles, gateware.latency says "
                             f"{lat.MV_PRODUCTS} (+ {lat.MV_DSP} with DSP pairs) + the tree's")
        # the m shares travel along the product + tree latency
        ms_d = [Cat(*mshares)]
        for _ in range(1 + tree_lat):
            r = Signal(len(ms_d[0]))
            self.sync += r.eq(ms_d[-1])
            ms_d.append(r)
        cA = delay(c2, 1 + tree_lat)
        msA = ms_d[-1]
        ms_of = Array([b.m_share for b in banks])
        msl = [Signal(m_share_max) for _ in range(R)]
        self.comb += [msl[j].eq(msA[j * m_share_max:(j + 1) * m_share_max]) for j in range(R)]
        # rows: slot j (+ its extension fields' dot << lane_bits)
        rowdots, rowms = [], []
        for j in range(R):
            rd = signed(self, dots[j] + (hdots[j] << lb), dw + 1) if eb else dots[j]
            rowdots.append(rd)
            rowms.append(msl[j])

        # stage A: group partial (over chunks of a group) and multiplier assembly
        part_max = max(b.group * nx.qmax(b.bits) * nx.ACT_MAX for b in banks)
        pw = ubits(part_max) + 1
        gsum_B = [Signal((pw, True)) for _ in range(R)]
        m_B = [Signal(nx.M_BITS) for _ in range(R)]
        cB = Record(ctrl_layout)
        grfirst = Signal()  # this group opens its row
        for j in range(R):
            gp = Signal((pw, True))
            mreg = Signal(nx.M_BITS)
            gsum = signed(self, Mux(cA.gfirst, 0, gp) + rowdots[j], pw)
            mshare = rowms[j]
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
        cC = delay(cB)
        # stage D: row accumulation -> FIFO
        racc = [Signal((acc_bits, True)) for _ in range(R)]
        outs = []
        for j in range(R):
            nxt = signed(self, Mux(cC.rfirst, 0, racc[j]) + prod_C[j], acc_bits)
            self.sync += If(cC.v, racc[j].eq(nxt))
            outs.append(nxt)
        self.comb += [
            fifo.sink.valid.eq(cC.v & cC.rlast),
            fifo.sink.acc.eq(Cat(*outs)),
            fifo.sink.bank.eq(cC.bank),
            fifo.sink.tag.eq(cC.tag),
            fifo.sink.last.eq(cC.clast),
        ]
        # c0 -> FIFO write: ROM (c1), word/act (c2), products + tree, group (cB), m* (cC), row acc
        self.latency = 1 + lat.ROM_ADR + 1 + 1 + tree_lat + 3  # (+1: the command registers)
        if self.latency != lat.MV_LAT + tree_latency(C) + (lat.MV_DSP if dsp_pairs else 0):
            raise ValueError(f"MatVec pipeline is {self.latency} cycles, gateware.latency says "
                             f"{lat.MV_LAT} + the adder tree's {tree_lat}")

        # repack R_b-row FIFO entries into Q-wide beats
        src = self.source
        accs = [fifo.source.acc[j * acc_bits:(j + 1) * acc_bits] for j in range(R)]
        sub = Signal(ubits(max(R // Q, Q) + 1))
        gather = [Signal(acc_bits) for _ in range(Q)]
        beat = Signal(len(src.beat))
        pop = Signal()
        emit = Signal()
        self.comb += [src.tag.eq(fifo.source.tag), src.beat.eq(beat), fifo.source.ready.eq(pop)]
        bank_cases = {}
        for bi, b in enumerate(banks):
            Rb = b.rows_per_word
            if Rb >= Q:  # split one entry into Rb/Q beats
                n = Rb // Q
                bank_cases[bi] = [
                    src.valid.eq(fifo.source.valid),
                    src.acc.eq(Array([Cat(*accs[s * Q:(s + 1) * Q]) for s in range(n)])[sub]),
                    src.last.eq(fifo.source.last & (sub == n - 1)),
                    emit.eq(src.valid & src.ready),
                    pop.eq(emit & (sub == n - 1)),
                ]
            else:  # gather Q/Rb entries into one beat
                n = Q // Rb
                bank_cases[bi] = [
                    src.valid.eq(fifo.source.valid & (sub == n - 1)),
                    src.acc.eq(Cat(*[accs[j % Rb] if j // Rb == n - 1 else gather[j]
                                     for j in range(Q)])),
                    src.last.eq(fifo.source.last),
                    emit.eq(src.valid & src.ready),
                    pop.eq(fifo.source.valid & ((sub != n - 1) | src.ready)),
                ]
        self.comb += Case(fifo.source.bank, bank_cases) if nb > 1 else bank_cases[0]
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
        self.sync += Case(fifo.source.bank, seq_cases) if nb > 1 else seq_cases[0]
        self.sync += If(emit, If(src.last, beat.eq(0)).Else(beat.eq(beat + 1)))
        # credits: one per row group in flight or queued
        inc = issue & rlast0
        self.sync += pending.eq(pending + inc - (fifo.source.valid & pop))
        self.comb += self.idle.eq(~cmd.valid & ~busy & (pending == 0))
