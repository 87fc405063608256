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
