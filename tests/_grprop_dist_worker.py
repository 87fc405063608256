"""One rank of tests/test_grprop_distributed.py (gloo, CPU, float64).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _grprop_dist_worker.py OUT

GRprop on FSDP2-sharded parameters (DTensors, Shard(0), uneven: the output
layer's weight has one row, so rank 1 holds none of it), under DDP, and under
DDP with ZeroRedundancyOptimizer(optimizer_class=rprop.Rprop) (each rank's
optimizer holds a partition of the parameters: with grprop_partitioned=True,
with it and a state_dict round trip halfway, without it, and with a model of
one parameter, so that rank 1's partition is empty); every rank sees the
whole dataset, so the averaged gradient is the one process's gradient and the
runs can be compared with one process step for step. Saves OUT/rank{r}.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import rprop

STEPS = 15
ADJUSTS = ("sag", "slr")
ZERO_SETUPS = ("zero", "zero-resumed", "zero-unpartitioned", "zero-one-param")
HYPER = {"lr": 0.1, "step_sizes": (1e-10, 0.1)}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(dim=1, keepdim=True))


def make_model(setup: str = "") -> torch.nn.Module:
    torch.manual_seed(0)
    if setup == "zero-one-param":
        return torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False)).double()
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1)).double()


def sse(model: torch.nn.Module) -> torch.Tensor:
    x, y = data()
    return 0.5 * ((model(x) - y) ** 2).sum()


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def zero(model: torch.nn.Module, **kw: object) -> torch.optim.Optimizer:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=rprop.Rprop,
                                   **HYPER, **kw)


def run(setup: str, adjust: str) -> list[torch.Tensor]:
    model = make_model(setup)
    if setup == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    variant = f"grprop-{adjust}"
    if setup.startswith("zero"):
        opt = zero(model, variant=variant,
                   grprop_partitioned=setup != "zero-unpartitioned")
    else:
        opt = rprop.Rprop(model.parameters(), **HYPER, variant=variant)
    for t in range(STEPS):
        if setup == "zero-resumed" and t == STEPS // 2:
            # ZeroRedundancyOptimizer's own round trip (every rank's state
            # gathered on rank 0, then loaded on every rank) into one built
            # with another variant and without the option: the saved param
            # groups bring both back.
            opt.consolidate_state_dict(to=0)
            saved = [opt.state_dict() if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(saved, src=0)
            assert all(g["grprop_partitioned"] is True for g in saved[0]["param_groups"])
            opt = zero(model, variant="irprop-")
            opt.load_state_dict(saved[0])
        opt.zero_grad()
        sse(model).backward()
        opt.step()
    return [full(p) for p in model.parameters()]


def refused_layout() -> str:
    """A DTensor sharded on dim 1 (tensor parallel): refused, nothing stepped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4, dtype=torch.float64), mesh,
                                             [Shard(1)]))
    opt = rprop.Rprop([w], variant="grprop-sag")
    w.grad = distribute_tensor(torch.ones(4, 4, dtype=torch.float64), mesh, [Shard(1)])
    try:
        opt.step()
    except ValueError as err:
        assert torch.equal(w.full_tensor(), torch.ones(4, 4, dtype=torch.float64))
        return str(err)
    return "not refused"


def main(folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    out = {(setup, adjust): run(setup, adjust)
           for setup in ("fsdp", "ddp", *ZERO_SETUPS) for adjust in ADJUSTS}
    out["refused"] = refused_layout()
    torch.save(out, folder / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
