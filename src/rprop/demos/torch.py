"""The linear fit with :class:`rprop.Rprop` (see :mod:`rprop.demos`)."""

from __future__ import annotations

import torch

import rprop
from rprop import problems
from rprop.demos import Report

__all__ = ["fit_linear"]


def fit_linear(variant: str, lr: float, epochs: int, seed: int,
               report: Report) -> tuple[float, float]:
    """Fit ``nn.Linear(1, 1)`` to the linear-fit data for ``seed`` with full-batch
    ``rprop.Rprop(lr=lr, variant=variant)``; returns the learned ``(w, b)``."""
    inst = problems.get("linear-fit").build(seed)
    opt = rprop.Rprop(inst.params, lr=lr, variant=variant)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = inst.loss()
        loss.backward()
        return loss

    for epoch in range(1, epochs + 1):
        loss = opt.step(closure)  # the closure's loss, from before the update
        report(epoch, float(loss.detach()))
    return float(inst.model.weight.item()), float(inst.model.bias.item())
