"""The PCIe target's host path end to end in Verilator: soc/sim.py --variant bridge (the Acorn's
CPU-less SoC and accelerator geometry, UARTBone in place of LitePCIe's BAR0 bridge) driven by
host/bakedllama/device/csr.py over LiteX's CommUART; tokens identical to the golden model, the
hardware counter equal to the cycle model at every pass."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

# slow tier: its own Verilator build (~4 min of CPU); .ci/run runs it beside the bitstream build
pytestmark = [pytest.mark.sim, pytest.mark.slow]


@pytest.fixture(scope="module")
def bridge_build():
    from bakedllama.device.csr import build_bridge_sim

    return build_bridge_sim(log=print)


@functools.lru_cache(maxsize=None)
def _cycle_args():
    from bakedllama.model import load_baked

    from gateware import compiler
    from soc.sqrl_acorn import ACORN_GEOMETRY

    m = load_baked()
    g = ACORN_GEOMETRY
    return m.cfg, g["lanes"], dict(formats=compiler.matrix_formats(m.cfg, m.fmt["weights"]),
                                   vlanes=g["vlanes"], kv_par=g["kv_par"], dsp_pairs=g["dsp_pairs"])


def expected(pos: int) -> int:
    """gateware/cycle_model.py's cycles of the pass at `pos` for the Acorn geometry."""
    from gateware import cycle_model

    cfg, lanes, kw = _cycle_args()
    return cycle_model.expected_cycles(cfg, lanes, pos, **kw)


def test_bridge_generates_golden_tokens(bridge_build, golden_ref):
    from bakedllama.device.csr import start_bridge_sim
    from bakedllama.device.transport import check_model
    from bakedllama.model import load_baked

    model = load_baked()
    ids = golden_ref.tok.encode("It was", bos=True)
    n = 128
    want = golden_ref(ids, n)
    with start_bridge_sim() as dev:
        info = dev.info()
        check_model(info, model, dev.url)
        assert info.lanes == 256 and info.board == 1
        g = dev.generate(ids, n)
        got = list(g)
        # a second, sampled generation on the same device (reset, seeded PRNG in hardware)
        g2 = dev.generate(ids, 12, temperature=0.8, seed=11)
        got2 = list(g2)
    log = getattr(dev.sim, "log_tail", lambda: "")()
    assert got == want, log
    assert got2 == golden_ref(ids, 12, temperature=0.8, seed=11), log
    d = g.done
    assert d.generated == n and d.prompt_tokens == len(ids)
    # the accelerator's counter at every pass = the cycle model of the Acorn geometry
    first = len(ids) - 1  # position of the last prompt pass, which produced the first token
    assert g.token_cycles == [expected(first + i) for i in range(n)]
    assert d.prefill_cycles == sum(expected(p) for p in range(len(ids)))
    assert d.wall_cycles >= d.prefill_cycles + d.decode_cycles
    print(f"\nbridge: {n} tokens, {g.reads / n:.2f} reads + {g.writes / n:.2f} writes per token, "
          f"{g.empty_polls} empty polls; accelerator {d.cycles_per_token:.0f} cycles/pass, "
          f"wall {d.wall_cycles_per_token:.0f} cycles/pass; {g.tokens_per_s:.1f} tokens/s simulated")


def test_cli_sim_bridge(bridge_build, golden_ref):
    r = subprocess.run([sys.executable, "-m", "bakedllama.cli", "generate", "It was",
                        "--device", "sim-bridge", "--max-tokens", "16", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["tokens"] == golden_ref(golden_ref.tok.encode("It was", bos=True), 16)
    assert out["cycles_per_token"] and out["wall_cycles_per_token"] >= out["cycles_per_token"]
    assert out["bus"]["reads_per_token"] >= 3
