"""Checks shared by the subcommands, and the two errors they raise.

A :class:`UsageError` (a bad argument value found after parsing) exits 2, a
:class:`MissingError` (an optional package or a resource the command needs is
missing) exits 1; :func:`rprop.cli.main` prints either as one line on stderr.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import rprop


class UsageError(Exception):
    """A bad argument value found after parsing: exit 2."""


class MissingError(Exception):
    """An optional package or a resource the command needs is missing: exit 1."""


@contextlib.contextmanager
def checking_arguments() -> Iterator[None]:
    """The library's ValueError/TypeError on a bad option value becomes a UsageError
    (exit 2, one line); a missing optional package found here, a MissingError."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    except ImportError as err:
        raise MissingError(str(err)) from None


def variant_name(text: str) -> str:
    """The canonical name of the variant ``--variant`` names (case aside)."""
    with checking_arguments():
        return rprop.get_variant(text).name


def at_least(option: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UsageError(f"{option} must be >= {minimum}, got {value}")


BACKENDS = ("torch", "numpy", "jax")
_NEEDS = {"torch": ("torch",), "numpy": (), "jax": ("jax", "optax")}


def require_backend(backend: str) -> None:
    """A MissingError naming the extra to install unless ``backend``'s packages are here."""
    missing = [m for m in _NEEDS[backend] if importlib.util.find_spec(m) is None]
    if missing:
        extra = "jax" if backend == "jax" else "torch"
        raise MissingError(f"the {backend} backend needs {' and '.join(missing)}: "
                           f"pip install 'rprop[{extra}]'")
