"""rprop.minimize: SciPy conventions, bounds, stopping rules, counting, errors."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

scipy_optimize = pytest.importorskip("scipy.optimize")

import rprop  # noqa: E402
from reference import VARIANT_NAMES, ReferenceRprop  # noqa: E402
from rprop._minimize import DEFAULT_LR  # noqa: E402

OptimizeResult = scipy_optimize.OptimizeResult
rosen, rosen_der = scipy_optimize.rosen, scipy_optimize.rosen_der


def quad(x):
    return float(np.sum((x - np.arange(1, x.size + 1)) ** 2))


def quad_grad(x):
    return 2 * (x - np.arange(1, x.size + 1))


# -- results and counting ---------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_converges_with_every_variant(variant):
    res = rprop.minimize(quad, np.zeros(3), jac=quad_grad, variant=variant)
    assert isinstance(res, OptimizeResult)
    assert res.success and res.status == 0 and res.stop_rule == "gtol"
    assert np.allclose(res.x, [1, 2, 3], atol=1e-5)
    assert res.fun == quad(res.x) and np.array_equal(res.jac, quad_grad(res.x))
    assert res.nfev == res.njev == res.nit + 1
    assert res.message.startswith("Optimization terminated successfully: the largest "
                                  "projected gradient component")


def test_trajectory_is_the_reference_one():
    # Unbounded, minimize is the NumPy front's update on a 1-D vector: the
    # reference transcription, fed the same gradients, visits the same points.
    seen = []

    def f(x):
        seen.append(x.copy())
        return rosen(x)

    rprop.minimize(f, [-1.2, 1.0], jac=rosen_der, variant="irprop+", maxiter=40, gtol=0)
    ref = ReferenceRprop([np.array([-1.2, 1.0])], lr=DEFAULT_LR, variant="irprop+")
    for x in seen[:-1]:
        assert np.array_equal(ref.params[0], x)
        ref.step([rosen_der(x)], rosen(x))
    assert np.array_equal(ref.params[0], seen[-1])


@pytest.mark.parametrize(("jac", "per_step"), [("2-point", 1 + 3), ("3-point", 1 + 6),
                                               ("cs", 1 + 3), (None, 1 + 3)])
def test_finite_differences_cost_n_or_2n_evaluations(jac, per_step):
    def f(x):  # complex-analytic, for the complex step ("cs")
        return np.sum((x - np.arange(1, 4)) ** 2)

    res = rprop.minimize(f, np.zeros(3), jac=jac, maxiter=60)
    assert res.nfev == per_step * (res.nit + 1) and res.njev == res.nit + 1
    assert np.allclose(res.x, [1, 2, 3], atol=1e-4)


@pytest.mark.parametrize("fun", [
    lambda x: float(np.sum(np.abs(x - 1) ** 2)),  # abs() of a complex x is real
    lambda x: np.sum((x - 1) ** 2).real,
])
def test_complex_step_refuses_a_fun_that_drops_the_imaginary_part(fun):
    # A real result for a complex x reads as a zero gradient: without the
    # check, gtol "succeeds" at x0 = 0, far from the minimum at 1.
    with pytest.raises(ValueError, match=r"jac='cs' \(complex step\) needs fun to propagate "
                                         r"complex inputs"):
        rprop.minimize(fun, np.zeros(2), jac="cs")


def test_complex_step_accepts_an_exact_zero_gradient():
    # Started at the minimum of a quadratic, the complex step is exactly 0
    # (a complex result with a zero imaginary part): an honest gradient.
    res = rprop.minimize(lambda x: np.sum((x - 1) ** 2), np.ones(2), jac="cs")
    assert res.success and res.stop_rule == "gtol" and res.nit == 0
    assert np.array_equal(res.jac, [0.0, 0.0])


def test_jac_true_counts_one_evaluation_per_iterate():
    res = rprop.minimize(lambda x: (quad(x), quad_grad(x)), np.zeros(2), jac=True)
    assert res.success and res.nfev == res.njev == res.nit + 1


def test_args_reach_fun_and_jac():
    def f(x, a, b):
        return float(np.sum((x - a) ** 2) + b)

    def g(x, a, b):
        return 2 * (x - a)

    res = rprop.minimize(f, [0.0, 0.0], args=(np.array([2.0, -1.0]), 5.0), jac=g)
    assert np.allclose(res.x, [2, -1], atol=1e-5) and res.fun == pytest.approx(5.0)


def test_scalar_x0_and_integer_x0():
    res = rprop.minimize(lambda x: float((x[0] - 2) ** 2), 0, jac=lambda x: 2 * (x - 2))
    assert res.x.shape == (1,) and res.x.dtype == np.float64 and abs(res.x[0] - 2) < 1e-5


def test_functions_get_a_copy_of_x():
    def f(x):
        value = quad(x)
        x[:] = 1e9  # must not corrupt the iterate
        return value

    res = rprop.minimize(f, np.zeros(2), jac=lambda x: quad_grad(x.copy()))
    assert np.allclose(res.x, [1, 2], atol=1e-5)


# -- as a custom method of scipy.optimize.minimize -----------------------------------------


def test_scipy_custom_method_with_callable_jac():
    res = scipy_optimize.minimize(rosen, [-1.2, 1.0], jac=rosen_der, method=rprop.minimize,
                                  options={"maxiter": 50, "variant": "irprop-", "lr": 0.05})
    direct = rprop.minimize(rosen, [-1.2, 1.0], jac=rosen_der, maxiter=50, variant="irprop-",
                            lr=0.05)
    assert res.nit == 50 and res.status == 1 and np.array_equal(res.x, direct.x)


def test_scipy_custom_method_jac_true_and_tol():
    # SciPy's tol sets gtol: a loose one must be what stops the run.
    res = scipy_optimize.minimize(lambda x: (quad(x), quad_grad(x)), np.zeros(2), jac=True,
                                  method=rprop.minimize, tol=1e-2)
    assert res.success and res.stop_rule == "gtol"
    assert np.max(np.abs(quad_grad(res.x))) <= 1e-2
    # SciPy memoizes (f, g): one call of fun per iterate
    assert res.nfev == res.njev == res.nit + 1


def test_scipy_custom_method_string_jac_becomes_2_point():
    res = scipy_optimize.minimize(quad, np.zeros(2), jac="2-point", method=rprop.minimize,
                                  options={"maxiter": 10})
    assert res.nfev == 3 * (res.nit + 1)


def test_scipy_custom_method_with_bounds_object():
    bounds = scipy_optimize.Bounds([0.0, 0.0], [0.5, 10.0])
    res = scipy_optimize.minimize(quad, [0.1, 0.1], jac=quad_grad, method=rprop.minimize,
                                  bounds=bounds)
    assert res.success and np.allclose(res.x, [0.5, 2.0], atol=1e-5) and res.x[0] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hess": lambda x: np.eye(2)}, r"cannot use hess"),
        ({"hessp": lambda x, p: p}, r"cannot use hessp"),
        ({"constraints": [{"type": "ineq", "fun": lambda x: x[0]}]},
         r"supports bounds but not constraints"),
    ],
)
def test_scipy_options_rprop_cannot_honour(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scipy_optimize.minimize(quad, np.zeros(2), jac=quad_grad, method=rprop.minimize,
                                **kwargs)
    with pytest.raises(ValueError, match=match):
        rprop.minimize(quad, np.zeros(2), jac=quad_grad, **kwargs)


def test_unknown_option_is_an_error():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['maxiters'\]"):
        scipy_optimize.minimize(quad, np.zeros(2), method=rprop.minimize,
                                options={"maxiters": 5})


# -- bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("jac", [quad_grad, "2-point", "3-point"])
def test_every_iterate_is_feasible(variant, jac):
    lo, hi = np.array([-1.0, 0.0, 2.5]), np.array([0.5, 10.0, 2.6])
    visited = []

    def f(x):
        visited.append(x.copy())
        return quad(x)

    res = rprop.minimize(f, [0.0, 5.0, 2.55], jac=jac, variant=variant, lr=1.0,
                         bounds=list(zip(lo, hi, strict=True)))
    visited = np.array(visited)
    assert np.all(visited >= lo) and np.all(visited <= hi)
    assert res.success and np.allclose(res.x, [0.5, 2.0, 2.6], atol=1e-4)
    assert res.x[0] == 0.5 and res.x[2] == 2.6


def test_pinned_coordinate_keeps_its_step_size():
    # x[0] sits on its upper bound with the gradient pushing outwards: its
    # projected gradient is 0, so its step size neither grows nor shrinks.
    res = rprop.minimize(quad, [0.5, 0.0], jac=quad_grad, bounds=[(0, 0.5), (None, None)],
                         lr=0.2, gtol=0, xtol=0, maxiter=30)
    assert res.step_size[0] == 0.2 and res.x[0] == 0.5


@pytest.mark.parametrize("variant", ["irprop+", "rprop+"])
def test_undo_at_a_bound_returns_to_the_previous_point(variant):
    # f = (x - 0.85)², x in [0, 1], from 0.5 with lr 0.3: 0.5 -> 0.8 -> 1.16,
    # clipped to 1.0 (worse, and the gradient flips): undoing must take back
    # the 0.2 actually moved, not the 0.36 of the unclipped step.
    visited = []

    def f(x):
        visited.append(float(x[0]))
        return float((x[0] - 0.85) ** 2)

    rprop.minimize(f, [0.5], jac=lambda x: 2 * (x - 0.85), bounds=[(0.0, 1.0)], lr=0.3,
                   variant=variant, maxiter=3)
    assert visited[:3] == pytest.approx([0.5, 0.8, 1.0])
    assert visited[3] == pytest.approx(0.8, abs=1e-15)


def test_fixed_variable_with_finite_differences():
    res = rprop.minimize(quad, [0.3, 0.0], jac="2-point", bounds=[(0.3, 0.3), (None, None)])
    assert res.success and res.x[0] == 0.3 and abs(res.x[1] - 2) < 1e-4 and res.jac[0] == 0


def test_x0_outside_the_bounds_is_clipped_with_a_warning():
    with pytest.warns(scipy_optimize.OptimizeWarning, match="x0 lies outside the bounds"):
        res = rprop.minimize(quad, [5.0, 0.0], jac=quad_grad, bounds=[(0, 0.5), (0, 1)],
                             maxiter=0)
    assert np.array_equal(res.x, [0.5, 0.0])


# -- stopping rules ---------------------------------------------------------------------


def test_gtol_returns_the_final_iterate():
    res = rprop.minimize(quad, np.zeros(2), jac=quad_grad, gtol=1e-3)
    assert res.stop_rule == "gtol" and np.max(np.abs(res.jac)) <= 1e-3


def test_xtol_on_a_nonsmooth_function():
    # |x - 1|: the gradient is ±1 and never small, so gtol cannot fire; the
    # step sizes shrink to step_min, and xtol stops the run.
    def f(x):
        return float(np.sum(np.abs(x - 1)))

    res = rprop.minimize(f, np.zeros(2), jac=lambda x: np.sign(x - 1))
    assert res.success and res.stop_rule == "xtol" and res.status == 0
    assert np.all(res.step_size <= 1e-6) and np.allclose(res.x, 1, atol=1e-5)
    assert "xtol" in res.message


def test_xtol_below_step_min_never_fires():
    def f(x):
        return float(np.sum(np.abs(x - 1)))

    res = rprop.minimize(f, np.zeros(1), jac=lambda x: np.sign(x - 1), xtol=1e-7, maxiter=200)
    assert res.stop_rule == "maxiter" and res.status == 1 and not res.success
    assert res.message.startswith("Maximum number of iterations has been exceeded")


def test_ftol():
    res = rprop.minimize(quad, np.zeros(2), jac=quad_grad, ftol=1e-3, gtol=0)
    assert res.success and res.stop_rule == "ftol" and "ftol" in res.message


def test_maxiter_and_maxfev():
    res = rprop.minimize(rosen, [-1.2, 1.0], jac=rosen_der, maxiter=10)
    assert (res.nit, res.status, res.stop_rule, res.success) == (10, 1, "maxiter", False)
    res = rprop.minimize(rosen, [-1.2, 1.0], jac="2-point", maxfev=10)
    assert (res.status, res.stop_rule) == (2, "maxfev") and 10 <= res.nfev < 13
    assert "maxfev = 10" in res.message
    res = rprop.minimize(rosen, [-1.2, 1.0], jac=rosen_der, maxiter=0)
    assert res.nit == 0 and res.nfev == 1 and np.array_equal(res.x, [-1.2, 1.0])


def test_returns_the_best_iterate_when_not_stopped_by_gtol():
    fs = []

    def f(x):
        fs.append(rosen(x))
        return fs[-1]

    res = rprop.minimize(f, [-1.2, 1.0], jac=rosen_der, variant="rprop-", maxiter=60)
    assert res.fun == min(fs) and res.fun == rosen(res.x)


def test_nonfinite_stops_with_the_best_finite_iterate():
    def f(x):
        return float(x[0] ** 2) if x[0] > -0.25 else float("nan")

    res = rprop.minimize(f, [1.0], jac=lambda x: 2 * x, lr=0.8)  # 1 -> 0.2 -> -0.76
    assert res.status == 3 and not res.success and res.stop_rule == "nonfinite"
    assert res.message.startswith("NaN result encountered: fun returned a non-finite value")
    assert np.isfinite(res.fun) and res.x[0] > -0.25


def test_nonfinite_at_x0_says_there_was_no_finite_iterate():
    res = rprop.minimize(lambda x: float("nan"), [1.0, 2.0], jac=lambda x: np.ones(2),
                         bounds=[(0, 1.5), (None, None)])
    assert res.status == 3 and res.nit == 0
    assert ("no iterate had a finite value and gradient: x is x0, projected onto the bounds"
            in res.message)
    assert res.x.tolist() == [1.0, 2.0]


def test_callback_new_style_and_stop_iteration():
    seen = []

    def cb(intermediate_result):
        assert isinstance(intermediate_result, OptimizeResult)
        seen.append((intermediate_result.nit, intermediate_result.fun))
        if intermediate_result.nit == 7:
            raise StopIteration

    res = rprop.minimize(rosen, [-1.2, 1.0], jac=rosen_der, callback=cb)
    assert (res.status, res.stop_rule, res.nit) == (99, "callback", 7)
    assert res.message == "`callback` raised `StopIteration`." and not res.success
    assert [n for n, _ in seen] == list(range(1, 8))


def test_callback_legacy_xk_through_scipy():
    xs = []
    scipy_optimize.minimize(quad, np.zeros(2), jac=quad_grad, method=rprop.minimize,
                            callback=lambda xk: xs.append(xk), options={"maxiter": 5})
    assert len(xs) == 5 and all(isinstance(x, np.ndarray) and x.shape == (2,) for x in xs)


def test_disp_prints(capsys):
    rprop.minimize(quad, np.zeros(2), jac=quad_grad, disp=True)
    assert "Optimization terminated successfully" in capsys.readouterr().out


# -- bad input ---------------------------------------------------------------------------


def _min(**kw):
    args = {"fun": quad, "x0": np.zeros(2), "jac": quad_grad, **kw}
    return lambda: rprop.minimize(**args)


BAD_INPUTS = [
    (_min(x0=np.zeros((2, 2))), ValueError, r"x0 must be one-dimensional, got shape \(2, 2\)"),
    (_min(x0=[0.0, np.nan]), ValueError, r"x0 must be finite; x0\[1\] is nan"),
    (_min(x0=[1j, 0]), TypeError, r"x0 must be a 1-D array of real numbers, got dtype complex"),
    (_min(x0=[]), ValueError, r"x0 must not be empty"),
    (_min(x0=["a"]), TypeError, r"x0 must be a 1-D array of real numbers"),
    (_min(bounds=[(0, 1)]), ValueError, r"bounds has 1 \(lo, hi\) pairs, x0 has 2 entries"),
    (_min(bounds=[(0, 1), (2, 1)]), ValueError,
     r"bounds for x\[1\]: lower bound 2.0 > upper bound 1.0"),
    (_min(bounds=[(0, 1), (0, 1, 2)]), ValueError, r"bounds\[1\] must be a pair \(lo, hi\)"),
    (_min(bounds=[(0, 1), (np.nan, 1)]), ValueError, r"bounds for x\[1\] contain NaN"),
    (_min(bounds=[(0, 1), (np.inf, np.inf)]), ValueError, r"leave no finite value"),
    (_min(bounds=5), TypeError, r"bounds must be a sequence of \(lo, hi\) pairs"),
    (_min(bounds=scipy_optimize.Bounds([0, 0, 0], [1, 1, 1])), ValueError,
     r"Bounds.lb and Bounds.ub must be scalars or have shape \(2,\)"),
    (_min(jac="4-point"), ValueError, r"jac must be a callable, True, None or one of"),
    (_min(jac=lambda x: np.zeros(3)), ValueError,
     r"the gradient \(jac\) must have shape \(2,\) like x0, got shape \(3,\)"),
    (_min(fun=lambda x: x), ValueError, r"fun must return a scalar, got an array of shape"),
    (_min(fun=lambda x: 1j), TypeError, r"fun must return a real number"),
    (_min(fun=lambda x: 1.0, jac=True), TypeError, r"with jac=True, fun must return a pair"),
    (_min(fun=3), TypeError, r"fun must be callable"),
    (_min(maxiter=-1), ValueError, r"maxiter must be an int >= 0, got -1"),
    (_min(maxiter=1.5), TypeError, r"maxiter must be an int >= 0"),
    (_min(maxfev=0), ValueError, r"maxfev must be an int >= 1"),
    (_min(gtol=-1.0), ValueError, r"gtol must be a finite number >= 0"),
    (_min(xtol="small"), TypeError, r"xtol must be a number >= 0"),
    (_min(ftol=np.inf), ValueError, r"ftol must be a finite number >= 0"),
    (_min(lr=0.0 - 1), ValueError, r"lr must be a finite number >= 0"),
    (_min(etas=(1.5, 2.0)), ValueError, r"etas must satisfy 0 < eta_minus < 1 < eta_plus"),
    (_min(step_sizes=(1.0,)), TypeError, r"step_sizes must be a pair"),
    (_min(variant="bfgs"), ValueError, r"variant must be one of"),
    (_min(callback=5), TypeError, r"callback must be callable or None"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_INPUTS)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# -- SciPy is optional ------------------------------------------------------------------------


def test_missing_scipy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    monkeypatch.delitem(sys.modules, "rprop._minimize", raising=False)
    with pytest.raises(ImportError, match=r'pip install "rprop\[scipy\]"'):
        importlib.import_module("rprop._minimize")
    # the stateful NumPy front does not need SciPy
    import rprop.numpy

    x = np.ones(1)
    rprop.numpy.Rprop([x]).step([x])
