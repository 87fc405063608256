"""The benchmark engine's own arithmetic: the excess table, the reference optimum,
the full-batch iRprop+ baseline's Δ0 and the evaluation seeds. Expected values are
written out by hand, or come from NumPy's least squares and a hand-written first
Rprop step."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from rprop import _compare_minibatch as cm

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "minibatch.py"


def _result(method, seed, budget, objective):
    return cm.Result("toy", method, seed, budget, objective, 0.0, 0.0)


def test_excess_is_each_seeds_objective_above_its_floor():
    # Three seeds with uneven floors, two budgets. Floors: seed 0 the reference 1.0;
    # seed 1 no reference, its lowest run anywhere is adaptive's 1.9 at budget 3;
    # seed 2 min(reference 5.0, adam's 4.0 at budget 3) = 4.0.
    rows = {  # method: {(seed, budget): objective}
        "adaptive": {(0, 1): 1.5, (1, 1): 2.0, (2, 1): 9.0, (0, 3): 1.2, (1, 3): 1.9,
                     (2, 3): 4.5},
        "adam-32": {(0, 1): 1.1, (1, 1): 2.4, (2, 1): 4.2, (0, 3): 1.05, (1, 3): 2.2,
                    (2, 3): 4.0},
        "torch-rprop-32": {(0, 1): 3.0, (1, 1): 4.0, (2, 1): 4.3, (0, 3): 3.0,
                           (1, 3): 4.0, (2, 3): 4.3},
    }
    results = [_result(m, s, b, v) for m, cells in rows.items()
               for (s, b), v in cells.items()]
    table = cm.format_excess(results, {"toy": {0: 1.0, 2: 5.0}})
    at1, at3 = table.splitlines()[-2:]
    # Budget 1 excesses: adaptive (0.5, 0.1, 5.0) -> 0.5; adam (0.1, 0.5, 0.2) -> 0.2;
    # rprop (2.0, 2.1, 0.3) -> 2.0. By raw medians (adaptive 2.0, adam 2.4) adaptive
    # would be the lowest, and median(objective) - median(floor) would give it 0.1.
    assert at1 == "| toy | 1 | 0.5 | 2.5 | 0.25 | 0.1 (adam-32) |"
    # Budget 3: adaptive (0.2, 0.0, 0.5) -> 0.2; adam (0.05, 0.3, 0.0) -> 0.05;
    # rprop (2.0, 2.1, 0.3) -> 2.0.
    assert at3 == "| toy | 3 | 0.2 | 4 | 0.1 | 0.025 (adam-32) |"


def test_excess_treats_a_broken_down_run_as_reaching_nothing():
    results = [_result("adaptive", 0, 1, 2.0), _result("adaptive", 1, 1, 3.0),
               _result("adaptive", 2, 1, 4.0),
               _result("adam-32", 0, 1, math.nan), _result("adam-32", 1, 1, math.nan),
               _result("adam-32", 2, 1, 1.0),
               _result("torch-rprop-32", 0, 1, 6.0), _result("torch-rprop-32", 1, 1, 7.0),
               _result("torch-rprop-32", 2, 1, 8.0)]
    row = cm.format_excess(results, {"toy": {0: 1.0, 1: 1.0, 2: 1.0}}).splitlines()[-1]
    # adam's excesses (inf, inf, 0.0): median inf, so it is neither best nor lowest.
    assert row == "| toy | 1 | 2 | 0 | 0.333 | 0.333 (adaptive) |"


def _linear_task(seed=0, n=200, d=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = (x @ rng.standard_normal((d, 1)) + 0.5 * rng.standard_normal((n, 1))).astype(
        np.float32)
    t = torch.from_numpy
    return cm.Task("linear", t(x), t(y), t(x[:10]), t(y[:10]), (d, 1), False), x, y


def test_reference_optimum_reaches_the_least_squares_minimum():
    task, x, y = _linear_task()
    xa = np.hstack([x, np.ones((len(x), 1), np.float32)]).astype(np.float64)
    coef, *_ = np.linalg.lstsq(xa, y.astype(np.float64), rcond=None)
    minimum = float(np.mean((xa @ coef - y) ** 2))
    found = cm.reference_optimum(task, seed=0, evals=200)
    assert found == pytest.approx(minimum, rel=1e-5)
    assert found >= minimum * (1 - 1e-6)  # a float32 objective, not below the minimum


def test_full_batch_irprop_baseline_starts_at_its_stated_step_size():
    task, _, _ = _linear_task()
    # One epoch of full-batch iRprop+ is one step: every parameter moves by
    # -0.1 * sign(its full-data gradient).
    curve = cm.run_full_rprop(task, 3, [1], lr=0.1)
    model = task.model(3)
    loss = task.losses(model, task.x_train, task.y_train).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads, strict=True):
            p -= 0.1 * torch.sign(g)
    assert curve.objective[1] == pytest.approx(task.evaluate(model)[0], rel=1e-6)


def test_run_names_the_step_size_of_each_full_batch_baseline(monkeypatch):
    task, _, _ = _linear_task()
    monkeypatch.setattr(cm, "make_task", lambda name, seed, n: task)
    results, _ = cm.run(["linear"], ["irprop+-full", "irprop+-full-0.1"], [0], [],
                        budgets=[1])
    by_method = {r.method: r for r in results}
    assert by_method["irprop+-full"].setting == "lr=0.01"
    assert by_method["irprop+-full-0.1"].setting == "lr=0.1"
    assert by_method["irprop+-full-0.1"].objective == pytest.approx(
        cm.run_full_rprop(task, 0, [1], lr=0.1).objective[1])
    assert not math.isclose(by_method["irprop+-full"].objective,
                            by_method["irprop+-full-0.1"].objective)


def test_run_records_each_seeds_reference_optimum(monkeypatch):
    task, _, _ = _linear_task()
    monkeypatch.setattr(cm, "make_task", lambda name, seed, n: task)
    monkeypatch.setattr(cm, "REFERENCE_EVALS", 50)
    _, chosen = cm.run(["linear"], ["irprop+-full"], [0, 4], [], budgets=[1], reference=True)
    assert chosen["linear"]["reference"] == {0: cm.reference_optimum(task, 0, 50),
                                             4: cm.reference_optimum(task, 4, 50)}
    _, chosen = cm.run(["linear"], ["irprop+-full"], [0], [], budgets=[1])
    assert chosen["linear"]["reference"] == {}


@pytest.mark.parametrize(("argv", "message"), [
    (["--seed-start", "-5"], "--seed-start must be >= 0, got -5"),
    (["--seeds", "0"], "--seeds must be at least 1, got 0"),
])
def test_bad_seed_arguments_are_refused(capsys, argv, message):
    main = runpy.run_path(str(BENCHMARK))["main"]
    with pytest.raises(SystemExit) as exc:
        main(["--datasets", "diabetes", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_evaluation_seeds_may_not_overlap_the_tuning_seeds(capsys):
    main = runpy.run_path(str(BENCHMARK))["main"]
    with pytest.raises(SystemExit) as exc:
        main(["--datasets", "diabetes", "--seed-start", "99", "--seeds", "2"])
    assert exc.value.code == 2
    assert "--seed-start 99 with --seeds 2 overlaps the tuning seeds 100..101" in (
        capsys.readouterr().err)
