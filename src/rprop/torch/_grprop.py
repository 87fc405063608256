"""GRprop (``variant="grprop-sag"`` / ``"grprop-slr"``) for rprop.Rprop.

GRprop's adjustment picks one step size among *all* parameters of the
optimizer and recomputes it from all the others, so it cannot run bucket by
bucket as the paths do: every tensor adapts its step sizes, then the one
selection and sum run over all of them, then every tensor moves. The math is
:func:`rprop._core.grprop_step`; this module gathers the tensors, checks that
the param groups agree on what the adjustment reads, and writes the results.

The path registry still has the last word: no fast path declares the
``adjust=...`` features, so :func:`choose` gives every bucket the reference
path (and refuses ``fused=True``, as the group check does first).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rprop._core import effective_grad, grprop_step
from rprop._hyper import Hyper
from rprop._variants import Variant, get_variant
from rprop.torch._compat import PLAIN_TYPES
from rprop.torch._path_registry import choose
from rprop.torch._paths import increment_steps
from rprop.torch._tensors import real_views

__all__ = ["check_groups", "step"]

# What every group of a GRprop optimizer must share: the adjustment reads one
# variant, one pair of step bounds (its clip) and one δ for all parameters.
SHARED = ("variant", "step_sizes", "grprop_delta")


def _shared(group: dict[str, Any]) -> tuple[Any, ...]:
    lo, hi = group["step_sizes"]
    return (get_variant(group["variant"]).name, (float(lo), float(hi)),
            float(group["grprop_delta"]))


def check_groups(groups: list[dict[str, Any]]) -> None:
    """A ValueError unless the groups agree on :data:`SHARED`, where any of
    them runs a GRprop variant (lr, etas, weight_decay and maximize may
    differ: they act per element)."""
    if not any(get_variant(g["variant"]).adjust for g in groups):
        return
    first = _shared(groups[0])
    for i, group in enumerate(groups[1:], start=1):
        here = _shared(group)
        if here != first:
            raise ValueError(
                "GRprop selects one step size among all parameters of the optimizer, so "
                f"every param group must have the same {', '.join(SHARED)}: param group 0 "
                f"has {first}, param group {i} has {here}")


def step(work: list[tuple[dict[str, Any], Hyper, Variant, list[Any]]]) -> tuple[str, ...]:
    """One GRprop step over every bucket of every group; the names of the
    paths that ran (the reference path, once per bucket)."""
    check_groups([group for group, _, _, _ in work])
    ran: list[str] = []
    params: list[Tensor] = []
    grads: list[Tensor] = []
    prevs: list[Tensor] = []
    step_sizes: list[Tensor] = []
    hypers: list[Hyper] = []
    steps: list[Tensor] = []
    devices: set[torch.device] = set()
    for group, hyper, variant, buckets in work:
        for b in buckets:
            ran.append(choose(group, variant, b.params[:1], b.grads[:1], b.prevs[:1]).name)
            if not {type(p) for p in b.params} <= PLAIN_TYPES:
                raise ValueError(
                    f"variant={variant.name!r} (GRprop) does not support sharded parameters "
                    f"(DTensor, FSDP2) yet: its adjustment needs a selection and a sum over "
                    "all shards; use DDP (replicated parameters) or another variant")
            g = b.grads
            if b.prevs[0].dtype != b.params[0].dtype:  # state_dtype: compute in it
                g = [t.to(b.prevs[0].dtype) for t in g]
            ps, gs, pvs, ss = real_views(b.params, g, b.prevs, b.step_sizes)
            steps += b.steps
            params += ps
            grads += [effective_grad(gi, pi, hyper) for gi, pi in zip(gs, ps, strict=True)]
            prevs += pvs
            step_sizes += ss
            hypers += [hyper] * len(ps)
            devices.update(p.device for p in ps)
    if len(devices) > 1:
        raise ValueError(
            "GRprop's adjustment runs over all parameters at once; they must be on one "
            f"device, got {sorted(map(str, devices))}")
    increment_steps(steps)
    if not params:
        return tuple(ran)
    outs = grprop_step(grads, prevs, step_sizes, hyper=work[0][1], variant=work[0][2],
                       xp=torch, hypers=hypers)
    for p, prev, size, out in zip(params, prevs, step_sizes, outs, strict=True):
        # State first: out.prev may be the gradient itself, which may share
        # memory with the parameter (p.grad = p.detach() for f = |p|^2 / 2).
        prev.copy_(out.prev)
        size.copy_(out.step_size)
        p.add_(out.delta)
    return tuple(ran)
