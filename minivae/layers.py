"""Linear layers and activations as paired ``*_forward`` / ``*_backward`` functions (docs/math.md §2).

Shape legend: N batch rows (N = L*n in the decoder), I fan-in, O fan-out.
``x_forward(...) -> (out, cache)`` and ``x_backward(dout, cache) -> grads``; ``d<name>`` is dL/d<name>.
"""
from __future__ import annotations

import numpy as np

LEAKY_SLOPE = 0.01  # slope of leaky_relu for a < 0 (PyTorch's default)
ACTIVATIONS = ("relu", "tanh", "softplus", "leaky_relu")


def linear_forward(x, W, b):
    """a = x W + b.   x: (N, I)  W: (I, O)  b: (O,)  ->  a: (N, O).   §2.1"""
    a = x @ W + b
    return a, (x, W)


def linear_backward(da, cache):
    """dx = da W^T,  dW = x^T da,  db = sum_rows da.   §2.1"""
    x, W = cache
    dx = da @ W.T          # (N, I)
    dW = x.T @ da          # (I, O)
    db = da.sum(axis=0)    # (O,)
    return dx, dW, db


def _sigmoid(a):
    # exp of a non-positive number only, so no overflow for either sign
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(a.dtype, copy=False)


def softplus(a):
    """log(1 + e^a), stable for any a: max(a, 0) + log1p(e^-|a|)."""
    return np.maximum(a, 0) + np.log1p(np.exp(-np.abs(a)))


def activation_forward(a, kind):
    """h = f(a), elementwise.   a: (N, O) -> h: (N, O).   §2.2"""
    if kind == "relu":
        h = np.maximum(a, 0)
    elif kind == "tanh":
        h = np.tanh(a)
    elif kind == "softplus":
        h = softplus(a)
    elif kind == "leaky_relu":
        h = np.where(a > 0, a, a * a.dtype.type(LEAKY_SLOPE))
    else:
        raise ValueError(f"unknown activation {kind!r}; expected one of {', '.join(ACTIVATIONS)}")
    return h, (a, h, kind)


def activation_backward(dh, cache):
    """da = dh * f'(a).   relu: 1[a>0];  tanh: 1 - h^2;  softplus: sigmoid(a);  leaky: 1 or slope.  §2.2"""
    a, h, kind = cache
    if kind == "relu":
        return dh * (a > 0)
    if kind == "tanh":
        return dh * (1 - h * h)
    if kind == "softplus":
        return dh * _sigmoid(a)
    if kind == "leaky_relu":
        return dh * np.where(a > 0, 1, LEAKY_SLOPE).astype(dh.dtype)
    raise ValueError(f"unknown activation {kind!r}")


def mlp_forward(x, layers, activation):
    """Hidden layers: h_{l+1} = f(h_l W_l + b_l). ``layers``: [(W, b), ...]; may be empty.   §2.3"""
    caches = []
    h = x
    for W, b in layers:
        a, lc = linear_forward(h, W, b)
        h, ac = activation_forward(a, activation)
        caches.append((lc, ac))
    return h, caches


def mlp_backward(dh, caches):
    """Back through the hidden layers; returns dx and [(dW, db), ...] in layer order.   §2.3"""
    grads = []
    for lc, ac in reversed(caches):
        da = activation_backward(dh, ac)
        dh, dW, db = linear_backward(da, lc)
        grads.append((dW, db))
    return dh, grads[::-1]
