#!/usr/bin/env python3
#
# bakedllama: SQRL Acorn CLE-215+ target (Artix-7 XC7A200T on an M.2 card, PCIe Gen2 x4), in the
# shape of LiteX-Boards' sqrl_acorn target.
#
# No CPU: LitePCIe's endpoint maps BAR0 onto the SoC's Wishbone bus and so onto the CSR bank
# (LiteX's add_pcie: LitePCIeWishboneMaster); the host drives the accelerator's CSRs and its
# token FIFO (soc/common.py LlamaPort) itself: host/bakedllama/device/csr.py, through LiteX's
# CommPCIe (mmap of BAR0) or a litex_server. The accelerator is the same gateware core,
# recompiled for this part's resources (ACORN_GEOMETRY).
#
# The PCIe PHY is Xilinx IP (pcie_7x) that only Vivado generates: here the gateware and the
# Vivado build scripts are generated, the bitstream cannot be built (Vivado is not on this
# machine; `--build` says so and exits 0 after generating). `--estimate` runs yosys synth_xilinx
# (yowasp) on the generated Verilog for a resource estimate (the PHY's hard IP as a black box).
#
#   python -m soc.sqrl_acorn --build              # build/soc/sqrl_acorn/: gateware/, csr.csv, ...
#   python -m soc.sqrl_acorn --build --estimate   # + yosys synth_xilinx resource estimate
#   python -m soc.sqrl_acorn --load               # openFPGALoader (needs the Vivado bitstream)
#

import json
import os
import shutil
import subprocess
import sys
import time

from migen import *

from litex.gen import LiteXModule
from litex.soc.cores.clock import S7PLL
from litex.soc.integration.soc_core import SoCMini
from litex.soc.integration.builder import Builder
from litex.build.parser import LiteXArgumentParser  # after soc_core (import cycle)

from soc.platforms import sqrl_acorn
from soc.common import BakedLlamaSoC, REPO_DIR, DEFAULT_MODEL

DEFAULT_OUTPUT_DIR = os.path.join(REPO_DIR, "build", "soc", "sqrl_acorn")

# Board code in the SoC's constants (BAKEDLLAMA_BOARD; 1 = simulation, 2 = ULX3S: soc/common.py).
BOARD_SQRL_ACORN = 3

# System clock from the S7PLL (200 MHz oscillator in). Not checked against timing: Vivado, which
# would place and route this design, is not on this machine.
SYS_CLK_FREQ = int(100e6)

# The accelerator for the XC7A200T (740 DSP48E1, 365 RAMB36 = 730 x 18 kbit): 256 lanes (8 rows x
# 32 columns per cycle, every slot pair on packed multipliers), 16 vector lanes, both KV heads
# per attention pass; `gateware.compiler.multipliers` counts 347 multipliers for it (the ULX3S
# engine: 145 of 156). Explicit, so that the compiler's ECP5 multiplier budget does not shrink it.
ACORN_GEOMETRY = dict(lanes=256, vlanes=16, kv_par=2, dsp_pairs=4, share=0)
ACORN_BRAM18   = 730  # 18 kbit block RAMs (the compiler's budget check)
ACORN_DSP      = 740

# PCIe BAR0: the CSR region (LiteX's default 64 KiB) with room, as LiteX-Boards' target.
BAR0_SIZE = 0x20000

def make_acorn_core(model_path=None):
    """gateware.core.BakedLlamaCore compiled with ACORN_GEOMETRY (also the Verilator bridge
    variant's core, soc/sim.py --variant bridge, so that the simulation counts its cycles)."""
    from bakedllama.model import load_baked
    from gateware import compiler
    from gateware.core import BakedLlamaCore
    path = model_path or DEFAULT_MODEL
    if not os.path.exists(path):
        raise SystemExit(f"no baked model at {path} (make weights, or pass --model)")
    plan = compiler.compile_model(load_baked(path), brams=ACORN_BRAM18, **ACORN_GEOMETRY)
    return BakedLlamaCore(plan=plan)

def add_csr_field_constants(soc, modules=("llama", "llama_port")):
    """The bit fields of the accelerator's CSRs as SoC constants (<CSR>_<FIELD>_OFFSET / _SIZE),
    so that a host that only has csr.csv / csr.json (no csr.h) finds them there."""
    for name in modules:
        for csr in getattr(soc, name).get_csrs():
            for f in getattr(getattr(csr, "fields", None), "fields", []):
                key = f"{name}_{csr.name}_{f.name}".upper()
                soc.add_constant(f"{key}_OFFSET", f.offset)
                soc.add_constant(f"{key}_SIZE",   f.size)

class CSRHostSoC(BakedLlamaSoC):
    """BakedLlamaSoC for a SoC without CPU: the host runs the generation loop over CSRs."""
    def init_mems(self, **kwargs):
        pass  # no CPU: no firmware ROM

    def add_llama_csr_host(self, core, board, testing=False):
        self.add_llama(core, board=board, testing=testing)
        add_csr_field_constants(self)
        self.add_constant("BAKEDLLAMA_CSR_HOST")  # the host, not firmware, drives the accelerator

# CRG ----------------------------------------------------------------------------------------------

class _CRG(LiteXModule):
    def __init__(self, platform, sys_clk_freq):
        self.rst    = Signal()
        self.cd_sys = ClockDomain()

        # # #

        self.pll = pll = S7PLL(speedgrade=-3)
        self.comb += pll.reset.eq(self.rst)
        pll.register_clkin(platform.request("clk200"), 200e6)
        pll.create_clkout(self.cd_sys, sys_clk_freq)
        platform.add_false_path_constraints(self.cd_sys.clk, pll.clkin)  # SoC reset -> pll.clkin

# BaseSoC ------------------------------------------------------------------------------------------

class BaseSoC(CSRHostSoC, SoCMini):
    def __init__(self, core, testing=False, variant="cle-215+", sys_clk_freq=SYS_CLK_FREQ, **kwargs):
        from litepcie.phy.s7pciephy import S7PCIEPHY
        platform = sqrl_acorn.Platform(variant=variant)

        # CRG --------------------------------------------------------------------------------------
        self.crg = _CRG(platform, sys_clk_freq)

        # SoCMini ----------------------------------------------------------------------------------
        SoCMini.__init__(self, platform, sys_clk_freq,
            ident          = f"bakedllama on SQRL Acorn {variant.upper()}",
            csr_data_width = 32,
            with_timer     = True,  # timer0: the host's wall-cycle count over a generation
            **kwargs)

        # PCIe: BAR0 -> Wishbone -> CSRs -----------------------------------------------------------
        self.comb += platform.request("pcie_clkreq_n").eq(0)
        self.pcie_phy = S7PCIEPHY(platform, platform.request("pcie_x4"),
            data_width = 128,
            bar0_size  = BAR0_SIZE)
        self.add_pcie(phy=self.pcie_phy, ndmas=0, with_msi=False)
        platform.add_period_constraint(self.crg.cd_sys.clk, 1e9/sys_clk_freq)

        # Accelerator ------------------------------------------------------------------------------
        self.add_llama_csr_host(core, board=BOARD_SQRL_ACORN, testing=testing)

        # Status LEDs: 0 = alive (blinks), 1 = accelerator busy, 2 = PCIe link up.
        leds  = platform.request_all("user_led")
        blink = Signal(max=int(sys_clk_freq//2))
        led0  = Signal()
        self.sync += If(blink == 0, blink.eq(int(sys_clk_freq//2) - 1), led0.eq(~led0)).Else(blink.eq(blink - 1))
        self.comb += [leds[0].eq(led0), leds[1].eq(core.status.fields.busy),
                      leds[2].eq(self.pcie_phy._link_status.fields.status)]

# Resource estimate (yosys synth_xilinx) -----------------------------------------------------------

def pcie_blackbox(phy):
    """Verilog black box for the Vivado-generated pcie_s7 IP, from the PHY's Instance ports."""
    ports = []
    for key, sig in phy.pcie_phy_params.items():
        kind, _, name = key.partition("_")
        if kind in ("i", "o", "io"):
            width = len(sig) if hasattr(sig, "__len__") else 1
            d = {"i": "input", "o": "output", "io": "inout"}[kind]
            ports.append(f"  {d} {'[%d:0] ' % (width - 1) if width > 1 else ''}{name}")
    return "(* blackbox *)\nmodule pcie_s7(\n" + ",\n".join(ports) + "\n);\nendmodule\n"

def yosys_estimate(gateware_dir, build_name, phy, log_path):
    """yosys synth_xilinx (XC7 family, DSP48E1 and block RAM mapping) over the generated Verilog;
    returns the cell counts {cell: n} of the top level's flattened netlist."""
    from gateware.build import tool
    stub = os.path.join(gateware_dir, "pcie_s7_blackbox.v")
    with open(stub, "w") as f:
        f.write(pcie_blackbox(phy))
    stat = os.path.join(gateware_dir, "estimate_stat.json")
    script = "; ".join([
        f"read_verilog -sv {stub}",
        f"read_verilog {build_name}.v",
        f"synth_xilinx -family xc7 -top {build_name} -flatten",
        f"tee -q -o {os.path.basename(stat)} stat -json",
    ])
    with open(log_path, "w") as logf:
        r = subprocess.run([tool("yosys"), "-q", "-p", script], cwd=gateware_dir,
            stdout=logf, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise OSError(f"yosys synth_xilinx failed (see {log_path})")
    with open(stat) as f:
        data = json.load(f)
    mods = data.get("modules", {})
    top = mods.get(f"\\{build_name}") or mods.get(build_name) or next(iter(mods.values()))
    return {k.lstrip("\\"): int(v) for k, v in top.get("num_cells_by_type", {}).items()}

def summarize_cells(cells):
    """LUT / FF / RAMB36 / RAMB18 / DSP48E1 from synth_xilinx's cell types."""
    luts = sum(n for c, n in cells.items() if c.startswith("LUT"))
    ffs  = sum(n for c, n in cells.items() if c.startswith("FD"))
    return dict(LUT=luts, FF=ffs, RAMB36=cells.get("RAMB36E1", 0), RAMB18=cells.get("RAMB18E1", 0),
                DSP48E1=cells.get("DSP48E1", 0), CARRY4=cells.get("CARRY4", 0),
                LUTRAM=sum(n for c, n in cells.items() if c.startswith(("RAM32", "RAM64", "RAM128", "RAM256"))))

# Build --------------------------------------------------------------------------------------------

def plan_multipliers(plan):
    """The engine's multipliers as gateware.compiler counts them (one per 18 x 18 piece)."""
    from gateware import compiler
    g = plan.geo
    return sum(compiler.multipliers(plan.cfg, g.rows, g.cols, g.vlanes, g.post, g.kv_par,
        g.dsp_pairs, g.share).values())

def expected_cycles_per_token(core, n_tokens=64):
    from soc.ulx3s import expected_cycles_per_token as ect
    return ect(core, n_tokens)

def build(output_dir=DEFAULT_OUTPUT_DIR, core_kind="real", model_path=None, variant="cle-215+",
          sys_clk_freq=SYS_CLK_FREQ, estimate=False, run=None):
    """Generate the gateware and Vivado scripts; with Vivado on PATH (or run=True) also build the
    bitstream. Writes report.json; returns it."""
    from soc.common import make_core
    output_dir = os.path.abspath(output_dir)
    t0 = time.monotonic()
    if core_kind == "real":
        core, testing = make_acorn_core(model_path), False
    else:
        core, testing = make_core(core_kind, model_path)
    soc = BaseSoC(core, testing=testing, variant=variant, sys_clk_freq=int(sys_clk_freq))
    builder = Builder(soc, output_dir=output_dir, compile_software=False,
        csr_csv=os.path.join(output_dir, "csr.csv"), csr_json=os.path.join(output_dir, "csr.json"))
    vivado = shutil.which("vivado")
    run = bool(vivado) if run is None else run
    builder.build(run=run)
    gen_s = time.monotonic() - t0
    build_name = soc.platform.name
    gw = builder.gateware_dir
    files = sorted(f for f in os.listdir(gw) if os.path.isfile(os.path.join(gw, f)))
    plan = getattr(core, "plan", None)
    summary = dict(
        board            = f"SQRL Acorn {variant.upper()}",
        device           = soc.platform.device,
        core             = core_kind,
        testing_core     = testing,
        generate_s       = round(gen_s, 1),
        gateware_dir     = os.path.relpath(gw, REPO_DIR),
        generated        = files,
        vivado           = vivado,
        bitstream        = (os.path.relpath(builder.get_bitstream_filename(mode="sram"), REPO_DIR)
                            if run else None),
        sys_clk_mhz      = sys_clk_freq/1e6,
        geometry         = dict(ACORN_GEOMETRY) if plan is not None else None,
        multipliers      = plan_multipliers(plan) if plan is not None else None,
        cycles_per_token = expected_cycles_per_token(core),
        model_id         = getattr(core, "model_id_value", None) or getattr(plan, "identity", None),
    )
    if summary["cycles_per_token"]:
        summary["projected_tokens_per_s"] = round(sys_clk_freq / summary["cycles_per_token"], 1)
    if estimate:
        t1 = time.monotonic()
        cells = yosys_estimate(gw, build_name, soc.pcie_phy, os.path.join(output_dir, "estimate.log"))
        summary["estimate"] = dict(summarize_cells(cells), yosys_s=round(time.monotonic() - t1, 1),
            available=dict(LUT=133800, FF=267600, RAMB36=365, DSP48E1=ACORN_DSP),
            note="yosys synth_xilinx, before Vivado's optimisation; the PCIe hard IP (pcie_s7) "
                 "is a black box")
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(format_summary(summary))
    return summary

def format_summary(s):
    lines = [f"{s['board']} ({s['device']}): gateware generated in {s['generate_s']} s in {s['gateware_dir']}/"]
    lines.append("  " + ", ".join(s["generated"]))
    if s.get("geometry"):
        g = s["geometry"]
        lines.append(f"  accelerator: lanes {g['lanes']}, vlanes {g['vlanes']}, kv_par {g['kv_par']}, "
                     f"dsp_pairs {g['dsp_pairs']}: {s['multipliers']} multipliers (of {ACORN_DSP} DSP48E1), "
                     f"{s['cycles_per_token']:,} cycles/token (cycle model, first 64 positions), "
                     f"{s.get('projected_tokens_per_s', 0):,.0f} tokens/s at {s['sys_clk_mhz']:g} MHz (timing unchecked)")
    e = s.get("estimate")
    if e:
        a = e["available"]
        lines.append(f"  yosys estimate ({e['yosys_s']} s): {e['LUT']:,} / {a['LUT']:,} LUT, {e['FF']:,} FF, "
                     f"{e['RAMB36']} RAMB36 + {e['RAMB18']} RAMB18 (of {a['RAMB36']} RAMB36), "
                     f"{e['DSP48E1']} / {a['DSP48E1']} DSP48E1, {e['LUTRAM']} LUTRAM (PCIe hard IP excluded)")
    if s["bitstream"]:
        lines.append(f"  bitstream: {s['bitstream']}")
    else:
        lines.append("  Vivado is not installed (not on PATH): the bitstream cannot be built here. The PCIe "
                     "PHY is Xilinx IP that only Vivado generates; run the generated "
                     f"{s['gateware_dir']}/build_*.sh on a machine with Vivado.")
    return "\n".join(lines)

def main():
    parser = LiteXArgumentParser(platform=sqrl_acorn.Platform, description="bakedllama on SQRL Acorn (PCIe).")
    parser.add_target_argument("--core",         default="real", choices=["real", "testing"],
        help="real: gateware.core.BakedLlamaCore; testing: TEST-ONLY lookup-table stand-in")
    parser.add_target_argument("--model",        default=None, help="baked model (default weights/tiny/model-q.bkl)")
    parser.add_target_argument("--variant",      default="cle-215+", help="board variant (cle-215+, cle-215)")
    parser.add_target_argument("--sys-clk-freq", default=SYS_CLK_FREQ, type=float, help="system clock")
    parser.add_target_argument("--estimate",     action="store_true",
        help="after generating: yosys synth_xilinx resource estimate (~15 min)")
    parser.set_defaults(output_dir=DEFAULT_OUTPUT_DIR)
    args = parser.parse_args()

    if args.build:
        if args.variant not in ("cle-215+", "cle-215"):
            raise SystemExit(f"error: variant {args.variant!r}: the accelerator needs the XC7A200T "
                             "(cle-215+ or cle-215)")
        if args.model and not os.path.exists(args.model):
            print(f"error: no baked model at {args.model}", file=sys.stderr)
            raise SystemExit(2)
        build(args.output_dir or DEFAULT_OUTPUT_DIR, args.core, args.model, args.variant,
            args.sys_clk_freq, estimate=args.estimate)
    if args.load:
        bit = os.path.join(args.output_dir or DEFAULT_OUTPUT_DIR, "gateware", "sqrl_acorn.bit")
        if not os.path.exists(bit):
            raise SystemExit(f"no bitstream at {bit}: it needs Vivado (see the README)")
        raise SystemExit(subprocess.call(["openFPGALoader", "--fpga-part", "xc7a200tfbg484", bit]))

if __name__ == "__main__":
    main()
