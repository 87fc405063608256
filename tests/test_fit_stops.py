"""rprop.torch.fit stops when the work is done: the largest gradient component
(``gtol``), every moving step size at ``step_min`` (``step_floor``), and
validation early stopping that restores the best epoch's state (``val_data``,
``val_metric``, ``restore_best``), also across a checkpoint.

Oracles: the gradient from plain autograd on the whole data set, the step
sizes read from the optimizer's state, and independent runs that stop at the
best epoch."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import rprop
from rprop.torch import fit
from rprop.torch._fit_checkpoint import atomic_save, read_verified


def problem(n: int = 48, seed: int = 3, noise: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + noise * torch.randn(n, 1, generator=g,
                                                                   dtype=torch.float64)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]


def make_model(hidden: int = 8, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Tanh(),
                               torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1)).double()


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


def autograd_gmax(model, data) -> float:
    """max |d mean-loss / d theta| by plain autograd on all the data at once."""
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    loss = ((model(x) - y) ** 2).sum(dim=1).mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return max(float(g.abs().max()) for g in grads)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_the_default_budget_is_trainrps_and_a_converged_run_stops_before_it():
    assert inspect.signature(fit).parameters["max_epochs"].default == 1000
    # A linear least-squares problem: Rprop reaches its resolution in ~70 epochs.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    hist = fit(model, loss_fn, [(x, y)], progress=False)
    assert hist.stop_reason == "step_floor" and 20 < hist.epochs < 200
    assert hist.message.startswith("the largest step size of a moving element, 1e-06, is <= "
                                   "step_min = 1e-06")


def test_gtol_stops_at_the_first_epoch_where_autograd_says_the_gradient_is_small():
    data = problem()
    # The oracle's trajectory: max |gradient| at the parameters each epoch starts from.
    seen = []
    fit(make_model(), loss_fn, data, max_epochs=120, step_floor=False, progress=False,
        callbacks=[lambda info: seen.append(autograd_gmax(info.model, data))])
    # A threshold well inside a gap between a new low and the lows before it,
    # so that the rounding of the batched sum cannot move the crossing.
    k = next(k for k in range(20, len(seen)) if seen[k] < 0.8 * min(seen[:k]))
    gtol = math.sqrt(seen[k] * min(seen[:k]))
    model = make_model()
    hist = fit(model, loss_fn, data, max_epochs=120, gtol=gtol, step_floor=False,
               progress=False)
    assert hist.stop_reason == "gtol" and hist.epochs == k + 1
    assert hist.message.startswith("the largest gradient component, ")
    assert hist.message.endswith(f"is <= gtol = {gtol:g}")
    # No step after the stop: the model is where the gradient was measured.
    assert autograd_gmax(model, data) == pytest.approx(seen[k], rel=1e-9)


def test_gtol_zero_never_stops_a_run_whose_gradient_is_not_exactly_zero():
    hist = fit(make_model(), loss_fn, problem(), max_epochs=20, gtol=0.0, step_floor=False,
               progress=False)
    assert hist.stop_reason == "max_epochs" and hist.epochs == 20


def floor_oracle(optimizer, step_min):
    """Every element with a nonzero gradient has step size == step_min (state read directly)."""
    pairs = [(p.grad, optimizer.state[p].get("step_size")) for g in optimizer.param_groups
             for p in g["params"] if p.grad is not None]
    if any(s is None for _, s in pairs):
        return not any(bool((grad != 0).any()) for grad, _ in pairs)
    return all(bool((s[grad != 0] == step_min).all()) for grad, s in pairs)


@pytest.mark.parametrize("kind", ["rprop.Rprop", "torch.optim.Rprop"])
def test_step_floor_stops_at_the_first_epoch_every_moving_step_size_is_step_min(kind):
    data = problem(seed=3)
    step_min = 1e-3

    def make(model):
        cls = rprop.Rprop if kind == "rprop.Rprop" else torch.optim.Rprop
        return cls(model.parameters(), lr=0.01, step_sizes=(step_min, 50.0))

    model = make_model(hidden=1)
    flags = []
    opt = make(model)
    fit(model, loss_fn, data, optimizer=opt, max_epochs=400, step_floor=False, progress=False,
        callbacks=[lambda info: flags.append(floor_oracle(opt, step_min))])
    assert any(flags), "the problem must reach the floor for the test to mean anything"
    k = flags.index(True)
    model = make_model(hidden=1)
    opt = make(model)
    hist = fit(model, loss_fn, data, optimizer=opt, max_epochs=400, progress=False)
    assert hist.stop_reason == "step_floor" and hist.epochs == k + 1
    assert f"is <= step_min = {step_min:g}" in hist.message
    assert hist.step_min == [step_min]


def test_step_floor_does_not_apply_to_optimizers_without_step_sizes():
    def flat(model, batch):  # a loss whose gradient is 0 everywhere
        return model(batch[0]).sum(dim=1) * 0 + 1.0

    model = make_model()
    hist = fit(model, flat, problem(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               max_epochs=5, progress=False)
    assert hist.stop_reason == "max_epochs" and hist.step_min == []
    # With Rprop, a zero gradient everywhere moves nothing, ever: stop at once.
    hist = fit(make_model(), flat, problem(), max_epochs=5, progress=False)
    assert hist.stop_reason == "step_floor" and hist.epochs == 1
    assert hist.message == "no element has a nonzero gradient: no Rprop step moves any"


# -- validation early stopping -------------------------------------------------------


def split(seed: int = 7):
    data = problem(n=40, seed=seed, noise=0.3)
    return data[:3], data[3:]


def val_of(model, val) -> float:
    """The mean validation loss in eval mode (dropout off, no random draws)."""
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(((model(x) - y) ** 2).sum(dim=1).mean())
    finally:
        model.train(training)


def test_early_stopping_restores_the_model_and_optimizer_of_the_best_validation_epoch():
    train, val = split()
    model = make_model(hidden=16, dropout=0.1)
    independent_val = []
    hist = fit(model, loss_fn, train, val_data=val, patience=15, max_epochs=500, progress=False,
               callbacks=[lambda info: independent_val.append(val_of(info.model, val))])
    assert hist.stop_reason == "patience" and model.training  # modes restored after eval
    assert "validation metric has not improved" in hist.message
    # The validation loss is what an independent evaluation gives, in eval mode.
    assert hist.val_loss == pytest.approx(independent_val, rel=1e-12)
    best = hist.best_epoch
    assert best == hist.val_loss.index(min(hist.val_loss)) and best < hist.epochs - 15
    assert hist.message.endswith(f"restored the parameters of epoch {best}")
    # An independent run that stops at the best epoch (no validation, so no
    # eval-mode passes: dropout draws the same random numbers).
    oracle = make_model(hidden=16, dropout=0.1)
    opt = rprop.Rprop([p for p in oracle.parameters()])
    fit(oracle, loss_fn, train, optimizer=opt, max_epochs=best, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(oracle), strict=True))
    # rprop.Rprop's default optimizer there: compare the two optimizers' states.
    mine = hist_optimizer_state(model, train, val)
    theirs = opt.state_dict()["state"]
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert all(torch.equal(mine[k][n], theirs[k][n]) for n in theirs[k])


def hist_optimizer_state(model, train, val):
    """The state the restoring run's optimizer holds at the end, from a rerun
    with an optimizer we can see."""
    again = make_model(hidden=16, dropout=0.1)
    opt = rprop.Rprop([p for p in again.parameters()])
    fit(again, loss_fn, train, optimizer=opt, val_data=val, patience=15, max_epochs=500,
        progress=False)
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(again), strict=True))
    return opt.state_dict()["state"]


def test_without_restore_best_the_model_is_left_where_it_stopped():
    train, val = split()
    model = make_model(hidden=16)
    hist = fit(model, loss_fn, train, val_data=val, patience=15, max_epochs=500,
               restore_best=False, progress=False)
    assert hist.stop_reason == "patience" and hist.best_epoch is None
    oracle = make_model(hidden=16)
    fit(oracle, loss_fn, train, max_epochs=hist.epochs - 1, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(oracle), strict=True))


def test_val_metric_is_called_without_grad_in_eval_mode_and_watched_by_patience():
    train, val = split()
    model = make_model(hidden=16, dropout=0.1)
    calls = []

    def metric(m):
        calls.append((torch.is_grad_enabled(), m.training))
        return torch.tensor(val_of(m, val))

    hist = fit(model, loss_fn, train, val_metric=metric, patience=15, max_epochs=500,
               progress=False)
    assert set(calls) == {(False, False)} and model.training
    assert hist.stop_reason == "patience" and len(hist.val_loss) == hist.epochs
    assert hist.best_epoch == hist.val_loss.index(min(hist.val_loss))


def test_the_checkpoint_resumes_the_restored_state(tmp_path):
    train, val = split()
    path = tmp_path / "run.pt"
    model = make_model(hidden=16)
    hist = fit(model, loss_fn, train, val_data=val, patience=15, max_epochs=500,
               checkpoint=path, progress=False)
    saved = read_verified(path)
    assert saved["epoch"] == hist.best_epoch
    assert all(torch.equal(saved["model"][k], v) for k, v in model.state_dict().items())


class Crash(Exception):
    pass


def test_a_run_killed_after_a_checkpoint_resumes_with_its_best_state(tmp_path):
    train, val = split()
    whole_model = make_model(hidden=16)
    whole = fit(whole_model, loss_fn, train, val_data=val, patience=15, max_epochs=500,
                progress=False)
    # Crash a run at an epoch past the best (its last checkpoint then holds
    # a best state older than the resume point), then resume it.
    at = whole.best_epoch + 10
    assert at < whole.epochs
    path = tmp_path / "run.pt"

    def crash(info):
        if info.epoch == at:
            raise Crash

    with pytest.raises(Crash):
        fit(make_model(hidden=16), loss_fn, train, val_data=val, patience=15, max_epochs=500,
            checkpoint=path, checkpoint_every=5, callbacks=[crash], progress=False)
    model = make_model(hidden=16)
    resumed = fit(model, loss_fn, train, val_data=val, patience=15, max_epochs=500,
                  checkpoint=path, checkpoint_every=5, progress=False)
    assert resumed.resumed_from == at - at % 5 and resumed.resumed_from > whole.best_epoch
    assert resumed.best_epoch == whole.best_epoch and resumed.loss == whole.loss
    assert resumed.val_loss == whole.val_loss
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(whole_model),
                                                   strict=True))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gtol": -1.0}, ValueError, "gtol must be a finite number >= 0"),
        ({"gtol": "small"}, TypeError, "gtol must be a number"),
        ({"step_floor": 1}, TypeError, "step_floor must be True or False"),
        ({"restore_best": None}, TypeError, "restore_best must be True or False"),
        ({"val_data": [], "val_metric": lambda m: 0.0}, ValueError, "not both"),
        ({"val_metric": 3}, TypeError, "val_metric must be a function"),
        ({"val_data": iter([])}, TypeError, "val_data is an iterator"),
        ({"val_data": 3}, TypeError, "val_data must be an iterable"),
    ],
)
def test_argument_errors_leave_everything_as_it_was(kwargs, error, match):
    model = make_model()
    before = params(model)
    with pytest.raises(error, match=match):
        fit(model, loss_fn, problem(), progress=False, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(params(model), before, strict=True))


def test_a_val_metric_that_returns_no_number_is_a_clear_error():
    with pytest.raises(TypeError, match="val_metric must return a real number"):
        fit(make_model(), loss_fn, problem(), val_metric=lambda m: "good", progress=False)


def test_a_checkpoint_whose_best_state_does_not_fit_the_model_is_refused_before_any_change(
        tmp_path):
    train, val = split()
    path = tmp_path / "run.pt"

    def crash(info):
        if info.epoch == 12:
            raise Crash

    with pytest.raises(Crash):
        fit(make_model(hidden=16), loss_fn, train, val_data=val, patience=15, max_epochs=500,
            checkpoint=path, checkpoint_every=5, callbacks=[crash], progress=False)
    payload = read_verified(path)
    assert payload["history"]["best"]["epoch"] < payload["epoch"]
    # Sealed anew (a valid digest), so only the check of the best state can refuse it.
    payload["history"]["best"]["model"]["0.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    atomic_save(payload, path)
    model = make_model(hidden=16)
    before, rng = params(model), torch.get_rng_state()
    with pytest.raises(ValueError, match=r"model entry '0.weight' has shape \(3, 3\)"):
        fit(model, loss_fn, train, val_data=val, patience=15, max_epochs=500, checkpoint=path,
            progress=False)
    assert all(torch.equal(a, b) for a, b in zip(params(model), before, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
