"""`make build BOARD=sqrl_acorn`'s generation step: the PCIe target's gateware, Vivado scripts and
CSR map are generated without Vivado (and say that the bitstream cannot be built here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_make_build_runs_the_acorn_target():
    r = subprocess.run(["make", "-n", "build", "BOARD=sqrl_acorn", "ESTIMATE=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "-m soc.sqrl_acorn --build" in r.stdout and "--estimate" in r.stdout


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    if shutil.which("vivado"):
        pytest.skip("Vivado is installed: --build would run it")
    out = tmp_path_factory.mktemp("acorn")
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'host'}{os.pathsep}{ROOT}")
    r = subprocess.run([sys.executable, "-m", "soc.sqrl_acorn", "--build", "--output-dir", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_generates_gateware_and_vivado_scripts(generated):
    out, stdout = generated
    gw = out / "gateware"
    assert "Vivado is not installed" in stdout and "cannot be built here" in stdout
    v = (gw / "sqrl_acorn.v").read_text()
    assert "pcie_s7 pcie_s7(" in v  # LitePCIe's 7-series PHY around Vivado's pcie_7x IP
    tcl = (gw / "sqrl_acorn.tcl").read_text()
    assert "create_ip -vendor xilinx.com -name pcie_7x -module_name pcie_s7" in tcl
    assert "CONFIG.Maximum_Link_Width {X4}" in tcl and "xc7a200t-fbg484-3" in tcl
    xdc = (gw / "sqrl_acorn.xdc").read_text()
    assert "LOC J19 [get_ports {clk200_p}]" in xdc and "LOC J1 [get_ports {pcie_x4_rst_n}]" in xdc
    script = (gw / "build_sqrl_acorn.sh").read_text().strip()
    assert script.endswith("vivado -mode batch -source sqrl_acorn.tcl")
    assert any(p.suffix == ".init" for p in gw.iterdir())  # the weight ROMs' images
    rep = json.loads((out / "report.json").read_text())
    assert rep["bitstream"] is None and rep["geometry"]["lanes"] == 256
    assert rep["multipliers"] <= 740 and rep["cycles_per_token"] > 0


def test_csr_map_is_what_the_host_needs(generated):
    """The host's CSRMap loads the generated csr.csv and csr.json, and the bit fields it reads there
    are LlamaPort's own (soc/common.py)."""
    from bakedllama.device.csr import CSRMap
    from migen import Signal

    from soc.common import LlamaPort
    from soc.sqrl_acorn import BOARD_SQRL_ACORN

    out, _ = generated
    port = LlamaPort(Signal(32))
    for name in ("csr.csv", "csr.json"):
        m = CSRMap.load(out / name)
        assert m.base == 0 and m.constants["bakedllama_board"] == BOARD_SQRL_ACORN
        assert m.constants["config_clock_frequency"] == 100_000_000
        for csr in (port.status, port.ctrl):
            for f in csr.fields.fields:
                assert m.field(f"llama_port_{csr.name}", f.name) == (f.offset, f.size)
        assert m.words("llama_model_cfg") == 4
        assert "timer0_value" in m.regs
