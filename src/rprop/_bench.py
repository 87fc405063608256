"""Step-speed benchmark: ms per optimizer step, against torch and the memory floor.

Shared by ``benchmarks/step_speed.py`` and the command line. For each size
(``tensors x elements``, float32) it times ``torch.optim.Rprop`` (for-loop and
foreach) and each ``rprop.Rprop`` path (for-loop, foreach, fused), and
measures in the same run the memory-bandwidth floor: the rate of a large
tensor copy, scaled to the bytes one step must move (28 bytes per parameter
for iRprop-/Rprop-: read param, grad, prev, step size; write param, prev,
step size; 36 for the backtracking variants, which also read and write the
last update).

Peak extra memory of a step: on CPU, the largest total of live torch
allocations made during one step (torch profiler memory events, replayed in
order); on CUDA, ``max_memory_allocated`` above the memory in use before the
step. Neither counts memory allocated outside torch; the fused kernel
allocates none (its pointer arrays are Python objects of 8 bytes per tensor
and state array).

torch is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["FULL_SIZES", "QUICK_SIZES", "bytes_per_param", "format_table", "memory_available",
           "memory_needed", "run"]

# (tensors, elements per tensor)
FULL_SIZES = [(1, 10_000_000), (100, 100_000), (1000, 1000), (10, 10_000_000)]
CUDA_EXTRA_SIZES = [(1000, 100_000)]
QUICK_SIZES = [(1, 100_000), (100, 1000)]

# How long a run waits for the fused path's C++ tensor table to be built.
TABLE_WAIT_S = 180.0
PATHS = ("torch for-loop", "torch foreach", "rprop for-loop", "rprop foreach", "rprop fused")


def bytes_per_param(variant: str = "irprop-", itemsize: int = 4) -> int:
    """Bytes one step must read and write per parameter."""
    from rprop._variants import get_variant

    arrays = 7 + 2 * get_variant(variant).backtracks
    return arrays * itemsize


def sizes_for(device: str, quick: bool = False) -> list[tuple[int, int]]:
    """The sizes timed when none are given."""
    if quick:
        return QUICK_SIZES
    return FULL_SIZES + (CUDA_EXTRA_SIZES if device.startswith("cuda") else [])


def memory_needed(count: int, numel: int, variant: str = "irprop-",
                  optimizers: int = len(PATHS)) -> int:
    """Bytes a size needs at its peak, bounding the measured peaks: parameters
    and gradients for every tensor, the state (prev, step size, [last
    update]) of ``optimizers`` optimizers held at once (the paths are timed
    in turns), plus the larger step temporaries: a for-loop path's, made for
    one tensor at a time (up to 10 arrays of it measured, 12 allowed), or a
    foreach path's, for all tensors at once (up to 3.3 arrays of them, 4 allowed)."""
    from rprop._variants import get_variant

    state = 2 + get_variant(variant).backtracks
    held = count * numel * (2 + optimizers * state)
    temporaries = max(12 * numel, 4 * count * numel)
    return 4 * (held + temporaries)


def _cgroup_free() -> int | None:
    """Bytes this process's cgroup may still allocate, if it has a limit."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f, open(usage) as g:
                text = f.read().strip()
                used = int(g.read())
        except (OSError, ValueError):
            continue
        if text.isdigit() and int(text) < 2**60:  # "max", or v1's huge "no limit"
            return max(int(text) - used, 0)
    return None


def memory_available(device: str = "cpu") -> int | None:
    """Bytes free for new allocations on ``device``, or None when unknown: on
    CUDA the driver's free memory; on CPU the kernel's MemAvailable, lowered to
    what a cgroup limit (a container) leaves."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if device != "cpu":
        return None
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    limit = _cgroup_free()
    if limit is not None:
        free = limit if free is None else min(free, limit)
    return free


def _label(count: int, numel: int) -> str:
    def short(n: int) -> str:
        for unit, scale in (("M", 1_000_000), ("k", 1000)):
            if n >= scale and n % scale == 0:
                return f"{n // scale}{unit}"
        return str(n)

    return f"{count}x{short(numel)}"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(step: Callable[[], Any], device: str, repeats: int, budget_s: float) -> float:
    """Median wall time of ``step`` in ms: one warm-up call, then ``repeats``
    timed calls, fewer (at least 3) when they exceed ``budget_s``."""
    step()
    _sync(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (len(times) < 3 or spent < budget_s):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times) * 1e3


def _interleaved_ms(steps: dict[str, Callable[[], Any]], device: str, repeats: int,
                    budget_s: float, turns: int = 3) -> dict[str, float]:
    """Median wall time of each step in ms, the steps timed in turns: in each
    of ``turns`` rounds every step is called once or twice untimed (its
    tensors back in the caches the others used) and then timed ``repeats /
    turns`` times (rounded up), in an order that rotates from round to round.
    The second untimed call makes each round's first timed call an odd call
    in one round and an even one in the next, so a step that alternates
    between two kinds (iRprop+ given a rising and a falling loss) is timed in
    both, also with one timed call a round. A change in
    the machine's speed during the run (other processes, the clock) then
    falls on every path alike, so the ratios between paths, which are what
    the table is for, do not depend on which path ran when. A turn ends early
    (after at least one timed call) when it exceeds ``budget_s / turns``."""
    names = list(steps)
    per_turn = -(-repeats // turns)
    times: dict[str, list[float]] = {name: [] for name in names}
    calls = dict.fromkeys(names, 0)
    for turn in range(turns):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(1 + (calls[name] + 1 + turn) % 2):
                steps[name]()
                calls[name] += 1
            _sync(device)
            spent = 0.0
            for _ in range(per_turn):
                start = time.perf_counter()
                steps[name]()
                calls[name] += 1
                _sync(device)
                times[name].append(time.perf_counter() - start)
                spent += times[name][-1]
                if spent > budget_s / turns:
                    break
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def copy_rate(device: str = "cpu", numel: int = 1 << 26, repeats: int = 10) -> float:
    """Bytes per second of a large float32 tensor copy (read + write counted)."""
    import torch

    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, repeats, budget_s=5.0)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_memory(step: Callable[[], Any], device: str = "cpu") -> int:
    """Peak bytes of torch allocations live during one call of ``step``,
    beyond what was allocated before it."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0)
    from torch import profiler

    with _quiet_stderr(), profiler.profile(activities=[profiler.ProfilerActivity.CPU],
                                           profile_memory=True) as prof:
        step()
    results = prof.profiler.kineto_results if prof.profiler is not None else None
    if results is None:
        return 0
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e for e in results.events()
                     if e.name() == "[memory]" and e.device_type() == cpu),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _optimizer(path: str, params: list[Any], variant: str) -> Any:
    import torch

    import rprop

    if path == "torch for-loop":
        return torch.optim.Rprop(params, foreach=False)
    if path == "torch foreach":
        return torch.optim.Rprop(params, foreach=True)
    flags = {"rprop for-loop": {"foreach": False}, "rprop foreach": {"foreach": True},
             "rprop fused": {"fused": True}}[path]
    return rprop.Rprop(params, variant=variant, **flags)


def _step_with_loss(opt: Any, losses: Iterator[float]) -> None:
    opt.step(loss=next(losses))


def run(
    sizes: list[tuple[int, int]] | None = None,
    *,
    quick: bool = False,
    device: str = "cpu",
    repeats: int | None = None,
    variant: str = "irprop-",
    paths: tuple[str, ...] = PATHS,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time one optimizer step for every (size, path); return one row each.

    Row keys: ``size`` (label), ``tensors``, ``numel`` (per tensor),
    ``params``, ``path``, ``ms`` (median per step), ``floor_ms``,
    ``copy_gbps``, ``vs_torch_foreach`` (speed-up over torch foreach, > 1 is
    faster), ``vs_floor`` (ms / floor_ms), ``peak_extra_mb`` (None when
    ``memory`` is False), ``variant``, ``device``, ``threads``. A path that
    cannot run here (the fused kernel without a C compiler) gets ``ms`` None
    and its reason in ``error``. torch.optim.Rprop only has iRprop-; with
    another ``variant`` its rows still time iRprop-. iRprop+ steps get a
    loss that alternately rises and falls, so half of them backtrack.
    """
    import torch

    from rprop._variants import get_variant

    if sizes is None:
        sizes = sizes_for(device, quick)
    if repeats is None:
        repeats = 5 if quick else 15
    budget = 0.5 if quick else 4.0
    say = progress or (lambda _msg: None)
    say("measuring the copy rate")
    rate = copy_rate(device, numel=(1 << 22) if quick else (1 << 26),
                     repeats=5 if quick else 10)
    per_param = bytes_per_param(variant)
    needs_loss = get_variant(variant).needs_loss
    rows: list[dict[str, Any]] = []
    for count, numel in sizes:
        # A size that does not fit is reported, not attempted (and not left
        # to the OOM killer halfway through the run).
        needed, free = memory_needed(count, numel, variant, len(paths)), memory_available(device)
        too_big = None if free is None or needed <= free else (
            f"needs about {needed / 1e9:.1f} GB of memory, {free / 1e9:.1f} GB are free")
        gen = torch.Generator().manual_seed(0)
        params = [] if too_big else [
            torch.randn(numel, generator=gen).to(device).requires_grad_() for _ in range(count)]
        for p in params:
            p.grad = torch.randn(numel, generator=gen).to(device)
        floor_ms = count * numel * per_param / rate * 1e3
        size_rows: dict[str, dict[str, Any]] = {}
        timed: dict[str, Callable[[], Any]] = {}
        for path in paths:
            row: dict[str, Any] = {
                "size": _label(count, numel), "tensors": count, "numel": numel,
                "params": count * numel, "path": path, "variant": variant, "device": device,
                "threads": torch.get_num_threads(), "copy_gbps": rate / 1e9,
                "floor_ms": floor_ms, "ms": None, "vs_floor": None, "vs_torch_foreach": None,
                "peak_extra_mb": None,
            }
            size_rows[path] = row
            if too_big:
                row["error"] = too_big
                continue
            try:
                opt = _optimizer(path, params, variant)
                step = opt.step
                if needs_loss and path.startswith("rprop"):
                    # iRprop+ reads the loss; a rising one makes every other
                    # step backtrack, so both kernel modes are timed.
                    losses = itertools.cycle([1.0, 2.0])
                    step = functools.partial(_step_with_loss, opt, losses)
                step()  # the state is made, and a kernel compiled, before any timing
                from rprop.torch import _tensor_table

                if (device == "cpu" and path == "rprop fused"
                        and count >= _tensor_table.MIN_TENSORS):
                    # The per-step check in C++ is built in the background
                    # at first use (the step above started it): timed with
                    # it, as later runs on this machine are.
                    if _tensor_table.library() is None and "error" not in _tensor_table.info():
                        say("building the C++ tensor table (first use, about 15 s)")
                        _tensor_table.library(wait=True, timeout=TABLE_WAIT_S)
                    step()
                timed[path] = step
            # fused=True without a C compiler, or refused for these tensors
            except (RuntimeError, ValueError) as err:
                row["error"] = str(err).splitlines()[0]
        if timed:
            say(f"{_label(count, numel)}: timing {', '.join(timed)} in turns")
            for path, ms in _interleaved_ms(timed, device, repeats, budget).items():
                size_rows[path]["ms"] = ms
            if memory:
                for path, step in timed.items():
                    size_rows[path]["peak_extra_mb"] = peak_step_memory(step, device) / 2**20
        timed.clear()
        gc.collect()
        rows.extend(size_rows.values())
        torch_foreach = next((r["ms"] for r in rows[-len(paths):]
                              if r["path"] == "torch foreach"), None)
        for r in rows[-len(paths):]:
            if r["ms"] is not None:
                r["vs_floor"] = r["ms"] / floor_ms
                if torch_foreach:
                    r["vs_torch_foreach"] = torch_foreach / r["ms"]
        del params
        gc.collect()
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`run`'s rows, one block per size."""
    if not rows:
        return "(no results)"
    first = rows[0]
    lines = [
        f"Rprop step speed, float32, {first['device']}, {first['threads']} threads, "
        f"variant {first['variant']}; copy rate {first['copy_gbps']:.1f} GB/s "
        f"(floor = bytes moved per step / copy rate); medians.",
        f"{'size':>9}  {'path':<15} {'ms/step':>9} {'x faster':>9} {'x floor':>8} "
        f"{'peak extra':>11}",
        f"{'':>9}  {'':<15} {'':>9} {'vs torch':>9} {'':>8} {'MB':>11}",
    ]
    size = None
    for r in rows:
        if r["size"] != size:
            size = r["size"]
            lines.append(f"{size:>9}  {'(floor)':<15} {r['floor_ms']:9.3f}")
        if r["ms"] is None:
            lines.append(f"{'':>9}  {r['path']:<15} unavailable: {r.get('error', '')}")
            continue
        speedup = "" if r["vs_torch_foreach"] is None else f"{r['vs_torch_foreach']:9.1f}"
        mem = "" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:11.1f}"
        lines.append(f"{'':>9}  {r['path']:<15} {r['ms']:9.3f} {speedup:>9} "
                     f"{r['vs_floor']:8.2f} {mem:>11}")
    return "\n".join(lines)
