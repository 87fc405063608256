"""The Rprop update, written once.

Every function here is pure and elementwise, and takes its arrays from any
namespace that has ``where`` and ``clip`` and the usual operators (NumPy,
torch, jax.numpy). The torch, NumPy and JAX fronts call :func:`rprop_update`
directly; the torch fast paths (foreach, fused) are parity-tested against it.

Rounding: each output is produced by the same single IEEE operations in the
same order as ``torch.optim.Rprop`` (``step * eta`` then clamp; ``param +
(-sign(g) * step)``), so the result is bitwise identical to torch and to the
per-element transcription of the papers in ``tests/reference.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from rprop._hyper import Hyper
from rprop._variants import Variant

Array = Any


def sign(x: Array, xp: Any) -> Array:
    """Sign as torch computes it: +1, -1, or +0 for zeros *and NaN*.

    NumPy and JAX return NaN for NaN and keep the sign of -0.0; spelling the
    sign out keeps every front on torch's trajectory even for those inputs.
    """
    return xp.where(x > 0, 1, xp.where(x < 0, -1, xp.zeros_like(x)))


class Update(NamedTuple):
    """Result of one step for one array.

    ``delta`` is what to add to the parameter; ``prev`` the gradient to
    remember (0 where the variant forgets it); ``step_size`` the new step
    sizes; ``prev_update`` the update to remember for backtracking (0 where
    the gradient was forgotten, ``None`` for variants that do not backtrack).
    """

    delta: Array
    prev: Array
    step_size: Array
    prev_update: Array | None


def effective_grad(grad: Array, param: Array, hyper: Hyper) -> Array:
    """The gradient the sign test sees: negated under ``maximize``, then with
    coupled L2 weight decay ``weight_decay * param`` added (torch's order)."""
    if hyper.maximize:
        grad = -grad
    if hyper.weight_decay != 0.0:
        grad = grad + hyper.weight_decay * param
    return grad


def rprop_update(
    grad: Array,
    prev: Array,
    step_size: Array,
    prev_update: Array | None,
    *,
    hyper: Hyper,
    variant: Variant,
    worse: Any = False,
    xp: Any,
) -> Update:
    """One Rprop step for one array.

    ``grad`` is the effective gradient (see :func:`effective_grad`). ``worse``
    (a bool or 0-dim boolean array) says whether the loss went up since the
    last step; only ``undo="if_worse"`` variants read it.
    """
    s = sign(grad * prev, xp)
    # eta in the step size's dtype, as torch.optim.Rprop multiplies by it (its
    # factor tensor has that dtype): for float16/bfloat16 that is 1.203125,
    # not 1.2, and the product rounds once from float32.
    grown = step_size * xp.asarray(hyper.eta_plus, dtype=step_size.dtype)
    shrunk = step_size * xp.asarray(hyper.eta_minus, dtype=step_size.dtype)
    # p = 0 (and NaN, which sign maps to 0) keeps the step size, then clamps:
    # that clamp is what torch does when lr lies outside the bounds.
    step_size = xp.clip(xp.where(s > 0, grown, xp.where(s < 0, shrunk, step_size)),
                        hyper.step_min, hyper.step_max)
    flipped = s < 0
    if variant.forget:
        grad = xp.where(flipped, 0, grad)
    update = -(sign(grad, xp) * step_size)
    if variant.undo == "never":
        return Update(update, grad, step_size, None)
    assert prev_update is not None, "backtracking variants carry prev_update"
    undo = flipped if variant.undo == "always" else flipped & worse
    delta = xp.where(undo, -prev_update, update)
    return Update(delta, grad, step_size, update)


def loss_went_up(loss: Any, prev_loss: Any) -> Any:
    """iRprop+'s test E(t) > E(t-1); ``prev_loss`` starts at +inf so the first
    step never backtracks. NaN compares False: a NaN loss never triggers undo."""
    return loss > prev_loss
