"""rprop.Rprop (default variant, iRprop-) against torch.optim.Rprop: bitwise,
on every path of the table, both of torch's implementations as the oracle,
and state_dicts moving between the two both ways."""

from __future__ import annotations

import copy

import pytest
import torch

import rprop
from _table import (
    DTYPES,
    FULL,
    HALF,
    PATHS,
    TORCH_PATHS,
    assert_same,
    drive,
    fresh,
    groups_for,
    groups_warning,
    make_params,
)


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", FULL)
def test_bitwise_parity_with_torch(dtype, path, tensor_lr):
    """Four param groups (maximize, lr below step_min, lr above step_max, odd
    etas), complex, 0-d, empty and non-contiguous parameters, gradients that
    are missing, 300 steps: every parameter and state tensor bit for bit
    equal to torch.optim.Rprop's, for its for-loop and its foreach
    implementation alike."""
    base = make_params(DTYPES[dtype])
    sets = {name: fresh(base) for name in (*TORCH_PATHS, "ours")}
    opts = {name: torch.optim.Rprop(groups_for(sets[name], tensor_lr=tensor_lr), **kw)
            for name, kw in TORCH_PATHS.items()}
    opts["ours"] = rprop.Rprop(groups_for(sets["ours"], tensor_lr=tensor_lr), **PATHS[path])
    with groups_warning():
        drive(list(opts.values()), list(sets.values()), steps=300)
    for name in TORCH_PATHS:
        assert_same(sets[name], sets["ours"], opts[name], opts["ours"], same_keys=False)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("dtype", HALF)
def test_bitwise_parity_with_torch_in_half_precision(dtype, path):
    """torch multiplies step sizes by eta held in the parameter's dtype
    (bfloat16(1.2) = 1.203125); so do all of rprop's paths."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(40, generator=g).to(DTYPES[dtype]),
            torch.randn(3, 5, generator=g).to(DTYPES[dtype])]

    def groups(ps):
        return [{"params": ps[:1]}, {"params": ps[1:], "lr": 0.3, "step_sizes": (1e-3, 1.0),
                                     "maximize": True}]

    sets = {name: fresh(base) for name in (*TORCH_PATHS, "ours")}
    opts = {name: torch.optim.Rprop(groups(sets[name]), **kw) for name, kw in TORCH_PATHS.items()}
    opts["ours"] = rprop.Rprop(groups(sets["ours"]), **PATHS[path])
    drive(list(opts.values()), list(sets.values()), steps=200)
    for name in TORCH_PATHS:
        assert_same(sets[name], sets["ours"], opts[name], opts["ours"], same_keys=False)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_state_dict_torch_to_rprop_and_back(path):
    base = make_params(torch.float64, seed=3)
    a, b = fresh(base), fresh(base)
    ref = torch.optim.Rprop(groups_for(a))
    ours = rprop.Rprop(groups_for(b), **PATHS[path])
    drive([ref], [a], steps=40)
    # torch -> rprop: load into a fresh optimizer over copies of torch's params.
    with torch.no_grad():
        for x, y in zip(a, b, strict=True):
            y.copy_(x)
    loaded = copy.deepcopy(ref.state_dict())
    snapshot = copy.deepcopy(loaded)
    ours.load_state_dict(loaded)
    assert_same(a, b, ref, ours, same_keys=False)
    drive([ref, ours], [a, b], steps=60, seed=7)
    assert_same(a, b, ref, ours, same_keys=False)
    # The dict we loaded from is untouched by later steps (state was copied in).
    for k, v in snapshot["state"].items():
        for key in v:
            assert torch.equal(loaded["state"][k][key], v[key])
    # rprop -> torch.
    c = fresh(b)
    back = torch.optim.Rprop(groups_for(c))
    # torch's loader aliases the tensors it is given, so hand it a copy.
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    drive([ours, back], [b, c], steps=60, seed=9)
    assert_same(c, b, back, ours, same_keys=False)


def test_state_dict_layout_matches_torch():
    p, q = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    ref, ours = torch.optim.Rprop([p]), rprop.Rprop([q])
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    ref.step()
    ours.step()
    sr, so = ref.state_dict(), ours.state_dict()
    assert sr["state"][0].keys() == so["state"][0].keys() == {"step", "prev", "step_size"}
    assert sr["param_groups"][0].keys() <= so["param_groups"][0].keys()
    extra = so["param_groups"][0].keys() - sr["param_groups"][0].keys()
    assert extra == {
        "variant", "weight_decay", "fused", "nonfinite", "state_dtype", "skipped_steps",
        "grprop_delta", "grprop_partitioned",
    }


def test_loaded_torch_state_keeps_our_variant():
    p, q = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    ref = torch.optim.Rprop([p])
    p.grad = torch.ones(3)
    ref.step()
    ours = rprop.Rprop([q], variant="rprop+")
    ours.load_state_dict(ref.state_dict())
    assert ours.param_groups[0]["variant"] == "rprop+"
    q.grad = -torch.ones(3)
    ours.step()  # a sign flip: backtracking state must exist and start at 0
    assert torch.equal(ours.state[q]["prev_update"], torch.zeros(3))


def test_zero_grad_and_closure_return_like_torch():
    p = torch.randn(4, requires_grad=True)
    opt = rprop.Rprop([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    out = opt.step(closure)
    assert isinstance(out, torch.Tensor) and out.requires_grad


def test_differentiable_matches_torch():
    # Autograd through the steps, as torch's differentiable=True allows.
    def run(cls):
        w0 = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                         requires_grad=True)
        w = w0.clone()
        opt = cls([w], lr=0.1, differentiable=True)
        for t in range(6):
            w.grad = torch.sin(w.detach() * 3 + t)
            opt.step()
        return w.detach(), torch.autograd.grad((w**2).sum(), (w0,))[0]

    (wa, ga), (wb, gb) = run(torch.optim.Rprop), run(rprop.Rprop)
    assert torch.equal(wa, wb) and torch.equal(ga, gb)


def test_graph_capture_with_capturable_false_is_refused_as_by_torch(monkeypatch):
    """Capturing step() in a CUDA graph with capturable=False raises torch's
    error (simulated capture: the check only asks the accelerator's stream)."""

    class Capturing:
        def is_capturing(self):
            return True

    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda check_available=False: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda device=None: Capturing())
    messages = []
    for make in (torch.optim.Rprop, rprop.Rprop):
        p = torch.zeros(3, requires_grad=True)
        p.grad = torch.ones(3)
        with pytest.raises(RuntimeError) as err:
            make([p]).step()
        messages.append(str(err.value).replace("for an instance of Rprop", ""))
        assert torch.equal(p.detach(), torch.zeros(3))  # nothing stepped
    assert messages[0] == messages[1] and "capturable is False" in messages[0]


@pytest.mark.parametrize("variant", ["irprop-", "irprop+", "rprop+", "rprop-"])
def test_step_returns_the_closures_value_as_it_is(variant):
    """As torch.optim.Rprop: step(closure) returns what the closure returned
    (a float stays a float, a tensor the same tensor), for every variant;
    step(loss=...) returns that loss."""
    for value in (1.5, torch.tensor(2.0), torch.tensor([3.0], dtype=torch.float64)):
        got = []
        for make, kwargs in ((torch.optim.Rprop, {}), (rprop.Rprop, {"variant": variant})):
            p = torch.zeros(3, requires_grad=True)
            opt = make([p], **kwargs)

            def closure(p=p, value=value):
                p.grad = torch.ones(3)
                return value

            got.append(opt.step(closure))
            if make is rprop.Rprop:
                got.append(opt.step(loss=value))
        assert all(r is value for r in got), (variant, value, got)


def test_an_eta_that_rounds_to_zero_is_the_papers_not_torchs():
    """Documented difference (docs/variants.md): eta- = 1e-8 is 0 in float16.
    After a sign flip the paper's step size is (0.012 * 0) clamped to
    step_min; torch's masked assignments turn that 0 factor into 1."""
    kw = {"lr": 0.01, "etas": (1e-8, 1.2), "step_sizes": (1e-6, 50.0)}
    grown = (torch.tensor(0.01, dtype=torch.float16) * torch.tensor(1.2, dtype=torch.float16))
    floor = torch.tensor(1e-6, dtype=torch.float16)
    runs = [(torch.optim.Rprop, {}, grown)] + [(rprop.Rprop, extra, floor)
                                               for extra in PATHS.values()]
    for make, extra, want in runs:
        p = torch.zeros(1, dtype=torch.float16, requires_grad=True)
        opt = make([p], **kw, **extra)
        for g in (1.0, 1.0, -1.0):
            p.grad = torch.tensor([g], dtype=torch.float16)
            opt.step()
        assert opt.state[p]["step_size"].item() == want.item(), (make, extra)
