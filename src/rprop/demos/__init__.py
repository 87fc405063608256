"""The computations behind ``rprop demo``, shared with the scripts in ``examples/``.

The command and the scripts run this code rather than copies of it. Each front has
its module, which imports its framework at the top:

* :mod:`rprop.demos.torch`: the linear fit with :class:`rprop.Rprop`;
* :mod:`rprop.demos.numpy`: the f(x) = x² walk and the linear fit with
  :class:`rprop.numpy.Rprop`;
* :mod:`rprop.demos.jax`: a jitted training loop with :func:`rprop.optax.rprop`,
  and the linear fit run with it.

The linear fit is y = 2x + 3 + 0.1·noise from :func:`rprop.problems.linear_fit_data`,
full batch, MSE, started from the same ``(w0, b0)`` on every front. Each
``fit_linear(variant, lr, epochs, seed, report)`` calls ``report(epoch, loss)``
once an epoch, with the loss at the parameters that epoch starts from, and
returns the learned ``(w, b)``. Nothing here prints or writes a file: what is
shown, and how, is up to the caller.

Importing this package imports neither torch nor jax.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rprop.problems import linear_fit_data

__all__ = ["Report", "least_squares"]

Report = Callable[[int, float], None]
"""``report(epoch, loss)``, called once an epoch (epochs count from 1)."""


def least_squares(seed: int = 0) -> tuple[float, float]:
    """The exact least-squares ``(w, b)`` of the linear-fit sample for ``seed``, in
    float64: the line a fit of that noisy sample can reach, rather than 2 and 3."""
    data = linear_fit_data(seed)
    a = np.hstack([data.x, np.ones_like(data.x)]).astype(np.float64)
    (w, b), *_ = np.linalg.lstsq(a, data.y[:, 0].astype(np.float64), rcond=None)
    return float(w), float(b)
