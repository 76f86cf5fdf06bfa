#
# bakedllama: ULX3S platform (pins used by the SoC only).
#
# Derived from LiteX-Boards' radiona_ulx3s platform (BSD-2-Clause, Copyright (c) 2018-2019
# Florent Kermarrec): clock, reset button, LEDs, FTDI UART, the ESP32's GPIO0 (held high so the
# ESP32 does not reset the FPGA).
#

from litex.build.generic_platform import *
from litex.build.lattice import LatticeECP5Platform

# IOs ----------------------------------------------------------------------------------------------

_io_common = [
    # Clk / Rst.
    ("clk25", 0, Pins("G2"), IOStandard("LVCMOS33")),
    ("rst",   0, Pins("R1"), IOStandard("LVCMOS33")),  # FIRE1 button, active high

    # Leds.
    ("user_led", 0, Pins("B2"), IOStandard("LVCMOS33")),
    ("user_led", 1, Pins("C2"), IOStandard("LVCMOS33")),
    ("user_led", 2, Pins("C1"), IOStandard("LVCMOS33")),
    ("user_led", 3, Pins("D2"), IOStandard("LVCMOS33")),
    ("user_led", 4, Pins("D1"), IOStandard("LVCMOS33")),
    ("user_led", 5, Pins("E2"), IOStandard("LVCMOS33")),
    ("user_led", 6, Pins("E1"), IOStandard("LVCMOS33")),
    ("user_led", 7, Pins("H3"), IOStandard("LVCMOS33")),

    # Serial (FT231X).
    ("serial", 0,
        Subsignal("tx", Pins("L4"), IOStandard("LVCMOS33")),
        Subsignal("rx", Pins("M1"), IOStandard("LVCMOS33")),
    ),
]

_io_1_7 = [("wifi_gpio0", 0, Pins("L2"), IOStandard("LVCMOS33"))]
_io_2_0 = [("wifi_gpio0", 0, Pins("F1"), IOStandard("LVCMOS33"))]

# Platform -----------------------------------------------------------------------------------------

class Platform(LatticeECP5Platform):
    default_clk_name   = "clk25"
    default_clk_period = 1e9/25e6

    def __init__(self, device="LFE5U-85F", revision="2.0", toolchain="trellis", **kwargs):
        if device not in ["LFE5U-12F", "LFE5U-25F", "LFE5U-45F", "LFE5U-85F"]:
            raise ValueError(f"unknown ULX3S device {device}")
        if revision not in ["1.7", "2.0"]:
            raise ValueError(f"unknown ULX3S revision {revision}")
        _io = _io_common + {"1.7": _io_1_7, "2.0": _io_2_0}[revision]
        LatticeECP5Platform.__init__(self, device + "-6BG381C", _io, toolchain=toolchain, **kwargs)

    def do_finalize(self, fragment):
        LatticeECP5Platform.do_finalize(self, fragment)
        self.add_period_constraint(self.lookup_request("clk25", loose=True), 1e9/25e6)
