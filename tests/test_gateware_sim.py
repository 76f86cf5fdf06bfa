"""The whole accelerator in Verilator against the golden model: tokens, per-layer traces, cycles.

Builds are cached under build/gateware/vsim/<hash of the Verilog> (first build ~1-2 min)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bakedllama.config import ModelConfig

from gateware import compiler
from gateware.cycle_model import expected_cycles
from gateware.testutil import SMALL, baked, run_and_compare

pytestmark = [pytest.mark.sim,
              pytest.mark.skipif(shutil.which("verilator") is None, reason="verilator not installed")]

PROMPTS = [[1, 5, 9, 2], [7, 7, 30, 12, 40, 3, 8], [60, 2, 33, 19, 21, 4, 50, 11, 9, 6, 1, 27]]
N_GEN = 32


@pytest.fixture(scope="module")
def small_sim():
    from gateware.sim import VerilatorSim
    model = baked(SMALL)
    plan = compiler.compile_model(model, lanes=64)
    return model, VerilatorSim(plan, with_trace=True)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["p4", "p7", "p12"])
def test_prompts_bit_exact(small_sim, prompt):
    model, sim = small_sim
    outs, cycles = run_and_compare(sim, model, prompt, N_GEN, lanes=64)
    assert len(outs) == N_GEN


def test_sampling_bit_exact(small_sim):
    model, sim = small_sim
    outs, _ = run_and_compare(sim, model, PROMPTS[1], 16, lanes=64, temperature=0.8, seed=1234)
    assert len(set(outs)) > 1


def test_logit_readback_and_draws(small_sim):
    """Speculative sampling's reports: after every pass (greedy or sampled) `logit_data` reads back
    golden's Q8 logits; after a sampled pass `sample_base` / `sample_weight` / `sample_total` are
    the running weight sum before the drawn token, its weight and the sum of all weights, so
    numerics.draw_count gives that token's exact count of the 2^32 draws."""
    import numpy as np
    from bakedllama import numerics as nx
    from bakedllama.golden import Golden

    model, sim = small_sim
    V = model.cfg.vocab_size
    gold = Golden(model)
    st = gold.new_state(1)
    rng = nx.XorShift32(77)
    inv_t = nx.temperature_q8(0.9)
    with sim.run() as dut:
        dut.reset(seed=77)
        tok = 5
        for i in range(6):
            t = inv_t if i % 3 else 0  # greedy passes fill the readback too
            dut.write("temperature", t)
            q8 = gold.forward(st, [tok]).q8()[0]
            out, _ = dut.token(tok)
            got = []
            for j in range(V):
                dut.write("logit_index", j)
                got.append(dut.read("logit_data"))
            assert np.array_equal(np.array(got, dtype=np.uint32).view(np.int32), q8.astype(np.int32)), i
            if t:
                want = nx.sample(q8, t, rng)
                assert out == want
                w = nx.sample_weights(q8, t)
                base, weight, total = (dut.read(n) for n in ("sample_base", "sample_weight",
                                                             "sample_total"))
                assert (base, weight, total) == (int(w[:out].sum()), int(w[out]), int(w.sum()))
                assert nx.draw_count(base, weight, total) == nx.sample_counts(q8, t)[out] > 0
            tok = out


def test_identity_status_and_full(small_sim):
    model, sim = small_sim
    cfg = model.cfg
    with sim.run() as dut:
        assert dut.read("model_id") == model.identity()
        packed = dut.read_wide("model_cfg", 4)
        fields = [(packed >> (16 * i)) & 0xFFFF for i in range(8)]
        assert fields == [cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim,
                          cfg.vocab_size, cfg.seq_len, 64]
        dut.reset()
        for _ in range(3):
            dut.token(1)
        st = dut.read("status")
        assert (st >> 2) & 0xFFFF == 3 and st & 1 == 0  # pos 3, not busy
        dut.write("ctrl", 1)  # reset: position 0 again, same first output as before
        first = dut.token(1)[0]
        dut.write("ctrl", 1)
        assert dut.token(1)[0] == first
        for _ in range(cfg.seq_len - 1):
            dut.token(2)
        assert (dut.read("status") >> 1) & 1 == 1  # full
    # a token offered when full is not accepted: the testbench's bounded wait expires
    from gateware.sim import SimError
    limit = 2 * expected_cycles(cfg, 64, cfg.seq_len - 1)
    with sim.run(timeout_cycles=limit) as dut:
        dut.reset()
        for _ in range(cfg.seq_len):
            dut.token(2)
        with pytest.raises(SimError):
            dut.token(2)


def test_rewind_continues_from_an_earlier_position(small_sim):
    """ctrl.rewind sets the position back (speculative decoding's rejected drafts): the passes
    after it equal golden's with its position set back, tokens, traces and cycles; a rewind past
    the current position is ignored."""
    import numpy as np
    from bakedllama import numerics as nx
    from bakedllama.golden import Golden, Trace

    from gateware.testutil import _slots
    model, sim = small_sim
    cfg = model.cfg
    gold = Golden(model)
    st = gold.new_state(1)
    # pos 0..7, back to 3, 3..9 with other tokens, back to 5, 5..6, then a rewind past pos
    script = [("feed", [1, 5, 9, 2, 40, 41, 42, 43]), ("rewind", 3), ("feed", [7, 8, 30, 31, 12, 13, 3]),
              ("rewind", 5), ("feed", [60, 61]), ("rewind", 100), ("feed", [2])]
    with sim.run() as dut:
        dut.reset()
        for op, arg in script:
            if op == "rewind":
                dut.write("rewind_pos", arg)
                dut.write("ctrl", 2)  # the rewind field (bit 1)
                if arg <= st.pos:
                    st.pos = arg
                dut.read("model_id")  # a few cycles: the rewind is taken in IDLE after the pulse
                assert (dut.read("status") >> 2) & 0xFFFF == st.pos
                continue
            for tok in arg:
                pos = st.pos
                tr = Trace()
                want = int(nx.argmax(gold.forward(st, [tok], tr).acc)[0])
                out, cyc = dut.token(tok)
                assert out == want, f"position {pos}: device token {out}, golden {want}"
                x, ref = dut.trace(), _slots(tr)
                assert all(np.array_equal(x[i], ref[i]) for i in range(len(ref))), pos
                geo = sim.plan.geo
                assert cyc == expected_cycles(cfg, 64, pos, formats=compiler.matrix_formats(
                    cfg, model.fmt["weights"]), vlanes=geo.vlanes, kv_par=geo.kv_par,
                    dsp_pairs=geo.dsp_pairs), pos
    assert st.pos == 8


REAL = ModelConfig(dim=128, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=192, vocab_size=512,
                   seq_len=256, tied_embeddings=True)
TRAINED = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "model-q.bkl"


def test_real_model_bit_exact():
    """The trained tiny model (or random weights of its shape) at the default lanes: three prompts,
    32 generated tokens each, then positions up to the end of the context."""
    from bakedllama.model import load_baked

    from gateware.sim import VerilatorSim
    model = load_baked(TRAINED) if TRAINED.exists() else baked(REAL)
    plan = compiler.compile_model(model)
    sim = VerilatorSim(plan, with_trace=True)
    lanes = plan.geo.lanes
    for prompt in PROMPTS:
        run_and_compare(sim, model, [t * 7 % model.cfg.vocab_size for t in prompt], N_GEN, lanes)
    run_and_compare(sim, model, [3], model.cfg.seq_len - 1, lanes)
