"""Real faults against fit's checkpoints: flipped bits, broken and foreign
files, a full disk, SIGTERM (one process and a 2-rank torchrun), SIGKILL in
the middle of a write, and a checkpoint path that is a symbolic link.

A refused checkpoint is one ValueError naming the file, and leaves the
model, the optimizer and the RNG exactly as they were."""

from __future__ import annotations

import copy
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rprop
from rprop.torch import _fit as fit_module
from rprop.torch import fit

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _checkpoint_worker as worker  # noqa: E402

WORKER = HERE / "_checkpoint_worker.py"
TIMEOUT = 120
FLIPS = 300


def run_fit(model, path, epochs, **kwargs):
    return fit(model, worker.loss_fn, worker.problem(), max_epochs=epochs, progress=False,
               checkpoint=path, **kwargs)


def stepped_optimizer(model):
    """An optimizer with state, so a load that changed it would show."""
    opt = rprop.Rprop(model.parameters())
    for _ in range(2):
        loss = rprop.torch.full_batch_backward(model, worker.loss_fn, worker.problem())
        opt.step(loss=loss)
    return opt


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()),
            torch.get_rng_state())


def assert_same(before, after):
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b)
    assert_equal_nested(before[1], after[1])
    assert torch.equal(before[2], after[2])


def assert_equal_nested(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_nested(x, y)
    else:
        assert a == b or (a != a and b != b)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A checkpoint after 3 epochs of the default optimizer, and its bytes."""
    path = tmp_path_factory.mktemp("good") / "run.pt"
    run_fit(worker.make_model(), path, 3)
    return path, path.read_bytes()


def refused(path, match=None):
    """fit refuses ``path`` with a ValueError naming it; model, optimizer and
    RNG are unchanged."""
    model = worker.make_model()
    opt = stepped_optimizer(model)
    before = snapshot(model, opt)
    try:
        run_fit(model, path, 6, optimizer=opt)
    except Exception as err:  # checked below, after the state
        error = err
    else:
        pytest.fail(f"{path} was not refused")
    assert_same(before, snapshot(model, opt))
    assert isinstance(error, ValueError), repr(error)
    assert str(path) in str(error)
    assert match is None or re.search(match, str(error)), str(error)
    return str(error)


# -- corruption ----------------------------------------------------------------------


def test_every_single_bit_flip_is_detected(good, tmp_path):
    """FLIPS single-bit flips at seeded random positions of a real checkpoint:
    every one is refused before anything is loaded."""
    _, data = good
    rng = random.Random(0)
    bad = tmp_path / "flipped.pt"
    model = worker.make_model()
    opt = stepped_optimizer(model)
    before = snapshot(model, opt)
    outcomes: dict[str, list[int]] = {"refused": [], "other error": [], "loaded": []}
    for _ in range(FLIPS):
        bit = rng.randrange(len(data) * 8)
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        bad.write_bytes(flipped)
        try:
            run_fit(model, bad, 3, optimizer=opt)
        except ValueError as err:
            outcomes["refused" if str(bad) in str(err) else "other error"].append(bit)
        except Exception:
            outcomes["other error"].append(bit)
        else:
            outcomes["loaded"].append(bit)
    counts = {k: len(v) for k, v in outcomes.items()}
    assert counts["refused"] == FLIPS, f"of {FLIPS} single-bit flips: {counts}"
    assert_same(before, snapshot(model, opt))


def test_the_file_still_loads_with_torch_load_weights_only(good):
    path, _ = good
    payload = torch.load(path, weights_only=True)
    assert payload["epoch"] == 3 and payload["format"] == "rprop.fit/2"


# -- broken and foreign files: one clear error ---------------------------------------


def broken_files(data, folder):
    g = random.Random(1)
    yield "empty", b"", "empty"
    for fraction in (0.1, 0.5, 0.9, 0.999):
        yield f"truncated-{fraction}", data[:int(len(data) * fraction)], "not a checkpoint"
    yield "random-bytes", bytes(g.randrange(256) for _ in range(4096)), "not a checkpoint"
    for name, obj in (("tensor", torch.ones(3)), ("dict", {"history": 1})):
        other = folder / f"{name}.src"
        torch.save(obj, other)
        yield f"plain-torch-save-{name}", other.read_bytes(), "not a checkpoint"


BROKEN = ("empty", "truncated-0.1", "truncated-0.5", "truncated-0.9", "truncated-0.999",
          "random-bytes", "plain-torch-save-tensor", "plain-torch-save-dict")


@pytest.mark.parametrize("case", BROKEN)
def test_broken_files_are_one_clear_error(good, tmp_path, case):
    _, data = good
    cases = {c: (b, m) for c, b, m in broken_files(data, tmp_path)}
    content, match = cases[case]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    refused(bad, match)


def write_checkpoint(path, payload):
    fit_module.atomic_save(payload, path)


def mutated(good_path, change):
    payload = torch.load(good_path, weights_only=True)
    change(payload)
    return payload


def _set(*keys, value):
    def change(payload):
        target = payload
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value(target[keys[-1]]) if callable(value) else value
    return change


def _delete(*keys):
    def change(payload):
        target = payload
        for k in keys[:-1]:
            target = target[k]
        del target[keys[-1]]
    return change


# Files that pass the digest (written by fit's own writer) but do not fit
# the model, the optimizer or this process.
MUTATIONS = {
    "no-history": (_delete("history"), "history"),
    "no-model": (_delete("model"), "model"),
    "no-epoch": (_delete("epoch"), "epoch"),
    "epoch-not-int": (_set("epoch", value="three"), "epoch"),
    "epoch-negative": (_set("epoch", value=-1), "epoch"),
    "history-too-short": (_set("history", "loss", value=[1.0]), "history"),
    "history-step-size-malformed": (_set("history", "step_size", value=lambda s: [[1.0]] * 3),
                                    "step sizes"),
    "model-extra-key": (_set("model", "extra", value=torch.ones(1)), "unexpected"),
    "model-missing-key": (_delete("model", "3.bias"), "missing"),
    "model-wrong-shape": (_set("model", "0.weight", value=torch.ones(2, 2, dtype=torch.float64)),
                          "shape"),
    "model-wrong-dtype": (_set("model", "0.weight", value=lambda w: w.float()), "dtype"),
    "optimizer-two-groups": (_set("optimizer", "param_groups", value=lambda g: g + g),
                             "param groups"),
    "optimizer-state-wrong-shape": (_set("optimizer", "state", 0, "step_size",
                                         value=torch.ones(3, dtype=torch.float64)), "shape"),
    "optimizer-state-nan-step-size": (_set("optimizer", "state", 0, "step_size",
                                           value=lambda s: s * float("nan")), "NaN"),
    "optimizer-state-missing-key": (_delete("optimizer", "state", 0, "prev"), "lacks"),
    "optimizer-state-unknown-param": (_set("optimizer", "state", 99, value={}), "99"),
    "optimizer-bad-variant": (_set("optimizer", "param_groups", 0, "variant", value="nonsense"),
                              "nonsense"),
    "rng-wrong-size": (_set("rng", "cpu", value=torch.zeros(3, dtype=torch.uint8)), "rng"),
    "rng-no-cuda-list": (_delete("rng", "cuda"), "rng"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_a_refused_resume_changes_nothing(good, tmp_path, case):
    change, match = MUTATIONS[case]
    bad = tmp_path / "bad.pt"
    write_checkpoint(bad, mutated(good[0], change))
    refused(bad, match)


def test_another_optimizers_checkpoint_is_refused_both_ways(tmp_path):
    adam_ckpt = tmp_path / "adam.pt"
    model = worker.make_model()
    run_fit(model, adam_ckpt, 3, optimizer=torch.optim.Adam(model.parameters()))
    message = refused(adam_ckpt, "optimizer")
    assert "torch.optim.adam.Adam" in message and "rprop.Rprop" in message

    rprop_ckpt = tmp_path / "rprop.pt"
    run_fit(worker.make_model(), rprop_ckpt, 3)
    model = worker.make_model()
    adam = torch.optim.Adam(model.parameters())
    before = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(adam.state_dict()))
    with pytest.raises(ValueError, match=r"written with the optimizer rprop\.Rprop") as info:
        run_fit(model, rprop_ckpt, 6, optimizer=adam)
    assert str(rprop_ckpt) in str(info.value)
    for a, b in zip(before[0], model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert_equal_nested(before[1], adam.state_dict())


# -- a full disk ---------------------------------------------------------------------


def fill_after_first_save(folder, ckpt):
    """A callback: once the first checkpoint exists, fill the file system."""
    def callback(info):
        if info.epoch == 1:
            with open(folder / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 1024)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
    return callback


def test_a_full_disk_says_no_space_left_and_keeps_the_previous_checkpoint(tmp_path):
    """A real full file system: a 256 KiB tmpfs (needs root and mount)."""
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        ckpt = folder / "run.pt"
        saved = {}

        def keep(info):
            if info.epoch == 1:
                saved["bytes"] = ckpt.read_bytes()

        with pytest.raises(OSError, match="no space left") as info:
            run_fit(worker.make_model(), ckpt, 5, checkpoint_every=1,
                    callbacks=[keep, fill_after_first_save(folder, ckpt)])
        assert info.value.errno == errno.ENOSPC and str(ckpt) in str(info.value)
        assert ckpt.read_bytes() == saved["bytes"]  # the previous checkpoint, intact
        assert sorted(os.listdir(folder)) == ["filler", "run.pt"]  # no temporary file
        (folder / "filler").unlink()
        resumed = run_fit(worker.make_model(), ckpt, 5)
        assert resumed.resumed_from == 1
    finally:
        subprocess.run(["umount", str(folder)], timeout=30, check=True)


def test_a_full_disk_without_mount(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the write itself fails with ENOSPC."""
    ckpt = tmp_path / "run.pt"
    run_fit(worker.make_model(), ckpt, 2)
    good = ckpt.read_bytes()
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="no space left") as info:
        run_fit(worker.make_model(), ckpt, 4, checkpoint_every=1)
    monkeypatch.setattr(os, "write", real_write)
    assert str(ckpt) in str(info.value)
    assert ckpt.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["run.pt"]


# -- temporary files and symbolic links ----------------------------------------------


def temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


@pytest.mark.slow
def test_a_kill_during_a_write_leaves_a_temporary_that_the_next_run_removes(tmp_path):
    """A real SIGKILL while the second save's temporary file exists (its
    fsync made to hang); the first checkpoint survives; the next fit removes
    the dead writer's file and keeps a live writer's."""
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(WORKER), "slow-fsync", str(tmp_path)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not temporaries(tmp_path) or not (tmp_path / "run.pt").exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker never started its second save"
            time.sleep(0.02)
        time.sleep(0.2)  # the write is done, fsync hangs: the file is whole but not renamed
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    dead = temporaries(tmp_path)
    assert len(dead) == 1
    live_writer = subprocess.Popen(["sleep", "60"])
    try:
        live = f".run.pt.{live_writer.pid}.abcdefgh.tmp"
        (tmp_path / live).write_bytes(b"being written")
        resumed = run_fit(worker.make_model(), tmp_path / "run.pt", 3)
        assert resumed.resumed_from == 1
        assert temporaries(tmp_path) == [live]
    finally:
        live_writer.kill()
        live_writer.wait(timeout=TIMEOUT)


def test_a_symlinked_checkpoint_is_written_through_the_link(tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "real.pt"
    link = tmp_path / "run.pt"
    link.symlink_to(target)  # dangling until the first save
    first = run_fit(worker.make_model(), link, 3)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.is_file() and torch.load(target, weights_only=True)["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["run.pt", "store"]
    assert sorted(os.listdir(tmp_path / "store")) == ["real.pt"]
    again = run_fit(worker.make_model(), link, 5)
    assert again.resumed_from == 3 and again.loss[:3] == first.loss
    assert link.is_symlink() and torch.load(target, weights_only=True)["epoch"] == 5


# -- SIGTERM -------------------------------------------------------------------------


def wait_for(path, proc, what):
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        assert proc.poll() is None, f"{what} ended early: {proc.stdout.read().decode()}"
        assert time.monotonic() < deadline, f"{what} never wrote {path.name}"
        time.sleep(0.01)


def assert_bitwise(a_model, a_hist, b_model, b_hist):
    assert a_hist.loss == b_hist.loss and a_hist.step_size == b_hist.step_size
    for a, b in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_sigterm_saves_the_epoch_then_exits(tmp_path):
    """A real SIGTERM to a real process: it finishes the epoch, saves it and
    exits with 143; resuming is bitwise the uninterrupted run."""
    proc = subprocess.Popen([sys.executable, str(WORKER), "sigterm", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(tmp_path / "marker", proc, "the worker")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 143, out.decode()
    assert "SIGTERM received; finishing this step" in out.decode()
    assert (tmp_path / "exit.rank0").read_text() == "143"
    epoch = torch.load(tmp_path / "run.pt", weights_only=True)["epoch"]
    assert worker.MARK_AT < epoch < worker.EPOCHS  # saved at the signal, not periodically

    resumed_model = worker.make_model(0.2)
    torch.manual_seed(12345)  # overwritten by the checkpoint's RNG state
    resumed = fit(resumed_model, worker.loss_fn, worker.problem(), max_epochs=worker.EPOCHS,
                  progress=False, checkpoint=tmp_path / "run.pt")
    assert resumed.resumed_from == epoch
    whole_model = worker.make_model(0.2)
    whole = fit(whole_model, worker.loss_fn, worker.problem(), max_epochs=worker.EPOCHS,
                progress=False)
    assert_bitwise(resumed_model, resumed, whole_model, whole)


def torchrun(mode, folder):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(WORKER), mode, str(folder)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")
def test_sigterm_under_torchrun_stops_every_rank_after_the_same_epoch(tmp_path):
    """A real 2-rank torchrun (gloo); SIGTERM to the launcher, which forwards
    it to the ranks (as it does when a scheduler preempts the job). Both ranks
    finish the same epoch, save it, and exit with 143; a second torchrun
    resumes bitwise the uninterrupted run."""
    proc = torchrun("dist-sigterm", tmp_path)
    try:
        wait_for(tmp_path / "marker", proc, "torchrun")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
    text = out.decode()
    assert proc.returncode != 0, text
    assert [(tmp_path / f"exit.rank{r}").read_text() for r in range(2)] == ["143", "143"], text
    epoch = torch.load(tmp_path / "run.pt", weights_only=True)["epoch"]
    assert worker.MARK_AT < epoch < worker.EPOCHS, text

    proc = torchrun("dist-resume", tmp_path)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, out.decode()
    for rank in range(2):
        got = torch.load(tmp_path / f"resumed.rank{rank}.pt", weights_only=True)
        assert got["resumed_from"] == epoch
        assert got["loss"][0] == got["loss"][1] and got["step_size"][0] == got["step_size"][1]
        for a, b in got["params"]:
            assert torch.equal(a, b)
