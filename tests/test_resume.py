"""Exact resume: save mid-run in one process, load in a fresh one with
torch.load(weights_only=True), continue: bitwise the uninterrupted run, for
every variant, with each run resumed on a different path than it was saved on."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import _resume_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    for mode in ("save", "resume"):
        subprocess.run([sys.executable, str(HERE / "_resume_worker.py"), mode, str(folder)],
                       check=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(worker.PATHS))
@pytest.mark.parametrize("variant", worker.VARIANTS)
def test_resume_in_fresh_process_is_bitwise(resumed, variant, path):
    torch.set_num_threads(1)
    model, opt, closure = worker.setup(variant, path)
    worker.run(opt, closure, worker.FIRST + worker.SECOND)
    final = torch.load(resumed / f"{variant}_{path}_final.pt", weights_only=True)
    for name, value in model.state_dict().items():
        assert torch.equal(final["model"][name], value), name
    ours = opt.state_dict()
    assert final["opt"]["param_groups"][0]["variant"] == variant
    for i, st in ours["state"].items():
        assert final["opt"]["state"][i].keys() == st.keys()
        for k, v in st.items():
            assert torch.equal(final["opt"]["state"][i][k], v), (i, k)
