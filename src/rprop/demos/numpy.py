"""The f(x) = x² walk and the linear fit with :class:`rprop.numpy.Rprop`
(see :mod:`rprop.demos`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from rprop.demos import Report
from rprop.numpy import Rprop
from rprop.problems import linear_fit_data

__all__ = ["SquareStep", "fit_linear", "square_walk"]


class SquareStep(NamedTuple):
    """One step of :func:`square_walk`: where x was, f'(x) there, the step size the
    step set, and where x went."""

    step: int
    x: float
    grad: float
    step_size: float
    x_new: float


def square_walk(variant: str = "irprop-", lr: float = 0.1,
                steps: int = 20) -> Iterator[SquareStep]:
    """Minimise f(x) = x² from x = 5, one :class:`SquareStep` per step."""
    x = np.array([5.0])  # updated in place by opt.step
    opt = Rprop([x], lr=lr, variant=variant)
    for t in range(1, steps + 1):
        before = float(x[0])
        grad = 2.0 * x
        opt.step([grad], loss=before * before)  # the loss: iRprop+ needs it
        yield SquareStep(t, before, float(grad[0]), float(opt.state[0]["step_size"][0]),
                         float(x[0]))


def fit_linear(variant: str, lr: float, epochs: int, seed: int,
               report: Report) -> tuple[float, float]:
    """Fit w·x + b to the linear-fit data for ``seed`` in float32 with full-batch
    ``rprop.numpy.Rprop(lr=lr, variant=variant)``; returns the learned ``(w, b)``."""
    data = linear_fit_data(seed)
    x, y = data.x[:, 0], data.y[:, 0]
    w, b = np.array([data.w0], np.float32), np.array([data.b0], np.float32)
    opt = Rprop([w, b], lr=lr, variant=variant)
    for epoch in range(1, epochs + 1):
        r = w * x + b - y
        loss = float(np.mean(r * r))
        opt.step([2.0 * np.mean(r * x, keepdims=True), 2.0 * np.mean(r, keepdims=True)],
                 loss=loss)
        report(epoch, loss)
    return float(w[0]), float(b[0])
