"""Review of GRprop's one-pass CPU kernel (fused=True) and of the fused
path's prepared pointer table: cases the kernel's own tests do not reach.

The oracle for GRprop is the batched GRprop step (fused=None, pinned to
tests/reference.py's transcription in tests/test_grprop.py) from the same
state; for the default variant it is torch.optim.Rprop."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch

import rprop
from _table import HAS_KERNEL, PATHS
from test_grprop_fused import _differ, _flat
from test_step_plan_review import _against_torch

pytestmark = pytest.mark.skipif(not HAS_KERNEL, reason="the fused kernel needs a C compiler")

F64 = torch.float64
BIG = 1.5e308  # BIG + BIG overflows float64, BIG alone does not


def _both(start, grads, **kw):
    """One step of the batched and the fused GRprop-sag step from ``start``
    with ``grads``: their parameters and step sizes."""
    out = []
    for fused in (None, True):
        ps = [t.clone().requires_grad_() for t in start]
        opt = rprop.Rprop(ps, variant="grprop-sag", fused=fused, lr=1.0, **kw)
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        out.append((_flat(ps), _flat([opt.state[p]["step_size"] for p in ps])))
    return out


def test_a_sum_that_overflows_only_in_the_kernels_order_is_the_batched_steps():
    """Products A, A, -A, -A, -1 and the chosen 1e-3: the other products sum
    to -1 exactly, and the batched tree's partial sums stay finite, but the
    kernel's lanes combine A + A first (inf): its adjusted step size was
    step_min (1e-6) where the batched step's is 999.999."""
    g = torch.tensor([BIG, BIG, -BIG, -BIG, -1.0, 1e-3], dtype=F64)
    (bp, bs), (fp, fs) = _both([torch.zeros(6, dtype=F64)], [g], step_sizes=(1e-6, 5000.0))
    torch.testing.assert_close(fs, bs, rtol=1e-15, atol=0)
    torch.testing.assert_close(fp, bp, rtol=1e-15, atol=0)


def test_a_sum_that_overflows_only_in_the_batched_tree_keeps_the_kernels_exact_value():
    """Decided (docs/variants.md): where the batched step's tree overflows
    (x[1] + x[3] = A + A) and the kernel's compensated sum does not, the
    fused step keeps its finite value, which is the exact one (math.fsum);
    the batched step adjusts to step_max (inf)."""
    g = torch.tensor([2.0, -BIG, BIG, -BIG], dtype=F64)
    (_, bs), (_, fs) = _both([torch.zeros(4, dtype=F64)], [g],
                             step_sizes=(1e-6, float("inf")))
    # sag picks |g| = 2 (position 0); a first step keeps every other step size
    # at lr = 1, so the others' sum is the sum of their gradients.
    assert torch.equal(fs[1:], torch.ones(3, dtype=F64))
    exact = math.fsum(float(v) for v in g[1:])
    expected = min(max(-(exact + 1e-6) / 2.0, 1e-6), float("inf"))
    assert float(bs[0]) == float("inf")
    assert float(fs[0]) == expected


def test_a_gradient_that_is_another_parameters_memory_is_refused_with_nothing_changed():
    """``b.grad = a.detach()``: the kernel moves ``a`` before it reads ``b``'s
    gradient, the batched step reads every gradient before anything moves;
    the fused step silently gave other parameters than the batched one."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(5, dtype=F64, generator=gen).requires_grad_()
    b = torch.randn(5, dtype=F64, generator=gen).requires_grad_()
    opt = rprop.Rprop([a, b], variant="grprop-sag", fused=True)
    a.grad = torch.randn(5, dtype=F64, generator=gen)
    b.grad = torch.randn(5, dtype=F64, generator=gen)
    opt.step()  # a first step the kernel takes
    a.grad = torch.randn(5, dtype=F64, generator=gen)
    b.grad = a.detach()
    values = [a.detach().clone(), b.detach().clone()]
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="share no memory"):
        opt.step()
    assert torch.equal(a.detach(), values[0]) and torch.equal(b.detach(), values[1])
    after = opt.state_dict()["state"]
    for i, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after[i][key], value), (i, key)


def test_a_gradient_that_is_its_own_parameter_is_still_taken():
    """``p.grad = p.detach()`` (f = |p|^2 / 2) stays on the kernel, bitwise the
    batched step but for the adjusted coordinate."""
    start = torch.tensor([0.5, 1.0, -2.0, 3.0], dtype=F64)
    runs = []
    for fused in (None, True):
        p = start.clone().requires_grad_()
        opt = rprop.Rprop([p], variant="grprop-sag", fused=fused)
        for _ in range(3):
            p.grad = p.detach()
            opt.step()
        runs.append((p.detach(), opt))
    assert runs[1][1].last_paths == ("fused",)
    assert len(_differ(runs[0][0], runs[1][0])) <= 1


def _transpose_a_state_tensor(opt, params):
    # The same memory, viewed transposed: the data pointer does not move.
    opt.state[params[1]]["step_size"] = opt.state[params[1]]["step_size"].t()


def _transpose_a_state_tensors_data(opt, params):
    s = opt.state[params[1]]["prev"]
    s.data = s.data.t()


@pytest.mark.parametrize("change", [_transpose_a_state_tensor, _transpose_a_state_tensors_data],
                         ids=["replaced by a transposed view", ".data a transposed view"])
@pytest.mark.parametrize("path", [p for p in PATHS if p in ("fused", "default")])
def test_a_state_tensor_viewed_transposed_at_the_same_address(path, change):
    """The data pointer does not move; the fused table sees the strides."""
    _against_torch(path, change)


_SMALLER_STATE = """
import torch, rprop
d = torch.float64
ps = [torch.randn(100_000, dtype=d).requires_grad_(), torch.randn(6, dtype=d).requires_grad_()]
opt = rprop.Rprop(ps, variant="grprop-sag", fused=True)
for p in ps:
    p.grad = torch.randn(p.shape, dtype=d)
opt.step()
opt.state[ps[0]]["step_size"] = torch.full((2,), 0.1, dtype=d)
opt.state[ps[0]]["prev"] = torch.zeros(2, dtype=d)
for p in ps:
    p.grad = torch.randn(p.shape, dtype=d)
values = [p.detach().clone() for p in ps]
try:
    opt.step()
except RuntimeError as e:
    assert "sizes" in str(e), e
    assert all(torch.equal(p.detach(), v) for p, v in zip(ps, values))
    print("refused")
else:
    print("stepped")
"""


@pytest.mark.slow
def test_a_state_tensor_replaced_by_a_smaller_one_is_refused_not_overrun():
    """The kernel walks each parameter's element count through its state: a
    state tensor replaced by a smaller one was written past its end (the
    process hung or crashed); the batched step raises torch's size error.
    In a subprocess, so that a heap overrun cannot take the test run down."""
    done = subprocess.run([sys.executable, "-c", _SMALLER_STATE], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "refused", (done.returncode,
                                                                      done.stdout, done.stderr)
