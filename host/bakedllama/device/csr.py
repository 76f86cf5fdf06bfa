"""A device without firmware: the host drives the accelerator's CSRs and its token FIFO itself.

That is the PCIe board (soc/sqrl_acorn.py: LitePCIe's BAR0 -> Wishbone -> CSR bank, no CPU) and its
Verilator stand-in (soc/sim.py --variant bridge: the same CSRs behind UARTBone on the simulated
serial port). The host does what the firmware does on the ULX3S (firmware/app.c generate()): it
feeds the prompt token by token, then starts the accelerator's hardware loop (LlamaPort.loop) and
drains the FIFO; the same `generate()` interface as transport.Device, so the CLI and the server
use either.

    pcie://BDF[?csr=PATH]          LiteX's CommPCIe: mmap of BAR0 (/sys/bus/pci/devices/0000:BDF)
    litex://HOST:PORT[?csr=PATH]   LiteX's RemoteClient to a litex_server (--pcie --pcie-bar BDF,
                                   --uart --uart-port ..., ...)
    sim-bridge                     (CLI) the Verilator bridge variant, started here (CommUART over
                                   its TCP serial port)

PATH is the build's csr.csv or csr.json (default: build/soc/sqrl_acorn/csr.csv). Every address and
bit field comes from it (the SoC adds its fields as constants). Nothing the device returns is
trusted: tokens >= vocab_size, more tokens than asked, a FIFO that never drains, all-ones reads (a
PCIe device gone), a bus that does not answer: each is one DeviceError line, and every wait has a
deadline."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bakedllama.device import protocol as P
from bakedllama.device.transport import READ_SLICE, DeviceError, Generation, arrived

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CSR = REPO / "build" / "soc" / "sqrl_acorn" / "csr.csv"
SCHEMES = ("pcie", "litex")
BOARDS = {3: "SQRL Acorn CLE-215+ (PCIe)"}  # soc/sqrl_acorn.py BOARD_SQRL_ACORN
FIFO_DEPTH = 32  # LlamaPort's FIFO (soc/common.py): the most tokens that can wait in it
BATCH = 8  # tokens to let accumulate in the FIFO between drains (well below FIFO_DEPTH)
MAX_SLEEP = 0.25  # s, the longest wait between two polls of an empty FIFO
BUS_TIMEOUT = 2.0  # s, one bus transaction (UARTBone / Etherbone)
REQUIRED = ("llama_ctrl", "llama_temperature", "llama_seed", "llama_status", "llama_model_id",
            "llama_model_cfg", "llama_port_token_in", "llama_port_token_out",
            "llama_port_pass_cycles", "llama_port_loop", "llama_port_loop_left",
            "llama_port_status", "llama_port_ctrl")
CFG_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "seq_len",
              "lanes")


# CSR map ------------------------------------------------------------------------------------------
@dataclass
class CSRMap:
    """Registers {name: (addr, words)} and constants {name: value} of a LiteX build (csr.csv or
    csr.json); `base` is the CSR region's address (0 on a CPU-less SoC)."""

    regs: dict
    constants: dict
    base: int = 0
    data_width: int = 32
    source: str = "?"

    @classmethod
    def load(cls, path) -> "CSRMap":
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DeviceError(f"cannot read the CSR map {path}: {getattr(e, 'strerror', None) or e} "
                              f"(make build BOARD=sqrl_acorn writes it; or pass ?csr=PATH)") from None
        try:
            m = cls._json(text) if path.suffix == ".json" else cls._csv(text)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise DeviceError(f"{path} is not a LiteX csr.csv / csr.json ({e})") from None
        m.source = str(path)
        m.check()
        return m

    @classmethod
    def _csv(cls, text: str) -> "CSRMap":
        regs, consts, base, dw = {}, {}, 0, 32
        for row in csv.reader(line for line in text.splitlines() if line and line[0] != "#"):
            kind = row[0]
            if kind == "csr_register":
                regs[row[1]] = (int(row[2], 16), int(row[3]))
            elif kind == "constant":
                consts[row[1].lower()] = _const(row[2])
            elif kind == "memory_region" and row[1] == "csr":
                base = int(row[2], 16)
        dw = int(consts.get("config_csr_data_width", dw))
        return cls(regs, consts, base, dw)

    @classmethod
    def _json(cls, text: str) -> "CSRMap":
        d = json.loads(text)
        regs = {k: (int(v["addr"]), int(v["size"])) for k, v in d["csr_registers"].items()}
        consts = {k.lower(): _const(v) for k, v in d.get("constants", {}).items()}
        base = int(d.get("memories", {}).get("csr", {}).get("base", 0))
        return cls(regs, consts, base, int(consts.get("config_csr_data_width", 32)))

    def check(self) -> None:
        missing = [r for r in REQUIRED if r not in self.regs]
        if missing:
            raise DeviceError(f"{self.source} has no {', '.join(missing[:3])} register: not the CSR "
                              f"map of a bakedllama PCIe / bridge build")
        if self.data_width != 32:
            raise DeviceError(f"{self.source}: CSR data width {self.data_width}, this host needs 32")
        for reg, fld in (("llama_port_status", "in_busy"), ("llama_port_status", "out_valid"),
                         ("llama_port_status", "in_flight"), ("llama_port_ctrl", "pop"),
                         ("llama_ctrl", "reset")):
            self.field(reg, fld)

    def addr(self, name: str) -> int:
        try:
            return self.regs[name][0]
        except KeyError:
            raise DeviceError(f"{self.source} has no {name} register") from None

    def words(self, name: str) -> int:
        return self.regs[name][1]

    def field(self, reg: str, name: str) -> tuple[int, int]:
        """(offset, size) of a CSR's bit field, from the constants the SoC adds."""
        key = f"{reg}_{name}"
        off, size = self.constants.get(f"{key}_offset"), self.constants.get(f"{key}_size")
        if not isinstance(off, int) or not isinstance(size, int) or not 0 < size <= 64:
            raise DeviceError(f"{self.source} has no {key}_offset / _size constant (a build "
                              f"before the CSR host fields: rebuild)")
        return off, size


def _const(v):
    if isinstance(v, int) or v is None:
        return v
    try:
        return int(v)
    except ValueError:
        return None if v == "None" else v


# Buses: LiteX's own host tools, with every wait bounded ------------------------------------------
class Bus:
    """32-bit word reads / writes at CSR-region offsets, with counts (the figures per token)."""

    def __init__(self, url: str):
        self.url = url
        self.reads = self.writes = self.transactions = 0

    def read(self, addr: int, n: int = 1) -> list[int]:
        self.reads += n
        self.transactions += 1
        try:
            v = self._read(addr, n)
        except DeviceError:
            raise
        except Exception as e:  # socket / serial / mmap errors, a malformed Etherbone reply
            raise DeviceError(f"{self.url}: bus read failed ({_one_line(e)})") from None
        if not isinstance(v, list) or len(v) != n or not all(isinstance(x, int) and 0 <= x < 1 << 32
                                                             for x in v):
            raise DeviceError(f"{self.url}: bus read of {n} words returned {str(v)[:40]}")
        return v

    def write(self, addr: int, values) -> None:
        values = [int(v) & 0xFFFFFFFF for v in values]
        self.writes += len(values)
        self.transactions += 1
        try:
            self._write(addr, values)
        except DeviceError:
            raise
        except Exception as e:
            raise DeviceError(f"{self.url}: bus write failed ({_one_line(e)})") from None

    def close(self) -> None:
        pass


class PCIeBus(Bus):
    """LiteX's CommPCIe: BAR0 mmapped from sysfs (what `litex_server --pcie` does)."""

    def __init__(self, url: str, bdf: str, csr_base: int):
        super().__init__(url)
        from litex.tools.remote.comm_pcie import CommPCIe

        bar = f"/sys/bus/pci/devices/{bdf if bdf.count(':') == 2 else '0000:' + bdf}/resource0"
        if not os.path.exists(bar):
            raise DeviceError(f"cannot open {url}: no PCI device {bdf} ({bar} missing; `lspci -d "
                              f"10ee:` lists Xilinx boards)")
        try:
            self.comm = CommPCIe(bar)
            self.comm.open()
        except OSError as e:
            raise DeviceError(f"cannot open {url}: {e.strerror or e} (BAR0 needs root, or the "
                              f"litepcie driver / litex_server --pcie with litex://)") from None
        self.size = len(self.comm.mmap)
        self.offset = -csr_base  # LitePCIe maps BAR0 offset 0 to the CSR region's base

    def _check(self, addr: int, n: int) -> int:
        a = addr + self.offset
        if a < 0 or a + 4 * n > self.size:
            raise DeviceError(f"{self.url}: CSR 0x{addr:x} is outside BAR0 ({self.size} bytes): "
                              f"the CSR map is not this board's")
        return a

    def _read(self, addr, n):
        return self.comm.read(self._check(addr, n), n)

    def _write(self, addr, values):
        self.comm.write(self._check(addr, len(values)), values)

    def close(self):
        with contextlib.suppress(Exception):
            self.comm.mmap.close()
            os.close(self.comm.file)


class RemoteBus(Bus):
    """LiteX's RemoteClient (Etherbone over TCP) to a litex_server; a reply that does not come
    within BUS_TIMEOUT is an error (RemoteClient itself returns zeros)."""

    def __init__(self, url: str, host: str, port: int, csr_base: int, timeout: float = BUS_TIMEOUT):
        super().__init__(url)
        import socket

        from litex.tools.litex_client import RemoteClient

        class _Client(RemoteClient):
            def receive_packet(self, sock, addr_size):
                p = super().receive_packet(sock, addr_size)
                if p == 0:
                    raise DeviceError(f"{url}: no reply from the litex_server within {timeout:g} s")
                return p

        # Not RemoteClient's constructor: it would read a csr.csv from the working directory.
        self.client = c = _Client.__new__(_Client)
        c.host, c.port, c.debug, c.binded, c.base_address = host, port, False, False, 0
        c.csr_data_width, c.csr_bus_address_width = 32, 32
        try:
            c.socket = socket.create_connection((host, port), timeout=timeout)
            c.socket.settimeout(timeout)
            info = c.socket.recv(128)
        except OSError as e:
            raise DeviceError(f"cannot open {url}: {e.strerror or e} (is litex_server running?)") from None
        c.binded = True
        # With CommPCIe behind the server, it adds nothing: addresses are BAR0 offsets.
        c.base_address = -csr_base if b"CommPCIe" in info else 0

    def _read(self, addr, n):
        return list(self.client.read(addr, n))

    def _write(self, addr, values):
        self.client.write(addr, values)

    def close(self):
        with contextlib.suppress(Exception):
            self.client.close()


class UARTBus(Bus):
    """LiteX's CommUART (the UARTBone protocol) on a pyserial URL, e.g. the Verilator bridge's
    socket://127.0.0.1:PORT; every read has a deadline (CommUART itself waits forever)."""

    def __init__(self, url: str, timeout: float = BUS_TIMEOUT, baudrate: int = P.DEFAULT_BAUDRATE):
        super().__init__(url)
        from litex.tools.remote.comm_uart import CommUART

        outer = self

        class _Comm(CommUART):
            def _read(self, length):
                r, deadline = b"", time.monotonic() + outer.timeout
                while len(r) < length:
                    if time.monotonic() > deadline:
                        raise DeviceError(f"{url}: {len(r)} of {length} bytes of a UARTBone reply "
                                          f"within {outer.timeout:g} s")
                    r += self.port.read(length - len(r))
                return r

        self.timeout = timeout
        try:
            self.comm = _Comm(url, baudrate)
        except Exception as e:  # SerialException, ValueError, OSError
            raise DeviceError(f"cannot open {url}: {_one_line(e)}") from None
        self.comm.port.timeout = READ_SLICE
        sock = getattr(self.comm.port, "_socket", None)
        if sock is not None:  # small commands must not wait (Nagle)
            import socket

            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _read(self, addr, n):
        return self.comm.read(addr, n)

    def _write(self, addr, values):
        self.comm.write(addr, values)

    def close(self):
        with contextlib.suppress(Exception):
            self.comm.close()


def _one_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# Info / generation --------------------------------------------------------------------------------
class CSRInfo(P.Info):
    @property
    def board_name(self) -> str:
        return BOARDS.get(self.board) or super().board_name


@dataclass
class CSRGeneration(Generation):
    """Generation with the bus traffic of the generated tokens' loop (reads and writes are 32-bit
    words; polls that found the FIFO empty)."""

    reads: int = 0
    writes: int = 0
    empty_polls: int = 0
    fields: dict = field(default_factory=dict)


class CSRDevice:
    """The accelerator behind a CSR bus (see the module docstring). Same interface as
    transport.Device for info() and generate()."""

    def __init__(self, bus: Bus, csrmap: CSRMap, url: str, *, timeout: float = 2.0,
                 step_timeout: float = 3.0, retries: int = 0, on_close=None):
        self.bus, self.map, self.url = bus, csrmap, url
        self.timeout, self.step_timeout, self.retries = timeout, step_timeout, retries
        self.vocab_size: int | None = None
        self._info: CSRInfo | None = None
        self._on_close = on_close
        m = csrmap
        self._out_valid = m.field("llama_port_status", "out_valid")
        self._in_flight = m.field("llama_port_status", "in_flight")
        self._pop = m.field("llama_port_ctrl", "pop")
        self._reset = m.field("llama_ctrl", "reset")
        defined = [m.field("llama_port_status", f) for f in ("in_busy", "out_valid", "in_flight")]
        self._status_reserved = 0xFFFFFFFF & ~sum(((1 << s) - 1) << o for o, s in defined)

    # Link -----------------------------------------------------------------------------------------
    def close(self) -> None:
        self.bus.close()
        if self._on_close is not None:
            cb, self._on_close = self._on_close, None
            cb()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _r(self, name: str) -> int:
        return self.bus.read(self.map.addr(name))[0]

    def _w(self, name: str, value: int) -> None:
        self.bus.write(self.map.addr(name), [value])

    def _bit(self, value: int, f) -> int:
        return (value >> f[0]) & ((1 << f[1]) - 1)

    def _port_status(self) -> int:
        s = self._r("llama_port_status")
        if s & self._status_reserved:
            raise DeviceError(f"{self.url}: FIFO status 0x{s:08x} has undefined bits set (a PCIe "
                              f"device that is gone reads all ones; or the CSR map is not this build's)")
        return s

    # Requests -------------------------------------------------------------------------------------
    def info(self) -> CSRInfo:
        m = self.map
        n = m.words("llama_model_cfg")
        words = self.bus.read(m.addr("llama_model_cfg"), n)  # most significant word first
        v = 0
        for w in words:
            v = (v << 32) | w
        cfg = {}
        for name in CFG_FIELDS:
            off, size = m.field("llama_model_cfg", name)
            cfg[name] = (v >> off) & ((1 << size) - 1)
        model_id = self._r("llama_model_id")
        self._port_status()
        clk = m.constants.get("config_clock_frequency")
        board = m.constants.get("bakedllama_board")
        if not isinstance(clk, int) or clk <= 0 or not isinstance(board, int):
            raise DeviceError(f"{m.source}: no config_clock_frequency / bakedllama_board constant")
        if not all(0 < cfg[k] for k in CFG_FIELDS):
            raise DeviceError(f"{self.url}: model config {tuple(cfg.values())} has zeros "
                              f"(not a bakedllama accelerator, or not answering)")
        info = CSRInfo(protocol=P.VERSION, firmware="none (host CSR loop)",
                       testing_core="bakedllama_testing_core" in m.constants, model_id=model_id,
                       sys_clk_freq=clk, max_payload=0, board=board, **cfg)
        self.vocab_size, self._info = info.vocab_size, info
        return info

    def _timer_start(self) -> bool:
        if "timer0_value" not in self.map.regs:
            return False
        self._w("timer0_en", 0)
        self._w("timer0_reload", 0xFFFFFFFF)
        self._w("timer0_load", 0xFFFFFFFF)
        self._w("timer0_en", 1)
        return True

    def _timer_cycles(self) -> int:
        self._w("timer0_update_value", 1)
        return 0xFFFFFFFF - self._r("timer0_value")  # it counts down from load

    def _drain(self) -> int:
        """Pop what the FIFO holds (bounded by its depth); returns the count."""
        for n in range(FIFO_DEPTH + 2):
            if not self._bit(self._port_status(), self._out_valid):
                return n
            self._w("llama_port_ctrl", 1 << self._pop[0])
        raise DeviceError(f"{self.url}: the token FIFO does not drain ({FIFO_DEPTH + 2} pops)")

    def _stop_loop(self) -> None:
        """Loop off, wait for the pass in flight (bounded), empty the FIFO."""
        self._w("llama_port_loop", 0)
        deadline = time.monotonic() + self.step_timeout
        while self._bit(self._port_status(), self._in_flight):
            if time.monotonic() > deadline:
                raise DeviceError(f"{self.url}: the accelerator is still busy {self.step_timeout:g} s "
                                  f"after the loop was stopped")
            time.sleep(0.001)
        self._drain()

    def reset(self, seed: int | None = None) -> None:
        """Position 0, the sampler seeded (firmware's accel_reset)."""
        self._stop_loop()
        self._w("llama_temperature", 0)
        self._w("llama_seed", (seed or 0) & 0xFFFFFFFF)
        self._w("llama_ctrl", 1 << self._reset[0])
        self._drain()

    def generate(self, prompt_ids, max_tokens: int, temperature: float = 0.0, seed: int = 0,
                 inv_temperature_q8: int | None = None, vocab_size: int | None = None) -> CSRGeneration:
        from bakedllama.numerics import temperature_q8

        if self._info is None:
            self.info()
        info = self._info
        ids = [int(t) for t in prompt_ids]
        if inv_temperature_q8 is None:
            inv_temperature_q8 = temperature_q8(temperature) if temperature > 0 else 0
        if not ids or max_tokens < 1 or len(ids) + max_tokens > info.seq_len:
            raise DeviceError(f"{self.url}: {len(ids)} prompt tokens + {max_tokens} exceed the "
                              f"context of {info.seq_len} (or either is empty)")
        if max_tokens > 0xFFFF:  # LlamaPort.loop is 16 bits
            raise DeviceError(f"{self.url}: at most 65535 tokens per generation")
        g = CSRGeneration(len(ids), max_tokens)
        g.vocab_size = min(vocab_size or info.vocab_size, info.vocab_size)
        bad = [t for t in ids if not 0 <= t < g.vocab_size]
        if bad:
            raise DeviceError(f"prompt token {bad[0]} is outside the vocabulary of {g.vocab_size}")
        g._it = self._generate(g, ids, int(inv_temperature_q8) & 0xFFFF, int(seed) & 0xFFFFFFFF)
        return g

    def _wait_token(self, g: CSRGeneration, deadline: float, what: str, est: float, batch: int = 1):
        """(token, cycles) of the next FIFO entry, popped; None if cancelled. An empty FIFO is
        polled again after `batch` passes (est: the seconds per pass seen so far; the generated
        tokens let up to BATCH accumulate, so that most polls find tokens), then after each pass."""
        wait = est * (batch - 0.5) if est else 0.0005
        while True:
            s = self._port_status()
            if self._bit(s, self._out_valid):
                tok, cyc = self.bus.read(self.map.addr("llama_port_token_out"), 2)
                self._w("llama_port_ctrl", 1 << self._pop[0])
                if not 0 <= tok < g.vocab_size:
                    raise DeviceError(f"{self.url}: the accelerator produced token {tok}, outside "
                                      f"the vocabulary of {g.vocab_size}")
                return tok, cyc
            g.empty_polls += 1
            now = time.monotonic()
            if now > deadline:
                raise DeviceError(f"{self.url}: {what}: nothing within {self.step_timeout:g} s "
                                  f"({len(g.tokens)} of {g.max_tokens} tokens arrived)")
            end = min(now + min(wait, MAX_SLEEP), deadline)
            while time.monotonic() < end:  # in slices, so that cancel() acts at once
                if g._cancel:
                    return None
                time.sleep(min(READ_SLICE, max(0.0, end - time.monotonic())))
            if g._cancel:
                return None
            wait = est if est else min(wait * 2, MAX_SLEEP)

    def _generate(self, g: CSRGeneration, ids, inv_t: int, seed: int):
        finished = running = False
        prefill = decode = 0
        g.t_start = time.monotonic()
        try:
            self.reset(seed)
            timer = self._timer_start()
            est = 0.0
            for pos in range(len(ids) - 1):  # greedy: the sampler's generator does not advance
                if g._cancel:
                    return
                t = time.monotonic()
                self._w("llama_port_token_in", ids[pos])
                r = self._wait_token(g, t + self.step_timeout, f"prompt pass {pos}", est)
                if r is None:
                    return
                prefill += r[1]
                est = time.monotonic() - t
            self._w("llama_temperature", inv_t)
            self._w("llama_port_loop", g.max_tokens - 1)
            running = True
            r0, w0, g.empty_polls = self.bus.reads, self.bus.writes, 0  # the token loop's traffic
            self._w("llama_port_token_in", ids[-1])
            t_last = t_first = time.monotonic()
            while len(g.tokens) < g.max_tokens:
                if g._cancel:  # cancel() from another thread, while tokens keep coming
                    return
                r = self._wait_token(g, t_last + self.step_timeout + MAX_SLEEP,
                                     f"token {len(g.tokens)}", est,
                                     min(BATCH, g.max_tokens - len(g.tokens)))
                if r is None:
                    return
                tok, cyc = r
                if g.tokens:
                    decode += cyc
                else:
                    prefill += cyc  # the first token's pass is the last prompt pass
                g.tokens.append(tok)
                g.token_cycles.append(cyc)
                t_last = time.monotonic()
                if g.t_first is None:
                    g.t_first = t_last
                est = (t_last - t_first) / max(1, len(g.tokens) - 1) if len(g.tokens) > 1 else est
                yield tok
            g.reads, g.writes = self.bus.reads - r0, self.bus.writes - w0
            # The loop must be spent and nothing more may come: a device that keeps producing is
            # refused, not read on.
            s = self._port_status()
            left = self._r("llama_port_loop_left")
            if left or self._bit(s, self._out_valid) or self._bit(s, self._in_flight):
                raise DeviceError(f"{self.url}: produced more tokens than the {g.max_tokens} asked "
                                  f"(loop_left {left}, FIFO status 0x{s:x})")
            running = False
            wall = self._timer_cycles() if timer else 0
            g.done = P.Done(len(ids), len(g.tokens), P.DONE_COMPLETE, prefill, decode, wall)
            g.t_end = time.monotonic()
            finished = True
        except DeviceError as e:
            raise arrived(e, g) from None
        finally:
            if not finished:
                g.aborted = running
                with contextlib.suppress(DeviceError):
                    self._stop_loop()


# URLs ---------------------------------------------------------------------------------------------
def is_csr_url(url: str | None) -> bool:
    return bool(url) and (url == "sim-bridge" or urlsplit(url).scheme in SCHEMES)


def open_csr_device(url: str, **kw) -> CSRDevice:
    """pcie://BDF[?csr=PATH] or litex://HOST:PORT[?csr=PATH] -> CSRDevice."""
    try:
        u = urlsplit(url)
        q = parse_qs(u.query, strict_parsing=bool(u.query))
    except ValueError as e:
        raise DeviceError(f"cannot open {url}: {e}") from None
    unknown = set(q) - {"csr"}
    if unknown:
        raise DeviceError(f"cannot open {url}: unknown option {sorted(unknown)[0]!r} (only ?csr=PATH)")
    if u.scheme == "pcie":
        bdf = u.netloc
        import re

        if not re.fullmatch(r"([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]", bdf or ""):
            raise DeviceError(f"cannot open {url}: a PCIe URL needs a bus:device.function, e.g. "
                              f"pcie://01:00.0 (lspci -d 10ee: lists it)")
        csrmap = _load_map(q)
        bus = PCIeBus(url, bdf, csrmap.base)
    elif u.scheme == "litex":
        try:
            port = u.port
        except ValueError:
            port = None
        if not u.hostname or port is None or not 0 < port < 65536:
            raise DeviceError(f"cannot open {url}: a litex URL needs a host and a port 1-65535 "
                              f"(litex://127.0.0.1:1234, litex_server's default)")
        csrmap = _load_map(q)
        bus = RemoteBus(url, u.hostname, port, csrmap.base)
    else:
        raise DeviceError(f"cannot open {url}: not a pcie:// or litex:// URL")
    try:
        return CSRDevice(bus, csrmap, url, **kw)
    except BaseException:
        bus.close()
        raise


def _load_map(query: dict) -> CSRMap:
    return CSRMap.load(query["csr"][-1] if "csr" in query else DEFAULT_CSR)


def open_any(url: str, **kw):
    """A CSR device for pcie:// and litex:// URLs, else transport.open_device's serial device."""
    if url == "sim-bridge":
        raise DeviceError("sim-bridge starts its own simulator: use `bakedllama generate/info "
                          "--device sim-bridge` (or start_bridge_sim())")
    if is_csr_url(url):
        return open_csr_device(url, **kw)
    from bakedllama.device.transport import open_device

    return open_device(url, **kw)


# The Verilator bridge variant ---------------------------------------------------------------------
BRIDGE_DIR = "sim-bridge"


def bridge_key(model_path) -> str:
    from bakedllama.device.sim import build_key

    return hashlib.sha256(f"bridge\n{build_key('real', model_path)}".encode()).hexdigest()[:16]


def build_bridge_sim(model_path=None, *, force: bool = False, log=None, timeout: float = 3600.0) -> Path:
    """Build (or reuse) soc/sim.py --variant bridge under build/soc/sim-bridge/ (its own cache key
    and lock: the default simulator's build is not touched)."""
    from bakedllama.device.sim import build_soc_sim

    return build_soc_sim(BRIDGE_DIR, ["--variant", "bridge"], bridge_key,
                         "the simulated PCIe bridge SoC", model_path, force=force, log=log,
                         timeout=timeout)


@contextlib.contextmanager
def start_bridge_sim(model_path=None, *, log=None, boot_timeout: float = 120.0):
    """Build if needed, start the bridge simulator, yield a CSRDevice over its UARTBone (the
    simulation's long timeouts), stop it at the end."""
    from bakedllama.device.sim import SIM_STEP_TIMEOUT, SIM_TIMEOUT, launch

    out = build_bridge_sim(model_path, log=log)
    h = launch(out, boot_timeout=boot_timeout, wait_ready=False)
    try:
        csrmap = CSRMap.load(out / "csr.csv")
        dev = None
        deadline = time.monotonic() + boot_timeout
        while dev is None:  # no firmware to boot: up once the UARTBone answers
            try:
                bus = UARTBus(h.url, timeout=SIM_TIMEOUT)
                d = CSRDevice(bus, csrmap, h.url, timeout=SIM_TIMEOUT, step_timeout=SIM_STEP_TIMEOUT)
                try:
                    d.info()
                except BaseException:
                    d.close()
                    raise
                dev = d
            except DeviceError as e:
                if not h.alive():
                    raise DeviceError(f"the simulator exited ({h.proc.returncode}): "
                                      f"{h.log_tail(1)}") from None
                if time.monotonic() > deadline:
                    raise DeviceError(f"the bridge simulator did not answer within "
                                      f"{boot_timeout:.0f} s ({e})") from None
                time.sleep(0.2)
        dev.sim = h
        with dev:
            yield dev
    finally:
        h.stop()
