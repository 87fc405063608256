"""The README's self-contained Python snippets run and do what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_quickstart_reaches_the_least_squares_line(capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    scope: dict[str, object] = {}
    exec(python_blocks()[0], scope)
    w, b = map(float, capsys.readouterr().out.split())
    x = scope["x"].numpy()[:, 0].astype(np.float64)  # type: ignore[attr-defined]
    y = scope["y"].numpy()[:, 0].astype(np.float64)  # type: ignore[attr-defined]
    (w_ls, b_ls), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], 1), y, rcond=None)
    assert abs(w - w_ls) < 1e-3 and abs(b - b_ls) < 1e-3, (w, b, w_ls, b_ls)
    assert abs(w - 2.0) < 0.05 and abs(b - 3.0) < 0.05  # the comment's "≈ 2.0, 3.0"


def test_scipy_snippet_prints_what_its_comments_say(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    block = python_blocks()[1]
    scope: dict[str, object] = {}
    exec(block, scope)
    printed = capsys.readouterr().out.splitlines()
    claimed = re.findall(r"^print\(.*?\) +# \[(.*?)\] (.*)$", block, re.M)
    assert len(printed) == len(claimed) == 2
    for line, (x_text, rest) in zip(printed, claimed, strict=True):
        x_out, rest_out = line.split("]")
        got = np.array(x_out.strip(" [").split(), dtype=float)
        assert np.allclose(got, np.array(x_text.split(), dtype=float), atol=1e-5), line
        assert rest_out.split() == rest.split(), line
    # Independent of the code: Rosenbrock's valley y = x**2 meets the bound
    # x <= 0.8 at (0.8, 0.64); without bounds the minimum is (1, 1), which
    # xtol at the step-size floor stops "0.0015 short of", as the README says.
    first = np.array(printed[0].split("]")[0].strip(" [").split(), dtype=float)
    assert np.allclose(first, [0.8, 0.64], atol=1e-6)
    res = scope["res"]
    assert "0.0015 short of (1, 1)" in README.read_text().replace("\n", " ")
    assert round(float(np.max(np.abs(res.x - 1.0))), 4) == 0.0015  # type: ignore[attr-defined]
    assert "projected gradient component is still" in res.message  # type: ignore[attr-defined]
