"""A small R neuralnet run, reproduced with rprop.Rprop(variant="grprop-sag").

The R call it mirrors (neuralnet 1.44)::

    neuralnet(XOR ~ X1 + X2, data, hidden = 3, algorithm = "sag",
              linear.output = FALSE, err.fct = "sse", act.fct = "logistic",
              threshold = 0.01, stepmax = 1e5, rep = 1)

Everything that decides the trajectory is neuralnet's:

* the weights are one vector in neuralnet's order: per layer, the matrix
  ``(inputs + 1) x neurons`` (intercept first) column by column, which is a
  ``(neurons, inputs + 1)`` tensor read in C order;
* the loss is neuralnet's ``sse``, ``1/2 * sum((y - yhat)^2)``, summed, not a
  mean (GRprop's δ is absolute, so the loss scale matters);
* every step size starts at 0.1, within ``learningrate.limit = (1e-10, 0.1)``,
  and adapts by ``learningrate.factor = (0.5, 1.2)``; δ = 1e-6;
* a run stops when ``max |gradient| <= threshold`` or after ``stepmax``
  steps, and reports what neuralnet's ``result.matrix`` has: error,
  reached.threshold, steps.

The start weights are ``rnorm``-like draws from a seeded torch generator;
pass neuralnet's ``startweights`` (in the order above) to get R's exact run.
"""

from __future__ import annotations

import torch

import rprop

X = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
Y = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64)


def with_intercept(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.ones(a.shape[0], 1, dtype=a.dtype), a], dim=1)


def net(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """neuralnet's compute.net: logistic hidden and (linear.output = FALSE) output."""
    out = x
    for w in weights:
        out = torch.sigmoid(with_intercept(out) @ w.T)
    return out


def train(algorithm: str = "sag", hidden: int = 3, threshold: float = 0.01,
          stepmax: int = 100_000, seed: int = 3) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    sizes = [(hidden, X.shape[1] + 1), (Y.shape[1], hidden + 1)]
    weights = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
               for s in sizes]
    opt = rprop.Rprop(weights, lr=0.1, etas=(0.5, 1.2), step_sizes=(1e-10, 0.1),
                      variant=f"grprop-{algorithm}", grprop_delta=1e-6)

    def gradient() -> tuple[float, float]:
        opt.zero_grad()
        error = 0.5 * ((Y - net(weights, X)) ** 2).sum()  # err.fct = "sse"
        error.backward()
        reached = max(float(w.grad.abs().max()) for w in weights)
        return float(error.detach()), reached

    # neuralnet's rprop(): gradients first, then step while step < stepmax and
    # reached.threshold > threshold, a new gradient after every step.
    step = 1
    error, reached = gradient()
    while step < stepmax and reached > threshold:
        opt.step()
        error, reached = gradient()
        step += 1
    return {"error": error, "reached.threshold": reached, "steps": step}


def main() -> None:
    for algorithm in ("sag", "slr"):
        result = train(algorithm)
        print(f"algorithm={algorithm!r}: error {result['error']:.6f}  "
              f"reached.threshold {result['reached.threshold']:.6f}  "
              f"steps {result['steps']}")


if __name__ == "__main__":
    main()
