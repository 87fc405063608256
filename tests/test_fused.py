"""The fused kernel (rprop.torch._fused): bitwise the for-loop path, always.

Path-level tests drive ``fused_step``, ``single_tensor`` and ``multi_tensor``
on the same randomized problems and compare every tensor bit for bit
(NaN included); optimizer-level tests do the same through ``rprop.Rprop``
with its param groups, complex parameters, missing gradients and state_dict
round trips. The kernel cache, its damage and trust checks and the
missing-compiler fallback are tested in tests/test_kernel_cache.py.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rprop
from _helpers import torch_grad_like
from rprop._hyper import Hyper
from rprop._variants import VARIANTS
from rprop.torch import _fused, _paths

needs_kernel = pytest.mark.skipif(
    not _fused.available([torch.zeros(1)]),
    reason=f"no fused CPU kernel here: {_fused.kernel_info().get('error')}",
)

VARIANT_NAMES = tuple(VARIANTS)
HALF = (torch.float16, torch.bfloat16)
HYPERS = {
    "default": Hyper(),
    "maximize+wd": Hyper(lr=0.1, maximize=True, weight_decay=0.01),
    "lr-outside-bounds": Hyper(lr=100.0, step_min=1e-3, step_max=1.0),
    "odd-etas": Hyper(lr=1e-7, eta_minus=0.3, eta_plus=1.7, step_min=1e-6, step_max=2.0),
}
BIT_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.view(BIT_DTYPES[t.element_size()])


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: tensor {i}"
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        if x.dtype == torch.bfloat16:
            # torch itself writes NaN as 0x7FC0 or 0xFFFF depending on the
            # code path (scalar or vectorized), so only NaN-ness is compared.
            nan = x.isnan()
            assert torch.equal(nan, y.isnan()), f"{what}: tensor {i} NaNs differ"
            x, y = x[~nan], y[~nan]
        assert torch.equal(bits(x), bits(y)), f"{what}: tensor {i} differs"


def run_path(path, variant, hyper, shapes, steps, *, dtype, state_dtype=None, grad_dtype=None,
             seed=0, specials=True):
    """Step fresh tensors ``steps`` times with ``path``; return every tensor.

    Gradients span 11 orders of magnitude (the sign test underflows in half
    precision), are exactly 0 in ~10% of elements, and once hold NaN and inf.
    """
    sdt, gdt = state_dtype or dtype, grad_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    prevs = [torch.zeros_like(p, dtype=sdt) for p in params]
    step_sizes = [torch.full_like(p, hyper.lr, dtype=sdt) for p in params]
    prev_updates = [torch.zeros_like(p, dtype=sdt) for p in params] if variant.backtracks else None
    counters = [torch.zeros(()) for _ in params]
    for t in range(steps):
        scale = 10.0 ** torch.randint(-8, 3, (), generator=gen).item()
        grads = []
        for s in shapes:
            g = torch.randn(s, generator=gen, dtype=torch.float64) * scale
            g = g * (torch.rand(s, generator=gen) > 0.1)
            grads.append(g.to(gdt))
        if specials and t == 3:
            grads[0].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
        worse = torch.tensor(t % 3 == 1) if variant.needs_loss else None
        path(params, grads, prevs, step_sizes, prev_updates, steps=counters, hyper=hyper,
             variant=variant, worse=worse)
    return params + prevs + step_sizes + (prev_updates or []) + counters


SHAPES = [(3,), (0,), (257,), (5, 7), (1,)]
BIG_SHAPES = [(20_000,), (13,), (0,), (20_001,)]  # over the kernel's threading threshold


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper", list(HYPERS), ids=list(HYPERS))
def test_paths_bitwise(variant, dtype, hyper):
    v, h = VARIANTS[variant], HYPERS[hyper]
    runs = {name: run_path(path, v, h, SHAPES, 25, dtype=dtype)
            for name, path in (("single", _paths.single_tensor), ("foreach", _paths.multi_tensor),
                               ("fused", _fused.fused_step))}
    assert_bitwise(runs["single"], runs["fused"], "fused vs for-loop")
    assert_bitwise(runs["foreach"], runs["fused"], "fused vs foreach")


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("threads", [1, 3])
def test_threaded_split_bitwise(variant, threads):
    """Thread boundaries fall inside tensors and skip empty ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        v, h = VARIANTS[variant], HYPERS["maximize+wd"]
        a = run_path(_paths.single_tensor, v, h, BIG_SHAPES, 6, dtype=torch.float32)
        b = run_path(_fused.fused_step, v, h, BIG_SHAPES, 6, dtype=torch.float32)
    finally:
        torch.set_num_threads(before)
    assert_bitwise(a, b, "fused vs for-loop")


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", HALF, ids=["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["half-state", "float32-state", "float32-state-and-grad"])
def test_half_precision_bitwise(variant, dtype, mode):
    """Half parameters: each op rounds to the storage dtype as torch does;
    with float32 state (rprop.Rprop(state_dtype=torch.float32)) the
    arithmetic is float32 and the parameter is rounded once."""
    kw = {"dtype": dtype}
    if mode != "half-state":
        kw["state_dtype"] = torch.float32
    if mode == "float32-state-and-grad":
        kw["grad_dtype"] = torch.float32
    v = VARIANTS[variant]
    for h in (HYPERS["default"], HYPERS["maximize+wd"], HYPERS["lr-outside-bounds"]):
        a = run_path(_paths.single_tensor, v, h, SHAPES, 15, **kw)
        b = run_path(_fused.fused_step, v, h, SHAPES, 15, **kw)
        assert_bitwise(a, b, f"fused vs for-loop ({h})")


@needs_kernel
def test_non_dense_and_channels_last_tensors():
    """Channels-last tensors are walked flat; non-dense views (and gradients
    laid out unlike their parameter) go through the foreach path; all agree."""
    v, h = VARIANTS["rprop+"], HYPERS["maximize+wd"]

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
    for path in (_paths.single_tensor, _fused.fused_step):
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
        v, h = VARIANTS[variant], HYPERS["maximize+wd"]
        for hyper in (h, HYPERS["default"]):
            a = _overlapping_run(_paths.single_tensor, v, hyper)
            b = _overlapping_run(_fused.fused_step, v, hyper)
            assert_bitwise(a, b, f"fused vs for-loop ({hyper})")

        # With a non-dense view of the shared buffer (the uncached branch).
        gen = torch.Generator().manual_seed(6)
        runs = []
        for path in (_paths.single_tensor, _fused.fused_step):
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
                              **SETTINGS[setting])
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


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_gradient_that_is_its_parameter(variant):
    """p.grad = p.detach() (the gradient of |p|^2 / 2): the kernel reads each
    element's gradient before it writes the parameter, as the for-loop path."""
    results = []
    for setting in ("for-loop", "fused"):
        p = torch.randn(50_000, generator=torch.Generator().manual_seed(2), requires_grad=True)
        opt = rprop.Rprop([p], variant=variant, lr=0.1, weight_decay=0.1, **SETTINGS[setting])
        for t in range(6):
            p.grad = p.detach()
            opt.step(loss=float(t % 2)) if variant == "irprop+" else opt.step()
        results.append([p.detach(), *opt.state[p].values()])
    assert_bitwise(results[0], results[1], "fused vs for-loop")


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
    v, h = VARIANTS["rprop+"], HYPERS["maximize+wd"]
    runs = []
    for path in (_paths.single_tensor, _fused.fused_step):
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
def test_forget_layouts():
    p = torch.zeros(5, requires_grad=True)
    p.grad = torch.ones(5)
    opt = rprop.Rprop([p], fused=True)
    opt.step()
    assert _fused._checked
    _fused.forget_layouts()
    assert not _fused._checked
    opt.step()
    assert len(_fused._checked) == 1
    del opt  # its state tensors are freed: the entry that checked them goes too
    assert not _fused._checked


# -- through rprop.Rprop ------------------------------------------------------------

SETTINGS = {"fused": {"fused": True}, "foreach": {"foreach": True},
            "for-loop": {"foreach": False}, "default": {}}


def make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cdt = torch.complex64 if dtype == torch.float32 else torch.complex128
    return [
        torch.randn(17, dtype=dtype, generator=gen),
        torch.randn(3, 4, dtype=dtype, generator=gen),
        torch.randn((), dtype=dtype, generator=gen),
        torch.randn(5, dtype=cdt, generator=gen),
        torch.randn(6, dtype=dtype, generator=gen),  # never gets a gradient
        torch.randn(7, dtype=dtype, generator=gen),  # gets one every other step
        torch.randn(0, dtype=dtype, generator=gen),  # empty
        torch.randn(4, 6, dtype=dtype, generator=gen).t(),  # dense, not contiguous
    ]


def groups_for(params, variant, weight_decay=0.0):
    """Four groups with different hyperparameters, and the optimizer kwargs."""
    groups = [
        {"params": params[:2], "lr": 0.03},
        {"params": params[2:4], "lr": 3.0, "step_sizes": (1e-4, 0.5), "etas": (0.3, 1.5)},
        {"params": params[4:6], "lr": 1e-7, "step_sizes": (1e-3, 2.0), "maximize": True},
        {"params": params[6:]},
    ]
    if weight_decay:
        groups[3]["weight_decay"] = 10 * weight_decay
        return groups, {"variant": variant, "weight_decay": weight_decay}
    return groups, {"variant": variant}


def drive(opts, params_sets, steps, start=0, seed=1):
    """Give every optimizer the same gradients (and losses) for ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(start, start + steps):
        grads = [None if i == 4 or (i == 5 and t % 2) else torch_grad_like(p, t, gen)
                 for i, p in enumerate(params_sets[0])]
        loss = float(torch.randn((), generator=gen))
        for opt, params in zip(opts, params_sets, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.to(p.device, copy=True)
            opt.step(loss=loss) if opt.defaults.get("variant") == "irprop+" else opt.step()


def assert_same_optimizers(params_a, params_b, opt_a, opt_b):
    assert_bitwise([p.detach() for p in params_a], [p.detach() for p in params_b], "params")
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        assert sa.keys() == sb.keys(), f"param {i}: state keys differ"
        for key in sa:
            x, y = sa[key], sb[key]
            x, y = (torch.view_as_real(x), torch.view_as_real(y)) if x.is_complex() else (x, y)
            assert_bitwise([x], [y], f"state {key!r} of param {i}")


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_optimizer_paths_bitwise(variant, dtype):
    sets = {name: make_params(dtype) for name in SETTINGS}
    opts = {}
    for name, params in sets.items():
        groups, kw = groups_for(params, variant, weight_decay=0.01)
        opts[name] = rprop.Rprop(groups, **kw, **SETTINGS[name])
    names = list(SETTINGS)
    with pytest.warns(rprop.LrSeedWarning, match="below step_min"):  # groups_for's 3rd group
        drive([opts[n] for n in names], [sets[n] for n in names], 40)
    for name in names[1:]:
        assert_same_optimizers(sets["fused"], sets[name], opts["fused"], opts[name])


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize(("saver", "loader"), [("fused", "foreach"), ("for-loop", "fused"),
                                                ("fused", "fused")])
def test_state_dict_moves_between_paths(variant, saver, loader):
    """State saved by one path loads into another and continues bitwise."""
    ref_params, params = make_params(torch.float32), make_params(torch.float32)
    groups, kw = groups_for(ref_params, variant)
    ref = rprop.Rprop(groups, **kw, **SETTINGS["for-loop"])
    groups, kw = groups_for(params, variant)
    first = rprop.Rprop(groups, **kw, **SETTINGS[saver])
    with pytest.warns(rprop.LrSeedWarning, match="below step_min"):  # groups_for's 3rd group
        drive([ref, first], [ref_params, params], 15)
    saved = copy.deepcopy(first.state_dict())
    # The saved dict records the saver's path flags; the loader keeps its own.
    for g in saved["param_groups"]:
        g.pop("fused"), g.pop("foreach")
    groups, kw = groups_for(params, variant)
    second = rprop.Rprop(groups, **kw, **SETTINGS[loader])
    second.load_state_dict(saved)
    drive([ref, second], [ref_params, params], 15, start=15)
    assert_same_optimizers(ref_params, params, ref, second)


@needs_kernel
@pytest.mark.parametrize("foreach", [False, True])
def test_matches_torch_optim_rprop(foreach):
    """The default variant (iRprop-) is torch.optim.Rprop, bitwise, fused too."""
    ours, theirs = make_params(torch.float32), make_params(torch.float32)
    opt = rprop.Rprop(groups_for(ours, "irprop-")[0], fused=True)
    ref = torch.optim.Rprop(groups_for(theirs, "irprop-")[0], foreach=foreach)
    with pytest.warns(rprop.LrSeedWarning, match="below step_min"):  # groups_for's 3rd group
        drive([opt, ref], [ours, theirs], 40)
    assert_bitwise([p.detach() for p in ours], [p.detach() for p in theirs], "params")
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for key in ("prev", "step_size"):
            if b in ref.state:
                x, y = opt.state[a][key], ref.state[b][key]
                if x.is_complex():
                    x, y = torch.view_as_real(x), torch.view_as_real(y)
                assert_bitwise([x], [y], f"state {key!r} of param {i}")


@needs_kernel
def test_default_picks_fused_on_cpu():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    opt = rprop.Rprop([p])
    opt.step()
    assert opt.last_paths == ("fused",)


@needs_kernel
@pytest.mark.parametrize("setting", list(SETTINGS))
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
        kwargs = SETTINGS[setting] if name == "ours" else {}
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
        opt = rprop.Rprop(params, variant="rprop+", **SETTINGS[name])
        opt.step()
        peaks[name] = peak_step_memory(opt.step)
    assert peaks["fused"] == 0
    assert peaks["foreach"] >= 4 * 100_000 * 4


DTENSOR_SCRIPT = textwrap.dedent("""
    import socket, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    import rprop
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    out = {}
    for fused in (True, False):
        torch.manual_seed(0)
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        opt = rprop.Rprop([w], fused=fused, variant="rprop+", weight_decay=0.1)
        for _ in range(6):
            w.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
            before = w._version
            opt.step()
            # the DTensor's own counter, not only its shard's: autograd sees the write
            assert w._version > before, (fused, before, w._version)
        out[fused] = w.full_tensor()
    dist.destroy_process_group()
    assert torch.equal(out[True], out[False])
    print("same")
""")


@needs_kernel
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_dtensor_steps_its_local_shard():
    """fused=True on a DTensor steps its local shard, bitwise the for-loop, and
    bumps the DTensor's autograd version counter on both paths."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]


# -- refusals and fallbacks (the kernel cache: tests/test_kernel_cache.py) ---------------


def test_require_explains_refusals():
    with pytest.raises(RuntimeError, match="runs on CPU and CUDA, got parameters on meta"):
        _fused.require([torch.zeros(2, device="meta")])

    class Sub(torch.Tensor):
        pass

    with pytest.raises(RuntimeError, match="plain tensors"):
        _fused.require([torch.zeros(2).as_subclass(Sub)])
    with pytest.raises(ValueError, match="differentiable"):
        _fused.fused_step([torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)],
                          None, steps=[torch.zeros(())], hyper=Hyper(),
                          variant=VARIANTS["irprop-"], worse=None, differentiable=True)


# -- CUDA: the Triton kernel --------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted_triton():
    """A copy of the Triton kernel module built with TRITON_INTERPRET=1: the
    kernel then runs on CPU tensors, in numpy, one IEEE operation at a time."""
    pytest.importorskip("triton")
    import importlib.util
    from pathlib import Path

    path = Path(_fused.__file__).with_name("_kernels") / "triton_kernel.py"
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_rprop_triton_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return module


TRITON_DTYPES = {
    "float32": (torch.float32, None, None), "float64": (torch.float64, None, None),
    "float16": (torch.float16, None, None), "bfloat16": (torch.bfloat16, None, None),
    "float16-f32state": (torch.float16, torch.float32, None),
    "bfloat16-f32state-f32grad": (torch.bfloat16, torch.float32, torch.float32),
}


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtypes", list(TRITON_DTYPES), ids=list(TRITON_DTYPES))
def test_triton_kernel_bitwise_in_interpreter(interpreted_triton, variant, dtypes):
    """The CUDA kernel's arithmetic, run by Triton's interpreter on CPU
    tensors, is bitwise the for-loop path (what a GPU adds on top, FMA and
    NaN payloads, is for the CUDA tests below)."""
    import numpy as np

    dtype, sdt, gdt = TRITON_DTYPES[dtypes]

    def triton_path(params, grads, prevs, step_sizes, prev_updates, *, steps, hyper, variant,
                    worse):
        _paths.increment_steps(steps)
        interpreted_triton.step(params, grads, prevs, step_sizes, prev_updates, hyper=hyper,
                                variant=variant, worse=worse)

    v = VARIANTS[variant]
    shapes = [(3,), (0,), (1500,), (5, 7)]  # 1500: two blocks, the second partly masked
    for h in (HYPERS["maximize+wd"], HYPERS["lr-outside-bounds"]):
        kw = {"dtype": dtype, "state_dtype": sdt, "grad_dtype": gdt}
        a = run_path(_paths.single_tensor, v, h, shapes, 6, **kw)
        with np.errstate(all="ignore"):  # 0 * inf and casts of inf, as intended
            b = run_path(triton_path, v, h, shapes, 6, **kw)
        assert_bitwise(a, b, f"Triton (interpreted) vs for-loop ({h})")


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
    groups, kw = groups_for(cpu, variant, weight_decay=0.01)
    a = rprop.Rprop(groups, **kw, fused=True)
    groups, kw = groups_for(gpu, variant, weight_decay=0.01)
    b = rprop.Rprop(groups, **kw, **SETTINGS[setting])
    with pytest.warns(rprop.LrSeedWarning, match="below step_min"):  # groups_for's 3rd group
        drive([a, b], [cpu, gpu], 30)
    assert_bitwise([p.detach() for p in cpu], [p.detach().cpu() for p in gpu], "params")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_fused_matches_for_loop(dtype):
    if not _has_triton():
        pytest.skip("fused=True on CUDA needs Triton")
    v, h = VARIANTS["irprop+"], HYPERS["maximize+wd"]
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(dtype) for s in [(7,), (1500,), (0,)]]
    results = []
    for path in (_paths.single_tensor, _fused.fused_step):
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
    needs_loss = VARIANTS[variant].needs_loss
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
                      **SETTINGS[setting])

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
    groups, kw = groups_for(cpu, "rprop+", weight_decay=0.01)
    a = rprop.Rprop(groups, **kw, fused=True)
    groups, kw = groups_for(gpu, "rprop+", weight_decay=0.01)
    b = rprop.Rprop(groups, **kw, **SETTINGS[setting])
    with torch.cuda.device(0), pytest.warns(rprop.LrSeedWarning, match="below step_min"):
        drive([a, b], [cpu, gpu], 10)
    assert_bitwise([p.detach() for p in cpu], [p.detach().cpu() for p in gpu], "params")


# -- the benchmark's logic (rprop._bench), smoke only: no timing assertions ----------


@pytest.mark.parametrize("variant", ["irprop-", "irprop+"])
def test_bench_rows_and_table(variant):
    from rprop import _bench

    rows = _bench.run([(3, 100)], quick=True, repeats=3, variant=variant)
    assert [r["path"] for r in rows] == list(_bench.PATHS)
    for r in rows:
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r["floor_ms"] == pytest.approx(
            300 * _bench.bytes_per_param(variant) / (r["copy_gbps"] * 1e9) * 1e3)
        assert r["peak_extra_mb"] is not None
    fused = rows[-1]
    # Nothing per parameter (iRprop+ makes a few scalars: the loss, its test).
    assert fused["path"] == "rprop fused" and fused["peak_extra_mb"] * 2**20 < 1024
    table = _bench.format_table(rows)
    assert "3x100" in table and "rprop fused" in table and "GB/s" in table
