"""Every example runs (in-process) and prints what it promises."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from rprop import cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_linear_fit(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "linear_fit.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert len(re.findall(r"^epoch +\d+  loss \d\.\d{6}$", out, re.MULTILINE)) == 4
    match = re.search(r"^w = (-?\d+\.\d\d), b = (-?\d+\.\d\d)$", out, re.MULTILINE)
    assert match, out
    assert abs(float(match[1]) - 2.0) <= 0.02 and abs(float(match[2]) - 3.0) <= 0.02


def test_linear_fit_prints_what_the_demo_fit_prints(capsys: pytest.CaptureFixture[str]) -> None:
    # `rprop demo` and the example run one training loop (rprop.demos.torch), not copies:
    # the example's lines are the demo's fit lines, loss for loss.
    assert cli.main(["demo"]) == 0
    demo = capsys.readouterr().out.splitlines()
    runpy.run_path(str(EXAMPLES / "linear_fit.py"), run_name="__main__")
    example = capsys.readouterr().out.splitlines()
    assert example == [line for line in demo if line.startswith(("epoch ", "w = "))]


@pytest.mark.slow
def test_demos_import_neither_torch_nor_jax() -> None:
    code = ("import sys, rprop.demos, rprop.demos.numpy, rprop.cli; "
            "print(sorted(m for m in ('torch', 'jax', 'optax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_sklearn_mlp(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    import torch

    main = runpy.run_path(str(EXAMPLES / "sklearn_mlp.py"))["main"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: extra threads only wait on a busy machine
    try:
        rows = main(seeds=1, datasets=("breast_cancer",))
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.count("| breast_cancer |") == 4, out
    scores = {r["model"]: r["score"] for r in rows}
    assert min(scores.values()) > 0.9, scores
    assert all(r["gradients"].split()[0].isdigit() for r in rows)
