"""`make build` for the ULX3S: the bitstream exists, the report parses and timing is met.

Runs the same command as `make build` (python -m soc.ulx3s --build) into build/soc/ulx3s (yowasp
tools cannot see /tmp), so a later `make load` can use its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soc.toolchain import RESOURCES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "soc" / "ulx3s"
# LFE5U-85F as nextpnr counts it.
LIMITS = {"LUT4": 83_640, "FF": 83_640, "DP16KD": 208, "MULT18X18D": 156}


def test_make_build_ulx3s():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    log = ROOT / "build" / "soc" / "ulx3s-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "soc.ulx3s", "--build", "--output-dir", str(OUT)],
                           cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=3 * 3600)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    assert r.returncode == 0, tail
    rep = json.loads((OUT / "report.json").read_text())
    bit = ROOT / rep["bitstream"]
    assert bit.exists() and bit.stat().st_size > 100_000, bit
    assert not rep["testing_core"], "the product target must carry the real accelerator"
    for name in RESOURCES:
        if name in LIMITS:
            used, avail = rep["resources"][name]
            assert avail == LIMITS[name] and 0 <= used <= avail, (name, used, avail)
    assert rep["resources"]["DP16KD"][0] > 0
    assert rep["fmax_mhz"] >= rep["sys_clk_mhz"], f"timing not met: {rep['fmax_mhz']} MHz"
    assert rep["link_tokens_per_s"] > 0
    print("\n" + tail)
