"""Pictures of a run: fit's history, rprop.torch.minimize's result and a
scikit-learn estimator's loss_curve_ draw to a PNG (Agg backend); the axes
hold the recorded data; importing rprop does not import matplotlib."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings

import pytest
import torch

import rprop
from rprop.plotting import plot_loss
from rprop.torch import fit

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return width, height


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).sum(dim=1)


def problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]


@pytest.mark.slow
def test_importing_rprop_and_its_torch_front_does_not_import_matplotlib():
    code = ("import sys, rprop, rprop.plotting, rprop.torch; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fit_history_draws_its_loss_and_step_sizes_per_group(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1)).double()
    opt = rprop.Rprop([{"params": model[0].parameters(), "lr": 1e-3},
                       {"params": model[2].parameters(), "lr": 0.1}], step_sizes=(1e-5, 1.0))
    hist = fit(model, loss_fn, problem(), optimizer=opt, max_epochs=30, progress=False)
    # The per-group statistics are the optimizer's own, read from its state.
    for g, group in enumerate(opt.param_groups):
        sizes = torch.cat([opt.state[p]["step_size"].reshape(-1) for p in group["params"]])
        assert hist.step_size_groups[-1][g] == (float(sizes.min()), float(sizes.median()),
                                                float(sizes.max()))
    path = tmp_path / "fit.png"
    fig = hist.plot(path)
    width, height = png_size(path)
    assert width > 100 and height > 100
    loss_ax, step_ax = fig.axes
    assert list(loss_ax.lines[0].get_ydata()) == hist.loss
    medians = {line.get_label(): list(line.get_ydata()) for line in step_ax.lines}
    for g in range(2):
        assert medians[f"group {g} (median)"] == [s[g][1] for s in hist.step_size_groups]
    assert medians["step_min = 1e-05"] == [1e-5, 1e-5]  # axhline's two end points
    # The bands hold the min..max range: the collection's path spans them.
    band = step_ax.collections[0].get_paths()[0].vertices
    lows = [s[0][0] for s in hist.step_size_groups]
    highs = [s[0][2] for s in hist.step_size_groups]
    assert min(band[:, 1]) == min(lows) and max(band[:, 1]) == max(highs)


def test_a_validation_run_draws_both_curves_and_the_kept_epoch():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    data = problem()
    hist = fit(model, loss_fn, data[:3], val_data=data[3:], patience=5, max_epochs=200,
               progress=False)
    fig = hist.plot()
    loss_ax = fig.axes[0]
    curves = {line.get_label(): list(line.get_ydata()) for line in loss_ax.lines}
    assert curves["loss"] == hist.loss and curves["validation loss"] == hist.val_loss
    assert curves[f"kept (epoch {hist.best_epoch})"] == [0, 1]  # axvline spans the axes
    assert list(loss_ax.lines[-1].get_xdata()) == [hist.best_epoch, hist.best_epoch]


def test_minimize_result_draws_its_loss_and_step_sizes(tmp_path):
    x = torch.tensor([3.0, -1.0], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 2.0], dtype=torch.float64)
    seen = []

    def closure():
        loss = ((x - target) ** 2).sum() + (x[0] * x[1]) ** 2
        seen.append(float(loss.detach()))
        return loss

    res = rprop.torch.minimize(closure, x)
    assert res.fun_history == seen and len(res.step_size_history) == res.nit
    path = tmp_path / "minimize.png"
    fig = res.plot(path)
    assert png_size(path)[0] > 100
    loss_ax, step_ax = fig.axes
    assert list(loss_ax.lines[0].get_ydata()) == seen
    assert list(step_ax.lines[0].get_ydata()) == [s[1] for s in res.step_size_history]
    assert step_ax.get_xlabel() == "iteration"


def test_a_loss_curve_from_scikit_learn_draws_the_same_way(tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.exceptions import ConvergenceWarning

    from rprop.sklearn import RpropClassifier

    X, y = load_iris(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a short run on purpose
        clf = RpropClassifier(hidden_layer_sizes=(4,), max_iter=30, random_state=0).fit(X, y)
    ax = plot_loss(clf.loss_curve_, xlabel="iteration")
    path = tmp_path / "sklearn.png"
    ax.figure.savefig(path)
    assert png_size(path)[1] > 100
    assert list(ax.lines[0].get_ydata()) == list(clf.loss_curve_)


def test_plot_loss_refuses_what_is_not_a_list_of_numbers():
    with pytest.raises(TypeError, match="loss must be a sequence of numbers"):
        plot_loss(["a", "b"])
