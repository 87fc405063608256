"""fit's arguments are all checked before the first epoch; an optimizer whose
step() needs a closure (LBFGS) gets one; the patience rule costs O(1) per
epoch and takes the same decisions as a rescan of the whole history."""

from __future__ import annotations

import math
import random

import pytest
import torch

from _helpers import loss_fn, make_model
from rprop.torch import FitHistory, fit
from rprop.torch import _fit as fit_module


def problem(n: int = 40):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return [(x[i:i + 7], y[i:i + 7]) for i in range(0, n, 7)]


def scripted(values):
    """A loss_fn whose full-dataset loss at epoch k is values[k] (one batch per epoch)."""
    calls = {"k": 0}

    def fn(model, batch):
        value = values[min(calls["k"], len(values) - 1)]
        calls["k"] += 1
        return model(batch[0]).sum(dim=1) * 0 + value

    return fn


def frozen() -> torch.nn.Module:
    return make_model().requires_grad_(False)


OTHER = torch.nn.Linear(3, 1).double()


class NeedsMore(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure, scale):  # type: ignore[override]
        return None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "net"}, TypeError, "model must be a torch.nn.Module, got str"),
        ({"model": frozen()}, ValueError, "model has no trainable parameters.*has 4 parameters"),
        ({"model": torch.nn.ReLU()}, ValueError, "model has no trainable parameters.*has 0"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be a function"),
        ({"optimizer": object()}, TypeError, "optimizer must be a torch.optim.Optimizer"),
        ({"optimizer": torch.optim.SGD(OTHER.parameters(), lr=0.1)}, ValueError,
         r"optimizer param_groups\[0\]\['params'\]\[0\] is not a parameter of model"),
        ({"callbacks": print}, TypeError, r"callbacks must be a list.*callbacks=\[f\]"),
        ({"callbacks": "log"}, TypeError, "callbacks must be a list of functions"),
        ({"callbacks": [print, 1]}, TypeError, r"callbacks\[1\] must be a function"),
        ({"callbacks": 1}, TypeError, "callbacks must be a list"),
        ({"full_batch_kwargs": [("bucket_cap_mb", 1)]}, TypeError,
         "full_batch_kwargs must be a dict"),
        ({"full_batch_kwargs": {"bucket_mb": 1}}, TypeError, r"unknown keys \['bucket_mb'\]"),
        ({"full_batch_kwargs": {"process_group": None}}, TypeError, "fit's own process_group"),
        ({"full_batch_kwargs": {"bucket_cap_mb": 0}}, ValueError, "bucket_cap_mb must be"),
        ({"full_batch_kwargs": {"bucket_cap_mb": math.inf}}, ValueError, "bucket_cap_mb must be"),
        ({"full_batch_kwargs": {"fsdp_sync_each_batch": "yes"}}, TypeError,
         "fsdp_sync_each_batch must be True or False"),
    ],
)
def test_bad_arguments_are_refused_before_the_first_epoch(kwargs, error, match):
    calls = []

    def counting_loss(model, batch):
        calls.append(1)
        return loss_fn(model, batch)

    kwargs = dict(kwargs)
    model = kwargs.pop("model", make_model())
    owned = model.parameters() if isinstance(model, torch.nn.Module) else []
    before = [p.detach().clone() for p in owned]
    rng = torch.get_rng_state()
    args = {"loss_fn": counting_loss, **kwargs}
    with pytest.raises(error, match=match):
        fit(model, args.pop("loss_fn"), problem(), max_epochs=3, progress=False, **args)
    assert calls == []  # no pass over the data ran
    after = model.parameters() if isinstance(model, torch.nn.Module) else []
    assert all(torch.equal(p, b) for p, b in zip(after, before, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_step_that_needs_more_than_a_closure_is_refused():
    model = make_model()
    with pytest.raises(TypeError, match=r"optimizer.step\(\) requires \['closure', 'scale'\]"):
        fit(model, loss_fn, problem(), optimizer=NeedsMore(model.parameters()), progress=False)


def test_valid_arguments_still_work():
    model = make_model()
    hist = fit(model, loss_fn, problem(), max_epochs=3, progress=False, callbacks=(lambda i: None,),
               full_batch_kwargs={"bucket_cap_mb": 1, "fsdp_sync_each_batch": False})
    assert hist.epochs == 3
    # Frozen parameters are allowed, as long as some are trainable; an
    # optimizer over a subset of the model's parameters too.
    model = make_model()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.01)
    assert fit(model, loss_fn, problem(), optimizer=opt, max_epochs=2, progress=False).epochs == 2


def test_lbfgs_gets_a_closure_that_re_evaluates_the_full_batch_loss():
    # Oracle: torch's LBFGS driven by the usual closure on the whole dataset
    # at once (mean loss, plain autograd).
    data = problem()
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    ref = make_model()
    ref_opt = torch.optim.LBFGS(ref.parameters(), max_iter=4, history_size=5)
    ref_losses = []

    def closure():
        ref_opt.zero_grad()
        loss = loss_fn(ref, (x, y)).mean()
        loss.backward()
        return loss

    for _ in range(4):
        ref_losses.append(closure().item())
        ref_opt.step(closure)

    model = make_model()
    passes = []

    def counted(m, batch):
        passes.append(1)
        return loss_fn(m, batch)

    opt = torch.optim.LBFGS(model.parameters(), max_iter=4, history_size=5)
    hist = fit(model, counted, data, optimizer=opt, max_epochs=4, progress=False)
    assert hist.stop_reason == "max_epochs" and hist.epochs == 4
    assert hist.loss == pytest.approx(ref_losses, rel=1e-10)
    assert ref_losses[-1] < 0.5 * ref_losses[0]  # it trained
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    # Each epoch: one evaluation by fit, then LBFGS's further ones; its first
    # closure call reuses fit's evaluation rather than running another pass.
    closure_calls = opt.state[opt._params[0]]["func_evals"]  # LBFGS's count, all steps
    assert closure_calls > 4
    assert len(passes) == (4 + closure_calls - 4) * len(data)


# -- patience ------------------------------------------------------------------------


def old_rule_stops(losses: list[float], patience: int, min_improvement: float) -> bool:
    """The patience rule as a rescan of the whole history (the reference)."""
    if len(losses) <= patience:
        return False
    best, since = math.inf, 0
    for value in losses:
        if value < best - min_improvement * abs(best) or best == math.inf:
            best, since = value, 0
        else:
            since += 1
    return since >= patience


def random_losses(rng: random.Random, n: int) -> list[float]:
    """Plateaus, ties, small and large improvements and setbacks."""
    value, out = rng.uniform(1, 10), []
    for _ in range(n):
        move = rng.choice(["same", "same", "down a bit", "down", "up"])
        if move == "down a bit":
            value *= 1 - rng.choice([0.001, 0.01, 0.04, 0.06])
        elif move == "down":
            value *= rng.uniform(0.3, 0.9)
        elif move == "up":
            value *= rng.uniform(1.0, 1.5)
        out.append(value)
    return out


def test_patience_decisions_match_a_rescan_of_the_whole_history():
    rng = random.Random(11)
    stopped = 0
    for _ in range(40):
        values = random_losses(rng, 25)
        patience = rng.randint(1, 12)
        min_improvement = rng.choice([0.0, 0.0, 0.02, 0.05, 0.3])
        hist = fit(make_model(), scripted(values), [problem()[0]], max_epochs=25,
                   patience=patience, min_improvement=min_improvement, step_floor=False,
                   progress=False)
        stops = [k for k in range(1, hist.epochs + 1)
                 if old_rule_stops(hist.loss[:k], patience, min_improvement)]
        if hist.stop_reason == "patience":
            stopped += 1
            assert stops == [hist.epochs], (values, patience, min_improvement)
        else:
            assert hist.stop_reason == "max_epochs" and hist.epochs == 25 and stops == []
    assert 10 <= stopped <= 35, stopped  # both outcomes were exercised (31 here)


def test_a_resumed_run_keeps_counting_patience_from_its_history(tmp_path):
    values = [5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 2.0, 1.0, 1.0]
    whole = fit(make_model(), scripted(values), [problem()[0]], max_epochs=10, patience=4,
                step_floor=False, progress=False)
    path = tmp_path / "run.pt"
    fit(make_model(), scripted(values), [problem()[0]], max_epochs=4, patience=4,
        checkpoint=path, step_floor=False, progress=False)
    resumed = fit(make_model(), scripted(values[4:]), [problem()[0]], max_epochs=10, patience=4,
                  checkpoint=path, step_floor=False, progress=False)
    assert whole.stop_reason == resumed.stop_reason == "patience"
    assert resumed.loss == whole.loss and whole.epochs == 7


class ReadCountingList(list):
    """A list that counts the elements read from it."""

    reads = 0

    def __iter__(self):
        ReadCountingList.reads += len(self)
        return super().__iter__()

    def __getitem__(self, i):
        ReadCountingList.reads += 1
        return super().__getitem__(i)


class CountingHistory(FitHistory):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss = ReadCountingList(self.loss)


def test_patience_costs_o1_per_epoch_not_a_rescan_of_the_history(monkeypatch):
    monkeypatch.setattr(fit_module, "FitHistory", CountingHistory)
    ReadCountingList.reads = 0
    epochs = 300
    values = [1.0 / (k + 1) for k in range(epochs)]  # always improving: never stops
    hist = fit(make_model(), scripted(values), [problem()[0]], max_epochs=epochs, patience=3,
               step_floor=False, progress=False)
    assert isinstance(hist.loss, ReadCountingList) and hist.epochs == epochs
    # A rescan per epoch reads ~epochs**2 / 2 = 45000 elements.
    assert ReadCountingList.reads <= 2 * epochs, ReadCountingList.reads
