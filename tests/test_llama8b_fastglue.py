"""llama8b/fastglue.py: the compiled vector steps give numerics' integers exactly.

Each is compared with its numerics original on random rows, on the rounding ties (x = odd
multiples of 2^(s-1)), at saturation in both directions, with shifts <= 0 (left shifts), on all-zero
rows, and both on the serial path and on the parallel one (arrays past PARALLEL_FROM)."""

from __future__ import annotations

import numpy as np
import pytest
from bakedllama import numerics as nx
from bakedllama import steps
from bakedllama.llama8b import fastglue


def _rows(rng, T, N, lim):
    v = rng.integers(-lim, lim + 1, (T, N), dtype=np.int64)
    v[0, :8] = [lim, -lim, 0, 1, -1, lim // 2, -(lim // 2), 3]
    return v


@pytest.mark.parametrize("T,N", [(1, 4096), (3, 100), (64, 14336)])
def test_requantize_equals_numerics(T, N):
    rng = np.random.default_rng(T * N)
    acc = _rows(rng, T, N, 1 << 40)
    for bits in (8, 16, 32):
        shift = rng.integers(-3, 30, T)
        shift[0] = 20
        # ties: odd multiples of 2^(s-1), positive and negative, round half up
        acc[0, 8:12] = [(1 << 19), -(1 << 19), 3 << 19, -(3 << 19)]
        ref = nx.requantize(acc, shift[:, None], bits)
        assert np.array_equal(fastglue.requantize(acc, shift, bits), ref)
    assert (nx.requantize(acc, np.full((T, 1), 2), 16) == 32767).any()  # saturation is reached
    assert np.array_equal(fastglue.requantize(acc, np.full(T, 2), 16),
                          nx.requantize(acc, np.full((T, 1), 2), 16))


@pytest.mark.parametrize("T,N", [(1, 4096), (5, 96), (64, 4096)])
def test_residual_add_equals_numerics(T, N):
    rng = np.random.default_rng(N + T)
    x = _rows(rng, T, N, 32767)
    acc = _rows(rng, T, N, 1 << 34)
    shift = rng.integers(10, 24, T)
    want = nx.saturate(x + nx.requantize(acc, shift[:, None], 16), 16)
    got = x.copy()
    fastglue.residual_add(got, acc, shift, 16)
    assert np.array_equal(got, want)
    assert (want == 32767).any() and (want == -32768).any()
    with pytest.raises(ValueError, match="contiguous"):
        fastglue.residual_add(x[:, ::2], acc[:, ::2], shift, 16)


@pytest.mark.parametrize("T,N", [(1, 4096), (4, 14336), (64, 4096)])
def test_quantize_act_equals_numerics(T, N):
    rng = np.random.default_rng(7 * T + N)
    v = _rows(rng, T, N, (1 << 20) - 1)  # rounds up to 128 at the top: clipped to 127
    if T > 2:
        v[-1] = 0  # an all-zero row: shift 0
        v[1] = rng.integers(-127, 128, N)  # already int8: shift 0
        v[2, :] = 0
        v[2, 5] = -(1 << 13)  # a negative power of two sets the shift
    a, k = fastglue.quantize_act(v)
    ra, rk = nx.quantize_act(v)
    assert np.array_equal(a, ra) and np.array_equal(k, rk)
    assert (ra == 127).any() and (ra == -127).any()


@pytest.mark.parametrize("T,N", [(1, 14336), (2, 50), (64, 14336)])
@pytest.mark.parametrize("f_h", [5, 6, 9, 12])
def test_swiglu_act_equals_numerics(T, N, f_h):
    """f_h below SIG_FRAC_IN makes the table index a left shift; 12 saturates the output."""
    rng = np.random.default_rng(f_h * 100 + T)
    st = steps.swiglu_step(f_h)
    h1, h3 = _rows(rng, T, N, 32767), _rows(rng, T, N, 32767)
    h1[0, 8:12] = [-32768, 32767, 1 << (f_h + 3), -(1 << (f_h + 3))]  # the table's ends
    a, k = fastglue.swiglu_act(h1, h3, st)
    ra, rk = nx.quantize_act(nx.swiglu(h1, h3, st))
    assert np.array_equal(a, ra) and np.array_equal(k, rk)


def test_bad_shapes_and_shifts_are_refused():
    with pytest.raises(ValueError, match="shape"):
        fastglue.swiglu_act(np.zeros((1, 4)), np.zeros((1, 5)), steps.swiglu_step(9))
    with pytest.raises(ValueError, match="shift"):
        fastglue.requantize(np.zeros((1, 4)), [70], 16)
