"""The paths that can step a bucket of tensors, what each declares it can
run, and the one place that chooses among them.

A path is a function with the signature of :class:`StepPath` (every path
gives the same bits) plus a declaration (:class:`Path`): the variant
features it implements, whether it can run under ``differentiable=True``,
inside a CUDA graph capture, or while ``torch.compile`` traces, and a check
of the tensors themselves (device, dtypes, a compiler at hand). Paths
register themselves here when their module is imported (this module imports
none of them), in order of preference; :func:`choose` is the only code that
picks one. Whatever a path does not declare runs on the reference path,
which declares everything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from rprop._hyper import Hyper
from rprop._variants import ELEMENTWISE_FEATURES, Variant
from rprop._variants import FEATURES as ALL_FEATURES

__all__ = ["ALL_FEATURES", "Path", "StepPath", "choose", "paths", "reference", "register",
           "run_declined", "unregister"]


class StepPath(Protocol):
    """One Rprop step for a bucket: one device, one parameter dtype, one
    gradient dtype. All tensors arrive as real views; ``worse`` is None
    unless the variant needs the loss, else a 0-dim bool tensor."""

    def __call__(self, params: list[Tensor], grads: list[Tensor], prevs: list[Tensor],
                 step_sizes: list[Tensor], prev_updates: list[Tensor] | None, *,
                 steps: list[Tensor], hyper: Hyper, variant: Variant, worse: Any,
                 differentiable: bool = False) -> None: ...


# unsupported(params, grads, prevs, default) -> why not, or None
Unsupported = Callable[[list[Tensor], list[Tensor], list[Tensor], bool], "str | None"]


@dataclass(frozen=True)
class Path:
    """A path's declaration.

    ``unsupported(params, grads, prevs, default)`` says why the path cannot
    step these tensors (None if it can); ``default`` is True when the user
    left the choice to rprop (``fused=None``) rather than asking for the path.
    The lists may hold one representative tensor per bucket (a bucket shares
    device, dtypes and tensor type). Paths are tried in decreasing
    ``preference``; the reference path (``preference=0``) must declare every
    feature, and runs whatever the others cannot.

    ``prepare(params, grads, prevs, step_sizes, prev_updates, steps)``, if
    given, returns what later steps of the same bucket can reuse (or None):
    a callable taking the step's arguments (plus ``contiguous_grads``, True
    when the plan saw every gradient contiguous) that steps the bucket and
    returns True, or returns False without doing anything when the tensors
    no longer fit what it prepared (the path's ``step`` then runs, and the
    bucket is prepared again next step). The optimizer keeps it only while
    the bucket's parameters are unchanged (:mod:`rprop.torch._plan`).
    """

    name: str
    step: StepPath
    preference: int
    # A path claims the elementwise rule unless it says otherwise: a
    # whole-step phase (GRprop's adjustment) must be declared explicitly.
    features: frozenset[str] = ELEMENTWISE_FEATURES
    differentiable: bool = False
    capturable: bool = True
    compiling: bool = True
    unsupported: Unsupported | None = None
    prepare: Callable[..., Any] | None = None


_PATHS: dict[str, Path] = {}  # by name, most preferred first
_REFERENCE: list[Path] = []


def register(path: Path) -> Path:
    """Add ``path`` to the registry; return it."""
    if path.name in _PATHS and _PATHS[path.name] != path:
        raise ValueError(f"a different path is already registered as {path.name!r}")
    if path.preference == 0:
        if path.features != ALL_FEATURES or not path.differentiable:
            raise ValueError("the reference path (preference 0) must run everything")
        if _REFERENCE and _REFERENCE[0] != path:
            raise ValueError(f"a reference path is already registered: {_REFERENCE[0].name}")
        _REFERENCE[:] = [path]
    _PATHS[path.name] = path
    ordered = sorted(_PATHS.values(), key=lambda p: -p.preference)
    _PATHS.clear()
    _PATHS.update((p.name, p) for p in ordered)
    return path


def unregister(name: str) -> None:
    """Remove the path registered as ``name`` (not the reference path)."""
    if _REFERENCE and _REFERENCE[0].name == name:
        raise ValueError("the reference path cannot be unregistered")
    _PATHS.pop(name, None)


def paths() -> dict[str, Path]:
    """The registered paths by name, most preferred first."""
    return dict(_PATHS)


def reference() -> Path:
    """The path that runs everything (for-loop)."""
    return _REFERENCE[0]


def why_not(path: Path, variant: Variant, params: list[Tensor], grads: list[Tensor],
            prevs: list[Tensor], *, differentiable: bool, default: bool) -> str | None:
    """Why ``path`` cannot run this step, or None if it can."""
    missing = variant.features - path.features
    if missing:
        return (f"the {path.name} path does not implement {', '.join(sorted(missing))}, "
                f"which variant {variant.name!r} needs")
    if differentiable and not path.differentiable:
        return f"the {path.name} path does not support differentiable=True"
    if not path.compiling and torch.compiler.is_compiling():
        return f"the {path.name} path does not run under torch.compile"
    if not path.capturable and params[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return f"the {path.name} path cannot be captured in a CUDA graph"
    if path.unsupported is not None:
        return path.unsupported(params, grads, prevs, default)
    return None


def choose(group: dict[str, Any], variant: Variant, params: list[Tensor],
           grads: list[Tensor], prevs: list[Tensor]) -> Path:
    """The path for one bucket of a param group.

    ``differentiable=True`` takes the first path that declares it (the for-loop
    path). ``fused=True`` demands the fused path: a RuntimeError saying why if
    it cannot run, except inside a CUDA graph capture, which the fused path
    declares it cannot be part of (the capture records foreach instead).
    ``foreach`` set explicitly, or ``fused=False``, picks that plain path.
    Otherwise the most preferred path that can run. A path that lacks one of
    the variant's features is never chosen: the reference path runs it.
    """
    differentiable = group["differentiable"]
    registered = paths()
    if group["fused"]:
        fused = registered["fused"]
        why = why_not(fused, variant, params, grads, prevs, differentiable=differentiable,
                      default=False)
        if why is None:
            return fused
        if not (params[0].is_cuda and torch.cuda.is_current_stream_capturing()):
            raise RuntimeError(why)
        wanted = "foreach"
    elif group["foreach"] is not None or group["fused"] is False:
        wanted = "foreach" if group["foreach"] else reference().name
    else:
        wanted = None
    candidates = [registered[wanted]] if wanted is not None else list(registered.values())
    for path in candidates:
        if why_not(path, variant, params, grads, prevs, differentiable=differentiable,
                   default=True) is None:
            return path
    return reference()


def run_declined(declined_by: str, ordered: bool, params: list[Tensor], grads: list[Tensor],
                 prevs: list[Tensor], step_sizes: list[Tensor],
                 prev_updates: list[Tensor] | None, **kw: Any) -> None:
    """Step tensors a path was chosen for but cannot walk (a layout, a dtype
    combination it lacks): on the most preferred other path that can, or on
    the reference path when ``ordered`` (parameters that share memory must
    be stepped one after the other, in order)."""
    variant = kw["variant"]
    path = reference()
    if not ordered:
        for candidate in paths().values():
            if candidate.name != declined_by and why_not(
                candidate, variant, params, grads, prevs,
                differentiable=kw.get("differentiable", False), default=True,
            ) is None:
                path = candidate
                break
    path.step(params, grads, prevs, step_sizes, prev_updates, **kw)
