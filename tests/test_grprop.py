"""GRprop (variant="grprop-sag" / "grprop-slr"), R neuralnet's algorithm="sag" /
"slr", on every front and torch path, against tests/reference.py's transcription
of neuralnet's ``minus()`` (ReferenceGRprop), never against the code under test."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import rprop
import rprop.numpy
from _table import PATHS
from reference import ReferenceGRprop
from rprop._variants import ELEMENTWISE_FEATURES
from rprop.torch import _path_registry

ADJUSTS = ("sag", "slr")
# neuralnet's defaults: learningrate 0.1, learningrate.limit (1e-10, 0.1).
NN = {"lr": 0.1, "step_sizes": (1e-10, 0.1)}
SHAPES = [(3, 4), (5,), (1,)]
STEPS = 25
# Every torch path setting but fused=True, whose one-pass kernel sums in
# another order (tests/test_grprop_fused.py).
SETTINGS = {name: kw for name, kw in PATHS.items() if not kw.get("fused")}


def _grad(xs: list[np.ndarray], t: int) -> list[np.ndarray]:
    """A gradient field with sign flips, one coordinate always 0, an array
    that is all 0 every third step, and ties in |g| now and then."""
    gs = [np.sin(3.0 * x) + 0.3 * x for x in xs]
    gs[0][0, 0] = 0.0
    if t % 3 == 2:
        gs[2][...] = 0.0
    if t % 4 == 1:
        gs[1][1] = -gs[1][3]  # a tie in |g| (sag), the first of the two must win
    return gs


def _start(dtype=np.float64) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(size=s).astype(dtype) for s in SHAPES]


def _reference_run(adjust: str, dtype=np.float64, **kw):
    ref = ReferenceGRprop(_start(dtype), adjust=adjust, **kw)
    out = []
    for t in range(STEPS):
        ref.step(_grad(ref.params, t))
        out.append(([p.copy() for p in ref.params], [s.copy() for s in ref.step_size]))
    return out


def _torch_run(adjust: str, setting: dict, dtype=torch.float64, **kw):
    ts = [torch.tensor(p, dtype=dtype, requires_grad=True) for p in _start()]
    opt = rprop.Rprop(ts, variant=f"grprop-{adjust}", **NN, **setting, **kw)
    out = []
    for t in range(STEPS):
        for x, g in zip(ts, _grad([x.detach().numpy() for x in ts], t), strict=True):
            x.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        out.append(([x.detach().numpy().copy() for x in ts],
                    [opt.state[x]["step_size"].numpy().copy() for x in ts]))
    return out, opt


def _numpy_run(adjust: str, **kw):
    xs = _start()
    opt = rprop.numpy.Rprop(xs, variant=f"grprop-{adjust}", **NN, **kw)
    out = []
    for t in range(STEPS):
        opt.step(_grad(xs, t))
        out.append(([x.copy() for x in xs], [opt.state[i]["step_size"].copy()
                                            for i in range(len(xs))]))
    return out


def _optax_run(adjust: str):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import rprop.optax as ro

    jax.config.update("jax_enable_x64", True)
    try:
        jnp = jax.numpy
        opt = ro.rprop(0.1, min_step_size=1e-10, max_step_size=0.1, variant=f"grprop-{adjust}")
        params = [jnp.asarray(p) for p in _start()]
        state = opt.init(params)

        @jax.jit
        def update(grads, state, params):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        out = []
        for t in range(STEPS):
            grads = _grad([np.asarray(p) for p in params], t)
            params, state = update([jnp.asarray(g) for g in grads], state, params)
            out.append(([np.asarray(p) for p in params],
                        [np.asarray(s) for s in state[0].step_sizes]))
        return out
    finally:
        jax.config.update("jax_enable_x64", False)


def _assert_bitwise(got, expected, what):
    for t, ((gp, gs), (ep, es)) in enumerate(zip(got, expected, strict=True)):
        for i, (a, b) in enumerate(zip(gp + gs, ep + es, strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"{what}: step {t}, array {i}")


def _assert_close(got, expected, what, rtol=1e-15):
    for t, ((gp, gs), (ep, es)) in enumerate(zip(got, expected, strict=True)):
        for i, (a, b) in enumerate(zip(gp + gs, ep + es, strict=True)):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=0,
                                       err_msg=f"{what}: step {t}, array {i}")


# -- the transcription itself, against a hand-worked step ---------------------------------


def test_reference_matches_a_hand_worked_step():
    # w = (0, 0, 0, 0), g = (0, 2, -0.5, 1), step 0.1 each, sag: the smallest
    # non-zero |g| is 0.5 (position 2); the others sum to 0.1*2 + 0.1*1 = 0.3;
    # + δ = 0.300001; -0.300001 / -0.5 = 0.600002, within (1e-10, 1).
    ref = ReferenceGRprop([np.zeros(4)], adjust="sag", step_sizes=(1e-10, 1.0))
    ref.step([np.array([0.0, 2.0, -0.5, 1.0])])
    assert ref.chosen == 2
    adjusted = (0.1 * 2.0 + 0.1 * 1.0 + 1e-6) / 0.5
    assert math.isclose(adjusted, 0.600002, rel_tol=1e-15)
    np.testing.assert_array_equal(ref.step_size[0], [0.1, 0.1, adjusted, 0.1])
    np.testing.assert_array_equal(ref.params[0], [0.0, -0.1, adjusted, -0.1])
    np.testing.assert_array_equal(ref.prev[0], [0.0, 2.0, -0.5, 1.0])


# -- every front and path against the transcription ---------------------------------------


@pytest.mark.parametrize("adjust", ADJUSTS)
@pytest.mark.parametrize("setting", list(SETTINGS), ids=list(SETTINGS))
def test_torch_paths_match_reference(adjust, setting):
    """Every torch path setting runs GRprop on the reference path, bitwise
    equal to the transcription (the library's sum is within an ulp of R's
    long-double one, and on these inputs rounds to the same double)."""
    got, opt = _torch_run(adjust, SETTINGS[setting])
    assert opt.last_paths == ("for-loop",)
    _assert_bitwise(got, _reference_run(adjust), f"torch {setting}")
    _assert_bitwise(got, _reference_run(adjust, exact_sum=True), f"torch {setting}, exact sum")


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_numpy_front_matches_reference(adjust):
    _assert_bitwise(_numpy_run(adjust), _reference_run(adjust), "numpy")


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_optax_front_matches_reference_under_jit(adjust):
    _assert_bitwise(_optax_run(adjust), _reference_run(adjust), "optax")


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_minimize_matches_reference(adjust):
    pytest.importorskip("scipy")
    x0 = np.random.default_rng(3).normal(size=9)

    def jac(x):
        g = np.sin(3.0 * x) + 0.3 * x
        g[0] = 0.0
        return g

    def fun(x):
        return float(np.sum(-np.cos(3.0 * x) / 3.0 + 0.15 * x**2))

    res = rprop.minimize(fun, x0, jac=jac, variant=f"grprop-{adjust}", maxiter=30, gtol=0,
                         xtol=0, **NN)
    ref = ReferenceGRprop([x0], adjust=adjust)
    for _ in range(res.nit):
        ref.step([jac(ref.params[0])])
    # x is the best iterate seen; the last iterate's step sizes are reported.
    np.testing.assert_array_equal(res.step_size, ref.step_size[0])


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_torch_minimize_matches_reference(adjust):
    """rprop.torch.minimize adjusts over all its tensors at once, as the
    transcription does over the parameters taken as one vector."""
    ts = [torch.tensor(p, requires_grad=True) for p in _start()]
    visited = []

    def closure():
        xs = [t.detach().numpy().copy() for t in ts]
        for t, g in zip(ts, _grad(xs, len(visited)), strict=True):
            t.grad = torch.tensor(g)
        visited.append(xs)
        return 0.0  # no stop rule reads the loss here (ftol off)

    res = rprop.torch.minimize(closure, ts, variant=f"grprop-{adjust}", maxiter=STEPS, gtol=0,
                               xtol=0, **NN)
    assert res.nit == STEPS
    ref = ReferenceGRprop(_start(), adjust=adjust)
    for t in range(STEPS):
        ref.step(_grad(ref.params, t))
        for i, (got, want) in enumerate(zip(visited[t + 1], ref.params, strict=True)):
            np.testing.assert_array_equal(got, want, err_msg=f"step {t}, tensor {i}")
    for got, want in zip(res.step_size, ref.step_size, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("adjust", ADJUSTS)
@pytest.mark.parametrize(("tdtype", "ndtype"), [(torch.float32, np.float32),
                                                (torch.float16, np.float16)])
def test_float32_and_float16_torch_and_numpy_agree_bitwise(adjust, tdtype, ndtype):
    """The same additions in the same order on both fronts (one algorithm);
    float16 selects on 16-bit integer keys in torch."""
    ts = [torch.tensor(p, dtype=tdtype, requires_grad=True) for p in _start()]
    xs = [p.astype(ndtype) for p in _start()]
    a = rprop.Rprop(ts, variant=f"grprop-{adjust}", **NN)
    b = rprop.numpy.Rprop(xs, variant=f"grprop-{adjust}", **NN)
    for t in range(STEPS):
        grads = _grad(xs, t)
        for x, g in zip(ts, grads, strict=True):
            x.grad = torch.tensor(g)
        a.step()
        b.step(grads)
        for x, y in zip(ts, xs, strict=True):
            np.testing.assert_array_equal(x.detach().numpy(), y, err_msg=f"step {t}")


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_maximize_and_weight_decay_match_reference(adjust):
    got, _ = _torch_run(adjust, {}, maximize=True, weight_decay=0.05)
    expected = _reference_run(adjust, maximize=True, weight_decay=0.05)
    _assert_close(got, expected, "maximize + weight_decay")


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_param_groups_with_own_etas_match_one_group(adjust):
    """Groups that share what the adjustment reads act as one vector; their
    etas apply per element (here equal, so the split changes nothing)."""
    one, _ = _torch_run(adjust, {})
    ts = [torch.tensor(p, requires_grad=True) for p in _start()]
    opt = rprop.Rprop([{"params": ts[:1]}, {"params": ts[1:]}], variant=f"grprop-{adjust}",
                      **NN)
    for t in range(STEPS):
        for x, g in zip(ts, _grad([x.detach().numpy() for x in ts], t), strict=True):
            x.grad = torch.tensor(g)
        opt.step()
    for x, expected in zip(ts, one[-1][0], strict=True):
        np.testing.assert_array_equal(x.detach().numpy(), expected)


# -- zero gradients, ties, the clip -------------------------------------------------------


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_all_zero_gradient_changes_nothing(adjust):
    x = np.array([0.5, -1.0, 2.0])
    opt = rprop.numpy.Rprop([x], variant=f"grprop-{adjust}", **NN)
    opt.step([np.array([1.0, -2.0, 0.5])])
    before = (x.copy(), opt.state[0]["step_size"].copy())
    opt.step([np.zeros(3)])
    np.testing.assert_array_equal(x, before[0])
    np.testing.assert_array_equal(opt.state[0]["step_size"], before[1])
    ref = ReferenceGRprop([np.array([0.5, -1.0, 2.0])], adjust=adjust)
    ref.step([np.array([1.0, -2.0, 0.5])])
    ref.step([np.zeros(3)])
    assert ref.chosen is None
    np.testing.assert_array_equal(x, ref.params[0])


@pytest.mark.parametrize(("adjust", "grad", "chosen"), [
    ("sag", [0.0, 3.0, -1.0, 1.0, -1.0], 2),   # |g| = 1 three times: the first
    ("slr", [0.0, 3.0, -1.0, 1.0, -1.0], 1),   # every step 0.1: the first non-zero g
])
def test_ties_go_to_the_first_coordinate(adjust, grad, chosen):
    ref = ReferenceGRprop([np.zeros(5)], adjust=adjust, step_sizes=(1e-10, 50.0))
    ref.step([np.array(grad)])
    assert ref.chosen == chosen
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([p], variant=f"grprop-{adjust}", lr=0.1, step_sizes=(1e-10, 50.0))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    sizes = opt.state[p]["step_size"].numpy()
    assert np.flatnonzero(sizes != 0.1).tolist() == [chosen]
    np.testing.assert_array_equal(sizes, ref.step_size[0])


@pytest.mark.parametrize(("grad", "bound"), [
    ([-4.0, 1.0, 0.01], "max"),  # -(-0.4 + 0.1 + δ) / 0.01 = 29.9999: step_max
    ([4.0, -1.0, 0.01], "min"),  # -(0.4 - 0.1 + δ) / 0.01 < 0: step_min
    ([0.2, -0.1, 0.5], "none"),  # sag picks -0.1: -(0.02 + 0.05 + δ) / -0.1 = 0.70001
])
def test_adjusted_step_is_clipped_to_either_bound(grad, bound):
    lo, hi = 1e-10, 1.0
    ref = ReferenceGRprop([np.zeros(3)], adjust="sag", step_sizes=(lo, hi))
    ref.step([np.array(grad)])
    x = np.zeros(3)
    opt = rprop.numpy.Rprop([x], variant="grprop-sag", lr=0.1, step_sizes=(lo, hi))
    opt.step([np.array(grad)])
    got = opt.state[0]["step_size"][ref.chosen]
    assert got == ref.step_size[0][ref.chosen]
    if bound == "max":
        assert got == hi
    elif bound == "min":
        assert got == lo
    else:
        assert lo < got < hi
        assert math.isclose(got, 0.70001, rel_tol=1e-12)
    np.testing.assert_array_equal(x, ref.params[0])


# -- resume ------------------------------------------------------------------------------


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_torch_state_dict_resume_is_bitwise(adjust):
    full, _ = _torch_run(adjust, {}, grprop_delta=1e-3)
    ts = [torch.tensor(p, requires_grad=True) for p in _start()]
    opt = rprop.Rprop(ts, variant=f"grprop-{adjust}", grprop_delta=1e-3, **NN)
    for t in range(STEPS):
        if t == 11:
            saved = copy.deepcopy(opt.state_dict())
            assert all(g["grprop_delta"] == 1e-3 for g in saved["param_groups"])
            ts = [x.detach().clone().requires_grad_() for x in ts]
            opt = rprop.Rprop(ts, variant="irprop-")  # every hyperparameter from the dict
            opt.load_state_dict(saved)
        for x, g in zip(ts, _grad([x.detach().numpy() for x in ts], t), strict=True):
            x.grad = torch.tensor(g)
        opt.step()
    for x, expected in zip(ts, full[-1][0], strict=True):
        np.testing.assert_array_equal(x.detach().numpy(), expected)


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_numpy_state_dict_resume_is_bitwise(adjust):
    full = _numpy_run(adjust, grprop_delta=1e-3)
    xs = _start()
    opt = rprop.numpy.Rprop(xs, variant=f"grprop-{adjust}", grprop_delta=1e-3, **NN)
    for t in range(STEPS):
        if t == 11:
            saved = copy.deepcopy(opt.state_dict())
            assert saved["hyperparams"]["grprop_delta"] == 1e-3
            opt = rprop.numpy.Rprop(xs)
            opt.load_state_dict(saved)
        opt.step(_grad(xs, t))
    for x, expected in zip(xs, full[-1][0], strict=True):
        np.testing.assert_array_equal(x, expected)


def test_state_dicts_saved_without_grprop_delta_still_load():
    p = torch.zeros(2, requires_grad=True)
    opt = rprop.Rprop([p], grprop_delta=1e-4)
    p.grad = torch.ones(2)
    opt.step()
    saved = opt.state_dict()
    for g in saved["param_groups"]:
        del g["grprop_delta"]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["grprop_delta"] == 1e-4  # this optimizer's own, as torch's keys
    x = np.zeros(2)
    nopt = rprop.numpy.Rprop([x], grprop_delta=1e-4)
    old = nopt.state_dict()
    del old["hyperparams"]["grprop_delta"]
    nopt.load_state_dict(old)
    assert nopt.hyper.grprop_delta == 1e-4


# -- declarations and the path registry ---------------------------------------------------


def test_only_the_fused_path_declares_the_adjustment():
    """The fused path runs GRprop in its one-pass kernel (fused=True); no
    other fast path declares the adjustment, so GRprop runs on the
    reference path elsewhere."""
    for variant in ("grprop-sag", "grprop-slr"):
        v = rprop.get_variant(variant)
        assert v.features == {"undo=never", f"adjust={v.adjust}"}
        for name, path in _path_registry.paths().items():
            if name not in (_path_registry.reference().name, "fused"):
                assert not v.features <= path.features, name
        assert v.features <= _path_registry.paths()["fused"].features
        assert v.features <= _path_registry.reference().features
    assert {"adjust=sag", "adjust=slr"}.isdisjoint(ELEMENTWISE_FEATURES)


# -- bad input ---------------------------------------------------------------------------


def _torch(**kw):
    return lambda: rprop.Rprop([torch.zeros(2, requires_grad=True)], **kw)


def _numpy(**kw):
    return lambda: rprop.numpy.Rprop([np.zeros(2)], **kw)


def _optax(**kw):
    def make():
        import rprop.optax as ro

        return ro.rprop(0.1, **kw)
    return make


def _minimize(**kw):
    return lambda: rprop.minimize(lambda x: float(x @ x), np.ones(2), jac=lambda x: 2 * x,
                                  maxiter=1, **kw)


BAD = [
    *[(front(grprop_delta=value), exc, match)
      for front in (_torch, _numpy, _optax, _minimize)
      for value, exc, match in [
          (-1e-6, ValueError, r"grprop_delta must be a finite number >= 0, got -1e-06"),
          (math.nan, ValueError, r"grprop_delta must be a finite number >= 0, got nan"),
          (math.inf, ValueError, r"grprop_delta must be a finite number >= 0, got inf"),
          ("1e-6", TypeError, r"grprop_delta must be a real number"),
          (True, TypeError, r"grprop_delta must be a real number"),
      ]],
    (_torch(variant="grprop-foo"), ValueError, r"variant must be one of \['grprop-sag'"),
    (_numpy(variant="grprop"), ValueError, r"variant must be one of \['grprop-sag'"),
    (_torch(variant="grprop-slr", differentiable=True), ValueError,
     r"variant='grprop-slr' \(GRprop\) does not support differentiable=True"),
    (lambda: rprop.Variant("g", undo="always", forget=False, adjust="sag"), ValueError,
     r"adjust='sag' \(GRprop\) builds on Rprop-: it needs undo='never' and forget=False"),
    (lambda: rprop.Variant("g", undo="never", forget=True, adjust="slr"), ValueError,
     r"builds on Rprop-"),
    (lambda: rprop.Variant("g", undo="never", forget=False, adjust="lsa"), ValueError,
     r"Variant adjust must be None or one of \('sag', 'slr'\), got 'lsa'"),
    (_torch(variant="irprop-", grprop_partitioned=True), ValueError,
     r"grprop_partitioned=True combines GRprop's selection across ranks; it applies to the "
     r"grprop-\* variants only, got variant='irprop-'"),
    (_torch(variant="grprop-sag", grprop_partitioned=1), TypeError,
     r"grprop_partitioned must be a bool, got 1"),
    (_torch(variant="grprop-slr", grprop_partitioned=True, nonfinite="skip"), ValueError,
     r"grprop_partitioned=True cannot be combined with nonfinite='skip'"),
]


@pytest.mark.parametrize(("make", "exc", "match"), BAD)
def test_bad_input_is_refused_clearly(make, exc, match):
    if make.__qualname__.startswith("_optax"):
        pytest.importorskip("optax")
    with pytest.raises(exc, match=match):
        make()


def test_partitioned_without_a_process_group_is_refused():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a default process group is initialized in this process")
    with pytest.raises(ValueError, match=r"grprop_partitioned=True needs an initialized "
                                         r"default process group \(torch.distributed"):
        rprop.Rprop([torch.zeros(2, requires_grad=True)], variant="grprop-sag",
                    grprop_partitioned=True)


def test_partitioned_is_saved_and_loaded_with_the_param_groups():
    """The option travels with the groups; a dict saved without it loads as
    False (this optimizer's own default), as grprop_delta does."""
    p = torch.zeros(2, requires_grad=True)
    opt = rprop.Rprop([p], variant="grprop-sag")
    saved = opt.state_dict()
    assert saved["param_groups"][0]["grprop_partitioned"] is False
    del saved["param_groups"][0]["grprop_partitioned"]
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["grprop_partitioned"] is False


def test_param_groups_that_disagree_are_refused_and_the_optimizer_is_unchanged():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = rprop.Rprop([a], variant="grprop-sag", **NN)
    before = copy.deepcopy(opt.state_dict())
    for group, what in [({"params": [b], "step_sizes": (1e-6, 50.0)}, "step_sizes"),
                        ({"params": [b], "grprop_delta": 1e-3}, "grprop_delta"),
                        ({"params": [b], "variant": "grprop-slr"}, "variant"),
                        ({"params": [b], "variant": "irprop-"}, "variant")]:
        with pytest.raises(ValueError, match=r"every param group must have the same variant, "
                                             r"step_sizes, grprop_delta, grprop_partitioned: "
                                             r"param group 0 has"):
            opt.add_param_group(group)
        assert opt.state_dict() == before, what
    # Changed by hand after construction: refused at the step, before anything moves.
    opt.add_param_group({"params": [b]})
    opt.param_groups[1]["step_sizes"] = (1e-6, 1.0)
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    with pytest.raises(ValueError, match="every param group must have the same"):
        opt.step()
    assert torch.equal(a, torch.zeros(2)) and not opt.state


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_a_nan_gradient_is_never_chosen_and_a_nan_sum_adjusts_nothing(adjust):
    """The documented difference from neuralnet, which would store the NaN:
    the NaN coordinate neither moves nor adapts (torch's rule for NaN), and
    the NaN it puts into the sum leaves every step size as it was."""
    grad = np.array([np.nan, 1.0, -2.0])
    x = np.zeros(3)
    opt = rprop.numpy.Rprop([x], variant=f"grprop-{adjust}", **NN)
    opt.step([grad])
    np.testing.assert_array_equal(opt.state[0]["step_size"], [0.1, 0.1, 0.1])
    np.testing.assert_array_equal(x, [0.0, -0.1, 0.1])
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    topt = rprop.Rprop([p], variant=f"grprop-{adjust}", **NN)
    p.grad = torch.tensor(grad)
    topt.step()
    np.testing.assert_array_equal(topt.state[p]["step_size"].numpy(), [0.1, 0.1, 0.1])
    np.testing.assert_array_equal(p.detach().numpy(), x)


@pytest.mark.parametrize("adjust", ADJUSTS)
@pytest.mark.parametrize("step_max", [0.1, math.inf])
@pytest.mark.parametrize("grad", [
    [0.0, math.inf, 0.5, -2.0],        # an infinite gradient beside finite ones
    [0.0, math.inf, 0.0],              # the one candidate is infinite: step_min
    [-math.inf, 0.0, math.inf],        # only infinite candidates: a NaN sum, nothing
    [0.0, -0.0, 0.0],                  # no candidate (signed zeros)
    [5e-324, -5e-324, 1.0],            # subnormal gradients, a tie in |g|
    [1.0, 1.0, 1.0, 1.0],              # every key equal
])
def test_special_gradients_match_reference(adjust, step_max, grad):
    """The torch step selects on integer keys and falls back to the core's
    selection where no finite key exists; both against the transcription,
    two steps (the second sees the first's step sizes). Where neuralnet
    stores a NaN step size (a NaN sum), the library keeps the step size it
    had (the documented difference), so that case stops after one step."""
    bounds = (1e-10, step_max)
    ref = ReferenceGRprop([np.zeros(len(grad))], adjust=adjust, step_sizes=bounds)
    p = torch.zeros(len(grad), dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([p], variant=f"grprop-{adjust}", lr=0.1, step_sizes=bounds)
    for _ in range(2):
        before = opt.state[p]["step_size"].numpy().copy() if opt.state else np.full(
            len(grad), 0.1)
        with np.errstate(invalid="ignore", over="ignore"):
            ref.step([np.array(grad)])
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        want_sizes, want_params = ref.step_size[0], ref.params[0]
        stored_nan = np.isnan(want_sizes)
        if stored_nan.any():
            want_sizes = np.where(stored_nan, before, want_sizes)
            want_params = -np.sign(grad) * want_sizes
        np.testing.assert_array_equal(opt.state[p]["step_size"].numpy(), want_sizes)
        np.testing.assert_array_equal(p.detach().numpy(), want_params)
        if stored_nan.any():
            break


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_an_infinite_step_size_with_a_zero_gradient_stays_out_of_the_sum(adjust):
    """step_max=inf lets step sizes overflow to inf; a coordinate whose
    gradient is then 0 is no candidate (neuralnet's notzero), so its inf * 0
    (NaN) must not reach the sum."""
    bounds = (1e-10, math.inf)
    grads = [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [1.0, 0.0, 2.0]]
    ref = ReferenceGRprop([np.zeros(3)], adjust=adjust, lr=1.7e308, step_sizes=bounds)
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([p], variant=f"grprop-{adjust}", lr=1.7e308, step_sizes=bounds)
    for grad in grads:
        with np.errstate(invalid="ignore", over="ignore"):
            ref.step([np.array(grad)])
        p.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        np.testing.assert_array_equal(opt.state[p]["step_size"].numpy(), ref.step_size[0])
    assert ref.step_size[0][1] == math.inf  # the zero-gradient coordinate's step


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_optax_state_through_numpy_and_back_resumes_bitwise(adjust):
    """optax's state is the checkpoint: saved as NumPy arrays mid-run and
    restored, the run goes on as if never stopped."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import rprop.optax as ro

    full = _optax_run(adjust)
    jax.config.update("jax_enable_x64", True)
    try:
        opt = ro.rprop(0.1, min_step_size=1e-10, max_step_size=0.1, variant=f"grprop-{adjust}")
        params = [jax.numpy.asarray(p) for p in _start()]
        state = opt.init(params)
        for t in range(STEPS):
            if t == 11:
                saved = jax.tree.map(np.asarray, (params, state))
                params, state = jax.tree.map(jax.numpy.asarray, saved)
            grads = [jax.numpy.asarray(g) for g in _grad([np.asarray(p) for p in params], t)]
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        for p, expected in zip(params, full[-1][0], strict=True):
            np.testing.assert_array_equal(np.asarray(p), expected)
    finally:
        jax.config.update("jax_enable_x64", False)


@pytest.mark.parametrize("adjust", ADJUSTS)
def test_a_negative_view_gradient_steps_as_its_values_do(adjust):
    """``z.conj().imag`` is a negative view: its memory holds the negated
    values. GRprop reads its bits for the selection keys, and must read the
    values (the same step as with the gradient copied)."""
    gen = torch.Generator().manual_seed(3)
    zs = [torch.randn(5, dtype=torch.complex128, generator=gen) for _ in range(4)]
    runs = []
    for resolved in (False, True):
        p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        opt = rprop.Rprop([p], variant=f"grprop-{adjust}", **NN)
        for z in zs:
            g = z.conj().imag
            assert g.is_neg()
            p.grad = g.clone() if resolved else g
            opt.step()
        runs.append((p.detach().clone(), opt.state[p]["step_size"].clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
