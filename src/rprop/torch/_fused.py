"""The fused step: one pass over memory per (device, dtype) group.

On CPU, a small C kernel (``_kernels/rprop_kernel.c``: plain C with OpenMP,
no Python or torch headers) is compiled at first use with the system C
compiler, cached on disk, and loaded with :mod:`ctypes`. One call steps every
tensor of a group: Python hands over arrays of data pointers and element
counts, the kernel splits the concatenated elements between threads and
reads and writes each element once. Nothing proportional to the parameter
count is allocated.

The kernel performs the same IEEE operations as :func:`rprop._core.rprop_update`
in the same order and precision (compiled with ``-ffp-contract=off``), so its
results are bitwise those of :func:`rprop.torch._paths.single_tensor`, for
float32, float64, float16 and bfloat16.

The library comes from :mod:`rprop.torch._kernel_cache`: compiled once per
machine and compiler, cached on disk, verified (size and sha256 digest) and
trust-checked (owner, permissions) before it is loaded.

On CUDA, ``fused=True`` runs the Triton kernel of ``_kernels/triton_kernel.py``
(one launch per group; Triton is optional) and ``fused=None`` the foreach
path until that kernel has been verified on a GPU (``CUDA_BY_DEFAULT``).
See docs/fused.md.
"""

from __future__ import annotations

import functools
from array import array
from itertools import chain
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from rprop._hyper import Hyper
from rprop._variants import Variant
from rprop.torch._compat import PLAIN_TYPES, local_tensor
from rprop.torch._kernel_cache import CODES, REAL_OF, kernel_info, load_library
from rprop.torch._path_registry import ALL_FEATURES, Path, register, run_declined
from rprop.torch._paths import increment_steps
from rprop.torch._tensor_table import TableCheck, record
from rprop.torch._tensors import mark_written

__all__ = ["Prepared", "available", "fused_step", "kernel_info", "prepare", "require"]

# prev_update handling (PU_* in the C source).
PU_NONE, PU_UNDO, PU_KEEP = 0, 1, 2
# Tensor types the kernel may read through data_ptr() are PLAIN_TYPES. A
# DTensor reaches the kernel as its local shard (a plain tensor, see
# _compat.local_tensor); other subclasses (fake, functional, wrapper tensors)
# keep the plain paths.

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_is_contiguous = Tensor.is_contiguous
_is_neg = Tensor.is_neg
_get_is_cpu = attrgetter("is_cpu")
_get_dtype = attrgetter("dtype")


# -- can it run? ----------------------------------------------------------------


# Whether fused=None uses the Triton kernel on CUDA. Off until the CUDA tests
# (tests/test_cuda.py) have passed on a GPU: the kernel is verified bitwise
# in Triton's interpreter only; `make gpu-check` runs them on a GPU machine.
CUDA_BY_DEFAULT = False


def _triton() -> Any:
    """The Triton kernel module, or a str saying why it cannot be had."""
    global _triton_module
    if _triton_module is None:
        try:
            from rprop.torch._kernels import triton_kernel
        except ImportError as err:
            _triton_module = (f"fused=True on CUDA needs Triton ({err}; pip install triton); "
                              "foreach=True is the mask-free alternative")
        else:
            _triton_module = triton_kernel
    return _triton_module


_triton_module: Any = None


def _unsupported(params: list[Tensor], default: bool = False) -> str | None:
    """Why the fused kernel cannot step these parameters, or None.
    ``default``: asked for ``fused=None`` rather than ``fused=True``."""
    if not set(map(type, params)) <= PLAIN_TYPES:
        # A DTensor steps its local shard, a plain tensor (see local_tensor).
        params = [local_tensor(p) for p in params]
        others = sorted({type(p).__name__ for p in params if type(p) not in PLAIN_TYPES})
        if others:
            return f"fused=True supports plain tensors and DTensors, got {', '.join(others)}"
    dtypes = set(map(_get_dtype, params))
    for dtype in dtypes:
        real = REAL_OF.get(dtype, dtype)
        if (real, real, real) not in CODES:
            return f"fused=True does not support dtype {dtype}"
    devices = {"cpu"} if all(map(_get_is_cpu, params)) else {p.device.type for p in params}
    if not devices <= {"cpu", "cuda"}:
        return (f"fused=True runs on CPU and CUDA, got parameters on "
                f"{', '.join(sorted(devices - {'cpu', 'cuda'}))}; use foreach=True there")
    if "cuda" in devices:
        if default and not CUDA_BY_DEFAULT:
            return "fused=None takes the foreach path on CUDA (see _fused.CUDA_BY_DEFAULT)"
        triton = _triton()
        if isinstance(triton, str):
            return triton
    if "cpu" in devices:
        for dtype in dtypes:
            real = REAL_OF.get(dtype, dtype)
            try:
                load_library(CODES[(real, real, real)])
            except RuntimeError as err:
                return str(err)
    return None


def _unsupported_here(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor],
                      default: bool) -> str | None:
    """The fused path's check for the path registry. Left to choose
    (``fused=None``), it also gives way to foreach under torch.compile, which
    traces foreach without the graph break an opaque kernel call makes."""
    if default and torch.compiler.is_compiling():
        return "fused=None takes the foreach path under torch.compile"
    return _unsupported(params, default)


def available(params: list[Tensor]) -> bool:
    """Whether ``fused=None`` should take the fused kernel for ``params``: it
    can step every one of them (compiling the CPU kernel on the first call
    that needs it). False while torch.compile traces the step: the foreach
    path traces without graph breaks, an opaque kernel call would not."""
    if torch.compiler.is_compiling():
        return False
    return _unsupported(params, default=True) is None


def require(params: list[Tensor]) -> None:
    """Raise a RuntimeError saying why the fused kernel cannot run, if it cannot."""
    why = _unsupported(params)
    if why is not None:
        raise RuntimeError(why)


# -- the step -------------------------------------------------------------------


class Prepared:
    """A CPU bucket the kernel can walk, ready for later steps: the pointer
    table of its parameters, state and step counters, built once.

    The optimizer calls it only while its :class:`rprop.torch._plan.GroupPlan`
    holds: the same parameter objects, and parameters, gradients and state
    tensors with the sizes, strides and dtypes they had when this was
    prepared (contiguous, as :func:`prepare` required). What the plan does not
    see is where the memory is, so each call first checks that the
    parameters, state tensors and step counters of this step are where the
    table points (``p.data = ...``, a state tensor replaced, its
    ``.data`` reassigned, or ``share_memory_()``, which frees the old memory,
    all move them). Then it adds the gradients' pointers (a table of its own,
    rebuilt only when they move).

    It holds the state's storages, so that no other tensor can be allocated
    where the table points while it is alive: an equal pointer is the memory
    it was built for.

    :meth:`watch` and :meth:`check` make the optimizer's re-check of the
    bucket and this table's one C++ call (:mod:`rprop.torch._tensor_table`):
    a step whose gradients :meth:`check` has given back skips both."""

    __slots__ = ("backtracks", "checked", "code", "grad_list", "grad_ptrs", "head", "head_list",
                 "held", "kind", "lib", "n", "numels", "storages", "table")

    def __init__(self, lib: Any, code: int, params: list[Tensor], states: list[list[Tensor]],
                 steps: list[Tensor]) -> None:
        self.lib, self.code, self.n = lib, code, len(params)
        self.backtracks = len(states) == 3
        self.head_list = list(map(_data_ptr, chain(params, *states, steps)))

        self.head = array("q", self.head_list)
        self.numels = array("q", map(_numel, params))
        self.kind = _counter_kind(steps)
        self.held = [t for ts in (*states, steps) for t in ts]
        self.storages = [t.untyped_storage() for t in self.held]
        self.grad_list: list[int] = []
        self.grad_ptrs = array("q", bytes(8 * self.n))  # written in place, never replaced
        # The gradient list a TableCheck gave back for this step, if any.
        self.checked: list[Tensor] | None = None
        self.table: TableCheck | None = None

    def watch(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
              keys: tuple[str, ...]) -> bool:
        """Record ``params`` (the group's whole parameter list, as this table
        holds it), their state dicts' tensors under ``keys`` (the state lists
        this table was built from) and the gradients' layouts for
        :meth:`check`; False when the C++ helper is not (yet) loaded. Called
        right after a step through this table, so the recorded pointers are
        the table's."""
        self.table = record(params, states, keys, grads, self.grad_ptrs)
        return self.table is not None

    def check(self, params: list[Tensor], states: list[dict[str, Any]]) -> list[Tensor] | None:
        """This step's gradients when the group's parameters, their state
        tensors and the gradients' layouts are those :meth:`watch` recorded
        (their pointers then fill the gradient table, and the step that
        passes this list skips its own checks); else None."""
        table = self.table
        # The check writes the gradient table as it goes, also when it then
        # answers "differs" or its step is not taken (skipped, or another
        # path chosen): the next step through the Python checks rewrites it.
        self.grad_list = []
        self.checked = grads = None if table is None else table(params, states)
        return grads

    def __call__(self, params: list[Tensor], grads: list[Tensor], prevs: list[Tensor],
                 step_sizes: list[Tensor], prev_updates: list[Tensor] | None, *,
                 steps: list[Tensor], hyper: Hyper, variant: Variant, worse: Any) -> bool:
        """Step, if this step's tensors line up with the table (else False:
        nothing done)."""
        checked, self.checked = self.checked, None
        if grads is not checked:
            state = (prevs, step_sizes, () if prev_updates is None else prev_updates, steps)
            if list(map(_data_ptr, chain(params, *state))) != self.head_list:
                return False
            grad_list = list(map(_data_ptr, grads))
            if grad_list != self.grad_list:
                self.grad_list = grad_list
                self.grad_ptrs[:] = array("q", grad_list)
        else:
            self.grad_list = []  # the pointers came from the check: compare afresh next time
        _call(self.lib, self.code, self.n, self.head, self.grad_ptrs, self.numels, self.kind,
              self.backtracks, threads=torch.get_num_threads(), steps=steps, hyper=hyper,
              variant=variant, worse=worse)
        mark_written(params)
        return True


def prepare(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor],
            step_sizes: list[Tensor], prev_updates: list[Tensor] | None,
            steps: list[Tensor]) -> Prepared | None:
    """A :class:`Prepared` step for a bucket of contiguous CPU tensors that
    share no memory, or None (then every step goes through
    :func:`fused_step`, which checks everything each time)."""
    states = [prevs, step_sizes] if prev_updates is None else [prevs, step_sizes, prev_updates]
    pdt, sdt = params[0].dtype, prevs[0].dtype
    code = CODES.get((pdt, grads[0].dtype, sdt))
    if (code is None or not params[0].is_cpu or not all(map(_is_contiguous, params))
            or not all(map(_is_contiguous, grads)) or any(map(_is_neg, grads))
            or not all(_walkable(p, pdt, [ts[i] for ts in states], sdt)
                       for i, p in enumerate(params))):
        return None
    ptrs = array("q", map(_data_ptr, params))
    if _overlap(ptrs, array("q", map(_numel, params)), params[0].element_size()):
        return None
    return Prepared(load_library(code), code, params, states, steps)


def _overlap(ptrs: array, numels: array, itemsize: int) -> bool:
    """Whether any two of the first ``len(numels)`` tensors of ``ptrs`` (dense,
    ``numels`` elements of ``itemsize`` bytes from their data pointer) share
    memory."""
    return _spans_overlap([(ptrs[i], ptrs[i] + m * itemsize) for i, m in enumerate(numels) if m])


def _extents_overlap(params: list[Tensor]) -> bool:
    """Like _overlap for tensors of any strides: whether the memory spans
    (first to last element) of any two intersect. Interleaved views that share
    no element count as overlapping, which is only slower."""
    spans = []
    for p in params:
        if p.numel():
            last = sum((n - 1) * s for n, s in zip(p.shape, p.stride(), strict=True))
            spans.append((p.data_ptr(), p.data_ptr() + (last + 1) * p.element_size()))
    return _spans_overlap(spans)


def _spans_overlap(spans: list[tuple[int, int]]) -> bool:
    """Whether any two half-open byte ranges ``[start, stop)`` intersect."""
    end = 0
    for start, stop in sorted(spans):
        if start < end:
            return True
        end = max(end, stop)
    return False


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements from data_ptr."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _same_layout(p: Tensor, t: Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel may walk ``t`` (of ``dtype``) element by element
    alongside ``p``."""
    # A negative view (``z.conj().imag``) holds the negated values in memory,
    # which the kernel would read as they are.
    if (t.numel() != p.numel() or t.dtype != dtype or t.get_device() != p.get_device()
            or t.is_neg()):
        return False
    if p.is_contiguous():
        return t.is_contiguous()
    return t.shape == p.shape and t.stride() == p.stride() and _dense(p)


def _walkable(p: Tensor, pdt: torch.dtype, ts: list[Tensor], dtype: torch.dtype) -> bool:
    """Whether ``p`` is a dense tensor of ``pdt`` and the tensors ``ts`` (of
    ``dtype``, on its device) line up with it."""
    return (p.dtype == pdt and not p.is_neg() and (p.is_contiguous() or _dense(p))
            and all(_same_layout(p, t, dtype) for t in ts))


def _counter_kind(steps: list[Tensor]) -> int:
    """0/1 when every counter is a CPU float32/float64 scalar the kernel can
    increment, else -1."""
    kinds = set(map(_get_dtype, steps))
    if len(kinds) == 1 and all(map(_get_is_cpu, steps)) and set(map(_numel, steps)) == {1}:
        return {torch.float32: 0, torch.float64: 1}.get(kinds.pop(), -1)
    return -1


@torch.compiler.disable  # an opaque kernel call: torch.compile runs it eagerly
def fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor],
    step_sizes: list[Tensor],
    prev_updates: list[Tensor] | None,
    *,
    steps: list[Tensor],
    hyper: Hyper,
    variant: Variant,
    worse: Any,
    differentiable: bool = False,
) -> None:
    """One Rprop step for a (device, dtype) group: same arguments and bitwise
    the same result as :func:`rprop.torch._paths.single_tensor`.

    The lists are one bucket of a param group (``Rprop._init_group``): all
    parameters share a device and dtype, all gradients a dtype.

    Every tensor is walked as a flat array from its ``data_ptr()``: contiguous,
    or dense with the same strides as its parameter (channels_last). Others
    (non-dense views, a gradient laid out unlike its parameter) are stepped by
    the foreach path, which gives the same bits; so are dtype combinations the
    kernel lacks (see ``_kernel_cache.CODES``).

    Parameters that share memory (overlapping views of one tensor) are
    stepped one after the other, as the for-loop path does: on CPU by the
    kernel on one thread, on CUDA by the for-loop path. Threads (or the
    foreach path's batching, with weight decay) would interleave the reads
    and writes of the shared elements differently.

    What the kernel cannot walk it hands back to the path registry
    (:func:`rprop.torch._path_registry.run_declined`), which chooses who
    steps it; this function never picks another path itself.
    """
    if differentiable:
        raise ValueError("fused=True does not support differentiable=True")
    n = len(params)
    if n == 0:
        return
    kw = {"steps": steps, "hyper": hyper, "variant": variant, "worse": worse}
    states = [prevs, step_sizes] if prev_updates is None else [prevs, step_sizes, prev_updates]
    pdt, gdt, sdt = params[0].dtype, grads[0].dtype, prevs[0].dtype
    code = CODES.get((pdt, gdt, sdt))
    cuda = params[0].is_cuda
    if code is None:
        # A dtype combination no kernel build has (a gradient in another
        # dtype than its parameter, say).
        run_declined("fused", True, params, grads, prevs, step_sizes, prev_updates, **kw)
        return
    if cuda:
        kernel = _triton()
        if isinstance(kernel, str):
            raise RuntimeError(kernel)
    elif params[0].is_cpu:
        kernel = load_library(code)
    else:
        raise RuntimeError(f"the fused kernel steps CPU and CUDA tensors, got {params[0].device}")

    if all(_walkable(p, pdt, [ts[i] for ts in states], sdt) and _same_layout(p, grads[i], gdt)
           for i, p in enumerate(params)):
        ptrs = array("q", map(_data_ptr, params))
        for ts in states:
            ptrs.extend(map(_data_ptr, ts))
        ptrs.extend(map(_data_ptr, steps))
        numels = array("q", map(_numel, params))
        overlap = _overlap(ptrs, numels, params[0].element_size())
        if cuda and overlap:
            # Overlapping parameters on CUDA: in order, one after the other.
            run_declined("fused", True, params, grads, prevs, step_sizes, prev_updates, **kw)
            return
        if cuda:
            increment_steps(steps)
            kernel.step(params, grads, prevs, step_sizes, prev_updates, hyper=hyper,
                        variant=variant, worse=worse)
        else:
            _call(kernel, code, n, ptrs, array("q", map(_data_ptr, grads)), numels,
                  _counter_kind(steps), len(states) == 3,
                  threads=1 if overlap else torch.get_num_threads(), **kw)
        mark_written(params)
        return
    if _extents_overlap(params):
        # Shared memory and a tensor the kernel cannot walk: all of them in
        # the for-loop path's order.
        run_declined("fused", True, params, grads, prevs, step_sizes, prev_updates, **kw)
        return
    # Some tensors cannot be walked flat: fuse the others, hand these back.
    fusable: list[int] = []
    other: list[int] = []
    for i, p in enumerate(params):
        ok = _walkable(p, pdt, [ts[i] for ts in states], sdt) and _same_layout(p, grads[i], gdt)
        (fusable if ok else other).append(i)
    for idx in (fusable, other):
        if not idx:
            continue
        sub_params, sub_grads, sub_steps, *sub_states = (
            [ts[i] for i in idx] for ts in (params, grads, steps, *states)
        )
        sub_pu = sub_states[2] if len(sub_states) == 3 else None
        sub_kw = {**kw, "steps": sub_steps}
        if idx is other:
            run_declined("fused", False, sub_params, sub_grads, sub_states[0], sub_states[1],
                         sub_pu, **sub_kw)
        elif cuda:
            increment_steps(sub_steps)
            kernel.step(sub_params, sub_grads, sub_states[0], sub_states[1], sub_pu,
                        hyper=hyper, variant=variant, worse=worse)
        else:
            ptrs = array("q")
            for ts in (sub_params, *sub_states, sub_steps):
                ptrs.extend(map(_data_ptr, ts))
            numels = array("q", map(_numel, sub_params))
            _call(kernel, code, len(idx), ptrs, array("q", map(_data_ptr, sub_grads)), numels,
                  _counter_kind(sub_steps),
                  len(sub_states) == 3, threads=torch.get_num_threads(), **sub_kw)
        if idx is not other:
            mark_written(sub_params)



# The state dtype of each kernel build.
_STATE_DTYPE = {code: dtypes[2] for dtypes, code in CODES.items()}


@functools.lru_cache(maxsize=64)
def _etas_in(hyper: Hyper, dtype: torch.dtype) -> tuple[float, float]:
    """eta_minus, eta_plus rounded to the step sizes' dtype (as the core and
    torch multiply by them), as exact doubles for the kernel."""
    etas = torch.tensor([hyper.eta_minus, hyper.eta_plus], dtype=dtype).tolist()
    return etas[0], etas[1]


def _call(lib: Any, code: int, n: int, ptrs: array, grads: array, numels: array, kind: int,
          backtracks: bool, *, threads: int, steps: list[Tensor], hyper: Hyper,
          variant: Variant, worse: Any) -> None:
    """Run the kernel on ``threads`` threads. ``ptrs`` holds n pointers each of
    params, prevs, step_sizes, [prev_updates,] step counters, in that order;
    ``grads`` the n gradients' pointers."""
    base, word = ptrs.buffer_info()[0], n * ptrs.itemsize
    if not backtracks:
        pu_mode = PU_NONE
    elif variant.undo == "always":
        pu_mode = PU_UNDO
    else:  # "if_worse": one flag for the whole step, read once
        pu_mode = PU_UNDO if bool(worse) else PU_KEEP
    k = 3 if backtracks else 2  # state arrays after params
    if kind < 0:
        increment_steps(steps)
    rc = lib.rprop_fused_step(
        code, n, base, grads.buffer_info()[0], base + word, base + 2 * word,
        base + 3 * word if backtracks else None, numels.buffer_info()[0],
        base + (1 + k) * word if kind >= 0 else None, max(kind, 0),
        *_etas_in(hyper, _STATE_DTYPE[code]), hyper.step_min, hyper.step_max,
        hyper.weight_decay, hyper.maximize, variant.forget, pu_mode, threads,
    )
    if rc != 0:
        raise RuntimeError(f"the fused kernel rejected its arguments (code {rc})")


# The kernel's pointer tables are copied from the host each step, which a CUDA
# graph cannot capture (the capture records foreach instead).
register(Path("fused", fused_step, preference=2, capturable=False,
              # GRprop's adjustment (adjust=...) is a whole-step phase: it runs in
              # its own one-pass CPU kernel (rprop.torch._fused_grprop).
              features=ALL_FEATURES,
              unsupported=_unsupported_here, prepare=prepare))
