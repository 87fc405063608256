"""Checking a saved optimizer state before rprop.Rprop loads it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from rprop._variants import get_variant

# Per-parameter state keys: torch.optim.Rprop's, then our variants' extras.
REQUIRED = ("step", "prev", "step_size")
LIKE_PARAM = ("prev", "step_size", "prev_update")
SCALAR = ("step", "prev_loss")


def prepare_state_dict(
    optimizer: Any, state_dict: dict[str, Any]
) -> tuple[dict[str, Any], dict[int, dict[str, Tensor]]]:
    """Validate ``state_dict`` against ``optimizer``; return (groups-only
    state_dict for torch's loader, per-index state placed on the devices).

    Nothing of ``optimizer`` or of ``state_dict`` is modified; the returned
    tensors are copies, so later steps never write into the caller's dict.
    """
    from rprop.torch._optimizer import _check_group, describe_param

    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError("state_dict must be a dict with keys 'state' and 'param_groups'")
    if not isinstance(state_dict["state"], dict):
        raise ValueError("state_dict['state'] must be a dict (parameter index -> state)")
    saved_groups = state_dict["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups
    ):
        raise ValueError("state_dict['param_groups'] must be a list of dicts with a 'params' list")
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups, the optimizer has "
            f"{len(optimizer.param_groups)}"
        )
    groups = []
    params_by_index: dict[int, tuple[Tensor, dict[str, Any], dict[str, Any], str | None]] = {}
    for gi, (group, saved) in enumerate(zip(optimizer.param_groups, saved_groups, strict=True)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {gi} has {len(saved['params'])} params in state_dict, "
                f"{len(group['params'])} in the optimizer"
            )
        # Keys the saver did not have (torch.optim.Rprop has no variant) keep ours.
        merged = {k: v for k, v in group.items() if k != "params"}
        merged.update(copy.deepcopy({k: v for k, v in saved.items() if k != "params"}))
        merged["params"] = list(saved["params"])
        try:
            _check_group(merged)
            skipped = merged.get("skipped_steps", 0)
            if isinstance(skipped, bool) or not isinstance(skipped, int) or skipped < 0:
                raise ValueError(f"skipped_steps must be an int >= 0, got {skipped!r}")
        except (TypeError, ValueError) as err:
            raise ValueError(f"param group {gi} of state_dict: {err}") from None
        merged["variant"] = get_variant(merged["variant"]).name
        groups.append(merged)
        names = group.get("param_names") or [None] * len(group["params"])
        for index, p, name in zip(saved["params"], group["params"], names, strict=True):
            params_by_index[index] = (p, merged, saved, name)

    state: dict[int, dict[str, Tensor]] = {}
    for index, entry in state_dict["state"].items():
        if index not in params_by_index:
            raise ValueError(f"state_dict has state for parameter {index}, which no group lists")
        p, group, saved, name = params_by_index[index]
        state[index] = _check_entry(describe_param(index, name), p, group, "variant" in saved,
                                    entry)
    return {"state": {}, "param_groups": groups}, state


def _check_entry(
    param: str, p: Tensor, group: dict[str, Any], saver_had_variant: bool, entry: dict[str, Any]
) -> dict[str, Tensor]:
    from rprop.torch._optimizer import state_dtype_for

    where = f"{param} (shape {tuple(p.shape)}, {p.dtype})"
    variant = get_variant(group["variant"])
    needed = list(REQUIRED)
    if saver_had_variant:
        # Saved by rprop.Rprop with this variant: its extras must be there.
        # A torch.optim.Rprop state has none; they start fresh on the next step.
        needed += ["prev_update"] * variant.backtracks + ["prev_loss"] * variant.needs_loss
    missing = [k for k in needed if k not in entry]
    if missing:
        raise ValueError(f"state of {where} lacks {missing} (needed by variant {variant.name!r})")
    out: dict[str, Tensor] = {}
    for key, value in entry.items():
        if key not in LIKE_PARAM and key not in SCALAR:
            out[key] = copy.deepcopy(value)
            continue
        if not isinstance(value, Tensor):
            if key == "step" and isinstance(value, (int, float)):  # very old torch states
                value = torch.tensor(float(value))
            else:
                raise ValueError(f"state {key!r} of {where} must be a tensor, got {type(value)}")
        if key in LIKE_PARAM:
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(
                    f"state {key!r} of {where} has shape {tuple(value.shape)}, expected "
                    f"{tuple(p.shape)}"
                )
            expected = state_dtype_for(p, group)
            if value.dtype != expected:
                raise ValueError(
                    f"state {key!r} of {where} has dtype {value.dtype}, expected {expected}"
                )
            if key == "step_size":
                sizes = torch.view_as_real(value) if value.is_complex() else value
                if bool((sizes.isnan() | (sizes < 0)).any()):
                    raise ValueError(f"state 'step_size' of {where} has NaN or negative values")
            out[key] = value.to(device=p.device, copy=True)
        else:
            if value.numel() != 1:
                raise ValueError(f"state {key!r} of {where} must be a scalar tensor")
            if key == "step":
                device = p.device if group["capturable"] else torch.device("cpu")
                out[key] = value.to(device=device, copy=True).reshape(())
            else:
                out[key] = value.to(device=p.device, dtype=torch.float64
                                    if p.device.type != "mps" else torch.float32,
                                    copy=True).reshape(())
    return out
