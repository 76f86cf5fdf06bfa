"""`bakedllama serve` on the Verilator SoC (the cached product simulation, as in test_soc_e2e.py):
the openai client gets exactly the golden model's tokens, a disconnect really aborts the
generation on the device (its own STATS say how far it got), the page shows the chip's cycles per
token, a small load test, and a simulator that dies and comes back."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time

import openai
import pytest
from bakedllama.device.sim import BUILD_ROOT, build_sim, launch
from bakedllama.model import DEFAULT_BAKED
from bakedllama.serve.loadtest import run_load
from bakedllama.serve.process import ServeProcess, outcome

pytestmark = pytest.mark.sim
MODEL_ID = "bakedllama-tiny"


@pytest.fixture(scope="module")
def ref(golden_ref):
    return golden_ref


class Sim:
    """The simulated SoC on a fixed port, so that a new one can take the place of a dead one."""

    def __init__(self):
        self.build = build_sim("real", DEFAULT_BAKED)
        self.h = launch(self.build, boot_timeout=300)
        self.port = self.h.port

    def relaunch(self):
        """A new simulator on the same port, returned once it listens: the server's recovery probe
        connects to it (the simulated UART takes one client, so this must not connect too)."""
        self.h.stop()
        self.h = launch(self.build, port=self.port, boot_timeout=300, wait_ready=False)


@pytest.fixture(scope="module")
def sim():
    s = Sim()
    yield s
    print(f"\n--- simulator log ---\n{s.h.log_tail(5)}")
    s.h.stop()


@pytest.fixture(scope="module")
def server(sim):
    with ServeProcess(["--device", sim.h.url, "--max-queue", "3"], timeout=300) as s:
        yield s
    assert "Traceback" not in s.stderr(), s.stderr()


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="test", max_retries=0, timeout=120)


def _addr(server):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def stream_raw(server, **body):
    """A streaming request on a raw socket (the test decides when to hang up)."""
    s = socket.create_connection(_addr(server), timeout=60)  # bounded reads
    data = json.dumps(dict(model=MODEL_ID, stream=True, **body)).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def read_until(s, marker: bytes, limit: int = 1 << 20) -> bytes:
    buf = b""
    while marker not in buf:
        part = s.recv(65536)
        assert part and len(buf) < limit, buf[-500:]
        buf += part
    return buf


def test_generation_cancel_from_another_thread(sim, ref):
    """device/transport.py's Generation.cancel(): from another thread, during the prompt passes; the
    device aborts (its ABORT reply and STATS say so) and the next generation is exact. Runs before
    the server below takes the simulator's one connection."""
    import threading

    ids = ref.tok.encode("It was") + [ref.tok.encode(" the")[-1]] * 146  # ~15 s of prompt passes
    with sim.h.open() as dev:
        g = dev.generate(ids, 50)
        threading.Timer(0.5, g.cancel).start()
        t0 = time.monotonic()
        assert list(g) == [] and g.aborted is True
        assert time.monotonic() - t0 < 5 and not g.batches  # stopped in the prompt passes
        assert dev.stats().generated == 0
        g = dev.generate(ref.tok.encode("It was"), 6)
        assert list(g) == ref("It was", 6) and g.aborted is None  # ran to the end: no ABORT


def test_completions_match_golden_on_the_soc(server, ref):
    c = client(server)
    r = c.completions.create(model=MODEL_ID, prompt="It was", max_tokens=12, temperature=0)
    want = ref("It was", 12)
    assert r.choices[0].model_extra["token_ids"] == want and r.choices[0].text == ref.tok.decode(want)
    b = r.model_extra["bakedllama"]
    assert b["board"] == "Verilator simulation" and b["cycles_per_token"] > 0 and b["chip_tokens_per_s"] > 0
    print(f"\nSoC via serve: {b['cycles_per_token']} cycles/token, {b['chip_tokens_per_s']} chip tokens/s "
          f"at {b['sys_clk_freq'] / 1e6:.0f} MHz, {b['tokens_per_s']} tokens/s end to end in Verilator")

    want = ref("Elizabeth", 12, 0.8, 42)
    ids, text, cycles = [], "", []
    for chunk in c.completions.create(model=MODEL_ID, prompt="Elizabeth", max_tokens=12, temperature=0.8,
                                      seed=42, stream=True):
        ch = chunk.choices[0]
        ids += ch.model_extra["token_ids"]
        text += ch.text
        if ch.model_extra["token_ids"]:
            cycles.append(chunk.model_extra["bakedllama"]["cycles"])  # the pass's hardware counter
    assert ids == want and text == ref.tok.decode(want)
    assert len(cycles) == 12 and all(5000 < x < 20000 for x in cycles), cycles
    with pytest.raises(openai.BadRequestError) as e:  # the hardware sampler has no top-k
        c.completions.create(model=MODEL_ID, prompt="It was", max_tokens=4, extra_body={"top_k": 5})
    assert e.value.code == "unsupported_parameter"


def test_disconnect_aborts_on_the_device(server, ref):
    m0 = server.wait_for(lambda m: m["bakedllama_requests_running"] == 0, 30, "idle")
    s = stream_raw(server, prompt="It was", max_tokens=200, temperature=0)
    read_until(s, b'"token_ids": [')  # its first token
    s.close()
    m = server.wait_for(lambda m: outcome(m, "aborted") == outcome(m0, "aborted") + 1, 30, "the abort")
    assert m["bakedllama_device_aborts_total"] == m0["bakedllama_device_aborts_total"] + 1
    k = "bakedllama_device_aborted_generated_tokens_total"
    n = m[k] - m0[k]
    assert 1 <= n < 20, n  # the device's STATS: it stopped, it did not go on to 200
    r = client(server).completions.create(model=MODEL_ID, prompt="It was", max_tokens=4, temperature=0)
    assert r.choices[0].model_extra["token_ids"] == ref("It was", 4)
    assert r.model_extra["bakedllama"]["queued_s"] < 2.0  # 200 tokens take ~11 s in Verilator


def test_disconnect_during_the_prompt_aborts_its_passes(server, ref):
    """150 prompt passes (~15 s in Verilator): the abort comes within one pass, before any token."""
    m0 = server.wait_for(lambda m: m["bakedllama_requests_running"] == 0, 30, "idle")
    prompt = ref.tok.encode("It was") + [ref.tok.encode(" the")[-1]] * 146
    s = stream_raw(server, prompt=prompt, max_tokens=50, temperature=0)
    server.wait_for(lambda m: m["bakedllama_requests_running"] == 1, 30, "on the device")
    time.sleep(0.5)  # a few prompt passes
    s.close()
    t0 = time.monotonic()
    m = server.wait_for(lambda m: outcome(m, "aborted") == outcome(m0, "aborted") + 1, 30, "the abort")
    assert time.monotonic() - t0 < 10
    assert m["bakedllama_device_aborts_total"] == m0["bakedllama_device_aborts_total"] + 1
    assert m["bakedllama_device_aborted_generated_tokens_total"] == \
        m0["bakedllama_device_aborted_generated_tokens_total"]  # no token generated: stopped in the prompt
    assert m["bakedllama_generated_tokens_total"] == m0["bakedllama_generated_tokens_total"]


def test_page_shows_the_chips_cycles(server, ref, tmp_path):
    from bakedllama.serve.browser import browser, run_page

    try:
        with browser() as d:
            res = run_page(d, server.url, "It was", max_tokens=32, timeout=120)
            d.save_screenshot(str(tmp_path / "page.png"))
    except RuntimeError as e:
        pytest.fail(str(e))
    assert res["state"] == "done" and res["text"] == ref.tok.decode(ref("It was", 32)), res
    cycles = int(res["figures"]["cycles"].replace(",", ""))
    chip = float(res["figures"]["chip"].replace(",", ""))
    from soc.common import SYS_CLK_FREQ

    mhz = f"Verilator simulation, {SYS_CLK_FREQ / 1e6:g} MHz"
    assert 5000 < cycles < 20000 and chip > 1000 and mhz in res["device"], res
    print(f"\npage on the SoC: {res['figures']}")
    if os.environ.get("BAKEDLLAMA_SCREENSHOT"):  # the README's picture
        shutil.copy(tmp_path / "page.png", os.environ["BAKEDLLAMA_SCREENSHOT"])


def test_small_load_on_the_soc(server, ref):
    m0 = server.wait_for(lambda m: m["bakedllama_requests_running"] == 0, 30, "idle")
    rep = run_load(server.url, MODEL_ID, lambda p, t, s, n: ref(p, n, t, s), clients=8, max_tokens=6,
                   disconnect_every=4, disconnect_after=2, timeout=120, decode=ref.tok.decode)
    s = rep.summary()
    print("\nload test (SoC):", rep.format())
    assert s["errors"] == 0 and s["wrong_texts"] == 0, [(c.i, c.error) for c in rep.clients]
    assert s["completed"] + s["refused"] + s["aborted"] == 8 and s["refused"] >= 1
    m = server.wait_for(lambda m: m["bakedllama_queue_depth"] == 0 and m["bakedllama_requests_running"] == 0,
                        60, "idle")
    assert outcome(m, "completed") - outcome(m0, "completed") == s["completed"]
    assert outcome(m, "refused_queue_full") - outcome(m0, "refused_queue_full") == s["refused"]


def test_serve_starts_its_own_simulation(ref):
    """No --device: the server starts the simulated SoC (the cached build) and stops it at exit."""
    with ServeProcess(["--max-queue", "2"], timeout=300) as s:
        st, h = s.health()
        assert st == 200 and h["board"] == "Verilator simulation"
        r = client(s).completions.create(model=MODEL_ID, prompt="Elizabeth", max_tokens=4, temperature=0)
        assert r.choices[0].model_extra["token_ids"] == ref("Elizabeth", 4)
        pid = s.proc.pid
        assert [p for p in (BUILD_ROOT / "runs").iterdir() if p.name.startswith(f"{pid}-")]
    # SIGTERM: uvicorn shuts down (the lifespan stops the simulation), then re-raises the signal
    assert s.proc.returncode == -15 and "Traceback" not in s.stderr(), s.stderr()
    assert not [p for p in (BUILD_ROOT / "runs").iterdir() if p.name.startswith(f"{pid}-")]  # sim stopped


def test_device_death_and_recovery(server, sim, ref):
    """The simulator dies mid-generation: that request fails with the device's error, new ones get
    503 while it is down, and the server is back when a simulator listens on the port again."""
    server.wait_for(lambda m: m["bakedllama_requests_running"] == 0, 30, "idle")
    m0 = server.metrics()
    c = client(server)
    stream = c.completions.create(model=MODEL_ID, prompt="It was", max_tokens=100, temperature=0, stream=True)
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got += chunk.choices[0].model_extra["token_ids"]
            if len(got) == 2:
                sim.h.proc.kill()  # the device dies
    msg = e.value.message
    assert "the device failed" in msg and sim.h.url.split("//")[1] in msg, msg
    assert got == ref("It was", len(got))
    st, h = server.health()
    assert st == 503 and h["status"] == "down" and h["error"], h
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=MODEL_ID, prompt="It was", max_tokens=4)
    assert e.value.status_code == 503 and e.value.body["code"] == "device_unavailable"
    sim.relaunch()  # it comes back on the same port
    deadline = time.monotonic() + 300  # the simulated firmware's boot
    while server.health()[0] != 200:
        assert time.monotonic() < deadline, server.health()
        time.sleep(0.2)
    r = c.completions.create(model=MODEL_ID, prompt="It was", max_tokens=6, temperature=0)
    assert r.choices[0].model_extra["token_ids"] == ref("It was", 6)
    m = server.metrics()
    assert m["bakedllama_device_recoveries_total"] == m0["bakedllama_device_recoveries_total"] + 1
    assert outcome(m, "failed") == outcome(m0, "failed") + 1
    assert outcome(m, "refused_device_down") >= outcome(m0, "refused_device_down") + 1
    assert "device down" in server.stderr() and "device back" in server.stderr()
