"""Fresh-process half of tests/test_resume.py.

    python _resume_worker.py save   DIR   # N steps per (variant, path), torch.save
    python _resume_worker.py resume DIR   # torch.load(weights_only=True), M more steps
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import rprop
from _table import NAMED_PATHS as PATHS

VARIANTS = ("rprop+", "rprop-", "irprop+", "irprop-")
FIRST, SECOND = 25, 25


def resume_path(path: str) -> str:
    """Resume each run on the next path: state saved by one path loads into another."""
    names = sorted(PATHS)
    return names[(names.index(path) + 1) % len(names)]


def setup(variant: str, path: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    opt = rprop.Rprop(model.parameters(), lr=0.05, variant=variant, **PATHS[path])

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return model, opt, closure


def run(opt, closure, steps: int) -> None:
    for _ in range(steps):
        opt.step(closure)


def main(mode: str, folder: str) -> None:
    torch.set_num_threads(1)
    out = Path(folder)
    for variant in VARIANTS:
        for path in PATHS:
            name = f"{variant}_{path}"
            if mode == "save":
                model, opt, closure = setup(variant, path)
                run(opt, closure, FIRST)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()},
                           out / f"{name}.pt")
            else:
                model, opt, closure = setup(variant, resume_path(path))
                saved = torch.load(out / f"{name}.pt", weights_only=True)
                model.load_state_dict(saved["model"])
                opt.load_state_dict(saved["opt"])
                run(opt, closure, SECOND)
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()},
                           out / f"{name}_final.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
