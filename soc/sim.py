#!/usr/bin/env python3
#
# bakedllama: Verilator simulation target (litex_sim shape).
#
# VexRiscv + integrated ROM (firmware/) / SRAM + the accelerator; the UART goes to a TCP socket on
# 127.0.0.1 through soc/sim_modules/serial2tcp_local (LiteX's serial2tcp listens on all interfaces
# and drops output while no client is connected).
#
#   python -m soc.sim --output-dir build/soc/sim --build          # generate and compile
#   python -m soc.sim --output-dir build/soc/sim --build --run    # ... and run (port 0 = free)
#   python -m soc.sim --core testing ...                          # TEST-ONLY stand-in core
#   python -m soc.sim --variant bridge ...                        # the PCIe target's host path
#
# host/bakedllama/device/sim.py builds this once (cached) and starts the binary itself.
#
# --variant bridge: the SQRL Acorn target (soc/sqrl_acorn.py) without its PCIe PHY, which does not
# simulate: no CPU, the same accelerator (its ACORN_GEOMETRY) and CSRs, and UARTBone on the
# simulated serial port in place of LitePCIe's BAR0 bridge, so that the host's CSR code path
# (host/bakedllama/device/csr.py, LiteX's CommUART) runs end to end in Verilator. Built and
# started by csr.start_bridge_sim (`bakedllama generate --device sim-bridge`).

import argparse
import json
import os
import shutil
import subprocess

from migen import *

from litex.build.generic_platform import Pins, Subsignal
from litex.build.sim import SimPlatform
from litex.build.sim.config import SimConfig
from litex.soc.integration.soc_core import SoCCore
from litex.soc.integration.builder import Builder
from migen.genlib.io import CRG

from soc.common import (BakedLlamaSoC, make_core, BOARD_SIM, CPU_TYPE, CPU_VARIANT, ROM_SIZE,
    SRAM_SIZE, SYS_CLK_FREQ, REPO_DIR, DEFAULT_MODEL)

SIM_MODULE      = "serial2tcp_local"
SIM_MODULES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sim_modules")

# IOs ----------------------------------------------------------------------------------------------

_io = [
    ("sys_clk", 0, Pins(1)),
    ("sys_rst", 0, Pins(1)),
    ("serial", 0,
        Subsignal("source_valid", Pins(1)),
        Subsignal("source_ready", Pins(1)),
        Subsignal("source_data",  Pins(8)),
        Subsignal("sink_valid",   Pins(1)),
        Subsignal("sink_ready",   Pins(1)),
        Subsignal("sink_data",    Pins(8)),
    ),
]

class Platform(SimPlatform):
    def __init__(self):
        SimPlatform.__init__(self, "SIM", _io)

# BaseSoC ------------------------------------------------------------------------------------------

class BaseSoC(BakedLlamaSoC, SoCCore):
    def __init__(self, core, testing=False, sys_clk_freq=SYS_CLK_FREQ, **kwargs):
        platform = Platform()

        # CRG --------------------------------------------------------------------------------------
        self.crg = CRG(platform.request("sys_clk"))

        # SoCCore ----------------------------------------------------------------------------------
        # sys_clk_freq is nominal (Verilator counts cycles): the board's, so that the firmware
        # reports the same figures.
        SoCCore.__init__(self, platform, clk_freq=sys_clk_freq,
            ident                = "bakedllama Verilator simulation",
            cpu_type             = CPU_TYPE,
            cpu_variant          = CPU_VARIANT,
            integrated_rom_size  = ROM_SIZE,
            integrated_sram_size = SRAM_SIZE,
            uart_name            = "sim",
            **kwargs)

        # Accelerator ------------------------------------------------------------------------------
        self.add_llama(core, board=BOARD_SIM, testing=testing)

# Bridge variant -----------------------------------------------------------------------------------

def bridge_soc_class():
    """BridgeSoC: SoCMini + UARTBone on the sim serial + the accelerator (soc/sqrl_acorn.py)."""
    from litex.soc.cores.uart import RS232PHYModel, UARTBone
    from litex.soc.integration.soc_core import SoCMini
    from soc.sqrl_acorn import CSRHostSoC, SYS_CLK_FREQ as ACORN_CLK_FREQ

    class BridgeSoC(CSRHostSoC, SoCMini):
        def __init__(self, core, testing=False, sys_clk_freq=ACORN_CLK_FREQ, **kwargs):
            platform = Platform()

            # CRG ----------------------------------------------------------------------------------
            self.crg = CRG(platform.request("sys_clk"))

            # SoCMini ------------------------------------------------------------------------------
            # sys_clk_freq is nominal: the Acorn's, so that the host reports its figures.
            SoCMini.__init__(self, platform, clk_freq=sys_clk_freq,
                ident          = "bakedllama Verilator simulation (PCIe bridge variant)",
                csr_data_width = 32,
                with_timer     = True,
                **kwargs)

            # UARTBone on the simulated serial port: the host's bus master (BAR0 on the board).
            self.uartbone_phy = RS232PHYModel(platform.request("serial"))
            self.uartbone     = UARTBone(phy=self.uartbone_phy, clk_freq=sys_clk_freq,
                address_width=self.bus.address_width)
            self.bus.add_master(name="uartbone", master=self.uartbone.wishbone)

            # Accelerator --------------------------------------------------------------------------
            self.add_llama_csr_host(core, board=BOARD_SIM, testing=testing)

    return BridgeSoC

# Build --------------------------------------------------------------------------------------------

def sim_config(port=0, cycles_per_byte=0, sys_clk_freq=SYS_CLK_FREQ):
    c = SimConfig()
    c.add_clocker("sys_clk", freq_hz=int(sys_clk_freq))
    c.add_module(SIM_MODULE, "serial", args={"port": int(port), "cycles_per_byte": int(cycles_per_byte)})
    return c

def write_sim_config(path, port=0, cycles_per_byte=0):
    """sim_config.js for a run directory (the binary reads it from its working directory)."""
    with open(path, "w") as f:
        f.write(sim_config(port, cycles_per_byte).get_json())

def build(output_dir, core_kind="real", model_path=None, lanes=None, jobs=None, trace=False,
          variant="cpu"):
    """Generate the SoC, build the firmware into its ROM, compile the Verilator binary.
    Returns the gateware dir (obj_dir/Vsim, *.init, modules/, sim_config.js).
    variant "bridge": the CPU-less PCIe target's SoC over UARTBone (no firmware; csr.csv too)."""
    output_dir  = os.path.abspath(output_dir)
    if variant == "bridge":
        if core_kind == "real" and lanes is None:
            from soc.sqrl_acorn import make_acorn_core
            core, testing = make_acorn_core(model_path), False
        else:
            core, testing = make_core(core_kind, model_path, lanes=lanes)
        soc = bridge_soc_class()(core, testing=testing)
        builder = Builder(soc, output_dir=output_dir, compile_software=False,
            csr_json=os.path.join(output_dir, "csr.json"), csr_csv=os.path.join(output_dir, "csr.csv"))
    elif variant == "cpu":
        core, testing = make_core(core_kind, model_path, lanes=lanes)
        soc = BaseSoC(core, testing=testing)
        builder = Builder(soc, output_dir=output_dir, compile_software=False,  # firmware/, not the BIOS
            csr_json=os.path.join(output_dir, "csr.json"))
    else:
        raise ValueError(f"unknown variant {variant!r} (cpu or bridge)")
    # LiteX writes a variables.mak into extra_mods_path: give it a copy of the module sources.
    mods_dir = os.path.join(output_dir, "sim_modules")
    shutil.rmtree(mods_dir, ignore_errors=True)
    shutil.copytree(SIM_MODULES_DIR, mods_dir)
    builder.build(
        sim_config      = sim_config(),
        run             = False,             # generate only; compiled below, run by the launcher
        extra_mods      = [SIM_MODULE],
        extra_mods_path = mods_dir,
        jobs            = jobs or min(2, os.cpu_count() or 1),  # LiteX's default is `make -j` (unbounded)
        trace           = trace,
        opt_level       = "O3",
        interactive     = False,
    )
    gateware_dir = builder.gateware_dir
    r = subprocess.run(["bash", "build_sim.sh"], cwd=gateware_dir,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(os.path.join(gateware_dir, "verilator.log"), "w") as f:
        f.write(r.stdout)
    if r.returncode != 0:
        errors = [l for l in r.stdout.splitlines() if "error" in l.lower()]
        raise OSError("Verilator build failed (see {}):\n{}".format(
            os.path.join(gateware_dir, "verilator.log"), "\n".join(errors[-30:])))
    with open(os.path.join(output_dir, "build.json"), "w") as f:
        json.dump(dict(core=core_kind, testing=testing, **({} if variant == "cpu" else dict(variant=variant)),
            model=None if testing else os.path.abspath(model_path or DEFAULT_MODEL),
            model_id=getattr(core, "model_id_value", None) or getattr(getattr(core, "plan", None), "identity", None)), f)
    return gateware_dir

def main():
    parser = argparse.ArgumentParser(description="bakedllama Verilator simulation target")
    parser.add_argument("--output-dir", default=os.path.join(REPO_DIR, "build", "soc", "sim"))
    parser.add_argument("--core",       default="real", choices=["real", "testing"],
        help="real: gateware.core.BakedLlamaCore; testing: TEST-ONLY lookup-table stand-in")
    parser.add_argument("--model",      default=None, help="baked model (default weights/tiny/model-q.bkl)")
    parser.add_argument("--lanes",      default=None, type=int, help="accelerator lanes")
    parser.add_argument("--variant",    default="cpu", choices=["cpu", "bridge"],
        help="cpu: VexRiscv + firmware (default); bridge: no CPU, UARTBone (the PCIe target's host path)")
    parser.add_argument("--jobs",       default=None, help="compiler jobs")
    parser.add_argument("--trace",      action="store_true",
        help="waveforms (opt-in, large; or BAKEDLLAMA_SIM_TRACE=1)")
    parser.add_argument("--build",      action="store_true", help="generate and compile")
    parser.add_argument("--run",        action="store_true", help="run in the foreground")
    parser.add_argument("--port",       default=0, type=int, help="TCP port on 127.0.0.1 (0 = free)")
    args = parser.parse_args()

    gateware_dir = os.path.join(os.path.abspath(args.output_dir), "gateware")
    if args.build:
        trace = args.trace or os.environ.get("BAKEDLLAMA_SIM_TRACE") == "1"
        gateware_dir = build(args.output_dir, args.core, args.model, args.lanes, args.jobs, trace,
            variant=args.variant)
    if args.run:
        write_sim_config(os.path.join(gateware_dir, "sim_config.js"), port=args.port)
        subprocess.call([os.path.join(gateware_dir, "obj_dir", "Vsim")], cwd=gateware_dir)

if __name__ == "__main__":
    main()
