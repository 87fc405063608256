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
    s, step_size = adapt_step_size(grad, prev, step_size, hyper=hyper, xp=xp)
    flipped = s < 0
    if variant.forget:
        grad = xp.where(flipped, 0, grad)
    update = move(grad, step_size, xp)
    if variant.undo == "never":
        return Update(update, grad, step_size, None)
    assert prev_update is not None, "backtracking variants carry prev_update"
    undo = flipped if variant.undo == "always" else flipped & worse
    delta = xp.where(undo, -prev_update, update)
    return Update(delta, grad, step_size, update)


def adapt_step_size(grad: Array, prev: Array, step_size: Array, *, hyper: Hyper,
                    xp: Any) -> tuple[Array, Array]:
    """The step-size adaptation every variant shares: ``(sign(prev * grad),
    new step sizes)``, grown where the sign held, shrunk where it flipped,
    kept where the product is 0, then clamped to the bounds."""
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
    return s, step_size


def move(grad: Array, step_size: Array, xp: Any) -> Array:
    """Rprop's update, ``-(sign(grad) * step_size)`` (torch's rounding)."""
    return -(sign(grad, xp) * step_size)


def grprop_adjust(grads: list[Array], step_sizes: list[Array], *, adjust: str,
                  hyper: Hyper, xp: Any) -> list[Array]:
    """GRprop's whole-step phase (R neuralnet's ``minus`` for ``algorithm=
    "sag"`` / ``"slr"``), over every array of the optimizer at once.

    ``grads`` are the effective gradients and ``step_sizes`` the step sizes
    just adapted (:func:`adapt_step_size`), in the optimizer's order; each
    array is read in C (row-major) order, the arrays one after the other.
    Among the coordinates with a non-zero gradient, the first with the
    smallest ``|grad|`` (``"sag"``) or step size (``"slr"``) gets the step
    size ``clip(-(Σ_{j≠i} step_j·grad_j + δ) / grad_i, step_min, step_max)``;
    every other step size is returned unchanged. No non-zero gradient: nothing
    changes. A NaN result (a NaN gradient in the sum) keeps the old step size,
    where neuralnet would store the NaN. The sum is :func:`accurate_sum`:
    the same bits on every front and path, and within an ulp of R's
    long-double sum.

    Returns new step-size arrays, shaped as given; the caller writes them.
    """
    sizes = []
    for a in step_sizes:
        n = 1
        for d in a.shape:
            n *= int(d)
        sizes.append(n)
    if sum(sizes) == 0:
        return list(step_sizes)
    g = xp.concatenate([xp.reshape(a, (-1,)) for a in grads])
    lr = xp.concatenate([xp.reshape(a, (-1,)) for a in step_sizes])
    if g.dtype != lr.dtype:
        g = xp.asarray(g, dtype=lr.dtype)
    candidate, _, index = grprop_pick(g, lr, adjust, xp)
    # Positions made like g (on its device), for "every coordinate but the one".
    position = xp.cumsum(xp.where(candidate, 1, 1), 0) - 1
    chosen = position == index
    others = xp.where(candidate & ~chosen, lr * g, xp.zeros_like(lr))
    value = grprop_value(accurate_sum(others, xp), g[index], hyper, xp)
    apply = candidate[index] & (value == value)
    flat = xp.where(chosen & apply, value, lr)
    out, start = [], 0
    for a, n in zip(step_sizes, sizes, strict=True):
        # In the array's own dtype (arrays of several dtypes concatenate to
        # the widest): every array moves by the step size it stores.
        out.append(xp.asarray(xp.reshape(flat[start:start + n], a.shape), dtype=a.dtype))
        start += n
    return out


def grprop_pick(g: Array, lr: Array, adjust: str, xp: Any) -> tuple[Array, Array, Array]:
    """``(candidate, key, index)``: the coordinates GRprop may adjust (g ≠ 0,
    neuralnet's ``notzero``), their selection keys (|g| for ``"sag"``, the
    step size for ``"slr"``; +inf elsewhere and for NaN) and the index of the
    first smallest key, R's ``which.min`` (the first candidate if every key
    is +inf). ``candidate[index]`` is False when there is no candidate."""
    candidate = g != 0
    key = xp.abs(g) if adjust == "sag" else lr
    key = xp.where(candidate & (key == key), key, float("inf"))
    index = xp.argmin(key)
    index = xp.where(candidate[index], index, xp.argmax(xp.where(candidate, 1, 0)))
    return candidate, key, index


def grprop_value(others: Array, g_i: Array, hyper: Hyper, xp: Any) -> Array:
    """neuralnet's new step size for the chosen coordinate: ``min(max(-(others
    + δ) / g_i, step_min), step_max)``, ``others`` = Σ_{j≠i} step_j·g_j."""
    return xp.clip(-(others + hyper.grprop_delta) / g_i, hyper.step_min, hyper.step_max)


def sum_parts(x: Array, xp: Any) -> tuple[Array, Array]:
    """:func:`accurate_sum` before its final rounding: ``(hi, lo)``, the sum
    and its carried error (0-dim), for sums combined across processes.

    Each level adds the second half of the terms to the first, element by
    element (``x[i] + x[i + h]``, ``h = m // 2``), with error-free sums; an
    odd level carries its last term (and its error) to the next. Halves, not
    neighbours, so that every level reads and writes contiguous memory."""
    n = x.shape[0]
    if n < 2:  # nothing to add: the sum is the one term (or 0), exactly
        return (x[0], xp.zeros_like(x)[0]) if n else (xp.sum(x), xp.sum(x))
    h = n // 2
    # The first level's carried errors start at 0: (0 + 0) + err is err (an
    # error-free sum's error is never -0), so that level needs no adds.
    hi, lo = two_sum(x[:h], x[h:2 * h])
    if n % 2:
        hi = xp.concatenate([hi, x[2 * h:]])
        lo = xp.concatenate([lo, xp.zeros_like(x[2 * h:])])
    while hi.shape[0] > 1:
        m = hi.shape[0]
        h = m // 2
        s, err = two_sum(hi[:h], hi[h:2 * h])
        carried = (lo[:h] + lo[h:2 * h]) + err
        if m % 2:
            s = xp.concatenate([s, hi[2 * h:]])
            carried = xp.concatenate([carried, lo[2 * h:]])
        hi, lo = s, carried
    return hi[0], lo[0]


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """Knuth's error-free sum: ``s = fl(a + b)`` and ``a + b - s`` exactly."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def finish_sum(hi: Array, lo: Array, xp: Any) -> Array:
    """``hi + lo`` rounded once; a non-finite ``hi`` (inf, NaN) as it is."""
    return xp.where(xp.isfinite(hi), hi + lo, hi)


def accurate_sum(x: Array, xp: Any) -> Array:
    """The sum of a 1-D array in about twice its precision, rounded once.

    A pairwise tree (:func:`sum_parts`) whose every addition is an
    error-free two-sum (Knuth): the rounding errors are carried, and summed,
    beside the sums. Every front and path runs the same additions in the
    same order, so the result has the same bits in NumPy, torch and JAX, and
    it is within an ulp of the exact sum even where the terms cancel, as R's
    long-double ``sum()`` is (a plain float64 reduction is off by the
    cancellation times an ulp, and its order differs between libraries). A
    non-finite sum is the plain one.
    """
    return finish_sum(*sum_parts(x, xp), xp)


def grprop_step(grads: list[Array], prevs: list[Array], step_sizes: list[Array], *,
                hyper: Hyper, variant: Variant, xp: Any,
                hypers: list[Hyper] | None = None, adjuster: Any = None) -> list[Update]:
    """One GRprop step over every array of the optimizer: Rprop- adaptation
    per array, :func:`grprop_adjust` over all of them, then every coordinate
    moves by ``-sign(g) * step``. ``grads`` are the effective gradients; the
    gradient remembered is the raw one, also after a sign change (neuralnet's
    ``gradients.old <- gradients``). ``hypers`` (one per array, torch's param
    groups) adapt each array with its own etas; the adjustment reads the step
    bounds and δ of ``hyper``, which the groups share. ``adjuster`` replaces
    :func:`grprop_adjust` (same signature) where the arrays are shards of a
    vector spread over processes."""
    assert variant.adjust is not None, "grprop_step runs GRprop variants"
    per_array = [hyper] * len(grads) if hypers is None else hypers
    adapted = [adapt_step_size(g, p, s, hyper=h, xp=xp)[1]
               for g, p, s, h in zip(grads, prevs, step_sizes, per_array, strict=True)]
    adjusted = (adjuster or grprop_adjust)(grads, adapted, adjust=variant.adjust, hyper=hyper,
                                           xp=xp)
    return [Update(move(g, s, xp), g, s, None) for g, s in zip(grads, adjusted, strict=True)]


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


def init_state(like: Array, hyper: Hyper, variant: Variant, *, xp: Any,
               is_complex: bool, dtype: Any = None, step_size_like: Array = None,
               lr: Any = None) -> dict[str, Array]:
    """A fresh per-array state, with exactly the keys ``variant.state_keys``.

    ``prev`` (and ``prev_update``) start at 0, ``step_size`` at Δ0 (``lr``,
    default ``hyper.lr``; torch passes a group's own, possibly a tensor).
    Arrays are made like ``like`` (``step_size`` like ``step_size_like`` when
    given, as torch makes it like the gradient), in ``dtype`` if given, with
    ``xp``, an :class:`ArrayNamespace`.
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
