"""make bench: performance figures with their bounds. Nothing here asserts; it measures and prints.

  1. golden model tokens/s (host numpy reference; no bound, for scale)
  2. 8B integer kernel: packed GEMV read rate vs this machine's measured read bandwidth (goal 1.5x)
  3. the Verilator SoC: a 16-token prompt + 128 generated, tokens/s of chip time
  4. gateware: cycles/token from the Verilator hardware counter vs the cycle model (when built)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench.py` puts scripts/, not the repo, on the path
    sys.path.insert(0, str(REPO))


def bench_golden() -> None:
    from bakedllama.golden import Golden, generate
    from bakedllama.model import load_baked

    m = load_baked()
    g = Golden(m)
    list(generate(g, [0, 42], 4))  # warm up
    t = time.perf_counter()
    n = len(list(generate(g, [0, 42], 64)))
    print(f"golden model: {n / (time.perf_counter() - t):.1f} tokens/s (numpy, 1 sequence, 64 tokens)")


def bench_kernel() -> None:
    from bakedllama import numerics as nx
    from bakedllama.llama8b.kernels import matvec_packed, pack, read_bandwidth

    rng = np.random.default_rng(0)
    rows, cols = 14336, 4096  # one Llama 3.1 8B FFN matrix
    for bits, group in ((8, cols), (4, 32)):
        q = rng.integers(-nx.qmax(bits), nx.qmax(bits) + 1, (rows, cols), dtype=np.int8)
        m = rng.integers(1, 1 << nx.M_BITS, (rows, cols // group)).astype(np.uint16)
        p = pack(q, m, 10, bits, group)
        a = rng.integers(-127, 128, cols)
        matvec_packed(p, a)  # compile
        best = min(_timed(lambda p=p, a=a: matvec_packed(p, a)) for _ in range(3))
        nbytes = p.nbytes()
        bw = read_bandwidth(np.zeros(256 << 20, np.uint8))
        print(f"8B kernel int{bits}: {nbytes / best / 1e9:.2f} GB/s of packed weights; machine read "
              f"bandwidth {bw / 1e9:.2f} GB/s; time / bound = {best / (nbytes / bw):.2f} (goal <= 1.5)")


def bench_soc(prompt_len: int = 16, gen: int = 128) -> None:
    """The issue's figure: a 16-token prompt then 128 generated on the Verilator SoC (firmware +
    accelerator); generated tokens per second of chip time (all passes' hardware counter at the
    system clock), next to the same cycles at the ULX3S build's clock and routed Fmax."""
    import json

    from bakedllama.device import generate_on_device
    from bakedllama.model import load_baked

    m = load_baked()
    ids = [(7 * i + 3) % m.cfg.vocab_size for i in range(prompt_len)]
    t = time.perf_counter()
    r = generate_on_device(None, m, ids, gen, log=lambda s: print("  " + s, flush=True))
    wall = time.perf_counter() - t
    n, cyc = len(r["tokens"]), r["chip_cycles"]
    passes = prompt_len + n - 1
    print(f"SoC (Verilator): {prompt_len}-token prompt + {n} generated, {passes} passes, {cyc:,} "
          f"hardware-counter cycles ({cyc / passes:,.0f} per pass); {wall:.0f} s of simulation")
    clocks = [("system clock", r["sys_clk_freq"])]
    rep = REPO / "build" / "soc" / "ulx3s" / "report.json"
    if rep.exists():
        fmax = json.loads(rep.read_text()).get("fmax_mhz")
        if fmax:
            clocks.append(("ULX3S routed Fmax", fmax * 1e6))
    for name, f in clocks:
        tps = n * f / cyc
        print(f"    at the {name} {f / 1e6:.2f} MHz: {tps:,.0f} generated tokens/s of chip time "
              f"(goal 17,000: ratio {tps / 17000:.2f})")


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    bench_golden()
    bench_kernel()
    bench_soc()
    from gateware import bench as gw_bench

    gw_bench.main([])


if __name__ == "__main__":
    main()
