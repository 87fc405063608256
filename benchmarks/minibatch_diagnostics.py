"""What limits fit(batching="adaptive"): the diagnostics of docs/benchmarks.md
("What limits the mode"), each on the tuning seeds only (100.. of the protocol).

Objectives are medians over the seeds at 1, 3, 10 and 30 epoch-equivalents, and
their ratio to the best-of-grid Adam medians of the sixth run (docs/benchmarks.md).

    python benchmarks/minibatch_diagnostics.py switch      # full batch forced from epoch e
    python benchmarks/minibatch_diagnostics.py lr          # Rprop's initial step size
    python benchmarks/minibatch_diagnostics.py exact       # exact gradients inside the loop
    python benchmarks/minibatch_diagnostics.py steps       # full-batch iRprop+ per step
    python benchmarks/minibatch_diagnostics.py evidence    # how long evidence is carried

``exact`` replaces, at every masked step, the batch's gradient by the full-data
gradient (an oracle, by patching ``masked_step``): it tells how much of the gap is
sign noise and how much the steps the schedule takes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

import rprop
from rprop import _compare_minibatch as cm
from rprop._stopping import DEFAULT_LR
from rprop.torch import _adaptive, fit
from rprop.torch._full_batch import full_batch_backward

BUDGETS = (1, 3, 10, 30)
# Best-of-grid Adam, medians over seeds 0-9 (docs/benchmarks.md, sixth run).
BEST_ADAM = {
    "digits": (0.0973, 0.02328, 0.001182, 0.000227),
    "breast_cancer": (0.08251, 0.05877, 0.02913, 0.001966),
    "diabetes": (0.5231, 0.4909, 0.4243, 0.2782),
    "noisy_class": (0.2537, 0.2442, 0.2336, 0.2269),
    "teacher": (0.01845, 0.01316, 0.01172, 0.01041),
}
SMALL = ("digits", "breast_cancer", "diabetes")
SYNTHETIC = ("noisy_class", "teacher")


def seeds_for(name: str) -> list[int]:
    return [100, 101] if name in SYNTHETIC else [100, 101, 102]


def run(task: cm.Task, seed: int, *, lr: float = DEFAULT_LR, switch: float | None = None,
        model: torch.nn.Module | None = None) -> tuple[cm.Curve, Any]:
    """The adaptive mode with fit's default optimizer at initial step ``lr``;
    with ``switch``, stopped after that many epochs and continued by full-batch
    fit on the same optimizer."""
    model = task.model(seed) if model is None else model
    opt = rprop.Rprop(model.parameters(), variant="irprop+", lr=lr)
    rec = cm._Recorder(task, BUDGETS)

    def watch(info: Any) -> bool:
        return rec.at(info.examples, model)

    hist = fit(model, task.loss_fn, (task.x_train, task.y_train), optimizer=opt,
               batching="adaptive", batching_kwargs={"seed": seed},
               max_epochs=max(BUDGETS) + 1 if switch is None else switch, progress=False,
               callbacks=[watch])
    done = hist.examples[-1] if hist.examples else 0
    if not rec.at(done, model) and switch is not None:
        fit(model, task.loss_fn, task.full_batches(), optimizer=opt, max_epochs=10**6,
            step_floor=False, progress=False,
            callbacks=[lambda info: rec.at(done + info.epoch * task.n, model)])
    cm._fill(rec)
    return rec.curve, hist


def row(name: str, label: str, curves: Sequence[cm.Curve], extra: str = "") -> None:
    med = [statistics.median(c.objective[b] for c in curves) for b in BUDGETS]
    ratio = [m / a for m, a in zip(med, BEST_ADAM[name], strict=True)]
    print(f"| {name} | {label} | " + " | ".join(f"{m:.4g} ({r:.2f})" for m, r in
                                                zip(med, ratio, strict=True))
          + f" |{extra}", flush=True)


def header(first: str) -> None:
    print(f"| dataset | {first} | " + " | ".join(f"@{b} (/ Adam)" for b in BUDGETS) + " |")
    print("|---|---|" + "---:|" * len(BUDGETS))


def switch(names: Sequence[str], tasks: Callable[[str, int], cm.Task]) -> None:
    header("full batch from epoch")
    for name in names:
        for at in (None, 0.25, 0.5, 1.0, 2.0, 3.0):
            curves = [run(tasks(name, s), s, switch=at)[0] for s in seeds_for(name)]
            row(name, "the rule's" if at is None else f"{at:g}", curves)


def lr(names: Sequence[str], tasks: Callable[[str, int], cm.Task]) -> None:
    header("initial step size")
    for name in names:
        for size in (0.01, 0.02, 0.03, 0.05, 0.1, 0.2):
            row(name, f"{size:g}", [run(tasks(name, s), s, lr=size)[0]
                                    for s in seeds_for(name)])


def exact(names: Sequence[str], tasks: Callable[[str, int], cm.Task]) -> None:
    """The adaptive loop with the full-data gradient in each masked step:
    ``masks`` as the batch's test says, or every coordinate; with or without
    the partial moves."""
    header("masked step given the exact gradient")
    original = _adaptive.masked_step
    for name in names:
        for label, every, partial in (("no (the mode)", None, True),
                                      ("yes, the batch's masks and partial moves", False, True),
                                      ("yes, the batch's masks, no partial moves", False, False),
                                      ("yes, every coordinate moves", True, False)):
            curves, steps = [], []
            for s in seeds_for(name):
                task = tasks(name, s)
                model = task.model(s)
                batches = task.full_batches()

                def oracle(optimizer: Any, masks: dict[int, torch.Tensor], loss: torch.Tensor,
                           moves: Any = None, *, _model: Any = model, _batches: Any = batches,
                           _task: cm.Task = task, _every: Any = every,
                           _partial: bool = partial) -> set[int]:
                    full_batch_backward(_model, _task.loss_fn, _batches)
                    if _every:
                        masks = {k: torch.ones_like(v) for k, v in masks.items()}
                    return original(optimizer, masks, loss, moves if _partial else None)

                _adaptive.masked_step = original if every is None else oracle
                try:
                    curve, hist = run(task, s, model=model)
                finally:
                    _adaptive.masked_step = original
                curves.append(curve)
                steps.append(hist.steps)
            row(name, label, curves, f" steps in 30 epochs: {statistics.median(steps):g}")


def steps(names: Sequence[str], tasks: Callable[[str, int], cm.Task]) -> None:
    """Full-batch iRprop+ (exact gradients) by steps, the first tuning seed."""
    marks = (50, 100, 200, 400, 860, 1500)
    print("| dataset | " + " | ".join(f"{m} steps" for m in marks) + " |")
    print("|---|" + "---:|" * len(marks))
    for name in names:
        task = tasks(name, 100)
        model = task.model(100)
        hist = fit(model, task.loss_fn, task.full_batches(),
                   optimizer=rprop.Rprop(model.parameters(), variant="irprop+"),
                   max_epochs=max(marks) + 1, step_floor=False, progress=False)
        got = dict(enumerate(hist.loss))
        print(f"| {name} | " + " | ".join(f"{got[m]:.4g}" for m in marks) + " |", flush=True)


def evidence(names: Sequence[str], tasks: Callable[[str, int], cm.Task]) -> None:
    """Over 3 epochs (first tuning seed): the looks at a coordinate's carried
    evidence, by how many micro-batch means it holds, and how many pass."""
    for name in names:
        looks = _looks(tasks(name, 100))
        total = sum(n for _, n in looks.values())
        print(f"\n{name}: looks by micro-batch means held (share of looks, passed)")
        for span, (passed, n) in looks.items():
            print(f"  {span:>8}: {n / max(total, 1):.2f}, {passed / max(n, 1):.3f}")


def _looks(task: cm.Task) -> dict[str, list[int]]:
    """(passed, looks) by the number of micro-batch means held, counted by
    wrapping ``reliable_mask`` (called on carried evidence with a tensor of counts)."""
    bins = ((0, 8), (8, 16), (16, 32), (32, 64), (64, 128), (128, None))
    looks = {(f"{lo + 1}-{hi}" if hi else f"> {lo}"): [0, 0] for lo, hi in bins}
    original = _adaptive.reliable_mask

    def counting(total: Any, squares: Any, k: Any, z: float, shift: Any = None) -> Any:
        ok, info = original(total, squares, k, z, shift)
        if isinstance(k, torch.Tensor):
            for (lo, hi), tally in zip(bins, looks.values(), strict=True):
                sel = info & (k > lo) & ((k <= hi) if hi else True)
                tally[0] += int((ok & sel).sum())
                tally[1] += int(sel.sum())
        return ok, info

    _adaptive.reliable_mask = counting
    try:
        run(task, 100, switch=3.0)
    finally:
        _adaptive.reliable_mask = original
    return looks


def main(argv: list[str] | None = None) -> int:
    runs = {"switch": (switch, SMALL), "lr": (lr, SMALL + SYNTHETIC),
            "exact": (exact, ("teacher",)), "steps": (steps, ("teacher",)),
            "evidence": (evidence, ("teacher",))}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=sorted(runs))
    ap.add_argument("--datasets", help="instead of the diagnostic's own, comma-separated")
    ap.add_argument("--synthetic-n", type=int, default=100_000)
    args = ap.parse_args(argv)
    cache: dict[tuple[str, int], cm.Task] = {}

    def tasks(name: str, seed: int) -> cm.Task:
        if (name, seed) not in cache:
            cache[name, seed] = cm.make_task(name, seed, args.synthetic_n)
        return cache[name, seed]

    action, names = runs[args.what]
    action(args.datasets.split(",") if args.datasets else names, tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
