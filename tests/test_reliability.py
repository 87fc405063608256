"""Issue 7: checked state loading, non-finite policies, half precision."""

import copy

import pytest
import torch

import rprop


def trained(variant="irprop-", steps=3, **kw):
    p = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True),
         torch.randn(5, dtype=torch.float64, requires_grad=True)]
    opt = rprop.Rprop(p, variant=variant, **kw)
    for t in range(steps):
        for q in p:
            q.grad = torch.sin(q.detach() * (t + 1))
        opt.step(loss=float(t % 2))
    return p, opt


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_unchanged(opt, before):
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v)


def corrupt(sd, fn):
    sd = copy.deepcopy(sd)
    fn(sd)
    return sd


BAD_STATES = [
    ("shape", lambda sd: sd["state"][1].__setitem__("prev", torch.zeros(6, dtype=torch.float64)),
     r"state 'prev' of parameter 1 \(shape \(5,\), torch.float64\) has shape \(6,\), "
     r"expected \(5,\)"),
    ("dtype", lambda sd: sd["state"][0].__setitem__("step_size", torch.zeros(4, 3)),
     r"state 'step_size' of parameter 0 .* has dtype torch.float32, expected torch.float64"),
    ("missing", lambda sd: sd["state"][0].pop("prev"),
     r"state of parameter 0 .* lacks \['prev'\]"),
    ("missing-extra", lambda sd: sd["state"][1].pop("prev_update"),
     r"state of parameter 1 .* lacks \['prev_update'\] \(needed by variant 'rprop\+'\)"),
    ("not-tensor", lambda sd: sd["state"][0].__setitem__("prev", [0.0] * 12),
     r"state 'prev' of parameter 0 .* must be a tensor"),
    ("groups", lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])),
     r"state_dict has 2 param groups, the optimizer has 1"),
    ("params", lambda sd: sd["param_groups"][0]["params"].pop(),
     r"param group 0 has 1 params in state_dict, 2 in the optimizer"),
    ("bad-hyper", lambda sd: sd["param_groups"][0].__setitem__("etas", (0.5, 0.9)),
     r"param group 0 of state_dict: etas must satisfy"),
    ("bad-variant", lambda sd: sd["param_groups"][0].__setitem__("variant", "sgd"),
     r"param group 0 of state_dict: variant must be one of"),
    ("stray", lambda sd: sd["state"].__setitem__(7, {}),
     r"state_dict has state for parameter 7, which no group lists"),
    ("negative-step", lambda sd: sd["state"][1]["step_size"].__setitem__(0, -1.0),
     r"state 'step_size' of parameter 1 .* has NaN or negative values"),
    ("nan-step", lambda sd: sd["state"][0]["step_size"].__setitem__((0, 0), float("nan")),
     r"state 'step_size' of parameter 0 .* has NaN or negative values"),
    ("skipped", lambda sd: sd["param_groups"][0].__setitem__("skipped_steps", "x"),
     r"param group 0 of state_dict: skipped_steps must be an int >= 0"),
    ("state-list", lambda sd: sd.__setitem__("state", []),
     r"state_dict\['state'\] must be a dict"),
    ("group-no-params", lambda sd: sd["param_groups"][0].pop("params"),
     r"must be a list of dicts with a 'params' list"),
]


@pytest.mark.parametrize(("name", "fn", "match"), BAD_STATES, ids=[b[0] for b in BAD_STATES])
def test_bad_state_dict_is_refused_and_leaves_optimizer_unchanged(name, fn, match):
    _, source = trained("rprop+")
    _, target = trained("rprop+", steps=2)
    before = snapshot(target)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(corrupt(source.state_dict(), fn))
    assert_unchanged(target, before)


def test_not_a_state_dict():
    _, opt = trained()
    with pytest.raises(ValueError, match="state_dict must be a dict with keys 'state' and"):
        opt.load_state_dict({"state": {}})


@pytest.mark.parametrize("variant", ["rprop+", "irprop+"])
def test_torch_state_into_backtracking_variant_starts_extras_cleanly(variant):
    p = [torch.randn(3, dtype=torch.float64, requires_grad=True)]
    ref = torch.optim.Rprop(p)
    p[0].grad = torch.ones(3, dtype=torch.float64)
    ref.step()
    q = [p[0].detach().clone().requires_grad_()]
    ours = rprop.Rprop(q, variant=variant)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    assert "prev_update" not in ours.state[q[0]]
    q[0].grad = -torch.ones(3, dtype=torch.float64)  # flip: undo of a zero update
    ours.step(loss=1.0)
    assert torch.equal(q[0], p[0]), "an undo of the fresh (zero) prev_update moves nothing"
    assert torch.equal(ours.state[q[0]]["prev_update"], torch.zeros(3, dtype=torch.float64))
    if variant == "irprop+":
        assert ours.state[q[0]]["prev_loss"].item() == 1.0


# --- non-finite values -------------------------------------------------------

def nan_step(mode, variant="irprop-", where="grad", **kw):
    p, opt = trained(variant, nonfinite=mode, **kw)
    before_params = [q.detach().clone() for q in p]
    before = snapshot(opt)
    p[0].grad = torch.sin(p[0].detach())
    p[1].grad = torch.ones(5, dtype=torch.float64)
    if where == "grad":
        p[1].grad[2] = float("nan")
    elif where == "inf":
        p[1].grad[0] = -float("inf")
    loss = float("nan") if where == "loss" else 1.0
    return p, opt, before_params, before, loss


@pytest.mark.parametrize("where", ["grad", "inf", "loss"])
@pytest.mark.parametrize("path", [{"foreach": False}, {"foreach": True}, {}])
def test_skip_leaves_everything_unchanged_and_counts(where, path):
    variant = "irprop+" if where == "loss" else "rprop+"
    p, opt, before_params, before, loss = nan_step("skip", variant, where, **path)
    opt.step(loss=loss)
    for q, b in zip(p, before_params):
        assert torch.equal(q, b)
    for i, st in before["state"].items():
        for k, v in st.items():
            assert torch.equal(opt.state_dict()["state"][i][k], v)
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert opt.state_dict()["param_groups"][0]["skipped_steps"] == 1
    # ...and the next finite step proceeds normally.
    p[1].grad = torch.ones(5, dtype=torch.float64)
    opt.step(loss=0.5)
    assert opt.param_groups[0]["skipped_steps"] == 1


@pytest.mark.parametrize(("where", "match"), [
    ("grad", r"non-finite value in the gradient of parameter 1 \(shape \(5,\)\)"),
    ("loss", r"non-finite value in the loss \(nan\)"),
])
def test_raise_names_the_culprit_and_changes_nothing(where, match):
    p, opt, before_params, before, loss = nan_step("raise", "irprop+", where)
    with pytest.raises(FloatingPointError, match=match):
        opt.step(loss=loss)
    for q, b in zip(p, before_params):
        assert torch.equal(q, b)
    assert_unchanged(opt, before)


def test_messages_name_parameters_given_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    opt = rprop.Rprop(model.named_parameters(), nonfinite="raise")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    saved["state"][3]["prev"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"state 'prev' of parameter 3 \('2.bias'\) \(shape "
                                         r"\(1,\), torch.float32\) has shape \(2,\)"):
        opt.load_state_dict(saved)
    model[2].bias.grad = torch.tensor([float("nan")])
    with pytest.raises(FloatingPointError, match=r"the gradient of parameter 3 \('2.bias'\)"):
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_propagate_is_torch_behaviour(foreach):
    # torch 2.13 maps sign(NaN) to 0: a NaN gradient element keeps its
    # parameter and step size and stores NaN as the previous gradient.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, generator=g).requires_grad_()
    b = a.detach().clone().requires_grad_()
    ref, ours = torch.optim.Rprop([a], foreach=foreach), rprop.Rprop([b], foreach=foreach)
    for _ in range(30):
        grad = torch.randn(50, generator=g)
        grad[torch.rand(50, generator=g) < 0.2] = float("nan")
        grad[torch.rand(50, generator=g) < 0.05] = float("inf")
        a.grad, b.grad = grad.clone(), grad.clone()
        ref.step()
        ours.step()
        assert torch.equal(a, b)
        for k in ("prev", "step_size"):
            # Bitwise, NaN included (prev holds the NaN gradients).
            assert torch.allclose(ref.state[a][k], ours.state[b][k], rtol=0, atol=0,
                                  equal_nan=True)
    assert torch.isfinite(b).all()


# --- half precision ------------------------------------------------------------

def sin_fit(dtype, state_dtype=None, foreach=False, steps=300):
    torch.manual_seed(1)
    x = torch.linspace(-3, 3, 200).unsqueeze(1)
    y = torch.sin(x)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = model.to(dtype)
    opt = rprop.Rprop(model.parameters(), lr=0.01, variant="irprop+", state_dtype=state_dtype,
                      foreach=foreach)
    X, Y = x.to(dtype), y.to(dtype)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
    # Judge every run in float64 on the same data.
    return ((model.double()(x.double()) - y.double()) ** 2).mean().item(), opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_converges_on_the_sin_fit(dtype):
    start = sin_fit(torch.float64, steps=0)[0]
    ref, _ = sin_fit(torch.float64)
    for state_dtype in (None, torch.float32):
        loss, opt = sin_fit(dtype, state_dtype)
        state = opt.state[next(iter(opt.param_groups[0]["params"]))]
        assert state["prev"].dtype == (state_dtype or dtype)
        # Loss (judged in float64) down by > 100x, as the float64 run's is.
        assert ref < start / 100 and loss < start / 100


def test_float32_state_sees_sign_flips_that_float16_state_loses():
    # f(x) = 1e-4 x^2 / 2 from x = 1: gradients ~1e-4, so g_prev * g ~ 1e-8,
    # below float16's smallest subnormal (6e-8): in float16 state the product
    # is 0, no flip is ever seen, the step never shrinks and x oscillates by
    # lr around 0. In float32 state the flips are seen, as in float64.
    def run(dtype, state_dtype):
        x = torch.ones(1, dtype=dtype, requires_grad=True)
        opt = rprop.Rprop([x], lr=0.01, state_dtype=state_dtype)
        for _ in range(150):
            x.grad = (1e-4 * x.detach().float()).to(dtype)
            opt.step()
        return abs(x.item()), opt.state[x]["step_size"].item()

    x64, step64 = run(torch.float64, None)
    x16, step16 = run(torch.float16, None)
    x16_32, step16_32 = run(torch.float16, torch.float32)
    assert x64 < 1e-5 and step64 < 1e-5  # the float64 run converges
    assert step16 >= 0.01 and x16 > 1e-3  # stuck: never shrank
    assert step16_32 < 0.005 and x16_32 < 1e-3  # shrinks and closes in


def test_half_precision_paths_agree():
    a, _ = sin_fit(torch.float16, torch.float32, foreach=False, steps=50)
    b, _ = sin_fit(torch.float16, torch.float32, foreach=True, steps=50)
    assert a == b


def test_state_dtype_validation():
    with pytest.raises(TypeError, match=r"state_dtype must be None or a floating torch\.dtype"):
        rprop.Rprop([torch.zeros(2, requires_grad=True)], state_dtype=torch.int32)


def test_each_group_applies_its_own_nonfinite_mode():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = rprop.Rprop([{"params": [a], "nonfinite": "skip"},
                       {"params": [b], "nonfinite": "raise"}])
    a.grad, b.grad = torch.tensor([float("nan"), 1.0]), torch.ones(2)
    opt.step()  # the NaN is in the "skip" group: the step is skipped, nothing raises
    assert torch.equal(a, torch.zeros(2)) and torch.equal(b, torch.zeros(2))
    assert [g["skipped_steps"] for g in opt.param_groups] == [1, 1]
    a.grad, b.grad = torch.ones(2), torch.tensor([1.0, float("inf")])
    with pytest.raises(FloatingPointError, match="gradient of parameter 1"):
        opt.step()


def test_nan_loss_does_not_concern_a_group_that_ignores_the_loss():
    w = torch.zeros(2, requires_grad=True)
    opt = rprop.Rprop([w], variant="irprop-", nonfinite="raise")
    w.grad = torch.ones(2)
    opt.step(loss=float("nan"))  # irprop- does not use the loss
    assert torch.equal(w, torch.full((2,), -0.01))
