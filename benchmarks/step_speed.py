"""Rprop step speed: torch.optim.Rprop vs rprop.Rprop's paths vs the memory floor.

Run: python benchmarks/step_speed.py [--quick] [--device cuda] [--variant rprop+]
     [--sizes 100x100000,1000x1000] [--repeats 15] [--no-memory]

Prints ms per step (median) at 1x10M, 100x100k, 1000x1k and 10x10M float32
parameters (plus 1000x100k on CUDA), the bandwidth floor measured in the same
run, the speed-up over torch.optim.Rprop(foreach=True), the ratio to the
floor, and each path's peak extra memory during a step. The logic lives in
rprop._bench (also behind the command line).
"""

from __future__ import annotations

import argparse
import sys

from rprop import _bench


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        count, numel = item.lower().split("x")
        sizes.append((int(count), int(float(numel))))
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="irprop-")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="comma-separated TENSORSxELEMENTS, e.g. 100x100000,1000x1000")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    args = parser.parse_args(argv)
    rows = _bench.run(args.sizes, quick=args.quick, device=args.device, repeats=args.repeats,
                      variant=args.variant, memory=not args.no_memory,
                      progress=lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    print(_bench.format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
