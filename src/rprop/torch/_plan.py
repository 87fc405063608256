"""What a param group's step reads, gathered once and re-checked each step.

With a thousand small tensors, gathering a group's tensors (which ones have
a gradient, their state, how they split by device and dtype) and checking
their layouts costs more than the arithmetic. :class:`GroupPlan` keeps the
result of one gathering and, at each later step, checks in bulk what could
have changed since:

* the group holds the same parameter objects, and the same ones have a
  gradient;
* ``optimizer.state`` is the same mapping and each parameter has the same
  state dict in it (a state replaced by ``load_state_dict``, Lightning's move
  to a device or by hand is seen); the state lists are read from the state
  dicts again at every step (a cheap pass each), so a tensor replaced in one
  is stepped as it is now;
* the parameters, gradients and state tensors keep their Python type,
  dtype, device, layout, sizes and strides (one C++ call for all of them,
  :func:`rprop.torch._compat.layout_guard`): a gradient in another dtype,
  a sparse one (refused by the gathering, before anything is stepped) or a
  transposed parameter is seen.

If anything differs the plan is dropped and gathered anew, so a step sees
the same tensors with or without it. Memory that moves under the same
tensor object (``p.data = ...``, a state tensor's ``.data`` reassigned,
``share_memory_()``) is not a change to the plan: the foreach and for-loop
paths step the tensor objects, and the fused CPU step
(:class:`rprop.torch._fused.Prepared`) compares the data pointers with its
table before each step.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any

from torch import Tensor

from rprop._variants import LOSS_STATE, Variant
from rprop.torch._compat import PLAIN_TYPES, layout_guard

__all__ = ["Bucket", "GroupPlan", "TrackedState"]

_get_grad = attrgetter("grad")
_is_contiguous = Tensor.is_contiguous


def _counted(name: str) -> Any:
    """defaultdict's method ``name``, counting one change per call."""
    method = getattr(defaultdict, name)

    def counted(self: TrackedState, *args: Any, **kwargs: Any) -> Any:
        self.version += 1
        return method(self, *args, **kwargs)

    counted.__name__ = name
    return counted


class TrackedState(defaultdict[Any, Any]):
    """``optimizer.state``: torch's ``defaultdict(dict)``, with a count of
    the changes made to it (a parameter's state dict added, replaced or
    removed), so that a plan sees them without looking every parameter up.
    What is inside a state dict the plan reads again at every step."""

    version: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.version = 0
        super().__init__(*args, **kwargs)

    __setitem__ = _counted("__setitem__")
    __delitem__ = _counted("__delitem__")
    __ior__ = _counted("__ior__")
    clear = _counted("clear")
    pop = _counted("pop")
    popitem = _counted("popitem")
    setdefault = _counted("setdefault")
    update = _counted("update")


class Bucket:
    """One (device, dtype, grad dtype) slice of a param group, as the paths
    take it. ``prepared`` holds what a path made of the bucket for later
    steps (:attr:`rprop.torch._path_registry.Path.prepare`), by path name."""

    __slots__ = ("check", "contiguous_grads", "grad_dtype", "grads", "params", "plain",
                 "prepared", "prev_losses", "prev_updates", "prevs", "step_sizes", "steps",
                 "variant")

    def __init__(self, params: list[Tensor], grads: list[Tensor],
                 states: list[dict[str, Any]], variant: Variant) -> None:
        self.params = params
        self.grads = grads
        self.grad_dtype = grads[0].dtype
        # Whether every gradient is contiguous, as far as a plan knows (set
        # by GroupPlan, which re-checks the gradients' strides each step).
        self.contiguous_grads: bool | None = None
        self.variant = variant
        self.read_state(states)
        # No complex parameter, no DTensor: the tensors are stepped as they are.
        self.plain = (not params[0].dtype.is_complex
                      and {type(p) for p in params} <= PLAIN_TYPES)
        self.prepared: dict[str, Any] = {}
        # A prepared path's bulk re-check of everything this bucket was
        # gathered from (``check(group_params, state_dicts)``, giving this
        # step's gradients or None), used by the plan instead of its own.
        self.check: Any = None

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The keys :meth:`read_state` reads from each state dict."""
        variant = self.variant
        return (*variant.state_keys, "step", *((LOSS_STATE,) if variant.needs_loss else ()))

    def read_state(self, states: list[dict[str, Any]]) -> None:
        """The state lists from the parameters' state dicts as they are now
        (a KeyError if one lacks a key the variant needs)."""
        variant = self.variant
        self.prevs: list[Tensor] = [s["prev"] for s in states]
        self.step_sizes: list[Tensor] = [s["step_size"] for s in states]
        self.steps: list[Tensor] = [s["step"] for s in states]
        self.prev_updates: list[Tensor] = (
            [s["prev_update"] for s in states] if variant.backtracks else [])
        self.prev_losses: list[Tensor] = (
            [s[LOSS_STATE] for s in states] if variant.needs_loss else [])


class GroupPlan:
    """One gathering of a group's tensors (see the module docstring)."""

    __slots__ = ("all_params", "buckets", "group", "has_grad", "indices", "layout", "params",
                 "state_map", "state_version", "states", "variant")

    def __init__(self, group: dict[str, Any], variant: Variant, state_map: Any,
                 params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                 buckets: list[Bucket], indices: list[list[int]] | None) -> None:
        self.group = group
        self.variant = variant
        self.state_map = state_map
        # A TrackedState says whether any state dict changed; another
        # mapping (set by hand) is looked up at every step.
        self.state_version = state_map.version if isinstance(state_map, TrackedState) else None
        self.all_params = list(group["params"])
        self.has_grad = bytes(g is not None for g in (p.grad for p in self.all_params))
        self.params = params
        self.states = states
        self.buckets = buckets
        # Types, dtypes, devices, layouts (a sparse gradient), sizes and
        # strides of the parameters, gradients and state tensors, checked in
        # one call: a state replaced by a narrower one, or viewed anew at its
        # own address (``s.data = s.data.t()``), makes the step gather again
        # (and refuse what the gathering refuses).
        self.layout = layout_guard([*params, *grads, *_state_tensors(buckets)])
        for b in buckets:
            b.contiguous_grads = all(map(_is_contiguous, b.grads))
        # Which of ``params`` each bucket holds; None: one bucket holds all.
        self.indices = indices

    def buckets_now(self, group: dict[str, Any], variant: Variant,
                    state_map: Any) -> list[Bucket] | None:
        """The buckets for this step, with this step's gradients, or None
        when something they were gathered from has changed."""
        if (group is not self.group or variant is not self.variant
                or state_map is not self.state_map):
            return None
        all_params = group["params"]
        if (self.indices is None and self.state_version is not None
                and state_map.version == self.state_version
                and (check := self.buckets[0].check) is not None):
            # One bucket holds the whole group, no state dict was replaced:
            # the prepared path's check covers everything below, in one call.
            grads = check(all_params, self.states)
            if grads is not None:
                self.buckets[0].grads = grads
                return self.buckets
        for b in self.buckets:
            # The checks below re-read the state lists, which the prepared
            # path's check may not cover: it is recorded again after a step.
            b.check = None
        if (len(all_params) != len(self.all_params)
                or not all(map(is_, all_params, self.all_params))):
            return None
        grads = list(map(_get_grad, all_params))
        params = self.params
        if len(grads) != len(params):
            # (When every parameter had a gradient, the layout check below
            # sees a None.)
            if bytes(map(is_not, grads, repeat(None))) != self.has_grad:
                return None
            grads = list(compress(grads, self.has_grad))
        if self.state_version is None or state_map.version != self.state_version:
            states = [state_map[p] for p in params]
            if not all(map(is_, states, self.states)):
                return None
            if self.state_version is not None:
                self.state_version = state_map.version
        else:
            states = self.states
        for i, b in enumerate(self.buckets):
            if self.indices is None:
                b_grads, b_states = grads, states
            else:
                b_grads = [grads[j] for j in self.indices[i]]
                b_states = [states[j] for j in self.indices[i]]
            try:
                b.read_state(b_states)  # the state tensors as they are now
            except KeyError:  # a key deleted by hand: gathered anew (a key only
                return None   # some variants keep is completed, torch's raise as in torch)
            b.grads = b_grads
        if not self.layout(*params, *grads, *_state_tensors(self.buckets)):
            return None
        return self.buckets


def _state_tensors(buckets: list[Bucket]) -> list[Tensor]:
    """The buckets' per-element state tensors (prev, step size, last update),
    in one list."""
    return [t for b in buckets for ts in (b.prevs, b.step_sizes, b.prev_updates) for t in ts]
