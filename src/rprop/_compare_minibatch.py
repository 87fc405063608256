"""The engine behind ``rprop compare --minibatch`` and ``benchmarks/minibatch.py``:
``fit(batching="adaptive")`` against mini-batch Adam, SGD and Rprop and
full-batch iRprop+ and L-BFGS, at equal examples processed.

The protocol is docs/benchmarks.md, "Mini-batches: adaptive batching". In
short: every method sees the same data split, the same initial weights and
the same number of examples (a full-batch pass counts N, an L-BFGS closure
call counts N each, a micro-batch its samples); the full-data training
objective, the test metric and the training wall time (evaluation excluded)
are recorded when the examples processed first reach 1, 3, 10 and 30 times
N. Adam's and SGD's learning rates are picked from a grid on tuning seeds
that are never reported, separately for each budget; the adaptive mode and
the Rprop baselines take their defaults.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import rprop
from rprop.torch import fit, full_batch_backward
from rprop.torch._adaptive import AdaptiveHistory

BUDGETS = (1, 3, 10, 30)
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SGD_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
EVAL_BATCH = 4096
REFERENCE_EVALS = 3000


@dataclass
class Task:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    sizes: tuple[int, ...]
    classify: bool

    @property
    def n(self) -> int:
        return int(self.x_train.shape[0])

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(self.sizes) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    def losses(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        out = model(x)
        if self.classify:
            return nn.functional.cross_entropy(out, y, reduction="none")
        return ((out - y) ** 2).sum(dim=1)

    def full_batches(self) -> list[tuple[Tensor, Tensor]]:
        """The training part in chunks of EVAL_BATCH: one full-batch pass."""
        return [(self.x_train[i:i + EVAL_BATCH], self.y_train[i:i + EVAL_BATCH])
                for i in range(0, self.n, EVAL_BATCH)]

    def loss_fn(self, model: nn.Module, batch: Any) -> Tensor:
        return self.losses(model, batch[0], batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(full-data training objective, test metric: accuracy or MSE)."""
        total = 0.0
        for i in range(0, self.n, EVAL_BATCH):
            total += float(self.losses(model, self.x_train[i:i + EVAL_BATCH],
                                       self.y_train[i:i + EVAL_BATCH]).sum(dtype=torch.float64))
        out = model(self.x_test)
        if self.classify:
            metric = float((out.argmax(1) == self.y_test).double().mean())
        else:
            metric = float(((out - self.y_test) ** 2).sum(1).double().mean())
        return total / self.n, metric


def _split(x: np.ndarray, y: np.ndarray, seed: int, classify: bool, name: str,
           sizes: tuple[int, ...]) -> Task:
    rng = np.random.default_rng(1000 + seed)
    order = rng.permutation(len(x))
    cut = int(0.8 * len(x))
    tr, te = order[:cut], order[cut:]
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    x = (x - mu) / sd
    if not classify:
        ym, ys = y[tr].mean(0), y[tr].std(0)
        y = (y - ym) / ys
    xt = torch.tensor(x, dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.int64 if classify else torch.float32)
    if not classify and yt.ndim == 1:
        yt = yt[:, None]
    return Task(name, xt[tr], yt[tr], xt[te], yt[te], sizes, classify)


def _teacher(n: int) -> tuple[np.ndarray, np.ndarray]:
    g = torch.Generator().manual_seed(42)
    x = torch.randn(n, 10, generator=g)
    w1 = torch.randn(10, 32, generator=g) / math.sqrt(10) * 2
    w2 = torch.randn(32, 1, generator=g) / math.sqrt(32)
    y = torch.tanh(x @ w1) @ w2
    y = y + 0.1 * y.std() * torch.randn(n, 1, generator=g)
    return x.numpy(), y.numpy()


def make_task(name: str, seed: int, synthetic_n: int) -> Task:
    from sklearn import datasets  # optional (rprop[datasets]): only for this benchmark

    if name == "digits":
        x, y = datasets.load_digits(return_X_y=True)
        return _split(x, y, seed, True, name, (64, 32, 10))
    if name == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
        return _split(x, y, seed, True, name, (30, 16, 2))
    if name == "diabetes":
        x, y = datasets.load_diabetes(return_X_y=True)
        return _split(x, y, seed, False, name, (10, 16, 1))
    if name == "noisy_class":
        x, y = datasets.make_classification(
            n_samples=synthetic_n, n_features=20, n_informative=10, n_redundant=4,
            flip_y=0.1, class_sep=0.8, random_state=42)
        return _split(x, y, seed, True, name, (20, 32, 2))
    if name == "teacher":
        x, y = _teacher(synthetic_n)
        return _split(x, y, seed, False, name, (10, 32, 1))
    raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


DATASETS = ("digits", "breast_cancer", "diabetes", "noisy_class", "teacher")


@dataclass
class Curve:
    """A run's objective, test metric and training seconds at each budget."""

    objective: dict[int, float] = field(default_factory=dict)
    metric: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class _Recorder:
    """Evaluates at the first moment the examples processed reach each budget x N;
    the training clock stops while it evaluates."""

    def __init__(self, task: Task, budgets: Sequence[int]) -> None:
        self.task, self.budgets = task, sorted(budgets)
        self.curve = Curve()
        self.train_s = 0.0
        self.mark = time.perf_counter()

    def pause(self) -> None:
        self.train_s += time.perf_counter() - self.mark

    def resume(self) -> None:
        self.mark = time.perf_counter()

    def at(self, examples: int, model: nn.Module) -> bool:
        """Record the budgets reached; True once the last one is."""
        due = [b for b in self.budgets if b not in self.curve.objective
               and examples >= b * self.task.n]
        if due:
            self.pause()
            obj, metric = self.task.evaluate(model)
            for b in due:
                self.curve.objective[b], self.curve.metric[b] = obj, metric
                self.curve.seconds[b] = self.train_s
            self.resume()
        return len(self.curve.objective) == len(self.budgets)


def _batches(n: int, size: int, gen: torch.Generator) -> Any:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, size):
            yield perm[i:i + size]


def run_fixed(task: Task, seed: int, budgets: Sequence[int], make: Callable[[Any], Any],
              batch: int | Sequence[int], loss_arg: bool = False) -> Curve:
    """A mini-batch loop: ``batch`` a fixed size or the size of each step."""
    model = task.model(seed)
    opt = make(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    rec = _Recorder(task, budgets)
    examples, step = 0, 0
    sizes = None if isinstance(batch, int) else batch
    fixed = _batches(task.n, batch, gen) if isinstance(batch, int) else None
    perm, pos = torch.randperm(task.n, generator=gen), 0
    while True:
        if fixed is not None:
            idx = next(fixed)
        else:
            assert sizes is not None
            b = sizes[min(step, len(sizes) - 1)]
            if b >= task.n:
                idx = torch.arange(task.n)
            else:
                if pos + b > task.n:
                    perm, pos = torch.randperm(task.n, generator=gen), 0
                idx, pos = perm[pos:pos + b], pos + b
        opt.zero_grad()
        loss = task.losses(model, task.x_train[idx], task.y_train[idx]).mean()
        loss.backward()
        opt.step()
        examples += len(idx)
        step += 1
        if rec.at(examples, model) or not math.isfinite(float(loss.detach())):
            break
    _fill(rec)
    return rec.curve


def _fill(rec: _Recorder) -> None:
    """A run that ended early (non-finite loss) reports inf at the budgets left."""
    for b in rec.budgets:
        rec.curve.objective.setdefault(b, math.inf)
        rec.curve.metric.setdefault(b, math.nan)
        rec.curve.seconds.setdefault(b, rec.train_s)


def run_adaptive(task: Task, seed: int, budgets: Sequence[int],
                 options: dict[str, Any] | None = None) -> Curve:
    model = task.model(seed)
    rec = _Recorder(task, budgets)

    def watch(info: Any) -> bool:
        examples = info.history.examples[-1] if info.history.examples else 0
        return rec.at(examples, model)

    opts = {"seed": seed, **(options or {})}
    hist = fit(model, task.loss_fn, (task.x_train, task.y_train), batching="adaptive",
               batching_kwargs=opts, max_epochs=max(budgets) + 1, progress=False,
               callbacks=[watch])
    assert isinstance(hist, AdaptiveHistory)
    rec.at(hist.examples[-1] if hist.examples else 0, model)
    _fill(rec)
    rec.curve.extra = {"batch_size": list(hist.batch_size), "reliable": list(hist.reliable),
                       "full_at": next((e / task.n for b, e in zip(hist.batch_size,
                                       hist.examples, strict=True) if b == task.n), None)}
    return rec.curve


def run_full_rprop(task: Task, seed: int, budgets: Sequence[int], lr: float = 0.01) -> Curve:
    model = task.model(seed)
    opt = rprop.Rprop(model.parameters(), lr=lr, variant="irprop+")
    batches = task.full_batches()
    rec = _Recorder(task, budgets)
    epochs = 0
    while True:
        loss = full_batch_backward(model, task.loss_fn, batches)
        opt.step(loss=loss)
        epochs += 1
        if rec.at(epochs * task.n, model):
            break
    return rec.curve


class _Spent(Exception):
    pass


def run_lbfgs(task: Task, seed: int, budgets: Sequence[int]) -> Curve:
    """Every closure call is a full pass (N examples). At each budget the
    objective is the best point evaluated so far (its line search's accepted
    points are those), and the test metric at that point."""
    model = task.model(seed)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=20, history_size=10,
                            line_search_fn="strong_wolfe")
    batches = task.full_batches()
    rec = _Recorder(task, budgets)
    state = {"evals": 0, "best": math.inf, "metric": math.nan}
    last = max(budgets)

    def closure() -> Tensor:
        if state["evals"] >= last * 1:
            raise _Spent
        loss = full_batch_backward(model, task.loss_fn, batches)
        state["evals"] += 1
        rec.pause()
        value = float(loss)
        if value < state["best"]:
            state["best"] = value
            state["metric"] = task.evaluate(model)[1]
        for b in budgets:
            if b not in rec.curve.objective and state["evals"] >= b:
                rec.curve.objective[b] = state["best"]
                rec.curve.metric[b] = state["metric"]
                rec.curve.seconds[b] = rec.train_s
        rec.resume()
        return loss.float()

    try:
        for _ in range(10 * last):
            opt.step(closure)
            if len(rec.curve.objective) == len(budgets):
                break
    except _Spent:
        pass
    _fill(rec)
    return rec.curve


def reference_optimum(task: Task, seed: int, evals: int | None = None) -> float:
    """The lowest full-data objective a long full-batch L-BFGS run from the
    seed's initial weights reaches in ``evals`` closure calls (default
    ``REFERENCE_EVALS``): outside every
    budget, a stand-in for the objective's minimum, so that the loss a method
    has still to shed (its excess) can be compared where the minimum is far
    from zero."""
    evals = REFERENCE_EVALS if evals is None else evals
    model = task.model(seed)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=100, history_size=20,
                            tolerance_grad=0, tolerance_change=0,
                            line_search_fn="strong_wolfe")
    batches = task.full_batches()
    state = {"evals": 0, "best": math.inf}

    def closure() -> Tensor:
        if state["evals"] >= evals:
            raise _Spent
        loss = full_batch_backward(model, task.loss_fn, batches)
        state["evals"] += 1
        if math.isfinite(float(loss)):
            state["best"] = min(state["best"], float(loss))
        return loss.float()

    try:
        while True:
            opt.step(closure)
    except _Spent:
        pass
    return state["best"]


def _adam(lr: float) -> Callable[[Any], Any]:
    return lambda params: torch.optim.Adam(params, lr=lr)


def _sgd(lr: float) -> Callable[[Any], Any]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def _torch_rprop(params: Any) -> Any:
    return torch.optim.Rprop(params)


GRID_METHODS: dict[str, tuple[tuple[float, ...], Callable[[float], Callable[[Any], Any]], int]] = {
    "adam-32": (ADAM_GRID, _adam, 32),
    "adam-128": (ADAM_GRID, _adam, 128),
    "sgdm-32": (SGD_GRID, _sgd, 32),
}
METHODS = ("adaptive", "adam-32", "adam-128", "adam-schedule", "sgdm-32", "torch-rprop-32",
           "torch-rprop-128", "irprop+-full", "irprop+-full-0.1", "lbfgs-full")


def tune(task_of: Callable[[int], Task], method: str, seeds: Sequence[int],
         budgets: Sequence[int]) -> dict[int, float]:
    """The grid lr with the lowest median training objective at each budget, on ``seeds``."""
    grid, make, batch = GRID_METHODS[method]
    scores: dict[float, dict[int, list[float]]] = {}
    for lr in grid:
        for s in seeds:
            curve = run_fixed(task_of(s), s, budgets, make(lr), batch)
            for b in budgets:
                scores.setdefault(lr, {}).setdefault(b, []).append(curve.objective[b])
    return {b: min(grid, key=lambda lr: statistics.median(scores[lr][b])) for b in budgets}


@dataclass
class Result:
    dataset: str
    method: str
    seed: int
    budget: int
    objective: float
    metric: float
    seconds: float
    setting: str = ""


def run(datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
        tune_seeds: Sequence[int], budgets: Sequence[int] = BUDGETS,
        synthetic_n: int = 100_000, options: dict[str, Any] | None = None,
        log: Callable[[str], None] = lambda s: None,
        reference: bool = False) -> tuple[list[Result], dict[str, Any]]:
    """Every method on every dataset from every seed; returns the results and
    what was chosen (the tuned learning rates, the adaptive batch schedules
    and, with ``reference``, each seed's :func:`reference_optimum`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results: list[Result] = []
    chosen: dict[str, Any] = {}
    try:
        for name in datasets:
            cache: dict[int, Task] = {}

            def task_of(s: int, name: str = name, cache: dict[int, Task] = cache) -> Task:
                if s not in cache:
                    cache[s] = make_task(name, s, synthetic_n)
                return cache[s]

            lrs: dict[str, dict[int, float]] = {}
            needed = [m for m in GRID_METHODS if m in methods]
            if "adam-schedule" in methods and "adam-128" not in needed:
                needed.append("adam-128")
            for m in needed:
                t0 = time.perf_counter()
                lrs[m] = tune(task_of, m, tune_seeds, budgets)
                log(f"{name}: tuned {m} lr per budget {lrs[m]} "
                    f"({time.perf_counter() - t0:.0f} s)")
            chosen[name] = {"lr": lrs, "schedules": {}, "reference": {}}
            for s in seeds:
                task = task_of(s)
                t0 = time.perf_counter()
                adaptive = None
                for m in methods:
                    per_budget: dict[int, tuple[Curve, str]] = {}
                    if m in GRID_METHODS:
                        _, make, batch = GRID_METHODS[m]
                        for lr in sorted(set(lrs[m].values())):
                            curve = run_fixed(task, s, budgets, make(lr), batch)
                            for b in budgets:
                                if lrs[m][b] == lr:
                                    per_budget[b] = (curve, f"lr={lr:g}")
                    elif m == "adaptive" or m == "adam-schedule":
                        if adaptive is None:
                            adaptive = run_adaptive(task, s, budgets, options)
                            chosen[name]["schedules"][s] = adaptive.extra
                        if m == "adaptive":
                            per_budget = {b: (adaptive, "defaults") for b in budgets}
                        else:
                            lr = lrs["adam-128"][max(budgets)]
                            curve = run_fixed(task, s, budgets, _adam(lr),
                                              adaptive.extra["batch_size"])
                            per_budget = {b: (curve, f"lr={lr:g}") for b in budgets}
                    elif m.startswith("torch-rprop"):
                        curve = run_fixed(task, s, budgets, _torch_rprop, int(m.split("-")[-1]))
                        per_budget = {b: (curve, "lr=0.01") for b in budgets}
                    elif m.startswith("irprop+-full"):
                        lr = 0.1 if m.endswith("-0.1") else 0.01
                        curve = run_full_rprop(task, s, budgets, lr)
                        per_budget = {b: (curve, f"lr={lr:g}") for b in budgets}
                    else:
                        curve = run_lbfgs(task, s, budgets)
                        per_budget = {b: (curve, "strong Wolfe") for b in budgets}
                    for b, (curve, setting) in per_budget.items():
                        results.append(Result(name, m, s, b, curve.objective[b],
                                              curve.metric[b], curve.seconds[b], setting))
                if reference:
                    chosen[name]["reference"][s] = reference_optimum(task, s)
                log(f"{name}: seed {s} done ({time.perf_counter() - t0:.0f} s)")
    finally:
        torch.set_num_threads(threads)
    return results, chosen


def _iqr(values: list[float]) -> tuple[float, float, float]:
    arr = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    return float(q1), float(med), float(q3)


def format_tables(results: Sequence[Result], markdown: bool = True) -> str:
    """Per dataset and budget: each method's median [IQR] objective, test
    metric and seconds, and its objective relative to the best Adam."""
    out = []
    datasets = list(dict.fromkeys(r.dataset for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    budgets = sorted({r.budget for r in results})
    for d in datasets:
        classify = d in ("digits", "breast_cancer", "noisy_class")
        out.append(f"\n**{d}** (objective: mean training {'cross-entropy' if classify else 'MSE'}"
                   f"; test metric: {'accuracy' if classify else 'MSE'})\n")
        out.append("| epochs | method | objective median [IQR] | vs best Adam | test metric | "
                   "train s |")
        out.append("|---:|---|---:|---:|---:|---:|")
        for b in budgets:
            med = {}
            for m in methods:
                rs = [r for r in results if r.dataset == d and r.method == m and r.budget == b]
                if rs:
                    med[m] = statistics.median(r.objective for r in rs)
            adams = [med[m] for m in ("adam-32", "adam-128") if m in med]
            best_adam = min(adams) if adams else None
            for m in methods:
                rs = [r for r in results if r.dataset == d and r.method == m and r.budget == b]
                if not rs:
                    continue
                q1, q2, q3 = _iqr([r.objective for r in rs])
                rel = "" if best_adam is None or not best_adam else f"{q2 / best_adam:.2f}x"
                metric = statistics.median(r.metric for r in rs)
                secs = statistics.median(r.seconds for r in rs)
                out.append(f"| {b} | {m} ({rs[0].setting}) | {q2:.4g} [{q1:.3g}, {q3:.3g}] | "
                           f"{rel} | {metric:.4g} | {secs:.2f} |")
    return "\n".join(out)


def format_excess(results: Sequence[Result], reference: dict[str, dict[int, float]]) -> str:
    """Per dataset and budget, the objective left to shed: each seed's objective
    minus that seed's f* (the lower of its reference optimum and every run's
    objective on it), median over seeds; the adaptive mode's against the best
    Adam's and the best fixed-batch Rprop's, and the lowest of any method's."""
    out = ["| dataset | epochs | adaptive excess | / best Adam | / fixed Rprop | "
           "lowest of any method / fixed Rprop (which) |", "|---|---:|---:|---:|---:|---:|"]

    def objective(r: Result) -> float:
        # A NaN objective (a run that broke down) has reached nothing: inf, so that
        # medians and minima stay ordered.
        return math.inf if math.isnan(r.objective) else r.objective

    def ratio(a: float, c: float) -> str:
        if c == 0:
            return "inf" if a else "0/0"
        return f"{a / c:.3g}"

    for d in dict.fromkeys(r.dataset for r in results):
        rs = [r for r in results if r.dataset == d]
        floor = dict(reference.get(d, {}))
        for r in rs:
            floor[r.seed] = min(floor.get(r.seed, math.inf), objective(r))
        for b in sorted({r.budget for r in rs}):
            excess: dict[str, float] = {}
            for m in dict.fromkeys(r.method for r in rs):
                vals = [objective(r) - floor[r.seed] for r in rs
                        if r.method == m and r.budget == b]
                if vals:
                    excess[m] = statistics.median(vals)
            if "adaptive" not in excess:
                continue
            adam = min((excess[m] for m in ("adam-32", "adam-128") if m in excess),
                       default=math.nan)
            fixed = min((excess[m] for m in excess if m.startswith("torch-rprop")),
                        default=math.nan)
            lowest = min(excess, key=lambda m: excess[m])
            out.append(f"| {d} | {b} | {excess['adaptive']:.4g} | "
                       f"{ratio(excess['adaptive'], adam) if adam == adam else '-'} | "
                       f"{ratio(excess['adaptive'], fixed) if fixed == fixed else '-'} | "
                       f"{ratio(excess[lowest], fixed) if fixed == fixed else '-'} "
                       f"({lowest}) |")
    return "\n".join(out)
