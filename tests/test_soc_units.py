"""SoC building blocks in Migen simulation: the CPU's token port and the TEST-ONLY stand-in core.

The stand-in (soc/testing_core.py) must keep the accelerator contract (gateware/INTERFACE.md) that
the firmware relies on, and agree with its Python reference, so that the protocol tests that use it
test the firmware and not the stand-in."""

from __future__ import annotations

import random

from migen import Signal, run_simulation

from soc.common import LlamaPort
from soc.testing_core import MODEL_CFG_FIELDS, StandInCore, lookup_table, reference_generate

MAX_WAIT = 5000


def _feed(dut, token):
    """Offer a token on the sink until accepted; bounded."""
    yield dut.sink.valid.eq(1)
    yield dut.sink.token.eq(token)
    for _ in range(MAX_WAIT):
        yield
        if (yield dut.sink.ready):
            break
    else:
        raise AssertionError(f"sink stalled after {MAX_WAIT} cycles")
    yield
    yield dut.sink.valid.eq(0)


def _take(dut, rng):
    for _ in range(MAX_WAIT):
        if (yield dut.source.valid):
            break
        yield
    else:
        raise AssertionError(f"source stalled after {MAX_WAIT} cycles")
    for _ in range(rng.randint(0, 3)):  # back-pressure
        yield
    tok = yield dut.source.token
    cyc = yield dut.cycles.status
    yield dut.source.ready.eq(1)
    yield
    yield dut.source.ready.eq(0)
    return tok, cyc


def _reset(dut, seed):
    yield dut.seed.storage.eq(seed)
    yield dut.ctrl.fields.reset.eq(1)
    yield
    yield dut.ctrl.fields.reset.eq(0)
    yield


def test_testing_core_matches_reference():
    table = lookup_table(64, seed=3)
    dut = StandInCore(table, seq_len=24, latency=5)
    rng = random.Random(0)
    cases = [([3, 9, 1], 6, 0, 0), ([7], 5, 300, 7), ([0, 63, 5, 5], 8, 1, 12345)]
    results = []

    def gen():
        for prompt, n, inv_t, seed in cases:
            yield from _reset(dut, seed)
            assert (yield dut.status.fields.pos) == 0
            out, cycles = [], []
            tok = None
            for pos in range(len(prompt) + n - 1):
                tin = prompt[pos] if pos < len(prompt) else tok
                yield dut.temperature.storage.eq(inv_t if pos >= len(prompt) - 1 else 0)
                yield from _feed(dut, tin)
                tok, cyc = yield from _take(dut, rng)
                cycles.append(cyc)
                if pos >= len(prompt) - 1:
                    out.append(tok)
            results.append((out, cycles))

    run_simulation(dut, gen())
    for (prompt, n, inv_t, seed), (out, cycles) in zip(cases, results):
        assert out == reference_generate(table, prompt, n, inv_t, seed)
        assert cycles == [5 + p for p in range(len(prompt) + n - 1)]


def test_testing_core_full_and_cfg():
    dut = StandInCore(lookup_table(32), seq_len=3, latency=2)
    seen = {}

    def gen():
        yield from _reset(dut, 1)
        for t in range(3):
            yield from _feed(dut, t)
            yield from _take(dut, random.Random(1))
        yield
        seen["full"] = yield dut.status.fields.full
        yield dut.sink.valid.eq(1)
        yield
        seen["ready_when_full"] = yield dut.sink.ready
        yield dut.sink.valid.eq(0)
        yield from _reset(dut, 1)
        seen["full_after_reset"] = yield dut.status.fields.full
        seen["cfg"] = {}
        for f in MODEL_CFG_FIELDS:
            seen["cfg"][f] = yield getattr(dut.model_cfg.fields, f)

    run_simulation(dut, gen())
    assert seen["full"] == 1 and seen["ready_when_full"] == 0 and seen["full_after_reset"] == 0
    assert seen["cfg"]["vocab_size"] == 32 and seen["cfg"]["seq_len"] == 3 and seen["cfg"]["dim"] == 0


def test_llama_port_handshake_fifo_and_loop():
    """LlamaPort (protocol v2): a CPU token is offered until the accelerator takes it; every output
    lands in the FIFO with its pass's cycles (the CPU pops it); while `loop_left` is not 0 each
    output is also fed straight back, counting down; `in_flight` covers a pass and its feed."""
    cycles = Signal(32)
    port = LlamaPort(cycles)
    got = {}

    def accel_output(token, cyc):
        yield cycles.eq(cyc)
        yield port.sink.token.eq(token)
        yield port.sink.valid.eq(1)
        yield
        yield port.sink.valid.eq(0)
        for _ in range(3):  # the FIFO's buffered output
            yield

    def gen():
        # CPU writes a token: offered until the accelerator takes it.
        yield port.token_in.storage.eq(0x1AB)
        yield port.token_in.re.eq(1)
        yield
        yield port.token_in.re.eq(0)
        yield
        got["busy"] = ((yield port.status.fields.in_busy), (yield port.source.valid))
        got["token"] = yield port.source.token
        for _ in range(3):
            yield
        got["still"] = yield port.source.valid
        yield port.source.ready.eq(1)
        yield
        yield port.source.ready.eq(0)
        yield
        got["after"] = ((yield port.source.valid), (yield port.status.fields.in_flight))
        # the pass ends: its token and cycles queue up; no loop, so nothing is fed back
        got["sink_ready"] = yield port.sink.ready
        yield from accel_output(77, 1234)
        got["out"] = ((yield port.status.fields.out_valid), (yield port.token_out.status),
                      (yield port.pass_cycles.status), (yield port.source.valid),
                      (yield port.status.fields.in_flight))
        yield port.ctrl.fields.pop.eq(1)
        yield
        yield port.ctrl.fields.pop.eq(0)
        yield
        got["popped"] = yield port.status.fields.out_valid
        # the loop: two more feeds; each output is offered back to the accelerator
        yield port.loop.storage.eq(2)
        yield port.loop.re.eq(1)
        yield
        yield port.loop.re.eq(0)
        yield
        fed = []
        for tok in (5, 6, 7):
            yield from accel_output(tok, 100 + tok)
            fed.append(((yield port.source.valid), (yield port.source.token), (yield port.loop_left.status)))
            yield port.source.ready.eq(1)
            yield
            yield port.source.ready.eq(0)
            yield
        got["fed"] = fed
        queue = []
        while (yield port.status.fields.out_valid):
            queue.append(((yield port.token_out.status), (yield port.pass_cycles.status)))
            yield port.ctrl.fields.pop.eq(1)
            yield
            yield port.ctrl.fields.pop.eq(0)
            yield
        got["queue"] = queue

    run_simulation(port, gen())
    assert got["busy"] == (1, 1) and got["token"] == 0x1AB and got["still"] == 1
    assert got["after"] == (0, 1) and got["sink_ready"] == 1  # taken; its pass is in flight
    assert got["out"] == (1, 77, 1234, 0, 0)
    assert got["popped"] == 0
    # 5 and 6 are fed back (loop_left 1, then 0); 7 is not
    assert [f[0] for f in got["fed"]] == [1, 1, 0] and [f[1] for f in got["fed"][:2]] == [5, 6]
    assert [f[2] for f in got["fed"]] == [1, 0, 0]
    assert got["queue"] == [(5, 105), (6, 106), (7, 107)]
