"""Fit y = 2x + 3 with one linear layer and full-batch Rprop (the seed demo).

The data (100 points, x ~ N(0, 1), y = 2x + 3 + 0.1·noise) come from
rprop.problems, the same as `rprop demo` and `rprop compare` use.

Run: python examples/linear_fit.py
"""

import torch

import rprop
from rprop.problems import linear_fit_data


def main(epochs: int = 200, seed: int = 0) -> tuple[float, float]:
    torch.manual_seed(seed)
    data = linear_fit_data(seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    model = torch.nn.Linear(1, 1)
    opt = rprop.Rprop(model.parameters(), lr=0.01)
    for epoch in range(1, epochs + 1):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        if epoch % 50 == 0:
            print(f"epoch {epoch:4d}  loss {loss.item():.6f}")
    w, b = model.weight.item(), model.bias.item()
    print(f"w = {w:.2f}, b = {b:.2f}")
    return w, b


if __name__ == "__main__":
    main()
