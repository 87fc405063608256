"""Pictures of an Rprop run: the loss curve, and Rprop's own diagnostic, the
step sizes over time (median and min..max range, per parameter group), which
shows at a glance whether the steps are growing, settled, or collapsed to
``step_min``.

:meth:`rprop.torch.FitHistory.plot` and the result of
:func:`rprop.torch.minimize` (``result.plot()``) call :func:`plot_training`;
a scikit-learn estimator's ``loss_curve_`` (or any list of losses) draws with
:func:`plot_loss`::

    from rprop.plotting import plot_loss
    plot_loss(clf.loss_curve_).figure.savefig("loss.png")

matplotlib is an optional dependency (``pip install rprop[plot]``), imported
only when a picture is drawn: ``import rprop`` and ``import rprop.plotting``
do not import it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["plot_loss", "plot_step_sizes", "plot_training"]

Stats = Sequence[float] | None  # (min, median, max) of the step sizes, or None


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install 'rprop[plot]'") from None
    return plt


def _losses(values: Any, name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}"
                        ) from None
    return out


def plot_loss(loss: Sequence[float], *, ax: Any = None, label: str = "loss",
              xlabel: str = "epoch", val_loss: Sequence[float] | None = None,
              best: int | None = None, logy: bool | None = None) -> Any:
    """Draw the loss curve (``loss[i]`` at ``x = i``) on ``ax`` (a new figure
    when None); return the Axes.

    ``val_loss`` adds the validation curve, ``best`` a vertical line at the
    epoch whose parameters were kept. ``logy`` defaults to a log scale when
    every finite loss is > 0 and they span more than a factor of 10.
    """
    values = _losses(loss, "loss")
    vals = None if val_loss is None else _losses(val_loss, "val_loss")
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6.4, 3.2))
    ax.plot(range(len(values)), values, label=label)
    if vals is not None:
        ax.plot(range(len(vals)), vals, label="validation " + label)
    if best is not None:
        ax.axvline(best, color="0.5", linestyle=":", label=f"kept (epoch {best})")
    finite = [v for v in values + (vals or []) if math.isfinite(v)]
    if logy is None:
        logy = bool(finite) and min(finite) > 0 and max(finite) > 10 * min(finite)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    if vals is not None or best is not None:
        ax.legend(loc="best")
    return ax


def plot_step_sizes(step_size: Sequence[Stats], *, ax: Any = None,
                    groups: Sequence[Sequence[Stats]] | None = None,
                    step_min: Sequence[float] | float | None = None,
                    xlabel: str = "epoch") -> Any:
    """Draw the step sizes over time on ``ax`` (a new figure when None): for
    each parameter group (``groups[i][g]`` is group ``g``'s (min, median, max)
    after step ``i``), or for all of them at once (``step_size[i]``) when
    ``groups`` is None or has one group, the median as a line and the
    min..max range as a band; ``step_min`` (one per group, or one for all) as
    dashed lines. Log scale. Entries that are None (no step yet) are skipped.
    Return the Axes.
    """
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6.4, 3.2))
    n_groups = max((len(g) for g in groups or () if g is not None), default=0)
    if n_groups > 1:
        series = [(f"group {k}", [None if g is None or k >= len(g) else g[k]
                                  for g in groups or ()]) for k in range(n_groups)]
    else:
        series = [("step size", list(step_size))]
    for label, stats in series:
        xs = [i for i, s in enumerate(stats) if s is not None]
        picked = [stats[i] for i in xs]
        lows = [float(s[0]) for s in picked if s is not None]
        medians = [float(s[1]) for s in picked if s is not None]
        highs = [float(s[2]) for s in picked if s is not None]
        line, = ax.plot(xs, medians, label=f"{label} (median)")
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2,
                        label=f"{label} (min..max)")
    floors = [] if step_min is None else (
        [float(step_min)] if isinstance(step_min, (int, float)) else
        [float(v) for v in step_min])
    for value in sorted(set(floors)):
        ax.axhline(value, color="0.3", linestyle="--", linewidth=1,
                   label=f"step_min = {value:g}")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("step size")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_training(loss: Sequence[float], step_size: Sequence[Stats] | None = None, *,
                  groups: Sequence[Sequence[Stats]] | None = None,
                  step_min: Sequence[float] | float | None = None,
                  val_loss: Sequence[float] | None = None, best: int | None = None,
                  xlabel: str = "epoch", title: str | None = None,
                  path: str | os.PathLike[str] | None = None) -> Any:
    """One figure: the loss curve (:func:`plot_loss`) above the step sizes
    (:func:`plot_step_sizes`, when any were recorded), sharing the x axis.
    Saved to ``path`` when given. Return the Figure."""
    has_steps = step_size is not None and any(s is not None for s in step_size)
    plt = _pyplot()
    fig, axes = plt.subplots(2 if has_steps else 1, 1, sharex=True, squeeze=False,
                             figsize=(6.4, 6.0 if has_steps else 3.2))
    plot_loss(loss, ax=axes[0][0], xlabel="" if has_steps else xlabel, val_loss=val_loss,
              best=best)
    if has_steps and step_size is not None:
        plot_step_sizes(step_size, ax=axes[1][0], groups=groups, step_min=step_min,
                        xlabel=xlabel)
    if title:
        axes[0][0].set_title(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
