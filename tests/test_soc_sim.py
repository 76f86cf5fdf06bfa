"""The Verilator SoC with the TEST-ONLY stand-in core: SoC + firmware + protocol, end to end.

soc/sim.py --core testing: VexRiscv, the firmware in ROM, the UART on 127.0.0.1 through
soc/sim_modules/serial2tcp_local, and soc/testing_core.py (next token from a lookup table) in place
of the accelerator. Checks the sim module (loopback only, output kept until a client connects, one
client at a time), the protocol, and the fuzz figures; the same generation must come out after the
noise. The product target with the real core is tested in tests/test_soc_e2e.py."""

from __future__ import annotations

import json
import socket
import time

import pytest
from bakedllama.device import DeviceError, build_sim, start_sim
from bakedllama.device import protocol as P
from bakedllama.device.fuzz import run_fuzz
from bakedllama.device.sim import launch
from bakedllama.numerics import temperature_q8

from soc.testing_core import lookup_table, reference_generate

pytestmark = pytest.mark.sim

TABLE = lookup_table(512)
PROMPTS = [[1], [1, 5, 300, 7], list(range(2, 40)), [511] * 6]


def ref(prompt, n, inv_t=0, seed=0):
    return reference_generate(TABLE, prompt, n, inv_t, seed)


@pytest.fixture(scope="module")
def sim():
    with start_sim("testing", boot_timeout=120) as h:
        yield h
        print(f"\n--- simulator log ({h.log_path}) ---\n{h.log_tail(20)}")


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on this TCP port (/proc/net/tcp, tcp6)."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(name).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            addr, p = f[1].rsplit(":", 1)
            if int(p, 16) == port and f[3] == "0A":  # TCP_LISTEN
                out.append(addr)
    return out


def test_listens_on_loopback_only(sim):
    assert _listening_addresses(sim.port) == ["0100007F"]  # 127.0.0.1, nothing else


def test_banner_is_kept_until_a_client_connects():
    build = build_sim("testing")
    h = launch(build, wait_ready=False)
    try:
        time.sleep(1.0)  # the firmware prints its banner long before we connect
        with socket.create_connection(("127.0.0.1", h.port), timeout=30) as s:
            data = b""
            deadline = time.monotonic() + 30
            while b"ready" not in data and time.monotonic() < deadline:
                data += s.recv(256)
        assert f"bakedllama firmware 2.0 protocol {P.VERSION} ready".encode() in data
    finally:
        h.stop()


def test_one_client_at_a_time(sim):
    with sim.open() as a:
        a.info()
        with pytest.raises(DeviceError):
            with sim.open(timeout=1.0, retries=0) as b:  # closed by the simulator at once
                b.info()
        assert a.info().protocol == P.VERSION
    with sim.open() as c:  # the first client left: the port is free again
        assert c.info().testing_core


def test_info(sim):
    with sim.open() as dev:
        info = dev.info()
    assert info.testing_core and info.board_name == "Verilator simulation"
    assert (info.vocab_size, info.seq_len) == (512, 256)
    assert info.sys_clk_freq > 0


@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate_matches_reference(sim, prompt):
    with sim.open() as dev:
        g = dev.generate(prompt, 24)
        assert list(g) == ref(prompt, 24)
        n = len(prompt)  # the stand-in's counter is 64 + pos; v2 batches carry their passes'
        assert sum(b.cycles for b in g.batches) == sum(64 + p for p in range(n - 1, n + 23))
        assert g.done.prefill_cycles + g.done.decode_cycles == sum(64 + p for p in range(n + 23))
        assert list(dev.generate(prompt, 24, temperature=0.9, seed=99)) == \
            ref(prompt, 24, temperature_q8(0.9), 99)


def test_abort(sim):
    with sim.open() as dev:
        g = dev.generate([1, 2], 200)
        next(g)
        g.close()
        assert list(dev.generate([4], 5)) == ref([4], 5)


def test_fuzz(sim):
    with sim.open() as dev:
        info = dev.info()
        before = [list(dev.generate(p, 16)) for p in PROMPTS]
        rep = run_fuzz(dev, info, ref, PROMPTS, rounds=440, seed=11, gen_every=44)
        after = [list(dev.generate(p, 16)) for p in PROMPTS]
        link = dev.noise
    print("\nfuzz (Verilator SoC):", json.dumps(rep.as_dict()), "host saw:", link)
    assert before == after == [ref(p, 16) for p in PROMPTS]
    assert rep.hangs == 0, rep
    assert rep.wrong_tokens == 0, rep
    assert rep.errors_answered == rep.errors_expected, rep
    assert rep.valid_answered == rep.valid_requests, rep
