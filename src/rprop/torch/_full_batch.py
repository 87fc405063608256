"""Exact full-dataset gradients, batch by batch, on one process or many.

See :func:`full_batch_backward` and ``docs/full_batch.md``.
"""

from __future__ import annotations

import math
import numbers
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from rprop.torch._compat import fsdp_param_groups, local_tensor
from rprop.torch._rank_check import check_ranks_agree, describe_params

__all__ = ["full_batch_backward"]

LossFn = Callable[[nn.Module, Any], Any]
_END = object()
# model -> (group, hash of what its collectives depend on) that every rank has
# confirmed; the check then costs no collective while nothing changes.
_AGREED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, int]] = weakref.WeakKeyDictionary()


def full_batch_backward(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    process_group: Any = None,
    bucket_cap_mb: float = 256.0,
    fsdp_sync_each_batch: bool = False,
) -> Tensor:
    r"""Leave in ``.grad`` the exact gradient of the mean loss over the whole
    dataset, computed batch by batch; return that mean loss.

    The gradients of ``model``'s trainable parameters are reset (set to
    ``None``), then ``loss_fn(model, batch)`` runs on every batch, each
    followed by its backward pass, so memory stays that of one batch however
    many there are. ``batches`` is any iterable: a DataLoader, a list, a
    generator (iterated once).

    ``loss_fn(model, batch)`` returns, per batch, either

    * a 1-D tensor of per-sample losses (``reduction="none"``); the result is
      the mean over all samples of all batches; or
    * a pair ``(loss_sum, count)``: a one-element tensor and a number (or
      one-element tensor); the result is ``sum(loss_sum) / sum(count)``. This
      is how to get a weighted mean (``((w * l).sum(), w.sum())``) or a loss
      whose samples are not rows (tokens: ``(token_losses.sum(), n_tokens)``).

    Every count must be finite and >= 0, and their total > 0; otherwise a
    ValueError names the batch (and the rank). A float16 ``w.sum()`` that
    overflows to inf would otherwise make the loss and the gradient 0.
    Tensor counts are checked on the device, with no host synchronisation
    per batch.

    A 0-dim (already averaged) loss is refused: its batch size is lost, and
    averaging batch means is wrong when the last batch is smaller.

    Under ``torch.distributed`` (a process group initialised by the user, e.g.
    by ``torchrun``), each rank passes its own shard, of any size and any
    number of batches, and every rank ends with the gradient and the loss of
    the mean over *all* samples of *all* ranks:

    * plain model, or ``DistributedDataParallel`` (``loss_fn`` then receives
      ``model.module``, inside ``model.no_sync()``: DDP's per-batch gradient
      reductions and buffer broadcasts never run): each rank sums its
      per-sample gradients locally; then one all-reduce (SUM) of the
      gradients flattened into buckets of at most ``bucket_cap_mb``, carrying
      the loss sum and the sample count, and the result is divided by the
      global count. This weights every *sample* equally, whatever the shard
      sizes (DDP's own averaging over ranks would not);
    * FSDP2 (``fully_shard``, DTensor parameters): FSDP2 communicates in every
      forward and backward, so all ranks run the same number of passes (the
      maximum over ranks, agreed on first); a rank that has run out of batches
      repeats its last batch with weight 0. Gradient reduction is switched
      off (``set_requires_gradient_sync(False)``) for all passes but the last,
      whose reduce-scatter sums (divide factor 1) what each rank accumulated;
      a small all-reduce then carries the loss sum and count. With
      ``fsdp_sync_each_batch=True`` every pass reduce-scatters instead:
      FSDP2's usual gradient memory, more communication. Every rank needs at
      least one batch (all ranks raise a ValueError otherwise).

    Before the first call for a model (and again when its parameters
    change), one small all-reduce checks that every rank has the same
    trainable parameters (number, shapes, dtypes), the same set-up (FSDP2 or
    not) and the same ``bucket_cap_mb`` / ``fsdp_sync_each_batch``; a
    difference is a ValueError on every rank naming it, rather than an opaque
    error (gloo) or a hang (NCCL) in the gradient reduction. A count that is
    wrong on one rank also raises on every rank, after the collectives.

    Args:
        model: the module whose parameters get the gradient.
        loss_fn: ``loss_fn(model, batch)`` as above.
        batches: this rank's batches.
        process_group: the data-parallel group (default: the world, when
            ``torch.distributed`` is initialised; ignored otherwise).
        bucket_cap_mb: largest all-reduce bucket, in MiB.
        fsdp_sync_each_batch: see above.

    Returns:
        The mean loss, a 0-dim float64 tensor on the parameters' device (the
        same on every rank); ``float()`` accepts it.

    Example:
        >>> import torch, rprop
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(100, 3), torch.randn(100, 1)
        >>> batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 100, 32)]
        >>> def loss_fn(model, batch):
        ...     xb, yb = batch
        ...     return ((model(xb) - yb) ** 2).sum(dim=1)  # one loss per sample
        >>> opt = rprop.Rprop(model.parameters(), variant="irprop+")
        >>> for epoch in range(10):
        ...     loss = rprop.torch.full_batch_backward(model, loss_fn, batches)
        ...     _ = opt.step(loss=loss)
    """
    params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters that require grad")
    check_options(bucket_cap_mb, fsdp_sync_each_batch)
    device = local_tensor(params[0]).device
    group = _data_parallel_group(process_group)
    fsdp = group is not None and bool(_fsdp_modules(model))
    if group is not None:
        _check_ranks_agree(model, params, group, device, fsdp, bucket_cap_mb,
                           fsdp_sync_each_batch)
    for p in params:
        p.grad = None
    # Under torch.distributed a bad count is reported after the collectives,
    # so that no rank leaves the others waiting in one.
    totals = _Totals(device, defer_errors=group is not None)
    try:
        with torch.enable_grad():  # also under torch.no_grad(), as in step(closure)
            if group is None:
                for batch in batches:
                    totals.add(loss_fn(model, batch), weight=1)
                stats = totals.stats()
            elif fsdp:
                stats = _fsdp_passes(model, loss_fn, batches, group, device,
                                     fsdp_sync_each_batch, totals)
            else:
                stats = _replicated_passes(model, loss_fn, batches, group, params,
                                           int(bucket_cap_mb * 2**20), totals)
        return _divide(params, stats, totals, group)
    except BaseException:
        # A gradient summed over part of the data must not reach a step.
        for p in params:
            p.grad = None
        raise


def check_options(bucket_cap_mb: Any, fsdp_sync_each_batch: Any) -> None:
    """The options of :func:`full_batch_backward` (also checked up front by ``fit``)."""
    if (isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real)
            or not (float(bucket_cap_mb) > 0 and math.isfinite(bucket_cap_mb))):
        raise ValueError(f"bucket_cap_mb must be a number > 0, got {bucket_cap_mb!r}")
    if not isinstance(fsdp_sync_each_batch, bool):
        raise TypeError(f"fsdp_sync_each_batch must be True or False, got "
                        f"{fsdp_sync_each_batch!r}")


# -- the loss contract ------------------------------------------------------------


class _Totals:
    """Local loss sum and sample count, kept on the device (no host sync).

    A Python count is checked at once. A tensor count is copied into a
    device buffer (8 bytes a batch, one small copy: no host sync), checked in
    one pass at the end; the index and value of the first bad one are read
    only when the end-of-call synchronisation shows there is one.
    """

    def __init__(self, device: torch.device, defer_errors: bool) -> None:
        self.device = device
        self.defer_errors = defer_errors
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.count: Any = 0
        self.batches = 0  # batches added with weight 1
        self.bad_number: tuple[int, float] | None = None  # first bad Python count
        self.tensor_counts: Tensor | None = None  # grows by doubling
        self.tensor_batches: list[int] = []  # the batch of each tensor count

    def add(self, out: Any, weight: int) -> None:
        """Backward the batch's loss sum (times ``weight``, 0 or 1), add it up."""
        total, count = _sum_and_count(out)
        if weight:
            total.backward()
            self.loss += total.detach().to(device=self.device, dtype=torch.float64)
            if isinstance(count, Tensor):
                count = count.detach().to(device=self.device, dtype=torch.float64).reshape(())
                self._keep(count)
            elif not (math.isfinite(count) and count >= 0) and self.bad_number is None:
                self.bad_number = (self.batches, count)
                if not self.defer_errors:
                    self.raise_bad_count(None)
            self.count = self.count + count
            self.batches += 1
        else:  # a zero-weight pass, only to line collectives up (FSDP2)
            (total * 0).backward()

    def _keep(self, count: Tensor) -> None:
        n = len(self.tensor_batches)
        kept = self.tensor_counts
        if kept is None or n == len(kept):
            grown = torch.empty(max(64, 2 * n), dtype=torch.float64, device=self.device)
            if kept is not None:
                grown[:n].copy_(kept)
            self.tensor_counts = kept = grown
        kept[n] = count
        self.tensor_batches.append(self.batches)

    def _bad_tensor_counts(self) -> Tensor | None:
        """Mask of the kept tensor counts that are not finite and >= 0."""
        if self.tensor_counts is None:
            return None
        kept = self.tensor_counts[:len(self.tensor_batches)]
        return ~((kept >= 0) & (kept < math.inf))  # NaN fails both

    def stats(self) -> Tensor:
        """``[loss sum, count, 1 if a count was bad else 0]``, float64 (summed over ranks)."""
        count = self.count
        if not isinstance(count, Tensor):
            count = torch.tensor(float(count), dtype=torch.float64, device=self.device)
        flag = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = self._bad_tensor_counts()
        if bad is not None:
            flag = bad.any().to(torch.float64)
        if self.bad_number is not None:
            flag = torch.ones((), dtype=torch.float64, device=self.device)
        return torch.stack([self.loss, count.reshape(()), flag])

    def first_bad(self) -> tuple[int, float] | None:
        """``(batch index, count)`` of this rank's first bad count, if any."""
        found = []
        if self.bad_number is not None:
            found.append(self.bad_number)
        bad, kept = self._bad_tensor_counts(), self.tensor_counts
        if bad is not None and kept is not None and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            found.append((self.tensor_batches[i], float(kept[i])))
        return min(found) if found else None

    def raise_bad_count(self, group: Any) -> None:
        """Raise the ValueError naming the first bad count (on every rank)."""
        where, found = "", self.first_bad()
        if group is not None:
            everyone: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, found, group=group)
            rank, found = next((r, bad) for r, bad in enumerate(everyone) if bad is not None)
            where = f" on rank {rank}"
        batch, value = found or (-1, math.nan)  # one exists: the flag said so
        hint = (" (a float16 sum past 65504 overflows: sum in float32, e.g. "
                "w.sum(dtype=torch.float32))" if math.isinf(value) else "")
        raise ValueError(f"batch {batch}{where}: loss_fn's count must be finite and >= 0, "
                         f"got {value:g}{hint}")


def _sum_and_count(out: Any) -> tuple[Tensor, Any]:
    """``(loss_sum, count)`` from what ``loss_fn`` returned, checking the contract."""
    if isinstance(out, tuple) and len(out) == 2:
        total, count = out
        if not (isinstance(total, Tensor) and total.numel() == 1):
            raise TypeError(
                "loss_fn returned a pair, which must be (loss_sum, count) with loss_sum a "
                f"one-element tensor; got loss_sum={_describe(total)}"
            )
        if isinstance(count, Tensor):
            if count.numel() != 1 or count.is_complex() or count.dtype == torch.bool:
                raise TypeError(f"count must be a real number, got {_describe(count)}")
        elif isinstance(count, bool) or not isinstance(count, (int, float)):
            raise TypeError(f"count must be a number or a one-element tensor, got {count!r}")
        total = total.reshape(())
    elif isinstance(out, Tensor):
        if out.ndim != 1:
            hint = (
                "return the per-sample losses (e.g. reduction='none'), not their mean, or "
                "(loss_sum, count)" if out.ndim == 0 else
                "reduce each sample's losses to one number (e.g. .sum(dim=1)), or return "
                "(loss_sum, count)"
            )
            raise ValueError(
                f"loss_fn must return a 1-D tensor of per-sample losses or (loss_sum, count); "
                f"got a tensor of shape {tuple(out.shape)}: {hint}"
            )
        # Half-precision losses add up in float32: 20k fp16 losses of ~10 overflow.
        half = out.is_floating_point() and out.dtype.itemsize < 4
        total = out.sum(dtype=torch.float32) if half else out.sum()
        count = out.numel()
    else:
        raise TypeError(
            "loss_fn must return a 1-D tensor of per-sample losses or a pair "
            f"(loss_sum, count); got {_describe(out)}"
        )
    if not total.is_floating_point():
        raise TypeError(f"losses must be real floating point, got {total.dtype}")
    if not total.requires_grad:
        raise RuntimeError(
            "loss_fn's losses do not require grad: compute them from model(...), "
            "without detaching them"
        )
    return total, count


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _divide(params: list[Tensor], stats: Tensor, totals: _Totals, group: Any) -> Tensor:
    """Turn summed gradients into those of the mean; return the mean loss."""
    count, bad = stats[1:].tolist()  # the one host synchronisation of the call
    if bad:
        totals.raise_bad_count(group)
    if not count > 0:
        raise ValueError(
            f"no samples: the batches held {count:g} samples in all (on all ranks); "
            "full_batch_backward needs at least one"
        )
    if not math.isfinite(count):
        raise ValueError(f"the counts add up to {count:g}; their total must be finite")
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    if grads:
        torch._foreach_div_(grads, count)
    return stats[0] / count


# -- torch.distributed -------------------------------------------------------------


def _data_parallel_group(process_group: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group given, but torch.distributed is not initialised")
        return None
    return dist.group.WORLD if process_group is None else process_group


def _fsdp_modules(model: nn.Module) -> list[Any]:
    # No FSDP2 module exists unless the user imported FSDP2.
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp_module is None:
        return []
    return [m for m in model.modules() if isinstance(m, fsdp_module)]


def _check_ranks_agree(model: nn.Module, params: list[Tensor], group: Any,
                       device: torch.device, fsdp: bool, bucket_cap_mb: float,
                       fsdp_sync_each_batch: bool) -> None:
    """Every rank is about to run the same collectives (see check_ranks_agree);
    checked once per model while its parameters and these options stay the same."""
    fields: dict[str, Any] = {"set-up": "FSDP2" if fsdp else "plain or DDP",
                              **describe_params(params)}
    if fsdp:
        fields["fsdp_sync_each_batch"] = fsdp_sync_each_batch
    else:
        fields["bucket_cap_mb"] = float(bucket_cap_mb)
    key = hash(repr(sorted(fields.items())))
    if _AGREED.get(model) == (group, key):
        return
    check_ranks_agree("full_batch_backward", fields, group, device)
    _AGREED[model] = (group, key)


def _replicated_passes(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], group: Any,
    params: list[Tensor], cap_bytes: int, totals: _Totals,
) -> Tensor:
    """Plain model or DDP: accumulate locally, then one bucketed all-reduce."""
    context: Any
    if isinstance(model, DistributedDataParallel):
        # The wrapped module runs the forward: no reducer hooks, no per-forward
        # buffer broadcast (a collective per batch, which would hang ranks
        # with different batch counts); no_sync() in case loss_fn calls the
        # wrapper itself.
        target, context = model.module, model.no_sync()
    else:
        target, context = model, nullcontext()
    with context:
        for batch in batches:
            totals.add(loss_fn(target, batch), weight=1)
    return _all_reduce_grads(params, totals.stats(), group, cap_bytes)


def _all_reduce_grads(params: list[Tensor], stats: Tensor, group: Any, cap_bytes: int) -> Tensor:
    """Sum every rank's gradients, loss sum and count: one all-reduce per bucket.

    Gradients are flattened into buckets by (device, dtype) of at most
    ``cap_bytes`` (one bucket for most models). Each bucket ends with one flag
    per parameter, 1 where this rank has a gradient: a parameter no rank
    used keeps ``grad=None``, as it would in one process, and ranks whose
    batches did not reach a parameter still send zeros, so buckets line up.
    The loss sum, count and bad-count flag (float64) ride at the end of a
    float64 bucket; a model with none sends them in a 24-byte all-reduce
    started first, so it overlaps with the buckets.
    """
    stats = stats.to(local_tensor(params[0]).device)
    buckets = _buckets(params, cap_bytes)
    carrier = next((i for i in reversed(range(len(buckets)))
                    if buckets[i][0] == (stats.device, torch.float64)), None)
    pending = None
    if carrier is None:
        pending = dist.all_reduce(stats, group=group, async_op=True)
    for i, ((bucket_device, dtype), members) in enumerate(buckets):
        views = [_real_flat(p.grad) for p in members]
        sizes = [local_tensor(p).numel() * (2 if p.is_complex() else 1) for p in members]
        extra = len(stats) if i == carrier else 0
        flat = torch.zeros(sum(sizes) + len(members) + extra, dtype=dtype, device=bucket_device)
        offset = 0
        for view, size in zip(views, sizes, strict=True):
            if view is not None:
                flat[offset:offset + size].copy_(view)
            offset += size
        flags = flat[offset:offset + len(members)]
        flags.copy_(torch.tensor([v is not None for v in views], dtype=dtype))
        if extra:
            flat[-extra:].copy_(stats)
        dist.all_reduce(flat, group=group)
        used = (flags > 0).tolist()
        offset = 0
        for p, size, is_used in zip(members, sizes, used, strict=True):
            if is_used:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad = local_tensor(p.grad)
                grad = torch.view_as_real(grad) if grad.is_complex() else grad
                grad.copy_(flat[offset:offset + size].view(grad.shape))
            offset += size
        if extra:
            stats = flat[-extra:].clone()
    if pending is not None:
        pending.wait()
    return stats


def _real_flat(grad: Tensor | None) -> Tensor | None:
    if grad is None:
        return None
    g = local_tensor(grad)
    return (torch.view_as_real(g) if g.is_complex() else g).reshape(-1)


def _buckets(
    params: list[Tensor], cap_bytes: int
) -> list[tuple[tuple[torch.device, torch.dtype], list[Tensor]]]:
    """Parameters split by (device, real dtype), then into runs of <= cap_bytes.

    Depends only on the parameters, never on which have gradients, so every
    rank builds the same buckets.
    """
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        local = local_tensor(p)
        dtype = local.real.dtype if local.is_complex() else local.dtype
        by_kind.setdefault((local.device, dtype), []).append(p)
    out = []
    for kind, members in by_kind.items():
        run: list[Tensor] = []
        size = 0
        for p in members:
            nbytes = local_tensor(p).numel() * local_tensor(p).element_size()
            if run and size + nbytes > cap_bytes:
                out.append((kind, run))
                run, size = [], 0
            run.append(p)
            size += nbytes
        out.append((kind, run))
    return out


def _fsdp_passes(
    model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], group: Any,
    device: torch.device, sync_each: bool, totals: _Totals,
) -> Tensor:
    """FSDP2: every rank runs the same number of forward/backward passes.

    FSDP2 all-gathers parameters in every forward and backward, so a rank
    cannot simply stop early. One small all-reduce (MAX) first agrees on the
    number of passes when every rank knows ``len(batches)``; otherwise each
    pass ends with a one-element all-reduce saying whether any rank has a
    batch left. A rank out of batches repeats its last batch with weight 0.
    """
    modules = _fsdp_modules(model)
    iterator: Iterator[Any] = iter(batches)
    current = next(iterator, _END)
    try:
        known = len(batches)  # type: ignore[arg-type]
    except TypeError:
        known = -1
    info = torch.tensor([max(known, 0), known < 0, current is _END], dtype=torch.int64,
                        device=device)
    dist.all_reduce(info, op=dist.ReduceOp.MAX, group=group)
    passes, some_unknown, some_empty = info.tolist()
    if some_empty:
        raise ValueError(
            "with FSDP2 every rank needs at least one batch (ranks that run out repeat "
            "their last batch with weight 0 to keep FSDP2's collectives in step); a rank "
            "got none"
        )
    saved = _fsdp_sum_reduction(modules)
    last_real = current
    try:
        k = 0
        while True:
            following = next(iterator, _END)
            if some_unknown:
                more = torch.tensor([following is not _END], dtype=torch.int64, device=device)
                dist.all_reduce(more, op=dist.ReduceOp.MAX, group=group)
                last = not bool(more)
            else:
                last = k == passes - 1
                if last and following is not _END:
                    raise RuntimeError(
                        "batches yielded more items than len(batches) said; with FSDP2, "
                        "len() must be right (or absent)"
                    )
            for m in modules:
                m.set_requires_gradient_sync(sync_each or last, recurse=False)
            if current is _END:
                totals.add(loss_fn(model, last_real), weight=0)
            else:
                totals.add(loss_fn(model, current), weight=1)
                last_real = current
            if last:
                break
            current = following
            k += 1
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True, recurse=False)
        _fsdp_restore(modules, saved)
    stats = totals.stats()
    dist.all_reduce(stats, group=group)
    return stats


def _fsdp_sum_reduction(modules: list[Any]) -> list[list[tuple[Any, Any]]]:
    """Make FSDP2's gradient reduction a plain SUM; return the old settings.

    FSDP2 divides by the data-parallel size by default; the division by the
    global *sample* count happens afterwards, so unequal shards weigh right.
    """
    saved = []
    for m in modules:
        groups = fsdp_param_groups(m)
        saved.append([(getattr(g, "gradient_divide_factor", None),
                       getattr(g, "force_sum_reduction_for_comms", False)) for g in groups])
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    return saved


def _fsdp_restore(modules: list[Any], saved: list[list[tuple[Any, Any]]]) -> None:
    for m, settings in zip(modules, saved, strict=True):
        groups = fsdp_param_groups(m)
        for g, (factor, force_sum) in zip(groups, settings, strict=True):
            g.gradient_divide_factor = factor
            g.force_sum_reduction_for_comms = force_sum
