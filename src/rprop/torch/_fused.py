"""The fused step (placeholder until the fused kernel lands)."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def available(params: list[Tensor]) -> bool:
    return False


def require(params: list[Tensor]) -> None:
    raise RuntimeError("fused=True is not available in this build")


def fused_step(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("fused=True is not available in this build")
