"""The engine behind ``rprop compare``: optimisers × problems × seeds, counted fairly.

Protocol (also printed by the command and written up in docs/benchmarks.md):

* Every method sees the same instance per (problem, seed): same data, same
  start (:mod:`rprop.problems`).
* A *gradient evaluation* is one call of the closure (a full-batch forward and
  backward pass). Rprop and Adam call it once per step; L-BFGS calls it as many
  times as its line search needs, and every call counts.
* A run stops at the first evaluation whose loss is at or below the problem's
  goal (success, counted at that evaluation), when the budget of evaluations
  is spent, or when the loss is not finite (failure).
* Hyperparameters are fixed per method, the same on every problem (no tuning
  per problem): see :data:`METHODS`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from rprop import problems as _problems

RPROP_LR = 0.01
ADAM_LR = 0.01


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    make: Callable[[list[Any]], Any] = field(repr=False)


def _rprop(variant: str) -> Callable[[list[Any]], Any]:
    def make(params: list[Any]) -> Any:
        import rprop

        return rprop.Rprop(params, lr=RPROP_LR, variant=variant)

    return make


# GRprop as R's neuralnet runs it: learningrate.limit (1e-10, 0.1). With the
# classic bound of 50 the adjusted step size (often -sum / tiny gradient) hits
# 50 at almost every step, and the runs diverge.
GRPROP_STEP_SIZES = (1e-10, 0.1)


def _grprop(variant: str) -> Callable[[list[Any]], Any]:
    def make(params: list[Any]) -> Any:
        import rprop

        return rprop.Rprop(params, lr=RPROP_LR, step_sizes=GRPROP_STEP_SIZES, variant=variant)

    return make


def _torch_rprop(params: list[Any]) -> Any:
    import torch

    return torch.optim.Rprop(params, lr=RPROP_LR)


def _adam(params: list[Any]) -> Any:
    import torch

    return torch.optim.Adam(params, lr=ADAM_LR)


def _lbfgs(params: list[Any]) -> Any:
    import torch

    return torch.optim.LBFGS(params, lr=1.0, max_iter=20, history_size=10,
                             line_search_fn="strong_wolfe")


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rprop+", f"rprop.Rprop(lr={RPROP_LR}, variant='rprop+')", _rprop("rprop+")),
        Method("rprop-", f"rprop.Rprop(lr={RPROP_LR}, variant='rprop-')", _rprop("rprop-")),
        Method("irprop+", f"rprop.Rprop(lr={RPROP_LR}, variant='irprop+')", _rprop("irprop+")),
        Method("irprop-", f"rprop.Rprop(lr={RPROP_LR}, variant='irprop-')", _rprop("irprop-")),
        *(Method(v, f"rprop.Rprop(lr={RPROP_LR}, step_sizes={GRPROP_STEP_SIZES}, "
                    f"variant='{v}')", _grprop(v)) for v in ("grprop-sag", "grprop-slr")),
        Method("torch-rprop", f"torch.optim.Rprop(lr={RPROP_LR})", _torch_rprop),
        Method("adam", f"torch.optim.Adam(lr={ADAM_LR})", _adam),
        Method("lbfgs", "torch.optim.LBFGS(lr=1, max_iter=20, history_size=10, "
               "line_search_fn='strong_wolfe')", _lbfgs),
    )
}

DEFAULT_SEEDS = 10
QUICK_PROBLEMS = ("rosenbrock", "parity", "linear-fit")
QUICK_SEEDS = 2
QUICK_BUDGET = 150


@dataclass
class Run:
    """One method on one problem from one seed."""

    problem: str
    method: str
    seed: int
    goal: float
    budget: int
    evals: int = 0
    evals_to_goal: int | None = None
    final_loss: float = math.nan
    time_s: float = 0.0
    losses: list[float] = field(default_factory=list, repr=False)

    @property
    def success(self) -> bool:
        return self.evals_to_goal is not None


class _Stop(Exception):
    """Raised from inside the closure to end a run mid-step (L-BFGS evaluates
    several times per step; the budget and the goal hold per evaluation)."""


def run_one(
    problem: _problems.Problem, method: Method, seed: int, budget: int | None = None
) -> Run:
    """One run, stopped at the goal, at the budget or at a non-finite loss."""
    budget = problem.budget if budget is None else budget
    inst = problem.build(seed)
    opt = method.make(inst.params)
    run = Run(problem.name, method.name, seed, problem.goal, budget)

    def closure() -> Any:
        if run.evals >= budget:
            raise _Stop
        opt.zero_grad()
        loss = inst.loss()
        loss.backward()
        value = float(loss.detach())
        run.evals += 1
        run.losses.append(value)
        run.final_loss = value
        if value <= problem.goal:
            run.evals_to_goal = run.evals
            raise _Stop
        if not math.isfinite(value):
            raise _Stop
        return loss

    start = time.perf_counter()
    try:
        while True:
            opt.step(closure)
    except _Stop:
        pass
    run.time_s = time.perf_counter() - start
    return run


@dataclass
class Summary:
    """One method on one problem, over the seeds."""

    problem: str
    method: str
    goal: float
    budget: int
    seeds: int
    successes: int
    median_evals_to_goal: float | None
    median_final_loss: float
    median_time_s: float

    @property
    def success_rate(self) -> float:
        return self.successes / self.seeds


def summarize(runs: Iterable[Run]) -> list[Summary]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault((r.problem, r.method), []).append(r)
    out = []
    for (prob, meth), rs in groups.items():
        hits = [r.evals_to_goal for r in rs if r.evals_to_goal is not None]
        out.append(Summary(
            prob, meth, rs[0].goal, rs[0].budget, len(rs), len(hits),
            statistics.median(hits) if hits else None,
            statistics.median(r.final_loss for r in rs),
            statistics.median(r.time_s for r in rs),
        ))
    return out


def _refuse_duplicates(kind: str, items: Sequence[Any]) -> None:
    seen = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{kind} {item!r} is listed more than once")
        seen.add(item)


def plan(
    problem_names: Sequence[str] | None, method_names: Sequence[str] | None,
    seeds: Sequence[int] | None, quick: bool,
) -> tuple[list[_problems.Problem], list[Method], list[int], int | None]:
    """Resolve the selections and the budget override: a ValueError on an unknown name
    or on one listed twice (it would run twice and count twice in the summary), an
    ImportError for a problem whose optional package is missing."""
    if problem_names:
        probs = [_problems.get(n) for n in problem_names]
        _refuse_duplicates("problem", [p.name for p in probs])
        for p in probs:
            if not p.is_available:
                raise ImportError(f"problem {p.name!r} needs scikit-learn: "
                                  "pip install 'rprop[datasets]'")
    elif quick:
        probs = [_problems.get(n) for n in QUICK_PROBLEMS]
    else:
        probs = _problems.available()
    unknown = [n for n in method_names or () if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    meths = [METHODS[n] for n in method_names] if method_names else list(METHODS.values())
    _refuse_duplicates("method", [m.name for m in meths])
    if seeds is None:
        seeds = range(QUICK_SEEDS if quick else DEFAULT_SEEDS)
    _refuse_duplicates("seed", list(seeds))
    return probs, meths, list(seeds), QUICK_BUDGET if quick else None


def compare(
    probs: Sequence[_problems.Problem], meths: Sequence[Method], seeds: Sequence[int],
    budget: int | None = None, progress: bool = False,
) -> list[Run]:
    """Every method on every problem from every seed, on one CPU thread."""
    import torch
    from tqdm import tqdm

    jobs = [(p, m, s) for p in probs for m in meths for s in seeds]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = []
    try:
        with tqdm(jobs, desc="compare", unit="run", disable=not progress, leave=False) as bar:
            for p, m, s in bar:
                bar.set_postfix_str(f"{p.name} {m.name}", refresh=False)
                runs.append(run_one(p, m, s, budget))
    finally:
        torch.set_num_threads(threads)
    return runs


def protocol(probs: Sequence[_problems.Problem], meths: Sequence[Method],
             seeds: Sequence[int], budget: int | None) -> dict[str, Any]:
    return {
        "gradient_evaluation": "one closure call: a full-batch forward and backward pass "
                               "(L-BFGS: every call of its closure counts)",
        "success": "the first gradient evaluation whose loss is <= the problem's goal",
        "stop": "at the goal, at the budget of gradient evaluations, or at a non-finite loss",
        "threads": 1,
        "seeds": list(seeds),
        "problems": [
            {"name": p.name, "description": p.title, "source": p.source, "goal": p.goal,
             "budget": p.budget if budget is None else budget}
            for p in probs
        ],
        "methods": [{"name": m.name, "setting": m.description} for m in meths],
    }


def protocol_text(proto: dict[str, Any]) -> str:
    seeds = proto["seeds"]
    seed_text = (f"{seeds[0]}..{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1))
                 and len(seeds) > 2 else ", ".join(map(str, seeds)))
    lines = [
        f"Protocol: {len(seeds)} seed(s) ({seed_text}) per method and problem; same data and "
        "start for every method.",
        "  A gradient evaluation is one full-batch forward+backward (closure call); L-BFGS",
        "  counts every call its line search makes. A run succeeds at the first evaluation",
        "  with loss <= goal and stops there, or stops at the budget or a non-finite loss.",
        "  One CPU thread; times are wall-clock per run (median over seeds).",
        "  Problems (goal, budget of gradient evaluations):",
    ]
    for p in proto["problems"]:
        lines.append(f"    {p['name']:<11} goal {p['goal']:<7g} budget {p['budget']:<5d} "
                     f"{p['description']}")
    lines.append("  Methods (one setting each, no per-problem tuning):")
    for m in proto["methods"]:
        lines.append(f"    {m['name']:<11} {m['setting']}")
    return "\n".join(lines)


def format_table(summaries: Sequence[Summary], markdown: bool = False) -> str:
    head = ["problem", "method", "success", "median evals", "final loss", "time/run"]
    rows = []
    for s in summaries:
        rows.append([
            s.problem, s.method, f"{s.successes}/{s.seeds}",
            "-" if s.median_evals_to_goal is None else f"{s.median_evals_to_goal:g}",
            f"{s.median_final_loss:.2e}",
            f"{s.median_time_s * 1e3:.0f} ms" if s.median_time_s < 10
            else f"{s.median_time_s:.1f} s",
        ])
    right = {2, 3, 4, 5}
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) if rows else len(head[i])
              for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    lines = [fmt(head)]
    if markdown:
        lines.append("|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                                    for i, w in enumerate(widths)) + "|")
    else:
        lines.append("  ".join("-" * w for w in widths))
    prev = None
    for r in rows:
        if markdown or r[0] != prev:
            lines.append(fmt(r))
        else:
            lines.append(fmt(["", *r[1:]]))
        prev = r[0]
    return "\n".join(lines)


def to_json(proto: dict[str, Any], runs: Sequence[Run]) -> dict[str, Any]:
    return {
        "protocol": proto,
        "summary": [{**asdict(s), "success_rate": s.success_rate} for s in summarize(runs)],
        "runs": [{k: v for k, v in asdict(r).items() if k != "losses"} | {"success": r.success}
                 for r in runs],
    }


def figure(runs: Sequence[Run]) -> Any:
    """Loss against gradient evaluations: per problem, per method, the median over
    seeds of the best loss so far (a run that stopped at the goal stays there).
    A ``matplotlib.figure.Figure``, built without pyplot (no backend, no global
    state); the caller saves it (``rprop compare --plot``)."""
    import numpy as np
    from matplotlib.figure import Figure

    probs = list(dict.fromkeys(r.problem for r in runs))
    meths = list(dict.fromkeys(r.method for r in runs))
    cols = min(4, len(probs))
    rows = math.ceil(len(probs) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = {m: f"C{i % 10}" for i, m in enumerate(meths)}
    styles = {"torch-rprop": ":"}
    for ax, prob in zip(axes.flat, probs, strict=False):
        goal = None
        for meth in meths:
            rs = [r for r in runs if r.problem == prob and r.method == meth and r.losses]
            if not rs:
                continue
            goal = rs[0].goal
            n = max(len(r.losses) for r in rs)
            curves = np.full((len(rs), n), np.nan)
            for i, r in enumerate(rs):
                best = np.fmin.accumulate(np.asarray(r.losses, dtype=float))
                curves[i, : len(best)] = best
                curves[i, len(best):] = best[-1]
            med = np.nanmedian(curves, axis=0)
            ax.plot(np.arange(1, n + 1), np.clip(med, 1e-12, None), label=meth,
                    color=colors[meth], linestyle=styles.get(meth, "-"), linewidth=1.2)
        if goal is not None:
            ax.axhline(goal, color="0.5", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(prob, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("gradient evaluations", fontsize=7)
    for ax in list(axes.flat)[len(probs):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(meths), fontsize=8, frameon=False)
    fig.suptitle("loss (median over seeds of the best so far) vs gradient evaluations; "
                 "dashed: goal", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    return fig
