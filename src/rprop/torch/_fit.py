"""``fit``: the full-batch training loop, with stopping rules, a progress bar
and atomic, exactly resumable checkpoints. See ``docs/full_batch.md``."""

from __future__ import annotations

import inspect
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rprop.torch._adaptive import AdaptiveHistory, check_batching, fit_adaptive
from rprop.torch._compat import local_tensor
from rprop.torch._fit_checkpoint import (
    atomic_save,
    checkpoint_path,
    exists_everywhere,
    is_zero,
    load_checkpoint,
    save_checkpoint,
)
from rprop.torch._full_batch import LossFn, check_options, full_batch_backward
from rprop.torch._preemption import DeferredInterrupt
from rprop.torch._rank_check import check_ranks_agree, describe_params

__all__ = ["EpochInfo", "FitHistory", "atomic_save", "fit"]

STOP_REASONS = ("max_epochs", "target_loss", "patience", "callback", "nonfinite")
_MEDIAN_SAMPLE = 8192


@dataclass
class FitHistory:
    """What :func:`fit` did.

    ``loss[i]`` is the full-dataset loss at the parameters epoch ``i``
    started from (the loss its step used); ``time[i]`` the seconds of
    training at the end of epoch ``i`` (summed over resumed runs);
    ``step_size[i]`` the (min, median, max) of the step sizes after epoch
    ``i``, or None when there are none yet (see :func:`fit`).
    ``stop_reason`` is one of ``"max_epochs"``, ``"target_loss"``,
    ``"patience"``, ``"callback"``, ``"nonfinite"``. ``resumed_from`` is the
    epoch a checkpoint resumed the run at, else None.
    """

    loss: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    step_size: list[tuple[float, float, float] | None] = field(default_factory=list)
    stop_reason: str = ""
    resumed_from: int | None = None

    @property
    def epochs(self) -> int:
        """Number of epochs (full-dataset evaluations) recorded."""
        return len(self.loss)

    @property
    def best_loss(self) -> float:
        return min(self.loss) if self.loss else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss": list(self.loss), "time": list(self.time),
            "step_size": [None if s is None else list(s) for s in self.step_size],
            "stop_reason": self.stop_reason,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], epochs: int) -> FitHistory:
        """The first ``epochs`` epochs of a saved history."""
        return cls(
            loss=[float(x) for x in state["loss"][:epochs]],
            time=[float(x) for x in state["time"][:epochs]],
            step_size=[None if s is None else (float(s[0]), float(s[1]), float(s[2]))
                       for s in state["step_size"][:epochs]],
        )


@dataclass(frozen=True)
class EpochInfo:
    """What a callback receives, once per epoch, before the step.

    ``epoch`` counts from 0; ``loss`` is the full-dataset loss at the current
    parameters (already in ``history.loss``).
    """

    epoch: int
    loss: float
    history: FitHistory
    model: nn.Module
    optimizer: Any


Callback = Callable[[EpochInfo], Any]


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any] | Callable[[], Iterable[Any]],
    *,
    optimizer: Any = None,
    variant: str | None = None,
    max_epochs: int = 100,
    target_loss: float | None = None,
    patience: int | None = None,
    min_improvement: float = 0.0,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    process_group: Any = None,
    full_batch_kwargs: dict[str, Any] | None = None,
    batching: str = "full",
    batching_kwargs: dict[str, Any] | None = None,
) -> FitHistory | AdaptiveHistory:
    """Train ``model`` full-batch: each epoch, the exact gradient of the mean
    loss over the whole dataset (:func:`full_batch_backward`), then one step.

    Args:
        model: the module to train (plain, DDP, FSDP2).
        loss_fn: ``loss_fn(model, batch)`` returning per-sample losses (1-D)
            or ``(loss_sum, count)``; see :func:`full_batch_backward`.
        data: this rank's batches, iterated once per epoch: a list, a
            DataLoader (keep ``shuffle=False``: order changes rounding), or a
            function returning a fresh iterable (a generator is refused, it
            would be empty from the second epoch on).
            Tensors already in memory: pass a list of ``tensor.split()``
            chunks (``list(zip(x.split(b), y.split(b)))``), which costs nothing
            per epoch; a DataLoader over a TensorDataset collates sample by
            sample (~4 s per epoch on 200k × 20 rows).
        optimizer: defaults to ``rprop.Rprop(trainable params,
            variant=variant or "irprop+")``. ``rprop.Rprop`` (also inside a
            ``ZeroRedundancyOptimizer``) gets the loss with
            ``step(loss=...)``; any other ``torch.optim.Optimizer`` is
            stepped with ``step()``, or, when its ``step`` requires a closure
            (``torch.optim.LBFGS``), with a closure whose first call returns
            the epoch's loss (its gradient is in ``.grad``) and whose later
            calls re-evaluate the full-batch loss and gradient (one pass over
            ``data`` each). Its parameters must be ``model``'s.
        variant: the variant of the default optimizer (not with ``optimizer``).
        max_epochs: at most this many epochs (evaluations, each followed by a step).
        target_loss: stop, before stepping, once the loss is ``<= target_loss``.
        patience: stop, before stepping, when the loss has not improved on the
            best so far by more than ``min_improvement`` (relative:
            ``loss < best - min_improvement * |best|``) for ``patience`` epochs.
        min_improvement: see ``patience``.
        callbacks: ``callback(info: EpochInfo)`` after each evaluation; a true
            return value stops training (under ``torch.distributed``, any
            rank's stop stops all ranks; ranks may pass different callbacks,
            e.g. logging on rank 0 only).
        progress: a tqdm bar on rank 0 with the epoch, the loss and the
            (min/median/max) step sizes. Statistics are over rank 0's local
            state (its shard under FSDP2 or ZeRO); the median is that of an
            evenly strided sample of at most ~8k step sizes (exact below).
        checkpoint: a file path. If it exists, training resumes from it
            (model, optimizer, history; the CPU and CUDA random generators in a
            single process), and the resumed run is bitwise the uninterrupted
            one. Saved every ``checkpoint_every`` epochs and at the end,
            atomically: a temporary file beside the target (a symbolic link
            is written through), fsync, then ``os.replace``; a crash leaves
            the previous checkpoint intact, and the next save or resume
            removes the temporary file a killed writer left. The file is
            ``torch.save``'s archive sealed with its sha256; resuming checks
            the digest, then the whole file against the model and the
            optimizer, and changes nothing unless all of it loads (a
            ValueError naming the file otherwise). A full disk is an
            ``OSError`` saying "no space left" with the path.
            Under ``torch.distributed`` rank 0 writes (DTensor state is
            gathered, ZeRO state consolidated) and all ranks read, so the
            path must be visible to every rank. Checked before the first
            epoch: its folder must exist and be writable. Resuming restores
            the saved hyperparameters; a ``variant`` that differs from the
            checkpoint's raises a ValueError.
            A first SIGINT (Ctrl-C) or SIGTERM finishes the epoch and saves
            it, then raises KeyboardInterrupt (SIGINT) or ``SystemExit(143)``
            (SIGTERM); a second stops at once. Under ``torch.distributed``
            the ranks agree on the epoch (one all-reduce per epoch).
        checkpoint_every: epochs between checkpoints.
        process_group: the data-parallel group (default: the world).
        full_batch_kwargs: more keyword arguments for :func:`full_batch_backward`
            (``bucket_cap_mb``, ``fsdp_sync_each_batch``).
        batching: ``"full"`` (default): the exact full-batch loop above.
            ``"adaptive"``: Rprop on mini-batches that grow until every
            step's signs can be trusted, then exact full batch; ``data`` is
            then a tuple of tensors (samples along dim 0) or a map-style
            ``Dataset``, ``max_epochs`` and ``checkpoint_every`` count
            epoch-equivalents (examples / N), ``target_loss`` and
            ``patience`` are not available, callbacks get a
            ``StepInfo`` per step, and the result is an ``AdaptiveHistory``
            (the method and its measurements: docs/benchmarks.md).
        batching_kwargs: the adaptive mode's options: ``batch_size`` (64),
            ``micro_batches`` (8), ``rho`` (0.5), ``z`` (None: derived from
            the etas), ``seed`` (0, the sampler's), ``eval_batch_size`` (1024).

    Every argument is checked before the first epoch (a TypeError or
    ValueError naming it). Under ``torch.distributed``, one small all-reduce
    then checks that every rank runs the same fit: the same optimizer class
    and hyperparameters, trainable parameters (number, shapes, dtypes),
    stopping rules, ``checkpoint`` given or not, ``checkpoint_every`` and
    ``full_batch_kwargs``; a difference raises the same ValueError on every
    rank, naming it and the rank, instead of a collective that cannot pair up.

    Returns:
        A :class:`FitHistory`. An epoch that stops training takes no step, so
        the model is left at the parameters of the last loss recorded, except
        after ``max_epochs`` (the last epoch's step is taken).
    """
    adaptive = check_batching(batching, batching_kwargs)
    # The adaptive mode samples data by index and checks it itself.
    trainable = _check_fit_args(model, loss_fn, optimizer, variant, max_epochs, target_loss,
                                patience, min_improvement, callbacks, checkpoint_every,
                                data if adaptive is None else (), full_batch_kwargs)
    if optimizer is None:
        from rprop.torch._optimizer import Rprop

        optimizer = Rprop(trainable, variant=variant or "irprop+")
    closure_step = _check_optimizer(optimizer, model)
    if adaptive is not None:
        if target_loss is not None or patience is not None:
            raise ValueError("target_loss and patience need full-data losses; batching="
                             "'adaptive' records mini-batch losses: use batching='full'")
        return fit_adaptive(model, loss_fn, data, optimizer, options=adaptive,
                            max_epochs=max_epochs, callbacks=list(callbacks), progress=progress,
                            checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                            variant=variant, full_batch_kwargs=full_batch_kwargs)
    callbacks = list(callbacks)
    group = _group(process_group)
    rank = _rank(group)
    device = local_tensor(trainable[0]).device
    any_callbacks = bool(callbacks)
    if group is not None:
        any_callbacks, = check_ranks_agree(
            "fit", _what_fit_does(optimizer, trainable, max_epochs, target_loss, patience,
                                  min_improvement, checkpoint, checkpoint_every,
                                  full_batch_kwargs), group, device, any_of=[any_callbacks])
    history = FitHistory()
    start = 0
    path = None if checkpoint is None else checkpoint_path(checkpoint)
    if path is not None and exists_everywhere(path, group, device):
        start, saved = load_checkpoint(path, model, optimizer, group, variant)
        history = FitHistory.from_state_dict(saved, start)
        history.resumed_from = start
    offset = history.time[-1] if history.time else 0.0
    plateau = _Plateau(min_improvement, history.loss)
    steps_with_loss = _takes_loss(optimizer)
    kwargs = dict(full_batch_kwargs or {})
    bar = _progress_bar(progress and rank == 0, max_epochs, start)
    began = time.perf_counter()
    completed = start
    reason = "max_epochs"
    # With a checkpoint to write, SIGINT and SIGTERM finish the epoch and
    # save it before stopping (every rank after the same epoch).
    interrupted = DeferredInterrupt(enabled=path is not None)
    try:
        for epoch in range(start, max_epochs):
            batches = data() if callable(data) else data
            loss_t = full_batch_backward(model, loss_fn, batches, process_group=process_group,
                                         **kwargs)
            loss = float(loss_t)
            history.loss.append(loss)
            plateau.add(loss)
            stop = _stop_rule(loss, target_loss, patience, plateau)
            if any_callbacks:  # on every rank if on any: the all-reduce below pairs up
                info = EpochInfo(epoch, loss, history, model, optimizer)
                wants = any([bool(cb(info)) for cb in callbacks])
                if _any_rank(wants, group, device) and stop is None:
                    stop = "callback"
            if stop is None:
                if steps_with_loss:
                    optimizer.step(loss=loss_t)
                elif closure_step:
                    optimizer.step(_Reevaluate(loss_t, lambda: full_batch_backward(
                        model, loss_fn, data() if callable(data) else data,
                        process_group=process_group, **kwargs)))
                else:
                    optimizer.step()
                completed = epoch + 1
            stats = _step_size_stats(optimizer)
            history.time.append(offset + time.perf_counter() - began)
            history.step_size.append(stats)
            if bar is not None:
                bar.set_postfix_str(_postfix(loss, stats), refresh=False)
                bar.update(1)
            if stop is not None:
                reason = stop
                break
            stopping = interrupted.agreed(group, device)
            if path is not None and (completed % checkpoint_every == 0 or stopping):
                save_checkpoint(path, model, optimizer, history.state_dict(), completed, group,
                                rank)
            if stopping:
                interrupted.reraise()
        history.stop_reason = reason
        if path is not None:
            save_checkpoint(path, model, optimizer, history.state_dict(), completed, group, rank)
        if interrupted.agreed(group, device):  # during the last epoch: saved, still a stop
            interrupted.reraise()
    finally:
        interrupted.restore()
        if bar is not None:
            bar.close()
    return history


# -- arguments and rules ----------------------------------------------------------


def _check_fit_args(
    model: Any, loss_fn: Any, optimizer: Any, variant: str | None, max_epochs: int,
    target_loss: float | None, patience: int | None, min_improvement: float, callbacks: Any,
    checkpoint_every: int, data: Any, full_batch_kwargs: Any,
) -> list[Tensor]:
    """Check every argument before the first epoch; return the trainable parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"model has no trainable parameters ({type(model).__name__} has "
            f"{sum(1 for _ in model.parameters())} parameters, none with requires_grad=True): "
            "fit has nothing to train")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function loss_fn(model, batch), got "
                        f"{type(loss_fn).__name__}")
    if callable(callbacks) or isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(
            callbacks, Iterable):
        raise TypeError(f"callbacks must be a list of functions callback(info), got "
                        f"{type(callbacks).__name__}"
                        + (" (pass callbacks=[f] for one)" if callable(callbacks) else ""))
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}] must be a function callback(info), got "
                            f"{type(cb).__name__}")
    if full_batch_kwargs is not None:
        if not isinstance(full_batch_kwargs, Mapping):
            raise TypeError(f"full_batch_kwargs must be a dict or None, got "
                            f"{type(full_batch_kwargs).__name__}")
        if "process_group" in full_batch_kwargs:
            raise TypeError("full_batch_kwargs must not hold process_group: pass fit's own "
                            "process_group=")
        unknown = sorted(map(str, set(full_batch_kwargs) - set(_FULL_BATCH_OPTIONS)))
        if unknown:
            raise TypeError(f"full_batch_kwargs has unknown keys {unknown}; full_batch_backward "
                            f"takes {list(_FULL_BATCH_OPTIONS)}")
        check_options(**{**_FULL_BATCH_OPTIONS, **full_batch_kwargs})
    if optimizer is not None and variant is not None:
        raise ValueError("pass variant= only without optimizer= (it picks the default "
                         "optimizer's variant)")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (e.g. rprop.Rprop) or None, "
                        f"got {type(optimizer).__name__}")
    if variant is not None:
        from rprop import get_variant

        get_variant(variant)
    for name, value, low in (("max_epochs", max_epochs, 0), ("checkpoint_every",
                                                            checkpoint_every, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if patience is not None and (isinstance(patience, bool)
                                 or not isinstance(patience, numbers.Integral) or patience < 1):
        raise ValueError(f"patience must be None or an int >= 1, got {patience!r}")
    if not (isinstance(min_improvement, numbers.Real) and 0 <= min_improvement < 1):
        raise ValueError(f"min_improvement must be a number in [0, 1), got {min_improvement!r}")
    if target_loss is not None and (isinstance(target_loss, bool)
                                    or not isinstance(target_loss, numbers.Real)):
        raise TypeError(f"target_loss must be a number or None, got {target_loss!r}")
    if target_loss is not None and math.isnan(target_loss):
        raise ValueError("target_loss must not be NaN (it would never be reached)")
    if isinstance(data, Iterator):
        raise TypeError(
            "data is an iterator (e.g. a generator), which the first epoch would exhaust; "
            "pass a list or a DataLoader, or a function that returns a fresh iterable"
        )
    if not (callable(data) or isinstance(data, Iterable)):
        raise TypeError(f"data must be an iterable of batches or a function returning one, "
                        f"got {type(data).__name__}")
    return trainable


# full_batch_backward's options (fit passes process_group itself), with their defaults.
_FULL_BATCH_OPTIONS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(full_batch_backward).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "process_group"}


def _check_optimizer(optimizer: Any, model: nn.Module) -> bool:
    """Refuse an optimizer fit cannot drive; say whether its step() needs a closure."""
    mine = {id(p) for p in model.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in mine:
                raise ValueError(
                    f"optimizer param_groups[{g}]['params'][{i}] is not a parameter of model: "
                    "fit computes the gradients of model's parameters only; make the optimizer "
                    "from model.parameters()")
    if _takes_loss(optimizer):
        return False
    try:
        signature = inspect.signature(optimizer.step)
    except (TypeError, ValueError):  # pragma: no cover - a step without a signature
        return False
    required = [name for name, p in signature.parameters.items()
                if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                   inspect.Parameter.VAR_KEYWORD)]
    if required not in ([], ["closure"]):
        raise TypeError(f"optimizer.step() requires {required}; fit can pass only a closure "
                        "(or rprop.Rprop's loss)")
    return required == ["closure"]


class _Reevaluate:
    """The closure fit gives a step() that requires one (e.g. LBFGS).

    Its first call returns the loss fit has just evaluated (the gradients of
    those parameters are still in ``.grad``); every later call re-evaluates
    the full-batch loss and gradient at the current parameters.
    """

    def __init__(self, first: Tensor, evaluate: Callable[[], Tensor]) -> None:
        self.first: Tensor | None = first
        self.evaluate = evaluate

    def __call__(self) -> Tensor:
        if self.first is not None:
            loss, self.first = self.first, None
            return loss
        return self.evaluate()


def _what_fit_does(optimizer: Any, trainable: list[Tensor], max_epochs: int,
                   target_loss: float | None, patience: int | None, min_improvement: float,
                   checkpoint: Any, checkpoint_every: int,
                   full_batch_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """What decides fit's collectives (and its steps), to compare across ranks.
    Not the checkpoint's path (ranks may mount the same file at different
    paths) nor callbacks (any rank's make every rank take part)."""
    kind = type(optimizer)
    return {
        "optimizer": f"{kind.__module__}.{kind.__qualname__}",
        "optimizer param_groups": [
            {k: v for k, v in g.items() if k != "params" and _plain(v)}
            for g in optimizer.param_groups],
        **describe_params(trainable),
        "max_epochs": int(max_epochs),
        "target_loss": None if target_loss is None else float(target_loss),
        "patience": None if patience is None else int(patience),
        "min_improvement": float(min_improvement),
        "checkpoint given": checkpoint is not None,
        "checkpoint_every": int(checkpoint_every),
        "full_batch_kwargs": sorted({**_FULL_BATCH_OPTIONS, **(full_batch_kwargs or {})}.items()),
    }


def _plain(value: Any) -> bool:
    """A value whose repr is the same on every rank that holds it."""
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


class _Plateau:
    """The best loss so far and the epochs since it last improved by more
    than ``min_improvement`` (relative), updated in O(1) per epoch."""

    def __init__(self, min_improvement: float, losses: Iterable[float] = ()) -> None:
        self.min_improvement = min_improvement
        self.best = math.inf
        self.since = 0
        self.epochs = 0
        for loss in losses:  # a resumed history, once
            self.add(loss)

    def add(self, loss: float) -> None:
        best = self.best
        if loss < best - self.min_improvement * abs(best) or best == math.inf:
            self.best, self.since = loss, 0
        else:
            self.since += 1
        self.epochs += 1


def _stop_rule(loss: float, target: float | None, patience: int | None,
               plateau: _Plateau) -> str | None:
    """Why to stop before stepping from ``loss`` (already added to ``plateau``), or None."""
    if not math.isfinite(loss):
        return "nonfinite"
    if target is not None and loss <= target:
        return "target_loss"
    if patience is not None and plateau.epochs > patience and plateau.since >= patience:
        return "patience"
    return None


def _takes_loss(optimizer: Any) -> bool:
    from rprop.torch._optimizer import Rprop

    inner = getattr(optimizer, "optim", None) if is_zero(optimizer) else optimizer
    return isinstance(inner, Rprop)


# -- progress ----------------------------------------------------------------------


def _progress_bar(show: bool, total: int, initial: int) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fit", unit="epoch", dynamic_ncols=True)


def _postfix(loss: float, stats: tuple[float, float, float] | None) -> str:
    text = f"loss={loss:.6g}"
    if stats is not None:
        text += f" step=[{stats[0]:.2g} {stats[1]:.2g} {stats[2]:.2g}]"
    return text


def _step_size_stats(optimizer: Any) -> tuple[float, float, float] | None:
    """(min, median, max) of this rank's step sizes; the median over an evenly
    strided sample of at most ~8k of them. One host synchronisation."""
    inner = optimizer.optim if is_zero(optimizer) else optimizer
    tensors = []
    for state in inner.state.values():
        s = state.get("step_size") if isinstance(state, dict) else None
        if isinstance(s, Tensor):
            s = local_tensor(s)
            s = torch.view_as_real(s) if s.is_complex() else s
            if s.numel():
                tensors.append(s.detach())
    if not tensors:
        return None
    home = tensors[0].device
    total = sum(t.numel() for t in tensors)
    stride = max(1, total // _MEDIAN_SAMPLE)
    sample = torch.cat([t.reshape(-1)[::stride].to(home, torch.float64) for t in tensors])
    lo = torch.stack([t.min().to(home, torch.float64) for t in tensors]).min()
    hi = torch.stack([t.max().to(home, torch.float64) for t in tensors]).max()
    values = torch.stack([lo, sample.median(), hi]).tolist()
    return (values[0], values[1], values[2])


# -- torch.distributed ---------------------------------------------------------------


def _group(process_group: Any) -> Any:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD if process_group is None else process_group
    return None


def _rank(group: Any) -> int:
    import torch.distributed as dist

    return 0 if group is None else dist.get_rank(group)


def _any_rank(flag: bool, group: Any, device: torch.device) -> bool:
    if group is None:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
