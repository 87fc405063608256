"""What rprop.Rprop keeps between steps (rprop.torch._plan) never outlives
what it was gathered from: after each kind of change a user or a library
makes between two steps, every path steps exactly as torch.optim.Rprop does
given the same change (torch gathers everything anew at every step)."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch

import rprop
from _table import PATHS, assert_same

SHAPES = [(6,), (3, 4), (5,), (2, 2)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _grads(t: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _step(opt: Any, params: list[torch.Tensor], t: int) -> None:
    for p, g in zip(params, _grads(t), strict=True):
        p.grad = g.clone()
    opt.step()


Change = Callable[[Any, list[torch.Tensor]], None]


def _swap_data(opt: Any, params: list[torch.Tensor]) -> None:
    params[1].data = params[1].data.clone() + 1.0  # new storage, as model.to() makes


def _replace_state_dicts(opt: Any, params: list[torch.Tensor]) -> None:
    # Lightning's _optimizer_to_device: every state dict replaced by a new one.
    for p in params:
        opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
    opt.state[params[0]]["step_size"].fill_(0.25)


def _replace_state_tensor(opt: Any, params: list[torch.Tensor]) -> None:
    opt.state[params[2]]["step_size"] = torch.full(SHAPES[2], 0.3)
    opt.state[params[2]]["prev"] = torch.zeros(SHAPES[2])


def _clear_state(opt: Any, params: list[torch.Tensor]) -> None:
    opt.state.clear()


def _drop_one_state(opt: Any, params: list[torch.Tensor]) -> None:
    del opt.state[params[3]]


def _swap_param_object(opt: Any, params: list[torch.Tensor]) -> None:
    new = params[0].detach().clone().requires_grad_()
    opt.param_groups[0]["params"][0] = new
    params[0] = new


def _transposed_grad(opt: Any, params: list[torch.Tensor]) -> None:
    pass  # the change is in the gradients of the next step (see the test)


CHANGES: dict[str, Change] = {
    "p.data swapped": _swap_data,
    "state dicts replaced": _replace_state_dicts,
    "a state tensor replaced": _replace_state_tensor,
    "state cleared": _clear_state,
    "one state deleted": _drop_one_state,
    "a parameter object replaced": _swap_param_object,
    "a gradient laid out unlike its parameter": _transposed_grad,
}


def _against_torch(path: str, drive: Any) -> None:
    """``drive(opt, params)`` with torch.optim.Rprop and with rprop's
    ``path``: the same parameters and state."""
    runs = []
    for make in (lambda ps: torch.optim.Rprop(ps, lr=0.05, foreach=False),
                 lambda ps: rprop.Rprop(ps, lr=0.05, **PATHS[path])):
        params = _params()
        opt = make(params)
        drive(opt, params)
        runs.append((params, opt))
    (tp, topt), (rp, ropt) = runs
    assert_same(tp, rp, topt, ropt)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_steps_is_seen(path, change):
    def drive(opt: Any, params: list[torch.Tensor]) -> None:
        for t in range(3):
            _step(opt, params, t)
        CHANGES[change](opt, params)
        for t in range(3, 6):
            if change == "a gradient laid out unlike its parameter" and t == 3:
                for p, g in zip(params, _grads(t), strict=True):
                    # same shape, transposed memory: the square parameter only
                    p.grad = g.t().contiguous().t() if g.dim() == 2 else g.clone()
                opt.step()
                continue
            _step(opt, params, t)
    _against_torch(path, drive)


@pytest.mark.parametrize("path", list(PATHS))
def test_gradients_coming_and_going(path):
    """A parameter whose gradient is None in some steps (a frozen branch)
    keeps its state there and joins again later, as in torch."""
    def drive(opt: Any, params: list[torch.Tensor]) -> None:
        for t in range(8):
            for i, (p, g) in enumerate(zip(params, _grads(t), strict=True)):
                p.grad = None if (i == 1 and t % 3 == 1) or (i == 3 and t < 4) else g
            opt.step()
    _against_torch(path, drive)


@pytest.mark.parametrize("path", list(PATHS))
def test_load_state_dict_and_add_param_group_between_steps(path):
    runs = []
    for make in (lambda ps: torch.optim.Rprop(ps[:3], lr=0.05, foreach=False),
                 lambda ps: rprop.Rprop(ps[:3], lr=0.05, **PATHS[path])):
        params = _params()
        opt = make(params)
        _step_some(opt, params[:3], 0, 3)
        saved = copy.deepcopy(opt.state_dict())
        _step_some(opt, params[:3], 3, 2)
        opt.load_state_dict(saved)  # back to step 3's state, new state tensors
        _step_some(opt, params[:3], 5, 2)
        opt.add_param_group({"params": [params[3]], "lr": 0.2})
        for t in range(7, 10):
            _step(opt, params, t)
        runs.append((params, opt))
    (tp, topt), (rp, ropt) = runs
    assert_same(tp, rp, topt, ropt, same_keys=False)


def _step_some(opt: Any, params: list[torch.Tensor], start: int, n: int) -> None:
    for t in range(start, start + n):
        for p, g in zip(params, _grads(t), strict=False):  # the first len(params)
            p.grad = g.clone()
        opt.step()


def test_state_stays_a_mapping_torch_can_save_and_pickle():
    """optimizer.state counts its changes, but saves as torch's state does:
    state_dict() holds plain dicts (loadable with weights_only=True), and the
    optimizer pickles and deep-copies with its state."""
    params = _params()
    opt = rprop.Rprop(params, lr=0.05)
    _step_some(opt, params, 0, 2)
    sd = opt.state_dict()
    assert type(sd["state"]) is dict and all(type(v) is dict for v in sd["state"].values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
    clones = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    _step_some(opt, params, 2, 2)
    for clone in clones:
        cparams = [p for g in clone.param_groups for p in g["params"]]
        _step_some(clone, cparams, 2, 2)
        assert_same(params, cparams, opt, clone)


def test_a_state_dict_whose_parameters_disagree_on_the_last_loss_is_refused():
    """iRprop+'s E(t-1) is one number for a group: a hand-made state_dict
    that gives its parameters different values is refused, nothing changed."""
    params = _params()
    opt = rprop.Rprop(params, lr=0.05, variant="irprop+")
    for t in range(2):
        for p, g in zip(params, _grads(t), strict=True):
            p.grad = g.clone()
        opt.step(loss=float(t))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][2]["prev_loss"] = torch.tensor(7.0, dtype=torch.float64)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="prev_loss' differs between the parameters of param "
                                         "group 0"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for k, v in before["state"].items():
        for key in v:
            assert torch.equal(v[key], after["state"][k][key])
    sd["state"][2]["prev_loss"] = sd["state"][1]["prev_loss"].clone()  # equal: loads
    opt.load_state_dict(sd)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_parameter_moved_between_irprop_plus_groups_takes_its_new_groups_loss(path):
    """iRprop+ groups that maximize and minimize keep E(t-1) signed their own
    way. A parameter moved from one to the other by hand must not carry its
    old group's loss tensor along: the run equals one whose state dicts are
    copied before every step (no tensor shared between parameters at all)."""
    runs = []
    for copy_states in (True, False):
        params = _params()
        opt = rprop.Rprop([{"params": params[:2]},
                           {"params": params[2:], "maximize": True}],
                          lr=0.05, variant="irprop+", **PATHS[path])
        for t in range(8):
            if t == 3:
                opt.param_groups[1]["params"].append(opt.param_groups[0]["params"].pop(1))
            if copy_states:
                for p in params:
                    if p in opt.state:
                        opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
            for i, (p, g) in enumerate(zip(params, _grads(t), strict=True)):
                p.grad = None if i == 0 and t % 2 else g.clone()
            opt.step(loss=float((-1) ** t * t))
        runs.append((params, opt))
    (ap, aopt), (bp, bopt) = runs
    assert_same(ap, bp, aopt, bopt)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_parameter_widened_after_its_state_was_made_is_refused(path):
    """model.double() after a step leaves float32 state under float64
    parameters: refused with a clear error before anything changes, rather
    than every update silently rounded to float32."""
    model = torch.nn.Linear(3, 2)
    opt = rprop.Rprop(model.parameters(), **PATHS[path])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    model.double()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"parameter 0 is torch.float64 but its state is "
                                         r"torch.float32"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
