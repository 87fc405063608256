"""torch.compile(opt.step): the step body traces into one graph, no breaks of
its own, and gives the eager bits. (torch's @_use_grad_for_differentiable
inserts a graph break around every optimizer's step, torch.optim.Rprop's too.)"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import rprop
from rprop.torch import _fused


@pytest.mark.parametrize("variant", ["irprop-", "rprop+", "irprop+"])
@pytest.mark.parametrize("path", [{"foreach": True}, {}])
def test_compiled_step_is_one_graph_and_bitwise_eager(variant, path):
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, generator=g).requires_grad_(), torch.randn(3, 2, generator=g)
          .requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt = rprop.Rprop(ps, variant=variant, **path)
    eager = rprop.Rprop(ref, variant=variant, foreach=False)
    kw = {"loss": torch.tensor(1.0)} if variant == "irprop+" else {}

    def feed(t):
        for p, q in zip(ps, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        if variant == "irprop+":
            kw["loss"] = torch.tensor(float(t % 3))

    feed(0)
    opt.step(**kw)  # state is created eagerly, as torch recommends before compiling
    eager.step(**kw)
    backend = CompileCounter()
    step = torch.compile(opt.step, backend=backend)
    for t in range(1, 5):
        feed(t)
        step(**kw)
        eager.step(**kw)
    assert backend.frame_count == 1, "one graph for the step body, no recompiles"
    user_breaks = [r for r in counters["graph_break"] if "graph_break()" not in r]
    assert not user_breaks, user_breaks
    for a, b in zip(ps, ref):
        assert torch.equal(a, b)


@pytest.mark.skipif(not _fused.available([torch.zeros(1)]), reason="no fused CPU kernel here")
def test_compiled_fused_step_runs_the_kernel_eagerly():
    """fused=True under torch.compile: the kernel is an opaque call (a graph
    break, by design) that runs eagerly, gives the eager bits and tells
    autograd it wrote the parameters, as torch.optim.Rprop's compiled step does."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, generator=g).requires_grad_(), torch.randn(3, 2, generator=g)
          .requires_grad_()]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt = rprop.Rprop(ps, fused=True, variant="rprop+")
    eager = rprop.Rprop(ref, foreach=False, variant="rprop+")

    def feed():
        for p, q in zip(ps, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()

    feed()
    opt.step()
    eager.step()
    step = torch.compile(opt.step, backend="aot_eager")
    for _ in range(4):
        feed()
        before = [p._version for p in ps]
        step()
        eager.step()
        assert all(p._version > v for p, v in zip(ps, before))
    for a, b in zip(ps, ref):
        assert torch.equal(a, b)
    saved = (ps[0] * ps[0]).sum()  # saves ps[0] for backward
    feed()
    step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
