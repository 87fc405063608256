"""Shared test scaffolding: gradient sequences that exercise every branch."""

from __future__ import annotations

import numpy as np
import torch


def flippy_grad(w: np.ndarray, t: int, rng: np.random.Generator) -> np.ndarray:
    """A gradient that changes sign often, is exactly 0 in ~10% of elements and
    occasionally huge (so step sizes hit both bounds over a few hundred steps)."""
    g = np.sin(3.0 * w + 0.7 * t) + 0.3 * rng.standard_normal(w.shape)
    g = g * (rng.random(w.shape) > 0.1)
    if t % 17 == 0:
        g = g * 1e3
    return g.astype(w.dtype)


def torch_grad_like(p: torch.Tensor, t: int, gen: torch.Generator) -> torch.Tensor:
    """The same kind of gradient for a torch parameter (real or complex)."""
    real = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
    g = torch.sin(3.0 * real + 0.7 * t) + 0.3 * torch.randn(real.shape, generator=gen,
                                                            dtype=real.dtype)
    g = g * (torch.rand(real.shape, generator=gen) > 0.1)
    if t % 17 == 0:
        g = g * 1e3
    return torch.view_as_complex(g.contiguous()) if p.is_complex() else g


ZERO_STEP = 5  # the step at which every gradient is exactly 0


def flippy_grads(params: list[np.ndarray], t: int, rng: np.random.Generator) -> list[np.ndarray]:
    """flippy_grad for a list of NumPy arrays (complex ones get independent
    real and imaginary parts), and all zeros at step ``ZERO_STEP``."""
    out = []
    for w in params:
        if np.iscomplexobj(w):
            g = flippy_grad(w.real, t, rng) + 1j * flippy_grad(w.imag, t, rng)
        else:
            g = flippy_grad(w, t, rng)
        out.append(g * 0 if t == ZERO_STEP else g)
    return out


def make_model() -> torch.nn.Module:
    """The small float64 tanh MLP (3-8-1) the fit tests train, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 1)).double()


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample squared error of ``model`` on ``batch = (x, y)``."""
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)
