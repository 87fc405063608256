"""Train a small MLP with JAX and rprop.optax (full batch, iRprop+).

Also runs optax.rprop (0.2.8) on the same problem for comparison: its update
at step t is the one for step t-1 (the first is zero), which rprop.optax
does not do.

Run: python examples/jax_optax_training.py
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import optax

import rprop.optax
from rprop.demos.jax import train


def init_mlp(key: jax.Array, sizes: tuple[int, ...] = (1, 16, 1)) -> list[dict[str, jax.Array]]:
    params = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        params.append({
            "w": jax.random.normal(sub, (fan_in, fan_out)) / jnp.sqrt(fan_in),
            "b": jnp.zeros(fan_out),
        })
    return params


def mlp(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def train_mlp(opt: optax.GradientTransformationExtraArgs, steps: int, seed: int = 0) -> list[float]:
    key_data, key_init = jax.random.split(jax.random.PRNGKey(seed))
    x = jnp.linspace(-3.0, 3.0, 128)[:, None]
    y = jnp.sin(x) + 0.05 * jax.random.normal(key_data, x.shape)

    def loss_fn(p: list[dict[str, jax.Array]]) -> jax.Array:
        return jnp.mean((mlp(p, x) - y) ** 2)

    # rprop.demos.jax.train: the jitted loop `rprop demo --backend jax` runs; each step
    # passes the loss to opt.update as value= (iRprop+ needs it).
    losses: list[float] = []
    train(opt, loss_fn, init_mlp(key_init), steps, lambda _, loss: losses.append(loss))
    return losses


def main(steps: int = 300) -> dict[str, list[float]]:
    runs = {
        "rprop.optax irprop+": train_mlp(rprop.optax.rprop(0.01, variant="irprop+"), steps),
        "rprop.optax irprop-": train_mlp(rprop.optax.rprop(0.01), steps),
        "optax.rprop": train_mlp(optax.rprop(0.01), steps),
    }
    for name, losses in runs.items():
        marks = "  ".join(f"{losses[i]:.4f}" for i in (0, 1, 2, steps // 2, steps - 1))
        print(f"{name:20s} loss at steps 1, 2, 3, {steps // 2 + 1}, {steps}: {marks}")
    return runs


if __name__ == "__main__":
    main()
