"""The C++ re-check of a prepared fused bucket (rprop.torch._tensor_table).

It may only ever skip work whose outcome it has checked, so every change
between steps that the Python plan sees (tests/test_step_plan.py,
tests/test_step_plan_review.py, tests/test_review_guards.py) is run again
with the helper engaged on every bucket, against torch.optim.Rprop; and the
changes it must see itself (memory moved or viewed anew under the same
objects, a gradient of another layout) are checked one by one, with a count
showing that the helper answered before and after the change.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch

import rprop
from _table import needs_kernel
from rprop.torch import _tensor_table

pytestmark = needs_kernel

SHAPES = [(6,), (3, 4), (5,), (2, 2)]


@pytest.fixture(scope="module")
def helper() -> Any:
    lib = _tensor_table.library(wait=True)
    if lib is None:
        # A build started under another test's cache folder (an untrusted
        # one, say) is remembered as failed: look it up again, as a new
        # process would.
        _tensor_table.forget_loaded()
        lib = _tensor_table.library(wait=True)
    headers = [Path(sysconfig.get_paths()["include"]) / "Python.h",
               Path(torch.__file__).parent / "include" / "torch" / "csrc"]
    if lib is None and ("no C++ compiler" in _tensor_table.info().get("error", "")
                        or not all(h.exists() for h in headers)):
        pytest.skip(f"the helper cannot be built here: {_tensor_table.info().get('error')}")
    assert lib is not None, _tensor_table.info()
    return lib


@pytest.fixture
def counted(helper, monkeypatch) -> dict[str, int]:
    """The helper engaged for buckets of any size, its answers counted."""
    monkeypatch.setattr(_tensor_table, "MIN_TENSORS", 1)
    counts = {"same": 0, "differs": 0}
    call = _tensor_table.TableCheck.__call__

    def counting(self: Any, params: Any, states: Any) -> Any:
        grads = call(self, params, states)
        counts["same" if grads is not None else "differs"] += 1
        return grads

    monkeypatch.setattr(_tensor_table.TableCheck, "__call__", counting)
    return counts


def _params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]


def _grads(t: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]


def _run(make: Any, change: Any, grads_of: Any = None, steps: int = 6,
         variant: str | None = None) -> tuple[list[torch.Tensor], Any]:
    params = _params()
    opt = make(params)
    for t in range(steps):
        for i, (p, g) in enumerate(zip(params, _grads(t), strict=True)):
            p.grad = g.clone() if grads_of is None else grads_of(t, i, g)
        if variant == "irprop+":
            opt.step(loss=float(10 - t % 3))
        else:
            opt.step()
        if t == 2:
            change(opt, params)
    return params, opt


def _same_as_torch(change: Any, grads_of: Any = None) -> None:
    expected, _ = _run(lambda ps: torch.optim.Rprop(ps, lr=0.05, foreach=False), change,
                       grads_of)
    got, _ = _run(lambda ps: rprop.Rprop(ps, lr=0.05, fused=True), change, grads_of)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g), (e, g)


def test_the_helper_answers_for_an_unchanged_bucket(counted):
    _same_as_torch(lambda opt, ps: None)
    # The first step gathers, prepares and watches; every later one is checked.
    assert counted == {"same": 5, "differs": 0}


def _moved_data(opt: Any, ps: list[torch.Tensor]) -> None:
    ps[1].data = ps[1].data.clone()


def _transposed_param(opt: Any, ps: list[torch.Tensor]) -> None:
    ps[3].data = ps[3].data.t()  # at the same address (a square one: the same shape)


def _state_data(opt: Any, ps: list[torch.Tensor]) -> None:
    opt.state[ps[0]]["step_size"].data = torch.full(SHAPES[0], 0.3)


def _state_transposed(opt: Any, ps: list[torch.Tensor]) -> None:
    s = opt.state[ps[1]]["prev"]
    s.data = s.data.t().contiguous().t()  # same values, strides of a transpose


def _state_shared(opt: Any, ps: list[torch.Tensor]) -> None:
    for p in ps:
        for t in opt.state[p].values():
            t.share_memory_()


def _state_replaced(opt: Any, ps: list[torch.Tensor]) -> None:
    opt.state[ps[2]]["prev"] = opt.state[ps[2]]["prev"].clone()


def _state_values(opt: Any, ps: list[torch.Tensor]) -> None:
    opt.state[ps[3]]["step_size"].fill_(0.2)  # in place: the same memory


def _counter_data(opt: Any, ps: list[torch.Tensor]) -> None:
    opt.state[ps[2]]["step"].data = torch.tensor(7.0)


def _param_object(opt: Any, ps: list[torch.Tensor]) -> None:
    new = ps[0].detach().clone().requires_grad_()
    opt.param_groups[0]["params"][0] = new
    ps[0] = new


def _requires_grad_off(opt: Any, ps: list[torch.Tensor]) -> None:
    ps[3].requires_grad_(False)


CHANGES = {
    "p.data moved": _moved_data,
    "p viewed transposed at its address": _transposed_param,
    "state .data reassigned": _state_data,
    "state strides changed": _state_transposed,
    "state moved to shared memory": _state_shared,
    "a state tensor replaced": _state_replaced,
    "state values changed in place": _state_values,
    "a step counter's .data reassigned": _counter_data,
    "a parameter object replaced": _param_object,
    "requires_grad turned off": _requires_grad_off,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_it_must_see(change, counted):
    _same_as_torch(CHANGES[change])
    assert counted["same"] >= 1  # it answered before the change ...
    if change != "state values changed in place":
        assert counted["differs"] >= 1  # ... and saw the change
    else:
        assert counted["differs"] == 0


def _nothing(opt: Any, ps: list[torch.Tensor]) -> None:
    pass


GRAD_CHANGES = {
    "a gradient missing": lambda t, i, g: None if (t == 4 and i == 1) else g.clone(),
    "a gradient transposed": lambda t, i, g: (
        g.t().contiguous().t() if (t >= 4 and i == 1) else g.clone()),
    "a negative view": lambda t, i, g: (
        torch._neg_view(-g) if (t >= 4 and i == 2) else g.clone()),
    "a gradient kept in place": None,  # same objects every step (set_to_none=False)
}


@pytest.mark.parametrize("change", list(GRAD_CHANGES))
def test_a_gradient_change_it_must_see(change, counted):
    grads_of = GRAD_CHANGES[change]
    if grads_of is None:
        kept: dict[int, torch.Tensor] = {}

        def grads_of(t: int, i: int, g: torch.Tensor) -> torch.Tensor:
            kept.setdefault(i, torch.empty_like(g)).copy_(g)
            return kept[i]

    _same_as_torch(_nothing, grads_of)
    assert counted["same"] >= 1
    if change != "a gradient kept in place":
        assert counted["differs"] >= 1


def test_a_gradient_in_another_dtype_is_seen(counted):
    def grads_of(t: int, i: int, g: torch.Tensor) -> torch.Tensor:
        return g.double() if (t >= 4 and i == 0) else g.clone()

    def allow(opt: Any, ps: list[torch.Tensor]) -> None:
        ps[0].grad_dtype = None  # any gradient dtype from now on

    expected, _ = _run(lambda ps: rprop.Rprop(ps, lr=0.05, foreach=False, fused=False),
                       allow, grads_of)
    got, _ = _run(lambda ps: rprop.Rprop(ps, lr=0.05, fused=True), allow, grads_of)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    assert counted["same"] >= 1 and counted["differs"] >= 1


def test_irprop_plus_with_its_shared_loss_tensor(counted):
    def replace_loss(opt: Any, ps: list[torch.Tensor]) -> None:
        loss = opt.state[ps[0]]["prev_loss"].clone()
        for p in ps:
            opt.state[p]["prev_loss"] = loss

    expected, _ = _run(lambda ps: rprop.Rprop(ps, lr=0.05, variant="irprop+", foreach=False,
                                              fused=False), replace_loss, variant="irprop+")
    got, _ = _run(lambda ps: rprop.Rprop(ps, lr=0.05, variant="irprop+", fused=True),
                  replace_loss, variant="irprop+")
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    assert counted["same"] >= 1 and counted["differs"] >= 1


def test_the_plan_tests_pass_with_the_helper(counted):
    """tests/test_step_plan.py's and tests/test_step_plan_review.py's
    scenarios on the fused path, every bucket checked by the helper."""
    import test_step_plan
    import test_step_plan_review

    for change in test_step_plan.CHANGES:
        test_step_plan.test_a_change_between_steps_is_seen("fused", change)
    test_step_plan.test_gradients_coming_and_going("fused")
    test_step_plan.test_load_state_dict_and_add_param_group_between_steps("fused")
    test_step_plan_review.test_state_data_reassigned("fused")
    test_step_plan_review.test_parameter_viewed_transposed_at_the_same_address("fused")
    test_step_plan_review.test_gradient_transposed_in_place_under_the_same_object("fused")
    test_step_plan_review.test_state_memory_moved_under_the_same_tensors("fused")
    test_step_plan_review.test_a_sparse_gradient_after_the_first_step_is_refused_before_anything_changes("fused")
    test_step_plan_review.test_irprop_plus_state_dicts_copied_then_a_parameter_without_gradient("fused")
    assert counted["same"] > 20 and counted["differs"] > 5


def test_a_state_narrower_than_its_parameter_is_refused(counted):
    import test_review_guards

    test_review_guards.test_a_state_narrower_than_its_parameter_is_refused_also_while_a_plan_holds(
        "fused")
    assert counted["differs"] >= 1


def test_turned_off_by_the_environment():
    code = ("import torch, rprop; from rprop.torch import _tensor_table as t; "
            "print(t.library(wait=True), t.info()['error'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "RPROP_TENSOR_TABLE": "0"}, timeout=120, check=True)
    assert out.stdout.startswith("None the C++ tensor table is turned off"), out.stdout


def test_a_big_bucket_starts_the_build_and_small_ones_do_not(helper):
    """MIN_TENSORS is the size from which the helper is asked for; below it
    the Python checks run alone."""
    small = [torch.zeros(2, requires_grad=True) for _ in range(_tensor_table.MIN_TENSORS - 1)]
    assert _tensor_table.record(small, [{}] * len(small), (), small, None) is None


def test_a_skipped_step_leaves_no_stale_gradient_pointers(counted):
    """A check that passed writes the gradients' pointers into the table; the
    step is then skipped (an inf gradient, nonfinite="skip"), and the next
    step runs the Python checks (optimizer.state changed: a look-up of a
    tensor it does not hold). Its gradients are the buffers of two steps
    before, whose pointers the Python checks had last seen: the table must
    not keep the skipped step's."""
    def run(make: Any) -> list[torch.Tensor]:
        ps = _params()
        opt = make(ps)
        buffers = [[torch.zeros(s) for s in SHAPES] for _ in range(2)]
        for t in range(5):
            buf = buffers[t % 2]
            for p, b, g in zip(ps, buf, _grads(t), strict=True):
                b.copy_(g)
                p.grad = b
            if t == 1:
                buf[0][0] = float("inf")
                if isinstance(opt, torch.optim.Rprop):
                    continue  # torch has no nonfinite="skip": the step is left out
            opt.step()
            if t == 1:
                opt.state[torch.zeros(3)]  # defaultdict's look-up adds a state
        return ps

    expected = run(lambda ps: torch.optim.Rprop(ps, lr=0.05, foreach=False))
    got = run(lambda ps: rprop.Rprop(ps, lr=0.05, fused=True, nonfinite="skip"))
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g), (e, g)
    assert counted["same"] >= 1


def test_the_loss_tensor_read_again_by_the_python_checks_is_watched_again(counted):
    """iRprop+: the Python checks (optimizer.state changed) re-read the shared
    E(t-1) tensor, replaced in every state dict; when the old one is put back,
    the check must not answer for lists it no longer describes."""
    losses = [5.0, 4.0, 6.0, 5.5, 4.5]

    def run(**kw: Any) -> list[torch.Tensor]:
        ps = _params()
        opt = rprop.Rprop(ps, lr=0.05, variant="irprop+", **kw)
        for t in range(5):
            for p, g in zip(ps, _grads(t), strict=True):
                p.grad = g
            opt.step(loss=losses[t])
            if t == 1:
                saved = opt.state[ps[0]]["prev_loss"]
                new = saved.clone()
                for p in ps:
                    opt.state[p]["prev_loss"] = new
                opt.state[ps[0]] = opt.state[ps[0]]  # the same dict: only a change counted
            if t == 2:
                for p in ps:
                    opt.state[p]["prev_loss"] = saved
        return [*ps, opt.state[ps[0]]["prev_loss"]]

    expected = run(foreach=False, fused=False)
    got = run(fused=True)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g), (e, g)
    assert counted["same"] >= 1


def _in_process(code: str, cache_dir: Any, timeout: float = 300, cwd: Any = None) -> str:
    """Run ``code`` as a script (its folder, not the working one, on sys.path)."""
    script = Path(cache_dir).parent / "script.py"
    script.write_text("import torch, rprop\nfrom rprop.torch import _tensor_table as t\n" + code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=timeout, check=True, cwd=cwd,
                         env={**os.environ, "RPROP_CACHE_DIR": str(cache_dir)})
    return out.stdout.strip()


def test_a_build_outlives_its_process_and_a_foreign_library_is_rebuilt(tmp_path):
    """The build is a process of its own: one started by a process that then
    exits at once (from a folder whose torch.py would shadow torch) still ends
    in the cache, which the next process loads without building. A library
    under the helper's name with a matching record that is not the helper
    (here the C kernel) is deleted and built again, and loaded."""
    import hashlib
    import json
    import time

    cache_dir = tmp_path / "cache"
    # Started from a folder holding a torch.py: the build process must not import it.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text("raise ImportError('the working folder shadows torch')\n")
    said = _in_process("print(t.library())", cache_dir, cwd=shadow)
    assert said == "None"  # started, not waited for
    deadline = time.monotonic() + 240
    while not list(cache_dir.glob("rprop_table_*.so.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    (record,) = cache_dir.glob("rprop_table_*.so.json")
    library = record.with_suffix("")
    assert _in_process("print(t.library() is not None)", cache_dir) == "True"  # no build

    kernel = _in_process("from rprop.torch import _fused\nprint(_fused.kernel_info()['path'])",
                         cache_dir)
    data = Path(kernel).read_bytes()
    library.unlink()
    library.write_bytes(data)
    library.chmod(0o755)
    entry = json.loads(record.read_text())
    record.write_text(json.dumps({**entry, "size": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()}))
    said = _in_process("lib = t.library(wait=True, timeout=240)\n"
                       "print(lib is not None, t.info())", cache_dir)
    assert said.startswith("True"), said
    assert library.read_bytes() != data
