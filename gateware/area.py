"""Where the LUTs go: each unit of the datapath synthesized alone for the LFE5U-85F (yowasp yosys).

    python -m gateware.area [--lanes N] [--vlanes P] [--kv-par K] [--model FILE] [--jobs 2]

Migen flattens the core into one Verilog module, so a hierarchical `stat` of the whole core has
nothing to attribute. Instead every unit that `core.make_units(plan)` builds is converted on its
own (all its interface signals as top-level ports, so yosys keeps all of its logic) and run
through `synth_ecp5`; the row "datapath (rest)" is the whole core's synthesis minus the units: the
sequencer, the residual x, the embedding, the row post-processing, the RoPE table and the CSRs.
Results are cached per Verilog text under build/gateware/area/<hash>/. It prints, never asserts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateware import compiler  # noqa: E402

BUILD = REPO / "build" / "gateware" / "area"
CELLS = ("LUT4", "CCU2C", "TRELLIS_FF", "DP16KD", "MULT18X18D", "TRELLIS_DPR16X4", "PFUMX", "L6MUX21")
UNIT_NAMES = dict(mv="MatVec (weight ROMs, lanes)", att="Attention (KV cache, softmax)",
                  rms="RMSNorm", aq="ActQuant", rope="RoPE", swiglu="SwiGLU", argmax="Argmax",
                  sampler="Sampler")


def _ports(unit) -> set:
    """Every Signal the unit exposes as an attribute (endpoints and records flattened)."""
    from migen import Signal
    from migen.genlib.record import Record

    out = set()
    for v in vars(unit).values():
        if isinstance(v, Signal):
            out.add(v)
        elif isinstance(v, Record):
            out.update(v.flatten())
    return out


def unit_verilog(unit) -> tuple[str, dict]:
    from litex.gen.fhdl.verilog import convert
    from migen import ClockDomain, Module

    top = Module()
    top.submodules.u = unit
    top.clock_domains.cd_sys = ClockDomain()
    ios = _ports(unit) | {top.cd_sys.clk, top.cd_sys.rst}
    conv = convert(top, ios=ios, name="top")
    return conv.main_source, dict(conv.data_files)


def timing_wrapper(unit):
    """The unit between registers, for a standalone place and route: every input bit is a stage of
    one shift register fed from a pin, every output bit is registered and folded by XOR into a
    register per 32 bits, then into one pin. Paths inside are register to register as in the core,
    and no logic is removed."""
    from migen import Cat, ClockDomain, Module, Signal

    top = Module()
    top.submodules.u = unit
    top.clock_domains.cd_sys = ClockDomain()
    sin, sout = Signal(name="serial_in"), Signal(name="serial_out")
    ports = _ports(unit)
    # a signal the unit drives is an output; one it only reads is an input
    from migen.fhdl.tools import list_targets
    unit.finalize()  # (not get_fragment: the top collects only modules it was not called on)
    frag = unit._fragment
    driven = set()
    for stmts in [frag.comb, *frag.sync.values()]:
        driven |= set(list_targets(stmts))
    for sp in frag.specials:  # memory read ports drive their data
        driven |= {p.dat_r for p in getattr(sp, "ports", [])}
    ins = sorted((s for s in ports if s not in driven), key=lambda s: s.duid)
    outs = sorted((s for s in ports if s in driven), key=lambda s: s.duid)
    prev = sin
    for s in ins:
        r = Signal(len(s))
        top.sync += r.eq(Cat(prev, r[:-1]) if len(s) > 1 else prev)
        top.comb += s.eq(r)
        prev = r[-1]
    bits = []
    for s in outs:
        r = Signal(len(s))
        top.sync += r.eq(s)
        bits += [r[i] for i in range(len(r))]
    folds = []
    for i in range(0, len(bits), 32):
        f = Signal()
        acc = bits[i]
        for b in bits[i + 1:i + 32]:
            acc = acc ^ b
        top.sync += f.eq(acc)
        folds.append(f)
    acc = prev
    for f in folds:
        acc = acc ^ f
    top.sync += sout.eq(acc)
    return top, {top.cd_sys.clk, top.cd_sys.rst, sin, sout}


def pnr_unit(unit, freq: float = 75.0, timeout: int = 7200) -> dict:
    """yosys + nextpnr-ecp5 on one unit inside timing_wrapper; Fmax and the critical path."""
    from litex.gen.fhdl.verilog import convert

    from gateware.build import NEXTPNR_PLACE_ROUTE, _run, tool

    top, ios = timing_wrapper(unit)
    conv = convert(top, ios=ios, name="top")
    d = _stage(conv.main_source, dict(conv.data_files), "pnr-", str(freq))
    done = d / "pnr.json"
    if done.exists():
        return json.loads(done.read_text())
    (d / "synth.ys").write_text("read_verilog unit.v\nsynth_ecp5 -top top -json unit.json\n")
    # the clock on the ULX3S's 25 MHz oscillator pin (a pin that reaches the global network)
    (d / "unit.lpf").write_text('LOCATE COMP "sys_clk" SITE "G2";\nIOBUF PORT "sys_clk" IO_TYPE=LVCMOS33;\n')
    _run([tool("yosys"), "-q", "-l", "yosys.log", "synth.ys"], d, d / "yosys.out", timeout)
    _run([tool("nextpnr-ecp5"), "--85k", "--package", "CABGA381", "--speed", "6", "--json", "unit.json",
          "--freq", str(freq), "--lpf", "unit.lpf", "--lpf-allow-unconstrained", "--report", "report.json", "--timing-allow-fail", "--seed", "1",
          "--threads", "1", *NEXTPNR_PLACE_ROUTE], d, d / "nextpnr.log", timeout)
    rep = json.loads((d / "report.json").read_text())
    fm = rep.get("fmax", {})
    res = dict(fmax_mhz=min((v["achieved"] for v in fm.values()), default=None),
               critical=critical_path(d / "nextpnr.log"))
    done.write_text(json.dumps(res, indent=1))
    return res


def critical_path(log: Path, n: int = 60) -> list[str]:
    """The last critical-path report of a nextpnr log (source, sink and the nets in between)."""
    lines = log.read_text().splitlines()
    start = max((i for i, ln in enumerate(lines) if "Critical path report for clock" in ln), default=None)
    if start is None:
        return []
    out = []
    for ln in lines[start:start + 400]:
        if ln.startswith("Info:") and ("Net " in ln or "Source " in ln or "Sink " in ln or "delay" in ln):
            out.append(ln[6:].strip())
    return out[:n]


def parse_stat(text: str) -> dict:
    res = {}
    for cell in CELLS:
        m = re.findall(rf"^\s+(\d+)\s+{cell}\s*$", text, re.M) or \
            re.findall(rf"^\s+{cell}\s+(\d+)\s*$", text, re.M)
        res[cell] = int(m[-1]) if m else 0
    # TRELLIS_COMB as nextpnr counts it: a LUT4 each, two per CCU2C carry cell, two per DPR16X4
    res["COMB"] = res["LUT4"] + 2 * res["CCU2C"] + 2 * res["TRELLIS_DPR16X4"]
    return res


def _stage(text: str, inits: dict, prefix: str, salt: str) -> Path:
    """build/gateware/area/<prefix><hash of the Verilog + salt>/ with unit.v and its .init files."""
    stable = "\n".join(ln for ln in text.splitlines() if "Auto-Generated by LiteX on" not in ln)
    d = BUILD / (prefix + hashlib.sha256((stable + salt).encode()).hexdigest()[:16])
    d.mkdir(parents=True, exist_ok=True)
    (d / "unit.v").write_text(text)
    for name, content in inits.items():
        (d / name).write_text(content)
    return d


def synth_text(text: str, inits: dict, timeout: int = 3600) -> dict:
    """yosys synth_ecp5 on one Verilog text (cached by its hash); returns the cell counts."""
    from gateware.build import _run, tool

    d = _stage(text, inits, "", json.dumps(sorted(inits.items())))
    done = d / "stat.json"
    if done.exists():
        return json.loads(done.read_text())
    (d / "synth.ys").write_text("read_verilog unit.v\nsynth_ecp5 -top top\ntee -o stat.txt stat\n")
    secs = _run([tool("yosys"), "-q", "-l", "yosys.log", "synth.ys"], d, d / "yosys.out", timeout)
    res = parse_stat((d / "stat.txt").read_text())
    res["yosys_seconds"] = secs
    tmp = d / "stat.json.tmp"
    tmp.write_text(json.dumps(res))
    tmp.replace(done)
    return res


def unit_areas(plan, jobs: int = 2, log=print, only: list | None = None) -> dict:
    """name -> cell counts for every unit of the plan (or those in `only`), plus 'core' (the whole
    BakedLlamaCore) when all are asked for."""
    from gateware.core import make_units
    from gateware.sim import generate

    texts = {name: unit_verilog(u) for name, u in make_units(plan).items()
             if only is None or name in only}
    if only is None:
        core_text, _, core_inits = generate(plan, False, BUILD / "stage")
        texts["core"] = (core_text, core_inits)
    log(f"area: yosys on {len(texts)} designs ({jobs} at a time; cached runs are instant)")
    with ThreadPoolExecutor(jobs) as ex:
        futs = {name: ex.submit(synth_text, t, i) for name, (t, i) in texts.items()}
        return {name: f.result() for name, f in futs.items()}


def table(areas: dict) -> list[str]:
    cols = ("COMB", "TRELLIS_FF", "DP16KD", "MULT18X18D")
    hdr = f"{'unit':32s} {'LUT4 (COMB)':>12s} {'FF':>8s} {'DP16KD':>7s} {'MULT18X18D':>11s}"
    rows = [hdr]
    units = {k: v for k, v in areas.items() if k != "core"}
    for name, a in sorted(units.items(), key=lambda kv: -kv[1]["COMB"]):
        rows.append(f"{UNIT_NAMES.get(name, name):32s} {a['COMB']:>12,} {a['TRELLIS_FF']:>8,} "
                    f"{a['DP16KD']:>7,} {a['MULT18X18D']:>11,}")
    if "core" in areas:
        core = areas["core"]
        rest = {c: core[c] - sum(u[c] for u in units.values()) for c in cols}
        rows.append(f"{'datapath (rest: sequencer, x, post)':32s} {rest['COMB']:>12,} "
                    f"{rest['TRELLIS_FF']:>8,} {rest['DP16KD']:>7,} {rest['MULT18X18D']:>11,}")
        rows.append(f"{'whole core':32s} {core['COMB']:>12,} {core['TRELLIS_FF']:>8,} "
                    f"{core['DP16KD']:>7,} {core['MULT18X18D']:>11,}")
    rows.append(f"{'LFE5U-85F':32s} {83640:>12,} {83640:>8,} {208:>7,} {156:>11,}")
    return rows


def main(argv=None) -> int:
    from gateware.build import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="baked model (.bkl); default: weights/tiny/model-q.bkl")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lanes", type=int, default=compiler.DEFAULT_LANES)
    ap.add_argument("--vlanes", type=int)
    ap.add_argument("--kv-par", type=int)
    ap.add_argument("--dsp-pairs", type=int, help="matrix row-slot pairs on packed MULT18X18D "
                    "(default: every pair, as the multipliers allow)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--pnr", nargs="+", metavar="UNIT", help="place and route these units alone "
                    "(between registers) and print their Fmax and critical path")
    ap.add_argument("--freq", type=float, default=75.0, help="nextpnr target for --pnr (MHz)")
    ap.add_argument("--only", nargs="+", metavar="UNIT", help="synthesize these units only")
    args = ap.parse_args(argv)
    plan = compiler.compile_model(load_model(args), args.lanes, args.vlanes, args.kv_par,
                                  dsp_pairs=args.dsp_pairs)
    if args.pnr:
        from gateware.core import make_units

        for name in args.pnr:
            r = pnr_unit(make_units(plan)[name], args.freq)
            print(f"{name}: Fmax {r['fmax_mhz']:.2f} MHz (alone, between registers)")
            for ln in r["critical"]:
                print("    " + ln)
        return 0
    areas = unit_areas(plan, args.jobs, only=args.only)
    print(f"per-unit area, lanes {plan.geo.lanes}, vlanes {plan.geo.vlanes}, kv_par {plan.geo.kv_par}, "
          f"dsp_pairs {plan.geo.dsp_pairs} "
          f"(yosys synth_ecp5, each unit alone):")
    for r in table(areas):
        print("  " + r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
