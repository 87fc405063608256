"""Rprop for training loops that call ``step()`` without a closure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rprop._variants import UNDO_STATE, get_variant
from rprop.torch._optimizer import Rprop

__all__ = ["RecordedLossRprop"]


class RecordedLossRprop(Rprop):
    """:class:`rprop.Rprop` for loops that compute the loss themselves and then
    call ``optimizer.step()`` with no closure (BoTorch's ``torch_minimize``,
    the Hugging Face ``Trainer``, Lightning's AMP plugin).

    iRprop+ compares the loss E(t) with E(t-1) before it undoes a step, so it
    needs E(t) at every step. A hook of the loop hands it over with
    :meth:`record_loss`; the next ``step()`` uses it. Each recorded loss serves
    one step: a ``step()`` with none recorded since the previous step raises a
    ValueError (for the variants that read the loss), so a stale loss is never
    taken for the current one. ``step(closure)`` and ``step(loss=...)`` work as
    in :class:`rprop.Rprop` and discard a recorded loss.

    Args:
        params, lr, etas, step_sizes, **kwargs: as :class:`rprop.Rprop`.
        clamped: the loop moves the parameters after each step, as BoTorch
            clamps them into their bounds. An undo (iRprop+, Rprop+) then takes
            back the distance the parameter actually moved, not the full step
            it was given, so that it returns to where it was instead of past
            it. Costs two copies of the parameters. Real parameters only.
    """

    def __init__(self, params: Any, *args: Any, clamped: bool = False, **kwargs: Any) -> None:
        if not isinstance(clamped, bool):
            raise TypeError(f"clamped must be a bool, got {type(clamped).__name__}")
        super().__init__(params, *args, **kwargs)
        self.clamped = clamped
        self._recorded: Any = None
        # Per parameter, where the last step found it and where it left it.
        self._moves: dict[Tensor, tuple[Tensor, Tensor]] = {}
        if clamped:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.is_complex():
                        raise TypeError("clamped=True supports real parameters only, got a "
                                        f"{p.dtype} parameter")

    def record_loss(self, loss: Any) -> None:
        """Hand over the loss at the current parameters, for the next ``step()``.
        A second call before that step replaces the first."""
        if loss is None:
            raise TypeError("record_loss() needs the loss (a float or a 0-dim tensor), got None")
        self._recorded = loss

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        recorded, self._recorded = self._recorded, None
        if closure is None and loss is None:
            if recorded is None and self._needs_loss():
                raise ValueError(
                    "no loss was recorded since the last step: call record_loss(loss) with the "
                    "loss at the current parameters before every step() (or pass step(closure) "
                    "or step(loss=...))")
            loss = recorded
        if not self.clamped:
            return super().step(closure, loss=loss)
        with torch.no_grad():
            self._count_what_the_loop_moved()
            before = {p: p.detach().clone() for g in self.param_groups for p in g["params"]}
        out = super().step(closure, loss=loss)
        with torch.no_grad():
            self._moves = {p: (x, p.detach().clone()) for p, x in before.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :class:`rprop.Rprop`'s, and forget the recorded loss and where the
        last step left the parameters: both describe the run before the load."""
        super().load_state_dict(state_dict)
        self._recorded = None
        self._moves = {}

    def _needs_loss(self) -> bool:
        return any(get_variant(g["variant"]).needs_loss for g in self.param_groups)

    def _count_what_the_loop_moved(self) -> None:
        """Where the loop moved a parameter after the last step (a clamp), the
        update to undo becomes the distance from where that step started, as
        :func:`rprop.torch.minimize` keeps it under bounds."""
        for p, (x_before, x_after) in self._moves.items():
            st = self.state.get(p)
            if not st or UNDO_STATE not in st:
                continue
            pu = st[UNDO_STATE]
            moved = (p != x_after) & (pu != 0)
            if bool(moved.any()):
                pu.copy_(torch.where(moved, (p - x_before).to(pu.dtype), pu))
