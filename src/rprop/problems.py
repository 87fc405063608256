"""Test problems from the Rprop literature, shared by the CLI, examples, benchmarks and tests.

Each :class:`Problem` has a name, a goal (a loss threshold: a run *succeeds*
at the first gradient evaluation whose loss is at or below it), a budget (the
most gradient evaluations a run may spend) and :meth:`Problem.build`, which
returns a fresh :class:`Instance` (torch parameters and a full-batch loss) for
a seed. Data and initial weights come from ``numpy.random.default_rng(seed)``,
never from torch's global generator, so a seed means the same start on every
machine and in every front.

>>> from rprop import problems
>>> inst = problems.get("rosenbrock").build(seed=0)
>>> loss = inst.loss()      # a 0-dim torch tensor with a graph to the params
>>> loss.backward()

Importing this module imports neither torch nor scikit-learn; :meth:`build`
does, on first use. Problems that need scikit-learn (its bundled datasets,
no download) are listed only when it is installed (see :func:`available`).

Numbers: the analytic functions (Rosenbrock, the quadratic, x²) run in
float64, the networks in float32 (torch's default).
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "PROBLEMS",
    "Instance",
    "LinearData",
    "Problem",
    "available",
    "get",
    "linear_fit_data",
    "two_spirals_data",
]


@dataclass
class Instance:
    """One problem, built for one seed.

    ``params`` are leaf tensors with ``requires_grad``; ``loss()`` evaluates
    the full-batch loss at their current values (call ``.backward()`` on it
    for the gradient). ``model`` is the ``torch.nn.Module`` when there is one.
    """

    params: list[torch.Tensor]
    loss: Callable[[], torch.Tensor]
    model: Any = None


@dataclass(frozen=True)
class Problem:
    """A named problem: how to build it, when it counts as solved, how long it may take."""

    name: str
    title: str
    source: str
    goal: float
    budget: int
    make: Callable[[int], Instance] = field(repr=False)
    requires: tuple[str, ...] = ()

    @property
    def is_available(self) -> bool:
        """Whether the optional packages it needs are installed."""
        return all(importlib.util.find_spec(mod) is not None for mod in self.requires)

    def build(self, seed: int = 0) -> Instance:
        """A fresh instance (data, start point or initial weights) for ``seed``."""
        if not self.is_available:
            missing = ", ".join(self.requires)
            raise ImportError(
                f"problem {self.name!r} needs {missing} (pip install 'rprop[datasets]')"
            )
        return self.make(int(seed))


# -- data, in NumPy (usable without torch) ------------------------------------


class LinearData(NamedTuple):
    """y = 2x + 3 + 0.1·noise on 100 points, x ~ N(0, 1); ``w0, b0`` start the fit
    (drawn like ``nn.Linear(1, 1)``'s default init, U(-1, 1))."""

    x: np.ndarray  # (100, 1) float32
    y: np.ndarray  # (100, 1) float32
    w0: float
    b0: float


def linear_fit_data(seed: int = 0, n: int = 100) -> LinearData:
    """The linear-fit data (also used by ``rprop demo`` and ``examples/linear_fit.py``)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1))
    y = 2.0 * x + 3.0 + 0.1 * rng.standard_normal((n, 1))
    w0, b0 = rng.uniform(-1.0, 1.0, size=2)
    return LinearData(x.astype(np.float32), y.astype(np.float32), float(w0), float(b0))


def two_spirals_data() -> tuple[np.ndarray, np.ndarray]:
    """Lang & Witbrock's (1988) two spirals: 194 points in the plane, scaled to
    [-1, 1]; labels 1 for one spiral, 0 for the other."""
    i = np.arange(97)
    angle = i * math.pi / 16.0
    radius = 6.5 * (104 - i) / 104.0
    a = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
    x = np.concatenate([a, -a]) / 6.5
    y = np.concatenate([np.ones(97), np.zeros(97)])[:, None]
    return x.astype(np.float32), y.astype(np.float32)


# -- builders ----------------------------------------------------------------


def _tensor(a: Any, dtype: Any = None) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(a), dtype=dtype)


def _leaf(a: Any, dtype: Any) -> torch.Tensor:
    return _tensor(a, dtype).clone().requires_grad_(True)


def _mlp(sizes: list[int], hidden: str, rng: np.random.Generator) -> torch.nn.Sequential:
    """A fully connected net with torch's default init distribution,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, drawn from ``rng``."""
    import torch

    act = {"tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[hidden]
    layers: list[torch.nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = torch.nn.Linear(fan_in, fan_out)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            linear.weight.copy_(_tensor(rng.uniform(-bound, bound, (fan_out, fan_in))))
            linear.bias.copy_(_tensor(rng.uniform(-bound, bound, fan_out)))
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(act())
    return torch.nn.Sequential(*layers)


_BCE = "binary_cross_entropy_with_logits"  # on logits: the sigmoid output is in the loss


def _net_instance(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, loss: str
) -> Instance:
    """Full-batch ``torch.nn.functional.<loss>(model(x), y)``."""
    import torch
    import torch.nn.functional as F

    xt, yt = _tensor(x, torch.float32), _tensor(y)
    fn: Callable[..., torch.Tensor] = getattr(F, loss)
    if fn is not F.cross_entropy:  # class labels stay integers
        yt = yt.to(torch.float32)

    def full_batch_loss() -> torch.Tensor:
        return fn(model(xt), yt)

    return Instance(list(model.parameters()), full_batch_loss, model)


def _rosenbrock(seed: int) -> Instance:
    import torch

    rng = np.random.default_rng(seed)
    p = _leaf(np.array([-1.2, 1.0]) + 0.1 * rng.standard_normal(2), torch.float64)

    def loss() -> torch.Tensor:
        x, y = p[0], p[1]
        return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2

    return Instance([p], loss)


QUADRATIC_DIM = 10
QUADRATIC_CONDITION = 1e4


def quadratic_matrix() -> np.ndarray:
    """The quadratic's Hessian: eigenvalues log-spaced in [1, 1e4], eigenvectors a
    fixed random rotation (so the axes Rprop adapts along are not the eigenvectors)."""
    rng = np.random.default_rng(12345)
    q, _ = np.linalg.qr(rng.standard_normal((QUADRATIC_DIM, QUADRATIC_DIM)))
    eig = np.logspace(0.0, math.log10(QUADRATIC_CONDITION), QUADRATIC_DIM)
    return (q * eig) @ q.T


def _quadratic(seed: int) -> Instance:
    import torch

    rng = np.random.default_rng(seed)
    a = _tensor(quadratic_matrix(), torch.float64)
    p = _leaf(rng.standard_normal(QUADRATIC_DIM), torch.float64)

    def loss() -> torch.Tensor:
        return 0.5 * (p @ (a @ p))

    return Instance([p], loss)


def _square(seed: int) -> Instance:
    import torch

    p = _leaf(np.array([5.0]), torch.float64)

    def loss() -> torch.Tensor:
        return (p * p).sum()

    return Instance([p], loss)


def _linear_fit(seed: int) -> Instance:
    import torch

    data = linear_fit_data(seed)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(data.w0)
        model.bias.fill_(data.b0)
    return _net_instance(model, data.x, data.y, "mse_loss")


def _encoder(seed: int) -> Instance:
    rng = np.random.default_rng(seed)
    eye = np.eye(10)
    return _net_instance(_mlp([10, 5, 10], "sigmoid", rng), eye, eye, _BCE)


def _parity(seed: int) -> Instance:
    rng = np.random.default_rng(seed)
    bits = ((np.arange(8)[:, None] >> np.arange(3)) & 1).astype(np.float64)
    x = 2.0 * bits - 1.0
    y = bits.sum(axis=1, keepdims=True) % 2
    return _net_instance(_mlp([3, 3, 1], "tanh", rng), x, y, _BCE)


def _sin(seed: int) -> Instance:
    rng = np.random.default_rng(seed)
    x = np.linspace(-math.pi, math.pi, 50)[:, None]
    return _net_instance(_mlp([1, 5, 1], "tanh", rng), x, np.sin(x), "mse_loss")


def _spirals(seed: int) -> Instance:
    rng = np.random.default_rng(seed)
    x, y = two_spirals_data()
    return _net_instance(_mlp([2, 20, 20, 1], "tanh", rng), x, y, _BCE)


def _digits(seed: int) -> Instance:
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    x, y = load_digits(return_X_y=True)
    return _net_instance(_mlp([64, 32, 10], "tanh", rng), x / 16.0, y.astype(np.int64),
                         "cross_entropy")


def _diabetes(seed: int) -> Instance:
    from sklearn.datasets import load_diabetes

    rng = np.random.default_rng(seed)
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = ((y - y.mean()) / y.std())[:, None]
    return _net_instance(_mlp([10, 16, 1], "tanh", rng), x, y, "mse_loss")


_ALL = [
    Problem("rosenbrock", "Rosenbrock's function from (-1.2, 1) + 0.1·N(0, I)",
            "Rosenbrock 1960", goal=1e-4, budget=3000, make=_rosenbrock),
    Problem("quadratic", "rotated quadratic ½xᵀAx, 10-dim, condition number 1e4, x0 ~ N(0, I)",
            "ill-conditioned quadratic", goal=1e-2, budget=3000, make=_quadratic),
    Problem("encoder", "10-5-10 encoder, sigmoid hidden, cross-entropy",
            "Riedmiller & Braun 1993", goal=1e-3, budget=1000, make=_encoder),
    Problem("parity", "3-bit parity, 3-3-1 tanh, cross-entropy",
            "Rumelhart, Hinton & Williams 1986", goal=1e-3, budget=1000, make=_parity),
    Problem("sin", "sin(x) on [-π, π], 1-5-1 tanh, MSE, 50 points",
            "curve fitting", goal=1e-3, budget=3000, make=_sin),
    Problem("spirals", "two spirals (194 points), 2-20-20-1 tanh, cross-entropy",
            "Lang & Witbrock 1988", goal=0.01, budget=3000, make=_spirals),
    Problem("linear-fit", "y = 2x + 3 + 0.1·noise, 100 points, nn.Linear(1, 1), MSE",
            "the rprop demo", goal=0.015, budget=500, make=_linear_fit),
    Problem("square", "f(x) = x² from x = 5", "the rprop demo",
            goal=1e-10, budget=500, make=_square),
    Problem("digits", "scikit-learn digits (1797 × 64), 64-32-10 tanh, cross-entropy",
            "scikit-learn load_digits", goal=1e-2, budget=1000, make=_digits,
            requires=("sklearn",)),
    Problem("diabetes", "scikit-learn diabetes (442 × 10), 10-16-1 tanh, MSE",
            "scikit-learn load_diabetes", goal=0.2, budget=2000, make=_diabetes,
            requires=("sklearn",)),
]

#: Every problem by name, including those whose optional packages are missing.
PROBLEMS: dict[str, Problem] = {p.name: p for p in _ALL}


def available() -> list[Problem]:
    """The problems that can be built here (scikit-learn's only when it is installed)."""
    return [p for p in _ALL if p.is_available]


def get(name: str) -> Problem:
    """A problem by name; a ValueError lists the names when there is no such problem."""
    try:
        return PROBLEMS[name]
    except KeyError:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}") from None
