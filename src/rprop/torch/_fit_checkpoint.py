"""The checkpoint file of ``fit``: written atomically and sealed with a
digest of its content; resumed transactionally (the whole file is checked
against the model, the optimizer and the RNG before any of them changes).
See ``docs/full_batch.md``, section ``fit``.

The file is the zip archive ``torch.save`` writes, so ``torch.load`` reads
it as before; its zip comment (the last bytes of the file) holds the sha256
of the archive as written with an empty comment. torch's zip reader does not
check the CRC32s it writes, so without the digest a flipped bit in a weight
would load silently.
"""

from __future__ import annotations

import errno
import hashlib
import io
import math
import numbers
import os
import re
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rprop._variants import get_variant
from rprop.torch._checkpoint import prepare_state_dict
from rprop.torch._compat import local_tensor
from rprop.torch._optimizer import Rprop

__all__ = ["ADAPTIVE_KEY", "atomic_save", "checkpoint_path", "exists_everywhere", "is_zero",
           "load_checkpoint", "read_verified", "save_checkpoint"]

FORMAT = "rprop.fit/2"
KEYS = ("format", "epoch", "model", "optimizer", "optimizer_class", "history")
# Where fit(batching="adaptive") keeps its own state in the saved history.
ADAPTIVE_KEY = "adaptive"
# The zip end-of-central-directory record: signature, 16 bytes of fields,
# then the comment's length (2 bytes, little-endian) and the comment.
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_TAG = b"rprop sha256="
_COMMENT_SIZE = len(_TAG) + 64
# torch.optim.Rprop's states load into rprop.Rprop (as iRprop-) by design.
_COMPATIBLE = {("torch.optim.rprop.Rprop", "rprop.Rprop")}


# -- the path ------------------------------------------------------------------------


def checkpoint_path(checkpoint: Any) -> Path:
    """``checkpoint`` as a Path, checked before the first epoch: a folder that
    is missing or not writable would otherwise fail at the first save, after
    ``checkpoint_every`` epochs of work. A symbolic link is written through
    (the file it points to is replaced, the link stays), so its target's
    folder is the one checked."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path or None, got {type(checkpoint).__name__}")
    path = Path(checkpoint)
    if path.is_dir():
        raise ValueError(f"checkpoint must be a file path, got the folder {path}")
    target = _target(path)
    folder = target.parent
    if not folder.is_dir():
        where = f" (the link's target {target})" if target != path.absolute() else ""
        raise ValueError(f"checkpoint {path}: the folder {folder}{where} does not exist")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ValueError(f"checkpoint {path}: cannot write in {folder} ({err.strerror})") from None
    return path


def _target(path: Path) -> Path:
    """The file ``path`` names once every symbolic link is followed."""
    return Path(os.path.realpath(path))


def exists_everywhere(path: Path, group: Any, device: torch.device) -> bool:
    exists = path.exists()
    if group is None:
        return exists
    t = torch.tensor([int(exists), -int(exists)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != -int(t[1]):
        raise RuntimeError(f"checkpoint {path} exists on some ranks only; it must be on a "
                           "file system every rank sees")
    return exists


# -- writing -------------------------------------------------------------------------


def save_checkpoint(path: Path, model: nn.Module, optimizer: Any, history: dict[str, Any],
                    epoch: int, group: Any, rank: int) -> None:
    """Gather (collectives on every rank), then rank 0 writes atomically."""
    model_state = _gathered(model.state_dict())
    if is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)
        optim_state = optimizer.state_dict() if rank == 0 else None
    else:
        optim_state = optimizer.state_dict()
        optim_state = {**optim_state, "state": {
            k: _gathered(v) for k, v in optim_state["state"].items()}}
    if rank == 0:
        payload = {
            "format": FORMAT, "epoch": epoch, "model": model_state, "optimizer": optim_state,
            "optimizer_class": _optimizer_class(optimizer), "history": history,
        }
        if group is None:
            payload["rng"] = {"cpu": torch.get_rng_state(),
                              "cuda": torch.cuda.get_rng_state_all()
                              if torch.cuda.is_available() else []}
        atomic_save(payload, path)
    if group is not None:
        dist.barrier(group=group)  # the file is complete for every rank from here on


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` ``obj``, sealed with its sha256, to a temporary file
    beside ``path``; fsync; ``os.replace``; fsync the folder.

    Readers see the old file or the new one, never a partial one; a failure
    (or a crash) leaves the old file, and removes the temporary one (a kill
    leaves it; the next save or resume removes it). A symbolic link is
    written through: the file it points to is replaced, the link stays.
    The archive is built in memory first, so a full disk surfaces as one
    ``OSError(ENOSPC)`` naming the path, not as an error from inside the
    zip writer.
    """
    path = Path(path)
    target = _target(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = _seal(buffer.getbuffer())
    remove_stale_temporaries(target)
    folder = target.parent
    tmp = None
    try:
        # The writer's pid is in the name: a later save removes the file
        # once that process is gone, and only then.
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.{os.getpid()}.",
                                   suffix=".tmp")
        try:
            # mkstemp makes the file private (0600); give it the mode a plain
            # torch.save would, following the umask.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as err:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, f"no space left on the device to write checkpoint {path} "
                          f"({len(data)} bytes, {_free_bytes(folder)} bytes free in {folder}); "
                          "the previous checkpoint, if any, is intact") from err
        raise
    _fsync_folder(folder)


def _seal(archive: memoryview) -> bytes:
    """The zip ``archive`` with its sha256 as its comment."""
    if bytes(archive[-_EOCD_SIZE:-_EOCD_SIZE + 4]) != _EOCD or bytes(archive[-2:]) != b"\0\0":
        raise RuntimeError("torch.save did not write a zip archive without a comment; "
                           "the checkpoint cannot be sealed with its digest")
    digest = hashlib.sha256(archive).hexdigest().encode("ascii")
    return b"".join((archive[:-2], struct.pack("<H", _COMMENT_SIZE), _TAG, digest))


def _free_bytes(folder: Path) -> int | str:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # pragma: no cover - platforms without statvfs
        return "?"
    return stats.f_bavail * stats.f_frsize


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporary files of ``target`` whose writer is no longer
    running (on this machine: one writer per checkpoint path); return them."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[A-Za-z0-9_]+\.tmp")
    removed: list[Path] = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _running(int(match.group(1))):
            continue
        try:
            os.unlink(target.parent / name)
        except FileNotFoundError:
            continue
        removed.append(target.parent / name)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes one file at a time, and cleans up after itself
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True


def _gathered(state: dict[str, Any]) -> dict[str, Any]:
    """Copy of a state dict with every DTensor replaced by its full tensor (on CPU)."""
    out = {}
    for key, value in state.items():
        if _is_dtensor(value):
            value = value.full_tensor().cpu()
        out[key] = value
    return out


def _optimizer_class(optimizer: Any) -> str:
    inner = optimizer.optim if is_zero(optimizer) else optimizer
    name = ("rprop.Rprop" if isinstance(inner, Rprop)
            else f"{type(inner).__module__}.{type(inner).__qualname__}")
    return f"ZeroRedundancyOptimizer({name})" if is_zero(optimizer) else name


# -- reading -------------------------------------------------------------------------


def read_verified(path: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` of a file :func:`atomic_save` wrote,
    after checking its digest: a ValueError naming the file if it is empty,
    not sealed (another file, a truncated one) or damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"checkpoint {path} cannot be read ({err.strerror})") from None
    if not data:
        raise ValueError(f"checkpoint {path} is empty (0 bytes)")
    end = len(data) - _COMMENT_SIZE
    eocd = end - 2 - (_EOCD_SIZE - 2)
    if (eocd < 0 or data[eocd:eocd + 4] != _EOCD
            or data[end - 2:end] != struct.pack("<H", _COMMENT_SIZE)
            or data[end:end + len(_TAG)] != _TAG):
        raise ValueError(
            f"{path} is not a checkpoint written by rprop.torch.fit: it does not end with "
            f"the content digest fit writes ({len(data)} bytes; a truncated file, another "
            "kind of file, or one written by an older rprop)")
    digest = hashlib.sha256()
    digest.update(memoryview(data)[:end - 2])
    digest.update(b"\0\0")
    if digest.hexdigest().encode("ascii") != data[end + len(_TAG):]:
        raise ValueError(
            f"checkpoint {path} is damaged: its content does not match the sha256 written "
            "with it (a changed byte on disk or in a copy); refusing to resume from it")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # digest fine: written by something that is not fit
        raise ValueError(f"checkpoint {path} cannot be loaded with "
                         f"torch.load(weights_only=True): {err}") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: Any, group: Any,
                    variant: str | None = None, mode: str = "full",
                    ) -> tuple[int, dict[str, Any]]:
    """Resume from ``path``: return (epoch, saved history); ``mode`` is the
    fit's ``batching`` (a checkpoint of the other mode is refused).

    Transactional: the whole file is read, verified and checked against the
    model, the optimizer and this process's RNG first; model, optimizer and
    RNG change only once everything is known to load. Under
    ``torch.distributed`` the ranks agree first (one all-reduce), so a
    refusal on one rank is a refusal on all.
    """
    target = _target(path)
    if group is None or dist.get_rank(group) == 0:
        remove_stale_temporaries(target)
    error = None
    try:
        plan = _checked(path, read_verified(path), model, optimizer, group, variant, mode)
    except ValueError as err:
        error, plan = err, None
    if group is not None:
        device = local_tensor(next(iter(model.parameters()))).device
        refused = torch.tensor([int(error is not None)], device=device)
        dist.all_reduce(refused, op=dist.ReduceOp.MAX, group=group)
        if error is None and bool(refused.item()):
            error = ValueError(f"checkpoint {path} was refused on another rank (see its error)")
    if error is not None:
        raise error
    assert plan is not None
    return plan.apply(model, optimizer)


class _Plan:
    """A checkpoint checked against the objects it will be loaded into."""

    def __init__(self, path: Path, epoch: int, model_state: dict[str, Any], optim_state: Any,
                 rng: dict[str, Any] | None, history: dict[str, Any]) -> None:
        self.path = path
        self.epoch = epoch
        self.model_state = model_state
        self.optim_state = optim_state
        self.rng = rng
        self.history = history

    def apply(self, model: nn.Module, optimizer: Any) -> tuple[int, dict[str, Any]]:
        # The optimizer first: torch's load_state_dict checks before it
        # changes anything, and rprop.Rprop's was already run dry; the model
        # and the RNG were checked, so nothing after it can fail.
        try:
            optimizer.load_state_dict(self.optim_state)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            raise ValueError(f"checkpoint {self.path}: the optimizer refused its state: "
                             f"{err}") from None
        model.load_state_dict(self.model_state)
        if self.rng is not None:
            torch.set_rng_state(self.rng["cpu"])
            if self.rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(self.rng["cuda"])
        return self.epoch, self.history


def _checked(path: Path, payload: Any, model: nn.Module, optimizer: Any, group: Any,
             variant: str | None, mode: str = "full") -> _Plan:
    def refuse(what: str) -> ValueError:
        return ValueError(f"checkpoint {path}: {what}")

    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by rprop.torch.fit "
                         f"(format {FORMAT!r})")
    missing = [k for k in KEYS if k not in payload]
    if missing:
        raise refuse(f"lacks the key(s) {missing}")
    epoch = payload["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise refuse(f"'epoch' must be an int >= 0, got {epoch!r}")
    history = _checked_history(payload["history"], epoch, refuse)
    if mode == "full" and ADAPTIVE_KEY in history:
        # Its steps are mini-batch steps, its losses mini-batch losses: not epochs.
        raise refuse("was written by fit(batching='adaptive'); resume it with "
                     "batching='adaptive' and the same batching_kwargs, or use a new "
                     "checkpoint path")
    saved_class, ours = payload["optimizer_class"], _optimizer_class(optimizer)
    if saved_class != ours and (saved_class, ours) not in _COMPATIBLE:
        raise refuse(f"was written with the optimizer {saved_class}, and this call uses "
                     f"{ours}; resume with the same optimizer, or use a new checkpoint path")
    optim_state = payload["optimizer"]
    if (not isinstance(optim_state, dict) or not isinstance(optim_state.get("state"), dict)
            or not isinstance(optim_state.get("param_groups"), list)
            or not all(isinstance(g, dict) for g in optim_state["param_groups"])):
        raise refuse("'optimizer' must be an optimizer state_dict (a dict with a 'state' "
                     "dict and a 'param_groups' list of dicts)")
    if variant is not None:
        # Resuming restores the saved hyperparameters (load_state_dict, as in
        # torch); a variant asked for explicitly that differs is a mistake to
        # report, not to override silently.
        wanted = get_variant(variant).name
        # A group without "variant" was saved by torch.optim.Rprop: iRprop-.
        saved_variants = {g.get("variant", "irprop-") for g in optim_state["param_groups"]}
        if saved_variants != {wanted}:
            raise ValueError(
                f"checkpoint {path} was written with variant "
                f"{', '.join(sorted(map(str, saved_variants)))}, and this call asks for "
                f"{wanted!r}; resume with that variant, or use a new checkpoint path")
    model_state = _checked_model(payload["model"], model.state_dict(), refuse)
    if not is_zero(optimizer):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for k, entry in optim_state["state"].items():
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(params):
                raise refuse(f"the optimizer state has an entry for parameter {k!r}; the "
                             f"optimizer has parameters 0..{len(params) - 1}")
            if not isinstance(entry, dict):
                raise refuse(f"the optimizer state of parameter {k} must be a dict")
            state[k] = {n: _shard_like_param(v, params[k]) for n, v in entry.items()}
        optim_state = {**optim_state, "state": state}
    inner = optimizer.optim if is_zero(optimizer) else optimizer
    if isinstance(inner, Rprop):
        try:
            prepare_state_dict(optimizer, optim_state)  # checks, changes nothing
        except ValueError as err:
            raise refuse(f"its optimizer state does not fit this optimizer: {err}") from None
    _check_best(history.get("best"), epoch, model, optimizer, inner, refuse)
    rng = payload.get("rng") if group is None else None
    if rng is not None:
        _check_rng(rng, refuse)
    return _Plan(path, epoch, model_state, optim_state, rng, history)


def _check_best(best: Any, epoch: int, model: nn.Module, optimizer: Any, inner: Any,
                refuse: Any) -> None:
    """The state of the best validation epoch that ``restore_best`` keeps in
    the history, if any: checked like the current state, so that a resume
    cannot fail later, when it would be restored."""
    if best is None:
        return
    e = best.get("epoch") if isinstance(best, dict) else None
    if (isinstance(e, bool) or not isinstance(e, int) or not 0 <= e <= epoch
            or not isinstance(best.get("optimizer"), dict)):
        raise refuse(f"'history' 'best' must be a dict with an 'epoch' in 0..{epoch}, a 'model' "
                     "and an 'optimizer' state")
    _checked_model(best.get("model"), model.state_dict(), refuse)
    if isinstance(inner, Rprop):
        try:
            prepare_state_dict(optimizer, best["optimizer"])  # checks, changes nothing
        except ValueError as err:
            raise refuse(f"its best epoch's optimizer state does not fit this optimizer: "
                         f"{err}") from None


def _checked_history(saved: Any, epoch: int, refuse: Any) -> dict[str, Any]:
    if not isinstance(saved, dict):
        raise refuse(f"'history' must be a dict, got {type(saved).__name__}")
    for key in ("loss", "time", "step_size"):
        values = saved.get(key)
        if not isinstance(values, list) or len(values) < epoch:
            raise refuse(f"'history' must hold a list {key!r} of at least {epoch} entries "
                         f"(one per epoch)")

    def number(x: Any) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    if not all(number(x) for x in saved["loss"][:epoch] + saved["time"][:epoch]):
        raise refuse("'history' losses and times must be numbers")
    for s in saved["step_size"][:epoch]:
        if s is not None and not (isinstance(s, (list, tuple)) and len(s) == 3
                                  and all(number(x) and not math.isnan(x) for x in s)):
            raise refuse(f"'history' step sizes must be None or (min, median, max), got {s!r}")
    return saved


def _checked_model(saved: Any, current: dict[str, Any], refuse: Any) -> dict[str, Any]:
    """``saved`` checked key by key against the model's own state dict (global
    shapes for DTensors), then laid out like it (this rank's shards)."""
    if not isinstance(saved, dict):
        raise refuse(f"'model' must be a state dict, got {type(saved).__name__}")
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing or unexpected:
        raise refuse(f"its model state does not match the model: missing {missing}, "
                     f"unexpected {unexpected}")
    out = {}
    for key, mine in current.items():
        value = saved[key]
        if isinstance(mine, Tensor):
            if not isinstance(value, Tensor):
                raise refuse(f"model entry {key!r} must be a tensor, got {type(value).__name__}")
            if value.shape != mine.shape or value.dtype != mine.dtype:
                raise refuse(f"model entry {key!r} has shape {tuple(value.shape)} and dtype "
                             f"{value.dtype}; the model's has {tuple(mine.shape)} and "
                             f"{mine.dtype}")
            if _is_dtensor(mine):
                value = _distribute_like(value, mine)
        out[key] = value
    return out


def _check_rng(rng: Any, refuse: Any) -> None:
    cpu = rng.get("cpu") if isinstance(rng, dict) else None
    cuda = rng.get("cuda") if isinstance(rng, dict) else None
    now = torch.get_rng_state()
    if not (isinstance(cpu, Tensor) and cpu.dtype == now.dtype and cpu.shape == now.shape):
        raise refuse(f"'rng' must hold the CPU generator's state (a {now.dtype} tensor of "
                     f"{now.numel()} bytes)")
    if not (isinstance(cuda, list) and all(isinstance(s, Tensor) and s.dtype == torch.uint8
                                           for s in cuda)):
        raise refuse("'rng' must hold a list of CUDA generator states (uint8 tensors)")
    if cuda and torch.cuda.is_available():
        if len(cuda) > torch.cuda.device_count():
            raise refuse(f"it holds the states of {len(cuda)} CUDA generators; this process "
                         f"sees {torch.cuda.device_count()} devices")
        like = torch.cuda.get_rng_state(0)
        if any(s.shape != like.shape for s in cuda):
            raise refuse("a CUDA generator state has the wrong size")


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


# -- helpers -------------------------------------------------------------------------


def is_zero(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ZeroRedundancyOptimizer."""
    # Not imported unless the user made one (importing it warns, via torch.jit).
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return module is not None and isinstance(optimizer, module.ZeroRedundancyOptimizer)


def _is_dtensor(t: Any) -> bool:
    return isinstance(t, Tensor) and local_tensor(t) is not t
