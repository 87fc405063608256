"""Smoke-run the NumPy, SciPy and JAX examples in-process (a few seconds)."""

from __future__ import annotations

import pathlib
import runpy

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name))


def test_numpy_training_loop_runs_as_a_script(capsys):
    runpy.run_path(str(EXAMPLES / "numpy_training_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "f(x)" in out and "accuracy" in out


def test_numpy_training_loop():
    x, accuracy = _load("numpy_training_loop.py")["main"]()
    assert abs(x) < 1e-5 and accuracy > 0.85


def test_scipy_calibration(capsys):
    pytest.importorskip("scipy")
    results = _load("scipy_calibration.py")["main"]()
    assert "every rprop iterate inside the bounds: True" in capsys.readouterr().out
    reference = results["L-BFGS-B"].x
    for name in ("rprop.minimize", "scipy + method=rprop", "rprop, 2-point jac"):
        res = results[name]
        assert res.success, (name, res.message)
        assert np.allclose(res.x, reference, atol=1e-3), name
        assert res.x[2] == 0.0  # the offset ends on its bound
    assert np.array_equal(results["rprop.minimize"].x, results["scipy + method=rprop"].x)


def test_jax_optax_training():
    pytest.importorskip("optax")
    runs = _load("jax_optax_training.py")["main"](steps=40)
    ours, theirs = runs["rprop.optax irprop+"], runs["optax.rprop"]
    assert ours[1] < ours[0] and theirs[1] == theirs[0]  # optax.rprop's first update is 0
    assert ours[-1] < 0.5 * ours[0]
