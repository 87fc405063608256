"""Every front, every variant, against the per-element transcription of the
papers (tests/reference.py), given the same gradients and losses.

Result: exact (np.array_equal, 0 ulp) for the NumPy front, the JAX front
(under jax_enable_x64 for float64, and in float32) and the torch front, at
every step, for real and complex parameters. Each output element is one IEEE
multiplication (step size by eta), one clamp and one addition, in the same
order and precision everywhere, so there is nothing to round differently.

The JAX front has no ``maximize`` or ``weight_decay`` option; those scenarios
feed it what the option would compute: the negated gradients and loss, and
``optax.add_decayed_weights`` chained in front (``g + weight_decay * p``,
the same operation as the core's), and the trajectory is still exact.

The one difference: XLA on CPU flushes subnormal numbers to zero, so where a
product g_prev * g falls below the normal range the JAX front sees p = 0
(see the last test). The gradients here stay far from that.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import rprop.numpy
from reference import VARIANT_NAMES, ReferenceRprop

STEPS = 60
SCENARIOS = {
    "plain": {},
    "maximize": {"maximize": True},
    # step sizes hit both bounds within the run (checked below)
    "tight-bounds": {"step_sizes": (1e-2, 0.06)},
    "lr-above-max": {"lr": 2.0, "step_sizes": (1e-4, 0.5)},
    "lr-below-min": {"lr": 1e-5, "step_sizes": (1e-3, 10.0)},
    "weight-decay": {"weight_decay": 0.1},
}
SHAPES = [(7,), (2, 3), ()]


def _grad(w: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """Changes sign often, exactly 0 in ~15% of elements (and everywhere at
    t = 5), now and then 1e3 times larger."""
    g = np.sin(3.0 * w + 0.7 * t) + 0.3 * rng.standard_normal(w.shape)
    g = g * (rng.random(w.shape) > 0.15)
    if t == 5:
        g = g * 0.0
    if t % 17 == 0:
        g = g * 1e3
    return g.astype(w.dtype)


def _grads_for(params: list[np.ndarray], t: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for w in params:
        if np.iscomplexobj(w):
            out.append(_grad(w.real, t, rng) + 1j * _grad(w.imag, t, rng))
        else:
            out.append(_grad(w, t, rng))
    return out


def _loss(t: int, grads: list[np.ndarray]) -> float:
    # goes up and down, so that iRprop+ both undoes and does not
    return float(sum(np.sum(np.abs(g)) for g in grads)) + (t % 3)


@functools.cache
def reference_run(variant: str, scenario: str, dtype: type) -> tuple[list, list, list]:
    """(initial params, [(grads, loss)] per step, [(params, step sizes)] per step)."""
    rng = np.random.default_rng(7)
    kw = {"lr": 0.05, **SCENARIOS[scenario]}
    cdt = np.complex64 if dtype == np.float32 else np.complex128
    w0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    w0.append((rng.standard_normal(4) + 1j * rng.standard_normal(4)).astype(cdt))
    ref = ReferenceRprop(w0, variant=variant, **kw)
    inputs, path = [], []
    for t in range(STEPS):
        grads = _grads_for(ref.params, t, rng)
        loss = _loss(t, grads)
        ref.step(grads, loss)
        inputs.append((grads, loss))
        path.append(([p.copy() for p in ref.params], [s.copy() for s in ref.step_size]))
    return w0, inputs, path


def _assert_same(path, t, params, step_sizes=None):
    want_params, want_steps = path[t]
    for i, (a, b) in enumerate(zip(want_params, params, strict=True)):
        b = np.asarray(b)
        assert a.dtype == b.dtype, f"step {t}, param {i}: dtype {b.dtype}, expected {a.dtype}"
        assert np.array_equal(a, b), f"step {t}, param {i}: max |diff| {np.max(np.abs(a - b))}"
    if step_sizes is not None:
        for i, (a, s) in enumerate(zip(want_steps, step_sizes, strict=True)):
            s = np.asarray(s)
            if np.iscomplexobj(s):
                s = np.stack([s.real, s.imag], axis=-1)
            assert np.array_equal(a, s), f"step {t}, step sizes of param {i} differ"


def _torch_kwargs(scenario):
    return {"lr": 0.05, **SCENARIOS[scenario]}


# -- the scenarios really exercise what they claim ---------------------------------


def test_tight_bounds_scenario_hits_both_bounds():
    lo, hi = SCENARIOS["tight-bounds"]["step_sizes"]
    for variant in VARIANT_NAMES:
        _, _, path = reference_run(variant, "tight-bounds", np.float64)
        seen = np.concatenate([s.ravel() for _, steps in path for s in steps])
        assert (seen == lo).any() and (seen == hi).any(), variant


# -- NumPy ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_numpy_front_matches_reference(variant, scenario, dtype):
    w0, inputs, path = reference_run(variant, scenario, dtype)
    params = [w.copy() for w in w0]
    opt = rprop.numpy.Rprop(params, variant=variant, **_torch_kwargs(scenario))
    for t, (grads, loss) in enumerate(inputs):
        opt.step(grads, loss=loss)
        _assert_same(path, t, params, [opt.state[i]["step_size"] for i in range(len(params))])


def test_numpy_front_dict_matches_list():
    w0, inputs, path = reference_run("irprop+", "plain", np.float64)
    params = {f"p{i}": w.copy() for i, w in enumerate(w0)}
    opt = rprop.numpy.Rprop(params, lr=0.05, variant="irprop+")
    for t, (grads, loss) in enumerate(inputs):
        opt.step({f"p{i}": g for i, g in enumerate(grads)}, loss=loss)
        _assert_same(path, t, list(params.values()))


# -- torch ----------------------------------------------------------------------


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_torch_front_matches_reference(variant, scenario):
    torch = pytest.importorskip("torch")
    import rprop

    w0, inputs, path = reference_run(variant, scenario, np.float64)
    ps = [torch.tensor(w, requires_grad=True) for w in w0]
    opt = rprop.Rprop(ps, variant=variant, **_torch_kwargs(scenario))
    for t, (grads, loss) in enumerate(inputs):
        for p, g in zip(ps, grads, strict=True):
            p.grad = torch.tensor(g)
        opt.step(loss=loss if variant == "irprop+" else None)
        _assert_same(path, t, [p.detach().numpy() for p in ps],
                     [opt.state[p]["step_size"].numpy() for p in ps])


# -- JAX ------------------------------------------------------------------------


def _jax_run(variant, scenario, dtype):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import rprop.optax

    kw = _torch_kwargs(scenario)
    smin, smax = kw.get("step_sizes", (1e-6, 50.0))
    opt = rprop.optax.rprop(kw["lr"], 0.5, 1.2, smin, smax, variant=variant)
    if "weight_decay" in kw:
        opt = optax.chain(optax.add_decayed_weights(kw["weight_decay"]), opt)
    sign = -1.0 if kw.get("maximize") else 1.0

    @jax.jit
    def step(params, state, grads, loss):
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    w0, inputs, path = reference_run(variant, scenario, dtype)
    params = [jnp.asarray(w) for w in w0]
    assert [p.dtype for p in params] == [w.dtype for w in w0]
    state = opt.init(params)
    for t, (grads, loss) in enumerate(inputs):
        grads = [jnp.asarray(sign * g) for g in grads]
        params, state = step(params, state, grads, jnp.asarray(sign * loss))
        inner = state[-1][0] if "weight_decay" in kw else state[0]
        _assert_same(path, t, params, inner.step_sizes)
    assert step._cache_size() == 1  # compiled once


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_jax_front_matches_reference_float64(variant, scenario, jax_x64):
    _jax_run(variant, scenario, np.float64)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_jax_front_matches_reference_float32(variant):
    _jax_run(variant, "plain", np.float32)


@pytest.fixture
def jax_x64():
    """jax_enable_x64 for this test only (a context manager, thread-local, so
    nothing leaks into other tests of the same worker)."""
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        yield


def test_the_one_difference_subnormal_products_under_xla(jax_x64):
    """XLA on CPU flushes subnormal results to zero. A product g_prev * g below
    the normal range (|p| < 2.2e-308 in float64, 1.2e-38 in float32) is then 0
    for the JAX front ("no sign information": the step size is kept), while
    NumPy, torch and the reference see its sign. Here g = 1e-160 twice."""
    import jax
    import jax.numpy as jnp

    import rprop.optax

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
