"""Rprop in plain NumPy training loops (rprop.numpy.Rprop).

1. The classic minimal example: minimize f(x) = x² from x = 5
   (rprop.demos.numpy.square_walk, the walk `rprop demo` starts with).
2. Logistic regression on a synthetic two-class problem, full batch, with the
   parameters in a dict and iRprop+ (which needs the loss at each step).

Run: python examples/numpy_training_loop.py
"""

from __future__ import annotations

import numpy as np

from rprop.demos.numpy import square_walk
from rprop.numpy import Rprop


def minimize_x_squared(steps: int = 60) -> float:
    # The loop (the f(x) = x² walk `rprop demo` shows step by step) is square_walk.
    x = 5.0
    for row in square_walk("irprop-", lr=0.1, steps=steps):
        x = row.x_new
        if row.step % 20 == 0:
            print(f"step {row.step:3d}  x = {x: .3e}  f(x) = {x ** 2:.3e}")
    return x


def logistic_regression(epochs: int = 200, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    n, d = 400, 5
    true_w = rng.standard_normal(d)
    features = rng.standard_normal((n, d))
    labels = (features @ true_w + 0.5 + 0.3 * rng.standard_normal(n) > 0).astype(float)

    params = {"w": np.zeros(d), "b": np.zeros(())}
    opt = Rprop(params, lr=0.01, variant="irprop+")
    for epoch in range(1, epochs + 1):
        z = features @ params["w"] + params["b"]
        p = 1.0 / (1.0 + np.exp(-z))
        eps = 1e-12
        loss = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
        err = (p - labels) / n
        opt.step({"w": features.T @ err, "b": err.sum()}, loss=loss)
        if epoch % 50 == 0:
            acc = np.mean((z > 0) == (labels > 0.5))
            print(f"epoch {epoch:4d}  loss {loss:.4f}  accuracy {acc:.3f}")
    accuracy = float(np.mean(((features @ params["w"] + params["b"]) > 0) == (labels > 0.5)))
    return accuracy


def main() -> tuple[float, float]:
    x = minimize_x_squared()
    acc = logistic_regression()
    return x, acc


if __name__ == "__main__":
    main()
