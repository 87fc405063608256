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
import torch.distributed as dist
from torch import Tensor, nn

from rprop._stopping import DEFAULT_LR, gtol_reached, step_floor_reached, tolerance
from rprop._variants import get_variant
from rprop.plotting import plot_training
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
from rprop.torch._history import History, Stats, stats_from_state, stats_to_state
from rprop.torch._optimizer import Rprop
from rprop.torch._preemption import DeferredInterrupt
from rprop.torch._progress import progress_bar
from rprop.torch._rank_check import check_ranks_agree, describe_params
from rprop.torch._step_stats import step_size_summary

__all__ = ["EpochInfo", "FitHistory", "atomic_save", "fit"]


@dataclass
class FitHistory(History):
    """What :func:`fit` did.

    ``loss[i]`` is the full-dataset loss at the parameters epoch ``i``
    started from (the loss its step used); ``time[i]`` the seconds of
    training at the end of epoch ``i`` (summed over resumed runs);
    ``step_size[i]`` the (min, median, max) of the step sizes after epoch
    ``i``, or None when there are none yet (see :func:`fit`).
    ``step_size_groups[i]`` the same per parameter group (None for a group
    without step sizes), ``step_min`` each group's ``step_min`` (empty for an
    optimizer without one). ``val_loss[i]`` is the validation metric at the
    parameters epoch ``i`` started from (empty without validation);
    ``best_epoch`` the epoch whose parameters were restored at the end (see
    ``restore_best``), else None.
    ``stop_reason`` is one of ``"max_epochs"``, ``"target_loss"``, ``"gtol"``,
    ``"step_floor"``, ``"patience"``, ``"callback"``, ``"nonfinite"``, and
    ``message`` says why in words. ``resumed_from`` is the epoch a
    checkpoint resumed the run at, else None.
    """

    step_size_groups: list[list[Stats | None]] = field(default_factory=list)
    step_min: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    message: str = ""

    @property
    def epochs(self) -> int:
        """Number of epochs (full-dataset evaluations) recorded."""
        return len(self.loss)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "step_size_groups": [[stats_to_state(s) for s in g] for g in self.step_size_groups],
            "step_min": list(self.step_min), "val_loss": list(self.val_loss),
            "best_epoch": self.best_epoch, "message": self.message,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], epochs: int) -> FitHistory:
        """The first ``epochs`` epochs of a saved history (the keys beyond
        loss, time and step_size may be missing: they start empty)."""
        return cls(
            **History._fields_from_state(state, epochs),
            step_size_groups=[[stats_from_state(s) for s in g]
                              for g in state.get("step_size_groups", [[]] * epochs)[:epochs]],
            step_min=[float(x) for x in state.get("step_min", [])],
            val_loss=[float(x) for x in state.get("val_loss", [])[:epochs]],
        )

    def plot(self, path: str | os.PathLike[str] | None = None, *, title: str | None = None
             ) -> Any:
        """Draw the loss curve (and the validation one, with the restored
        epoch) above the step sizes per parameter group (median line,
        min..max band, ``step_min`` dashed); see :func:`rprop.plotting.plot_training`.
        Saved to ``path`` when given; returns the matplotlib Figure (needs
        ``pip install rprop[plot]``)."""
        return plot_training(self.loss, self.step_size, groups=self.step_size_groups or None,
                             step_min=self.step_min or None, val_loss=self.val_loss or None,
                             best=self.best_epoch, title=title, path=path)


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
    max_epochs: float = 1000,
    target_loss: float | None = None,
    gtol: float | None = None,
    step_floor: bool = True,
    patience: int | None = None,
    min_improvement: float = 0.0,
    val_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
    val_metric: Callable[[nn.Module], Any] | None = None,
    restore_best: bool = True,
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
    With ``batching="adaptive"``: Rprop on growing, sign-tested mini-batches
    that end in exact full batch (below).

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
            variant=variant or "irprop+")``; with ``batching="adaptive"``,
            with ``lr=0.1`` (Riedmiller and Braun's initial step size, as
            :func:`rprop.minimize`'s) instead of torch's 0.01.
            ``rprop.Rprop`` (also inside a ``ZeroRedundancyOptimizer``) gets
            the loss with ``step(loss=...)``; any other ``torch.optim.Optimizer`` is
            stepped with ``step()``, or, when its ``step`` requires a closure
            (``torch.optim.LBFGS``), with a closure whose first call returns
            the epoch's loss (its gradient is in ``.grad``) and whose later
            calls re-evaluate the full-batch loss and gradient (one pass over
            ``data`` each). Its parameters must be ``model``'s.
        variant: the variant of the default optimizer (not with ``optimizer``).
        max_epochs: at most this many epochs (evaluations, each followed by
            a step); with ``batching="adaptive"``, epoch-equivalents
            (examples / N), any number >= 0 (0.5: half a pass). The
            default, 1000, is trainrp's: a budget, not the expected length of
            a run. The convergence stops (``step_floor``
            on by default, ``gtol``) end a run that has converged, so a
            generous budget costs nothing there, and 100 cut typical
            full-batch runs short (Rprop's step sizes take ~40 epochs just
            to grow from 1e-3 to 1).
        target_loss: stop, before stepping, once the loss is ``<= target_loss``.
        gtol: stop, before stepping, once the largest ``|component|`` of the
            full-batch gradient (``.grad`` of every trainable parameter: the
            loss's gradient, without an optimizer's weight decay) is
            ``<= gtol`` (neuralnet's ``threshold``; :func:`rprop.minimize`'s
            ``gtol``). In the loss's units, so off (None) by default. Under
            FSDP2 each rank holds a shard: the maximum is taken over ranks.
        step_floor: stop, before stepping, once every moving element is at
            its step-size floor: every element whose gradient (with the
            optimizer's weight decay) is not 0 has a step size
            ``<= step_min`` of its group, so the next step moves each of them
            by ``step_min`` only: Rprop's resolution is reached (a run past
            it repeats the same losses). Also when no element has a nonzero
            gradient (no Rprop step moves anything). Read from the optimizer's
            state (``step_size``) and its groups' ``step_sizes``: it applies
            to ``rprop.Rprop`` and ``torch.optim.Rprop``; optimizers without
            step sizes never stop by it. Not before the first step.
        patience: stop, before stepping, when the loss (the validation
            metric, with ``val_data`` or ``val_metric``) has not improved on
            the best so far by more than ``min_improvement`` (relative:
            ``loss < best - min_improvement * |best|``) for ``patience`` epochs.
        min_improvement: see ``patience``.
        val_data: validation batches, in ``data``'s form. Each epoch, before
            the training pass and at the same parameters, the validation
            loss is the mean of ``loss_fn`` over them (computed as the
            training loss is, by :func:`full_batch_backward`, whose gradient
            is discarded: it costs a backward pass over ``val_data``), with
            the model in eval mode (``model.eval()``; each module's mode is
            restored after). Recorded in ``history.val_loss``; ``patience``
            then watches it (early stopping).
        val_metric: instead of ``val_data``: ``val_metric(model)`` returns
            the validation metric (a number or one-element tensor, lower is
            better), called under ``torch.no_grad()`` with the model in eval
            mode. Under ``torch.distributed`` it is called on every rank, and
            the ranks act on the largest value.
        restore_best: with validation, at the end of the run (whatever
            stopped it, but not an exception or a signal), load back the
            model's ``state_dict`` and the optimizer's state of the epoch with
            the best validation value (its parameters: before its step), as
            sklearn's ``early_stopping`` and Keras' ``restore_best_weights``
            do. A copy of both is kept in memory (and in the checkpoint,
            which then resumes the restored state); ``history.best_epoch``
            names the epoch. The random generators are not rewound.
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
            ``"adaptive"``: Rprop on mini-batches in which a coordinate moves
            only once its sign can be trusted, then exact full batch; ``data`` is
            then a tuple of tensors (samples along dim 0) or a map-style
            ``Dataset``, ``max_epochs`` and ``checkpoint_every`` count
            epoch-equivalents (examples / N), ``target_loss`` and
            ``patience`` are not available, callbacks get a
            ``StepInfo`` per step, and the result is an ``AdaptiveHistory``
            (the method and its measurements: docs/benchmarks.md).
        batching_kwargs: the adaptive mode's options: ``batch_size`` (64),
            ``micro_batches`` (8), ``rho`` (0.5), ``z`` (None: derived from
            the etas), ``seed`` (0, the sampler's), ``eval_batch_size`` (1024),
            ``grow`` (``"efficiency"``: evidence carried across steps, the
            batch doubled when the signs' efficiency, averaged over
            ``window`` (10) steps, falls short of what step-size growth
            needs; ``"evidence"``: evidence carried, one jump to full batch;
            ``"fraction"``: each batch alone, doubling while fewer than
            ``rho`` pass; ``"gain"``: experimental), ``unreliable``
            (``"partial"``: a coordinate that does not pass moves its step
            size times the square of its sign efficiency, estimated without
            the bias noise gives it; ``"hold"``: it keeps its value).

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
        after ``max_epochs`` (the last epoch's step is taken) and with
        ``restore_best`` (the best validation epoch's). ``stop_reason`` names
        the rule, ``message`` says why; ``history.plot()`` draws the run.
        With ``batching="adaptive"``, an :class:`AdaptiveHistory`: one entry
        per step (its batch size, reliable fraction, sign efficiency and
        examples so far; ``epochs`` the epoch-equivalents), and ``stop_reason``.
        Its callbacks get a :class:`StepInfo` per step; ``max_epochs`` and
        ``checkpoint_every`` count epoch-equivalents (examples / N), and
        ``step_floor`` and ``restore_best`` do not apply.
    """
    adaptive = check_batching(batching, batching_kwargs)
    # The adaptive mode samples data by index and checks it itself.
    trainable = _check_fit_args(model, loss_fn, optimizer, variant, max_epochs, target_loss,
                                patience, min_improvement, callbacks, checkpoint_every,
                                data if adaptive is None else (), full_batch_kwargs,
                                fractional=adaptive is not None)
    gtol = _check_stop_args(gtol, step_floor, val_data, val_metric, restore_best, checkpoint,
                            trainable, optimizer)
    if optimizer is None:
        # The adaptive mode takes few steps on a short budget, too few for step
        # sizes to grow far from torch's Δ0 of 0.01: it starts from
        # rprop.minimize's, Riedmiller and Braun's 0.1 (docs/benchmarks.md).
        optimizer = (Rprop(trainable, variant=variant or "irprop+") if adaptive is None
                     else Rprop(trainable, lr=DEFAULT_LR, variant=variant or "irprop+"))
    closure_step = _check_optimizer(optimizer, model)
    if adaptive is not None:
        if target_loss is not None or patience is not None:
            raise ValueError("target_loss and patience need full-data losses; batching="
                             "'adaptive' records mini-batch losses: use batching='full'")
        if gtol is not None or val_data is not None or val_metric is not None:
            raise ValueError("gtol, val_data and val_metric are batching='full' options (they "
                             "read the full-batch gradient and loss)")
        return fit_adaptive(model, loss_fn, data, optimizer, options=adaptive,
                            max_epochs=max_epochs, callbacks=list(callbacks), progress=progress,
                            checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                            variant=variant, full_batch_kwargs=full_batch_kwargs,
                            process_group=process_group)
    epochs = int(max_epochs)  # checked: an int in full-batch mode
    callbacks = list(callbacks)
    group = _group(process_group)
    rank = _rank(group)
    device = local_tensor(trainable[0]).device
    any_callbacks = bool(callbacks)
    if group is not None:
        any_callbacks, = check_ranks_agree(
            "fit", {**_what_fit_does(optimizer, trainable, epochs, target_loss, patience,
                                     min_improvement, checkpoint, checkpoint_every,
                                     full_batch_kwargs),
                    "gtol": gtol, "step_floor": bool(step_floor),
                    "validation": ("val_data" if val_data is not None else "val_metric"
                                   if val_metric is not None else None),
                    "restore_best": bool(restore_best)}, group, device, any_of=[any_callbacks])
    kwargs = dict(full_batch_kwargs or {})
    validation = None if val_data is None and val_metric is None else _Validation(
        model, loss_fn, val_data, val_metric, process_group, kwargs)
    best = _Best(model, optimizer) if validation is not None and restore_best else None
    convergence = _Convergence(optimizer, trainable, gtol, step_floor)
    history = FitHistory()
    start = 0
    path = None if checkpoint is None else checkpoint_path(checkpoint)
    if path is not None and exists_everywhere(path, group, device):
        start, saved = load_checkpoint(path, model, optimizer, group, variant)
        history = FitHistory.from_state_dict(saved, start)
        history.resumed_from = start
        if best is not None and isinstance(saved.get("best"), dict):
            best.resume(saved["best"])
    history.step_min = convergence.step_mins
    if validation is not None:
        # A run resumed from a checkpoint written without validation has no
        # validation values for its first epochs: NaN, never a best.
        history.val_loss += [math.nan] * (start - len(history.val_loss))
    offset = history.time[-1] if history.time else 0.0
    plateau = _Plateau(min_improvement, _unless_nan(
        history.val_loss if validation is not None else history.loss))
    steps_with_loss = _takes_loss(optimizer)
    bar = progress_bar(progress and rank == 0, epochs, start)
    began = time.perf_counter()
    completed = start
    reason, message = "max_epochs", f"max_epochs = {epochs} reached"
    # With a checkpoint to write, SIGINT and SIGTERM finish the epoch and
    # save it before stopping (every rank after the same epoch).
    interrupted = DeferredInterrupt(enabled=path is not None)

    def save() -> None:
        assert path is not None
        save_checkpoint(path, model, optimizer, _saved(history, best), completed, group, rank)

    try:
        for epoch in range(start, epochs):
            # Before the training pass, which leaves the gradient the step uses.
            val = None if validation is None else validation.evaluate()
            batches = data() if callable(data) else data
            loss_t = full_batch_backward(model, loss_fn, batches, process_group=process_group,
                                         **kwargs)
            loss = float(loss_t)
            history.loss.append(loss)
            measured = convergence.measure(group, device, val, reduce_val=val_metric is not None)
            if validation is not None:
                val = measured.val
                history.val_loss.append(val)
                plateau.add(val if math.isfinite(val) else math.inf)
                if best is not None and plateau.since == 0 and math.isfinite(val):
                    best.keep(epoch)
            else:
                plateau.add(loss)
            stop = _stop_rule(epoch, loss, target_loss, patience, plateau, measured, gtol,
                              validation is not None, min_improvement)
            if any_callbacks:  # on every rank if on any: the all-reduce below pairs up
                info = EpochInfo(epoch, loss, history, model, optimizer)
                wants = any([bool(cb(info)) for cb in callbacks])
                if _any_rank(wants, group, device) and stop is None:
                    stop = ("callback", f"a callback asked to stop at epoch {epoch}")
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
            stats, per_group = _step_size_stats(optimizer)
            history.time.append(offset + time.perf_counter() - began)
            history.step_size.append(stats)
            history.step_size_groups.append(per_group)
            if bar is not None:
                bar.set_postfix_str(_postfix(loss, stats), refresh=False)
                bar.update(1)
            if stop is not None:
                reason, message = stop
                break
            stopping = interrupted.agreed(group, device)
            if path is not None and (completed % checkpoint_every == 0 or stopping):
                save()
            if stopping:
                interrupted.reraise()
        history.stop_reason, history.message = reason, message
        if best is not None and best.epoch is not None:
            # The checkpoint below then holds the restored state: a resumed
            # run continues from the best epoch.
            best.restore()
            history.best_epoch = completed = best.epoch
            history.message += f"; restored the parameters of epoch {best.epoch}"
        interrupted.end_run(None if path is None else save, group, device)
    finally:
        interrupted.restore()
        if bar is not None:
            bar.close()
    return history


# -- arguments and rules ----------------------------------------------------------


def _check_fit_args(
    model: Any, loss_fn: Any, optimizer: Any, variant: str | None, max_epochs: float,
    target_loss: float | None, patience: int | None, min_improvement: float, callbacks: Any,
    checkpoint_every: int, data: Any, full_batch_kwargs: Any, fractional: bool = False,
) -> list[Tensor]:
    """Check every argument before the first epoch; return the trainable
    parameters. ``fractional``: ``max_epochs`` counts epoch-equivalents
    (batching="adaptive"), so any number >= 0."""
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
        get_variant(variant)
    if fractional:  # epoch-equivalents (examples / N): a budget under one pass is one
        if (isinstance(max_epochs, bool) or not isinstance(max_epochs, numbers.Real)
                or not math.isfinite(max_epochs) or max_epochs < 0):
            raise ValueError(f"max_epochs must be a finite number >= 0 (epoch-equivalents) "
                             f"with batching='adaptive', got {max_epochs!r}")
    integers: list[tuple[str, Any, int]] = [("checkpoint_every", checkpoint_every, 1)]
    if not fractional:
        integers.append(("max_epochs", max_epochs, 0))
    for name, value, low in integers:
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


# -- convergence and validation ----------------------------------------------------


def _check_stop_args(gtol: Any, step_floor: Any, val_data: Any, val_metric: Any,
                     restore_best: Any, checkpoint: Any, trainable: list[Tensor],
                     optimizer: Any) -> float | None:
    """Check the convergence and validation options; return ``gtol`` as a float."""
    if gtol is not None:
        gtol = tolerance("gtol", gtol)
    for name, flag in (("step_floor", step_floor), ("restore_best", restore_best)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if val_data is not None and val_metric is not None:
        raise ValueError("pass val_data (validated with loss_fn) or val_metric "
                         "(val_metric(model) -> number), not both")
    if val_metric is not None and not callable(val_metric):
        raise TypeError(f"val_metric must be a function val_metric(model) -> number, got "
                        f"{type(val_metric).__name__}")
    if val_data is not None:
        if isinstance(val_data, Iterator):
            raise TypeError("val_data is an iterator (e.g. a generator), which the first epoch "
                            "would exhaust; pass a list or a DataLoader, or a function that "
                            "returns a fresh iterable")
        if not (callable(val_data) or isinstance(val_data, Iterable)):
            raise TypeError(f"val_data must be an iterable of batches or a function returning "
                            f"one, got {type(val_data).__name__}")
    validating = val_data is not None or val_metric is not None
    if validating and restore_best and checkpoint is not None and (
            is_zero(optimizer) or any(local_tensor(p) is not p for p in trainable)):
        raise ValueError("restore_best with a checkpoint keeps the best state in the checkpoint, "
                         "which fit writes for a plain or DDP model only (not FSDP2 or ZeRO "
                         "shards); pass restore_best=False or checkpoint=None")
    return gtol


class _Validation:
    """The validation value at the current parameters, once per epoch."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, val_data: Any, val_metric: Any,
                 process_group: Any, kwargs: dict[str, Any]) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.val_data = val_data
        self.val_metric = val_metric
        self.process_group = process_group
        self.kwargs = kwargs

    def evaluate(self) -> float:
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            if self.val_metric is not None:
                with torch.no_grad():
                    return _metric_value(self.val_metric(self.model))
            data = self.val_data() if callable(self.val_data) else self.val_data
            return float(full_batch_backward(self.model, self.loss_fn, data,
                                             process_group=self.process_group, **self.kwargs))
        finally:
            for m, mode in modes:
                m.training = mode


def _metric_value(value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"val_metric must return a real number or a one-element tensor, "
                            f"got a tensor of shape {tuple(value.shape)} and dtype {value.dtype}")
        return float(value.detach().reshape(()))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"val_metric must return a real number or a one-element tensor, got "
                        f"{type(value).__name__}")
    return float(value)


class _Best:
    """Copies of the model's ``state_dict`` and the optimizer's state at the
    epoch with the best validation value (taken before that epoch's step)."""

    def __init__(self, model: nn.Module, optimizer: Any) -> None:
        self.model = model
        # A ZeroRedundancyOptimizer's own state_dict needs a collective; its
        # local optimizer holds this rank's state.
        self.optimizer = optimizer.optim if is_zero(optimizer) else optimizer
        self.epoch: int | None = None
        self.model_state: dict[str, Any] = {}
        self.optimizer_state: dict[str, Any] = {}

    def keep(self, epoch: int) -> None:
        self.epoch = epoch
        self.model_state = _cloned(self.model.state_dict())
        self.optimizer_state = _cloned(self.optimizer.state_dict())

    def restore(self) -> None:
        self.optimizer.load_state_dict(self.optimizer_state)
        self.model.load_state_dict(self.model_state)

    def saved(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "model": self.model_state,
                "optimizer": self.optimizer_state}

    def resume(self, saved: dict[str, Any]) -> None:
        """From a checkpoint (checked against the model and optimizer when it loaded)."""
        self.epoch = int(saved["epoch"])
        self.model_state = saved["model"]
        self.optimizer_state = saved["optimizer"]


def _cloned(obj: Any) -> Any:
    """``obj`` with every tensor in it copied (a state_dict holds the live ones)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _cloned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cloned(v) for v in obj)
    return obj


def _saved(history: FitHistory, best: _Best | None) -> dict[str, Any]:
    """The history a checkpoint holds, with the best state when there is one."""
    state = history.state_dict()
    if best is not None and best.epoch is not None:
        state["best"] = best.saved()
    return state


@dataclass(frozen=True)
class _Measured:
    """What the convergence stops read at an epoch (the same on every rank)."""

    gmax: float  # the largest |gradient component| (nan when not measured)
    at_floor: bool  # every moving element's step size <= its group's step_min
    moving_step: float | None  # the largest step size of a moving element
    floor: float  # the largest step_min, as the step sizes' dtype holds it
    val: float  # the validation value (nan without validation)


class _Convergence:
    """The largest gradient component and whether every moving step size is
    at its floor, from ``.grad`` and the optimizer's state: per-tensor
    reductions on the device, one host synchronisation (and, under
    ``torch.distributed``, one small all-reduce that also carries a
    ``val_metric`` value) per epoch."""

    def __init__(self, optimizer: Any, trainable: list[Tensor], gtol: float | None,
                 step_floor: bool) -> None:
        self.inner = optimizer.optim if is_zero(optimizer) else optimizer
        self.trainable = trainable
        self.gtol = gtol
        groups = self.inner.param_groups
        self.has_floor = all("step_sizes" in g for g in groups)
        self.step_mins = [float(g["step_sizes"][0]) for g in groups] if self.has_floor else []
        self.floor_rule = step_floor and self.has_floor
        self._held: dict[tuple[float, torch.dtype], float] = {}

    def measure(self, group: Any, device: torch.device, val: float | None,
                reduce_val: bool = False) -> _Measured:
        """What the rules read at the current parameters; ``reduce_val``: the
        ranks' validation values may differ (a ``val_metric``), take the largest."""
        if val is None:
            val = math.nan
        if self.gtol is None and not self.floor_rule and not (group is not None and reduce_val):
            return _Measured(math.nan, False, None, math.nan, val)
        floor = -math.inf
        with torch.no_grad():
            rows = [self._gmax(device)]
            if self.floor_rule:
                above, moving, step, floor = self._floor(device)
                rows += [above, moving, step]
            else:
                rows += [torch.ones((), dtype=torch.float64, device=device)] * 3
            rows.append(torch.tensor(val, dtype=torch.float64, device=device))
            t = torch.stack(rows)
            if group is not None:
                # NaN (a NaN gradient, a non-finite validation value) as +inf:
                # the same on every rank after MAX, and never a stop or a best.
                t = torch.where(torch.isnan(t), math.inf, t)
                t = torch.cat([t, torch.tensor([floor], dtype=torch.float64, device=device)])
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
                values = t.tolist()
                floor = values.pop()
            else:
                values = t.tolist()
        gmax, above_v, moving_v, step_v, v = values
        return _Measured(gmax=gmax, at_floor=self.floor_rule and above_v <= 0,
                         moving_step=step_v if moving_v > 0 else None, floor=floor, val=v)

    def _gmax(self, device: torch.device) -> Tensor:
        if self.gtol is None and not self.floor_rule:  # the floor's message reports it
            return torch.tensor(math.nan, dtype=torch.float64, device=device)
        # This rank's shards (an FSDP2 shard may be empty).
        grads = [local_tensor(p.grad) for p in self.trainable if p.grad is not None]
        found = [_real(g).abs().amax().to(device, torch.float64) for g in grads if g.numel()]
        if not found:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(found).amax()

    def _floor(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, float]:
        """Whether any moving element is above its floor, whether any element
        moves, the largest moving step size (device scalars, this rank's
        elements), and the largest floor as the step sizes' dtype holds it."""
        above, moving, step = [], [], []
        floor_held = -math.inf
        for g in self.inner.param_groups:
            floor, decay = g["step_sizes"][0], g.get("weight_decay", 0) or 0
            for p in g["params"]:
                if p.grad is None:
                    continue  # a zero gradient: the element does not move
                grad = _real(local_tensor(p.grad))
                if not grad.numel():
                    continue  # an empty FSDP2 shard
                if decay:
                    grad = grad + decay * _real(local_tensor(p.detach()))
                state = self.inner.state.get(p)
                s = state.get("step_size") if isinstance(state, dict) else None
                if not isinstance(s, Tensor):  # no step yet: not at the floor
                    move = (grad != 0).any()
                    moving.append(move)
                    above.append(move)
                    continue
                s = _real(local_tensor(s))
                # The largest step size of a moving element (-inf: none), in
                # the step sizes' dtype, where the clamp to step_min happened.
                top = torch.where(grad != 0, s, -math.inf).amax()
                moving.append(top > -math.inf)
                above.append(top > floor)
                step.append(top)
                held = self._held.get((floor, s.dtype))
                if held is None:
                    held = self._held[(floor, s.dtype)] = float(torch.tensor(floor, dtype=s.dtype))
                floor_held = max(floor_held, held)
        return (_any(above, device), _any(moving, device), _largest(step, device), floor_held)


def _any(flags: list[Tensor], device: torch.device) -> Tensor:
    if not flags:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([f.to(device) for f in flags]).any().to(torch.float64)


def _largest(values: list[Tensor], device: torch.device) -> Tensor:
    if not values:
        return torch.tensor(-math.inf, dtype=torch.float64, device=device)
    return torch.stack([v.to(device, torch.float64) for v in values]).amax()


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _stop_rule(epoch: int, loss: float, target: float | None, patience: int | None,
               plateau: _Plateau, measured: _Measured, gtol: float | None, validating: bool,
               min_improvement: float) -> tuple[str, str] | None:
    """Why to stop before stepping from ``loss`` (the watched value already
    added to ``plateau``), as ``(rule, message)``, or None."""
    if not math.isfinite(loss):
        return "nonfinite", f"the loss is {loss} at epoch {epoch}"
    if target is not None and loss <= target:
        return "target_loss", f"the loss, {loss:.6g}, is <= target_loss = {target:g}"
    if gtol is not None:
        detail = gtol_reached(measured.gmax, gtol, what="gradient")
        if detail is not None:
            return "gtol", detail
    if measured.at_floor:
        if measured.moving_step is None:
            return "step_floor", "no element has a nonzero gradient: no Rprop step moves any"
        detail = step_floor_reached(measured.moving_step, measured.floor, measured.gmax,
                                    gtol=gtol, floor_name="step_min", what="gradient",
                                    element="element")
        if detail is not None:
            return "step_floor", detail
    if patience is not None and plateau.epochs > patience and plateau.since >= patience:
        watched = "validation metric" if validating else "loss"
        return "patience", (f"the {watched} has not improved on its best, {plateau.best:.6g}, "
                            f"by more than min_improvement = {min_improvement:g} (relative) "
                            f"for {patience} epochs")
    return None


def _unless_nan(values: Iterable[float]) -> list[float]:
    """``values`` with NaN as inf: never an improvement (NaN would stick as the best)."""
    return [math.inf if math.isnan(v) else v for v in values]


def _takes_loss(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optim", None) if is_zero(optimizer) else optimizer
    return isinstance(inner, Rprop)


# -- progress ----------------------------------------------------------------------


def _postfix(loss: float, stats: tuple[float, float, float] | None) -> str:
    text = f"loss={loss:.6g}"
    if stats is not None:
        text += f" step=[{stats[0]:.2g} {stats[1]:.2g} {stats[2]:.2g}]"
    return text


def _step_size_stats(optimizer: Any) -> tuple[Stats | None, list[Stats | None]]:
    """(min, median, max) of this rank's step sizes, overall and per
    parameter group (see :func:`step_size_summary`). One host
    synchronisation."""
    inner = optimizer.optim if is_zero(optimizer) else optimizer
    overall = step_size_summary(_step_sizes(inner.state.values()))
    groups = inner.param_groups
    if len(groups) == 1:
        per_group = [overall]
    else:
        per_group = [step_size_summary(_step_sizes(inner.state.get(p) for p in g["params"]))
                     for g in groups]
    present = [t for t in [overall, *per_group] if t is not None]
    if not present:
        return None, [None] * len(per_group)
    home = present[0].device
    values = iter(torch.stack([t.to(home) for t in present]).tolist())
    out: list[Stats | None] = []
    for t in [overall, *per_group]:
        v = None if t is None else next(values)
        out.append(None if v is None else (v[0], v[1], v[2]))
    return out[0], out[1:]


def _step_sizes(states: Iterable[Any]) -> list[Tensor]:
    found = []
    for state in states:
        s = state.get("step_size") if isinstance(state, dict) else None
        if isinstance(s, Tensor):
            found.append(s)
    return found


# -- torch.distributed ---------------------------------------------------------------


def _group(process_group: Any) -> Any:
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD if process_group is None else process_group
    return None


def _rank(group: Any) -> int:
    return 0 if group is None else dist.get_rank(group)


def _any_rank(flag: bool, group: Any, device: torch.device) -> bool:
    if group is None:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
