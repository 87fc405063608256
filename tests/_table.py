"""The test table: fronts, torch paths and scenarios, each listed once, and the
drivers that run any of them.

A small cousin of torch's OptimizerInfo database
(torch/testing/_internal/common_optimizers.py): a test picks rows from these
tables instead of defining its own list of paths or hyperparameters, so adding
a path, a front or a scenario is one row here, and every parity and property
test then covers it.

* ``PATHS``: rprop.Rprop's torch paths, as keyword arguments (``STEP_PATHS``:
  the same paths as functions, driven by ``run_path``).
* ``SCENARIOS``: hyperparameter sets (torch's argument names; the other fronts
  translate them), with named subsets for the tests that use them.
* ``DTYPES``: the torch parameter dtypes a path must step bitwise.
* ``FRONTS``: ways to run the algorithm over NumPy gradients (every torch
  path, the NumPy front, the optax front); each yields, after every step,
  the parameters and the step sizes as NumPy arrays.
* ``reference_run``: tests/reference.py (the papers, element by element) over
  the gradient sequence of tests/_helpers.py, cached.
* ``make_params`` / ``groups_for`` / ``drive`` / ``assert_same``: several torch
  optimizers (rprop's paths, torch.optim.Rprop as the oracle) driven in lock
  step over four param groups, compared bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import rprop
import rprop.numpy
from _helpers import flippy_grads, torch_grad_like
from reference import VARIANT_NAMES as REFERENCE_VARIANT_NAMES
from reference import ReferenceRprop
from rprop.torch import _fused, _paths

# -- torch paths ------------------------------------------------------------------------

HAS_KERNEL = _fused.available([torch.zeros(1)])
needs_kernel = pytest.mark.skipif(
    not HAS_KERNEL, reason=f"no fused CPU kernel here: {_fused.kernel_info().get('error')}")

# Every path by name; PATHS: those that run on CPU here (fused needs a C compiler).
ALL_PATHS: dict[str, dict[str, Any]] = {
    "for-loop": {"foreach": False, "fused": False},
    "foreach": {"foreach": True},
    "default": {},  # rprop picks (the fused kernel on CPU when it is available)
    "fused": {"fused": True},
}
PATHS = {name: kw for name, kw in ALL_PATHS.items() if name != "fused" or HAS_KERNEL}
# The paths a user asks for by name ("default" is one of them, chosen for the user).
NAMED_PATHS = {name: kw for name, kw in PATHS.items() if name != "default"}

# torch.optim.Rprop's own two implementations: the oracle for the default variant.
TORCH_PATHS: dict[str, dict[str, Any]] = {"for-loop": {"foreach": False},
                                          "foreach": {"foreach": True}}

# The same paths called directly, as the optimizer calls them on a bucket.
STEP_PATHS = {"for-loop": _paths.single_tensor, "foreach": _paths.multi_tensor,
              "fused": _fused.fused_step}

# -- variants ------------------------------------------------------------------------------

# Every variant the library declares: the paths must agree on each of them.
VARIANT_NAMES = tuple(rprop.VARIANTS)
# Those tests/reference.py transcribes: the fronts must match it on each of them.
REFERENCE_VARIANTS = REFERENCE_VARIANT_NAMES



@functools.cache
def paths_for(variant: str) -> dict[str, dict[str, Any]]:
    """The PATHS on which rprop.Rprop runs ``variant`` with the same bits: a
    path that cannot run a variant's features refuses it with a ValueError
    when the optimizer is built. GRprop with fused=True runs a one-pass
    kernel whose sum has another order (tests/test_grprop_fused.py), so it is
    not among GRprop's. test_parity_paths.py checks that the classic variants
    refuse none."""
    accepted = {}
    for name, kw in PATHS.items():
        if kw.get("fused") and rprop.get_variant(variant).adjust is not None:
            continue
        try:
            rprop.Rprop([torch.zeros(1, requires_grad=True)], variant=variant, **kw)
        except ValueError as err:
            assert variant in str(err), err  # a refusal names the variant
        else:
            accepted[name] = kw
    return accepted


# -- dtypes ------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}
FULL = ("float32", "float64")
HALF = ("float16", "bfloat16")

# -- scenarios: hyperparameter sets --------------------------------------------------------

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "plain": {"lr": 0.05},
    "maximize": {"lr": 0.05, "maximize": True},
    "weight-decay": {"lr": 0.05, "weight_decay": 0.1},
    # step sizes hit both bounds within the run (tests/test_parity_reference.py checks)
    "tight-bounds": {"lr": 0.05, "step_sizes": (1e-3, 0.05)},
    "lr-above-max": {"lr": 2.0, "step_sizes": (1e-4, 0.5)},
    "lr-below-min": {"lr": 1e-5, "step_sizes": (1e-3, 10.0)},
    "maximize+wd": {"lr": 0.1, "maximize": True, "weight_decay": 0.01},
    "lr-outside-bounds": {"lr": 100.0, "step_sizes": (1e-3, 1.0)},
    "odd-etas": {"lr": 1e-7, "etas": (0.3, 1.7), "step_sizes": (1e-6, 2.0)},
}
# Every front against the reference, over the gradient sequence of _helpers.py.
REFERENCE_SCENARIOS = ("plain", "maximize", "weight-decay", "tight-bounds", "lr-above-max",
                       "lr-below-min")
# The torch paths against each other, called directly (rprop.Hyper objects);
# half precision leaves out odd-etas (its lr=1e-7 is below float16's normal range).
PATH_SCENARIOS = ("defaults", "maximize+wd", "lr-outside-bounds", "odd-etas")
HALF_PATH_SCENARIOS = ("defaults", "maximize+wd", "lr-outside-bounds")
# Reference runs: 150 steps for the plain scenario, 80 for the others.
STEPS = {name: 150 if name == "plain" else 80 for name in REFERENCE_SCENARIOS}


def hyper(scenario: str) -> rprop.Hyper:
    """The scenario as an rprop.Hyper (what the path functions take)."""
    kw = SCENARIOS[scenario]
    out: dict[str, Any] = {k: kw[k] for k in ("lr", "maximize", "weight_decay") if k in kw}
    if "etas" in kw:
        out["eta_minus"], out["eta_plus"] = kw["etas"]
    if "step_sizes" in kw:
        out["step_min"], out["step_max"] = kw["step_sizes"]
    return rprop.Hyper(**out)


def seed_warning(kwargs: dict[str, Any]) -> contextlib.AbstractContextManager[Any]:
    """What rprop.Rprop says when its step sizes start below step_min: an
    LrSeedWarning on the first step, else nothing."""
    lr, (step_min, _) = kwargs.get("lr", 0.01), kwargs.get("step_sizes", (1e-6, 50.0))
    if lr < step_min:
        return pytest.warns(rprop.LrSeedWarning, match="below step_min")
    return contextlib.nullcontext()


# -- the reference ------------------------------------------------------------------------

SHAPES = [(13,), (4, 5), ()]
COMPLEX_SIZE = 6


@dataclass(frozen=True)
class ReferenceRun:
    w0: list[np.ndarray]  # initial parameters (the last one complex)
    inputs: list[tuple[list[np.ndarray], float]]  # (gradients, loss) per step
    path: list[tuple[list[np.ndarray], list[np.ndarray]]]  # (params, step sizes) after each


def _loss(t: int, grads: list[np.ndarray]) -> float:
    # goes up and down, so that iRprop+ both undoes and does not
    return float(sum(np.sum(np.abs(g)) for g in grads)) + (t % 3)


@functools.cache
def reference_run(variant: str, scenario: str, dtype: type) -> ReferenceRun:
    """tests/reference.py over the gradients of _helpers.flippy_grads (sign
    flips, zeros, every gradient 0 once, 1e3 spikes), for real and complex
    parameters of ``dtype`` (np.float32 or np.float64)."""
    rng = np.random.default_rng(0)
    kw = SCENARIOS[scenario]
    cdt = np.complex64 if dtype == np.float32 else np.complex128
    w0 = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    w0.append((rng.standard_normal(COMPLEX_SIZE)
               + 1j * rng.standard_normal(COMPLEX_SIZE)).astype(cdt))
    ref = ReferenceRprop(w0, variant=variant, **kw)
    inputs, path = [], []
    for t in range(STEPS[scenario]):
        grads = flippy_grads(ref.params, t, rng)
        loss = _loss(t, grads)
        ref.step(grads, loss)
        inputs.append((grads, loss))
        path.append(([p.copy() for p in ref.params], [s.copy() for s in ref.step_size]))
    return ReferenceRun(w0, inputs, path)


def as_reals(a: Any) -> np.ndarray:
    """A NumPy array, complex ones as (..., 2) real pairs (the reference's layout)."""
    a = np.asarray(a)
    return np.stack([a.real, a.imag], axis=-1) if np.iscomplexobj(a) else a


def assert_step(want: ReferenceRun, t: int, params: list[Any], step_sizes: list[Any],
                what: str) -> None:
    """Step ``t`` of a front equals the reference's, bit for bit, dtypes included."""
    want_params, want_steps = want.path[t]
    for i, (a, b) in enumerate(zip(want_params, params, strict=True)):
        b = np.asarray(b)
        assert a.dtype == b.dtype, f"{what}, step {t}, param {i}: dtype {b.dtype}, not {a.dtype}"
        assert np.array_equal(a, b), \
            f"{what}, step {t}, param {i}: max |diff| {np.max(np.abs(a - b))}"
    for i, (a, s) in enumerate(zip(want_steps, step_sizes, strict=True)):
        assert np.array_equal(a, as_reals(s)), f"{what}, step {t}: step sizes of param {i} differ"


# -- fronts: run N steps over NumPy gradients ------------------------------------------------

Trajectory = Iterator[tuple[list[Any], list[Any]]]


def run_torch(path: str, variant: str, kwargs: dict[str, Any], w0: list[np.ndarray],
              inputs: list[tuple[list[np.ndarray], float]]) -> Trajectory:
    """rprop.Rprop on the torch path ``path``: (params, step sizes) after each step."""
    ps = [torch.tensor(w, requires_grad=True) for w in w0]
    opt = rprop.Rprop(ps, variant=variant, **kwargs, **PATHS[path])
    for t, (grads, loss) in enumerate(inputs):
        for p, g in zip(ps, grads, strict=True):
            p.grad = torch.tensor(g)
        with seed_warning(kwargs) if t == 0 else contextlib.nullcontext():
            opt.step(loss=loss if variant == "irprop+" else None)
        yield ([p.detach().numpy() for p in ps],
               [opt.state[p]["step_size"].numpy() for p in ps])


def run_numpy(variant: str, kwargs: dict[str, Any], w0: list[np.ndarray],
              inputs: list[tuple[list[np.ndarray], float]]) -> Trajectory:
    """rprop.numpy.Rprop (updates the arrays in place)."""
    params = [w.copy() for w in w0]
    opt = rprop.numpy.Rprop(params, variant=variant, **kwargs)
    for grads, loss in inputs:
        opt.step(grads, loss=loss)
        yield params, [opt.state[i]["step_size"] for i in range(len(params))]


def run_optax(variant: str, kwargs: dict[str, Any], w0: list[np.ndarray],
              inputs: list[tuple[list[np.ndarray], float]], *, jit: bool = True) -> Trajectory:
    """rprop.optax.rprop under jax.jit (compiled once, checked; ``jit=False``
    runs it eagerly, for many short runs with other hyperparameters). The optax front
    has no maximize or weight_decay option; it is fed what the option would
    compute: the negated gradients and loss, and optax.add_decayed_weights
    chained in front (g + weight_decay * p, the same operation as the core's).
    Call it under ``jax.enable_x64(True)`` for float64."""
    # JAX is optional: imported only when the optax front runs.
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    import rprop.optax

    smin, smax = kwargs.get("step_sizes", (1e-6, 50.0))
    eta_minus, eta_plus = kwargs.get("etas", (0.5, 1.2))
    opt = rprop.optax.rprop(kwargs.get("lr", 0.01), eta_minus, eta_plus, smin, smax,
                            variant=variant)
    if "weight_decay" in kwargs:
        opt = optax.chain(optax.add_decayed_weights(kwargs["weight_decay"]), opt)
    sign = -1.0 if kwargs.get("maximize") else 1.0

    def step(params, state, grads, loss):
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    if jit:
        step = jax.jit(step)

    params = [jnp.asarray(w) for w in w0]
    assert [p.dtype for p in params] == [w.dtype for w in w0]
    state = opt.init(params)
    for grads, loss in inputs:
        grads = [jnp.asarray(sign * g) for g in grads]
        params, state = step(params, state, grads, jnp.asarray(sign * loss))
        inner = state[-1][0] if "weight_decay" in kwargs else state[0]
        yield params, inner.step_sizes
    if jit:
        assert step._cache_size() == 1  # compiled once


@dataclass(frozen=True)
class Front:
    """One way to run the algorithm: ``run(variant, kwargs, w0, inputs)``
    yields (params, step sizes) after each step."""

    name: str
    run: Callable[..., Trajectory]
    context: Callable[[type], contextlib.AbstractContextManager[Any]] = \
        lambda dtype: contextlib.nullcontext()
    # Scenarios run in float32 (None: all). Each optax run compiles under
    # XLA (about a second); its float32 arithmetic is float64's at another
    # width, so float32 runs the plain scenario only.
    float32_scenarios: tuple[str, ...] | None = None


def _x64(dtype: type) -> contextlib.AbstractContextManager[Any]:
    """jax_enable_x64 for float64 runs (a thread-local context manager, so
    nothing leaks into other tests)."""
    if dtype != np.float64:
        return contextlib.nullcontext()
    jax = pytest.importorskip("jax")
    return jax.enable_x64(True)


FRONTS: dict[str, Front] = {
    **{f"torch-{path}": Front(f"torch-{path}", functools.partial(run_torch, path))
       for path in PATHS},
    "numpy": Front("numpy", run_numpy),
    "optax": Front("optax", run_optax, _x64, float32_scenarios=("plain",)),
}
TORCH_FRONTS = tuple(name for name in FRONTS if name.startswith("torch-"))


# -- torch optimizers in lock step: rprop's paths and torch.optim.Rprop ------------------------


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Parameters covering what a path must handle: shapes, a 0-d and an empty
    tensor, a complex one, one that never gets a gradient, one that gets one
    every other step (see ``drive``) and a dense, non-contiguous one."""
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


def fresh(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def groups_for(params: list[torch.Tensor], *, variant: str | None = None,
               tensor_lr: bool = False, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Four param groups with different hyperparameters (one maximizes, one
    starts below step_min, one steps past step_max); with ``weight_decay``,
    the last group has ten times the optimizer's. A variant with a whole-step
    adjustment (GRprop chooses one step size among all parameters) gets the
    same step_sizes in every group, as it requires."""
    lr = torch.tensor(0.03, dtype=torch.float64) if tensor_lr else 0.03
    groups: list[dict[str, Any]] = [
        {"params": params[:2], "lr": lr},
        {"params": params[2:4], "lr": 3.0, "step_sizes": (1e-4, 0.5), "etas": (0.3, 1.5)},
        {"params": params[4:6], "lr": 1e-7, "step_sizes": (1e-3, 2.0), "maximize": True},
        {"params": params[6:]},
    ]
    if variant is not None and rprop.VARIANTS[variant].adjust is not None:
        for g in groups:
            g.pop("step_sizes", None)
    if weight_decay:
        groups[3]["weight_decay"] = 10 * weight_decay
    return groups


def groups_warning() -> contextlib.AbstractContextManager[Any]:
    """groups_for's third group starts below its step_min: rprop.Rprop says so once."""
    return pytest.warns(rprop.LrSeedWarning, match="below step_min")


def drive(opts: list[Any], params_sets: list[list[torch.Tensor]], steps: int, start: int = 0,
          seed: int = 1) -> None:
    """Give every optimizer the same gradients (and losses, for iRprop+) for
    ``steps`` steps; make_params' fifth parameter never gets a gradient, its
    sixth one every other step."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(start, start + steps):
        grads = [None if i == 4 or (i == 5 and t % 2) else torch_grad_like(p, t, gen)
                 for i, p in enumerate(params_sets[0])]
        loss = float(torch.randn((), generator=gen))
        for opt, params in zip(opts, params_sets, strict=True):
            for p, g in zip(params, grads, strict=True):
                p.grad = None if g is None else g.to(p.device, copy=True)
            opt.step(loss=loss) if opt.defaults.get("variant") == "irprop+" else opt.step()


BIT_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = torch.view_as_real(t) if t.is_complex() else t
    return t.view(BIT_DTYPES[t.element_size()])


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    """Same dtype, shape and bits (NaN payloads too, except in bfloat16)."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: tensor {i}"
        assert x.device == y.device, f"{what}: tensor {i} on {x.device}, not {y.device}"
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        if x.dtype == torch.bfloat16:
            # torch itself writes NaN as 0x7FC0 or 0xFFFF depending on the
            # code path (scalar or vectorized), so only NaN-ness is compared.
            nan = x.isnan()
            assert torch.equal(nan, y.isnan()), f"{what}: tensor {i} NaNs differ"
            x, y = x[~nan], y[~nan]
        assert torch.equal(bits(x), bits(y)), f"{what}: tensor {i} differs"


def assert_same(params_a: list[torch.Tensor], params_b: list[torch.Tensor], opt_a: Any,
                opt_b: Any, *, same_keys: bool = True) -> None:
    """Parameters and every state tensor bitwise equal. ``same_keys=False``
    lets ``opt_b`` keep state keys ``opt_a`` lacks (torch.optim.Rprop as
    ``opt_a``: rprop adds what its other variants need)."""
    assert_bitwise([p.detach() for p in params_a], [p.detach() for p in params_b], "params")
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        sa, sb = opt_a.state.get(a, {}), opt_b.state.get(b, {})
        if same_keys:
            assert sa.keys() == sb.keys(), f"param {i}: state keys {sa.keys()} vs {sb.keys()}"
        else:
            assert sa.keys() <= sb.keys(), f"param {i}: state keys {sa.keys()} vs {sb.keys()}"
        for key in sa:
            assert_bitwise([sa[key]], [sb[key]], f"state {key!r} of param {i}")


# -- the torch paths called directly -------------------------------------------------------

PATH_SHAPES = [(3,), (0,), (257,), (5, 7), (1,)]
BIG_SHAPES = [(20_000,), (13,), (0,), (20_001,)]  # over the kernel's threading threshold


def run_path(path: Callable[..., None], variant: rprop.Variant, hyper: rprop.Hyper,
             shapes: list[tuple[int, ...]], steps: int, *, dtype: torch.dtype,
             state_dtype: torch.dtype | None = None, grad_dtype: torch.dtype | None = None,
             seed: int = 0, specials: bool = True) -> list[torch.Tensor]:
    """Step fresh tensors ``steps`` times with ``path`` (one of STEP_PATHS or
    anything with their signature); return every tensor.

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
