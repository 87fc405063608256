"""Subprocess half of tests/test_adaptive.py's SIGTERM test.

    python _adaptive_worker.py DIR EPOCHS

Runs fit(batching="adaptive") with a checkpoint at DIR/run.pt. From step
MARK_AT on it writes DIR/marker and sleeps SLOW seconds per step, so that a
signal sent once the marker exists lands mid-run, in the mini-batch phase.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from _helpers import loss_fn, make_model  # this script's folder is on sys.path
from rprop.torch import fit

MARK_AT = 3
SLOW = 0.1
OPTIONS = {"batch_size": 8, "micro_batches": 4, "seed": 7}


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.3 * torch.randn(400, 1, generator=g,
                                                                   dtype=torch.float64)
    return x, y


def run(folder: Path | None, epochs: int, slow: bool) -> tuple[torch.nn.Module, object]:
    torch.set_num_threads(1)
    model = make_model()

    def mark(info) -> None:
        if slow and info.step >= MARK_AT:
            assert folder is not None
            (folder / "marker").write_text(f"{info.step} {info.batch_size}")
            time.sleep(SLOW)

    hist = fit(model, loss_fn, problem(), max_epochs=epochs, progress=False,
               batching="adaptive", batching_kwargs=OPTIONS, callbacks=[mark],
               checkpoint=None if folder is None else folder / "run.pt")
    return model, hist


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), slow=True)
