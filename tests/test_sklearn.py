"""rprop.sklearn: sklearn's estimator checks, oracles for the fitted models and
for the optimisation, stopping rules, warm starts, bad arguments.

Expected values come from scikit-learn (LogisticRegression with a Newton
solver, Ridge, the API checks), NumPy least squares, torch.optim.Rprop and
losses written here with other code than the module's."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from scipy.special import expit, log_softmax  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import rprop  # noqa: E402
from rprop.sklearn import RpropClassifier, RpropRegressor  # noqa: E402

# Converged to the optimum: no loss-based stop, a step-size floor far below
# the precision asked for, the gradient rule decides.
TIGHT = {"tol": 0.0, "n_iter_no_change": 10**6, "gtol": 1e-11, "step_sizes": (1e-15, 50.0),
         "max_iter": 20000, "random_state": 0}


def _scaled(loader):
    X, y = loader(return_X_y=True)
    return StandardScaler().fit_transform(X), y


def _cancer():
    return _scaled(load_breast_cancer)


def _diabetes():
    X, y = _scaled(load_diabetes)
    return X, (y - y.mean()) / y.std()


@pytest.fixture(autouse=True)
def _one_thread():
    """These networks are tiny: with 2 intra-op threads on 2 busy cores torch
    spends ~10x the time waiting on its threads (9.7 min vs 1 min for this
    file, measured with the machine's other jobs running)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- sklearn's own checks ----------------------------------------------------


# sklearn's own test of its estimators ignores ConvergenceWarning too: some
# checks fit on random noise (multilabel targets), which never converges.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks([RpropClassifier(), RpropRegressor()])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# -- oracles -----------------------------------------------------------------


def test_no_hidden_layer_is_sklearn_logistic_regression():
    X, y = _cancer()
    alpha = 1.0
    ours = RpropClassifier((), alpha=alpha, **TIGHT).fit(X, y)
    # Ours: mean log-loss + 0.5 alpha ||w||^2 / n; times n this is
    # LogisticRegression's objective with C = 1 / alpha.
    ref = LogisticRegression(C=1 / alpha, solver="newton-cholesky", tol=1e-14,
                             max_iter=1000).fit(X, y)
    assert ours.stop_rule_ == "gtol"
    np.testing.assert_allclose(ours.coefs_[0].ravel(), ref.coef_.ravel(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(ours.intercepts_[0], ref.intercept_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-9)


def test_no_hidden_layer_is_multinomial_logistic_regression():
    X, y = _scaled(load_iris)
    ours = RpropClassifier((), alpha=1.0, **TIGHT).fit(X, y)
    ref = LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-14, max_iter=1000).fit(X, y)
    assert ours.stop_rule_ == "gtol"
    np.testing.assert_allclose(ours.coefs_[0].T, ref.coef_, rtol=0, atol=1e-7)
    # Softmax intercepts are defined up to a common shift (they are not penalised).
    b, rb = ours.intercepts_[0], ref.intercept_
    np.testing.assert_allclose(b - b.mean(), rb - rb.mean(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), rtol=0, atol=1e-9)


def test_no_hidden_layer_is_least_squares_and_ridge():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    Y = X @ rng.normal(size=(5, 2)) + 0.3 * rng.normal(size=(200, 2)) + [1.0, -2.0]
    ours = RpropRegressor((), alpha=0.0, **TIGHT).fit(X, Y)  # two outputs
    A = np.column_stack([X, np.ones(len(X))])
    coef = np.linalg.lstsq(A, Y, rcond=None)[0]
    np.testing.assert_allclose(ours.coefs_[0], coef[:-1], rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.intercepts_[0], coef[-1], rtol=0, atol=1e-8)
    # 0.5 mean r^2 + 0.5 alpha ||w||^2 / n has Ridge(alpha)'s minimiser.
    X, y = _diabetes()
    ridge = RpropRegressor((), alpha=5.0, **TIGHT).fit(X, y)
    ref = Ridge(alpha=5.0).fit(X, y)
    np.testing.assert_allclose(ridge.coefs_[0].ravel(), ref.coef_, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ridge.predict(X), ref.predict(X), rtol=0, atol=1e-8)


def _numpy_forward(model, X, act):
    h = X
    for i, (W, b) in enumerate(zip(model.coefs_, model.intercepts_)):
        h = h @ W + b
        if i < len(model.coefs_) - 1:
            h = act(h)
    return h


def test_predictions_are_a_forward_pass_of_coefs():
    X, y = _scaled(load_iris)
    clf = RpropClassifier((7, 5), activation="tanh", max_iter=30, random_state=1)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    z = _numpy_forward(clf, X, np.tanh)
    proba = np.exp(log_softmax(z, axis=1))
    np.testing.assert_allclose(clf.predict_proba(X), proba, rtol=1e-12, atol=1e-14)
    assert np.array_equal(clf.predict(X), clf.classes_[np.argmax(z, axis=1)])
    np.testing.assert_allclose(clf.predict_log_proba(X), log_softmax(z, axis=1), atol=1e-12)

    Xb, yb = _cancer()
    yb = np.where(yb == 1, "yes", "no")
    binary = RpropClassifier((4,), activation="logistic", max_iter=20, random_state=2)
    with pytest.warns(ConvergenceWarning):
        binary.fit(Xb, yb)
    p = expit(_numpy_forward(binary, Xb, expit)).ravel()
    np.testing.assert_allclose(binary.predict_proba(Xb), np.column_stack([1 - p, p]),
                               rtol=1e-12, atol=1e-14)
    assert np.array_equal(binary.predict(Xb), np.where(p > 0.5, "yes", "no"))

    Xr, yr = _diabetes()
    reg = RpropRegressor((6,), activation="relu", max_iter=25, random_state=3)
    with pytest.warns(ConvergenceWarning):
        reg.fit(Xr, yr)
    out = _numpy_forward(reg, Xr, lambda h: np.maximum(h, 0)).ravel()
    np.testing.assert_allclose(reg.predict(Xr), out, rtol=1e-12, atol=1e-13)


def _sklearn_initial_weights(X, y, hidden, activation, seed):
    """sklearn's MLP initial weights: one SGD epoch with a step so small that
    no weight moves (1e-300 * gradient is below half an ulp of any weight)."""
    mlp = MLPClassifier(hidden, activation=activation, solver="sgd", learning_rate_init=1e-300,
                        momentum=0.0, batch_size=len(X), shuffle=False, max_iter=1,
                        alpha=0.0, random_state=seed)
    with pytest.warns(ConvergenceWarning):
        mlp.fit(X, y)
    return mlp.coefs_, mlp.intercepts_


def _torch_mlp_loss(weights, x, t, alpha):
    """Mean cross-entropy of a tanh MLP plus sklearn's L2 term (torch's own loss)."""
    h = x
    layers = list(zip(weights[0::2], weights[1::2]))
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = torch.tanh(h)
    penalty = sum((W ** 2).sum() for W in weights[0::2])
    return torch.nn.functional.cross_entropy(h, t) + 0.5 * alpha * penalty / x.shape[0]


@pytest.mark.parametrize("variant", ["irprop-", "irprop+"])
def test_iterations_are_rprop_steps_on_the_loss(variant):
    X, y = _scaled(load_iris)
    hidden, seed, alpha, steps = (6,), 4, 0.3, 8
    coefs, intercepts = _sklearn_initial_weights(X, y, hidden, "tanh", seed)
    weights = [torch.tensor(a, requires_grad=True)
               for pair in zip(coefs, intercepts) for a in pair]
    x, t = torch.tensor(X), torch.tensor(y)
    if variant == "irprop-":  # torch's own Rprop is the oracle
        opt = torch.optim.Rprop(weights, lr=0.02)
    else:
        opt = rprop.Rprop(weights, lr=0.02, variant="irprop+")
    losses = []

    def closure():
        opt.zero_grad()
        loss = _torch_mlp_loss(weights, x, t, alpha)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        losses.append(float(closure().detach()))
    ours = RpropClassifier(hidden, activation="tanh", alpha=alpha, lr=0.02, variant=variant,
                           max_iter=steps, tol=0.0, gtol=0.0, random_state=seed)
    with pytest.warns(ConvergenceWarning):
        ours.fit(X, y)
    for mine, ref in zip(ours.coefs_ + ours.intercepts_, weights[0::2] + weights[1::2]):
        np.testing.assert_allclose(mine, ref.detach().numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.loss_curve_, losses, rtol=1e-12)
    assert ours.n_iter_ == steps and ours.n_grad_evals_ == steps + 1


def test_first_iteration_moves_every_weight_by_lr():
    X, y = _scaled(load_iris)
    coefs, intercepts = _sklearn_initial_weights(X, y, (5,), "relu", 7)
    one = RpropClassifier((5,), lr=0.03, max_iter=1, random_state=7)
    with pytest.warns(ConvergenceWarning):
        one.fit(X, y)
    for w1, w0 in zip(one.coefs_ + one.intercepts_, coefs + intercepts):
        moved = np.abs(w1 - w0)
        # A weight of a dead relu unit has a zero gradient and stays.
        assert np.all(np.isclose(moved, 0.03, rtol=0, atol=1e-15) | (moved == 0))
        assert np.mean(moved > 0) > 0.5


def test_n_restarts_keeps_the_lowest_training_loss():
    X, y = _scaled(load_iris)
    kw = {"hidden_layer_sizes": (3,), "activation": "tanh", "alpha": 0.0, "max_iter": 60,
          "tol": 0.0, "gtol": 0.0, "random_state": 11}
    with pytest.warns(ConvergenceWarning):
        many = RpropClassifier(n_restarts=5, **kw).fit(X, y)
    with pytest.warns(ConvergenceWarning):
        single = RpropClassifier(**kw).fit(X, y)
    losses = many.restart_losses_
    assert losses.shape == (5,) and len(set(losses.tolist())) == 5
    assert many.best_restart_ == int(np.argmin(losses)) and many.loss_ == losses.min()
    assert losses[0] == single.loss_  # the first start is the single fit's start
    z = _numpy_forward(many, X, np.tanh)
    independent = -log_softmax(z, axis=1)[np.arange(len(y)), y].mean()
    np.testing.assert_allclose(independent, losses.min(), rtol=1e-12)
    assert many.n_grad_evals_ == 5 * 61


def test_early_stopping_restores_the_best_validation_iteration():
    X, y = _diabetes()
    seed = 5
    reg = RpropRegressor((64,), early_stopping=True, validation_fraction=0.2,
                         n_iter_no_change=8, alpha=0.0, lr=0.05, random_state=seed).fit(X, y)
    scores = np.asarray(reg.validation_scores_)
    best = int(np.argmax(scores))
    assert reg.stop_rule_ == "early_stopping" and reg.best_loss_ is None
    assert best < len(scores) - 1 and scores[-1] < scores[best]  # it went past the best
    assert reg.best_validation_score_ == scores[best]
    # The split is sklearn's train_test_split with the estimator's random_state.
    X_tr, X_val, y_tr, y_val = train_test_split(X, y, test_size=0.2,
                                                random_state=np.random.RandomState(seed))
    assert reg.score(X_val, y_val) == pytest.approx(scores[best], rel=1e-12)
    residual = reg.predict(X_tr) - y_tr
    assert 0.5 * np.mean(residual ** 2) == pytest.approx(reg.loss_curve_[best], rel=1e-12)
    assert reg.loss_ == reg.loss_curve_[best]


def test_classifier_early_stopping_scores_a_stratified_split():
    X, y = _cancer()
    seed = 2
    clf = RpropClassifier((16,), early_stopping=True, validation_fraction=0.25,
                          n_iter_no_change=5, random_state=seed).fit(X, y)
    _, X_val, _, y_val = train_test_split(
        X, y, test_size=0.25, random_state=np.random.RandomState(seed), stratify=y)
    scores = clf.validation_scores_
    assert clf.stop_rule_ == "early_stopping" and len(scores) == clf.n_iter_
    assert clf.best_validation_score_ == max(scores)
    assert clf.score(X_val, y_val) == max(scores)  # accuracy of the restored weights


def test_warm_start_continues_weights_and_step_sizes():
    X, y = _diabetes()
    kw = {"hidden_layer_sizes": (8,), "tol": 0.0, "gtol": 0.0, "random_state": 0}
    with pytest.warns(ConvergenceWarning):
        straight = RpropRegressor(max_iter=40, **kw).fit(X, y)
    warm = RpropRegressor(max_iter=15, warm_start=True, **kw)
    with pytest.warns(ConvergenceWarning):
        warm.fit(X, y)
    warm = pickle.loads(pickle.dumps(warm))  # the step sizes travel in the pickle
    warm.set_params(max_iter=25)
    with pytest.warns(ConvergenceWarning):
        warm.fit(X, y)
    for a, b in zip(warm.coefs_ + warm.intercepts_, straight.coefs_ + straight.intercepts_):
        assert np.array_equal(a, b)
    assert warm.loss_curve_ == straight.loss_curve_ and warm.n_iter_ == 40
    # Restarting the step sizes at lr (a cold optimizer from the same weights)
    # takes another path: the state is what makes the two agree.
    cold = RpropRegressor(max_iter=15, warm_start=True, **kw)
    with pytest.warns(ConvergenceWarning):
        cold.fit(X, y)
    cold._optimizer_state = {}
    cold.set_params(max_iter=25)
    with pytest.warns(ConvergenceWarning):
        cold.fit(X, y)
    assert not np.array_equal(cold.coefs_[0], straight.coefs_[0])


def test_weights_set_by_hand_start_with_fresh_step_sizes():
    X, y = _scaled(load_iris)
    coefs, intercepts = _sklearn_initial_weights(X, y, (5,), "relu", 8)
    clf = RpropClassifier((5,), lr=0.03, max_iter=30, warm_start=True, random_state=0)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    clf.coefs_, clf.intercepts_ = [c.copy() for c in coefs], [b.copy() for b in intercepts]
    clf.set_params(max_iter=1)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    for w1, w0 in zip(clf.coefs_ + clf.intercepts_, coefs + intercepts):
        moved = np.abs(w1 - w0)  # a first Rprop step: lr, or 0 for a zero gradient
        assert np.all(np.isclose(moved, 0.03, rtol=0, atol=1e-15) | (moved == 0))


def test_warm_start_refuses_another_architecture_and_changes_nothing():
    X, y = _scaled(load_iris)
    clf = RpropClassifier((4,), warm_start=True, max_iter=5, random_state=0)
    with pytest.warns(ConvergenceWarning):
        clf.fit(X, y)
    before = {k: v for k, v in vars(clf).items()}
    coefs = [c.copy() for c in clf.coefs_]
    clf.set_params(hidden_layer_sizes=(6,))
    with pytest.raises(ValueError, match="warm_start=True continues the fitted network"):
        clf.fit(X, y)
    with pytest.raises(ValueError, match="same classes"):
        clf.set_params(hidden_layer_sizes=(4,)).fit(X[y < 2], y[y < 2])
    assert vars(clf).keys() == before.keys()
    assert all(np.array_equal(a, b) for a, b in zip(clf.coefs_, coefs))


# -- stopping rules ------------------------------------------------------------


def test_gtol_is_the_largest_gradient_component():
    X, y = _diabetes()
    reg = RpropRegressor((), alpha=0.0, gtol=1e-4, tol=0.0, n_iter_no_change=10**6,
                         random_state=0).fit(X, y)
    assert reg.stop_rule_ == "gtol"
    r = reg.predict(X) - y  # d/dw of 0.5 mean r^2 = X^T r / n, d/db = mean r
    grad = np.r_[X.T @ r / len(X), r.mean()]
    assert np.abs(grad).max() <= 1e-4
    # One iteration earlier the rule did not hold: rerun one step short.
    with pytest.warns(ConvergenceWarning):
        short = RpropRegressor((), alpha=0.0, gtol=1e-4, tol=0.0, n_iter_no_change=10**6,
                               random_state=0, max_iter=reg.n_iter_ - 1).fit(X, y)
    r = short.predict(X) - y
    assert np.abs(np.r_[X.T @ r / len(X), r.mean()]).max() > 1e-4


def test_stops_when_every_moving_step_size_is_at_its_floor():
    X, y = _diabetes()
    reg = RpropRegressor((), alpha=0.0, gtol=0.0, tol=0.0, n_iter_no_change=10**6,
                         step_sizes=(1e-4, 50.0), random_state=0).fit(X, y)
    assert reg.stop_rule_ == "step_floor"
    sizes = [st["step_size"] for st in reg._optimizer_state.values()]
    assert all(float(s.max()) <= 1e-4 for s in sizes)


def test_tol_stops_as_sklearns_mlp():
    X, y = _diabetes()
    reg = RpropRegressor((16,), tol=1e-3, n_iter_no_change=3, gtol=0.0,
                         random_state=0).fit(X, y)
    assert reg.stop_rule_ == "tol"
    curve, best, count = reg.loss_curve_, np.inf, 0
    for i, loss in enumerate(curve):  # sklearn's rule, replayed on the curve
        count = count + 1 if loss > best - 1e-3 else 0
        best = min(best, loss)
        assert (count > 3) == (i == len(curve) - 1)
    assert reg.best_loss_ == min(curve)


# -- the sklearn contract --------------------------------------------------------


def test_pipeline_grid_search_and_cross_val_score():
    X, y = load_breast_cancer(return_X_y=True)
    pipe = make_pipeline(StandardScaler(), RpropClassifier((8,), random_state=0))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.9
    grid = GridSearchCV(pipe, {"rpropclassifier__alpha": [1e-4, 1.0],
                               "rpropclassifier__variant": ["irprop+", "rprop-"]}, cv=3)
    grid.fit(X, y)
    assert grid.best_score_ > 0.9 and len(grid.cv_results_["params"]) == 4
    Xr, yr = _diabetes()
    reg = cross_val_score(make_pipeline(StandardScaler(), RpropRegressor((), random_state=0)),
                          Xr, yr, cv=3)
    assert reg.mean() > 0.4


def test_float64_by_default_float32_on_request_deterministic_and_pickles():
    X, y = _scaled(load_iris)
    a = RpropClassifier((5,), random_state=3).fit(X.astype(np.float32), y)
    b = RpropClassifier((5,), random_state=3).fit(X.astype(np.float32), y)
    assert all(c.dtype == np.float64 for c in a.coefs_ + a.intercepts_)
    assert all(np.array_equal(p, q) for p, q in zip(a.coefs_, b.coefs_))
    single = RpropClassifier((5,), random_state=3, dtype="float32").fit(X, y)
    assert all(c.dtype == np.float32 for c in single.coefs_)
    c = pickle.loads(pickle.dumps(a))
    assert np.array_equal(c.predict_proba(X), a.predict_proba(X))
    assert a.n_features_in_ == 4 and list(a.classes_) == [0, 1, 2]
    assert len(a.loss_curve_) == a.n_iter_ and a.out_activation_ == "softmax"


def test_feature_names_are_kept():
    pd = pytest.importorskip("pandas")
    X, y = _scaled(load_iris)
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    clf = RpropClassifier((3,), random_state=0).fit(frame, y)
    assert list(clf.feature_names_in_) == ["a", "b", "c", "d"]


def test_verbose_prints_the_loss(capsys):
    X, y = _diabetes()
    with pytest.warns(ConvergenceWarning):
        RpropRegressor((), max_iter=3, verbose=True, random_state=0).fit(X, y)
    out = capsys.readouterr().out
    assert out.count("Iteration ") == 3 and "Stopped by max_iter after 3" in out


BAD_ARGS = [
    ({"hidden_layer_sizes": (4, 0)}, ValueError, "hidden_layer_sizes"),
    ({"hidden_layer_sizes": "10"}, TypeError, "hidden_layer_sizes"),
    ({"activation": "softplus"}, ValueError, "activation must be one of"),
    ({"alpha": -1.0}, ValueError, "alpha"),
    ({"max_iter": 0}, ValueError, "max_iter"),
    ({"max_iter": 2.5}, TypeError, "max_iter"),
    ({"tol": "small"}, TypeError, "tol"),
    ({"gtol": -1e-3}, ValueError, "gtol"),
    ({"validation_fraction": 1.0}, ValueError, "validation_fraction"),
    ({"n_iter_no_change": 0}, ValueError, "n_iter_no_change"),
    ({"early_stopping": "yes"}, TypeError, "early_stopping"),
    ({"warm_start": 1}, TypeError, "warm_start"),
    ({"variant": "adam"}, ValueError, "adam"),
    ({"lr": -0.1}, ValueError, "lr"),
    ({"etas": (1.5, 1.2)}, ValueError, "etas"),
    ({"step_sizes": (1.0, 0.1)}, ValueError, "step_sizes"),
    ({"n_restarts": 0}, ValueError, "n_restarts"),
    ({"device": "gpu7"}, ValueError, "device"),
    ({"dtype": "float16"}, ValueError, "dtype"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGS)
def test_bad_arguments_are_refused_by_name_and_change_nothing(kwargs, error, message):
    X, y = _scaled(load_iris)
    clf = RpropClassifier((3,), max_iter=300, random_state=0).fit(X, y)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(clf).items()}
    clf.set_params(**kwargs)
    with pytest.raises(error, match=message):
        clf.fit(X, y)
    after = vars(clf)
    assert after.keys() == before.keys()
    assert all(np.array_equal(a, b) for a, b in zip(clf.coefs_, before["coefs_"]))


def test_non_finite_loss_is_a_clear_error():
    X, y = _diabetes()
    with pytest.raises(ValueError, match="not finite"):
        RpropRegressor((), random_state=0).fit(X * 1e200, y)


def test_early_stopping_needs_two_validation_samples():
    X, y = _diabetes()
    with pytest.raises(ValueError, match="validation set is too small"):
        RpropRegressor(early_stopping=True, validation_fraction=0.1).fit(X[:10], y[:10])


@pytest.mark.slow
def test_import_rprop_does_not_import_sklearn_or_torch():
    code = ("import sys, rprop; bad = {'sklearn', 'torch'} & set(sys.modules); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda_as_on_the_cpu():
    X, y = _scaled(load_iris)
    kw = {"hidden_layer_sizes": (5,), "max_iter": 50, "tol": 0.0, "gtol": 0.0, "random_state": 0}
    with pytest.warns(ConvergenceWarning):
        cpu = RpropClassifier(**kw).fit(X, y)
    with pytest.warns(ConvergenceWarning):
        gpu = RpropClassifier(device="cuda", **kw).fit(X, y)
    np.testing.assert_allclose(gpu.predict_proba(X), cpu.predict_proba(X), atol=1e-8)


@pytest.mark.parametrize(("first", "then"), [("irprop-", "irprop+"), ("rprop-", "rprop+"),
                                             ("irprop+", "rprop-")])
def test_warm_start_may_switch_to_another_variant(first, then):
    """Switching variant between warm fits continues the step sizes (what the
    new variant keeps beyond the old one starts fresh) instead of refusing
    the saved state: the first continued step does not move by lr, as a step
    from fresh step sizes would."""
    X = np.random.RandomState(0).randn(50, 3)
    y = X.sum(1)
    r = RpropRegressor((5,), variant=first, lr=0.01, max_iter=20, warm_start=True,
                       random_state=0, tol=0.0, n_iter_no_change=10**6, gtol=0.0)
    with pytest.warns(ConvergenceWarning):
        r.fit(X, y)
    before = [w.copy() for w in r.coefs_ + r.intercepts_]
    r.set_params(variant=then, max_iter=1)
    with pytest.warns(ConvergenceWarning):
        r.fit(X, y)
    assert r.n_iter_ == 21 and np.isfinite(r.loss_curve_).all()
    moved = np.concatenate([np.abs(w1 - w0).ravel()
                            for w1, w0 in zip(r.coefs_ + r.intercepts_, before)])
    assert not np.all(np.isclose(moved, 0.01, rtol=0, atol=1e-15) | (moved == 0))
