"""GRprop's whole step in one pass over memory, on CPU.

The batched GRprop step (:mod:`rprop.torch._grprop`) adapts the step sizes,
gathers the products ``step * grad`` and the selection keys into flat
buffers, and reduces them: several passes over the gradients. The C kernel
(``rprop_grprop_step`` in ``_kernels/rprop_kernel.c``) does the adaptation,
the move, the selection and the sum in one pass, and leaves one coordinate
to finish here: the chosen one, whose step size the adjustment recomputes
(:func:`rprop._core.grprop_value`) and which then moves again from its old
value with that step size, with the same torch operations as the batched
step.

Every element but the chosen one gets the batched step's bits. The sum of
the other candidates' products is a compensated sum in another order than
the halves tree of :func:`rprop._core.sum_parts`: both are within about an
ulp of the exact sum, so the adjusted step size agrees with the batched
step's to about an ulp (tests/test_grprop_fused.py holds it to 1e-15
relative in float64). It does not depend on the number of threads.
"""

from __future__ import annotations

import math
from array import array
from operator import attrgetter

import torch
from torch import Tensor

from rprop._core import finish_sum, grprop_value, sum_parts
from rprop._hyper import Hyper
from rprop.torch._compat import PLAIN_TYPES
from rprop.torch._fused import _counter_kind, _etas_in, _overlap
from rprop.torch._kernel_cache import CODES, load_library
from rprop.torch._paths import increment_steps

__all__ = ["step", "unsupported"]

# rprop_grprop_step's code for tensors sharing memory it writes (gr_aliased).
_ALIASED = -3

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_is_contiguous = Tensor.is_contiguous
_get_is_cpu = attrgetter("is_cpu")
_get_dtype = attrgetter("dtype")


def unsupported(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor],
                step_sizes: list[Tensor], hypers: list[Hyper]) -> str | None:
    """Why the one-pass kernel cannot take this GRprop step, or None. It
    steps plain contiguous CPU tensors of one dtype, float32 or float64,
    state included, sharing no memory, whose groups agree on the etas,
    weight_decay and maximize (the adjustment's bounds and δ they share
    anyway)."""
    if not params:
        return "no parameter has a gradient"
    if not set(map(type, params)) <= PLAIN_TYPES:
        return "the fused GRprop step takes plain tensors (sharded ones take the batched step)"
    if not all(map(_get_is_cpu, params)):
        return "the fused GRprop step runs on CPU; on CUDA GRprop takes the batched step"
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return f"the fused GRprop step supports float32 and float64, got {dtype}"
    every = (*params, *grads, *prevs, *step_sizes)
    if set(map(_get_dtype, every)) != {dtype}:
        return "the fused GRprop step needs parameters, gradients and state of one dtype"
    if not all(map(_is_contiguous, every)):
        return "the fused GRprop step needs contiguous tensors"
    sizes = array("q", map(_numel, params))
    if not sizes == array("q", map(_numel, grads)) == array("q", map(_numel, prevs)) \
            == array("q", map(_numel, step_sizes)):
        # The kernel walks each parameter's element count in all four.
        return "the fused GRprop step needs gradients and state of their parameters' sizes"
    first = hypers[0]
    if any((h.eta_minus, h.eta_plus, h.weight_decay, h.maximize)
           != (first.eta_minus, first.eta_plus, first.weight_decay, first.maximize)
           for h in hypers):
        return "the fused GRprop step needs param groups that agree on etas, weight_decay " \
               "and maximize"
    if _overlap(array("q", map(_data_ptr, params)), array("q", map(_numel, params)),
                params[0].element_size()):
        return "the fused GRprop step needs parameters that share no memory"
    return None


@torch.compiler.disable  # an opaque kernel call: torch.compile runs it eagerly
def step(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor],
         step_sizes: list[Tensor], steps: list[Tensor], *, hyper: Hyper, adjust: str) -> None:
    """One GRprop step of tensors :func:`unsupported` accepts: the gradients
    are the raw ones (the kernel applies maximize and weight decay), the
    step counters are incremented."""
    dtype = params[0].dtype
    code = CODES[(dtype, dtype, dtype)]
    lib = load_library(code)
    # The kernel reads memory as it is: a negative view (z.conj().imag) holds
    # the negated values, so it is resolved (copied) first; others as given.
    grads = list(map(Tensor.resolve_neg, grads))
    n = len(params)
    ptrs = array("q")
    for ts in (params, grads, prevs, step_sizes, steps):
        ptrs.extend(map(_data_ptr, ts))
    base, word = ptrs.buffer_info()[0], n * ptrs.itemsize
    numels = array("q", map(_numel, params))
    kind = _counter_kind(steps)
    out = array("d", bytes(8 * 8))
    eta_minus, eta_plus = _etas_in(hyper, dtype)
    rc = lib.rprop_grprop_step(
        code, n, base, base + word, base + 2 * word, base + 3 * word, numels.buffer_info()[0],
        base + 4 * word if kind >= 0 else None, max(kind, 0), eta_minus, eta_plus,
        hyper.step_min, hyper.step_max, hyper.weight_decay, hyper.maximize,
        1 if adjust == "slr" else 0, torch.get_num_threads(), out.buffer_info()[0])
    if rc == _ALIASED:  # checked by the kernel, before it writes anything
        raise RuntimeError(
            "the fused GRprop step needs gradients and state that share no memory with the "
            "parameters or the state (a gradient may be its own parameter's memory)")
    if rc != 0:
        raise RuntimeError(f"the fused GRprop kernel rejected its arguments (code {rc})")
    if kind < 0:
        increment_steps(steps)
    if not out[0]:  # no non-zero gradient: nothing to adjust
        return
    where = int(out[1])
    t, starts = 0, 0
    while where >= starts + numels[t]:  # the tensor holding it
        starts += numels[t]
        t += 1
    local = where - starts
    size = step_sizes[t].view(-1)[local]
    param = params[t].view(-1)[local]
    g = torch.tensor(out[3], dtype=dtype)
    others = torch.tensor(out[4], dtype=dtype)
    if not bool(others.isfinite()):
        others = _tree_sum_of_others(prevs, step_sizes, where, hyper)
    value = grprop_value(others, g, hyper, torch)
    if bool(value == value):  # a NaN sum adjusts nothing
        size.copy_(value)
        param.fill_(out[2])  # its value before the move, exact in its dtype
        param.addcmul_(torch.sign(g), size, value=-1)


def _tree_sum_of_others(prevs: list[Tensor], step_sizes: list[Tensor], where: int,
                        hyper: Hyper) -> Tensor:
    """The batched step's sum of the other candidates' ``step * g`` (the
    halves tree of :func:`rprop._core.sum_parts`), for a kernel sum that is
    not finite: the kernel's order can overflow where the tree's does not
    (``A + A - A - A``), and an infinite or NaN sum decides the adjusted step
    size by its sign alone, so there the tree's result is taken. ``prevs``
    hold the effective gradients and ``step_sizes`` the adapted sizes."""
    products = torch.cat([(s * g).reshape(-1) for s, g in zip(step_sizes, prevs, strict=True)])
    if not math.isfinite(hyper.step_max):  # inf * 0 is NaN: a zero gradient adds 0
        keys = torch.cat([g.reshape(-1) for g in prevs])
        products.masked_fill_(keys == 0, 0)
    products[where] = 0
    return finish_sum(*sum_parts(products, torch), torch)
