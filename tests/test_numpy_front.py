"""rprop.numpy.Rprop: in-place updates, every variant, checkpoints, non-finite
gradients and bad inputs (its parity with tests/reference.py and its Hypothesis
properties are in test_parity_reference.py and test_properties.py)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from reference import VARIANT_NAMES, ReferenceRprop
from rprop.numpy import Rprop


def _grad(t: int, shape=(3,)) -> np.ndarray:
    return np.sin(np.arange(np.prod(shape)).reshape(shape) + 0.9 * t)


# -- basic use ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_x_squared_from_5(variant):
    x = np.array([5.0])
    opt = Rprop([x], lr=0.1, variant=variant)
    for _ in range(80):
        opt.step([2 * x], loss=float(x[0] ** 2))
    assert abs(x[0]) < 1e-3
    assert opt.steps == 80


def test_updates_in_place_any_layout():
    base = np.zeros((4, 6))
    view = base[:, ::2]  # strided view: the update must land in `base`
    fortran = np.asfortranarray(np.ones((3, 2), dtype=np.float32))
    scalar = np.array(1.0)
    c = np.zeros(3, dtype=np.complex128)[::-1]
    params = [view, fortran, scalar, c]
    ids = [id(p) for p in params]
    opt = Rprop(params, lr=0.5)
    opt.step([np.ones(view.shape), np.ones((3, 2)), np.float64(-1.0), np.full(3, 1 - 1j)])
    assert [id(p) for p in params] == ids
    assert np.array_equal(base[:, ::2], np.full((4, 3), -0.5)) and np.all(base[:, 1::2] == 0)
    assert fortran.dtype == np.float32 and np.all(fortran == 0.5)
    assert scalar == 1.5
    assert np.array_equal(c, np.full(3, -0.5 + 0.5j))


def test_dict_params_and_none_gradient():
    params = {"w": np.ones(2), "b": np.zeros(())}
    opt = Rprop(params, lr=0.1)
    opt.step({"w": np.ones(2), "b": None})
    assert np.allclose(params["w"], 0.9) and params["b"] == 0.0
    assert np.all(opt.state["b"]["prev"] == 0) and np.all(opt.state["b"]["step_size"] == 0.1)
    assert opt.params is params


def test_gradients_are_cast_to_the_array_dtype():
    w = np.zeros(3, dtype=np.float32)
    opt = Rprop([w], lr=0.1)
    opt.step([np.array([1e300, -1.0, 0.0])])  # float64 -> float32 (1e300 -> inf)
    assert w.dtype == np.float32 and opt.state[0]["step_size"].dtype == np.float32
    assert np.array_equal(w, np.array([-0.1, 0.1, 0.0], dtype=np.float32))


def test_complex_state_layout_like_torch():
    z = np.zeros(2, dtype=np.complex64)
    opt = Rprop([z], lr=0.25, variant="rprop+")
    for name in ("prev", "step_size", "prev_update"):
        assert opt.state[0][name].dtype == np.complex64 and opt.state[0][name].shape == (2,)
    assert np.array_equal(opt.state[0]["step_size"], np.full(2, 0.25 + 0.25j))


def test_irprop_plus_needs_the_loss():
    opt = Rprop([np.zeros(2)], variant="irprop+")
    with pytest.raises(ValueError, match=r'variant="irprop\+" needs the loss'):
        opt.step([np.ones(2)])
    opt.step([np.ones(2)], loss=np.float32(1.5))
    assert opt.prev_loss == 1.5


def test_maximize_ascends():
    x = np.array([0.0])
    opt = Rprop([x], lr=0.1, maximize=True, variant="irprop+")
    for _ in range(60):
        opt.step([-2 * (x - 3)], loss=float(-((x[0] - 3) ** 2)))
    assert abs(x[0] - 3) < 1e-3


# -- non-finite gradients -------------------------------------------------------------


def test_propagate_matches_reference_and_stays_silent():
    # pytest turns warnings into errors here: inf * 0 must not warn.
    w0 = [np.zeros(3)]
    ref = ReferenceRprop(w0, variant="rprop-")
    w = [w0[0].copy()]
    opt = Rprop(w, variant="rprop-")
    for g in ([1.0, np.nan, np.inf], [np.inf, 1.0, -np.inf], [0.0, np.nan, 1.0]):
        with np.errstate(all="ignore"):  # the reference warns; the front must not
            ref.step([np.array(g)])
        opt.step([np.array(g)])
        assert np.array_equal(ref.params[0], w[0])


def test_skip_leaves_everything_unchanged_and_counts():
    params = {"a": np.ones(2), "b": np.ones(3)}
    opt = Rprop(params, variant="irprop+", nonfinite="skip")
    opt.step({"a": np.ones(2), "b": np.ones(3)}, loss=1.0)
    before = opt.state_dict()
    values = {k: v.copy() for k, v in params.items()}
    opt.step({"a": np.ones(2), "b": np.array([1.0, np.nan, 0.0])}, loss=0.5)
    opt.step({"a": np.ones(2), "b": np.ones(3)}, loss=math.inf)
    after = opt.state_dict()
    assert after["skipped_steps"] == 2 and after["steps"] == before["steps"] == 1
    assert after["prev_loss"] == before["prev_loss"]
    for k in params:
        assert np.array_equal(params[k], values[k])
        for name, arr in before["state"][k].items():
            assert np.array_equal(after["state"][k][name], arr)
    opt.step({"a": np.ones(2), "b": np.ones(3)}, loss=0.5)
    assert opt.steps == 2


@pytest.mark.parametrize(
    ("grads", "loss", "culprit"),
    [
        ({"a": np.ones(2), "b": np.array([np.inf, 0, 0])}, 1.0,
         r"the gradient of params\['b'\] \(shape \(3,\)\)"),
        ({"a": np.array([np.nan, 0]), "b": np.array([np.inf, 0, 0])}, 1.0,
         r"the gradient of params\['a'\] \(shape \(2,\)\)"),
        ({"a": np.ones(2), "b": np.ones(3)}, float("nan"), r"the loss \(nan\)"),
    ],
)
def test_raise_names_the_first_offender(grads, loss, culprit):
    params = {"a": np.ones(2), "b": np.ones(3)}
    opt = Rprop(params, variant="irprop+", nonfinite="raise")
    with pytest.raises(FloatingPointError, match=f"non-finite value in {culprit}"):
        opt.step(grads, loss=loss)
    assert np.all(params["a"] == 1) and opt.steps == 0


# -- checkpoints --------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_state_dict_round_trip_continues_identically(variant):
    a = [np.zeros(3), np.zeros(2, dtype=np.complex128)]
    opt_a = Rprop(a, lr=0.3, variant=variant, weight_decay=0.01)

    def grads(t):
        return [_grad(t), _grad(t + 1, (2,)) + 1j * _grad(t + 2, (2,))]

    for t in range(5):
        opt_a.step(grads(t), loss=float(t % 2))
    saved = pickle.loads(pickle.dumps(opt_a.state_dict()))
    b = [p.copy() for p in a]
    opt_b = Rprop(b)  # other hyperparameters: the state dict brings its own
    opt_b.load_state_dict(saved)
    assert opt_b.variant.name == variant and opt_b.hyper == opt_a.hyper
    for t in range(5, 12):
        opt_a.step(grads(t), loss=float(t % 2))
        opt_b.step(grads(t), loss=float(t % 2))
        for x, y in zip(a, b, strict=True):
            assert np.array_equal(x, y)
    assert opt_b.steps == 12


def test_state_dict_is_a_copy():
    w = np.zeros(2)
    opt = Rprop([w])
    sd = opt.state_dict()
    sd["state"][0]["step_size"][...] = 7.0
    assert np.all(opt.state[0]["step_size"] == 0.01)


def _saved(**changes):
    opt = Rprop({"w": np.zeros(2), "b": np.zeros(())}, variant="rprop+")
    opt.step({"w": np.ones(2), "b": np.ones(())})
    sd = opt.state_dict()
    for path, value in changes.items():
        target = sd
        keys = path.split("/")
        for k in keys[:-1]:
            target = target[k]
        if value is KeyError:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return sd


BAD_STATE_DICTS = [
    ([], r"state_dict must be a dict"),
    (_saved(steps=KeyError), r"state_dict lacks \['steps'\]"),
    (_saved(**{"hyperparams/variant": "adam"}), r"state_dict\['hyperparams'\]: variant must"),
    (_saved(**{"hyperparams/etas": (2.0, 3.0)}), r"state_dict\['hyperparams'\]: etas must"),
    (_saved(**{"hyperparams/extra": 1}), r"must have exactly the keys"),
    (_saved(steps=-1), r"state_dict\['steps'\] must be an int >= 0"),
    (_saved(prev_loss="low"), r"state_dict\['prev_loss'\]"),
    (_saved(**{"state/b": KeyError}), r"must have one entry per array"),
    (_saved(**{"state/w/prev_update": KeyError}),
     r"state of params\['w'\] \(shape \(2,\), float64\) lacks \['prev_update'\] "
     r"\(needed by variant 'rprop\+'\)"),
    (_saved(**{"state/w/step_size": np.zeros(3)}),
     r"state 'step_size' of params\['w'\] .* has shape \(3,\) and dtype float64, expected "
     r"\(2,\) and float64"),
    (_saved(**{"state/w/prev": np.zeros(2, np.float32)}), r"dtype float32, expected \(2,\)"),
    (_saved(**{"state/w/prev": [0.0, 0.0]}), r"must be a NumPy array, got list"),
]


@pytest.mark.parametrize(("sd", "match"), BAD_STATE_DICTS)
def test_load_state_dict_checks_everything_first(sd, match):
    params = {"w": np.zeros(2), "b": np.zeros(())}
    opt = Rprop(params, lr=0.2, variant="irprop-")
    opt.step({"w": np.ones(2), "b": -np.ones(())})
    before = opt.state_dict()
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["hyperparams"] == before["hyperparams"] and after["steps"] == 1
    for k in before["state"]:
        assert after["state"][k].keys() == before["state"][k].keys()
        for name in before["state"][k]:
            assert np.array_equal(after["state"][k][name], before["state"][k][name])


# -- bad inputs -----------------------------------------------------------------------

BAD_CONSTRUCTION = [
    (lambda: Rprop(np.zeros(3)), TypeError,
     r"params must be a list or a dict of NumPy arrays, got ndarray \(wrap a single array"),
    (lambda: Rprop([]), ValueError, r"params is empty"),
    (lambda: Rprop([[1.0, 2.0]]), TypeError, r"params\[0\] must be a NumPy array .*got list"),
    (lambda: Rprop([np.zeros(2, dtype=int)]), TypeError,
     r"params\[0\] must have a floating-point or complex dtype, got int64"),
    (lambda: Rprop({"w": np.broadcast_to(np.zeros(1), (3,))}), ValueError,
     r"params\['w'\] is read-only"),
    (lambda: Rprop([x := np.zeros(2), x]), ValueError,
     r"params\[1\] is the same array as params\[0\]"),
    (lambda: Rprop([np.zeros(2)], lr=-1.0), ValueError, r"lr must be a finite number >= 0"),
    (lambda: Rprop([np.zeros(2)], etas=(0.5, 0.9)), ValueError, r"etas must satisfy"),
    (lambda: Rprop([np.zeros(2)], step_sizes=(1.0, 0.1)), ValueError, r"step_sizes must satisfy"),
    (lambda: Rprop([np.zeros(2)], variant="adam"), ValueError, r"variant must be one of"),
    (lambda: Rprop([np.zeros(2)], nonfinite="ignore"), ValueError, r"nonfinite must be one of"),
    (lambda: Rprop([np.zeros(2)], maximize=1), TypeError, r"maximize must be a bool"),
]


@pytest.mark.parametrize(("make", "exc", "match"), BAD_CONSTRUCTION)
def test_bad_construction(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


BAD_STEPS = [
    ({"grads": np.ones(2)}, TypeError, r"grads must be a list .* got ndarray"),
    ({"grads": [np.ones(2)]}, ValueError, r"grads has 1 entries, params has 2"),
    ({"grads": [np.ones(3), np.ones(3)]}, ValueError,
     r"the gradient of params\[0\] has shape \(3,\), the array has shape \(2,\)"),
    ({"grads": [np.ones(2) * 1j, np.ones(3)]}, TypeError,
     r"the gradient of params\[0\] is complex \(complex128\) but the array is real"),
    ({"grads": [np.array(["a", "b"]), np.ones(3)]}, TypeError, r"has dtype <U1, not numeric"),
    ({"grads": [np.ones(2), np.ones(3)], "loss": None}, ValueError, r"needs the loss"),
    ({"grads": [np.ones(2), np.ones(3)], "loss": 1j}, TypeError, r"loss must be a real number"),
    ({"grads": [np.ones(2), np.ones(3)], "loss": np.ones(2)}, ValueError,
     r"loss must be a scalar \(one element\), got shape \(2,\)"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_STEPS)
def test_bad_steps_change_nothing(kwargs, exc, match):
    params = [np.zeros(2), np.zeros(3)]
    opt = Rprop(params, variant="irprop+")
    with pytest.raises(exc, match=match):
        opt.step(**kwargs)
    assert all(np.all(p == 0) for p in params) and opt.steps == 0


def test_dict_grads_must_match_keys():
    opt = Rprop({"w": np.zeros(2)})
    with pytest.raises(TypeError, match=r"grads must be a dict with the same keys"):
        opt.step([np.ones(2)])
    with pytest.raises(ValueError, match=r"missing \['w'\], extra \['v'\]"):
        opt.step({"v": np.ones(2)})
