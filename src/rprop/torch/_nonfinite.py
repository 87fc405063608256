"""Finding non-finite gradients and losses, for ``nonfinite="skip"|"raise"``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def first_nonfinite(
    optimizer: Any, checked: list[dict[str, list[Tensor]]], loss: Tensor | None
) -> str | None:
    """Describe the first NaN/±inf among the loss and the groups' gradients,
    or return None when all are finite.

    One ``_foreach_norm(inf)`` per group (NaN and inf survive a max-abs
    reduction) and one host synchronisation for the whole step.
    """
    if loss is not None and not bool(torch.isfinite(loss)):
        return f"the loss ({float(loss)})"
    for lists in checked:
        grads = [g for g in lists["grads"] if g.numel() > 0]
        if not grads:
            continue
        norms = torch._foreach_norm(
            [torch.view_as_real(g) if g.is_complex() else g for g in grads], ord=float("inf")
        )
        finite = torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]))
        if bool(finite.all()):
            continue
        bad = int((~finite).nonzero()[0, 0])
        param = [p for p, g in zip(lists["params"], lists["grads"], strict=True) if g.numel()][bad]
        index = _param_index(optimizer, param)
        return f"the gradient of parameter {index} (shape {tuple(param.shape)})"
    return None


def _param_index(optimizer: Any, param: Tensor) -> int:
    """The parameter's index as state_dict numbers it."""
    i = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return i
            i += 1
    return -1
