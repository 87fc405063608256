"""The fused CPU kernel's cache (rprop.torch._kernel_cache), under real faults.

Real truncations and bit flips of a cached library, then a real fresh
process that steps; real concurrent first use by three processes; a real
SIGKILL of a process in the middle of a build; real permission and owner
changes of the cache folder and library. Expected parameters come from
torch.optim.Rprop (the for-loop path, foreach=False).

Every test uses a cache folder of its own ($RPROP_CACHE_DIR under tmp_path),
never the shared default cache. A library this process has loaded is never
damaged in place (its mapping would fault here): in-process damage replaces
the file by a damaged copy, in-place truncation happens to copies that only
a child process loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import rprop
from rprop.torch import _fused
from rprop.torch._kernel_cache import cache_dir, compiler, forget_loaded, kernel_info

pytestmark = pytest.mark.skipif(
    shutil.which(compiler()[0]) is None, reason="no C compiler here to build the fused kernel"
)

TIMEOUT = 120  # seconds for a child process: importing torch and one compile
N, STEPS = 1000, 5
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# A fresh process that steps one parameter of each dtype named on its command
# line with the fused kernel (fused=True: no silent fallback) and says what it
# got and how it got each kernel.
STEP_SCRIPT = textwrap.dedent(f"""
    import json, os, sys, time
    from pathlib import Path
    import torch, rprop
    from rprop.torch._kernel_cache import kernel_info
    go = os.environ.get("RPROP_TEST_GO")
    if go:  # start together with the other processes of the test
        Path(go + "." + sys.argv[1]).touch()
        while not Path(go).exists():
            time.sleep(0.005)
    got = {{}}
    for name in sys.argv[2:]:
        dtype = getattr(torch, name)
        torch.manual_seed(0)
        p = torch.randn({N}, dtype=dtype, requires_grad=True)
        opt = rprop.Rprop([p], fused=True)
        for _ in range({STEPS}):
            p.grad = torch.randn({N}, dtype=dtype)
            opt.step()
        got[name] = {{"bits": p.detach().view(torch.uint8).numpy().tobytes().hex(),
                     **kernel_info(dtype)}}
    print(json.dumps(got))
""")


def expected_bits(dtype: torch.dtype = torch.float32) -> str:
    """STEP_SCRIPT's parameter after its steps, by torch.optim.Rprop."""
    torch.manual_seed(0)
    p = torch.randn(N, dtype=dtype, requires_grad=True)
    opt = torch.optim.Rprop([p], foreach=False)
    for _ in range(STEPS):
        p.grad = torch.randn(N, dtype=dtype)
        opt.step()
    return p.detach().view(torch.uint8).numpy().tobytes().hex()


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "RPROP_CACHE_DIR": str(cache), **extra}


def step_in_child(cache: Path, *dtypes: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STEP_SCRIPT, "0", *dtypes], env=child_env(cache),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, f"the stepping process died ({out.returncode}): {out.stderr}"
    return json.loads(out.stdout)


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def replace_with(path: Path, data: bytes) -> None:
    """Put ``data`` under ``path`` as a new file: a library this process maps
    keeps its (intact) pages, the cache finds the damaged file."""
    tmp = path.with_name(path.name + ".damaged")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test, and a process that has loaded no
    kernel (as a new one); afterwards the environment's cache again."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("RPROP_CACHE_DIR", str(folder))
    forget_loaded()
    yield folder
    monkeypatch.undo()
    forget_loaded()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A folder holding the builds for four dtypes, compiled once for this
    module; tests copy them instead of compiling again."""
    folder = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RPROP_CACHE_DIR", str(folder))
        forget_loaded()
        paths = {dtype: kernel_info(dtype).get("path") for dtype in DTYPES}
        forget_loaded()
    if None in paths.values():
        pytest.skip("the fused kernel cannot be built here")
    return {dtype: Path(path) for dtype, path in paths.items()}


def seed(cache: Path, library: Path) -> Path:
    """Copy a built library and its build record into ``cache``; the copy's path."""
    cache.mkdir(mode=0o700, exist_ok=True)
    for f in (library, library.with_name(library.name + ".json")):
        if f.exists():  # the record: so that the test runs (and fails) on code without one
            shutil.copy2(f, cache / f.name)
    return cache / library.name


def oracle_step(p: torch.Tensor, path_kw: dict) -> torch.Tensor:
    """One step of a parameter from zeros with gradient ones, by rprop and by torch."""
    q = p.detach().clone().requires_grad_()
    p.grad = torch.ones_like(p)
    q.grad = torch.ones_like(q)
    rprop.Rprop([p], **path_kw).step()
    torch.optim.Rprop([q], foreach=False).step()
    return q


# -- reuse ----------------------------------------------------------------------------------


def test_kernel_cache_is_reused(cache):
    first = kernel_info(torch.float64)
    assert first["compiled"], first
    library = Path(first["path"])
    assert library.parent == cache == cache_dir()
    record = json.loads(library.with_name(library.name + ".json").read_text())
    assert record["size"] == library.stat().st_size and len(record["sha256"]) == 64
    assert sorted(f.name for f in cache.iterdir()) == sorted(
        [library.name, library.name + ".json", "rprop_kernel_1.lock"])
    # Neither the library nor the folder is writable by anyone else, whatever the umask.
    assert not library.stat().st_mode & 0o022 and not cache.stat().st_mode & 0o022
    forget_loaded()  # as a new process would: load from disk, no compiler run
    second = kernel_info(torch.float64)
    assert not second["compiled"] and second["path"] == first["path"]


def test_group_writable_umask_still_gives_a_trusted_cache(cache):
    """Under a umask of 002 (usual with per-user groups) the build is still
    made writable by its owner only, so the cache does not refuse its own
    files."""
    old = os.umask(0o002)
    try:
        assert kernel_info()["compiled"]
    finally:
        os.umask(old)
    forget_loaded()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = kernel_info()
    assert not info["compiled"] and "error" not in info


# -- damaged files ----------------------------------------------------------------------------


def flip_bit(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 3)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


# What is done to each dtype's cached library before a fresh process steps.
DAMAGE = {"float32": "truncated to 10%", "float64": "truncated to 50%",
          "float16": "truncated to 90%", "bfloat16": "one bit flipped"}


@pytest.mark.slow
def test_damaged_libraries_are_rebuilt_by_the_next_process(built, tmp_path):
    """Cached libraries truncated in place (as a full disk or a crash leaves
    them) made every process that loaded one die of SIGBUS, and a flipped
    bit was loaded as code. Now the next process finds each damaged, builds
    it again, and steps bitwise as torch; the rebuilt files are the builds'."""
    cache = tmp_path / "cache"
    for name, damage in DAMAGE.items():
        library = seed(cache, built[getattr(torch, name)])
        if damage.startswith("truncated"):
            os.truncate(library, int(library.stat().st_size * int(damage[-3:-1]) / 100))
        else:
            flip_bit(library)
    got = step_in_child(cache, *DAMAGE)
    for name, damage in DAMAGE.items():
        dtype = getattr(torch, name)
        assert got[name]["compiled"], (damage, got[name])
        assert got[name]["path"] == str(cache / built[dtype].name)
        assert got[name]["bits"] == expected_bits(dtype), damage
        assert Path(got[name]["path"]).read_bytes() == built[dtype].read_bytes(), damage


@pytest.mark.parametrize("damage", ["no record", "record of other bytes", "record unreadable"])
def test_library_that_does_not_match_its_record_is_rebuilt(built, cache, damage):
    """A library without its build record (a build killed between the two
    renames) or with a record that does not describe it is not loaded: it
    is built again, then reused."""
    library = seed(cache, built[torch.float32])
    record = library.with_name(library.name + ".json")
    if damage == "no record":
        record.unlink()
    elif damage == "record of other bytes":
        data = json.loads(record.read_text())
        data["sha256"] = "0" * 64
        record.write_text(json.dumps(data))
    else:
        record.write_text('{"format": 1, "size": ')
    info = kernel_info()
    assert info["compiled"] and info["path"] == str(library), info
    forget_loaded()
    assert not kernel_info()["compiled"]
    p = torch.zeros(3, requires_grad=True)
    q = oracle_step(p, {"fused": True})
    assert torch.equal(p.detach(), q.detach())


def test_corrupt_cached_kernel_is_rebuilt(built, cache):
    """Garbage over a cached library is deleted and built again, once."""
    path = seed(cache, built[torch.float32])
    path.write_bytes(b"not a shared library")
    assert _fused.available([torch.zeros(1)])
    info = kernel_info(torch.float32)
    assert info["compiled"] and info["path"] == str(path) and path.read_bytes()[:4] == b"\x7fELF"
    forget_loaded()  # a new process: loads it, compiles nothing
    assert not kernel_info(torch.float32)["compiled"]


def test_another_builds_library_under_its_name_is_rebuilt(built, cache):
    """The float32 library, with a record that matches it, under the float64
    build's name (never loaded by this process) loads but says it is not
    float64's: it is unloaded, deleted and built again."""
    library = seed(cache, built[torch.float64])
    data = built[torch.float32].read_bytes()
    library.write_bytes(data)
    record = library.with_name(library.name + ".json")
    meta = json.loads(record.read_text())
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    record.write_text(json.dumps(meta))
    info = kernel_info(torch.float64)
    assert info["compiled"] and info["path"] == str(library), info
    assert library.read_bytes() == built[torch.float64].read_bytes()
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    q = oracle_step(p, {"fused": True})
    assert torch.equal(p.detach(), q.detach())


@pytest.fixture
def failing_cc(tmp_path, monkeypatch):
    """$CC: the system compiler behind a wrapper that fails every compile
    (as with a full disk) once ``broken`` exists, and sleeps before each
    compile while ``slow`` exists."""
    wrapper = tmp_path / "cc-wrapper"
    broken, slow = tmp_path / "broken", tmp_path / "slow"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in *" -o "*)
            [ -e {slow} ] && sleep 60
            if [ -e {broken} ]; then echo "cc: error: no space left on device" >&2; exit 1; fi
        esac
        exec {" ".join(compiler())} "$@"
    """))
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    return broken, slow


def test_corrupt_cached_kernel_that_cannot_be_rebuilt(cache, failing_cc):
    """If building again fails too, fused=True says so and names the file;
    fused=None falls back to foreach, with torch's bits."""
    broken, _ = failing_cc
    path = Path(kernel_info()["path"])
    replace_with(path, path.read_bytes()[: path.stat().st_size // 2])
    broken.touch()
    forget_loaded()
    p = torch.zeros(3, requires_grad=True)
    assert not _fused.available([p])
    assert not path.exists()
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="could not be loaded") as err:
        rprop.Rprop([p], fused=True).step()
    assert str(path) in str(err.value) and "no space left on device" in str(err.value)
    q = oracle_step(p, {})
    assert torch.equal(p.detach(), q.detach())


def test_missing_compiler(cache, monkeypatch):
    monkeypatch.setenv("CC", "rprop-no-such-compiler")
    p = torch.zeros(3, requires_grad=True)
    assert not _fused.available([p])
    assert "no C compiler" in kernel_info()["error"]
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="no C compiler"):
        rprop.Rprop([p], fused=True).step()
    q = oracle_step(p, {})  # fused=None falls back to foreach, silently
    assert torch.equal(p.detach(), q.detach())


# -- concurrent and killed builds ---------------------------------------------------------


@pytest.mark.slow
def test_concurrent_first_use_builds_once(cache):
    """Three processes stepping at the same moment with an empty cache: one
    compiles, the others wait for it and load its library; none loads a
    file that is still being written, all step bitwise as torch."""
    go = cache.parent / "go"
    env = child_env(cache, RPROP_TEST_GO=str(go))
    procs = [subprocess.Popen([sys.executable, "-c", STEP_SCRIPT, str(i), "float32"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not all(Path(f"{go}.{i}").exists() for i in range(3)):
            assert time.monotonic() < deadline, "the processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.01)
        go.touch()
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    got = [json.loads(out)["float32"] for out, _ in results]
    assert sorted(g["compiled"] for g in got) == [False, False, True], got
    assert {g["path"] for g in got} == {got[0]["path"]}
    assert all(g["bits"] == expected_bits() for g in got)
    name = Path(got[0]["path"]).name
    assert sorted(f.name for f in cache.iterdir()) == sorted(
        [name, name + ".json", "rprop_kernel_0.lock"])


@pytest.mark.slow
def test_build_killed_midway_leaves_nothing_loadable_and_is_cleaned(cache, failing_cc):
    """SIGKILL of a process while it compiles: its half-written temporary
    file is never loaded, its lock dies with it, and the next build removes
    the file and builds."""
    _, slow = failing_cc
    slow.touch()
    proc = subprocess.Popen([sys.executable, "-c", STEP_SCRIPT, "0", "float32"],
                            env=child_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (cache.exists() and list(cache.glob("*.tmp"))):
            assert proc.poll() is None and time.monotonic() < deadline, "no build started"
            time.sleep(0.01)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it died by itself: the assert says why
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = [f.name for f in cache.iterdir()]
    assert not [n for n in left if n.endswith(".so")], left  # nothing under a library's name
    slow.unlink()
    info = kernel_info()
    assert info["compiled"], info
    assert sorted(f.name for f in cache.iterdir()) == sorted(
        [Path(info["path"]).name, Path(info["path"]).name + ".json", "rprop_kernel_0.lock"])


# -- trust: files another user could have written -----------------------------------------


def refused(target: Path, why: str) -> None:
    """Check that no kernel is loaded from the cache because of ``target``:
    one warning naming it and why, fused=None falls back to torch's bits,
    fused=True raises, and the cache's files stay as they were."""
    before = files(target if target.is_dir() else target.parent)
    p = torch.zeros(3, requires_grad=True)
    with pytest.warns(RuntimeWarning) as caught:
        assert not _fused.available([p])
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert str(target) in message and why in message and "steps without" in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per step
        q = oracle_step(p, {})
        assert torch.equal(p.detach(), q.detach())
        assert "error" in kernel_info()
        with pytest.raises(RuntimeError, match="refusing to load"):
            rprop.Rprop([p], fused=True).step()
    assert files(target if target.is_dir() else target.parent) == before


@pytest.mark.parametrize("bits,why", [(stat.S_IWGRP, "group-writable"),
                                      (stat.S_IWOTH, "world-writable")])
@pytest.mark.parametrize("what", ["folder", "library", "record"])
def test_cache_others_could_write_is_refused(built, cache, what, bits, why):
    library = seed(cache, built[torch.float32])
    target = {"folder": cache, "library": library,
              "record": library.with_name(library.name + ".json")}[what]
    target.chmod(target.stat().st_mode | bits)
    forget_loaded()
    refused(target, why)
    # Made private again, the cache is used as it is: nothing is compiled.
    target.chmod(target.stat().st_mode & ~bits)
    forget_loaded()
    assert not kernel_info()["compiled"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="giving a file to another user needs root")
@pytest.mark.parametrize("what", ["folder", "library"])
def test_cache_owned_by_another_user_is_refused(built, cache, what):
    library = seed(cache, built[torch.float32])
    target = cache if what == "folder" else library
    os.chown(target, 54321, -1)
    forget_loaded()
    refused(target, "owned by uid 54321")
