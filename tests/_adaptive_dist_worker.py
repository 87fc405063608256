"""One rank of tests/test_adaptive.py's 2-rank test (gloo, CPU, float64).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python _adaptive_dist_worker.py OUT

Saves to OUT/rank{r}.pt (1) the parameters after STEPS masked steps in which
this rank passes its own micro-batches (:func:`micro_batches`), with the
carried evidence also each step's sign-efficiency sums and partial moves, (2) the parameters
and history of fit(batching="adaptive") on this rank's shard (grow="evidence",
and the default rule), and (3) those of both fits stopped after one
epoch-equivalent with a checkpoint and resumed from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import rprop
from rprop.torch import fit
from rprop.torch._adaptive import (
    _batch_gradient,
    _efficiency_terms,
    _Evidence,
    _evidence_masks,
    _masks,
    _partial_moves,
    _Statistics,
    masked_step,
)

STEPS = 10
VARIANTS = ("irprop+", "rprop+", "grprop-sag")
SHARD = 128
# Carried evidence with one jump: it reaches full batch after ~3 epochs.
FIT_OPTIONS = {"batch_size": 8, "micro_batches": 4, "seed": 3, "grow": "evidence"}
# The default rule: it doubles the batch on its signs (8 to 128 here).
DEFAULT_OPTIONS = {"batch_size": 8, "micro_batches": 4, "seed": 3}


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2 * SHARD, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.3 * torch.randn(2 * SHARD, 1, generator=g,
                                                                   dtype=torch.float64)
    return x, y


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 1)).double()


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


def micro_batches(rank: int, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank ``rank``'s 4 micro-batches of 4 samples at ``step``, from its shard."""
    x, y = dataset()
    rows = rank * SHARD + torch.randperm(SHARD, generator=torch.Generator().manual_seed(
        100 + step))[:16]
    return [(x[r], y[r]) for r in rows.chunk(4)]


def stepwise(variant: str, ranks: list[int], group, carry: bool = False) -> list[torch.Tensor]:
    """STEPS masked steps over the micro-batches of ``ranks`` (all of them in one
    process, or this rank's own under torch.distributed); ``carry``: with the
    evidence carried from step to step."""
    model = make_model()
    params = list(model.parameters())
    opt = rprop.Rprop(params, variant=variant)
    stats = _Statistics(params)
    evidence = _Evidence(params)
    efficiency = []
    for step in range(STEPS):
        micro = [b for r in ranks for b in micro_batches(r, step)]
        loss, k = _batch_gradient(model, loss_fn, micro, stats, group)
        if carry:
            # Both ranks' 16 samples make the batch, out of 2 SHARD.
            masks, _, totals = _evidence_masks(opt, stats, evidence, k, None, 2 * 16,
                                               2 * SHARD)
            efficiency.append(torch.stack(_efficiency_terms(opt, stats, k, None)))
        else:
            masks, _ = _masks(opt, stats, k, None)
        moves = _partial_moves(opt, stats, k, None, masks, totals) if carry else None
        masked_step(opt, masks, loss, moves)
        if carry:
            evidence.keep(totals, [masks[id(p)] for p in params])
    return [p.detach().clone() for p in params] + efficiency


if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, y = dataset()
    mine = (x[rank * SHARD:(rank + 1) * SHARD], y[rank * SHARD:(rank + 1) * SHARD])
    model = make_model()
    hist = fit(model, loss_fn, mine, max_epochs=8, progress=False, batching="adaptive",
               batching_kwargs=FIT_OPTIONS)
    default = make_model()
    by_default = fit(default, loss_fn, mine, max_epochs=8, progress=False,
                     batching="adaptive", batching_kwargs=DEFAULT_OPTIONS)
    fit(make_model(), loss_fn, mine, max_epochs=1, progress=False, batching="adaptive",
        batching_kwargs=DEFAULT_OPTIONS, checkpoint=out / "default.pt")
    default_resumed = make_model()
    default_again = fit(default_resumed, loss_fn, mine, max_epochs=8, progress=False,
                        batching="adaptive", batching_kwargs=DEFAULT_OPTIONS,
                        checkpoint=out / "default.pt")
    # The same run, stopped after one epoch-equivalent with a checkpoint, then resumed.
    fit(make_model(), loss_fn, mine, max_epochs=1, progress=False, batching="adaptive",
        batching_kwargs=FIT_OPTIONS, checkpoint=out / "run.pt")
    resumed = make_model()
    again = fit(resumed, loss_fn, mine, max_epochs=8, progress=False, batching="adaptive",
                batching_kwargs=FIT_OPTIONS, checkpoint=out / "run.pt")
    torch.save({
        "stepwise": {v: stepwise(v, [rank], dist.group.WORLD) for v in VARIANTS},
        "carried": {v: stepwise(v, [rank], dist.group.WORLD, carry=True) for v in VARIANTS},
        "fit": [p.detach().clone() for p in model.parameters()],
        "history": hist.state_dict(),
        "default": [p.detach().clone() for p in default.parameters()],
        "default_history": by_default.state_dict(),
        "default_resumed": [p.detach().clone() for p in default_resumed.parameters()],
        "default_resumed_history": default_again.state_dict(),
        "default_resumed_from": default_again.resumed_from,
        "resumed": [p.detach().clone() for p in resumed.parameters()],
        "resumed_history": again.state_dict(), "resumed_from": again.resumed_from,
    }, out / f"rank{rank}.pt")
    dist.destroy_process_group()
