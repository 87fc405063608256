"""Every variant of rprop.Rprop, on every path, against the per-element
transcription of the papers (tests/reference.py).

Result: exact, 0 ulp, in float32 and float64. Each output element is one
IEEE multiplication (step size by eta), one clamp and one addition
(parameter plus ±step or minus the last update), done in the same order and
precision by both, so there is nothing to round differently.
"""

import numpy as np
import pytest
import torch

import rprop
from _helpers import flippy_grad
from reference import VARIANT_NAMES, ReferenceRprop
from rprop.torch import _fused

PATHS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}}
if _fused.available([torch.zeros(1)]):
    PATHS["fused"] = {"fused": True}

SCENARIOS = {
    "plain": {},
    "maximize": {"maximize": True},
    "tight-bounds": {"step_sizes": (1e-3, 0.05)},
    "lr-above-max": {"lr": 2.0, "step_sizes": (1e-4, 0.5)},
    "lr-below-min": {"lr": 1e-5, "step_sizes": (1e-3, 10.0)},
    "weight-decay": {"weight_decay": 0.1},
}


def _losses(ws):
    return float(sum(np.sum(np.abs(w) ** 2) for w in ws))


def run_both(variant, dtype, scenario, path, steps=150, complex_param=False, seed=0):
    rng = np.random.default_rng(seed)
    kw = {"lr": 0.05, **SCENARIOS[scenario]}
    shapes = [(13,), (4, 5), ()]
    w0 = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if complex_param:
        cdt = np.complex64 if dtype == np.float32 else np.complex128
        w0.append((rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(cdt))
    ref = ReferenceRprop(w0, variant=variant, **kw)
    ps = [torch.tensor(w, requires_grad=True) for w in w0]
    opt = rprop.Rprop(ps, variant=variant, **kw, **PATHS[path])
    for t in range(steps):
        grads = []
        for w in ref.params:
            if np.iscomplexobj(w):
                re, im = flippy_grad(w.real, t, rng), flippy_grad(w.imag, t, rng)
                grads.append(re + 1j * im)
            else:
                grads.append(flippy_grad(w, t, rng))
        loss = _losses(grads)  # any sequence that goes up and down will do
        ref.step(grads, loss)
        for p, g in zip(ps, grads):
            p.grad = torch.tensor(g)
        opt.step(loss=loss if variant == "irprop+" else None)
        for i, (a, p) in enumerate(zip(ref.params, ps)):
            b = p.detach().numpy()
            assert np.array_equal(a, b), f"step {t}, param {i}: max |diff| {np.max(np.abs(a - b))}"
    for i, p in enumerate(ps):
        step_size = opt.state[p]["step_size"]
        if step_size.is_complex():
            step_size = torch.view_as_real(step_size)
        assert np.array_equal(ref.step_size[i], step_size.numpy())


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_matches_reference(variant, dtype, path):
    run_both(variant, dtype, "plain", path, complex_param=True)


@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - {"plain"}))
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_matches_reference_scenarios(variant, scenario):
    for path in PATHS:
        run_both(variant, np.float64, scenario, path, steps=80)


def test_bounds_are_actually_hit():
    # Guard the scenario above: the gradient sequence drives steps to both bounds.
    rng = np.random.default_rng(0)
    ref = ReferenceRprop([rng.standard_normal(20)], lr=0.05, step_sizes=(1e-3, 0.05))
    seen_min = seen_max = False
    for t in range(150):
        ref.step([flippy_grad(ref.params[0], t, rng)])
        seen_min |= bool(np.any(ref.step_size[0] == 1e-3))
        seen_max |= bool(np.any(ref.step_size[0] == 0.05))
    assert seen_min and seen_max
