"""lr only seeds step sizes (with a warning when changed); iRprop+ gets its loss."""

import numpy as np
import pytest
import torch

import rprop
from reference import ReferenceRprop


def quad_problem():
    w = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    return w, target


def test_lr_change_warns_once_and_has_no_effect():
    w, target = quad_problem()
    v = w.detach().clone().requires_grad_()
    opt = rprop.Rprop([w], lr=0.1)
    ref = torch.optim.Rprop([v], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.1)
    with pytest.warns(rprop.LrChangeWarning, match="rescale_step_sizes") as record:
        for _ in range(10):
            for p, o, s in ((w, opt, sched), (v, ref, ref_sched)):
                o.zero_grad()
                ((p - target) ** 2).sum().backward()
                o.step()
                s.step()
    assert len(record) == 1
    assert torch.equal(w, v), "lr changes must not alter the trajectory (torch parity)"


def test_constant_lr_never_warns():
    w, target = quad_problem()
    opt = rprop.Rprop([w], lr=torch.tensor(0.1))
    for _ in range(5):  # filterwarnings=error turns any warning into a failure
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()


def test_rescale_step_sizes_scales_and_clamps():
    w = torch.zeros(2, requires_grad=True)
    opt = rprop.Rprop([w], lr=0.1, step_sizes=(1e-3, 0.3))
    w.grad = torch.tensor([1.0, -1.0])
    opt.step()
    opt.rescale_step_sizes(2.0)
    assert torch.allclose(opt.state[w]["step_size"], torch.tensor([0.2, 0.2]), rtol=0, atol=0)
    opt.rescale_step_sizes(10.0)
    assert torch.equal(opt.state[w]["step_size"], torch.tensor([0.3, 0.3]))


@pytest.mark.parametrize("how", ["closure", "float", "tensor"])
@pytest.mark.parametrize("maximize", [False, True])
def test_irprop_plus_loss_sources_match_reference(how, maximize):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(30)
    sign = -1.0 if maximize else 1.0
    X, Y = torch.tensor(x), torch.tensor(y)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([w], lr=0.5, variant="irprop+", maximize=maximize)
    ref = ReferenceRprop([np.zeros(3)], lr=0.5, variant="irprop+", maximize=maximize)

    def closure():
        opt.zero_grad()
        loss = sign * ((X @ w - Y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(60):
        r = ref.params[0]
        ref_loss = sign * np.mean((x @ r - y) ** 2)
        ref_grad = sign * 2 * x.T @ (x @ r - y) / len(y)
        if how == "closure":
            opt.step(closure)
        else:
            loss = closure()
            opt.step(loss=loss.item() if how == "float" else loss)
        ref.step([ref_grad], ref_loss)
        # Gradients come from autograd vs the closed form: equal to rounding,
        # so compare the trajectories to a tight tolerance, not bitwise.
        np.testing.assert_allclose(w.detach().numpy(), ref.params[0], rtol=1e-12, atol=1e-12)
    assert opt.state[w]["prev_loss"].dtype == torch.float64
    assert opt.state[w]["prev_loss"].item() == pytest.approx(ref.prev_loss)  # signed, both


def test_irprop_plus_backtracks_only_when_loss_goes_up():
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([w], lr=0.1, variant="irprop+")
    for g, loss in [(1.0, 2.0), (-1.0, 3.0)]:  # flip, loss up: undo -0.1
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step(loss=loss)
    assert w.item() == 0.0
    for g, loss in [(1.0, 1.0), (-1.0, 0.5)]:  # flip, loss down: stay
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step(loss=loss)
    assert w.item() == pytest.approx(-0.05)


@pytest.mark.parametrize("order", ["AB", "BA"])
def test_irprop_plus_has_one_previous_loss_whatever_the_order(order):
    # Worked by hand: lr 0.1. Step 1, both grads +1, loss 5: A = B = -0.1.
    # Step 2, only A has a grad (+1), loss 1: A grows to 0.12, A = -0.22; B rests.
    # Step 3, both -1, loss 3 > 1 = E(t-1): both flipped and the loss went up,
    # so both undo their last update: A = -0.22 + 0.12 = -0.1, B = -0.1 + 0.1 = 0.
    a = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([a, b] if order == "AB" else [b, a], lr=0.1, variant="irprop+")
    for grads, loss in [((1.0, 1.0), 5.0), ((1.0, None), 1.0), ((-1.0, -1.0), 3.0)]:
        for p, g in zip((a, b), grads):
            p.grad = None if g is None else torch.tensor([g], dtype=torch.float64)
        opt.step(loss=loss)
    assert a.item() == pytest.approx(-0.1, abs=1e-15)
    assert b.item() == 0.0
    assert opt.state[a]["prev_loss"].item() == opt.state[b]["prev_loss"].item() == 3.0


def test_irprop_plus_parameter_added_later_takes_the_current_loss():
    a = torch.zeros(1, requires_grad=True)
    opt = rprop.Rprop([a], variant="irprop+")
    a.grad = torch.ones(1)
    opt.step(loss=2.0)
    b = torch.zeros(1, requires_grad=True)
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = torch.ones(1), torch.ones(1)
    opt.step(loss=1.0)
    assert opt.state[b]["prev_loss"].item() == opt.state[a]["prev_loss"].item() == 1.0


@pytest.mark.parametrize("loss", [np.float32(1.5), np.int64(2), np.array(1.5), np.array([1.5]),
                                  torch.tensor(3, dtype=torch.uint8), 2])
def test_loss_types(loss):
    w = torch.zeros(1, requires_grad=True)
    opt = rprop.Rprop([w], variant="irprop+", maximize=True)
    w.grad = torch.ones(1)
    opt.step(loss=loss)
    # maximize stores the negated loss, computed in float64 (a uint8 3 must not wrap).
    assert opt.state[w]["prev_loss"].item() == -float(np.asarray(loss).reshape(()))
