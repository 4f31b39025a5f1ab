"""Every hand-derived gradient against centred differences, in float64 (docs/math.md §2-§6).

The whole model: hypothesis draws the dimensions, the depth of encoder and decoder (including none),
the activation, likelihood, objective, L or k, beta, batch size, free bits and variance floor; every
parameter tensor must agree with central differences to a relative error below 1e-6.
Each paired function alone must agree below 1e-7.

relu and leaky_relu have a kink at 0, and free bits one where a dimension's KL equals the floor.
A centred difference that straddles a kink measures a one-sided mix, not the derivative, so an
example whose point lies within KINK_MARGIN of a kink is skipped with ``assume`` (the tolerances are
never loosened). Likewise a float64 centred difference cannot resolve a derivative below about
eps_mach |loss| / h (gradcheck.fd_resolution); a tensor whose whole gradient is that small (e.g.
behind two negative leaky_relu units with beta = 0) is noise for the oracle, so such an example is
skipped too (gradcheck.resolvable). Both skips are rare (a few per cent of random draws).
"""
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from minivae import VAE, gradcheck
from minivae import distributions as dist
from minivae import objectives as obj
from minivae.gradcheck import KINK_MARGIN, PIECE_TOL, check_model, format_report
from minivae.layers import ACTIVATIONS

MODEL_TOL = 1e-6
seeds = st.integers(0, 2**32 - 1)
# beta: exactly 0 (the KL path gives exact zeros) or bounded away from it; a tiny beta would make
# dKL smaller than what a centred difference resolves (gradcheck.fd_resolution)
betas = st.one_of(st.just(0.0), st.floats(0.05, 2.0))
widths = st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple)


def assert_all_ok(checks):
    assert checks, "no tensor was checked"
    assert all(c.ok for c in checks), "\n" + format_report(checks)


# ----------------------------------------------------------------------------------------------
# the whole model
# ----------------------------------------------------------------------------------------------

@st.composite
def model_cases(draw):
    objective = draw(st.sampled_from(obj.OBJECTIVES))
    return dict(
        likelihood=draw(st.sampled_from(dist.LIKELIHOODS)),
        objective=objective,
        activation=draw(st.sampled_from(ACTIVATIONS)),
        x_dim=draw(st.integers(1, 6)),
        z_dim=draw(st.integers(1, 3)),
        hidden=draw(widths),
        dec_hidden=draw(st.one_of(st.none(), widths)),
        n=draw(st.integers(1, 4)),
        samples=draw(st.integers(1, 4)),
        beta=draw(st.floats(0.0, 2.0)),   # a tiny beta is fine here: resolvable() guards
        free_bits=draw(st.one_of(st.just(0.0), st.floats(0.01, 1.0))) if objective == "elbo" else 0.0,
        var_floor=draw(st.sampled_from([1e-4, 1e-2, 0.5])),
        seed=draw(seeds),
    )


@settings(max_examples=150)
@given(case=model_cases())
def test_model_gradient_matches_central_differences(case):
    c = case
    model = VAE(c["x_dim"], c["z_dim"], hidden=c["hidden"], dec_hidden=c["dec_hidden"],
                activation=c["activation"], likelihood=c["likelihood"], dtype="float64",
                seed=c["seed"], var_floor=c["var_floor"])
    rng = np.random.default_rng(c["seed"])
    x = gradcheck.make_inputs(c["likelihood"], c["n"], c["x_dim"], rng)
    eps = rng.standard_normal((c["samples"], c["n"], c["z_dim"]))
    kw = dict(beta=c["beta"], objective=c["objective"], free_bits=c["free_bits"])
    assume(gradcheck.kink_distance(model, x, eps, c["free_bits"]) > KINK_MARGIN)
    assume(gradcheck.resolvable(model, x, eps, MODEL_TOL, **kw))
    checks = check_model(model, x, eps, tol=MODEL_TOL, **kw)
    assert [ch.name for ch in checks] == model.layout.names      # every tensor, in layout order
    assert_all_ok(checks)


@pytest.mark.parametrize("likelihood", dist.LIKELIHOODS)
@pytest.mark.parametrize("objective", obj.OBJECTIVES)
def test_every_likelihood_and_objective_with_two_hidden_layers(likelihood, objective):
    """The fixed grid the hypothesis search may miss: tanh, two hidden layers, L = k = 3, beta != 1."""
    model = VAE(5, 2, hidden=(4, 3), activation="tanh", likelihood=likelihood, dtype="float64", seed=3)
    rng = np.random.default_rng(3)
    x = gradcheck.make_inputs(likelihood, 3, 5, rng)
    eps = rng.standard_normal((3, 3, 2))
    assert_all_ok(check_model(model, x, eps, tol=MODEL_TOL, beta=0.6, objective=objective))


def test_check_model_refuses_float32():
    model = VAE(4, 2, hidden=(3,), dtype="float32")
    with pytest.raises(ValueError, match="float64"):
        check_model(model, np.zeros((2, 4)), np.zeros((1, 2, 2)))


# ----------------------------------------------------------------------------------------------
# each piece alone
# ----------------------------------------------------------------------------------------------

@given(n=st.integers(1, 5), fan_in=st.integers(1, 6), fan_out=st.integers(1, 6), seed=seeds)
def test_linear_pair(n, fan_in, fan_out, seed):
    assert_all_ok(gradcheck.check_linear(np.random.default_rng(seed), n, fan_in, fan_out))


@given(kind=st.sampled_from(ACTIVATIONS), n=st.integers(1, 5), width=st.integers(1, 6), seed=seeds)
def test_activation_pair(kind, n, width, seed):
    assert_all_ok(gradcheck.check_activation(kind, np.random.default_rng(seed), n, width))


@given(L=st.integers(1, 4), n=st.integers(1, 4), z_dim=st.integers(1, 4), seed=seeds)
def test_reparam_pair(L, n, z_dim, seed):
    assert_all_ok(gradcheck.check_reparam(np.random.default_rng(seed), L, n, z_dim))


@given(n=st.integers(1, 4), z_dim=st.integers(1, 4), seed=seeds)
def test_kl_pair(n, z_dim, seed):
    assert_all_ok(gradcheck.check_kl(np.random.default_rng(seed), n, z_dim))


@given(likelihood=st.sampled_from(dist.LIKELIHOODS), L=st.integers(1, 3), n=st.integers(1, 3),
       x_dim=st.integers(1, 6), var_floor=st.sampled_from([1e-4, 1e-2, 0.5]), seed=seeds)
def test_likelihood_pair(likelihood, L, n, x_dim, var_floor, seed):
    assert_all_ok(gradcheck.check_loglik(likelihood, np.random.default_rng(seed), L, n, x_dim,
                                         var_floor=var_floor))


@given(logit=st.one_of(st.floats(-30, 30), st.floats(-0.02, 0.02), st.sampled_from(gradcheck.CB_SPECIAL_LOGITS)),
       x=st.floats(0.0, 1.0))
def test_continuous_bernoulli_gradient_at_any_logit(logit, x):
    """d/dl log CB(x; l) everywhere, across the Taylor switch at |l| = 1e-2 and at l = 0."""
    xs = np.array([x])
    l = np.array([logit])
    numeric = gradcheck.numerical_grad(lambda: dist.cb_logprob(xs, l).sum(), l)
    analytic = dist.cb_grad(xs, l)
    # both sides are O(1) or exactly comparable: absolute agreement on the scale of 1
    assert abs(analytic[0] - numeric[0]) < PIECE_TOL * max(1.0, abs(analytic[0]))


@given(L=st.integers(1, 3), n=st.integers(1, 4), z_dim=st.integers(1, 4), beta=betas, seed=seeds)
def test_elbo_loss_pair(L, n, z_dim, beta, seed):
    assert_all_ok(gradcheck.check_elbo_loss(np.random.default_rng(seed), L, n, z_dim, beta))


@given(L=st.integers(1, 3), n=st.integers(1, 4), z_dim=st.integers(1, 4), beta=st.floats(0.1, 2.0),
       free_bits=st.floats(0.05, 1.5), seed=seeds)
def test_elbo_loss_pair_with_free_bits(L, n, z_dim, beta, free_bits, seed):
    rng = np.random.default_rng(seed)
    ll = rng.standard_normal((L, n))
    kl = rng.uniform(0.0, 2.0, size=(n, z_dim))
    assume(np.min(np.abs(kl.mean(axis=0) - free_bits)) > KINK_MARGIN)
    _, dll, dkl = obj.elbo_loss(ll, kl, beta, free_bits)
    f = lambda: obj.elbo_loss(ll, kl, beta, free_bits)[0]  # noqa: E731
    assert gradcheck.rel_error(dll, gradcheck.numerical_grad(f, ll)) < PIECE_TOL
    assert gradcheck.rel_error(dkl, gradcheck.numerical_grad(f, kl)) < PIECE_TOL


@given(k=st.integers(1, 5), n=st.integers(1, 4), seed=seeds)
def test_iwae_loss_pair(k, n, seed):
    assert_all_ok(gradcheck.check_iwae_loss(np.random.default_rng(seed), k, n))


@given(L=st.integers(1, 3), n=st.integers(1, 3), z_dim=st.integers(1, 4), seed=seeds)
def test_log_prior_and_log_posterior_gradients(L, n, z_dim, seed):
    """The two IWAE terms the backend differentiates inline: d log p(z)/dz = -z and, in eps form
    with eps fixed, d log q/dlogvar = -1/2 (docs/math.md §3.3)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((L, n, z_dim))
    logvar = rng.standard_normal((n, z_dim))
    eps = rng.standard_normal((L, n, z_dim))
    dz_num = gradcheck.numerical_grad(lambda: dist.log_prior(z).sum(), z)
    assert gradcheck.rel_error(-z, dz_num) < PIECE_TOL
    dlv_num = gradcheck.numerical_grad(lambda: dist.log_posterior_eps(logvar, eps).sum(), logvar)
    assert gradcheck.rel_error(np.full_like(logvar, -0.5 * L), dlv_num) < PIECE_TOL


# ----------------------------------------------------------------------------------------------
# the suite that `minivae gradcheck` prints
# ----------------------------------------------------------------------------------------------

def test_run_suite_passes_and_prints_every_case():
    lines = []
    assert gradcheck.run_suite(out=lines.append) is True
    text = "\n".join(lines)
    for lik in dist.LIKELIHOODS:
        for o in obj.OBJECTIVES:
            assert f"{lik} / {o}:" in text and f"{lik} {o} tanh" in text
    for piece in ("linear dW", "relu da", "tanh da", "softplus da", "leaky_relu da", "reparam dlogvar",
                  "kl dlogvar", "bernoulli dhead", "continuous_bernoulli dhead", "gaussian dhead",
                  "iwae_loss dlogw"):
        assert f"piece {piece}" in text
    assert "FAIL" not in text and "summary" in text


def test_run_suite_catches_the_std_for_variance_mix_up(monkeypatch):
    """The cautionary tale of DESIGN.md: a KL gradient that treats exp(logvar) as the std
    (d/dlogvar = (exp(logvar/2) - 1)/2) must make the suite fail, with FAIL in the table."""
    def wrong_kl_backward(dkl, mu, logvar):
        return dkl * mu, dkl * 0.5 * np.expm1(0.5 * logvar)
    monkeypatch.setattr(dist, "kl_backward", wrong_kl_backward)
    lines = []
    assert gradcheck.run_suite(out=lines.append) is False
    text = "\n".join(lines)
    assert "FAIL" in text and "FAILED" in lines[-1]
    assert any(line.startswith("piece kl dlogvar") and line.rstrip().endswith("FAIL") for line in text.splitlines())
