"""Bad input: the exact exception and a message naming the argument."""

import subprocess
import sys

import pytest
import torch

import rprop


def _p():
    return [torch.zeros(3, requires_grad=True)]


BAD_CONSTRUCTOR = [
    ({"lr": -1.0}, ValueError, r"lr must be a finite number >= 0, got -1.0"),
    ({"lr": float("nan")}, ValueError, r"lr must be a finite number >= 0, got nan"),
    ({"lr": "0.1"}, TypeError, r"lr must be a real number"),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"lr as a Tensor must have exactly one element"),
    ({"etas": (1.5, 1.2)}, ValueError, r"etas must satisfy 0 < eta_minus < 1 < eta_plus"),
    ({"etas": (0.5, 0.9)}, ValueError, r"etas must satisfy 0 < eta_minus < 1 < eta_plus"),
    ({"etas": (0.0, 1.2)}, ValueError, r"etas must satisfy"),
    ({"etas": (0.5,)}, TypeError, r"etas must be a pair of two numbers"),
    ({"etas": 0.5}, TypeError, r"etas must be a pair of two numbers"),
    ({"step_sizes": (1.0, 0.1)}, ValueError, r"step_sizes must satisfy 0 <= step_min <= step_max"),
    ({"step_sizes": (-1e-6, 1.0)}, ValueError, r"step_sizes must satisfy"),
    ({"step_sizes": (float("inf"),) * 2}, ValueError, r"step_min finite, got \(inf, inf\)"),
    ({"step_sizes": (1e-6, "big")}, TypeError, r"step_sizes\[1\] must be a real number"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay must be a finite number >= 0"),
    ({"variant": "adam"}, ValueError,
     r"variant must be one of \['grprop-sag', 'grprop-slr', 'irprop\+', 'irprop-', 'rprop\+', "
     r"'rprop-'\]"),
    ({"variant": 3}, TypeError, r"variant must be a string"),
    ({"maximize": "yes"}, TypeError, r"maximize must be a bool"),
    ({"foreach": "yes"}, TypeError, r"foreach must be a bool or None"),
    ({"fused": 1}, TypeError, r"fused must be a bool or None"),
    ({"capturable": None}, TypeError, r"capturable must be a bool"),
    ({"fused": True, "foreach": True}, ValueError, r"fused=True and foreach=True cannot be set"),
    ({"fused": True, "differentiable": True}, ValueError, r"fused=True does not support"),
    ({"nonfinite": "ignore"}, ValueError, r"nonfinite must be one of \('propagate', 'skip'"),
    ({"momentum": 0.9}, TypeError, r"unexpected keyword argument 'momentum'"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_CONSTRUCTOR)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rprop.Rprop(_p(), **kwargs)


def test_variant_names_are_case_insensitive():
    assert rprop.Rprop(_p(), variant="iRprop+").param_groups[0]["variant"] == "irprop+"


def test_bad_param_group_is_refused_and_not_added():
    opt = rprop.Rprop(_p())
    with pytest.raises(ValueError, match="etas must satisfy"):
        opt.add_param_group({"params": _p(), "etas": (2.0, 3.0)})
    assert len(opt.param_groups) == 1


def test_integer_params_refused():
    with pytest.raises(TypeError, match="params must be floating-point or complex tensors"):
        rprop.Rprop([torch.zeros(3, dtype=torch.int64)])


def test_group_edited_to_bad_value_fails_at_step():
    p = _p()
    opt = rprop.Rprop(p)
    opt.param_groups[0]["step_sizes"] = (1.0, 0.5)
    p[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="step_sizes must satisfy"):
        opt.step()


def test_sparse_gradient_refused():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = rprop.Rprop(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()


BAD_LOSS = [
    ({}, ValueError, r'variant="irprop\+" needs the loss at the current parameters'),
    ({"loss": "1.0"}, TypeError, r"loss must be a real number or a one-element tensor, got str"),
    ({"loss": torch.tensor(True)}, TypeError, r"loss must be a real number, got a torch.bool"),
    ({"loss": torch.ones(2)}, ValueError, r"loss must be a scalar \(one element\)"),
    ({"loss": torch.ones((), dtype=torch.complex64)}, TypeError,
     r"loss must be a real number, got a torch.complex64 tensor"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_LOSS)
def test_irprop_plus_loss_errors(kwargs, exc, match):
    p = _p()
    opt = rprop.Rprop(p, variant="irprop+")
    p[0].grad = torch.ones(3)
    with pytest.raises(exc, match=match):
        opt.step(**kwargs)
    assert torch.equal(p[0], torch.zeros(3)), "a refused step must not move anything"
    assert len(opt.state[p[0]]) == 0 or opt.state[p[0]]["step"].item() == 0


def test_closure_and_loss_together_refused():
    p = _p()
    opt = rprop.Rprop(p)
    with pytest.raises(ValueError, match="from closure or from loss=, not both"):
        opt.step(lambda: 1.0, loss=1.0)


def test_a_loss_passed_as_the_closure_is_explained():
    p = _p()
    opt = rprop.Rprop(p, variant="irprop+")
    p[0].grad = torch.ones(3)
    with pytest.raises(TypeError, match=r"step\(\)'s first argument is a closure \(a function "
                                        r"that returns the loss\), got a Tensor; pass a loss "
                                        r"value as step\(loss=\.\.\.\)"):
        opt.step(torch.tensor(1.0))
    assert torch.equal(p[0], torch.zeros(3))


@pytest.mark.parametrize(("factor", "exc"), [(0.0, ValueError), (-2.0, ValueError),
                                             (float("inf"), ValueError), ("2", TypeError)])
def test_rescale_step_sizes_errors(factor, exc):
    with pytest.raises(exc, match="factor must be"):
        rprop.Rprop(_p()).rescale_step_sizes(factor)


def test_import_rprop_imports_neither_torch_nor_jax():
    code = (
        "import sys, rprop, rprop.problems\n"
        "bad = [m for m in ('torch', 'jax', 'optax', 'scipy') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "assert 'Rprop' in dir(rprop)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = rprop.nope
