"""``rprop compare``: the variants, torch.optim.Rprop, Adam and L-BFGS on the built-in
problems. The runs and the tables are ``rprop._compare``'s; this module checks the
options, prints, and writes the plot."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
from typing import Any

from rprop import _compare, problems
from rprop.cli._checks import MissingError, UsageError, checking_arguments, require_backend
from rprop.cli._output import add_output_options, say, say_json, wants_progress

MAX_SEEDS = 100_000  # a run of seconds per seed; the list is built up front


def add_parser(sub: Any) -> None:
    comp = sub.add_parser(
        "compare", help="the Rprop variants, torch.optim.Rprop, Adam and L-BFGS on "
                        "problems from the literature",
        description="Run the Rprop variants (the classic four and GRprop), torch.optim.Rprop, "
                    "Adam and L-BFGS on the built-in problems from several seeds, and print "
                    "success rate, median gradient evaluations to the goal, final loss and "
                    "time per method and problem. The protocol is printed with the results.",
    )
    comp.add_argument("--problems", type=_names, metavar="NAMES",
                      help="comma-separated problems (default: all available): "
                           + ", ".join(problems.PROBLEMS))
    comp.add_argument("--methods", type=_names, metavar="NAMES",
                      help="comma-separated methods (default: all): "
                           + ", ".join(_compare.METHODS))
    comp.add_argument("--seeds", type=_seeds, metavar="N|LIST",
                      help="a count (seeds 0..N-1) or a comma-separated list "
                           "(default: 10; 2 with --quick)")
    comp.add_argument("--quick", action="store_true",
                      help="a few seconds: three small problems, 2 seeds, budget 150")
    comp.add_argument("--plot", metavar="FILE",
                      help="write loss curves to this file, its type from its extension: "
                           "curves.png, curves.svg, curves.pdf... (needs matplotlib)")
    comp.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    comp.add_argument("--minibatch", action="store_true",
                      help="instead: fit(batching='adaptive') against mini-batch Adam, SGD and "
                           "Rprop and full-batch iRprop+ and L-BFGS at equal examples "
                           "(docs/benchmarks.md); --problems then names datasets ("
                           "default digits), --methods its methods, --seeds the seeds "
                           "(default 3); --quick: 1 seed, 1 and 3 epochs. Needs scikit-learn")
    add_output_options(comp, json_help="print the protocol, summary and every run as JSON",
                       progress_help="no progress bar (it is off anyway when stderr is not "
                                     "a terminal)")
    comp.set_defaults(func=run)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return names


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
    # matplotlib is optional: imported only once --plot asks for it
    import matplotlib
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if ext not in formats:
        raise UsageError(f"--plot {path}: matplotlib cannot write .{ext} files; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    if ext == "pgf":
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


def run(args: argparse.Namespace) -> int:
    if args.minibatch:
        return _run_minibatch(args)
    with checking_arguments():
        probs, meths, seeds, budget = _compare.plan(args.problems, args.methods, args.seeds,
                                                    args.quick)
    plot_format = None if args.plot is None else _plot_format(args.plot)
    require_backend("torch")
    proto = _compare.protocol(probs, meths, seeds, budget)
    runs = _compare.compare(probs, meths, seeds, budget, progress=wants_progress(args))
    if plot_format is not None:
        try:
            _compare.figure(runs).savefig(args.plot, dpi=72, format=plot_format)
        except OSError as err:
            raise MissingError(f"cannot write {args.plot}: {err.strerror or err}") from None
        except RuntimeError as err:  # a TeX system or a Pillow plug-in matplotlib lacks
            raise MissingError(f"cannot write {args.plot}: {str(err).splitlines()[0]}"
                               ) from None
    if args.json:
        say_json(_compare.to_json(proto, runs))
        return 0
    say(_compare.protocol_text(proto))
    say()
    say(_compare.format_table(_compare.summarize(runs), markdown=args.markdown))
    say()
    say("success: runs that reached the goal; median evals: gradient evaluations to the goal,")
    say("over the successful runs; final loss: median over seeds of the last loss evaluated.")
    if plot_format is not None:
        say(f"Loss curves written to {args.plot}")
    return 0


def _run_minibatch(args: argparse.Namespace) -> int:
    """``--minibatch``: the adaptive-batching benchmark, reduced (full protocol:
    benchmarks/minibatch.py)."""
    if args.plot is not None:
        raise UsageError("--plot does not apply to --minibatch (it prints tables)")
    require_backend("torch")
    if importlib.util.find_spec("sklearn") is None:
        raise MissingError("--minibatch needs scikit-learn: pip install 'rprop[datasets]'")
    # torch is optional: imported only once --minibatch asks for it
    from rprop import _compare_minibatch as mb

    datasets = args.problems or ["digits"]
    unknown = [d for d in datasets if d not in mb.DATASETS]
    if unknown:
        raise UsageError(f"unknown dataset {unknown[0]!r} for --minibatch; choose from "
                         f"{', '.join(mb.DATASETS)}")
    seeds = args.seeds or list(range(1 if args.quick else 3))
    budgets = (1, 3) if args.quick else (1, 3, 10)
    with checking_arguments():
        results, chosen = mb.run(datasets, args.methods or list(mb.METHODS), seeds, [100],
                                 budgets, synthetic_n=20_000)
    if args.json:
        say_json({"results": [r.__dict__ for r in results],
                  "lr": {d: c["lr"] for d, c in chosen.items()}})
        return 0
    say(f"Adaptive batching vs mini-batch baselines at equal examples; seeds {seeds}, "
        f"learning rates tuned per budget on seed 100, synthetic sets at 20k samples "
        f"(docs/benchmarks.md has the protocol; benchmarks/minibatch.py the full run).")
    say(mb.format_tables(results))
    return 0
