"""Review of GRprop's partitioned adjustment and its state_dict checks, and
of the NumPy front's mixed dtypes: each test is a bug found in review.
Oracles: tests/reference.py's transcription of neuralnet (ReferenceGRprop)
and the optimizer's own construction-time checks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import rprop
import rprop.numpy
from reference import ReferenceGRprop


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank (an in-memory store: no port)."""
    if dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_partitioned_one_rank_with_an_infinite_gradient_matches_reference(one_rank_group):
    grad = np.array([np.inf, 1.0], dtype=np.float32)
    ref = ReferenceGRprop([np.zeros(2, dtype=np.float32)], adjust="slr", exact_sum=True)
    with np.errstate(all="ignore"):
        ref.step([grad])
    p = torch.zeros(2, requires_grad=True)
    opt = rprop.Rprop([p], variant="grprop-slr", lr=0.1, step_sizes=(1e-10, 0.1),
                      grprop_partitioned=True)
    p.grad = torch.from_numpy(grad)
    opt.step()
    np.testing.assert_array_equal(opt.state[p]["step_size"].numpy(), ref.step_size[0])
    np.testing.assert_array_equal(p.detach().numpy(), ref.params[0])


@pytest.mark.parametrize(("value", "exc"), [("x", TypeError), (True, ValueError)])
def test_load_state_dict_checks_grprop_partitioned(value, exc):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    p = torch.zeros(2, requires_grad=True)
    opt = rprop.Rprop([p], variant="grprop-sag")
    p.grad = torch.ones(2)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["grprop_partitioned"] = value
    # The construction-time check is the oracle: the same value is refused there.
    with pytest.raises(exc, match="grprop_partitioned"):
        rprop.Rprop([torch.zeros(2, requires_grad=True)], variant="grprop-sag",
                    grprop_partitioned=value)
    with pytest.raises(exc, match="grprop_partitioned"):
        opt.load_state_dict(saved)
    assert opt.param_groups[0]["grprop_partitioned"] is False


def test_numpy_grprop_moves_by_the_stored_step_size_with_mixed_dtypes():
    x32 = np.random.default_rng(1).normal(size=3).astype(np.float32)
    x64 = np.random.default_rng(2).normal(size=4)
    opt = rprop.numpy.Rprop([x32, x64], variant="grprop-slr")
    for t in range(10):
        grads = [np.sin(3 * x + t).astype(x.dtype) for x in (x32, x64)]
        before = x32.copy()
        opt.step(grads)
        size = opt.state[0]["step_size"]
        assert size.dtype == np.float32
        # Rprop's move in the array's own dtype: x - sign(g) * step.
        np.testing.assert_array_equal(x32, before - np.sign(grads[0]) * size,
                                      err_msg=f"step {t}")


def test_load_state_dict_refuses_grprop_groups_that_disagree():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = rprop.Rprop([{"params": [a]}, {"params": [b]}], variant="grprop-sag")
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][1]["grprop_delta"] = 1e-3
    # The construction-time check is the oracle: the same groups are refused there.
    with pytest.raises(ValueError, match="every param group must have the same"):
        rprop.Rprop([{"params": [torch.zeros(2, requires_grad=True)]},
                     {"params": [torch.zeros(3, requires_grad=True)], "grprop_delta": 1e-3}],
                    variant="grprop-sag")
    with pytest.raises(ValueError, match="every param group must have the same"):
        opt.load_state_dict(saved)
    assert opt.param_groups[1]["grprop_delta"] == 1e-6


def test_sharded_one_rank_with_an_infinite_gradient_matches_reference(one_rank_group):
    grad = np.array([np.inf, 1.0], dtype=np.float32)
    ref = ReferenceGRprop([np.zeros(2, dtype=np.float32)], adjust="slr", exact_sum=True)
    with np.errstate(all="ignore"):
        ref.step([grad])
    mesh = init_device_mesh("cpu", (1,))
    p = torch.nn.Parameter(distribute_tensor(torch.zeros(2), mesh, [Shard(0)]))
    opt = rprop.Rprop([p], variant="grprop-slr", lr=0.1, step_sizes=(1e-10, 0.1))
    p.grad = distribute_tensor(torch.from_numpy(grad), mesh, [Shard(0)])
    opt.step()
    np.testing.assert_array_equal(opt.state[p]["step_size"].to_local().numpy(), ref.step_size[0])
