"""Ranks that disagree, in a real 2-rank run (gloo, CPU): a bad count on one
rank, models that differ in shape, dtype or parameter count, fit arguments
that differ. Every rank raises the same clear ValueError (no rank is left
waiting in a collective); a callback on rank 0 only works."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _rank_mismatch_worker as worker  # noqa: E402
from test_distributed import WORLD, launch  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("mismatch")
    launch(HERE / "_rank_mismatch_worker.py", [str(folder)], folder)
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]


EXPECTED = {
    # scenario: what every rank's ValueError says
    "tensor_count": r"batch 1 on rank 1: loss_fn's count must be finite and >= 0, got -2",
    "python_count": r"batch 2 on rank 0: loss_fn's count must be finite and >= 0, got -1",
    "fsdp_tensor_count": r"batch 2 on rank 1: loss_fn's count must be finite and >= 0, got nan",
    "fp16_count_fit": r"batch 0 on rank 1: .*got inf \(a float16 sum",
    "shape": r"full_batch_backward: the ranks disagree, parameter shapes: parameter 0 is "
             r"\(7, 3\) on rank 1 and \(6, 3\) on rank 0",
    "dtype": r"parameter dtypes: parameter 0 is 'float32' on rank 1 and 'float64' on rank 0",
    "param_count": r"number of trainable parameters: 6 on rank 1 and 4 on rank 0",
    "bucket_cap": r"bucket_cap_mb: 1.0 on rank 1 and 256.0 on rank 0",
    "fit_shape": r"fit: the ranks disagree, parameter shapes: parameter 0 is \(7, 3\) on rank 1",
    "fit_max_epochs": r"fit: the ranks disagree, max_epochs: 4 on rank 1 and 3 on rank 0",
    "fit_checkpoint_rank0": r"checkpoint given: False on rank 1 and True on rank 0",
    "fit_lr": r"optimizer param_groups: param_groups\[0\] is \{.*'lr': 0.2.* on rank 1 and "
              r"\{.*'lr': 0.1.* on rank 0",
}


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_every_rank_raises_the_same_clear_error(ranks, scenario):
    errors = [r[scenario]["error"] for r in ranks]
    assert errors[0] is not None and errors[0].startswith("ValueError: "), errors
    assert errors[1] == errors[0]
    assert re.search(EXPECTED[scenario], errors[0]), errors[0]


def test_a_callback_on_rank_zero_only_stops_every_rank(ranks):
    for r in ranks:
        assert r["fit_callback_rank0"] == {
            "error": None, "value": {"stop_reason": "callback", "epochs": 3,
                                     "loss": ranks[0]["fit_callback_rank0"]["value"]["loss"]}}
    assert ranks[0]["callback_epochs_seen"] == [0, 1, 2] and ranks[1]["callback_epochs_seen"] == []


def test_the_group_still_works_and_the_check_runs_once_per_model(ranks):
    # Oracle: one process, plain autograd on both ranks' samples at once.
    model = worker.make_model()
    x = torch.cat([b[0] for r in range(WORLD) for b in worker.batches(r)])
    y = torch.cat([b[1] for r in range(WORLD) for b in worker.batches(r)])
    loss = worker.loss_fn(model, (x, y)).mean()
    loss.backward()
    for r in ranks:
        after = r["after"]
        assert after["losses"] == pytest.approx([loss.item()] * 3, rel=1e-13)
        for got, p in zip(after["grads"], model.parameters(), strict=True):
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), p.grad,
                                       rtol=1e-12, atol=1e-14)
        # One bucket carries gradients, loss and count; the first call adds
        # the agreement check, later calls with the same model do not.
        assert after["all_reduces_per_call"] == [2, 1, 1]
