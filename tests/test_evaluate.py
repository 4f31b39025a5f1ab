"""Evaluation (minivae/evaluate.py, docs/math.md §7): the importance-weighted estimate is above the
ELBO and grows with K, chunking and batching and sharding leave the numbers alone, active units and
reconstruction error mean what they say."""
import math

import numpy as np
import pytest

from minivae import VAE
from minivae import evaluate as ev
from minivae.data import load_dataset
from minivae.train import SerialComm, TrainConfig, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small float64 model trained for a few epochs on the bundled digits, and the test rows."""
    out = tmp_path_factory.mktemp("run") / "run"
    train(TrainConfig(dataset="digits", hidden=(32,), z_dim=4, epochs=8, batch_size=64, dtype="float64",
                      quiet=True, plots=False, out=str(out)))
    model = VAE.load(out / "model.npz")
    return model, load_dataset("digits", dtype="float64").x_test


def test_iw_estimate_is_above_the_elbo_and_grows_with_k(trained):
    model, x = trained
    elbo = ev.mean_elbo(model, x)
    iw = {K: ev.iw_log_likelihood_per_example(model, x, K).mean() for K in (1, 10, 100, 1000)}
    # K = 1 is an unbiased estimate of the ELBO (a sampled KL instead of the analytic one).
    # Measured: ELBO -29.73; K = 1, 10, 100, 1000: -29.80, -29.41, -29.385, -29.372 (the spread
    # over seeds is about 0.03 at K = 10).
    assert abs(iw[1] - elbo) < 0.5
    assert elbo + 0.2 < iw[10] < iw[100] < iw[1000]


def test_iw_is_the_iwae_bound_of_the_per_example_streams(trained):
    """One chunk of K: exactly the backend's IWAE bound on eps read from each example's stream."""
    model, x = trained
    x, K = x[:6], 9
    eps = np.stack([ev.example_rng(3, i).standard_normal((K, model.z_dim)) for i in range(len(x))], axis=1)
    direct = model.backend.bound(model.params, np.ascontiguousarray(x), eps, "iwae")
    np.testing.assert_allclose(ev.iw_log_likelihood_per_example(model, x, K, seed=3, chunk=K), direct,
                               rtol=1e-13)


@pytest.mark.parametrize("chunk, batch_size", [(37, 1000), (10, 1000), (1, 7), (5, 1), (100, 3)])
def test_chunks_and_batches_do_not_change_the_estimate(trained, chunk, batch_size):
    model, x = trained
    x = x[:25]
    ref = ev.iw_log_likelihood_per_example(model, x, 37, seed=5, chunk=37, batch_size=37 * 25)
    got = ev.iw_log_likelihood_per_example(model, x, 37, seed=5, chunk=chunk, batch_size=batch_size)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_streams_follow_the_example_index(trained):
    """A shard [a, b) of the rows gets the numbers of the whole run: what rank r computes."""
    model, x = trained
    x = x[:20]
    full = ev.iw_log_likelihood_per_example(model, x, 8, seed=1)
    part = ev.iw_log_likelihood_per_example(model, x[7:15], 8, seed=1, first_index=7)
    np.testing.assert_allclose(part, full[7:15], rtol=1e-12)
    assert not np.allclose(ev.iw_log_likelihood_per_example(model, x[7:15], 8, seed=1), full[7:15])


class Rank(SerialComm):
    """Rank r of P, whose reductions return the local values (and are recorded)."""

    def __init__(self, rank, size):
        self.rank, self.size, self.is_root = rank, size, rank == 0
        self.sums = []

    def allreduce_sum(self, arr):
        self.sums.append(np.array(arr, dtype=np.float64))
        return np.array(arr, dtype=np.float64)


def test_sharded_sums_add_up_to_the_whole(trained):
    model, x = trained
    whole = Rank(0, 1)
    ev.evaluate(model, x, iw_samples=5, comm=whole)
    ranks = [Rank(r, 3) for r in range(3)]
    for comm in ranks:
        ev.evaluate(model, x, iw_samples=5, comm=comm)
    # the first reduction holds [elbo sum, iw sum, recon sum, rows]
    np.testing.assert_allclose(sum(c.sums[0] for c in ranks), whole.sums[0], rtol=1e-12)
    rows = [ev.shard(len(x), c) for c in ranks]
    assert [int(c.sums[0][-1]) for c in ranks] == [r.stop - r.start for r in rows]
    assert rows[0].start == 0 and rows[0].stop == rows[1].start and rows[2].stop == len(x)


def test_evaluate_matches_the_public_api(trained):
    model, x = trained
    r = ev.evaluate(model, x, iw_samples=0, seed=4)
    eps = ev.eval_eps(len(x), model.z_dim, model.dtype, seed=4)
    assert r["n"] == len(x) and r["iw_log_likelihood"] is None
    assert r["elbo"] == pytest.approx(model.elbo(x, eps=eps).mean(), rel=1e-12)
    rec = model.reconstruct(x)                                       # mean of p(x|z = mu)
    assert r["recon_error"] == pytest.approx(((x - rec) ** 2).sum(axis=1).mean(), rel=1e-12)
    mu, _ = model.encode(x)
    np.testing.assert_allclose(r["latent_variance"], mu.var(axis=0, ddof=1), rtol=1e-10)
    assert r["active_units"] == int((mu.var(axis=0, ddof=1) > 1e-2).sum())
    # the same numbers whatever the batch size
    r2 = ev.evaluate(model, x, iw_samples=0, seed=4, batch_size=17)
    assert r2["elbo"] == pytest.approx(r["elbo"], rel=1e-12)
    assert r2["recon_error"] == pytest.approx(r["recon_error"], rel=1e-12)


def test_active_units_of_a_constructed_model(rng):
    """mu_j = h W_j + b_j: columns of zeros make dimensions 2 and 4 inactive (mu constant in x);
    dimension 3 varies, but by less than the 1e-2 threshold."""
    model = VAE(6, 5, hidden=(8,), dtype="float64", seed=1)
    W = model.views()["enc.head.W"]                                  # (8, 2Z): [mu | logvar] columns
    W[:, 0] *= 5.0
    W[:, 1] *= 5.0
    W[:, 2] = 0.0
    W[:, 3] *= 1e-3
    W[:, 4] = 0.0
    x = rng.random((300, 6))
    r = ev.evaluate(model, x)
    var = np.array(r["latent_variance"])
    assert var[2] < 1e-20 and var[4] < 1e-20              # zero up to rounding
    assert 0 < var[3] < 1e-2 < min(var[0], var[1])
    assert r["active_units"] == 2


def test_a_huge_number_of_samples_stays_finite_and_bounded_in_memory(trained):
    """K = 2000 in chunks of 50 on a few examples: finite, and above the K = 20 estimate on average."""
    model, x = trained
    x = x[:8]
    big = ev.iw_log_likelihood_per_example(model, x, 2000, chunk=50, batch_size=200)
    small = ev.iw_log_likelihood_per_example(model, x, 20)
    assert np.isfinite(big).all() and big.mean() > small.mean()


@pytest.mark.parametrize("kw, match", [
    (dict(iw_samples=-1), "iw_samples"),
    (dict(iw_samples=2.5), "iw_samples"),
    (dict(chunk=0), "chunk"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(trained, kw, match):
    model, x = trained
    with pytest.raises(ValueError, match=match):
        ev.evaluate(model, x[:4], **kw)


def test_bad_rows_are_refused(trained):
    model, x = trained
    with pytest.raises(ValueError, match="columns"):
        ev.evaluate(model, x[:, :10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ev.evaluate(model, x * 3)


def test_log_mean_exp_of_chunks_is_exact():
    """LSE_c(b_c + log k_c) - log K = log mean exp over all samples, even at -1e4 nats."""
    rng = np.random.default_rng(0)
    logw = -1e4 + 30 * rng.standard_normal(97)
    direct = np.logaddexp.reduce(logw) - math.log(97)
    acc = -np.inf
    for lo in range(0, 97, 10):
        c = logw[lo:lo + 10]
        b_c = np.logaddexp.reduce(c) - math.log(len(c))
        acc = np.logaddexp(acc, b_c + math.log(len(c)))
    assert acc - math.log(97) == pytest.approx(direct, rel=1e-15)
