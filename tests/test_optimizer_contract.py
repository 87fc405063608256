"""torch.optim's Optimizer contract, with torch.optim.Rprop as the oracle.

The generic behavioural tests of PyTorch's own suite (test/test_optim.py,
``TestOptimRenewed``), transcribed for Rprop and run on both
``torch.optim.Rprop`` and ``rprop.Rprop``: what passes for torch must pass for
rprop. The configurations are Rprop's ``optim_inputs_func`` and
``optim_error_inputs_func`` from torch/testing/_internal/common_optimizers.py,
crossed with the "global cliquey" flags (foreach, differentiable) as
``_get_optim_inputs_including_global_cliquey_kwargs`` does.
"""

import copy
import functools
import io
import warnings

import numpy as np
import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import rprop

CLASSES = [torch.optim.Rprop, rprop.Rprop]
IDS = ["torch", "rprop"]
by_class = pytest.mark.parametrize("cls", CLASSES, ids=IDS)

# optim_inputs_func_rprop (CPU): desc -> kwargs.
OPTIM_INPUTS = {
    "default": {},
    "non-default lr": {"lr": 2e-4},
    "non-default etas": {"etas": (0.5, 1.5)},
    "non-default step_sizes": {"step_sizes": (2e-6, 100)},
    "maximize": {"maximize": True},
}
# Rprop's supported_impls; torch tests every config with all flags False and
# with each flag True in turn.
IMPLS = ("foreach", "differentiable")
# Flags a state_dict saved by the first Rprop release lacks (not_og_supported_flags).
NOT_OG_FLAGS = ("foreach", "differentiable", "maximize", "capturable")


def all_inputs(skip=()):
    impls = [f for f in IMPLS if f not in skip]
    out = []
    for desc, kwargs in OPTIM_INPUTS.items():
        base = {**copy.deepcopy(kwargs), **dict.fromkeys(impls, False)}
        out.append((desc, base))
        out += [(f"{desc}, {flag}", {**base, flag: True}) for flag in impls]
    return out


def same(a, b):
    """Exact equality of nested state_dicts (tensors bit for bit, NaN == NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.nan_to_num(), b.nan_to_num())
                and torch.equal(a.isnan(), b.isnan()))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b)))
    return a == b


def inputs(skip=()):
    return [kw for _, kw in all_inputs(skip)]


def scheduled(cls):
    """An LR scheduler changing lr is what rprop.Rprop warns about (the
    change has no effect, as in torch); torch is silent. Tolerate the warning."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    if cls is rprop.Rprop:
        warnings.simplefilter("ignore", rprop.LrChangeWarning)
    return ctx


# -- errors: torch's table, torch as the oracle -------------------------------

def _error_inputs():
    """get_error_inputs_for_all_optims + optim_error_inputs_func_rprop (CPU),
    with further bad values of the arguments torch.optim.Rprop checks."""
    p1 = Parameter(torch.randn(1, 1))
    p2 = Parameter(torch.randn(1, 1))
    return [
        ("invalid param type", p1, {}),
        ("duplicate params across groups", [{"params": p1}, {"params": p1}], {}),
        ("Tensor lr must be 1-element", None, {"lr": torch.tensor([0.001, 0.001])}),
        ("some names missing", [("weight", p1), p2], {}),
        ("groups with/without names", [{"params": [p1], "lr": 1e-2},
                                       {"params": [("weight", p2)]}], {}),
        ("0 < eta1 < 1 < eta2", None, {"lr": 1e-2, "etas": (1.0, 0.5)}),
        ("eta_plus 1", None, {"etas": (0.5, 1.0)}),
        ("eta_minus 0", None, {"etas": (0, 1.2)}),
        ("eta nan", None, {"etas": (float("nan"), 1.2)}),
        ("negative lr", None, {"lr": -1.0}),
        ("negative int lr", None, {"lr": -1}),
        ("nan lr", None, {"lr": float("nan")}),
        ("negative tensor lr", None, {"lr": torch.tensor(-0.5)}),
        ("lr as a string", None, {"lr": "0.1"}),
    ]


def _outcome(cls, params, kwargs):
    params = [Parameter(torch.randn(2))] if params is None else params
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cls(params, **kwargs)
        except Exception as err:  # the oracle decides which exception is right
            return type(err), str(err)
    return ("warned", [str(w.message) for w in caught]) if caught else (None, "")


@pytest.mark.parametrize(("desc", "params", "kwargs"), _error_inputs(),
                         ids=[e[0] for e in _error_inputs()])
def test_errors_match_torch(desc, params, kwargs):
    """Same exception type as torch.optim.Rprop; where torch raises a
    ValueError of its own, its message is contained in ours."""
    want_type, want_msg = _outcome(torch.optim.Rprop, params, kwargs)
    got_type, got_msg = _outcome(rprop.Rprop, params, kwargs)
    assert want_type is not None, "the oracle accepts this input: not an error input"
    assert got_type == want_type, (got_type, got_msg, want_msg)
    if want_type is ValueError:
        assert want_msg in got_msg
    if want_type == "warned":
        assert any("duplicate parameters" in m for m in got_msg)


def test_duplicate_params_in_a_group_warn_as_torch():
    p = Parameter(torch.randn(1, 1))
    for cls in CLASSES:
        with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
            cls([p, p])


def test_error_table_covers_torchs_own():
    """Where torch's test helpers import (they need ``expecttest``), every
    Rprop error input of optim_db behaves the same for both classes."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_optimizers import optim_db

    info = next(o for o in optim_db if o.optim_cls is torch.optim.Rprop)
    for error_input in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        oi = error_input.optimizer_error_input
        params = oi.params if oi.params is not None else [Parameter(torch.randn(2))]
        for cls in CLASSES:
            if issubclass(error_input.error_type, Warning):
                with pytest.warns(error_input.error_type, match=error_input.error_regex):
                    cls(params, **oi.kwargs)
            else:
                with pytest.raises(error_input.error_type, match=error_input.error_regex):
                    cls(params, **oi.kwargs)


# -- the update goes the right way --------------------------------------------

def _linear(contiguous=True):
    if contiguous:
        return Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
    return Parameter(torch.randn(10, 5, 2)[..., 0]), Parameter(torch.randn(10, 2)[..., 0])


@by_class
@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(cls, contiguous, with_lrsched):
    torch.manual_seed(0)
    for kwargs in [dict(kw, foreach=False) for kw in OPTIM_INPUTS.values()]:
        weight, bias = _linear(contiguous)
        x = torch.randn(5)
        opt = cls([weight, bias], **kwargs)
        scheds = ([StepLR(opt, gamma=0.9, step_size=10), ReduceLROnPlateau(opt)]
                  if with_lrsched else [])

        def closure(opt=opt, weight=weight, bias=bias, x=x):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        ctx = scheduled(cls)
        try:
            for _ in range(20):
                loss = opt.step(closure)
                for s in scheds:
                    s.step(loss.detach()) if isinstance(s, ReduceLROnPlateau) else s.step()
        finally:
            ctx.__exit__(None, None, None)
        if kwargs.get("maximize"):
            assert closure().item() > initial
        else:
            assert closure().item() < initial


@by_class
def test_param_group_with_lrscheduler_goes_right_direction(cls):
    torch.manual_seed(0)
    weight, bias = _linear()
    x = torch.randn(5)
    opt = cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
    scheds = [StepLR(opt, gamma=0.9, step_size=10), ReduceLROnPlateau(opt)]

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    ctx = scheduled(cls)
    try:
        for _ in range(20):
            loss = opt.step(closure)
            for s in scheds:
                s.step(loss.detach()) if isinstance(s, ReduceLROnPlateau) else s.step()
    finally:
        ctx.__exit__(None, None, None)
    assert closure().item() < initial


@by_class
def test_tensor_lr(cls):
    for kwargs in inputs(skip=("differentiable",)):
        torch.manual_seed(0)
        weight, bias = _linear()
        weight_c = weight.detach().clone().requires_grad_(True)
        bias_c = bias.detach().clone().requires_grad_(True)
        x = torch.randn(5)
        kwargs = {**kwargs, "lr": 1e-3}
        opt_r = cls([weight, bias], **kwargs)
        opt = cls([weight_c, bias_c], **{**kwargs, "lr": torch.tensor(1e-3)})
        for _ in range(5):
            for o, w, b in ((opt_r, weight, bias), (opt, weight_c, bias_c)):
                o.zero_grad()
                (w.mv(x) + b).pow(2).sum().backward()
                o.step()
            assert torch.equal(weight, weight_c)
            assert torch.equal(bias, bias_c)


@by_class
def test_param_groups_weight_decay_and_lr(cls):
    for kwargs in inputs(skip=("differentiable",)):
        torch.manual_seed(0)
        kwargs = {**kwargs, "lr": kwargs.get("lr") or 1e-3}
        weight, bias = _linear()
        irrelevant = Parameter(torch.randn(2))
        irrelevant_clone = irrelevant.clone()
        x = torch.randn(5)
        opt = cls([dict(params=[weight, bias], **kwargs), dict(params=[irrelevant])],
                  lr=1e-28, step_sizes=(0, 50))
        loss = (weight.mv(x) + bias).pow(2).sum()
        initial = loss.item()
        for _ in range(20):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            opt.step()
        if kwargs.get("maximize"):
            assert loss.item() > initial
        else:
            assert loss.item() < initial
        assert torch.equal(irrelevant, irrelevant_clone)


@by_class
def test_step_is_noop_when_params_have_no_grad(cls):
    params = [torch.randn(2, 3, requires_grad=False) for _ in range(2)]
    old = [p.clone() for p in params]
    for kwargs in inputs():
        cls(params, **kwargs).step(lambda: torch.tensor([1.0]))
        for p, q in zip(params, old):
            assert torch.equal(p, q)


@by_class
def test_step_is_noop_for_zero_grads(cls):
    param = torch.randn(5, 1, requires_grad=True)
    old = param.detach().clone()
    for kwargs in inputs():
        params = [param.clone()] if kwargs.get("differentiable") else [param]
        opt = cls(params, **kwargs)
        params[0].grad = torch.zeros_like(params[0])
        opt.step(lambda: torch.tensor([1.0]))
        assert torch.equal(old, params[0].detach())


@by_class
def test_complex(cls):
    """Complex parameters step as their real views (torch's test_complex_2d)."""
    for kwargs in inputs(skip=("differentiable",)):
        torch.manual_seed(0)
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        re = a1.real.clone().detach().requires_grad_()
        im = a1.imag.clone().detach().requires_grad_()
        o1, o2 = cls([a1], **kwargs), cls([re, im], **kwargs)
        for _ in range(10):
            o1.zero_grad()
            o2.zero_grad()
            f = lambda t: (1 - t[0]) ** 2 + 100 * (t[1] - t[0] ** 2) ** 2  # noqa: E731
            f(a1).abs().backward()
            f(torch.complex(re, im)).abs().backward()
            o1.step()
            o2.step()
            assert torch.equal(a1.real, re)
            assert torch.equal(a1.imag, im)


@by_class
def test_complex_mixed_with_real(cls):
    """torch's test_complex: complex parameters (and a real one beside them)
    step exactly as their view_as_real twins, at every step."""
    for kwargs in inputs(skip=("differentiable",)):
        torch.manual_seed(0)
        cplx = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
                torch.randn(10, dtype=torch.complex64, requires_grad=True),
                torch.randn(10, 5, requires_grad=True)]
        real = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone()
                .requires_grad_() for p in cplx]
        opt_c, opt_r = cls(cplx, **kwargs), cls(real, **kwargs)
        for _ in range(3):
            for c, r in zip(cplx, real):
                r.grad = torch.randn_like(r)
                c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
            opt_r.step()
            opt_c.step()
            for c, r in zip(cplx, real):
                assert torch.equal(torch.view_as_real(c) if c.is_complex() else c, r)


def _mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                               torch.nn.Linear(3, 1), torch.nn.Sigmoid())


@by_class
def test_foreach_matches_forloop(cls):
    """torch's test_foreach_matches_forloop (_compare_between): a layer frozen
    for two steps, one step with no gradients, an empty 0-dim parameter; the
    foreach implementation matches the for-loop one, parameters and state."""
    for kwargs in OPTIM_INPUTS.values():
        x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]).reshape(3, 2)
        models, opts = [], []
        for foreach in (False, True):
            model = _mlp()
            empty = torch.empty((), requires_grad=True)
            empty.grad = torch.rand_like(empty)
            models.append(model)
            opts.append(cls([*model.parameters(), empty], **kwargs, foreach=foreach))
        for i in range(7):
            for model, opt in zip(models, opts):
                opt.zero_grad()
                if i == 3:
                    model[2].requires_grad_(False)
                if i == 5:
                    model[2].requires_grad_(True)
                if i != 2:
                    model(x).sum().backward()
                opt.step()
            for p, q in zip(models[0].parameters(), models[1].parameters()):
                assert torch.equal(p, q)
                assert same(opts[0].state[p], opts[1].state[q])


@by_class
def test_non_empty_state(cls):
    model = torch.nn.Linear(5, 5)
    x = torch.rand(2, 5)
    for kwargs in OPTIM_INPUTS.values():
        opt = cls(model.parameters(), **kwargs)
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        assert all(len(s) > 0 for s in opt.state.values())


# -- printing, copying, state_dict ----------------------------------------------

@by_class
def test_optimizer_can_be_printed(cls):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for kwargs in inputs():
        text = repr(cls(params, **kwargs))
        assert text.startswith(f"{cls.__name__} (") and "Parameter Group 0" in text
        for key in ("lr", "etas", "step_sizes", "maximize", "foreach"):
            assert f"    {key}: " in text


def _named(params, is_named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if is_named else params


def _without_names(sd):
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g.pop("param_names", None)
    return sd


def _fwd_bwd(opt, w, b, x):
    opt.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


@by_class
@pytest.mark.parametrize("named0", [True, False])
@pytest.mark.parametrize("named1", [True, False])
def test_state_dict_deterministic(cls, named0, named1):
    for kwargs in inputs(skip=("differentiable",)):
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
        x = torch.randn(3)
        opt = cls(_named([weight, bias], named0), **kwargs)
        closure = functools.partial(_fwd_bwd, opt, weight, bias, x)
        for _ in range(10):
            opt.step(closure)
        with torch.no_grad():
            weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
        opt_c = cls(_named([weight_c, bias_c], named1), **kwargs)
        closure_c = functools.partial(_fwd_bwd, opt_c, weight_c, bias_c, x)
        opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
        for _ in range(10):
            opt.step(closure)
            opt_c.step(closure_c)
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
        a, b = _without_names(opt.state_dict()), _without_names(opt_c.state_dict())
        assert same(a, b)
        opt_c.param_groups.extend(opt_c.param_groups)
        assert (_without_names(opt.state_dict())["param_groups"][-1]
                == _without_names(opt_c.state_dict())["param_groups"][-1])


def _conv_bn():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2),
                                torch.nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))
    return model, torch.rand(1, 4, 16, 16)


def _model_step(opt, model, x):
    def closure():
        opt.zero_grad()
        loss = model(x).sum()
        loss.backward()
        return loss
    opt.step(closure)


@by_class
def test_can_load_older_state_dict(cls):
    """A state_dict whose groups lack the flags newer releases added."""
    for kwargs in inputs(skip=("differentiable",)):
        model, x = _conv_bn()
        opt = cls(model.parameters(), **kwargs)
        for _ in range(3):
            _model_step(opt, model, x)
        old = copy.deepcopy(opt.state_dict())
        for group in old["param_groups"]:
            for flag in NOT_OG_FLAGS:
                group.pop(flag, None)
        opt.load_state_dict(old)
        _model_step(opt, model, x)


@by_class
@pytest.mark.parametrize("named0", [True, False])
@pytest.mark.parametrize("named1", [True, False])
def test_can_load_from_to_named_state_dict(cls, named0, named1):
    for kwargs in inputs(skip=("differentiable",)):
        model, x = _conv_bn()
        opt = cls(model.named_parameters() if named0 else model.parameters(), **kwargs)
        for _ in range(3):
            _model_step(opt, model, x)
        old = copy.deepcopy(opt.state_dict())
        opt2 = cls(model.named_parameters() if named1 else model.parameters(), **kwargs)
        opt2.load_state_dict(old)
        _model_step(opt2, model, x)
        if named0 or named1:
            assert opt2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight", "0.bias", "1.weight", "1.bias"]


@by_class
@pytest.mark.parametrize("named", [True, False])
def test_save_load_equality_with_weights_only(cls, named):
    for kwargs in inputs(skip=("differentiable",)):
        weight, bias = Parameter(torch.randn(2, 3)), Parameter(torch.randn(2))
        x = torch.randn(3)
        opt = cls(_named([weight, bias], named), **kwargs)
        for _ in range(3):
            opt.step(functools.partial(_fwd_bwd, opt, weight, bias, x))
        sd = opt.state_dict()
        buf = io.BytesIO()
        torch.save(sd, buf)
        for weights_only in (False, True):
            buf.seek(0)
            assert same(torch.load(buf, weights_only=weights_only), sd)


@by_class
def test_load_nontensor_step(cls):
    """A Python-number ``step`` in a loaded state (old torch states)."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    for kwargs in inputs(skip=("differentiable",)):
        opt = cls(params, **kwargs)
        for _ in range(3):
            opt.step()
        sd = copy.deepcopy(opt.state_dict())
        for st in sd["state"].values():
            st["step"] = st["step"].item()
        opt.load_state_dict(sd)
        opt.step()
        for st in opt.state.values():
            assert torch.is_tensor(st["step"]) and st["step"].item() == 4


def test_loaded_nontensor_step_matches_torchs_tensor():
    ref, ours = ([Parameter(torch.randn(3))] for _ in range(2))
    for params, cls in ((ref, torch.optim.Rprop), (ours, rprop.Rprop)):
        params[0].grad = torch.ones(3)
        opt = cls(params)
        opt.step()
        sd = opt.state_dict()
        sd["state"][0]["step"] = 1.0
        opt.load_state_dict(sd)
        step = opt.state[params[0]]["step"]
        if cls is torch.optim.Rprop:
            want = step
        else:
            assert (step.dtype, step.device, step.shape) == (want.dtype, want.device, want.shape)
            assert step.item() == want.item()


@by_class
def test_deepcopy_copies_all_public_attrs(cls):
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.rand_like(p)
    public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
    for kwargs in inputs(skip=("differentiable",)):
        opt = cls(params, **kwargs)
        for _ in range(3):
            opt.step()
        clone = copy.deepcopy(opt)
        assert public(opt) == public(clone)
        assert same(clone.state_dict(), opt.state_dict())


# -- hooks ----------------------------------------------------------------------

def _state_dict_pre_hook(opt):
    opt.state["test"] = 1


def _state_dict_post_hook(opt, state_dict):
    state_dict["ran_state_dict_pre_hook"] = "test" in state_dict["state"]
    state_dict["state"].pop("test", None)
    return state_dict


@by_class
def test_state_dict_hooks(cls):
    for kwargs in inputs():
        opt = cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        assert opt.state_dict()["state"]["test"] == 1
        opt = cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
        opt.register_state_dict_post_hook(_state_dict_post_hook)
        assert opt.state_dict()["ran_state_dict_pre_hook"] is False
        opt.register_state_dict_pre_hook(_state_dict_pre_hook)
        sd = opt.state_dict()
        assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True


def _load_pre_hook1(opt, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_pre_hook2(opt, state_dict):
    mine = copy.deepcopy(state_dict)
    mine["param_groups"][0]["lr"] = 0.003
    return mine


def _load_post_hook(opt):
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True


@by_class
def test_load_state_dict_pre_hook_and_prepend(cls):
    for kwargs in inputs():
        opt = cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
        sd = opt.state_dict()
        opt.register_load_state_dict_pre_hook(_load_pre_hook1)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002
        opt.register_load_state_dict_pre_hook(_load_pre_hook2, prepend=True)
        opt.load_state_dict(sd)
        assert opt.param_groups[0]["lr"] == 0.002


@by_class
def test_load_state_dict_post_hook_effects_survive(cls):
    """The post-hook's marker is still in optimizer.state after the load."""
    for kwargs in inputs(skip=("differentiable",)):
        p = torch.rand(2, 3, requires_grad=True)
        opt = cls([p], **kwargs)
        p.grad = torch.rand_like(p)
        opt.step()
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"] is False
        assert opt.state["ran_load_state_dict_post_hook"] is True
        assert set(opt.state[p]) >= {"step", "prev", "step_size"}
        # and the marker goes through a save and load, as torch's non-parameter state
        opt.load_state_dict(opt.state_dict())
        p.grad = torch.rand_like(p)
        opt.step()


@by_class
def test_load_state_dict_pre_post_hook(cls):
    for kwargs in inputs():
        opt = cls([torch.rand(2, 3, requires_grad=True)], **kwargs)
        opt.register_load_state_dict_pre_hook(_load_pre_hook2)
        opt.register_load_state_dict_post_hook(_load_post_hook)
        opt.load_state_dict(opt.state_dict())
        assert opt.state["ran_load_state_dict_pre_hook2"] is True
        assert opt.state["ran_load_state_dict_post_hook"] is True


@by_class
def test_load_pre_hook_sees_the_dict_before_it_is_checked(cls):
    """A pre-hook may repair what the loader would refuse (torch's documented
    use: adapting a dict saved for other parameters)."""
    p = Parameter(torch.randn(3))
    opt = cls([p])
    p.grad = torch.ones(3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step_size"] = torch.full((4,), 0.1)  # wrong shape

    def fix(_, state_dict):
        state_dict["state"][0]["step_size"] = torch.full((3,), 0.1)

    opt.register_load_state_dict_pre_hook(fix)
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[p]["step_size"], torch.full((3,), 0.1))


def _counting_hooks(data):
    def pre(opt, args, kwargs):
        data.append("pre")

    def post(opt, args, kwargs):
        data.append("post")
    return pre, post


@by_class
def test_step_pre_and_post_hooks(cls):
    params = [torch.tensor([1.0, 1.0])]
    for kwargs in inputs():
        opt = cls(params, **kwargs)
        data = []
        pre, post = _counting_hooks(data)
        handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]
        opt.step()
        opt.step()
        assert data == ["pre", "post"] * 2
        for h in handles:
            h.remove()
        opt.step()
        assert data == ["pre", "post"] * 2


@by_class
def test_step_all_hooks(cls):
    params = [torch.tensor([1.0, 1.0])]
    for kwargs in inputs():
        opt, opt2 = cls(params, **kwargs), torch.optim.SGD(params)
        data = []
        mark = functools.partial(lambda sink, value, *_: sink.append(value), data)
        handles = [
            register_optimizer_step_pre_hook(functools.partial(mark, 0)),
            register_optimizer_step_post_hook(functools.partial(mark, 5)),
        ]
        for o in (opt, opt2):
            handles += [o.register_step_pre_hook(functools.partial(mark, 1)),
                        o.register_step_post_hook(functools.partial(mark, 2))]
        try:
            opt.step()
            opt2.step()
            opt.step()
            assert data == [0, 1, 2, 5] * 3
        finally:
            for h in handles:
                h.remove()
        opt.step()
        opt2.step()
        assert data == [0, 1, 2, 5] * 3


# -- what rprop adds to the contract ---------------------------------------------

def _stepped(variant="rprop+", n=3):
    torch.manual_seed(0)
    p = Parameter(torch.randn(4))
    opt = rprop.Rprop([p], variant=variant)
    for i in range(n):
        p.grad = torch.randn(4) * (-1) ** i
        opt.step(loss=float(i))
    return p, opt


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("variant", ["rprop+", "irprop+"])
def test_nonfinite_prev_update_is_refused_and_changes_nothing(variant, bad):
    p, opt = _stepped(variant)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["prev_update"][1] = bad
    before = copy.deepcopy(opt.state_dict())
    p_before = p.detach().clone()
    with pytest.raises(ValueError, match=r"state 'prev_update' of parameter 0 .*must be finite"):
        opt.load_state_dict(sd)
    assert same(opt.state_dict(), before)
    assert torch.equal(p, p_before)


def test_refused_load_runs_no_post_hook_and_keeps_state():
    _, opt = _stepped("rprop+")
    ran = []
    opt.register_load_state_dict_post_hook(lambda o: ran.append(True))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["step_size"][0] = -1.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="NaN or negative"):
        opt.load_state_dict(sd)
    assert ran == []
    assert same(opt.state_dict(), before)
    # the loader's own pre-hook is gone again
    assert len(opt._optimizer_load_state_dict_pre_hooks) == 0


@pytest.mark.parametrize("factor", [np.float32(2.0), np.float64(2.0), torch.tensor(2.0),
                                    torch.tensor([2.0]), np.array(2.0)],
                         ids=["np.float32", "np.float64", "0-dim tensor", "1-elem tensor",
                              "0-dim array"])
def test_rescale_step_sizes_takes_what_lr_takes(factor):
    p, opt = _stepped("irprop-", n=1)
    rprop.Rprop([Parameter(torch.zeros(1))], lr=factor)  # lr takes it
    before = opt.state[p]["step_size"].clone()
    opt.rescale_step_sizes(factor)
    assert torch.equal(opt.state[p]["step_size"], (before * 2.0).clamp(1e-6, 50.0))


@pytest.mark.parametrize("factor", [True, 1 + 1j, "2", torch.tensor([1.0, 2.0])])
def test_rescale_step_sizes_refuses_non_numbers(factor):
    _, opt = _stepped("irprop-", n=1)
    with pytest.raises(TypeError, match="factor must be a positive number"):
        opt.rescale_step_sizes(factor)


@pytest.mark.parametrize(("param_dtype", "state_dtype"), [
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float64, torch.float32), (torch.bfloat16, torch.float16),
])
def test_state_dtype_narrower_than_the_parameter_is_refused(param_dtype, state_dtype):
    p = Parameter(torch.zeros(2, dtype=param_dtype))
    with pytest.raises(ValueError, match=rf"state_dtype={state_dtype} cannot hold the values "
                                         rf"of parameter 0 \({param_dtype}\)"):
        rprop.Rprop([p], state_dtype=state_dtype)


def test_state_dtype_wider_is_honoured():
    p = Parameter(torch.zeros(2, dtype=torch.float16))
    opt = rprop.Rprop([p], state_dtype=torch.float32)
    p.grad = torch.ones(2, dtype=torch.float16)
    opt.step()
    assert {t.dtype for t in (opt.state[p]["prev"], opt.state[p]["step_size"])} == {
        torch.float32}


@pytest.mark.parametrize("name", ["etas", "step_sizes"])
@pytest.mark.parametrize("value", [{0.5, 1.2}, frozenset({1e-6, 50.0}), {0: 0.5, 1: 1.2}],
                         ids=["set", "frozenset", "dict"])
def test_unordered_pairs_are_a_type_error_naming_the_argument(name, value):
    with pytest.raises(TypeError, match=rf"{name} must be a pair of two numbers"):
        rprop.Rprop([Parameter(torch.zeros(1))], **{name: value})


@pytest.mark.parametrize("lr", [0.0, 1e-7, torch.tensor(0.0)], ids=["0", "1e-7", "tensor 0"])
def test_lr_seeding_below_step_min_warns_once(lr):
    p = Parameter(torch.randn(3))
    q = Parameter(torch.randn(3))
    opt = rprop.Rprop([p], lr=lr)
    opt.add_param_group({"params": [q], "lr": 0.0})
    assert issubclass(rprop.LrSeedWarning, UserWarning)
    assert rprop.torch.LrSeedWarning is rprop.LrSeedWarning
    p.grad = torch.ones(3)
    with pytest.warns(rprop.LrSeedWarning, match=r"seeded from lr=.*step_min=1e-06") as rec:
        opt.step()
    assert rec[0].filename == __file__  # points at the caller's step()
    q.grad = torch.ones(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer: the second group's fresh state is silent


def test_lr_seeding_at_or_above_step_min_is_silent():
    p = Parameter(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for lr in (1e-6, 0.01, 100.0):
            opt = rprop.Rprop([p], lr=lr)
            p.grad = torch.ones(3)
            opt.step()
        opt = rprop.Rprop([p], lr=0.0, step_sizes=(0.0, 1.0))
        p.grad = None
        opt.step()  # no state created: nothing seeded


EXTREME = [({"lr": 1e39}, r"lr=1e\+39"), ({"etas": (0.5, 1e39)}, r"etas\[1\] \(eta_plus\)=1e\+39"),
           ({"step_sizes": (1e-6, 1e39)}, r"step_sizes\[1\] \(step_max\)=1e\+39"),
           ({"weight_decay": 1e39}, r"weight_decay=1e\+39")]
PATH_FLAGS = {"for-loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True},
              "default": {}}


@pytest.mark.parametrize("path", sorted(PATH_FLAGS))
@pytest.mark.parametrize(("kwargs", "named"), EXTREME, ids=[e[1] for e in EXTREME])
def test_values_past_the_dtype_are_refused_on_every_path(kwargs, named, path):
    """Decided: a finite hyperparameter past the largest finite value of the
    dtype the step computes in is refused (with the value and the dtype) at
    construction, on every path, rather than stepped differently by each."""
    p = Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=named + r" does not fit the parameters' dtype "
                                                 r"torch.float32"):
        rprop.Rprop([p], **kwargs, **PATH_FLAGS[path])
    # the same values fit float64 (and float32 parameters with float64 state)
    wide = Parameter(torch.randn(3, dtype=torch.float64))
    rprop.Rprop([wide], **kwargs, **PATH_FLAGS[path])
    rprop.Rprop([Parameter(torch.randn(3))], **kwargs, state_dtype=torch.float64)


def test_values_past_the_dtype_are_refused_when_changed_later_and_on_load():
    p = Parameter(torch.randn(3))
    opt = rprop.Rprop([p])
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["lr"] = 1e39
    with pytest.raises(ValueError, match=r"param group 0 of state_dict: lr=1e\+39 does not fit"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.01
    opt.param_groups[0]["step_sizes"] = (1e-6, 1e39)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"step_max\)=1e\+39 does not fit"):
        opt.step()
    assert torch.equal(p, before)


def test_lr_past_the_dtype_set_before_the_first_step_seeds_nothing():
    p = Parameter(torch.randn(3))
    opt = rprop.Rprop([p])
    opt.param_groups[0]["lr"] = 1e39
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"lr=1e\+39 does not fit"):
        opt.step()
    assert not any(opt.state.values())  # nothing seeded from the refused lr
    opt.param_groups[0]["lr"] = 0.01
    opt.step()
    q = Parameter(p.detach().clone())
    ref = torch.optim.Rprop([q], lr=0.01)
    q.grad = torch.ones(3)
    ref.step()
    assert torch.equal(opt.state[p]["step_size"], ref.state[q]["step_size"])


def test_float16_range_is_its_own():
    p = Parameter(torch.randn(3, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"lr=70000.0 does not fit .* torch.float16"):
        rprop.Rprop([p], lr=7e4)
    rprop.Rprop([p], lr=7e4, state_dtype=torch.float32)
    rprop.Rprop([p], step_sizes=(1e-6, float("inf")))  # inf: no upper bound, allowed
