"""When a minimizer stops, and what it says: the stop rules shared by
:func:`rprop.minimize` (NumPy) and :func:`rprop.torch.minimize`.

The fronts differ in how they hold ``x`` (one float64 vector, or a list of
tensors); each reduces its iterate to a few numbers (``f``, whether ``f`` and
the gradient are finite, the largest projected gradient component, the
largest step size of a moving coordinate) and asks :class:`Monitor` whether a
rule fires. The order of the rules, their thresholds, the status codes and the
messages live here only, with the minimizers' default initial step size.

Plain Python, no torch: SciPy's ``OptimizeResult`` when SciPy is installed,
a small stand-in with the same attribute access otherwise (SciPy is optional
for the torch front).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

try:
    from scipy.optimize import OptimizeResult, OptimizeWarning
except ImportError:  # pragma: no cover - exercised with scipy hidden

    class OptimizeWarning(UserWarning):  # type: ignore[no-redef]
        """SciPy's warning category for optimizers, without SciPy."""

    class OptimizeResult(dict):  # type: ignore[no-redef]
        """SciPy's result type, without SciPy: a dict with attribute access."""

        def __repr__(self) -> str:
            return f"OptimizeResult({dict.__repr__(self)})"

        def __getattr__(self, name: str) -> Any:
            try:
                return self[name]
            except KeyError:
                raise AttributeError(name) from None

        __setattr__ = dict.__setitem__
        __delattr__ = dict.__delitem__

        def __dir__(self) -> list[str]:
            return list(self.keys())


# The initial step size Δ0 of both minimizers and of fit's adaptive mode:
# Riedmiller's (also libgp's and limbo's). A minimizer works in the units of x,
# where problems are typically of order 1; a first move of 0.1 per coordinate
# is cautious there, and as step sizes grow by eta_plus = 1.2 per step, a Δ0
# that is 10x too small costs only ~13 extra steps (log 10 / log 1.2).
DEFAULT_LR = 0.1

__all__ = [
    "DEFAULT_LR", "STATUS", "Callback", "Monitor", "OptimizeResult", "OptimizeWarning",
    "StopRules", "count", "gtol_reached", "outcome", "step_floor_reached", "tolerance",
]

STATUS = {
    "gtol": 0,
    "xtol": 0,
    "ftol": 0,
    "maxiter": 1,
    "maxfev": 2,
    "nonfinite": 3,
    "callback": 99,
}


@dataclass(frozen=True)
class StopRules:
    """The thresholds, checked once on construction (see :meth:`from_options`)."""

    gtol: float
    xtol: float
    ftol: float
    maxiter: int
    maxfev: int | None

    @classmethod
    def from_options(
        cls, *, gtol: Any, xtol: Any, ftol: Any, maxiter: Any, maxfev: Any, tol: Any = None
    ) -> StopRules:
        """Validate the options; ``gtol=None`` takes SciPy's ``tol``, else ``1e-5``."""
        if gtol is None:
            gtol = 1e-5 if tol is None else tol
        return cls(
            gtol=tolerance("gtol", gtol),
            xtol=tolerance("xtol", xtol),
            ftol=tolerance("ftol", ftol),
            maxiter=count("maxiter", maxiter, allow_zero=True),
            maxfev=None if maxfev is None else count("maxfev", maxfev, allow_zero=False),
        )


class Monitor:
    """The run's counters and the rules, checked at every iterate in this
    order: non-finite ``f`` or gradient, ``gtol``, ``xtol``, ``ftol``,
    ``maxiter``, ``maxfev`` (a callback's ``StopIteration`` is the caller's,
    after each step).

    ``fun_name`` is how messages name the objective (``"fun"``, ``"the closure"``).
    """

    def __init__(self, rules: StopRules, fun_name: str = "fun") -> None:
        self.rules = rules
        self.fun_name = fun_name
        self.nit = 0
        self.moved = False
        self.last_change = math.inf

    def check(
        self, *, f: float, grad_finite: bool, gmax: float, moving_step: float | None, nfev: int
    ) -> tuple[str, str] | None:
        """The first rule that fires at the current iterate, as ``(rule, detail)``.

        ``gmax`` is the largest ``|projected gradient|`` component,
        ``moving_step`` the largest step size of a coordinate whose projected
        gradient is not 0 (``None`` when there is none), ``nfev`` the calls of
        the objective so far.
        """
        r = self.rules
        if not (math.isfinite(f) and grad_finite):
            what = self.fun_name if not math.isfinite(f) else "the gradient"
            return "nonfinite", f"{what} returned a non-finite value at iteration {self.nit}"
        detail = gtol_reached(gmax, r.gtol)
        if detail is not None:
            return "gtol", detail
        if self.nit > 0:
            detail = step_floor_reached(moving_step, r.xtol, gmax, gtol=r.gtol)
            if detail is not None:
                return "xtol", detail
            if r.ftol > 0 and self.moved and self.last_change <= r.ftol:
                return "ftol", (f"the relative change in f, {self.last_change:.3g}, "
                                f"is <= ftol = {r.ftol:g}")
        if self.nit >= r.maxiter:
            return "maxiter", f"maxiter = {r.maxiter}"
        if r.maxfev is not None and nfev >= r.maxfev:
            return "maxfev", f"maxfev = {r.maxfev}, nfev = {nfev}"
        return None

    def stepped(self, f_old: float, f_new: float, moved: bool) -> None:
        """Record one Rprop step from an iterate with (finite) ``f_old`` to one
        with ``f_new``; ``moved`` says whether any coordinate changed."""
        self.nit += 1
        self.moved = moved
        if math.isfinite(f_new):
            self.last_change = abs(f_new - f_old) / max(abs(f_new), abs(f_old), 1.0)


def gtol_reached(gmax: float, gtol: float, what: str = "projected gradient") -> str | None:
    """The ``gtol`` rule: why it fires when the largest ``|what|`` component,
    ``gmax``, is ``<= gtol``; else None."""
    if gmax <= gtol:
        return f"the largest {what} component, {gmax:.3g}, is <= gtol = {gtol:g}"
    return None


def step_floor_reached(
    moving_step: float | None, floor: float, gmax: float, *, gtol: float | None,
    floor_name: str = "xtol", what: str = "projected gradient", element: str = "coordinate",
) -> str | None:
    """The step-floor rule (``xtol``): why it fires when the largest step
    size of a moving element (one whose gradient is not 0), ``moving_step``,
    is ``<= floor``; else None (also when nothing moves: ``moving_step`` None)."""
    if moving_step is None or moving_step > floor:
        return None
    # Say how far from stationary x still is: a step-size floor is Rprop's
    # resolution, not proof of an optimum.
    still = f"the largest {what} component is still {gmax:.3g}"
    if gtol is not None:
        still += f" > gtol = {gtol:g}"
    return (f"the largest step size of a moving {element}, {moving_step:.3g}, is <= "
            f"{floor_name} = {floor:g} ({still})")


def outcome(rule: str, detail: str, have_best: bool) -> tuple[int, str]:
    """``(status, message)`` for the rule that stopped the run; ``have_best``
    says whether any iterate had a finite value and gradient."""
    status = STATUS[rule]
    if rule == "callback":
        return status, "`callback` raised `StopIteration`."
    if status == 0:
        return status, f"Optimization terminated successfully: {detail}."
    if rule == "maxiter":
        return status, f"Maximum number of iterations has been exceeded ({detail})."
    if rule == "maxfev":
        return status, f"Maximum number of function evaluations has been exceeded ({detail})."
    where = ("x is the best finite iterate" if have_best
             else "no iterate had a finite value and gradient: x is x0, "
                  "projected onto the bounds")
    return status, f"NaN result encountered: {detail}; {where}."


# -- callbacks ---------------------------------------------------------------------


class Callback:
    """A validated callback, called after each step as SciPy does:
    ``callback(intermediate_result=OptimizeResult(...))`` when its only
    parameter is named ``intermediate_result`` (SciPy >= 1.11), else
    ``callback(xk)``."""

    def __init__(self, callback: Callable[..., Any]) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        self.fn = callback
        try:
            params = inspect.signature(callback).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        self.new_style = set(params) == {"intermediate_result"}

    @classmethod
    def of(cls, callback: Any) -> Callback | None:
        """``None`` for no callback, else the checked callback."""
        return None if callback is None else cls(callback)

    def stops(self, arg: Any) -> bool:
        """Call it with ``arg`` (the ``OptimizeResult`` when :attr:`new_style`,
        else ``xk``); True when it raised ``StopIteration``."""
        try:
            if self.new_style:
                self.fn(intermediate_result=arg)
            else:
                self.fn(arg)
        except StopIteration:
            return True
        return False


# -- argument checks ------------------------------------------------------------------


def tolerance(name: str, value: Any) -> float:
    """``value`` as a finite float >= 0, or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def count(name: str, value: Any, *, allow_zero: bool) -> int:
    """``value`` as an int >= 0 (or >= 1), or an error naming ``name``."""
    least = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {least}, got {value!r}")
    if int(value) < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value}")
    return int(value)
