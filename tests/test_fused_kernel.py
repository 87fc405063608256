"""The fused CPU kernel (rprop.torch._fused) beyond plain parity: its thread
split, memory layouts it walks flat or hands back, parameters that share
memory, autograd's version counters, its memory use, and
what it refuses. Bitwise parity of every path over the table's scenarios is
in test_parity_paths.py; the kernel cache in test_kernel_cache.py.
"""

from __future__ import annotations

import pytest
import torch

import rprop
from _table import (
    BIG_SHAPES,
    PATHS,
    STEP_PATHS,
    VARIANT_NAMES,
    assert_bitwise,
    hyper,
    needs_kernel,
    run_path,
)
from rprop.torch import _fused


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("threads", [1, 3])
def test_threaded_split_bitwise(variant, threads):
    """Thread boundaries fall inside tensors and skip empty ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        v, h = rprop.VARIANTS[variant], hyper("maximize+wd")
        a = run_path(STEP_PATHS["for-loop"], v, h, BIG_SHAPES, 6, dtype=torch.float32)
        b = run_path(STEP_PATHS["fused"], v, h, BIG_SHAPES, 6, dtype=torch.float32)
    finally:
        torch.set_num_threads(before)
    assert_bitwise(a, b, "fused vs for-loop")


@needs_kernel
def test_non_dense_and_channels_last_tensors():
    """Channels-last tensors are walked flat; non-dense views (and gradients
    laid out unlike their parameter) go through the foreach path; all agree."""
    v, h = rprop.VARIANTS["rprop+"], hyper("maximize+wd")

    def make():
        gen = torch.Generator().manual_seed(3)
        base = torch.randn(6, 8, generator=gen)
        return [
            torch.randn(2, 3, 4, 5, generator=gen).to(memory_format=torch.channels_last),
            base[:, ::2],  # not dense
            torch.randn(4, 5, generator=gen).t(),  # dense, transposed
            torch.randn(9, generator=gen),
        ]

    results = []
    for path in (STEP_PATHS["for-loop"], STEP_PATHS["fused"]):
        params = make()
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        for s in states[1]:
            s.fill_(0.05)
        counters = [torch.zeros(()) for _ in params]
        gen = torch.Generator().manual_seed(4)
        for t in range(8):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            grads[0] = grads[0].contiguous(memory_format=torch.channels_last)
            if t % 2:
                grads[2] = grads[2].contiguous()  # laid out unlike its parameter
            path(params, grads, *states, steps=counters, hyper=h, variant=v, worse=None)
        results.append(params + [t for s in states for t in s] + counters)
    assert_bitwise(results[0], results[1], "fused vs for-loop")


def _overlapping_run(path, variant, hyper, steps=4):
    """Two parameters that share 200k elements of one buffer (views
    ``base[:300000]`` and ``base[100000:]``), over the kernel's threading
    threshold; returns the buffer, the state and the counters."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(400_000, generator=gen)
    params = [base[:300_000], base[100_000:], torch.randn(50, generator=gen)]
    prevs = [torch.zeros_like(p) for p in params]
    step_sizes = [torch.full_like(p, hyper.lr) for p in params]
    prev_updates = [torch.zeros_like(p) for p in params] if variant.backtracks else None
    counters = [torch.zeros(()) for _ in params]
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        worse = torch.tensor(t % 3 == 1) if variant.needs_loss else None
        path(params, grads, prevs, step_sizes, prev_updates, steps=counters, hyper=hyper,
             variant=variant, worse=worse)
    return [base, params[2]] + prevs + step_sizes + (prev_updates or []) + counters


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_overlapping_parameters_step_in_order(variant):
    """Parameters sharing memory are stepped one after the other, as the
    for-loop path does (threads would race on the shared elements; the
    foreach path, with weight decay, reads every parameter before writing
    any). Also when one of them cannot be walked flat."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        v, h = rprop.VARIANTS[variant], hyper("maximize+wd")
        for scenario in ("maximize+wd", "defaults"):
            a = _overlapping_run(STEP_PATHS["for-loop"], v, hyper(scenario))
            b = _overlapping_run(STEP_PATHS["fused"], v, hyper(scenario))
            assert_bitwise(a, b, f"fused vs for-loop ({scenario})")

        # With a non-dense view of the shared buffer (the uncached branch).
        gen = torch.Generator().manual_seed(6)
        runs = []
        for path in (STEP_PATHS["for-loop"], STEP_PATHS["fused"]):
            base = torch.randn(400_000, generator=torch.Generator().manual_seed(7))
            params = [base[:300_000], base[100_000:], base[1000:5000:2]]
            states = [[torch.full_like(p, h.lr if i == 1 else 0.0) for p in params]
                      for i in range(3)]
            counters = [torch.zeros(()) for _ in params]
            gen.manual_seed(8)
            for _ in range(3):
                grads = [torch.randn(p.shape, generator=gen) for p in params]
                path(params, grads, states[0], states[1],
                     states[2] if v.backtracks else None, steps=counters, hyper=h,
                     variant=v, worse=torch.tensor(True) if v.needs_loss else None)
            runs.append([base, *states[0], *states[1], *counters])
        assert_bitwise(runs[0], runs[1], "fused vs for-loop, with a strided view")
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_overlapping_leaf_views_through_the_optimizer():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for setting in ("for-loop", "fused", "default"):
            base = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
            params = [base[:150_000].requires_grad_(), base[50_000:].requires_grad_()]
            opt = rprop.Rprop(params, variant="irprop+", weight_decay=0.01,
                              **PATHS[setting])
            gen = torch.Generator().manual_seed(1)
            for t in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step(loss=float(t % 2))
            results.append([base] + [opt.state[p][k] for p in params for k in opt.state[p]])
    finally:
        torch.set_num_threads(before)
    assert_bitwise(results[0], results[1], "fused=True vs for-loop")
    assert_bitwise(results[0], results[2], "default vs for-loop")


def _share(t: torch.Tensor, dtype: torch.dtype, shape, stride) -> torch.Tensor:
    """A new tensor on ``t``'s memory with another dtype or strides and no
    reference to ``t``: what the allocator produces when it hands a freed
    tensor's memory to a new one."""
    return torch.empty(0, dtype=dtype).set_(t.untyped_storage(), 0, shape, stride)


@needs_kernel
@pytest.mark.parametrize("change", ["strides", "counter-dtype"])
def test_layout_cache_sees_a_new_tensor_at_an_old_address(change):
    """A validated layout is keyed by data pointers; a state tensor or step
    counter freed and replaced by one at the same address with other strides
    or another dtype is validated again (and stepped correctly)."""
    v, h = rprop.VARIANTS["rprop+"], hyper("maximize+wd")
    runs = []
    for path in (STEP_PATHS["for-loop"], STEP_PATHS["fused"]):
        gen = torch.Generator().manual_seed(9)
        params = [torch.randn(40, 30, generator=gen).t(), torch.randn(7, generator=gen)]
        states = [[torch.zeros_like(p) for p in params] for _ in range(3)]
        for s in states[1]:
            s.fill_(0.05)
        storage = torch.zeros(2, dtype=torch.float32)  # room for a float64 counter
        counters = [_share(storage, torch.float32, (), ()), torch.zeros(())]
        del storage
        for t in range(6):
            if t == 3 and change == "strides":
                # prev of the transposed parameter, same values, laid out contiguously
                old = states[0][0]
                values = old.clone()
                states[0][0] = _share(old, torch.float32, old.shape, (40, 1))
                del old
                states[0][0].copy_(values)
            if t == 3 and change == "counter-dtype":
                value = counters[0].item()
                counters[0] = _share(counters[0], torch.float64, (), ())
                counters[0].fill_(value)
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            grads[0] = grads[0].t().contiguous().t()  # laid out like its parameter
            path(params, grads, *states, steps=counters, hyper=h, variant=v, worse=None)
        runs.append(params + [t for s in states for t in s] + counters)
    assert runs[1][-2].dtype == (torch.float64 if change == "counter-dtype" else torch.float32)
    assert_bitwise(runs[0], runs[1], "fused vs for-loop")


@needs_kernel
def test_default_picks_fused_on_cpu():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = rprop.Rprop([p])
    opt.step()
    assert opt.last_paths == ("fused",)


@needs_kernel
@pytest.mark.parametrize("setting", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_step_is_an_in_place_write_to_autograd(setting, dtype):
    """A graph that saved a parameter before the step refuses to backpropagate
    through the stale value after it, as with torch.optim.Rprop: the kernel
    writes through raw pointers, so it must bump the version counters itself."""
    results = {}
    for name, make in (("torch", torch.optim.Rprop), ("ours", rprop.Rprop)):
        p = torch.nn.Parameter(torch.ones(3, dtype=dtype))
        loss = (p * p).abs().sum()  # saves p for backward
        p.grad = torch.ones_like(p)
        kwargs = PATHS[setting] if name == "ours" else {}
        make([p], **kwargs).step()
        try:
            loss.backward()
        except RuntimeError as err:
            results[name] = "modified by an inplace operation" in str(err)
        else:
            results[name] = "no error"
    assert results == {"torch": True, "ours": True}


@needs_kernel
def test_fused_step_allocates_nothing_per_parameter():
    """No temporaries proportional to the parameter count: no torch
    allocation is live during a fused step (the foreach path's peak is
    several parameter-sized tensors, as the measurement shows)."""
    from rprop._bench import peak_step_memory

    params = [torch.zeros(100_000, requires_grad=True) for _ in range(4)]
    for p in params:
        p.grad = torch.randn(100_000)
    peaks = {}
    for name in ("fused", "foreach"):
        opt = rprop.Rprop(params, variant="rprop+", **PATHS[name])
        opt.step()
        peaks[name] = peak_step_memory(opt.step)
    assert peaks["fused"] == 0
    assert peaks["foreach"] >= 4 * 100_000 * 4


def test_require_explains_refusals():
    with pytest.raises(RuntimeError, match="runs on CPU and CUDA, got parameters on meta"):
        _fused.require([torch.zeros(2, device="meta")])

    class Sub(torch.Tensor):
        pass

    with pytest.raises(RuntimeError, match="plain tensors"):
        _fused.require([torch.zeros(2).as_subclass(Sub)])
    with pytest.raises(ValueError, match="differentiable"):
        STEP_PATHS["fused"]([torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)],
                          None, steps=[torch.zeros(())], hyper=rprop.Hyper(),
                          variant=rprop.VARIANTS["irprop-"], worse=None, differentiable=True)
