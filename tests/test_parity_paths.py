"""rprop's torch paths against each other: bitwise, always.

Path-level tests call the table's STEP_PATHS (for-loop, foreach, fused) on
the same randomized tensors and compare every tensor bit for bit (NaN
included); optimizer-level tests do the same through rprop.Rprop on every
path of the table, with its param groups, complex parameters, missing
gradients and state_dict round trips between paths.
"""

from __future__ import annotations

import copy

import pytest
import torch

import rprop
from _table import (
    DTYPES,
    FULL,
    HALF,
    HALF_PATH_SCENARIOS,
    PATH_SCENARIOS,
    PATH_SHAPES,
    PATHS,
    REFERENCE_VARIANTS,
    STEP_PATHS,
    VARIANT_NAMES,
    assert_bitwise,
    assert_same,
    drive,
    groups_for,
    groups_warning,
    hyper,
    make_params,
    needs_kernel,
    paths_for,
    run_path,
)


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", FULL)
@pytest.mark.parametrize("scenario", PATH_SCENARIOS)
def test_paths_bitwise(variant, dtype, scenario):
    v, h = rprop.VARIANTS[variant], hyper(scenario)
    runs = {name: run_path(path, v, h, PATH_SHAPES, 25, dtype=DTYPES[dtype])
            for name, path in STEP_PATHS.items()}
    assert_bitwise(runs["for-loop"], runs["fused"], "fused vs for-loop")
    assert_bitwise(runs["foreach"], runs["fused"], "fused vs foreach")


@needs_kernel
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["half-state", "float32-state", "float32-state-and-grad"])
def test_half_precision_bitwise(variant, dtype, mode):
    """Half parameters: each op rounds to the storage dtype as torch does;
    with float32 state (rprop.Rprop(state_dtype=torch.float32)) the
    arithmetic is float32 and the parameter is rounded once."""
    kw = {"dtype": DTYPES[dtype]}
    if mode != "half-state":
        kw["state_dtype"] = torch.float32
    if mode == "float32-state-and-grad":
        kw["grad_dtype"] = torch.float32
    v = rprop.VARIANTS[variant]
    for scenario in HALF_PATH_SCENARIOS:
        h = hyper(scenario)
        a = run_path(STEP_PATHS["for-loop"], v, h, PATH_SHAPES, 15, **kw)
        b = run_path(STEP_PATHS["fused"], v, h, PATH_SHAPES, 15, **kw)
        assert_bitwise(a, b, f"fused vs for-loop ({scenario})")


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtype", FULL)
def test_optimizer_paths_bitwise(variant, dtype):
    """Every path of the table through rprop.Rprop, four param groups and
    weight decay, 40 steps: parameters and state bitwise the for-loop's."""
    paths = paths_for(variant)
    sets = {name: make_params(DTYPES[dtype]) for name in paths}
    opts = {name: rprop.Rprop(groups_for(params, variant=variant, weight_decay=0.01),
                              variant=variant, weight_decay=0.01, **paths[name])
            for name, params in sets.items()}
    names = list(paths)
    with groups_warning():
        drive([opts[n] for n in names], [sets[n] for n in names], 40)
    for name in names[1:]:
        assert_same(sets["for-loop"], sets[name], opts["for-loop"], opts[name])


MOVES = [("fused", "foreach"), ("for-loop", "fused"), ("fused", "fused")]


def test_the_classic_variants_run_on_every_path():
    for variant in REFERENCE_VARIANTS:
        assert paths_for(variant) == PATHS, variant


@needs_kernel
@pytest.mark.parametrize(("variant", "saver", "loader"),
                         [(v, a, b) for v in VARIANT_NAMES for a, b in MOVES
                          if {a, b} <= paths_for(v).keys()])
def test_state_dict_moves_between_paths(variant, saver, loader):
    """State saved by one path loads into another and continues bitwise."""
    ref_params, params = make_params(torch.float32), make_params(torch.float32)
    ref = rprop.Rprop(groups_for(ref_params, variant=variant), variant=variant,
                      **PATHS["for-loop"])
    first = rprop.Rprop(groups_for(params, variant=variant), variant=variant, **PATHS[saver])
    with groups_warning():
        drive([ref, first], [ref_params, params], 15)
    saved = copy.deepcopy(first.state_dict())
    # The saved dict records the saver's path flags; the loader keeps its own.
    for g in saved["param_groups"]:
        g.pop("fused"), g.pop("foreach")
    second = rprop.Rprop(groups_for(params, variant=variant), variant=variant, **PATHS[loader])
    second.load_state_dict(saved)
    drive([ref, second], [ref_params, params], 15, start=15)
    assert_same(ref_params, params, ref, second)
