"""Smoke tests of the `rprop` command, in-process: every subcommand in its quick form."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from rprop import cli


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
@pytest.mark.parametrize("variant", ["irprop+", "rprop-"])
def test_demo_backends_agree_with_torch(
    capsys: pytest.CaptureFixture[str], backend: str, variant: str
) -> None:
    if backend == "jax" and importlib.util.find_spec("optax") is None:
        pytest.skip("jax and optax are not installed")
    code, out, _ = run(capsys, "demo", "--backend", backend, "--variant", variant)
    assert code == 0
    code, torch_out, _ = run(capsys, "demo", "--variant", variant)
    assert code == 0
    assert _fit(out) == _fit(torch_out)
    assert f"{backend} backend" in out


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
        (["compare", "--seeds", "x"], "expected a count (5) or a comma-separated list"),
        (["compare", "--seeds", "0"], "a count of seeds must be >= 1"),
        (["compare", "--problems", "rosenbrock,nope"], "unknown problem 'nope'"),
        (["compare", "--methods", "sgd"], "unknown method 'sgd'"),
        (["bench", "--fast"], "unrecognized arguments: --fast"),
        (["bench", "--sizes", "3y"], "expected TENSORSxELEMENTS"),
        (["bench", "--device", "floppy"], "--device: Expected one of cpu"),
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


def test_compare_plot(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    code, out, _ = run(capsys, "compare", "--quick", "--problems", "square,linear-fit",
                       "--methods", "irprop-,adam", "--seeds", "1", "--plot", str(png))
    assert code == 0
    assert f"Loss curves written to {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_plot_without_matplotlib(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = run(capsys, "compare", "--quick", "--plot", str(tmp_path / "x.png"))
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


def test_compare_plot_to_a_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    pytest.importorskip("matplotlib")
    code, _, err = run(capsys, "compare", "--quick", "--problems", "square", "--methods",
                       "lbfgs", "--seeds", "1", "--plot", str(tmp_path / "no" / "x.png"))
    assert code == 1
    assert err.startswith("rprop compare: error: cannot write") and err.count("\n") == 1


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


def test_bench_without_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, out, err = run(capsys, "bench", "--quick", "--device", "cuda")
    assert code == 1 and out == ""
    assert err == "rprop bench: error: --device cuda: CUDA is not available here\n"


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
