"""``fit``: the full-batch training loop, with stopping rules, a progress bar
and atomic, exactly resumable checkpoints. See ``docs/full_batch.md``."""

from __future__ import annotations

import math
import numbers
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rprop.torch._dispatch import local_tensor
from rprop.torch._full_batch import LossFn, full_batch_backward

__all__ = ["EpochInfo", "FitHistory", "fit"]

STOP_REASONS = ("max_epochs", "target_loss", "patience", "callback", "nonfinite")
_FORMAT = "rprop.fit/1"
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
) -> FitHistory:
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
        optimizer: defaults to ``rprop.Rprop(trainable params,
            variant=variant or "irprop+")``. ``rprop.Rprop`` (also inside a
            ``ZeroRedundancyOptimizer``) gets the loss with
            ``step(loss=...)``; any other optimizer is stepped with
            ``step()``.
        variant: the variant of the default optimizer (not with ``optimizer``).
        max_epochs: at most this many epochs (evaluations, each followed by a step).
        target_loss: stop, before stepping, once the loss is ``<= target_loss``.
        patience: stop, before stepping, when the loss has not improved on the
            best so far by more than ``min_improvement`` (relative:
            ``loss < best - min_improvement * |best|``) for ``patience`` epochs.
        min_improvement: see ``patience``.
        callbacks: ``callback(info: EpochInfo)`` after each evaluation; a true
            return value stops training (under ``torch.distributed``, any
            rank's stop stops all ranks).
        progress: a tqdm bar on rank 0 with the epoch, the loss and the
            (min/median/max) step sizes. Statistics are over rank 0's local
            state (its shard under FSDP2 or ZeRO); the median is that of an
            evenly strided sample of at most ~8k step sizes (exact below).
        checkpoint: a file path. If it exists, training resumes from it
            (model, optimizer, history; the CPU and CUDA random generators in a
            single process), and the resumed run is bitwise the uninterrupted
            one. Saved every ``checkpoint_every`` epochs and at the end,
            atomically: a temporary file in the same directory, fsync, then
            ``os.replace``; a crash leaves the previous checkpoint intact.
            Under ``torch.distributed`` rank 0 writes (DTensor state is
            gathered, ZeRO state consolidated) and all ranks read, so the
            path must be visible to every rank. Checked before the first
            epoch: its folder must exist and be writable. Resuming restores
            the saved hyperparameters; a ``variant`` that differs from the
            checkpoint's raises a ValueError.
            In one process, a first Ctrl-C finishes the epoch and saves it
            before raising KeyboardInterrupt; a second stops at once.
        checkpoint_every: epochs between checkpoints.
        process_group: the data-parallel group (default: the world).
        full_batch_kwargs: more keyword arguments for :func:`full_batch_backward`.

    Returns:
        A :class:`FitHistory`. An epoch that stops training takes no step, so
        the model is left at the parameters of the last loss recorded, except
        after ``max_epochs`` (the last epoch's step is taken).
    """
    _check_fit_args(optimizer, variant, max_epochs, target_loss, patience, min_improvement,
                    checkpoint_every, data)
    if optimizer is None:
        from rprop.torch._optimizer import Rprop

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = Rprop(trainable, variant=variant or "irprop+")
    group = _group(process_group)
    rank = _rank(group)
    device = local_tensor(next(iter(model.parameters()))).device
    history = FitHistory()
    start = 0
    path = None if checkpoint is None else _checkpoint_path(checkpoint)
    if path is not None and _exists_everywhere(path, group, device):
        start, history = _load(path, model, optimizer, group, variant)
    offset = history.time[-1] if history.time else 0.0
    steps_with_loss = _takes_loss(optimizer)
    kwargs = dict(full_batch_kwargs or {})
    bar = _progress_bar(progress and rank == 0, max_epochs, start)
    began = time.perf_counter()
    completed = start
    reason = "max_epochs"
    # With a checkpoint to write, in one process, Ctrl-C finishes the epoch
    # and saves it before stopping.
    interrupted = _DeferredInterrupt(enabled=path is not None and group is None)
    try:
        for epoch in range(start, max_epochs):
            batches = data() if callable(data) else data
            loss_t = full_batch_backward(model, loss_fn, batches, process_group=process_group,
                                         **kwargs)
            loss = float(loss_t)
            history.loss.append(loss)
            stop = _stop_rule(history.loss, target_loss, patience, min_improvement)
            if callbacks:
                info = EpochInfo(epoch, loss, history, model, optimizer)
                wants = any([bool(cb(info)) for cb in callbacks])
                if _any_rank(wants, group, device) and stop is None:
                    stop = "callback"
            if stop is None:
                if steps_with_loss:
                    optimizer.step(loss=loss_t)
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
            if path is not None and (completed % checkpoint_every == 0 or interrupted()):
                _save(path, model, optimizer, history, completed, group, rank)
            if interrupted():
                raise KeyboardInterrupt
        history.stop_reason = reason
        if path is not None:
            _save(path, model, optimizer, history, completed, group, rank)
        if interrupted():  # pressed during the last epoch: saved, but still an interrupt
            raise KeyboardInterrupt
    finally:
        interrupted.restore()
        if bar is not None:
            bar.close()
    return history


# -- arguments and rules ----------------------------------------------------------


class _DeferredInterrupt:
    """Calling it says whether Ctrl-C was pressed since it was made.

    When ``enabled`` (in the main thread, with Python's own SIGINT handler or
    an enclosing ``fit``'s installed), the first Ctrl-C only sets a flag: the
    epoch loop finishes the epoch, saves the checkpoint and raises
    KeyboardInterrupt, so no finished epoch is lost. The handler then steps
    aside, so a second Ctrl-C interrupts at once. Not used under
    torch.distributed: ranks would see the signal at different epochs and wait
    for each other's collectives. A handler someone else installs meanwhile
    is left in place.
    """

    def __init__(self, enabled: bool) -> None:
        self.pressed = False
        self.pid = os.getpid()
        self.previous = signal.getsignal(signal.SIGINT)
        self.installed = (
            enabled and threading.current_thread() is threading.main_thread()
            and (self.previous is signal.default_int_handler
                 or isinstance(getattr(self.previous, "__self__", None), _DeferredInterrupt)))
        if self.installed:
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if os.getpid() == self.pid:  # not again from each forked DataLoader worker
            print("\nrprop.torch.fit: interrupted; finishing this epoch and saving the "
                  "checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.pressed

    def restore(self) -> None:
        if not self.installed:
            return
        self.installed = False
        current = signal.getsignal(signal.SIGINT)
        if current == self._handler or current is signal.default_int_handler:
            signal.signal(signal.SIGINT, self.previous)


def _check_fit_args(
    optimizer: Any, variant: str | None, max_epochs: int, target_loss: float | None,
    patience: int | None, min_improvement: float, checkpoint_every: int, data: Any,
) -> None:
    if optimizer is not None and variant is not None:
        raise ValueError("pass variant= only without optimizer= (it picks the default "
                         "optimizer's variant)")
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


def _checkpoint_path(checkpoint: Any) -> Path:
    """``checkpoint`` as a Path, checked before the first epoch: a folder that
    is missing or not writable would otherwise fail at the first save, after
    ``checkpoint_every`` epochs of work."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path or None, got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint must be a file path, got the folder {path}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"checkpoint {path}: the folder {folder} does not exist")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ValueError(f"checkpoint {path}: cannot write in {folder} ({err.strerror})") from None
    return path


def _stop_rule(losses: list[float], target: float | None, patience: int | None,
               min_improvement: float) -> str | None:
    loss = losses[-1]
    if not math.isfinite(loss):
        return "nonfinite"
    if target is not None and loss <= target:
        return "target_loss"
    if patience is not None and len(losses) > patience:
        best = math.inf
        since = 0
        for value in losses:
            if value < best - min_improvement * abs(best) or best == math.inf:
                best, since = value, 0
            else:
                since += 1
        if since >= patience:
            return "patience"
    return None


def _takes_loss(optimizer: Any) -> bool:
    from rprop.torch._optimizer import Rprop

    inner = getattr(optimizer, "optim", None) if _is_zero(optimizer) else optimizer
    return isinstance(inner, Rprop)


def _is_zero(optimizer: Any) -> bool:
    # Not imported unless the user made one (importing it warns, via torch.jit).
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


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
    inner = optimizer.optim if _is_zero(optimizer) else optimizer
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


def _exists_everywhere(path: Path, group: Any, device: torch.device) -> bool:
    exists = path.exists()
    if group is None:
        return exists
    import torch.distributed as dist

    t = torch.tensor([int(exists), -int(exists)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"checkpoint {path} exists on some ranks only; it must be on a "
                           "file system every rank sees")
    return exists


def _is_dtensor(t: Any) -> bool:
    return isinstance(t, Tensor) and local_tensor(t) is not t


# -- checkpoints ---------------------------------------------------------------------


def _save(path: Path, model: nn.Module, optimizer: Any, history: FitHistory, epoch: int,
          group: Any, rank: int) -> None:
    """Gather (collectives on every rank), then rank 0 writes atomically."""
    model_state = _gathered(model.state_dict())
    if _is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)
        optim_state = optimizer.state_dict() if rank == 0 else None
    else:
        optim_state = optimizer.state_dict()
        optim_state = {**optim_state, "state": {
            k: _gathered(v) for k, v in optim_state["state"].items()}}
    if rank == 0:
        _write(path, model_state, optim_state, history, epoch, group)
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)  # the file is complete for every rank from here on


def _write(path: Path, model_state: dict[str, Any], optim_state: Any, history: FitHistory,
           epoch: int, group: Any) -> None:
    payload = {
        "format": _FORMAT, "epoch": epoch, "model": model_state, "optimizer": optim_state,
        "history": history.state_dict(),
    }
    if group is None:
        payload["rng"] = {"cpu": torch.get_rng_state(),
                          "cuda": torch.cuda.get_rng_state_all()
                          if torch.cuda.is_available() else []}
    atomic_save(payload, path)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, ``os.replace``.

    Readers see the old file or the new one, never a partial one; a failure
    (or a crash) leaves the old file and removes the temporary one.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode a plain
        # torch.save would, following the umask.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def _gathered(state: dict[str, Any]) -> dict[str, Any]:
    """Copy of a state dict with every DTensor replaced by its full tensor (on CPU)."""
    out = {}
    for key, value in state.items():
        if _is_dtensor(value):
            value = value.full_tensor().cpu()
        out[key] = value
    return out


def _load(path: Path, model: nn.Module, optimizer: Any, group: Any,
          variant: str | None = None) -> tuple[int, FitHistory]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by rprop.torch.fit")
    if variant is not None:
        # Resuming restores the saved hyperparameters (load_state_dict, as in
        # torch); a variant asked for explicitly that differs is a mistake to
        # report, not to override silently.
        from rprop import get_variant

        wanted = get_variant(variant).name
        # A group without "variant" was saved by torch.optim.Rprop: iRprop-.
        saved_variants = {g.get("variant", "irprop-")
                          for g in payload["optimizer"]["param_groups"]}
        if saved_variants != {wanted}:
            raise ValueError(
                f"checkpoint {path} was written with variant "
                f"{', '.join(sorted(map(str, saved_variants)))}, and this call asks for "
                f"{wanted!r}; resume with that variant, or use a new checkpoint path")
    model.load_state_dict(_sharded_like(payload["model"], model.state_dict()))
    saved = payload["optimizer"]
    if not _is_zero(optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        saved = {**saved, "state": {
            k: {n: _shard_like_param(v, params[int(k)]) for n, v in entry.items()}
            for k, entry in saved["state"].items()}}
    optimizer.load_state_dict(saved)
    epoch = int(payload["epoch"])
    if group is None and "rng" in payload:
        torch.set_rng_state(payload["rng"]["cpu"])
        if payload["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    history = FitHistory.from_state_dict(payload["history"], epoch)
    history.resumed_from = epoch
    return epoch, history


def _sharded_like(full: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    return {k: _distribute_like(v, current[k]) if k in current and _is_dtensor(current[k])
            else v for k, v in full.items()}


def _shard_like_param(value: Any, param: Tensor) -> Any:
    if _is_dtensor(param) and isinstance(value, Tensor) and value.shape == param.shape:
        return _distribute_like(value, param)
    return value


def _distribute_like(full: Tensor, like: Any) -> Any:
    """This rank's shard of ``full``, laid out like the DTensor ``like``; no
    communication (every rank read the whole tensor)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements,
                             src_data_rank=None)
