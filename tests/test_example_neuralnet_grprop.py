"""examples/neuralnet_grprop.py runs, stops by neuralnet's rule, and its run is
the transcription of neuralnet's minus() fed the same gradients."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from reference import ReferenceGRprop

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "neuralnet_grprop.py"


def test_example_prints_a_converged_run_per_algorithm(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    rows = re.findall(r"^algorithm='(sag|slr)': error (\d\.\d{6})  reached\.threshold "
                      r"(\d\.\d{6})  steps (\d+)$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["sag", "slr"], out
    for _, error, reached, steps in rows:
        assert float(reached) <= 0.01 and 1 < int(steps) < 100_000
        assert float(error) < 0.05  # XOR learned: 1/2 sum of squares over 4 rows


@pytest.mark.parametrize("algorithm", ["sag", "slr"])
def test_example_steps_are_neuralnets_minus(algorithm: str) -> None:
    example = runpy.run_path(str(EXAMPLE))
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
               for s in [(3, 3), (1, 4)]]
    ref = ReferenceGRprop([w.detach().numpy() for w in weights], adjust=algorithm)
    opt = example["rprop"].Rprop(weights, lr=0.1, step_sizes=(1e-10, 0.1),
                                 variant=f"grprop-{algorithm}")
    for _ in range(30):
        opt.zero_grad()
        (0.5 * ((example["Y"] - example["net"](weights, example["X"])) ** 2).sum()).backward()
        ref.step([w.grad.numpy().copy() for w in weights])
        opt.step()
        for w, expected in zip(weights, ref.params, strict=True):
            np.testing.assert_array_equal(w.detach().numpy(), expected)
