"""The (min, median, max) of a set of step-size tensors, on their device:
what ``fit``'s history and ``rprop.torch.minimize``'s result record per step
(and what their plots draw), computed without a host synchronisation."""

from __future__ import annotations

import torch
from torch import Tensor

from rprop.torch._compat import local_tensor

__all__ = ["MEDIAN_SAMPLE", "step_size_summary"]

# The median is that of an evenly strided sample of at most ~this many step
# sizes (exact below): a full sort of a large model's step sizes every epoch
# would cost more than the step.
MEDIAN_SAMPLE = 8192


def step_size_summary(tensors: list[Tensor]) -> Tensor | None:
    """``[min, median, max]`` (float64, on the first tensor's device) of the
    elements of ``tensors`` (this rank's shards of DTensors; complex step
    sizes count their real and imaginary parts), or None when they hold none."""
    flat = []
    for s in tensors:
        s = local_tensor(s).detach()
        s = torch.view_as_real(s) if s.is_complex() else s
        if s.numel():
            flat.append(s)
    if not flat:
        return None
    home = flat[0].device
    total = sum(t.numel() for t in flat)
    stride = max(1, total // MEDIAN_SAMPLE)
    sample = torch.cat([t.reshape(-1)[::stride].to(home, torch.float64) for t in flat])
    lo = torch.stack([t.min().to(home, torch.float64) for t in flat]).min()
    hi = torch.stack([t.max().to(home, torch.float64) for t in flat]).max()
    return torch.stack([lo, sample.median(), hi])
