"""The NumPy front: :class:`Rprop` for NumPy training loops, and :func:`minimize`.

:class:`Rprop` updates a list (or dict) of NumPy arrays in place, one
``step(grads)`` at a time, with every variant of the algorithm core
(:func:`rprop._core.rprop_update`, here with ``xp=numpy``). It needs NumPy
only. :func:`minimize` (a SciPy-style minimizer, also usable as
``scipy.optimize.minimize(..., method=rprop.minimize)``) lives in
:mod:`rprop._minimize` and needs SciPy; it is loaded on first use.

Example (the classic minimal loop, f(x) = x² from x = 5)::

    import numpy as np
    from rprop.numpy import Rprop

    x = np.array([5.0])
    opt = Rprop([x], lr=0.1)
    for _ in range(100):
        opt.step([2 * x])          # x is updated in place
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rprop._core import (
    FIRST_PREV_LOSS,
    NONFINITE_MODES,
    check_loss,
    check_nonfinite,
    effective_grad,
    grprop_step,
    init_state,
    loss_went_up,
    rprop_update,
    signed_loss,
)
from rprop._hyper import DEFAULT_ETAS, DEFAULT_GRPROP_DELTA, DEFAULT_STEP_SIZES, Hyper
from rprop._variants import Variant, get_variant

if TYPE_CHECKING:
    from rprop._minimize import minimize

__all__ = ["NONFINITE_MODES", "Rprop", "minimize"]

def __getattr__(name: str) -> Any:
    # minimize needs SciPy: import it (and SciPy) only when asked for.
    if name == "minimize":
        from rprop._minimize import minimize

        globals()["minimize"] = minimize
        return minimize
    raise AttributeError(f"module 'rprop.numpy' has no attribute {name!r}")


def _check_hyper(
    lr: Any, etas: Any, step_sizes: Any, variant: Any, weight_decay: Any, maximize: Any,
    nonfinite: Any, grprop_delta: Any = DEFAULT_GRPROP_DELTA,
) -> tuple[Hyper, Variant, str]:
    hyper = Hyper.from_torch_args(lr, etas, step_sizes, weight_decay, maximize, grprop_delta)
    return hyper, get_variant(variant), check_nonfinite(nonfinite)


def _name(key: Any) -> str:
    return f"params[{key!r}]"


def _pairs(a: np.ndarray) -> np.ndarray:
    """A real view of a C-contiguous complex array, shape ``(..., 2)``; a real
    array is returned as is. Writing to the view writes to ``a``."""
    if not np.iscomplexobj(a):
        return a
    assert a.flags.c_contiguous, "state arrays are C-contiguous"
    return a.reshape(-1).view(a.real.dtype).reshape((*a.shape, 2))


def _as_pairs(a: np.ndarray) -> np.ndarray:
    """Real and imaginary parts as a new ``(..., 2)`` array (any layout)."""
    if not np.iscomplexobj(a):
        return a
    return np.stack([a.real, a.imag], axis=-1)


def _as_loss(loss: Any) -> float:
    checked = check_loss(np.asarray(loss) if isinstance(loss, (list, tuple)) else loss)
    return float(np.asarray(checked).reshape(()))


class Rprop:
    r"""Rprop over NumPy arrays, updated in place.

    Args:
        params: a list (or tuple) or a dict of NumPy arrays, floating-point or
            complex; each is updated in place by :meth:`step`. A complex array
            is treated as independent real and imaginary parts (as torch does).
        lr: initial step size Δ0 (every element starts with it).
        etas: ``(eta_minus, eta_plus)``, with ``0 < eta_minus < 1 < eta_plus``.
        step_sizes: ``(step_min, step_max)``, with ``0 <= step_min <= step_max``.
        variant: ``"irprop-"`` (default, as ``torch.optim.Rprop`` and
            :class:`rprop.Rprop`), ``"irprop+"``, ``"rprop+"`` or ``"rprop-"``.
            ``"irprop+"`` needs the loss at each step: ``step(grads, loss=...)``.
            ``"grprop-sag"`` / ``"grprop-slr"``: R neuralnet's GRprop, whose
            adjustment runs over all arrays at once (see docs/variants.md).
        weight_decay: coupled L2 penalty, ``grad + weight_decay * param``.
        maximize: maximise the objective instead.
        nonfinite: what a NaN/±inf gradient (or iRprop+ loss) does.
            ``"propagate"`` (default) behaves as torch: a NaN element keeps its
            parameter and step size, an infinite one counts as a large
            gradient. ``"skip"`` skips the whole step (params and state stay
            unchanged; :attr:`skipped_steps` counts it). ``"raise"`` raises a
            FloatingPointError naming the first offending array.
        grprop_delta: GRprop's δ (default 1e-6, neuralnet's); only the
            ``grprop-*`` variants read it.

    The state (:meth:`state_dict`) has, per array, ``prev`` (the gradient
    remembered for the sign test), ``step_size`` and, for ``rprop+`` and
    ``irprop+``, ``prev_update``; each has the array's shape and dtype (for
    a complex array, a step size ``s`` is stored as ``s + s*1j``, as torch
    does). With the same gradients, the trajectory is bitwise that of
    :class:`rprop.Rprop` and of the reference transcription of the papers.
    """

    def __init__(
        self,
        params: Sequence[np.ndarray] | Mapping[Any, np.ndarray],
        lr: float = 1e-2,
        etas: tuple[float, float] = DEFAULT_ETAS,
        step_sizes: tuple[float, float] = DEFAULT_STEP_SIZES,
        *,
        variant: str = "irprop-",
        weight_decay: float = 0.0,
        maximize: bool = False,
        nonfinite: str = "propagate",
        grprop_delta: float = DEFAULT_GRPROP_DELTA,
    ) -> None:
        self._hyper, self._variant, self._nonfinite = _check_hyper(
            lr, etas, step_sizes, variant, weight_decay, maximize, nonfinite, grprop_delta
        )
        self._params = params
        self._keys, self._arrays = _check_params(params)
        self._state: dict[Any, dict[str, np.ndarray]] = {
            k: self._fresh(p) for k, p in zip(self._keys, self._arrays, strict=True)
        }
        self.steps = 0
        self.skipped_steps = 0
        self.prev_loss = FIRST_PREV_LOSS

    # -- read-only views ----------------------------------------------------

    @property
    def params(self) -> Sequence[np.ndarray] | Mapping[Any, np.ndarray]:
        """The list or dict given to the constructor (its arrays are updated in place)."""
        return self._params

    @property
    def hyper(self) -> Hyper:
        return self._hyper

    @property
    def variant(self) -> Variant:
        return self._variant

    @property
    def nonfinite(self) -> str:
        return self._nonfinite

    @property
    def state(self) -> dict[Any, dict[str, np.ndarray]]:
        """Per-array state, by list index or dict key (the live arrays)."""
        return self._state

    def _fresh(self, p: np.ndarray) -> dict[str, np.ndarray]:
        # Made like a C-contiguous template: the complex views of the state
        # (_pairs) need that layout, whatever the parameter's.
        return init_state(np.zeros(p.shape, p.dtype), self._hyper, self._variant, xp=np,
                          is_complex=np.iscomplexobj(p))

    # -- the step -----------------------------------------------------------

    def step(self, grads: Sequence[Any] | Mapping[Any, Any], loss: Any = None) -> Any:
        """Update every array in place from its gradient.

        Args:
            grads: gradients in the same structure as ``params`` (a list of the
                same length, or a dict with the same keys), each with its
                array's shape; they are cast to the array's dtype. ``None``
                for an entry leaves that array and its state unchanged.
            loss: the loss at the current parameters; required by
                ``variant="irprop+"`` (to decide whether to undo), ignored
                otherwise.

        Returns ``loss``.
        """
        hyper, variant = self._hyper, self._variant
        prepared = self._prepare_grads(grads)
        signed = None
        if variant.needs_loss:
            if loss is None:
                raise ValueError(
                    'variant="irprop+" needs the loss at the current parameters: call '
                    "step(grads, loss=loss_value)"
                )
            signed = signed_loss(_as_loss(loss), hyper)
        if self._nonfinite != "propagate":
            culprit = self._first_nonfinite(prepared, signed)
            if culprit is not None:
                if self._nonfinite == "raise":
                    raise FloatingPointError(
                        f"non-finite value in {culprit} (nonfinite='raise')"
                    )
                self.skipped_steps += 1
                return loss
        worse = loss_went_up(signed, self.prev_loss) if variant.needs_loss else False
        with np.errstate(all="ignore"):  # NaN/inf propagate as in torch, silently
            if variant.adjust is not None:
                self._step_grprop(prepared, hyper, variant)
            else:
                for key, p, g in prepared:
                    self._step_array(p, g, self._state[key], hyper, variant, worse)
        if variant.needs_loss:
            assert signed is not None
            self.prev_loss = signed
        self.steps += 1
        return loss

    @staticmethod
    def _step_array(
        p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], hyper: Hyper,
        variant: Variant, worse: Any,
    ) -> None:
        prev_update = _pairs(state["prev_update"]) if variant.backtracks else None
        out = rprop_update(
            effective_grad(g, _as_pairs(p) if hyper.weight_decay else p, hyper),
            _pairs(state["prev"]),
            _pairs(state["step_size"]),
            prev_update,
            hyper=hyper,
            variant=variant,
            worse=worse,
            xp=np,
        )
        # State first: out.prev may be the caller's gradient array, and that
        # may be p itself (f = ||x||^2 / 2 has gradient x).
        _pairs(state["prev"])[...] = out.prev
        _pairs(state["step_size"])[...] = out.step_size
        if prev_update is not None:
            prev_update[...] = out.prev_update
        if np.iscomplexobj(p):
            p.real += out.delta[..., 0]
            p.imag += out.delta[..., 1]
        else:
            p += out.delta

    def _step_grprop(self, prepared: list[Any], hyper: Hyper, variant: Variant) -> None:
        """GRprop: its adjustment reads every array's gradient and step size
        (the arrays without a gradient this step take no part)."""
        states = [self._state[key] for key, _, _ in prepared]
        grads = [effective_grad(g, _as_pairs(p) if hyper.weight_decay else p, hyper)
                 for _, p, g in prepared]
        outs = grprop_step(grads, [_pairs(st["prev"]) for st in states],
                           [_pairs(st["step_size"]) for st in states],
                           hyper=hyper, variant=variant, xp=np)
        for (_, p, _), st, out in zip(prepared, states, outs, strict=True):
            # State first: out.prev may be the caller's gradient, maybe p itself.
            _pairs(st["prev"])[...] = out.prev
            _pairs(st["step_size"])[...] = out.step_size
            if np.iscomplexobj(p):
                p.real += out.delta[..., 0]
                p.imag += out.delta[..., 1]
            else:
                p += out.delta

    def _prepare_grads(self, grads: Any) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        """(key, param, real gradient in the param's real dtype) for each
        array with a gradient; every check happens before any update."""
        if isinstance(self._params, Mapping):
            if not isinstance(grads, Mapping):
                raise TypeError(
                    f"grads must be a dict with the same keys as params, got {type(grads).__name__}"
                )
            if set(grads) != set(self._keys):
                missing = [k for k in self._keys if k not in grads]
                extra = [k for k in grads if k not in self._state]
                raise ValueError(
                    f"grads must have the same keys as params; missing {missing}, extra {extra}"
                )
            listed = [grads[k] for k in self._keys]
        else:
            if isinstance(grads, np.ndarray) or not isinstance(grads, Sequence) or isinstance(
                grads, (str, bytes)
            ):
                raise TypeError(
                    "grads must be a list with one gradient per array in params, got "
                    f"{type(grads).__name__} (wrap a single gradient as [grad])"
                )
            if len(grads) != len(self._keys):
                raise ValueError(
                    f"grads has {len(grads)} entries, params has {len(self._keys)}"
                )
            listed = list(grads)
        out = []
        for key, p, g in zip(self._keys, self._arrays, listed, strict=True):
            if g is None:
                continue
            g = np.asarray(g)
            if g.shape != p.shape:
                raise ValueError(
                    f"the gradient of {_name(key)} has shape {g.shape}, the array has "
                    f"shape {p.shape}"
                )
            if g.dtype.kind == "c" and p.dtype.kind != "c":
                raise TypeError(
                    f"the gradient of {_name(key)} is complex ({g.dtype}) but the array "
                    f"is real ({p.dtype})"
                )
            if g.dtype.kind not in "biufc":
                raise TypeError(f"the gradient of {_name(key)} has dtype {g.dtype}, not numeric")
            with np.errstate(over="ignore"):  # a cast that overflows gives inf, as in torch
                g = g.astype(p.dtype, copy=False)
            out.append((key, p, _as_pairs(g)))
        return out

    @staticmethod
    def _first_nonfinite(prepared: list[Any], loss: float | None) -> str | None:
        if loss is not None and not math.isfinite(loss):
            return f"the loss ({loss})"
        for key, p, g in prepared:
            if not np.isfinite(g).all():
                return f"the gradient of {_name(key)} (shape {p.shape})"
        return None

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A deep copy of the optimizer's state and hyperparameters.

        ``{"hyperparams": {...}, "steps": int, "skipped_steps": int,
        "prev_loss": float, "state": {key: {"prev": array, "step_size": array,
        ["prev_update": array]}}}``, keyed by list index or dict key. It
        pickles, and :func:`numpy.savez` can store its arrays.
        """
        h = self._hyper
        return {
            "hyperparams": {
                "lr": h.lr,
                "etas": (h.eta_minus, h.eta_plus),
                "step_sizes": (h.step_min, h.step_max),
                "variant": self._variant.name,
                "weight_decay": h.weight_decay,
                "maximize": h.maximize,
                "nonfinite": self._nonfinite,
                "grprop_delta": h.grprop_delta,
            },
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "prev_loss": self.prev_loss,
            "state": {k: {n: a.copy() for n, a in s.items()} for k, s in self._state.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` (hyperparameters included).

        Everything is checked before anything changes: an unknown variant, a
        missing key, or a state array whose shape or dtype does not match its
        parameter raises a ValueError naming it, and leaves this optimizer as
        it was. The arrays are copied in.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("hyperparams", "steps", "skipped_steps", "prev_loss", "state")
                   if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict lacks {missing}")
        hp = state_dict["hyperparams"]
        if not isinstance(hp, Mapping):
            raise ValueError("state_dict['hyperparams'] must be a dict")
        names = ("lr", "etas", "step_sizes", "variant", "weight_decay", "maximize", "nonfinite",
                 "grprop_delta")
        # A state saved before grprop_delta existed lacks it: this optimizer's applies.
        if set(hp) not in (set(names), set(names[:-1])):
            raise ValueError(
                f"state_dict['hyperparams'] must have exactly the keys {list(names)}, "
                f"got {sorted(map(str, hp))}"
            )
        hp = {"grprop_delta": self._hyper.grprop_delta, **hp}
        try:
            hyper, variant, nonfinite = _check_hyper(*(hp[n] for n in names))
        except (TypeError, ValueError) as err:
            raise ValueError(f"state_dict['hyperparams']: {err}") from None
        counters = {}
        for name in ("steps", "skipped_steps"):
            value = state_dict[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"state_dict[{name!r}] must be an int >= 0, got {value!r}")
            counters[name] = int(value)
        try:
            prev_loss = _as_loss(state_dict["prev_loss"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"state_dict['prev_loss']: {err}") from None
        saved = state_dict["state"]
        if not isinstance(saved, Mapping) or set(saved) != set(self._keys):
            got = sorted(map(repr, saved)) if isinstance(saved, Mapping) else type(saved).__name__
            raise ValueError(
                f"state_dict['state'] must have one entry per array, keyed "
                f"{[*self._keys]}; got {got}"
            )
        needed = variant.state_keys
        state: dict[Any, dict[str, np.ndarray]] = {}
        for key, p in zip(self._keys, self._arrays, strict=True):
            entry = saved[key]
            where = f"{_name(key)} (shape {p.shape}, {p.dtype})"
            if not isinstance(entry, Mapping):
                raise ValueError(f"state of {where} must be a dict")
            lacking = [n for n in needed if n not in entry]
            if lacking:
                raise ValueError(
                    f"state of {where} lacks {lacking} (needed by variant {variant.name!r})"
                )
            state[key] = {}
            for n in needed:
                a = entry[n]
                if not isinstance(a, np.ndarray):
                    raise ValueError(
                        f"state {n!r} of {where} must be a NumPy array, got {type(a).__name__}"
                    )
                if a.shape != p.shape or a.dtype != p.dtype:
                    raise ValueError(
                        f"state {n!r} of {where} has shape {a.shape} and dtype {a.dtype}, "
                        f"expected {p.shape} and {p.dtype}"
                    )
                state[key][n] = np.array(a, order="C", copy=True)
        self._hyper, self._variant, self._nonfinite = hyper, variant, nonfinite
        self._state = state
        self.steps = counters["steps"]
        self.skipped_steps = counters["skipped_steps"]
        self.prev_loss = prev_loss

    def __repr__(self) -> str:
        h = self._hyper
        return (
            f"rprop.numpy.Rprop({len(self._keys)} arrays, lr={h.lr}, "
            f"etas=({h.eta_minus}, {h.eta_plus}), step_sizes=({h.step_min}, {h.step_max}), "
            f"variant={self._variant.name!r})"
        )


def _check_params(params: Any) -> tuple[list[Any], list[np.ndarray]]:
    if isinstance(params, Mapping):
        keys = list(params)
        arrays = [params[k] for k in keys]
    elif isinstance(params, Sequence) and not isinstance(params, (str, bytes)):
        keys = list(range(len(params)))
        arrays = list(params)
    else:
        hint = " (wrap a single array as [x])" if isinstance(params, np.ndarray) else ""
        raise TypeError(
            f"params must be a list or a dict of NumPy arrays, got {type(params).__name__}{hint}"
        )
    if not arrays:
        raise ValueError("params is empty: give at least one array to optimize")
    seen: dict[int, Any] = {}
    for key, p in zip(keys, arrays, strict=True):
        if not isinstance(p, np.ndarray):
            raise TypeError(
                f"{_name(key)} must be a NumPy array (updated in place), got {type(p).__name__}"
            )
        if p.dtype.kind not in "fc":
            raise TypeError(
                f"{_name(key)} must have a floating-point or complex dtype, got {p.dtype}"
            )
        if not p.flags.writeable:
            raise ValueError(f"{_name(key)} is read-only; Rprop updates arrays in place")
        if id(p) in seen:
            raise ValueError(f"{_name(key)} is the same array as {_name(seen[id(p)])}")
        seen[id(p)] = key
    return keys, arrays
