"""Small hardware helpers for the integer formats of bakedllama.numerics.

Every helper adds statements to a module `m` and returns a sized Signal: intermediate results are
always explicit Signals, so Verilog's context-sized arithmetic and Migen's simulator agree.
"""

import importlib

from migen import *

_lx_expression = importlib.import_module("litex.gen.fhdl.expression")
_lx_verilog = importlib.import_module("litex.gen.fhdl.verilog")


def _generate_constant(node):
    """Signed constants as N'sd<two's complement> (what Migen's own printer does).

    LiteX 2024.12 prints them as "-N'dV", which Verilog types as *unsigned*: `x < -127` then
    compares unsigned and `acc + -5` zero-extends acc. The Migen simulator has no such problem,
    so the Verilog would silently differ from the simulated design. Patched here so every
    conversion of this gateware (tests, SoC builds) gets the Migen semantics."""
    if node.signed:
        val = node.value if node.value >= 0 else (1 << node.nbits) + node.value
        return f"{node.nbits}'sd{val}", True
    return f"{node.nbits}'d{node.value}", False


_lx_expression._generate_constant = _generate_constant
_lx_verilog._generate_constant = _generate_constant


def sbits(lo: int, hi: int | None = None) -> int:
    """Width of a signed signal holding [lo, hi] (or [-lo, lo] when hi is None)."""
    if hi is None:
        lo, hi = -abs(lo), abs(lo)
    n = 1
    while lo < -(1 << (n - 1)) or hi > (1 << (n - 1)) - 1:
        n += 1
    return n


def ubits(hi: int) -> int:
    """Width of an unsigned signal holding [0, hi]."""
    return max(1, int(hi).bit_length())


def signed(m, expr, width: int, name: str | None = None) -> Signal:
    s = Signal((width, True), name=name)
    m.comb += s.eq(expr)
    return s


def unsigned(m, expr, width: int, name: str | None = None) -> Signal:
    s = Signal(width, name=name)
    m.comb += s.eq(expr)
    return s


def field(m, word, lo: int, width: int, is_signed: bool = True) -> Signal:
    """Bits [lo, lo+width) of `word` as a (signed) signal (a Verilog slice is always unsigned)."""
    s = Signal((width, is_signed))
    m.comb += s.eq(word[lo:lo + width])
    return s


def round_shift(m, x, n, n_range: tuple[int, int]) -> Signal:
    """numerics.round_shift(x, n): x * 2^-n rounded half up, for a runtime n in [lo, hi] (or int n).

    Uses round_shift(x, n) = ((2x >> n) + 1) >> 1 (exact for n >= 0); n < 0 shifts left first."""
    lo, hi = n_range
    w = len(x)
    pre = max(0, -lo)
    if isinstance(n, int):
        if n <= 0:
            return signed(m, x << -n, w - n)
        t = signed(m, x >> (n - 1), max(2, w - n + 2))
        return signed(m, (t + 1) >> 1, max(2, w - n + 1))
    # floor shifts compose, so the part every n shares (lo, when lo > 0) is a fixed shift and
    # only n - lo goes through the barrel shifter: fewer stages over a narrower value
    base = lo + pre
    xs = signed(m, x << (pre + 1), w + pre + 1)
    xb = signed(m, xs >> base, max(2, w + pre + 1 - base)) if base else xs
    if hi == lo:
        t = xb
    else:
        amt = Signal(ubits(hi - lo))
        m.comb += amt.eq(n - lo)
        t = signed(m, xb >> amt, len(xb))
    return signed(m, (t + 1) >> 1, w + pre + 1)


def saturate(m, x, bits: int) -> Signal:
    """Clamp a signed value to the signed `bits`-bit range."""
    if len(x) <= bits:
        return signed(m, x, bits)
    lim = (1 << (bits - 1)) - 1
    out = Signal((bits, True))
    m.comb += If(x > lim, out.eq(lim)).Elif(x < -lim - 1, out.eq(-lim - 1)).Else(out.eq(x))
    return out


def clip(m, x, lim: int) -> Signal:
    """Clamp to the symmetric range [-lim, lim]."""
    out = Signal((ubits(lim) + 1, True))
    m.comb += If(x > lim, out.eq(lim)).Elif(x < -lim, out.eq(-lim)).Else(out.eq(x))
    return out


def absval(m, x) -> Signal:
    """|x| of a signed value as an unsigned signal of the same width (|-2^(w-1)| fits)."""
    out = Signal(len(x))
    m.comb += If(x < 0, out.eq(-x)).Else(out.eq(x))
    return out


def bit_length(m, v) -> Signal:
    """numerics.bit_length of an unsigned value (leading-one detect): 0 for 0."""
    out = Signal(ubits(len(v)))
    m.comb += out.eq(_bit_length_tree(m, v, 0, len(v)))
    return out


def _bit_length_tree(m, v, lo: int, n: int):
    """bit_length of v[lo:lo+n] as a balanced tree: if the upper half has a one, its bit length
    plus the lower half's width, else the lower half's (log depth, not a chain of n muxes)."""
    if n == 1:
        return v[lo]
    nl = n // 2
    low = _bit_length_tree(m, v, lo, nl)
    high = _bit_length_tree(m, v, lo + nl, n - nl)
    r = Signal(ubits(n), name="bl")
    m.comb += If(v[lo + nl:lo + n] != 0, r.eq(high + nl)).Else(r.eq(low))
    return r


def max_tree(m, values: list) -> Signal:
    """Maximum of unsigned values (combinational tree)."""
    vals = list(values)
    while len(vals) > 1:
        nxt = []
        for i in range(0, len(vals) - 1, 2):
            a, b = vals[i], vals[i + 1]
            s = Signal(max(len(a), len(b)))
            m.comb += s.eq(Mux(a >= b, a, b))
            nxt.append(s)
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def adder_tree(m, values: list, ce=None, regs_every: int = 2) -> tuple[Signal, int]:
    """Sum of signed values; a register after every `regs_every` levels. Returns (sum, latency)."""
    vals = list(values)
    level, lat = 0, 0
    while len(vals) > 1:
        level += 1
        reg = (level % regs_every == 0)
        nxt = []
        for i in range(0, len(vals) - 1, 2):
            a, b = vals[i], vals[i + 1]
            s = Signal((max(len(a), len(b)) + 1, True))
            if reg:
                m.sync += s.eq(a + b) if ce is None else If(ce, s.eq(a + b))
            else:
                m.comb += s.eq(a + b)
            nxt.append(s)
        if len(vals) % 2:
            a = vals[-1]
            if reg:
                s = Signal((len(a), True))
                m.sync += s.eq(a) if ce is None else If(ce, s.eq(a))
                a = s
            nxt.append(a)
        vals = nxt
        lat += reg
    return vals[0], lat


def csd(c: int) -> list[tuple[int, int]]:
    """Canonical signed digits of a non-negative constant: [(shift, +1 | -1)]."""
    out, k = [], 0
    while c:
        if c & 1:
            d = 2 - (c & 3)  # +1 if ...01, -1 if ...11
            out.append((k, d))
            c -= d
        c >>= 1
        k += 1
    return out


def const_mul(m, x, c: int) -> Signal:
    """x * c for a constant c >= 0 as shifts and adds (never a DSP block)."""
    w = len(x) + ubits(c) + 1
    terms = csd(c)
    acc = None
    for k, d in terms:
        t = signed(m, x << k, w)
        acc = (t if d > 0 else -t) if acc is None else (acc + t if d > 0 else acc - t)
    return signed(m, acc if acc is not None else 0, w)


def mul_lut(m, w, a) -> Signal:
    """Signed w x signed a as a sum of shifted partial products (LUT logic, not a DSP block).

    w is the narrow operand (a weight of a few bits): one adder per bit of w."""
    bw, ba = len(w), len(a)
    width = bw + ba
    terms = []
    for i in range(bw):
        t = Signal((width, True))
        sh = signed(m, a << i, width)
        m.comb += t.eq(Mux(w[i], sh, 0))
        terms.append((t, i == bw - 1))
    acc = None
    for t, neg in terms:
        acc = (-t if neg else t) if acc is None else (acc - t if neg else acc + t)
    return signed(m, acc, width)


def plane_dot(m, weights: list, acts: list, top_neg, regs_every: int = 2) -> tuple[Signal, int]:
    """sum_i w_i * a_i by bit planes: for each bit b of the weights, an adder tree of the
    activations whose weight has bit b set; the planes are then shifted and added (the top plane
    subtracted when top_neg: two's complement weights). Registered after the combination.

    On ECP5 this costs about half the LUTs of per-lane multipliers followed by an adder tree.
    Returns (sum, latency in registers)."""
    wb = len(weights[0])
    planes = []
    lat = 0
    for b in range(wb):
        vals = []
        for w, a in zip(weights, acts):
            t = Signal((len(a), True))
            m.comb += t.eq(Mux(w[b], a, 0))
            vals.append(t)
        ps, lat = adder_tree(m, vals, regs_every=regs_every)
        planes.append(ps)
    pw = len(planes[0]) + wb + 1
    acc = None
    for b, ps in enumerate(planes):
        t = signed(m, ps << b, pw)
        if b == wb - 1:
            tt = Signal((pw, True))
            m.comb += tt.eq(Mux(top_neg, -t, t))
            t = tt
        acc = t if acc is None else acc + t
    out = Signal((pw, True))
    m.sync += out.eq(acc)
    return out, lat + 1


# A multiplier shared between two units that never need it at the same time (MatVec's packed
# pairs, Attention's e x v): 18-bit signed x int8, product registered where it is placed.
SHARED_A, SHARED_B = 18, 8
SHARED_P = SHARED_A + SHARED_B


def packed_pair_dot(m, w0s: list, neg0, w1s: list, neg1, acts: list,
                    regs_every: int = 2, mul=None) -> tuple[Signal, Signal, int]:
    """sum_i w0_i * a_i and sum_i w1_i * a_i with ONE 18 x 18 signed multiply per i (MULT18X18D).

    Two weights of lw <= 4 bits (raw fields; neg0 / neg1: the field is two's complement, else
    unsigned) share the activation a_i (int8): b_i = w1_i * 2^k + w0_i with k = lw + 8, written as
    bits: the low k bits are w0_i sign-extended, the high lw + 2 bits w1_i - [w0_i < 0] (the
    borrow), so b_i stays inside 18 signed bits for the extreme weights. p_i = a_i * b_i =
    (a_i w1_i) 2^k + a_i w0_i, and |a_i w0_i| < 2^(k-1), so the low product is p_i's low k bits read
    as signed and the high one is p_i >> k plus the low product's sign bit (its borrow back).
    Product register, two adder trees, result registers. Returns (dot0, dot1, latency).

    mul(i, b, a) -> the registered product b * a of column i, where the caller places it (a
    multiplier shared with another unit); default: a register here."""
    lw = len(w0s[0])
    if lw > 4:
        raise ValueError(f"two {lw}-bit x int8 products do not fit one 18 x 18 multiply")
    k = lw + 8
    lo_vals, hi_vals = [], []
    for w0, w1, a in zip(w0s, w1s, acts):
        v0, v1 = Signal((lw + 1, True)), Signal((lw + 1, True))
        # the raw field as two's complement (neg) or unsigned, in lw + 1 signed bits
        m.comb += [v0.eq(Mux(neg0, w0 - (w0[lw - 1] << lw), w0)),
                   v1.eq(Mux(neg1, w1 - (w1[lw - 1] << lw), w1))]
        # single bits as 2-bit signed values: a Verilog expression mixing a signed operand with an
        # unsigned bit is evaluated unsigned (the signed operand would be zero-extended)
        borrow, carry = Signal((2, True)), Signal((2, True))
        bhi = Signal((lw + 2, True))
        m.comb += [borrow.eq(v0[lw]), bhi.eq(v1 - borrow)]
        b = Signal((k + lw + 2, True))
        m.comb += b.eq(Cat(v0, *([v0[lw]] * (k - lw - 1)), bhi))
        if mul is None:
            p = Signal((len(b) + len(a), True))
            m.sync += p.eq(b * a)
        else:
            p = mul(len(lo_vals), b, a)
        lo = Signal((k, True))
        ph = Signal((len(p) - k, True))
        hi = Signal((k, True))
        m.comb += [lo.eq(p[:k]), ph.eq(p[k:]), carry.eq(p[k - 1]), hi.eq(ph + carry)]
        lo_vals.append(lo)
        hi_vals.append(hi)
    d0, lat = adder_tree(m, lo_vals, regs_every=regs_every)
    d1, _ = adder_tree(m, hi_vals, regs_every=regs_every)
    o0, o1 = Signal((len(d0), True)), Signal((len(d1), True))
    m.sync += [o0.eq(d0), o1.eq(d1)]
    return o0, o1, lat + 2
