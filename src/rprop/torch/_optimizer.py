"""rprop.Rprop: a drop-in torch.optim.Rprop with all four variants."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from rprop._core import FIRST_PREV_LOSS, check_loss, init_state, loss_went_up, signed_loss
from rprop._hyper import (
    DEFAULT_ETAS,
    DEFAULT_GRPROP_DELTA,
    DEFAULT_STEP_SIZES,
    Hyper,
    real_number,
)
from rprop._variants import BASE_STATE, LOSS_STATE, Variant, get_variant
from rprop.torch import _grprop
from rprop.torch._checkpoint import prepare_state_dict
from rprop.torch._compat import (
    PLAIN_TYPES,
    get_scalar_dtype,
    graph_capture_health_check,
    use_grad_for_differentiable,
    version,
)
from rprop.torch._group import (
    check_fits_dtype,
    check_group,
    check_state_dtype,
    describe_param,
    state_dtype_for,
)
from rprop.torch._nonfinite import first_nonfinite
from rprop.torch._path_registry import choose
from rprop.torch._plan import Bucket, GroupPlan, TrackedState
from rprop.torch._tensors import mark_written, real_views

__all__ = ["LrChangeWarning", "LrSeedWarning", "Rprop"]

# The per-parameter state torch.optim.Rprop keeps: its step counter, then the
# arrays every variant keeps.
TORCH_STATE = ("step", *BASE_STATE)



class LrChangeWarning(UserWarning):
    """A group's ``lr`` changed after its step sizes were seeded from it."""


class LrSeedWarning(UserWarning):
    """Step sizes were seeded from an ``lr`` of 0 or below ``step_min`` (they
    start at ``step_min``): typically a warmup schedule that starts at 0."""


class Rprop(Optimizer):
    r"""Resilient backpropagation, all four variants, a drop-in ``torch.optim.Rprop``.

    With the default ``variant="irprop-"`` the trajectory and the
    ``state_dict`` are bitwise those of ``torch.optim.Rprop``, on every path.

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: initial step size Δ0 (float or 1-element Tensor). It only *seeds*
            the step sizes: changing it later (an LR scheduler) has no effect
            on them, as in torch; a one-time :class:`LrChangeWarning` says so,
            and :meth:`rescale_step_sizes` rescales them explicitly. Step
            sizes seeded from ``lr = 0`` or ``lr < step_min`` start at
            ``step_min`` (a warmup schedule starting at 0 never reaches
            them): a one-time :class:`LrSeedWarning` says so.
        etas: ``(eta_minus, eta_plus)``, with ``0 < eta_minus < 1 < eta_plus``.
        step_sizes: ``(step_min, step_max)``, with ``0 <= step_min <= step_max``
            (``step_max = inf``: no upper bound).

            ``lr``, ``eta_plus``, ``step_min``, a finite ``step_max`` and
            ``weight_decay`` must be finite in the dtype the step computes
            in (the state's: the parameter's, or ``state_dtype``): a value
            past its largest number (``lr=1e39`` for float32, ``7e4`` for
            float16) is refused with a ValueError naming the value and the
            dtype, at construction, on :meth:`load_state_dict` and, for
            values changed in ``param_groups``, at the step, before anything
            changes. Such a value would round to inf in some of the
            arithmetic and not in the rest, and each path would step it
            differently; refused, every path behaves the same.
        variant: ``"irprop-"`` (default, torch's), ``"irprop+"``, ``"rprop+"``
            or ``"rprop-"``. ``"irprop+"`` needs the loss at each step:
            ``step(closure)`` or ``step(loss=...)``. ``"grprop-sag"`` /
            ``"grprop-slr"``: R neuralnet's GRprop, whose adjustment runs over
            all parameters at once (every group must then share ``variant``,
            ``step_sizes`` and ``grprop_delta``; see docs/variants.md).
        weight_decay: coupled L2 penalty, ``grad + weight_decay * param``
            before the sign test.
        maximize: maximise the objective instead.
        foreach: batch the step over tensors with ``torch._foreach_*`` ops.
        capturable: keep the step counter on the device (CUDA graphs).
        differentiable: let autograd through the step (for-loop path only).
        fused: one fused pass over memory per (device, dtype) group;
            ``None`` picks the fastest path available.
        nonfinite: what a NaN/±inf gradient (or iRprop+ loss) does.
            ``"propagate"`` (default) behaves as torch: a NaN gradient
            element keeps its parameter and step size, an infinite one counts as
            a large gradient. ``"skip"`` skips the whole step (nothing changes;
            the group's ``skipped_steps`` counts it); ``"raise"`` raises a
            FloatingPointError naming the first offending parameter. Both cost
            one reduction per step and, on a GPU, a host synchronisation.
        state_dtype: ``None`` (default, as torch) keeps the state in each
            parameter's dtype. ``torch.float32`` keeps ``prev``, ``step_size``
            and ``prev_update`` of lower-precision parameters (float16,
            bfloat16) in float32: the sign test and the step sizes then do not
            quantize (in float16, ``g_prev * g`` underflows to 0 for gradients
            below ~2e-4, and Rprop stops adapting), and each update is computed
            in float32 and rounded once into the parameter. Recommended for
            half-precision parameters. A ``state_dtype`` that cannot hold a
            real parameter's values (float16 for float32 parameters, float32
            for float64 ones) is refused with a ValueError; complex
            parameters keep their own dtype.
        grprop_delta: GRprop's δ (default 1e-6, R neuralnet's); only the
            ``grprop-*`` variants read it. Saved in the param groups.
        grprop_partitioned: ``True`` says that this optimizer holds one
            rank's part of the parameters and the other ranks of the default
            process group hold the rest (``ZeroRedundancyOptimizer`` with
            ``optimizer_class=rprop.Rprop``): GRprop's selection and sum then
            run over all ranks' parts (one all-gather per step). Only for
            ``grprop-*`` variants; saved in the param groups.

    Example:
        >>> import torch, rprop
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = rprop.Rprop(model.parameters(), lr=0.01, variant="irprop+")
        >>> x, y = torch.randn(64, 3), torch.randn(64, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(10):
        ...     loss = opt.step(closure)
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-2,
        etas: tuple[float, float] = DEFAULT_ETAS,
        step_sizes: tuple[float, float] = DEFAULT_STEP_SIZES,
        *,
        variant: str = "irprop-",
        weight_decay: float = 0.0,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        nonfinite: str = "propagate",
        state_dtype: torch.dtype | None = None,
        grprop_delta: float = DEFAULT_GRPROP_DELTA,
        grprop_partitioned: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "etas": etas,
            "step_sizes": step_sizes,
            "variant": variant,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "nonfinite": nonfinite,
            "state_dtype": state_dtype,
            "grprop_delta": grprop_delta,
            "grprop_partitioned": grprop_partitioned,
        }
        check_group(defaults)
        defaults["variant"] = get_variant(variant).name
        self._seen_lr: dict[int, Any] = {}
        self._warned_lr = False
        self._warned_seed = False
        self._checked: dict[tuple[Any, ...], tuple[Hyper, Variant]] = {}
        # Which path stepped each bucket (one device and dtype of a group) in
        # the last step: a diagnostic, e.g. ("fused",).
        self.last_paths: tuple[str, ...] = ()
        self._fits: set[tuple[Hyper, torch.dtype]] = set()
        # What each group's step gathered, by id(group), re-checked each step.
        self._plans: dict[int, GroupPlan] = {}
        super().__init__(params, defaults)
        self.state = TrackedState(dict, self.state)

    # -- groups and state ---------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("skipped_steps", 0)
        try:
            hyper, _ = check_group(group)
            _grprop.check_groups(self.param_groups)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        group["variant"] = get_variant(group["variant"]).name
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        names = group.get("param_names") or [None] * len(group["params"])
        for i, (p, name) in enumerate(zip(group["params"], names, strict=True)):
            if not isinstance(p, Tensor) or not (p.is_floating_point() or p.is_complex()):
                self.param_groups.pop()
                raise TypeError(
                    "params must be floating-point or complex tensors, got "
                    f"{getattr(p, 'dtype', type(p).__name__)}"
                )
            try:
                check_state_dtype(p, group["state_dtype"], describe_param(first + i, name))
                self._check_fits(hyper, state_dtype_for(p, group))
            except ValueError:
                self.param_groups.pop()
                raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        pending = self.__dict__.pop("_pending_state", None)
        super().__setstate__(state)
        self.__dict__.setdefault("_seen_lr", {})
        self.__dict__.setdefault("_warned_lr", False)
        self.__dict__.setdefault("_warned_seed", False)
        self.__dict__.setdefault("_checked", {})
        self.__dict__.setdefault("last_paths", ())
        self.__dict__.setdefault("_fits", set())
        self.__dict__["_plans"] = {}
        if not isinstance(self.state, TrackedState):  # pickled by an older rprop or by torch
            self.state = TrackedState(dict, self.state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("skipped_steps", 0)
        if pending is not None:  # inside load_state_dict: the checked state
            self._install_checked_state(pending)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``rprop.Rprop`` or ``torch.optim.Rprop``.

        Everything is checked before anything changes: a state tensor whose
        shape, dtype or values do not fit its parameter (a NaN or negative
        step size, a non-finite ``prev_update``), or a missing key, raises a
        ValueError naming the parameter, and the optimizer stays exactly as it
        was. Hyperparameters the saved groups lack (a torch.optim.Rprop state
        has no ``variant``) keep this optimizer's values; state the chosen
        variant needs beyond torch's (``prev_update``, ``prev_loss``) starts
        fresh when absent. Hooks run in torch's order: the load pre-hooks see
        (and may replace) the dict before it is checked, the post-hooks run
        after the checked state is installed.
        """
        # The check runs as the last load pre-hook, so that it sees what the
        # user's pre-hooks made of the dict; torch's loader then installs the
        # groups and calls __setstate__, where the checked state (kept in the
        # parameters' or state_dtype's dtype, which torch's loader would cast
        # away) goes in, before torch runs the post-hooks.
        handle = self.register_load_state_dict_pre_hook(_check_before_load)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
            self.__dict__.pop("_pending_state", None)

    def _install_checked_state(self, pending: dict[Any, dict[str, Any]]) -> None:
        self.state = TrackedState(dict, pending)
        self._plans.clear()
        self._seen_lr.clear()

    def _init_group(self, group: dict[str, Any], variant: Variant) -> list[Bucket]:
        """The group's parameters that have gradients, with their state
        (created on first use), split into buckets of one (device, dtype,
        grad dtype). At a thousand small tensors this bookkeeping, not the
        arithmetic, is what a step costs, so it is done once and kept in a
        :class:`GroupPlan` that later steps re-check in bulk. Under
        torch.compile it runs every time (traced once), in comprehensions,
        which torch.compile traces (unlike operator.attrgetter)."""
        compiling = torch.compiler.is_compiling()
        if not compiling:
            plan = self._plans.get(id(group))
            if plan is not None:
                planned = plan.buckets_now(group, variant, self.state)
                if planned is not None:
                    return planned
                del self._plans[id(group)]
        params = group["params"]
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            params = [p for p, g in zip(params, grads, strict=True) if g is not None]
            grads = [g for g in grads if g is not None]
        if not params:
            return []
        if any(g.is_sparse for g in grads):
            shape = next(tuple(p.shape) for p, g in zip(params, grads, strict=True) if g.is_sparse)
            raise TypeError(
                "rprop.Rprop does not support sparse gradients; got one for a parameter "
                f"of shape {shape} (use dense gradients, e.g. sparse=False in nn.Embedding)"
            )
        all_states = self.state
        states = [all_states[p] for p in params]
        # A state exists with torch's keys; a variant may need more (a
        # torch.optim.Rprop state resumed as irprop+, say).
        extras = _extras(variant)
        if not (all(states) and (not extras or all(k in s for s in states for k in extras))):
            self._complete_states(group, variant, params, grads, states)
        if variant.needs_loss and not compiling:
            self._own_losses(group)
        self._check_state_holds(group, params, states)
        indices: list[list[int]] | None = None
        if (len({p.dtype for p in params}) == 1 and len({g.dtype for g in grads}) == 1
                and all(p.is_cpu for p in params)):
            buckets = [Bucket(params, grads, states, variant)]
        else:
            split: dict[tuple[Any, ...], list[int]] = {}
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                split.setdefault((p.device, p.dtype, g.dtype), []).append(i)
            indices = list(split.values())
            buckets = [Bucket([params[i] for i in idx], [grads[i] for i in idx],
                              [states[i] for i in idx], variant) for idx in indices]
        if not compiling:
            self._plans[id(group)] = GroupPlan(group, variant, all_states, params, grads,
                                               states, buckets, indices)
        return buckets

    def _complete_states(self, group: dict[str, Any], variant: Variant, params: list[Tensor],
                         grads: list[Tensor], states: list[dict[str, Any]]) -> None:
        """Create the state the variant needs where it is missing."""
        # Before anything is created: a refused lr leaves no state seeded from it.
        hyper = self._checked_group(group)[0]
        for p, state in zip(params, states, strict=True):
            if not state:
                self._check_fits(hyper, state_dtype_for(p, group))
        if not self._warned_seed and not all(states):
            self._warn_if_seed_below_min(group)
        for p, grad, state in zip(params, grads, states, strict=True):
            if not state:
                # torch.optim.Rprop's counter, first, as torch orders the keys.
                state["step"] = torch.zeros(
                    (), dtype=get_scalar_dtype(),
                    device=p.device if group["capturable"] else torch.device("cpu"),
                )
            missing = [k for k in variant.state_keys if k not in state]
            if missing:
                fresh = _fresh_state(p, grad, group, variant)
                state.update((k, fresh[k]) for k in missing)
            if variant.needs_loss and LOSS_STATE not in state:
                state[LOSS_STATE] = self._loss_slot(group, p.device)

    def _warn_if_seed_below_min(self, group: dict[str, Any]) -> None:
        """Warn (once) when fresh step sizes are seeded from an lr of 0 or
        below step_min: the first step clamps them to step_min (or leaves
        them at 0 when step_min is 0), which is never what a schedule that
        starts at lr=0 (a warmup) means."""
        lr, step_min = float(group["lr"]), float(group["step_sizes"][0])
        if lr == 0.0 or lr < step_min:
            self._warned_seed = True
            warnings.warn(
                f"step sizes were seeded from lr={lr!r}"
                + ("" if lr == 0.0 else f", below step_min={step_min!r}")
                + f": Rprop starts every step size at step_min={step_min!r}"
                + (" (0: they never grow)" if step_min == 0.0 else "")
                + ". lr is Rprop's initial step size, not a rate a schedule can raise "
                "later (a warmup from lr=0 has no effect); set lr to the initial step size "
                "you want (e.g. 0.01) before the first step, or "
                "optimizer.rescale_step_sizes(factor) afterwards.",
                LrSeedWarning,
                stacklevel=7,
            )

    def _loss_slot(self, group: dict[str, Any], device: torch.device) -> Tensor:
        """The tensor holding the group's E(t-1) on ``device``. E(t-1) is one
        number for the group (signed as its ``maximize`` compares it), so all
        its parameters' state dicts hold the same tensor per device and one
        write at the end of a step updates them all. A parameter joining
        later (its first gradient, add_param_group) shares it; on a new
        device it starts from the group's current value."""
        known = None
        for p in group["params"]:
            held = self.state[p].get(LOSS_STATE) if p in self.state else None
            if held is not None:
                if held.device == device:
                    return held
                known = held
        slot = torch.tensor(FIRST_PREV_LOSS, dtype=_loss_dtype(device), device=device)
        if known is not None:
            slot.copy_(known)
        return slot

    # -- the step -----------------------------------------------------------

    @use_grad_for_differentiable
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: Any = None
    ) -> Any:
        """Perform one optimisation step.

        Args:
            closure: re-evaluates the model and returns the loss (as in torch).
            loss: the loss at the current parameters (float or 0-dim tensor),
                for iRprop+ when the caller already computed it. Pass either
                this or ``closure``, not both.
        """
        if closure is not None and not callable(closure):
            raise TypeError(
                f"step()'s first argument is a closure (a function that returns the loss), "
                f"got a {type(closure).__name__}; pass a loss value as step(loss=...)")
        if closure is not None and loss is not None:
            raise ValueError("step() takes the loss from closure or from loss=, not both")
        # As torch's optimizers: capturing a CUDA graph with capturable=False
        # is an error, and capturable=True run uncaptured warns once.
        graph_capture_health_check(self)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GRprop reads all groups at once; groups changed by hand since they
        # were added are refused here, before any state is made.
        _grprop.check_groups(self.param_groups)
        if len(self._plans) > len(self.param_groups):
            # A group removed or replaced by hand: its plan would keep its
            # parameters and state alive.
            live = {id(group) for group in self.param_groups}
            self._plans = {k: plan for k, plan in self._plans.items() if k in live}
        work = []
        for group in self.param_groups:
            hyper, variant = self._checked_group(group)
            buckets = self._init_group(group, variant)
            if buckets:
                work.append((group, hyper, variant, buckets))
        for _, hyper, _, buckets in work:  # before anything is stepped
            for b in buckets:
                self._check_fits(hyper, b.prevs[0].dtype)
        needs_loss = any(variant.needs_loss for _, _, variant, _ in work)
        if needs_loss and loss is None:
            raise ValueError(
                'variant="irprop+" needs the loss at the current parameters: call '
                "step(closure) with a closure that returns the loss, or step(loss=loss_value)"
            )
        # step() returns the closure's (or loss=) value as given, as torch's
        # optimizers do; the variants that read it get it as a 0-dim tensor.
        loss_t = _as_loss(loss) if needs_loss else None
        if not self._finite_or_handled(work, loss_t):
            for group in self.param_groups:
                group["skipped_steps"] += 1
            return loss
        # A partitioned GRprop step joins the other ranks' collective also
        # when none of this rank's parameters has a gradient.
        if any(variant.adjust for _, _, variant, _ in work) or _grprop.partitioned(
                self.param_groups):
            for group, _, _, _ in work:
                self._warn_if_lr_changed(group)
            self.last_paths = _grprop.step(work, self.param_groups)
            return loss
        ran = []
        for group, hyper, variant, buckets in work:
            self._warn_if_lr_changed(group)
            for bucket in buckets:
                ran.append(self._step_bucket(group, hyper, variant, bucket, loss_t))
        self.last_paths = tuple(ran)
        if loss is not None:
            # Every group that keeps E(t-1) takes E(t), also a group none of
            # whose parameters had a gradient this step (its next step
            # compares with this loss).
            stepped = {id(group): buckets for group, _, _, buckets in work}
            for group in self.param_groups:
                hyper, variant = self._checked_group(group)
                if variant.needs_loss:
                    if loss_t is None:
                        loss_t = _as_loss(loss)
                    self._remember_loss(group, signed_loss(loss_t, hyper),
                                        stepped.get(id(group)))
        return loss

    def _check_state_holds(self, group: dict[str, Any], params: list[Tensor],
                           states: list[dict[str, Any]]) -> None:
        """A ValueError, before anything is stepped, for a parameter whose
        state is narrower than its values: its dtype changed after the state
        was made (``model.double()`` after a step), and stepping would round
        every update to the old dtype."""
        for p, st in zip(params, states, strict=True):
            prev = st.get("prev")
            if (prev is not None and p.is_floating_point() and prev.is_floating_point()
                    and torch.promote_types(p.dtype, prev.dtype) != prev.dtype):
                index = next(i for i, q in enumerate(
                    q for g in self.param_groups for q in g["params"]) if q is p)
                raise ValueError(
                    f"{describe_param(index, None)} is {p.dtype} but its state is {prev.dtype}: "
                    "its dtype changed after the optimizer made its state (model.double() "
                    "after a step, say). Create the optimizer after converting the model, or "
                    "load a state_dict saved for the new dtype")

    def _own_losses(self, group: dict[str, Any]) -> None:
        """Make the group's parameters hold the group's own E(t-1) tensors.
        A parameter moved into this group by hand still holds its old
        group's tensor, which that group keeps writing (signed by its own
        ``maximize``): it takes this group's instead, as a parameter joining
        the group would (:meth:`_loss_slot`)."""
        elsewhere = {id(self.state[p][LOSS_STATE]) for g in self.param_groups
                     if g is not group for p in g["params"]
                     if p in self.state and LOSS_STATE in self.state[p]}
        held = [self.state[p] for p in group["params"]
                if p in self.state and LOSS_STATE in self.state[p]]
        if not any(id(st[LOSS_STATE]) in elsewhere for st in held):
            return
        own = {st[LOSS_STATE].device: st[LOSS_STATE] for st in reversed(held)
               if id(st[LOSS_STATE]) not in elsewhere}
        for st in held:
            if id(st[LOSS_STATE]) in elsewhere:
                device = st[LOSS_STATE].device
                if device not in own:  # every one of them came from another group
                    own[device] = st[LOSS_STATE].clone()
                st[LOSS_STATE] = own[device]

    def _remember_loss(self, group: dict[str, Any], signed: Tensor,
                       buckets: list[Bucket] | None) -> None:
        """E(t-1) <- E(t) in the group's loss tensors (:meth:`_loss_slot`),
        found through this step's buckets when they hold every parameter of
        the group, else through its state: the parameters without a gradient
        take E(t) too, also where they do not share the tensor (a state dict
        copied, a second device), so that all hold the same number and no
        decision depends on how parameters are split into groups."""
        if buckets is not None and sum(len(b.params) for b in buckets) == len(group["params"]):
            slots = {id(t): t for b in buckets for t in b.prev_losses}
        else:
            slots = {id(t): t for p in group["params"]
                     if (t := self.state[p].get(LOSS_STATE) if p in self.state else None)
                     is not None}
        for t in slots.values():
            t.copy_(signed)

    def _check_fits(self, hyper: Hyper, dtype: torch.dtype) -> None:
        """:func:`check_fits_dtype`, remembered for pairs already checked."""
        if torch.compiler.is_compiling():  # traced once into constants; no cache to guard on
            check_fits_dtype(hyper, dtype)
        elif (hyper, dtype) not in self._fits:
            check_fits_dtype(hyper, dtype)
            if len(self._fits) > 64:
                self._fits.clear()
            self._fits.add((hyper, dtype))

    def _checked_group(self, group: dict[str, Any]) -> tuple[Hyper, Variant]:
        """:func:`_check_group`, remembered for hyperparameter values already seen."""
        if torch.compiler.is_compiling():  # traced once into constants; no cache to guard on
            return check_group(group)
        try:
            key = tuple(group[k] for k in self.defaults)
            return self._checked[key]
        except TypeError:  # an unhashable value (a list for etas, say): check every time
            return check_group(group)
        except KeyError:
            if len(self._checked) > 64:
                self._checked.clear()
            result = self._checked[key] = check_group(group)
            return result

    def _step_bucket(
        self, group: dict[str, Any], hyper: Hyper, variant: Variant, b: Bucket, loss: Any
    ) -> str:
        # A plain bucket shares device, dtypes and tensor type: its first
        # tensors speak for all of them when choosing the path.
        if b.plain:
            chosen = choose(group, variant, b.params[:1], b.grads[:1], b.prevs[:1])
        else:
            chosen = choose(group, variant, b.params, b.grads, b.prevs)
        path = chosen.step
        grads = b.grads
        if b.prevs[0].dtype != b.params[0].dtype:
            # Higher-precision state (state_dtype): the arithmetic runs in the
            # state's dtype and rounds once into the parameter.
            grads = [g.to(b.prevs[0].dtype) for g in grads]
        worse = None
        if variant.needs_loss:
            prev_loss = b.prev_losses[0]
            worse = loss_went_up(signed_loss(loss, hyper).to(prev_loss.device), prev_loss)
        tensors = [b.params, grads, b.prevs, b.step_sizes]
        prev_updates = b.prev_updates if variant.backtracks else None
        if not b.plain:
            tensors = real_views(*tensors)
            prev_updates = None if prev_updates is None else real_views(prev_updates)[0]
        params, grads, prevs, step_sizes = tensors
        prepared = b.prepared.get(chosen.name, _UNPREPARED)
        if prepared is _UNPREPARED:
            prepared = b.prepared[chosen.name] = (
                None if chosen.prepare is None or not b.plain or torch.compiler.is_compiling()
                else chosen.prepare(params, grads, prevs, step_sizes, prev_updates, b.steps))
        if prepared is not None and not prepared(params, grads, prevs, step_sizes, prev_updates,
                                                 steps=b.steps, hyper=hyper, variant=variant,
                                                 worse=worse):
            # Something moved since it was prepared: prepared again next step.
            del b.prepared[chosen.name]
            prepared = None
            b.check = None
        if prepared is not None and b.check is None and hasattr(prepared, "watch"):
            self._watch(group, b, prepared)
        if prepared is None:
            path(
                params, grads, prevs, step_sizes,
                prev_updates,
                steps=b.steps,
                hyper=hyper,
                variant=variant,
                worse=worse,
                differentiable=group["differentiable"],
            )
        if not b.plain and not {type(p) for p in b.params} <= PLAIN_TYPES:
            mark_written(b.params)  # the paths wrote the DTensors' local shards
        return chosen.name

    def _watch(self, group: dict[str, Any], b: Bucket, prepared: Any) -> None:
        """Let the plan re-check ``b`` through the prepared path's own bulk
        check (:attr:`Bucket.check`), when the bucket is the whole group as
        the plan gathered it and its tensors are the ones just stepped."""
        plan = self._plans.get(id(group))
        if (plan is not None and plan.indices is None and plan.buckets[0] is b
                and b.params is plan.params and len(b.params) == len(group["params"])
                and b.grads is not None and b.prevs[0].dtype == b.params[0].dtype
                and prepared.watch(group["params"], b.grads, plan.states, b.state_keys)):
            b.check = prepared.check

    def _finite_or_handled(self, work: list[Any], loss: Tensor | None) -> bool:
        """Apply the groups' ``nonfinite`` policy; False means skip this step.

        A group checks its own gradients, and the loss when its variant uses
        it; "raise" groups are checked first, so a "skip" group's NaN skips
        the step rather than raising for another group."""
        for mode in ("raise", "skip"):
            groups = [(g, v, bs) for g, _, v, bs in work if g["nonfinite"] == mode]
            if not groups:
                continue
            checked = [b for _, _, bs in groups for b in bs]
            uses_loss = loss is not None and any(v.needs_loss for _, v, _ in groups)
            culprit = first_nonfinite(self, checked, loss if uses_loss else None)
            if culprit is None:
                continue
            if mode == "raise":
                raise FloatingPointError(f"non-finite value in {culprit} (nonfinite='raise')")
            return False
        return True

    def _warn_if_lr_changed(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        # A Tensor lr is compared by identity and version (no host sync).
        seen = (id(lr), version(lr)) if isinstance(lr, Tensor) else float(lr)
        before = self._seen_lr.setdefault(id(group), seen)
        if before != seen:
            self._seen_lr[id(group)] = seen
            if not self._warned_lr:
                self._warned_lr = True
                warnings.warn(
                    "a param group's lr changed after its step sizes were seeded; Rprop "
                    "adapts step sizes on its own, so the change has no effect (as in "
                    "torch.optim.Rprop). To rescale the current step sizes, call "
                    "optimizer.rescale_step_sizes(factor).",
                    LrChangeWarning,
                    stacklevel=4,
                )

    @torch.no_grad()
    def rescale_step_sizes(self, factor: float | Tensor) -> None:
        """Multiply every current step size by ``factor`` (> 0), then clamp to
        each group's ``step_sizes`` bounds. This is the explicit way to do what
        an LR scheduler cannot do to Rprop. ``factor`` is a number in any form
        ``lr`` takes (Python or NumPy scalar, one-element tensor)."""
        try:
            factor = real_number("factor", factor)
        except TypeError:
            raise TypeError(f"factor must be a positive number, got {factor!r}") from None
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be a finite number > 0, got {factor}")
        for group in self.param_groups:
            lo, hi = group["step_sizes"]
            for p in group["params"]:
                step_size = self.state.get(p, {}).get("step_size")
                if step_size is not None:
                    view = torch.view_as_real(step_size) if step_size.is_complex() else step_size
                    view.mul_(factor).clamp_(lo, hi)


# A bucket no path has been asked to prepare yet (None: asked, nothing to reuse).
_UNPREPARED = object()


def _check_before_load(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The last load pre-hook of :meth:`Rprop.load_state_dict`: check the dict
    the user's pre-hooks left, keep the checked state for ``__setstate__`` to
    install, and hand torch's loader only the (checked) groups."""
    prepared, state = prepare_state_dict(optimizer, state_dict)
    optimizer.__dict__["_pending_state"] = state  # read by Rprop.__setstate__
    return prepared


def _loss_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _as_loss(loss: Any) -> Tensor:
    """The loss as a 0-dim float tensor (float64 unless it is a float tensor
    already: an integer tensor would wrap when negated)."""
    loss = check_loss(loss)
    if isinstance(loss, Tensor):
        loss = loss.detach().reshape(())
        return loss if loss.is_floating_point() else loss.to(torch.float64)
    if not isinstance(loss, float):  # a NumPy (or other) array of one element
        loss = float(loss.reshape(()) if hasattr(loss, "reshape") else loss)
    return torch.tensor(loss, dtype=torch.float64)


def _extras(variant: Variant) -> tuple[str, ...]:
    """The per-parameter state keys a step of ``variant`` reads beyond the
    ones every state has (torch.optim.Rprop's). Once per group and step, not
    per tensor; not cached, which torch.compile would refuse to trace."""
    needed = (*variant.state_keys, *((LOSS_STATE,) if variant.needs_loss else ()))
    return tuple(k for k in needed if k not in TORCH_STATE)


def _fresh_state(p: Tensor, grad: Tensor, group: dict[str, Any],
                 variant: Variant) -> dict[str, Tensor]:
    """The variant's initial per-array state, as torch.optim.Rprop makes its
    own: like the parameter, ``step_size`` like the gradient, in the state
    dtype; a Tensor lr fills as its value (torch's _to_scalar)."""
    lr = group["lr"]
    return init_state(p, Hyper(), variant, xp=torch, is_complex=p.is_complex(),
                      dtype=state_dtype_for(p, group), step_size_like=grad,
                      lr=lr.squeeze() if isinstance(lr, Tensor) else lr)
