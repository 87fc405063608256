"""A jitted training loop with an optax transform, and the linear fit with
:func:`rprop.optax.rprop` (see :mod:`rprop.demos`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import rprop.optax
from rprop.demos import Report
from rprop.problems import linear_fit_data

__all__ = ["fit_linear", "train"]


def train(opt: optax.GradientTransformationExtraArgs, loss_fn: Callable[[Any], jax.Array],
          params: Any, steps: int, report: Report) -> Any:
    """Full-batch training of ``params`` on ``loss_fn`` with ``opt`` for ``steps``
    steps, each one jitted; returns the final parameters. The loss goes to
    ``opt.update`` as ``value=`` (iRprop+ needs it; other transforms ignore it)."""

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(grads, s, p, value=loss)
        return optax.apply_updates(p, updates), s, loss

    state = opt.init(params)
    for epoch in range(1, steps + 1):
        params, state, loss = step(params, state)
        report(epoch, float(loss))
    return params


def fit_linear(variant: str, lr: float, epochs: int, seed: int,
               report: Report) -> tuple[float, float]:
    """Fit w·x + b to the linear-fit data for ``seed`` in float32 with full-batch
    ``rprop.optax.rprop(lr, variant=variant)``; returns the learned ``(w, b)``."""
    data = linear_fit_data(seed)
    x, y = jnp.asarray(data.x[:, 0]), jnp.asarray(data.y[:, 0])

    def mse(p: dict[str, jax.Array]) -> jax.Array:
        return jnp.mean((p["w"] * x + p["b"] - y) ** 2)

    params = {"w": jnp.float32(data.w0), "b": jnp.float32(data.b0)}
    params = train(rprop.optax.rprop(lr, variant=variant), mse, params, epochs, report)
    return float(params["w"]), float(params["b"])
