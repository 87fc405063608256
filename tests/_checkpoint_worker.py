"""Subprocess half of tests/test_checkpoint_faults.py.

    python _checkpoint_worker.py sigterm     DIR  # one process; the test sends SIGTERM
    python _checkpoint_worker.py slow-fsync  DIR  # the second save hangs in fsync; the test
                                                  # sends SIGKILL while its temporary file exists
    torchrun --nproc-per-node 2 _checkpoint_worker.py dist-sigterm DIR  # the test sends SIGTERM
    torchrun --nproc-per-node 2 _checkpoint_worker.py dist-resume  DIR  # resumed vs whole run

Once past epoch MARK_AT, rank 0 writes DIR/marker and every epoch sleeps
SLOW seconds, so a signal sent after the marker appears lands mid-run, long
before max_epochs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from rprop.torch import fit

MARK_AT = 3
SLOW = 0.2
EPOCHS = 30  # the resumed runs' length; a signalled run stops long before
NEVER = 100_000


def problem(rank: int = 0, world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(42, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    mine = range(rank * 7, 42, 7 * world)  # batches of 7, dealt round-robin to the ranks
    return [(x[i:i + 7], y[i:i + 7]) for i in mine]


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    """Then ``torch.manual_seed(7)``: dropout's draws come from the RNG state
    that fit checkpoints in one process (and does not under torch.distributed)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                torch.nn.Dropout(dropout), torch.nn.Linear(8, 1)).double()
    torch.manual_seed(7)
    return model


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


def slow_after_mark(folder: Path, rank: int):
    def callback(info) -> None:
        if info.epoch >= MARK_AT:
            if rank == 0 and info.epoch == MARK_AT:
                (folder / "marker").write_text(str(info.epoch))
            time.sleep(SLOW)

    return callback


def run_until_signalled(folder: Path, rank: int = 0, world: int = 1) -> None:
    try:
        fit(make_model(0.2 if world == 1 else 0.0), loss_fn, problem(rank, world),
            max_epochs=NEVER, progress=False, checkpoint=folder / "run.pt", checkpoint_every=1000,
            callbacks=[slow_after_mark(folder, rank)])
    except SystemExit as stop:
        (folder / f"exit.rank{rank}").write_text(str(stop.code))
        raise


def main(mode: str, folder: Path) -> None:
    torch.set_num_threads(1)
    if mode == "sigterm":
        run_until_signalled(folder)
    elif mode == "slow-fsync":
        real_fsync, calls = os.fsync, []

        def fsync(fd: int) -> None:
            calls.append(fd)
            if len(calls) == 3:  # the first save's file and folder, then the second's file
                time.sleep(NEVER)
            real_fsync(fd)

        os.fsync = fsync
        fit(make_model(), loss_fn, problem(), max_epochs=NEVER, progress=False,
            checkpoint=folder / "run.pt", checkpoint_every=1)
    else:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if mode == "dist-sigterm":
            try:
                run_until_signalled(folder, rank, world)
            finally:
                dist.destroy_process_group()
        resumed_model = make_model()
        resumed = fit(resumed_model, loss_fn, problem(rank, world), max_epochs=EPOCHS,
                      progress=False, checkpoint=folder / "run.pt")
        whole_model = make_model()
        whole = fit(whole_model, loss_fn, problem(rank, world), max_epochs=EPOCHS,
                    progress=False)
        torch.save({"resumed_from": resumed.resumed_from,
                    "loss": (resumed.loss, whole.loss),
                    "step_size": (resumed.step_size, whole.step_size),
                    "params": [(a.detach().clone(), b.detach().clone()) for a, b in
                               zip(resumed_model.parameters(), whole_model.parameters())]},
                   folder / f"resumed.rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo threads), which can abort on exit
