"""The Gaussian posterior and the pixel likelihoods, each with a hand-derived gradient (docs/math.md §3-§4).

Shape legend: L samples per example, n examples, Z latent dims, D pixels.
    mu, logvar : (n, Z)        eps, z : (L, n, Z)
    x          : (n, D)        head   : (L, n, D) or (L, n, 2D) for "gaussian"
"""
from __future__ import annotations

import math

import numpy as np

from .layers import _sigmoid, softplus

LOG_2PI = math.log(2.0 * math.pi)
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")
DEFAULT_VAR_FLOOR = 1e-4  # gaussian likelihood: var = var_floor + exp(s)   (§4.3)


# ----------------------------------------------------------------------------------------------
# q(z|x) = N(mu, diag(exp(logvar)))                                                      §3
# ----------------------------------------------------------------------------------------------

def reparam_forward(mu, logvar, eps):
    """z = mu + exp(logvar/2) * eps.   mu, logvar: (n, Z); eps: (L, n, Z) -> z: (L, n, Z).   §3.1"""
    std = np.exp(0.5 * logvar)      # (n, Z): the standard deviation, sqrt of the variance exp(logvar)
    z = mu + std * eps              # broadcasts over L
    return z, (std, eps)


def reparam_backward(dz, cache):
    """dmu = sum_L dz;  dlogvar = sum_L dz * eps * std / 2.   §3.1

    When mu, logvar carry the sample axis themselves, (L, n, Z) as for z_l given z_{l-1} in a stack
    of stochastic layers (§11), nothing is summed: dmu = dz, dlogvar = dz * eps * std / 2.
    """
    std, eps = cache
    if std.ndim == dz.ndim:
        return dz, 0.5 * std * (dz * eps)
    dmu = dz.sum(axis=0)
    dlogvar = 0.5 * std * (dz * eps).sum(axis=0)
    return dmu, dlogvar


def kl_forward(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) per example and dim: -1/2 (1 + logvar - mu^2 - exp(logvar)).

    Returns (n, Z); sum over the last axis for the per-example KL.   §3.2
    Written as 1/2 (mu^2 + (expm1(logvar) - logvar)): expm1(v) >= v holds after rounding, so the KL
    is never negative, where 1 + logvar - exp(logvar) cancels to a rounding error of either sign.
    """
    return 0.5 * (mu * mu + (np.expm1(logvar) - logvar))


def kl_backward(dkl, mu, logvar):
    """dmu = dkl * mu;  dlogvar = dkl * (exp(logvar) - 1) / 2.   dkl: (n, Z) or broadcastable.  §3.2"""
    return dkl * mu, dkl * 0.5 * np.expm1(logvar)


def log_prior(z):
    """log N(z; 0, I) summed over Z.   z: (..., Z) -> (...).   §3.3"""
    return -0.5 * (z * z + LOG_2PI).sum(axis=-1)


def log_posterior_eps(logvar, eps):
    """log q(z|x) at z = mu + std*eps, written in eps: -1/2 sum(eps^2 + log 2pi + logvar).   §3.3

    logvar: (n, Z), eps: (L, n, Z) -> (L, n). Its gradient with eps held fixed is d/dlogvar = -1/2.
    """
    return -0.5 * ((eps * eps).sum(axis=-1) + (LOG_2PI + logvar).sum(axis=-1))


def log_prior_backward(dlogp, z):
    """dz = dlogp * (-z).   dlogp: (...), z: (..., Z) -> (..., Z).   §3.3"""
    return dlogp[..., None] * (-z)


def log_posterior_eps_backward(dlogq, logvar):
    """dlogvar = -1/2 dlogq, summed over the sample axis when logvar has none.   §3.3

    dlogq: (L, n); logvar: (n, Z) or (L, n, Z) -> like logvar. eps is held fixed.
    """
    g = -0.5 * dlogq[..., None]                         # (L, n, 1)
    if logvar.ndim < g.ndim:
        g = g.sum(axis=0)                                # (n, 1)
    return np.broadcast_to(g, logvar.shape).astype(logvar.dtype)


# ----------------------------------------------------------------------------------------------
# log N(z; mu, diag(exp(logvar))) as a function of all three: the conditionals p(z_l | z_{l+1})
# of a stack, and log q(z_l | z_{l-1}) with its parameters stopped under DReG            §11.1
# ----------------------------------------------------------------------------------------------

def gauss_logpdf(z, mu, logvar):
    """log N(z; mu, exp(logvar)) summed over Z:  -1/2 sum((z - mu)^2 e^-logvar + logvar + log 2pi).

    z, mu, logvar: broadcastable to (..., Z) -> (...).   §11.1
    """
    r = z - mu
    return -0.5 * (r * r * np.exp(-logvar) + logvar + LOG_2PI).sum(axis=-1)


def gauss_logpdf_backward(dlogp, z, mu, logvar):
    """With u = (z - mu) e^-logvar:  dz = -dlogp u,  dmu = dlogp u,  dlogvar = dlogp ((z - mu) u - 1) / 2.

    dlogp: (...); z, mu, logvar: (..., Z) (the same shape) -> dz, dmu, dlogvar (..., Z).   §11.1
    """
    g = dlogp[..., None]
    r = z - mu
    u = r * np.exp(-logvar)
    return -g * u, g * u, 0.5 * g * (r * u - 1.0)


# ----------------------------------------------------------------------------------------------
# p(x|z): log-probability per example (summed over pixels) and its gradient w.r.t. the head  §4
# ----------------------------------------------------------------------------------------------

def head_width(likelihood: str, x_dim: int) -> int:
    check_likelihood(likelihood)
    return 2 * x_dim if likelihood == "gaussian" else x_dim


def check_likelihood(likelihood: str):
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {likelihood!r}; expected one of {', '.join(LIKELIHOODS)}")


def bernoulli_logprob(x, logits):
    """log Bern(x; sigmoid(l)) = -(max(l,0) - l x + log1p(exp(-|l|))), per pixel.   §4.1"""
    return -(np.maximum(logits, 0) - logits * x + np.log1p(np.exp(-np.abs(logits))))


def bernoulli_grad(x, logits):
    """d/dl log p = x - sigmoid(l).   §4.1"""
    return x - _sigmoid(logits)


# |l| below this: Taylor series for log C and its derivative (§4.2). The series' first dropped term is
# ~l^8/1e5 (log C) and ~2e-4 l^7 (derivative): below machine precision at these switches, while the
# closed forms lose digits to cancellation (1/l - 1/sinh l) as |l| shrinks, most visibly in float32.
_CB_TAYLOR = {np.dtype(np.float64): 1e-2, np.dtype(np.float32): 0.3}


def _cb_switch(logits):
    return _CB_TAYLOR.get(np.asarray(logits).dtype, 1e-2)


def cb_log_norm(logits):
    """log C(l) of the continuous Bernoulli, C = l / tanh(l/2) (= 2 artanh(1-2λ)/(1-2λ)).   §4.2

    |l| >= switch:  log|l| - log(1 - e^-|l|) + log1p(e^-|l|)     (1 - e^-|l| as -expm1(-|l|))
    |l| <  switch:  log 2 + u^2/3 - 7u^4/90 + 62u^6/2835,  u = l/2
    The switch is 1e-2 in float64 and 0.3 in float32.
    """
    a = np.abs(logits)
    small = a < _cb_switch(logits)
    safe = np.where(small, 1.0, a)
    e = np.exp(-safe)
    far = np.log(safe) - np.log(-np.expm1(-safe)) + np.log1p(e)
    u2 = (0.5 * logits) ** 2
    near = math.log(2.0) + u2 * (1.0 / 3.0 + u2 * (-7.0 / 90.0 + u2 * (62.0 / 2835.0)))
    return np.where(small, near, far).astype(logits.dtype, copy=False)


def cb_log_norm_grad(logits):
    """d log C / dl = 1/l - 1/sinh(l);  near 0: l/6 - 7 l^3/360 + 31 l^5/15120.   §4.2"""
    a = np.abs(logits)
    small = a < _cb_switch(logits)
    safe = np.where(small, 1.0, a)
    e = np.exp(-safe)
    # 1/sinh(|l|) = 2 e^-|l| / (1 - e^-2|l|), no overflow for large |l|
    far = np.sign(logits) * (1.0 / safe - 2.0 * e / (-np.expm1(-2.0 * safe)))
    l2 = logits * logits
    near = logits * (1.0 / 6.0 + l2 * (-7.0 / 360.0 + l2 * (31.0 / 15120.0)))
    return np.where(small, near, far).astype(logits.dtype, copy=False)


def cb_logprob(x, logits):
    """log CB(x; l) = x l - softplus(l) + log C(l), per pixel, x in [0, 1].   §4.2"""
    return x * logits - softplus(logits) + cb_log_norm(logits)


def cb_grad(x, logits):
    """d/dl log p = x - sigmoid(l) + d log C/dl  (= x - E[x]).   §4.2"""
    return x - _sigmoid(logits) + cb_log_norm_grad(logits)


def cb_mean(logits):
    """E[x] = sigmoid(l) - d log C/dl = 1/(1 - e^-l) - 1/l;  1/2 at l = 0.   §4.2"""
    return _sigmoid(logits) - cb_log_norm_grad(logits)


def cb_sample(logits, u):
    """Inverse CDF: x = log1p(u expm1(l)) / l, written without overflow for large l.   §4.2"""
    a = np.abs(logits)
    small = a < 1e-6
    safe = np.where(small, 1.0, logits)
    pos = 1.0 + np.log(u + (1.0 - u) * np.exp(-np.maximum(safe, 0))) / safe   # l > 0 branch
    neg = np.log1p(u * np.expm1(np.minimum(safe, 0))) / safe                 # l < 0 branch
    x = np.where(safe > 0, pos, neg)
    return np.clip(np.where(small, u, x), 0.0, 1.0)


def gaussian_var(s, var_floor):
    """Effective variance of the gaussian likelihood: var = var_floor + exp(s).   §4.3"""
    return var_floor + np.exp(s)


def gaussian_log_var(s, var_floor):
    """log var = log(var_floor + e^s) = log var_floor + softplus(s - log var_floor): no overflow.  §4.3"""
    lf = math.log(var_floor)
    return lf + softplus(s - lf)


def gaussian_logprob(x, m, s, var_floor):
    """log N(x; m, var), var = var_floor + exp(s), per pixel.   §4.3"""
    log_var = gaussian_log_var(s, var_floor)
    r = x - m
    return -0.5 * (LOG_2PI + log_var + r * r * np.exp(-log_var))


def gaussian_grad(x, m, s, var_floor):
    """dm = (x - m)/var;  ds = 1/2 ((x - m)^2/var - 1) exp(s)/var.   §4.3

    exp(s)/var = sigmoid(s - log var_floor), finite for any s.
    """
    lf = math.log(var_floor)
    inv_var = np.exp(-(lf + softplus(s - lf)))
    r = x - m
    dm = r * inv_var
    ds = 0.5 * (r * r * inv_var - 1.0) * _sigmoid(s - lf)
    return dm, ds


def loglik_forward(likelihood, x, head, var_floor=DEFAULT_VAR_FLOOR):
    """log p(x|z) summed over pixels.   x: (n, D), head: (L, n, K) -> (L, n).   §4"""
    if likelihood == "bernoulli":
        lp = bernoulli_logprob(x, head)
    elif likelihood == "continuous_bernoulli":
        lp = cb_logprob(x, head)
    elif likelihood == "gaussian":
        D = x.shape[-1]
        lp = gaussian_logprob(x, head[..., :D], head[..., D:], var_floor)
    else:
        check_likelihood(likelihood)
    return lp.sum(axis=-1)


def loglik_backward(likelihood, x, head, dll, var_floor=DEFAULT_VAR_FLOOR):
    """d(loss)/d(head) given dll = d(loss)/d(log p(x|z)), shape (L, n).   §4"""
    w = dll[..., None]
    if likelihood == "bernoulli":
        return w * bernoulli_grad(x, head)
    if likelihood == "continuous_bernoulli":
        return w * cb_grad(x, head)
    if likelihood == "gaussian":
        D = x.shape[-1]
        dm, ds = gaussian_grad(x, head[..., :D], head[..., D:], var_floor)
        return np.concatenate([w * dm, w * ds], axis=-1)
    check_likelihood(likelihood)


def likelihood_mean(likelihood, head, x_dim):
    """E[x|z] from the decoder head."""
    if likelihood == "bernoulli":
        return _sigmoid(head)
    if likelihood == "continuous_bernoulli":
        return cb_mean(head)
    return head[..., :x_dim]


def likelihood_sample(likelihood, head, x_dim, rng, var_floor=DEFAULT_VAR_FLOOR):
    """x ~ p(x|z) from the decoder head."""
    if likelihood == "bernoulli":
        return (rng.random(head.shape) < _sigmoid(head)).astype(head.dtype)
    if likelihood == "continuous_bernoulli":
        return cb_sample(head, rng.random(head.shape)).astype(head.dtype)
    m, s = head[..., :x_dim], head[..., x_dim:]
    return (m + np.sqrt(gaussian_var(s, var_floor)) * rng.standard_normal(m.shape)).astype(head.dtype)
