"""A slow, per-element transcription of the Rprop papers: the test oracle.

Riedmiller & Braun 1993 (Rprop+), Igel & Hüsken 2000/2003 (Rprop-, iRprop+,
iRprop-), written element by element with NumPy scalars, so that float32
arithmetic rounds as float32 and float64 as float64. Nothing here comes from
the package under test. Per element, with p = g_prev * g:

    p > 0:  Δ = min(Δ·η+, Δmax);  Δw = -sign(g)·Δ;  w += Δw
    p < 0:  Δ = max(Δ·η-, Δmin);  then by variant
              Rprop+ : w -= Δw_prev;  g = 0
              Rprop- : Δw = -sign(g)·Δ;  w += Δw
              iRprop-: g = 0
              iRprop+: if E(t) > E(t-1): w -= Δw_prev;  then g = 0
    p = 0:  Δ = clamp(Δ, Δmin, Δmax);  Δw = -sign(g)·Δ;  w += Δw
    g_prev = g;  Δw_prev = Δw (0 where g was zeroed)

With ``maximize`` the gradient (and, for iRprop+, the loss) is negated first;
``weight_decay`` adds ``weight_decay · w`` to the gradient after that.
Complex parameters are treated as pairs of independent reals (as torch does).
"""

from __future__ import annotations

import math

import numpy as np

VARIANT_NAMES = ("rprop+", "rprop-", "irprop+", "irprop-")


def _sign(x):
    return 1 if x > 0 else (-1 if x < 0 else 0)


class ReferenceRprop:
    """Reference optimizer over a list of NumPy arrays (real or complex)."""

    def __init__(self, params, *, lr=0.01, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0),
                 variant="irprop-", maximize=False, weight_decay=0.0):
        assert variant in VARIANT_NAMES
        self.params = [np.array(p, copy=True) for p in params]
        self.lr, (self.eta_minus, self.eta_plus) = lr, etas
        self.step_min, self.step_max = step_sizes
        self.variant, self.maximize, self.weight_decay = variant, maximize, weight_decay
        self.step_size = [self._reals(np.full_like(p, 0)) for p in self.params]
        for s in self.step_size:
            s[...] = lr
        self.prev = [self._reals(np.zeros_like(p)) for p in self.params]
        self.prev_update = [self._reals(np.zeros_like(p)) for p in self.params]
        self.prev_loss = math.inf

    @staticmethod
    def _reals(a):
        """A real array: complex arrays become (..., 2) float arrays."""
        if np.iscomplexobj(a):
            return np.stack([a.real, a.imag], axis=-1).copy()
        return a

    def step(self, grads, loss=None):
        if self.variant == "irprop+":
            assert loss is not None
            loss = -loss if self.maximize else loss
            worse = loss > self.prev_loss
        for i, p in enumerate(self.params):
            w = self._reals(p).reshape(-1).copy()
            g_all = self._reals(np.asarray(grads[i])).reshape(-1)
            delta = self.step_size[i].reshape(-1)
            g_prev = self.prev[i].reshape(-1)
            dw_prev = self.prev_update[i].reshape(-1)
            t = w.dtype.type
            for k in range(w.size):
                g = t(g_all[k])
                if self.maximize:
                    g = -g
                if self.weight_decay:
                    g = g + t(self.weight_decay) * w[k]
                p_ = g_prev[k] * g
                if p_ > 0:
                    delta[k] = min(delta[k] * t(self.eta_plus), t(self.step_max))
                    dw = -_sign(g) * delta[k]
                    w[k] = w[k] + dw
                elif p_ < 0:
                    delta[k] = max(delta[k] * t(self.eta_minus), t(self.step_min))
                    if self.variant == "rprop+":
                        w[k] = w[k] - dw_prev[k]
                        g, dw = t(0), t(0)
                    elif self.variant == "rprop-":
                        dw = -_sign(g) * delta[k]
                        w[k] = w[k] + dw
                    elif self.variant == "irprop-":
                        g, dw = t(0), t(0)
                    else:  # irprop+
                        if worse:
                            w[k] = w[k] - dw_prev[k]
                        g, dw = t(0), t(0)
                else:
                    delta[k] = min(max(delta[k], t(self.step_min)), t(self.step_max))
                    dw = -_sign(g) * delta[k]
                    w[k] = w[k] + dw
                g_prev[k] = g
                dw_prev[k] = dw
            if np.iscomplexobj(p):
                pairs = w.reshape(*p.shape, 2)
                self.params[i] = (pairs[..., 0] + 1j * pairs[..., 1]).astype(p.dtype)
            else:
                self.params[i] = w.reshape(p.shape)
        if self.variant == "irprop+":
            self.prev_loss = loss
        return self.params


# -- GRprop, as R's neuralnet has it ----------------------------------------


def _r_sum(values, t):
    """R's ``sum()`` of doubles (src/main/summary.c, rsum): a long double
    accumulator, left to right, rounded once to the result type (±inf past
    the largest double)."""
    s = np.longdouble(0)
    for v in values:
        s += np.longdouble(v)
    return t(s)


def _which_min(values):
    """R's ``which.min``: the index of the first minimum, NaN ignored;
    None (R's ``integer(0)``) when there is no non-NaN value."""
    best = None
    for k, v in enumerate(values):
        if math.isnan(v):
            continue
        if best is None or v < values[best]:
            best = k
    return best


class ReferenceGRprop:
    """neuralnet's ``minus()`` (bips-hb/neuralnet, R/fit_neuralnet.R) for
    ``algorithm="sag"`` / ``"slr"``, element by element, over the parameters
    taken as one vector: each array in C order, one after the other (the
    order the library documents; neuralnet's own vector is its weight
    matrices unlisted column by column).

    Defaults are neuralnet's: ``learningrate`` starts at 0.1 (``rprop()``:
    ``learningrate <- as.vector(matrix(0.1, ...))``), ``gradients.old`` at
    0, ``learningrate.limit = list(min = 1e-10, max = 0.1)``,
    ``learningrate.factor = list(minus = 0.5, plus = 1.2)``, ``delta <-
    10^-6``. neuralnet leaves a step size whose ``g_old * g`` is 0 as it is
    (no clamp); ``clamp_unchanged=True`` clamps it as torch does (equal when
    the initial step lies within the bounds).
    """

    def __init__(self, params, *, adjust, lr=0.1, etas=(0.5, 1.2), step_sizes=(1e-10, 0.1),
                 delta=1e-6, maximize=False, weight_decay=0.0, clamp_unchanged=False,
                 exact_sum=False):
        assert adjust in ("sag", "slr")
        # exact_sum: the correctly rounded sum (math.fsum) in place of R's
        # long-double one; the library's sum is within an ulp of both.
        self.exact_sum = exact_sum
        self.params = [np.array(p, copy=True) for p in params]
        self.adjust, self.delta = adjust, delta
        self.eta_minus, self.eta_plus = etas
        self.step_min, self.step_max = step_sizes
        self.maximize, self.weight_decay = maximize, weight_decay
        self.clamp_unchanged = clamp_unchanged
        self.step_size = [np.full(p.shape, lr, dtype=p.dtype) for p in self.params]
        self.prev = [np.zeros_like(p) for p in self.params]
        self.chosen = None  # the position adjusted in the last step (a diagnostic)

    def step(self, grads):
        t = self.params[0].dtype.type
        sizes = [p.size for p in self.params]
        w = np.concatenate([p.reshape(-1) for p in self.params])
        g_raw = np.concatenate([np.asarray(g, dtype=p.dtype).reshape(-1)
                                for g, p in zip(grads, self.params)])
        lr = np.concatenate([s.reshape(-1) for s in self.step_size])
        g_old = np.concatenate([s.reshape(-1) for s in self.prev])
        gradients = np.empty_like(g_raw)
        for k in range(w.size):
            g = t(g_raw[k])
            if self.maximize:
                g = -g
            if self.weight_decay:
                g = g + t(self.weight_decay) * w[k]
            gradients[k] = g
        # temp <- gradients.old * gradients; positive / negative
        for k in range(w.size):
            temp = g_old[k] * gradients[k]
            if temp > 0:    # pmin.int(learningrate * factor$plus, limit$max)
                lr[k] = min(lr[k] * t(self.eta_plus), t(self.step_max))
            elif temp < 0:  # pmax.int(learningrate * factor$minus, limit$min)
                lr[k] = max(lr[k] * t(self.eta_minus), t(self.step_min))
            elif self.clamp_unchanged:
                lr[k] = min(max(lr[k], t(self.step_min)), t(self.step_max))
        # notzero <- gradients != 0; gradients.notzero <- gradients[notzero]
        notzero = [k for k in range(w.size) if gradients[k] != 0]
        if self.adjust == "slr":  # min <- which.min(learningrate[notzero])
            m = _which_min([float(lr[k]) for k in notzero])
        else:                     # min <- which.min(abs(gradients.notzero))
            m = _which_min([abs(float(gradients[k])) for k in notzero])
        self.chosen = None
        if m is not None:         # if (length(min) != 0)
            # temp <- learningrate[notzero] * gradients.notzero
            temp = [lr[k] * gradients[k] for k in notzero]
            # sum <- sum(temp[-min]) + delta
            rest = [v for j, v in enumerate(temp) if j != m]
            total = (t(math.fsum(rest)) if self.exact_sum else _r_sum(rest, t)) + t(self.delta)
            i = notzero[m]
            value = -total / gradients[i]
            # min(max(-sum / gradients.notzero[min], limit$min), limit$max)
            value = value if math.isnan(value) else max(value, t(self.step_min))
            value = value if math.isnan(value) else min(value, t(self.step_max))
            lr[i] = value
            self.chosen = i
        for k in range(w.size):  # weights - sign(gradients) * learningrate
            w[k] = w[k] - t(_sign(gradients[k])) * lr[k]
        # gradients.old <- gradients (the raw gradient, also after a sign change)
        start = 0
        for n, i in zip(sizes, range(len(self.params))):
            shape = self.params[i].shape
            self.params[i] = w[start:start + n].reshape(shape).copy()
            self.step_size[i] = lr[start:start + n].reshape(shape).copy()
            self.prev[i] = gradients[start:start + n].reshape(shape).copy()
            start += n
        return self.params
