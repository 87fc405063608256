"""Every private torch name rprop uses, in one place.

torch.optim's own optimizers rely on these; rprop.Rprop must behave as they
do, so it uses them too. Each is looked up here once, with the torch versions
it was checked against; ``tests/test_compat.py`` fails loudly, naming the
entry, when a torch release moves or renames one.

Checked against torch 2.13.0, the release tested here (constraints.txt).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

# The dtype torch.optim keeps its scalar ``step`` counters in (float32, or
# float64 under torch.set_default_dtype(torch.float64)).
from torch.optim.optimizer import _get_scalar_dtype as get_scalar_dtype  # noqa: F401

# step()'s decorator: grad mode as the group's ``differentiable`` asks.
from torch.optim.optimizer import (  # noqa: F401
    _use_grad_for_differentiable as use_grad_for_differentiable,
)

# Dynamo's C++ check of tensors' type, dtype, device, sizes and strides
# (layout_guard below); a torch that lacks it gets the same check in Python.
_TENSOR_GUARDS: Any
try:
    from torch._C._dynamo.guards import TensorGuards as _TENSOR_GUARDS
except ImportError:  # pragma: no cover - not in any torch tested here
    _TENSOR_GUARDS = None

# torch's check that a CUDA graph capture has capturable=True: its current
# name (2.6+), or the CUDA-only one it had before.
graph_capture_health_check = getattr(
    Optimizer, "_accelerator_graph_capture_health_check", None
) or Optimizer._cuda_graph_capture_health_check

# Tensor types stepped as they are; others (DTensor) through local_tensor.
PLAIN_TYPES = frozenset({Tensor, torch.nn.Parameter})

_DTENSOR: Any = None


def local_tensor(t: Tensor) -> Tensor:
    """``t`` itself, or a DTensor's local shard (FSDP2, tensor parallel).

    Rprop is elementwise, so stepping each rank's shard of the parameter,
    gradient and state is the exact step of the whole tensor, with no
    communication. The shard *is* the DTensor's storage (``_local_tensor``,
    which DTensor's own ``to_local()`` wraps in an autograd function and so
    cannot be written through), so in-place writes land in the DTensor.
    Gradient and state of a DTensor parameter share its placements (state is
    made with ``zeros_like``), so all tensors of one parameter line up shard
    by shard.
    """
    global _DTENSOR
    if type(t) in PLAIN_TYPES:
        return t
    if _DTENSOR is None:
        if not torch.distributed.is_available():
            return t
        from torch.distributed.tensor import DTensor

        _DTENSOR = DTensor
    return t._local_tensor if isinstance(t, _DTENSOR) else t


def view_base(t: Tensor) -> Tensor | None:
    """The tensor ``t`` is a view of, or None (``Tensor._base``)."""
    return t._base


def version(t: Tensor) -> int:
    """``t``'s in-place version counter (``Tensor._version``)."""
    return t._version


def fsdp_param_groups(module: Any) -> list[Any]:
    """An FSDP2 module's parameter groups, whose gradient-reduction settings
    (``gradient_divide_factor``, ``force_sum_reduction_for_comms``) fit's
    exact sum saves and restores: FSDP2 has setters for them but no getters."""
    return module._get_fsdp_state()._fsdp_param_groups


def _python_layout_guard(tensors: list[Tensor]) -> Any:
    """What :func:`layout_guard` checks, in Python (for a torch without
    TensorGuards): about ten times slower at a thousand tensors."""

    def key(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return None
        # is_neg and is_conj: dispatch keys TensorGuards compares.
        return (type(t), t.dtype, t.device, t.layout, t.requires_grad, t.is_neg(),
                t.is_conj(), t.shape, t.stride() if t.layout == torch.strided else None)

    expected = [key(t) for t in tensors]

    def check(*now: Any) -> bool:
        return len(now) == len(expected) and [key(t) for t in now] == expected

    return check


def layout_guard(tensors: list[Tensor]) -> Any:
    """A function ``check(*tensors)``: True when it is given as many tensors,
    each of the same Python type, dtype, device, layout (dispatch keys),
    requires_grad, sizes and strides as ``tensors`` had here. Data pointers
    are not compared. It is dynamo's ``TensorGuards`` (C++, one call for the
    whole list, about 0.1 us a tensor), the check torch.compile guarded
    tensors with before its guard trees; its ``check_verbose`` is not used (it
    needs names). Checked against torch 2.13.0."""
    if _TENSOR_GUARDS is None:
        return _python_layout_guard(tensors)
    guard = _TENSOR_GUARDS(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    n = len(tensors)

    def check(*now: Any) -> bool:
        # TensorGuards raises a TypeError for a list of another length.
        return len(now) == n and guard.check(*now)

    return check
