"""rprop.torch.minimize: SciPy's ``minimize`` contract on torch tensors.

For objectives that are not a sum over samples (Gaussian-process
hyperparameters, physics-informed losses, model calibration): a closure that
returns the loss, a few tensors, and the same stop rules, messages and result
as :func:`rprop.minimize` (both read :mod:`rprop._stopping`). The update is
the algorithm core's (:func:`rprop._core.rprop_update` with ``xp=torch``),
the one :func:`rprop.minimize` runs with ``xp=numpy``: fed the same ``f`` and
gradients in float64, the two fronts visit the same points, bit for bit.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from rprop._core import effective_grad, grprop_step, loss_went_up, rprop_update
from rprop._hyper import DEFAULT_ETAS, DEFAULT_GRPROP_DELTA, DEFAULT_STEP_SIZES, Hyper
from rprop._stopping import (
    DEFAULT_LR,
    Callback,
    Monitor,
    OptimizeResult,
    OptimizeWarning,
    StopRules,
    outcome,
)
from rprop._variants import get_variant
from rprop.plotting import plot_training
from rprop.torch._step_stats import step_size_summary

__all__ = ["MinimizeResult", "minimize"]


class MinimizeResult(OptimizeResult):
    """SciPy's ``OptimizeResult`` (a dict with attribute access) that draws itself."""

    def plot(self, path: Any = None, *, title: str | None = None) -> Any:
        """Draw ``fun_history`` above ``step_size_history`` (median line,
        min..max band, ``step_min`` dashed), per iteration; see
        :func:`rprop.plotting.plot_training`. Saved to ``path`` when given;
        returns the matplotlib Figure (needs ``pip install rprop[plot]``)."""
        return plot_training(self["fun_history"], self["step_size_history"],
                             step_min=self.get("step_min"), xlabel="iteration", title=title,
                             path=path)


def minimize(
    closure: Callable[[], Any],
    params: Tensor | Any,
    *,
    variant: str = "irprop+",
    lr: float = DEFAULT_LR,
    etas: tuple[float, float] = DEFAULT_ETAS,
    step_sizes: tuple[float, float] = DEFAULT_STEP_SIZES,
    grprop_delta: float = DEFAULT_GRPROP_DELTA,
    maximize: bool = False,
    bounds: Any = None,
    maxiter: int = 1000,
    maxfev: int | None = None,
    gtol: float | None = None,
    ftol: float = 0.0,
    xtol: float = 1e-6,
    tol: float | None = None,
    callback: Callable[..., Any] | None = None,
    progress: bool = False,
) -> OptimizeResult:
    r"""Minimize (or maximize) the loss a closure returns, over torch tensors, with Rprop.

    Each iteration calls ``closure()`` once for the loss and its gradient at
    the current tensors and moves every element by its own step size against
    the sign of its partial derivative (one Rprop step).

    Args:
        closure: ``closure() -> loss``, a one-element tensor computed from
            ``params``. Either leave the gradient to ``minimize`` (it calls
            :func:`torch.autograd.grad` on the loss), or call
            ``loss.backward()`` in the closure as for ``torch.optim``'s
            ``step(closure)``; then the closure may also return a float.
            ``minimize`` sets every ``param.grad`` to ``None`` before each
            call, so a closure needs no ``zero_grad()``.
        params: what to optimize, updated in place: a tensor, a list of
            tensors, or ``model.parameters()``; each a leaf, real
            floating-point, ``requires_grad=True``, finite, not empty.
        variant: ``"irprop+"`` (default), ``"irprop-"``, ``"rprop+"``, ``"rprop-"``,
            or R neuralnet's GRprop, ``"grprop-sag"`` / ``"grprop-slr"``, whose
            adjustment runs over every tensor at once (in the order of ``params``).
        lr: initial step size Δ0 of every element (default 0.1, as
            :func:`rprop.minimize`).
        etas: ``(eta_minus, eta_plus)``, default ``(0.5, 1.2)``.
        step_sizes: ``(step_min, step_max)``, default ``(1e-6, 50)``.
        grprop_delta: GRprop's δ (default 1e-6, neuralnet's); only the
            ``grprop-*`` variants read it.
        maximize: maximize the loss instead (``fun`` is then the largest
            loss seen, ``jac`` its gradient as autograd gives it).
        bounds: ``(lo, hi)`` for every tensor, or a list with one entry per
            tensor, each ``None`` or ``(lo, hi)``; ``lo`` and ``hi`` are
            ``None`` (no bound), numbers, or tensors that broadcast to the
            tensor's shape. Every iterate stays within them, as in
            :func:`rprop.minimize`: the gradient is projected, Rprop steps,
            the tensors are clipped. A start outside is clipped into them
            with an ``OptimizeWarning``.
        maxiter, maxfev, gtol, ftol, xtol, tol: the stop rules of
            :func:`rprop.minimize`, with its defaults and messages
            (``maxfev`` counts calls of the closure: one per iterate).
        callback: called after each step as
            ``callback(intermediate_result=OptimizeResult(x, fun, jac, nit,
            nfev, njev, step_size))`` if its only parameter is named
            ``intermediate_result``, else as ``callback(xk)``; ``xk`` are
            copies, shaped as ``params``. ``StopIteration`` stops the run.
        progress: show a tqdm bar with the iteration and the loss (default off).

    Returns:
        ``scipy.optimize.OptimizeResult`` (a dict with attribute access when
        SciPy is not installed) with ``x`` (copies of the tensors: one tensor
        when ``params`` was one, else a list), ``fun`` (a float), ``jac``,
        ``nit``, ``nfev``, ``njev``, ``success``, ``status``, ``message``,
        ``stop_rule``, ``step_size`` (shaped as ``x``), ``fun_history``
        (the loss at every iterate, ``x0``'s first: ``nit + 1`` values),
        ``step_size_history`` (the (min, median, max) of the step sizes
        after each step: ``nit`` triples; see :func:`rprop.torch.fit`'s
        history for the median) and ``step_min``; ``result.plot()`` draws
        the last two. As in
        :func:`rprop.minimize`, ``x`` is the best iterate seen unless
        ``gtol`` stopped the run (then the final one), and ``params`` are
        left holding ``x``, with ``.grad`` set to ``None``.
    """
    if not callable(closure):
        raise TypeError(
            f"closure must be callable (closure() -> loss tensor), got {type(closure).__name__}"
        )
    tensors, single = _check_params(params)
    hyper = Hyper.from_torch_args(lr, etas, step_sizes, 0.0, maximize, grprop_delta)
    var = get_variant(variant)
    lo, hi = _check_bounds(bounds, tensors)
    boxed = [bool(torch.isfinite(a).any() | torch.isfinite(b).any())
             for a, b in zip(lo, hi, strict=True)]
    rules = StopRules.from_options(gtol=gtol, xtol=xtol, ftol=ftol, maxiter=maxiter,
                                   maxfev=maxfev, tol=tol)
    cb = Callback.of(callback)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")

    with torch.no_grad():
        if any(bool(((p < a) | (p > b)).any()) for p, a, b in zip(tensors, lo, hi, strict=True)):
            warnings.warn("params lie outside the bounds; they are clipped into them",
                          OptimizeWarning, stacklevel=2)
            for p, a, b in zip(tensors, lo, hi, strict=True):
                p.copy_(torch.clamp(p, a, b))
        x = [p.detach().clone() for p in tensors]
    evaluate = _Evaluator(closure, tensors)
    sign = -1.0 if maximize else 1.0
    bar = tqdm(total=rules.maxiter, desc="minimize", unit="it", dynamic_ncols=True,
               disable=not progress)
    try:
        step_size = [torch.full_like(p, hyper.lr) for p in x]
        prev = [torch.zeros_like(p) for p in x]
        prev_update = [torch.zeros_like(p) for p in x] if var.backtracks else None
        f, g = evaluate()
        pg, grad_finite, gmax, moving = _look(g, x, lo, hi, boxed, hyper, step_size)
        # Kept on the device and read once at the end: no host sync per step.
        fun_history: list[float] = [f]
        step_history: list[Tensor] = []
        prev_f = math.inf
        best = (f, x, g) if math.isfinite(f) and grad_finite else None
        monitor = Monitor(rules, fun_name="the closure")
        while True:
            stop = monitor.check(f=sign * f, grad_finite=grad_finite, gmax=gmax,
                                 moving_step=moving, nfev=evaluate.nfev)
            if stop is not None:
                rule, detail = stop
                if rule == "gtol":
                    best = (f, x, g)
                break

            with torch.no_grad():
                # A whole-step phase (GRprop's adjustment) reads every tensor at once.
                adjusted = (grprop_step(pg, prev, step_size, hyper=hyper, variant=var,
                                        xp=torch) if var.adjust is not None else None)
                x_new = []
                for i, xi in enumerate(x):
                    out = adjusted[i] if adjusted is not None else rprop_update(
                        pg[i], prev[i], step_size[i],
                        None if prev_update is None else prev_update[i],
                        hyper=hyper, variant=var, worse=loss_went_up(sign * f, prev_f), xp=torch,
                    )
                    x_try = xi + out.delta
                    # Without bounds, projecting and clipping change nothing: skipped.
                    xn = torch.clamp(x_try, lo[i], hi[i]) if boxed[i] else x_try
                    prev[i], step_size[i] = out.prev, out.step_size
                    if prev_update is not None and out.prev_update is not None:
                        pu = out.prev_update
                        if boxed[i]:
                            # Where the bounds cut a step short, remember the distance
                            # moved, so that undoing it returns to where we were.
                            cut = (xn != x_try) & (pu != 0)
                            pu = torch.where(cut, xn - xi, pu)
                        prev_update[i] = pu
                    x_new.append(xn)
                moved = any(bool((xn != xi).any()) for xn, xi in zip(x_new, x, strict=True))
                for p, xn in zip(tensors, x_new, strict=True):
                    p.copy_(xn)
            prev_f = sign * f
            x = x_new
            f, g = evaluate()
            pg, grad_finite, gmax, moving = _look(g, x, lo, hi, boxed, hyper, step_size)
            fun_history.append(f)
            summary = step_size_summary(step_size)
            if summary is not None:  # always: params are not empty
                step_history.append(summary)
            monitor.stepped(prev_f, sign * f, moved)
            if math.isfinite(f) and grad_finite and (best is None or sign * f < sign * best[0]):
                best = (f, x, g)
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{f:.6g}", refresh=False)
            if cb is not None and cb.stops(
                OptimizeResult(
                    x=_shaped(x, single), fun=f, jac=_shaped(g, single), nit=monitor.nit,
                    nfev=evaluate.nfev, njev=evaluate.nfev, step_size=_shaped(step_size, single),
                ) if cb.new_style else _shaped(x, single)
            ):
                rule, detail = "callback", ""
                break
    finally:
        bar.close()
        for p in tensors:
            p.grad = None

    bf, bx, bg = best if best is not None else (f, x, g)
    with torch.no_grad():
        for p, xi in zip(tensors, bx, strict=True):
            p.copy_(xi)
    status, message = outcome(rule, detail, best is not None)
    steps = [] if not step_history else [
        (v[0], v[1], v[2]) for v in torch.stack(
            [t.to(step_history[0].device) for t in step_history]).tolist()]
    return MinimizeResult(
        x=_shaped(bx, single), fun=bf, jac=_shaped(bg, single), nit=monitor.nit,
        nfev=evaluate.nfev, njev=evaluate.nfev, success=status == 0, status=status,
        message=message, stop_rule=rule, step_size=_shaped(step_size, single),
        fun_history=fun_history, step_size_history=steps, step_min=hyper.step_min,
    )


# -- evaluation -------------------------------------------------------------------


class _Evaluator:
    """The loss (a float) and its gradient (one detached tensor per param) at
    the current params, from one call of the closure; ``nfev`` counts calls."""

    def __init__(self, closure: Callable[[], Any], params: list[Tensor]) -> None:
        self.closure = closure
        self.params = params
        self.nfev = 0

    def __call__(self) -> tuple[float, list[Tensor]]:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = self.closure()
        self.nfev += 1
        f = _loss_value(loss)
        grads: list[Tensor | None] = [p.grad for p in self.params]
        if all(gr is None for gr in grads) and isinstance(loss, Tensor) and loss.requires_grad:
            # The closure did not call backward: take the gradient here.
            grads = list(torch.autograd.grad(loss, self.params, allow_unused=True))
        if self.nfev == 1 and all(gr is None for gr in grads):
            # A loss wired to other tensors than params would read as a zero
            # gradient, and gtol would report success at the start.
            raise ValueError(
                "the closure's loss does not depend on params through autograd: return a "
                "tensor computed from params (minimize then takes its gradient), or call "
                "loss.backward() in the closure"
            )
        # A param the loss does not reach has a zero gradient.
        return f, [torch.zeros_like(p) if gr is None else gr.detach()
                   for p, gr in zip(self.params, grads, strict=True)]


def _loss_value(loss: Any) -> float:
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"the closure must return a scalar loss (one element), got shape "
                f"{tuple(loss.shape)}"
            )
        if loss.is_complex() or loss.dtype == torch.bool:
            raise TypeError(f"the closure must return a real loss, got a {loss.dtype} tensor")
        return float(loss.detach().reshape(()))
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real):
        raise TypeError(
            f"the closure must return the loss as a one-element tensor, got "
            f"{type(loss).__name__}"
        )
    return float(loss)


@torch.no_grad()
def _look(
    g: list[Tensor], x: list[Tensor], lo: list[Tensor], hi: list[Tensor], boxed: list[bool],
    hyper: Hyper, step_size: list[Tensor],
) -> tuple[list[Tensor], bool, float, float | None]:
    """The gradient the next step follows (negated under maximize), with the
    components that point out of the box, at a bound, set to 0; and what the
    stop rules read of it (see :func:`_summary`)."""
    pg = [_projected(effective_grad(gi, xi, hyper), xi, a, b) if box
          else effective_grad(gi, xi, hyper)
          for gi, xi, a, b, box in zip(g, x, lo, hi, boxed, strict=True)]
    return (pg, *_summary(g, pg, step_size))


def _projected(g: Tensor, x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    outward = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
    return torch.where(outward, 0.0, g)


def _summary(
    g: list[Tensor], pg: list[Tensor], step_size: list[Tensor]
) -> tuple[bool, float, float | None]:
    """Whether every gradient is finite, the largest ``|projected gradient|``
    component, and the largest step size of an element whose projected
    gradient is not 0 (``None`` if none): what the stop rules read, in one
    transfer to the host per device."""
    rows = [torch.stack([
        torch.isfinite(gi).all().to(s.dtype),
        pgi.abs().amax().to(s.dtype),
        torch.where(pgi != 0, s, -math.inf).amax(),
    ]).to(torch.float64) for gi, pgi, s in zip(g, pg, step_size, strict=True)]
    by_device: dict[torch.device, list[Tensor]] = {}
    for r in rows:
        by_device.setdefault(r.device, []).append(r)
    values = [v for rs in by_device.values() for v in torch.stack(rs).cpu().tolist()]
    finite = all(v[0] == 1.0 for v in values)
    gmax = max(v[1] for v in values)
    moving = max(v[2] for v in values)
    return finite, gmax, None if moving == -math.inf else moving


def _shaped(ts: list[Tensor], single: bool) -> Tensor | list[Tensor]:
    """Copies of ``ts``, as one tensor when ``params`` was one."""
    copies = [t.detach().clone() for t in ts]
    return copies[0] if single else copies


# -- argument checks ----------------------------------------------------------------


def _check_params(params: Any) -> tuple[list[Tensor], bool]:
    """The tensors to optimize, and whether ``params`` was a single tensor."""
    if isinstance(params, Tensor):
        tensors, single = [params], True
    else:
        if isinstance(params, (str, bytes, dict)):
            raise TypeError(
                "params must be a tensor, a list of tensors or model.parameters(), got "
                f"{type(params).__name__}"
            )
        try:
            tensors, single = list(params), False
        except TypeError:
            raise TypeError(
                "params must be a tensor, a list of tensors or model.parameters(), got "
                f"{type(params).__name__}"
            ) from None
        if not tensors:
            raise ValueError("params must hold at least one tensor, got none")
    for i, p in enumerate(tensors):
        if isinstance(p, dict):
            raise TypeError(
                f"params[{i}] is a param group (a dict); minimize has one set of "
                "hyperparameters: pass the tensors themselves"
            )
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a real floating-point tensor, got {p.dtype}")
        if not (p.is_leaf and p.requires_grad):
            raise ValueError(
                f"params[{i}] must be a leaf tensor with requires_grad=True (e.g. "
                "torch.zeros(3, requires_grad=True), or an nn.Parameter)"
            )
        if p.numel() == 0:
            raise ValueError(f"params[{i}] must not be empty, got shape {tuple(p.shape)}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"params[{i}] must be finite; it holds NaN or inf")
        if any(p is q for q in tensors[:i]):
            raise ValueError(f"params[{i}] is listed twice")
    return tensors, single


def _is_bound(value: Any) -> bool:
    return value is None or isinstance(value, Tensor) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool))


def _check_bounds(bounds: Any, params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """``(lo, hi)`` as tensors shaped, typed and placed as each param."""
    n = len(params)
    if bounds is None:
        pairs: list[Any] = [None] * n
    elif isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(map(_is_bound, bounds)):
        pairs = [bounds] * n
    elif isinstance(bounds, (tuple, list)):
        if len(bounds) != n:
            raise ValueError(
                f"bounds must be one pair (lo, hi) for every tensor, or one entry per tensor; "
                f"got {len(bounds)} entries for {n} tensor(s)"
            )
        pairs = list(bounds)
    else:
        raise TypeError(
            f"bounds must be None, a pair (lo, hi), or a list with one (lo, hi) or None per "
            f"tensor; got {type(bounds).__name__}"
        )
    lo, hi = [], []
    for i, (p, pair) in enumerate(zip(params, pairs, strict=True)):
        if pair is None:
            pair = (None, None)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and all(map(_is_bound, pair))):
            raise TypeError(
                f"bounds for params[{i}] must be None or a pair (lo, hi), each None, a number "
                f"or a tensor that broadcasts to shape {tuple(p.shape)}; got {pair!r}"
            )
        a = _bound_tensor(pair[0], -math.inf, p, i, "lo")
        b = _bound_tensor(pair[1], math.inf, p, i, "hi")
        if bool((a.isnan() | b.isnan()).any()):
            raise ValueError(f"bounds for params[{i}] contain NaN")
        bad = (a > b).flatten().nonzero()
        if bad.numel():
            k = int(bad[0])
            raise ValueError(
                f"bounds for params[{i}]: lower bound {a.flatten()[k].item()} > upper bound "
                f"{b.flatten()[k].item()} at flat index {k}"
            )
        if bool(((a == math.inf) | (b == -math.inf)).any()):
            raise ValueError(
                f"bounds for params[{i}] leave no finite value (lo = inf or hi = -inf)"
            )
        lo.append(a)
        hi.append(b)
    return lo, hi


def _bound_tensor(value: Any, default: float, p: Tensor, i: int, name: str) -> Tensor:
    value = default if value is None else value
    t = torch.as_tensor(value, dtype=p.dtype, device=p.device).detach()
    try:
        return torch.broadcast_to(t, p.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"bounds for params[{i}]: {name} of shape {tuple(t.shape)} does not broadcast to the "
            f"tensor's shape {tuple(p.shape)}"
        ) from None
