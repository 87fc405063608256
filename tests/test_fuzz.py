"""Fuzzing rprop.Rprop: hyperparameters, shapes (0-dim, 0-element), dtypes,
variants and paths. No crash, step sizes within bounds, every path bitwise equal.

Hyperparameters include values past float16's and float32's largest number
(lr=1e39, eta_plus=1e39, step_max=1e39): every path must refuse them with the
same error, or accept them and step identically."""

import math
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rprop
from _table import NAMED_PATHS
from reference import VARIANT_NAMES

PATHS = list(NAMED_PATHS.values())

DTYPES = [torch.float32, torch.float64, torch.complex64, torch.bfloat16, torch.float16]
# Past float16's largest number (65504), past float32's (3.4e38), float64's largest.
HUGE = st.sampled_from([7e4, 3.5e38, 1e39, 1e300, 1.7976931348623157e308])
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
config = st.fixed_dictionaries(
    {
        "lr": st.one_of(st.floats(0.0, 100.0), HUGE),
        "eta_minus": st.floats(1e-3, 0.999),
        "eta_plus": st.one_of(st.floats(1.001, 10.0), HUGE),
        "step_min": st.one_of(st.floats(0.0, 1.0), HUGE),
        "step_span": st.one_of(st.just(math.inf), st.floats(0.0, 100.0), HUGE),
        "weight_decay": st.one_of(st.just(0.0), st.floats(0.0, 1.0), HUGE),
        "maximize": st.booleans(),
        "variant": st.sampled_from(VARIANT_NAMES),
        "dtype": st.sampled_from(DTYPES),
        # None, or a dtype wide enough for the parameters (a narrower one is refused).
        "wide_state": st.booleans(),
        "shapes": st.lists(shapes, min_size=1, max_size=4),
        "steps": st.integers(1, 8),
        "seed": st.integers(0, 2**16),
    }
)


def run(c, path):
    g = torch.Generator().manual_seed(c["seed"])
    params = [torch.randn(s, generator=g).to(c["dtype"]).requires_grad_() for s in c["shapes"]]
    bounds = (c["step_min"], c["step_min"] + c["step_span"])
    real = params[0].real.dtype if c["dtype"].is_complex else c["dtype"]
    state_dtype = torch.promote_types(real, torch.float32) if c["wide_state"] else None
    with warnings.catch_warnings():
        # lr = 0 and lr < step_min are fuzzed on purpose.
        warnings.simplefilter("ignore", rprop.LrSeedWarning)
        try:
            opt = rprop.Rprop(
                params, lr=c["lr"], etas=(c["eta_minus"], c["eta_plus"]), step_sizes=bounds,
                variant=c["variant"], weight_decay=c["weight_decay"], maximize=c["maximize"],
                state_dtype=state_dtype, **path,
            )
        except ValueError as err:
            # Only a value that does not fit the dtype may be refused.
            assert "does not fit the parameters' dtype" in str(err)
            return str(err)
        for t in range(c["steps"]):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(c["dtype"]) * (t % 3)
            opt.step(loss=float(t % 2))
            for p in params:
                s = opt.state[p]["step_size"]
                s = torch.view_as_real(s) if s.is_complex() else s
                assert torch.all((s >= bounds[0]) & (s <= bounds[1]))
    return params, opt


@settings(max_examples=160, deadline=None)
@given(config)
def test_fuzz_paths_agree_and_bounds_hold(c):
    runs = [run(c, path) for path in PATHS]
    if any(isinstance(r, str) for r in runs):  # refused: by every path, with one message
        assert all(r == runs[0] for r in runs), runs
        return
    base_params, base_opt = runs[0]
    for params, opt in runs[1:]:
        for a, b in zip(base_params, params):
            assert torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(base_params, params):
            for k, v in base_opt.state[a].items():
                w = opt.state[b][k]
                assert v.dtype == w.dtype
                assert torch.allclose(v, w, rtol=0, atol=0, equal_nan=True), k
