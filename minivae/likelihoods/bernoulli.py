"""Bernoulli on logits: p(x | l) = sigmoid(l)^x (1 - sigmoid(l))^(1 - x), x in [0, 1].   docs/math.md §4.1

head = logits l, (..., D). log p = -(max(l, 0) - l x + log1p(e^-|l|)) (BCE with logits, no overflow
for either sign); d log p / dl = x - sigmoid(l).
"""
from __future__ import annotations

import numpy as np

from ..layers import _sigmoid

NAME = "bernoulli"
HEADS = 1
UNIT_INTERVAL = True
FLOPS_PER_PIXEL = 12     # log p + score, for `minivae bench`'s roofline (default 20)
MEAN_CLIP = 1e-3        # output_bias: a pixel that is always 0 would otherwise ask for an infinite logit


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


def draw_x(rng, shape):
    """Binary pixels, for gradient checks."""
    return (rng.random(shape) < 0.5).astype(np.float64)


def output_bias(x, var_floor=None):
    """b_d = log(m_d / (1 - m_d)), the log-odds of the per-pixel mean, m_d clipped to [MEAN_CLIP,
    1 - MEAN_CLIP].   §8.4"""
    m = np.clip(np.asarray(x, dtype=np.float64).mean(axis=0), MEAN_CLIP, 1 - MEAN_CLIP)
    return np.log(m) - np.log1p(-m)


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
        inv = one / (one + e)
        sig = inv if l >= zero else e * inv                       # sigmoid(l) from e, one division
        return lp, x - sig, zero

    return logp_score


def test_inputs(dtype=np.float64):
    """x at 0, 1 and grey levels against logits at 0, small, moderate and saturated (|l| up to 100,
    where e^-|l| underflows in float32), both signs: (x (4, D), head (4, D))."""
    l = np.array([0.0, 1e-3, -1e-3, 0.5, -2.0, 17.0, -17.0, 40.0, -40.0, 100.0, -100.0])
    x = np.array([[0.0], [1.0], [0.5], [0.25]]) * np.ones_like(l)
    head = np.stack([l, -l, l[::-1], 0.5 * l])
    return x.astype(dtype), head.astype(dtype)
