"""Every example runs (in-process) and prints what it promises."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_linear_fit(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "linear_fit.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert len(re.findall(r"^epoch +\d+  loss \d\.\d{6}$", out, re.MULTILINE)) == 4
    match = re.search(r"^w = (-?\d+\.\d\d), b = (-?\d+\.\d\d)$", out, re.MULTILINE)
    assert match, out
    assert abs(float(match[1]) - 2.0) <= 0.02 and abs(float(match[2]) - 3.0) <= 0.02
