"""GRprop with fused=True: the one-pass CPU kernel (rprop.torch._fused_grprop).

Against tests/reference.py's transcription of neuralnet's ``minus()`` where
it applies (float64, to 1e-15 relative: the kernel's sum runs in another
order than the tree), and otherwise against the batched GRprop step (the
reference path, itself pinned bitwise to the transcription in
tests/test_grprop.py), from the same state, one step at a time: every
element bitwise but the adjusted coordinate's step size and parameter."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import rprop
from reference import ReferenceGRprop
from test_grprop import NN, _assert_close, _reference_run, _torch_run

ADJUSTS = ("sag", "slr")


@pytest.mark.parametrize("adjust", ADJUSTS)
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.01, "maximize": True}], ids=["plain", "wd"])
def test_fused_matches_the_transcription(adjust, kw):
    got, opt = _torch_run(adjust, {"fused": True}, **kw)
    assert opt.last_paths == ("fused",)
    _assert_close(got, _reference_run(adjust, **kw), "fused", rtol=1e-15)


def _pair(shapes, dtype, adjust, **kw):
    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
    made = []
    for fused in (None, True):
        ps = [t.clone().requires_grad_() for t in start]
        made.append((ps, rprop.Rprop(ps, variant=f"grprop-{adjust}", fused=fused, **NN, **kw)))
    return made


def _same_state(src, dst):
    (sp, so), (dp, do) = src, dst
    with torch.no_grad():
        for a, b in zip(sp, dp, strict=True):
            b.copy_(a)
    do.load_state_dict(copy.deepcopy(so.state_dict()))
    for group in do.param_groups:  # the state_dict carried the batched one's flags
        group["fused"] = True


def _one_step_each(made, grads):
    for ps, opt in made:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()


def _flat(ts):
    return torch.cat([t.detach().reshape(-1) for t in ts])


def _differ(a, b):
    """Where two tensors differ in their bits (NaN equal to the same NaN)."""
    ints = {torch.float64: torch.int64, torch.float32: torch.int32}[a.dtype]
    return (a.view(ints) != b.view(ints)).nonzero().flatten().tolist()


def _assert_one_coordinate_apart(made, dtype):
    (bp, bo), (fp, fo) = made
    assert fo.last_paths == ("fused",) * len(fo.last_paths)
    for key in ("prev", "step_size"):
        b = _flat([bo.state[p][key] for p in bp])
        f = _flat([fo.state[p][key] for p in fp])
        if key == "prev":
            assert _differ(b, f) == []
            continue
        differ = _differ(b, f)
        assert len(differ) <= 1, differ
        torch.testing.assert_close(f, b, rtol=1e-15 if dtype == torch.float64 else 2**-23,
                                   atol=0, equal_nan=True)
    differ = _differ(_flat(bp), _flat(fp))
    assert len(differ) <= 1, differ


@pytest.mark.parametrize("adjust", ADJUSTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_against_the_batched_step_across_blocks_and_chunks(adjust, dtype):
    """Tensors that cross the kernel's 512-element chunks and 32768-element
    blocks, and both threads; zeros, ties and sign flips in the gradients."""
    shapes = [(40_000,), (3, 7), (70_001,), (1,)]
    made = _pair(shapes, dtype, adjust)
    gen = torch.Generator().manual_seed(11)
    for t in range(6):
        grads = [torch.randn(s, dtype=dtype, generator=gen) for s in shapes]
        grads[0][::3] = 0
        grads[2][5] = -grads[2][9]  # a tie in |g|
        if t % 2:
            grads = [-g for g in grads]  # every sign flips: the step sizes shrink
        _same_state(made[0], made[1])
        _one_step_each(made, grads)
        _assert_one_coordinate_apart(made, dtype)


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_fused_does_not_depend_on_the_thread_count(adjust):
    shapes = [(90_000,), (5,)]
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            (_, _), (ps, opt) = _pair(shapes, torch.float64, adjust)
            gen = torch.Generator().manual_seed(2)
            for _ in range(4):
                for p in ps:
                    p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen)
                opt.step()
            runs.append((_flat(ps), _flat([opt.state[p]["step_size"] for p in ps])))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("adjust", ADJUSTS)
@pytest.mark.parametrize("case", ["all zero", "nan in the sum", "inf gradient", "clip high",
                                  "clip low", "all tied"])
def test_fused_edge_cases_match_the_batched_step(adjust, case):
    shapes = [(6,), (2, 3)]
    made = _pair(shapes, torch.float64, adjust, grprop_delta=1e-6)
    base = [torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 1.5], dtype=torch.float64),
            torch.tensor([[1.0, -2.0, 0.5], [3.0, -0.5, 1.0]], dtype=torch.float64)]
    grads = [g.clone() for g in base]
    if case == "all zero":
        grads = [torch.zeros_like(g) for g in grads]
    elif case == "nan in the sum":
        grads[1][0, 2] = float("nan")
    elif case == "inf gradient":
        grads[0][:] = float("inf")
        grads[1][:] = -float("inf")
    elif case == "clip high":
        grads[0][3] = 1e-9  # the chosen |g|: a huge step size, clipped to step_max
    elif case == "clip low":
        grads[0][3] = -1e3  # with the others' sum of the same sign: clipped to step_min
        grads[0][:3] = 1e-3
    elif case == "all tied":
        grads = [torch.full_like(g, -0.5) for g in grads]
    for t in range(3):
        _same_state(made[0], made[1])
        _one_step_each(made, grads)
        _assert_one_coordinate_apart(made, torch.float64)
        grads = [g * (-1) ** t for g in grads]


def test_fused_resumes_bitwise_through_the_state_dict():
    shapes = [(50_000,), (4,)]
    (_, _), (ps, opt) = _pair(shapes, torch.float64, "sag")
    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
             for _ in range(6)]
    for g in grads[:3]:
        _one_step_each([(ps, opt)], g)
    saved = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in ps]
    for g in grads[3:]:
        _one_step_each([(ps, opt)], g)
    qs = [v.clone().requires_grad_() for v in values]
    again = rprop.Rprop(qs, variant="grprop-sag", fused=True, **NN)
    again.load_state_dict(saved)
    for g in grads[3:]:
        _one_step_each([(qs, again)], g)
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["step_size"], again.state[q]["step_size"])


def _refused_unchanged(ps, opt):
    """Another step is refused as well, and changes nothing."""
    values = [p.detach().clone() for p in ps]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError):
        opt.step()
    for p, v in zip(ps, values, strict=True):
        assert torch.equal(p.detach(), v)
    after = opt.state_dict()["state"]
    for i, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after[i][key], value), (i, key)


def test_fused_refuses_what_its_kernel_cannot_take_with_nothing_changed():
    ps = [torch.randn(4, dtype=torch.float16, requires_grad=True)]
    opt = rprop.Rprop(ps, variant="grprop-sag", fused=True)
    ps[0].grad = torch.randn(4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match=r"supports float32 and float64, got torch\.float16"):
        opt.step()
    assert not opt.state[ps[0]] or int(opt.state[ps[0]]["step"]) == 0
    _refused_unchanged(ps, opt)


def test_fused_refuses_groups_that_disagree_before_anything_changes():
    a, b = torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True)
    opt = rprop.Rprop([{"params": [a], "fused": True}, {"params": [b]}], variant="grprop-slr")
    for p in (a, b):
        p.grad = torch.randn(p.shape)
    with pytest.raises(RuntimeError, match="set fused=True on every param group, or on none"):
        opt.step()
    _refused_unchanged([a, b], opt)


def test_the_reference_agrees_with_a_one_step_hand_check_of_the_kernel():
    """A one-array case small enough to check by hand: the kernel's chosen
    coordinate and adjusted step size are the transcription's."""
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([x], variant="grprop-sag", fused=True, lr=0.1, step_sizes=(1e-10, 1.0))
    x.grad = torch.tensor([0.0, 2.0, -0.5, 1.0], dtype=torch.float64)
    opt.step()
    ref = ReferenceGRprop([np.zeros(4)], adjust="sag", step_sizes=(1e-10, 1.0))
    ref.step([np.array([0.0, 2.0, -0.5, 1.0])])
    assert ref.chosen == 2
    np.testing.assert_array_equal(opt.state[x]["step_size"].numpy(), ref.step_size[0])
    np.testing.assert_array_equal(x.detach().numpy(), ref.params[0])


def test_a_negative_view_gradient_is_read_as_its_values():
    """A one-element ``z.conj().imag`` is contiguous, and its memory holds the
    negated value: the kernel must step with the value."""
    gen = torch.Generator().manual_seed(8)
    zs = [torch.randn(1, dtype=torch.complex128, generator=gen) for _ in range(4)]
    other = [torch.randn(6, dtype=torch.float64, generator=gen) for _ in range(4)]
    made = _pair([(1,), (6,)], torch.float64, "sag")
    for z, o in zip(zs, other, strict=True):
        g = z.conj().imag
        assert g.is_neg() and g.is_contiguous()
        _same_state(made[0], made[1])
        for ps, opt in made:
            ps[0].grad, ps[1].grad = g, o.clone()
            opt.step()
        _assert_one_coordinate_apart(made, torch.float64)
