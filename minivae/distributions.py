"""The Gaussian posterior and the pixel likelihoods, each with a hand-derived gradient (docs/math.md §3-§4).

Shape legend: L samples per example, n examples, Z latent dims, D pixels.
    mu, logvar : (n, Z)        eps, z : (L, n, Z)
    x          : (n, D)        head   : (L, n, D) or (L, n, 2D) for "gaussian"
"""
from __future__ import annotations

import math

import numpy as np

from . import likelihoods
from .layers import _sigmoid, softplus  # noqa: F401  (re-exported: tests and callers use dist._sigmoid)
from .likelihoods import bernoulli as _bern, continuous_bernoulli as _cb, gaussian as _gauss

LOG_2PI = math.log(2.0 * math.pi)
DEFAULT_VAR_FLOOR = _gauss.DEFAULT_VAR_FLOOR  # gaussian likelihood: var = var_floor + exp(s)   (§4.3)


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
# Each likelihood is one module of minivae/likelihoods (its NumPy pair, its scalar function for the
# kernels, its test inputs); these functions go through the registry. The per-likelihood names
# below are re-exported from those modules.
# ----------------------------------------------------------------------------------------------

bernoulli_logprob = _bern.logprob
bernoulli_grad = _bern.score
_CB_TAYLOR = _cb.TAYLOR_SWITCH
_cb_switch = _cb.switch
cb_log_norm = _cb.log_norm
cb_log_norm_grad = _cb.log_norm_grad
cb_logprob = _cb.logprob
cb_grad = _cb.score
cb_mean = _cb.mean
cb_sample = _cb.inverse_cdf
gaussian_var = _gauss.var
gaussian_log_var = _gauss.log_var
gaussian_logprob = _gauss.logprob_ms
gaussian_grad = _gauss.grad_ms


def __getattr__(name):
    """``LIKELIHOODS``: the registered names, in code order, read when asked (PEP 562), so that a
    likelihood registered after this import is listed."""
    if name == "LIKELIHOODS":
        return likelihoods.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def head_width(likelihood: str, x_dim: int) -> int:
    """K = HEADS * D: the decoder head's width for ``likelihood`` (D, or 2D for "gaussian")."""
    return likelihoods.get(likelihood).HEADS * x_dim


def check_likelihood(likelihood: str):
    likelihoods.get(likelihood)


def loglik_forward(likelihood, x, head, var_floor=DEFAULT_VAR_FLOOR):
    """log p(x|z) summed over pixels.   x: (n, D), head: (L, n, K) -> (L, n).   §4"""
    return likelihoods.get(likelihood).logprob(x, head, var_floor).sum(axis=-1)


def loglik_backward(likelihood, x, head, dll, var_floor=DEFAULT_VAR_FLOOR):
    """d(loss)/d(head) given dll = d(loss)/d(log p(x|z)), shape (L, n).   §4"""
    return dll[..., None] * likelihoods.get(likelihood).score(x, head, var_floor)


def likelihood_mean(likelihood, head, x_dim):
    """E[x|z] from the decoder head."""
    return likelihoods.get(likelihood).mean(head)


def likelihood_sample(likelihood, head, x_dim, rng, var_floor=DEFAULT_VAR_FLOOR):
    """x ~ p(x|z) from the decoder head."""
    return likelihoods.get(likelihood).sample(head, rng, var_floor)
