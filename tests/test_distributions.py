"""The posterior and the likelihoods mean what they claim (docs/math.md §3-§4).

Gradient checks only prove that a backward pass matches its own forward pass. These tests check
the forward passes against independent definitions: scipy.stats densities, numerical integrals,
Monte Carlo estimates with fixed seeds.
"""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, special, stats

from minivae import VAE
from minivae import distributions as dist

# the continuous Bernoulli: 0, both sides of the Taylor switch at |l| = 1e-2, small, moderate, large
CB_LOGITS = [0.0, 1e-3, -1e-3, 5e-3, -5e-3, 0.00999, -0.00999, 0.01, -0.01, 0.0101, -0.0101,
             0.1, -0.1, 0.5, -0.5, 1.0, -1.0, 2.5, -2.5, 7.0, -7.0, 20.0, -20.0]


# ----------------------------------------------------------------------------------------------
# reparameterization  §3.1
# ----------------------------------------------------------------------------------------------

def test_eps_zero_gives_z_equal_mu(rng):
    mu = rng.standard_normal((4, 3))
    logvar = rng.standard_normal((4, 3))
    z, _ = dist.reparam_forward(mu, logvar, np.zeros((2, 4, 3)))
    assert np.array_equal(z, np.broadcast_to(mu, (2, 4, 3)))


def test_eps_zero_gives_z_equal_mu_inside_the_model(rng):
    model = VAE(6, 2, hidden=(5,), dtype="float64", seed=1)
    x = (rng.random((3, 6)) < 0.5).astype(float)
    f = model.backend.forward(model.params, x, np.zeros((1, 3, 2)))
    mu, _ = model.encode(x)
    assert np.array_equal(f["z"][0], mu)


@pytest.mark.parametrize("mu,logvar", [(0.0, 0.0), (1.5, -2.0), (-0.7, 1.2), (3.0, -4.0)])
def test_sample_variance_of_z_is_exp_logvar(mu, logvar):
    """z = mu + exp(logvar/2) eps has mean mu and variance exp(logvar) (not exp(logvar)^2):
    the chi-square test of a normal variance and a KS test against N(mu, exp(logvar))."""
    N = 20000
    eps = np.random.default_rng(12345).standard_normal((N, 1, 1))
    z, _ = dist.reparam_forward(np.array([[mu]]), np.array([[logvar]]), eps)
    z = z.ravel()
    var = math.exp(logvar)
    stat = (N - 1) * z.var(ddof=1) / var                       # ~ chi2(N-1) when var is right
    p_var = 2 * min(stats.chi2.cdf(stat, N - 1), stats.chi2.sf(stat, N - 1))
    assert p_var > 1e-3, f"sample variance {z.var(ddof=1):.4g} vs exp(logvar) = {var:.4g}"
    assert stats.ttest_1samp(z, mu).pvalue > 1e-3
    assert stats.kstest(z, stats.norm(mu, math.sqrt(var)).cdf).pvalue > 1e-3
    # and it is sharp: the std-for-variance mix-up (var = exp(logvar)^2) is rejected outright
    if logvar != 0.0:
        wrong = (N - 1) * z.var(ddof=1) / var ** 2
        assert 2 * min(stats.chi2.cdf(wrong, N - 1), stats.chi2.sf(wrong, N - 1)) < 1e-6


# ----------------------------------------------------------------------------------------------
# KL(q || N(0, I))  §3.2
# ----------------------------------------------------------------------------------------------

finite = dict(allow_nan=False, allow_infinity=False)


@given(mu=st.floats(-1e3, 1e3, **finite), logvar=st.floats(-30, 30, **finite))
def test_kl_is_never_negative(mu, logvar):
    for dtype in (np.float64, np.float32):
        kl = dist.kl_forward(np.array([mu], dtype=dtype), np.array([logvar], dtype=dtype))
        assert kl[0] >= 0, (dtype, kl)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kl_is_never_negative_near_the_prior(dtype):
    """Where 1 + logvar - exp(logvar) cancels (logvar near 0), rounding must not make KL < 0."""
    logvar = np.linspace(-1e-3, 1e-3, 20001).astype(dtype)
    for mu in (0.0, 1e-6):
        kl = dist.kl_forward(np.full_like(logvar, mu), logvar)
        assert kl.dtype == dtype and kl.min() >= 0, kl.min()


def test_kl_is_zero_exactly_at_the_prior():
    assert dist.kl_forward(np.zeros(3), np.zeros(3)).tolist() == [0.0, 0.0, 0.0]


@given(mu=st.floats(-10, 10, **finite), logvar=st.floats(-10, 10, **finite))
def test_kl_is_positive_away_from_the_prior(mu, logvar):
    if abs(mu) < 1e-3 and abs(logvar) < 1e-3:
        return                                   # the neighbourhood of the one zero
    assert dist.kl_forward(np.array([mu]), np.array([logvar]))[0] > 0


def test_kl_matches_a_monte_carlo_estimate():
    """KL = E_q[log q(z) - log p(z)], with scipy.stats densities, within 5 standard errors."""
    rng = np.random.default_rng(7)
    mu = np.array([0.0, 1.0, -2.0, 0.3, 0.0])
    logvar = np.array([0.0, -1.0, 0.5, 2.0, -3.0])
    std = np.exp(0.5 * logvar)
    z = mu + std * rng.standard_normal((200000, 5))
    terms = stats.norm.logpdf(z, mu, std) - stats.norm.logpdf(z)           # (S, Z)
    estimate, se = terms.mean(axis=0), terms.std(axis=0, ddof=1) / math.sqrt(len(z))
    analytic = dist.kl_forward(mu, logvar)
    assert np.all(np.abs(estimate - analytic) < 5 * se + 1e-12), (estimate, analytic, se)


def test_log_prior_and_log_posterior_match_scipy(rng):
    mu = rng.standard_normal((3, 2))
    logvar = rng.standard_normal((3, 2))
    eps = rng.standard_normal((4, 3, 2))
    z, _ = dist.reparam_forward(mu, logvar, eps)
    np.testing.assert_allclose(dist.log_prior(z), stats.norm.logpdf(z).sum(-1), rtol=1e-13)
    logq = stats.norm.logpdf(z, mu, np.exp(0.5 * logvar)).sum(-1)
    np.testing.assert_allclose(dist.log_posterior_eps(logvar, eps), logq, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Bernoulli  §4.1
# ----------------------------------------------------------------------------------------------

def test_bernoulli_logprob_matches_scipy(rng):
    # scipy's logpmf takes p = sigmoid(l) and loses digits of log(1 - p) once p is near 1, so it is
    # the reference for moderate logits; scipy.special.log_expit (log sigmoid) for any logit
    logits = np.clip(3 * rng.standard_normal(200), -10, 10)
    x = (rng.random(200) < 0.5).astype(float)
    np.testing.assert_allclose(dist.bernoulli_logprob(x, logits),
                               stats.bernoulli.logpmf(x, special.expit(logits)), rtol=1e-9, atol=1e-12)
    logits = 30 * rng.standard_normal(200)
    ref = np.where(x == 1, special.log_expit(logits), special.log_expit(-logits))
    np.testing.assert_allclose(dist.bernoulli_logprob(x, logits), ref, rtol=1e-13, atol=1e-300)
    np.testing.assert_allclose(dist.likelihood_mean("bernoulli", logits, 200), special.expit(logits),
                               rtol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bce_finite_and_exact_at_extreme_logits(dtype):
    logits = np.array([1e4, 1e4, -1e4, -1e4, 1e4, -1e4], dtype=dtype)
    x = np.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5], dtype=dtype)
    lp = dist.bernoulli_logprob(x, logits)
    g = dist.bernoulli_grad(x, logits)
    assert lp.dtype == dtype and g.dtype == dtype
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(g))
    # log p is -(max(l,0) - l x): 0 when the logit is right, -1e4 when it is wrong, -5e3 at x = 1/2
    np.testing.assert_array_equal(lp, np.array([0.0, -1e4, -1e4, 0.0, -5e3, -5e3], dtype=dtype))
    np.testing.assert_array_equal(g, np.array([0.0, -1.0, 1.0, 0.0, -0.5, 0.5], dtype=dtype))


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_loss_and_gradient_finite_when_the_decoder_saturates(likelihood, dtype):
    """A decoder whose logits are +-1e4: the whole step stays finite in both precisions."""
    model = VAE(4, 2, hidden=(3,), likelihood=likelihood, dtype=dtype, seed=0)
    model.views()["dec.head.b"][...] = [1e4, -1e4, 1e4, -1e4]
    x = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    loss, grad = model.loss_and_grad(x, eps=np.zeros((1, 2, 2)))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss > 1e4 if likelihood == "bernoulli" else np.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# continuous Bernoulli  §4.2
# ----------------------------------------------------------------------------------------------

def cb_density(x, logit):
    return math.exp(float(dist.cb_logprob(np.array(x), np.array(logit))))


@pytest.mark.parametrize("logit", CB_LOGITS)
def test_continuous_bernoulli_density_integrates_to_one(logit):
    total, err = integrate.quad(cb_density, 0.0, 1.0, args=(logit,), epsabs=1e-13, epsrel=1e-12, limit=200)
    assert abs(total - 1.0) < 1e-10, (logit, total, err)


@pytest.mark.parametrize("logit", CB_LOGITS)
def test_continuous_bernoulli_mean_is_the_integral_of_x_p(logit):
    m, _ = integrate.quad(lambda x: x * cb_density(x, logit), 0.0, 1.0, epsabs=1e-13, epsrel=1e-12, limit=200)
    assert abs(dist.cb_mean(np.array(logit)) - m) < 1e-10


def test_continuous_bernoulli_log_normalizer_matches_its_definition():
    """log C(l) = log(l / tanh(l/2)) (accurate in float64 for l != 0), and log 2 at l = 0."""
    l = np.concatenate([np.geomspace(1e-7, 50, 400), -np.geomspace(1e-7, 50, 400)])
    np.testing.assert_allclose(dist.cb_log_norm(l), np.log(l / np.tanh(l / 2)), rtol=1e-14, atol=1e-15)
    assert dist.cb_log_norm(np.array(0.0)) == math.log(2.0)
    # far out it is log|l| (tanh(l/2) = 1 in float64), without overflow
    big = np.array([1e3, -1e3, 1e4, -1e4])
    np.testing.assert_allclose(dist.cb_log_norm(big), np.log(np.abs(big)), rtol=1e-15)


def test_continuous_bernoulli_log_normalizer_derivative_matches_its_definition():
    """d log C/dl = 1/l - 1/sinh(l), evaluated where that expression is accurate (|l| >= 1e-2)."""
    l = np.concatenate([np.geomspace(1e-2, 30, 300), -np.geomspace(1e-2, 30, 300)])
    np.testing.assert_allclose(dist.cb_log_norm_grad(l), 1 / l - 1 / np.sinh(l), rtol=1e-10, atol=1e-13)
    assert dist.cb_log_norm_grad(np.array(0.0)) == 0.0
    assert np.all(np.isfinite(dist.cb_log_norm_grad(np.array([1e3, -1e3, 1e4, -1e4]))))


@pytest.mark.parametrize("f", [dist.cb_log_norm, dist.cb_log_norm_grad], ids=["log_norm", "log_norm_grad"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_continuous_bernoulli_is_continuous_across_the_taylor_switch(f, sign, dtype):
    """At the switch (|l| = 1e-2 in float64, 0.3 in float32) the code changes from the series to the
    closed form: the last float on each side agree, and both agree with the definition
    log(l / tanh(l/2)) or 1/l - 1/sinh(l) evaluated in float64, to a few ulps of the largest term
    of the closed form (|log C| ~ log 2 for log C; 1/|l| for its derivative, which cancels to l/6)."""
    s = dtype(sign * dist._cb_switch(np.zeros(1, dtype=dtype)))
    inside = np.array([np.nextafter(s, dtype(0))], dtype=dtype)      # series
    outside = np.array([s], dtype=dtype)                             # closed form
    a, b = f(inside)[0], f(outside)[0]
    assert a.dtype == b.dtype == dtype
    l = float(s)
    if f is dist.cb_log_norm:
        exact, scale = math.log(l / math.tanh(l / 2)), 1.0
    else:
        exact, scale = 1 / l - 1 / math.sinh(l), 1 / abs(l)
    tol = 4 * np.finfo(dtype).eps * scale
    assert abs(float(a) - float(b)) <= tol, (a, b, tol)
    assert abs(float(a) - exact) <= tol and abs(float(b) - exact) <= tol, (a, b, exact, tol)


def cb_cdf(t, logit):
    """F(t) = (e^{l t} - 1)/(e^l - 1), written without overflow for large |l|; t at l = 0."""
    if abs(logit) < 1e-6:
        return t
    if logit < 0:
        return np.expm1(logit * t) / np.expm1(logit)
    return np.exp(logit * (t - 1)) * np.expm1(-logit * t) / np.expm1(-logit)


@pytest.mark.parametrize("logit", [0.0, 1e-8, 5e-3, -0.3, 1.0, -4.0, 15.0, -60.0, 1e3])
def test_continuous_bernoulli_samples_match_its_distribution(logit):
    """Inverse-CDF samples: mean matches cb_mean (5 standard errors) and a KS test against the CDF
    F(x) = (e^{l x} - 1)/(e^l - 1) (x itself at l = 0)."""
    u = np.random.default_rng(99).random(20000)
    x = dist.cb_sample(np.full(u.shape, logit), u)
    assert np.all((x >= 0) & (x <= 1))
    mean = dist.cb_mean(np.array(logit))
    assert abs(x.mean() - mean) < 5 * x.std(ddof=1) / math.sqrt(len(x)) + 1e-12
    assert stats.kstest(x, lambda t: cb_cdf(t, logit)).pvalue > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_continuous_bernoulli_finite_at_extreme_logits(dtype):
    l = np.array([1e4, -1e4, 0.0, 1e-30], dtype=dtype)
    for x in (0.0, 0.5, 1.0):
        xs = np.full(l.shape, x, dtype=dtype)
        assert np.all(np.isfinite(dist.cb_logprob(xs, l)))
        assert np.all(np.isfinite(dist.cb_grad(xs, l)))
    assert np.all(np.isfinite(dist.cb_mean(l)))


# ----------------------------------------------------------------------------------------------
# Gaussian with a variance floor  §4.3
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("var_floor", [1e-4, 1e-2, 1.0])
def test_gaussian_logprob_matches_scipy_with_the_effective_variance(rng, var_floor):
    x = 3 * rng.standard_normal(100)
    m = rng.standard_normal(100)
    s = 4 * rng.standard_normal(100)
    var = var_floor + np.exp(s)
    np.testing.assert_allclose(dist.gaussian_logprob(x, m, s, var_floor),
                               stats.norm.logpdf(x, m, np.sqrt(var)), rtol=1e-12)


def test_gaussian_variance_floor_behaviour():
    """var = var_floor + exp(s) (docs/math.md §4.3): never below the floor, equal to it when
    exp(s) underflows, so log p stays bounded (<= -1/2 log(2 pi var_floor)) and its gradient finite."""
    floor = dist.DEFAULT_VAR_FLOOR
    s = np.array([-1e3, -50.0, 0.0, 5.0])
    var = dist.gaussian_var(s, floor)
    assert np.all(var >= floor) and var[0] == floor
    assert var[2] == floor + 1.0
    x = m = np.zeros(4)
    lp = dist.gaussian_logprob(x, m, s, floor)
    assert np.all(lp <= -0.5 * np.log(2 * np.pi * floor) + 1e-12)
    assert lp[0] == pytest.approx(stats.norm.logpdf(0.0, 0.0, math.sqrt(floor)), rel=1e-14)
    dm, ds = dist.gaussian_grad(x + 1.0, m, s, floor)
    assert np.all(np.isfinite(dm)) and np.all(np.isfinite(ds))
    assert ds[0] == 0.0                                    # s far below the floor: no pull on s


def test_gaussian_decode_reports_the_floored_log_variance():
    model = VAE(3, 2, hidden=(4,), likelihood="gaussian", dtype="float64", var_floor=1e-3, seed=0)
    model.views()["dec.head.b"][3:] = -1e3                 # exp(s) underflows: the floor alone
    mean, logvar = model.decode(np.zeros((2, 2)))
    assert mean.shape == logvar.shape == (2, 3)
    np.testing.assert_allclose(logvar, math.log(1e-3), rtol=1e-14)


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_gaussian_variance_floor_must_be_positive(bad):
    with pytest.raises(ValueError, match="var_floor must be a positive number"):
        VAE(3, 2, hidden=(4,), likelihood="gaussian", var_floor=bad)


# ----------------------------------------------------------------------------------------------
# through the model: loglik_forward sums pixel log-densities
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", dist.LIKELIHOODS)
def test_loglik_forward_sums_the_pixel_log_densities(rng, likelihood):
    D = 5
    K = dist.head_width(likelihood, D)
    head = 2 * rng.standard_normal((2, 3, K))
    if likelihood == "bernoulli":
        x = (rng.random((3, D)) < 0.5).astype(float)
        ref = stats.bernoulli.logpmf(x, special.expit(head)).sum(-1)
    elif likelihood == "gaussian":
        x = rng.standard_normal((3, D))
        sd = np.sqrt(dist.DEFAULT_VAR_FLOOR + np.exp(head[..., D:]))
        ref = stats.norm.logpdf(x, head[..., :D], sd).sum(-1)
    else:
        x = rng.random((3, D))
        ref = np.vectorize(lambda xi, li: math.log(cb_density(xi, li)))(np.broadcast_to(x, head.shape), head).sum(-1)
    np.testing.assert_allclose(dist.loglik_forward(likelihood, x, head), ref, rtol=1e-12)
