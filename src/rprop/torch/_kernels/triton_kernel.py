"""The fused Rprop step for CUDA, as one Triton kernel launch per group.

The same arithmetic as ``rprop_kernel.c`` (and so as
:func:`rprop._core.rprop_update`), per element and in the same order; see that
file for the numerics. One launch steps every tensor of a (device, dtype)
group: a table of data pointers (params, grads, prevs, step sizes, last
updates) and a table mapping each block of ``BLOCK`` elements to its tensor
and offset, so the launch count does not grow with the number of tensors.

Numerics specific to Triton: the kernel is launched with
``enable_fp_fusion=False`` (otherwise ``g + wd * param`` may become one fused
multiply-add, rounding once where torch rounds twice); every intermediate is
rounded to its torch dtype with explicit casts (round-to-nearest-even); the
hyperparameters are passed in a small tensor of the compute dtype, already
rounded as torch rounds them. iRprop+'s "loss went up" flag is read on the
device, so a step needs no host synchronisation.

Triton is optional: importing this module imports it. With
``TRITON_INTERPRET=1`` set when this module is imported, the kernel runs on
CPU tensors in Triton's interpreter, which is how it is tested on machines
without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from array import array
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
PU_NONE, PU_UNDO, PU_IF_WORSE = 0, 1, 2

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
       torch.bfloat16: tl.bfloat16}


@triton.jit
def _cast(x, T: tl.constexpr, CT: tl.constexpr):
    """``x`` (of the compute dtype CT) stored as T: round to nearest even.

    float32 -> bfloat16 is spelled out in integer arithmetic (torch's
    c10::BFloat16 rounding; NaN becomes 0x7FC0): it is what GPUs do for
    non-NaN values, and Triton's interpreter would otherwise truncate."""
    if T == CT:
        return x
    elif T == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(T, fp_downcast_rounding="rtne")


@triton.jit
def _rnd(x, T: tl.constexpr, CT: tl.constexpr):
    """``x`` rounded to T's precision, back in the compute dtype CT."""
    return _cast(x, T, CT).to(CT)


@triton.jit(do_not_specialize=["n"])
def _rprop_kernel(
    ptrs, blk_tensor, blk_start, numels, hyp, worse, n,
    PT: tl.constexpr, GT: tl.constexpr, ST: tl.constexpr, CT: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr, FORGET: tl.constexpr, PU: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    offs = tl.load(blk_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numels + t)
    param_ptr = tl.load(ptrs + t).to(tl.pointer_type(PT))
    grad_ptr = tl.load(ptrs + n + t).to(tl.pointer_type(GT))
    prev_ptr = tl.load(ptrs + 2 * n + t).to(tl.pointer_type(ST))
    step_ptr = tl.load(ptrs + 3 * n + t).to(tl.pointer_type(ST))
    eta_minus = tl.load(hyp + 0)
    eta_plus = tl.load(hyp + 1)
    lo = tl.load(hyp + 2)
    hi = tl.load(hyp + 3)
    wd = tl.load(hyp + 4)

    param = tl.load(param_ptr + offs, mask=mask).to(CT)
    g = tl.load(grad_ptr + offs, mask=mask).to(CT)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = _rnd(g + _rnd(wd * param, PT, CT), GT, CT)
    p = _rnd(g * tl.load(prev_ptr + offs, mask=mask).to(CT), ST, CT)
    s = tl.load(step_ptr + offs, mask=mask).to(CT)
    grown = _rnd(s * eta_plus, ST, CT)
    shrunk = _rnd(s * eta_minus, ST, CT)
    s = tl.where(p > 0, grown, tl.where(p < 0, shrunk, s))
    s = tl.where(s < lo, lo, s)  # NaN compares false: it stays NaN, as in torch.clamp
    s = tl.where(s > hi, hi, s)
    flip = p < 0
    if FORGET:
        g = tl.where(flip, 0.0, g).to(CT)
    sg = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(CT)
    update = -(sg * s)
    delta = update
    if PU != 0:
        pu_ptr = tl.load(ptrs + 4 * n + t).to(tl.pointer_type(ST))
        undo = flip
        if PU == 2:
            undo = flip & (tl.load(worse) != 0)
        delta = tl.where(undo, -tl.load(pu_ptr + offs, mask=mask).to(CT), update)
        tl.store(pu_ptr + offs, _cast(update, ST, CT), mask=mask)
    tl.store(param_ptr + offs, _cast(param + delta, PT, CT), mask=mask)
    tl.store(prev_ptr + offs, _cast(g, ST, CT), mask=mask)
    tl.store(step_ptr + offs, _cast(s, ST, CT), mask=mask)


@functools.lru_cache(maxsize=64)
def _blocks(numels: bytes, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """Block tables for tensors of these sizes: tensor index and first
    element of each block, the sizes, and the number of blocks."""
    sizes = torch.frombuffer(bytearray(numels), dtype=torch.int64)
    counts = (sizes + BLOCK - 1) // BLOCK
    total = int(counts.sum())
    tensor = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), counts)
    first = torch.cumsum(counts, 0) - counts  # first block of each tensor
    start = (torch.arange(total, dtype=torch.int64) - first[tensor.long()]) * BLOCK
    return tensor.to(device), start.to(device), sizes.to(device), total


@functools.lru_cache(maxsize=64)
def _hyper_tensor(hyper: Any, cdt: torch.dtype, sdt: torch.dtype, device: torch.device) -> Tensor:
    """eta_minus, eta_plus, step_min, step_max, weight_decay as torch rounds
    them: the etas and the bounds in the state's dtype (torch multiplies by a
    factor tensor of that dtype, and clamp compares in it), then widened to
    the compute dtype."""
    bounds = torch.tensor([hyper.step_min, hyper.step_max], dtype=cdt).to(sdt).to(cdt)
    etas = torch.tensor([hyper.eta_minus, hyper.eta_plus], dtype=sdt).to(cdt)
    return torch.cat([etas, bounds,
                      torch.tensor([hyper.weight_decay], dtype=cdt)]).to(device)


def step(
    params: list[Tensor], grads: list[Tensor], prevs: list[Tensor], step_sizes: list[Tensor],
    prev_updates: list[Tensor] | None, *, hyper: Any, variant: Any, worse: Tensor | None,
) -> None:
    """One Rprop step over a (device, dtype) group of dense tensors laid out
    alike (the caller checks; the step counters are not touched here)."""
    n = len(params)
    device = params[0].device
    pdt, gdt, sdt = params[0].dtype, grads[0].dtype, prevs[0].dtype
    cdt = torch.float64 if sdt == torch.float64 else torch.float32
    numels = array("q", (p.numel() for p in params))
    blk_tensor, blk_start, sizes, total = _blocks(numels.tobytes(), device)
    if total == 0:
        return
    ptrs = array("q")
    for ts in (params, grads, prevs, step_sizes, prev_updates or prevs):
        ptrs.extend(t.data_ptr() for t in ts)
    # non_blocking: no wait for the work queued before this step (the copy
    # from pageable memory is staged before the call returns).
    table = torch.frombuffer(ptrs, dtype=torch.int64).to(device, non_blocking=True)
    hyp = _hyper_tensor(hyper, cdt, sdt, device)
    if not variant.backtracks:
        pu = PU_NONE
    else:
        pu = PU_UNDO if variant.undo == "always" else PU_IF_WORSE
    flag = worse.view(torch.uint8) if worse is not None else hyp
    # Triton launches on the *current* device and its current stream, not on
    # its arguments' device: make that the tensors' device (cuda:1 stepped
    # while cuda:0 is current would otherwise read cuda:1 pointers on cuda:0).
    # The interpreter runs on CPU tensors, where there is no device to set.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _rprop_kernel[(total,)](
            table, blk_tensor, blk_start, sizes, hyp, flag, n,
            PT=_TL[pdt], GT=_TL[gdt], ST=_TL[sdt], CT=_TL[cdt],
            MAXIMIZE=bool(hyper.maximize), HAS_WD=hyper.weight_decay != 0.0,
            FORGET=bool(variant.forget), PU=pu, BLOCK=BLOCK, enable_fp_fusion=False,
        )
