"""GRprop across processes (gloo, 2 ranks, CPU, float64): FSDP2-sharded
parameters (one all-gather of six numbers per rank and step), DDP (no
communication) and DDP with ZeroRedundancyOptimizer and grprop_partitioned=True
(the same all-gather) against one process with the same gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rprop

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _grprop_dist_worker as worker  # noqa: E402
from test_distributed import WORLD, launch  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("grprop_distributed")
    launch(HERE / "_grprop_dist_worker.py", [str(folder)], folder)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def one_process(adjust: str, setup: str = "") -> list[torch.Tensor]:
    model = worker.make_model(setup)
    opt = rprop.Rprop(model.parameters(), **worker.HYPER, variant=f"grprop-{adjust}")
    for _ in range(worker.STEPS):
        opt.zero_grad()
        worker.sse(model).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("adjust", worker.ADJUSTS)
@pytest.mark.parametrize("setup", ["fsdp", "ddp", "zero", "zero-resumed", "zero-one-param"])
def test_two_ranks_equal_one_process(ranks, setup, adjust):
    """Equal to 1e-15 relative: the sharded and partitioned sums add each
    rank's part, then the parts, so their last rounding may differ from one
    process's sum over the whole vector (the selection is the same)."""
    want = one_process(adjust, setup)
    moved = [not torch.equal(w, p) for w, p in zip(want, worker.make_model(setup).parameters(),
                                                   strict=True)]
    assert all(moved)
    for rank in ranks:
        for got, expected in zip(rank[setup, adjust], want, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("adjust", worker.ADJUSTS)
def test_zero_without_the_option_selects_per_rank_and_leaves_one_process(ranks, adjust):
    """What grprop_partitioned=True is for: without it each rank adjusts a
    step size of its own partition, from its own sum."""
    want = one_process(adjust)
    got = ranks[0]["zero-unpartitioned", adjust]
    assert not all(torch.allclose(g, w, rtol=1e-6, atol=0)
                   for g, w in zip(got, want, strict=True))


def test_ranks_agree_bitwise(ranks):
    for key in ranks[0]:
        if key != "refused":
            for a, b in zip(ranks[0][key], ranks[1][key], strict=True):
                assert torch.equal(a, b), key


def test_a_layout_other_than_fsdp2s_is_refused(ranks):
    for rank in ranks:
        assert "supports sharded parameters laid out as FSDP2 lays them out" in rank["refused"]
