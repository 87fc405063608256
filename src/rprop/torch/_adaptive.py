"""``fit(..., batching="adaptive")``: Rprop on growing mini-batches whose
coordinates move only where the batch is large enough to trust their sign.

Why: Rprop's step sizes grow where consecutive gradient signs agree and
shrink where they flip. With ``eta_minus = 0.5`` and ``eta_plus = 1.2`` the
logarithm of a step size drifts by ``q ln eta_plus + (1 - q) ln eta_minus``
per step, where ``q`` is the probability that two consecutive signs agree;
the drift is zero at

    q* = ln(1/eta_minus) / (ln eta_plus + ln(1/eta_minus))  (0.7917 for the defaults).

If a coordinate's sign is right with probability ``p`` at each step,
independently, consecutive signs agree with probability ``p^2 + (1-p)^2``,
which reaches ``q*`` at

    p* = (1 + sqrt(2 q* - 1)) / 2  (0.8819),

and a Gaussian estimate of the gradient with mean ``mu`` and standard error
``se`` has the right sign with probability ``Phi(|mu| / se)``: signs carry
enough information for the step size to grow only where ``|mu| / se >
z = Phi^-1(p*)`` (1.1847). On a fixed mini-batch ``se`` is fixed while
``mu -> 0`` near an optimum, so every coordinate eventually falls below
``z`` and the step sizes collapse to ``step_min``.

The mode (see :func:`fit_adaptive`): each step draws ``B`` samples without
replacement (a dedicated ``torch.Generator``; a new permutation once the
data is used up), splits them into ``k`` equal micro-batches, and keeps the
sum and the sum of squares of the micro-batch mean gradients. A coordinate
is *reliable* when ``|g_mean| / se(g_mean) > z`` (``se`` estimated from the
``k`` micro-batch means). Only reliable coordinates take part in the sign
test, the step-size adaptation and the full move; every other coordinate
keeps its step size and stored gradient (and stored update).

A coordinate that does not pass still moves part of a step
(``unreliable="partial"``, the default): by its step size times ``e^2``,
against the sign of its estimate, with its step size, stored gradient and
stored update kept (so the sign test and the step-size rule still see only
reliable signs). Here ``e = 2 Phi(|mu| / se) - 1``, the fraction of a
step's decrease its sign realises, is estimated from its test's ``t`` with
``(mu / se)^2`` estimated by ``max(t^2 - 1, 0)``: ``E t^2 = 1 + (mu / se)^2``,
so that is the positive-part unbiased estimate, where ``|t|`` itself is
about 0.9 for a coordinate whose mean is zero (``e`` about 0.5: from ``t``
itself, such a coordinate would random-walk by about a third of its step
size each step). If the step size ``s`` is about the distance to the
coordinate's minimum (the scale at which Rprop's signs start to flip), the
step that minimises the expected loss along it is ``s e`` (a decrease
``e s |mu|`` against a cost ``h s^2 / 2``, ``s = |mu| / h``); the square is
a choice, measured against ``e`` (docs/benchmarks.md). ``unreliable="hold"`` keeps their value too.

The evidence is carried: a coordinate that does not pass keeps the sum,
the sum of squares and the count of its micro-batch means into the next
step, so its test uses every micro-batch since it last moved, and a
coordinate whose sign needs ``m`` samples to resolve moves after about
``m / B`` steps instead of never. Its step gradient is that accumulated
mean; once it moves its evidence starts again.

The batch grows on the signs' *efficiency* (``grow="efficiency"``, the
default). A step moves coordinate ``i`` by its step size ``s_i`` against
the sign of its estimate; with true gradient ``mu_i`` it lowers the loss by
``s_i |mu_i|`` when the sign is right and raises it by as much when it is
wrong, so it realises the fraction ``2 Phi(|mu_i| / se_i) - 1`` of the
decrease exact signs would give. Weighted by each coordinate's share of
that decrease (``s_i |g_i|``, this batch's estimates), the average of that
fraction over this batch's statistics is the efficiency of its signs; the
same zero-drift condition as above asks for ``2 p* - 1`` (0.7638): below
it the coordinates that carry the decrease have signs too noisy for their
step sizes to grow. ``B`` doubles when the efficiency, averaged over the
last ``window`` steps (an exponential average of weight ``1 / window``), is
below ``2 p* - 1`` and ``B`` has not changed for ``window`` steps (or for
one pass of the data, ``ceil(N / B)`` steps, if that is fewer); once a
doubling would pass ``N / 2`` it is ``N``: exact full-batch Rprop
(:func:`full_batch_backward` and ``step``, nothing masked) until the end.
A near-optimal point has ``mu -> 0`` for every coordinate, so the rule
keeps doubling as training converges: geometric growth, the schedule whose
noise falls as fast as the gradient. The carried evidence stays across a
doubling (its micro-batch means then mix two sizes: their mean stays
unbiased, their spread is that of the mix).

The other rules: ``grow="evidence"`` (evidence carried, ``B`` at ``B0``
until half the informative coordinates hold, or moved on, evidence from
half the data, then ``B = N``); ``"fraction"`` (each batch tested alone,
``B`` doubling while fewer than ``rho`` of the coordinates that received
any gradient are reliable) and ``"gain"`` (each batch alone,
experimental).
"""

from __future__ import annotations

import math
import numbers
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, default_collate

from rprop._hyper import DEFAULT_ETAS
from rprop._variants import LOSS_STATE, get_variant
from rprop.torch._fit_checkpoint import (
    ADAPTIVE_KEY,
    checkpoint_path,
    exists_everywhere,
    is_zero,
    load_checkpoint,
    read_verified,
    save_checkpoint,
)
from rprop.torch._full_batch import LossFn, _sum_and_count, full_batch_backward
from rprop.torch._history import History, Stats
from rprop.torch._optimizer import Rprop
from rprop.torch._preemption import DeferredInterrupt
from rprop.torch._progress import progress_bar
from rprop.torch._step_stats import step_size_summary

__all__ = ["BATCHING_MODES", "DEFAULTS", "AdaptiveHistory", "StepInfo", "check_batching",
           "fit_adaptive", "reliability_threshold", "reliable_mask"]

BATCHING_MODES = ("full", "adaptive")

# The options of the adaptive mode (fit's batching_kwargs), with their defaults.
#   batch_size: B0, the first batch. 64 = 8 micro-batches of 8 samples: the
#     standard error comes from 8 means, and a micro-batch of 8 is already
#     close enough to Gaussian for the sign probability Phi(|mu|/se).
#   micro_batches: k. Each step costs k forward/backward calls (the same
#     samples, so no extra examples, only per-call overhead); the t statistic
#     from k means has k-1 degrees of freedom.
#   rho (grow="fraction" only): grow B when fewer than this fraction of
#     coordinates are reliable.
#     Under pure noise (mu = 0) a coordinate passes |t_{k-1}| > z with
#     probability 2 P(T_7 > 1.18) = 0.27 for k = 8: rho must sit well above
#     that (else a batch that is all noise never grows); 0.5 is "most
#     coordinates are noise".
#   z: the threshold; None derives it from each group's etas (above).
#   seed: the sampler's generator seed.
#   eval_batch_size: the size of the batches of a full-data pass (B = N).
#   window: grow="efficiency" only: the steps its efficiency is averaged over,
#     and the fewest steps between two doublings (or one pass of the data,
#     ceil(N / B) steps, if that is fewer). 10 steps lets a step size change
#     by 1.2^10 = 6x after a doubling before the next test counts; a choice,
#     not a derivation (its sensitivity: docs/benchmarks.md).
#   unreliable: what a coordinate that does not pass does: "partial" moves it
#     by its step size times e^2, e = 2 Phi(sqrt(max(t^2 - 1, 0))) - 1 (module
#     docstring), its step size and stored sign kept; "hold" keeps its value too.
#   grow: "efficiency" (evidence carried, B doubled on the signs' efficiency:
#     the module docstring; rho unused), "evidence" (evidence carried, one
#     jump to B = N; rho and window unused), "fraction" (double B while fewer
#     than rho of the coordinates pass) or "gain" (experimental): double
#     when the coordinates that would pass at 2B (|t| > z / sqrt 2) carry at
#     least twice the predicted decrease sum(|g| step) of those that pass now,
#     i.e. when doubling would not lower the decrease per example; rho unused.
DEFAULTS: dict[str, Any] = {
    "batch_size": 64, "micro_batches": 8, "rho": 0.5, "z": None, "seed": 0,
    "eval_batch_size": 1024, "grow": "efficiency", "window": 10, "unreliable": "partial",
}
GROW_RULES = ("efficiency", "evidence", "fraction", "gain")
UNRELIABLE = ("partial", "hold")
CARRIED = ("efficiency", "evidence")  # the rules that carry evidence across steps


def reliability_threshold(etas: tuple[float, float] = DEFAULT_ETAS) -> float:
    """``z = Phi^-1(p*)``: the ``|mean| / se`` above which a Gaussian sign is
    right often enough for Rprop's step size to grow (module docstring).
    ``etas = (eta_minus, eta_plus)``."""
    eta_minus, eta_plus = float(etas[0]), float(etas[1])
    shrink, grow = -math.log(eta_minus), math.log(eta_plus)
    q_star = shrink / (grow + shrink)
    p_star = (1.0 + math.sqrt(2.0 * q_star - 1.0)) / 2.0 if q_star > 0.5 else 0.5
    return statistics.NormalDist().inv_cdf(p_star) if p_star > 0.5 else 0.0


def _mean_and_variance(total: Tensor, squares: Tensor, k: int | Tensor,
                       shift: Tensor | None) -> tuple[Tensor, Tensor]:
    """The mean of ``k`` micro-batch means plus ``shift`` (the decay term),
    and the sample variance of the means (clamped at 0 against rounding),
    from their sum and sum of squares."""
    mean = total / k
    var = ((squares - k * (mean * mean)) / (k - 1)).clamp_(min=0)
    return (mean if shift is None else mean + shift), var


def reliable_mask(total: Tensor, squares: Tensor, k: int | Tensor, z: float,
                  shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(reliable, informative) from the sum and the sum of squares of ``k``
    micro-batch means of one array (``k`` a number, or per coordinate a
    tensor of counts >= 2 for carried evidence).

    ``mean = total / k``; the sample variance of the means is ``(squares -
    k mean^2) / (k - 1)`` (clamped at 0 against rounding), ``se^2 = var / k``;
    reliable is ``(mean + shift)^2 > z^2 se^2`` (no square root: a zero
    spread with a non-zero mean is reliable, a zero mean never is), and
    ``shift`` is what the optimizer adds to the gradient before its sign test
    (weight decay). A non-finite mean counts as reliable, so that the
    optimizer's ``nonfinite`` policy sees it. Informative: the coordinate got
    a non-zero gradient on some micro-batch.
    """
    mean, var = _mean_and_variance(total, squares, k, shift)
    ok = (mean * mean) > (z * z) * (var / k)
    ok |= ~torch.isfinite(mean)
    return ok, squares != 0


def sign_efficiency(total: Tensor, squares: Tensor, k: int, size: Tensor | float,
                    shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum of ``w (2 Phi(|mean| / se) - 1)``, sum of ``w``) over one array,
    in float64, from the sum and the sum of squares of ``k`` micro-batch
    means (``mean`` and ``se`` as in :func:`reliable_mask`, ``shift`` added
    to the mean) and the step sizes ``size``: ``w = size |mean|`` is a
    coordinate's first-order decrease, ``2 Phi(t) - 1 = erf(t / sqrt 2)`` the
    fraction of it a sign-based step realises in expectation (module
    docstring). A zero spread counts as a certain sign; non-finite
    coordinates are left out."""
    mean, var = _mean_and_variance(total, squares, k, shift)
    mean, var = mean.to(torch.float64), var.to(torch.float64)
    weight = mean.abs() * (size.to(torch.float64) if isinstance(size, Tensor) else size)
    weight = torch.where(torch.isfinite(weight), weight, 0)
    right = torch.erf(mean.abs() / (2 * var / k).sqrt())  # |mean| / 0 = inf: erf 1
    right = torch.where((weight > 0) & ~right.isnan(), right, 0)
    return (weight * right).sum(), weight.sum()


def partial_move(total: Tensor, squares: Tensor, k: int | Tensor,
                 shift: Tensor | None = None) -> Tensor:
    """``sign(mean) e^2`` with ``e = 2 Phi(sqrt(max(t^2 - 1, 0))) - 1``,
    ``t = mean / se``, per coordinate, from the sum and the sum of squares of
    ``k`` micro-batch means (``mean`` and ``se`` as in
    :func:`reliable_mask`): the signed fraction of its step
    size that a coordinate which does not pass moves with
    ``unreliable="partial"`` (module docstring). 0 where it is not finite."""
    mean, var = _mean_and_variance(total, squares, k, shift)
    # max(t^2 - 1, 0): the positive-part estimate of (mu / se)^2. A zero
    # spread gives inf (a certain sign), 0 / 0 a nan that becomes 0 below.
    snr2 = ((mean * mean) / (var / k) - 1).clamp_(min=0)
    e = torch.erf((snr2 / 2).sqrt())  # 2 Phi(x) - 1 = erf(x / sqrt 2)
    move = mean.sign() * e * e
    return torch.where(torch.isfinite(move), move, 0)


@dataclass
class AdaptiveHistory(History):
    """What ``fit(..., batching="adaptive")`` did, one entry per step.

    ``loss[i]``: the mean loss of step ``i``'s batch at the parameters it
    started from (the full-data loss once ``batch_size[i] == dataset_size``);
    ``batch_size[i]``: the samples it drew; ``reliable[i]``: the fraction of
    coordinates that moved, among those with any gradient (1.0 at full
    batch); ``efficiency[i]``: the efficiency of its batch's signs (module
    docstring; 1.0 at full batch, nan when no coordinate had a gradient);
    ``examples[i]``: examples processed up to and including it;
    ``time[i]``: seconds of training at its end; ``step_size[i]``: (min,
    median, max) step size after it. ``epochs`` is the epoch-equivalents
    processed (examples / N).
    """

    dataset_size: int = 0
    batch_size: list[int] = field(default_factory=list)
    reliable: list[float] = field(default_factory=list)
    efficiency: list[float] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.loss)

    @property
    def epochs(self) -> float:
        return self.examples[-1] / self.dataset_size if self.examples else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "batch_size": list(self.batch_size), "reliable": list(self.reliable),
            "efficiency": list(self.efficiency),
            "examples": list(self.examples),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], steps: int, n: int) -> AdaptiveHistory:
        return cls(
            **History._fields_from_state(state, steps),
            dataset_size=n,
            batch_size=[int(x) for x in state["batch_size"][:steps]],
            reliable=[float(x) for x in state["reliable"][:steps]],
            efficiency=[float(x) for x in state["efficiency"][:steps]],
            examples=[int(x) for x in state["examples"][:steps]],
        )


@dataclass(frozen=True)
class StepInfo:
    """What a callback receives in adaptive mode, once per step, before it.

    ``loss``, ``batch_size``, ``reliable`` and ``efficiency`` are this step's
    (as :class:`AdaptiveHistory` records them once it is taken);
    ``examples``: the examples processed by the steps before it (a callback
    that stops the run stops before this step, whose batch is then not
    counted).
    """

    step: int
    loss: float
    batch_size: int
    reliable: float
    history: AdaptiveHistory
    model: nn.Module
    optimizer: Any
    efficiency: float = math.nan
    examples: int = 0


# -- data and sampling ---------------------------------------------------------------


class _Data:
    """Samples by index from a tuple of tensors (rows along dim 0) or a map-style Dataset."""

    def __init__(self, data: Any) -> None:
        if isinstance(data, (IterableDataset, str, bytes)) or (
                not isinstance(data, (tuple, list, Dataset))):
            raise TypeError(
                "data must be a tuple of tensors (samples along dim 0) or a map-style "
                f"torch.utils.data.Dataset (with __len__ and __getitem__) for "
                f"batching='adaptive', got {type(data).__name__}"
                + (": an iterable cannot be sampled by index" if hasattr(data, "__iter__")
                   else ""))
        self.tensors: tuple[Tensor, ...] | None = None
        if isinstance(data, (tuple, list)):
            if not data or not all(isinstance(t, Tensor) for t in data):
                raise TypeError("data must be a tuple of tensors (samples along dim 0) for "
                                "batching='adaptive'; got a "
                                f"{type(data).__name__} of "
                                f"{[type(t).__name__ for t in data][:4]}")
            sizes = {int(t.shape[0]) if t.ndim else -1 for t in data}
            if -1 in sizes or len(sizes) != 1:
                raise ValueError(f"data's tensors must have the same length along dim 0, got "
                                 f"shapes {[tuple(t.shape) for t in data]}")
            self.tensors = tuple(data)
            self.n = sizes.pop()
        else:
            try:
                self.n = len(data)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError("data must be a map-style Dataset with __len__ for "
                                "batching='adaptive'") from None
            self.dataset = data
        if self.n == 0:
            raise ValueError("data has 0 samples: batching='adaptive' has nothing to sample")

    def take(self, idx: Tensor) -> Any:
        if self.tensors is not None:
            return tuple(t[idx.to(t.device)] for t in self.tensors)
        return default_collate([self.dataset[i] for i in idx.tolist()])

    def passes(self, size: int) -> list[Any]:
        """The batches of one full pass, in order."""
        if self.tensors is not None:
            return [tuple(t[i:i + size] for t in self.tensors) for i in range(0, self.n, size)]
        return [default_collate([self.dataset[j] for j in range(i, min(i + size, self.n))])
                for i in range(0, self.n, size)]


class _Sampler:
    """Indices without replacement from a dedicated generator: a permutation
    of 0..N-1, used up in order, then the next permutation."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0

    def draw(self, b: int) -> Tensor:
        parts = []
        while b > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.generator)
                self.pos = 0
            take = min(b, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            b -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def mark(self) -> tuple[Tensor, Tensor, int]:
        """Where the next draw starts (the permutation is replaced, never
        written, so keeping a reference is enough)."""
        return self.generator.get_state(), self.perm, self.pos

    def rewind(self, mark: tuple[Tensor, Tensor, int]) -> None:
        """Undo the draws since ``mark``."""
        state, self.perm, self.pos = mark
        self.generator.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm.clone(),
                "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


# -- arguments -------------------------------------------------------------------------


def check_batching(batching: Any, batching_kwargs: Any) -> dict[str, Any] | None:
    """The adaptive options with defaults filled in, None for full batch; a
    clear error for anything else."""
    if not isinstance(batching, str) or batching not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {BATCHING_MODES}, got {batching!r}")
    if batching == "full":
        if batching_kwargs is not None:
            raise ValueError("batching_kwargs apply to batching='adaptive' only")
        return None
    if batching_kwargs is not None and not isinstance(batching_kwargs, Mapping):
        raise TypeError(f"batching_kwargs must be a dict or None, got "
                        f"{type(batching_kwargs).__name__}")
    unknown = sorted(map(str, set(batching_kwargs or {}) - set(DEFAULTS)))
    if unknown:
        raise TypeError(f"batching_kwargs has unknown keys {unknown}; batching='adaptive' "
                        f"takes {list(DEFAULTS)}")
    opts = {**DEFAULTS, **(batching_kwargs or {})}

    def integer(name: str, low: int) -> None:
        v = opts[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            raise ValueError(f"batching_kwargs[{name!r}] must be an int >= {low}, got {v!r}")
        opts[name] = int(v)

    integer("micro_batches", 2)
    integer("batch_size", opts["micro_batches"])
    integer("seed", 0)
    integer("eval_batch_size", 1)
    integer("window", 1)
    if opts["batch_size"] % opts["micro_batches"]:
        raise ValueError(f"batching_kwargs['batch_size'] ({opts['batch_size']}) must be a "
                         f"multiple of micro_batches ({opts['micro_batches']}): the "
                         "micro-batches are equal")
    if opts["unreliable"] not in UNRELIABLE:
        raise ValueError(f"batching_kwargs['unreliable'] must be one of {UNRELIABLE}, got "
                         f"{opts['unreliable']!r}")
    if opts["grow"] not in GROW_RULES:
        raise ValueError(f"batching_kwargs['grow'] must be one of {GROW_RULES}, got "
                         f"{opts['grow']!r}")
    rho = opts["rho"]
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 <= float(rho) <= 1:
        raise ValueError(f"batching_kwargs['rho'] must be a number in [0, 1], got {rho!r}")
    z = opts["z"]
    if z is not None and (isinstance(z, bool) or not isinstance(z, numbers.Real)
                          or not (math.isfinite(z) and float(z) >= 0)):
        raise ValueError(f"batching_kwargs['z'] must be None or a finite number >= 0, "
                         f"got {z!r}")
    return opts


def _check_optimizer(optimizer: Any) -> None:
    if is_zero(optimizer) or not isinstance(optimizer, Rprop):
        raise TypeError(f"batching='adaptive' needs an rprop.Rprop optimizer (it masks "
                        f"coordinates in its state), got {type(optimizer).__name__}")
    for i, group in enumerate(optimizer.param_groups):
        if group.get("grprop_partitioned"):
            raise ValueError(
                f"batching='adaptive' runs a replicated model, whose optimizer holds every "
                f"parameter on each rank; param_groups[{i}] has grprop_partitioned=True "
                "(one rank's part); use grprop_partitioned=False")


# -- the masked step --------------------------------------------------------------------


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _statistic_like(p: Tensor) -> Tensor:
    """A zero buffer for one parameter's statistics: float32 for a half
    precision parameter, whose squared gradients would underflow (a
    gradient under 2.4e-4 squares to 0 in float16, a spread of 0 that reads
    as a certain sign)."""
    real = _real(p.detach())
    wide = torch.float32 if real.dtype in (torch.float16, torch.bfloat16) else real.dtype
    return torch.zeros_like(real, dtype=wide)


def _as_grad(p: Tensor, mean: Tensor) -> Tensor:
    """``mean`` (a statistics buffer's dtype) as the gradient of ``p``."""
    mean = mean.to(_real(p.detach()).dtype)
    return torch.view_as_complex(mean) if p.is_complex() else mean


class _Statistics:
    """Sum and sum of squares of the micro-batch mean gradients, per parameter."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.sums = [_statistic_like(p) for p in params]
        self.squares = [_statistic_like(p) for p in params]

    def reset(self) -> None:
        torch._foreach_zero_(self.sums)
        torch._foreach_zero_(self.squares)

    def add(self) -> None:
        """Add the gradients now in ``.grad`` (None counts as 0)."""
        pairs = [(i, _real(p.grad)) for i, p in enumerate(self.params) if p.grad is not None]
        if not pairs:
            return
        sums = [self.sums[i] for i, _ in pairs]
        squares = [self.squares[i] for i, _ in pairs]
        grads = [g.to(s.dtype) for (_, g), s in zip(pairs, sums, strict=True)]
        torch._foreach_add_(sums, grads)
        torch._foreach_addcmul_(squares, grads, grads)


def _all_reduce(tensors: list[Tensor], group: Any) -> None:
    """Sum ``tensors`` over the ranks in place: one all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(
            flat.split([t.numel() for t in ts]), ts, strict=True)])


def _batch_gradient(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any],
                    stats: _Statistics, group: Any = None) -> tuple[Tensor, int]:
    """Leave in ``.grad`` the mean of the micro-batch mean gradients (the
    batch mean for equal micro-batches); return the mean of their mean losses
    and the number of micro-batches. Under ``torch.distributed`` every rank
    passes its own micro-batches and the sums cover all ranks' (every rank
    then holds the same gradient and statistics)."""
    stats.reset()
    losses = []
    with torch.enable_grad():
        for batch in batches:
            for p in stats.params:
                p.grad = None
            total, count = _sum_and_count(loss_fn(model, batch))
            mean = total / count
            mean.backward()
            losses.append(mean.detach().to(torch.float64))
            stats.add()
    k = len(batches)
    loss = torch.stack(losses).sum()
    if group is not None:
        loss = loss.reshape(1)
        _all_reduce([*stats.sums, *stats.squares, loss], group)
        k *= dist.get_world_size(group)
        loss = loss.reshape(())
    for p, s in zip(stats.params, stats.sums, strict=True):
        p.grad = _as_grad(p, s / k)
    return loss / k, k


def _covered(optimizer: Rprop, stats: _Statistics, z_override: float | None,
             ) -> Iterator[tuple[dict[str, Any], int, Tensor, float, Tensor | None]]:
    """For each parameter the statistics cover, in param-group order: its
    group, its index in ``stats``, the group's threshold z and the weight
    decay term its gradient mean is shifted by (None without decay)."""
    where = {id(p): i for i, p in enumerate(stats.params)}
    for group in optimizer.param_groups:
        z = reliability_threshold(group["etas"]) if z_override is None else z_override
        decay, sign = group["weight_decay"], (-1.0 if group["maximize"] else 1.0)
        for p in group["params"]:
            i = where.get(id(p))
            if i is not None:
                yield (group, i, p, z,
                       None if decay == 0 else (sign * decay) * _real(p.detach()))


def _masks(optimizer: Rprop, stats: _Statistics, k: int, z_override: float | None,
           gain: bool = False) -> tuple[dict[int, Tensor], list[Tensor]]:
    """Per parameter (by id) its reliable mask; and the counts of reliable and
    of informative coordinates (0-dim tensors), with ``gain`` also the
    predicted first-order decrease sum(|g| * step) over the reliable
    coordinates and over those that would pass at twice the batch
    (``|t| > z / sqrt(2)``)."""
    masks: dict[int, Tensor] = {}
    reliable, informative, now, doubled = [], [], [], []
    for group, i, p, z, shift in _covered(optimizer, stats, z_override):
        ok, info = reliable_mask(stats.sums[i], stats.squares[i], k, z, shift)
        masks[id(p)] = ok
        reliable.append((ok & info).sum())
        informative.append(info.sum())
        if gain:
            st = optimizer.state.get(p)
            size = _real(st["step_size"]) if st and "step_size" in st else float(group["lr"])
            mean = stats.sums[i] / k if shift is None else stats.sums[i] / k + shift
            weight = (mean.abs() * size).to(torch.float64)
            near, _ = reliable_mask(stats.sums[i], stats.squares[i], k, z / math.sqrt(2),
                                    shift)
            now.append(torch.where(ok & info, weight, 0).sum())
            doubled.append(torch.where(near & info, weight, 0).sum())
    sums = [torch.stack(reliable).sum(), torch.stack(informative).sum()]
    if gain:
        sums += [torch.stack(now).sum(), torch.stack(doubled).sum()]
    return masks, sums


def _efficiency_terms(optimizer: Rprop, stats: _Statistics, k: int,
                      z_override: float | None) -> list[Tensor]:
    """Over this batch's statistics: the weighted sum of the sign efficiency,
    of its threshold ``2 Phi(z) - 1`` (each group's z) and of the weights
    (:func:`sign_efficiency`); the efficiency falls short when the first is
    below the second."""
    right, needed, weights = [], [], []
    for group, i, p, z, shift in _covered(optimizer, stats, z_override):
        st = optimizer.state.get(p)
        size = _real(st["step_size"]) if st and "step_size" in st else float(group["lr"])
        r, w = sign_efficiency(stats.sums[i], stats.squares[i], k, size, shift)
        right.append(r)
        needed.append(w * math.erf(z / math.sqrt(2)))
        weights.append(w)
    return [torch.stack(t).sum() for t in (right, needed, weights)]


class _Evidence:
    """Per parameter, the sum, the sum of squares and the count (int32) of the
    micro-batch means each coordinate has collected since it last moved
    (``grow="evidence"``); identical on every rank."""

    def __init__(self, params: list[Tensor]) -> None:
        self.sums = [_statistic_like(p) for p in params]
        self.squares = [torch.zeros_like(s) for s in self.sums]
        self.counts = [torch.zeros_like(s, dtype=torch.int32) for s in self.sums]

    def with_batch(self, stats: _Statistics, k: int) -> tuple[list[Tensor], ...]:
        """The carried evidence plus this batch's ``k`` micro-batch means (new
        tensors: nothing is kept until :meth:`keep`)."""
        return (list(torch._foreach_add(self.sums, stats.sums)),
                list(torch._foreach_add(self.squares, stats.squares)),
                [c + k for c in self.counts])

    def keep(self, totals: tuple[list[Tensor], ...], moved: list[Tensor],
             untouched: frozenset[int] = frozenset()) -> None:
        """Carry ``totals`` into the next step, restarted where a coordinate
        moved; the parameters at the indices ``untouched`` (a step skipped for
        a non-finite value) keep the evidence they had, without this batch."""
        for carried, now in zip((self.sums, self.squares, self.counts), totals, strict=True):
            for i, (c, t, m) in enumerate(zip(carried, now, moved, strict=True)):
                if i not in untouched:
                    c.copy_(t.masked_fill_(m, 0))

    def state_dict(self) -> dict[str, list[Tensor]]:
        return {"sums": [t.clone() for t in self.sums],
                "squares": [t.clone() for t in self.squares],
                "counts": [t.clone() for t in self.counts]}

    def load_state_dict(self, path: Any, state: Any) -> None:
        """Checked before anything is loaded: a malformed state is a ValueError."""
        mine = self.state_dict()
        ok = isinstance(state, dict) and set(state) == set(mine) and all(
            isinstance(state[key], list) and len(state[key]) == len(mine[key]) and all(
                isinstance(a, Tensor) and a.shape == b.shape and a.dtype == b.dtype
                for a, b in zip(state[key], mine[key], strict=True)) for key in mine)
        if not ok:
            raise ValueError(f"checkpoint {path}: its carried evidence does not fit the "
                             "model's parameters")
        for total, squares, count in zip(state["sums"], state["squares"], state["counts"],
                                         strict=True):
            empty = count == 0
            # Squares may have overflowed to inf; a non-finite mean would have moved.
            if not (bool(torch.isfinite(total).all()) and bool((squares >= 0).all())
                    and bool((count >= 0).all())
                    and not bool((empty & ((total != 0) | (squares != 0))).any())):
                raise ValueError(f"checkpoint {path}: its carried evidence is malformed (sums "
                                 "must be finite, squares and counts >= 0, and nothing "
                                 "summed where the count is 0)")
        for key in mine:
            torch._foreach_copy_(getattr(self, key), [t.to(d.device) for t, d in
                                                      zip(state[key], mine[key], strict=True)])


def _evidence_masks(optimizer: Rprop, stats: _Statistics, evidence: _Evidence, k: int,
                    z_override: float | None, batch: int, n: int,
                    ) -> tuple[dict[int, Tensor], list[Tensor], tuple[list[Tensor], ...]]:
    """:func:`_masks` on the carried evidence plus this batch's: per parameter
    its reliable mask, with ``.grad`` set to each coordinate's accumulated
    mean; the counts of reliable, of informative and of informative
    coordinates whose evidence covers at least half the data (``count *
    batch / k >= n / 2``); and the totals for :meth:`_Evidence.keep`."""
    totals = evidence.with_batch(stats, k)
    masks: dict[int, Tensor] = {}
    reliable, informative, old = [], [], []
    for _, i, p, z, shift in _covered(optimizer, stats, z_override):
        total, squares, count = totals[0][i], totals[1][i], totals[2][i]
        ok, info = reliable_mask(total, squares, count, z, shift)
        masks[id(p)] = ok
        reliable.append((ok & info).sum())
        informative.append(info.sum())
        # 2 count batch >= n k in int64: no rounding, no overflow.
        old.append((info & (2 * batch * count.long() >= n * k)).sum())
        p.grad = _as_grad(p, total / count)
    sums = [torch.stack(reliable).sum(), torch.stack(informative).sum(), torch.stack(old).sum()]
    return masks, sums, totals


def _partial_moves(optimizer: Rprop, stats: _Statistics, k: int, z_override: float | None,
                   masks: dict[int, Tensor], totals: tuple[list[Tensor], ...] | None,
                   ) -> dict[int, Tensor]:
    """Per parameter (by id), the signed fraction of its step size each
    coordinate that does not pass moves (:func:`partial_move`, 0 where it
    passes), oriented as the step moves (against the gradient, along it with
    ``maximize``); from the carried ``totals`` when given, else this batch."""
    moves: dict[int, Tensor] = {}
    for group, i, p, _, shift in _covered(optimizer, stats, z_override):
        if totals is None:
            move = partial_move(stats.sums[i], stats.squares[i], k, shift)
        else:
            move = partial_move(totals[0][i], totals[1][i], totals[2][i], shift)
        move.masked_fill_(masks[id(p)], 0)
        moves[id(p)] = move if group["maximize"] else move.neg_()
    return moves


_KEPT = ("prev", "step_size", "prev_update")
GRPROP_BASE = "rprop-"  # a Variant with `adjust` has Rprop-'s elementwise rule (_variants)


@torch.no_grad()
def masked_step(optimizer: Rprop, masks: dict[int, Tensor], loss: Tensor,
                moves: dict[int, Tensor] | None = None) -> set[int]:
    """One ``optimizer.step`` in which only the coordinates where ``masks``
    is True take part; every other coordinate keeps its step size, stored
    gradient and stored update, and its value, or with ``moves`` (per
    parameter) moves by ``moves * step size`` (nothing in a group whose step
    the optimizer's ``nonfinite="skip"`` skipped). Returns the ids of the
    parameters in such skipped groups.

    The masked coordinates get a zero gradient, which, in the core's rule,
    already leaves the parameter (a zero move), the stored update (0 only
    where the state was fresh) and, inside the bounds, the step size as they
    were; ``prev`` would become 0 and a step size outside the bounds would be
    clamped, so the kept state and the value are restored from copies
    afterwards (also for weight decay, which moves a zero-gradient
    coordinate). iRprop+'s E(t-1) is held at +inf, so no mini-batch step is
    judged worse than the last: mini-batch losses of different samples are
    not comparable, and the variant runs as iRprop- until full batch. GRprop
    runs as Rprop- (its elementwise rule, without the adjustment): its groups
    read ``variant="rprop-"`` during the step (step hooks and
    ``last_paths`` see that), and their own name again after it.
    """
    saved: list[tuple[Tensor, Tensor, dict[str, Tensor | None], dict[str, Any]]] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            m = masks.get(id(p))
            if m is None or p.grad is None:
                continue
            st = optimizer.state.get(p)
            kept = {k: (_real(st[k]).clone() if st and k in st else None) for k in _KEPT}
            saved.append((p, m, kept, group))
            g = _real(p.grad)
            g.copy_(torch.where(m, g, torch.zeros((), dtype=g.dtype, device=g.device)))
            kept["param"] = _real(p).clone()
    skipped = [g["skipped_steps"] for g in optimizer.param_groups]
    # GRprop's adjustment sets one step size so that the whole step meets its
    # descent condition on the full gradient; a masked mini-batch step has
    # neither (and a different coordinate would be picked, and pushed to
    # step_min, at every step), so GRprop runs as its elementwise rule,
    # Rprop-, until full batch.
    adjusting = [(group, group["variant"]) for group in optimizer.param_groups
                 if get_variant(group["variant"]).adjust is not None]
    for group, _ in adjusting:
        group["variant"] = GRPROP_BASE
    try:
        optimizer.step(loss=loss)
    finally:
        for group, name in adjusting:
            group["variant"] = name
    skipped_now = {id(g): before != g["skipped_steps"]
                   for g, before in zip(optimizer.param_groups, skipped, strict=True)}
    for p, m, kept, group in saved:
        st = optimizer.state[p]
        value = _real(p.data)
        value.copy_(torch.where(m, value, kept["param"]))  # type: ignore[arg-type]
        for k in _KEPT:
            if k not in st:
                continue
            now = _real(st[k])
            before = kept[k]
            if before is None:  # a state the step created: its fresh value
                fill = group["lr"] if k == "step_size" else 0.0
                before = torch.full_like(now, float(fill))
            now.copy_(torch.where(m, now, before))
        if moves is not None and id(p) in moves and not skipped_now[id(group)]:
            value.add_(moves[id(p)] * _real(st["step_size"]))  # two roundings, not a fused one
        if LOSS_STATE in st:
            st[LOSS_STATE].fill_(math.inf)
    return {id(p) for g in optimizer.param_groups if skipped_now[id(g)] for p in g["params"]}


def _step_size_stats(optimizer: Rprop) -> Stats | None:
    summary = step_size_summary([s["step_size"] for s in optimizer.state.values()
                                 if isinstance(s, dict) and isinstance(s.get("step_size"), Tensor)])
    if summary is None:
        return None
    lo, med, hi = summary.tolist()
    return (lo, med, hi)


# -- the loop ------------------------------------------------------------------------------


def fit_adaptive(
    model: nn.Module, loss_fn: LossFn, data: Any, optimizer: Rprop, *, options: dict[str, Any],
    max_epochs: float, callbacks: Sequence[Callable[[Any], Any]], progress: bool,
    checkpoint: str | os.PathLike[str] | None, checkpoint_every: int, variant: str | None,
    full_batch_kwargs: dict[str, Any] | None, process_group: Any = None,
) -> AdaptiveHistory:
    """The adaptive loop (module docstring); called by ``fit`` with its
    arguments already checked. ``max_epochs`` counts epoch-equivalents
    (examples / N): steps run while fewer than ``max_epochs * N`` examples
    have been processed. ``checkpoint_every`` counts epoch-equivalents too: a
    checkpoint is written after the step that crosses each multiple.

    Under ``torch.distributed`` (a plain, replicated model) ``data`` is this
    rank's shard and N the total over the ranks; each step every rank draws
    ``B / world`` samples from its shard (its own generator, seeded ``seed +
    rank``) in ``k`` micro-batches, and one all-reduce per dtype sums the
    statistics of all ``k * world`` micro-batches, so that every rank takes
    the same masked step. ``batch_size`` must then be a multiple of
    ``micro_batches * world``."""
    group = None
    if dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD if process_group is None else process_group
    _check_optimizer(optimizer)
    source = _Data(data)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    device = params[0].device
    world, rank = (1, 0) if group is None else (dist.get_world_size(group),
                                                dist.get_rank(group))
    if group is not None:
        if isinstance(model, nn.parallel.DistributedDataParallel) or any(
                type(p) is not nn.Parameter and type(p) is not Tensor for p in params):
            raise NotImplementedError(
                "batching='adaptive' under torch.distributed runs a plain replicated model "
                "(no DDP or FSDP wrapper: it all-reduces the statistics itself)")
        total = torch.tensor([source.n], dtype=torch.int64, device=device)
        dist.all_reduce(total, group=group)
        n = int(total.item())
    else:
        n = source.n
    b0, k = options["batch_size"], options["micro_batches"]
    if b0 > n:
        raise ValueError(f"batching_kwargs['batch_size'] ({b0}) is larger than the dataset "
                         f"({n} samples)")
    if b0 % (k * world):
        raise ValueError(f"batching_kwargs['batch_size'] ({b0}) must be a multiple of "
                         f"micro_batches x world size ({k} x {world})")
    sampler = _Sampler(source.n, options["seed"] + rank)
    history = AdaptiveHistory(dataset_size=n)
    batch = b0 if 2 * b0 <= n else n
    carry = options["grow"] in CARRIED
    evidence = _Evidence(params) if carry and batch < n else None
    # grow="efficiency": the average of the efficiency's surplus over its
    # threshold since B last changed (None: no step yet), and those steps.
    average: float | None = None
    since = 0
    start = 0
    path = None if checkpoint is None else checkpoint_path(checkpoint)
    if path is not None and exists_everywhere(path, group, device):
        saved = _checked_resume(path, n, options, world)
        if saved["samplers"][rank]["perm"].shape != (source.n,):
            raise ValueError(f"checkpoint {path}: rank {rank}'s sampler covers "
                             f"{len(saved['samplers'][rank]['perm'])} samples; its data has "
                             f"{source.n}")
        evidence = None
        if carry and int(saved["batch"]) < n:  # checked before anything is loaded
            evidence = _Evidence(params)
            evidence.load_state_dict(path, saved.get("evidence"))
        start, hist_state = load_checkpoint(path, model, optimizer, group, variant, "adaptive")
        history = AdaptiveHistory.from_state_dict(hist_state, start, n)
        history.resumed_from = start
        sampler.load_state_dict(saved["samplers"][rank])
        batch = int(saved["batch"])
        average, since = saved["efficiency"]
    stats = _Statistics(params)
    z = options["z"]
    limit = max_epochs * n
    examples = history.examples[-1] if history.examples else 0
    offset = history.time[-1] if history.time else 0.0
    bar = progress_bar(progress and rank == 0, max_epochs, examples / n, fractional=True)
    began = time.perf_counter()
    reason = "max_epochs"
    steps = start
    interrupted = DeferredInterrupt(enabled=path is not None)

    def save() -> None:
        assert path is not None
        state = history.state_dict()
        samplers: list[Any] = [sampler.state_dict()]
        if group is not None:
            samplers = [None] * world
            dist.all_gather_object(samplers, sampler.state_dict(), group=group)
        state[ADAPTIVE_KEY] = {"samplers": samplers, "batch": batch,
                                  "dataset_size": n, "options": dict(options),
                                  "efficiency": [average, since]}
        if evidence is not None:
            state[ADAPTIVE_KEY]["evidence"] = evidence.state_dict()
        save_checkpoint(path, model, optimizer, state, steps, group, rank)

    try:
        while examples < limit:
            full = batch >= n
            if full:
                loss_t = full_batch_backward(model, loss_fn,
                                             source.passes(options["eval_batch_size"]),
                                             process_group=process_group,
                                             **(full_batch_kwargs or {}))
                loss, fraction, efficiency = float(loss_t), 1.0, 1.0
            else:
                drawn = sampler.mark()
                idx = sampler.draw(batch // world)
                micro = [source.take(part) for part in idx.chunk(k)]
                loss_t, k_all = _batch_gradient(model, loss_fn, micro, stats, group)
                if evidence is not None:
                    masks, sums, totals = _evidence_masks(optimizer, stats, evidence, k_all, z,
                                                          batch, n)
                else:
                    masks, sums = _masks(optimizer, stats, k_all, z, options["grow"] == "gain")
                sums += _efficiency_terms(optimizer, stats, k_all, z)
                values = torch.stack([loss_t, *(t.to(torch.float64) for t in sums)]).tolist()
                loss = values[0]
                fraction = values[1] / values[2] if values[2] else 0.0
                right, needed, weights = values[-3:]
                efficiency = right / weights if weights > 0 else math.nan
                # grow="evidence": half the informative coordinates hold (or
                # moved on) evidence from half the data, so the exact pass
                # costs no more per decision and has no noise.
                jump = options["grow"] == "evidence" and 2 * values[3] >= values[2]
                double = False
                if options["grow"] == "efficiency":
                    surplus = (right - needed) / weights if weights > 0 else 0.0
                    if not math.isfinite(surplus):  # weights summed past the float range
                        surplus = 0.0
                    now = (surplus if average is None
                           else average + (surplus - average) / options["window"])
                    # A size is tested after `window` steps, or after one pass
                    # of the data if that is fewer examples: a longer wait
                    # would spend more on the test than the exact pass costs.
                    wait = min(options["window"], -(-n // batch))
                    double = since + 1 >= wait and now < 0
                elif options["grow"] == "gain":
                    # Doubling costs twice the examples per step: worth it when
                    # the coordinates it would add at least double the step's
                    # predicted decrease (or when nothing moves at all).
                    double = values[1] == 0 or values[4] >= 2 * values[3]
                elif options["grow"] == "fraction":
                    double = fraction < options["rho"]
            stop = None if math.isfinite(loss) else "nonfinite"
            if callbacks:
                info_ = StepInfo(steps, loss, batch, fraction, history, model, optimizer,
                                 efficiency, examples)
                wants = any([bool(cb(info_)) for cb in callbacks])
                if group is not None:  # any rank's stop stops every rank
                    flag = torch.tensor([int(wants)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
                    wants = bool(flag.item())
                if wants and stop is None:
                    stop = "callback"
            if stop is not None:
                if not full:
                    # The step is not taken: its batch is drawn again by the
                    # resumed run, as by the uninterrupted one.
                    sampler.rewind(drawn)
                reason = stop
                break
            if full:
                optimizer.step(loss=loss_t)
            else:
                moves = None
                if options["unreliable"] == "partial":
                    moves = _partial_moves(optimizer, stats, k_all, z, masks,
                                           None if evidence is None else totals)
                skipped = masked_step(optimizer, masks, loss_t, moves)
                if evidence is not None:
                    evidence.keep(totals, [masks[id(p)] for p in params],
                                  frozenset(i for i, p in enumerate(params) if id(p) in skipped))
                if skipped:  # this batch changed nothing, nor does it count for growth
                    jump = double = False
                elif options["grow"] == "efficiency":
                    average, since = now, since + 1
            examples += batch
            steps += 1
            history.loss.append(loss)
            history.batch_size.append(batch)
            history.reliable.append(fraction)
            history.efficiency.append(efficiency)
            history.examples.append(examples)
            history.step_size.append(_step_size_stats(optimizer))
            history.time.append(offset + time.perf_counter() - began)
            if bar is not None:
                bar.set_postfix_str(f"B={batch} reliable={fraction:.2f} loss={loss:.4g}",
                                    refresh=False)
                bar.update(min(examples / n, max_epochs) - bar.n)  # the last step overshoots
            if not full and jump:
                batch, evidence = n, None
            elif not full and double:
                # A mini-batch is at most half the data: past that, the exact
                # full-data pass costs at most twice as much and has no noise.
                batch = n if 4 * batch > n else 2 * batch
                average, since = None, 0
                if batch == n:
                    evidence = None
            crossed = (examples // (checkpoint_every * n)
                       != (examples - history.batch_size[-1]) // (checkpoint_every * n))
            stopping = interrupted.agreed(group, device)
            if path is not None and (crossed or stopping):
                save()
            if stopping:
                interrupted.reraise()
        history.stop_reason = reason
        interrupted.end_run(None if path is None else save, group, device)
    finally:
        interrupted.restore()
        if bar is not None:
            bar.close()
    return history


def _checked_resume(path: Any, n: int, options: dict[str, Any], world: int) -> dict[str, Any]:
    """The adaptive part of a checkpoint, checked before anything is loaded."""
    payload = read_verified(path)
    history = payload.get("history") if isinstance(payload, dict) else None
    saved = history.get(ADAPTIVE_KEY) if isinstance(history, dict) else None
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {path} was not written by fit(batching='adaptive'); "
                         "resume it with batching='full', or use a new checkpoint path")
    if saved.get("dataset_size") != n:
        raise ValueError(f"checkpoint {path} was written for a dataset of "
                         f"{saved.get('dataset_size')} samples; this one has {n}")
    written = saved.get("options")
    if isinstance(written, dict) and set(written) < set(options):
        raise ValueError(f"checkpoint {path} was written by an older rprop (its batching "
                         f"options lack {sorted(set(options) - set(written))}); resume it with "
                         "that version, or use a new checkpoint path")
    if written != options:
        differ = (sorted(k for k in options if written.get(k) != options[k])
                  if isinstance(written, dict) else list(options))
        raise ValueError(f"checkpoint {path} was written with other batching_kwargs: "
                         + ", ".join(f"{k}={written.get(k)!r} there, {options[k]!r} here"
                                     if isinstance(written, dict) else k for k in differ)
                         + "; resume with the same batching_kwargs, or use a new checkpoint "
                         "path")
    _check_history(path, history if isinstance(history, dict) else {}, payload.get("epoch"), n)
    efficiency = saved.get("efficiency")
    if not (isinstance(efficiency, list) and len(efficiency) == 2
            and (efficiency[0] is None or (isinstance(efficiency[0], float)
                                           and math.isfinite(efficiency[0])))
            and isinstance(efficiency[1], int) and not isinstance(efficiency[1], bool)
            and efficiency[1] >= 0):
        raise ValueError(f"checkpoint {path}: its batch growth state is malformed")
    batch = saved.get("batch")
    k_all = options["micro_batches"] * world
    if not (isinstance(batch, int) and not isinstance(batch, bool)
            and (batch == n or (0 < batch < n and batch % k_all == 0))):
        raise ValueError(f"checkpoint {path}: its batch size {batch!r} must be the dataset's "
                         f"{n} or a multiple of micro_batches x world size ({k_all}) below it")
    samplers = saved.get("samplers")
    if not isinstance(samplers, list) or len(samplers) != world:
        raise ValueError(f"checkpoint {path} holds the samplers of "
                         f"{len(samplers) if isinstance(samplers, list) else '?'} process(es); "
                         f"this run has {world}")
    for sampler in samplers:
        _check_sampler(path, sampler, saved)
    return saved


def _check_history(path: Any, history: dict[str, Any], steps: Any, n: int) -> None:
    """The per-step lists of an adaptive history: an entry for each step
    taken (at least), of the right kind; batch sizes in 1..N, and
    ``examples`` their running sum."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        return  # the checkpoint's own check refuses it, before anything is loaded
    def numbers(key: str, kind: type | tuple[type, ...]) -> list[Any] | None:
        v = history.get(key)
        if (isinstance(v, list) and len(v) >= steps
                and all(isinstance(x, kind) and not isinstance(x, bool) for x in v[:steps])):
            return v
        return None
    sizes = numbers("batch_size", int)
    examples = numbers("examples", int)
    ok = (sizes is not None and examples is not None
          and numbers("reliable", (int, float)) is not None
          and numbers("efficiency", (int, float)) is not None)
    if ok and sizes is not None and examples is not None:
        total = 0
        for b, e in zip(sizes[:steps], examples[:steps], strict=True):
            total += b
            ok = ok and 1 <= b <= n and e == total
    if not ok:
        raise ValueError(f"checkpoint {path}: its history does not hold the batch size, "
                         f"reliable fraction, efficiency and examples of its {steps} steps")


def _check_sampler(path: Any, sampler: Any, saved: dict[str, Any]) -> None:
    ok = (isinstance(sampler, dict) and isinstance(sampler.get("generator"), Tensor)
          and isinstance(sampler.get("perm"), Tensor)
          and sampler["perm"].ndim == 1 and sampler["perm"].dtype == torch.int64
          and isinstance(sampler.get("pos"), int) and 0 <= sampler["pos"] <= len(sampler["perm"])
          and isinstance(saved.get("batch"), int) and 1 <= saved["batch"])
    if ok and isinstance(sampler, dict):
        try:
            torch.Generator().set_state(sampler["generator"])
        except (RuntimeError, TypeError):
            ok = False
    if not ok:
        raise ValueError(f"checkpoint {path}: its sampler state is malformed")
