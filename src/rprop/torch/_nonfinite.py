"""Finding non-finite gradients and losses, for ``nonfinite="skip"|"raise"``."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rprop.torch._compat import local_tensor
from rprop.torch._group import describe_param


def first_nonfinite(optimizer: Any, checked: list[Any], loss: Tensor | None) -> str | None:
    """Describe the first NaN/±inf among the loss and the groups' gradients,
    or return None when all are finite.

    One ``_foreach_norm(inf)`` per (device) list of gradients (NaN and inf
    survive a max-abs reduction) and one host synchronisation per step. With
    DTensor parameters (FSDP2, tensor parallel) each rank looks at its own
    shards, then one MIN all-reduce of "first bad parameter index" makes every
    rank take the same decision; without it, a rank that skips while another
    steps would desynchronise them (or hang the next collective).
    """
    if loss is not None and not bool(torch.isfinite(loss)):
        return f"the loss ({float(loss)})"
    params = [p for bucket in checked for p in bucket.params]
    grads = [local_tensor(g) for bucket in checked for g in bucket.grads]
    none_bad = len(params)
    first_bad = none_bad
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        if g.numel() > 0:
            by_device.setdefault(g.device, []).append(i)
    for idx in by_device.values():
        reals = [torch.view_as_real(grads[i]) if grads[i].is_complex() else grads[i]
                 for i in idx]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(reals, ord=float("inf"))))
        if not bool(finite.all()):
            first_bad = min(first_bad, idx[int((~finite).nonzero()[0, 0])])
    first_bad = _agree_across_ranks(params, first_bad)
    if first_bad == none_bad:
        return None
    param = params[first_bad]
    return f"the gradient of {_param_name(optimizer, param)} (shape {tuple(param.shape)})"


def _agree_across_ranks(params: list[Tensor], first_bad: int) -> int:
    """MIN-reduce ``first_bad`` over the ranks sharing DTensor parameters."""
    mesh = next((p.device_mesh for p in params if hasattr(p, "device_mesh")), None)
    if mesh is None:
        return first_bad
    group = mesh.get_group() if mesh.ndim == 1 else None  # None: the default group
    flag = torch.tensor([first_bad], dtype=torch.int64, device=mesh.device_type)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return int(flag.item())


def _param_name(optimizer: Any, param: Tensor) -> str:
    """``parameter N`` (its index as state_dict numbers it), with its name
    when the optimizer was given ``named_parameters()``."""
    i = 0
    for group in optimizer.param_groups:
        for j, p in enumerate(group["params"]):
            if p is param:
                return describe_param(i, group.get("param_names", [None] * (j + 1))[j])
            i += 1
    return "parameter ?"
