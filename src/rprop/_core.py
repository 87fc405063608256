"""The Rprop update, written once: the elementwise rule and the step-level
rules around it.

:func:`rprop_update` is pure and elementwise, and takes its arrays from any
namespace that has what :class:`ArrayNamespace` lists (NumPy, torch,
jax.numpy). The torch, NumPy and JAX fronts call it directly; the torch fast
paths (foreach, fused) are parity-tested against it.

The step-level rules every front shares live here too, so that each is
written once: the state a variant starts with (:func:`init_state`), the
loss a step is given (:func:`check_loss`, :func:`signed_loss`,
:func:`loss_went_up`) and the non-finite policy (:func:`check_nonfinite`).

Rounding: each output is produced by the same single IEEE operations in the
same order as ``torch.optim.Rprop`` (``step * eta`` then clamp; ``param +
(-sign(g) * step)``), so the result is bitwise identical to torch and to the
per-element transcription of the papers in ``tests/reference.py``.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Protocol

from rprop._hyper import Hyper
from rprop._variants import UNDO_STATE, Variant

Array = Any

# What a step does when a gradient (or iRprop+'s loss) is NaN or infinite:
# go on as torch does, skip the whole step, or raise.
NONFINITE_MODES = ("propagate", "skip", "raise")


class ArrayNamespace(Protocol):
    """The array functions the core uses; NumPy, torch and jax.numpy have them.

    Beyond these, arrays must support ``*``, ``-``, ``>``, ``<``, ``&`` and
    ``.dtype`` with the usual elementwise meaning.
    """

    def where(self, condition: Any, x: Any, y: Any, /) -> Any: ...
    def clip(self, a: Any, lo: Any, hi: Any, /) -> Any: ...
    def zeros_like(self, a: Any, /, *, dtype: Any = ...) -> Any: ...
    def full_like(self, a: Any, fill_value: Any, /, *, dtype: Any = ...) -> Any: ...
    def asarray(self, a: Any, /, *, dtype: Any = ...) -> Any: ...


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
    """iRprop+'s test E(t) > E(t-1), on signed losses (see :func:`signed_loss`);
    ``prev_loss`` starts at :data:`FIRST_PREV_LOSS` (+inf) so the first step
    never backtracks. NaN compares False: a NaN loss never triggers undo."""
    return loss > prev_loss


# E(t-1) before the first step: nothing is worse than it.
FIRST_PREV_LOSS = float("inf")


def signed_loss(loss: Any, hyper: Hyper) -> Any:
    """The loss the iRprop+ test compares: negated under ``maximize``, so that
    "worse" always means "went up"."""
    return -loss if hyper.maximize else loss


def check_loss(loss: Any) -> Any:
    """Refuse what cannot be a loss; return a Python number as a float and an
    array or tensor (NumPy, torch, JAX) unchanged.

    A loss is a real number: a Python/NumPy real (not a bool), or an array
    with one element of a real (integer or floating) dtype. Fronts convert an
    accepted array to their own scalar type.
    """
    if isinstance(loss, bool) or isinstance(loss, complex):
        raise TypeError(f"loss must be a real number, got {loss!r}")
    if isinstance(loss, numbers.Real):
        return float(loss)
    dtype = getattr(loss, "dtype", None)
    shape = getattr(loss, "shape", None)
    if dtype is None or shape is None:
        raise TypeError(
            f"loss must be a real number or a one-element tensor, got {type(loss).__name__}"
        )
    size = 1
    for n in shape:
        size *= int(n)
    if size != 1:
        raise ValueError(f"loss must be a scalar (one element), got shape {tuple(shape)}")
    # NumPy dtypes have .kind; torch and JAX dtypes are described by name.
    kind = getattr(dtype, "kind", None)
    name = str(dtype)
    if kind is not None:
        real = kind in "iuf"
    else:
        real = not ("complex" in name or "bool" in name)
    if not real:
        raise TypeError(f"loss must be a real number, got a {name} tensor")
    return loss


def check_nonfinite(mode: Any) -> str:
    """``mode`` if it is one of :data:`NONFINITE_MODES`, else a ValueError."""
    if not isinstance(mode, str) or mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {mode!r}")
    return mode


def initial_step_size(lr: Any, is_complex: bool) -> Any:
    """The fill of a fresh ``step_size``: Δ0, or Δ0 + Δ0·i for a complex
    parameter, whose real and imaginary parts are independent reals (torch)."""
    return complex(lr, lr) if is_complex else lr


def init_state(like: Array, hyper: Hyper, variant: Variant, *, xp: ArrayNamespace,
               is_complex: bool, dtype: Any = None, step_size_like: Array = None,
               lr: Any = None) -> dict[str, Array]:
    """A fresh per-array state, with exactly the keys ``variant.state_keys``.

    ``prev`` (and ``prev_update``) start at 0, ``step_size`` at Δ0 (``lr``,
    default ``hyper.lr``; torch passes a group's own, possibly a tensor).
    Arrays are made like ``like`` (``step_size`` like ``step_size_like`` when
    given, as torch makes it like the gradient), in ``dtype`` if given.
    """
    fill = initial_step_size(hyper.lr if lr is None else lr, is_complex)
    state = {
        "prev": xp.zeros_like(like, dtype=dtype),
        "step_size": xp.full_like(like if step_size_like is None else step_size_like, fill,
                                  dtype=dtype),
    }
    if variant.backtracks:
        state[UNDO_STATE] = xp.zeros_like(like, dtype=dtype)
    return state
