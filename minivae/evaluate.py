"""Evaluation of a trained model: ELBO, importance-weighted log p(x), active units, reconstruction error.

docs/math.md §7. Every number is per example, in nats, averaged over the rows of ``x``:

    elbo               1/n sum_i ELBO(x_i), one sample of eps per example, analytic KL (beta = 1)
    iw_log_likelihood  1/n sum_i log p^_K(x_i),  log p^_K(x) = log 1/K sum_{l<=K} p(x, z_l) / q(z_l|x)
                       (Burda et al. 2015): a lower bound on log p(x) in expectation, tighter as K grows
    active_units       #{j : Cov_x(E_q[z_j|x]) > 1e-2} = #{j : Var_i(mu_ij) > 1e-2}   (Burda et al. §5.2)
    recon_error        1/n sum_i sum_d (x_id - E[x_d | z = mu_i])^2: the squared error of the mean of
                       p(x|z) at the posterior mean, summed over pixels

Random numbers are a function of the example's index alone, so the numbers do not depend on the
batch size, on the chunk size of the importance sampling, or on how rows are split across MPI ranks:

    ELBO  eps (n, Z) = default_rng(seed).standard_normal((n, Z)), row i for example i;
    IW    example i reads its K draws, in order, from its own stream SeedSequence(seed, spawn_key=(i,)).

``batch_size`` bounds the rows of one backend call (examples x samples), and so the memory: the ELBO
takes ``batch_size`` examples at a time; importance sampling with K up to thousands takes
max(1, batch_size // chunk) examples with at most ``chunk`` samples each, whatever K is. A chunk of
k_c samples gives b_c = LSE_l(log w_l) - log k_c (the backend's IWAE bound); the chunks combine
exactly, and stably, as

    log p^_K = LSE_c(b_c + log k_c) - log K.

``comm`` (the communicator of minivae.train: SerialComm or distributed.MPIComm) shards the rows: rank
r takes the contiguous rows [r n / P, (r + 1) n / P) and the sums are reduced with allreduce_sum.
"""
from __future__ import annotations

import math

import numpy as np

from . import distributions as dist
from .distributed import collective

ACTIVE_UNIT_THRESHOLD = 1e-2
DEFAULT_BATCH_SIZE = 1000
DEFAULT_CHUNK = 100


def shard(n, comm=None) -> slice:
    """The contiguous rows [r n / P, (r + 1) n / P) that rank r of P evaluates."""
    if comm is None:
        return slice(0, n)
    return slice(comm.rank * n // comm.size, (comm.rank + 1) * n // comm.size)


def _reduce_sum(comm, values):
    a = np.asarray(values, dtype=np.float64)
    return a.copy() if comm is None else np.asarray(comm.allreduce_sum(a), dtype=np.float64)


def _check_positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def eval_eps(n, z_dim, dtype, seed=0) -> np.ndarray:
    """The fixed noise of the one-sample ELBO: row i is the eps of example i.   (n, Z)"""
    return np.random.default_rng(seed).standard_normal((n, z_dim), dtype=np.dtype(dtype))


def elbo_per_example(model, x, eps, batch_size=DEFAULT_BATCH_SIZE) -> np.ndarray:
    """ELBO(x_i) with the given eps (n, Z), in batches of ``batch_size`` rows.   (n,) float64"""
    params, backend = model.params, model.backend
    out = np.empty(len(x), dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        hi = min(lo + batch_size, len(x))
        xb = np.ascontiguousarray(x[lo:hi], dtype=model.dtype)
        eb = np.ascontiguousarray(eps[None, lo:hi], dtype=model.dtype)     # (1, b, Z)
        out[lo:hi] = backend.bound(params, xb, eb, "elbo")
    return out


def mean_elbo(model, x, seed=0, batch_size=DEFAULT_BATCH_SIZE, comm=None, eps=None, split="given") -> float:
    """1/n sum_i ELBO(x_i) over all rows of ``x`` (sharded over ``comm``); ``eps`` defaults to
    :func:`eval_eps` (pass it to reuse one draw across epochs). Over ranks, a failure in one rank's
    shard stops every rank with one message naming it and the ``split`` (distributed.collective)."""
    n = len(x)
    if eps is None:
        eps = eval_eps(n, model.spec.z_dim, model.dtype, seed)
    rows = shard(n, comm)
    xs = x[rows]

    def local_sum():
        return elbo_per_example(model, xs, eps[rows], batch_size).sum() if len(xs) else 0.0
    local = local_sum() if comm is None else collective(comm, local_sum, f"evaluating the {split} split")
    total, count = _reduce_sum(comm, [local, len(xs)])
    return float(total / count)


def mean_sq_error(model, x, batch_size=DEFAULT_BATCH_SIZE, comm=None, split="given") -> float:
    """An Autoencoder's 1/n sum_i ||x_hat_i - x_i||^2 over all rows of ``x`` (sharded over ``comm``),
    the loss it trains on (docs/math.md §11)."""
    rows = shard(len(x), comm)
    xs = x[rows]

    def local_sum():
        return float(sum(model.sq_error(xs[lo:lo + batch_size]).astype(np.float64).sum()
                         for lo in range(0, len(xs), batch_size)))
    local = local_sum() if comm is None else collective(comm, local_sum, f"evaluating the {split} split")
    total, count = _reduce_sum(comm, [local, len(xs)])
    return float(total / count)


def example_rng(seed, index) -> np.random.Generator:
    """The importance-sampling stream of example ``index``: independent of batching and sharding."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(int(index),))))


def iw_log_likelihood_per_example(model, x, iw_samples, seed=0, batch_size=DEFAULT_BATCH_SIZE,
                                  chunk=DEFAULT_CHUNK, first_index=0) -> np.ndarray:
    """log p^_K(x_i) for each row, K = ``iw_samples``, in chunks of at most ``chunk`` samples for
    max(1, batch_size // chunk) examples per backend call.   (n,) float64

    Row i uses the stream :func:`example_rng` (seed, first_index + i); its K draws are read in
    order, chunk after chunk, so the chunk size changes the arithmetic but not the samples.
    """
    K = _check_positive_int("iw_samples", iw_samples)
    chunk = _check_positive_int("chunk", chunk)
    params, backend, Z, dtype = model.params, model.backend, model.spec.z_dim, model.dtype
    per_call = max(1, batch_size // chunk)                          # examples per backend call
    out = np.empty(len(x), dtype=np.float64)
    for lo in range(0, len(x), per_call):
        hi = min(lo + per_call, len(x))
        b = hi - lo
        xb = np.ascontiguousarray(x[lo:hi], dtype=dtype)
        streams = [example_rng(seed, first_index + i) for i in range(lo, hi)]
        acc = np.full(b, -np.inf)                                   # running LSE_c(b_c + log k_c)
        done = 0
        while done < K:
            kc = min(chunk, K - done)
            eps = np.empty((kc, b, Z), dtype=dtype)                  # (k_c, b, Z)
            for j, g in enumerate(streams):
                eps[:, j, :] = g.standard_normal((kc, Z), dtype=dtype)
            bound_c = backend.bound(params, xb, eps, "iwae").astype(np.float64)   # LSE - log k_c
            acc = np.logaddexp(acc, bound_c + math.log(kc))
            done += kc
        out[lo:hi] = acc - math.log(K)
    return out


def posterior_means(model, x, batch_size=DEFAULT_BATCH_SIZE) -> np.ndarray:
    """mu_i = E_q[z|x_i] for every row.   (n, Z) float64"""
    out = np.empty((len(x), model.spec.z_dim), dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        xb = np.ascontiguousarray(x[lo:lo + batch_size], dtype=model.dtype)
        out[lo:lo + len(xb)] = model.backend.encode(model.params, xb)[0]
    return out


def reconstruction_sq_error(model, x, mu, batch_size=DEFAULT_BATCH_SIZE) -> np.ndarray:
    """sum_d (x_id - E[x_d | z = mu_i])^2 per row.   (n,) float64"""
    s = model.spec
    out = np.empty(len(x), dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        hi = min(lo + batch_size, len(x))
        zb = np.ascontiguousarray(mu[lo:hi], dtype=model.dtype)
        mean = dist.likelihood_mean(s.likelihood, model.backend.decode(model.params, zb), s.x_dim)
        out[lo:hi] = ((np.asarray(x[lo:hi], dtype=np.float64) - mean) ** 2).sum(axis=1)
    return out


def latent_variances(mu_local, comm=None) -> np.ndarray:
    """Var_i(mu_ij) over all rows of all ranks (two passes: the mean, then the squared deviations;
    divided by n - 1 like numpy.cov).   (Z,)"""
    Z = mu_local.shape[1]
    s = _reduce_sum(comm, np.concatenate([mu_local.sum(axis=0), [len(mu_local)]]))
    n = s[-1]
    mean = s[:Z] / n
    ss = _reduce_sum(comm, ((mu_local - mean) ** 2).sum(axis=0))
    return ss / max(n - 1.0, 1.0)


def evaluate(model, x, iw_samples=0, batch_size=DEFAULT_BATCH_SIZE, chunk=DEFAULT_CHUNK, seed=0,
             comm=None) -> dict:
    """Every evaluation number of a model on the rows of ``x`` (see the module docstring).

    ``iw_samples`` = K > 0 adds the importance-weighted estimate of log p(x) (None when 0).
    Returns a dict: n, elbo, iw_log_likelihood, iw_samples, active_units, latent_variance (per
    dimension), recon_error, seed.
    """
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, (int, np.integer)) or iw_samples < 0:
        raise ValueError(f"iw_samples must be an integer >= 0, got {iw_samples!r}")
    batch_size = _check_positive_int("batch_size", batch_size)
    chunk = _check_positive_int("chunk", chunk)
    x = model.check_x(x)
    n = len(x)
    rows = shard(n, comm)
    xs = x[rows]
    eps = eval_eps(n, model.spec.z_dim, model.dtype, seed)[rows]

    sums = [elbo_per_example(model, xs, eps, batch_size).sum() if len(xs) else 0.0]
    if iw_samples:
        iw = iw_log_likelihood_per_example(model, xs, iw_samples, seed, batch_size, chunk,
                                           first_index=rows.start) if len(xs) else np.zeros(0)
        sums.append(iw.sum())
    mu = posterior_means(model, xs, batch_size)
    sums.append(reconstruction_sq_error(model, xs, mu, batch_size).sum() if len(xs) else 0.0)
    sums.append(len(xs))
    total = _reduce_sum(comm, sums)
    count = total[-1]
    variances = latent_variances(mu, comm)
    return {
        "n": int(count),
        "elbo": float(total[0] / count),
        "iw_log_likelihood": float(total[1] / count) if iw_samples else None,
        "iw_samples": int(iw_samples),
        "active_units": int((variances > ACTIVE_UNIT_THRESHOLD).sum()),
        "latent_variance": [float(v) for v in variances],
        "recon_error": float(total[-2] / count),
        "seed": seed,
    }
