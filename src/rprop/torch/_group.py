"""A param group's hyperparameters and state dtype, checked: shared by the
optimizer and the checkpoint loader (it imports only the path registry, for
what the paths declare)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from rprop._core import NONFINITE_MODES
from rprop._hyper import DEFAULT_GRPROP_DELTA, Hyper
from rprop._variants import Variant, get_variant
from rprop.torch._path_registry import paths

__all__ = ["check_fits_dtype", "check_group", "check_state_dtype", "describe_param",
           "state_dtype_for"]


def _check_flag(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        kind = "a bool or None" if allow_none else "a bool"
        raise TypeError(f"{name} must be {kind}, got {value!r}")


def _is_real(value: Any) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _torch_refusal(lr: Any, etas: Any) -> str | None:
    """torch.optim.Rprop's own message for ``lr`` / ``etas``, worded and
    formatted as torch does (code written against torch matches on it), or
    None where torch accepts them or cannot compare them (a type error, which
    Hyper words better)."""
    if _is_real(lr) and not 0.0 <= lr:
        return f"Invalid learning rate: {lr}"
    if isinstance(etas, (tuple, list)) and len(etas) == 2 and all(map(_is_real, etas)) \
            and not 0.0 < etas[0] < 1.0 < etas[1]:
        return f"Invalid eta values: {etas[0]}, {etas[1]}"
    return None


def check_group(group: dict[str, Any]) -> tuple[Hyper, Variant]:
    """Validate a param group's hyperparameters; return them parsed.

    Where torch.optim.Rprop refuses an argument too, the message says what the
    argument must be and then, in parentheses, torch's own text
    (``Invalid learning rate: -1.0``), which code written against torch
    matches on."""
    lr = group["lr"]
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(
            "Tensor lr must be 1-element: lr as a Tensor must have exactly one element, "
            f"got shape {tuple(lr.shape)}"
        )
    torch_says = _torch_refusal(lr, group["etas"])
    try:
        hyper = Hyper.from_torch_args(
            lr, group["etas"], group["step_sizes"], group["weight_decay"], group["maximize"],
            group.get("grprop_delta", DEFAULT_GRPROP_DELTA),
        )
    except ValueError as err:
        if torch_says is None:
            raise
        raise ValueError(f"{err} ({torch_says})") from None
    if torch_says is not None:  # Hyper's checks include torch's; kept for safety
        raise ValueError(torch_says)
    variant = get_variant(group["variant"])
    for flag in ("capturable", "differentiable"):
        _check_flag(flag, group[flag])
    for flag in ("foreach", "fused"):
        _check_flag(flag, group[flag], allow_none=True)
    if group["fused"] and group["foreach"]:
        raise ValueError("fused=True and foreach=True cannot be set together; pick one")
    if group["fused"] and group["differentiable"]:
        raise ValueError("fused=True does not support differentiable=True")
    kind = " (GRprop)" if variant.adjust is not None else ""
    fused = paths().get("fused")
    if group["fused"] and fused is not None and variant.features - fused.features:
        # Refused here, not at the first step: fused=True demands the fused
        # path, and the registry says it lacks what this variant needs.
        raise ValueError(
            f"variant={variant.name!r}{kind} does not support fused=True: the fused path "
            f"does not implement {', '.join(sorted(variant.features - fused.features))}; "
            "leave fused at its default (the step runs on a path that does)")
    if group["differentiable"] and variant.adjust is not None:
        # The adjustment selects one coordinate: not a differentiable function.
        raise ValueError(
            f"variant={variant.name!r}{kind} does not support differentiable=True: its "
            "step-size adjustment selects one coordinate among all parameters, which "
            "autograd cannot differentiate; leave differentiable at its default")
    state_dtype = group["state_dtype"]
    if state_dtype is not None and not (
        isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point
    ):
        raise TypeError(
            f"state_dtype must be None or a floating torch.dtype (e.g. torch.float32), "
            f"got {state_dtype!r}"
        )
    if group["nonfinite"] not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {group['nonfinite']!r}")
    return hyper, variant


def describe_param(index: int, name: str | None) -> str:
    """How error messages name a parameter: ``parameter 3``, or with the name
    the optimizer got from ``named_parameters()``, ``parameter 3 ('2.bias')``."""
    return f"parameter {index}" if name is None else f"parameter {index} ({name!r})"


def check_state_dtype(p: Tensor, wanted: torch.dtype | None, param: str) -> None:
    """A ValueError unless ``wanted`` (the group's ``state_dtype``) holds every
    value of the real parameter ``p``'s dtype: a narrower state would not be
    what was asked, and keeping the parameter's dtype instead would ignore it."""
    if wanted is None or p.is_complex() or not p.is_floating_point():
        return
    if torch.promote_types(p.dtype, wanted) != wanted:
        raise ValueError(
            f"state_dtype={wanted} cannot hold the values of {param} ({p.dtype}): "
            f"state_dtype keeps the state of lower-precision parameters in a wider dtype; "
            f"use None or a dtype at least as wide as {p.dtype} (e.g. torch.float32 for "
            "float16/bfloat16 parameters), or put such parameters in a group of their own"
        )


def state_dtype_for(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of a parameter's state: its own, or ``state_dtype`` (which
    :func:`check_state_dtype` makes sure is at least as wide); complex
    parameters keep their own."""
    wanted = group.get("state_dtype")
    if wanted is None or p.is_complex():
        return p.dtype
    check_state_dtype(p, wanted, f"a parameter of shape {tuple(p.shape)}")
    return wanted


def check_fits_dtype(hyper: Hyper, dtype: torch.dtype) -> None:
    """A ValueError unless every finite hyperparameter is finite in ``dtype``
    (the dtype the step computes in).

    A value past the dtype's largest number (``lr=1e39`` in float32) rounds to
    inf in some of the arithmetic and not in the rest (a Python scalar in a
    clamp, a double in the fused kernel), so the paths would disagree; it is
    refused instead, with the value and the dtype. ``step_max=inf`` (no upper
    bound) stays allowed."""
    biggest = torch.finfo(dtype).max
    for name, value in (("lr", hyper.lr), ("etas[1] (eta_plus)", hyper.eta_plus),
                        ("step_sizes[0] (step_min)", hyper.step_min),
                        ("step_sizes[1] (step_max)", hyper.step_max),
                        ("weight_decay", hyper.weight_decay)):
        if math.isfinite(value) and abs(value) > biggest:
            raise ValueError(
                f"{name}={value!r} does not fit the parameters' dtype {dtype} (largest "
                f"finite value {biggest!r}): use a smaller value"
                + (" or inf (no upper bound)" if "step_max" in name else "")
                + " or a wider dtype (state_dtype)"
            )
