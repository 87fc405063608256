"""Review of the step plan's layout guard (rprop.torch._compat.layout_guard,
its Python fallback) and the fused step's prepared table: gradients whose
memory is read with a sign flip (a negative view, ``z.conj().imag``) and
the fallback run through the plan tests' scenarios. Oracle: torch.optim.Rprop."""

from __future__ import annotations

import pytest
import torch

import rprop
from _table import PATHS
from rprop.torch import _compat

# One-element parameters: ``z.conj().imag`` of a one-element complex tensor
# is a contiguous real tensor whose memory holds the negated gradient.
SHAPES = [(1,), (1,), ()]


def _grads(t: int, negative_from: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    out = []
    for s in SHAPES:
        z = torch.randn(s, dtype=torch.complex64, generator=gen)
        out.append(z.conj().imag if t >= negative_from else z.imag.clone())
    return out


def _run(make, negative_from: int, steps: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = make(params)
    for t in range(steps):
        for p, g in zip(params, _grads(t, negative_from), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.fixture(params=["dynamo", "python"])
def guard(request, monkeypatch):
    """Each test once with dynamo's TensorGuards, once with the fallback."""
    if request.param == "python":
        monkeypatch.setattr(_compat, "_TENSOR_GUARDS", None)
    return request.param


@pytest.mark.parametrize("negative_from", [0, 2], ids=["from-the-start", "after-two-steps"])
@pytest.mark.parametrize("path", list(PATHS))
def test_a_negative_view_gradient_is_stepped_with_its_sign(path, negative_from, guard):
    assert _grads(negative_from, negative_from)[0].is_neg()
    expected = _run(lambda ps: torch.optim.Rprop(ps, lr=0.05, foreach=False), negative_from)
    got = _run(lambda ps: rprop.Rprop(ps, lr=0.05, **PATHS[path]), negative_from)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g), (e, g)


def test_the_fallback_sees_negative_and_conjugate_views_as_tensorguards_does():
    a = torch.randn(3)
    z = torch.randn(3, dtype=torch.complex64)
    for guard_of in (_compat.layout_guard, _compat._python_layout_guard):
        assert not guard_of([a])(torch._neg_view(a)), guard_of
        assert not guard_of([z])(z.conj()), guard_of
        assert guard_of([a])(a.clone()), guard_of


def test_the_plan_tests_pass_with_the_python_fallback(monkeypatch):
    """tests/test_step_plan.py and tests/test_step_plan_review.py's scenarios,
    the plan built on the fallback."""
    import test_step_plan
    import test_step_plan_review

    monkeypatch.setattr(_compat, "_TENSOR_GUARDS", None)
    for path in PATHS:
        for change in test_step_plan.CHANGES:
            test_step_plan.test_a_change_between_steps_is_seen(path, change)
        test_step_plan.test_gradients_coming_and_going(path)
        test_step_plan_review.test_state_data_reassigned(path)
        test_step_plan_review.test_parameter_viewed_transposed_at_the_same_address(path)
        test_step_plan_review.test_gradient_transposed_in_place_under_the_same_object(path)
        test_step_plan_review.test_state_memory_moved_under_the_same_tensors(path)
        test_step_plan_review.test_a_sparse_gradient_after_the_first_step_is_refused_before_anything_changes(path)
        test_step_plan_review.test_irprop_plus_state_dicts_copied_then_a_parameter_without_gradient(path)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_state_narrower_than_its_parameter_is_refused_also_while_a_plan_holds(path):
    """The plan's layout check covers the state: a state tensor replaced by a
    narrower one makes the step gather again, which refuses it."""
    params = [torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
              .requires_grad_() for i in range(3)]
    opt = rprop.Rprop(params, lr=0.05, **PATHS[path])
    for p in params:
        p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    opt.state[params[1]]["prev"] = opt.state[params[1]]["prev"].float()
    before = [p.detach().clone() for p in params]
    # A fresh gathering (no plan) refuses it, naming the parameter ...
    held, opt._plans = opt._plans, {}
    with pytest.raises(ValueError, match=r"parameter 1 is torch\.float64 but its state"):
        opt.step()
    opt._plans = held
    # ... and so must the step that still holds the plan, changing nothing.
    with pytest.raises(ValueError, match=r"parameter 1 is torch\.float64 but its state"):
        opt.step()
    assert all(torch.equal(b, p) for b, p in zip(before, params, strict=True))


@pytest.mark.parametrize("fails_at", ["construction", "first step"])
def test_bench_a_path_that_errors_keeps_its_row_and_the_others_are_timed(monkeypatch, fails_at):
    from rprop import _bench

    made = _bench._optimizer

    def optimizer(path, params, variant):
        if path == "rprop foreach" and fails_at == "construction":
            raise RuntimeError("refused here\nsecond line")
        opt = made(path, params, variant)
        if path == "rprop foreach":
            def step(*args, **kwargs):
                raise ValueError("refused at the step")
            opt.step = step
        return opt

    monkeypatch.setattr(_bench, "_optimizer", optimizer)
    rows = _bench.run([(2, 50)], quick=True, repeats=1, variant="irprop+")
    assert [r["path"] for r in rows] == list(_bench.PATHS)
    for r in rows:
        if r["path"] == "rprop foreach":
            assert r["ms"] is None and r["peak_extra_mb"] is None
            assert r["error"] == ("refused here" if fails_at == "construction"
                                  else "refused at the step")
        else:
            assert r["ms"] > 0 and r["peak_extra_mb"] is not None and "error" not in r, r


@pytest.mark.parametrize("repeats", [1, 3, 5])
def test_bench_timed_irprop_plus_steps_see_rising_and_falling_losses(monkeypatch, repeats):
    """Also with one timed call a turn (--repeats 1 to 3, or a turn cut short
    by its budget), where every timed step got the same loss."""
    from rprop import _bench

    clock = _bench.time.perf_counter
    reads = [0]

    def perf_counter():
        reads[0] += 1
        return clock()

    seen: dict[int, list[float]] = {}

    def step_with_loss(opt, losses):
        loss = next(losses)
        if reads[0] % 2 == 1:  # between a timed call's start and end
            seen.setdefault(id(opt), []).append(loss)
        opt.step(loss=loss)

    monkeypatch.setattr(_bench.time, "perf_counter", perf_counter)
    monkeypatch.setattr(_bench, "_step_with_loss", step_with_loss)
    _bench.run([(2, 50)], quick=True, repeats=repeats, variant="irprop+", memory=False)
    assert len(seen) == 3  # the rprop paths
    for losses in seen.values():
        assert set(losses) == {1.0, 2.0}, losses
