"""One rank of tests/test_rank_mismatch.py (gloo, CPU, 2 ranks).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _rank_mismatch_worker.py OUTDIR

Each scenario makes the ranks disagree (a bad count on one rank, models that
differ, fit arguments that differ) and records what every rank raised, in
OUTDIR/rank{r}.json. Collectives time out after 30 s, so a rank left waiting
records an error instead of hanging the test.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import rprop
from rprop.torch import fit, full_batch_backward


def batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, 1, generator=g, dtype=torch.float64)
    return [(x[i:i + 4], y[i:i + 4]) for i in range(0, 12, 4)]


def make_model(hidden: int = 6, dtype: torch.dtype = torch.float64,
               extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)]
    if extra:
        layers.append(torch.nn.Linear(1, 1))
    return torch.nn.Sequential(*layers).to(dtype)


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)) - y.to(dtype)) ** 2).sum(dim=1)


def with_counts(counts: list[Any]) -> Callable[[torch.nn.Module, Any], Any]:
    """loss_fn returning (loss_sum, counts[k]) for its k-th batch."""
    calls = {"k": 0}

    def fn(model: torch.nn.Module, batch: Any) -> Any:
        count = counts[calls["k"] % len(counts)]
        calls["k"] += 1
        return loss_fn(model, batch).sum(), count

    return fn


def fp16_weighted(model: torch.nn.Module, batch: Any) -> Any:
    # Rank 1's weights sum past float16's 65504: w.sum() is inf there.
    losses = loss_fn(model, batch)
    w = torch.full((len(losses),), 20000.0 if dist.get_rank() == 1 else 1.0,
                   dtype=torch.float16)
    return (w.double() * losses).sum(), w.sum()


def attempt(run: Callable[[], Any]) -> dict[str, Any]:
    try:
        value = run()
    except Exception as err:  # recorded, for the test to judge
        return {"error": f"{type(err).__name__}: {err}", "value": None}
    return {"error": None, "value": value}


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank = dist.get_rank()
    data = batches(rank)
    one = rank == 1
    out: dict[str, Any] = {}

    def fb(model: torch.nn.Module, fn: Any = loss_fn, **kwargs: Any) -> float:
        return float(full_batch_backward(model, fn, data, **kwargs))

    def fitted(model: torch.nn.Module, fn: Any = loss_fn, **kwargs: Any) -> dict[str, Any]:
        hist = fit(model, fn, data, progress=False, **kwargs)
        return {"stop_reason": hist.stop_reason, "epochs": hist.epochs, "loss": hist.loss}

    ten = torch.tensor(4.0, dtype=torch.float64)
    out["tensor_count"] = attempt(lambda: fb(make_model(), with_counts(
        [ten, torch.tensor(-2.0) if one else ten, ten])))
    out["python_count"] = attempt(lambda: fb(make_model(), with_counts(
        [4, 4, 4 if one else -1])))
    out["fp16_count_fit"] = attempt(lambda: fitted(make_model(), fp16_weighted, max_epochs=5,
                                                   target_loss=1e-3))
    out["fsdp_tensor_count"] = attempt(lambda: fb(_fsdp(make_model()), with_counts(
        [ten, ten, torch.tensor(math.nan) if one else ten])))
    out["shape"] = attempt(lambda: fb(make_model(hidden=7 if one else 6)))
    out["dtype"] = attempt(lambda: fb(make_model(dtype=torch.float32 if one else torch.float64)))
    out["param_count"] = attempt(lambda: fb(make_model(extra=one)))
    out["bucket_cap"] = attempt(lambda: fb(make_model(), bucket_cap_mb=1 if one else 256))
    out["fit_shape"] = attempt(lambda: fitted(make_model(hidden=7 if one else 6), max_epochs=3))
    out["fit_max_epochs"] = attempt(lambda: fitted(make_model(), max_epochs=4 if one else 3))
    out["fit_checkpoint_rank0"] = attempt(lambda: fitted(
        make_model(), max_epochs=3, checkpoint=None if one else folder / "ckpt.pt"))
    out["fit_lr"] = attempt(lambda: _fit_with_lr(fitted, 0.2 if one else 0.1))
    # A callback on rank 0 only (e.g. logging) works: every rank takes part in
    # the per-epoch all-reduce that lets any rank's callback stop all ranks.
    seen: list[int] = []

    def stop_at_two(info: Any) -> bool:
        seen.append(info.epoch)
        return info.epoch == 2

    out["fit_callback_rank0"] = attempt(lambda: fitted(
        make_model(), max_epochs=6, callbacks=[] if one else [stop_at_two]))
    out["callback_epochs_seen"] = seen
    # The process group still works after every refusal above; the agreement
    # check costs one collective on the first call for a model, none after.
    calls = {"n": 0}
    all_reduce = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    model = make_model()
    per_call = []
    losses = []
    for _ in range(3):
        before = calls["n"]
        losses.append(fb(model))
        per_call.append(calls["n"] - before)
    dist.all_reduce = all_reduce  # type: ignore[assignment]
    out["after"] = {"losses": losses, "all_reduces_per_call": per_call,
                    "grads": [p.grad.tolist() for p in model.parameters()]}
    (folder / f"rank{rank}.json").write_text(json.dumps(out, default=_jsonable))
    dist.barrier()
    dist.destroy_process_group()


def _fsdp(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model)
    return model


def _fit_with_lr(fitted: Callable[..., Any], lr: float) -> Any:
    model = make_model()
    return fitted(model, optimizer=rprop.Rprop(model.parameters(), lr=lr), max_epochs=3)


def _jsonable(value: Any) -> Any:
    return str(value)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads), which can abort on exit
