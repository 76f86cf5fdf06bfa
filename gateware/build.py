"""Build the accelerator: Verilog, and synthesis + place-and-route for the LFE5U-85F (yowasp).

    python -m gateware.build [--model FILE | --synthetic] [--lanes N] [--out DIR] [--synth]

The model defaults to weights/tiny/model-q.bkl (random weights of the same shape with --synthetic
or when it is missing); the output to build/gateware/accel-l<lanes>.

Writes <out>/accel.v (+ ROM .init files) and <out>/build.json. With --synth: yosys synth_ecp5 and
nextpnr-ecp5 (--85k, CABGA381, speed 6), then prints and stores LUT4 / FF / DP16KD / MULT18X18D
use, Fmax, and the projected tokens/s from the cycle model. The top level is the core with its CSR
bank and a 32-bit CSR bus, as a SoC would instantiate it (no CPU).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bakedllama.config import ModelConfig  # noqa: E402

from gateware import compiler, cycle_model  # noqa: E402

REAL = ModelConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=192, vocab_size=512,
                   seq_len=256, tied_embeddings=True)


# The electrostatic placer spreads the lanes-64 design over the whole die; HeAP packed it into ~3/4
# of it and router2 then met 5-20 % more overuse. On the lanes-128 SoC (63 % of the LUTs, 198 of
# 208 block RAMs) the electrostatic placer stalls with 15-22 % of the block RAMs overlapping after
# 2,800 iterations (40 min); HeAP places it (~25 min with its annealing) and router2 then needs
# well over 20 min: use `--placer heap` there.
NEXTPNR_PLACE_ROUTE = ["--placer", "static", "--router", "router2"]


def tool(name: str) -> str:
    """yowasp-<name> from the venv (or PATH), else <name>."""
    for cand in (Path(sys.executable).parent / f"yowasp-{name}", shutil.which(f"yowasp-{name}"),
                 shutil.which(name)):
        if cand and Path(cand).exists():
            return str(cand)
    raise FileNotFoundError(f"{name}: install yowasp-{name} (pip) or put {name} on PATH")


def load_model(args):
    from bakedllama.model import DEFAULT_BAKED, load_baked
    if args.model:
        return load_baked(args.model)
    if not args.synthetic and DEFAULT_BAKED.exists():
        return load_baked(DEFAULT_BAKED)
    from bakedllama.synthetic import random_baked
    d = Path(tempfile.mkdtemp(prefix="bkl-build-"))
    return random_baked(d / "m.bkl", REAL, scheme="w4e8", seed=args.seed)


def write_verilog(plan, out: Path, with_trace: bool = False) -> dict:
    from gateware.sim import generate
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    text, csr_map, inits = generate(plan, with_trace, out)
    (out / "accel.v").write_text(text)
    for name, content in inits.items():
        (out / name).write_text(content)
    (out / "csr.json").write_text(json.dumps(csr_map, indent=1))
    return dict(verilog_seconds=round(time.time() - t0, 1), verilog_lines=text.count("\n"))


def _run(cmd, cwd: Path, log: Path, timeout: int):
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if r.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd[:2]))} failed (see {log}):\n{tail}")
    return round(time.time() - t0, 1)


def synthesize(out: Path, freq: float = 70.0, timeout: int = 6 * 3600, seed: int = 1,
               pnr_only: bool = False) -> dict:
    """yosys + nextpnr-ecp5 (router2) on <out>/accel.v; returns utilisation and Fmax."""
    res = {}
    if not pnr_only:
        res.update(_yosys(out, timeout))
    res["nextpnr_seconds"] = _run(
        [tool("nextpnr-ecp5"), "--85k", "--package", "CABGA381", "--speed", "6",
         "--json", "accel.json", "--textcfg", "accel.config", "--freq", str(freq),
         "--report", "report.json", "--timing-allow-fail", "--seed", str(seed), "--threads", "1",
         *NEXTPNR_PLACE_ROUTE],
        out, out / "nextpnr.log", timeout)
    rep = json.loads((out / "report.json").read_text())
    util = rep.get("utilization", {})
    res["utilization"] = {k: v for k, v in util.items() if v.get("used")}
    fm = rep.get("fmax", {})
    res["fmax_mhz"] = min((v["achieved"] for v in fm.values()), default=None)
    res["fmax"] = fm
    return res


def _yosys(out: Path, timeout: int) -> dict:
    res = {}
    ys = out / "synth.ys"
    ys.write_text("read_verilog accel.v\nsynth_ecp5 -top top -json accel.json\n"
                  "tee -o yosys_stat.txt stat\n")
    res["yosys_seconds"] = _run([tool("yosys"), "-q", "-l", "yosys.log", "synth.ys"], out,
                                out / "yosys.out", timeout)
    stat = (out / "yosys_stat.txt").read_text()
    for cell in ("LUT4", "TRELLIS_FF", "CCU2C", "DP16KD", "MULT18X18D", "TRELLIS_DPR16X4",
                 "PFUMX", "L6MUX21"):
        m = re.findall(rf"^\s+(\d+)\s+{cell}\s*$", stat, re.M) or \
            re.findall(rf"^\s+{cell}\s+(\d+)\s*$", stat, re.M)
        res[f"yosys_{cell}"] = int(m[-1]) if m else 0
    return res


def geo_kwargs(geo) -> dict:
    """The geometry choices cycle_model needs besides lanes (so that it prices the built engine)."""
    return dict(vlanes=geo.vlanes, kv_par=geo.kv_par, dsp_pairs=geo.dsp_pairs)


def projected(cfg, lanes, fmax_mhz, prompt: int = 16, gen: int = 128, **geo) -> dict:
    """Tokens/s for a prompt of `prompt` tokens then `gen` generated (positions 0 .. prompt+gen-2)."""
    n = prompt + gen - 1
    cyc = [cycle_model.expected_cycles(cfg, lanes, p, **geo) for p in range(n)]
    total = sum(cyc)
    return dict(passes=n, total_cycles=total, mean_cycles=total / n,
                tokens_per_s=(gen * fmax_mhz * 1e6 / total) if fmax_mhz else None,
                passes_per_s=(n * fmax_mhz * 1e6 / total) if fmax_mhz else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="baked model (.bkl); default: weights/tiny/model-q.bkl")
    ap.add_argument("--synthetic", action="store_true", help="random weights of the real shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lanes", type=int, default=compiler.DEFAULT_LANES)
    ap.add_argument("--vlanes", type=int)
    ap.add_argument("--kv-par", type=int)
    ap.add_argument("--dsp-pairs", type=int, help="matrix row-slot pairs on packed MULT18X18D "
                    "(default: every pair, as the multipliers allow)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--synth", action="store_true", help="run yosys + nextpnr-ecp5 (LFE5U-85F)")
    ap.add_argument("--freq", type=float, default=70.0, help="nextpnr target (MHz)")
    ap.add_argument("--pnr-only", action="store_true", help="reuse <out>/accel.json from yosys")
    args = ap.parse_args(argv)
    model = load_model(args)
    plan = compiler.compile_model(model, args.lanes, args.vlanes, args.kv_par,
                                  dsp_pairs=args.dsp_pairs)
    out = args.out or REPO / "build" / "gateware" / f"accel-l{args.lanes}"
    info = dict(model_id=f"{plan.identity:08x}", config=plan.cfg.to_dict(), geometry=str(plan.geo),
                banks=[dict(bits=b.bits, group=b.group, slots=b.slots, width=b.width, depth=b.depth)
                       for b in plan.banks])
    info.update(write_verilog(plan, out))
    c = plan.cfg
    info["cycles"] = {p: cycle_model.expected_cycles(c, args.lanes, p, **geo_kwargs(plan.geo))
                      for p in (16, 128, 255)}
    info["bounds"] = cycle_model.device_bounds(c)
    print(json.dumps(info, indent=1))
    if args.synth:
        info["synth"] = synthesize(out, args.freq, pnr_only=args.pnr_only)
        info["projection"] = projected(c, args.lanes, info["synth"]["fmax_mhz"],
                                       **geo_kwargs(plan.geo))
        print(json.dumps({k: info[k] for k in ("synth", "projection")}, indent=1))
    (out / "build.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
