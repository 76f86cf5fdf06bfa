#!/usr/bin/env python3
#
# bakedllama: ULX3S (ECP5 LFE5U-85F) target (litex-boards shape).
#
# VexRiscv "lite" running firmware/ from a small integrated ROM, 8 KiB SRAM, the FTDI UART at
# 3 Mbaud, and the accelerator with the baked model's weights in block RAM. Bitstream with yosys,
# nextpnr-ecp5 and ecppack from PyPI (yowasp), no other install.
#
#   python -m soc.ulx3s --build            # build/soc/ulx3s/gateware/ulx3s.bit + report.json
#   python -m soc.ulx3s --load             # openFPGALoader -b ulx3s (SRAM)
#   python -m soc.ulx3s --core testing ... # TEST-ONLY stand-in core (flow checks only)
#

import json
import os
import subprocess
import time

from migen import *

from litex.gen import LiteXModule
from litex.soc.cores.clock import ECP5PLL
from litex.soc.integration.soc_core import SoCCore
from litex.soc.integration.builder import Builder
from litex.build.parser import LiteXArgumentParser  # after soc_core (import cycle)

from bakedllama.device import protocol as P

from soc.platforms import ulx3s
from soc.common import (BakedLlamaSoC, make_core, BOARD_ULX3S, CPU_TYPE, CPU_VARIANT, ROM_SIZE,
    SRAM_SIZE, SYS_CLK_FREQ, REPO_DIR)
from soc.toolchain import yowasp_path, check_build_dir, parse_nextpnr_report, format_summary
from gateware.build import NEXTPNR_PLACE_ROUTE

DEFAULT_OUTPUT_DIR = os.path.join(REPO_DIR, "build", "soc", "ulx3s")

# CRG ----------------------------------------------------------------------------------------------

class _CRG(LiteXModule):
    def __init__(self, platform, sys_clk_freq):
        self.rst    = Signal()
        self.cd_sys = ClockDomain()

        # # #

        clk25 = platform.request("clk25")
        rst   = platform.request("rst")

        self.pll = pll = ECP5PLL()
        self.comb += pll.reset.eq(rst | self.rst)
        pll.register_clkin(clk25, 25e6)
        pll.create_clkout(self.cd_sys, sys_clk_freq)

        # Keep the ESP32 from resetting the FPGA.
        self.comb += platform.request("wifi_gpio0").eq(1)

# BaseSoC ------------------------------------------------------------------------------------------

class BaseSoC(BakedLlamaSoC, SoCCore):
    def __init__(self, core, testing=False, device="LFE5U-85F", revision="2.0",
                 sys_clk_freq=SYS_CLK_FREQ, uart_baudrate=P.DEFAULT_BAUDRATE, **kwargs):
        platform = ulx3s.Platform(device=device, revision=revision, toolchain="trellis")

        # CRG --------------------------------------------------------------------------------------
        self.crg = _CRG(platform, sys_clk_freq)

        # SoCCore ----------------------------------------------------------------------------------
        SoCCore.__init__(self, platform, sys_clk_freq,
            ident                = "bakedllama on ULX3S",
            cpu_type             = CPU_TYPE,
            cpu_variant          = CPU_VARIANT,
            integrated_rom_size  = ROM_SIZE,
            integrated_sram_size = SRAM_SIZE,
            uart_name            = "serial",
            uart_baudrate        = uart_baudrate,
            **kwargs)

        # Accelerator ------------------------------------------------------------------------------
        self.add_llama(core, board=BOARD_ULX3S, testing=testing)

        # Status LEDs: 0 = alive (blinks), 1 = accelerator busy.
        leds  = platform.request_all("user_led")
        blink = Signal(max=int(sys_clk_freq//2))
        led0  = Signal()
        self.sync += If(blink == 0, blink.eq(int(sys_clk_freq//2) - 1), led0.eq(~led0)).Else(blink.eq(blink - 1))
        self.comb += [leds[0].eq(led0), leds[1].eq(core.status.fields.busy)]

# Build --------------------------------------------------------------------------------------------

# nextpnr's placement seed for `make build`. Placement and routing are deterministic for a netlist
# and a seed, and at 45 MHz this design has little margin, so the seed is chosen per netlist: for
# this tree's Verilog and memory images (2026-12-02), seed 1 placed at 42.86 MHz (estimate, routing
# stopped), seed 2 at a worse timing cost (stopped), seed 3 routed at 48.43 MHz. Any change to the
# gateware or the firmware (whose size sizes the ROM) changes the netlist: build again, and if
# seed 3 fails, try others (`--nextpnr-seed N`) before lowering SYS_CLK_FREQ.
NEXTPNR_SEED = 3

def link_figures(baudrate):
    """Bytes per generated token on the wire (protocol v2: full TOKENS batches) and the tokens/s
    the UART carries."""
    per = P.wire_bytes_per_token()
    return round(per, 3), baudrate / (P.BITS_PER_BYTE * per)

def expected_cycles_per_token(core, n_tokens=64):
    """The accelerator's analytic cycles per forward pass (gateware/cycle_model.py), mean over the
    first n_tokens positions; None for the stand-in."""
    plan = getattr(core, "plan", None)
    if plan is None:
        return None
    from gateware import compiler, cycle_model
    formats = compiler.matrix_formats(plan.cfg, plan.fmt.get("weights"))
    n = min(n_tokens, plan.cfg.seq_len)
    total = sum(cycle_model.expected_cycles(plan.cfg, plan.geo.lanes, pos, formats=formats,
        vlanes=plan.geo.vlanes, kv_par=plan.geo.kv_par, dsp_pairs=plan.geo.dsp_pairs) for pos in range(n))
    return round(total / n)

def build(output_dir=DEFAULT_OUTPUT_DIR, core_kind="real", model_path=None, lanes=None,
          sys_clk_freq=SYS_CLK_FREQ, device="LFE5U-85F", revision="2.0",
          uart_baudrate=P.DEFAULT_BAUDRATE, seed=None, **toolchain_kwargs):
    output_dir = os.path.abspath(output_dir)
    check_build_dir(output_dir)
    t0 = time.monotonic()
    core, testing = make_core(core_kind, model_path, lanes=lanes)
    soc = BaseSoC(core, testing=testing, device=device, revision=revision,
        sys_clk_freq=int(sys_clk_freq), uart_baudrate=int(uart_baudrate))
    builder = Builder(soc, output_dir=output_dir, compile_software=False,  # firmware/, not the BIOS
        csr_json=os.path.join(output_dir, "csr.json"))
    os.environ["PATH"] = yowasp_path(os.path.join(output_dir, "toolchain-bin"))
    report = os.path.join(builder.gateware_dir, "nextpnr-report.json")
    # gateware.build's placer and router: the electrostatic placer spreads the design over the
    # die (HeAP left a quarter of it empty) and router2 converges where router1 stalled
    soc.platform.toolchain._pnr_opts += f" --report {report} " + " ".join(NEXTPNR_PLACE_ROUTE)
    builder.build(seed=NEXTPNR_SEED if seed is None else seed, **toolchain_kwargs)
    build_s = time.monotonic() - t0

    r = parse_nextpnr_report(report)
    cpt = expected_cycles_per_token(core)
    step_bytes, link_tps = link_figures(uart_baudrate)
    summary = dict(
        bitstream              = os.path.relpath(builder.get_bitstream_filename(mode="sram"), REPO_DIR),
        build_s                = round(build_s, 1),
        core                   = core_kind,
        testing_core           = testing,
        device                 = device,
        resources              = r["resources"],
        fmax_mhz               = r["fmax_mhz"],
        sys_clk_mhz            = sys_clk_freq/1e6,
        clocks                 = r["clocks"],
        cycles_per_token       = cpt,
        projected_tokens_per_s = (r["fmax_mhz"] and min(r["fmax_mhz"], sys_clk_freq/1e6)*1e6/cpt) if cpt else None,
        uart_baudrate          = int(uart_baudrate),
        link_bytes_per_token   = step_bytes,
        link_tokens_per_s      = round(link_tps, 1),
        link_to_chip_ratio     = round(link_tps / (min(r["fmax_mhz"], sys_clk_freq/1e6)*1e6/cpt), 1)
                                 if cpt and r["fmax_mhz"] else None,
        model_id               = getattr(core, "model_id_value", None),
    )
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary))
    return summary

def main():
    parser = LiteXArgumentParser(platform=ulx3s.Platform, description="bakedllama on ULX3S.")
    parser.add_target_argument("--core",         default="real", choices=["real", "testing"],
        help="real: gateware.core.BakedLlamaCore; testing: TEST-ONLY lookup-table stand-in")
    parser.add_target_argument("--model",        default=None,  help="baked model (default weights/tiny/model-q.bkl)")
    parser.add_target_argument("--lanes",        default=None,  type=int, help="accelerator lanes")
    parser.add_target_argument("--device",       default="LFE5U-85F", help="FPGA device")
    parser.add_target_argument("--revision",     default="2.0", help="board revision (2.0 or 1.7)")
    parser.add_target_argument("--sys-clk-freq", default=SYS_CLK_FREQ, type=float, help="system clock")
    parser.add_target_argument("--flash",        action="store_true", help="with --load: write the SPI flash")
    parser.set_defaults(output_dir=DEFAULT_OUTPUT_DIR, uart_baudrate=P.DEFAULT_BAUDRATE,
        nextpnr_seed=NEXTPNR_SEED)
    args = parser.parse_args()

    if args.build:
        build(args.output_dir or DEFAULT_OUTPUT_DIR, args.core, args.model, args.lanes,
            args.sys_clk_freq, args.device, args.revision, int(float(args.uart_baudrate)),
            seed=args.nextpnr_seed, timingstrict=args.nextpnr_timingstrict)
    if args.load:
        bit = os.path.join(args.output_dir or DEFAULT_OUTPUT_DIR, "gateware", "ulx3s.bit")
        if not os.path.exists(bit):
            raise SystemExit(f"no bitstream at {bit}: run `make build` first")
        cmd = ["openFPGALoader", "-b", "ulx3s"] + (["-f"] if args.flash else []) + [bit]
        raise SystemExit(subprocess.call(cmd))

if __name__ == "__main__":
    main()
