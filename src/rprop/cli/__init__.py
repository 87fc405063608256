"""The ``rprop`` command: ``demo``, ``compare`` and ``bench``, one module each.

All of the command's output is produced in this package; the work is done by
:mod:`rprop.demos`, :mod:`rprop.problems`, ``rprop._compare`` and ``rprop._bench``,
which print nothing. Exit codes: 0 on success, 2 on a bad argument (one line on
stderr, no traceback), 1 when an optional package a command needs is missing or a
file cannot be written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import rprop
from rprop.cli import bench, compare, demo
from rprop.cli._checks import MissingError, UsageError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rprop",
        description="Resilient backpropagation: see it work (demo), compare the variants "
                    "with Adam and L-BFGS (compare), time a step (bench).",
    )
    parser.add_argument("--version", action="version", version=f"rprop {rprop.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    for command in (demo, compare, bench):
        command.add_parser(sub)
    return parser


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
