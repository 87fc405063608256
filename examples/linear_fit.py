"""Fit y = 2x + 3 with one linear layer and full-batch Rprop (the seed demo).

The data (100 points, x ~ N(0, 1), y = 2x + 3 + 0.1·noise) come from
rprop.problems; the training loop is rprop.demos.torch.fit_linear, the code
`rprop demo` runs: this script prints what the demo's fit prints.

Run: python examples/linear_fit.py
"""

from rprop.demos.torch import fit_linear


def main(epochs: int = 200, seed: int = 0) -> tuple[float, float]:
    def report(epoch: int, loss: float) -> None:
        if epoch % 50 == 0:
            print(f"epoch {epoch:4d}  loss {loss:.6f}")

    w, b = fit_linear("irprop-", lr=0.01, epochs=epochs, seed=seed, report=report)
    print(f"w = {w:.2f}, b = {b:.2f}")
    return w, b


if __name__ == "__main__":
    main()
