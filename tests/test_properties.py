"""Hypothesis properties of Rprop, each written once and checked on every
front of the table (tests/_table.py: torch's default path, NumPy, optax),
for every variant they hold for."""

from __future__ import annotations

import functools
import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rprop
import rprop.numpy
from _table import (
    FRONTS,
    NAMED_PATHS,
    PATHS,
    REFERENCE_VARIANTS,
    VARIANT_NAMES,
    paths_for,
    run_optax,
)

# Zero, or a magnitude in [1e-100, 1e3]: scaling by 2**k (|k| <= 20) and the
# products g_prev * g then stay exact (no subnormal underflow, no overflow),
# which is the premise of the scaling property.
SIZE = 5
finite = st.one_of(
    st.just(0.0),
    st.floats(1e-100, 1e3).flatmap(lambda m: st.sampled_from([m, -m])),
)
grad_seqs = st.lists(st.lists(finite, min_size=SIZE, max_size=SIZE), min_size=1, max_size=25)
hypers = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-6, 10.0),
        "eta_minus": st.floats(0.05, 0.95),
        "eta_plus": st.floats(1.01, 3.0),
        "step_min": st.floats(0.0, 1e-2),
        "span": st.floats(1.0, 1e4),
    }
)
variants = st.sampled_from(REFERENCE_VARIANTS)

# Fronts and how many examples each gets: the optax front runs eagerly (a
# jit per example would compile every time), about 3 ms a step.
PROPERTY_FRONTS = {"torch-default": 60, "numpy": 60, "optax": 15}


def for_every_front(*strategies):
    """``@given(*strategies)`` once per front, with that front's number of
    examples; the test takes the front's name first."""

    def decorate(test):
        @pytest.mark.parametrize("front", list(PROPERTY_FRONTS))
        @functools.wraps(test)
        def run_on(front):
            def bound(*args):
                return test(front, *args)

            params = list(inspect.signature(test).parameters.values())[1:]
            bound.__signature__ = inspect.Signature(params)
            bound.__name__ = bound.__qualname__ = f"{test.__name__}_{front.replace('-', '_')}"
            settings(max_examples=PROPERTY_FRONTS[front], deadline=None)(
                given(*strategies)(bound))()

        del run_on.__wrapped__  # pytest reads the signature: (front) only
        return run_on

    return decorate


def run(front, grad_seq, h, variant, scale=1.0, observe=None):
    """Step one float64 array of SIZE zeros over ``grad_seq`` (times ``scale``)
    on ``front``; ``observe(before, grad, after, step_size, bounds)`` after
    each step; returns the parameters after each step."""
    bounds = (h["step_min"], h["step_min"] + h["span"] * 1e-3)
    kwargs = {"lr": h["lr"], "etas": (h["eta_minus"], h["eta_plus"]), "step_sizes": bounds}
    # the whole loss scales too: iRprop+ compares losses, scaling keeps their order
    inputs = [([np.array(g, dtype=np.float64) * scale],
               (float(np.sum(np.square(g))) + (t % 3)) * scale)
              for t, g in enumerate(grad_seq)]
    f = FRONTS[front]
    steps = (run_optax(variant, kwargs, [np.zeros(SIZE)], inputs, jit=False)
             if front == "optax" else f.run(variant, kwargs, [np.zeros(SIZE)], inputs))
    path, before = [], np.zeros(SIZE)
    with f.context(np.float64):
        for (grads, _), (params, step_sizes) in zip(inputs, steps, strict=True):
            after, step_size = np.array(params[0]), np.array(step_sizes[0])
            if observe:
                observe(before, grads[0], after, step_size, bounds)
            path.append(after)
            before = after
    return path


@for_every_front(grad_seqs, hypers, variants)
def test_step_sizes_stay_within_bounds(front, grad_seq, h, variant):
    def check(before, grad, after, step_size, bounds):
        assert np.all(step_size >= bounds[0]) and np.all(step_size <= bounds[1])

    run(front, grad_seq, h, variant, observe=check)


@for_every_front(grad_seqs, hypers, st.sampled_from(["rprop-", "irprop-"]))
def test_update_is_zero_or_a_step_against_the_gradient(front, grad_seq, h, variant):
    def check(before, grad, after, step_size, bounds):
        moved = after != before
        # Where it moved, it moved by exactly the step size, against the gradient.
        assert np.all(np.sign(after - before)[moved] == -np.sign(grad[moved]))
        assert np.array_equal((before + -np.sign(grad) * step_size)[moved], after[moved])
        # Where the gradient is 0 it did not move.
        assert not np.any(moved & (grad == 0))

    run(front, grad_seq, h, variant, observe=check)


@for_every_front(grad_seqs, hypers, variants, st.integers(-20, 20))
def test_scaling_gradients_by_a_power_of_two_changes_nothing(front, grad_seq, h, variant, k):
    a = run(front, grad_seq, h, variant)
    b = run(front, grad_seq, h, variant, scale=math.ldexp(1.0, k))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


@for_every_front(st.integers(1, 30), hypers, variants)
def test_zero_gradients_leave_parameters_unchanged(front, n, h, variant):
    def check(before, grad, after, step_size, bounds):
        assert np.array_equal(before, after)

    run(front, [[0.0] * SIZE] * n, h, variant, observe=check)


@for_every_front(grad_seqs, hypers, variants, st.integers(0, SIZE - 1))
def test_a_coordinate_whose_gradient_is_always_zero_never_moves(front, grad_seq, h, variant,
                                                                where):
    # ... nor does anything move on a step whose gradient is all zeros
    seq = [[0.0 if i == where else x for i, x in enumerate(g)] for g in grad_seq]
    zero_step = len(seq) // 2
    seq.insert(zero_step, [0.0] * SIZE)
    seen = []

    def check(before, grad, after, step_size, bounds):
        assert after[where] == 0.0
        if len(seen) == zero_step:  # no sign change is possible, so no undo either
            assert np.array_equal(before, after)
        seen.append(1)

    run(front, seq, h, variant, observe=check)


# -- a gradient that is the parameter's own memory ------------------------------------


def _aliased_torch(path, variant, x0, kwargs, alias):
    p = torch.tensor(x0, requires_grad=True)
    opt = rprop.Rprop([p], variant=variant, **kwargs, **PATHS[path])
    for t in range(6):
        p.grad = p.detach() if alias else p.detach().clone()
        opt.step(loss=float(6 - t)) if variant == "irprop+" else opt.step()
    return [p.detach().numpy().copy(), *(s.numpy().copy() for s in opt.state[p].values())]


def _aliased_numpy(variant, x0, kwargs, alias):
    x = x0.copy()
    opt = rprop.numpy.Rprop([x], variant=variant, **kwargs)
    for t in range(6):
        opt.step([x if alias else x.copy()], loss=float(6 - t))
    return [x, *opt.state[0].values()]


ALIASED = {**{f"torch-{path}": functools.partial(_aliased_torch, path) for path in NAMED_PATHS},
           "numpy": _aliased_numpy}


@pytest.mark.parametrize(("front", "variant"),
                         [(front, v) for front in ALIASED for v in VARIANT_NAMES
                          if front == "numpy" or front[len("torch-"):] in paths_for(v)])
def test_gradient_that_is_the_parameter_itself(front, variant):
    """f = |x|^2 / 2 has gradient x: passing the parameter's own memory as its
    gradient (p.grad = p.detach()) equals passing a copy, on a small array
    and on one over the fused kernel's threading threshold with weight decay
    (each element's gradient is read before the parameter is written), and
    the for-loop path's parameters without aliasing."""
    small = np.array([0.005, -0.3, 2.0])
    big = np.random.default_rng(2).standard_normal(50_000).astype(np.float32)
    for x0, kwargs in ((small, {}), (big, {"lr": 0.1, "weight_decay": 0.1})):
        a = ALIASED[front](variant, x0, kwargs, alias=True)
        b = ALIASED[front](variant, x0, kwargs, alias=False)
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x, y)
        assert np.array_equal(a[0], _aliased_torch("for-loop", variant, x0, kwargs, alias=False)[0])
