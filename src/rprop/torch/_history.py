"""What every training loop of ``fit`` records, one entry per step of the
loop: the loss, the time, the step-size summary, and why it stopped.

:class:`rprop.torch.FitHistory` (an entry per full-batch epoch) and
``AdaptiveHistory`` (an entry per adaptive mini-batch step) extend
:class:`History` with what their loop adds; the part of a checkpoint's
``history`` these fields make is written and read here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["History", "Stats", "stats_from_state", "stats_to_state"]

# (min, median, max) of the step sizes: see rprop.torch._step_stats.
Stats = tuple[float, float, float]


def stats_from_state(s: Any) -> Stats | None:
    """A saved (min, median, max) as floats; None stays None."""
    return None if s is None else (float(s[0]), float(s[1]), float(s[2]))


def stats_to_state(s: Stats | None) -> list[float] | None:
    return None if s is None else list(s)


@dataclass
class History:
    """``loss[i]``, ``time[i]`` (seconds of training at the end of entry
    ``i``, summed over resumed runs) and ``step_size[i]`` ((min, median, max)
    after it, None while there are no step sizes) per entry; ``stop_reason``;
    ``resumed_from``, the entry a checkpoint resumed the run at, else None."""

    loss: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    step_size: list[Stats | None] = field(default_factory=list)
    stop_reason: str = ""
    resumed_from: int | None = None

    @property
    def best_loss(self) -> float:
        return min(self.loss) if self.loss else math.nan

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``history`` (``resumed_from`` is not saved: the
        resumed run sets it)."""
        return {
            "loss": list(self.loss), "time": list(self.time),
            "step_size": [stats_to_state(s) for s in self.step_size],
            "stop_reason": self.stop_reason,
        }

    @staticmethod
    def _fields_from_state(state: dict[str, Any], entries: int) -> dict[str, Any]:
        """The keyword arguments that rebuild the first ``entries`` entries of
        the fields above from a saved ``history`` (``stop_reason`` starts
        empty: the resumed run sets it)."""
        return {
            "loss": [float(x) for x in state["loss"][:entries]],
            "time": [float(x) for x in state["time"][:entries]],
            "step_size": [stats_from_state(s) for s in state["step_size"][:entries]],
        }
