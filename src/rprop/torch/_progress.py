"""fit's progress bar, in epochs, for both of its loops."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

# The adaptive mode counts epoch-equivalents (examples / N): two decimals.
_FRACTIONAL = "{l_bar}{bar}| {n:.2f}/{total} [{elapsed}<{remaining}{postfix}]"


def progress_bar(show: bool, total: float, initial: float, *, fractional: bool = False,
                 ) -> Any:
    """A tqdm bar from ``initial`` to ``total`` epochs, or None unless ``show``
    (rank 0 with ``progress=True``)."""
    if not show:
        return None
    extra = {"bar_format": _FRACTIONAL} if fractional else {}
    return tqdm(total=total, initial=initial, desc="fit", unit="epoch", dynamic_ncols=True,
                **extra)
