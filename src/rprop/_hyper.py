"""Hyperparameters, validated once, shared by every front."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

DEFAULT_ETAS = (0.5, 1.2)
DEFAULT_STEP_SIZES = (1e-6, 50.0)
# GRprop's δ, R neuralnet's `delta <- 10^-6` (fit_neuralnet.R, function minus).
DEFAULT_GRPROP_DELTA = 1e-6


def real_number(name: str, value: Any) -> float:
    """``value`` as a float, or a TypeError naming ``name``.

    Accepts Python/NumPy reals and one-element arrays/tensors (torch allows a
    Tensor ``lr``), refuses bools and complex numbers.
    """
    if isinstance(value, bool) or isinstance(value, complex):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    count = numel() if callable(numel) else numel
    if count == 1 and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, (bool, complex)):
            raise TypeError(f"{name} must be a real number, got {value!r}")
        return float(item)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def _pair(name: str, value: Any) -> tuple[float, float]:
    # An ordered pair: a set or a dict has two elements but no first and second.
    if (isinstance(value, (str, bytes, Set, Mapping)) or not hasattr(value, "__len__")
            or not hasattr(value, "__getitem__") or len(value) != 2):
        raise TypeError(
            f"{name} must be a pair of two numbers (a tuple or list, in order), got {value!r}")
    return real_number(f"{name}[0]", value[0]), real_number(f"{name}[1]", value[1])


@dataclass(frozen=True)
class Hyper:
    """Rprop hyperparameters (plain floats), checked on construction.

    ``lr`` is the initial step size Δ0; step sizes then adapt by ``eta_minus``
    / ``eta_plus`` and stay within ``[step_min, step_max]``. ``grprop_delta``
    is GRprop's δ (only the ``grprop-*`` variants read it).
    """

    lr: float = 1e-2
    eta_minus: float = DEFAULT_ETAS[0]
    eta_plus: float = DEFAULT_ETAS[1]
    step_min: float = DEFAULT_STEP_SIZES[0]
    step_max: float = DEFAULT_STEP_SIZES[1]
    weight_decay: float = 0.0
    maximize: bool = False
    grprop_delta: float = DEFAULT_GRPROP_DELTA

    def __post_init__(self) -> None:
        for field in ("lr", "eta_minus", "eta_plus", "step_min", "step_max", "weight_decay",
                      "grprop_delta"):
            object.__setattr__(self, field, real_number(field, getattr(self, field)))
        if not isinstance(self.maximize, bool):
            raise TypeError(f"maximize must be a bool, got {self.maximize!r}")
        if not (math.isfinite(self.lr) and self.lr >= 0.0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")
        if not 0.0 < self.eta_minus < 1.0 < self.eta_plus < math.inf:
            raise ValueError(
                "etas must satisfy 0 < eta_minus < 1 < eta_plus < inf, "
                f"got ({self.eta_minus}, {self.eta_plus})"
            )
        # step_max may be inf (no upper bound); an infinite step_min would move
        # every parameter to ±inf.
        if not (0.0 <= self.step_min <= self.step_max and math.isfinite(self.step_min)):
            raise ValueError(
                "step_sizes must satisfy 0 <= step_min <= step_max, step_min finite, "
                f"got ({self.step_min}, {self.step_max})"
            )
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        # δ is added to a sum of step size * gradient products: a NaN or inf
        # would make every adjusted step size NaN or a bound.
        if not (math.isfinite(self.grprop_delta) and self.grprop_delta >= 0.0):
            raise ValueError(
                f"grprop_delta must be a finite number >= 0, got {self.grprop_delta}")

    @classmethod
    def from_torch_args(
        cls,
        lr: Any = 1e-2,
        etas: Any = DEFAULT_ETAS,
        step_sizes: Any = DEFAULT_STEP_SIZES,
        weight_decay: Any = 0.0,
        maximize: bool = False,
        grprop_delta: Any = DEFAULT_GRPROP_DELTA,
    ) -> Hyper:
        """Build from torch-style arguments (``etas`` and ``step_sizes`` as pairs)."""
        eta_minus, eta_plus = _pair("etas", etas)
        step_min, step_max = _pair("step_sizes", step_sizes)
        return cls(lr, eta_minus, eta_plus, step_min, step_max, weight_decay, maximize,
                   grprop_delta)
