"""rprop.torch.fit in one process: history, stopping rules, progress output,
atomic checkpoints and bitwise resume. (Across processes: test_distributed.py.)"""

from __future__ import annotations

import math
import os
import runpy
import signal
from pathlib import Path

import pytest
import torch

import rprop
from rprop.torch import EpochInfo, FitHistory, fit, full_batch_backward
from rprop.torch import _fit as fit_module

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def problem(n: int = 40):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return [(x[i:i + 7], y[i:i + 7]) for i in range(0, n, 7)]


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(8, 1)).double()


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def scripted(values):
    """A loss_fn whose full-dataset loss at epoch k is values[k] (one batch per epoch)."""
    calls = {"k": 0}

    def fn(model, batch):
        value = values[min(calls["k"], len(values) - 1)]
        calls["k"] += 1
        out = model(batch[0]).sum(dim=1)
        return out * 0 + value

    return fn


def test_history_and_equivalence_with_the_hand_written_loop():
    data = problem()
    model = make_model()
    hist = fit(model, loss_fn, data, max_epochs=15, progress=False)
    assert isinstance(hist, FitHistory)
    assert hist.stop_reason == "max_epochs" and hist.epochs == 15 and hist.resumed_from is None
    assert len(hist.time) == len(hist.step_size) == 15
    assert all(b >= a for a, b in zip(hist.time, hist.time[1:]))
    for lo, med, hi in hist.step_size:
        assert 0 < lo <= med <= hi
    assert hist.best_loss == min(hist.loss)

    ref = make_model()
    opt = rprop.Rprop(ref.parameters(), variant="irprop+")
    losses = []
    for _ in range(15):
        loss = full_batch_backward(ref, loss_fn, data)
        losses.append(float(loss))
        opt.step(loss=loss)
    assert hist.loss == losses
    for a, b in zip(params(model), params(ref), strict=True):
        assert torch.equal(a, b)


def test_given_optimizer_and_other_optimizers():
    data = problem()
    model = make_model()
    opt = rprop.Rprop(model.parameters(), variant="rprop-", lr=0.05)
    hist = fit(model, loss_fn, data, optimizer=opt, max_epochs=5, progress=False)
    assert opt.state[model[0].weight]["step"] == 5 and hist.epochs == 5
    adam_model = make_model()
    adam = torch.optim.Adam(adam_model.parameters(), lr=0.01)  # stepped with step()
    hist = fit(adam_model, loss_fn, data, optimizer=adam, max_epochs=5, progress=False)
    assert hist.loss[-1] < hist.loss[0] and hist.step_size == [None] * 5


def test_default_variant_is_irprop_plus_and_variant_is_honoured():
    data = problem()
    a, b = make_model(), make_model()
    fit(a, loss_fn, data, max_epochs=6, progress=False)
    fit(b, loss_fn, data, max_epochs=6, progress=False, variant="irprop+")
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    c = make_model()
    hist_c = fit(c, loss_fn, data, max_epochs=6, progress=False, variant="rprop+")
    assert hist_c.epochs == 6


def test_target_loss_stops_before_stepping():
    data = problem()
    model = make_model()
    hist = fit(model, loss_fn, data, max_epochs=500, target_loss=0.05, progress=False)
    assert hist.stop_reason == "target_loss"
    assert hist.loss[-1] <= 0.05 < min(hist.loss[:-1])
    # no step after the last evaluation: the model is at the loss reported
    assert float(full_batch_backward(model, loss_fn, data)) == hist.loss[-1]


def test_patience_and_min_improvement():
    data = problem()[:1]
    hist = fit(make_model(), scripted([5.0] * 10), data, max_epochs=10, patience=3,
               step_floor=False, progress=False)
    assert hist.stop_reason == "patience" and hist.epochs == 4
    # 10% better, then 0.1% and 0.06% better: not enough for min_improvement=1%.
    values = [10.0, 9.0, 8.99, 8.985, 8.0]
    hist = fit(make_model(), scripted(values), data, max_epochs=10, patience=2,
               min_improvement=0.01, step_floor=False, progress=False)
    assert hist.stop_reason == "patience" and hist.loss == values[:4]
    hist = fit(make_model(), scripted(values), data, max_epochs=5, patience=2, step_floor=False,
               progress=False)
    assert hist.stop_reason == "max_epochs"


def test_nonfinite_loss_stops():
    data = problem()[:1]
    model = make_model()
    before = None

    def record(info):
        nonlocal before
        before = params(info.model)

    hist = fit(model, scripted([3.0, 2.0, math.nan, 1.0]), data, max_epochs=10,
               callbacks=[record], step_floor=False, progress=False)
    assert hist.stop_reason == "nonfinite" and hist.epochs == 3
    assert all(torch.equal(a, b) for a, b in zip(before, params(model)))


def test_callbacks_see_each_epoch_and_can_stop():
    seen: list[EpochInfo] = []

    def cb(info):
        seen.append(info)
        return info.epoch == 4

    data = problem()
    model = make_model()
    hist = fit(model, loss_fn, data, max_epochs=20, callbacks=[cb, lambda info: None],
               progress=False)
    assert hist.stop_reason == "callback" and hist.epochs == 5
    assert [i.epoch for i in seen] == list(range(5))
    assert [i.loss for i in seen] == hist.loss
    assert seen[0].model is model and seen[0].history is hist
    assert isinstance(seen[0].optimizer, rprop.Rprop)


def test_data_as_function_and_generators_refused():
    data = problem()
    hist = fit(make_model(), loss_fn, lambda: iter(data), max_epochs=3, progress=False)
    assert hist.epochs == 3
    with pytest.raises(TypeError, match="iterator"):
        fit(make_model(), loss_fn, (b for b in data), max_epochs=3, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"optimizer": "x", "variant": "irprop+"}, ValueError, "variant= only without"),
        ({"variant": "nope"}, ValueError, "variant"),
        ({"max_epochs": -1}, ValueError, "max_epochs"),
        ({"max_epochs": 2.0}, ValueError, "max_epochs"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every"),
        ({"patience": 0}, ValueError, "patience"),
        ({"min_improvement": 1.0}, ValueError, "min_improvement"),
        ({"target_loss": "low"}, TypeError, "target_loss"),
        ({"target_loss": float("nan")}, ValueError, "target_loss must not be NaN"),
    ],
)
def test_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fit(make_model(), loss_fn, problem(), progress=False, **kwargs)


def test_progress_output(capsys):
    fit(make_model(), loss_fn, problem(), max_epochs=3, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    fit(make_model(), loss_fn, problem(), max_epochs=3, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "step=[" in err


# -- checkpoints ---------------------------------------------------------------------


def test_resume_after_a_crash_is_bitwise_the_uninterrupted_run(tmp_path):
    data = problem()
    whole_model = make_model(dropout=0.2)
    torch.manual_seed(7)  # dropout draws random numbers: the RNG state is checkpointed
    whole = fit(whole_model, loss_fn, data, max_epochs=14, progress=False)

    ckpt = tmp_path / "run.pt"

    def crash(info):
        if info.epoch == 8:
            raise KeyboardInterrupt

    crashed = make_model(dropout=0.2)
    torch.manual_seed(7)
    with pytest.raises(KeyboardInterrupt):
        fit(crashed, loss_fn, data, max_epochs=14, progress=False,
            checkpoint=ckpt, checkpoint_every=3, callbacks=[crash])
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 6
    torch.manual_seed(12345)  # a different init and RNG state: all come from the file
    model = make_model(dropout=0.2)
    resumed = fit(model, loss_fn, data, max_epochs=14, progress=False, checkpoint=ckpt,
                  checkpoint_every=3)
    assert resumed.resumed_from == 6
    assert resumed.loss == whole.loss and resumed.step_size == whole.step_size
    assert resumed.stop_reason == "max_epochs"
    for a, b in zip(params(model), params(whole_model), strict=True):
        assert torch.equal(a, b)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 14


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler, whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_the_epoch_then_stops(tmp_path, capsys, python_sigint_handler, presses):
    """One Ctrl-C: the epoch finishes, is saved, then KeyboardInterrupt, and
    resuming is bitwise the uninterrupted run. Two: the second stops at once
    (the last checkpoint is the periodic one)."""
    data = problem()
    whole_model = make_model()
    whole = fit(whole_model, loss_fn, data, max_epochs=12, progress=False)

    def press(info):
        if info.epoch == 7:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(make_model(), loss_fn, data, max_epochs=12, progress=False, checkpoint=ckpt,
            checkpoint_every=5, callbacks=[press])
    assert torch.load(ckpt, weights_only=True)["epoch"] == (8 if presses == 1 else 5)
    assert "finishing this step and saving the checkpoint" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    model = make_model()
    resumed = fit(model, loss_fn, data, max_epochs=12, progress=False, checkpoint=ckpt)
    assert resumed.loss == whole.loss
    for a, b in zip(params(model), params(whole_model), strict=True):
        assert torch.equal(a, b)


def test_ctrl_c_in_the_last_epoch_still_interrupts(tmp_path, python_sigint_handler):
    def press(info):
        if info.epoch == 3:
            os.kill(os.getpid(), signal.SIGINT)

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(make_model(), loss_fn, problem(), max_epochs=4, progress=False, checkpoint=ckpt,
            callbacks=[press])
    assert torch.load(ckpt, weights_only=True)["epoch"] == 4


def test_ctrl_c_handler_leaves_a_handler_installed_meanwhile(tmp_path, python_sigint_handler):
    def mine(signum, frame):
        pass

    def install(info):
        if info.epoch == 1:
            signal.signal(signal.SIGINT, mine)

    fit(make_model(), loss_fn, problem(), max_epochs=3, progress=False,
        checkpoint=tmp_path / "run.pt", callbacks=[install])
    assert signal.getsignal(signal.SIGINT) is mine


def test_ctrl_c_in_a_fit_inside_a_fit(tmp_path, python_sigint_handler):
    """The inner run (a callback of the outer) owns Ctrl-C while it runs."""
    inner_epochs = []

    def press(info):
        inner_epochs.append(info.epoch)
        if info.epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    def inner(info):
        if info.epoch == 1:
            fit(make_model(), loss_fn, problem(), max_epochs=50, progress=False,
                checkpoint=tmp_path / "inner.pt", callbacks=[press])

    with pytest.raises(KeyboardInterrupt):
        fit(make_model(), loss_fn, problem(), max_epochs=5, progress=False,
            checkpoint=tmp_path / "outer.pt", callbacks=[inner])
    assert inner_epochs == [0, 1]
    assert torch.load(tmp_path / "inner.pt", weights_only=True)["epoch"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_finished_runs_resume_too(tmp_path):
    data = problem()
    ckpt = tmp_path / "run.pt"
    first = fit(make_model(), loss_fn, data, max_epochs=5, progress=False, checkpoint=ckpt)
    again = fit(make_model(), loss_fn, data, max_epochs=5, progress=False, checkpoint=ckpt)
    assert again.loss == first.loss and again.resumed_from == 5
    longer = fit(make_model(), loss_fn, data, max_epochs=9, progress=False, checkpoint=ckpt)
    straight = fit(make_model(), loss_fn, data, max_epochs=9, progress=False)
    assert longer.loss == straight.loss
    # A run that stopped on target_loss took no step at its last epoch; resuming
    # re-evaluates that epoch and stops the same way.
    ckpt2 = tmp_path / "target.pt"
    stopped = fit(make_model(), loss_fn, data, max_epochs=300, target_loss=0.1,
                  progress=False, checkpoint=ckpt2)
    again = fit(make_model(), loss_fn, data, max_epochs=300, target_loss=0.1,
                progress=False, checkpoint=ckpt2)
    assert stopped.stop_reason == again.stop_reason == "target_loss"
    assert again.loss == stopped.loss


def test_checkpoint_path_is_checked_before_the_first_epoch(tmp_path):
    model = make_model()
    before = params(model)
    cases = [
        (tmp_path / "no-such-folder" / "run.pt", ValueError, "the folder .* does not exist"),
        (tmp_path, ValueError, "must be a file path, got the folder"),
        (3, TypeError, "checkpoint must be a file path or None, got int"),
    ]
    for checkpoint, error, match in cases:
        with pytest.raises(error, match=match):
            fit(model, loss_fn, problem(), max_epochs=5, progress=False, checkpoint=checkpoint)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot write in"):
            fit(model, loss_fn, problem(), max_epochs=5, progress=False,
                checkpoint=locked / "run.pt")
    for a, b in zip(params(model), before, strict=True):
        assert torch.equal(a, b)  # no epoch ran


def test_resuming_with_another_variant_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    fit(make_model(), loss_fn, problem(), max_epochs=3, progress=False, checkpoint=ckpt,
        variant="rprop-")
    saved = ckpt.read_bytes()
    with pytest.raises(ValueError, match=r"written with variant rprop-, and this call asks for "
                                         r"'irprop\+'"):
        fit(make_model(), loss_fn, problem(), max_epochs=6, progress=False, checkpoint=ckpt,
            variant="irprop+")
    assert ckpt.read_bytes() == saved  # nothing the user saved is touched
    again = fit(make_model(), loss_fn, problem(), max_epochs=6, progress=False, checkpoint=ckpt,
                variant="RPROP-")  # the same variant, spelled otherwise
    assert again.resumed_from == 3
    later = fit(make_model(), loss_fn, problem(), max_epochs=8, progress=False, checkpoint=ckpt)
    assert later.resumed_from == 6  # no variant asked for: the saved one goes on


def test_a_torch_rprop_checkpoint_resumes_as_irprop_minus(tmp_path):
    ckpt = tmp_path / "run.pt"
    model = make_model()
    fit(model, loss_fn, problem(), max_epochs=3, progress=False, checkpoint=ckpt,
        optimizer=torch.optim.Rprop(model.parameters()))
    again = fit(make_model(), loss_fn, problem(), max_epochs=5, progress=False,
                checkpoint=ckpt, variant="irprop-")
    assert again.resumed_from == 3
    with pytest.raises(ValueError, match=r"written with variant irprop-, and this call asks for "
                                         r"'rprop\+'"):
        fit(make_model(), loss_fn, problem(), max_epochs=6, progress=False, checkpoint=ckpt,
            variant="rprop+")


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    data = problem()
    ckpt = tmp_path / "run.pt"
    fit(make_model(), loss_fn, data, max_epochs=2, progress=False, checkpoint=ckpt)
    good = ckpt.read_bytes()

    real_save = torch.save

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        fit(make_model(), loss_fn, data, max_epochs=4, progress=False, checkpoint=ckpt,
            checkpoint_every=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.read_bytes() == good  # the old checkpoint, intact
    assert sorted(os.listdir(tmp_path)) == ["run.pt"]  # no temporary file left
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


def test_atomic_save_fsyncs_then_replaces(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(fit_module.os, "fsync", lambda fd: (calls.append("fsync"),
                                                            real_fsync(fd))[1])
    monkeypatch.setattr(fit_module.os, "replace", lambda a, b: (calls.append("replace"),
                                                                real_replace(a, b))[1])
    target = tmp_path / "x.pt"
    fit_module.atomic_save({"a": torch.ones(2)}, target)
    assert calls[:2] == ["fsync", "replace"]
    assert Path(target).exists() and torch.load(target, weights_only=True)["a"].sum() == 2


def test_not_a_fit_checkpoint(tmp_path):
    bad = tmp_path / "other.pt"
    torch.save({"something": 1}, bad)
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        fit(make_model(), loss_fn, problem(), max_epochs=2, progress=False, checkpoint=bad)


def test_example_runs_in_one_process(capsys):
    example = runpy.run_path(str(EXAMPLES / "distributed_full_batch.py"))
    loss = example["main"](["--epochs", "25", "--samples", "400"])
    out = capsys.readouterr().out
    assert "ranks: 1" in out and f"final loss {loss:.6f}" in out


def test_numpy_numbers_are_accepted():
    import numpy as np

    hist = fit(make_model(), loss_fn, problem(), max_epochs=np.int64(3),
               target_loss=np.float32(1e-12), progress=False)
    assert len(hist.loss) == 3


def test_checkpoint_file_follows_the_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        path = tmp_path / "ckpt.pt"
        fit(make_model(), loss_fn, problem(), max_epochs=2, progress=False, checkpoint=path)
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
