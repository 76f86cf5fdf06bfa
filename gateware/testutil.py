"""Test helpers for the gateware (used by tests/test_gateware*.py): stream drivers with random gaps / back-pressure and
waits, small random baked models (cached per session), run_and_compare (a Verilator run against the
golden model: tokens, per-layer traces, cycles)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama.config import ModelConfig
from bakedllama.synthetic import random_baked

# A small model with the real one's shape ratios (GQA, hidden = 1.5 dim, w4e8 format).
SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=64,
                    seq_len=64, tied_embeddings=False)
TINY = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=64,
                   seq_len=16, tied_embeddings=False)


@functools.lru_cache(maxsize=None)
def baked(cfg: ModelConfig, scheme: str = "w4e8", seed: int = 0):
    d = Path(tempfile.mkdtemp(prefix="bkl-gw-"))
    return random_baked(d / "m.bkl", cfg, scheme=scheme, seed=seed)




def _slots(tr) -> np.ndarray:
    return np.stack([tr.embedding[0]] + [v[0] for L in tr.layers for v in (L["x_att"], L["x_ffn"])])


def _slot_name(s: int) -> str:
    return "embedding" if s == 0 else f"layer {(s - 1) // 2} after {'attention' if s % 2 else 'FFN'}"


def run_and_compare(sim, model, prompt, n_gen, lanes, temperature=0.0, seed=0):
    """Feed the prompt, then the device's own outputs (a VerilatorSim of the model's plan); compare
    every pass with the golden model: tokens, the per-layer trace, and the cycle counter against
    the cycle model."""
    from bakedllama.golden import Golden, Trace

    from gateware.compiler import matrix_formats
    from gateware.cycle_model import expected_cycles
    cfg, plan = model.cfg, sim.plan
    formats = matrix_formats(cfg, model.fmt["weights"])  # the model's own scheme, not the default
    gold = Golden(model)
    st = gold.new_state(1)
    rng = nx.XorShift32(seed)
    inv_t = nx.temperature_q8(temperature) if temperature > 0 else 0
    outs, cycles = [], []
    with sim.run() as dut:
        dut.reset(seed=seed, temperature_q8=0)
        tok = prompt[0]
        for pos in range(len(prompt) + n_gen - 1):
            prompt_pass = pos < len(prompt) - 1
            dut.write("temperature", 0 if prompt_pass else inv_t)
            tr = Trace()
            lg = gold.forward(st, [tok], tr)
            if prompt_pass:
                want = None
            elif inv_t:
                want = nx.sample(lg.q8()[0], inv_t, rng)
            else:
                want = int(nx.argmax(lg.acc)[0])
            out, cyc = dut.token(tok)
            x = dut.trace()
            ref = _slots(tr)
            for s in range(len(ref)):
                if not (x[s] == ref[s]).all():
                    bad = np.nonzero(x[s] != ref[s])[0]
                    pytest.fail(f"first divergence at position {pos}, {_slot_name(s)}: "
                                f"x[{bad[:5].tolist()}] = {x[s][bad[:5]].tolist()}, golden "
                                f"{ref[s][bad[:5]].tolist()} ({len(bad)} of {cfg.dim} differ)")
            if want is not None:
                assert out == want, f"position {pos}: device token {out}, golden {want}"
                outs.append(out)
            exp = expected_cycles(cfg, lanes, pos, formats=formats, vlanes=plan.geo.vlanes,
                                  kv_par=plan.geo.kv_par, dsp_pairs=plan.geo.dsp_pairs,
                                  sampled=out if (inv_t and not prompt_pass) else None)
            assert cyc == exp, f"position {pos}: {cyc} cycles measured, cycle model {exp}"
            cycles.append(cyc)
            assert dut.read("cycles") == cyc  # the hardware counter is what the testbench measured
            tok = out if not prompt_pass else prompt[pos + 1]
    return outs, cycles


class Stalled(AssertionError):
    pass


def send(ep, beats, rng, p_valid=0.7, timeout=2000, name="sink"):
    """Drive `beats` (dicts of field -> value, incl. first/last) into a stream endpoint."""
    for b in beats:
        while rng.random() > p_valid:
            yield ep.valid.eq(0)
            yield
        for k, v in b.items():
            yield getattr(ep, k).eq(int(v))
        yield ep.valid.eq(1)
        yield
        n = 0
        while not (yield ep.ready):
            yield
            n += 1
            if n > timeout:
                raise Stalled(f"{name}: not ready for {timeout} cycles")
    yield ep.valid.eq(0)


def recv(ep, n_beats, out, fields, rng, p_ready=0.7, timeout=5000, name="source"):
    """Collect n_beats beats (dicts of the given fields + first/last) with random back-pressure."""
    idle = 0
    while len(out) < n_beats:
        yield ep.ready.eq(1 if rng.random() < p_ready else 0)
        yield
        if (yield ep.valid) and (yield ep.ready):
            beat = {}
            for f in fields:
                beat[f] = (yield getattr(ep, f))
            beat["first"] = (yield ep.first)
            beat["last"] = (yield ep.last)
            out.append(beat)
            idle = 0
        else:
            idle += 1
            if idle > timeout:
                raise Stalled(f"{name}: stalled after {timeout} cycles with {len(out)}/{n_beats} beats")
    yield ep.ready.eq(0)


def pack(values, width):
    """List of signed ints -> one packed unsigned int (lane 0 in the low bits)."""
    w = 0
    for i, v in enumerate(values):
        w |= (int(v) & ((1 << width) - 1)) << (i * width)
    return w


def unpack(word, n, width, signed=True):
    out = []
    for i in range(n):
        v = (word >> (i * width)) & ((1 << width) - 1)
        if signed and v >> (width - 1):
            v -= 1 << width
        out.append(v)
    return np.array(out, dtype=np.int64)


def drive_sampler(dut, seed: int, passes, n_fill: int, Q: int, got: list):
    """Seed a units.Sampler, then for each (logits, inv_temp) fill the n_fill logits Q per beat,
    start it and append the drawn token to `got` (bounded wait: fails with a message)."""
    yield dut.seed.eq(seed)
    yield dut.reseed.eq(1)
    yield
    yield dut.reseed.eq(0)
    yield
    while (yield dut.seeding):
        yield
    for logits, inv_t in passes:
        for i in range(0, n_fill, Q):
            yield dut.fill.v.eq(pack(logits[i:i + Q], 32))
            yield dut.fill.valid.eq(1)
            yield dut.fill.last.eq(i + Q == n_fill)
            yield
        yield dut.fill.valid.eq(0)
        yield dut.inv_temp.eq(inv_t)
        yield dut.start.eq(1)
        yield
        yield dut.start.eq(0)
        for _ in range(10 * n_fill + 100):
            yield
            if (yield dut.done):
                got.append((yield dut.token))
                break
        else:
            raise Stalled(f"sampler: no token after {10 * n_fill + 100} cycles")


def argmax_indices(dut, cases, Q: int, width: int, rng) -> list:
    """units.Argmax over each vector of `cases` (Q values per beat, random gaps and back-pressure):
    the index it returns for each."""
    from migen import run_simulation

    n = len(cases[0])
    out = []

    def driver():
        for v in cases:
            yield from send(dut.sink, [dict(v=pack(v[i:i + Q], width), first=i == 0, last=i + Q == n)
                                       for i in range(0, n, Q)], rng)

    def receiver():
        yield from recv(dut.source, len(cases), out, ["index"], rng)

    run_simulation(dut, [driver(), receiver()])
    return [b["index"] for b in out]
