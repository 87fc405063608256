"""Checking a saved optimizer state before rprop.Rprop loads it."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from rprop._variants import BASE_STATE, LOSS_STATE, UNDO_STATE, get_variant
from rprop.torch._compat import get_scalar_dtype
from rprop.torch._group import (
    check_fits_dtype,
    check_group,
    check_state_dtype,
    describe_param,
    state_dtype_for,
)
from rprop.torch._grprop import check_groups

# Per-parameter state keys: torch.optim.Rprop's (its step counter, then the
# state every variant keeps), the arrays a variant may keep, the scalars.
REQUIRED = ("step", *BASE_STATE)
LIKE_PARAM = (*BASE_STATE, UNDO_STATE)
SCALAR = ("step", LOSS_STATE)


def prepare_state_dict(
    optimizer: Any, state_dict: dict[str, Any]
) -> tuple[dict[str, Any], dict[Any, dict[str, Any]]]:
    """Validate ``state_dict`` against ``optimizer``; return (groups-only
    state_dict for torch's loader, the state keyed by parameter).

    Nothing of ``optimizer`` or of ``state_dict`` is modified; the returned
    tensors are copies placed on their parameters' devices, so later steps
    never write into the caller's dict. State under a key that is not a
    parameter index (a marker a hook wrote) is copied as is, as torch does.
    """
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
            hyper, _ = check_group(merged)
            for p in group["params"]:
                check_state_dtype(p, merged["state_dtype"], "a parameter of this group")
                check_fits_dtype(hyper, state_dtype_for(p, merged))
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

    # What GRprop reads across groups (they must agree; grprop_partitioned
    # must be a bool with a process group), as construction checks it.
    check_groups(groups)
    state: dict[Any, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        if not isinstance(index, int):
            state[index] = copy.deepcopy(entry)
            continue
        if index not in params_by_index:
            raise ValueError(f"state_dict has state for parameter {index}, which no group lists")
        p, group, saved, name = params_by_index[index]
        if not isinstance(entry, dict):
            raise ValueError(f"state of {describe_param(index, name)} must be a dict, "
                             f"got {type(entry).__name__}")
        state[p] = _check_entry(describe_param(index, name), p, group, "variant" in saved,
                                entry)
    _share_losses(state, optimizer.param_groups)
    return {"state": {}, "param_groups": groups}, state


def _share_losses(state: dict[Any, dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    """Give each group's parameters one E(t-1) tensor per device, as the
    optimizer keeps it (``Rprop._loss_slot``). It is one number for the
    group: a state_dict whose parameters disagree on it is refused."""
    for gi, group in enumerate(groups):
        slots: dict[torch.device, Tensor] = {}
        first: Tensor | None = None
        for p in group["params"]:
            entry = state.get(p)
            if entry is None or LOSS_STATE not in entry:
                continue
            value = entry[LOSS_STATE]
            if first is None:
                first = value
            elif not (torch.equal(value.to(first.device), first)
                      or (bool(value.isnan()) and bool(first.isnan()))):
                raise ValueError(
                    f"state 'prev_loss' differs between the parameters of param group {gi} "
                    f"({first.item()!r} and {value.item()!r}): it is the loss at the last "
                    "step, one number for the group")
            entry[LOSS_STATE] = slots.setdefault(value.device, value)


def _check_entry(
    param: str, p: Tensor, group: dict[str, Any], saver_had_variant: bool, entry: dict[str, Any]
) -> dict[str, Tensor]:
    where = f"{param} (shape {tuple(p.shape)}, {p.dtype})"
    variant = get_variant(group["variant"])
    needed = list(REQUIRED)
    if saver_had_variant:
        # Saved by rprop.Rprop with this variant: its extras must be there.
        # A torch.optim.Rprop state has none; they start fresh on the next step.
        needed += [k for k in variant.state_keys if k not in needed]
        needed += [LOSS_STATE] * variant.needs_loss
    missing = [k for k in needed if k not in entry]
    if missing:
        raise ValueError(f"state of {where} lacks {missing} (needed by variant {variant.name!r})")
    out: dict[str, Tensor] = {}
    for key, value in entry.items():
        if key not in LIKE_PARAM and key not in SCALAR:
            out[key] = copy.deepcopy(value)
            continue
        if not isinstance(value, Tensor):
            if key == "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                # a plain number, as old torch states have; torch makes it a tensor
                value = torch.tensor(float(value), dtype=get_scalar_dtype())
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
            if key == "prev_update" and not bool(torch.isfinite(value).all()):
                # The backtracking variants subtract it from the parameter.
                raise ValueError(
                    f"state 'prev_update' of {where} has NaN or infinite values; it must be "
                    "finite (it is the last update, undone on a sign change)")
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
