"""Bernoulli on logits: p(x | l) = sigmoid(l)^x (1 - sigmoid(l))^(1 - x), x in [0, 1].   docs/math.md §4.1

head = logits l, (..., D). log p = -(max(l, 0) - l x + log1p(e^-|l|)) (BCE with logits, no overflow
for either sign); d log p / dl = x - sigmoid(l).
"""
from __future__ import annotations

import numpy as np

from ..layers import _sigmoid

NAME = "bernoulli"
HEADS = 1


def logprob(x, logits, var_floor=None):
    """log Bern(x; sigmoid(l)) = -(max(l,0) - l x + log1p(exp(-|l|))), per pixel.   §4.1"""
    return -(np.maximum(logits, 0) - logits * x + np.log1p(np.exp(-np.abs(logits))))


def score(x, logits, var_floor=None):
    """d/dl log p = x - sigmoid(l).   §4.1"""
    return x - _sigmoid(logits)


def mean(logits):
    """E[x] = sigmoid(l)."""
    return _sigmoid(logits)


def sample(logits, rng, var_floor=None):
    """x ~ Bern(sigmoid(l)), 0 or 1 in the head's dtype."""
    return (rng.random(logits.shape) < _sigmoid(logits)).astype(logits.dtype)


def scalar(ops):
    """The per-pixel (log p, d log p/dl, 0) on scalars, in plain arithmetic over ``ops`` (package doc).
    e = e^-|l| is shared by log1p(e) and the sigmoid; selects, no branches, so the CPU's float32 pixel
    loop vectorizes."""
    exp_nonpos, log1p01 = ops.exp_nonpos, ops.log1p01

    def logp_score(dt, x, l, _h1, _lf, _sw):
        zero = dt(0)
        one = dt(1)
        e = exp_nonpos(-abs(l))                                   # e^-|l|
        pos = l if l > zero else zero                             # max(l, 0)
        lp = -(pos - l * x + log1p01(e))
        sig = one / (one + e) if l >= zero else e / (one + e)     # sigmoid(l) from e
        return lp, x - sig, zero

    return logp_score


def test_inputs(dtype=np.float64):
    """x at 0, 1 and grey levels against logits at 0, small, moderate and saturated (|l| up to 100,
    where e^-|l| underflows in float32), both signs: (x (4, D), head (4, D))."""
    l = np.array([0.0, 1e-3, -1e-3, 0.5, -2.0, 17.0, -17.0, 40.0, -40.0, 100.0, -100.0])
    x = np.array([[0.0], [1.0], [0.5], [0.25]]) * np.ones_like(l)
    head = np.stack([l, -l, l[::-1], 0.5 * l])
    return x.astype(dtype), head.astype(dtype)
