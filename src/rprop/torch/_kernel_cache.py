"""Where the fused CPU kernel comes from: compiled at first use, cached on
disk, verified and trust-checked before every load, loaded with ctypes.

Loading a shared library runs its code, and a damaged one kills the process
that maps it (SIGBUS on a page past a truncated end), so nothing is loaded
unchecked:

* Trust. The cache folder and every file read from it must belong to this
  user (or root) and be writable by no one else, as ssh demands of key
  files; otherwise nothing is loaded from there, ONE ``RuntimeWarning``
  names the path and why, and the optimizer steps without the fused kernel.
* Integrity. Each library has a build record (``<library>.json``: size and
  sha256 digest) written after it; a library whose bytes do not match its
  record (truncated, overwritten, half written, no record) is deleted and
  built again.
* Durability and atomicity. A build is compiled into a unique temporary
  file, fsynced, renamed into place and the folder fsynced; then its record
  the same way. Only complete files ever appear under a library's name, and
  a record names a library that is complete on disk.
* One build. Building happens under an exclusive POSIX lock (``lockf``) on a
  lock file per library (a process forked meanwhile does not inherit it), and
  re-checks the cache once it holds the lock, so processes starting together
  compile once; the others wait and load it.

Cache folder: ``$RPROP_CACHE_DIR``, else ``$XDG_CACHE_HOME/rprop``, else
``~/.cache/rprop``. The library's name is a hash of the kernel source, the
compiler command and flags, the compiler's ``--version`` and the CPU's
feature flags (``-march=native``), so a change of any of them compiles
afresh and machines sharing a home directory do not share an incompatible
binary. The compiler is ``$CC`` (default ``cc``).

:func:`kernel_info` says which library a dtype uses and how it was obtained;
:func:`forget_loaded` makes this process look the kernels up again, as a new
process would (after changing ``$RPROP_CACHE_DIR`` or ``$CC``).
"""

from __future__ import annotations

import _ctypes
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

if sys.platform != "win32":
    import fcntl

__all__ = ["ABI", "CODES", "REAL_OF", "SOURCE", "cache_dir", "compiler", "forget_loaded",
           "kernel_info", "load_library"]

SOURCE = Path(__file__).with_name("_kernels") / "rprop_kernel.c"
ABI = 2  # RPROP_KERNEL_ABI in the C source

# Kernel builds (RPROP_DTYPE in the C source) by (param, grad, state) dtype:
# one dtype throughout, or half parameters with float32 state (state_dtype).
_F32, _F64, _F16, _BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
CODES = {
    (_F32, _F32, _F32): 0, (_F64, _F64, _F64): 1, (_F16, _F16, _F16): 2, (_BF16, _BF16, _BF16): 3,
    (_F16, _F16, _F32): 4, (_BF16, _BF16, _F32): 5, (_F16, _F32, _F32): 6, (_BF16, _F32, _F32): 7,
}
# Complex parameters arrive as real views: complex64 -> float32, ...
REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64,
           torch.complex32: torch.float16}
# Compiler flags, best first; each later set drops something a compiler may
# refuse (OpenMP on Apple clang, -march=native elsewhere). Never -ffast-math,
# and always -ffp-contract=off: a fused multiply-add would change rounding.
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-std=c99")
FLAG_SETS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
RECORD_FORMAT = 1  # version of the build record's layout
_MISSING = "missing"  # _check_cached: no library under that name

_lock = threading.Lock()
_libs: dict[int, Any] = {}  # dtype code -> loaded library
_failures: dict[int, str] = {}  # dtype code -> why it cannot be had
_info: dict[int, dict[str, Any]] = {}
_warned: set[str] = set()  # refusals this process has warned about


class UntrustedCacheError(RuntimeError):
    """A cache folder or file that another user could have written."""


class _Build(NamedTuple):
    """One way to build the kernel for a dtype: its library and flags."""

    library: Path
    flags: list[str]
    extra: tuple[str, ...]  # the flags of FLAG_SETS it uses
    source: Path = SOURCE
    what: str = "the fused CPU kernel"  # for messages

    @property
    def record(self) -> Path:
        return self.library.with_name(self.library.name + ".json")


# -- where, and with what -----------------------------------------------------------


def compiler() -> list[str]:
    """The C compiler command: ``$CC`` split like a shell would, or ``cc``."""
    return shlex.split(os.environ.get("CC") or "cc")


def cache_dir() -> Path:
    """The cache folder: ``$RPROP_CACHE_DIR``, else ``$XDG_CACHE_HOME/rprop``,
    else ``~/.cache/rprop``."""
    env = os.environ.get("RPROP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rprop"


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux
    lists them, else the platform's description."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compiler_version(cc: list[str]) -> str:
    out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise OSError(f"`{shlex.join(cc)} --version` failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def _compiler_checked() -> list[str]:
    cc = compiler()
    if not cc or shutil.which(cc[0]) is None:
        raise RuntimeError(
            f"no C compiler found (looked for {cc[0] if cc else '$CC'!r}; set CC to one)"
        )
    return cc


def _builds(code: int, cc: list[str], directory: Path) -> list[_Build]:
    """The builds of dtype ``code`` in ``directory``, one per flag set, best first."""
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    builds = []
    for extra in FLAG_SETS:
        flags = [*BASE_FLAGS, *extra, f"-DRPROP_DTYPE={code}"]
        key = hashlib.sha256(
            b"\0".join([source, shlex.join([*cc, *flags]).encode(), version.encode(),
                        _cpu_flags().encode() if "-march=native" in extra else b""])
        ).hexdigest()[:24]
        builds.append(_Build(directory / f"rprop_kernel_{code}_{key}.so", flags, extra))
    return builds


# -- trust and integrity ------------------------------------------------------------


def _refuse_untrusted(path: Path, st: os.stat_result,
                      what: str = "the fused CPU kernel") -> None:
    """Raise UntrustedCacheError if another user could have written the file
    or folder ``path`` whose status is ``st``: owned by someone other than
    this user or root, or group- or world-writable."""
    if sys.platform == "win32":
        return
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        why = f"owned by uid {st.st_uid}, not by this user (uid {uid}) or root"
        fix = "chown it to this user"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = {stat.S_IWGRP: "group", stat.S_IWOTH: "world",
               stat.S_IWGRP | stat.S_IWOTH: "group and world"}
        why = (f"{who[st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)]}-writable "
               f"({stat.filemode(st.st_mode)})")
        fix = f"chmod go-w {shlex.quote(str(path))}"
    else:
        return
    raise UntrustedCacheError(
        f"refusing to load {what} from {path}: it is {why}, so another user "
        f"could have written it ({fix}, or set RPROP_CACHE_DIR to a folder of your own)"
    )


def _read_trusted(path: Path, what: str = "the fused CPU kernel") -> bytes:
    """The bytes of ``path`` (not followed if a symlink), after checking that
    no other user could have written it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        _refuse_untrusted(path, os.fstat(f.fileno()), what)
        return f.read()


def _check_cached(build: _Build) -> str | None:
    """Why the cached library of ``build`` may not be loaded (``_MISSING``
    when there is none), or None when it matches its build record. Raises
    UntrustedCacheError for a file another user could have written."""
    try:
        data = _read_trusted(build.library, build.what)
    except FileNotFoundError:
        return _MISSING
    except OSError as err:
        return f"it cannot be read ({err.strerror})"
    try:
        record = json.loads(_read_trusted(build.record, build.what))
        size, digest = record["size"], record["sha256"]
        ok = record["format"] == RECORD_FORMAT and record["library"] == build.library.name
    except FileNotFoundError:
        return f"it has no build record {build.record.name}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its build record {build.record.name} is unreadable ({err!r})"
    if not ok:
        return f"its build record {build.record.name} is not this build's"
    if len(data) != size:
        return f"it has {len(data)} bytes, its build record says {size}"
    if hashlib.sha256(data).hexdigest() != digest:
        return "its sha256 digest differs from its build record's"
    return None


# -- writing ------------------------------------------------------------------------


def _fsync_folder(directory: Path) -> None:
    """Make the renames done in ``directory`` durable."""
    if sys.platform == "win32":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _put(path: Path, tmp: str) -> None:
    """Move the finished file ``tmp`` (in the same folder) to ``path``
    durably: its bytes reach the disk before its name does."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # atomic: readers see the old file or all of the new one
    _fsync_folder(path.parent)


def _write_record(build: _Build, data: bytes) -> None:
    record = {"format": RECORD_FORMAT, "library": build.library.name, "size": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "abi": ABI, "flags": build.flags}
    fd, tmp = tempfile.mkstemp(prefix=build.record.name + ".", suffix=".tmp",
                               dir=build.library.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        _put(build.record, tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(cc: list[str], build: _Build, out: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cc, str(build.source), *build.flags, "-o", out],
                          capture_output=True, text=True, timeout=120)


def _compile_into(cc: list[str], build: _Build) -> str | None:
    """Compile ``build``'s library and its record into the cache; None when
    done, else the compiler's complaint."""
    directory = build.library.parent
    fd, tmp = tempfile.mkstemp(prefix=build.library.name + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        out = _compile(cc, build, tmp)
        if out.returncode != 0:
            return f"{' '.join(build.extra) or '(no extra flags)'}: {out.stderr.strip()[-800:]}"
        # The linker creates the file with the umask's mode, which may let the
        # group write it; the cache would then refuse it.
        os.chmod(tmp, 0o755)
        with open(tmp, "rb") as f:
            data = f.read()
        # A record names a complete library: the library is in place first.
        build.record.unlink(missing_ok=True)
        _put(build.library, tmp)
        _write_record(build, data)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive POSIX lock on ``lock`` (released by the kernel if this
    process dies, and not inherited by a child forked meanwhile, as a flock
    would be), so one process at a time builds a library. Threads of one
    process do not exclude each other with it: the kernel's builds run under
    ``_lock`` too."""
    if sys.platform == "win32":
        yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _directory() -> Path:
    """The cache folder, created if needed and checked; a private folder of
    this process when it cannot be written."""
    directory = cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(directory)
    except OSError:
        st = None
    if st is not None:
        _refuse_untrusted(directory, st)
        try:
            tempfile.TemporaryFile(dir=directory).close()
            return directory
        except OSError:
            pass
    # No writable cache: build into a private folder of this process (never
    # a shared, predictable one: the library is loaded as code).
    return Path(tempfile.mkdtemp(prefix="rprop-kernel-"))


def open_cached(stem: str, builds: list[_Build], cc: list[str], directory: Path,
                open_library: Callable[[Path], Any]) -> tuple[Any, dict[str, Any]]:
    """A library of one of ``builds`` (see :func:`cached_library`), opened by
    ``open_library``, and how it was obtained. A cached one that matches its
    record yet does not open (another library under its name and record) is
    deleted and built again, once."""
    path, info = cached_library(stem, builds, cc, directory)
    try:
        return open_library(path), info
    except (OSError, RuntimeError) as err:
        if info["compiled"]:
            raise
        path, info = cached_library(stem, builds, cc, directory, discard=path)
        try:
            return open_library(path), info
        except Exception as again:
            raise RuntimeError(
                f"the cached library {path} could not be loaded ({err}); it was deleted, "
                f"and the rebuilt one does not load either: {again}"
            ) from again


def find_cached(builds: list[_Build], discard: Path | None = None) -> _Build | None:
    """The best of ``builds`` in the cache, if it may be loaded (it matches its
    record; not ``discard``): a damaged one means a rebuild, not a fallback
    to a slower flag set. Raises UntrustedCacheError for a file another user
    could have written."""
    for build in builds:
        why = _check_cached(build)
        if why != _MISSING:
            return build if why is None and build.library != discard else None
    return None


def remove_build(stem: str, build: _Build) -> None:
    """Delete ``build``'s library and record (under ``stem``'s lock): one that
    matches its record yet does not load. Deleted, never rewritten in place:
    a process that maps it keeps its pages."""
    with _exclusive(build.library.parent / f"{stem}.lock"):
        build.record.unlink(missing_ok=True)
        build.library.unlink(missing_ok=True)


def cached_library(stem: str, builds: list[_Build], cc: list[str], directory: Path,
                   discard: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """A verified library of one of ``builds`` (best first, named
    ``<stem>_<key>.so`` in ``directory``): from the cache, or built there by
    ``cc`` under the lock of ``stem``. ``discard``: a cached library that
    failed to load, to delete and rebuild."""

    def info(build: _Build, compiled: bool, seconds: float = 0.0) -> dict[str, Any]:
        return {"path": str(build.library), "compiler": shlex.join(cc), "flags": build.flags,
                "openmp": "-fopenmp" in build.extra, "compiled": compiled,
                "compile_s": seconds}

    def usable() -> _Build | None:
        return find_cached(builds, discard)

    found = usable() if discard is None else None  # the common case: no lock needed
    if found is not None:
        return found.library, info(found, False)
    with _exclusive(directory / f"{stem}.lock"):
        found = usable()
        if found is not None:
            return found.library, info(found, False)  # another process built it
        damaged = []
        for build in builds:
            why = "it does not load" if build.library == discard else _check_cached(build)
            if why is not None and why != _MISSING:
                damaged.append(f"{build.library} ({why})")
                # Deleted, never rewritten in place: a process that maps it keeps its pages.
                build.record.unlink(missing_ok=True)
                build.library.unlink(missing_ok=True)
        # Temporary files of this library left by a killed build: builds of it
        # run under this lock only, so none is being written now.
        for tmp in directory.glob(f"{stem}_*.tmp"):
            tmp.unlink(missing_ok=True)
        errors = []
        for build in builds:
            start = time.perf_counter()
            error = _compile_into(cc, build)
            if error is None:
                return build.library, info(build, True, time.perf_counter() - start)
            errors.append(error)
    failed = f"compiling {builds[0].source.name} failed:\n" + "\n".join(errors)
    if damaged:
        raise RuntimeError(f"the cached library {'; '.join(damaged)} could not be loaded; it "
                           f"was deleted, and building it again failed: {failed}")
    raise RuntimeError(failed)


# -- loading ------------------------------------------------------------------------


def open_library(path: Path, loader: Callable[[str], Any], is_ours: Callable[[Any], bool],
                 what: str) -> Any:
    """Load the library at ``path`` with ``loader`` (ctypes.CDLL or PyDLL) and
    check ``is_ours(lib)`` (its ABI symbols); a library that loads but is not
    ours is unloaded again, so that a rebuilt file at the same path is really
    read (dlopen reuses a loaded library of the same name), and a
    RuntimeError says it is not ``what``."""
    lib = loader(str(path))
    try:
        ok = is_ours(lib)
    except AttributeError:  # not our symbols at all
        ok = False
    if not ok:
        close = getattr(_ctypes, "dlclose", None)
        if close is not None:
            close(lib._handle)
        raise RuntimeError(f"{path} is not a build of {what}")
    return lib


def _open(path: Path, code: int) -> Any:
    return open_library(
        path, ctypes.CDLL,
        lambda lib: lib.rprop_kernel_abi() == ABI and lib.rprop_kernel_dtype() == code,
        f"this kernel (ABI {ABI}, dtype {code})")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"{message}; rprop steps without the fused CPU kernel",
                      RuntimeWarning, stacklevel=4)


def load_library(code: int) -> Any:
    """The loaded kernel library for dtype ``code`` (see ``CODES``), built if
    needed; a RuntimeError saying why when it cannot be had (remembered, so
    each process tries once)."""
    lib = _libs.get(code)
    if lib is not None:
        return lib
    if code in _failures:
        raise RuntimeError(_failures[code])
    with _lock:
        if code in _libs:
            return _libs[code]
        try:
            cc = _compiler_checked()
            directory = _directory()
            lib, info = open_cached(f"rprop_kernel_{code}", _builds(code, cc, directory), cc,
                                    directory, lambda path: _open(path, code))
        except UntrustedCacheError as err:
            _failures[code] = str(err)
            _warn_once(str(err))
            raise RuntimeError(_failures[code]) from err
        except Exception as err:  # no compiler, failed build, unloadable file, ...
            _failures[code] = f"the fused CPU kernel is unavailable: {err}"
            raise RuntimeError(_failures[code]) from err
        fn = lib.rprop_fused_step
        fn.restype = ctypes.c_int
        fn.argtypes = (
            [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 7 + [ctypes.c_int]
            + [ctypes.c_double] * 5 + [ctypes.c_int] * 4
        )
        fn = lib.rprop_grprop_step
        fn.restype = ctypes.c_int
        fn.argtypes = (
            [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int]
            + [ctypes.c_double] * 5 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        )
        info["openmp"] = bool(lib.rprop_kernel_openmp())
        _info[code] = info
        _libs[code] = lib
        return lib


def kernel_info(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Where the CPU kernel for ``dtype`` lives and how this process got it
    (loading it, and compiling it if needed): ``path``, ``compiler``,
    ``flags``, ``openmp``, ``compiled`` (by this process) and ``compile_s``;
    ``{"error": why}`` when it cannot be had."""
    real = REAL_OF.get(dtype, dtype)
    code = CODES[(real, real, real)]
    try:
        load_library(code)
    except RuntimeError as err:
        return {"error": str(err)}
    return dict(_info[code])


def forget_loaded() -> None:
    """Forget the kernels this process has loaded, the failures and the
    warnings it has seen, so that the next step looks its kernel up again as
    a new process would: in the cache folder of the environment as it is now
    (``$RPROP_CACHE_DIR``, ``$CC``), verifying or building it. The files on
    disk stay; a library already mapped stays mapped, and loading the same
    path again gets it back (dlopen reuses it)."""
    with _lock:
        _libs.clear()
        _failures.clear()
        _info.clear()
        _warned.clear()
