"""Hand-worked sequences: gradients [1, 1, 1, -1, 1], lr 0.1, w0 = 0.

Worked on paper (default etas 0.5/1.2, bounds 1e-6/50):
  steps 1-3, same sign: Δ = 0.1, 0.12, 0.144; w = -0.1, -0.22, -0.364
  step 4, sign flip: Δ = 0.072, and by variant
     Rprop+  undo the last update (-0.144): w = -0.22, forget g
     Rprop-  move against the new sign:     w = -0.364 + 0.072 = -0.292
     iRprop- forget g, no move:             w = -0.364
     iRprop+ as Rprop+ if the loss went up, else as iRprop-
  step 5, g = 1:
     Rprop+  g_prev = 0, Δ stays 0.072:     w = -0.22 - 0.072 = -0.292
     Rprop-  flip again, Δ = 0.036:         w = -0.292 - 0.036 = -0.328
     iRprop- Δ stays 0.072:                 w = -0.364 - 0.072 = -0.436
"""

import numpy as np
import pytest
import torch

import rprop
from reference import ReferenceRprop

GRADS = [1.0, 1.0, 1.0, -1.0, 1.0]
EXPECTED = {
    "rprop+": [-0.1, -0.22, -0.364, -0.22, -0.292],
    "rprop-": [-0.1, -0.22, -0.364, -0.292, -0.328],
    "irprop-": [-0.1, -0.22, -0.364, -0.364, -0.436],
}
# iRprop+ with the loss going up at step 4, and with it going down.
LOSS_UP = [5.0, 4.0, 3.0, 3.5, 3.2]
LOSS_DOWN = [5.0, 4.0, 3.0, 2.5, 2.2]
EXPECTED_IRPROP_PLUS = {
    "up": [-0.1, -0.22, -0.364, -0.22, -0.292],
    "down": [-0.1, -0.22, -0.364, -0.364, -0.436],
}
EXPECTED_STEP = [0.1, 0.12, 0.144, 0.072, 0.072]


def _run_torch(variant, losses=None, foreach=False):
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([w], lr=0.1, variant=variant, foreach=foreach)
    path = []
    for i, g in enumerate(GRADS):
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step(loss=None if losses is None else losses[i])
        path.append(w.item())
    return path, opt


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_hand_worked_torch(variant, foreach):
    path, _ = _run_torch(variant, foreach=foreach)
    np.testing.assert_allclose(path, EXPECTED[variant], rtol=0, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("trend", ["up", "down"])
def test_hand_worked_irprop_plus(trend, foreach):
    losses = LOSS_UP if trend == "up" else LOSS_DOWN
    path, _ = _run_torch("irprop+", losses, foreach=foreach)
    np.testing.assert_allclose(path, EXPECTED_IRPROP_PLUS[trend], rtol=0, atol=1e-15)


def test_hand_worked_step_sizes():
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([w], lr=0.1)
    sizes = []
    for g in GRADS:
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        sizes.append(opt.state[w]["step_size"].item())
    np.testing.assert_allclose(sizes, EXPECTED_STEP, rtol=0, atol=1e-15)


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_reference_agrees_with_hand(variant):
    # The oracle itself is checked against the paper-worked numbers.
    ref = ReferenceRprop([np.zeros(1)], lr=0.1, variant=variant)
    path = [ref.step([np.array([g])])[0][0] for g in GRADS]
    np.testing.assert_allclose(path, EXPECTED[variant], rtol=0, atol=1e-15)


def test_torch_optim_rprop_is_irprop_minus():
    w = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Rprop([w], lr=0.1)
    path = []
    for g in GRADS:
        w.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        path.append(w.item())
    np.testing.assert_allclose(path, EXPECTED["irprop-"], rtol=0, atol=1e-15)
