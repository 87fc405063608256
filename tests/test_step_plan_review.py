"""Changes between steps that what rprop.Rprop keeps between steps
(rprop.torch._plan, the fused path's prepared pointer table, iRprop+'s shared
E(t-1)) must see, beyond tests/test_step_plan.py: memory that moves under the
same tensor object, a parameter viewed anew at the same address, a sparse
gradient after the first step, and state dicts that no longer share E(t-1).
The oracle is torch.optim.Rprop, or, for iRprop+, rprop's for-loop path run
without the change."""

from __future__ import annotations

import copy
import gc
import weakref
from typing import Any

import pytest
import torch

import rprop
from _table import PATHS, assert_same

SHAPES = [(6,), (3, 3), (5,), (2, 2)]


def _params() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]


def _grads(t: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen) for s in SHAPES]


def _against_torch(path: str, change: Any, steps: int = 6, keep_grads: bool = False) -> None:
    """``change(opt, params)`` after the second step, with torch.optim.Rprop
    and rprop's ``path``; ``keep_grads``: the gradients are the same tensors
    at every step, written in place (zero_grad(set_to_none=False))."""
    runs = []
    for make in (lambda ps: torch.optim.Rprop(ps, lr=0.05, foreach=False),
                 lambda ps: rprop.Rprop(ps, lr=0.05, **PATHS[path])):
        params = _params()
        opt = make(params)
        for t in range(steps):
            for p, g in zip(params, _grads(t), strict=True):
                if keep_grads and p.grad is not None:
                    p.grad.copy_(g)  # in logical order, whatever the strides
                else:
                    p.grad = g.clone()
            opt.step()
            if t == 1:
                change(opt, params)
        runs.append((params, opt))
    (tp, topt), (rp, ropt) = runs
    assert_same(tp, rp, topt, ropt)


def _share_state_memory(opt: Any, params: list[torch.Tensor]) -> None:
    # As an A3C-style shared optimizer does: the storage moves to shared
    # memory under the same tensor objects, and the old memory is freed.
    for p in params:
        for t in opt.state[p].values():
            t.share_memory_()


def _reassign_state_data(opt: Any, params: list[torch.Tensor]) -> None:
    opt.state[params[0]]["step_size"].data = torch.full(SHAPES[0], 0.3)
    opt.state[params[1]]["prev"].data = torch.zeros(SHAPES[1])
    opt.state[params[2]]["step"].data = torch.tensor(7.0)


@pytest.mark.parametrize("path", list(PATHS))
def test_state_memory_moved_under_the_same_tensors(path):
    """share_memory_() on the state (the old memory freed) must not leave
    the fused step writing where the state was."""
    _against_torch(path, _share_state_memory)


@pytest.mark.parametrize("path", list(PATHS))
def test_state_data_reassigned(path):
    _against_torch(path, _reassign_state_data)


@pytest.mark.parametrize("path", list(PATHS))
def test_parameter_viewed_transposed_at_the_same_address(path):
    """``p.data = p.data.t()`` keeps the data pointer and the size; the
    parameter is no longer contiguous, its (contiguous) gradient no longer
    lines up with its memory element by element."""
    def transpose(opt: Any, params: list[torch.Tensor]) -> None:
        params[1].data = params[1].data.t()
    _against_torch(path, transpose)


@pytest.mark.parametrize("path", list(PATHS))
def test_gradient_transposed_in_place_under_the_same_object(path):
    """Gradients kept between steps: one is transposed in place, same object,
    same address and size, new strides, so it no longer lines up with its
    parameter element by element."""
    def transpose(opt: Any, params: list[torch.Tensor]) -> None:
        params[1].grad.t_()
        assert not params[1].grad.is_contiguous()
    _against_torch(path, transpose, keep_grads=True)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_sparse_gradient_after_the_first_step_is_refused_before_anything_changes(path):
    params = _params()
    opt = rprop.Rprop(params, lr=0.05, **PATHS[path])
    for t in range(2):
        for p, g in zip(params, _grads(t), strict=True):
            p.grad = g.clone()
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    after = opt.state_dict()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), values[i])
        for key, value in before["state"][i].items():
            assert torch.equal(after["state"][i][key], value), (i, key)


LOSSES = [3.0, 2.0, 2.5, 1.0, 4.0, 3.0, 0.7, 0.2, 3.0, 0.1]


@pytest.mark.parametrize("path", list(PATHS))
def test_irprop_plus_state_dicts_copied_then_a_parameter_without_gradient(path):
    """State dicts replaced by copies (as Lightning's move to a device does)
    no longer share one E(t-1) tensor; a parameter without a gradient in some
    steps must still take each step's loss, as every parameter does when the
    state is left alone (the for-loop path's run is the oracle), and the
    optimizer's own state_dict must load."""
    runs = []
    for copy_states, kw in ((False, PATHS["for-loop"]), (True, PATHS[path])):
        params = _params()
        opt = rprop.Rprop(params, lr=0.05, variant="irprop+", **kw)
        for t, loss in enumerate(LOSSES):
            for i, (p, g) in enumerate(zip(params, _grads(t), strict=True)):
                p.grad = None if i == 0 and t in (3, 4, 6, 9) else g.clone()
            opt.step(loss=loss)
            if t == 1 and copy_states:
                for p in params:
                    opt.state[p] = {k: v.clone() for k, v in opt.state[p].items()}
        runs.append((params, opt))
    (op, oopt), (rp, ropt) = runs
    assert_same(op, rp, oopt, ropt)
    fresh = rprop.Rprop(_params(), lr=0.05, variant="irprop+", **PATHS[path])
    fresh.load_state_dict(ropt.state_dict())


@pytest.mark.parametrize("path", list(PATHS))
def test_a_removed_group_and_its_state_are_freed(path):
    """A param group removed by hand, its state deleted: nothing the step
    keeps holds its tensors after the next step (torch keeps none)."""
    params = _params()
    opt = rprop.Rprop([{"params": params[:2]}, {"params": params[2:]}], lr=0.05,
                      **PATHS[path])
    for t in range(2):
        for p, g in zip(params, _grads(t), strict=True):
            p.grad = g.clone()
        opt.step()
    held = weakref.ref(opt.state[params[3]]["step_size"])
    removed = opt.param_groups.pop()
    for p in removed["params"]:
        del opt.state[p]
    del removed
    opt.step()
    gc.collect()
    assert held() is None
