#
# bakedllama: TEST-ONLY stand-in for the accelerator.
#
# StandInCore implements the gateware/INTERFACE.md contract (token streams, ctrl / temperature /
# seed / status / cycles / model_id / model_cfg CSRs) with a lookup table in a ROM instead of a
# transformer, so that the SoC, the firmware and the protocol can be tested end to end in a small,
# fast simulation. Only the protocol / fuzz tests use it (soc/sim.py --core testing); the product
# targets (soc/sim.py --core real, soc/ulx3s.py) always carry gateware.core.BakedLlamaCore.
#
# Next token at position p for input token t (vocabulary V, a power of two):
#   greedy  (temperature == 0): table[(t + p) % V]
#   sampled (temperature != 0): (table[(t + p) % V] + (x >> 16) + temperature) % V,
#                               x = next value of numerics.XorShift32(seed), drawn only when sampling
# A pass takes `latency + p` cycles. `reference_generate` is the same thing in Python, with the
# firmware's schedule (prompt greedy, last prompt token and feed-back tokens sampled).

import hashlib

from migen import *

from litex.gen import LiteXModule
from litex.soc.interconnect import stream
from litex.soc.interconnect.csr import CSRStorage, CSRStatus, CSRField

from bakedllama.numerics import XorShift32

MODEL_CFG_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                    "seq_len", "lanes")

# Reference ----------------------------------------------------------------------------------------

def lookup_table(vocab_size=512, seed=1):
    """The stand-in's lookup table: a deterministic pseudo-random permutation-free map."""
    if vocab_size < 2 or vocab_size & (vocab_size - 1) or vocab_size > 1 << 16:
        raise ValueError(f"vocab_size must be a power of two <= 65536, not {vocab_size}")
    rng = XorShift32(seed)
    return [rng.next() % vocab_size for _ in range(vocab_size)]

def lookup_model_id(table, seq_len):
    """32-bit identity of a stand-in (like BakedModel.identity(): first 8 hex digits of a sha256)."""
    h = hashlib.sha256(b"bakedllama testing core" + bytes(f"{seq_len}:", "ascii"))
    h.update(b"".join(t.to_bytes(2, "little") for t in table))
    return int(h.hexdigest()[:8], 16)

def reference_generate(table, prompt, max_tokens, inv_temperature_q8=0, seed=0):
    """What GENERATE returns on the stand-in (the firmware's schedule, like golden.generate)."""
    mask = len(table) - 1
    rng  = XorShift32(seed)
    pos  = 0
    def step(t, inv_t):
        nonlocal pos
        out = table[(t + pos) & mask]
        if inv_t:
            out = (out + (rng.next() >> 16) + inv_t) & mask
        pos += 1
        return out
    for t in prompt[:-1]:
        step(t, 0)
    tok = step(prompt[-1], inv_temperature_q8)
    out = [tok]
    while len(out) < max_tokens:
        tok = step(tok, inv_temperature_q8)
        out.append(tok)
    return out

def reference_cycles(latency, pos):
    return latency + pos

# Hardware -----------------------------------------------------------------------------------------

def _xorshift32(x):
    """One XorShift32 step (13, 17, 5) as Migen expressions."""
    a = x ^ (x << 13)[:32]
    b = a ^ (a >> 17)
    return b ^ (b << 5)[:32]

class _TableROM(Module):
    # A plain Module (not LiteXModule): LiteX would give a Memory in an AutoCSR module a CSR port.
    def __init__(self, table):
        self.specials.mem = Memory(16, len(table), init=table)
        self.specials.port = self.mem.get_port()

class StandInCore(LiteXModule):
    """TEST-ONLY stand-in for gateware.core.BakedLlamaCore: next token from a lookup table."""
    def __init__(self, table, seq_len=256, latency=64):
        vocab_size = len(table)
        if vocab_size < 2 or vocab_size & (vocab_size - 1) or vocab_size > 1 << 16:
            raise ValueError(f"table length must be a power of two <= 65536, not {vocab_size}")
        if not 1 <= seq_len < 1 << 16:
            raise ValueError(f"seq_len must be in 1 .. 65535, not {seq_len}")
        if not 2 <= latency < 1 << 15:
            raise ValueError(f"latency must be in 2 .. 32767, not {latency}")
        self.model_id_value = lookup_model_id(table, seq_len)
        cfg_values = dict.fromkeys(MODEL_CFG_FIELDS, 0)
        cfg_values.update(vocab_size=vocab_size, seq_len=seq_len)

        self.sink   = stream.Endpoint([("token", 16)])
        self.source = stream.Endpoint([("token", 16)])

        self.ctrl = CSRStorage(fields=[
            CSRField("reset", size=1, pulse=True,
                description="Position := 0, sampler generator := seeded from ``seed``."),
            CSRField("rewind", size=1, pulse=True,
                description="Position := ``rewind_pos`` if that is not past it (in IDLE)."),
        ])
        self.rewind_pos = CSRStorage(16, description="Position that ``ctrl.rewind`` sets.")
        self.temperature = CSRStorage(16, description="1/T in Q8; 0 = greedy.")
        self.seed        = CSRStorage(32, description="Sampler seed, loaded on ``ctrl.reset``.")
        self.status = CSRStatus(fields=[
            CSRField("busy", size=1,  description="A forward pass is running or its token waits."),
            CSRField("full", size=1,  description="Position == seq_len: no token is accepted."),
            CSRField("pos",  size=16, description="Position of the next token."),
        ])
        self.cycles    = CSRStatus(32, description="Cycles of the last pass (sink accept -> source valid).")
        self.model_id  = CSRStatus(32, reset=self.model_id_value,
            description="Identity of the stand-in's table (not a model).")
        self.model_cfg = CSRStatus(fields=[CSRField(n, size=16, reset=cfg_values[n],
            description=f"{n} (0 = not a transformer).") for n in MODEL_CFG_FIELDS],
            description="Stand-in configuration, packed like gateware/core.py's (16 bits per field).")

        # # #

        mask  = vocab_size - 1
        rom   = _TableROM(table)
        self.submodules += rom
        pos   = Signal(16)
        prng  = Signal(32)
        count = Signal(32)
        wait  = Signal(32)
        out   = Signal(16)
        full  = Signal()
        seeded = Signal(32)
        self.comb += [
            full.eq(pos >= seq_len),
            seeded.eq(self.seed.storage * 2654435761 + 0x6D2B79F5),
            self.status.fields.full.eq(full),
            self.status.fields.pos.eq(pos),
            self.source.token.eq(out),
        ]

        IDLE, LOOKUP, WAIT, OUT = range(4)
        state = Signal(2)
        self.comb += [
            rom.port.adr.eq((self.sink.token + pos) & mask),
            self.sink.ready.eq((state == IDLE) & ~full),
            self.source.valid.eq(state == OUT),
            self.status.fields.busy.eq(state != IDLE),
        ]
        self.sync += [
            If(self.ctrl.fields.reset,
                state.eq(IDLE),
                pos.eq(0),
                If(seeded == 0, prng.eq(0x9E3779B9)).Else(prng.eq(seeded)),
            ).Elif(self.ctrl.fields.rewind & (state == IDLE),
                If(self.rewind_pos.storage <= pos, pos.eq(self.rewind_pos.storage)),
            ).Else(
                Case(state, {
                    IDLE: If(self.sink.valid & self.sink.ready,
                        count.eq(0),
                        wait.eq(latency + pos),
                        state.eq(LOOKUP),
                    ),
                    LOOKUP: [  # the ROM answers one cycle after the address
                        count.eq(count + 1),
                        If(self.temperature.storage != 0,
                            prng.eq(_xorshift32(prng)),
                            out.eq((rom.port.dat_r + (_xorshift32(prng) >> 16)
                                    + self.temperature.storage) & mask),
                        ).Else(
                            out.eq(rom.port.dat_r),
                        ),
                        state.eq(WAIT),
                    ],
                    WAIT: [
                        count.eq(count + 1),
                        If(count + 1 >= wait,
                            self.cycles.status.eq(count + 1),
                            state.eq(OUT),
                        ),
                    ],
                    OUT: If(self.source.ready,
                        pos.eq(pos + 1),
                        state.eq(IDLE),
                    ),
                })
            )
        ]
