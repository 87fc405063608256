"""GRprop (``variant="grprop-sag"`` / ``"grprop-slr"``) for rprop.Rprop.

GRprop's adjustment picks one step size among *all* parameters of the
optimizer and recomputes it from all the others, so it cannot run bucket by
bucket as the paths do: every tensor adapts its step sizes, then the one
selection and sum run over all of them, then every tensor moves. The math is
:func:`rprop._core.grprop_step`; this module batches it (the adaptation and
the move with ``torch._foreach_*``, the adjustment in about one pass over
the gradients, :func:`_adjust_in_place`), checks that the param groups agree
on what the adjustment reads, and writes the results.

Across processes: sharded parameters (FSDP2: DTensors on dim 0 of one 1-D
mesh) take part as the full vector they are shards of
(:class:`_ShardedAdjust`), and an optimizer that holds one rank's partition
of the parameters (``grprop_partitioned=True``, ZeroRedundancyOptimizer)
takes part with the other ranks' partitions (:class:`_PartitionedAdjust`):
both combine the ranks' selections and sums in one all-gather. DDP needs
nothing: every rank has the same gradients and computes the same step.

With ``fused=True`` the step runs in one pass over memory on CPU
(:mod:`rprop.torch._fused_grprop`; the fused path is the only fast path that
declares the ``adjust=...`` features), or raises a RuntimeError saying why
it cannot. It is not taken by default: its sum of the other coordinates'
products runs in another order than the tree every other path and front
shares, so the adjusted step size may differ from theirs in the last bit.
Otherwise the batched step below runs, reported as the reference path.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rprop._core import (
    effective_grad,
    finish_sum,
    grprop_adjust,
    grprop_pick,
    grprop_value,
    sum_parts,
    two_sum,
)
from rprop._hyper import Hyper
from rprop._variants import Variant, get_variant
from rprop.torch import _fused_grprop
from rprop.torch._compat import PLAIN_TYPES, local_tensor
from rprop.torch._path_registry import choose, reference
from rprop.torch._paths import adapt_step_sizes_, increment_steps
from rprop.torch._tensors import mark_written, real_views

__all__ = ["check_groups", "step"]

_get_device = attrgetter("device")

# What every group of a GRprop optimizer must share: the adjustment reads one
# variant, one pair of step bounds (its clip) and one δ for all parameters,
# and runs over this process's parameters or over every rank's part.
SHARED = ("variant", "step_sizes", "grprop_delta", "grprop_partitioned")


def _shared(group: dict[str, Any]) -> tuple[Any, ...]:
    lo, hi = group["step_sizes"]
    return (get_variant(group["variant"]).name, (float(lo), float(hi)),
            float(group["grprop_delta"]), group.get("grprop_partitioned", False))


def partitioned(groups: list[dict[str, Any]]) -> bool:
    """Whether the groups' parameters are one rank's part of the optimizer's
    (``grprop_partitioned=True``)."""
    return any(g.get("grprop_partitioned", False) is True for g in groups)


def _check_partitioned(groups: list[dict[str, Any]]) -> None:
    for i, group in enumerate(groups):
        flag = group.get("grprop_partitioned", False)
        if not isinstance(flag, bool):
            raise TypeError(f"grprop_partitioned must be a bool, got {flag!r} "
                            f"(param group {i})")
        if not flag:
            continue
        variant = get_variant(group["variant"])
        if variant.adjust is None:
            raise ValueError(
                "grprop_partitioned=True combines GRprop's selection across ranks; it "
                f"applies to the grprop-* variants only, got variant={variant.name!r} "
                f"(param group {i})")
        if group["nonfinite"] != "propagate":
            raise ValueError(
                f"grprop_partitioned=True cannot be combined with nonfinite="
                f"{group['nonfinite']!r}: each rank would skip or raise on its own part "
                "while the others wait in the step's all-gather; use "
                f"nonfinite='propagate' (param group {i})")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "grprop_partitioned=True needs an initialized default process group "
                "(torch.distributed.init_process_group): the selection and the sum run "
                "over the parameters of all its ranks")


def check_groups(groups: list[dict[str, Any]]) -> None:
    """A ValueError unless the groups agree on :data:`SHARED`, where any of
    them runs a GRprop variant (lr, etas, weight_decay and maximize may
    differ: they act per element); a TypeError or ValueError for a
    ``grprop_partitioned`` that is not a bool, set for another variant or
    with nothing to combine across."""
    _check_partitioned(groups)
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


def step(work: list[tuple[dict[str, Any], Hyper, Variant, list[Any]]],
         groups: list[dict[str, Any]]) -> tuple[str, ...]:
    """One GRprop step over every bucket of every group in ``work`` (the
    groups with gradients among the optimizer's ``groups``); the names of
    the paths that ran (the reference path, once per bucket)."""
    check_groups(groups)
    ran: list[str] = []
    params: list[Tensor] = []
    raw: list[Tensor] = []  # the gradients as given, for the one-pass kernel
    grads: list[Tensor] = []
    prevs: list[Tensor] = []
    step_sizes: list[Tensor] = []
    steps: list[Tensor] = []
    segments: list[tuple[Hyper, slice]] = []  # each bucket's tensors and its group's etas
    devices: set[torch.device] = set()
    sharded: list[Tensor] = []
    for group, hyper, variant, buckets in work:
        for b in buckets:
            ran.append(choose(group, variant, b.params[:1], b.grads[:1], b.prevs[:1]).name)
            if not {type(p) for p in b.params} <= PLAIN_TYPES:
                sharded += b.params
            g = b.grads
            if b.prevs[0].dtype != b.params[0].dtype:  # state_dtype: compute in it
                g = [t.to(b.prevs[0].dtype) for t in g]
            ps, gs, pvs, ss = ((b.params, g, b.prevs, b.step_sizes) if b.plain
                               else real_views(b.params, g, b.prevs, b.step_sizes))
            steps += b.steps
            segments.append((hyper, slice(len(params), len(params) + len(ps))))
            params += ps
            raw += gs
            grads += (gs if not (hyper.maximize or hyper.weight_decay)
                      else [effective_grad(gi, pi, hyper) for gi, pi in zip(gs, ps, strict=True)])
            prevs += pvs
            step_sizes += ss
            devices.update(map(_get_device, ps))
    if len(devices) > 1:
        raise ValueError(
            "GRprop's adjustment runs over all parameters at once; they must be on one "
            f"device, got {sorted(map(str, devices))}")
    variant = get_variant(groups[0]["variant"])
    shared = work[0][1] if work else None  # the step bounds and δ all groups share
    adjuster: _AcrossRanks | None = None
    whole = [p for _, _, _, buckets in work for b in buckets for p in b.params]
    if partitioned(groups):
        if sharded:
            raise ValueError(
                "grprop_partitioned=True is for an optimizer that holds a part of plain "
                "parameters (ZeroRedundancyOptimizer); sharded DTensor parameters are "
                "combined across their mesh without it")
        adjuster = _PartitionedAdjust(whole, variant.name)
    elif sharded:
        adjuster = _ShardedAdjust(whole, variant.name)  # refuses what it cannot lay out
    assert variant.adjust is not None, "the GRprop step runs GRprop variants"
    if any(group["fused"] for group, _, _, _ in work):
        # fused=True: the one-pass kernel, for all parameters at once. Only
        # when asked for: its sum runs in another order than the tree every
        # other path and front shares (see rprop.torch._fused_grprop).
        why = _fused_grprop.unsupported(params, raw, prevs, step_sizes,
                                        [h for h, _ in segments])
        if adjuster is not None:
            why = "the fused GRprop step runs in one process (not over sharded or " \
                  "partitioned parameters)"
        elif not all(group["fused"] for group, _, _, _ in work):
            why = ("the fused GRprop step takes all parameters at once: set fused=True on "
                   "every param group, or on none")
        elif why is None and not all(name == "fused" for name in ran):
            why = "the path registry gives the fused path only some of the parameters"
        if why is not None:
            raise RuntimeError(why)
        _fused_grprop.step(params, raw, prevs, step_sizes, steps, hyper=work[0][1],
                           adjust=variant.adjust)
        return tuple(ran)
    ran = [reference().name] * len(ran)  # the batched step below
    if steps:
        increment_steps(steps)
    if not params and adjuster is None:
        return tuple(ran)
    # rprop._core.grprop_step, batched: Rprop- adaptation in place (each
    # group's etas), the adjustment over all tensors, then the move.
    for h, part in segments:
        adapt_step_sizes_(grads[part], prevs[part], step_sizes[part], h)
    adjusted = None
    if adjuster is not None:
        adjusted = adjuster(grads, step_sizes, adjust=variant.adjust, hyper=shared, xp=torch)
    elif shared is not None and not _adjust_in_place(grads, step_sizes, variant.adjust, shared):
        adjusted = grprop_adjust(grads, step_sizes, adjust=variant.adjust, hyper=shared,
                                 xp=torch)
    for size, new in zip(step_sizes, adjusted or step_sizes, strict=True):
        if new is not size:
            size.copy_(new)
    # multi_tensor's Rprop- move. prev first: the gradient may share memory
    # with the parameter (p.grad = p.detach() for f = |p|^2 / 2).
    if params:
        torch._foreach_copy_(prevs, grads)
        torch._foreach_addcmul_(params, torch._foreach_sign(prevs), step_sizes, value=-1)
    if sharded:
        mark_written(sharded)  # written through the DTensors' local shards
    return tuple(ran)


# The integer type of each floating-point width: a non-negative float's bits,
# read as a signed integer of the same width, order as the float does.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _adjust_in_place(grads: list[Tensor], step_sizes: list[Tensor], adjust: str,
                     hyper: Hyper) -> bool:
    """:func:`rprop._core.grprop_adjust`, writing the one adjusted step size
    in place, in a few passes over the gradients and step sizes: the
    products ``step * grad`` and the selection keys are written into two
    flat buffers, one integer argmin picks the coordinate and
    :func:`rprop._core.sum_parts` sums the products (the same additions in
    the same order, so the same bits as the core on every front).

    The keys are the float keys' bits as integers, which order as the
    floats do: ``|grad|`` (sag) or the step size (slr), with every
    coordinate whose gradient is 0 mapped above all of them. False (nothing
    written) where the smallest key is not a finite candidate's (every
    candidate's key +inf or NaN, or no candidate), a CUDA graph is being
    captured or torch.compile traces (the host reads the index): the core's
    selection then runs, which spells those cases out."""
    dtype, device = step_sizes[0].dtype, step_sizes[0].device
    int_type = _BITS.get(dtype.itemsize)
    if (int_type is None or not dtype.is_floating_point
            or torch.compiler.is_compiling()
            or (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
            or any(g.dtype != dtype for g in grads)):
        return False
    n = sum(s.numel() for s in step_sizes)
    if n == 0:
        return True
    width = torch.iinfo(int_type).bits
    mask = torch.iinfo(int_type).max  # every bit but the sign
    inf_bits = int(torch.tensor(float("inf"), dtype=dtype).view(int_type))
    # Few calls, whatever the number of tensors: the per-tensor work is
    # batched, and only a list of several tensors is copied into one.
    products = _flat(torch._foreach_mul(step_sizes, grads))
    # A view for a contiguous g; a negative view (z.conj().imag) holds the
    # negated values, so it is resolved (copied) first.
    bits = [g.resolve_neg().view(int_type).reshape(-1) for g in grads]
    keys = (torch.bitwise_and(bits[0], mask) if len(bits) == 1
            else torch.cat(bits).bitwise_and_(mask))  # |g|'s bits; g itself is never written
    if not math.isfinite(hyper.step_max):
        # A zero gradient's product is then 0 only if written so (inf * 0 is
        # NaN); finite step sizes make it +-0, which sums as 0 does.
        products.masked_fill_(keys == 0, 0)
    keys.sub_(1)  # |g| = 0 wraps to -1: below every other key
    if adjust == "sag":
        keys.bitwise_and_(mask)  # ... and then above: finite |g| > 0 keep their order
        limit = inf_bits - 1  # the key of |g| = +inf
    else:
        keys.bitwise_right_shift_(width - 1)  # -1 where g = 0, else 0
        keys.bitwise_or_(_flat([s.view(int_type) for s in step_sizes]))
        keys.bitwise_and_(mask)  # step sizes where g != 0, the largest key where g = 0
        limit = inf_bits  # the key of a step size of +inf
    index = keys.argmin()
    where, key = torch.stack([index, keys[index].to(torch.int64)]).tolist()
    if key >= limit:  # no candidate with a finite key: the core's selection
        return False
    products[where] = 0  # the chosen coordinate is left out of the sum
    others = finish_sum(*sum_parts(products, torch), torch)
    starts = _offsets(step_sizes)
    t = bisect.bisect_right(starts, where) - 1
    local = where - starts[t]
    size = _element(step_sizes[t], local)
    value = grprop_value(others, _element(grads[t], local), hyper, torch)
    size.copy_(torch.where(value == value, value, size))  # a NaN sum adjusts nothing
    return True


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    """The tensors in C order, one after the other, as one 1-D tensor (a view
    of a single contiguous tensor)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def _offsets(tensors: list[Tensor]) -> list[int]:
    """Where each tensor starts in the concatenation of all of them."""
    out, start = [], 0
    for t in tensors:
        out.append(start)
        start += t.numel()
    return out


def _element(t: Tensor, j: int) -> Tensor:
    """The ``j``-th element of ``t`` in C order, as a 0-dim view."""
    index = []
    for d in reversed(t.shape):
        j, r = divmod(j, d)
        index.append(r)
    return t[tuple(reversed(index))]


_SHARD: Any = None


def _shard0() -> Any:
    """``Shard(0)``, FSDP2's placement, imported on first use (as the DTensor
    type in rprop.torch._compat): a process without sharded parameters never
    loads torch.distributed.tensor."""
    global _SHARD
    if _SHARD is None:
        from torch.distributed.tensor import Shard

        _SHARD = Shard(0)
    return _SHARD


class _AcrossRanks:
    """GRprop's adjustment over a vector whose coordinates are spread over
    the ranks of ``group``, exact up to the sum's last rounding.

    ``runs`` place this rank's tensors in the vector: ``(position of the
    first element, element count)`` per tensor, the positions ordering the
    coordinates as one process orders them. Each rank picks its first
    smallest key, and sends it with its position, whether it has a
    candidate, the double-double sum of its other candidates' ``step * grad``
    and the product at its pick: one all-gather of six numbers per rank.
    Every rank then takes the lexicographic minimum (key, position), which
    is the single-process choice, sums the ranks' parts and the picks of
    the ranks that do not own it, in rank order with error-free additions,
    and the rank that owns the coordinate writes it.
    """

    group: Any
    world: int
    rank: int
    runs: list[tuple[int, int]]
    device: torch.device

    def __call__(self, grads: list[Tensor], step_sizes: list[Tensor], *, adjust: str,
                 hyper: Hyper | None, xp: Any) -> list[Tensor]:
        inf = float("inf")
        index = None
        if step_sizes and sum(s.numel() for s in step_sizes):
            lr = torch.cat([s.reshape(-1) for s in step_sizes])
            g = torch.cat([t.reshape(-1) for t in grads]).to(lr.dtype)
            dtype, device = lr.dtype, lr.device
            candidate, key, index = grprop_pick(g, lr, adjust, torch)
            has = candidate[index]
            prod = lr * g
            # The sum leaves this rank's own pick out, as the one-process sum
            # leaves the chosen coordinate out: its product is added back
            # below unless this rank's pick is the chosen one (taking it away
            # after adding it would turn an infinite product into NaN).
            picked = torch.zeros_like(candidate)
            picked[index] = True
            hi, lo = sum_parts(torch.where(candidate & ~picked, prod, 0), torch)
            at = int(index)
            t = bisect.bisect_right([start for start, _ in self._flat_runs()], at) - 1
            position = float(self.runs[t][0] + at - self._flat_runs()[t][0])
            mine = [torch.where(has, key[index], inf), torch.where(has, position, inf),
                    has, hi, lo, torch.where(has, prod[index], 0)]
        else:  # nothing here (an empty part): no candidate, nothing to add
            dtype = step_sizes[0].dtype if step_sizes else torch.float64
            device = self.device
            zero = torch.zeros((), dtype=dtype, device=device)
            mine = [zero + inf, zero + inf, zero, zero, zero, zero]
        sent = torch.stack([torch.as_tensor(t, device=device).to(torch.float64)
                            for t in mine])
        table = [torch.empty_like(sent) for _ in range(self.world)]
        dist.all_gather(table, sent, group=self.group)
        rows = [t.tolist() for t in table]
        owners = [r for r in range(self.world) if rows[r][2]]
        if not owners:  # no non-zero gradient on any rank: nothing to adjust
            return list(step_sizes)
        owner = min(owners, key=lambda r: (rows[r][0], rows[r][1]))
        if owner != self.rank or index is None or hyper is None:
            return list(step_sizes)
        # Σ over ranks of hi + lo, plus each other rank's pick, in rank order,
        # with error-free additions, in the step sizes' dtype (as the
        # single-process sum).
        part = [torch.tensor(rows[r][3:6], dtype=dtype, device=device)
                for r in range(self.world)]
        total, carried = part[0][0], part[0][1]
        for r in range(self.world):
            if r:
                total, err = two_sum(total, part[r][0])
                carried = carried + (part[r][1] + err)
            if r != owner:
                total, err = two_sum(total, part[r][2])
                carried = carried + err
        others = finish_sum(total, carried, torch)
        value = grprop_value(others, g[index], hyper, torch)
        if not bool(value == value):
            return list(step_sizes)
        flat = lr.clone()
        flat[index] = value
        out, start = [], 0
        for s in step_sizes:
            out.append(flat[start:start + s.numel()].reshape(s.shape))
            start += s.numel()
        return out

    def _flat_runs(self) -> list[tuple[int, int]]:
        """Where each tensor starts in this rank's concatenation."""
        out, start = [], 0
        for _, n in self.runs:
            out.append((start, n))
            start += n
        return out


class _ShardedAdjust(_AcrossRanks):
    """Parameters sharded as FSDP2 shards them: DTensors sharded on dim 0 of
    one 1-D mesh. The vector is the full parameters in the optimizer's
    order, each in C order; a rank's shard of a parameter is a run of
    consecutive positions (rows ``[r*c, (r+1)*c)``, ``c = ceil(rows /
    world)``, torch.chunk's split, as ``Shard(0)`` documents)."""

    def __init__(self, params: list[Tensor], variant: str) -> None:
        mesh = getattr(params[0], "device_mesh", None)
        if (mesh is None or mesh.ndim != 1
                or any(getattr(p, "device_mesh", None) != mesh for p in params)
                or any(tuple(getattr(p, "placements", ())) != (_shard0(),) for p in params)
                or any(p.is_complex() for p in params)):
            raise ValueError(
                f"variant={variant!r} (GRprop) supports sharded parameters laid out as FSDP2 "
                "lays them out (real DTensors, all sharded on dim 0 of one 1-D mesh); got "
                + ", ".join(sorted({f"{type(p).__name__} {getattr(p, 'placements', '')}"
                                    for p in params})))
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()
        self.device = local_tensor(params[0]).device
        runs, base = [], 0
        for p in params:
            rows = p.shape[0] if p.dim() else 1
            per_row = p.numel() // rows if rows else 0
            chunk = -(-rows // self.world)
            start = min(self.rank * chunk, rows)
            local = local_tensor(p)
            expected = max(0, min(start + chunk, rows) - start) * per_row
            if local.numel() != expected:
                raise ValueError(
                    f"variant={variant!r} (GRprop): a parameter of shape {tuple(p.shape)} has "
                    f"{local.numel()} elements on rank {self.rank}, not the {expected} of "
                    "torch.chunk's split of dim 0; its global positions are unknown")
            runs.append((base + start * per_row, local.numel()))
            base += p.numel()
        self.runs = runs


# Positions of a partitioned optimizer's coordinates: rank r's part starts at
# r * _PART, so every rank's positions lie above the ranks before it (exact
# in the float64 the ranks exchange, for up to 2**13 ranks).
_PART = 2 ** 40


class _PartitionedAdjust(_AcrossRanks):
    """``grprop_partitioned=True``: each rank of the default process group
    holds whole parameters, a part of the optimizer's
    (ZeroRedundancyOptimizer hands each rank's optimizer its partition). The
    vector is rank 0's parameters, then rank 1's, ..., each part in its
    optimizer's order: a rank sees only its own part, so this is the order
    every rank can agree on (ZeroRedundancyOptimizer deals the parameters to
    the ranks largest first, so it is not the unpartitioned optimizer's)."""

    def __init__(self, params: list[Tensor], variant: str) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "grprop_partitioned=True needs an initialized default process group "
                "(torch.distributed.init_process_group)")
        self.group = None  # the default process group
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        if params:
            self.device = params[0].device
        elif dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        runs, start = [], self.rank * _PART
        for p in params:
            n = p.numel() * (2 if p.is_complex() else 1)
            runs.append((start, n))
            start += n
        if start - self.rank * _PART >= _PART or self.world > 2 ** 13:
            raise ValueError(
                f"variant={variant!r} (GRprop) with grprop_partitioned=True supports up to "
                f"2**13 ranks of up to 2**40 elements each; got {self.world} ranks, "
                f"{start - self.rank * _PART} elements on rank {self.rank}")
        self.runs = runs
