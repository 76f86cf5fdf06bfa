"""Gateware benchmark: the accelerator in Verilator against the golden model and the cycle model.

    python -m gateware.bench [--lanes 16 64 128] [--positions 256] [--model FILE]

For each `lanes`: compile the baked model, build (or reuse) the Verilator model of the core, run
greedy decoding for `positions` steps (position 0 .. positions-1) and print:
  - Verilator generate / build seconds (0 when the build is cached) and simulated cycles per second,
  - cycles per token from the hardware counter at positions 16, 128 and 255, next to the cycle
    model and the device bounds (weight bits / 7,488 BRAM bits per cycle; weights / 156 multipliers),
  - token ids and per-layer traces checked against the golden model (mismatches counted, printed),
  - LUT4 / FF / DP16KD / MULT18X18D per unit at the default lanes (gateware.area),
  - projected tokens/s = Fmax / cycles (16-token prompt, 128 generated) when a place-and-route
    result for that lanes exists (build/gateware/accel-l<lanes>/build.json from `gateware.build
    --synth`).
It measures and prints; it asserts nothing (the tests do that).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateware import compiler, cycle_model  # noqa: E402
from gateware.build import projected  # noqa: E402

REPORT_POSITIONS = (16, 128, 255)


def _trace_ref(tr) -> np.ndarray:
    # (2 * n_layers + 1, dim): the embedding, then the residual after attention and after the FFN
    return np.stack([tr.embedding[0]] + [v[0] for L in tr.layers for v in (L["x_att"], L["x_ffn"])])


def bench_lanes(model, lanes: int, positions: int, jobs: int = 2) -> dict:
    from tqdm import tqdm

    from bakedllama import numerics as nx
    from bakedllama.golden import Golden, Trace
    from gateware.sim import VerilatorSim

    cfg = model.cfg
    plan = compiler.compile_model(model, lanes=lanes)
    formats = compiler.matrix_formats(cfg, plan.fmt.get("weights"))
    sim = VerilatorSim(plan, with_trace=True, jobs=jobs, log=lambda s: print("  " + s, flush=True))
    gold = Golden(model)
    st = gold.new_state(1)
    res = dict(lanes=lanes, geometry=str(plan.geo), gen_s=round(sim.gen_seconds, 1),
               build_s=round(sim.build_seconds, 1), cycles={}, token_mismatch=0, trace_mismatch=0,
               cycle_mismatch=0)
    tok = 1  # BOS of the tiny tokenizer's convention in tests: any id works for the figures
    with sim.run(timeout_cycles=10**7) as dut:
        dut.reset()
        c0, t0 = dut.cycles(), time.perf_counter()
        for pos in tqdm(range(positions), desc=f"lanes {lanes}", unit="tok", leave=False):
            tr = Trace()
            want = int(nx.argmax(gold.forward(st, [tok], tr).acc)[0])
            out, cyc = dut.token(tok)
            exp = cycle_model.expected_cycles(cfg, lanes, pos, formats=formats,
                                              vlanes=plan.geo.vlanes, kv_par=plan.geo.kv_par, dsp_pairs=plan.geo.dsp_pairs)
            res["cycle_mismatch"] += cyc != exp
            if out != want:
                res["token_mismatch"] += 1
                if res["token_mismatch"] == 1:
                    print(f"  first token mismatch at position {pos}: device {out}, golden {want}")
            if pos in REPORT_POSITIONS or out != want:
                ok = bool((dut.trace() == _trace_ref(tr)).all())
                res["trace_mismatch"] += not ok
            if pos in REPORT_POSITIONS:
                res["cycles"][pos] = dict(hw=cyc, model=exp)
            tok = want  # follow the golden model so one mismatch does not derail the rest
        wall = time.perf_counter() - t0
        res["sim_cycles"] = dut.cycles() - c0
    res["sim_wall_s"] = round(wall, 1)
    res["sim_cycles_per_s"] = round(res["sim_cycles"] / wall)
    return res


def synth_result(lanes: int) -> dict | None:
    p = REPO / "build" / "gateware" / f"accel-l{lanes}" / "build.json"
    if not p.exists():
        return None
    info = json.loads(p.read_text())
    return info.get("synth")


def main(argv=None) -> int:
    from bakedllama.model import load_baked

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lanes", type=int, nargs="+", default=sorted({16, 64, 128, compiler.DEFAULT_LANES}))
    ap.add_argument("--positions", type=int, default=256, help="decode steps from position 0")
    ap.add_argument("--model", help="baked model (.bkl); default: weights/tiny/model-q.bkl")
    ap.add_argument("--jobs", type=int, default=2, help="Verilator build jobs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--no-area", action="store_true", help="skip the per-unit synthesis")
    args = ap.parse_args(argv)
    model = load_baked(args.model) if args.model else load_baked()
    cfg = model.cfg
    positions = min(args.positions, cfg.seq_len)
    b = cycle_model.device_bounds(cfg, formats=compiler.matrix_formats(cfg, model.fmt.get("weights")))
    print(f"gateware: {cfg.dim}d x {cfg.n_layers} layers, {b['weights_per_token']:,} weights "
          f"({b['weight_bits']:,} bits); LFE5U-85F bounds: {b['bram_bound']:,.0f} cycles/token "
          f"(BRAM bits / 7,488 per cycle), {b['mult_bound']:,.0f} (weights / 156 MULT18X18D)")
    out = []
    for lanes in args.lanes:
        r = bench_lanes(model, lanes, positions, args.jobs)
        built = f"built in {r['build_s']:.0f} s" if r["build_s"] else "cached build"
        print(f"lanes {lanes:>3}: Verilator {built} (+{r['gen_s']:.0f} s Verilog); "
              f"{r['sim_cycles']:,} cycles in {r['sim_wall_s']:.0f} s = {r['sim_cycles_per_s']:,} cycles/s")
        for pos, c in r["cycles"].items():
            print(f"    pos {pos:>3}: hw {c['hw']:>6,} cycles, model {c['model']:>6,}, "
                  f"hw / mult bound {c['hw'] / b['mult_bound']:.2f}, hw / BRAM bound {c['hw'] / b['bram_bound']:.1f}")
        print(f"    {positions} positions: token mismatches {r['token_mismatch']}, trace mismatches "
              f"{r['trace_mismatch']} (of {len(r['cycles'])} checked), cycle-model mismatches {r['cycle_mismatch']}")
        s = synth_result(lanes)
        if s and s.get("fmax_mhz"):
            pr = projected(cfg, lanes, s["fmax_mhz"])
            r["projection"] = dict(fmax_mhz=s["fmax_mhz"], **pr)
            print(f"    nextpnr Fmax {s['fmax_mhz']:.2f} MHz -> {pr['tokens_per_s']:,.0f} tokens/s "
                  f"(16-token prompt, 128 generated; {pr['mean_cycles']:,.0f} cycles/pass); "
                  f"ratio to 17,000 tokens/s: {pr['tokens_per_s'] / 17000:.2f}")
        else:
            print(f"    no place-and-route result (python -m gateware.build --lanes {lanes} --synth)")
        out.append(r)
    if not args.no_area:
        from gateware import area

        plan = compiler.compile_model(model, lanes=compiler.DEFAULT_LANES)
        areas = area.unit_areas(plan, args.jobs, log=lambda s: print("  " + s, flush=True))
        print(f"area per unit at lanes {plan.geo.lanes} (yosys synth_ecp5, each unit alone; "
              f"python -m gateware.area):")
        for row in area.table(areas):
            print("    " + row)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
