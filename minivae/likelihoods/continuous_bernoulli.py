"""The continuous Bernoulli on logits (Loaiza-Ganem & Cunningham, 2019), x in [0, 1].   docs/math.md §4.2

p(x | l) = C(l) e^(l x) / (1 + e^l), head = logits l, (..., D), with the normalizing constant
C(l) = l / tanh(l/2) (= 2 artanh(1-2λ)/(1-2λ), λ = sigmoid(l)):
    log p = x l - softplus(l) + log C(l),      d log p / dl = x - sigmoid(l) + d log C/dl  (= x - E[x]).
Near l = 0 the closed forms of log C and its derivative cancel; below |l| = TAYLOR_SWITCH (by dtype)
their Taylor series are used instead.
"""
from __future__ import annotations

import math

import numpy as np

from ..layers import _sigmoid, softplus

NAME = "continuous_bernoulli"
HEADS = 1
LOG_2 = math.log(2.0)

# |l| below this: Taylor series for log C and its derivative (§4.2). The series' first dropped term is
# ~l^8/1e5 (log C) and ~2e-4 l^7 (derivative): below machine precision at these switches, while the
# closed forms lose digits to cancellation (1/l - 1/sinh l) as |l| shrinks, most visibly in float32.
TAYLOR_SWITCH = {np.dtype(np.float64): 1e-2, np.dtype(np.float32): 0.3}


def switch(logits):
    """The Taylor switch for the dtype of ``logits`` (1e-2 for any dtype but float32)."""
    return TAYLOR_SWITCH.get(np.asarray(logits).dtype, 1e-2)


def log_norm(logits):
    """log C(l) of the continuous Bernoulli, C = l / tanh(l/2) (= 2 artanh(1-2λ)/(1-2λ)).   §4.2

    |l| >= switch:  log|l| - log(1 - e^-|l|) + log1p(e^-|l|)     (1 - e^-|l| as -expm1(-|l|))
    |l| <  switch:  log 2 + u^2/3 - 7u^4/90 + 62u^6/2835,  u = l/2
    The switch is 1e-2 in float64 and 0.3 in float32.
    """
    a = np.abs(logits)
    small = a < switch(logits)
    safe = np.where(small, 1.0, a)
    e = np.exp(-safe)
    far = np.log(safe) - np.log(-np.expm1(-safe)) + np.log1p(e)
    u2 = (0.5 * logits) ** 2
    near = LOG_2 + u2 * (1.0 / 3.0 + u2 * (-7.0 / 90.0 + u2 * (62.0 / 2835.0)))
    return np.where(small, near, far).astype(logits.dtype, copy=False)


def log_norm_grad(logits):
    """d log C / dl = 1/l - 1/sinh(l);  near 0: l/6 - 7 l^3/360 + 31 l^5/15120.   §4.2"""
    a = np.abs(logits)
    small = a < switch(logits)
    safe = np.where(small, 1.0, a)
    e = np.exp(-safe)
    # 1/sinh(|l|) = 2 e^-|l| / (1 - e^-2|l|), no overflow for large |l|
    far = np.sign(logits) * (1.0 / safe - 2.0 * e / (-np.expm1(-2.0 * safe)))
    l2 = logits * logits
    near = logits * (1.0 / 6.0 + l2 * (-7.0 / 360.0 + l2 * (31.0 / 15120.0)))
    return np.where(small, near, far).astype(logits.dtype, copy=False)


def logprob(x, logits, var_floor=None):
    """log CB(x; l) = x l - softplus(l) + log C(l), per pixel, x in [0, 1].   §4.2"""
    return x * logits - softplus(logits) + log_norm(logits)


def score(x, logits, var_floor=None):
    """d/dl log p = x - sigmoid(l) + d log C/dl  (= x - E[x]).   §4.2"""
    return x - _sigmoid(logits) + log_norm_grad(logits)


def mean(logits):
    """E[x] = sigmoid(l) - d log C/dl = 1/(1 - e^-l) - 1/l;  1/2 at l = 0.   §4.2"""
    return _sigmoid(logits) - log_norm_grad(logits)


def inverse_cdf(logits, u):
    """Inverse CDF: x = log1p(u expm1(l)) / l, written without overflow for large l.   §4.2"""
    a = np.abs(logits)
    small = a < 1e-6
    safe = np.where(small, 1.0, logits)
    pos = 1.0 + np.log(u + (1.0 - u) * np.exp(-np.maximum(safe, 0))) / safe   # l > 0 branch
    neg = np.log1p(u * np.expm1(np.minimum(safe, 0))) / safe                 # l < 0 branch
    x = np.where(safe > 0, pos, neg)
    return np.clip(np.where(small, u, x), 0.0, 1.0)


def sample(logits, rng, var_floor=None):
    """x ~ CB(l) by the inverse CDF of uniform draws."""
    return inverse_cdf(logits, rng.random(logits.shape)).astype(logits.dtype)


UNIT_INTERVAL = True
FLOPS_PER_PIXEL = 30     # log p + score, for `minivae bench`'s roofline (default 20)


def draw_x(rng, shape):
    """Grey levels in (0.02, 0.98), for gradient checks."""
    return rng.uniform(0.02, 0.98, size=shape)


def logit_of_mean(m, iters=80):
    """The logits l with mean(l) = m, elementwise, for m in (0, 1) (the mean increases with l):
    bisection on [-1000, 1000] (2000 / 2^80 is far below float64's resolution)."""
    m = np.asarray(m, dtype=np.float64)
    lo = np.full_like(m, -1e3)
    hi = np.full_like(m, 1e3)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = mean(mid) > m
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return 0.5 * (lo + hi)


def output_bias(x, var_floor=None):
    """The logit whose mean 1/(1 - e^-l) - 1/l is the per-pixel mean m_d (clipped as the Bernoulli's).
    §8.4"""
    from .bernoulli import MEAN_CLIP
    m = np.clip(np.asarray(x, dtype=np.float64).mean(axis=0), MEAN_CLIP, 1 - MEAN_CLIP)
    return logit_of_mean(m)


def closed_form(ops):
    """(log C - log1p(e), |d log C/dl|) for a = |l| at or above the switch, given e = e^-a:
    log(a / (1 - e)) and 1/a - 2e/((1 - e)(1 + e)) (= 1/a - 1/sinh a). With the CPU's float32 ops
    one vectorizable log instead of libm's log, log and expm1 (1 - e loses nothing for a >= 0.125)."""
    log_pos, one_minus_e = ops.log_pos, ops.one_minus_e

    def far(dt, a, e):
        one = dt(1)
        om = one_minus_e(a, e)                                   # 1 - e^-a
        return log_pos(a / om), one / a - dt(2) * e / (om * (one + e))

    return far


def scalar(ops):
    """The per-pixel (log p, d log p/dl, 0) on scalars, in plain arithmetic over ``ops`` (package
    doc). Both branches of log C (Taylor series below ``sw``, the closed form at max(|l|, sw), so that
    the discarded one stays finite), then a select: the CPU's float32 pixel loop vectorizes."""
    exp_nonpos, log1p01 = ops.exp_nonpos, ops.log1p01
    far_branch = ops.compile(closed_form(ops))

    def logp_score(dt, x, l, _h1, _lf, sw):
        zero = dt(0)
        one = dt(1)
        half = dt(0.5)
        a = abs(l)
        e = exp_nonpos(-a)                                        # e^-|l|
        l1p = log1p01(e)
        sp = (l if l > zero else zero) + l1p                      # softplus(l)
        u = half * l
        u2 = u * u
        l2 = l * l
        far, dfar = far_branch(dt, a if a > sw else sw, e)
        near = a < sw
        logc = (dt(LOG_2) + u2 * (dt(1.0 / 3.0) + u2 * (dt(-7.0 / 90.0) + u2 * dt(62.0 / 2835.0)))
                if near else far + l1p)
        dfar = dfar if l >= zero else -dfar
        dlogc = l * (dt(1.0 / 6.0) + l2 * (dt(-7.0 / 360.0) + l2 * dt(31.0 / 15120.0))) if near else dfar
        sig = one / (one + e) if l >= zero else e / (one + e)    # sigmoid(l) from e
        return x * l - sp + logc, x - sig + dlogc, zero

    return logp_score


def test_inputs(dtype=np.float64):
    """Logits on both sides of the float64 and float32 Taylor switches (1e-2, 0.3), at 0, and small,
    moderate, large (|l| up to 100), both signs, against x at 0, 1 and grey levels: (x (4, D), head (4, D))."""
    sw = [s * f for s in (1e-2, 0.3) for f in (1 - 1e-3, 1 + 1e-3)]
    l = np.array([0.0, 1e-3, 5e-3, 0.1, 0.5, 1.0, 4.0, 20.0, 100.0] + sw)
    l = np.concatenate([l, -l[1:]])
    x = np.array([[0.0], [1.0], [0.5], [0.9]]) * np.ones_like(l)
    head = np.stack([l, -l, l[::-1], 0.5 * l])
    return x.astype(dtype), head.astype(dtype)
