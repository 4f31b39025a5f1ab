"""Gaussian with a learned variance per pixel and a variance floor, x real.   docs/math.md §4.3

head = [m | s], (..., 2D): the means, then s with var = var_floor + e^s. With lf = log var_floor,
    log var = lf + softplus(s - lf)  (no overflow),   log p = -1/2 (log 2π + log var + (x - m)^2 / var),
    d log p/dm = (x - m)/var,   d log p/ds = 1/2 ((x - m)^2/var - 1) e^s/var,  e^s/var = sigmoid(s - lf).
"""
from __future__ import annotations

import math

import numpy as np

from ..layers import _sigmoid, softplus

NAME = "gaussian"
HEADS = 2
LOG_2PI = math.log(2.0 * math.pi)
DEFAULT_VAR_FLOOR = 1e-4  # var = var_floor + exp(s)   (§4.3)


def var(s, var_floor):
    """Effective variance of the gaussian likelihood: var = var_floor + exp(s).   §4.3"""
    return var_floor + np.exp(s)


def log_var(s, var_floor):
    """log var = log(var_floor + e^s) = log var_floor + softplus(s - log var_floor): no overflow.  §4.3"""
    lf = math.log(var_floor)
    return lf + softplus(s - lf)


def logprob_ms(x, m, s, var_floor):
    """log N(x; m, var), var = var_floor + exp(s), per pixel.   §4.3"""
    lv = log_var(s, var_floor)
    r = x - m
    return -0.5 * (LOG_2PI + lv + r * r * np.exp(-lv))


def grad_ms(x, m, s, var_floor):
    """dm = (x - m)/var;  ds = 1/2 ((x - m)^2/var - 1) exp(s)/var.   §4.3

    exp(s)/var = sigmoid(s - log var_floor), finite for any s.
    """
    lf = math.log(var_floor)
    inv_var = np.exp(-(lf + softplus(s - lf)))
    r = x - m
    dm = r * inv_var
    ds = 0.5 * (r * r * inv_var - 1.0) * _sigmoid(s - lf)
    return dm, ds


def logprob(x, head, var_floor=DEFAULT_VAR_FLOOR):
    """log N(x; m, var) per pixel from head = [m | s].   x: (..., D), head: (..., 2D) -> (..., D)."""
    D = x.shape[-1]
    return logprob_ms(x, head[..., :D], head[..., D:], var_floor)


def score(x, head, var_floor=DEFAULT_VAR_FLOOR):
    """[d/dm | d/ds] log p, (..., 2D)."""
    D = x.shape[-1]
    return np.concatenate(grad_ms(x, head[..., :D], head[..., D:], var_floor), axis=-1)


def mean(head):
    """E[x] = m."""
    return head[..., :head.shape[-1] // 2]


def sample(head, rng, var_floor=DEFAULT_VAR_FLOOR):
    """x = m + sqrt(var) eps, eps ~ N(0, 1)."""
    D = head.shape[-1] // 2
    m, s = head[..., :D], head[..., D:]
    return (m + np.sqrt(var(s, var_floor)) * rng.standard_normal(m.shape)).astype(head.dtype)


UNIT_INTERVAL = False
FLOPS_PER_PIXEL = 24     # log p + score, for `minivae bench`'s roofline (default 20)


def decoded(head, var_floor=DEFAULT_VAR_FLOOR):
    """(mean, logvar), each (m, D), where exp(logvar) = var_floor + exp(s): what VAE.decode returns."""
    D = head.shape[-1] // 2
    return head[..., :D], np.log(var(head[..., D:], var_floor))


def draw_x(rng, shape):
    """Real values, for gradient checks."""
    return rng.standard_normal(shape)


def output_bias(x, var_floor=DEFAULT_VAR_FLOOR):
    """Mean half b_d = m_d; log-variance half s_d = log(max(v_d - var_floor, tiny)), so that
    var_floor + exp(s_d) is the per-pixel variance v_d.   §8.4"""
    x = np.asarray(x, dtype=np.float64)
    tiny = np.finfo(np.float32).tiny
    return np.concatenate([x.mean(axis=0), np.log(np.maximum(x.var(axis=0) - var_floor, tiny))])


def scalar(ops):
    """The per-pixel (log p, d/dm, d/ds) on scalars, in plain arithmetic over ``ops`` (package doc):
    with t = s - lf and e = e^-|t|, softplus(t) = max(t, 0) + log1p(e), sigmoid(t) = e^s/var and
    sigmoid(-t) = var_floor/var all come from e; 1/var = sigmoid(-t)/var_floor needs no exp of its own
    (exp(-lf) does not depend on the pixel: the CPU loop hoists it), so the float32 CPU loop vectorizes."""
    exp_nonpos, exp, log1p01 = ops.exp_nonpos, ops.exp, ops.log1p01

    def logp_score(dt, x, m, s, lf, _sw):
        zero = dt(0)
        one = dt(1)
        half = dt(0.5)
        t = s - lf
        e = exp_nonpos(-abs(t))                                   # e^-|t|
        lv = lf + ((t if t > zero else zero) + log1p01(e))       # log var = lf + softplus(t)
        q = one / (one + e)
        sig = q if t >= zero else e * q                           # sigmoid(t) = e^s / var
        ivar = (e * q if t >= zero else q) * exp(-lf)             # sigmoid(-t) / var_floor = 1 / var
        r = x - m
        return (-half * (dt(LOG_2PI) + lv + r * r * ivar), r * ivar,
                half * (r * r * ivar - one) * sig)

    return logp_score


def test_inputs(dtype=np.float64):
    """x at 0, 1 and real values; s from far below log var_floor (var at the floor) to 30 (var ~ 1e13),
    means near and far from x: (x (4, D), head (4, 2D))."""
    s = np.array([-40.0, -12.0, -9.3, -9.2, -5.0, -1.0, 0.0, 0.5, 3.0, 12.0, 30.0])
    m = np.array([0.0, 0.5, 1.0, -1.0, 2.0, 0.0, 1e-3, -3.0, 10.0, 0.9, 1.1])
    x = np.array([[0.0], [1.0], [0.3], [-2.5]]) * np.ones_like(s)
    head = np.stack([np.concatenate([m, s]), np.concatenate([-m, s[::-1]]),
                     np.concatenate([m[::-1], 0.5 * s]), np.concatenate([x[3] + m, s])])
    return x.astype(dtype), head.astype(dtype)
