"""The private torch and SciPy names rprop uses still exist and behave as
rprop relies on: a torch or SciPy release that moves one fails here, naming
it, rather than somewhere deep in a step."""

from __future__ import annotations

import inspect

import pytest
import torch

from rprop.torch import _compat


def test_scalar_dtype_is_torchs_step_counter_dtype():
    assert _compat.get_scalar_dtype() == torch.float32
    reference = torch.optim.Rprop([torch.zeros(1, requires_grad=True)])
    p = reference.param_groups[0]["params"][0]
    p.grad = torch.ones(1)
    reference.step()
    assert reference.state[p]["step"].dtype == _compat.get_scalar_dtype()


def test_use_grad_for_differentiable_is_the_decorator_torch_steps_with():
    assert callable(_compat.use_grad_for_differentiable)
    source = inspect.getsource(torch.optim.Rprop.step)
    assert "_use_grad_for_differentiable" in source


def test_graph_capture_health_check_is_torchs():
    source = inspect.getsource(torch.optim.Rprop.step)
    assert _compat.graph_capture_health_check.__name__ in source
    _compat.graph_capture_health_check(torch.optim.Rprop([torch.zeros(1)]))  # no capture: no-op


def test_view_base_and_version():
    t = torch.zeros(4)
    v = t[1:]
    assert _compat.view_base(v) is t and _compat.view_base(t) is None
    before = _compat.version(t)
    t.add_(1)
    assert _compat.version(t) == before + 1


def test_local_tensor_is_a_dtensors_storage():
    pytest.importorskip("torch.distributed.tensor")
    from torch.distributed.tensor import DTensor

    assert "_local_tensor" in DTensor.__slots__
    plain = torch.zeros(2)
    assert _compat.local_tensor(plain) is plain


def test_fsdp_param_groups_are_where_fsdp2_keeps_them():
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    assert hasattr(fsdp.FSDPModule, "_get_fsdp_state")
    from torch.distributed.fsdp._fully_shard import _fsdp_state

    source = inspect.getsource(_fsdp_state)
    assert "_fsdp_param_groups" in source
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    group_source = inspect.getsource(_fsdp_param_group)
    for setting in ("gradient_divide_factor", "force_sum_reduction_for_comms"):
        assert setting in group_source, setting


def test_scipy_finite_differences():
    np = pytest.importorskip("numpy")
    pytest.importorskip("scipy")
    from rprop._compat import approx_derivative

    g = approx_derivative(lambda x: float(x @ x), np.array([1.0, -2.0]), method="3-point")
    np.testing.assert_allclose(g, [2.0, -4.0], rtol=1e-8)


def test_layout_guard_is_dynamos_tensor_guards_and_sees_what_the_plan_needs():
    from torch._C._dynamo.guards import TensorGuards

    assert _compat._TENSOR_GUARDS is TensorGuards
    for guard_of in (_compat.layout_guard, _compat._python_layout_guard):
        a, b = torch.zeros(3, 3), torch.zeros(4)
        check = guard_of([a, b])
        assert check(a, b)
        assert check(torch.ones(3, 3), torch.ones(4))  # values and addresses are not compared
        assert not check(a)  # another length
        assert not check(a, None)  # a gradient gone
        assert not check(a.t(), b)  # strides
        assert not check(a, b[:3])  # sizes
        assert not check(a, b.double())  # dtype
        assert not check(a, torch.nn.Parameter(b))  # Python type
        assert not check(a, b.requires_grad_())  # requires_grad
        sparse = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([1.0]), (4,),
                                         check_invariants=True)
        assert not check(a, sparse)  # layout
