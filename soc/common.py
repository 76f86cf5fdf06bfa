#
# bakedllama SoC: pieces shared by the targets (soc/sim.py, soc/ulx3s.py).
#
# - LlamaPort: the CPU's access to the accelerator's token streams, by CSRs.
# - BakedLlamaSoC: a SoCCore mixin that adds the accelerator (as `llama`, its port as
#   `llama_port`) and puts firmware/ (not LiteX's BIOS) in the integrated ROM.
#

import os
import subprocess
import sys

from migen import *

from litex.gen import LiteXModule
from litex.soc.interconnect import stream
from litex.soc.interconnect.csr import CSRStorage, CSRStatus, CSRField
from litex.soc.integration.soc_core import get_mem_data

from gateware.compiler import DEFAULT_LANES

REPO_DIR     = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIRMWARE_DIR = os.path.join(REPO_DIR, "firmware")
DEFAULT_MODEL = os.path.join(REPO_DIR, "weights", "tiny", "model-q.bkl")

# Board codes reported by the firmware (firmware/hw.h, PROTOCOL.md INFO).
BOARD_SIM   = 1
BOARD_ULX3S = 2

# CPU and memories: the soft CPU stays small so block RAM goes to weights and the KV cache.
# VexRiscv "lite" (RV32IM, 2 KiB instruction cache, bypassing): measured in the simulation it
# sends a token's STEP frame in ~2,600 cycles, "minimal" (no cache, no bypass) in ~4,600, which
# is most of a forward pass at lanes=128 (6,184-9,052). The firmware runs from ROM, data and stack in
# SRAM.
CPU_TYPE    = "vexriscv"
CPU_VARIANT = "lite"
ROM_SIZE    = 0x4000  # upper bound; the ROM is shrunk to the firmware's size
SRAM_SIZE   = 0x2000  # 8 KiB: frame buffers (2 x 1 KiB), prompt (2 KiB), stack

# System clock of the ULX3S target, from the ECP5 PLL (25 MHz oscillator in); the simulation
# reports the same nominal frequency. 45 MHz: this tree built for 45 routed at 48.26 MHz; built for
# 50 it routed at 46.77 MHz (critical path: an e x v operand register into the attention's
# MULT18X18D). `make build` checks the routed Fmax against it.
SYS_CLK_FREQ = int(45e6)

# Accelerator lanes and vector lanes for both targets, so that the simulation counts the cycles of
# the bitstream's accelerator: the compiler's default lanes (64) with vlanes 8 (145 of the 156
# MULT18X18D; the compiler would pick 4 at lanes 64). See the README.
LANES = DEFAULT_LANES
VLANES = 8

# LlamaPort ----------------------------------------------------------------------------------------

class LlamaPort(LiteXModule):
    """Tokens between the CPU and the accelerator's streams, and the generation loop in hardware.

    The CPU offers a token with ``token_in``. Every token the accelerator produces goes into a
    FIFO with the cycles of its pass (``token_out`` / ``pass_cycles``, ``ctrl.pop``). While
    ``loop_left`` is not 0, each produced token is also fed straight back to the accelerator
    (``loop_left`` counts down): a generation runs without the CPU in the token loop, which only
    drains the FIFO into batched frames (protocol v2). Writing ``loop`` sets ``loop_left``;
    writing 0 stops the loop (the pass in flight, ``status.in_flight``, still lands in the FIFO).
    ``cycles`` is the accelerator's per-pass cycle counter (valid with its output token)."""
    def __init__(self, cycles, width=16, depth=32):
        self.source = stream.Endpoint([("token", width)])  # -> accelerator sink
        self.sink   = stream.Endpoint([("token", width)])  # <- accelerator source

        self.token_in = CSRStorage(width,
            description="Token for the accelerator: writing it offers it on the accelerator's sink "
                        "until accepted (``status.in_busy``). Write only when ``in_busy`` is 0.")
        self.token_out = CSRStatus(width,
            description="Oldest token in the FIFO (valid when ``status.out_valid``).")
        self.pass_cycles = CSRStatus(32,
            description="The cycles of the pass that produced ``token_out``.")
        self.loop = CSRStorage(16,
            description="Tokens to feed back automatically (sets ``loop_left``; 0 stops the loop).")
        self.loop_left = CSRStatus(16, description="Tokens still to be fed back.")
        self.status = CSRStatus(fields=[
            CSRField("in_busy",   size=1, description="A token waits for the accelerator."),
            CSRField("out_valid", size=1, description="``token_out`` holds a token."),
            CSRField("in_flight", size=1, description="A pass runs or its token is on the way."),
        ])
        self.ctrl = CSRStorage(fields=[
            CSRField("pop", size=1, pulse=True, description="Consume ``token_out``."),
        ])

        # # #

        self.fifo = fifo = stream.SyncFIFO([("token", width), ("cycles", 32)], depth, buffered=True)
        pending = Signal()
        fed     = Signal(width)      # the token offered: the CPU's or the one fed back
        left    = Signal(16)
        flight  = Signal()           # the accelerator accepted a token whose output is not in yet
        take    = Signal()
        self.comb += [
            take.eq(self.sink.valid & fifo.sink.ready),
            self.sink.ready.eq(fifo.sink.ready),
            fifo.sink.valid.eq(self.sink.valid),
            fifo.sink.token.eq(self.sink.token),
            fifo.sink.cycles.eq(cycles),
        ]
        self.sync += [
            If(self.token_in.re,
                pending.eq(1), fed.eq(self.token_in.storage),
            ).Elif(take & (left != 0),
                pending.eq(1), fed.eq(self.sink.token),
            ).Elif(self.source.ready,
                pending.eq(0),
            ),
            If(self.loop.re,
                left.eq(self.loop.storage),
            ).Elif(take & (left != 0),
                left.eq(left - 1),
            ),
            If(self.source.valid & self.source.ready,
                flight.eq(1),
            ).Elif(take,
                flight.eq(0),
            ),
        ]
        self.comb += [
            self.source.valid.eq(pending),
            self.source.token.eq(fed),
            self.token_out.status.eq(fifo.source.token),
            self.pass_cycles.status.eq(fifo.source.cycles),
            self.loop_left.status.eq(left),
            self.status.fields.in_busy.eq(pending),
            self.status.fields.out_valid.eq(fifo.source.valid),
            self.status.fields.in_flight.eq(flight | pending),
            fifo.source.ready.eq(self.ctrl.fields.pop),
        ]

# SoC mixin ----------------------------------------------------------------------------------------

class BakedLlamaSoC:
    """Mixin for a SoCCore: the accelerator, its port, the firmware ROM and the board constants."""

    def add_llama(self, core, board, testing=False):
        self.llama      = core
        self.llama_port = LlamaPort(core.cycles.status)
        self.comb += [
            self.llama_port.source.connect(core.sink),
            core.source.connect(self.llama_port.sink),
        ]
        self.add_constant("BAKEDLLAMA_BOARD", board)
        if testing:
            self.add_constant("BAKEDLLAMA_TESTING_CORE")

    # Called by LiteX's Builder after it wrote the generated headers and before the gateware
    # (Builder.build: "init_mems"). The Builder must run with compile_software=False so that it
    # does not build its BIOS: firmware/ is the ROM.
    def init_mems(self, **kwargs):
        builder = self.builder
        out_dir = os.path.join(builder.software_dir, "firmware")
        os.makedirs(out_dir, exist_ok=True)
        build_firmware(out_dir, builder.output_dir)
        data = get_mem_data(os.path.join(out_dir, "firmware.bin"),
            data_width = self.bus.data_width,
            endianness = self.cpu.endianness)
        self.init_rom(name="rom", contents=data, auto_size=True)

def build_firmware(out_dir, build_dir):
    """make -f firmware/Makefile against a LiteX build dir's generated headers."""
    cmd = ["make", "-C", out_dir, "-f", os.path.join(FIRMWARE_DIR, "Makefile"),
           f"BUILD_DIR={os.path.abspath(build_dir)}"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(r.stdout)
    if r.returncode != 0:
        raise OSError(f"firmware build failed ({' '.join(cmd)}):\n{r.stdout[-4000:]}")

# Accelerator --------------------------------------------------------------------------------------

def make_core(kind, model_path=None, lanes=None, seq_len=None, latency=None):
    """The accelerator for a target: "real" = gateware.core.BakedLlamaCore on a baked model,
    "testing" = the test-only stand-in (soc/testing_core.py). Returns (core, testing)."""
    if kind == "testing":
        from soc.testing_core import StandInCore, lookup_table
        return StandInCore(lookup_table(512), seq_len=seq_len or 256, latency=latency or 64), True
    if kind != "real":
        raise ValueError(f"unknown core '{kind}' (real or testing)")
    from bakedllama.model import load_baked
    try:
        from gateware.core import BakedLlamaCore
    except ImportError as e:
        raise SystemExit(f"gateware.core.BakedLlamaCore is not available ({e}); "
                         "use --core testing for the test stand-in")
    path = model_path or DEFAULT_MODEL
    if not os.path.exists(path):
        raise SystemExit(f"no baked model at {path} (make weights, or pass --model)")
    model = load_baked(path)
    lanes = LANES if lanes is None else lanes
    return BakedLlamaCore(model, lanes=lanes, vlanes=VLANES if lanes == LANES else None), False
