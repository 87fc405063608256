"""The JAX front: Rprop as an optax gradient transformation, all four variants.

Unlike ``optax.rprop`` (0.2.8), whose every update is the previous step's
(so its first update is zero and the trajectory lags one step), the updates
here are the paper's from the first step, and the backtracking variants and
complex parameters are supported::

    import jax, jax.numpy as jnp, optax
    import rprop.optax

    opt = rprop.optax.rprop(1e-2, variant="irprop+")
    state = opt.init(params)

    @jax.jit
    def train_step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state, loss

Complex parameters: real and imaginary parts are independent reals (as in
torch). Following optax's convention, pass the *conjugate* of
``jax.grad``'s output for a complex leaf (``jax.tree.map(jnp.conj, grads)``):
``jax.grad`` of a real loss returns ``∂L/∂x - i ∂L/∂y``. The state of a
complex leaf is complex as well, with a step size ``s`` stored as ``s + s*1j``
(the same layout as :class:`rprop.Rprop` and :class:`rprop.numpy.Rprop`), so
every state leaf has its parameter's shape and dtype.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

try:
    import jax
    import jax.numpy as jnp
    import optax
except ImportError as err:  # pragma: no cover - exercised with jax hidden
    raise ImportError(
        'rprop.optax needs jax and optax, an optional extra: pip install "rprop[jax]"'
    ) from err

from rprop._core import (
    FIRST_PREV_LOSS,
    check_loss,
    effective_grad,
    grprop_step,
    init_state,
    loss_went_up,
    rprop_update,
    signed_loss,
)
from rprop._hyper import DEFAULT_ETAS, DEFAULT_GRPROP_DELTA, DEFAULT_STEP_SIZES, Hyper
from rprop._variants import Variant, get_variant

__all__ = ["ScaleByRpropState", "rprop", "scale_by_rprop"]


class ScaleByRpropState(NamedTuple):
    """State of :func:`scale_by_rprop`.

    ``step_sizes``, ``prev_grads`` and ``prev_updates`` are pytrees like the
    params (same shapes and dtypes). ``prev_updates`` (the last update, for
    undoing it) is ``None`` unless the variant backtracks (``rprop+``,
    ``irprop+``); ``prev_loss`` (a scalar, +inf at first) is ``None`` unless
    the variant is ``irprop+``. ``count`` is the number of updates (int32).
    """

    count: jax.Array  # type: ignore[assignment]  # as in optax's states
    step_sizes: optax.Updates
    prev_grads: optax.Updates
    prev_updates: optax.Updates | None
    prev_loss: jax.Array | None


# Hyper's messages use the torch-style names; say them as this front does.
_NAMES = [
    (r"\blr\b", "learning_rate"),
    (r"\bstep_sizes\b", "(min_step_size, max_step_size)"),
    (r"\bstep_min\b", "min_step_size"),
    (r"\bstep_max\b", "max_step_size"),
]


def _hyper(learning_rate: Any, eta_minus: Any, eta_plus: Any, min_step_size: Any,
           max_step_size: Any, grprop_delta: Any = DEFAULT_GRPROP_DELTA) -> Hyper:
    if callable(learning_rate):
        raise TypeError(
            "learning_rate must be a number: it is Rprop's initial step size, which then "
            "adapts per element, so a schedule has nothing to act on"
        )
    try:
        return Hyper(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size,
                     grprop_delta=grprop_delta)
    except (TypeError, ValueError) as err:
        message = str(err)
        for pattern, name in _NAMES:
            message = re.sub(pattern, name, message)
        raise type(err)(message) from None


def _to_real(x: jax.Array) -> jax.Array:
    """A complex array as (..., 2) reals; a real array as is."""
    if jnp.iscomplexobj(x):
        return jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    return x


def _from_real(x: jax.Array, dtype: Any) -> jax.Array:
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jax.lax.complex(x[..., 0], x[..., 1]).astype(dtype)
    return x


def _loss_dtype() -> Any:
    # float64 under jax_enable_x64, else float32: the widest float available,
    # so that the iRprop+ test E(t) > E(t-1) compares losses as given.
    return jnp.asarray(0.0).dtype


def scale_by_rprop(
    learning_rate: float,
    eta_minus: float = DEFAULT_ETAS[0],
    eta_plus: float = DEFAULT_ETAS[1],
    min_step_size: float = DEFAULT_STEP_SIZES[0],
    max_step_size: float = DEFAULT_STEP_SIZES[1],
    *,
    variant: str = "irprop-",
    grprop_delta: float = DEFAULT_GRPROP_DELTA,
) -> optax.GradientTransformationExtraArgs:
    """Rprop as an optax transformation, with optax's sign convention.

    Like ``optax.scale_by_rprop``, the updates it returns point *uphill*
    (chain it with ``optax.scale(-1.0)``, as :func:`rprop` does); unlike it,
    they are the current step's, not the previous one's.

    Args:
        learning_rate: initial step size Δ0 (a number; schedules do not apply).
        eta_minus, eta_plus: step-size factors, ``0 < eta_minus < 1 < eta_plus``.
        min_step_size, max_step_size: bounds on the step sizes.
        variant: ``"irprop-"`` (default, as optax and torch), ``"irprop+"``,
            ``"rprop+"`` or ``"rprop-"``. ``"irprop+"`` needs the loss at the
            current params: ``update(grads, state, params, value=loss)``.
            ``"grprop-sag"`` / ``"grprop-slr"``: R neuralnet's GRprop; its
            adjustment runs over all leaves at once (in tree-flatten order).
        grprop_delta: GRprop's δ (default 1e-6, neuralnet's); only the
            ``grprop-*`` variants read it.
    """
    hyper = _hyper(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size,
                   grprop_delta)
    var = get_variant(variant)

    def init_fn(params: optax.Params) -> ScaleByRpropState:
        leaves = jax.tree_util.tree_leaves_with_path(params)
        for path, p in leaves:
            dtype = jnp.asarray(p).dtype
            if not jnp.issubdtype(dtype, jnp.inexact):
                raise TypeError(
                    f"rprop.optax: every parameter must be floating-point or complex; "
                    f"params{jax.tree_util.keystr(path)} has dtype {dtype}"
                )

        def fresh(p: Any) -> dict[str, jax.Array]:
            p = jnp.asarray(p)
            return init_state(p, hyper, var, xp=jnp, is_complex=jnp.iscomplexobj(p),
                              dtype=p.dtype)

        leaves, treedef_ = jax.tree_util.tree_flatten(params)
        treedef: Any = treedef_
        states = [fresh(p) for p in leaves]

        def tree(key: str) -> Any:
            return treedef.unflatten([st[key] for st in states])

        return ScaleByRpropState(
            count=jnp.zeros([], jnp.int32),
            step_sizes=tree("step_size"),
            prev_grads=tree("prev"),
            prev_updates=tree("prev_update") if var.backtracks else None,
            prev_loss=(jnp.full((), FIRST_PREV_LOSS, dtype=_loss_dtype())
                       if var.needs_loss else None),
        )

    def update_fn(
        updates: optax.Updates, state: ScaleByRpropState, params: optax.Params | None = None,
        *, value: Any = None, **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByRpropState]:
        del params, extra_args
        worse: Any = False
        prev_loss = state.prev_loss
        if var.needs_loss:
            if value is None:
                raise ValueError(
                    'variant="irprop+" needs the loss at the current params: call '
                    "update(grads, state, params, value=loss)"
                )
            loss = jnp.asarray(value)
            try:
                check_loss(loss)
            except (TypeError, ValueError):
                raise ValueError(
                    f"value (the loss) must be a real scalar, got shape {loss.shape}, "
                    f"dtype {loss.dtype}"
                ) from None
            assert prev_loss is not None
            loss = signed_loss(loss.reshape(()).astype(prev_loss.dtype), hyper)
            worse = loss_went_up(loss, prev_loss)
            prev_loss = loss
        paths_grads, treedef_ = jax.tree_util.tree_flatten_with_path(updates)
        treedef: Any = treedef_
        step_sizes = treedef.flatten_up_to(state.step_sizes)
        prevs = treedef.flatten_up_to(state.prev_grads)
        prev_updates = (treedef.flatten_up_to(state.prev_updates)
                        if state.prev_updates is not None else [None] * len(prevs))
        if var.adjust is not None:
            outs = _grprop_leaves(paths_grads, step_sizes, prevs, hyper, var)
        else:
            outs = [
                _leaf(path, g, s, pv, pu, hyper, var, worse)
                for (path, g), s, pv, pu in zip(paths_grads, step_sizes, prevs, prev_updates,
                                                strict=True)
            ]
        new_state = ScaleByRpropState(
            count=optax.safe_increment(state.count),
            step_sizes=treedef.unflatten([o[2] for o in outs]),
            prev_grads=treedef.unflatten([o[1] for o in outs]),
            prev_updates=treedef.unflatten([o[3] for o in outs]) if var.backtracks else None,
            prev_loss=prev_loss,
        )
        # optax's convention for scale_by_*: the uphill direction.
        return treedef.unflatten([-o[0] for o in outs]), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _checked_grad(path: Any, g: Any, step_size: jax.Array) -> jax.Array:
    """The gradient of one leaf in its parameter's dtype, or a clear error."""
    g = jnp.asarray(g)
    where = f"grads{jax.tree_util.keystr(path)}"
    if g.shape != step_size.shape:
        raise ValueError(
            f"{where} has shape {g.shape}, its parameter has shape {step_size.shape}"
        )
    if jnp.iscomplexobj(g) and not jnp.iscomplexobj(step_size):
        raise TypeError(f"{where} is complex ({g.dtype}) but its parameter is real")
    return g.astype(step_size.dtype)


def _grprop_leaves(
    paths_grads: list[Any], step_sizes: list[jax.Array], prevs: list[jax.Array], hyper: Hyper,
    variant: Variant,
) -> list[tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]]:
    """GRprop over every leaf at once: its adjustment (an argmin and a sum
    over the concatenated leaves) reads them all; jit-compatible."""
    grads = [_to_real(_checked_grad(path, g, s)) for (path, g), s in
             zip(paths_grads, step_sizes, strict=True)]
    outs = grprop_step([effective_grad(g, None, hyper) for g in grads],
                       [_to_real(p) for p in prevs], [_to_real(s) for s in step_sizes],
                       hyper=hyper, variant=variant, xp=jnp)
    return [(_from_real(o.delta, s.dtype), _from_real(o.prev, s.dtype),
             _from_real(o.step_size, s.dtype), None) for o, s in zip(outs, step_sizes, strict=True)]


def _leaf(
    path: Any, g: Any, step_size: jax.Array, prev: jax.Array, prev_update: jax.Array | None,
    hyper: Hyper, variant: Variant, worse: Any,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """One leaf's step: (delta, prev, step_size, prev_update), in its dtype."""
    g = _checked_grad(path, g, step_size)
    dtype = step_size.dtype
    # weight_decay is 0 here (use optax.add_decayed_weights), so no param is needed.
    out = rprop_update(
        effective_grad(_to_real(g), None, hyper),
        _to_real(prev),
        _to_real(step_size),
        None if prev_update is None else _to_real(prev_update),
        hyper=hyper,
        variant=variant,
        worse=worse,
        xp=jnp,
    )
    return (
        _from_real(out.delta, dtype),
        _from_real(out.prev, dtype),
        _from_real(out.step_size, dtype),
        None if out.prev_update is None else _from_real(out.prev_update, dtype),
    )


def rprop(
    learning_rate: float,
    eta_minus: float = DEFAULT_ETAS[0],
    eta_plus: float = DEFAULT_ETAS[1],
    min_step_size: float = DEFAULT_STEP_SIZES[0],
    max_step_size: float = DEFAULT_STEP_SIZES[1],
    *,
    variant: str = "irprop-",
    grprop_delta: float = DEFAULT_GRPROP_DELTA,
) -> optax.GradientTransformationExtraArgs:
    """The Rprop optimizer for optax (a drop-in for ``optax.rprop``, without its lag).

    ``optax.chain(scale_by_rprop(...), optax.scale(-1.0))``, as ``optax.rprop``
    is built, so the state is ``(ScaleByRpropState, EmptyState())``. See
    :func:`scale_by_rprop` for the arguments; ``variant="irprop+"`` needs
    ``update(grads, state, params, value=loss)``.
    """
    return optax.chain(
        scale_by_rprop(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size,
                       variant=variant, grprop_delta=grprop_delta),
        optax.scale(-1.0),
    )
