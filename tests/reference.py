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
