"""fit(batching="adaptive"): the reliability test against SciPy's t and
noncentral t, the masked step against the per-element reference, the full
batch phase bitwise against full_batch_backward + step, bitwise resume, and
bad input. (The benchmark is benchmarks/minibatch.py, not part of the tests.)"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from torch.utils.data import IterableDataset, TensorDataset

import rprop
from _helpers import loss_fn, make_model
from reference import ReferenceRprop
from rprop.torch import fit, full_batch_backward
from rprop.torch._adaptive import (
    _Evidence,
    _evidence_masks,
    _partial_moves,
    _Statistics,
    masked_step,
    partial_move,
    reliability_threshold,
    reliable_mask,
    sign_efficiency,
)
from rprop.torch._fit_checkpoint import atomic_save, read_verified

ALL_VARIANTS = ("irprop-", "irprop+", "rprop-", "rprop+", "grprop-sag", "grprop-slr")


# -- the threshold and the reliability test ----------------------------------------------


@pytest.mark.parametrize("etas", [(0.5, 1.2), (0.3, 1.5), (0.8, 1.05)])
def test_threshold_is_the_zero_drift_sign_probability(etas):
    eta_minus, eta_plus = etas
    # Zero drift of log(step): q ln(eta+) + (1 - q) ln(eta-) = 0.
    q = optimize.brentq(lambda q: q * math.log(eta_plus) + (1 - q) * math.log(eta_minus), 0, 1,
                        xtol=1e-15)
    # Consecutive signs agree with probability p^2 + (1-p)^2 = q, p > 1/2.
    p = optimize.brentq(lambda p: p * p + (1 - p) ** 2 - q, 0.5, 1, xtol=1e-15)
    assert reliability_threshold(etas) == pytest.approx(stats.norm.ppf(p), rel=1e-9)
    if etas == (0.5, 1.2):
        assert reliability_threshold(etas) == pytest.approx(1.1847, abs=1e-4)


def micro_means(mu, sigma, k, gen):
    """k micro-batch means per coordinate, drawn around mu with spread sigma."""
    return mu + sigma * gen.standard_normal((k, *np.shape(mu)))


def test_mask_is_the_t_statistic_of_the_micro_batch_means():
    gen = np.random.default_rng(0)
    k, z = 8, reliability_threshold()
    mu = gen.normal(size=5000) * 0.5
    g = micro_means(mu, 1.0, k, gen)
    g[:, :10] = 0.0  # no gradient at all: neither reliable nor informative
    g[:, 10:20] = 0.25  # no spread: reliable
    ok, info = reliable_mask(torch.tensor(g.sum(0)), torch.tensor((g * g).sum(0)), k, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = g.mean(0) / (g.std(0, ddof=1) / math.sqrt(k))
        expected = np.where(g.std(0) == 0, g.mean(0) != 0, np.abs(t) > z)
    np.testing.assert_array_equal(ok.numpy(), expected)
    np.testing.assert_array_equal(info.numpy(), (g != 0).any(0))


def test_mask_with_weight_decay_tests_the_decayed_gradient():
    gen = np.random.default_rng(1)
    k, z = 6, 1.0
    g = micro_means(gen.normal(size=2000) * 0.3, 1.0, k, gen)
    shift = gen.normal(size=2000)
    t = (g.mean(0) + shift) / (g.std(0, ddof=1) / math.sqrt(k))
    ok, _ = reliable_mask(torch.tensor(g.sum(0)), torch.tensor((g * g).sum(0)), k, z,
                          torch.tensor(shift))
    np.testing.assert_array_equal(ok.numpy(), np.abs(t) > z)


@pytest.mark.parametrize("delta", [0.0, 0.5, 1.5, 3.0])
def test_reliable_rate_is_the_noncentral_t_tail(delta):
    """A coordinate whose mean is delta standard errors from 0 passes with
    probability P(|T| > z), T noncentral t with k-1 degrees of freedom."""
    gen = np.random.default_rng(2)
    k, z, n = 8, reliability_threshold(), 200_000
    sigma = 1.0
    g = micro_means(np.full(n, delta * sigma / math.sqrt(k)), sigma, k, gen)
    ok, _ = reliable_mask(torch.tensor(g.sum(0)), torch.tensor((g * g).sum(0)), k, z)
    p = stats.nct.sf(z, k - 1, delta) + stats.nct.cdf(-z, k - 1, delta)
    assert abs(ok.double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_sign_efficiency_is_the_expected_fraction_of_the_decrease():
    """Against SciPy, per element: sum(s |m| (2 Phi(|m| / se) - 1)) and
    sum(s |m|), m the mean of the k micro-batch means (plus the decay term),
    se their standard deviation / sqrt(k); a zero spread is a certain sign,
    a zero mean weighs nothing."""
    gen = np.random.default_rng(4)
    k = 6
    g = gen.normal(0.3, 1.0, size=(k, 50))
    g[:, 0] = 0.0   # no gradient: weight 0
    g[:, 1] = 0.25  # no spread: a certain sign
    size = gen.uniform(1e-3, 1e-1, size=50)
    shift = gen.normal(0, 0.1, size=50)
    for with_shift in (False, True):
        m = g.mean(0) + (shift if with_shift else 0)
        se = g.std(0, ddof=1) / math.sqrt(k)
        t = np.abs(m) / np.where(se > 0, se, 1.0)
        right = np.where(se > 0, 2 * stats.norm.cdf(t) - 1, 1.0)
        w = size * np.abs(m)
        got = sign_efficiency(torch.tensor(g.sum(0)), torch.tensor((g * g).sum(0)), k,
                              torch.tensor(size), torch.tensor(shift) if with_shift else None)
        assert got[0].item() == pytest.approx(float((w * right).sum()), rel=1e-12)
        assert got[1].item() == pytest.approx(float(w.sum()), rel=1e-12)
    # A coordinate with a certain sign counts whole; one that is pure noise about nothing.
    one = sign_efficiency(torch.tensor([0.5]), torch.tensor([0.0625]), 2, 1.0)
    assert one[0].item() == one[1].item() == 0.25


def test_partial_move_is_the_squared_debiased_sign_efficiency():
    """Against SciPy, per element: sign(m) (2 Phi(sqrt(max(t^2 - 1, 0))) - 1)^2,
    t = m / se, with the decay term in m; sign(m) where the spread is 0."""
    gen = np.random.default_rng(6)
    k = 5
    g = gen.normal(0.2, 1.0, size=(k, 40))
    g[:, 0] = 0.0
    shift = gen.normal(0, 0.1, size=40)
    for with_shift in (False, True):
        m = g.mean(0) + (shift if with_shift else 0)
        se = g.std(0, ddof=1) / math.sqrt(k)
        t = np.abs(m) / np.where(se > 0, se, 1.0)
        snr = np.sqrt(np.maximum(t * t - 1, 0))
        # No spread: a certain sign (1), or nothing if the mean is 0 too.
        want = np.where(se > 0, np.sign(m) * (2 * stats.norm.cdf(snr) - 1) ** 2, np.sign(m))
        assert 0 < (want == 0).sum() < len(want)  # some |t| < 1 do not move
        got = partial_move(torch.tensor(g.sum(0)), torch.tensor((g * g).sum(0)), k,
                           torch.tensor(shift) if with_shift else None)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("maximize", [False, True])
def test_partial_moves_go_down_the_slope_and_along_it_with_maximize(maximize):
    """Oriented as the step: against the mean gradient, along it with
    maximize; nothing where the coordinate passes."""
    p = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([p], maximize=maximize)
    stats = _Statistics([p])
    means = torch.tensor([[0.5, -0.4, 0.1, 3.0], [0.3, -0.6, -0.05, 3.1]], dtype=torch.float64)
    stats.sums[0].copy_(means.sum(0))
    stats.squares[0].copy_((means * means).sum(0))
    mask = torch.tensor([False, False, False, True])
    move = _partial_moves(opt, stats, 2, None, {id(p): mask}, None)[id(p)]
    down = -partial_move(stats.sums[0], stats.squares[0], 2)
    want = -down if maximize else down
    assert torch.equal(move, torch.where(mask, 0.0, want))
    assert (move[:2] * (1 if maximize else -1) * means.mean(0)[:2] > 0).all() and move[3] == 0


def test_a_skipped_step_moves_nothing():
    """nonfinite="skip": a step skipped for a non-finite gradient moves no
    coordinate, the partial ones included."""
    p = torch.arange(4.0, dtype=torch.float64, requires_grad=True)
    opt = rprop.Rprop([p], nonfinite="skip")
    p.grad = torch.tensor([math.nan, 1.0, -1.0, 0.5], dtype=torch.float64)
    before = p.detach().clone()
    masked_step(opt, {id(p): torch.tensor([True, True, False, False])},
                torch.tensor(1.0, dtype=torch.float64),
                {id(p): torch.tensor([0.0, 0.0, 0.5, -0.5], dtype=torch.float64)})
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert torch.equal(p.detach(), before)


# -- the masked step against the per-element reference -------------------------------------


@pytest.mark.parametrize("variant", ["irprop-", "irprop+", "rprop-", "rprop+"])
@pytest.mark.parametrize("with_moves", [False, True])
@pytest.mark.parametrize("extra", [{}, {"maximize": True, "weight_decay": 0.1},
                                   {"lr": 80.0}])
def test_masked_step_is_the_reference_step_on_the_reliable_coordinates(variant, extra,
                                                                       with_moves):
    """The others keep value and state; with ``moves``, their value moves by
    move x their (kept) step size."""
    gen = np.random.default_rng(3)
    shapes = [(5, 4), (7,)]
    start = [gen.normal(size=s) for s in shapes]
    start.append(gen.normal(size=(3,)) + 1j * gen.normal(size=(3,)))
    hyper = {"lr": 0.01, **extra}
    ref = ReferenceRprop(start, variant=variant, **hyper)
    params = [torch.tensor(a) for a in start]
    for p in params:
        p.requires_grad_(True)
    opt = rprop.Rprop(params, variant=variant, **hyper)
    for _ in range(25):
        grads = [gen.normal(size=s) for s in shapes]
        grads.append(gen.normal(size=(3,)) + 1j * gen.normal(size=(3,)))
        masks = [gen.random(size=(*np.shape(g), 2) if np.iscomplexobj(g) else np.shape(g)) < 0.6
                 for g in grads]
        moves = [np.where(m, 0.0, gen.uniform(-1, 1, size=m.shape)) for m in masks]
        loss = float(gen.normal())
        # The reference: an ordinary step, then every unmasked coordinate put
        # back as it was (and moved); E(t-1) is +inf (no mini-batch step is "worse").
        before = ([np.array(ReferenceRprop._reals(p), copy=True) for p in ref.params],
                  copy.deepcopy(ref.step_size), copy.deepcopy(ref.prev),
                  copy.deepcopy(ref.prev_update))
        ref.prev_loss = math.inf
        ref.step(grads, loss=loss)
        for i, m in enumerate(masks):
            w = ReferenceRprop._reals(ref.params[i]).copy()
            w[~m] = before[0][i][~m]
            if with_moves:
                w[~m] += moves[i][~m] * before[1][i][~m]
            ref.params[i] = (w[..., 0] + 1j * w[..., 1]) if np.iscomplexobj(start[i]) else w
            for now, old in zip((ref.step_size, ref.prev, ref.prev_update), before[1:],
                                strict=True):
                now[i][~m] = old[i][~m]
        for p, g in zip(params, grads, strict=True):
            p.grad = torch.tensor(g)
        masked_step(opt, {id(p): torch.tensor(m) for p, m in zip(params, masks, strict=True)},
                    torch.tensor(loss, dtype=torch.float64),
                    {id(p): torch.tensor(d) for p, d in zip(params, moves, strict=True)}
                    if with_moves else None)
    for p, r in zip(params, ref.params, strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), r)
    for p, s in zip(params, ref.step_size, strict=True):
        np.testing.assert_array_equal(
            torch.view_as_real(opt.state[p]["step_size"]).numpy()
            if p.is_complex() else opt.state[p]["step_size"].numpy(), s)


# -- fit ------------------------------------------------------------------------------------


def regression(n=48, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.3 * torch.randn(n, 1, generator=g,
                                                                   dtype=torch.float64)
    return x, y


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("grow", ["fraction", "evidence", "efficiency"])
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_full_batch_phase_is_bitwise_full_batch_rprop(variant, grow):
    x, y = regression()
    model = make_model()
    snapshot = {}

    def grab(info):
        if info.batch_size == len(x) and not snapshot:
            snapshot["model"] = copy.deepcopy(model.state_dict())
            snapshot["optimizer"] = copy.deepcopy(info.optimizer.state_dict())
            snapshot["step"] = info.step

    # fraction with rho=1: the batch doubles after every step (8, 16, then all
    # 48); evidence: 8 until it jumps to all 48; efficiency: doubles on its signs.
    hist = fit(model, loss_fn, (x, y), variant=variant, max_epochs=12, progress=False,
               callbacks=[grab], batching="adaptive",
               batching_kwargs={"batch_size": 8, "micro_batches": 4, "rho": 1.0,
                                "eval_batch_size": 16, "grow": grow})
    jump = snapshot["step"]
    if grow == "fraction":
        assert hist.batch_size[:3] == [8, 16, 48] and jump == 2
    elif grow == "evidence":
        assert jump > 1 and hist.batch_size == [8] * jump + [48] * (hist.steps - jump)
    else:  # efficiency: 8, then doubled on the signs, then all 48
        assert hist.batch_size[0] == 8 and hist.batch_size == sorted(hist.batch_size)
        assert hist.batch_size[jump - 1] < 48 == hist.batch_size[jump]
    assert hist.reliable[0] < 1.0  # the mini-batch steps did mask coordinates
    ref_model = make_model()
    ref_model.load_state_dict(snapshot["model"])
    ref_opt = rprop.Rprop(ref_model.parameters(), variant=variant)
    ref_opt.load_state_dict(snapshot["optimizer"])
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, len(x), 16)]
    losses = []
    for _ in range(hist.steps - snapshot["step"]):
        loss = full_batch_backward(ref_model, loss_fn, batches)
        losses.append(float(loss))
        ref_opt.step(loss=loss)
    assert losses == hist.loss[snapshot["step"]:]
    for a, b in zip(weights(model), weights(ref_model), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grow", ["fraction", "evidence", "efficiency"])
def test_irprop_plus_runs_as_irprop_minus_before_full_batch(grow):
    x, y = regression(n=200)
    runs = []
    for variant in ("irprop+", "irprop-"):
        model = make_model()
        # fraction with rho=0 never grows; evidence stopped before its jump.
        hist = fit(model, loss_fn, (x, y), variant=variant, max_epochs=3, progress=False,
                   batching="adaptive", callbacks=[lambda info: info.step == 6],
                   batching_kwargs={"batch_size": 16, "micro_batches": 4, "rho": 0.0,
                                    "grow": grow})
        assert hist.batch_size == [16] * 6
        runs.append(weights(model))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_the_default_optimizer_starts_at_riedmillers_step_size():
    """Adaptive mode: Delta0 = 0.1, as rprop.minimize's; full batch: torch's 0.01."""
    x, y = regression(n=64)
    lrs = {}
    for mode in ("adaptive", "full"):
        data = (x, y) if mode == "adaptive" else [(x, y)]
        fit(make_model(), loss_fn, data, max_epochs=1, progress=False, batching=mode,
            callbacks=[lambda info, mode=mode: lrs.setdefault(
                mode, info.optimizer.param_groups[0]["lr"]) and False])
    assert lrs == {"adaptive": 0.1, "full": 0.01}


def test_step_info_is_the_step_the_history_then_records():
    x, y = regression(n=200)
    seen = []
    hist = fit(make_model(), loss_fn, (x, y), max_epochs=6, progress=False,
               batching="adaptive", callbacks=[seen.append],
               batching_kwargs={"batch_size": 16, "micro_batches": 4})
    assert [i.step for i in seen] == list(range(hist.steps)) and 200 in hist.batch_size
    assert [i.loss for i in seen] == hist.loss
    assert [i.batch_size for i in seen] == hist.batch_size
    assert [i.reliable for i in seen] == hist.reliable
    assert [i.efficiency for i in seen] == hist.efficiency
    assert [i.examples for i in seen] == [0, *hist.examples[:-1]]


@pytest.mark.parametrize("decay", [0.0, 0.01])
@pytest.mark.parametrize("variant", ["grprop-sag", "grprop-slr"])
def test_grprop_runs_as_rprop_minus_before_full_batch(variant, decay):
    """Its adjustment needs the full gradient: on masked steps it would pick
    a new coordinate each time. With weight decay too."""
    x, y = regression(n=200)
    runs = []
    for name in (variant, "rprop-"):
        model = make_model()
        opt = rprop.Rprop(model.parameters(), variant=name, weight_decay=decay)
        hist = fit(model, loss_fn, (x, y), optimizer=opt, max_epochs=3, progress=False,
                   batching="adaptive", callbacks=[lambda info: info.step == 10],
                   batching_kwargs={"batch_size": 16, "micro_batches": 4, "rho": 0.0,
                                    "grow": "fraction"})
        assert hist.batch_size == [16] * 10 and opt.param_groups[0]["variant"] == name
        runs.append(weights(model) + [opt.state[p]["step_size"] for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# z* for the default etas, from SciPy: Phi^-1((1 + sqrt(2 q* - 1)) / 2).
Z_STAR = float(stats.norm.ppf((1 + math.sqrt(2 * math.log(2) / (math.log(2) + math.log(1.2))
                                             - 1)) / 2))


def linear_fit(n, mu, gen, epochs, options):
    """A loss linear in the weights, so each sample's gradient is its
    features whatever the weights: fit's run, with the data and start."""
    x = mu + gen.standard_normal((n, len(mu)))
    w0 = gen.normal(size=(1, len(mu)))
    model = torch.nn.Linear(len(mu), 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w0))
    hist = fit(model, lambda m, batch: m(batch[0]).sum(dim=1), (torch.tensor(x),),
               variant="irprop-", max_epochs=epochs, progress=False, batching="adaptive",
               batching_kwargs=options)
    return x, w0, model, hist


def carried_step(ref, means, micro, partial):
    """One step of the carried-evidence reference: ``micro`` (k x d
    micro-batch means) joins each coordinate's list of means since it last
    moved; the reference Rprop steps the coordinates whose |mean| > z* std /
    sqrt(count), with that mean, the others kept (and, with ``partial``,
    moved by sign(mean) (2 Phi(sqrt(max(t^2 - 1, 0))) - 1)^2 of their step
    size against it);
    the lists of those that moved start again. Returns (moved, count)."""
    for j, col in enumerate(micro.T):
        means[j].extend(col)
    avg = np.array([np.mean(v) for v in means])
    spread = np.array([np.std(v, ddof=1) for v in means])
    count = np.array([len(v) for v in means])
    moved = np.abs(avg) > Z_STAR * spread / np.sqrt(count)
    before = (ReferenceRprop._reals(ref.params[0]).copy(), ref.step_size[0].copy(),
              ref.prev[0].copy(), ref.prev_update[0].copy())
    ref.step([avg[None, :]])
    keep = ~moved[None, :]
    for now, was in zip((ref.params[0], ref.step_size[0], ref.prev[0], ref.prev_update[0]),
                        before, strict=True):
        now[keep] = was[keep]
    if partial:
        t = np.abs(avg) / (spread / np.sqrt(count))
        part = (2 * stats.norm.cdf(np.sqrt(np.maximum(t * t - 1, 0))) - 1) ** 2
        ref.params[0][keep] -= (np.sign(avg) * part)[None, :][keep] * ref.step_size[0][keep]
    for j in np.flatnonzero(moved):
        means[j] = []
    return moved, count


def test_carried_evidence_is_the_t_test_since_each_coordinate_last_moved():
    """grow="evidence", unreliable="hold" against NumPy and the per-element
    reference (:func:`carried_step`), jumping to the full data once half the
    coordinates hold means of at least N/2 samples."""
    n, b0, k, seed = 240, 8, 4, 5
    mu = np.array([0.8, -0.5, 0.3, 0.0, 0.15, -0.1, 0.05, -0.03, 0.0, 0.02, 0.01, -0.01])
    x, w0, model, hist = linear_fit(n, mu, np.random.default_rng(8), 6, {
        "batch_size": b0, "micro_batches": k, "seed": seed, "grow": "evidence",
        "unreliable": "hold"})
    d = len(mu)
    ref = ReferenceRprop([w0], variant="irprop-", lr=0.1)  # fit's adaptive default
    gen_t = torch.Generator().manual_seed(seed)  # the documented sampler: permutations in turn
    perm, pos = torch.randperm(n, generator=gen_t).numpy(), 0
    means: list[list[float]] = [[] for _ in range(d)]
    batch, sizes, fractions, examples = b0, [], [], 0
    while examples < 6 * n:
        if batch == n:
            ref.step([x.mean(0)[None, :]])
            sizes.append(n), fractions.append(1.0)
            examples += n
            continue
        if pos == n:
            perm, pos = torch.randperm(n, generator=gen_t).numpy(), 0
        rows, pos = perm[pos:pos + b0], pos + b0
        moved, count = carried_step(ref, means, x[rows].reshape(k, b0 // k, d).mean(1), False)
        sizes.append(b0), fractions.append(moved.mean())
        examples += b0
        if 2 * (count * (b0 // k) >= n / 2).sum() >= d:
            batch = n
    assert n in sizes and sizes.index(n) > 10  # carried for a while, then the jump
    assert hist.batch_size == sizes
    np.testing.assert_allclose(hist.reliable, fractions, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(model.weight.detach().numpy(), ref.params[0])


@pytest.mark.parametrize("window", [1, 4, 10])
def test_the_batch_doubles_when_the_signs_efficiency_falls_short(window):
    """The defaults (grow="efficiency", unreliable="partial") against NumPy,
    SciPy and the per-element reference: the carried evidence with partial
    moves (:func:`carried_step`), and after each step the efficiency of this
    batch's signs, sum(s |m| (2 Phi(|m| / se) - 1)) / sum(s |m|) with the
    step sizes s before the step, its surplus over 2 Phi(z) - 1 averaged
    exponentially (weight 1 / window) since B last changed; B doubles once
    the average is negative after at least ``window`` steps (or ceil(N / B),
    one pass, if fewer), and is N (evidence dropped, the reference's full
    batch step) once a doubling would pass N / 2."""
    n, b0, k, seed = 600, 8, 4, 3
    mu = 0.3 * np.array([0.3, -0.25, 0.2, 0.12, -0.08, 0.05, 0.0, 0.03, -0.02, 0.01])
    x, w0, model, hist = linear_fit(n, mu, np.random.default_rng(9), 10, {
        "batch_size": b0, "micro_batches": k, "seed": seed, "window": window})
    d = len(mu)
    needed = 2 * stats.norm.cdf(Z_STAR) - 1
    ref = ReferenceRprop([w0], variant="irprop-", lr=0.1)  # fit's adaptive default
    gen_t = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=gen_t).numpy(), 0
    means: list[list[float]] = [[] for _ in range(d)]
    batch, sizes, fractions, examples = b0, [], [], 0
    average, since = None, 0
    while examples < 10 * n:
        if batch == n:
            ref.step([x.mean(0)[None, :]])
            sizes.append(n), fractions.append(1.0)
            examples += n
            continue
        rows = []
        while len(rows) < batch:
            if pos == n:
                perm, pos = torch.randperm(n, generator=gen_t).numpy(), 0
            take = min(batch - len(rows), n - pos)
            rows.extend(perm[pos:pos + take])
            pos += take
        micro = x[np.array(rows)].reshape(k, batch // k, d).mean(1)
        m, se = micro.mean(0), micro.std(0, ddof=1) / math.sqrt(k)
        weight = ref.step_size[0][0] * np.abs(m)
        right = 2 * stats.norm.cdf(np.abs(m) / se) - 1
        surplus = float((weight * (right - needed)).sum() / weight.sum())
        moved, _ = carried_step(ref, means, micro, True)
        sizes.append(batch), fractions.append(moved.mean())
        examples += batch
        average = surplus if average is None else average + (surplus - average) / window
        since += 1
        if since >= min(window, math.ceil(n / batch)) and average < 0:
            batch = n if 4 * batch > n else 2 * batch
            average, since = None, 0
            if batch == n:
                means = [[] for _ in range(d)]
    # It doubled, held a size for a while, and reached the full batch.
    assert 16 in sizes and n in sizes and sizes.index(n) > 5
    assert max(sizes.count(s) for s in sizes if s < n) > window
    assert hist.batch_size == sizes
    np.testing.assert_allclose(hist.reliable, fractions, rtol=0, atol=1e-15)
    # The partial moves use SciPy's normal cdf, the mode torch.erf: equal to rounding.
    np.testing.assert_allclose(model.weight.detach().numpy(), ref.params[0], rtol=1e-12,
                               atol=1e-15)


def test_a_budget_under_one_pass_stops_at_the_step_that_crosses_it():
    x, y = regression(n=400)
    hist = fit(make_model(), loss_fn, (x, y), max_epochs=0.5, progress=False,
               batching="adaptive", batching_kwargs={"batch_size": 8, "micro_batches": 4})
    assert hist.examples[-1] >= 200 > hist.examples[-2] and hist.stop_reason == "max_epochs"
    for bad in (-0.5, math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match="max_epochs must be a finite number >= 0"):
            fit(make_model(), loss_fn, (x, y), max_epochs=bad, progress=False,
                batching="adaptive")
    with pytest.raises(ValueError, match="max_epochs must be an int >= 0"):
        fit(make_model(), loss_fn, [(x, y)], max_epochs=0.5, progress=False)


def test_history_counts_examples_and_epoch_equivalents():
    x, y = regression(n=200)
    model = make_model()
    hist = fit(model, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
               batching_kwargs={"batch_size": 16, "micro_batches": 4})
    assert hist.examples == list(np.cumsum(hist.batch_size))
    assert hist.examples[-1] >= 4 * 200 > hist.examples[-2]
    assert hist.epochs == hist.examples[-1] / 200
    assert all(b in (16, 32, 64, 200) for b in hist.batch_size)
    assert hist.batch_size == sorted(hist.batch_size)
    assert all(0 <= r <= 1 for r in hist.reliable)
    assert hist.stop_reason == "max_epochs"


def test_a_dataset_and_the_tensors_give_the_same_run():
    x, y = regression(n=100)
    out = []
    for data in ((x, y), TensorDataset(x, y)):
        model = make_model()
        h = fit(model, loss_fn, data, max_epochs=3, progress=False, batching="adaptive",
                batching_kwargs={"batch_size": 16, "micro_batches": 4, "rho": 0.7,
                                 "eval_batch_size": 30})
        out.append((weights(model), h.loss))
    assert out[0][1] == out[1][1]
    for a, b in zip(out[0][0], out[1][0], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grow", ["fraction", "evidence", "efficiency"])
def test_resume_is_bitwise(tmp_path, grow):
    x, y = regression(n=400)
    opts = {"batch_size": 8, "micro_batches": 4, "rho": 0.3, "seed": 7, "grow": grow}
    straight = make_model()
    want = fit(straight, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
               batching_kwargs=opts)
    ckpt = tmp_path / "run.pt"
    first = make_model()
    fit(first, loss_fn, (x, y), max_epochs=0.5, progress=False, batching="adaptive",
        batching_kwargs=opts, checkpoint=ckpt)
    torch.manual_seed(123)  # the sampler's generator is its own: the global one is irrelevant
    resumed = make_model()
    got = fit(resumed, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
              batching_kwargs=opts, checkpoint=ckpt)
    assert got.resumed_from is not None and 0 < got.resumed_from < want.steps
    # Resumed in the mini-batch phase (the sampler's state and, for evidence,
    # the carried sums matter), and the batch grew after it.
    assert want.batch_size[got.resumed_from] < 400
    assert len(set(want.batch_size[got.resumed_from:])) > 1
    assert got.loss == want.loss and got.batch_size == want.batch_size
    assert got.examples == want.examples and got.reliable == want.reliable
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)


def test_a_run_stopped_by_a_callback_resumes_bitwise(tmp_path):
    """The step a callback stops is not taken, so its batch is not used up:
    the resumed run draws it again, as the uninterrupted run does (and its
    evidence is not carried)."""
    x, y = regression(n=400)
    opts = {"batch_size": 8, "micro_batches": 4, "seed": 7}
    straight = make_model()
    want = fit(straight, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
               batching_kwargs=opts)
    ckpt = tmp_path / "run.pt"
    first = make_model()
    fit(first, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
        batching_kwargs=opts, checkpoint=ckpt, callbacks=[lambda info: info.step == 6])
    saved = read_verified(ckpt)["history"]["adaptive"]["efficiency"]
    resumed = make_model()
    got = fit(resumed, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
              batching_kwargs=opts, checkpoint=ckpt)
    assert got.resumed_from == 6 and want.batch_size[6] < 400  # stopped in the mini-batch phase
    # The growth rule's state counts the 6 steps taken, not the one refused:
    # the average of (efficiency - (2 Phi(z) - 1)) since B last changed.
    needed = 2 * stats.norm.cdf(reliability_threshold()) - 1
    size, since = want.batch_size[6], 0  # the steps taken at the size step 6 has
    while since < 6 and want.batch_size[5 - since] == size:
        since += 1
    average = None
    for e in want.efficiency[6 - since:6]:
        average = e - needed if average is None else average + (e - needed - average) / 10
    assert saved[1] == since and saved[0] == pytest.approx(average, rel=1e-12)
    assert got.loss == want.loss and got.batch_size == want.batch_size
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_whose_evidence_does_not_fit_is_refused_unchanged(tmp_path):
    """The carried evidence is checked against the model before anything is
    loaded: another model's checkpoint leaves model and RNG as they were."""
    x, y = regression(n=400)
    opts = {"batch_size": 8, "micro_batches": 4, "seed": 7}
    ckpt = tmp_path / "run.pt"
    hist = fit(make_model(), loss_fn, (x, y), max_epochs=1, progress=False,
               batching="adaptive", batching_kwargs=opts, checkpoint=ckpt)
    assert hist.batch_size[-1] < 400  # saved in the mini-batch phase, with evidence
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 1)).double()
    before, rng = weights(other), torch.get_rng_state()
    with pytest.raises(ValueError, match="carried evidence does not fit"):
        fit(other, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
            batching_kwargs=opts, checkpoint=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(other), strict=True))
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("bad", [["x", 0], [0.1, -1], [float("nan"), 2], [0.1], None, [0.1, True]])
def test_a_checkpoint_whose_growth_state_is_malformed_is_refused_unchanged(tmp_path, bad):
    """A checkpoint whose growth-rule state (average, steps) is not a finite
    float (or None) and an int >= 0 is a ValueError before anything is
    loaded: model, RNG and file as they were."""
    x, y = regression(n=400)
    opts = {"batch_size": 8, "micro_batches": 4, "seed": 7}
    ckpt = tmp_path / "run.pt"
    fit(make_model(), loss_fn, (x, y), max_epochs=1, progress=False, batching="adaptive",
        batching_kwargs=opts, checkpoint=ckpt)
    payload = read_verified(ckpt)
    payload["history"]["adaptive"]["efficiency"] = bad
    atomic_save(payload, ckpt)
    data = ckpt.read_bytes()
    model = make_model()
    before, rng = weights(model), torch.get_rng_state()
    with pytest.raises(ValueError, match="batch growth state is malformed"):
        fit(model, loss_fn, (x, y), max_epochs=4, progress=False, batching="adaptive",
            batching_kwargs=opts, checkpoint=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and ckpt.read_bytes() == data


def _edit_checkpoint(tmp_path, edit):
    """A real mid-run checkpoint (default options), edited by ``edit`` and
    sealed again; returns its path and the options."""
    x, y = regression(n=400)
    opts = {"batch_size": 8, "micro_batches": 4, "seed": 7}
    ckpt = tmp_path / "run.pt"
    fit(make_model(), loss_fn, (x, y), max_epochs=1, progress=False, batching="adaptive",
        batching_kwargs=opts, checkpoint=ckpt)
    payload = read_verified(ckpt)
    edit(payload)
    atomic_save(payload, ckpt)
    return ckpt, opts, (x, y)


def _refused_unchanged(ckpt, opts, data, match):
    raw = ckpt.read_bytes()
    model = make_model()
    before, rng = weights(model), torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        fit(model, loss_fn, data, max_epochs=4, progress=False, batching="adaptive",
            batching_kwargs=opts, checkpoint=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and ckpt.read_bytes() == raw


def _set(key, value):
    def edit(payload):
        payload["history"][key] = value
    return edit


def _evidence_edit(key, fill):
    def edit(payload):
        payload["history"]["adaptive"]["evidence"][key][0].fill_(fill)
    return edit


@pytest.mark.parametrize(("edit", "match"), [
    (lambda pl: pl["history"].pop("efficiency"), "its history does not hold"),
    (lambda pl: pl["history"]["efficiency"].__setitem__(0, "x"), "its history does not hold"),
    (lambda pl: pl["history"]["batch_size"].pop(), "its history does not hold"),
    (lambda pl: pl["history"]["examples"].__setitem__(3, 5), "its history does not hold"),
    (lambda pl: pl["history"]["batch_size"].__setitem__(0, 10**6), "its history does not hold"),
    (_evidence_edit("sums", math.nan), "carried evidence is malformed"),
    (_evidence_edit("squares", -1.0), "carried evidence is malformed"),
    (_evidence_edit("counts", -3), "carried evidence is malformed"),
    (lambda pl: (pl["history"]["adaptive"]["evidence"]["counts"][0].zero_(),
                 pl["history"]["adaptive"]["evidence"]["sums"][0].fill_(1e3)),
     "carried evidence is malformed"),
    (lambda pl: pl["history"]["adaptive"].__setitem__("batch", 9), "batch size 9 must be"),
    (lambda pl: pl["history"]["adaptive"].__setitem__("batch", 10**6), "batch size"),
    (lambda pl: pl["history"]["adaptive"]["options"].pop("unreliable"), "older rprop"),
])
def test_a_malformed_adaptive_checkpoint_is_refused_unchanged(tmp_path, edit, match):
    """Each part of the adaptive state is checked before anything is loaded:
    the history's per-step lists, the carried evidence's values, the batch
    size, and options from an older version."""
    ckpt, opts, data = _edit_checkpoint(tmp_path, edit)
    _refused_unchanged(ckpt, opts, data, match)


def test_a_skipped_step_keeps_the_evidence_it_had():
    """nonfinite="skip": the step a non-finite gradient skips neither moves
    a coordinate nor spends its carried evidence (nor adds the batch's)."""
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    q = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = rprop.Rprop([p, q], nonfinite="skip")
    stats, evidence, k = _Statistics([p, q]), _Evidence([p, q]), 4

    def step(means_p, means_q):
        stats.reset()
        for mp, mq in zip(means_p, means_q, strict=True):
            p.grad = torch.tensor(mp, dtype=torch.float64)
            q.grad = torch.tensor([mq], dtype=torch.float64)
            stats.add()
        masks, _, totals = _evidence_masks(opt, stats, evidence, k, None, 8, 1000)
        moves = _partial_moves(opt, stats, k, None, masks, totals)
        skipped = masked_step(opt, masks, torch.tensor(1.0), moves)
        evidence.keep(totals, [masks[id(p)], masks[id(q)]],
                      frozenset(i for i, t in enumerate((p, q)) if id(t) in skipped))
        return masks[id(p)], skipped

    for _ in range(3):
        step([[0.3, 1.0], [-0.2, -1.0], [0.25, 1.0], [-0.1, -1.0]], [1.0] * 4)
    kept = [t.clone() for t in (*evidence.sums, *evidence.counts)]
    values = p.detach().clone()
    passes, skipped = step([[0.3, 1.0], [0.2, -1.0], [0.25, 1.0], [0.2, -1.0]],
                           [1.0, math.nan, 1.0, 1.0])
    assert bool(passes[0]) and skipped == {id(p), id(q)}  # it would have moved
    assert torch.equal(p.detach(), values)
    assert all(torch.equal(a, b) for a, b in zip(kept, (*evidence.sums, *evidence.counts),
                                                 strict=True))


def test_half_precision_statistics_do_not_underflow():
    """float16 parameters: the sums and squares are kept in float32, so a
    small gradient keeps its spread (float16 squares it to 0) and is tested
    as in float32."""
    g = torch.tensor([[1.2e-4, -3e-5], [0.9e-4, 2e-5], [1.1e-4, -1e-5], [1.0e-4, 1e-5]])
    masks = []
    for dtype in (torch.float16, torch.float32):
        p = torch.nn.Parameter(torch.zeros(2, dtype=dtype))
        stats = _Statistics([p])
        for row in g:
            p.grad = row.to(dtype)
            stats.add()
        assert stats.squares[0].dtype == torch.float32 and bool((stats.squares[0] > 0).all())
        ok, _ = reliable_mask(stats.sums[0], stats.squares[0], 4, reliability_threshold())
        masks.append(ok)
    assert torch.equal(masks[0], masks[1]) and masks[0].tolist() == [True, False]
    x, y = regression(n=64)
    model = make_model().half()

    def full_loss():
        with torch.no_grad():
            return float(((model(x.half()).float() - y) ** 2).mean())

    start = full_loss()
    fit(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1).float(), (x.half(), y.half()),
        max_epochs=10, progress=False, batching="adaptive",
        batching_kwargs={"batch_size": 8, "micro_batches": 4})
    assert all(p.dtype == torch.float16 and bool(torch.isfinite(p).all())
               for p in model.parameters())
    assert full_loss() < 0.8 * start


def test_a_run_whose_weights_overflow_the_sum_still_resumes(tmp_path):
    """Gradients near the float64 limit: the efficiency's weights sum past
    the float range; the run treats that step as no evidence either way, and
    its checkpoint resumes."""
    x = torch.full((64, 2), 1e307, dtype=torch.float64) * (
        1 + 0.1 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0),
                              dtype=torch.float64))
    ckpt = tmp_path / "c.pt"
    opts = {"batch_size": 8, "micro_batches": 4}

    def run(**kw):
        torch.manual_seed(0)
        m = torch.nn.Linear(2, 1, bias=False).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit(m, lambda m, b: m(b[0]).sum(1), (x,), optimizer=rprop.Rprop(
                m.parameters(), lr=10.0), max_epochs=1, progress=False, batching="adaptive",
                batching_kwargs=opts, checkpoint=ckpt, **kw)

    run(callbacks=[lambda info: info.step == 3])
    state = read_verified(ckpt)["history"]["adaptive"]["efficiency"]
    assert state[0] is not None and math.isfinite(state[0])
    assert run().resumed_from == 3


# -- bad input --------------------------------------------------------------------------------


class Stream(IterableDataset):
    def __iter__(self):
        yield from ()


class Empty(torch.utils.data.Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise IndexError(i)


X, Y = regression(n=40)
BAD = [
    ("generator", (lambda: ((X[i], Y[i]) for i in range(3)))(), {}, TypeError,
     "cannot be sampled by index"),
    ("iterable dataset", Stream(), {}, TypeError, "cannot be sampled by index"),
    ("list of batches", [(X[:8], Y[:8])], {}, TypeError, "tuple of tensors"),
    ("empty dataset", Empty(), {}, ValueError, "0 samples"),
    ("uneven tensors", (X, Y[:30]), {}, ValueError, "same length along dim 0"),
    ("batch larger than N", (X, Y), {"batch_size": 64}, ValueError,
     r"larger than the dataset \(40 samples\)"),
    ("batch not a multiple of k", (X, Y), {"batch_size": 12}, ValueError, "multiple of"),
    ("one micro-batch", (X, Y), {"micro_batches": 1}, ValueError, "micro_batches"),
    ("rho", (X, Y), {"rho": 1.5}, ValueError, "rho"),
    ("z", (X, Y), {"z": -1.0}, ValueError, "'z'"),
    ("unknown option", (X, Y), {"batchsize": 8}, TypeError, "unknown keys"),
    ("grow rule", (X, Y), {"grow": "faster"}, ValueError, r"\['grow'\] must be"),
    ("window", (X, Y), {"window": 0}, ValueError, r"\['window'\] must be an int >= 1"),
    ("window type", (X, Y), {"window": 2.5}, ValueError, r"\['window'\] must be an int"),
    ("unreliable", (X, Y), {"unreliable": "move"}, ValueError, r"\['unreliable'\] must be"),
]


@pytest.mark.parametrize(("data", "opts", "error", "match"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error_and_changes_nothing(data, opts, error, match):
    model = make_model()
    before = weights(model)
    rng = torch.get_rng_state()
    with pytest.raises(error, match=match):
        fit(model, loss_fn, data, progress=False, batching="adaptive", batching_kwargs=opts)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert torch.equal(rng, torch.get_rng_state())


def test_bad_mode_and_unsupported_combinations():
    model = make_model()
    with pytest.raises(ValueError, match="batching must be one of"):
        fit(model, loss_fn, (X, Y), batching="minibatch")
    with pytest.raises(ValueError, match="batching='adaptive' only"):
        fit(model, loss_fn, [(X, Y)], batching_kwargs={"batch_size": 8})
    with pytest.raises(TypeError, match=r"needs an rprop\.Rprop"):
        fit(model, loss_fn, (X, Y), optimizer=torch.optim.Adam(model.parameters()),
            batching="adaptive", progress=False)
    with pytest.raises(ValueError, match="target_loss and patience"):
        fit(model, loss_fn, (X, Y), target_loss=0.1, batching="adaptive", progress=False)


def test_a_full_batch_checkpoint_is_refused_unchanged(tmp_path):
    ckpt = tmp_path / "full.pt"
    fit(make_model(), loss_fn, [(X, Y)], max_epochs=2, progress=False, checkpoint=ckpt)
    model = make_model()
    before = weights(model)
    with pytest.raises(ValueError, match="not written by fit\\(batching='adaptive'\\)"):
        fit(model, loss_fn, (X, Y), progress=False, batching="adaptive",
            batching_kwargs={"batch_size": 8}, checkpoint=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))


def test_an_adaptive_checkpoint_is_refused_unchanged_by_a_full_batch_fit(tmp_path):
    """Its steps are mini-batch steps: a full-batch fit would count them as
    epochs and mix mini-batch losses into its history."""
    ckpt = tmp_path / "adaptive.pt"
    fit(make_model(), loss_fn, (X, Y), max_epochs=2, progress=False, batching="adaptive",
        batching_kwargs={"batch_size": 8}, checkpoint=ckpt)
    raw = ckpt.read_bytes()
    model = make_model()
    before, rng = weights(model), torch.get_rng_state()
    with pytest.raises(ValueError, match="written by fit\\(batching='adaptive'\\); resume it"):
        fit(model, loss_fn, [(X, Y)], max_epochs=5, progress=False, checkpoint=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(model), strict=True))
    assert torch.equal(rng, torch.get_rng_state()) and ckpt.read_bytes() == raw


def test_a_checkpoint_of_other_options_names_what_differs(tmp_path):
    ckpt = tmp_path / "adaptive.pt"
    fit(make_model(), loss_fn, (X, Y), max_epochs=1, progress=False, batching="adaptive",
        batching_kwargs={"batch_size": 8}, checkpoint=ckpt)
    with pytest.raises(ValueError, match=r"other batching_kwargs: window=10 there, 3 here; "):
        fit(make_model(), loss_fn, (X, Y), max_epochs=2, progress=False, batching="adaptive",
            batching_kwargs={"batch_size": 8, "window": 3}, checkpoint=ckpt)


def test_one_process_group_is_the_plain_run(tmp_path):
    """A world of one: the all-reduces change nothing, the run is bitwise the
    plain one (also the full-batch phase, through full_batch_backward's
    distributed path)."""
    import torch.distributed as dist

    x, y = regression(n=100)
    opts = {"batch_size": 8, "micro_batches": 4}
    plain = make_model()
    want = fit(plain, loss_fn, (x, y), max_epochs=6, progress=False, batching="adaptive",
               batching_kwargs=opts)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        grouped = make_model()
        got = fit(grouped, loss_fn, (x, y), max_epochs=6, progress=False, batching="adaptive",
                  batching_kwargs=opts)
        with pytest.raises(NotImplementedError, match="plain replicated model"):
            fit(torch.nn.parallel.DistributedDataParallel(make_model()), loss_fn, (x, y),
                progress=False, batching="adaptive", batching_kwargs=opts)
        model = make_model()
        before = weights(model)
        opt = rprop.Rprop(model.parameters(), variant="grprop-sag", grprop_partitioned=True)
        with pytest.raises(ValueError, match=r"param_groups\[0\] has grprop_partitioned=True"):
            fit(model, loss_fn, (x, y), optimizer=opt, progress=False, batching="adaptive",
                batching_kwargs=opts)
        assert not opt.state and all(torch.equal(a, b) for a, b in
                                     zip(before, weights(model), strict=True))
    finally:
        dist.destroy_process_group()
    assert 100 in want.batch_size and got.loss == want.loss
    assert got.batch_size == want.batch_size
    for a, b in zip(weights(plain), weights(grouped), strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_two_ranks_equal_one_process_given_the_same_samples(tmp_path):
    """Two real gloo ranks, each with its own micro-batches, against one
    process given all of them; and fit(batching="adaptive") on two shards:
    both ranks end with the same parameters and history."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    import _adaptive_dist_worker as worker

    here = Path(__file__).resolve().parent
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for r in range(2):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, str(here / "_adaptive_dist_worker.py"), str(tmp_path)],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=log,
                stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for variant in worker.VARIANTS:
        for key, carry in (("stepwise", False), ("carried", True)):
            one = worker.stepwise(variant, [0, 1], None, carry)
            for saved in ranks:
                # Sums in another order (per rank, then across): equal to
                # rounding, and the signs, masks and so the steps come out the same.
                for a, b in zip(saved[key][variant], one, strict=True):
                    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    for a, b in zip(ranks[0]["fit"], ranks[1]["fit"], strict=True):
        assert torch.equal(a, b)
    h0, h1 = ({k: v for k, v in r["history"].items() if k != "time"} for r in ranks)
    assert h0 == h1 and 2 * worker.SHARD in h0["batch_size"]
    # The default rule: every rank doubles at the same steps, to the same weights.
    for a, b in zip(ranks[0]["default"], ranks[1]["default"], strict=True):
        assert torch.equal(a, b)
    d0, d1 = ({k: v for k, v in r["default_history"].items() if k != "time"} for r in ranks)
    assert d0 == d1 and len(set(d0["batch_size"])) > 2
    # ... and resumed in its mini-batch phase (evidence, growth state, samplers): the same.
    for saved in ranks:
        start = saved["default_resumed_from"]
        assert 0 < start and d0["batch_size"][start] < 2 * worker.SHARD
        for a, b in zip(saved["default_resumed"], ranks[0]["default"], strict=True):
            assert torch.equal(a, b)
        again = {k: v for k, v in saved["default_resumed_history"].items() if k != "time"}
        assert again == d0
    assert h0["batch_size"][0] == worker.FIT_OPTIONS["batch_size"]
    # Resumed from a checkpoint both ranks wrote together, in the mini-batch
    # phase (every rank's sampler restored): the uninterrupted run, bitwise.
    for saved in ranks:
        start = saved["resumed_from"]
        assert start is not None and 0 < start and h0["batch_size"][start] < 2 * worker.SHARD
        assert saved["resumed_history"]["loss"] == h0["loss"]
        for a, b in zip(saved["resumed"], ranks[0]["fit"], strict=True):
            assert torch.equal(a, b)


# -- rprop compare --minibatch ----------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--problems", "rosenbrock"], "unknown dataset 'rosenbrock' for --minibatch"),
    (["--plot", "x.png"], "--plot does not apply to --minibatch"),
    (["--methods", "adagrad"], "unknown method 'adagrad'"),
])
def test_compare_minibatch_bad_arguments_exit_2(capsys, argv, message):
    from rprop import cli

    code = cli.main(["compare", "--minibatch", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_compare_minibatch_quick_prints_every_method(capsys):
    from rprop import cli

    code = cli.main(["compare", "--minibatch", "--quick", "--methods",
                     "adaptive,adam-128,torch-rprop-128,irprop+-full,lbfgs-full"])
    out, _ = capsys.readouterr()
    assert code == 0
    for name in ("adaptive (defaults)", "adam-128 (lr=", "torch-rprop-128", "irprop+-full",
                 "lbfgs-full"):
        assert out.count(name) == 2, name  # at 1 and at 3 epochs


def test_progress_bar_shows_the_batch_size(capsys):
    x, y = regression(n=100)
    fit(make_model(), loss_fn, (x, y), max_epochs=2, batching="adaptive",
        batching_kwargs={"batch_size": 16, "micro_batches": 4, "rho": 1.0,
                         "grow": "fraction"})
    err = capsys.readouterr().err
    # tqdm redraws at most every 0.1 s: the last state is always drawn.
    assert "B=100 reliable=1.00" in err and "2.00/2" in err


@pytest.mark.slow
def test_sigterm_saves_mid_run_and_the_resumed_run_is_bitwise(tmp_path):
    """A real SIGTERM to a real subprocess in the mini-batch phase: it stops
    with status 143 after saving; resuming gives the uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import _adaptive_worker as worker

    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), os.environ.get(
        "PYTHONPATH", "")])}
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(here / "_adaptive_worker.py"),
                                 str(tmp_path), "4"], env=env, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "marker").exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker never reached the marker"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    threads = torch.get_num_threads()
    try:
        resumed, got = worker.run(tmp_path, 4, slow=False)
        straight, want = worker.run(None, 4, slow=False)
    finally:
        torch.set_num_threads(threads)
    assert got.resumed_from is not None and 0 < got.resumed_from < want.steps
    assert want.batch_size[got.resumed_from - 1] < 400  # stopped in the mini-batch phase
    assert got.loss == want.loss and got.batch_size == want.batch_size
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert torch.equal(a, b)
