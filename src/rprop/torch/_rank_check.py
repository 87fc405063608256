"""One small collective that checks every rank is about to do the same thing.

Collectives pair up by order only: a rank with one more parameter, another
dtype or a callback the others lack sends a message of another size (gloo
aborts with ``op.preamble.length <= op.nbytes``), or waits for one that never
comes. Before any of that, :func:`check_ranks_agree` all-reduces a hash of a
description of what this rank is about to do, and names the difference when
the ranks disagree. It sees only what it is given: a mismatch it is not told
about can still hang (under NCCL, a collective of the wrong size usually does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rprop.torch._compat import local_tensor

__all__ = ["check_ranks_agree", "describe_params"]


def describe_params(params: Sequence[Tensor]) -> dict[str, Any]:
    """What the collectives over ``params`` depend on: their number, global
    shapes, dtypes and device types (a device index may differ by rank)."""
    return {
        "number of trainable parameters": len(params),
        "parameter shapes": [tuple(p.shape) for p in params],
        "parameter dtypes": [str(p.dtype).removeprefix("torch.") for p in params],
        "parameter devices": [local_tensor(p).device.type for p in params],
    }


def check_ranks_agree(
    what: str, fields: Mapping[str, Any], group: Any, device: torch.device,
    any_of: Sequence[bool] = (),
) -> list[bool]:
    """Raise the same ValueError on every rank unless ``fields`` is equal on all.

    One all-reduce (MAX) of ``2 + len(any_of)`` int64s: the hash, its
    negation (so MAX also gives the minimum) and the flags in ``any_of``,
    whose OR over the ranks is returned. Only when the hashes differ does a
    second collective gather every rank's ``fields`` to name the difference;
    every rank knows it is in that case, so they all take part, then raise.
    """
    digest = hashlib.blake2b(repr(sorted(fields.items())).encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little") >> 2  # < 2**62: its negation fits in an int64 too
    t = torch.tensor([h, -h, *map(int, any_of)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    values = t.tolist()
    if values[0] != -values[1]:
        everyone: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, dict(fields), group=group)
        raise ValueError(f"{what}: the ranks disagree, {_difference(everyone)}")
    return [bool(v) for v in values[2:]]


def _difference(everyone: list[dict[str, Any]]) -> str:
    """The first field in which a rank differs from rank 0, in words."""
    first = everyone[0]
    for rank, fields in enumerate(everyone[1:], start=1):
        for name in [*first, *(k for k in fields if k not in first)]:
            mine, theirs = first.get(name), fields.get(name)
            if repr(mine) == repr(theirs):
                continue
            if (isinstance(mine, list) and isinstance(theirs, list)
                    and len(mine) == len(theirs)):
                i = next(i for i, (a, b) in enumerate(zip(mine, theirs, strict=True))
                         if repr(a) != repr(b))
                item = f"param_groups[{i}]" if "param_groups" in name else f"parameter {i}"
                return (f"{name}: {item} is {theirs[i]!r} on rank {rank} and "
                        f"{mine[i]!r} on rank 0; every rank must pass the same")
            return (f"{name}: {theirs!r} on rank {rank} and {mine!r} on rank 0; every rank "
                    "must pass the same")
    raise AssertionError("unreachable: equal reprs hash equal")  # pragma: no cover
