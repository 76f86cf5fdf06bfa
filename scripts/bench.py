"""make bench: performance figures with their bounds. Nothing here asserts; it measures and prints.

  1. golden model tokens/s (host numpy reference; no bound, for scale)
  2. 8B integer kernel: packed GEMV read rate vs this machine's measured read bandwidth (goal 1.5x)
  3. gateware: cycles/token from the Verilator hardware counter vs the cycle model (when built)
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


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def main() -> None:
    bench_golden()
    bench_kernel()
    from gateware import bench as gw_bench

    gw_bench.main([])


if __name__ == "__main__":
    main()
