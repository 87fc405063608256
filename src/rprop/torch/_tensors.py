"""Small tensor helpers shared by the optimizer and its paths (a leaf module)."""

from __future__ import annotations

import torch
from torch import Tensor

from rprop.torch._compat import local_tensor

__all__ = ["mark_written", "real_views"]


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


def real_views(*lists: list[Tensor]) -> list[list[Tensor]]:
    """Each list's tensors as the paths take them: a DTensor as its local
    shard, a complex tensor as its real view (real and imaginary parts as
    independent reals, as torch.optim.Rprop treats them)."""
    views = [[local_tensor(t) for t in ts] for ts in lists]
    return [[torch.view_as_real(t) if t.is_complex() else t for t in ts] for ts in views]
