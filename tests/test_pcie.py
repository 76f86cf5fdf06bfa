"""The CSR host path (host/bakedllama/device/csr.py) against a fake CSR space: a behavioural model
of the accelerator + LlamaPort (soc/common.py) whose tokens come from the golden model, behind the
same Bus interface as CommPCIe / RemoteClient / CommUART; and misbehaving versions of it."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest
from bakedllama.device import protocol as P
from bakedllama.device.csr import CSRDevice, CSRMap, RemoteBus, UARTBus, is_csr_url, open_csr_device
from bakedllama.device.transport import DeviceError

# The map a bridge / PCIe build writes (addresses: any distinct words; field constants: as the SoC
# adds them from the CSRFields; tests/test_pcie_build.py checks a real csr.csv against LlamaPort).
REGS = ["llama_ctrl", "llama_rewind_pos", "llama_temperature", "llama_seed", "llama_status",
        "llama_cycles", "llama_model_id", "llama_model_cfg", "llama_port_token_in",
        "llama_port_token_out", "llama_port_pass_cycles", "llama_port_loop", "llama_port_loop_left",
        "llama_port_status", "llama_port_ctrl", "timer0_load", "timer0_reload", "timer0_en",
        "timer0_update_value", "timer0_value"]
CFG = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "seq_len", "lanes")


def fake_map(board=1, clk=100_000_000, base=0) -> CSRMap:
    regs, a = {}, base + 0x1000
    for r in REGS:
        n = 4 if r == "llama_model_cfg" else 1
        regs[r] = (a, n)
        a += 4 * n
    consts = {"config_clock_frequency": clk, "bakedllama_board": board, "config_csr_data_width": 32}
    fields = {"llama_ctrl": [("reset", 0, 1), ("rewind", 1, 1)],
              "llama_port_status": [("in_busy", 0, 1), ("out_valid", 1, 1), ("in_flight", 2, 1)],
              "llama_port_ctrl": [("pop", 0, 1)],
              "llama_model_cfg": [(n, 16 * i, 16) for i, n in enumerate(CFG)]}
    for reg, fs in fields.items():
        for name, off, size in fs:
            consts[f"{reg}_{name}_offset"], consts[f"{reg}_{name}_size"] = off, size
    m = CSRMap(regs, consts, base, 32, "fake")
    m.check()
    return m


class FakeCSRSpace:
    """The accelerator and its port as the host sees them over the bus. One forward pass completes
    per bus transaction (so the host sees passes in flight and an empty FIFO); the FIFO holds 32.

    mode: None | bad_token (the 4th token is 60000) | extra (one token more than the loop) |
    stall (nothing after 3 tokens) | gone (all-ones reads after 3 tokens, a PCIe device removed)."""

    def __init__(self, model, csrmap, mode=None, lanes=64):
        from bakedllama.golden import Golden

        self.model, self.map, self.mode, self.lanes = model, csrmap, mode, lanes
        self.g = Golden(model)
        self.by_addr = {a: name for name, (a, _) in csrmap.regs.items()}
        self.store = {n: 0 for n in csrmap.regs}
        self.fifo: list[tuple[int, int]] = []
        self.pending = None  # token offered, not accepted
        self.flight = None  # accepted token whose pass runs
        self.hold = None  # a finished pass's output waiting for FIFO room
        self.left = 0
        self.gen = -1  # tokens pushed since the loop was started (-1: no loop yet)
        self.asked = 0
        self.time = 0
        self.loop_writes = []
        self._reset()

    def _reset(self):
        from bakedllama import numerics as nx

        self.state = self.g.new_state(1)
        self.rng = nx.XorShift32(self.store["llama_seed"])
        self.pos = 0

    def _pass(self, token, inv_t):
        from bakedllama import numerics as nx

        logits = self.g.forward(self.state, [token])
        self.pos += 1
        if inv_t:
            return nx.sample(logits.q8()[0], inv_t, self.rng, 0)
        return int(nx.argmax(logits.acc)[0])

    def tick(self):
        self.time += 1000
        if self.mode == "stall" and self.gen >= 3:
            return
        if self.hold is None and self.flight is not None:
            tok, inv_t = self.flight
            self.flight = None
            out = self._pass(tok, inv_t)
            if self.mode == "bad_token" and self.gen == 3:
                out = 60000
            self.hold = (out, 1000 + self.pos)
        if self.hold is not None and len(self.fifo) < 32:
            out, cyc = self.hold
            self.hold = None
            self.fifo.append((out, cyc))
            if self.gen >= 0:
                self.gen += 1
            if self.left and out < self.model.cfg.vocab_size:  # (a bad token is not run)
                self.left -= 1
                self.pending = out
            elif self.mode == "extra" and self.gen == self.asked:  # one pass too many
                self.pending = out
        if self.pending is not None and self.flight is None and self.hold is None:
            self.flight = (self.pending, self.store["llama_temperature"])
            self.pending = None

    def read_reg(self, name):
        if self.mode == "gone" and self.gen >= 3:
            return 0xFFFFFFFF
        if name == "llama_port_status":
            return ((self.pending is not None) | (bool(self.fifo) << 1)
                    | ((self.pending is not None or self.flight is not None or self.hold is not None) << 2))
        if name == "llama_port_token_out":
            return self.fifo[0][0] if self.fifo else 0
        if name == "llama_port_pass_cycles":
            return self.fifo[0][1] if self.fifo else 0
        if name == "llama_port_loop_left":
            return self.left
        if name == "llama_model_id":
            return self.model.identity()
        if name == "timer0_value":
            return self.store.get("_latched", 0)
        return self.store[name]

    def write_reg(self, name, v):
        self.store[name] = v
        if name == "llama_port_token_in":
            self.pending = v
        elif name == "llama_port_loop":
            self.left = v
            self.loop_writes.append(v)
            if v:
                self.gen, self.asked = 0, v + 1
        elif name == "llama_port_ctrl" and v & 1 and self.fifo:
            self.fifo.pop(0)
        elif name == "llama_ctrl" and v & 1:
            self._reset()
        elif name == "timer0_en" and v:
            self.t0 = self.time
        elif name == "timer0_update_value":
            self.store["_latched"] = (0xFFFFFFFF - (self.time - self.t0)) & 0xFFFFFFFF

    def read_word(self, addr):
        """The word at a bus address (a multi-word CSR's words one by one)."""
        for name, (a, n) in self.map.regs.items():
            if a <= addr < a + 4 * n:
                return self.cfg_words()[(addr - a) // 4] if n > 1 else self.read_reg(name)
        raise KeyError(hex(addr))

    def cfg_words(self):
        c = self.model.cfg
        vals = (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size, c.seq_len,
                self.lanes)
        v = sum(x << (16 * i) for i, x in enumerate(vals))
        return [(v >> (32 * k)) & 0xFFFFFFFF for k in (3, 2, 1, 0)]  # most significant first


class FakeBus:
    """csr.Bus over a FakeCSRSpace (the counting is csr.Bus's own)."""

    def __new__(cls, space, url="fake://"):
        from bakedllama.device.csr import Bus

        class _Bus(Bus):
            def _read(self, addr, n):
                space.tick()
                return [space.read_word(addr + 4 * i) for i in range(n)]

            def _write(self, addr, values):
                space.tick()
                for i, v in enumerate(values):
                    space.write_reg(space.by_addr[addr + 4 * i], v)

        return _Bus(url)


@pytest.fixture(scope="module")
def model(small_baked):
    return small_baked


def device(model, mode=None, **kw):
    m = fake_map()
    space = FakeCSRSpace(model, m, mode)
    kw.setdefault("step_timeout", 0.5)
    return CSRDevice(FakeBus(space), m, "fake://", **kw), space


def golden(model, ids, n, temperature=0.0, seed=0):
    from bakedllama.golden import Golden, generate

    return list(generate(Golden(model), ids, n, temperature, seed))


# ---------------------------------------------------------------- behaving

def test_info_reads_the_identity_and_config(model):
    from bakedllama.device.transport import check_model

    dev, _ = device(model)
    info = dev.info()
    c = model.cfg
    assert (info.dim, info.n_layers, info.vocab_size, info.seq_len, info.lanes) == \
        (c.dim, c.n_layers, c.vocab_size, c.seq_len, 64)
    assert info.model_id == model.identity() and info.sys_clk_freq == 100_000_000
    assert info.board_name == "Verilator simulation" and info.protocol == P.VERSION
    check_model(info, model, dev.url)  # the CLI's refusal of another model works on it


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (0.9, 7)])
def test_generate_equals_golden(model, temperature, seed):
    ids = [1, 5, 9, 2]
    want = golden(model, ids, 20, temperature, seed)
    dev, space = device(model)
    g = dev.generate(ids, 20, temperature, seed)
    got = list(g)
    assert got == want
    assert g.done.prompt_tokens == 4 and g.done.generated == 20 and g.done.passes == 23
    # the passes' cycles as the FIFO reported them (1000 + position after the pass)
    assert g.done.prefill_cycles + g.done.decode_cycles == sum(1000 + p for p in range(1, 24))
    assert g.done.wall_cycles > 0
    # the hardware loop ran the generation: one loop write of max_tokens - 1 (the reset's 0 first)
    assert space.loop_writes == [0, 19]
    # per token: the status word, token + cycles in one burst, one pop; per empty poll: status
    assert g.reads == 3 * 20 + g.empty_polls
    assert g.writes == 20 + 1  # pops + the last prompt token


def test_back_to_back_generations_reset_the_position(model):
    dev, _ = device(model)
    a = list(dev.generate([1, 2, 3], 6))
    b = list(dev.generate([1, 2, 3], 6))
    assert a == b == golden(model, [1, 2, 3], 6)


def test_cancel_stops_the_loop(model):
    dev, space = device(model)
    g = dev.generate([1, 2], 20)
    it = iter(g)
    first = [next(it), next(it)]
    g.close()
    assert first == golden(model, [1, 2], 2)
    assert g.aborted is True and space.left == 0 and not space.fifo and space.flight is None


def test_generate_on_device_shape(model, monkeypatch):
    """generate_on_device (the CLI's call) on a CSR device: the same result keys as the serial one."""
    import bakedllama.device as D

    dev, _ = device(model)
    monkeypatch.setattr("bakedllama.device.csr.open_any", lambda url, **kw: dev)
    r = D.generate_on_device("pcie://01:00.0", model, [1, 4], 8)
    assert r["tokens"] == golden(model, [1, 4], 8)
    assert r["cycles_per_token"] and r["wall_cycles_per_token"] and r["chip_tokens_per_s"]
    assert r["bus"]["reads_per_token"] >= 3 and r["bus"]["writes_per_token"] >= 1


# ---------------------------------------------------------------- misbehaving

@pytest.mark.parametrize("mode,pattern", [
    ("bad_token", r"token 60000, outside the vocabulary of 64 \(3 of 10 tokens arrived\)"),
    ("extra", r"more tokens than the 10 asked"),
    ("stall", r"nothing within 0.5 s \(3 of 10 tokens arrived\)"),
    ("gone", r"undefined bits set"),
])
def test_misbehaving_device(model, mode, pattern):
    dev, _ = device(model, mode)
    g = dev.generate([1, 2], 10)
    got = []
    with pytest.raises(DeviceError, match=pattern):
        for t in g:
            got.append(t)
    assert len(got) <= 10 and got == golden(model, [1, 2], 10)[:len(got)]


def test_refuses_bad_requests(model):
    dev, _ = device(model)
    with pytest.raises(DeviceError, match="exceed the context"):
        dev.generate([1] * 30, 8)
    with pytest.raises(DeviceError, match="prompt token 99 is outside"):
        dev.generate([1, 99], 4)


# ---------------------------------------------------------------- maps and URLs

CSV = """# generated
csr_base,llama,0x00001000,,
csr_register,llama_ctrl,0x00001000,1,rw
constant,config_clock_frequency,100000000,,
constant,config_csr_data_width,32,,
memory_region,csr,0x00000000,65536,io
"""


def test_csr_map_errors(tmp_path):
    with pytest.raises(DeviceError, match="cannot read the CSR map .*nope.csv"):
        CSRMap.load(tmp_path / "nope.csv")
    p = tmp_path / "csr.csv"
    p.write_text(CSV)
    with pytest.raises(DeviceError, match="has no llama_temperature, llama_seed, llama_status"):
        CSRMap.load(p)
    p.write_text("csr_register,llama_ctrl,zz,1,rw\n")
    with pytest.raises(DeviceError, match="is not a LiteX csr.csv"):
        CSRMap.load(p)
    j = tmp_path / "csr.json"
    j.write_text("[1, 2]")
    with pytest.raises(DeviceError, match="is not a LiteX csr.csv / csr.json"):
        CSRMap.load(j)


def test_csr_map_round_trip(tmp_path):
    """A map written in LiteX's csv and json forms loads back to the same registers / fields."""
    import json

    m = fake_map()
    rows = [f"csr_register,{n},0x{a:08x},{w},rw" for n, (a, w) in m.regs.items()]
    rows += [f"constant,{k},{v},," for k, v in m.constants.items()]
    (tmp_path / "csr.csv").write_text("\n".join(rows) + "\nmemory_region,csr,0x00000000,65536,io\n")
    (tmp_path / "csr.json").write_text(json.dumps(dict(
        csr_registers={n: dict(addr=a, size=w, type="rw") for n, (a, w) in m.regs.items()},
        constants=m.constants, memories=dict(csr=dict(base=0, size=65536, type="io")))))
    for name in ("csr.csv", "csr.json"):
        m2 = CSRMap.load(tmp_path / name)
        assert m2.regs == m.regs and m2.field("llama_port_status", "in_flight") == (2, 1)


@pytest.mark.parametrize("url,pattern", [
    ("pcie://zz", "needs a bus:device.function"),
    ("pcie://7f:1f.7", "no PCI device 7f:1f.7"),
    ("litex://127.0.0.1", "needs a host and a port"),
    ("litex://127.0.0.1:1", r"cannot open litex://127.0.0.1:1\?csr=.*is litex_server running"),
    ("pcie://01:00.0?foo=1", "unknown option 'foo'"),
])
def test_bad_urls(tmp_path, url, pattern):
    m = fake_map()
    p = tmp_path / "csr.csv"
    rows = [f"csr_register,{n},0x{a:08x},{w},rw" for n, (a, w) in m.regs.items()]
    rows += [f"constant,{k},{v},," for k, v in m.constants.items()]
    p.write_text("\n".join(rows) + "\n")
    sep = "&" if "?" in url else "?"
    with pytest.raises(DeviceError, match=pattern):
        open_csr_device(f"{url}{sep}csr={p}")
    assert is_csr_url(url) and not is_csr_url("socket://127.0.0.1:4") and is_csr_url("sim-bridge")


def test_litex_server_path(model):
    """litex://: LiteX's own litex_server (RemoteServer) in front of a fake PCIe comm, reached by
    the host's RemoteBus (RemoteClient): generation equals golden, and the server's CommPCIe banner
    makes the client send BAR0 offsets (the CSR region here at 0x80000000)."""
    from litex.tools.litex_server import RemoteServer

    base = 0x8000_0000
    m = fake_map(board=3, base=base)
    space = FakeCSRSpace(model, m)
    bar = {a - base: name for a, name in space.by_addr.items()}
    seen = []

    class CommPCIe:  # the name is what the server announces
        def open(self):
            pass

        def close(self):
            pass

        def read(self, addr, length=None, burst="incr"):
            seen.append(addr)
            space.tick()
            return [space.read_word(base + addr + 4 * i) for i in range(length or 1)]

        def write(self, addr, datas):
            seen.append(addr)
            space.tick()
            for i, v in enumerate(datas):
                space.write_reg(bar[addr + 4 * i], v)

    srv = RemoteServer(CommPCIe(), "127.0.0.1", 0)
    srv.open()
    port = srv.socket.getsockname()[1]
    threading.Thread(target=srv._serve_thread, daemon=True).start()
    bus = RemoteBus(f"litex://127.0.0.1:{port}", "127.0.0.1", port, base)
    dev = CSRDevice(bus, m, bus.url, step_timeout=2.0)
    try:
        info = dev.info()
        assert info.board_name == "SQRL Acorn CLE-215+ (PCIe)"
        assert list(dev.generate([3, 1, 4], 10)) == golden(model, [3, 1, 4], 10)
    finally:
        dev.close()
    assert seen and max(seen) < 0x10000  # BAR0 offsets, not bus addresses


def _silent_server(banner: bytes = b""):
    """A TCP server on 127.0.0.1 that accepts, sends `banner`, then never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conns = []

    def serve():
        try:
            c, _ = srv.accept()
        except OSError:
            return
        conns.append(c)
        c.sendall(banner)

    threading.Thread(target=serve, daemon=True).start()
    return srv, conns


def test_silent_litex_server_times_out():
    """RemoteClient returns zeros on a timeout; the host's bus turns that into an error."""
    srv, conns = _silent_server(b"CommUART")
    try:
        bus = RemoteBus("litex://x", "127.0.0.1", srv.getsockname()[1], 0, timeout=0.3)
        with pytest.raises(DeviceError, match="no reply from the litex_server within 0.3 s"):
            bus.read(0x1000)
        bus.close()
    finally:
        srv.close()
        for c in conns:
            c.close()


def test_silent_uartbone_times_out():
    """CommUART waits forever for a reply; the host's bus gives up after its timeout."""
    srv, conns = _silent_server()
    try:
        bus = UARTBus(f"socket://127.0.0.1:{srv.getsockname()[1]}", timeout=0.3)
        with pytest.raises(DeviceError, match="0 of 4 bytes of a UARTBone reply within 0.3 s"):
            bus.read(0x1000)
        bus.close()
    finally:
        srv.close()
        for c in conns:
            c.close()


@pytest.mark.parametrize("device_url,pattern", [
    ("pcie://nothere", "needs a bus:device.function"),
    ("litex://localhost:0", "needs a host and a port"),
])
def test_cli_bad_pcie_urls(device_url, pattern, tmp_path):
    """The CLI's bad-input rule for the new URLs: exit 2, one line, no traceback."""
    r = subprocess.run([sys.executable, "-m", "bakedllama.cli", "generate", "It was",
                        "--device", f"{device_url}?csr={tmp_path / 'missing.csv'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert pattern in lines[0]


def test_serve_backend_on_a_csr_device(model, monkeypatch):
    """bakedllama serve's DeviceBackend takes pcie:// / litex:// URLs: connect, generate (with the
    per-token cycles it streams), the figures."""
    from bakedllama.serve.backends import DeviceBackend
    from bakedllama.serve.scheduler import Job

    dev, _ = device(model)
    monkeypatch.setattr("bakedllama.device.csr.open_any", lambda url, **kw: dev)
    b = DeviceBackend("pcie://01:00.0", model)
    info = b.connect()
    assert info["lanes"] == 64 and info["firmware"] == "none (host CSR loop)"
    job = Job([1, 2, 3], 8)
    got = list(b.generate(job))
    assert [t for t, _ in got] == golden(model, [1, 2, 3], 8)
    assert all(c > 1000 for _, c in got) and job.stats["cycles_per_token"] > 1000
    b.stop()


def test_cancel_from_another_thread(model):
    """Generation.cancel() (the server's disconnect) ends the iteration and stops the loop even
    while tokens keep arriving."""
    dev, space = device(model)
    g = dev.generate([1, 2], 24)
    got = []
    for t in g:
        got.append(t)
        if len(got) == 5:
            g.cancel()
    assert got == golden(model, [1, 2], 24)[:5]
    assert g.aborted is True and space.left == 0 and not space.fifo
