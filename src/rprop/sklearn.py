"""scikit-learn estimators: a small MLP on a table, trained full batch with Rprop.

:class:`RpropClassifier` and :class:`RpropRegressor` do the job of R's
``neuralnet``, MATLAB's ``trainrp`` and FANN: one call fits a multilayer
perceptron on the whole table, one full-batch gradient per iteration, with
:class:`rprop.Rprop` (the torch front) taking the step. Arguments use the
vocabulary of :class:`sklearn.neural_network.MLPClassifier` where it has a
word for the idea; the fitted attributes (``coefs_``, ``intercepts_``,
``loss_curve_``, ...) are the ones it has.

This module imports torch and scikit-learn (``pip install rprop[sklearn]``);
``import rprop`` does not import it.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data
from torch import Tensor

from rprop._hyper import DEFAULT_ETAS, DEFAULT_STEP_SIZES
from rprop._stopping import gtol_reached, step_floor_reached
from rprop.torch import Rprop

__all__ = ["RpropClassifier", "RpropRegressor"]

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda z: z,
    "logistic": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# Per-parameter state that has the parameter's shape (and so its dtype).
_SHAPED_STATE = ("prev", "step_size", "prev_update")


# -- argument checks ---------------------------------------------------------


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def _number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
            open_low: bool = False, open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    above = v > low if open_low else v >= low
    below = v < high if open_high else v <= high
    if not (above and below and not math.isnan(v)):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name} must lie in {lo}{low:g}, {high:g}{hi}, got {value!r}")
    return v


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def _choice(name: str, value: Any, options: Any) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return value


def _hidden(value: Any) -> tuple[int, ...]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"hidden_layer_sizes must be an int or a tuple of ints (() for no hidden layer), "
            f"got {value!r}")
    sizes = tuple(value)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"hidden_layer_sizes must hold ints >= 1, got {value!r}")
    return tuple(int(s) for s in sizes)


def _device(value: Any) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise TypeError(f"device must be a str or torch.device, got {value!r}")
    try:
        return torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"device must name a torch device ('cpu', 'cuda:0'), got {value!r}") \
            from err


@dataclass(frozen=True)
class _Settings:
    """The estimator's arguments, checked once per fit."""

    hidden: tuple[int, ...]
    activation: str
    alpha: float
    max_iter: int
    tol: float
    gtol: float
    early_stopping: bool
    validation_fraction: float
    n_iter_no_change: int
    verbose: bool
    n_restarts: int
    device: torch.device
    dtype: torch.dtype
    rprop: dict[str, Any]


# -- training ----------------------------------------------------------------


@dataclass
class _Run:
    """What one training run from one start left."""

    weights: list[Tensor]
    optimizer_state: dict[Any, Any]
    loss: float              # training objective at ``weights``
    loss_curve: list[float]
    n_iter: int
    n_grad_evals: int
    stop_rule: str
    validation_scores: list[float] | None
    best_validation_score: float | None


def _forward(weights: list[Tensor], x: Tensor, activation: str) -> Tensor:
    """The network's output before the output activation (logits for a classifier)."""
    act = _ACTIVATIONS[activation]
    h = x
    last = len(weights) // 2 - 1
    for i in range(last + 1):
        h = torch.addmm(weights[2 * i + 1], h, weights[2 * i])
        if i < last:
            h = act(h)
    return h


def _detached_state(opt: Rprop) -> dict[Any, Any]:
    """The optimizer's per-parameter state, as CPU copies (pickles anywhere)."""
    return {index: {k: v.detach().to("cpu", copy=True) if isinstance(v, Tensor) else v
                    for k, v in st.items()}
            for index, st in opt.state_dict()["state"].items()}


def _tensor(a: Any, to: dict[str, Any]) -> Tensor:
    """``a`` as a tensor on the training device and dtype. torch cannot wrap a
    read-only array (a memory-mapped table), so that one is copied first."""
    a = np.asarray(a)
    return torch.as_tensor(a if a.flags.writeable else a.copy(), **to)


def _copies(weights: list[Tensor]) -> list[Tensor]:
    return [w.detach().clone() for w in weights]


class _BaseRprop(BaseEstimator):
    """What the classifier and the regressor share: arguments, the fit loop, prediction."""

    # Set by the subclasses.
    _output: str = "identity"
    # Fitted by fit (declared for the type checker; no value until then).
    coefs_: list[np.ndarray]
    intercepts_: list[np.ndarray]
    _optimizer_state: dict[Any, Any]
    _state_weights: list[np.ndarray]

    def __init__(
        self,
        hidden_layer_sizes: Any = (100,),
        activation: str = "relu",
        *,
        alpha: float = 1e-4,
        max_iter: int = 1000,
        tol: float = 1e-4,
        gtol: float = 1e-5,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: bool = False,
        variant: str = "irprop+",
        lr: float = 0.01,
        etas: tuple[float, float] = DEFAULT_ETAS,
        step_sizes: tuple[float, float] = DEFAULT_STEP_SIZES,
        n_restarts: int = 1,
        device: Any = "cpu",
        dtype: str = "float64",
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.alpha = alpha
        self.max_iter = max_iter
        self.tol = tol
        self.gtol = gtol
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.variant = variant
        self.lr = lr
        self.etas = etas
        self.step_sizes = step_sizes
        self.n_restarts = n_restarts
        self.device = device
        self.dtype = dtype

    # -- hooks the subclasses fill in -----------------------------------------

    def _targets(self, X: Any, y: Any, reset: bool) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _data_loss(self, out: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, out: np.ndarray) -> Any:
        """Predictions (labels for a classifier) from the network's output."""
        raise NotImplementedError

    def _validation_score(self, out: np.ndarray, y: Any) -> float:
        raise NotImplementedError

    # -- fitting ----------------------------------------------------------------

    def _settings(self) -> _Settings:
        rprop_args: dict[str, Any] = {"lr": self.lr, "etas": self.etas,
                                      "step_sizes": self.step_sizes, "variant": self.variant}
        # Rprop checks its own arguments, under the same names as here.
        Rprop([torch.zeros(1, requires_grad=True)], **rprop_args)
        if not isinstance(self.verbose, (bool, numbers.Integral)):
            raise TypeError(f"verbose must be a bool or an int, got {self.verbose!r}")
        return _Settings(
            hidden=_hidden(self.hidden_layer_sizes),
            activation=_choice("activation", self.activation, _ACTIVATIONS),
            alpha=_number("alpha", self.alpha),
            max_iter=_count("max_iter", self.max_iter, 1),
            tol=_number("tol", self.tol),
            gtol=_number("gtol", self.gtol),
            early_stopping=_flag("early_stopping", self.early_stopping),
            validation_fraction=_number("validation_fraction", self.validation_fraction,
                                        high=1.0, open_low=True, open_high=True),
            n_iter_no_change=_count("n_iter_no_change", self.n_iter_no_change, 1),
            verbose=bool(self.verbose),
            n_restarts=_count("n_restarts", self.n_restarts, 1),
            device=_device(self.device),
            dtype=_DTYPES[_choice("dtype", self.dtype, _DTYPES)],
            rprop=rprop_args,
        )

    def fit(self, X: Any, y: Any) -> Any:
        """Fit the network to ``X`` and ``y``, full batch.

        A fit that raises leaves the estimator exactly as it was.
        """
        before = self.__dict__.copy()
        try:
            return self._fit(X, y)
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    def _fit(self, X: Any, y: Any) -> Any:
        s = self._settings()
        _flag("warm_start", self.warm_start)
        warm = bool(self.warm_start) and hasattr(self, "coefs_")
        X, Y = self._targets(X, y, reset=not warm)
        units = [X.shape[1], *s.hidden, Y.shape[1]]
        if warm:
            shapes = [c.shape for c in self.coefs_]
            if shapes != list(itertools.pairwise(units)):
                raise ValueError(
                    "warm_start=True continues the fitted network, whose layers are "
                    f"{[c.shape for c in self.coefs_]}; hidden_layer_sizes={s.hidden} and "
                    f"the data ask for {list(itertools.pairwise(units))}. "
                    "Set warm_start=False to fit a new network.")
        rng = check_random_state(self.random_state)
        X_val = Y_val = None
        if s.early_stopping:
            stratify = Y if isinstance(self, ClassifierMixin) and Y.shape[1] == 1 else None
            X, X_val, Y, Y_val = train_test_split(
                X, Y, test_size=s.validation_fraction, random_state=rng, stratify=stratify)
            if X_val.shape[0] < 2:
                raise ValueError(
                    "the validation set is too small (fewer than 2 samples): increase "
                    "validation_fraction or give more samples")
        if warm:
            starts = [[_tensor(a, {}) for pair in zip(self.coefs_, self.intercepts_, strict=True)
                       for a in pair]]
            # Rprop's state belongs to the weights the last fit left; weights
            # set by hand (neuralnet's startweights) start with fresh step sizes.
            left = self._state_weights
            mine = [*self.coefs_, *self.intercepts_]
            same = len(left) == len(mine) and all(
                np.array_equal(a, b) for a, b in zip(left, mine, strict=True))
            state = self._optimizer_state if same else None
        else:
            starts = [self._initial_weights(units, s, rng) for _ in range(s.n_restarts)]
            state = None

        to: dict[str, Any] = {"device": s.device, "dtype": s.dtype}
        x, t = _tensor(X, to), _tensor(Y, to)
        x_val = None if X_val is None else _tensor(X_val, to)
        runs = []
        for r, start in enumerate(starts):
            if s.verbose and len(starts) > 1:
                print(f"Restart {r + 1}/{len(starts)}")
            runs.append(self._run([w.to(**to) for w in start], state, x, t, x_val,
                                  None if Y_val is None else self._decode(Y_val), s))
        losses = np.array([run.loss for run in runs])
        best = int(np.argmin(losses))
        run = runs[best]

        self.coefs_ = [w.detach().cpu().numpy() for w in run.weights[0::2]]
        self.intercepts_ = [w.detach().cpu().numpy() for w in run.weights[1::2]]
        self._optimizer_state = run.optimizer_state
        self._state_weights = [a.copy() for a in (*self.coefs_, *self.intercepts_)]
        self._fitted_as = (s.activation, s.device, s.dtype)
        self.n_layers_ = len(units)
        self.n_outputs_ = Y.shape[1]
        self.out_activation_ = self._output
        self.restart_losses_ = losses
        self.best_restart_ = best
        self.stop_rule_ = run.stop_rule
        self.loss_ = run.loss
        self.n_grad_evals_ = sum(r.n_grad_evals for r in runs)
        # A warm start continues the curves and the count, as sklearn's MLP.
        curve = getattr(self, "loss_curve_", []) + run.loss_curve if warm else run.loss_curve
        self.loss_curve_ = curve
        self.n_iter_ = (getattr(self, "n_iter_", 0) if warm else 0) + run.n_iter
        if s.early_stopping:
            previous = (getattr(self, "validation_scores_", None) or []) if warm else []
            self.validation_scores_ = previous + (run.validation_scores or [])
            self.best_validation_score_ = run.best_validation_score
            self.best_loss_ = None
        else:
            self.validation_scores_ = None
            self.best_validation_score_ = None
            self.best_loss_ = min([*curve, run.loss])
        if run.stop_rule == "max_iter":
            warnings.warn(
                f"Rprop: maximum iterations ({s.max_iter}) reached and the optimization "
                "hasn't converged yet.", ConvergenceWarning, stacklevel=3)
        return self

    def _initial_weights(self, units: list[int], s: _Settings,
                         rng: np.random.RandomState) -> list[Tensor]:
        """Glorot-uniform weights and biases, drawn as sklearn's MLP draws them
        (so the same random_state starts both from the same network)."""
        factor = 2.0 if s.activation == "logistic" else 6.0
        weights = []
        for fan_in, fan_out in itertools.pairwise(units):
            bound = math.sqrt(factor / (fan_in + fan_out))
            weights.append(torch.from_numpy(rng.uniform(-bound, bound, (fan_in, fan_out))))
            weights.append(torch.from_numpy(rng.uniform(-bound, bound, fan_out)))
        return weights

    def _objective(self, weights: list[Tensor], x: Tensor, t: Tensor, s: _Settings) -> Tensor:
        """The data loss plus sklearn's L2 term, 0.5 * alpha * ||W||^2 / n_samples."""
        loss = self._data_loss(_forward(weights, x, s.activation), t)
        if s.alpha:
            l2 = torch.stack([(w * w).sum() for w in weights[0::2]]).sum()
            loss = loss + 0.5 * s.alpha * l2 / x.shape[0]
        return loss

    def _run(self, weights: list[Tensor], state: dict[Any, Any] | None, x: Tensor, t: Tensor,
             x_val: Tensor | None, y_val: np.ndarray | None, s: _Settings) -> _Run:
        """Train from ``weights`` (and an optimizer state to continue from)
        until a stopping rule holds; one full-batch gradient per iteration.

        The rules are checked at every iterate, in this order: a non-finite
        loss or gradient (an error), ``gtol`` on the largest gradient
        component, every moving step size at ``step_min`` (Rprop can resolve
        nothing finer), no improvement for ``n_iter_no_change`` iterations
        (of the training loss, or of the validation score with early
        stopping), ``max_iter``."""
        params = [w.detach().clone().requires_grad_(True) for w in weights]
        opt = Rprop(params, **s.rprop)
        if state is not None:
            # The saved state continues; the hyperparameters are this fit's.
            # The groups go in without "variant", so state a changed variant
            # needs beyond the saved one (prev_update, prev_loss) starts
            # fresh, as from a torch.optim.Rprop state, instead of being
            # demanded; the loader keeps this optimizer's variant.
            groups = [{k: v for k, v in g.items() if k != "variant"}
                      for g in opt.state_dict()["param_groups"]]
            opt.load_state_dict({"state": {
                i: {k: v.to(params[i].dtype) if k in _SHAPED_STATE else v
                    for k, v in st.items()} for i, st in state.items()},
                "param_groups": groups})
        # Compared in the state's dtype, where the clamp put it.
        step_min = float(torch.tensor(s.rprop["step_sizes"][0], dtype=s.dtype))

        def evaluate() -> tuple[Tensor, float, float, float]:
            for p in params:
                p.grad = None
            loss = self._objective(params, x, t, s)
            loss.backward()
            grads = [cast(Tensor, p.grad) for p in params]
            parts = [loss.detach(), torch.stack([g.abs().max() for g in grads]).max()]
            if opt.state:
                parts.append(torch.stack([
                    torch.where(g != 0, opt.state[p]["step_size"], 0).max()
                    for p, g in zip(params, grads, strict=True)]).max())
            stats = torch.stack(parts).tolist()  # one host sync per iteration
            return loss.detach(), stats[0], stats[1], stats[2] if opt.state else math.inf

        def score() -> float:
            assert x_val is not None and y_val is not None
            with torch.no_grad():
                out = self._output_activation(_forward(params, x_val, s.activation))
            return self._validation_score(out.cpu().numpy(), y_val)

        loss, value, gmax, moving = evaluate()
        evals, n_iter, no_improvement = 1, 0, 0
        curve: list[float] = []
        best_loss = math.inf
        scores: list[float] | None = [] if x_val is not None else None
        best_score = -math.inf
        best: tuple[list[Tensor], dict[Any, Any], float] = (
            _copies(params), _detached_state(opt), value)
        while True:
            if not (math.isfinite(value) and math.isfinite(gmax)):
                raise ValueError(
                    f"the training loss or its gradient is not finite at iteration {n_iter} "
                    f"(loss = {value}); the input data may hold large values that need "
                    "scaling (sklearn.preprocessing.StandardScaler)")
            # The minimizers' and fit's rules: the largest gradient component,
            # then every moving step size at its floor.
            if gtol_reached(gmax, s.gtol) is not None:
                rule = "gtol"
                break
            if n_iter > 0 and step_floor_reached(moving, step_min, gmax, gtol=s.gtol) is not None:
                rule = "step_floor"
                break
            if no_improvement > s.n_iter_no_change:
                rule = "early_stopping" if scores is not None else "tol"
                break
            if n_iter >= s.max_iter:
                rule = "max_iter"
                break
            opt.step(loss=loss)
            loss, value, gmax, moving = evaluate()
            evals += 1
            n_iter += 1
            curve.append(value)
            if s.verbose:
                print(f"Iteration {n_iter}, loss = {value:.8f}")
            if scores is None:
                no_improvement = no_improvement + 1 if value > best_loss - s.tol else 0
                best_loss = min(best_loss, value)
            else:
                sc = score()
                scores.append(sc)
                no_improvement = no_improvement + 1 if sc < best_score + s.tol else 0
                if sc > best_score:
                    best_score = sc
                    best = (_copies(params), _detached_state(opt), value)
        if s.verbose:
            print(f"Stopped by {rule} after {n_iter} iterations.")
        if scores is None:
            final = (_copies(params), _detached_state(opt), value)
        else:
            final = best
        return _Run(
            weights=final[0], optimizer_state=final[1], loss=final[2], loss_curve=curve,
            n_iter=n_iter, n_grad_evals=evals, stop_rule=rule, validation_scores=scores,
            best_validation_score=None if scores is None else best_score)

    # -- prediction -------------------------------------------------------------

    def _output_activation(self, out: Tensor) -> Tensor:
        if self._output == "softmax":
            return torch.softmax(out, dim=1)
        if self._output == "logistic":
            return torch.sigmoid(out)
        return out

    def _predict_output(self, X: Any) -> np.ndarray:
        """The network's output (after the output activation) for ``X``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        activation, device, dtype = self._fitted_as
        to: dict[str, Any] = {"device": device, "dtype": dtype}
        weights = [_tensor(a, to) for pair in zip(self.coefs_, self.intercepts_, strict=True)
                   for a in pair]
        with torch.no_grad():
            out = _forward(weights, _tensor(X, to), activation)
            return self._output_activation(out).cpu().numpy()

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class RpropClassifier(ClassifierMixin, _BaseRprop):
    """A multilayer perceptron classifier trained full batch with Rprop.

    The loss is sklearn's MLP log-loss: softmax outputs and the mean negative
    log-likelihood for more than two classes, one logistic output and the
    binary cross-entropy (summed over labels, averaged over samples) for two
    classes and for multilabel targets; plus ``0.5 * alpha * ||W||^2 /
    n_samples`` over the weights (not the biases). It is computed from the
    logits, so it stays finite where sklearn clips probabilities at machine
    epsilon.

    Parameters:
        hidden_layer_sizes: units per hidden layer, e.g. ``(100,)`` (default)
            or ``(20, 10)``; ``()`` fits a multinomial/binary logistic
            regression.
        activation: ``"relu"`` (default), ``"tanh"``, ``"logistic"`` or
            ``"identity"``, for the hidden layers.
        alpha: L2 penalty strength (sklearn's scaling), default 1e-4.
        max_iter: most Rprop iterations (full-batch gradients) per start,
            default 1000 (``trainrp``'s ``epochs``).
        tol, n_iter_no_change: stop when the training loss (or, with early
            stopping, the validation accuracy) has not improved by ``tol``
            for more than ``n_iter_no_change`` iterations, as sklearn's MLP.
        gtol: stop when the largest gradient component is ``<= gtol``
            (``neuralnet``'s ``threshold``, for the mean loss here).
        early_stopping, validation_fraction: hold out that fraction
            (stratified), stop on its accuracy and restore the weights (and
            the optimizer state) of the best validation iteration
            (``trainrp``'s ``max_fail``).
        random_state: seeds the initial weights (Glorot uniform, drawn as
            sklearn's MLP draws them) and the validation split.
        warm_start: continue from ``coefs_``/``intercepts_`` *and* Rprop's
            step sizes from the previous fit (``n_restarts`` is then unused).
            Weights set by hand (other than those the fit left) start with
            fresh step sizes, ``lr``.
        verbose: print the loss at every iteration.
        variant: ``"irprop+"`` (default), ``"irprop-"``, ``"rprop+"``,
            ``"rprop-"``.
        lr, etas, step_sizes: Rprop's initial step size, (eta_minus,
            eta_plus) and (step_min, step_max), as :class:`rprop.Rprop`.
            Training also stops when every step size of a weight whose
            gradient is not zero is at ``step_min``.
        n_restarts: train from this many initialisations and keep the one
            with the lowest final training loss (``neuralnet``'s ``rep``);
            ``restart_losses_`` holds all of them.
        device: torch device for the training, default ``"cpu"``.
        dtype: ``"float64"`` (default) or ``"float32"``.

    Attributes:
        classes_, coefs_, intercepts_, n_iter_, loss_, loss_curve_, best_loss_,
        n_features_in_, feature_names_in_, n_layers_, n_outputs_,
        out_activation_, validation_scores_, best_validation_score_: as
        sklearn's ``MLPClassifier``. ``loss_curve_[i]`` is the training loss
        after iteration ``i + 1``; ``loss_`` is the loss of the returned
        weights.
        restart_losses_: final training loss of each start; best_restart_:
        the index of the one kept.
        stop_rule_: ``"gtol"``, ``"step_floor"``, ``"tol"``,
        ``"early_stopping"`` or ``"max_iter"``.
        n_grad_evals_: full-batch gradient evaluations in the last fit, all
        starts together.

    Example:
        >>> from sklearn.datasets import load_iris
        >>> from rprop.sklearn import RpropClassifier
        >>> X, y = load_iris(return_X_y=True)
        >>> clf = RpropClassifier(hidden_layer_sizes=(10,), random_state=0).fit(X, y)
        >>> clf.score(X, y) > 0.95
        True
    """

    def _targets(self, X: Any, y: Any, reset: bool) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, multi_output=True, dtype=(np.float64, np.float32),
                             reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        if reset:
            binarizer = LabelBinarizer().fit(y)
            self._label_binarizer = binarizer
            self.classes_ = binarizer.classes_
        elif set(unique_labels(y)) != set(self.classes_):
            raise ValueError(
                "warm_start can only be used where y has the same classes as in the previous "
                f"call to fit: previously {self.classes_}, now {unique_labels(y)}")
        binarizer = self._label_binarizer
        self._output = "softmax" if binarizer.y_type_ == "multiclass" else "logistic"
        Y = np.asarray(binarizer.transform(y), dtype=np.float64)
        return X, Y

    def _data_loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self._output == "softmax":
            return -(y * F.log_softmax(out, dim=1)).sum() / out.shape[0]
        return F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[0]

    def _decode(self, out: np.ndarray) -> Any:
        return self._label_binarizer.inverse_transform(out)

    def _validation_score(self, out: np.ndarray, y: Any) -> float:
        return float(accuracy_score(y, self._decode(out)))

    def predict(self, X: Any) -> Any:
        """Class labels for ``X``."""
        out = self._predict_output(X)
        return self._decode(out.ravel() if self.n_outputs_ == 1 else out)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities for ``X``, columns in the order of ``classes_``."""
        out = self._predict_output(X)
        if self.n_outputs_ == 1:
            p = out.ravel()
            return np.column_stack([1.0 - p, p])
        return out

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """``log(predict_proba(X))``."""
        return np.log(self.predict_proba(X))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        assert tags.classifier_tags is not None
        tags.classifier_tags.multi_label = True
        return tags


class RpropRegressor(RegressorMixin, _BaseRprop):
    """A multilayer perceptron regressor trained full batch with Rprop.

    The loss is sklearn's MLP squared error, ``0.5 * mean((y - f(x))**2)``
    over samples and outputs, plus ``0.5 * alpha * ||W||^2 / n_samples`` over
    the weights (not the biases); the output layer is linear. With
    ``hidden_layer_sizes=()`` it fits a (ridge) linear regression.

    The parameters and attributes are those of :class:`RpropClassifier`
    (without ``classes_``); early stopping scores the validation set with R².

    Example:
        >>> from sklearn.datasets import load_diabetes
        >>> from sklearn.pipeline import make_pipeline
        >>> from sklearn.preprocessing import StandardScaler
        >>> from rprop.sklearn import RpropRegressor
        >>> X, y = load_diabetes(return_X_y=True)
        >>> reg = make_pipeline(StandardScaler(), RpropRegressor((), random_state=0))
        >>> reg.fit(X, y / y.std()).score(X, y / y.std()) > 0.5
        True
    """

    _output = "identity"

    def _targets(self, X: Any, y: Any, reset: bool) -> tuple[np.ndarray, np.ndarray]:
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True,
                             dtype=(np.float64, np.float32), reset=reset)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        Y = np.asarray(y, dtype=np.float64)
        return X, Y.reshape(-1, 1) if Y.ndim == 1 else Y

    def _data_loss(self, out: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((out - y) ** 2).mean()

    def _decode(self, out: np.ndarray) -> Any:
        return out

    def _validation_score(self, out: np.ndarray, y: Any) -> float:
        return float(r2_score(y, out))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets for ``X``: shape (n_samples,) for one output."""
        out = self._predict_output(X)
        return out.ravel() if out.shape[1] == 1 else out
