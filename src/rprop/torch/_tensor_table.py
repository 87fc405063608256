"""The fused CPU step's per-step re-check, in C++: one call over a bucket.

A prepared fused step (:class:`rprop.torch._fused.Prepared`) reads its
tensors through a table of data pointers, and before each step the
optimizer must know that nothing it was built from has changed (see
:mod:`rprop.torch._plan`). In Python that is a handful of passes over the
bucket at about 0.1 us a tensor each: at a thousand small tensors, more
time than the arithmetic. :class:`TableCheck` does it in one pass, in C++
(``_kernels/tensor_table.cpp``), reading each tensor's metadata directly: the
same parameter objects in the group, the same state tensor objects in their
state dicts, each of them with the Python type, dispatch keys, dtype,
device, requires_grad, sizes, strides and data pointer it had, and a
gradient laid out as it was. It answers "all the same" (with the gradients
and their data pointers) or "something differs", and then the Python checks
run and decide, as they do without it: the helper only ever skips work
whose outcome it has checked.

The helper is built against the torch that runs it, so it is compiled with
the system C++ compiler (``$CXX``, default ``c++``) and torch's headers
(about 12 s), cached on disk like the kernel (:mod:`rprop.torch._kernel_cache`:
verified, trust-checked, one build per machine, torch and Python version).
The first bucket of at least :data:`MIN_TENSORS` tensors loads it from the
cache, or starts a build process (a Python running :func:`_main`)
that compiles it into the cache, and later steps pick it up once that
process has ended. The build is a process, not a thread, so that it finishes
into the cache even when the process that started it exits first, and so
that the optimizer's process stays single-threaded for a fork. Until it is
loaded, and wherever it cannot be built, steps use the Python checks, with
the same result. ``RPROP_TENSOR_TABLE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing.spawn
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import warnings
from array import array
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rprop.torch import _kernel_cache as cache
from rprop.torch._compat import PLAIN_TYPES

__all__ = ["MIN_TENSORS", "TableCheck", "info", "library", "record"]

SOURCE = Path(__file__).with_name("_kernels") / "tensor_table.cpp"
ABI = 1  # RPROP_TABLE_ABI in the C++ source
STEM = "rprop_table"

# Below this many tensors a bucket's Python checks cost little (under 0.1 ms):
# no helper is built for it.
MIN_TENSORS = 64

_BUILD = "from rprop.torch._tensor_table import _main; raise SystemExit(_main())"
_lock = threading.Lock()
# What this process has of the helper: "lib" (loaded), "error" (why it
# cannot be had), "info" (its build), "proc" (the build process running).
_state: dict[str, Any] = {}


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX") or "c++")


def _flags() -> list[str]:
    torch_dir = Path(torch.__file__).parent
    lib = torch_dir / "lib"
    return ["-O2", "-shared", "-fPIC", "-std=c++17", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}", f"-I{sysconfig.get_paths()['include']}",
            f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}"]


def _build_spec() -> tuple[list[str], Any]:
    """The compiler and the one build of the helper for this torch and Python.
    Its name does not depend on the compiler's ``--version`` (the kernel's
    does, for ``-march=native``): finding it in the cache runs no program in
    the optimizer's process, and the ABI it must match is torch's, which the
    flags name."""
    cxx = _compiler()
    if not cxx or shutil.which(cxx[0]) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {cxx[0] if cxx else '$CXX'!r}; "
                           "set CXX to one)")
    directory = cache._directory()
    flags = _flags()
    key = hashlib.sha256(b"\0".join([
        SOURCE.read_bytes(), shlex.join([*cxx, *flags]).encode(), torch.__version__.encode(),
        sys.version.encode()])).hexdigest()[:24]
    return cxx, cache._Build(directory / f"{STEM}_{key}.so", flags, (), SOURCE,
                             "the C++ tensor table")


def _open(path: Path) -> Any:
    lib = cache.open_library(path, ctypes.PyDLL,  # PyDLL: called with the GIL held
                             lambda lib: lib.rprop_table_abi() == ABI,
                             f"the tensor table (ABI {ABI})")
    obj, ptr = ctypes.py_object, ctypes.c_void_p
    lib.rprop_table_record_size.restype = ctypes.c_int
    lib.rprop_table_record.restype = ctypes.c_int
    lib.rprop_table_record.argtypes = [obj, ptr]
    lib.rprop_table_check.restype = ctypes.c_int
    lib.rprop_table_check.argtypes = [obj, obj, obj, ptr, ptr, obj, ptr]
    return lib


def _fail(why: Any) -> None:
    _state["error"] = f"the C++ tensor table is unavailable: {why}"
    if isinstance(why, cache.UntrustedCacheError):
        warnings.warn(f"{why}; rprop steps with its Python checks", RuntimeWarning,
                      stacklevel=4)


def _load_cached(build: Any) -> bool:
    """Load ``build`` if the cache holds it, verified; False when it does not
    (or held one that does not load, deleted now so that it is built again)."""
    found = cache.find_cached([build])
    if found is None:
        return False
    try:
        lib = _open(found.library)
    except (OSError, RuntimeError):
        cache.remove_build(STEM, found)
        return False
    _state["info"] = {"path": str(found.library), "flags": found.flags,
                      "record_size": lib.rprop_table_record_size()}
    _state["lib"] = lib
    return True


def _start() -> None:
    """Load the helper from the cache, or start a process that builds it."""
    try:
        _, build = _build_spec()
        if _load_cached(build):
            return
        # A process of its own, not a thread: it finishes the build into the
        # cache (under the cache's lock) even if this process exits first or
        # is interrupted, and this process stays single-threaded (a fork, a
        # DataLoader worker, is then safe).
        # The interpreter multiprocessing would start (an application that
        # embeds Python sets it with multiprocessing.set_executable), with
        # this process's import path (this rprop first), started in the cache
        # folder, so that no module of the working folder shadows torch.
        python = multiprocessing.spawn.get_executable()
        here = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(dict.fromkeys([here, *map(os.path.abspath, filter(None, sys.path))]))
        log = tempfile.TemporaryFile()
        _state["proc"] = (subprocess.Popen(
            [python, "-c", _BUILD], stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True, cwd=build.library.parent,
            # The cache folder this process uses (a private one of its own
            # when the cache cannot be written): the build lands where it looks.
            env={**os.environ, "PYTHONPATH": path,
                 "RPROP_CACHE_DIR": str(build.library.parent)}), log, build)
    except Exception as err:  # no compiler, an untrusted cache, no process, ...
        _fail(err)


def _finish(rc: int) -> None:
    """The build process ended with ``rc``: load what it built."""
    _, log, build = _state.pop("proc")
    try:
        if rc == 0 and _load_cached(build):
            return
        log.seek(0)
        said = log.read().decode(errors="replace").strip()
        _fail(said[-2000:] if said else f"its build process ended with status {rc} and no "
              f"library in {build.library.parent}")
    except Exception as err:
        _fail(err)
    finally:
        log.close()


def library(wait: bool = False, timeout: float | None = None) -> Any:
    """The loaded helper, or None while it is being built or when it cannot
    be had (:func:`info` says why). The first call loads it from the cache
    or starts the process that builds it; ``wait``: wait for that process
    (at most ``timeout`` seconds)."""
    lib = _state.get("lib")
    if lib is not None or "error" in _state:
        return lib
    with _lock:  # optimizers stepped from several threads start one build
        return _library(wait, timeout)


def _library(wait: bool, timeout: float | None) -> Any:
    if "lib" in _state or "error" in _state:
        return _state.get("lib")
    if "proc" not in _state:
        if os.environ.get("RPROP_TENSOR_TABLE", "1") == "0":
            _state["error"] = "the C++ tensor table is turned off (RPROP_TENSOR_TABLE=0)"
            return None
        _start()
    if "proc" in _state:
        proc = _state["proc"][0]
        try:
            rc = proc.wait(timeout) if wait else proc.poll()
        except subprocess.TimeoutExpired:
            rc = None
        if rc is not None:
            _finish(rc)
    return _state.get("lib")


def info() -> dict[str, Any]:
    """How this process has the helper: its build (``path``, ``flags``,
    ``record_size``), ``{"error": why}``, ``{"building": True}``, or ``{}``
    before any bucket asked for it."""
    if "info" in _state:
        return dict(_state["info"])
    if "error" in _state:
        return {"error": _state["error"]}
    return {"building": True} if "proc" in _state else {}


def forget_loaded() -> None:
    """Look the helper up again, as a new process would (see
    :func:`rprop.torch._kernel_cache.forget_loaded`); a build still running
    goes on, into the cache."""
    proc = _state.get("proc")
    if proc is not None:
        proc[1].close()
    _state.clear()


def _forked() -> None:
    """A forked child does not own the parent's build process (and a thread
    of the parent may have held the lock)."""
    global _lock
    _lock = threading.Lock()
    _state.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def _main() -> int:
    """The build process: compile the helper into the cache (or find it
    there); its output says why it could not."""
    try:
        cxx, build = _build_spec()
        cache.cached_library(STEM, [build], cxx, build.library.parent)
    except Exception as err:
        print(err, file=sys.stderr)
        return 1
    return 0


class TableCheck:
    """The recorded tensors of a prepared bucket, and the check that this
    step's are the same (see the module docstring). Calling it with the
    group's parameter list and the parameters' state dicts gives this step's
    gradients, their data pointers written into ``grad_ptrs``, or None."""

    __slots__ = ("grad_ptrs", "grad_records", "keys", "lib", "n", "records")

    def __init__(self, lib: Any, records: Any, grad_records: Any, keys: tuple[str, ...],
                 grad_ptrs: array) -> None:
        self.lib, self.records, self.grad_records = lib, records, grad_records
        self.keys, self.grad_ptrs, self.n = keys, grad_ptrs, len(grad_ptrs)

    def __call__(self, params: list[Tensor], states: list[dict[str, Any]]) -> list[Tensor] | None:
        grads: list[Any] = [None] * self.n
        rc = self.lib.rprop_table_check(params, states, self.keys, self.records,
                                        self.grad_records, grads, self.grad_ptrs.buffer_info()[0])
        return grads if rc == 0 else None


def _records(lib: Any, tensors: list[Tensor]) -> Any:
    buf = ctypes.create_string_buffer(max(1, len(tensors)) * lib.rprop_table_record_size())
    return buf if lib.rprop_table_record(tensors, buf) == 0 else None


def record(params: list[Tensor], states: list[dict[str, Any]], keys: tuple[str, ...],
           grads: list[Tensor], grad_ptrs: array) -> TableCheck | None:
    """A :class:`TableCheck` of the parameters ``params`` (all of a group's,
    each with a gradient), their state tensors ``states[i][key]`` for each of
    ``keys`` and the gradients' layouts, as they are now; None while the
    helper is not loaded or for tensors it cannot record."""
    if (len(params) < MIN_TENSORS or type(params) is not list
            or not set(map(type, params)) <= PLAIN_TYPES):
        # (A subclass's ``grad`` could be Python code, run in the middle of the check.)
        return None
    lib = library()
    if lib is None:
        return None
    try:
        tensors = [*params, *(s[k] for k in keys for s in states)]
    except KeyError:
        return None
    records = _records(lib, tensors)
    grad_records = _records(lib, list(grads))
    if records is None or grad_records is None:
        return None
    return TableCheck(lib, records, grad_records, tuple(keys), grad_ptrs)

