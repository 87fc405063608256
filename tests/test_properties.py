"""Hypothesis properties of rprop.Rprop, for every variant."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rprop
from reference import VARIANT_NAMES

# Zero, or a magnitude in [1e-100, 1e3]: scaling by 2**k (|k| <= 20) and the
# products g_prev * g then stay exact (no subnormal underflow, no overflow),
# which is the premise of the scaling property.
finite = st.one_of(
    st.just(0.0),
    st.floats(1e-100, 1e3).flatmap(lambda m: st.sampled_from([m, -m])),
)
grad_seqs = st.lists(st.lists(finite, min_size=5, max_size=5), min_size=1, max_size=25)
hyper = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-6, 10.0),
        "eta_minus": st.floats(0.05, 0.95),
        "eta_plus": st.floats(1.01, 3.0),
        "step_min": st.floats(0.0, 1e-2),
        "span": st.floats(1.0, 1e4),
    }
)
variants = st.sampled_from(VARIANT_NAMES)
SETTINGS = settings(max_examples=60, deadline=None)


def run(grad_seq, h, variant, scale=1.0, observe=None):
    w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    bounds = (h["step_min"], h["step_min"] + h["span"] * 1e-3)
    opt = rprop.Rprop([w], lr=h["lr"], etas=(h["eta_minus"], h["eta_plus"]),
                      step_sizes=bounds, variant=variant)
    path = []
    for t, g in enumerate(grad_seq):
        before = w.detach().clone()
        grad = torch.tensor(g, dtype=torch.float64) * scale
        w.grad = grad.clone()
        # the whole loss scales too: iRprop+ compares losses, scaling keeps their order
        opt.step(loss=(float(np.sum(np.square(g))) + (t % 3)) * scale)
        if observe:
            observe(before, grad, w.detach(), opt.state[w], bounds)
        path.append(w.detach().clone())
    return path


@SETTINGS
@given(grad_seqs, hyper, variants)
def test_step_sizes_stay_within_bounds(grad_seq, h, variant):
    def check(before, grad, after, state, bounds):
        s = state["step_size"]
        assert torch.all(s >= bounds[0]) and torch.all(s <= bounds[1])

    run(grad_seq, h, variant, observe=check)


@SETTINGS
@given(grad_seqs, hyper, st.sampled_from(["rprop-", "irprop-"]))
def test_update_is_zero_or_step_against_gradient(grad_seq, h, variant):
    def check(before, grad, after, state, bounds):
        delta = after - before
        step = state["step_size"]
        moved = delta != 0
        # Where it moved, it moved by exactly the step size, against the gradient.
        assert torch.all(torch.sign(delta[moved]) == -torch.sign(grad[moved]))
        assert torch.equal((before + -torch.sign(grad) * step)[moved], after[moved])
        # Where the gradient is 0 it did not move.
        assert not torch.any(moved & (grad == 0))

    run(grad_seq, h, variant, observe=check)


@SETTINGS
@given(grad_seqs, hyper, variants, st.integers(-20, 20))
def test_power_of_two_gradient_scaling_leaves_trajectory_unchanged(grad_seq, h, variant, k):
    a = run(grad_seq, h, variant)
    b = run(grad_seq, h, variant, scale=math.ldexp(1.0, k))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@SETTINGS
@given(st.integers(1, 30), hyper, variants)
def test_zero_gradients_leave_parameters_unchanged(n, h, variant):
    def check(before, grad, after, state, bounds):
        assert torch.equal(before, after)

    run([[0.0] * 5] * n, h, variant, observe=check)
