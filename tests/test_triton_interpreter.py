"""The CUDA kernel's arithmetic (rprop/torch/_kernels/triton_kernel.py) run by
Triton's interpreter on CPU tensors: bitwise the for-loop path, on every
variant and dtype, without a GPU. What a GPU adds on top (FMA, NaN payloads)
is for tests/test_cuda.py.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import rprop
from _table import STEP_PATHS, VARIANT_NAMES, assert_bitwise, hyper, run_path
from rprop.torch import _fused, _paths


@pytest.fixture(scope="module")
def interpreted_triton():
    """A copy of the Triton kernel module built with TRITON_INTERPRET=1: the
    kernel then runs on CPU tensors, in numpy, one IEEE operation at a time."""
    pytest.importorskip("triton")
    path = Path(_fused.__file__).with_name("_kernels") / "triton_kernel.py"
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("_rprop_triton_interpreted", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return module


TRITON_DTYPES = {
    "float32": (torch.float32, None, None), "float64": (torch.float64, None, None),
    "float16": (torch.float16, None, None), "bfloat16": (torch.bfloat16, None, None),
    "float16-f32state": (torch.float16, torch.float32, None),
    "bfloat16-f32state-f32grad": (torch.bfloat16, torch.float32, torch.float32),
}


@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("dtypes", list(TRITON_DTYPES), ids=list(TRITON_DTYPES))
def test_triton_kernel_bitwise_in_interpreter(interpreted_triton, variant, dtypes):
    """The CUDA kernel's arithmetic, run by Triton's interpreter on CPU
    tensors, is bitwise the for-loop path (what a GPU adds on top, FMA and
    NaN payloads, is for the CUDA tests below)."""
    dtype, sdt, gdt = TRITON_DTYPES[dtypes]

    def triton_path(params, grads, prevs, step_sizes, prev_updates, *, steps, hyper, variant,
                    worse):
        _paths.increment_steps(steps)
        interpreted_triton.step(params, grads, prevs, step_sizes, prev_updates, hyper=hyper,
                                variant=variant, worse=worse)

    v = rprop.VARIANTS[variant]
    shapes = [(3,), (0,), (1500,), (5, 7)]  # 1500: two blocks, the second partly masked
    for h in (hyper("maximize+wd"), hyper("lr-outside-bounds")):
        kw = {"dtype": dtype, "state_dtype": sdt, "grad_dtype": gdt}
        a = run_path(STEP_PATHS["for-loop"], v, h, shapes, 6, **kw)
        with np.errstate(all="ignore"):  # 0 * inf and casts of inf, as intended
            b = run_path(triton_path, v, h, shapes, 6, **kw)
        assert_bitwise(a, b, f"Triton (interpreted) vs for-loop ({h})")
