"""RpropClassifier / RpropRegressor against sklearn's MLP (lbfgs and adam).

The job of R's neuralnet or MATLAB's trainrp: a small MLP on a table, full
batch, in one call. Each model is a Pipeline(StandardScaler, model) with one
hidden layer of 32 relu units and alpha=1e-4, max_iter=1000, every other
argument at its default; Rprop also with early_stopping=True (10% held out of
the training split). For each seed: a stratified (classifiers) 75/25
split and the models' random_state are the seed. Reported per dataset and
model: median (min to max) test accuracy or R², fit time, and gradient
evaluations (full-batch ones for Rprop and L-BFGS; for Adam, epochs, each of
ceil(n_train / 200) mini-batch gradients).

Run: python examples/sklearn_mlp.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rprop.sklearn import RpropClassifier, RpropRegressor

DATASETS = {
    "digits": (load_digits, True),
    "breast_cancer": (load_breast_cancer, True),
    "diabetes": (load_diabetes, False),
}
COMMON = {"hidden_layer_sizes": (32,), "alpha": 1e-4, "max_iter": 1000}


class _Counting:
    """Counts sklearn's L-BFGS loss-and-gradient calls (it does not report them)."""

    def _loss_grad_lbfgs(self, *args, **kwargs):
        self.loss_grad_calls_ = getattr(self, "loss_grad_calls_", 0) + 1
        return super()._loss_grad_lbfgs(*args, **kwargs)


class CountingMLPClassifier(_Counting, MLPClassifier):
    pass


class CountingMLPRegressor(_Counting, MLPRegressor):
    pass


def _models(classifier: bool, seed: int) -> dict:
    if classifier:
        return {"rprop (irprop+)": RpropClassifier(random_state=seed, **COMMON),
                "rprop, early_stopping": RpropClassifier(random_state=seed, early_stopping=True,
                                                         **COMMON),
                "sklearn lbfgs": CountingMLPClassifier(solver="lbfgs", random_state=seed,
                                                       **COMMON),
                "sklearn adam": MLPClassifier(solver="adam", random_state=seed, **COMMON)}
    return {"rprop (irprop+)": RpropRegressor(random_state=seed, **COMMON),
            "rprop, early_stopping": RpropRegressor(random_state=seed, early_stopping=True,
                                                    **COMMON),
            "sklearn lbfgs": CountingMLPRegressor(solver="lbfgs", random_state=seed, **COMMON),
            "sklearn adam": MLPRegressor(solver="adam", random_state=seed, **COMMON)}


def _gradients(model, n_train: int) -> str:
    if isinstance(model, (RpropClassifier, RpropRegressor)):
        return str(model.n_grad_evals_)
    if isinstance(model, _Counting):
        return str(model.loss_grad_calls_)
    batches = math.ceil(n_train / min(200, n_train))
    return f"{model.n_iter_} ep x {batches}"


def run(seeds: int = 5, datasets: tuple[str, ...] = tuple(DATASETS)) -> list[dict]:
    """One row per (dataset, model, seed)."""
    rows = []
    for name in datasets:
        loader, classifier = DATASETS[name]
        X, y = loader(return_X_y=True)
        if not classifier:
            y = (y - y.mean()) / y.std()
        for seed in range(seeds):
            X_tr, X_te, y_tr, y_te = train_test_split(
                X, y, test_size=0.25, random_state=seed, stratify=y if classifier else None)
            for label, model in _models(classifier, seed).items():
                pipe = make_pipeline(StandardScaler(), model)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    pipe.fit(X_tr, y_tr)
                seconds = time.perf_counter() - start
                rows.append({"dataset": name, "model": label, "seed": seed,
                             "score": pipe.score(X_te, y_te), "seconds": seconds,
                             "gradients": _gradients(model, len(X_tr))})
    return rows


def _median_range(values: list[float], fmt: str) -> str:
    low, mid, high = (format(v, fmt) for v in (min(values), np.median(values), max(values)))
    return f"{mid} ({low} to {high})"


def summarise(rows: list[dict]) -> list[str]:
    """A Markdown table: medians (min to max) over the seeds."""
    lines = ["| dataset | model | test accuracy / R² | fit time (s) | gradient evaluations |",
             "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["dataset"], r["model"]) for r in rows)
    for dataset, model in keys:
        group = [r for r in rows if r["dataset"] == dataset and r["model"] == model]
        grads = [r["gradients"] for r in group]
        if all(g.isdigit() for g in grads):
            grad_text = _median_range([int(g) for g in grads], ".0f")
        else:
            epochs = [int(g.split()[0]) for g in grads]
            grad_text = f"{_median_range(epochs, '.0f')} epochs x {grads[0].split()[-1]} batches"
        lines.append(f"| {dataset} | {model} | {_median_range([r['score'] for r in group], '.3f')}"
                     f" | {_median_range([r['seconds'] for r in group], '.2f')} | {grad_text} |")
    return lines


def main(seeds: int = 5, datasets: tuple[str, ...] = tuple(DATASETS)) -> list[dict]:
    rows = run(seeds, datasets)
    print("\n".join(summarise(rows)))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    args = parser.parse_args()
    main(args.seeds, tuple(args.datasets))
