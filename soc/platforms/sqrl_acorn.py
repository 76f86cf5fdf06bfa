#
# bakedllama: SQRL Acorn CLE-215+ platform (the pins the SoC uses).
#
# From LiteX-Boards' litex_boards/platforms/sqrl_acorn.py (BSD-2-Clause, Florent Kermarrec),
# trimmed to the clock, the LEDs, the PCIe x4 link of the M.2 edge and its CLKREQ#, with the
# same bitstream / SPI flash settings. The Acorn CLE-215(+) is the NiteFury's twin: an Artix-7
# XC7A200T on an M.2 2280 card, PCIe Gen2 x4 to the host.
#

from litex.build.generic_platform import Pins, Subsignal, IOStandard, Misc
from litex.build.xilinx import Xilinx7SeriesPlatform

# IOs ----------------------------------------------------------------------------------------------

_io = [
    # Clk: 200 MHz oscillator.
    ("clk200", 0,
        Subsignal("p", Pins("J19"), IOStandard("DIFF_SSTL15")),
        Subsignal("n", Pins("H19"), IOStandard("DIFF_SSTL15"))
    ),

    # Leds.
    ("user_led", 0, Pins("G3"), IOStandard("LVCMOS33")),
    ("user_led", 1, Pins("H3"), IOStandard("LVCMOS33")),
    ("user_led", 2, Pins("G4"), IOStandard("LVCMOS33")),
    ("user_led", 3, Pins("H4"), IOStandard("LVCMOS33")),

    # PCIe (M.2 edge, x4; the reference clock comes from the host).
    ("pcie_clkreq_n", 0, Pins("G1"), IOStandard("LVCMOS33")),
    ("pcie_x4", 0,
        Subsignal("rst_n", Pins("J1"), IOStandard("LVCMOS33"), Misc("PULLUP=TRUE")),
        Subsignal("clk_p", Pins("F6")),
        Subsignal("clk_n", Pins("E6")),
        Subsignal("rx_p",  Pins("B10 B8 D11 D9")),
        Subsignal("rx_n",  Pins("A10 A8 C11 C9")),
        Subsignal("tx_p",  Pins("B6  B4  D5 D7")),
        Subsignal("tx_n",  Pins("A6  A4  C5 C7")),
    ),
]

# Platform -----------------------------------------------------------------------------------------

DEVICES = {
    "cle-101":  "xc7a100t-fgg484-2",
    "cle-215":  "xc7a200t-fbg484-2",
    "cle-215+": "xc7a200t-fbg484-3",
}

class Platform(Xilinx7SeriesPlatform):
    default_clk_name   = "clk200"
    default_clk_period = 1e9/200e6

    def __init__(self, variant="cle-215+", toolchain="vivado"):
        if variant not in DEVICES:
            raise ValueError(f"unknown Acorn variant {variant!r} (one of {', '.join(DEVICES)})")
        self.variant = variant
        Xilinx7SeriesPlatform.__init__(self, DEVICES[variant], _io, toolchain=toolchain)
        self.add_platform_command("set_property INTERNAL_VREF 0.750 [get_iobanks 34]")
        self.toolchain.bitstream_commands = [
            "set_property BITSTREAM.CONFIG.SPI_BUSWIDTH 4 [current_design]",
            "set_property BITSTREAM.CONFIG.CONFIGRATE 16 [current_design]",
            "set_property BITSTREAM.GENERAL.COMPRESS TRUE [current_design]",
            "set_property CFGBVS VCCO [current_design]",
            "set_property CONFIG_VOLTAGE 3.3 [current_design]",
        ]
        self.toolchain.additional_commands = [
            # SPI flash image (non-multiboot).
            "write_cfgmem -force -format bin -interface spix4 -size 16 -loadbit \"up 0x0 {build_name}.bit\" -file {build_name}.bin",
        ]

    def do_finalize(self, fragment):
        Xilinx7SeriesPlatform.do_finalize(self, fragment)
        self.add_period_constraint(self.lookup_request("clk200", loose=True), 1e9/200e6)
