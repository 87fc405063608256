"""Every front (each torch path, NumPy, optax), every variant, every reference
scenario, float32 and float64, against the per-element transcription of the
papers (tests/reference.py), given the same gradients and losses.

Result: exact (np.array_equal, 0 ulp) at every step, for the parameters and
the step sizes, real and complex. Each output element is one IEEE
multiplication (step size by eta), one clamp and one addition (parameter plus
±step or minus the last update), in the same order and precision everywhere,
so there is nothing to round differently.

The one difference: XLA on CPU flushes subnormal numbers to zero, so where a
product g_prev * g falls below the normal range the JAX front sees p = 0
(see the last test). The gradients here stay far from that.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import rprop.numpy
from _table import (
    FRONTS,
    REFERENCE_SCENARIOS,
    SCENARIOS,
    SHAPES,
    as_reals,
    assert_step,
    reference_run,
)
from reference import VARIANT_NAMES

NP_DTYPES = {"float64": np.float64, "float32": np.float32}


# -- the scenarios really exercise what they claim ---------------------------------


@pytest.mark.parametrize("dtype", list(NP_DTYPES))
def test_tight_bounds_scenario_hits_both_bounds(dtype):
    lo, hi = SCENARIOS["tight-bounds"]["step_sizes"]
    for variant in VARIANT_NAMES:
        run = reference_run(variant, "tight-bounds", NP_DTYPES[dtype])
        seen = np.concatenate([s.ravel() for _, steps in run.path for s in steps])
        t = NP_DTYPES[dtype]
        assert (seen == t(lo)).any() and (seen == t(hi)).any(), variant


def test_the_gradients_flip_vanish_and_spike():
    """The gradient sequence has what each branch needs: sign flips, exact
    zeros (and one step of zeros everywhere), and steps 1e3 times larger."""
    run = reference_run("irprop-", "plain", np.float64)
    g = [np.concatenate([as_reals(x).ravel() for x in grads]) for grads, _ in run.inputs]
    assert any(np.any(a * b < 0) for a, b in itertools.pairwise(g))
    assert all(np.any(x == 0) for x in g) and any(np.all(x == 0) for x in g)
    assert max(np.max(np.abs(x)) for x in g) > 100
    losses = [loss for _, loss in run.inputs]
    assert any(b > a for a, b in itertools.pairwise(losses))
    assert any(b < a for a, b in itertools.pairwise(losses))


# -- every front ------------------------------------------------------------------


RUNS = [(front, scenario, dtype) for front, f in FRONTS.items() for scenario in REFERENCE_SCENARIOS
        for dtype in NP_DTYPES
        if dtype == "float64" or f.float32_scenarios is None or scenario in f.float32_scenarios]


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize(("front", "scenario", "dtype"), RUNS)
def test_front_matches_reference(front, variant, scenario, dtype):
    want = reference_run(variant, scenario, NP_DTYPES[dtype])
    f = FRONTS[front]
    with f.context(NP_DTYPES[dtype]):
        for t, (params, step_sizes) in enumerate(f.run(variant, SCENARIOS[scenario], want.w0,
                                                       want.inputs)):
            assert_step(want, t, params, step_sizes, front)
    assert t == len(want.path) - 1


def test_numpy_front_dict_matches_list():
    want = reference_run("irprop+", "plain", np.float64)
    params = {f"p{i}": w.copy() for i, w in enumerate(want.w0)}
    opt = rprop.numpy.Rprop(params, variant="irprop+", **SCENARIOS["plain"])
    for t, (grads, loss) in enumerate(want.inputs):
        opt.step({f"p{i}": g for i, g in enumerate(grads)}, loss=loss)
        assert_step(want, t, list(params.values()), [opt.state[k]["step_size"] for k in params],
                    "numpy (dict)")
    assert len(params) == len(SHAPES) + 1


def test_the_one_difference_subnormal_products_under_xla():
    """XLA on CPU flushes subnormal results to zero. A product g_prev * g below
    the normal range (|p| < 2.2e-308 in float64, 1.2e-38 in float32) is then 0
    for the JAX front ("no sign information": the step size is kept), while
    NumPy, torch and the reference see its sign. Here g = 1e-160 twice."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    import rprop.optax

    with jax.enable_x64(True):
        grads = [np.array([1e-160]), np.array([1e-160])]
        w = np.zeros(1)
        opt_np = rprop.numpy.Rprop([w], lr=0.1)
        opt_jax = rprop.optax.scale_by_rprop(0.1)
        state = opt_jax.init(jnp.zeros(1))
        update = jax.jit(opt_jax.update)
        for g in grads:
            opt_np.step([g])
            _, state = update(jnp.asarray(g), state)
        assert opt_np.state[0]["step_size"][0] == 0.1 * 1.2  # p = 1e-320 > 0: grown
        assert float(state.step_sizes[0]) == 0.1  # p flushed to 0: kept
