"""``rprop bench`` (also ``benchmarks/step_speed.py``): milliseconds per optimizer step
against torch.optim.Rprop. The timing and the table are ``rprop._bench``'s; this
module checks the options and prints."""

from __future__ import annotations

import argparse
import decimal
import re
import sys
from typing import Any

import rprop
from rprop import _bench
from rprop.cli._checks import MissingError, UsageError, at_least, require_backend, variant_name
from rprop.cli._output import add_output_options, say, say_json, wants_progress

MAX_TENSORS = 2**20
MAX_PARAMS = 2**31  # tensors x elements, per size: 8 GiB per float32 array
_SCALES = {"k": 10**3, "m": 10**6, "g": 10**9}


def add_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="time one optimizer step against torch.optim.Rprop",
        description="The step-speed benchmark (also benchmarks/step_speed.py): "
                    "milliseconds per optimizer step of torch.optim.Rprop and of each "
                    "rprop.Rprop path for float32 parameter sets of several sizes, with the "
                    "speed-up over torch.optim.Rprop(foreach=True) and the ratio to the "
                    "memory-bandwidth floor measured in the same run.",
    )
    bench.add_argument("--quick", action="store_true", help="small sizes, few repeats "
                       "(a few seconds)")
    bench.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: cpu)")
    bench.add_argument("--variant", default="irprop-",
                       help=f"variant timed for rprop.Rprop: {', '.join(rprop.VARIANTS)} "
                            "(default: irprop-; torch.optim.Rprop is always iRprop-)")
    bench.add_argument("--sizes", type=_sizes, metavar="TxN[,...]",
                       help="parameter sets to time, TENSORSxELEMENTS (k, M: thousands, "
                            "millions), e.g. 100x100k,1000x1000 (default: 1x10M, 100x100k, "
                            "1000x1k, 10x10M)")
    bench.add_argument("--repeats", type=int, help="timed steps per measurement "
                       "(default: 15; 5 with --quick)")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip measuring the peak extra memory of a step")
    add_output_options(bench, json_help="print the rows as JSON",
                       progress_help="no progress lines (off anyway when stderr is not a "
                                     "terminal)")
    bench.set_defaults(func=run)


def _whole(text: str) -> int | None:
    """A count: ``1000``, ``1_000``, ``1e3``, ``1k``, ``10M``; None when it is not a whole
    number >= 1 (``1.5``, ``inf``, ``nan``, ``0``), MAX_PARAMS + 1 for any number above
    MAX_PARAMS (``1e30``). A ValueError when it is not a number at all."""
    text = text.strip().lower()
    scale = _SCALES.get(text[-1:], 1)
    if scale != 1:
        text = text[:-1]
    try:
        value = decimal.Decimal(text)  # exact, whatever the exponent: no float rounding
    except decimal.InvalidOperation:
        raise ValueError(text) from None
    if not value.is_finite() or value <= 0:
        return None
    if value > MAX_PARAMS:  # checked before scaling, which could overflow
        return MAX_PARAMS + 1
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        ctx.traps[decimal.Inexact] = True
        try:
            value *= scale
        except decimal.Inexact:  # more than 40 decimals, or an underflow: not a whole number
            return None
    if value < 1 or value != value.to_integral_value():
        return None
    return min(int(value), MAX_PARAMS + 1)


def _sizes(text: str) -> list[tuple[int, int]]:
    """``100x100000,1000x1000``: tensors x elements per tensor."""
    sizes = []
    for item in text.split(","):
        try:
            count, numel = (_whole(part) for part in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected TENSORSxELEMENTS[,...] such as 100x100000,1000x1000, got {item!r}"
            ) from None
        if count is None or numel is None:
            raise argparse.ArgumentTypeError(
                f"sizes must be whole numbers >= 1 (such as 1000, 1e5, 100k or 10M), "
                f"got {item!r}")
        if count > MAX_TENSORS or count * numel > MAX_PARAMS:
            raise argparse.ArgumentTypeError(
                f"sizes are limited to {MAX_TENSORS} tensors and 2**31 elements in all, "
                f"got {item!r}")
        sizes.append((count, numel))
    return sizes


_DEVICE = re.compile(r"cpu|mps|cuda(?::(\d+))?")


def _device_index(device: str) -> int | None:
    """The N of ``cuda:N``; a UsageError unless ``device`` is ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps`` (torch knows more, ``meta`` say, but there is nothing to time)."""
    match = _DEVICE.fullmatch(device)
    if match is None:
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, got {device!r}")
    return None if match[1] is None else int(match[1])


def _check_device(device: str) -> None:
    """A MissingError unless ``device`` (checked by _device_index) is present here."""
    import torch  # optional: only once the torch backend is known to be installed

    index = _device_index(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MissingError(f"--device {device}: CUDA is not available here")
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise MissingError(f"--device {device}: there is no such CUDA device here "
                               f"({count} found: cuda:0..cuda:{count - 1})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise MissingError(f"--device {device}: MPS is not available here")


def run(args: argparse.Namespace) -> int:
    variant = variant_name(args.variant)
    if args.repeats is not None:
        at_least("--repeats", args.repeats, 1)
    _device_index(args.device)  # a bad name is a usage error, torch or not
    require_backend("torch")
    _check_device(args.device)

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    rows = _bench.run(args.sizes, quick=args.quick, device=args.device, repeats=args.repeats,
                      variant=variant, memory=not args.no_memory,
                      progress=progress if wants_progress(args) else None)
    if args.json:
        say_json(rows)
    else:
        say(_bench.format_table(rows))
    return 0
