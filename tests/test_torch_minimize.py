"""rprop.torch.minimize: SciPy's minimize contract on torch tensors.

Oracles: scipy.optimize.minimize(method="L-BFGS-B") on the same problems, and
rprop.minimize (the NumPy front, on its own float64 arithmetic) which must
visit the same points bit for bit when fed the same f and gradient.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
scipy_optimize = pytest.importorskip("scipy.optimize")

import rprop  # noqa: E402
import rprop.torch  # noqa: E402
from reference import VARIANT_NAMES  # noqa: E402

OptimizeResult = scipy_optimize.OptimizeResult
rosen, rosen_der = scipy_optimize.rosen, scipy_optimize.rosen_der
F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    # Tensors of a few elements: on a loaded machine, torch's default thread
    # pool spin-waits and makes a 78-step GP fit take 6.7 s instead of 0.23 s.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def leaf(values, dtype=F64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


def quad(x):
    return float(np.sum((x - np.arange(1, x.size + 1)) ** 2))


def quad_grad(x):
    return 2 * (x - np.arange(1, x.size + 1))


def tquad(x):
    return ((x - torch.arange(1, x.numel() + 1, dtype=x.dtype)) ** 2).sum()


def torch_fg(fun):
    """fun (on a torch tensor) as rprop.minimize's jac=True pair, by autograd:
    the same f and gradient, bit for bit, as the torch front computes."""
    def fg(x):
        t = torch.tensor(x, dtype=F64, requires_grad=True)
        loss = fun(t)
        (g,) = torch.autograd.grad(loss, t)
        return loss.item(), g.numpy()
    return fg


def same_result(res, ref, same_gradient=True):
    """The torch result is the NumPy front's: same points, rule, counts, message
    (and the same gradient, where both fronts computed it the same way)."""
    assert np.array_equal(res.x.numpy(), ref.x)
    if same_gradient:
        assert np.array_equal(res.jac.numpy(), ref.jac)
    else:
        assert np.allclose(res.jac.numpy(), ref.jac, rtol=1e-12, atol=0)
    assert np.array_equal(res.step_size.numpy(), ref.step_size)
    assert res.fun == ref.fun
    assert (res.nit, res.nfev, res.status, res.success, res.stop_rule) == (
        ref.nit, ref.nfev, ref.status, ref.success, ref.stop_rule)
    assert res.message == ref.message.replace("fun returned", "the closure returned")


# -- agreement with the NumPy front and with SciPy ----------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_rosenbrock_is_the_numpy_fronts_trajectory_bitwise(variant):
    # SciPy's rosen_der and torch's autograd of the same formula round
    # differently in the last bit, but Rprop reads only the gradient's signs
    # (and iRprop+ the loss, which agrees): both fronts run the same core
    # update, so every iterate agrees bit for bit.
    x = leaf([-1.2, 1.0])
    res = rprop.torch.minimize(lambda: trosen(x), x, variant=variant, maxiter=300)
    ref = rprop.minimize(rosen, [-1.2, 1.0], jac=rosen_der, variant=variant, maxiter=300)
    same_result(res, ref, same_gradient=False)
    assert torch.equal(x.detach(), res.x) and x.grad is None


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_bounded_quadratic_matches_numpy_front_and_lbfgsb(variant):
    lo, hi = np.array([-1.0, 0.0, 2.5]), np.array([0.5, 10.0, 2.6])
    x = leaf([0.0, 5.0, 2.55])
    res = rprop.torch.minimize(lambda: tquad(x), x, variant=variant, lr=1.0,
                               bounds=(torch.tensor(lo), torch.tensor(hi)))
    ref = rprop.minimize(quad, [0.0, 5.0, 2.55], jac=quad_grad, variant=variant, lr=1.0,
                         bounds=list(zip(lo, hi)))
    same_result(res, ref)
    oracle = scipy_optimize.minimize(quad, [0.0, 5.0, 2.55], jac=quad_grad, method="L-BFGS-B",
                                     bounds=list(zip(lo, hi)))
    assert res.success and np.allclose(res.x.numpy(), oracle.x, rtol=0, atol=1e-5)
    assert res.x[0] == 0.5 and res.x[2] == 2.6  # on the bounds, exactly


@pytest.mark.slow
def test_rosenbrock_reaches_lbfgsbs_minimum():
    # Rprop needs ~6000 steps in Rosenbrock's valley, and a step-size floor
    # below the default to reach gtol (docs/fronts.md).
    x = leaf([-1.2, 1.0])
    res = rprop.torch.minimize(lambda: trosen(x), x, step_sizes=(1e-10, 50), xtol=1e-10,
                               maxiter=10000)
    oracle = scipy_optimize.minimize(rosen, [-1.2, 1.0], jac=rosen_der, method="L-BFGS-B")
    assert res.success and res.stop_rule == "gtol"
    # gtol = 1e-5 and the smallest curvature at (1, 1) (~0.4) put x within ~3e-5.
    assert np.allclose(res.x.numpy(), oracle.x, rtol=0, atol=1e-4)
    assert res.fun <= 1e-9


def gp_nll(X, Y):
    """Negative log marginal likelihood of a GP with an RBF kernel, in
    log-parameters (lengthscale, signal std, noise std)."""
    n = X.numel()
    d2 = (X[:, None] - X[None, :]) ** 2
    eye = torch.eye(n, dtype=F64)

    def nll(log_ell, log_sf, log_sn):
        K = (torch.exp(2 * log_sf) * torch.exp(-0.5 * d2 / torch.exp(2 * log_ell))
             + torch.exp(2 * log_sn) * eye)
        L = torch.linalg.cholesky(K)
        alpha = torch.cholesky_solve(Y[:, None], L)
        return (0.5 * (Y[:, None] * alpha).sum() + torch.log(torch.diagonal(L)).sum()
                + 0.5 * n * math.log(2 * math.pi))
    return nll


def test_gp_marginal_likelihood_fit_matches_lbfgsb():
    gen = torch.Generator().manual_seed(0)
    X = torch.linspace(0, 5, 20, dtype=F64)
    Y = torch.sin(X) + 0.1 * torch.randn(20, generator=gen, dtype=F64)
    nll = gp_nll(X, Y)
    # three separate tensors, as GP code holds its hyperparameters
    params = [leaf(0.0), leaf(0.0), leaf(0.0)]
    res = rprop.torch.minimize(lambda: nll(*params), params)
    oracle = scipy_optimize.minimize(torch_fg(lambda t: nll(t[0], t[1], t[2])), np.zeros(3),
                                     jac=True, method="L-BFGS-B")
    assert res.success and res.stop_rule == "gtol" and res.nit < 200
    assert isinstance(res.x, list) and [t.shape for t in res.x] == [torch.Size([])] * 3
    assert np.allclose([float(t) for t in res.x], oracle.x, rtol=0, atol=1e-4)
    assert res.fun == pytest.approx(oracle.fun, rel=0, abs=1e-9)
    assert max(abs(float(g)) for g in res.jac) <= 1e-5


def test_several_tensors_are_one_vector_to_the_numpy_front():
    # A (2, 2) matrix and a (3,) vector with per-tensor bounds: the NumPy front
    # on their concatenation (row-major) visits the same points.
    target = torch.arange(1.0, 8.0, dtype=F64)
    A, b = leaf([[0.0, 0.0], [0.0, 0.0]]), leaf([4.0, 0.0, 0.0])

    def closure():
        return ((torch.cat([A.flatten(), b]) - target) ** 2).sum()

    res = rprop.torch.minimize(closure, [A, b], bounds=[(None, 2.5), (torch.tensor([4.0, 0, 0]),
                                                                      6.5)],
                               variant="rprop+", lr=0.3)
    ref = rprop.minimize(quad, [0.0] * 4 + [4.0, 0.0, 0.0], jac=quad_grad, variant="rprop+",
                         lr=0.3,
                         bounds=[(None, 2.5)] * 4 + [(4.0, 6.5), (0, 6.5), (0, 6.5)])
    assert np.array_equal(torch.cat([res.x[0].flatten(), res.x[1]]).numpy(), ref.x)
    assert res.nit == ref.nit and res.stop_rule == ref.stop_rule
    assert res.x[0].shape == (2, 2) and res.step_size[0].shape == (2, 2)
    assert torch.equal(A.detach(), res.x[0]) and torch.equal(b.detach(), res.x[1])


def test_maximize_is_minimize_of_the_negated_loss():
    x, y = leaf([0.0, 0.0]), leaf([0.0, 0.0])
    up = rprop.torch.minimize(lambda: -trosen(x), x, maximize=True, maxiter=200)
    down = rprop.torch.minimize(lambda: trosen(y), y, maxiter=200)
    assert torch.equal(up.x, down.x) and up.nit == down.nit
    assert up.fun == -down.fun and torch.equal(up.jac, -down.jac)


def test_maximize_with_bounds_projects_the_ascent_direction():
    # max -(x - 3)^2 on [0, 1]: x goes up to its upper bound and stays.
    x = leaf([0.5])
    res = rprop.torch.minimize(lambda: -((x - 3) ** 2).sum(), x, maximize=True,
                               bounds=(0.0, 1.0), lr=0.2)
    assert res.success and res.stop_rule == "gtol" and res.x.item() == 1.0


def test_the_docs_example_runs_and_finds_lbfgsbs_optimum(capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "fronts.md").read_text()
    section = text[text.index("## `rprop.torch.minimize`"):]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    scope: dict = {}
    exec(block, scope)
    res, theta, nll = scope["res"], scope["theta"], scope["nll"]
    assert capsys.readouterr().out.startswith("gtol ")
    assert all(torch.equal(t.detach(), x) for t, x in zip(theta, res.x))
    oracle = scipy_optimize.minimize(torch_fg(lambda t: nll(t[0], t[1], t[2])), np.zeros(3),
                                     jac=True, method="L-BFGS-B", bounds=[(-5, 5)] * 3)
    assert np.allclose([t.item() for t in res.x], oracle.x, rtol=0, atol=1e-4)


# -- the closure and params ---------------------------------------------------------------


def test_closure_may_call_backward_itself():
    x, y = leaf([-1.2, 1.0]), leaf([-1.2, 1.0])

    def torch_style():
        loss = trosen(y)
        loss.backward()
        return loss

    auto = rprop.torch.minimize(lambda: trosen(x), x, maxiter=100)
    manual = rprop.torch.minimize(torch_style, y, maxiter=100)
    assert torch.equal(auto.x, manual.x) and auto.nit == manual.nit
    # after backward, a float loss is enough
    z = leaf([-1.2, 1.0])

    def float_loss():
        loss = trosen(z)
        loss.backward()
        return loss.item()

    assert torch.equal(rprop.torch.minimize(float_loss, z, maxiter=100).x, auto.x)


def test_module_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    X, Y = torch.randn(16, 3), torch.randn(16, 1)
    lstsq = torch.linalg.lstsq(torch.cat([X, torch.ones(16, 1)], 1), Y).solution.flatten()
    res = rprop.torch.minimize(
        lambda: torch.nn.functional.mse_loss(model(X), Y), model.parameters(), gtol=1e-4)
    assert res.success and isinstance(res.x, list) and len(res.x) == 2
    assert torch.allclose(torch.cat([model.weight.flatten(), model.bias]).detach(), lstsq,
                          atol=1e-3)
    assert res.x[0].dtype == torch.float32 and model.weight.grad is None


def test_a_loss_that_stops_reaching_params_later_reads_as_zero_gradient():
    # Only the first evaluation must reach params (a wiring check); later, a
    # constant piece of a piecewise loss is an honest zero gradient.
    x = leaf([1.0])
    res = rprop.torch.minimize(lambda: (x**2).sum() if x.item() > 0.5 else torch.tensor(0.25),
                               x, lr=0.6)  # 1 -> 0.4: a flat piece
    assert res.success and res.stop_rule == "gtol" and res.nit == 1 and res.x.item() == 0.4


def test_a_param_the_loss_does_not_reach_has_zero_gradient():
    x, unused = leaf([0.0]), leaf([5.0])
    res = rprop.torch.minimize(lambda: ((x - 1) ** 2).sum(), [x, unused])
    assert res.success and res.x[1].item() == 5.0 and res.jac[1].item() == 0.0


# -- bounds --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_every_iterate_is_feasible(variant):
    lo, hi = torch.tensor([-1.0, 0.0, 2.5], dtype=F64), torch.tensor([0.5, 10.0, 2.6],
                                                                     dtype=F64)
    x = leaf([0.0, 5.0, 2.55])
    visited = []

    def closure():
        visited.append(x.detach().clone())
        return tquad(x)

    res = rprop.torch.minimize(closure, x, variant=variant, lr=1.0, bounds=(lo, hi))
    visited = torch.stack(visited)
    assert bool((visited >= lo).all()) and bool((visited <= hi).all())
    assert res.success


@pytest.mark.parametrize("variant", ["irprop+", "rprop+"])
def test_undo_at_a_bound_returns_to_the_previous_point(variant):
    # (x - 0.85)² on [0, 1] from 0.5 with lr 0.3: 0.5 -> 0.8 -> 1.16, clipped
    # to 1.0 (worse, and the gradient flips): the undo takes back the 0.2
    # actually moved, not the 0.36 of the unclipped step.
    x = leaf([0.5])
    visited = []

    def closure():
        visited.append(x.item())
        return ((x - 0.85) ** 2).sum()

    rprop.torch.minimize(closure, x, bounds=(0.0, 1.0), lr=0.3, variant=variant, maxiter=3)
    assert visited[:3] == pytest.approx([0.5, 0.8, 1.0])
    assert visited[3] == pytest.approx(0.8, abs=1e-15)


def test_start_outside_the_bounds_is_clipped_with_a_warning():
    x = leaf([5.0, 0.0])
    with pytest.warns(scipy_optimize.OptimizeWarning, match="outside the bounds"):
        res = rprop.torch.minimize(lambda: tquad(x), x, bounds=(0.0, 0.5), maxiter=0)
    assert res.x.tolist() == [0.5, 0.0] and x.tolist() == [0.5, 0.0]


# -- stop rules: the NumPy front's, with its messages ---------------------------------------


def absdev(x):
    return (x - 1).abs().sum()


@pytest.mark.parametrize(("fun", "np_fun", "x0", "kwargs", "rule"), [
    (tquad, quad, [0.0, 0.0], {}, "gtol"),
    (tquad, quad, [0.0, 0.0], {"gtol": 1e-3}, "gtol"),
    (tquad, quad, [0.0, 0.0], {"tol": 1e-2}, "gtol"),
    (absdev, None, [0.0, 0.0], {}, "xtol"),
    (absdev, None, [0.0], {"xtol": 1e-7, "maxiter": 200}, "maxiter"),
    (tquad, quad, [0.0, 0.0], {"ftol": 1e-3, "gtol": 0}, "ftol"),
    (trosen, rosen, [-1.2, 1.0], {"maxiter": 10}, "maxiter"),
    (trosen, rosen, [-1.2, 1.0], {"maxfev": 10}, "maxfev"),
    (trosen, rosen, [-1.2, 1.0], {"maxiter": 0}, "maxiter"),
])
def test_stop_rules_match_the_numpy_front(fun, np_fun, x0, kwargs, rule):
    x = leaf(x0)
    res = rprop.torch.minimize(lambda: fun(x), x, **kwargs)
    ref = rprop.minimize(torch_fg(fun), x0, jac=True, **kwargs)
    same_result(res, ref)
    assert res.stop_rule == rule
    if np_fun is not None:  # and SciPy-side arithmetic agrees too
        jac = {"quad": quad_grad, "rosen": rosen_der}[np_fun.__name__]
        np_res = rprop.minimize(np_fun, x0, jac=jac, **kwargs)
        assert np.array_equal(np_res.x, res.x.numpy()) and np_res.nit == res.nit


def test_gtol_returns_the_final_iterate_even_if_an_earlier_one_was_lower():
    # sin(3x) + x²/10 from 0.5 with lr 1: Rprop passes the deep minimum and
    # stops (gtol) at a shallower one; x is the point that satisfied gtol.
    def fun(t):
        return (torch.sin(3 * t) + 0.1 * t**2).sum()

    x = leaf([0.5])
    seen = []

    def closure():
        loss = fun(x)
        seen.append((loss.item(), x.item()))
        return loss

    res = rprop.torch.minimize(closure, x, lr=1.0, gtol=1e-3, variant="irprop-")
    assert res.stop_rule == "gtol" and res.fun > min(seen)[0] + 0.5
    assert (res.fun, res.x.item()) == seen[-1] and x.item() == seen[-1][1]
    same_result(res, rprop.minimize(torch_fg(fun), [0.5], jac=True, lr=1.0, gtol=1e-3,
                                     variant="irprop-"))


def test_maxfev_counts_closure_calls():
    calls = []
    x = leaf([-1.2, 1.0])

    def closure():
        calls.append(1)
        return trosen(x)

    res = rprop.torch.minimize(closure, x, maxfev=10)
    assert res.nfev == res.njev == len(calls) == 10 and res.nit == 9
    assert res.message == ("Maximum number of function evaluations has been exceeded "
                           "(maxfev = 10, nfev = 10).")


def test_nonfinite_stops_with_the_best_finite_iterate():
    def fun(t):
        return (t**2).sum() if t.item() > -0.25 else t.sum() * math.nan

    x = leaf([1.0])
    res = rprop.torch.minimize(lambda: fun(x), x, lr=0.8)  # 1 -> 0.2 -> -0.76
    ref = rprop.minimize(torch_fg(fun), [1.0], jac=True, lr=0.8)
    same_result(res, ref)
    assert res.status == 3 and res.message.startswith(
        "NaN result encountered: the closure returned a non-finite value at iteration 2")
    assert res.x.item() == pytest.approx(0.2) and x.item() == res.x.item()


def test_nonfinite_gradient_at_x0():
    x = leaf([4.0])
    with pytest.warns(scipy_optimize.OptimizeWarning, match="outside the bounds"):
        res = rprop.torch.minimize(lambda: (x - 4).sqrt().sum(), x,
                                   bounds=(0.0, 3.0))  # clipped to 3: sqrt of -1
    assert res.status == 3 and res.nit == 0 and res.x.item() == 3.0
    assert "no iterate had a finite value and gradient: x is x0, projected onto the bounds" \
        in res.message


def test_callback_new_style_and_stop_iteration():
    seen = []

    def cb(intermediate_result):
        assert isinstance(intermediate_result, OptimizeResult)
        assert isinstance(intermediate_result.x, torch.Tensor)
        seen.append(intermediate_result.nit)
        if intermediate_result.nit == 7:
            raise StopIteration

    x = leaf([-1.2, 1.0])
    res = rprop.torch.minimize(lambda: trosen(x), x, callback=cb)
    assert (res.status, res.stop_rule, res.nit, res.success) == (99, "callback", 7, False)
    assert res.message == "`callback` raised `StopIteration`." and seen == list(range(1, 8))


def test_callback_legacy_gets_copies_shaped_as_params():
    xs = []
    a, b = leaf([0.0]), leaf([[0.0, 0.0]])
    rprop.torch.minimize(lambda: tquad(a) + tquad(b.flatten()), [a, b],
                         callback=xs.append, maxiter=3)
    assert len(xs) == 3 and all(isinstance(x, list) and x[1].shape == (1, 2) for x in xs)
    assert not torch.equal(xs[0][1], xs[2][1])  # copies, not the live tensors


def test_progress_bar(capsys):
    x = leaf([0.0, 0.0])
    rprop.torch.minimize(lambda: tquad(x), x, maxiter=5)
    assert capsys.readouterr().err == ""
    rprop.torch.minimize(lambda: tquad(x), x, maxiter=5, progress=True)
    err = capsys.readouterr().err
    assert "minimize" in err and "5/5" in err and "loss=" in err


def test_float32_params_stay_float32():
    x = leaf([-1.2, 1.0], dtype=torch.float32)
    res = rprop.torch.minimize(lambda: trosen(x), x, maxiter=50)
    assert res.x.dtype == res.jac.dtype == res.step_size.dtype == torch.float32
    assert isinstance(res.fun, float)


# -- bad input -----------------------------------------------------------------------------


OTHER = leaf([1.0, 2.0])  # a leaf that is not among params


def backward_of(loss):
    loss.backward()
    return loss


def _tm(**kw):
    x = leaf([0.0, 0.0])
    args = {"closure": lambda: tquad(x), "params": x, **kw}
    return lambda: rprop.torch.minimize(**args)


BAD_INPUTS = [
    (_tm(closure=3), TypeError, r"closure must be callable"),
    (_tm(params=[0.0, 1.0]), TypeError, r"params\[0\] must be a torch.Tensor, got float"),
    (_tm(params=5), TypeError, r"params must be a tensor, a list of tensors or "
                               r"model.parameters\(\), got int"),
    (_tm(params=[]), ValueError, r"params must hold at least one tensor"),
    (_tm(params=[{"params": [leaf([0.0])]}]), TypeError, r"params\[0\] is a param group"),
    (_tm(params=torch.zeros(2, requires_grad=False)), ValueError,
     r"params\[0\] must be a leaf tensor with requires_grad=True"),
    (_tm(params=torch.zeros(2, dtype=torch.int64)), TypeError,
     r"params\[0\] must be a real floating-point tensor, got torch.int64"),
    (_tm(params=torch.zeros(2, dtype=torch.complex128, requires_grad=True)), TypeError,
     r"params\[0\] must be a real floating-point tensor"),
    (_tm(params=leaf([0.0, math.nan])), ValueError, r"params\[0\] must be finite"),
    (_tm(params=torch.zeros(0, requires_grad=True)), ValueError, r"params\[0\] must not be empty"),
    (_tm(params=[leaf(0.0)] * 2), ValueError, r"params\[1\] is listed twice"),
    (_tm(bounds=[(0, 1), (0, 1), (0, 1)]), ValueError,
     r"got 3 entries for 1 tensor\(s\)"),
    (_tm(bounds=[(0, 1), (0, 1)]), ValueError, r"got 2 entries for 1 tensor\(s\)"),
    (_tm(bounds=([0, 0], [1, 1])), ValueError, r"got 2 entries for 1 tensor"),
    (_tm(bounds=[([0, 0], [1, 1])]), TypeError, r"bounds for params\[0\] must be None or a pair"),
    (_tm(bounds=5), TypeError, r"bounds must be None, a pair \(lo, hi\), or a list"),
    (_tm(bounds=(torch.zeros(3), 1.0)), ValueError,
     r"bounds for params\[0\]: lo of shape \(3,\) does not broadcast to the tensor's shape \(2,\)"),
    (_tm(bounds=(2.0, 1.0)), ValueError,
     r"bounds for params\[0\]: lower bound 2.0 > upper bound 1.0 at flat index 0"),
    (_tm(bounds=(math.nan, 1.0)), ValueError, r"bounds for params\[0\] contain NaN"),
    (_tm(bounds=(math.inf, math.inf)), ValueError, r"leave no finite value"),
    (_tm(variant="bfgs"), ValueError, r"variant must be one of"),
    (_tm(lr=-1.0), ValueError, r"lr must be a finite number >= 0"),
    (_tm(etas=(1.5, 2.0)), ValueError, r"etas must satisfy 0 < eta_minus < 1 < eta_plus"),
    (_tm(step_sizes=(1.0,)), TypeError, r"step_sizes must be a pair"),
    (_tm(maximize=1), TypeError, r"maximize must be a bool"),
    (_tm(maxiter=-1), ValueError, r"maxiter must be an int >= 0, got -1"),
    (_tm(maxfev=0), ValueError, r"maxfev must be an int >= 1"),
    (_tm(gtol=-1.0), ValueError, r"gtol must be a finite number >= 0"),
    (_tm(xtol="small"), TypeError, r"xtol must be a number >= 0"),
    (_tm(ftol=math.inf), ValueError, r"ftol must be a finite number >= 0"),
    (_tm(callback=5), TypeError, r"callback must be callable or None"),
    (_tm(progress="yes"), TypeError, r"progress must be a bool"),
    (_tm(closure=lambda: torch.zeros(2, requires_grad=True)), ValueError,
     r"the closure must return a scalar loss \(one element\), got shape \(2,\)"),
    (_tm(closure=lambda: "1.0"), TypeError,
     r"the closure must return the loss as a one-element tensor, got str"),
    (_tm(closure=lambda: torch.tensor(1.0)), ValueError,
     r"the closure's loss does not depend on params through autograd"),
    (_tm(closure=lambda: 1.0), ValueError,
     r"the closure's loss does not depend on params through autograd"),
    (_tm(closure=lambda: (OTHER**2).sum()), ValueError,
     r"the closure's loss does not depend on params through autograd"),
    (_tm(closure=lambda: backward_of((OTHER**2).sum())), ValueError,
     r"the closure's loss does not depend on params through autograd"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_refused_arguments_leave_params_untouched():
    x = leaf([5.0, 0.0])
    before = x.detach().clone()
    with pytest.raises(ValueError, match="lower bound"):
        rprop.torch.minimize(lambda: tquad(x), x, bounds=[(2.0, 1.0)])
    assert torch.equal(x.detach(), before) and x.grad is None


# -- SciPy is optional ------------------------------------------------------------------------


def test_without_scipy_the_result_is_a_dict_with_attributes(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    for name in ("rprop._stopping", "rprop.torch._minimize"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(rprop, "_stopping", rprop._stopping, raising=False)
    monkeypatch.setattr(rprop.torch, "_minimize", rprop.torch._minimize)
    fresh = importlib.import_module("rprop.torch._minimize")
    x = leaf([0.0, 0.0])
    res = fresh.minimize(lambda: tquad(x), x)
    assert not isinstance(res, OptimizeResult) and isinstance(res, dict)
    assert res.success and res["nit"] == res.nit and res.stop_rule == "gtol"
    with pytest.raises(AttributeError):
        _ = res.hess_inv
    with pytest.warns(UserWarning, match="outside the bounds"):
        fresh.minimize(lambda: tquad(x), x, bounds=(0.0, 0.5), maxiter=0)
