"""The ELBO and IWAE bounds mean what they claim (docs/math.md §5).

IWAE with k = 1 is log p(x|z) + log p(z) - log q(z|x) at one sample (checked against scipy.stats
densities); averaged over many eps it is the ELBO; with k > 1 it is not below the ELBO (on average,
and per example against the mean of its own log-weights, by Jensen). The ELBO loss is the batch mean
of -ELBO; free bits floor each dimension's batch-mean KL.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import special, stats

from minivae import VAE, gradcheck
from minivae import distributions as dist
from minivae import objectives as obj

LIKELIHOODS = dist.LIKELIHOODS


def small_model(likelihood, seed=0, x_dim=6, z_dim=2):
    return VAE(x_dim, z_dim, hidden=(8,), activation="tanh", likelihood=likelihood, dtype="float64", seed=seed)


def data(likelihood, n, x_dim, seed=1):
    return gradcheck.make_inputs(likelihood, n, x_dim, np.random.default_rng(seed))


def log_joint_minus_q_by_scipy(model, x, eps):
    """log p(x|z) + log p(z) - log q(z|x) for each eps sample, from scipy.stats densities. (L, n)"""
    mu, logvar = model.encode(x)
    z = mu + np.exp(0.5 * logvar) * eps                                   # (L, n, Z)
    head = np.stack([model.backend.decode(model.params, zl) for zl in z])  # (L, n, K)
    D = model.x_dim
    if model.likelihood == "bernoulli":
        ll = stats.bernoulli.logpmf(x, special.expit(head)).sum(-1)
    elif model.likelihood == "gaussian":
        sd = np.sqrt(model.var_floor + np.exp(head[..., D:]))
        ll = stats.norm.logpdf(x, head[..., :D], sd).sum(-1)
    else:   # continuous Bernoulli: lambda^x (1-lambda)^(1-x) C(lambda), C = l / tanh(l/2)
        lam = special.expit(head)
        ll = (special.xlogy(x, lam) + special.xlog1py(1 - x, -lam) + np.log(head / np.tanh(head / 2))).sum(-1)
    logp = stats.norm.logpdf(z).sum(-1)
    logq = stats.norm.logpdf(z, mu, np.exp(0.5 * logvar)).sum(-1)
    return ll + logp - logq


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_iwae_with_one_sample_is_log_joint_minus_log_q(likelihood):
    model = small_model(likelihood)
    x = data(likelihood, 5, 6)
    eps = np.random.default_rng(2).standard_normal((1, 5, 2))
    np.testing.assert_allclose(model.iwae_bound(x, eps), log_joint_minus_q_by_scipy(model, x, eps)[0],
                               rtol=1e-11)


def test_iwae_of_one_log_weight_is_that_log_weight_bitwise(rng):
    logw = 50 * rng.standard_normal((1, 7))
    assert np.array_equal(obj.iwae_per_example(logw), logw[0])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_iwae_with_one_sample_averages_to_the_elbo(likelihood):
    """Over many eps, the mean of the k = 1 bound is the ELBO with analytic KL (5 standard errors;
    the two differ only by the Monte Carlo estimate of the KL)."""
    model = small_model(likelihood, seed=3)
    x = data(likelihood, 3, 6)
    M = 20000
    eps = np.random.default_rng(4).standard_normal((M, 3, 2))
    f = model.backend.forward(model.params, x, eps)
    logw = obj.log_weights(f["ll"], dist.log_prior(f["z"]), dist.log_posterior_eps(f["logvar"], eps))  # (M, n)
    elbo = model.elbo(x, eps)                        # 1/M sum ll - KL, same eps
    se = (logw - f["ll"]).std(axis=0, ddof=1) / math.sqrt(M)
    assert np.all(np.abs(logw.mean(axis=0) - elbo) < 5 * se), (logw.mean(0), elbo, se)
    # and one by one, the k = 1 bound of the model is exactly these log-weights
    np.testing.assert_allclose(model.iwae_bound(x, eps[:1]), logw[0], rtol=1e-14)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_iwae_is_not_below_the_elbo(likelihood):
    """E[IWAE_k] >= E[IWAE_1] = ELBO, increasing in k (Burda et al. 2015, Theorem 1): averaged over
    many independent draws, with a 4-standard-error allowance."""
    model = small_model(likelihood, seed=5)
    x = data(likelihood, 2, 6)
    rng = np.random.default_rng(6)
    R = 600
    means, ses = {}, {}
    for k in (1, 5, 50):
        draws = np.array([model.iwae_bound(x, rng.standard_normal((k, 2, 2))) for _ in range(R)])  # (R, n)
        means[k], ses[k] = draws.mean(0), draws.std(0, ddof=1) / math.sqrt(R)
    elbo = model.elbo(x, rng.standard_normal((20000, 2, 2)))
    assert np.all(np.abs(means[1] - elbo) < 4 * ses[1]), (means[1], elbo)    # k = 1 is the ELBO
    for k in (5, 50):
        assert np.all(means[k] >= elbo - 4 * ses[k]), (k, means[k], elbo)
    # and at this untrained model the gap is real, not noise: k = 50 is clearly above
    assert np.all(means[50] - elbo > 4 * ses[50]), (means[50], elbo, ses[50])


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_iwae_is_at_least_the_mean_of_its_log_weights(likelihood):
    """For the same k samples, log mean exp >= mean: the IWAE bound is never below the sample ELBO
    (with MC KL) computed from its own eps. Exact, per example, no statistics."""
    model = small_model(likelihood, seed=7)
    x = data(likelihood, 4, 6)
    eps = np.random.default_rng(8).standard_normal((6, 4, 2))
    f = model.backend.forward(model.params, x, eps)
    logw = obj.log_weights(f["ll"], dist.log_prior(f["z"]), dist.log_posterior_eps(f["logvar"], eps))
    assert np.all(model.iwae_bound(x, eps) >= logw.mean(axis=0))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("objective", obj.OBJECTIVES)
def test_loss_is_the_batch_mean_of_the_negative_bound(likelihood, objective):
    model = small_model(likelihood, seed=9)
    x = data(likelihood, 5, 6)
    eps = np.random.default_rng(10).standard_normal((3, 5, 2))
    loss, _ = model.loss_and_grad(x, eps=eps, objective=objective)
    bound = model.elbo(x, eps) if objective == "elbo" else model.iwae_bound(x, eps)
    assert loss == pytest.approx(-bound.mean(), rel=1e-13)
    # beta weighs the KL term of the ELBO
    if objective == "elbo":
        mu, logvar = model.encode(x)
        kl = dist.kl_forward(mu, logvar).sum(-1).mean()
        loss2, _ = model.loss_and_grad(x, eps=eps, beta=2.5)
        assert loss2 - loss == pytest.approx(1.5 * kl, rel=1e-12)


def test_free_bits_charge_the_floor_and_stop_the_kl_gradient():
    """With a floor above every dimension's KL, the loss is -mean ll + beta * Z * floor and the
    gradient is exactly the one without a KL term (beta = 0)."""
    model = small_model("bernoulli", seed=11)
    x = data("bernoulli", 4, 6)
    eps = np.random.default_rng(12).standard_normal((2, 4, 2))
    mu, logvar = model.encode(x)
    floor = 10 * float(dist.kl_forward(mu, logvar).mean(0).max()) + 1.0
    loss_fb, g_fb = model.loss_and_grad(x, eps=eps, beta=0.8, free_bits=floor)
    loss_0, g_0 = model.loss_and_grad(x, eps=eps, beta=0.0)
    assert loss_fb == pytest.approx(loss_0 + 0.8 * 2 * floor, rel=1e-13)
    np.testing.assert_array_equal(g_fb, g_0)
    # a floor of 0 is the plain ELBO
    assert model.loss_and_grad(x, eps=eps, free_bits=0.0)[0] == model.loss_and_grad(x, eps=eps)[0]


def test_free_bits_only_floor_the_dimensions_below_it():
    ll = np.zeros((1, 2))
    kl = np.array([[0.1, 2.0], [0.3, 4.0]])                  # batch means 0.2 and 3.0
    loss, dll, dkl = obj.elbo_loss(ll, kl, beta=1.0, free_bits=1.0)
    assert loss == pytest.approx(1.0 + 3.0)
    np.testing.assert_array_equal(dkl, [[0.0, 0.5], [0.0, 0.5]])


def test_iwae_weights_are_a_softmax():
    logw = np.array([[0.0, 1e4], [math.log(3.0), 1e4 - 50], [-np.inf, 1e4]])
    loss, dlogw = obj.iwae_loss(logw)
    w = -dlogw * logw.shape[1]
    # exp(logw - logsumexp) at |logw| = 1e4 carries the rounding of 1e4: a few ulps of it, ~1e-12
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=8 * np.finfo(float).eps * 1e4)
    np.testing.assert_allclose(w[:, 0], [0.25, 0.75, 0.0], rtol=1e-15)
    assert np.isfinite(loss) and np.all(np.isfinite(dlogw))


@given(a=st.lists(st.floats(-1e300, 1e300), min_size=1, max_size=6), shift=st.floats(-700, 700))
def test_logsumexp_is_stable_and_shift_equivariant(a, shift):
    a = np.array(a)
    out = obj.logsumexp(a[:, None], axis=0)[0]
    assert np.isfinite(out) and out >= a.max() and out <= a.max() + math.log(len(a)) + 1e-12 * abs(a.max())
    # the result m + log(sum exp(a - m)) carries a rounding of order eps * max(1, |m|)
    assert out == pytest.approx(special.logsumexp(a), rel=0, abs=4 * np.finfo(float).eps * max(1.0, abs(a.max())))
    small = np.array([v for v in a if abs(v) < 1e6])
    if small.size:
        assert obj.logsumexp(small + shift) == pytest.approx(obj.logsumexp(small) + shift, rel=1e-12, abs=1e-9)


def test_logsumexp_of_all_minus_infinity_is_minus_infinity():
    with np.errstate(divide="ignore"):                      # log(0), on purpose
        assert obj.logsumexp(np.full((3, 2), -np.inf), axis=0).tolist() == [-np.inf, -np.inf]


@pytest.mark.parametrize("objective", obj.OBJECTIVES)
def test_bad_objective_and_free_bits_with_iwae(objective):
    model = small_model("bernoulli")
    x = data("bernoulli", 2, 6)
    with pytest.raises(ValueError, match="unknown objective 'vae'; expected one of elbo, iwae"):
        model.loss_and_grad(x, objective="vae")
    if objective == "iwae":
        with pytest.raises(ValueError, match="free_bits applies to the ELBO"):
            model.loss_and_grad(x, objective=objective, free_bits=0.5)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_free_bits_over_shares_of_a_minibatch_match_the_whole(backend):
    """A data-parallel rank holds a share of the minibatch. Given the whole batch's decision of which
    dimensions are over the floor (``kl_active``), the shares' losses and gradients, weighted by
    their sizes, are exactly the whole minibatch's: the free-bits objective is the single-process
    one on any number of ranks."""
    model = VAE(6, 3, hidden=(8,), activation="tanh", likelihood="bernoulli", dtype="float64", seed=3,
                backend=backend)
    n = 7
    x = data("bernoulli", n, 6, seed=4)
    eps = np.random.default_rng(5).standard_normal((2, n, 3))
    mu, logvar = model.encode(x)
    kl_dim = dist.kl_forward(mu, logvar).mean(0)
    floor = float(np.sort(kl_dim)[1])                      # between: some dimensions on each side
    floor = 0.5 * (floor + float(np.sort(kl_dim)[0]))
    loss, g = model.loss_and_grad(x, eps=eps, beta=0.9, free_bits=floor)
    active = (kl_dim > floor).astype(float)
    assert 0 < active.sum() < 3
    w_loss, w_g = 0.0, np.zeros_like(g)
    for lo, hi in [(0, 3), (3, 7)]:
        share_x, share_eps = np.ascontiguousarray(x[lo:hi]), np.ascontiguousarray(eps[:, lo:hi])
        l_r, g_r = model.backend.loss_and_grad(model.params, share_x, share_eps, beta=0.9,
                                               free_bits=floor, kl_active=active)
        w_loss += (hi - lo) / n * l_r
        w_g += (hi - lo) / n * g_r
    assert w_loss == pytest.approx(loss, rel=1e-13)
    np.testing.assert_allclose(w_g, g, rtol=1e-12, atol=1e-14)
