"""Stacks of S stochastic layers (docs/math.md §11) and the DReG estimator (§12), on the NumPy reference.

Gradients: every tensor of the S = 1, 2, 3 models (ELBO, IWAE, and DReG's generative part) against
centred differences in float64 below 1e-6; DReG's inference part against centred differences of its
surrogate (log q with the inference parameters frozen); each new paired function alone below 1e-7.
Meaning: IWAE with k = 1 is the log-weight, computed here independently with scipy densities; the
bound rises with k on average; the ELBO is the mean log-weight up to the top layer's KL estimate;
DReG's generative gradient is IWAE's exactly and its inference gradient is unbiased for IWAE's.
The skips (``assume``) are those of tests/test_gradients.py: kinks and unresolvable tensors.
"""
import json
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import special, stats

from minivae import VAE, gradcheck
from minivae import distributions as dist
from minivae import objectives as obj
from minivae.checkpoint import CheckpointError
from minivae.gradcheck import KINK_MARGIN, PIECE_TOL, check_model, format_report
from minivae.kernels.numpy_ import NumpyBackend
from minivae.layers import ACTIVATIONS

MODEL_TOL = 1e-6
seeds = st.integers(0, 2**32 - 1)
widths = st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple)


def assert_all_ok(checks):
    assert checks, "no tensor was checked"
    assert all(c.ok for c in checks), "\n" + format_report(checks)


def stack_eps(rng, L, n, z_dims):
    eps = tuple(rng.standard_normal((L, n, z)) for z in z_dims)
    return eps[0] if len(z_dims) == 1 else eps


def two_layer(likelihood="bernoulli", seed=0, activation="tanh", x_dim=6, z=(3, 2)):
    return VAE(x_dim, z, hidden=((5, 4), (3,)), activation=activation, likelihood=likelihood,
               dtype="float64", seed=seed)


# ----------------------------------------------------------------------------------------------
# the configuration: z_dim, hidden and dec_hidden in both forms, names, flat order, checkpoints
# ----------------------------------------------------------------------------------------------

def test_one_layer_keeps_its_int_z_dim_and_names():
    m = VAE(6, 2, hidden=(5, 4), dtype="float64")
    assert m.z_dim == 2 and m.z_dims == (2,) and m.n_stochastic == 1
    assert m.hidden == (5, 4) and m.dec_hidden == (4, 5)
    assert [p for p, _, _ in m.layout.layers] == ["enc.0", "enc.1", "enc.head", "dec.0", "dec.1", "dec.head"]
    # a 1-tuple z_dim and one tuple per layer mean the same model
    m1 = VAE(6, (2,), hidden=((5, 4),), dtype="float64")
    assert m1.z_dim == 2 and m1.layout.layers == m.layout.layers


def test_two_layer_names_shapes_and_flat_order():
    m = VAE(784, (100, 50), hidden=((200, 200), (100, 100)), activation="tanh", dtype="float64")
    assert m.z_dims == (100, 50) and m.z_dim == (100, 50) and m.n_stochastic == 2
    assert m.layout.layers == [
        ("enc.0", 784, 200), ("enc.1", 200, 200), ("enc.head", 200, 200),
        ("enc2.0", 100, 100), ("enc2.1", 100, 100), ("enc2.head", 100, 100),
        ("dec2.0", 50, 100), ("dec2.1", 100, 100), ("dec2.head", 100, 200),
        ("dec.0", 100, 200), ("dec.1", 200, 200), ("dec.head", 200, 784)]
    views = m.layout.views(m.params)
    assert views["enc2.head.W"].shape == (100, 100) and views["dec2.head.b"].shape == (200,)


def test_hidden_given_once_applies_to_every_block_and_dec_hidden_overrides():
    m = VAE(6, (3, 2, 2), hidden=(4,), dtype="float64")
    assert m.hidden == ((4,),) * 3 and m.dec_hidden == ((4,),) * 3
    m = VAE(6, (3, 2), hidden=((5, 4), (3,)), dec_hidden=((7,), ()), dtype="float64")
    assert m.dec_hidden == ((7,), ())
    assert [p for p, _, _ in m.layout.layers] == ["enc.0", "enc.1", "enc.head", "enc2.0", "enc2.head",
                                                    "dec2.head", "dec.0", "dec.head"]
    m = VAE(6, (3, 2), hidden=((5, 4), (3,)), dtype="float64")
    assert m.dec_hidden == ((4, 5), (3,))                     # each block mirrored


@pytest.mark.parametrize("kwargs,match", [
    (dict(z_dim=(3, 0)), "z_dim must be a positive integer"),
    (dict(z_dim=()), "z_dim must be a positive integer"),
    (dict(z_dim=(3, 2.5)), "z_dim must be a positive integer"),
    (dict(z_dim=(3, 2), hidden=((4,), (3,), (2,))), r"one tuple of widths per stochastic layer \(2\)"),
    (dict(z_dim=(3, 2), dec_hidden=((4,),)), r"dec_hidden must give one tuple of widths per stochastic layer"),
    (dict(z_dim=(3, 2), hidden=((4,), (0,))), "hidden must be a sequence of positive integers"),
])
def test_bad_stack_configuration_is_refused(kwargs, match):
    args = dict(x_dim=4, z_dim=2, hidden=(3,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        VAE(**args)


@pytest.mark.parametrize("z", [(3, 2), (2, 2, 1)])
def test_save_load_round_trip_for_any_depth(tmp_path, z):
    m = VAE(6, z, hidden=(4,), dec_hidden=(3, 2), activation="softplus", likelihood="gaussian",
            dtype="float64", seed=5)
    m.params[...] = np.random.default_rng(0).standard_normal(m.params.shape)
    m.save(tmp_path / "m.npz")
    m2 = VAE.load(tmp_path / "m.npz")
    assert m2.config() == m.config() and m2.z_dims == z
    assert m2.layout.layers == m.layout.layers and np.array_equal(m2.params, m.params)
    assert VAE.from_config(m.config()).layout.layers == m.layout.layers


def test_a_two_layer_checkpoint_with_the_wrong_size_is_refused(tmp_path):
    m = two_layer()
    cfg = dict(m.config(), z_dim=[3, 1])
    from minivae import checkpoint
    checkpoint.save(tmp_path / "bad.npz", {"kind": "model", "config": cfg}, {"params": m.params})
    with pytest.raises(CheckpointError, match="the config implies"):
        VAE.load(tmp_path / "bad.npz")


def test_eps_per_layer_is_checked():
    m = two_layer()
    x = np.full((2, 6), 0.5)
    with pytest.raises(ValueError, match="eps must be a sequence of 2 arrays"):
        m.loss_and_grad(x, eps=np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"eps\[1\] must have shape \(2, 2\) or \(L, 2, 2\)"):
        m.loss_and_grad(x, eps=(np.zeros((2, 3)), np.zeros((2, 3))))
    with pytest.raises(ValueError, match="the same number of samples L"):
        m.loss_and_grad(x, eps=(np.zeros((2, 2, 3)), np.zeros((3, 2, 2))))
    with pytest.raises(ValueError, match=r"eps\[0\] must be finite"):
        m.loss_and_grad(x, eps=(np.full((2, 3), np.nan), np.zeros((2, 2))))
    # (n, Z_l) arrays are one sample each; None draws one array per layer
    l2, _ = m.loss_and_grad(x, eps=(np.zeros((2, 3)), np.zeros((2, 2))))
    l3, _ = m.loss_and_grad(x, eps=(np.zeros((1, 2, 3)), np.zeros((1, 2, 2))))
    assert l2 == l3
    assert np.isfinite(m.loss_and_grad(x, samples=3, objective="iwae")[0])


def test_estimators_and_their_limits():
    assert obj.ESTIMATORS == ("reparam", "score", "dreg")
    m = two_layer()
    x = np.full((2, 6), 0.5)
    with pytest.raises(ValueError, match="unknown estimator 'reinforce'; expected one of reparam, score, dreg"):
        m.loss_and_grad(x, estimator="reinforce")
    with pytest.raises(ValueError, match="estimator 'dreg' applies to the iwae objective only"):
        m.loss_and_grad(x, estimator="dreg")
    with pytest.raises(ValueError, match="free_bits applies to models with one stochastic layer only"):
        m.loss_and_grad(x, free_bits=0.1)


# ----------------------------------------------------------------------------------------------
# every gradient against centred differences, S in {1, 2, 3}
# ----------------------------------------------------------------------------------------------

@st.composite
def stack_cases(draw):
    S = draw(st.integers(1, 3))
    objective, estimator = draw(st.sampled_from([("elbo", "reparam"), ("iwae", "reparam"), ("iwae", "dreg")]))
    per_layer = draw(st.booleans())
    return dict(
        z_dims=tuple(draw(st.integers(1, 3)) for _ in range(S)),
        hidden=tuple(draw(widths) for _ in range(S)) if per_layer else draw(widths),
        dec_hidden=draw(st.one_of(st.none(), widths)),
        likelihood=draw(st.sampled_from(dist.LIKELIHOODS)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        objective=objective, estimator=estimator,
        x_dim=draw(st.integers(1, 5)), n=draw(st.integers(1, 3)), samples=draw(st.integers(1, 3)),
        beta=draw(st.one_of(st.just(1.0), st.floats(0.1, 2.0))),
        seed=draw(seeds))


@settings(max_examples=60, deadline=None)
@given(case=stack_cases())
def test_stack_gradient_matches_central_differences(case):
    """ELBO and IWAE: every tensor. DReG: the generative tensors (dec*), which are IWAE's."""
    c = case
    model = VAE(c["x_dim"], c["z_dims"], hidden=c["hidden"], dec_hidden=c["dec_hidden"],
                activation=c["activation"], likelihood=c["likelihood"], dtype="float64", seed=c["seed"])
    rng = np.random.default_rng(c["seed"])
    x = gradcheck.make_inputs(c["likelihood"], c["n"], c["x_dim"], rng)
    eps = stack_eps(rng, c["samples"], c["n"], c["z_dims"])
    kw = dict(beta=c["beta"], objective=c["objective"], estimator=c["estimator"])
    assume(gradcheck.kink_distance(model, x, eps) > KINK_MARGIN)
    assume(gradcheck.resolvable(model, x, eps, MODEL_TOL, **kw))
    checks = check_model(model, x, eps, tol=MODEL_TOL, **kw)
    assert [ch.name for ch in checks] == model.layout.names
    if c["estimator"] == "dreg":
        checks = [ch for ch in checks if ch.name.startswith("dec")]
    assert_all_ok(checks)


@pytest.mark.parametrize("likelihood", dist.LIKELIHOODS)
@pytest.mark.parametrize("objective", obj.OBJECTIVES)
def test_two_layer_grid(likelihood, objective):
    """The fixed grid: tanh, two stochastic layers with their own depths, L = k = 3, beta != 1."""
    model = two_layer(likelihood, seed=3)
    rng = np.random.default_rng(3)
    x = gradcheck.make_inputs(likelihood, 3, 6, rng)
    eps = stack_eps(rng, 3, 3, model.z_dims)
    assert_all_ok(check_model(model, x, eps, tol=MODEL_TOL, beta=0.6, objective=objective))


def dreg_surrogate(model, x, eps, beta):
    """The function whose gradient w.r.t. the inference parameters DReG computes (§12):

        F(phi) = sum_li c_li log w^_li(phi),   c = dreg_weights(log w at phi0)  (held fixed)

    where log w^ is log w with every log q(z_l|z_{l-1}) = log N(z_l; mu_l, logvar_l) whose (mu_l,
    logvar_l) come from the inference blocks at the frozen parameters phi0, evaluated at z_{l-1}, z_l
    drawn with phi. Returns F as a closure over ``model.params`` (which gradcheck perturbs)."""
    be = NumpyBackend(model.spec, model.dtype)
    frozen = model.params.copy()
    c = obj.dreg_weights(be.log_weights(be.forward(frozen, x, eps), beta), beta)
    S = model.n_stochastic

    def F():
        f = be.forward(model.params, x, eps)
        logp, _ = be.terms(f)
        below = x
        logq = []
        for l in range(1, S + 1):
            z = f["q"][l - 1]["z"]                                        # (L, n, Z_l), depends on phi
            if l == 1:
                mu, lv = be.encode(frozen, below)
            else:
                L, n, _ = below.shape
                mu, lv = be.encode_up(frozen, below.reshape(L * n, -1), l)
                mu, lv = mu.reshape(z.shape), lv.reshape(z.shape)
            logq.append(dist.gauss_logpdf(z, mu, lv))
            below = z
        logw = f["ll"] + beta * (sum(logp) - sum(logq))
        return float(np.sum(c * logw))
    return F


@pytest.mark.parametrize("S,likelihood,activation,beta", [
    (1, "bernoulli", "tanh", 1.0), (2, "bernoulli", "tanh", 1.0), (2, "gaussian", "softplus", 0.6),
    (3, "continuous_bernoulli", "tanh", 1.0)])
def test_dreg_inference_gradient_is_the_gradient_of_its_surrogate(S, likelihood, activation, beta):
    """Centred differences of F (above) w.r.t. every inference tensor equal DReG's enc* gradients:
    the path through z (incl. q(z_2|z_1)'s dependence on z_1) kept, log q's explicit dependence stopped."""
    z = (3, 2, 2)[:S]
    model = VAE(5, z, hidden=(4,), activation=activation, likelihood=likelihood, dtype="float64", seed=S)
    rng = np.random.default_rng(10 + S)
    x = gradcheck.make_inputs(likelihood, 3, 5, rng)
    eps = stack_eps(rng, 4, 3, z)
    _, g = model.loss_and_grad(x, eps=eps, objective="iwae", estimator="dreg", beta=beta)
    g = g.copy()
    num = gradcheck.numerical_grad(dreg_surrogate(model, x, eps, beta), model.params)
    enc = [s for s in model.layout.slots.values() if s.name.startswith("enc")]
    errs = {s.name: gradcheck.rel_error(g[s.offset:s.offset + s.size], num[s.offset:s.offset + s.size])
            for s in enc}
    assert max(errs.values()) < MODEL_TOL, errs


# ----------------------------------------------------------------------------------------------
# each new piece alone, below 1e-7
# ----------------------------------------------------------------------------------------------

@given(L=st.integers(1, 3), n=st.integers(1, 3), z_dim=st.integers(1, 4), seed=seeds)
def test_gauss_logpdf_pair(L, n, z_dim, seed):
    rng = np.random.default_rng(seed)
    z, mu, lv = (rng.standard_normal((L, n, z_dim)) for _ in range(3))
    g = rng.standard_normal((L, n))
    dz, dmu, dlv = dist.gauss_logpdf_backward(g, z, mu, lv)
    f = lambda: dist.gauss_logpdf(z, mu, lv)  # noqa: E731
    for name, arg, an in (("dz", z, dz), ("dmu", mu, dmu), ("dlogvar", lv, dlv)):
        num = gradcheck.numerical_grad_array(lambda _: f(), arg, g)
        assert gradcheck.rel_error(an, num) < PIECE_TOL, name
    # and it is the scipy density
    np.testing.assert_allclose(dist.gauss_logpdf(z, mu, lv),
                               stats.norm.logpdf(z, mu, np.exp(0.5 * lv)).sum(-1), rtol=1e-12)


@given(L=st.integers(1, 3), n=st.integers(1, 3), z_dim=st.integers(1, 4), sample_axis=st.booleans(), seed=seeds)
def test_log_prior_and_log_posterior_backward_pairs(L, n, z_dim, sample_axis, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((L, n, z_dim))
    g = rng.standard_normal((L, n))
    num = gradcheck.numerical_grad_array(lambda _: dist.log_prior(z), z, g)
    assert gradcheck.rel_error(dist.log_prior_backward(g, z), num) < PIECE_TOL
    lv = rng.standard_normal((L, n, z_dim) if sample_axis else (n, z_dim))
    eps = rng.standard_normal((L, n, z_dim))
    num = gradcheck.numerical_grad_array(lambda _: dist.log_posterior_eps(lv, eps), lv, g)
    assert gradcheck.rel_error(dist.log_posterior_eps_backward(g, lv), num) < PIECE_TOL


@given(L=st.integers(1, 3), n=st.integers(1, 3), z_dim=st.integers(1, 4), seed=seeds)
def test_reparam_pair_with_a_sample_axis_on_mu(L, n, z_dim, seed):
    """z_l = mu_l + std_l eps_l where mu_l, logvar_l (L, n, Z) come from z_{l-1}: nothing is summed."""
    rng = np.random.default_rng(seed)
    mu, lv, eps, dz = (rng.standard_normal((L, n, z_dim)) for _ in range(4))
    _, cache = dist.reparam_forward(mu, lv, eps)
    dmu, dlv = dist.reparam_backward(dz, cache)
    f = lambda _: dist.reparam_forward(mu, lv, eps)[0]  # noqa: E731
    assert gradcheck.rel_error(dmu, gradcheck.numerical_grad_array(f, mu, dz)) < PIECE_TOL
    assert gradcheck.rel_error(dlv, gradcheck.numerical_grad_array(f, lv, dz)) < PIECE_TOL


@given(L=st.integers(1, 3), n=st.integers(1, 3), z_dim=st.integers(1, 3), beta=st.floats(0.0, 2.0), seed=seeds)
def test_stack_elbo_loss_pair(L, n, z_dim, beta, seed):
    rng = np.random.default_rng(seed)
    ll, mid = rng.standard_normal((L, n)), rng.standard_normal((L, n))
    kl = rng.uniform(0, 2, (L, n, z_dim))
    _, dll, dmid, dkl = obj.stack_elbo_loss(ll, mid, kl, beta)
    f = lambda: obj.stack_elbo_loss(ll, mid, kl, beta)[0]  # noqa: E731
    for an, arg in ((dll, ll), (dmid, mid), (dkl, kl)):
        assert gradcheck.rel_error(an, gradcheck.numerical_grad(f, arg)) < PIECE_TOL


# ----------------------------------------------------------------------------------------------
# meaning
# ----------------------------------------------------------------------------------------------

def log_weight_by_scipy(model, x, eps):
    """log p(x|z_1) + log p(z_1|z_2) + log p(z_2) - log q(z_1|x) - log q(z_2|z_1) for a two-layer
    model, with scipy densities and the model's blocks run one by one.   (L, n)"""
    be = model.backend
    L, n, _ = eps[0].shape
    mu1, lv1 = be.encode(model.params, x)
    z1 = mu1 + np.exp(0.5 * lv1) * eps[0]                                         # (L, n, Z1)
    mu2, lv2 = be.encode_up(model.params, z1.reshape(L * n, -1), 2)
    mu2, lv2 = mu2.reshape(L, n, -1), lv2.reshape(L, n, -1)
    z2 = mu2 + np.exp(0.5 * lv2) * eps[1]
    pm, plv = be.decode_down(model.params, z2.reshape(L * n, -1), 2)
    pm, plv = pm.reshape(L, n, -1), plv.reshape(L, n, -1)
    head = be.decode(model.params, z1.reshape(L * n, -1)).reshape(L, n, -1)
    ll = stats.bernoulli.logpmf(x, special.expit(head)).sum(-1)
    norm = lambda v, m, lv: stats.norm.logpdf(v, m, np.exp(0.5 * lv)).sum(-1)  # noqa: E731
    return (ll + norm(z1, pm, plv) + stats.norm.logpdf(z2).sum(-1)
            - norm(z1, mu1, lv1) - norm(z2, mu2, lv2))


def test_iwae_with_one_sample_is_the_log_weight():
    m = two_layer(seed=1)
    x = gradcheck.make_inputs("bernoulli", 4, 6, np.random.default_rng(1))
    eps = stack_eps(np.random.default_rng(2), 1, 4, m.z_dims)
    logw = log_weight_by_scipy(m, x, eps)[0]
    np.testing.assert_allclose(m.iwae_bound(x, eps), logw, rtol=1e-11)
    # and the loss of k = 1 is minus the batch mean of the model's own log-weights, exactly
    be = m.backend
    own = be.log_weights(be.forward(m.params, x, eps))
    assert np.array_equal(m.iwae_bound(x, eps), own[0])
    assert m.loss_and_grad(x, eps=eps, objective="iwae")[0] == -float(obj.iwae_per_example(own).mean())


def test_elbo_is_the_mean_log_weight_up_to_the_top_kl_estimate():
    """Over many eps the mean log-weight equals the ELBO with the top KL analytic (5 standard errors)."""
    m = two_layer(seed=4)
    x = gradcheck.make_inputs("bernoulli", 3, 6, np.random.default_rng(4))
    M = 20000
    eps = stack_eps(np.random.default_rng(5), M, 3, m.z_dims)
    logw = m.backend.log_weights(m.backend.forward(m.params, x, eps))       # (M, n)
    elbo = m.elbo(x, eps)
    diff = logw - logw.mean(0)
    se = diff.std(axis=0, ddof=1) / math.sqrt(M)
    assert np.all(np.abs(logw.mean(axis=0) - elbo) < 5 * se), (logw.mean(0), elbo, se)


def test_the_bound_rises_with_k_on_average():
    m = two_layer(seed=6)
    x = gradcheck.make_inputs("bernoulli", 3, 6, np.random.default_rng(6))
    rng = np.random.default_rng(7)
    R = 300
    means = []
    for k in (1, 5, 25):
        b = np.array([m.iwae_bound(x, stack_eps(rng, k, 3, m.z_dims)) for _ in range(R)])   # (R, n)
        means.append((b.mean(0), b.std(0, ddof=1) / math.sqrt(R)))
    for (m1, s1), (m2, s2) in zip(means, means[1:]):
        assert np.all(m2 - m1 > -3 * np.hypot(s1, s2)) and np.mean(m2 - m1) > 0


@pytest.mark.parametrize("S", [1, 2])
def test_dreg_generative_gradient_is_iwae_exactly(S):
    z = (3, 2)[:S]
    m = VAE(6, z, hidden=(4,), activation="tanh", dtype="float64", seed=8)
    rng = np.random.default_rng(8)
    x = gradcheck.make_inputs("bernoulli", 4, 6, rng)
    eps = stack_eps(rng, 5, 4, z)
    li, gi = m.loss_and_grad(x, eps=eps, objective="iwae", beta=0.8)
    gi = gi.copy()
    ld, gd = m.loss_and_grad(x, eps=eps, objective="iwae", beta=0.8, estimator="dreg")
    assert li == ld
    dec = [s for s in m.layout.slots.values() if s.name.startswith("dec")]
    enc = [s for s in m.layout.slots.values() if s.name.startswith("enc")]
    for s in dec:
        sl = slice(s.offset, s.offset + s.size)
        assert np.array_equal(gi[sl], gd[sl]), s.name
    assert any(not np.allclose(gi[s.offset:s.offset + s.size], gd[s.offset:s.offset + s.size]) for s in enc)


@pytest.mark.parametrize("S,beta", [(1, 1.0), (2, 1.0), (2, 0.5)])
def test_dreg_inference_gradient_is_unbiased_for_iwae(S, beta):
    """One x repeated over n = B rows: each loss_and_grad call averages B independent k-sample
    estimates. Over C calls with a fixed seed, the mean of (DReG - IWAE) on every inference
    tensor's random projections is within 4.5 standard errors of 0."""
    z = (2, 2)[:S]
    m = VAE(5, z, hidden=(4,), activation="tanh", dtype="float64", seed=9)
    rng = np.random.default_rng(9)
    x = np.repeat(gradcheck.make_inputs("bernoulli", 1, 5, rng), 50, axis=0)    # (B, D)
    C, k = 60, 4
    enc = [s for s in m.layout.slots.values() if s.name.startswith("enc")]
    proj = {s.name: rng.standard_normal((3, s.size)) for s in enc}
    diffs = {s.name: [] for s in enc}
    for _ in range(C):
        eps = stack_eps(rng, k, len(x), z)
        _, gi = m.loss_and_grad(x, eps=eps, objective="iwae", beta=beta)
        gi = gi.copy()
        _, gd = m.loss_and_grad(x, eps=eps, objective="iwae", beta=beta, estimator="dreg")
        for s in enc:
            sl = slice(s.offset, s.offset + s.size)
            diffs[s.name].append(proj[s.name] @ (gd[sl] - gi[sl]))
    for name, d in diffs.items():
        d = np.array(d)                                                   # (C, 3)
        se = d.std(axis=0, ddof=1) / math.sqrt(C)
        assert np.all(np.abs(d.mean(axis=0)) < 4.5 * se), (name, d.mean(0), se)


def test_dreg_has_lower_variance_than_iwae_on_the_inference_network():
    """Not a proof of anything beyond this model and seed: a sanity check that DReG is the
    lower-variance estimator it is meant to be (Tucker et al. 2018), at k = 16."""
    m = VAE(5, (2, 2), hidden=(4,), activation="tanh", dtype="float64", seed=9)
    rng = np.random.default_rng(11)
    x = gradcheck.make_inputs("bernoulli", 1, 5, rng)
    enc = np.array([s.name.startswith("enc") for s in m.layout.slots.values()
                    for _ in range(s.size)])
    gi, gd = [], []
    for _ in range(200):
        eps = stack_eps(rng, 16, 1, (2, 2))
        gi.append(m.loss_and_grad(x, eps=eps, objective="iwae")[1][enc].copy())
        gd.append(m.loss_and_grad(x, eps=eps, objective="iwae", estimator="dreg")[1][enc].copy())
    assert np.var(gd, axis=0).sum() < np.var(gi, axis=0).sum()


# ----------------------------------------------------------------------------------------------
# sampling and the rest of the model's API for S > 1
# ----------------------------------------------------------------------------------------------

def test_sample_and_reconstruct_go_through_every_layer():
    m = two_layer(seed=2)
    xs = m.sample(4, seed=0)
    assert xs.shape == (4, 6) and np.all((xs > 0) & (xs < 1))
    assert m.sample(3, seed=1, mean=False).shape == (3, 6)
    # the mean picture: z_2 ~ N(0, I), z_1 = the mean of p(z_1|z_2), x = E[x|z_1]
    z2 = np.random.default_rng(0).standard_normal((4, 2))
    z1, _ = m.backend.decode_down(m.params, z2, 2)
    np.testing.assert_allclose(xs, special.expit(m.backend.decode(m.params, z1)), rtol=1e-12)
    x = gradcheck.make_inputs("bernoulli", 5, 6, np.random.default_rng(3))
    assert m.reconstruct(x).shape == (5, 6)
    mu, lv = m.encode(x)
    assert mu.shape == lv.shape == (5, 3)


def test_minivae_gradcheck_covers_two_layers():
    """`minivae gradcheck` (run_suite) prints and passes every two-layer case and the new pieces."""
    lines = []
    assert gradcheck.run_suite(out=lines.append) is True
    text = "\n".join(lines)
    for lik, o, est in gradcheck.stack_suite_cases():
        assert f"S=2 {lik} / {o} ({est}" in text and f"S=2 {lik} {o} {est}" in text
    for piece in ("log N(z; mu, logvar) dz", "log N(z; mu, logvar) dlogvar", "log p(z) dz",
                  "log q dlogvar (L, n, Z)", "stack_elbo_loss dmid"):
        assert f"piece {piece}" in text
    assert "FAIL" not in text


# ----------------------------------------------------------------------------------------------
# evaluation, training and the command for S > 1 (numpy backend)
# ----------------------------------------------------------------------------------------------

def test_evaluate_a_two_layer_model():
    from minivae import evaluate as ev
    m = VAE(6, (3, 2), hidden=(5,), activation="tanh", dtype="float64", seed=4)
    x = gradcheck.make_inputs("bernoulli", 9, 6, np.random.default_rng(4))
    r = ev.evaluate(m, x, iw_samples=7, batch_size=20, chunk=3)
    # the ELBO is the model's with the documented eps; IW does not depend on the chunk size
    eps = ev.eval_eps(9, (3, 2), "float64")
    assert isinstance(eps, tuple) and [e.shape for e in eps] == [(9, 3), (9, 2)]
    assert r["elbo"] == pytest.approx(m.elbo(x, eps).mean(), rel=1e-12)
    iw3 = ev.iw_log_likelihood_per_example(m, x, 7, chunk=3)
    iw7 = ev.iw_log_likelihood_per_example(m, x, 7, chunk=7, batch_size=7)
    np.testing.assert_allclose(iw3, iw7, rtol=1e-12)
    assert r["iw_log_likelihood"] == pytest.approx(iw3.mean(), rel=1e-12)
    # K = 1: the IWAE bound of the example's own draw
    g = ev.example_rng(0, 0).standard_normal((1, 5))
    one = m.iwae_bound(x[:1], (g[None, :, :3], g[None, :, 3:]))
    assert ev.iw_log_likelihood_per_example(m, x[:1], 1)[0] == pytest.approx(one[0], rel=1e-12)
    # active units per layer; layer 1 is Var_i mu_1, and nothing depends on the batch size
    assert len(r["active_units_per_layer"]) == 2 and r["active_units"] == sum(r["active_units_per_layer"])
    assert len(r["latent_variance"]) == 5
    np.testing.assert_allclose(r["latent_variance"][:3], np.var(m.encode(x)[0], axis=0, ddof=1), rtol=1e-10)
    r2 = ev.evaluate(m, x, iw_samples=7, batch_size=50, chunk=3)
    np.testing.assert_allclose(r2["latent_variance"], r["latent_variance"], rtol=1e-12)


def test_layer_means_estimate_the_posterior_mean_of_the_upper_layer():
    """E_q[z_2|x] = E_{z_1 ~ q(z_1|x)}[mu_2(z_1)]: the 16-draw estimate against a 20000-draw one."""
    from minivae import evaluate as ev
    m = VAE(6, (3, 2), hidden=(5,), activation="tanh", dtype="float64", seed=4)
    x = gradcheck.make_inputs("bernoulli", 2, 6, np.random.default_rng(4))
    est = ev.layer_means(m, x)[1]                                               # (2, 2)
    mu1, lv1 = m.encode(x)
    z1 = mu1 + np.exp(0.5 * lv1) * np.random.default_rng(1).standard_normal((20000, 2, 3))
    mu2 = m.backend.encode_up(m.params, z1.reshape(-1, 3), 2)[0].reshape(20000, 2, 2)
    sd = mu2.std(axis=0) / math.sqrt(ev.ACTIVE_UNIT_SAMPLES)
    assert np.all(np.abs(est - mu2.mean(axis=0)) < 5 * sd)


def test_train_evaluate_sample_and_plot_a_two_layer_iwae_with_dreg(tmp_path, capsys):
    from minivae.cli import main
    run = tmp_path / "run"
    code = main(["train", "--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--z-dim", "4", "2",
                 "--hidden", "16", "--hidden", "8", "--activation", "tanh", "--objective", "iwae", "--k", "2",
                 "--estimator", "dreg", "--quiet", "--out", str(run)])
    assert code == 0, capsys.readouterr().err
    m = VAE.load(run / "model.npz")
    assert m.z_dims == (4, 2) and m.hidden == ((16,), (8,)) and m.dec_hidden == ((16,), (8,))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iw-samples", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["active_units_per_layer"]) == 2 and math.isfinite(r["iw_log_likelihood"])
    assert main(["evaluate", str(run), "--iw-samples", "0"]) == 0
    assert "of 4, " in capsys.readouterr().out
    for name in ("manifold.png", "samples.png", "reconstructions.png"):      # top layer of 2: manifold
        assert (run / name).is_file()
    assert main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 0
    # resuming keeps the two-layer config
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet", "--no-plots"]) == 0


@pytest.mark.parametrize("args,words", [
    (["--z-dim", "4", "2", "--hidden", "8", "--hidden", "8", "--hidden", "8"], "one tuple of widths per stochastic layer"),
    (["--z-dim", "4", "2", "--free-bits", "0.1"], "--free-bits applies to models with one stochastic layer only"),
    (["--estimator", "dreg"], "--estimator dreg applies to --objective iwae only"),
])
def test_bad_stack_options_are_one_line(tmp_path, capsys, args, words):
    from minivae.cli import main
    code = main(["train", "--dataset", "digits", "--epochs", "1", "--quiet", "--no-plots",
                 "--out", str(tmp_path / "r")] + args)
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("name", ["numba", "cuda"])
def test_the_fused_backends_refuse_a_stack_with_one_line(name):
    """Built directly from a spec (as the trainers and the simulator tests do), not only through VAE."""
    from minivae.kernels import get_backend
    from minivae.model import ModelSpec
    spec = ModelSpec(6, (3, 2), (4,))
    try:
        cls = get_backend(name)
    except (RuntimeError, ImportError) as e:       # no GPU here: the VAE-level check still applies
        pytest.skip(str(e))
    with pytest.raises(ValueError, match=rf"backend '{name}' supports one stochastic layer only"):
        cls(spec, "float64")


# ----------------------------------------------------------------------------------------------
# the numba backend for S > 1 (kernels/cpu_stack.py) against its oracle, the NumPy reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gemm", ["blas", "custom"])
@pytest.mark.parametrize("likelihood,activation", [("bernoulli", "tanh"), ("gaussian", "relu"),
                                                   ("continuous_bernoulli", "softplus"), ("bernoulli", "leaky_relu")])
def test_numba_stack_matches_the_numpy_reference(monkeypatch, gemm, likelihood, activation):
    from minivae.kernels import config
    from minivae.kernels.cpu_stack import NumbaStackBackend
    monkeypatch.setattr(config, "GEMM", gemm)
    monkeypatch.setattr(config, "MB", 3)
    monkeypatch.setattr(config, "NB", 5)
    z = (4, 3, 2)
    kw = dict(hidden=((7, 5), (6,), ()), activation=activation, likelihood=likelihood, seed=1)
    ref = VAE(9, z, backend="numpy", dtype="float64", **kw)
    fast = VAE(9, z, backend="numba", dtype="float64", **kw)
    assert isinstance(fast.backend, NumbaStackBackend) and np.array_equal(ref.params, fast.params)
    rng = np.random.default_rng(2)
    x = gradcheck.make_inputs(likelihood, 6, 9, rng)
    eps = stack_eps(rng, 3, 6, z)
    for objective, estimator in (("elbo", "reparam"), ("iwae", "reparam"), ("iwae", "dreg")):
        lr, gr = ref.loss_and_grad(x, eps=eps, objective=objective, beta=0.7, estimator=estimator)
        gr = gr.copy()
        lf, gf = fast.loss_and_grad(x, eps=eps, objective=objective, beta=0.7, estimator=estimator)
        assert lf == pytest.approx(lr, rel=1e-12)
        assert gradcheck.rel_error(gf, gr) < 1e-12, (objective, estimator)
    np.testing.assert_allclose(fast.iwae_bound(x, eps), ref.iwae_bound(x, eps), rtol=1e-12)
    np.testing.assert_allclose(fast.sample(5, seed=0), ref.sample(5, seed=0), rtol=1e-12, atol=1e-14)
    # float32 follows the float64 numbers to float32 rounding
    f32 = VAE(9, z, backend="numba", dtype="float32", **kw)
    l32, g32 = f32.loss_and_grad(x, eps=eps, objective="iwae", beta=0.7)
    l64, g64 = ref.loss_and_grad(x, eps=eps, objective="iwae", beta=0.7)
    assert l32 == pytest.approx(l64, rel=1e-4) and gradcheck.rel_error(g32, g64) < 1e-3
