"""Real processes (gloo, 2 ranks, CPU, float64, unequal shards) against one
process on the whole dataset.

One spawned run (tests/_dist_worker.py) covers every set-up; the tests below
read what it saved. Losses match to 1e-12 relative, gradients to rounding
(summation order differs: batches, ranks). Parameters match *bitwise*: an
Rprop step depends on the gradient only through its sign (and, for iRprop+,
on whether the loss went up), and rounding-level differences flip neither
here, so the trajectories are the same floats.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rprop

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _dist_worker as worker  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("distributed")]
WORLD = 2
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(script: Path, args: list[str], folder: Path) -> list[str]:
    """Run ``script`` as WORLD ranks on loopback; return each rank's output."""
    env = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
           "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": str(WORLD)}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for attempt in range(2):  # a second try if another process took the port
        env["MASTER_PORT"] = str(free_port())
        logs = [folder / f"{script.stem}-{attempt}-rank{r}.log" for r in range(WORLD)]
        procs = []
        for r in range(WORLD):
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, str(script), *args],
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    stdout=log, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=TIMEOUT) for p in procs]
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
            codes = [None] * WORLD
        texts = [log.read_text() for log in logs]
        if codes == [0] * WORLD:
            return texts
        if not any("address already in use" in t.lower() for t in texts):
            break
    pytest.fail(f"ranks exited with {codes}:\n" + "\n".join(
        f"--- rank {r} ---\n{t[-3000:]}" for r, t in enumerate(texts)))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("distributed")
    logs = launch(HERE / "_dist_worker.py", [str(folder)], folder)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "logs": logs}


def reference(variant: str, n: int = 37, dtype: torch.dtype = torch.float64) -> dict:
    """One process, the whole dataset (first ``n`` samples) in one batch."""
    x, y = worker.dataset()
    x, y = x[:n].to(dtype), y[:n].to(dtype)
    model = worker.make_model(dtype)
    opt = rprop.Rprop(model.parameters(), variant=variant, lr=worker.LR)
    losses, grads = [], None
    for _ in range(worker.STEPS):
        opt.zero_grad()
        loss = worker.loss_fn(model, (x, y)).mean()
        loss.backward()
        if grads is None:
            grads = [p.grad.clone() for p in model.parameters()]
        losses.append(loss.item())
        opt.step(loss=loss.detach())
    return {"losses": losses, "grads": grads,
            "params": [p.detach().clone() for p in model.parameters()]}


def assert_same_run(got: dict, want: dict, loss_rtol: float = 1e-12) -> None:
    for a, b in zip(got["losses"], want["losses"], strict=True):
        assert abs(a - b) <= loss_rtol * abs(b), (got["losses"], want["losses"])
    for g, w in zip(got["grads"], want["grads"], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12 if w.dtype == torch.float64 else 1e-5,
                                   atol=1e-14 if w.dtype == torch.float64 else 1e-7)
    for p, w in zip(got["params"], want["params"], strict=True):
        torch.testing.assert_close(p, w, rtol=0, atol=0)


@pytest.mark.parametrize("variant", worker.VARIANTS)
@pytest.mark.parametrize("setup", worker.SETUPS)
def test_every_setup_equals_one_process_on_the_whole_dataset(run, setup, variant):
    want = reference(variant)
    for rank in range(WORLD):
        assert_same_run(run["ranks"][rank]["steps"][setup, variant], want)


def test_ranks_end_bitwise_identical(run):
    r0, r1 = (r["steps"] for r in run["ranks"])
    for key in r0:
        assert r0[key]["losses"] == r1[key]["losses"], key
        for a, b in zip(r0[key]["params"], r1[key]["params"], strict=True):
            assert torch.equal(a, b), key


def test_irprop_plus_runs_exercise_backtracking():
    losses = reference("irprop+")["losses"]
    assert any(b > a for a, b in itertools.pairwise(losses)), losses


def test_a_rank_without_batches_contributes_nothing(run):
    want = reference("irprop+", n=25)  # rank 0's samples only
    for rank in range(WORLD):
        assert_same_run(run["ranks"][rank]["steps"]["plain-empty", "irprop+"], want)


def test_float32_model_sends_loss_and_count_in_float64(run):
    want = reference("irprop+", dtype=torch.float32)
    for rank in range(WORLD):
        got = run["ranks"][rank]["steps"]["plain-float32", "irprop+"]
        assert_same_run(got, want, loss_rtol=1e-6)


def test_unused_parameters_keep_none_and_partial_ones_are_weighted_by_samples(run):
    x, _ = worker.dataset()
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 1), "unused": torch.nn.Linear(3, 1),
                                 "rank1": torch.nn.Linear(3, 1)}).double()
    out = model["used"](x).sum(dim=1)
    out = out + torch.cat([torch.zeros(25, dtype=torch.float64),
                           model["rank1"](x[25:]).sum(dim=1)])
    out.mean().backward()
    for rank in range(WORLD):
        grads = run["ranks"][rank]["partial_grads"]
        assert grads["unused.weight"] is None and grads["unused.bias"] is None
        for name in ("used.weight", "used.bias", "rank1.weight", "rank1.bias"):
            module, attr = name.split(".")
            want = getattr(model[module], attr).grad
            torch.testing.assert_close(grads[name], want, rtol=1e-12, atol=1e-14)


def test_fsdp_rank_without_batches_raises_on_every_rank(run):
    for rank in range(WORLD):
        message = run["ranks"][rank]["fsdp_empty_error"]
        assert message is not None and "every rank needs at least one batch" in message


def test_fsdp_nonfinite_skip_and_raise_agree_across_ranks(run):
    # The NaN is on rank 1 only; rank 0 must skip (or raise) as well.
    for r in range(WORLD):
        skip = run["ranks"][r]["fsdp_nonfinite_skip"]
        assert skip == {"unchanged": True, "skipped": 1, "error": None}
        raised = run["ranks"][r]["fsdp_nonfinite_raise"]
        assert raised["unchanged"] and raised["skipped"] == 0
        assert raised["error"].startswith("non-finite value in the gradient of parameter 0")


@pytest.mark.parametrize("setup", ["ddp", "fsdp", "zero"])
def test_fit_matches_and_resumes_bitwise(run, setup):
    steps = reference("irprop+")
    for rank in range(WORLD):
        whole = run["ranks"][rank]["fit"][setup, "whole"]
        resumed = run["ranks"][rank]["fit"][setup, "resumed"]
        assert whole["losses"] == pytest.approx(steps["losses"][:6], rel=1e-12, abs=0)
        assert resumed["resumed_from"] == 3 and whole["resumed_from"] is None
        assert resumed["losses"] == whole["losses"]
        assert whole["stop_reason"] == resumed["stop_reason"] == "max_epochs"
        for a, b in zip(resumed["params"], whole["params"], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("setup", ["plain", "fsdp", "zero"])
def test_fit_convergence_stops_agree_with_one_process(run, setup):
    # Under FSDP2 each rank holds a shard of the gradient and of the step
    # sizes (rank 1's shard of the linear model is empty), under ZeRO a
    # shard of the step sizes: the rules must see the whole and agree.
    x, y = worker.dataset()
    want = worker.run_stops("single", [(x, y)])
    assert [want[k]["stop_reason"] for k in want] == ["gtol", "step_floor", "patience"]
    assert want["val"]["best_epoch"] is not None
    for rank in range(WORLD):
        got = run["ranks"][rank]["stops"][setup]
        for name in want:
            for key in ("stop_reason", "epochs", "best_epoch"):
                assert got[name][key] == want[name][key], (rank, name, key)
            assert got[name]["losses"] == pytest.approx(want[name]["losses"], rel=1e-12)
            for a, b in zip(got[name]["params"], want[name]["params"], strict=True):
                assert torch.equal(a, b), (rank, name)


def test_progress_bar_on_rank_zero_only(run):
    rank0, rank1 = run["logs"]
    assert "loss=" in rank0 and "step=[" in rank0
    assert "loss=" not in rank1 and "fit:" not in rank1


def test_example_runs_on_two_ranks(tmp_path):
    logs = launch(HERE.parent / "examples" / "distributed_full_batch.py",
                  ["--epochs", "30", "--samples", "500"], tmp_path)
    assert "ranks: 2" in logs[0] and "final loss" in logs[0]
    assert "final loss" not in logs[1]
