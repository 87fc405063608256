"""The open core: user-built variants on every front, the registry, the
step-level rules shared by the fronts, and lazy access to the fronts."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import rprop
from _helpers import flippy_grad
from reference import ReferenceRprop
from rprop import _core
from rprop.numpy import Rprop as NumpyRprop


def _twin(name: str) -> rprop.Variant:
    """A user-built variant with a classic variant's flags under a new name:
    its trajectory must be the classic one's, from the paper transcription."""
    classic = rprop.get_variant(name)
    return rprop.Variant(f"user-{name}", undo=classic.undo, forget=classic.forget)


def _inputs(name: str, steps: int = 120):
    w0 = np.random.default_rng(0).standard_normal(37)
    # The reference's gradients depend on its own iterates; replay them.
    rng = np.random.default_rng(1)
    ref = ReferenceRprop([w0], lr=0.05, variant=name)
    w, grads, losses = w0.copy(), [], []
    for t in range(steps):
        g = flippy_grad(w, t, rng)
        loss = float(np.sum(w * w)) + (t % 3) * 0.1
        grads.append(g)
        losses.append(loss)
        (w,) = ref.step([g], loss=loss)
    return w0, grads, losses, w


@pytest.mark.parametrize("name", ["rprop+", "rprop-", "irprop+", "irprop-"])
@pytest.mark.parametrize("path", [{"foreach": False, "fused": False}, {"foreach": True},
                                  {"fused": None}])
def test_user_variant_on_torch_paths_matches_reference(name, path):
    w0, grads, losses, expected = _inputs(name)
    p = torch.tensor(w0, requires_grad=True)
    opt = rprop.Rprop([p], lr=0.05, variant=_twin(name), **path)
    for g, loss in zip(grads, losses):
        p.grad = torch.tensor(g)
        opt.step(loss=loss)
    np.testing.assert_array_equal(p.detach().numpy(), expected)


@pytest.mark.parametrize("name", ["rprop+", "irprop+"])
def test_user_variant_on_numpy_front_matches_reference(name):
    w0, grads, losses, expected = _inputs(name)
    x = w0.copy()
    opt = NumpyRprop([x], lr=0.05, variant=_twin(name))
    for g, loss in zip(grads, losses):
        opt.step([g], loss=loss)
    np.testing.assert_array_equal(x, expected)


@pytest.mark.parametrize("name", ["rprop+", "irprop+"])
def test_user_variant_round_trips_torch_state_dict(name):
    """Save half-way through torch.save, reload with weights_only=True into a
    fresh optimizer built with the same variant: the end is bitwise the
    uninterrupted run's (the reference's)."""
    w0, grads, losses, expected = _inputs(name)
    variant = _twin(name)
    p = torch.tensor(w0, requires_grad=True)
    opt = rprop.Rprop([p], lr=0.05, variant=variant)
    half = len(grads) // 2
    for g, loss in zip(grads[:half], losses[:half]):
        p.grad = torch.tensor(g)
        opt.step(loss=loss)
    buffer = io.BytesIO()
    torch.save({"p": p.detach().clone(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["param_groups"][0]["variant"] == variant.name
    q = saved["p"].clone().requires_grad_(True)
    opt2 = rprop.Rprop([q], lr=0.05, variant=variant)
    opt2.load_state_dict(saved["opt"])
    for g, loss in zip(grads[half:], losses[half:]):
        q.grad = torch.tensor(g)
        opt2.step(loss=loss)
    np.testing.assert_array_equal(q.detach().numpy(), expected)


def test_user_variant_round_trips_numpy_state_dict():
    w0, grads, losses, expected = _inputs("irprop+")
    variant = _twin("irprop+")
    x = w0.copy()
    opt = NumpyRprop([x], lr=0.05, variant=variant)
    for g, loss in zip(grads[:60], losses[:60]):
        opt.step([g], loss=loss)
    saved = opt.state_dict()
    assert saved["hyperparams"]["variant"] == variant.name
    y = x.copy()
    opt2 = NumpyRprop([y], lr=0.05)  # irprop- until the state says otherwise
    opt2.load_state_dict(saved)
    assert opt2.variant == variant
    for g, loss in zip(grads[60:], losses[60:]):
        opt2.step([g], loss=loss)
    np.testing.assert_array_equal(y, expected)


def test_user_variant_on_optax_front_matches_reference():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    import rprop.optax as ro

    jax.config.update("jax_enable_x64", True)
    try:
        w0, grads, losses, expected = _inputs("irprop+")
        opt = ro.rprop(0.05, variant=_twin("irprop+"))
        params = jnp.asarray(w0)
        state = opt.init(params)
        for g, loss in zip(grads, losses):
            updates, state = opt.update(jnp.asarray(g), state, params, value=loss)
            params = optax.apply_updates(params, updates)
        np.testing.assert_array_equal(np.asarray(params), expected)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_state_keys_declared_once_match_every_front():
    for variant in rprop.VARIANTS.values():
        x = np.zeros(3)
        np_state = NumpyRprop([x], variant=variant).state[0]
        assert tuple(np_state) == variant.state_keys
        p = torch.zeros(3, requires_grad=True)
        opt = rprop.Rprop([p], variant=variant)
        p.grad = torch.ones(3)
        opt.step(loss=1.0)
        torch_keys = set(opt.state[p]) - {"step", "prev_loss"}
        assert torch_keys == set(variant.state_keys)


def test_register_variant_refuses_a_different_variant_under_a_known_name():
    with pytest.raises(ValueError, match="a different variant is already registered as 'irprop-'"):
        rprop.register_variant(rprop.Variant("irprop-", undo="always", forget=True))
    with pytest.raises(ValueError, match="already registered"):
        rprop.Rprop([torch.zeros(1, requires_grad=True)],
                    variant=rprop.Variant("IRPROP+", undo="never", forget=True))
    same = rprop.Variant("irprop-", undo="never", forget=True)
    assert rprop.register_variant(same) is same
    with pytest.raises(TypeError, match=r"variant must be a rprop\.Variant"):
        rprop.register_variant("irprop-")  # type: ignore[arg-type]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"name": "", "undo": "never", "forget": True}, TypeError, "Variant name must be a non-empty"),
    ({"name": 3, "undo": "never", "forget": True}, TypeError, "Variant name must be a non-empty"),
    ({"name": "x", "undo": "sometimes", "forget": True}, ValueError,
     r"Variant undo must be one of \('never', 'always', 'if_worse'\)"),
    ({"name": "x", "undo": "never", "forget": 1}, TypeError, "Variant forget must be a bool"),
])
def test_variant_declaration_is_validated(kwargs, error, message):
    with pytest.raises(error, match=message):
        rprop.Variant(**kwargs)


def test_unknown_variant_name_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"variant must be one of \[.*'irprop\+'.*\].*got 'adam'"):
        rprop.get_variant("adam")


@pytest.mark.parametrize(("loss", "error", "message"), [
    (True, TypeError, "loss must be a real number, got True"),
    (1j, TypeError, "loss must be a real number"),
    ("1", TypeError, "loss must be a real number or a one-element tensor, got str"),
    (np.ones(2), ValueError, r"loss must be a scalar \(one element\), got shape \(2,\)"),
    (np.array([True]), TypeError, "loss must be a real number, got a bool"),
    (np.complex64(1), TypeError, "loss must be a real number, got a complex64"),
    (torch.ones(1, 2), ValueError, r"got shape \(1, 2\)"),
    (torch.tensor(1 + 1j), TypeError, "got a torch.complex64 tensor"),
])
def test_check_loss_refuses_what_is_not_a_loss(loss, error, message):
    with pytest.raises(error, match=message):
        _core.check_loss(loss)


def test_check_loss_accepts_reals():
    assert _core.check_loss(3) == 3.0 and isinstance(_core.check_loss(3), float)
    assert _core.check_loss(np.float32(2.5)) == 2.5
    t = torch.tensor([2.0])
    assert _core.check_loss(t) is t
    a = np.array([[4]])
    assert _core.check_loss(a) is a


def test_nonfinite_modes_are_one_declaration():
    assert rprop.numpy.NONFINITE_MODES is _core.NONFINITE_MODES
    with pytest.raises(ValueError, match=r"nonfinite must be one of \('propagate', 'skip', "):
        _core.check_nonfinite("ignore")


def test_import_rprop_alone_reaches_the_fronts_and_loads_no_framework():
    code = textwrap.dedent("""
        import sys
        import rprop
        assert "torch" not in sys.modules and "jax" not in sys.modules, "eager framework import"
        fit = rprop.torch.fit
        assert callable(fit) and callable(rprop.torch.full_batch_backward)
        assert callable(rprop.numpy.Rprop)
        assert "torch" in dir(rprop)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_unknown_attribute_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        rprop.nope  # noqa: B018


def test_a_variant_declaring_a_feature_the_core_lacks_is_refused():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class WithExtra(rprop.Variant):
        @property
        def features(self) -> frozenset[str]:
            return super().features | {"extra-term"}

    with pytest.raises(ValueError, match=r"declares features the core does not implement: "
                                         r"\['extra-term'\]"):
        rprop.Rprop([torch.zeros(1, requires_grad=True)],
                    variant=WithExtra("with-extra", undo="never", forget=True))


def test_a_path_never_runs_a_variant_feature_it_does_not_declare():
    """A preferred path that implements only part of the rule (no undo) is
    chosen for the variants it covers and never for the others, which step on
    a path that declares what they need, bitwise the reference."""
    from rprop.torch import _path_registry, _paths

    calls = []

    def partial(*args, **kwargs):
        calls.append(kwargs["variant"].name)
        _paths.single_tensor(*args, **kwargs)

    path = _path_registry.Path("partial", partial, preference=10,
                               features=frozenset({"undo=never", "forget"}))
    _path_registry.register(path)
    try:
        for name in ("irprop-", "rprop+", "irprop+", "rprop-"):
            variant = rprop.get_variant(name)
            w0, grads, losses, expected = _inputs(name, steps=40)
            p = torch.tensor(w0, requires_grad=True)
            opt = rprop.Rprop([p], lr=0.05, variant=name)
            for g, loss in zip(grads, losses):
                p.grad = torch.tensor(g)
                opt.step(loss=loss)
            np.testing.assert_array_equal(p.detach().numpy(), expected)
            if variant.features <= path.features:
                assert opt.last_paths == ("partial",), name
            else:
                assert opt.last_paths != ("partial",) and name not in calls, name
    finally:
        _path_registry.unregister("partial")
    assert sorted(set(calls)) == ["irprop-", "rprop-"]


def _irprop_plus_with_a_gradless_step(groups):
    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([{"params": [a]}, {"params": [b]}] if groups else [a, b],
                      variant="irprop+")
    for loss, ga in [(5.0, 1.0), (6.0, None), (5.5, -1.0)]:  # a has no grad in step 2
        a.grad = None if ga is None else torch.full((3,), ga, dtype=torch.float64)
        b.grad = torch.ones(3, dtype=torch.float64)
        opt.step(loss=loss)
    return a.detach().numpy(), b.detach().numpy()


def test_e_t_minus_1_is_one_number_for_the_optimizer_whatever_the_groups():
    """A group none of whose parameters had a gradient this step still takes
    E(t): step 3 compares 5.5 with 6.0 (no undo), as the NumPy front and the
    paper transcription do, whether a and b share a group or not."""
    x, y = np.zeros(3), np.zeros(3)
    ref = NumpyRprop([x, y], variant="irprop+")
    for loss, ga in [(5.0, 1.0), (6.0, None), (5.5, -1.0)]:
        ref.step([None if ga is None else np.full(3, ga), np.ones(3)], loss=loss)
    for groups in (False, True):
        a, b = _irprop_plus_with_a_gradless_step(groups)
        np.testing.assert_array_equal(a, x)
        np.testing.assert_array_equal(b, y)

