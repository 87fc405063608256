"""rprop.optax: the paper's trajectory from the first step (every step against
tests/reference.py: tests/test_parity_reference.py), jit, dtypes,
complex leaves, pytrees, iRprop+'s loss, and errors."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402

import rprop.optax  # noqa: E402
from reference import VARIANT_NAMES  # noqa: E402


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _updates(opt, grads, params=None, losses=None):
    params = jnp.zeros(1) if params is None else params
    state = opt.init(params)
    update = jax.jit(opt.update)  # one compilation, not one per eager op
    out = []
    for t, g in enumerate(grads):
        extra = {} if losses is None else {"value": losses[t]}
        u, state = update(jnp.asarray(g), state, params, **extra)
        out.append(np.asarray(u))
    return out, state


# -- no lag: the difference from optax.rprop, by hand ------------------------------------


def test_first_update_is_the_papers_and_optax_rprop_lags():
    """iRprop-, lr = 0.1, gradients +1, +1, -1, +1, +1 (one element):

    step  sign test  step size        paper's update     optax.rprop 0.2.8
    1     p = 0      0.1              -0.1               0     (first update is zero)
    2     p > 0      0.1·1.2 = 0.12   -0.12              -0.1  (step 1's update)
    3     p < 0      0.12·0.5 = 0.06  0 (g forgotten)    0
    4     p = 0      0.06             -0.06              0     (step 3's update)
    5     p > 0      0.06·1.2 = 0.072 -0.072             -0.06 (step 4's update)
    """
    grads = [1.0, 1.0, -1.0, 1.0, 1.0]
    paper = [-0.1, -0.12, 0.0, -0.06, -0.072]
    lagged = [0.0, -0.1, 0.0, 0.0, -0.06]
    ours, _ = _updates(rprop.optax.rprop(0.1), [[g] for g in grads])
    theirs, _ = _updates(optax.rprop(0.1), [[g] for g in grads])
    np.testing.assert_allclose(np.concatenate(ours), paper, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(theirs), lagged, rtol=1e-6)


# -- jit, dtypes, pytrees, complex ----------------------------------------------------------


def _loss_fn(p):
    return (jnp.sum((p["w"].astype(jnp.float32) - 2.0) ** 2)
            + jnp.sum(jnp.abs(p["nested"][0] - (1.0 + 3.0j)) ** 2))


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_jit_compiles_once_and_converges(variant):
    opt = rprop.optax.rprop(0.1, variant=variant)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        loss, grads = jax.value_and_grad(_loss_fn)(params)
        grads = jax.tree.map(jnp.conj, grads)  # optax's convention for complex leaves
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

    params = {"w": jnp.zeros(3, jnp.bfloat16), "nested": (jnp.zeros(2, jnp.complex64),)}
    state = opt.init(params)
    for _ in range(60):
        params, state, loss = step(params, state)
    assert len(traces) == 1 and step._cache_size() == 1
    assert params["w"].dtype == jnp.bfloat16 and params["nested"][0].dtype == jnp.complex64
    assert float(loss) < 1e-3
    inner = state[0]
    assert isinstance(inner, rprop.optax.ScaleByRpropState) and int(inner.count) == 60
    assert (inner.prev_updates is None) == (variant in ("irprop-", "rprop-"))
    assert (inner.prev_loss is None) == (variant != "irprop+")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
def test_dtypes_are_preserved(dtype, x64):
    params = {"a": jnp.ones(3, dtype), "b": jnp.ones((), dtype)}
    opt = rprop.optax.rprop(0.01, variant="irprop+")
    state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.float32), params)
    updates, state = jax.jit(opt.update)(grads, state, params, value=jnp.float32(1.0))
    for tree in (updates, state[0].step_sizes, state[0].prev_grads, state[0].prev_updates):
        assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(tree))
    assert state[0].prev_loss.dtype == jnp.float64  # under x64: losses compare exactly


def test_complex_state_layout_and_independent_parts():
    z = jnp.zeros(2, jnp.complex64)
    opt = rprop.optax.scale_by_rprop(0.5, variant="rprop+")
    state = opt.init(z)
    assert state.step_sizes.dtype == jnp.complex64
    np.testing.assert_array_equal(state.step_sizes, np.full(2, 0.5 + 0.5j))
    # real and imaginary parts move independently, by the sign of each part
    u, state = jax.jit(opt.update)(jnp.array([1 - 2j, -3 + 0j]), state, z)
    np.testing.assert_array_equal(u, np.array([0.5 - 0.5j, -0.5 + 0j]))  # uphill, as optax
    # the state mirrors the params, so optax's params-aware helpers work on it
    doubled = optax.tree_map_params(opt, lambda p: 2 * p, state)
    np.testing.assert_array_equal(doubled.step_sizes, 2 * np.asarray(state.step_sizes))


def test_works_inside_optax_chain_with_value():
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      rprop.optax.rprop(0.1, variant="irprop+"))
    params = jnp.ones(3)
    state = opt.init(params)
    u, state = jax.jit(opt.update)(jnp.ones(3), state, params, value=1.0)
    np.testing.assert_allclose(u, -0.1 * np.ones(3), rtol=1e-6)


def test_scale_by_rprop_is_uphill_like_optax():
    u_ours, _ = _updates(rprop.optax.scale_by_rprop(0.1), [[1.0], [1.0]])
    u_theirs, _ = _updates(optax.scale_by_rprop(0.1), [[1.0], [1.0], [1.0]])
    np.testing.assert_allclose(np.concatenate(u_ours), [0.1, 0.12], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate(u_theirs)[1:], [0.1, 0.12], rtol=1e-6)


# -- errors ---------------------------------------------------------------------------------


def test_irprop_plus_needs_value():
    opt = rprop.optax.rprop(0.1, variant="irprop+")
    state = opt.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r'variant="irprop\+" needs the loss .*value=loss'):
        opt.update(jnp.ones(2), state, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"value \(the loss\) must be a real scalar"):
        opt.update(jnp.ones(2), state, jnp.zeros(2), value=jnp.ones(2))


BAD = [
    (lambda: rprop.optax.rprop(-0.1), ValueError, r"learning_rate must be a finite number >= 0"),
    (lambda: rprop.optax.rprop(optax.constant_schedule(0.1)), TypeError,
     r"learning_rate must be a number: it is Rprop's initial step size"),
    (lambda: rprop.optax.rprop(0.1, eta_minus=1.5), ValueError,
     r"etas must satisfy 0 < eta_minus < 1 < eta_plus"),
    (lambda: rprop.optax.rprop(0.1, min_step_size=1.0, max_step_size=0.5), ValueError,
     r"\(min_step_size, max_step_size\) must satisfy 0 <= min_step_size <= max_step_size"),
    (lambda: rprop.optax.rprop(0.1, variant="adam"), ValueError, r"variant must be one of"),
    (lambda: rprop.optax.rprop(0.1).init({"n": jnp.zeros(2, jnp.int32)}), TypeError,
     r"every parameter must be floating-point or complex; params\['n'\] has dtype int32"),
    (lambda: _updates(rprop.optax.rprop(0.1), [np.ones(3)], params=jnp.zeros(2)), ValueError,
     r"grads has shape \(3,\), its parameter has shape \(2,\)"),
    (lambda: _updates(rprop.optax.rprop(0.1), [np.ones(2) * 1j], params=jnp.zeros(2)),
     TypeError, r"is complex .* but its parameter is real"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_missing_jax_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax", None)
    monkeypatch.delitem(sys.modules, "rprop.optax", raising=False)
    with pytest.raises(ImportError, match=r'pip install "rprop\[jax\]"'):
        importlib.import_module("rprop.optax")


def test_apply_if_finite_skips_non_finite_steps():
    # The JAX front's counterpart of nonfinite="skip": optax's own wrapper.
    import optax

    opt = optax.apply_if_finite(rprop.optax.rprop(0.1, variant="irprop+"),
                                max_consecutive_errors=3)
    params = {"w": jnp.array([1.0, -2.0])}
    state = opt.init(params)
    seen = []
    for g, loss in [([1.0, 1.0], 2.0), ([float("nan"), 1.0], 3.0), ([1.0, -1.0], 1.0)]:
        updates, state = opt.update({"w": jnp.array(g)}, state, params, value=loss)
        params = optax.apply_updates(params, updates)
        seen.append((np.asarray(params["w"]).tolist(), int(state.notfinite_count)))
    # step 1 moves by -lr*sign; the NaN step is skipped; step 3 grows w[0]'s step to
    # 0.12 and flips w[1] (irprop+: no move, the loss went down).
    np.testing.assert_allclose(seen[0][0], [0.9, -2.1], rtol=0, atol=1e-7)
    assert seen[1] == (seen[0][0], 1)
    np.testing.assert_allclose(seen[2][0], [0.78, -2.1], rtol=0, atol=1e-6)
    assert seen[2][1] == 0
