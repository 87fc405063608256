"""Which path steps a param group, and how its tensors are grouped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rprop.torch import _paths


def pick_path(group: dict[str, Any], params: list[Tensor]) -> Callable[..., None]:
    """The path for a group: explicit choices first, then the fastest available.

    ``differentiable`` needs autograd through the step: the for-loop path.
    ``fused=True`` demands the fused kernel (an error where it cannot run);
    ``foreach`` set explicitly picks that plain path; otherwise the fused
    kernel where it can run, else foreach. All paths give the same result.
    """
    from rprop.torch import _fused

    if group["differentiable"]:
        return _paths.single_tensor
    if group["fused"]:
        _fused.require(params)
        return _fused.fused_step
    if group["foreach"] is not None or group["fused"] is False:
        return _paths.multi_tensor if group["foreach"] else _paths.single_tensor
    if _fused.available(params):
        return _fused.fused_step
    return _paths.multi_tensor


@torch.compiler.disable
def mark_written(tensors: list[Tensor]) -> None:
    """Bump the autograd version counters of ``tensors``, as an in-place torch
    op does, after writing them where autograd cannot see: through raw
    pointers (the fused kernels), or through a DTensor's local shard, whose
    counter is not the DTensor's. A graph that saved a parameter before the
    step then refuses to backpropagate through the stale value (torch's
    "modified by an inplace operation" error, as with torch.optim.Rprop)
    instead of silently using the new one. Never traced: under torch.compile
    a traced bump would only touch the tracer's fake tensors."""
    torch.autograd.graph.increment_version(tensors)


_DTENSOR: Any = None


def local_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or a DTensor's local shard (FSDP2, tensor parallel).

    Rprop is elementwise, so stepping each rank's shard of the parameter,
    gradient and state is the exact step of the whole tensor, with no
    communication. The shard *is* the DTensor's storage (``_local_tensor``),
    so in-place writes land in the DTensor. Gradient and state of a DTensor
    parameter share its placements (state is made with ``zeros_like``), so
    all tensors of one parameter line up shard by shard.
    """
    global _DTENSOR
    if type(t) is Tensor or type(t) is torch.nn.Parameter:
        return t
    if _DTENSOR is None:
        if not torch.distributed.is_available():
            return t
        from torch.distributed.tensor import DTensor

        _DTENSOR = DTensor
    return t._local_tensor if isinstance(t, _DTENSOR) else t
