"""rprop: resilient backpropagation done right.

All four variants (Rprop+, Rprop-, iRprop+, iRprop-) from one algorithm core,
with fronts for PyTorch (:class:`rprop.Rprop`), NumPy/SciPy
(:func:`rprop.minimize`, :mod:`rprop.numpy`) and JAX (:mod:`rprop.optax`).

Importing ``rprop`` imports neither torch nor jax: the fronts load on first
use, as attributes (``rprop.Rprop``, ``rprop.torch.fit``) or by import.
"""

from __future__ import annotations

from typing import Any

from rprop._hyper import Hyper
from rprop._variants import VARIANTS, Variant, get_variant, register_variant

__version__ = "0.1.0"

# Public names served lazily, so that `import rprop` stays free of torch/jax.
_LAZY = {
    "Rprop": ("rprop.torch", "Rprop"),
    "LrChangeWarning": ("rprop.torch", "LrChangeWarning"),
    "LrSeedWarning": ("rprop.torch", "LrSeedWarning"),
    "minimize": ("rprop.numpy", "minimize"),
}

# The fronts, as subpackages loaded when first named: `import rprop` then
# `rprop.torch.fit(...)` works without `import rprop.torch`.
_SUBMODULES = ("integrations", "numpy", "optax", "plotting", "problems", "sklearn", "torch")

__all__ = [
    "VARIANTS",
    "Hyper",
    "LrChangeWarning",
    "LrSeedWarning",
    "Rprop",
    "Variant",
    "get_variant",
    "minimize",
    "register_variant",
]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"rprop.{name}")
    raise AttributeError(f"module 'rprop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
