"""The shared problems: each builds, its loss and gradient are finite, and known values hold."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from rprop import problems
from rprop.problems import PROBLEMS, linear_fit_data, two_spirals_data


def _loss_and_grads(inst: problems.Instance) -> tuple[float, list[np.ndarray]]:
    for p in inst.params:
        p.grad = None
    loss = inst.loss()
    loss.backward()
    return loss.item(), [p.grad.detach().numpy().copy() for p in inst.params]


@pytest.mark.parametrize("problem", problems.available(), ids=lambda p: p.name)
def test_builds_with_finite_loss_and_gradient(problem: problems.Problem) -> None:
    inst = problem.build(seed=0)
    assert inst.params and all(p.requires_grad and p.is_leaf for p in inst.params)
    loss, grads = _loss_and_grads(inst)
    assert math.isfinite(loss) and loss > problem.goal  # the start is not already solved
    assert all(np.isfinite(g).all() for g in grads)
    assert any(np.abs(g).sum() > 0 for g in grads)
    assert problem.goal > 0 and problem.budget > 0


@pytest.mark.parametrize("problem", problems.available(), ids=lambda p: p.name)
def test_a_seed_means_the_same_instance(problem: problems.Problem) -> None:
    a, b = _loss_and_grads(problem.build(3)), _loss_and_grads(problem.build(3))
    assert a[0] == b[0]
    if problem.name != "square":  # x² always starts at 5
        assert _loss_and_grads(problem.build(4))[0] != a[0]


def test_rosenbrock_minimum_is_zero_at_one_one() -> None:
    inst = problems.get("rosenbrock").build(0)
    with torch.no_grad():
        inst.params[0].copy_(torch.tensor([1.0, 1.0]))
    loss, (grad,) = _loss_and_grads(inst)
    assert loss == 0.0 and np.array_equal(grad, [0.0, 0.0])
    with torch.no_grad():
        inst.params[0].copy_(torch.tensor([-1.2, 1.0]))
    assert _loss_and_grads(inst)[0] == pytest.approx(24.2)  # the classic start value


def test_quadratic_is_ill_conditioned_with_minimum_at_zero() -> None:
    a = problems.quadratic_matrix()
    np.testing.assert_allclose(a, a.T, atol=1e-12)
    assert np.linalg.cond(a) == pytest.approx(1e4, rel=1e-6)
    assert np.abs(a - np.diag(np.diag(a))).max() > 1.0  # rotated: not axis-aligned
    inst = problems.get("quadratic").build(0)
    x0 = inst.params[0].detach().numpy().copy()
    loss, (grad,) = _loss_and_grads(inst)
    assert loss == pytest.approx(0.5 * x0 @ a @ x0)
    np.testing.assert_allclose(grad, a @ x0, rtol=1e-12)
    with torch.no_grad():
        inst.params[0].zero_()
    assert _loss_and_grads(inst)[0] == 0.0


def test_square_starts_at_five() -> None:
    loss, (grad,) = _loss_and_grads(problems.get("square").build(0))
    assert loss == 25.0 and grad.tolist() == [10.0]


def test_linear_fit_gradient_vanishes_at_the_least_squares_solution() -> None:
    data = linear_fit_data(0)
    assert data.x.shape == data.y.shape == (100, 1)
    a = np.hstack([data.x, np.ones_like(data.x)]).astype(np.float64)
    (w, b), *_ = np.linalg.lstsq(a, data.y[:, 0].astype(np.float64), rcond=None)
    assert abs(w - 2.0) < 0.05 and abs(b - 3.0) < 0.05
    inst = problems.get("linear-fit").build(0)
    assert inst.model.weight.item() == pytest.approx(data.w0)
    with torch.no_grad():
        inst.model.weight.fill_(w)
        inst.model.bias.fill_(b)
    loss, grads = _loss_and_grads(inst)
    residual = a @ np.array([w, b]) - data.y[:, 0]
    assert loss == pytest.approx(np.mean(residual**2), rel=1e-5)
    assert loss == pytest.approx(0.01, rel=0.2)  # the noise variance
    assert max(abs(float(g.ravel()[0])) for g in grads) < 1e-5
    assert problems.get("linear-fit").goal > loss  # the goal is reachable


def test_parity_and_encoder_targets() -> None:
    inst = problems.get("parity").build(0)
    net = inst.model
    assert [m.in_features for m in net if isinstance(m, torch.nn.Linear)] == [3, 3]
    enc = problems.get("encoder").build(0).model
    assert [(m.in_features, m.out_features) for m in enc if isinstance(m, torch.nn.Linear)] == [
        (10, 5), (5, 10)]


def test_sin_loss_matches_a_numpy_forward_pass() -> None:
    inst = problems.get("sin").build(2)
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in inst.params)
    assert w1.shape == (5, 1) and w2.shape == (1, 5)
    x = np.linspace(-math.pi, math.pi, 50)[:, None]
    out = np.tanh(x @ w1.T + b1) @ w2.T + b2
    assert inst.loss().item() == pytest.approx(np.mean((out - np.sin(x)) ** 2), rel=1e-5)


def test_two_spirals_data() -> None:
    x, y = two_spirals_data()
    assert x.shape == (194, 2) and y.shape == (194, 1)
    np.testing.assert_array_equal(x[:97], -x[97:])  # the second spiral is the first, mirrored
    assert y[:97].all() and not y[97:].any()
    assert np.abs(x).max() == pytest.approx(1.0)


def test_sklearn_datasets() -> None:
    pytest.importorskip("sklearn")
    digits = problems.get("digits").build(0)
    assert [p.shape[-1] for p in digits.params][:1] == [64]
    assert problems.get("diabetes").is_available


def test_unknown_problem_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown problem 'nope'; choose from rosenbrock"):
        problems.get("nope")


def test_missing_optional_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert not PROBLEMS["digits"].is_available
    assert "digits" not in [p.name for p in problems.available()]
    with pytest.raises(ImportError, match=r"needs sklearn.*rprop\[datasets\]"):
        PROBLEMS["digits"].build(0)


def test_import_is_light() -> None:
    code = ("import sys, rprop.problems, rprop.cli; "
            "print(sorted(m for m in ('torch', 'sklearn', 'jax', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
