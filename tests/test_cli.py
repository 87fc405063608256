"""Smoke tests of the `rprop` command, in-process: every subcommand in its quick form."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from rprop import _compare, cli
from rprop.cli import compare as cli_compare
from rprop.cli.bench import _sizes


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _fit(out: str) -> tuple[float, float]:
    # The demo ends with the learned parameters.
    match = re.fullmatch(r"w = (-?\d+\.\d\d), b = (-?\d+\.\d\d)", out.strip().splitlines()[-1])
    assert match, out
    return float(match[1]), float(match[2])


@pytest.mark.parametrize("argv", [[], ["demo"], ["compare"], ["bench"]])
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    assert out.startswith("usage: rprop")


def test_demo(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "demo")
    assert code == 0 and err == ""
    assert " step         x     f'(x)  step size       move" in out
    assert "sign flip: step size halved, no move" in out  # irprop- forgets the gradient
    assert re.findall(r"^epoch +(\d+)  loss \d\.\d{6}$", out, re.MULTILINE) == [
        "50", "100", "150", "200"]
    w, b = _fit(out)
    assert abs(w - 2.0) <= 0.02 and abs(b - 3.0) <= 0.02


@pytest.mark.parametrize("backend", ["numpy", "jax"])
@pytest.mark.parametrize("variant", ["irprop+", "rprop-", "irprop-"])
def test_demo_backends_agree_with_torch(
    capsys: pytest.CaptureFixture[str], backend: str, variant: str
) -> None:
    # The three fronts do not compute bit for bit alike: each sums the float32 MSE and
    # its gradient in its own order (torch's mse_loss and autograd, NumPy's pairwise
    # np.mean, XLA's fused reduction), so losses and weights differ in the last float32
    # bits. What the demo prints, losses to 6 decimals at ~0.0091 (some 80 ulp from a
    # rounding boundary) and w, b to 2, is the same line for line.
    if backend == "jax" and importlib.util.find_spec("optax") is None:
        pytest.skip("jax and optax are not installed")
    code, out, _ = run(capsys, "demo", "--backend", backend, "--variant", variant)
    assert code == 0
    code, torch_out, _ = run(capsys, "demo", "--variant", variant)
    assert code == 0
    assert f"{backend} backend" in out and "torch backend" in torch_out
    loss_lines = re.findall(r"^epoch +\d+  loss .*$", out, re.MULTILINE)
    assert len(loss_lines) == 4
    assert loss_lines == re.findall(r"^epoch +\d+  loss .*$", torch_out, re.MULTILINE)
    assert _fit(out) == _fit(torch_out)
    assert out.replace(f"{backend} backend", "torch backend") == torch_out  # all of it


def test_demo_rprop_plus_undoes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--variant", "RPROP+", "--epochs", "50")
    assert code == 0
    assert "sign flip: step size halved, last move undone" in out
    assert "Rprop (rprop+" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["fly"], "invalid choice: 'fly'"),
        (["demo", "--backend", "tf"], "invalid choice: 'tf'"),
        (["demo", "--epochs", "many"], "invalid int value: 'many'"),
        (["demo", "--variant", "adam"], "variant must be one of"),  # the library's ValueError
        (["demo", "--lr", "-1"], "lr must be a finite number >= 0, got -1.0"),
        (["demo", "--lr", "nan"], "lr must be a finite number >= 0"),
        (["demo", "--epochs", "0"], "--epochs must be >= 1"),
        (["demo", "--seed", "-1"], "--seed must be >= 0, got -1"),  # not half a demo first
        (["demo", "--backend", "numpy", "--seed", "-3"], "--seed must be >= 0, got -3"),
        (["compare", "--seeds", "x"], "expected a count (5) or a comma-separated list"),
        (["compare", "--seeds", "0"], "a count of seeds must be >= 1"),
        (["compare", "--seeds", "-1"], "a count of seeds must be >= 1, got '-1'"),
        (["compare", "--seeds=2,-1"], "seeds must be >= 0, got '2,-1'"),
        (["compare", "--seeds", "10000000000"], "a count of seeds must be <= 100000"),
        (["compare", "--problems", "rosenbrock,nope"], "unknown problem 'nope'"),
        (["compare", "--methods", "sgd"], "unknown method 'sgd'"),
        (["compare", "--problems", "square,parity,square"],
         "problem 'square' is listed more than once"),
        (["compare", "--methods", "irprop+,irprop+"], "method 'irprop+' is listed more than once"),
        (["compare", "--seeds", "1,1,1"], "seed 1 is listed more than once"),
        (["compare", "--seeds", "0,3,03"], "seed 3 is listed more than once"),
        (["bench", "--fast"], "unrecognized arguments: --fast"),
        (["bench", "--sizes", "3y"], "expected TENSORSxELEMENTS"),
        (["bench", "--sizes", "1x2x3"], "expected TENSORSxELEMENTS"),
        (["bench", "--sizes", "1xinf"], "sizes must be whole numbers >= 1"),
        (["bench", "--sizes", "1xnan"], "sizes must be whole numbers >= 1"),
        (["bench", "--sizes", "1x1.5"], "such as 1000, 1e5, 100k or 10M), got '1x1.5'"),
        (["bench", "--sizes", "2.5x10"], "sizes must be whole numbers >= 1"),
        (["bench", "--sizes", "0x10"], "sizes must be whole numbers >= 1"),
        (["bench", "--sizes", "1x1e30"], "limited to 1048576 tensors and 2**31 elements in all"),
        (["bench", "--sizes", "1x1e999999999"], "limited to 1048576 tensors"),
        (["bench", "--sizes", "1e30x1"], "limited to 1048576 tensors"),
        (["bench", "--sizes", "3x1G"], "got '3x1G'"),
        (["bench", "--sizes", "1048577x1"], "limited to 1048576 tensors"),
        (["bench", "--device", "floppy"],
         "--device must be cpu, cuda, cuda:N or mps, got 'floppy'"),
        (["bench", "--device", "meta"], "--device must be cpu, cuda, cuda:N or mps, got 'meta'"),
        (["bench", "--device", "cuda:x"], "got 'cuda:x'"),
        (["bench", "--device", "cpu:0"], "got 'cpu:0'"),
        (["bench", "--variant", "fast"], "variant must be one of"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("rprop"), err
    assert ": error: " in err and message in err
    assert "Traceback" not in err


def test_bench_sizes_parse_whole_counts() -> None:
    assert _sizes("2x1.5k,1x10M,3x1e2,1_000x1,1X10m") == [
        (2, 1500), (1, 10_000_000), (3, 100), (1000, 1), (1, 10_000_000)]
    assert _sizes("1x2147483648,1048576x2048") == [(1, 2**31), (2**20, 2**11)]  # the limits


def test_compare_quick(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "compare", "--quick")
    assert code == 0
    assert err == ""  # no progress bar when stderr is not a terminal
    assert out.startswith("Protocol: 2 seed(s)")
    assert "L-BFGS" in out and "budget 150" in out
    header = "problem     method       success  median evals  final loss  time/run"
    assert header in out
    for name in ("rprop+", "rprop-", "irprop+", "irprop-", "torch-rprop", "adam", "lbfgs"):
        assert re.search(rf"^(?:[\w-]+)? +{re.escape(name)} +\d/2 ", out, re.MULTILINE), name
    # torch.optim.Rprop and irprop- are the same algorithm: the same rows, time aside
    rows = {m: re.search(rf"^(?:linear-fit)? +{re.escape(m)} +(.*?) +\d+ ms$", out,
                         re.MULTILINE) for m in ("irprop-", "torch-rprop")}
    assert rows["irprop-"] and rows["torch-rprop"]
    assert rows["irprop-"][1] == rows["torch-rprop"][1]


def test_compare_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compare", "--quick", "--json", "--problems", "square,parity",
                       "--methods", "irprop+,lbfgs", "--seeds", "0,5")
    assert code == 0
    data = json.loads(out)
    assert data["protocol"]["seeds"] == [0, 5]
    assert [p["name"] for p in data["protocol"]["problems"]] == ["square", "parity"]
    assert len(data["summary"]) == 4 and len(data["runs"]) == 8
    square = {s["method"]: s for s in data["summary"] if s["problem"] == "square"}
    assert square["lbfgs"]["success_rate"] == 1.0
    for r in data["runs"]:
        assert r["evals"] <= 150
        assert r["success"] == (r["evals_to_goal"] is not None)
        if r["success"]:
            assert r["evals_to_goal"] == r["evals"] and r["final_loss"] <= r["goal"]


@pytest.mark.parametrize(("name", "magic"), [("curves.png", b"\x89PNG\r\n\x1a\n"),
                                            ("curves.SVG", b"<?xml")])
def test_compare_plot(capsys: pytest.CaptureFixture[str], tmp_path, name: str,
                      magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / name
    code, out, _ = run(capsys, "compare", "--quick", "--problems", "square,linear-fit",
                       "--methods", "irprop-,adam", "--seeds", "1", "--plot", str(path))
    assert code == 0
    assert f"Loss curves written to {path}\n" in out
    assert path.read_bytes()[:len(magic)] == magic
    assert os.listdir(tmp_path) == [name]  # that file and no other


@pytest.fixture
def no_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that gets as far as running the comparison fails the test."""
    def compare(*args: object, **kwargs: object) -> None:
        raise AssertionError("the comparison ran")

    monkeypatch.setattr(_compare, "compare", compare)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("curves", "curves: no extension; give a file name such as curves.png"),
        ("curves.", "curves.: no extension"),
        ("folder", "folder: a folder; give a file name"),
        ("folder.png", "folder.png: a folder"),
        (f"new{os.sep}", "a folder"),
        ("curves.docx", "curves.docx: matplotlib cannot write .docx files; use one of "),
    ],
)
def test_compare_bad_plot_path_exits_2_before_running(
    capsys: pytest.CaptureFixture[str], tmp_path, no_runs: None, name: str, message: str
) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.png").mkdir()
    code, out, err = run(capsys, "compare", "--plot", os.path.join(tmp_path, name))
    assert code == 2 and out == ""
    assert err.startswith("rprop compare: error: --plot ") and err.count("\n") == 1, err
    assert message in err
    assert sorted(os.listdir(tmp_path)) == ["folder", "folder.png"]


def test_compare_empty_plot_path(capsys: pytest.CaptureFixture[str], no_runs: None) -> None:
    code, out, err = run(capsys, "compare", "--plot", "")
    assert (code, out) == (2, "")
    assert err == "rprop compare: error: --plot needs a file name such as curves.png\n"


def test_compare_plot_pgf_without_tex(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path,
    no_runs: None
) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(cli_compare.shutil, "which", lambda name: None)
    code, out, err = run(capsys, "compare", "--plot", str(tmp_path / "c.pgf"))
    assert (code, out) == (1, "")
    assert err.endswith("which is not installed\n") and err.count("\n") == 1, err


def test_compare_plot_to_a_read_only_folder(
    capsys: pytest.CaptureFixture[str], tmp_path, monkeypatch: pytest.MonkeyPatch,
    no_runs: None
) -> None:
    pytest.importorskip("matplotlib")
    folder = tmp_path / "ro"
    folder.mkdir()
    # Root (CI runs as root) may write anywhere, so the folder is made
    # read-only as the CLI sees it: os.access says no write permission there.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False
                        if os.fspath(path).startswith(str(folder)) and mode & os.W_OK
                        else real_access(path, mode, *a, **k))
    code, out, err = run(capsys, "compare", "--plot", str(folder / "x.png"))
    assert (code, out) == (1, "")
    assert err == f"rprop compare: error: cannot write {folder / 'x.png'}: permission denied\n"


def test_compare_plot_without_matplotlib(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path,
    no_runs: None
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = run(capsys, "compare", "--plot", str(tmp_path / "x.png"))
    assert code == 1 and out == ""
    assert err == "rprop compare: error: --plot needs matplotlib: pip install 'rprop[plot]'\n"


def test_compare_problem_without_sklearn(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    code, out, err = run(capsys, "compare", "--quick", "--problems", "digits")
    assert code == 1 and out == ""
    assert err == ("rprop compare: error: problem 'digits' needs scikit-learn: "
                   "pip install 'rprop[datasets]'\n")


@pytest.mark.parametrize("folder", ["no", "file"])
def test_compare_plot_to_a_missing_folder(
    capsys: pytest.CaptureFixture[str], tmp_path, no_runs: None, folder: str
) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "file").touch()
    path = tmp_path / folder / "x.png"
    code, out, err = run(capsys, "compare", "--plot", str(path))
    assert (code, out) == (1, "")
    assert err == f"rprop compare: error: cannot write {path}: no folder {tmp_path / folder}\n"


def test_bench_quick(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "bench", "--quick")
    assert code == 0
    assert out.startswith("Rprop step speed, float32, cpu")
    for path in ("torch foreach", "rprop foreach", "rprop fused"):
        assert path in out


def test_bench_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "bench", "--quick", "--json", "--no-memory", "--sizes", "3x100",
                       "--repeats", "2", "--variant", "rprop+")
    assert code == 0
    rows = json.loads(out)
    assert {r["size"] for r in rows} == {"3x100"}
    assert all(r["variant"] == "rprop+" and r["peak_extra_mb"] is None for r in rows)


def test_bench_skips_a_size_larger_than_memory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from rprop import _bench

    # 2**31 parameters need over 100 GB; this machine's memory is what it is,
    # so the check is made to see 1 GB free. The size that fits still runs.
    monkeypatch.setattr(_bench, "memory_available", lambda device: 10**9)
    code, out, _ = run(capsys, "bench", "--sizes", "10x100,1x2147483648", "--repeats", "1",
                       "--no-memory")
    assert code == 0
    small, big = out.split("1x2147483648", 1)
    assert small.count("unavailable") == 0 and "rprop fused" in small
    assert big.count("unavailable: needs about 206.2 GB of memory, 1.0 GB are free") == 5


def test_bench_memory_estimate_covers_the_measured_peak() -> None:
    """The estimate bounds what a size really holds at its peak: parameters,
    gradients, the state of every path's optimizer (they are timed in turns)
    and the hungriest path's measured step temporaries."""
    from rprop import _bench

    for count, numel in ((1, 200_000), (50, 4000)):  # for-loop's peak, foreach's peak
        rows = _bench.run([(count, numel)], repeats=1, variant="rprop+")
        # params and grads; prev and step size for torch's two optimizers,
        # also the last update for rprop's three
        held = count * numel * 4 * (2 + 2 * 2 + 3 * 3)
        peak = max(r["peak_extra_mb"] for r in rows) * 2**20
        assert held + peak <= _bench.memory_needed(count, numel, "rprop+")
    assert _bench.memory_available("cpu") > 0  # Linux: /proc/meminfo


def test_bench_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, out, err = run(capsys, "bench", "--quick", "--device", "cuda")
    assert code == 1 and out == ""
    assert err == "rprop bench: error: --device cuda: CUDA is not available here\n"


def test_bench_cuda_device_not_here(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    code, out, err = run(capsys, "bench", "--quick", "--device", "cuda:2")
    assert (code, out) == (1, "")
    assert err == ("rprop bench: error: --device cuda:2: there is no such CUDA device here "
                   "(2 found: cuda:0..cuda:1)\n")


def test_bench_unavailable_devices_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for device, what in [("cuda:0", "CUDA"), ("cuda:7", "CUDA"), ("mps", "MPS")]:
        code, out, err = run(capsys, "bench", "--quick", "--device", device)
        assert (code, out) == (1, "")
        assert err == f"rprop bench: error: --device {device}: {what} is not available here\n"


def test_python_dash_m() -> None:
    result = subprocess.run([sys.executable, "-m", "rprop", "--version"], capture_output=True,
                            text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("rprop ")
    result = subprocess.run([sys.executable, "-m", "rprop", "demo", "--lr", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == ("rprop demo: error: argument --lr: invalid float value: 'x' "
                             "(see 'rprop demo --help')\n")
