"""The ways rprop.Rprop applies one step to a (device, dtype) group of tensors.

Every path has the same signature and the same result, bitwise:

* :func:`single_tensor` applies :func:`rprop._core.rprop_update` per tensor:
  the readable ground truth, and the path ``differentiable=True`` uses;
* :func:`multi_tensor` (``foreach=True``) batches the arithmetic with
  ``torch._foreach_*`` and selects with ``masked_fill_`` and ``torch.where``
  (masks as operands): no boolean-mask indexing and no host synchronisation,
  so it suits ``capturable=True`` (CUDA graphs) and ``torch.compile``;
* the fused path lives in :mod:`rprop.torch._fused`.

Both register with :mod:`rprop.torch._path_registry`, the for-loop path as
the reference path that runs every variant feature.

All tensors arrive as real views (complex parameters already split into real
and imaginary parts). ``worse`` is ``None`` unless the variant needs the loss;
then it is a 0-dim bool tensor on the group's device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rprop._core import effective_grad, rprop_update
from rprop._hyper import Hyper
from rprop._variants import Variant
from rprop.torch._path_registry import ALL_FEATURES, Path, register


def single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    prev_updates: list[Tensor] | None,
    *,
    steps: list[Tensor],
    hyper: Hyper,
    variant: Variant,
    worse: Any,
    differentiable: bool = False,
) -> None:
    for step in steps:
        step += 1
    for i, param in enumerate(params):
        prev = prevs[i].clone() if differentiable else prevs[i]
        out = rprop_update(
            effective_grad(grads[i], param, hyper),
            prev,
            step_sizes[i],
            None if prev_updates is None else prev_updates[i],
            hyper=hyper,
            variant=variant,
            worse=worse,
            xp=torch,
        )
        # State first: out.prev may be the gradient itself, which may share
        # memory with the parameter (p.grad = p.detach() for f = |p|^2 / 2).
        prevs[i].copy_(out.prev)
        step_sizes[i].copy_(out.step_size)
        if prev_updates is not None and out.prev_update is not None:
            prev_updates[i].copy_(out.prev_update)
        param.add_(out.delta)


def multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    prev_updates: list[Tensor] | None,
    *,
    steps: list[Tensor],
    hyper: Hyper,
    variant: Variant,
    worse: Any,
    differentiable: bool = False,
) -> None:
    if differentiable:
        raise ValueError("foreach=True does not support differentiable=True; use foreach=False")
    increment_steps(steps)
    # The same operations as rprop._core.rprop_update, in the same order, so
    # every rounding matches; only the batching differs.
    if hyper.maximize:
        grads = list(torch._foreach_neg(grads))
    if hyper.weight_decay != 0.0:
        grads = list(torch._foreach_add(grads, torch._foreach_mul(params, hyper.weight_decay)))
    flips = adapt_step_sizes_(grads, prevs, step_sizes, hyper)
    # prev takes the gradient, zeroed on flips for forgetting variants.
    torch._foreach_copy_(prevs, grads)
    if variant.forget:
        for prev, flipped in zip(prevs, flips, strict=True):
            prev.masked_fill_(flipped, 0)
    if variant.undo == "never":
        # param + (-1 * sign(g)) * step: the core's param + -(sign(g) * step).
        torch._foreach_addcmul_(params, torch._foreach_sign(prevs), step_sizes, value=-1)
        return
    assert prev_updates is not None, "backtracking variants carry prev_update"
    moves = torch._foreach_sign(prevs)
    torch._foreach_mul_(moves, step_sizes)  # sign(g) * step, the update negated
    back = []
    for i, flipped in enumerate(flips):
        undo = flipped if variant.undo == "always" else flipped & worse
        back.append(torch.where(undo, prev_updates[i], moves[i]))
    torch._foreach_sub_(params, back)  # param - x is param + (-x), bit for bit
    torch._foreach_neg_(moves)
    torch._foreach_copy_(prev_updates, moves)


def adapt_step_sizes_(grads: list[Tensor], prevs: list[Tensor], step_sizes: list[Tensor],
                      hyper: Hyper) -> list[Tensor]:
    """The step-size adaptation of :func:`rprop._core.adapt_step_size`,
    batched and in place on ``step_sizes``; returns the masks where the sign
    flipped. ``grads`` are the effective gradients."""
    signs = list(torch._foreach_mul(grads, prevs))
    torch._foreach_sign_(signs)  # torch.sign maps NaN to 0, as rprop._core.sign does
    # Each sign becomes, in place, the step-size factor (eta+, eta- or 1) in
    # the step size's dtype, as in the core and in torch.optim.Rprop.
    # masked_fill_ takes a mask without a host sync and, unlike torch.where,
    # makes no parameter-sized float temporaries (only one bool mask at a time).
    # The masks are taken from the signs before any fill: an eta rounded to
    # the dtype may be 0 or 1 (eta- = 1e-8 in float16), colliding with a sign.
    flips = []
    for s in signs:
        flipped, zero = s < 0, s == 0
        flips.append(flipped)
        s.masked_fill_(s > 0, hyper.eta_plus)
        s.masked_fill_(flipped, hyper.eta_minus)
        s.masked_fill_(zero, 1.0)
        del zero
    torch._foreach_mul_(step_sizes, signs)
    del signs
    torch._foreach_clamp_min_(step_sizes, hyper.step_min)
    torch._foreach_clamp_max_(step_sizes, hyper.step_max)
    return flips


def increment_steps(steps: list[Tensor]) -> None:
    """``step += 1`` for every parameter's counter, in one call."""
    if steps and steps[0].is_cpu:
        # A CPU scalar tensor avoids re-wrapping 1 per tensor (as torch does).
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
    else:
        torch._foreach_add_(steps, 1)


# The reference path: every variant feature, differentiable=True, CUDA graphs
# and torch.compile.
register(Path("for-loop", single_tensor, preference=0, features=ALL_FEATURES,
              differentiable=True))
# foreach: no host synchronisation and no mask indexing, so it captures and
# compiles too.
register(Path("foreach", multi_tensor, preference=1))
