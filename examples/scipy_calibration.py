"""Calibrate a model to noisy data with bounds: rprop.minimize, SciPy-style.

The model is a two-compartment-like decay y(t) = a·exp(-k·t) + c, with
physically meaningful bounds (amplitude and offset non-negative, rate in
[0.01, 5]). The data have a small negative offset, so the best offset
within the bounds is c = 0: the fit ends on that bound, and every iterate
stays inside the box (a callback checks it).

The same fit three ways: rprop.minimize with an analytic gradient, the same
through scipy.optimize.minimize(method=rprop.minimize), and rprop.minimize
with a finite-difference gradient (n extra evaluations per step); then
SciPy's L-BFGS-B for comparison.

Run: python examples/scipy_calibration.py
"""

from __future__ import annotations

import numpy as np
import scipy.optimize

import rprop

BOUNDS = [(0.0, 10.0), (0.01, 5.0), (0.0, 1.0)]  # a, k, c


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 5.0, 60)
    y = 2.5 * np.exp(-1.3 * t) + 0.05 * rng.standard_normal(t.size) - 0.04
    return t, y


def sse(theta: np.ndarray, t: np.ndarray, y: np.ndarray) -> float:
    a, k, c = theta
    r = a * np.exp(-k * t) + c - y
    return float(r @ r)


def sse_grad(theta: np.ndarray, t: np.ndarray, y: np.ndarray) -> np.ndarray:
    a, k, c = theta
    e = np.exp(-k * t)
    r = a * e + c - y
    return 2.0 * np.array([r @ e, r @ (-a * t * e), r.sum()])


def main() -> dict[str, scipy.optimize.OptimizeResult]:
    t, y = make_data()
    x0 = np.array([1.0, 0.5, 0.5])
    inside: list[bool] = []

    def watch(intermediate_result: scipy.optimize.OptimizeResult) -> None:
        lo, hi = np.array(BOUNDS).T
        inside.append(bool(np.all((lo <= intermediate_result.x) & (intermediate_result.x <= hi))))

    results = {
        "rprop.minimize": rprop.minimize(
            sse, x0, args=(t, y), jac=sse_grad, bounds=BOUNDS, callback=watch
        ),
        "scipy + method=rprop": scipy.optimize.minimize(
            sse, x0, args=(t, y), jac=sse_grad, method=rprop.minimize,
            bounds=scipy.optimize.Bounds(*np.array(BOUNDS).T), options={"maxiter": 2000},
        ),
        "rprop, 2-point jac": rprop.minimize(sse, x0, args=(t, y), jac="2-point", bounds=BOUNDS),
        "L-BFGS-B": scipy.optimize.minimize(
            sse, x0, args=(t, y), jac=sse_grad, method="L-BFGS-B", bounds=BOUNDS
        ),
    }
    print(f"{'method':22s} {'a':>7s} {'k':>7s} {'c':>7s} {'SSE':>9s} {'nit':>5s} {'nfev':>5s}"
          "  stop")
    for name, res in results.items():
        a, k, c = res.x
        stop = res.get("stop_rule", "")
        print(f"{name:22s} {a:7.4f} {k:7.4f} {c:7.4f} {res.fun:9.5f} {res.nit:5d} {res.nfev:5d}"
              f"  {stop}")
    print(f"every rprop iterate inside the bounds: {all(inside)} ({len(inside)} iterates)")
    return results


if __name__ == "__main__":
    main()
