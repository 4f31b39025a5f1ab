"""Gradient estimators of the encoder's part of the ELBO: the score function (REINFORCE) next to the
reparameterization, and per-eps gradient samples to compare their variances (docs/math.md §5.4).

Shape legend: L samples, n examples, Z latent dims, S gradient samples, P parameters.
    w        : (L, n)      upstream weight of log q(z_li | x_i): dl_li * f(z_li) with f = log p(x|z)
    eps      : (L, n, Z)   the noise that drew z = mu + sigma * eps
    mu, logvar : (n, Z)

    >>> from minivae import VAE, estimators
    >>> m = VAE(64, 2, hidden=(32,), dtype="float64")
    >>> g = estimators.gradient_samples(m, x, 1000, estimator="score", seed=0)   # (1000, P), L = 1
    >>> enc = estimators.part_slice(m, "enc")
    >>> estimators.total_variance(g[:, enc])                # trace of the covariance of one estimate
"""
from __future__ import annotations

import math

import numpy as np

from .objectives import ESTIMATORS, check_estimator

LOG_2PI = math.log(2.0 * math.pi)


# ----------------------------------------------------------------------------------------------
# The score of q(z|x) with z held fixed                                                   §5.4
# ----------------------------------------------------------------------------------------------

def log_q_fixed_z(z, mu, logvar):
    """log q(z|x) = -1/2 sum_j [log 2pi + v_j + (z_j - mu_j)^2 e^{-v_j}] as a function of (mu, logvar)
    at a given z.   z: (L, n, Z), mu, logvar: (n, Z) -> (L, n).   §3.3, §5.4"""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * np.exp(-logvar)).sum(axis=-1)


def score_backward(w, eps, logvar):
    """The gradient of sum_li w_li log q(z_li | x_i) w.r.t. (mu, logvar) with z held fixed.

    At z = mu + sigma eps:  d log q / d mu = (z - mu) / sigma^2 = eps / sigma,
                            d log q / d v  = -1/2 + (z - mu)^2 / (2 sigma^2) = (eps^2 - 1) / 2.
    w: (L, n), eps: (L, n, Z), logvar: (n, Z) -> dmu, dlogvar: (n, Z).   §5.4
    """
    inv_std = np.exp(-0.5 * logvar)                       # (n, Z) 1 / sigma
    wz = w[..., None]                                     # (L, n, 1)
    dmu = (wz * eps).sum(axis=0) * inv_std
    dlogvar = 0.5 * (wz * (eps * eps - 1)).sum(axis=0)
    return dmu, dlogvar


def check_estimator_use(estimator, objective, backend, n_stochastic=1):
    """One-line ValueError when ``estimator`` cannot be used with this objective, backend and model:
    the objectives and models it applies to, then whether concrete ``backend``'s class declares it
    (kernels/interface.require_estimator, which names the backends that do)."""
    check_estimator(estimator)
    if estimator == "dreg" and objective != "iwae":
        raise ValueError("estimator 'dreg' applies to the iwae objective only")
    if estimator == "score":
        if objective != "elbo":
            raise ValueError(f"estimator 'score' is implemented for objective 'elbo' only, got {objective!r}")
        if n_stochastic > 1:
            raise ValueError("estimator 'score' is implemented for one stochastic layer only")
    from .kernels import backend_class
    from .kernels.interface import require_estimator
    require_estimator(backend_class(backend, n_stochastic > 1), estimator, n_stochastic > 1)


# ----------------------------------------------------------------------------------------------
# Gradient samples, for the variance of the estimators
# ----------------------------------------------------------------------------------------------

def part_slice(model, part) -> slice:
    """The slice of the flat vector holding the "enc" (inference network) or "dec" (generative
    network) parameters: the layout puts every enc.* tensor before every dec.* tensor (§1)."""
    if part not in ("enc", "dec"):
        raise ValueError(f"part must be 'enc' or 'dec', got {part!r}")
    offsets = [s.offset for n, s in model.layout.slots.items() if n.startswith("dec.")]
    split = min(offsets)
    return slice(0, split) if part == "enc" else slice(split, model.layout.size)


def gradient_samples(model, x, n_samples, estimator="reparam", L=1, seed=0, eps=None, **loss_kwargs):
    """Gradient estimates of the batch loss, each from its own draw of eps: (S, P) float64, S = ``n_samples``.

    Row s is ``model.loss_and_grad(x, eps=eps[s], estimator=estimator)[1]`` with eps[s] of shape
    (L, n, Z): the L-sample estimate. ``eps`` (S, L, n, Z) defaults to draws of ``default_rng(seed)``,
    so two estimators called with the same seed (and L) see the same noise. The rows are independent,
    so the covariance of an L-sample estimate is the single-sample one divided by L.
    """
    check_estimator(estimator)
    for name, v in (("n_samples", n_samples), ("L", L)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    x = model.check_x(x)
    n, Z = x.shape[0], model.spec.z_dim
    if eps is None:
        eps = np.random.default_rng(seed).standard_normal((n_samples, L, n, Z))
    eps = np.asarray(eps, dtype=model.dtype)
    if eps.shape != (n_samples, L, n, Z):
        raise ValueError(f"eps must have shape ({n_samples}, {L}, {n}, {Z}), got {eps.shape}")
    out = np.empty((n_samples, model.params.size), dtype=np.float64)
    grad = np.empty(model.params.size, dtype=model.dtype)
    for s in range(n_samples):
        _, g = model.loss_and_grad(x, eps=eps[s], estimator=estimator, grad=grad, **loss_kwargs)
        out[s] = g
    return out


def total_variance(samples) -> float:
    """trace Cov of one estimate, from the rows of ``samples`` (S, P): sum_p of the sample variances."""
    samples = np.asarray(samples, dtype=np.float64)
    return float(samples.var(axis=0, ddof=1).sum())
