"""The ``rprop`` command: ``demo``, ``compare`` and ``bench``.

All output is produced here; the work is done by :mod:`rprop.problems`,
``rprop._compare`` and ``rprop._bench``. Exit codes: 0 on success, 2 on a bad
argument (one line on stderr, no traceback), 1 when an optional package a
command needs is missing or a file cannot be written.
"""

from __future__ import annotations

import argparse
import contextlib
import decimal
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import rprop
from rprop._hyper import Hyper
from rprop._variants import VARIANTS, get_variant

BACKENDS = ("torch", "numpy", "jax")
_EXTRAS = {"torch": ("torch",), "numpy": (), "jax": ("jax", "optax")}


class UsageError(Exception):
    """A bad argument value found after parsing: exit 2."""


class MissingError(Exception):
    """An optional package or a resource the command needs is missing: exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


@contextlib.contextmanager
def _checking_arguments() -> Iterator[None]:
    """The library's ValueError/TypeError on a bad option value becomes a UsageError
    (exit 2, one line); a missing optional package found here, a MissingError."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    except ImportError as err:
        raise MissingError(str(err)) from None


def _print(*args: Any) -> None:
    text = " ".join(map(str, args))
    try:
        print(text, flush=True)
    except UnicodeEncodeError:  # a terminal or file without ², ×, π: print '?' for those
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        print(text.encode(encoding, "replace").decode(encoding), flush=True)


# -- demo -----------------------------------------------------------------------


def _demo_square(variant: str, lr: float, steps: int) -> None:
    """f(x) = x² from x = 5, one row per step, with the NumPy front."""
    import numpy as np

    from rprop.numpy import Rprop as NumpyRprop

    x = np.array([5.0])
    opt = NumpyRprop([x], lr=lr, variant=variant)
    _print(f"Minimising f(x) = x² from x = 5 with Rprop ({variant}, initial step size {lr:g}).")
    _print("Each step moves x by the step size against the sign of f'(x), whatever its size;")
    _print("the step size grows ×1.2 while f'(x) keeps its sign and halves when it flips.")
    _print()
    _print(" step         x     f'(x)  step size       move")
    step_size, move = lr, 0.0
    for t in range(1, steps + 1):
        before = float(x[0])
        grad = 2.0 * x
        opt.step([grad], loss=before * before)
        last_step_size, last_move = step_size, move
        step_size, move = float(opt.state[0]["step_size"][0]), float(x[0]) - before
        note = ""
        if step_size < last_step_size:
            note = "  sign flip: step size halved"
            if move == 0.0:
                note += ", no move"
            elif move == -last_move:
                note += ", last move undone"
        _print(f"{t:5d} {before:9.4f} {grad[0]:9.4f} {step_size:10.4f} {move:+10.4f}{note}")
    _print(f"after {steps} steps: x = {float(x[0]):.4f}")
    _print()


def _fit_torch(variant: str, lr: float, epochs: int, seed: int,
               report: Callable[[int, float], None]) -> tuple[float, float]:
    from rprop import problems

    inst = problems.get("linear-fit").build(seed)
    opt = rprop.Rprop(inst.params, lr=lr, variant=variant)

    def closure() -> Any:
        opt.zero_grad()
        loss = inst.loss()
        loss.backward()
        return loss

    for epoch in range(1, epochs + 1):
        loss = opt.step(closure)
        report(epoch, float(loss.detach()))
    return float(inst.model.weight.item()), float(inst.model.bias.item())


def _fit_numpy(variant: str, lr: float, epochs: int, seed: int,
               report: Callable[[int, float], None]) -> tuple[float, float]:
    import numpy as np

    from rprop.numpy import Rprop as NumpyRprop
    from rprop.problems import linear_fit_data

    data = linear_fit_data(seed)
    x, y = data.x[:, 0], data.y[:, 0]
    w, b = np.array([data.w0], np.float32), np.array([data.b0], np.float32)
    opt = NumpyRprop([w, b], lr=lr, variant=variant)
    for epoch in range(1, epochs + 1):
        r = w * x + b - y
        loss = float(np.mean(r * r))
        opt.step([2.0 * np.mean(r * x, keepdims=True), 2.0 * np.mean(r, keepdims=True)],
                 loss=loss)
        report(epoch, loss)
    return float(w[0]), float(b[0])


def _fit_jax(variant: str, lr: float, epochs: int, seed: int,
             report: Callable[[int, float], None]) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    import optax

    import rprop.optax
    from rprop.problems import linear_fit_data

    data = linear_fit_data(seed)
    x, y = jnp.asarray(data.x[:, 0]), jnp.asarray(data.y[:, 0])
    params = {"w": jnp.float32(data.w0), "b": jnp.float32(data.b0)}
    opt = rprop.optax.rprop(lr, variant=variant)
    state = opt.init(params)

    def mse(p: dict[str, Any]) -> Any:
        return jnp.mean((p["w"] * x + p["b"] - y) ** 2)

    @jax.jit
    def step(p: dict[str, Any], s: Any) -> Any:
        loss, grads = jax.value_and_grad(mse)(p)
        updates, s = opt.update(grads, s, p, value=loss)
        return optax.apply_updates(p, updates), s, loss

    for epoch in range(1, epochs + 1):
        params, state, loss = step(params, state)
        report(epoch, float(loss))
    return float(params["w"]), float(params["b"])


def _least_squares(seed: int) -> tuple[float, float]:
    import numpy as np

    from rprop.problems import linear_fit_data

    data = linear_fit_data(seed)
    a = np.hstack([data.x, np.ones_like(data.x)]).astype(np.float64)
    (w, b), *_ = np.linalg.lstsq(a, data.y[:, 0].astype(np.float64), rcond=None)
    return float(w), float(b)


_FITS = {"torch": _fit_torch, "numpy": _fit_numpy, "jax": _fit_jax}


def _check_backend(backend: str) -> None:
    missing = [m for m in _EXTRAS[backend] if importlib.util.find_spec(m) is None]
    if missing:
        extra = "jax" if backend == "jax" else "torch"
        raise MissingError(f"the {backend} backend needs {' and '.join(missing)}: "
                           f"pip install 'rprop[{extra}]'")


def cmd_demo(args: argparse.Namespace) -> int:
    with _checking_arguments():
        variant = get_variant(args.variant).name
        Hyper(lr=args.lr)  # a bad --lr is a one-line error before anything runs
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    _check_backend(args.backend)
    _demo_square(variant, 0.1, 20)
    _print("Fitting y = 2x + 3 + 0.1·noise (100 points, x ~ N(0, 1)) with one linear layer, "
           "MSE,")
    _print(f"full batch: Rprop ({variant}, lr={args.lr:g}), {args.epochs} epochs, "
           f"{args.backend} backend.")
    _print()

    def report(epoch: int, loss: float) -> None:
        if epoch % 50 == 0:
            _print(f"epoch {epoch:4d}  loss {loss:.6f}")

    w, b = _FITS[args.backend](variant, args.lr, args.epochs, args.seed, report)
    w_ls, b_ls = _least_squares(args.seed)
    _print(f"(least squares on this noisy sample: w = {w_ls:.4f}, b = {b_ls:.4f})")
    _print(f"w = {w:.2f}, b = {b:.2f}")
    return 0


# -- compare --------------------------------------------------------------------


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


MAX_SEEDS = 100_000  # a run of seconds per seed; the list is built up front


def _seeds(text: str) -> list[int]:
    """``5`` means seeds 0..4; ``0,3,7`` means those seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            count = int(text)
            if count < 1:
                raise argparse.ArgumentTypeError(
                    f"a count of seeds must be >= 1, got {text!r} (for the one seed 0, write '0,')"
                )
            if count > MAX_SEEDS:
                raise argparse.ArgumentTypeError(
                    f"a count of seeds must be <= {MAX_SEEDS}, got {text!r}")
            seeds = list(range(count))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a count (5) or a comma-separated list (0,3,7), got {text!r}"
        ) from None
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {text!r}")
    return seeds


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _plot_format(path: str) -> str:
    """Check ``--plot PATH`` before anything runs; return the file format, from the
    extension (savefig would otherwise append '.png' to a name without one)."""
    if not path:
        raise UsageError("--plot needs a file name such as curves.png")
    if path.endswith(tuple(filter(None, (os.sep, os.altsep)))) or os.path.isdir(path):
        raise UsageError(f"--plot {path}: a folder; give a file name such as curves.png")
    ext = os.path.splitext(path)[1][1:].lower()
    if not ext:
        raise UsageError(f"--plot {path}: no extension; give a file name such as curves.png")
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingError("--plot needs matplotlib: pip install 'rprop[plot]'")
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if ext not in formats:
        raise UsageError(f"--plot {path}: matplotlib cannot write .{ext} files; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    if ext == "pgf":
        import matplotlib

        tex = matplotlib.rcParams["pgf.texsystem"]
        if shutil.which(tex) is None:
            raise MissingError(f"--plot {path}: matplotlib writes .pgf files with {tex}, "
                               "which is not installed")
    folder = os.path.dirname(path) or os.curdir
    if not os.path.isdir(folder):
        raise MissingError(f"cannot write {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK) or (
            os.path.exists(path) and not os.access(path, os.W_OK)):
        raise MissingError(f"cannot write {path}: permission denied")
    return ext


def cmd_compare(args: argparse.Namespace) -> int:
    from rprop import _compare

    with _checking_arguments():
        probs, meths, seeds, budget = _compare.plan(args.problems, args.methods, args.seeds,
                                                    args.quick)
    plot_format = None if args.plot is None else _plot_format(args.plot)
    _check_backend("torch")
    proto = _compare.protocol(probs, meths, seeds, budget)
    progress = not args.no_progress and sys.stderr.isatty()
    runs = _compare.compare(probs, meths, seeds, budget, progress=progress)
    if plot_format is not None:
        try:
            _compare.plot(runs, args.plot, format=plot_format)
        except OSError as err:
            raise MissingError(f"cannot write {args.plot}: {err.strerror or err}") from None
        except RuntimeError as err:  # a TeX system or a Pillow plug-in matplotlib lacks
            raise MissingError(f"cannot write {args.plot}: {str(err).splitlines()[0]}"
                               ) from None
    if args.json:
        _print(json.dumps(_finite_or_none(_compare.to_json(proto, runs)), indent=2))
        return 0
    _print(_compare.protocol_text(proto))
    _print()
    _print(_compare.format_table(_compare.summarize(runs), markdown=args.markdown))
    _print()
    _print("success: runs that reached the goal; median evals: gradient evaluations to the goal,")
    _print("over the successful runs; final loss: median over seeds of the last loss evaluated.")
    if plot_format is not None:
        _print(f"Loss curves written to {args.plot}")
    return 0


# -- bench ----------------------------------------------------------------------


MAX_TENSORS = 2**20
MAX_PARAMS = 2**31  # tensors x elements, per size: 8 GiB per float32 array
_SCALES = {"k": 10**3, "m": 10**6, "g": 10**9}


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
    import torch

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


def cmd_bench(args: argparse.Namespace) -> int:
    from rprop import _bench

    with _checking_arguments():
        variant = get_variant(args.variant).name
    if args.repeats is not None and args.repeats < 1:
        raise UsageError(f"--repeats must be >= 1, got {args.repeats}")
    _device_index(args.device)  # a bad name is a usage error, torch or not
    _check_backend("torch")
    _check_device(args.device)
    progress = not args.no_progress and sys.stderr.isatty()

    def say(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    rows = _bench.run(args.sizes, quick=args.quick, device=args.device, repeats=args.repeats,
                      variant=variant, memory=not args.no_memory,
                      progress=say if progress else None)
    if args.json:
        _print(json.dumps(_finite_or_none(rows), indent=2))
    else:
        _print(_bench.format_table(rows))
    return 0


# -- the parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rprop",
        description="Resilient backpropagation: see it work (demo), compare the variants "
                    "with Adam and L-BFGS (compare), time a step (bench).",
    )
    parser.add_argument("--version", action="version", version=f"rprop {rprop.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)

    demo = sub.add_parser(
        "demo", help="f(x) = x² step by step, then a linear fit (a few seconds)",
        description="Minimise f(x) = x² from x = 5 step by step, showing the step size "
                    "adapt, then fit y = 2x + 3 + 0.1·noise with one linear layer and "
                    "full-batch Rprop, printing the loss every 50 epochs and the learned "
                    "w and b.",
    )
    demo.add_argument("--variant", default="irprop-",
                      help=f"Rprop variant: {', '.join(VARIANTS)} (default: irprop-, "
                           "torch.optim.Rprop's)")
    demo.add_argument("--backend", choices=BACKENDS, default="torch",
                      help="front used for the linear fit: torch (rprop.Rprop), numpy "
                           "(rprop.numpy.Rprop) or jax (rprop.optax.rprop); default: torch")
    demo.add_argument("--lr", type=float, default=0.01,
                      help="initial step size of the linear fit (default: 0.01)")
    demo.add_argument("--epochs", type=int, default=200, help="epochs of the linear fit "
                      "(default: 200)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data (default: 0)")
    demo.set_defaults(func=cmd_demo)

    comp = sub.add_parser(
        "compare", help="the four variants, torch.optim.Rprop, Adam and L-BFGS on "
                        "problems from the literature",
        description="Run the four Rprop variants, torch.optim.Rprop, Adam and L-BFGS on "
                    "the built-in problems from several seeds, and print success rate, "
                    "median gradient evaluations to the goal, final loss and time per "
                    "method and problem. The protocol is printed with the results.",
    )
    comp.add_argument("--problems", type=_names, metavar="NAMES",
                      help="comma-separated problems (default: all available): "
                           + ", ".join(_problem_names()))
    comp.add_argument("--methods", type=_names, metavar="NAMES",
                      help="comma-separated methods (default: all): " + ", ".join(_methods()))
    comp.add_argument("--seeds", type=_seeds, metavar="N|LIST",
                      help="a count (seeds 0..N-1) or a comma-separated list "
                           "(default: 10; 2 with --quick)")
    comp.add_argument("--quick", action="store_true",
                      help="a few seconds: three small problems, 2 seeds, budget 150")
    comp.add_argument("--plot", metavar="FILE",
                      help="write loss curves to this file, its type from its extension: "
                           "curves.png, curves.svg, curves.pdf... (needs matplotlib)")
    comp.add_argument("--json", action="store_true",
                      help="print the protocol, summary and every run as JSON")
    comp.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    comp.add_argument("--no-progress", action="store_true",
                      help="no progress bar (it is off anyway when stderr is not a terminal)")
    comp.set_defaults(func=cmd_compare)

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
                       help=f"variant timed for rprop.Rprop: {', '.join(VARIANTS)} "
                            "(default: irprop-; torch.optim.Rprop is always iRprop-)")
    bench.add_argument("--sizes", type=_sizes, metavar="TxN[,...]",
                       help="parameter sets to time, TENSORSxELEMENTS (k, M: thousands, "
                            "millions), e.g. 100x100k,1000x1000 (default: 1x10M, 100x100k, "
                            "1000x1k, 10x10M)")
    bench.add_argument("--repeats", type=int, help="timed steps per measurement "
                       "(default: 15; 5 with --quick)")
    bench.add_argument("--no-memory", action="store_true",
                       help="skip measuring the peak extra memory of a step")
    bench.add_argument("--json", action="store_true", help="print the rows as JSON")
    bench.add_argument("--no-progress", action="store_true",
                       help="no progress lines (off anyway when stderr is not a terminal)")
    bench.set_defaults(func=cmd_bench)
    return parser


def _problem_names() -> list[str]:
    from rprop.problems import PROBLEMS

    return list(PROBLEMS)


def _methods() -> list[str]:
    from rprop._compare import METHODS

    return list(METHODS)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also for --help and bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    prog = f"rprop {args.command}"
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except MissingError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
