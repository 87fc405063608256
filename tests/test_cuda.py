"""rprop on CUDA: the Triton kernel, every path against the CPU kernel,
half precision, CUDA-graph capture and replay with capturable=True, and a
device that is not the current one. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import rprop
from _table import (
    ALL_PATHS,
    STEP_PATHS,
    VARIANT_NAMES,
    assert_bitwise,
    drive,
    groups_for,
    groups_warning,
    hyper,
    make_params,
)
from rprop.torch import _fused

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@cuda
def test_cuda_fused_true_runs_triton_or_explains():
    p = torch.zeros(3, device="cuda", requires_grad=True)
    p.grad = torch.ones(3, device="cuda")
    assert _fused.available([p]) == (_fused.CUDA_BY_DEFAULT and _has_triton())
    opt = rprop.Rprop([p], fused=True)
    if not _has_triton():
        with pytest.raises(RuntimeError, match="needs Triton"):
            opt.step()
        return
    opt.step()
    assert torch.equal(p.detach().cpu(), torch.full((3,), -0.01))


@cuda
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("setting", ["fused", "default", "foreach", "for-loop"])
def test_cuda_paths_match_cpu_fused(variant, dtype, setting):
    """Every CUDA path (the Triton kernel with fused=True) is bitwise the CPU
    kernel: same groups, complex and transposed params, missing gradients."""
    if setting == "fused" and not _has_triton():
        pytest.skip("fused=True on CUDA needs Triton")
    cpu = make_params(dtype)
    gpu = [p.cuda() for p in cpu]
    kw = {"variant": variant, "weight_decay": 0.01}
    a = rprop.Rprop(groups_for(cpu, variant=kw["variant"], weight_decay=0.01), **kw,
                    fused=True)
    b = rprop.Rprop(groups_for(gpu, variant=kw["variant"], weight_decay=0.01), **kw,
                    **ALL_PATHS[setting])
    with groups_warning():
        drive([a, b], [cpu, gpu], 30)
    assert_bitwise([p.detach() for p in cpu], [p.detach().cpu() for p in gpu], "params")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_fused_matches_for_loop(dtype):
    if not _has_triton():
        pytest.skip("fused=True on CUDA needs Triton")
    v, h = rprop.VARIANTS["irprop+"], hyper("maximize+wd")
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(dtype) for s in [(7,), (1500,), (0,)]]
    results = []
    for path in (STEP_PATHS["for-loop"], STEP_PATHS["fused"]):
        params = [p.cuda() for p in base]
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        for s in states[1]:
            s.fill_(0.01)
        counters = [torch.zeros(()) for _ in params]
        g = torch.Generator().manual_seed(1)
        for t in range(10):
            grads = [(torch.randn(p.shape, generator=g) * 10.0 ** (t - 5)).to(dtype).cuda()
                     for p in params]
            worse = torch.tensor(t % 3 == 1, device="cuda")
            path(params, grads, *states, steps=counters, hyper=h, variant=v, worse=worse)
        results.append([t.cpu() for t in params + [x for s in states for x in s]])
    assert_bitwise(results[0], results[1], "CUDA fused vs for-loop")


@cuda
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("setting", ["foreach", "default", "fused"])
def test_cuda_graph_replays_the_eager_steps(variant, setting):
    """capturable=True: one step captured in a CUDA graph and replayed with
    new gradients (and losses) gives the CPU for-loop's bits. The capture
    fails on any host sync or mask-indexing in the captured path; fused=True
    captures the foreach path (the kernel's pointer table is a host copy)."""
    if setting == "fused" and not _has_triton():
        pytest.skip("fused=True on CUDA needs Triton")
    needs_loss = rprop.VARIANTS[variant].needs_loss
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (1500,), (3, 5)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    steps = 8
    grads = [[torch.randn(s, generator=gen) * 10.0 ** (t % 4 - 2) for s in shapes]
             for t in range(steps)]
    losses = [float(t % 3) for t in range(steps)]

    ref = [p.clone().requires_grad_() for p in init]
    ref_opt = rprop.Rprop(ref, variant=variant, weight_decay=0.01, foreach=False)
    for t in range(steps):
        for p, g in zip(ref, grads[t]):
            p.grad = g.clone()
        ref_opt.step(loss=losses[t]) if needs_loss else ref_opt.step()

    params = [p.cuda().requires_grad_() for p in init]
    static_grads = [torch.zeros_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g
    static_loss = torch.zeros((), dtype=torch.float64, device="cuda")
    kw = {"loss": static_loss} if needs_loss else {}
    opt = rprop.Rprop(params, variant=variant, weight_decay=0.01, capturable=True,
                      **ALL_PATHS[setting])

    def load(t):
        for g, new in zip(static_grads, grads[t]):
            g.copy_(new)
        static_loss.fill_(losses[t])

    load(0)
    side = torch.cuda.Stream()  # first step eagerly, on a side stream: creates the state
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), pytest.warns(UserWarning, match="without CUDA graph capture"):
        opt.step(**kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(**kw)
    for t in range(1, steps):
        load(t)
        graph.replay()
    torch.cuda.synchronize()
    assert_bitwise([p.detach() for p in ref], [p.detach().cpu() for p in params], "params")
    for p in params:
        assert opt.state[p]["step"].item() == steps


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("setting", ["fused", "foreach"])
def test_cuda_step_on_a_device_that_is_not_current(setting):
    """Parameters on cuda:1 while cuda:0 is current: Triton launches on the
    current device unless told otherwise."""
    if setting == "fused" and not _has_triton():
        pytest.skip("fused=True on CUDA needs Triton")
    cpu = make_params(torch.float32)
    gpu = [p.to("cuda:1") for p in cpu]
    kw = {"variant": "rprop+", "weight_decay": 0.01}
    a = rprop.Rprop(groups_for(cpu, variant=kw["variant"], weight_decay=0.01), **kw,
                    fused=True)
    b = rprop.Rprop(groups_for(gpu, variant=kw["variant"], weight_decay=0.01), **kw,
                    **ALL_PATHS[setting])
    with torch.cuda.device(0), groups_warning():
        drive([a, b], [cpu, gpu], 10)
    assert_bitwise([p.detach() for p in cpu], [p.detach().cpu() for p in gpu], "params")


@cuda
@pytest.mark.parametrize("variant", ["grprop-sag", "grprop-slr"])
def test_cuda_grprop_matches_cpu_and_fused_true_is_refused(variant):
    """GRprop's batched step on CUDA gives the CPU batched step's bits (the
    same torch operations and the same summation tree); its one-pass kernel
    is CPU-only, so fused=True on CUDA is a RuntimeError with nothing changed."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, dtype=torch.float64, generator=gen) for s in [(30, 7), (7,), (5,)]]
    grads = [[torch.randn(p.shape, dtype=torch.float64, generator=gen) for p in start]
             for _ in range(10)]
    runs = []
    for device in ("cpu", "cuda"):
        ps = [p.to(device).requires_grad_() for p in start]
        opt = rprop.Rprop(ps, variant=variant, lr=0.1, step_sizes=(1e-10, 0.1))
        for gs in grads:
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.to(device)
            opt.step()
        runs.append([p.detach().cpu() for p in ps]
                    + [opt.state[p]["step_size"].cpu() for p in ps])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    p = torch.zeros(3, device="cuda", requires_grad=True)
    p.grad = torch.ones(3, device="cuda")
    opt = rprop.Rprop([p], variant=variant, fused=True)
    with pytest.raises(RuntimeError, match=r"runs on CPU|needs Triton"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3, device="cuda"))
