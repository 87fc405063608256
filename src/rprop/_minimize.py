"""rprop.minimize: Rprop as a SciPy-style minimizer, with bounds and stopping rules.

Also a custom method for :func:`scipy.optimize.minimize`::

    scipy.optimize.minimize(fun, x0, jac=grad, method=rprop.minimize,
                            options=dict(maxiter=500, variant="irprop+"))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from rprop._core import effective_grad, grprop_step, loss_went_up, rprop_update
from rprop._hyper import DEFAULT_ETAS, DEFAULT_GRPROP_DELTA, DEFAULT_STEP_SIZES, Hyper
from rprop._stopping import DEFAULT_LR, Callback, Monitor, StopRules, outcome
from rprop._variants import get_variant

try:
    from scipy.optimize import Bounds, OptimizeResult, OptimizeWarning

    from rprop._compat import approx_derivative
except ImportError as err:  # pragma: no cover - exercised with scipy hidden
    raise ImportError(
        'rprop.minimize needs SciPy, an optional extra: pip install "rprop[scipy]"'
    ) from err

__all__ = ["DEFAULT_LR", "minimize"]

FD_METHODS = ("2-point", "3-point", "cs")

def minimize(
    fun: Callable[..., Any],
    x0: Any,
    args: Any = (),
    *,
    jac: Callable[..., Any] | str | bool | None = None,
    variant: str = "irprop+",
    lr: float = DEFAULT_LR,
    etas: tuple[float, float] = DEFAULT_ETAS,
    step_sizes: tuple[float, float] = DEFAULT_STEP_SIZES,
    grprop_delta: float = DEFAULT_GRPROP_DELTA,
    bounds: Any = None,
    maxiter: int = 1000,
    maxfev: int | None = None,
    gtol: float | None = None,
    ftol: float = 0.0,
    xtol: float = 1e-6,
    callback: Callable[..., Any] | None = None,
    finite_diff_rel_step: Any = None,
    disp: bool = False,
    tol: float | None = None,
    hess: Any = None,
    hessp: Any = None,
    constraints: Any = (),
    **unknown_options: Any,
) -> OptimizeResult:
    r"""Minimize a scalar function of one or more variables with Rprop.

    Each iteration evaluates ``f`` and its gradient at the current ``x``
    and moves every coordinate by its own step size against the sign of
    its partial derivative; step sizes grow by ``eta_plus`` while the sign
    holds and shrink by ``eta_minus`` when it flips.

    Args:
        fun: ``fun(x, *args) -> float``, with ``x`` a 1-D float64 array
            (or ``(f, g)`` when ``jac=True``).
        x0: initial guess, a 1-D array of reals (a scalar is taken as shape (1,)).
        args: extra arguments passed to ``fun`` and ``jac``.
        jac: the gradient: a callable ``jac(x, *args) -> array (n,)``;
            ``True`` if ``fun`` returns ``(f, g)``; or a finite-difference
            scheme, ``"2-point"``, ``"3-point"`` or ``"cs"`` (complex step),
            which costs ``n``, ``2n`` or ``n`` extra evaluations of ``fun``
            per iteration (``n = len(x0)``), stepping one-sidedly at bounds.
            ``None`` (default, and what SciPy passes for a string ``jac``)
            means ``"2-point"``.
        variant: ``"irprop+"`` (default), ``"irprop-"``, ``"rprop+"``, ``"rprop-"``,
            or R neuralnet's GRprop, ``"grprop-sag"`` / ``"grprop-slr"``.
        lr: initial step size Δ0 of every coordinate (default 0.1, Riedmiller's).
        etas: ``(eta_minus, eta_plus)``, default ``(0.5, 1.2)``.
        step_sizes: ``(step_min, step_max)``, default ``(1e-6, 50)``.
        grprop_delta: GRprop's δ (default 1e-6, neuralnet's); only the
            ``grprop-*`` variants read it.
        bounds: ``[(lo, hi), ...]`` (one pair per coordinate, ``None`` for no
            bound) or :class:`scipy.optimize.Bounds`. Every iterate stays
            within them (see Notes). An ``x0`` outside is clipped into them,
            with an :class:`~scipy.optimize.OptimizeWarning`.
        maxiter: most Rprop steps (default 1000).
        maxfev: most evaluations of ``fun`` (default: no limit); checked
            after each iteration, so a finite-difference gradient can
            overshoot it by up to ``2n``.
        gtol: stop (success) when the largest component of the projected
            gradient is ``<= gtol`` (default ``1e-5``, as SciPy's BFGS).
        ftol: stop (success) when a step that moved ``x`` changed ``f`` by
            ``<= ftol * max(|f_old|, |f_new|, 1)`` (default 0: off).
        xtol: stop (success) when the step size of every coordinate with a
            non-zero projected gradient is ``<= xtol``, so that no coordinate
            will move by more than ``xtol * eta_plus`` next (default ``1e-6``:
            with the default ``step_min = 1e-6``, "every moving step size has
            shrunk to its floor"; an ``xtol`` below ``step_min`` never fires).
        callback: called after each iteration as
            ``callback(intermediate_result=OptimizeResult(x, fun, jac, nit, nfev,
            njev, step_size))`` if its only parameter is named
            ``intermediate_result`` (as in SciPy >= 1.11), otherwise as
            ``callback(xk)``. Raising ``StopIteration`` stops the run (status 99).
        finite_diff_rel_step: relative step for the finite differences
            (SciPy's default when ``None``).
        disp: print the final message.
        tol: SciPy's generic tolerance (``minimize(..., tol=...)``); sets
            ``gtol`` unless ``gtol`` is given.
        hess, hessp, constraints: accepted so that SciPy can pass them, but
            Rprop cannot use them: anything but ``None`` / empty raises a
            ValueError.

    Returns:
        :class:`scipy.optimize.OptimizeResult` with ``x``, ``fun``, ``jac``,
        ``nit``, ``nfev``, ``njev``, ``success``, ``status``, ``message``,
        plus ``stop_rule`` (``"gtol"``, ``"xtol"``, ``"ftol"``, ``"maxiter"``,
        ``"maxfev"``, ``"nonfinite"`` or ``"callback"``) and ``step_size``
        (the final step sizes). ``status``: 0 success (gtol, xtol or ftol),
        1 maxiter, 2 maxfev, 3 non-finite ``f`` or gradient, 99 callback.
        Rprop's ``f`` is not monotone, so ``x`` is the iterate with the
        lowest ``f`` seen, except when ``gtol`` stopped the run: then it is
        the final iterate (the one that satisfied it). ``fun`` and ``jac``
        are at ``x``.

    Notes:
        Stopping rules are checked at every iterate, in this order:
        non-finite ``f`` or gradient, ``gtol``, ``xtol``, ``ftol``,
        ``maxiter``, ``maxfev``; a callback's ``StopIteration`` comes first.

        Bounds: the gradient is projected (a component is set to 0 where
        ``x`` sits on a bound and the gradient points out of the box), then
        Rprop steps, then ``x`` is clipped into the box. A coordinate pinned
        on a bound therefore keeps its step size and does not move until its
        gradient points inwards again; a coordinate whose step was clipped
        remembers the distance it actually moved, so the backtracking
        variants (``rprop+``, ``irprop+``) undo exactly that move.
    """
    if unknown_options:
        raise TypeError(
            f"minimize() got unknown option(s) {sorted(unknown_options)}; see "
            "help(rprop.minimize) for the options it takes"
        )
    _refuse("hess", hess)
    _refuse("hessp", hessp)
    if not _empty(constraints):
        raise ValueError(
            "rprop.minimize supports bounds but not constraints; got "
            f"constraints={constraints!r}. Use a constrained method (SLSQP, trust-constr, "
            "COBYLA) or a penalty term."
        )
    hyper = Hyper.from_torch_args(lr, etas, step_sizes, grprop_delta=grprop_delta)
    var = get_variant(variant)
    if not isinstance(args, tuple):
        args = (args,)
    x = _check_x0(x0)
    n = x.size
    lo, hi = _check_bounds(bounds, n)
    if np.any(x < lo) or np.any(x > hi):
        warnings.warn(
            "x0 lies outside the bounds; it is clipped into them", OptimizeWarning, stacklevel=2
        )
        x = np.clip(x, lo, hi)
    rules = StopRules.from_options(gtol=gtol, xtol=xtol, ftol=ftol, maxiter=maxiter,
                                   maxfev=maxfev, tol=tol)
    cb = Callback.of(callback)
    evaluate = _Evaluator(fun, jac, args, n, lo, hi, finite_diff_rel_step)

    f, g = evaluate(x)
    step_size = np.full(n, hyper.lr)
    prev = np.zeros(n)
    prev_update: np.ndarray | None = np.zeros(n) if var.backtracks else None
    prev_f = math.inf
    best = (f, x, g) if _finite(f, g) else None
    monitor = Monitor(rules)
    while True:
        with np.errstate(all="ignore"):
            pg = _projected(g, x, lo, hi)
            moving = step_size[pg != 0]
            stop = monitor.check(
                f=f, grad_finite=bool(np.isfinite(g).all()), gmax=float(np.max(np.abs(pg))),
                moving_step=float(np.max(moving)) if moving.size else None, nfev=evaluate.nfev,
            )
        if stop is not None:
            rule, detail = stop
            if rule == "gtol":
                best = (f, x, g)
            break

        with np.errstate(all="ignore"):
            if var.adjust is not None:
                out = grprop_step([effective_grad(pg, x, hyper)], [prev], [step_size],
                                  hyper=hyper, variant=var, xp=np)[0]
            else:
                out = rprop_update(
                    effective_grad(pg, x, hyper), prev, step_size, prev_update,
                    hyper=hyper, variant=var, worse=loss_went_up(f, prev_f), xp=np,
                )
            x_try = x + out.delta
            x_new = np.clip(x_try, lo, hi)
        prev, step_size = out.prev, out.step_size
        if prev_update is not None:
            # Where the bounds cut a step short, remember the distance moved,
            # so that undoing it returns exactly (to rounding) to where we were.
            cut = (x_new != x_try) & (out.prev_update != 0)
            prev_update = np.asarray(np.where(cut, x_new - x, out.prev_update), dtype=np.float64)
        moved = bool(np.any(x_new != x))
        prev_f = f
        x = x_new
        f, g = evaluate(x)
        monitor.stepped(prev_f, f, moved)
        if _finite(f, g) and (best is None or f < best[0]):
            best = (f, x, g)
        if cb is not None and cb.stops(
            OptimizeResult(
                x=x.copy(), fun=f, jac=g.copy(), nit=monitor.nit, nfev=evaluate.nfev,
                njev=evaluate.njev, step_size=step_size.copy(),
            ) if cb.new_style else x.copy()
        ):
            rule, detail = "callback", ""
            break

    bf, bx, bg = best if best is not None else (f, x, g)
    nit = monitor.nit
    status, message = outcome(rule, detail, best is not None)
    if disp:
        print(message)
        print(f"         Current function value: {bf:g}")
        print(f"         Iterations: {nit}")
        print(f"         Function evaluations: {evaluate.nfev}")
        print(f"         Gradient evaluations: {evaluate.njev}")
    return OptimizeResult(
        x=bx.copy(), fun=bf, jac=bg.copy(), nit=nit, nfev=evaluate.nfev, njev=evaluate.njev,
        success=status == 0, status=status, message=message, stop_rule=rule,
        step_size=step_size.copy(),
    )


# -- evaluation ---------------------------------------------------------------


class _Evaluator:
    """``f`` and the gradient at ``x``, counting evaluations as SciPy does:
    ``nfev`` counts calls of ``fun`` (finite differences included), ``njev``
    gradients computed (by ``jac``, by ``fun`` with ``jac=True``, or by
    finite differences)."""

    def __init__(
        self, fun: Any, jac: Any, args: tuple[Any, ...], n: int, lo: np.ndarray, hi: np.ndarray,
        rel_step: Any,
    ) -> None:
        if not callable(fun):
            raise TypeError(f"fun must be callable, got {type(fun).__name__}")
        if jac is None or jac is False:
            jac = "2-point"
        if not (callable(jac) or jac is True or jac in FD_METHODS):
            raise ValueError(
                f"jac must be a callable, True, None or one of {FD_METHODS}, got {jac!r}"
            )
        self.fun, self.jac, self.args, self.n = fun, jac, args, n
        self.lo, self.hi, self.rel_step = lo, hi, rel_step
        self.nfev = 0
        self.njev = 0

    def _f(self, x: np.ndarray) -> float:
        self.nfev += 1
        return _scalar(self.fun(x.copy(), *self.args))

    def __call__(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        if self.jac is True:
            self.nfev += 1
            self.njev += 1
            out = self.fun(x.copy(), *self.args)
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise TypeError("with jac=True, fun must return a pair (f, gradient)")
            return _scalar(out[0]), self._grad(out[1])
        f = self._f(x)
        if callable(self.jac):
            self.njev += 1
            return f, self._grad(self.jac(x.copy(), *self.args))
        self.njev += 1
        return f, self._finite_difference(x, f)

    def _finite_difference(self, x: np.ndarray, f: float) -> np.ndarray:
        g = np.zeros(self.n)
        if not math.isfinite(f):
            return np.full(self.n, np.nan)
        # Fixed coordinates (lo == hi) cannot be stepped; their gradient is
        # irrelevant (they never move) and reported as 0.
        free = self.lo < self.hi
        if not free.any():
            return g
        full = x.copy()
        complex_seen = False

        def sub(z: np.ndarray) -> float:
            nonlocal complex_seen
            if self.jac == "cs":  # the complex step needs a complex x
                xz = full.astype(complex)
                xz[free] = z
                self.nfev += 1
                value = self.fun(xz, *self.args)
                complex_seen = complex_seen or np.iscomplexobj(value)
                return value
            full[free] = z
            return self._f(full)

        with np.errstate(all="ignore"):
            g[free] = approx_derivative(
                sub, x[free], method=self.jac, rel_step=self.rel_step,
                f0=f,
                bounds=(self.lo[free], self.hi[free]),
            )
        if self.jac == "cs" and not complex_seen:
            # The complex step reads the derivative from the imaginary part of
            # fun(x + ih): a real result reads as a zero gradient, and gtol
            # would report success wherever the run started. A complex result
            # with a zero imaginary part is an honest zero derivative.
            raise ValueError(
                "jac='cs' (complex step) needs fun to propagate complex inputs: fun returned "
                "real numbers for a complex x, so every partial derivative would read as 0. "
                "Write fun with operations that keep x complex (no float(), abs(), .real or "
                "math.* on x), or use jac='2-point' or '3-point'."
            )
        return g

    def _grad(self, g: Any) -> np.ndarray:
        arr = np.atleast_1d(np.asarray(g))
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"the gradient (jac) must be real, got dtype {arr.dtype}")
        if arr.shape != (self.n,):
            raise ValueError(
                f"the gradient (jac) must have shape ({self.n},) like x0, got shape {arr.shape}"
            )
        return arr.astype(np.float64)


def _scalar(value: Any) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"fun must return a scalar, got an array of shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"fun must return a real number, got {arr.dtype}")
    return float(arr.reshape(()))


def _finite(f: float, g: np.ndarray) -> bool:
    return math.isfinite(f) and bool(np.isfinite(g).all())


def _projected(g: np.ndarray, x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The gradient with components that point out of the box, at a bound, set to 0."""
    outward = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
    return np.where(outward, 0.0, g)


# -- argument checks ------------------------------------------------------------


def _refuse(name: str, value: Any) -> None:
    if value is not None:
        raise ValueError(
            f"rprop.minimize uses only the signs of the gradient and cannot use {name}; "
            f"got {name}={value!r}. Leave it out, or pick a SciPy method that uses it."
        )


def _empty(constraints: Any) -> bool:
    if constraints is None:
        return True
    if isinstance(constraints, (list, tuple)):
        return len(constraints) == 0
    return False


def _check_x0(x0: Any) -> np.ndarray:
    try:
        arr = np.asarray(x0)
    except (TypeError, ValueError) as err:
        raise TypeError(f"x0 must be a 1-D array of real numbers: {err}") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"x0 must be a 1-D array of real numbers, got dtype {arr.dtype}")
    arr = np.atleast_1d(arr).astype(np.float64)
    if arr.ndim != 1:
        raise ValueError(f"x0 must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("x0 must not be empty")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"x0 must be finite; x0[{bad[0]}] is {arr[bad[0]]}")
    return arr


def _check_bounds(bounds: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    if bounds is None:
        return np.full(n, -np.inf), np.full(n, np.inf)
    if isinstance(bounds, Bounds):
        try:
            lo = np.broadcast_to(np.asarray(bounds.lb, dtype=float), (n,)).copy()
            hi = np.broadcast_to(np.asarray(bounds.ub, dtype=float), (n,)).copy()
        except ValueError:
            raise ValueError(
                f"bounds: Bounds.lb and Bounds.ub must be scalars or have shape ({n},) like x0, "
                f"got shapes {np.shape(bounds.lb)} and {np.shape(bounds.ub)}"
            ) from None
    else:
        try:
            pairs = list(bounds)
        except TypeError:
            raise TypeError(
                "bounds must be a sequence of (lo, hi) pairs or scipy.optimize.Bounds, got "
                f"{type(bounds).__name__}"
            ) from None
        if len(pairs) != n:
            raise ValueError(f"bounds has {len(pairs)} (lo, hi) pairs, x0 has {n} entries")
        lo, hi = np.empty(n), np.empty(n)
        for i, pair in enumerate(pairs):
            try:
                a, b = pair
                lo[i] = -np.inf if a is None else float(a)
                hi[i] = np.inf if b is None else float(b)
            except (TypeError, ValueError):
                raise ValueError(
                    f"bounds[{i}] must be a pair (lo, hi) of numbers or None, got {pair!r}"
                ) from None
    for i in range(n):
        if math.isnan(lo[i]) or math.isnan(hi[i]):
            raise ValueError(f"bounds for x[{i}] contain NaN: ({lo[i]}, {hi[i]})")
        if lo[i] > hi[i]:
            raise ValueError(f"bounds for x[{i}]: lower bound {lo[i]} > upper bound {hi[i]}")
        if lo[i] == np.inf or hi[i] == -np.inf:
            raise ValueError(f"bounds for x[{i}] leave no finite value: ({lo[i]}, {hi[i]})")
    return lo, hi


