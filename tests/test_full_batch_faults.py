"""Counts that would silently change full_batch_backward's result, in one
process: every count (Python number or tensor) must be finite and >= 0, the
total > 0, and a bad one is a ValueError naming its batch. (Across ranks:
test_rank_mismatch.py.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rprop.torch import fit, full_batch_backward


def data(n: int = 30):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return [(x[i:i + 10], y[i:i + 10]) for i in range(0, n, 10)]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1).double()


def per_sample(m, batch):
    x, y = batch
    return ((m(x) - y) ** 2).sum(dim=1)


def counting(counts):
    """A loss_fn returning (loss_sum, counts[k]) for its k-th batch."""
    calls = {"k": 0}

    def fn(m, batch):
        k = calls["k"]
        calls["k"] += 1
        return per_sample(m, batch).sum(), counts[k % len(counts)]

    return fn


def weighted_fp16(m, batch):
    """A weighted mean whose weights sum past float16's 65504 in the second
    batch: w.sum() is inf there, so sum/count would be 0, gradient and all."""
    losses = per_sample(m, batch)
    w = torch.full((len(losses),), 1.0 if batch is BATCHES[0] else 7000.0, dtype=torch.float16)
    return (w.double() * losses).sum(), w.sum()


BATCHES = data()


def test_an_overflowed_float16_count_is_refused_naming_its_batch():
    w = torch.full((10,), 7000.0, dtype=torch.float16)
    assert torch.isinf(w.sum())  # the real fault: 70000 > 65504
    model = make_model()
    with pytest.raises(ValueError, match=r"batch 1: .*count must be finite and >= 0, got inf"):
        full_batch_backward(model, weighted_fp16, BATCHES)
    assert all(p.grad is None for p in model.parameters())


def test_fit_does_not_report_target_loss_on_an_overflowed_count():
    # Today's failure: loss 0, gradient 0, stop_reason "target_loss", untrained model.
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"batch 1: .*got inf.*float32"):
        fit(model, weighted_fp16, BATCHES, target_loss=1e-3, progress=False)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ([torch.tensor(10.0), torch.tensor(10.0), torch.tensor(-3.0)], r"batch 2: .*got -3\b"),
        ([torch.tensor(10.0), torch.tensor(math.nan), torch.tensor(10.0)], r"batch 1: .*got nan"),
        ([torch.tensor(-math.inf), torch.tensor(10.0), torch.tensor(10.0)], r"batch 0: .*got -inf"),
        ([10, -1, 10], r"batch 1: .*got -1"),
        ([10, 10, math.inf], r"batch 2: .*got inf"),
        # The first bad batch is named, whichever kind of count it is.
        ([10, torch.tensor(-2.0), -1], r"batch 1: .*got -2"),
        ([10, -1, torch.tensor(-2.0)], r"batch 1: .*got -1"),
        ([torch.tensor(1.0), torch.tensor(-5, dtype=torch.int64), torch.tensor(-2.0)],
         r"batch 1: .*got -5"),
    ],
)
def test_a_bad_count_in_one_batch_is_refused_naming_the_batch(counts, match):
    # The total of the good and bad counts is > 0 in most rows: the per-batch
    # check is what catches them.
    model = make_model()
    with pytest.raises(ValueError, match=match):
        full_batch_backward(model, counting(counts), BATCHES)
    assert all(p.grad is None for p in model.parameters())


def test_tensor_counts_that_add_up_to_zero_are_no_samples():
    zero = torch.tensor(0.0)
    with pytest.raises(ValueError, match="no samples"):
        full_batch_backward(make_model(), counting([zero, zero, zero]), BATCHES)


def test_a_boolean_tensor_count_is_a_type_error():
    # As a Python bool is: True is no number of samples.
    with pytest.raises(TypeError, match="count must be a real number"):
        full_batch_backward(make_model(), counting([torch.tensor(True)]), BATCHES)


def test_valid_tensor_counts_give_the_weighted_mean():
    # Oracle: plain autograd on the weighted mean of all samples at once.
    weights = [torch.full((10,), w, dtype=torch.float64) for w in (1.0, 2.5, 0.0)]
    calls = {"k": 0}

    def fn(m, batch):
        w = weights[calls["k"]]
        calls["k"] += 1
        return (w * per_sample(m, batch)).sum(), w.sum().to(torch.int64 if calls["k"] == 3
                                                             else torch.float32)

    model = make_model()
    loss = full_batch_backward(model, fn, BATCHES)
    ref = make_model()
    x = torch.cat([b[0] for b in BATCHES])
    y = torch.cat([b[1] for b in BATCHES])
    w = torch.cat(weights)
    want = (w * per_sample(ref, (x, y))).sum() / w.sum()
    want.backward()
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-14)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_counts_are_checked_without_a_host_sync_per_batch():
    # CUDA's sync debug mode warns at every host synchronisation: the count
    # of them must not grow with the number of batches.
    model = torch.nn.Linear(3, 1).cuda()
    x = torch.randn(200, 3, device="cuda")

    def fn(m, batch):
        return m(batch).sum(), torch.ones_like(batch[:, 0]).sum()  # made on the device

    def syncs(n_batches: int) -> int:
        batches = list(x.split(len(x) // n_batches))
        full_batch_backward(model, fn, batches)  # warm up
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                full_batch_backward(model, fn, batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    few, many = syncs(2), syncs(20)
    assert few == many and few <= 2, (few, many)
