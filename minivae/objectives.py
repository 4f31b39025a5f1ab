"""The ELBO and IWAE bounds as losses, and their gradients w.r.t. their inputs (docs/math.md §5).

Shape legend: L (or k) samples, n examples, Z latent dims.
    ll      : (L, n)   log p(x|z_l), summed over pixels
    mid     : (L, n)   S > 1: sum_{l<S} log p(z_l|z_{l+1}) - log q(z_l|z_{l-1})   (§11)
    kl      : (n, Z)   analytic KL per dimension
    logp_z  : (L, n)   log N(z_l; 0, I)
    logq    : (L, n)   log q(z_l|x)
The loss is the batch *mean* of the negative bound, in nats per example.
"""
from __future__ import annotations

import math

import numpy as np

OBJECTIVES = ("elbo", "iwae")
ESTIMATORS = ("reparam", "score", "dreg")      # gradient estimators of the encoder's part (§5.4)


def check_objective(objective: str):
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")


def check_estimator(estimator: str):
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")


def elbo_per_example(ll, kl, beta=1.0):
    """ELBO_i = 1/L sum_l log p(x_i|z_li) - beta * sum_j KL_ij.   (n,)   §5.1"""
    return ll.mean(axis=0) - beta * kl.sum(axis=-1)


def elbo_loss(ll, kl, beta=1.0, free_bits=0.0, kl_active=None):
    """loss = -1/(nL) sum ll + beta * sum_j max(free_bits, 1/n sum_i KL_ij)   and its input gradients.

    Returns (loss, dll (L, n), dkl (n, Z)).  With free_bits = 0 this is the batch mean of -ELBO.
    Free bits (Kingma et al. 2016): a dimension whose batch-mean KL is under the floor is charged the
    floor and gets no KL gradient.   §5.1, §5.3

    ``kl_active`` (Z,), optional: which dimensions are over the floor, decided on a larger batch than
    this one. A data-parallel rank holds a share of the minibatch; the floor applies to the whole
    minibatch's KL, so the ranks agree on the decision first (trainers.HostTrainer). A dimension is then
    charged this share's KL when active, and the floor when not: the ranks' weighted mean of the
    losses and gradients is exactly the single-process objective.
    """
    L, n = ll.shape
    kl_dim = kl.mean(axis=0)                                   # (Z,) batch-mean KL per dimension
    if free_bits > 0:
        on = kl_dim > free_bits if kl_active is None else np.asarray(kl_active) > 0
        charged = np.where(on, kl_dim, free_bits)
        active = on.astype(kl.dtype)
    else:
        charged = kl_dim
        active = np.ones_like(kl_dim)
    loss = -ll.sum() / (n * L) + beta * charged.sum()
    dll = np.full_like(ll, -1.0 / (n * L))
    dkl = np.broadcast_to((beta / n) * active, kl.shape).astype(kl.dtype)
    return float(loss), dll, dkl


def log_weights(ll, logp_z, logq, beta=1.0):
    """log w_l = log p(x|z_l) + beta (log p(z_l) - log q(z_l|x)).   (k, n)   §5.2"""
    return ll + beta * (logp_z - logq)


def logsumexp(a, axis=0):
    """Stable log sum exp along ``axis``."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def iwae_per_example(logw):
    """IWAE_i = log 1/k sum_l w_li = logsumexp_l(log w_li) - log k.   (n,)   §5.2"""
    return logsumexp(logw, axis=0) - math.log(logw.shape[0])


def iwae_loss(logw):
    """loss = -1/n sum_i IWAE_i, and dlogw = -softmax_l(log w_li) / n.   §5.2"""
    k, n = logw.shape
    bound = iwae_per_example(logw)                             # (n,)
    wt = np.exp(logw - (bound + math.log(k))[None, :])         # (k, n) normalized weights, columns sum to 1
    return float(-bound.mean()), -wt / n


# ----------------------------------------------------------------------------------------------
# S > 1 stochastic layers (§11): the ELBO keeps the top layer's KL analytic
# ----------------------------------------------------------------------------------------------

def stack_elbo_per_example(ll, mid, kl_top, beta=1.0):
    """ELBO_i = 1/L sum_l [ll_li + beta (mid_li - sum_j KL_lij)].   ll, mid: (L, n); kl_top: (L, n, Z_S).  §11.2"""
    return (ll + beta * (mid - kl_top.sum(axis=-1))).mean(axis=0)


def stack_elbo_loss(ll, mid, kl_top, beta=1.0):
    """loss = -1/(nL) sum_li [ll + beta (mid - sum_j KL_top)], and dll, dmid (L, n), dkl (L, n, Z_S).  §11.2"""
    L, n = ll.shape
    loss = -float(stack_elbo_per_example(ll, mid, kl_top, beta).mean())
    c = 1.0 / (n * L)
    return (loss, np.full_like(ll, -c), np.full_like(mid, -beta * c),
            np.full_like(kl_top, beta * c))


def dreg_weights(logw, beta=1.0):
    """The upstream of the inference network's path gradient under DReG:  §12

    dlogw_inf = -((1 - beta) w~ + beta w~^2) / n,   w~ = softmax_l(log w_li)   (k, n)
    (= -w~^2 / n for beta = 1, Tucker et al. 2018). The generative network keeps IWAE's -w~/n.
    """
    k, n = logw.shape
    wt = np.exp(logw - logsumexp(logw, axis=0)[None, :])           # (k, n), columns sum to 1
    return -((1.0 - beta) * wt + beta * wt * wt) / n
