"""Rprop step speed: torch.optim.Rprop vs rprop.Rprop's paths vs the memory floor.

Run: python benchmarks/step_speed.py [--quick] [--device cuda] [--variant rprop+]
     [--sizes 100x100000,1000x1000] [--repeats 15] [--no-memory]

Prints ms per step (median) at 1x10M, 100x100k, 1000x1k and 10x10M float32
parameters (plus 1000x100k on CUDA), the bandwidth floor measured in the same
run, the speed-up over torch.optim.Rprop(foreach=True), the ratio to the
floor, and each path's peak extra memory during a step. The logic lives in
rprop._bench; this script is `rprop bench`.
"""

from __future__ import annotations

import sys

from rprop import cli

if __name__ == "__main__":
    # The same benchmark and the same validated options as `rprop bench`.
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
