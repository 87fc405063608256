"""Rprop inside BoTorch's ``fit_gpytorch_mll_torch`` (BoTorch is not imported)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from rprop.integrations._recorded_loss import RecordedLossRprop

__all__ = ["botorch_optimizer_kwargs"]


def botorch_optimizer_kwargs(
    *, callback: Callable[[dict[str, Tensor], Any], None] | None = None, **rprop_kwargs: Any
) -> dict[str, Any]:
    """``optimizer_kwargs`` for ``fit_gpytorch_mll(mll, optimizer=fit_gpytorch_mll_torch,
    optimizer_kwargs=...)`` that fit with Rprop (iRprop+ unless ``variant=`` says otherwise).

    BoTorch's ``torch_minimize`` evaluates the loss, passes it to its
    ``callback`` as ``result.fval``, then calls ``optimizer.step()`` with no
    closure, then clamps the parameters into their bounds. The returned
    ``"callback"`` records ``result.fval`` for the step that follows (then
    calls ``callback``, yours, if given); the ``"optimizer"`` factory makes a
    fresh :class:`RecordedLossRprop` with ``clamped=True`` for every fit
    attempt, so that an undo at a bound takes back the distance moved.

    Add BoTorch's other keys (``step_limit``, ``stopping_criterion``,
    ``timeout_sec``) to the returned dict as usual.
    """
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    rprop_kwargs.setdefault("variant", "irprop+")
    if "clamped" in rprop_kwargs:
        raise TypeError("botorch_optimizer_kwargs() sets clamped=True itself (BoTorch clamps "
                        "after every step); do not pass it")
    current: list[RecordedLossRprop] = []

    def optimizer(params: list[Tensor]) -> RecordedLossRprop:
        opt = RecordedLossRprop(params, clamped=True, **rprop_kwargs)
        current[:] = [opt]
        return opt

    def record(parameters: dict[str, Tensor], result: Any) -> None:
        current[-1].record_loss(result.fval)
        if callback is not None:
            callback(parameters, result)

    return {"optimizer": optimizer, "callback": record}
