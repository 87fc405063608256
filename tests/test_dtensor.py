"""fused=True on DTensor parameters (one gloo rank in a subprocess): the
local shard is stepped bitwise the for-loop path, and the DTensor's own
autograd version counter moves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from _table import needs_kernel

DTENSOR_SCRIPT = textwrap.dedent("""
    import socket, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    import rprop
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    out = {}
    for fused in (True, False):
        torch.manual_seed(0)
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        opt = rprop.Rprop([w], fused=fused, variant="rprop+", weight_decay=0.1)
        for _ in range(6):
            w.grad = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
            before = w._version
            opt.step()
            # the DTensor's own counter, not only its shard's: autograd sees the write
            assert w._version > before, (fused, before, w._version)
        out[fused] = w.full_tensor()
    dist.destroy_process_group()
    assert torch.equal(out[True], out[False])
    print("same")
""")


@needs_kernel
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_dtensor_steps_its_local_shard():
    """fused=True on a DTensor steps its local shard, bitwise the for-loop, and
    bumps the DTensor's autograd version counter on both paths."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]
