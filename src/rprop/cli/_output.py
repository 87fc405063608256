"""What the subcommands print, and how."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def say(*args: Any) -> None:
    """``print`` to stdout, flushed; '?' for characters its encoding lacks."""
    text = " ".join(map(str, args))
    try:
        print(text, flush=True)
    except UnicodeEncodeError:  # a terminal or file without ², ×, π: print '?' for those
        encoding = getattr(sys.stdout, "encoding", None) or "ascii"
        print(text.encode(encoding, "replace").decode(encoding), flush=True)


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def say_json(obj: Any) -> None:
    """``obj`` as indented JSON, inf and NaN as null (JSON has neither)."""
    say(json.dumps(_finite_or_none(obj), indent=2))


def add_output_options(parser: argparse.ArgumentParser, json_help: str,
                       progress_help: str) -> None:
    """``--json`` (print ``say_json``'s output instead of the tables) and
    ``--no-progress`` (read by :func:`wants_progress`)."""
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--no-progress", action="store_true", help=progress_help)


def wants_progress(args: argparse.Namespace) -> bool:
    """Progress on stderr, unless --no-progress or stderr is not a terminal."""
    return not args.no_progress and sys.stderr.isatty()
