"""Evaluation of a trained model: ELBO, importance-weighted log p(x), active units, reconstruction error.

docs/math.md §7. Every number is per example, in nats, averaged over the rows of ``x``:

    elbo               1/n sum_i ELBO(x_i), one sample of eps per example, analytic KL (beta = 1)
    iw_log_likelihood  1/n sum_i log p^_K(x_i),  log p^_K(x) = log 1/K sum_{l<=K} p(x, z_l) / q(z_l|x)
                       (Burda et al. 2015): a lower bound on log p(x) in expectation, tighter as K grows
    active_units       #{j : Cov_x(E_q[z_j|x]) > 1e-2} = #{j : Var_i(mu_ij) > 1e-2}   (Burda et al. §5.2);
                       with S > 1 stochastic layers, counted per layer (active_units_per_layer) and
                       summed: E_q[z_l|x] for l >= 2 is a Monte Carlo mean of mu_l(z_{l-1}) over
                       ACTIVE_UNIT_SAMPLES draws of the layers below (docs/math.md §11)
    recon_error        1/n sum_i sum_d (x_id - E[x_d | z = mu_i])^2: the squared error of the mean of
                       p(x|z) at the posterior mean, summed over pixels

Random numbers are a function of the example's index alone, so the numbers do not depend on the
batch size, on the chunk size of the importance sampling, or on how rows are split across MPI ranks:

    ELBO  eps (n, Z) = default_rng(seed).standard_normal((n, Z)), row i for example i;
    IW    example i reads its K draws, in order, from its own stream SeedSequence(seed, spawn_key=(i,)).
    With S > 1 layers each draw is one row of Z_1 + ... + Z_S numbers, split into the layers' eps.

``batch_size`` bounds the rows of one backend call (examples x samples), and so the memory, whatever
the other arguments say: the ELBO, the posterior means and the reconstructions take ``batch_size``
examples at a time; importance sampling with K up to thousands takes max(1, batch_size // c)
examples with at most c = min(chunk, batch_size) samples each, whatever K is (a ``chunk`` larger
than ``batch_size`` is capped at it). A chunk of k_c samples gives b_c = LSE_l(log w_l) - log k_c
(the backend's IWAE bound); the chunks combine exactly, and stably, as

    log p^_K = LSE_c(b_c + log k_c) - log K.

Besides the whole-split arrays of n rows (the data, eps (n, Z), the per-example values), nothing
grows with n or K; a pass of ``batch_size`` rows this machine cannot hold is refused up front
(minivae.resources).

Standard errors. Each per-example figure f (ELBO, log p^_K, recon error) is reported with the
standard error of its mean over the n examples, se = s / sqrt(n), s^2 = sum_i (f_i - mean)^2 / (n - 1)
(numpy.std(ddof=1)); it measures the spread over examples of the test set (the uncertainty due to
its finite size), not the Monte Carlo noise of one example's estimate. None when n < 2.

``comm`` (the communicator of minivae.train: SerialComm or distributed.MPIComm) shards the rows: rank
r takes the contiguous rows [r n / P, (r + 1) n / P) and the sums are reduced with allreduce_sum:
first the sums of f_i (the means), then the sums of squared deviations from those means (the
standard errors), two passes like :func:`latent_variances`.
"""
from __future__ import annotations

import math

import numpy as np

from . import checkpoint, checks, resources
from . import distributions as dist
from .distributed import collective

ACTIVE_UNIT_THRESHOLD = 1e-2
ACTIVE_UNIT_SAMPLES = 16           # S > 1: draws of z_{l-1} per example for E_q[z_l|x], l >= 2
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
    return checks.integer(name, v)


def effective_chunk(chunk, batch_size) -> int:
    """The samples per backend call of the importance sampling: ``chunk``, capped at ``batch_size``."""
    return min(_check_positive_int("chunk", chunk), _check_positive_int("batch_size", batch_size))


def eval_eps(n, z_dim, dtype, seed=0):
    """The fixed noise of the one-sample ELBO: row i is the eps of example i.   (n, Z)

    ``z_dim`` a tuple of S > 1 layers: a tuple of S arrays (n, Z_l), the columns of one (n, sum Z_l) draw."""
    Zs = (z_dim,) if isinstance(z_dim, (int, np.integer)) else tuple(z_dim)
    e = np.random.default_rng(seed).standard_normal((n, sum(Zs)), dtype=np.dtype(dtype))
    return e if len(Zs) == 1 else _split(e, Zs)


def _split(e, Zs):
    """The last axis of ``e`` cut into the layers' widths: a tuple of contiguous arrays."""
    cuts = np.cumsum(Zs)[:-1]
    return tuple(np.ascontiguousarray(part) for part in np.split(e, cuts, axis=-1))


def _map(eps, f):
    """f applied to eps, or to each layer's eps (S > 1)."""
    return tuple(f(e) for e in eps) if isinstance(eps, tuple) else f(eps)


def elbo_per_example(model, x, eps, batch_size=DEFAULT_BATCH_SIZE) -> np.ndarray:
    """ELBO(x_i) with the given eps (n, Z), in batches of ``batch_size`` rows.   (n,) float64"""
    params, backend = model.params, model.backend
    out = np.empty(len(x), dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        hi = min(lo + batch_size, len(x))
        xb = np.ascontiguousarray(x[lo:hi], dtype=model.dtype)
        eb = _map(eps, lambda e: np.ascontiguousarray(e[None, lo:hi], dtype=model.dtype))   # (1, b, Z)
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
    eps_rows = _map(eps, lambda e: e[rows])
    xs = x[rows]

    def local_sum():
        return elbo_per_example(model, xs, eps_rows, batch_size).sum() if len(xs) else 0.0
    local = local_sum() if comm is None else collective(comm, local_sum, f"evaluating the {split} split")
    total, count = _reduce_sum(comm, [local, len(xs)])
    return float(total / count)


def mean_sq_error(model, x, batch_size=DEFAULT_BATCH_SIZE, comm=None, split="given") -> float:
    """An Autoencoder's 1/n sum_i ||x_hat_i - x_i||^2 over all rows of ``x`` (sharded over ``comm``),
    the loss it trains on (docs/math.md §13)."""
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
    """log p^_K(x_i) for each row, K = ``iw_samples``, in chunks of at most c = min(chunk, batch_size)
    samples for max(1, batch_size // c) examples per backend call (so at most ``batch_size`` rows
    per call).   (n,) float64

    Row i uses the stream :func:`example_rng` (seed, first_index + i); its K draws are read in
    order, chunk after chunk, so the chunk size changes the arithmetic but not the samples.
    """
    K = _check_positive_int("iw_samples", iw_samples)
    chunk = effective_chunk(chunk, batch_size)
    params, backend, dtype = model.params, model.backend, model.dtype
    Zs = model.spec.z_dims
    Z = sum(Zs)                                                     # one draw: every layer's eps
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
            eps_c = eps if len(Zs) == 1 else _split(eps, Zs)          # S > 1: (k_c, b, Z_l) each
            bound_c = backend.bound(params, xb, eps_c, "iwae").astype(np.float64)   # LSE - log k_c
            acc = np.logaddexp(acc, bound_c + math.log(kc))
            done += kc
        out[lo:hi] = acc - math.log(K)
    return out


def posterior_means(model, x, batch_size=DEFAULT_BATCH_SIZE) -> np.ndarray:
    """mu_i = E_q[z_1|x_i] for every row.   (n, Z_1) float64"""
    out = np.empty((len(x), model.spec.z_dims[0]), dtype=np.float64)
    for lo in range(0, len(x), batch_size):
        xb = np.ascontiguousarray(x[lo:lo + batch_size], dtype=model.dtype)
        out[lo:lo + len(xb)] = model.backend.encode(model.params, xb)[0]
    return out


def layer_means(model, x, seed=0, batch_size=DEFAULT_BATCH_SIZE, first_index=0,
                samples=ACTIVE_UNIT_SAMPLES):
    """E_q[z_l|x_i] for every layer l and row i: [(n, Z_1), ..., (n, Z_S)] float64.

    Layer 1 is mu_1(x) exactly. Layer l >= 2 averages mu_l(z_{l-1}) over ``samples`` draws of
    z_1, ..., z_{l-1} from q; example i draws from its own stream (seed, spawn_key=(i, 1)), so the
    result does not depend on batching or sharding.
    """
    out = [posterior_means(model, x, batch_size)]
    Zs = model.spec.z_dims
    if len(Zs) == 1:
        return out
    out += [np.empty((len(x), Z), dtype=np.float64) for Z in Zs[1:]]
    params, backend, dtype = model.params, model.backend, model.dtype
    per_call = max(1, batch_size // samples)
    for lo in range(0, len(x), per_call):
        hi = min(lo + per_call, len(x))
        b = hi - lo
        xb = np.ascontiguousarray(x[lo:hi], dtype=dtype)
        noise = np.empty((samples, b, sum(Zs[:-1])), dtype=dtype)
        for j in range(b):
            g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(first_index + lo + j, 1))))
            noise[:, j, :] = g.standard_normal((samples, noise.shape[2]), dtype=dtype)
        eps = _split(noise, Zs[:-1]) if len(Zs) > 2 else (noise,)
        mu, logvar = backend.encode(params, xb)                          # (b, Z_1)
        z = mu + np.exp(0.5 * logvar) * eps[0]                           # (M, b, Z_1)
        for l in range(2, len(Zs) + 1):
            mu, logvar = backend.encode_up(params, z.reshape(samples * b, -1), l)
            mu, logvar = mu.reshape(samples, b, -1), logvar.reshape(samples, b, -1)
            out[l - 1][lo:hi] = mu.mean(axis=0)
            if l < len(Zs):
                z = mu + np.exp(0.5 * logvar) * eps[l - 1]
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


def standard_error(sq_dev_sum, n):
    """s / sqrt(n) with s^2 = sum (f_i - mean)^2 / (n - 1): numpy.std(f, ddof=1) / sqrt(n); None when n < 2."""
    if n < 2:
        return None
    return float(math.sqrt(sq_dev_sum / (n - 1) / n))


def _gather(comm, local, n, rows):
    """The whole (n,) array of per-example values from each rank's contiguous rows (a sum of
    zero-padded arrays: no gather primitive needed)."""
    if comm is None:
        return np.asarray(local, dtype=np.float64).copy()
    full = np.zeros(n, dtype=np.float64)
    full[rows] = local
    return _reduce_sum(comm, full)


FIGURES = ("elbo", "iw_log_likelihood", "recon_error")     # the per-example figures, each with an _se


def evaluate(model, x, iw_samples=0, batch_size=DEFAULT_BATCH_SIZE, chunk=DEFAULT_CHUNK, seed=0,
             comm=None, per_example=False) -> dict:
    """Every evaluation number of a model on the rows of ``x`` (see the module docstring).

    ``iw_samples`` = K > 0 adds the importance-weighted estimate of log p(x) (None when 0).
    Returns a dict: n, elbo, iw_log_likelihood, iw_samples, active_units, active_units_per_layer,
    latent_variance (per dimension, the layers one after another), recon_error, seed, and the
    standard error of each per-example mean (elbo_se, iw_log_likelihood_se, recon_error_se; None
    when n < 2 or the figure is not computed).
    ``per_example``: also return ``per_example``, a dict of (n,) float64 arrays (elbo, recon_error,
    and iw_log_likelihood when K > 0), one entry per example in the order of ``x`` (gathered over
    ``comm``: every rank gets the whole arrays).
    """
    if isinstance(iw_samples, bool) or not isinstance(iw_samples, (int, np.integer)) or iw_samples < 0:
        raise ValueError(f"iw_samples must be an integer >= 0, got {iw_samples!r}")
    batch_size = _check_positive_int("batch_size", batch_size)
    chunk = effective_chunk(chunk, batch_size)
    seed = checks.integer("seed", seed, lo=0)
    per_example = checks.flag("per_example", per_example)
    x = model.check_x(x)
    n = len(x)
    rows = shard(n, comm)
    xs = x[rows]
    # the largest backend call: batch_size rows (examples x samples), fewer when the shard is small
    call_rows = min(batch_size, max(len(xs), 1) * max(int(iw_samples), 1))
    resources.check(resources.pass_bytes(model.spec, model.dtype.itemsize, call_rows, 1, backward=False),
                    f"evaluating {call_rows} rows per backend call (--batch-size)")
    eps = _map(eval_eps(n, model.spec.z_dim, model.dtype, seed), lambda e: e[rows])

    local = {"elbo": elbo_per_example(model, xs, eps, batch_size) if len(xs) else np.zeros(0)}
    if iw_samples:
        local["iw_log_likelihood"] = iw_log_likelihood_per_example(
            model, xs, iw_samples, seed, batch_size, chunk, first_index=rows.start) if len(xs) else np.zeros(0)
    layer_mu = layer_means(model, xs, seed, batch_size, first_index=rows.start)
    mu = layer_mu[0]
    local["recon_error"] = reconstruction_sq_error(model, xs, mu, batch_size) if len(xs) else np.zeros(0)
    names = list(local)                                   # elbo, [iw_log_likelihood], recon_error
    # pass 1: [sum f_i for each figure..., rows] -> the means; pass 2: sum (f_i - mean)^2 -> the SEs
    total = _reduce_sum(comm, [local[k].sum() for k in names] + [len(xs)])
    count = total[-1]
    means = dict(zip(names, total[:-1] / count))
    sq = _reduce_sum(comm, [((local[k] - means[k]) ** 2).sum() for k in names])
    se = {k: standard_error(v, int(count)) for k, v in zip(names, sq)}
    per_layer = [latent_variances(m, comm) for m in layer_mu]
    variances = per_layer[0] if len(per_layer) == 1 else np.concatenate(per_layer)
    result = {
        "n": int(count),
        "elbo": float(means["elbo"]),
        "elbo_se": se["elbo"],
        "iw_log_likelihood": float(means["iw_log_likelihood"]) if iw_samples else None,
        "iw_log_likelihood_se": se.get("iw_log_likelihood"),
        "iw_samples": int(iw_samples),
        "active_units": int((variances > ACTIVE_UNIT_THRESHOLD).sum()),
        "active_units_per_layer": [int((v > ACTIVE_UNIT_THRESHOLD).sum()) for v in per_layer],
        "latent_variance": [float(v) for v in variances],
        "recon_error": float(means["recon_error"]),
        "recon_error_se": se["recon_error"],
        "seed": seed,
    }
    if per_example:
        result["per_example"] = {k: _gather(comm, local[k], n, rows) for k in names}
    return result


def nonfinite(result) -> list:
    """The figures of an :func:`evaluate` result that are NaN or inf (else their SEs that are)."""
    def bad(keys):
        return [k for k in keys if result.get(k) is not None and not math.isfinite(result[k])]
    return bad(FIGURES) or bad(tuple(f"{f}_se" for f in FIGURES))     # the SEs of finite figures


def save_per_example(path, arrays: dict):
    """Write the per-example arrays (name -> (n,) float64) to an ``.npz`` file, atomically
    (checkpoint.atomic_write); read it back with ``np.load(path, allow_pickle=False)``."""
    payload = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}
    checkpoint.atomic_write(path, lambda f: np.savez(f, **payload))
    return path
