"""The whole CUDA backend against the NumPy reference, under the simulator: loss and gradient within
1e-4 relative in float32 for every likelihood and objective, at several depths and activations, with
the fused and the unfused kernels; the bounds (chunked), encode/decode, the public VAE API.
"""
import numpy as np
import pytest
from simutil import configs, make_backend

from minivae import VAE
from minivae.gradcheck import rel_error
from minivae.kernels.numpy_ import NumpyBackend
from minivae.layers import ACTIVATIONS
from minivae.model import ModelSpec

CONFIGS = configs()
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")
DEPTHS = [(5,), (4, 3), ()]                 # one hidden layer, two, none (linear encoder/decoder)


def problem(rng, likelihood, hidden, activation, dtype=np.float32, n=4, L=2, D=7, Z=3):
    spec = ModelSpec(D, Z, hidden=hidden, activation=activation, likelihood=likelihood)
    be_ref = NumpyBackend(spec, dtype)
    params = spec.layout.init(rng, dtype)
    x = rng.random((n, D)).astype(dtype)
    if likelihood == "bernoulli":
        x = (x > 0.5).astype(dtype)
    eps = rng.standard_normal((L, n, Z)).astype(dtype)
    return spec, be_ref, params, x, eps


def assert_close_per_tensor(layout, g_ref, g, tol):
    for name in layout.names:
        err = rel_error(layout.view(g_ref, name), layout.view(g, name))
        assert err < tol, f"{name}: relative error {err:.2e}"


CASES = [(lik, obj, i) for i, (lik, obj) in enumerate(
    [(lik, obj) for lik in LIKELIHOODS for obj in ("elbo", "iwae")])]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["fused-regtile", "unfused-tile"])
@pytest.mark.parametrize("likelihood,objective,i", CASES)
def test_loss_and_grad_match_numpy_float32(cfg, likelihood, objective, i, rng):
    """Each likelihood x objective; the depth and the activation rotate across the cases."""
    hidden = DEPTHS[i % len(DEPTHS)]
    activation = ACTIVATIONS[i % len(ACTIVATIONS)]
    spec, ref, params, x, eps = problem(rng, likelihood, hidden, activation)
    from minivae.kernels.cuda import CudaBackend
    be = CudaBackend(spec, np.float32, cfg)
    kw = dict(beta=0.7, objective=objective)
    l_ref, g_ref = ref.loss_and_grad(params, x, eps, **kw)
    loss, g = be.loss_and_grad(params, x, eps, **kw)
    assert abs(loss - l_ref) <= 1e-4 * abs(l_ref)
    assert g.dtype == np.float32 and g.shape == params.shape
    assert_close_per_tensor(spec.layout, g_ref, g, 1e-4)
    b_ref = ref.bound(params, x, eps, objective, beta=0.7)
    np.testing.assert_allclose(be.bound(params, x, eps, objective, beta=0.7), b_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("free_bits", [0.05, 10.0])
def test_free_bits_match_numpy(free_bits, rng):
    """A floor some dims pass and others do not (0.05), and one no dim reaches (10: no KL gradient)."""
    spec, ref, params, x, eps = problem(rng, "bernoulli", (5,), "relu", n=5)
    be = make_backend(CONFIGS[0], x_dim=7, z_dim=3, hidden=(5,))
    l_ref, g_ref = ref.loss_and_grad(params, x, eps, beta=1.3, free_bits=free_bits)
    loss, g = be.loss_and_grad(params, x, eps, beta=1.3, free_bits=free_bits)
    assert abs(loss - l_ref) <= 1e-4 * abs(l_ref)
    assert_close_per_tensor(spec.layout, g_ref, g, 1e-4)


def test_kl_active_matches_numpy(rng):
    """``kl_active``, the free-bits decision of every rank's share (§5.3, §10), overrides this batch's:
    here the reverse of it, so every dimension's charge and gradient differ from the local decision.
    float64, to rounding."""
    from minivae.distributions import kl_forward
    from minivae.kernels.cuda import CudaBackend
    spec, ref, params, x, eps = problem(rng, "bernoulli", (5,), "tanh", dtype=np.float64, n=5)
    be = CudaBackend(spec, np.float64, CONFIGS[1])
    mu, logvar = ref.encode(params, x)
    kl_dim = kl_forward(mu, logvar).mean(axis=0)
    free_bits = float(np.median(kl_dim))
    kl_active = (kl_dim <= free_bits).astype(np.float64)           # the local decision, reversed
    kw = dict(beta=1.3, free_bits=free_bits, kl_active=kl_active)
    l_ref, g_ref = ref.loss_and_grad(params, x, eps, **kw)
    loss, g = be.loss_and_grad(params, x, eps, **kw)
    l_loc, _ = ref.loss_and_grad(params, x, eps, beta=1.3, free_bits=free_bits)
    assert l_loc != pytest.approx(l_ref, rel=1e-6)                  # the decision matters here
    assert loss == pytest.approx(l_ref, rel=1e-12)
    assert_close_per_tensor(spec.layout, g_ref, g, 1e-11)


def test_estimators_the_fused_pass_lacks_are_refused_by_name(rng):
    spec, ref, params, x, eps = problem(rng, "bernoulli", (5,), "relu")
    be = make_backend(CONFIGS[0], hidden=(5,))
    for est in ("dreg", "score"):
        with pytest.raises(ValueError, match=rf"estimator '{est}' is not implemented on backend 'cuda'.*"
                                             r"it runs on backend 'numpy'"):
            be.loss_and_grad(params, x, eps, objective="iwae" if est == "dreg" else "elbo", estimator=est)


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_float64_matches_to_rounding(objective, rng):
    spec, ref, params, x, eps = problem(rng, "gaussian", (4, 3), "softplus", dtype=np.float64)
    from minivae.kernels.cuda import CudaBackend
    be = CudaBackend(spec, np.float64, CONFIGS[0])
    l_ref, g_ref = ref.loss_and_grad(params, x, eps, objective=objective)
    loss, g = be.loss_and_grad(params, x, eps, objective=objective)
    assert loss == pytest.approx(l_ref, rel=1e-12)
    assert g.dtype == np.float64
    assert_close_per_tensor(spec.layout, g_ref, g, 1e-11)


def test_grad_written_into_the_given_buffer(rng):
    spec, ref, params, x, eps = problem(rng, "bernoulli", (5,), "tanh")
    be = make_backend(CONFIGS[0], hidden=(5,), activation="tanh")
    buf = np.full(params.shape, np.nan, np.float32)
    _, g = be.loss_and_grad(params, x, eps, grad=buf)
    assert g is buf and np.isfinite(buf).all()


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_bound_in_chunks_matches_numpy(objective, rng):
    """max_rows = 8 with n = 3 forces chunks of 2 samples over k = 5 (the last one partial)."""
    from dataclasses import replace
    spec, ref, params, x, eps = problem(rng, "continuous_bernoulli", (5,), "leaky_relu", n=3, L=5)
    from minivae.kernels.cuda import CudaBackend
    be = CudaBackend(spec, np.float32, replace(CONFIGS[0], max_rows=8))
    np.testing.assert_allclose(be.bound(params, x, eps, objective), ref.bound(params, x, eps, objective),
                               rtol=1e-5, atol=1e-4)


def test_encode_decode_match_numpy(rng):
    spec, ref, params, x, eps = problem(rng, "gaussian", (4, 3), "tanh")
    from minivae.kernels.cuda import CudaBackend
    be = CudaBackend(spec, np.float32, CONFIGS[1])
    for a, b in zip(be.encode(params, x), ref.encode(params, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    z = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(be.decode(params, z), ref.decode(params, z), rtol=1e-5, atol=1e-6)


def test_default_config_matches_numpy(rng):
    """The launch configuration meant for a GPU (tile 16, register tile 4, blocks of 128)."""
    spec, ref, params, x, eps = problem(rng, "bernoulli", (5,), "relu")
    from minivae.kernels.cuda import CudaBackend
    be = CudaBackend(spec, np.float32)
    l_ref, g_ref = ref.loss_and_grad(params, x, eps)
    loss, g = be.loss_and_grad(params, x, eps)
    assert abs(loss - l_ref) <= 1e-4 * abs(l_ref)
    assert_close_per_tensor(spec.layout, g_ref, g, 1e-4)


def test_vae_public_api_on_cuda(rng, monkeypatch):
    """VAE(backend="cuda") computes what VAE(backend="numpy") does from the same seed."""
    from minivae.kernels import cuda as cuda_backend
    monkeypatch.setattr(cuda_backend, "CONFIG", CONFIGS[0])
    kw = dict(hidden=(5,), likelihood="continuous_bernoulli", seed=3)
    m_cpu, m_gpu = VAE(7, 2, backend="numpy", **kw), VAE(7, 2, backend="cuda", **kw)
    np.testing.assert_array_equal(m_cpu.params, m_gpu.params)
    x = rng.random((4, 7))
    eps = rng.standard_normal((4, 2))
    l1, g1 = m_cpu.loss_and_grad(x, eps)
    l2, g2 = m_gpu.loss_and_grad(x, eps)
    assert l2 == pytest.approx(l1, rel=1e-5)
    assert rel_error(g1, g2) < 1e-4
    np.testing.assert_allclose(m_gpu.elbo(x, eps), m_cpu.elbo(x, eps), rtol=1e-5)
    np.testing.assert_allclose(m_gpu.reconstruct(x), m_cpu.reconstruct(x), rtol=1e-5, atol=1e-6)


def test_launch_count_of_a_pass(rng):
    """Fused ELBO pass, one hidden layer each side: 2 + 1 + 2 + 1 forward, 2 + 2 + 1 + 2 + 1 backward."""
    spec, ref, params, x, eps = problem(rng, "bernoulli", (5,), "relu")
    be = make_backend(CONFIGS[0], hidden=(5,))
    be.loss_and_grad(params, x, eps)
    assert be.launches == 14
    start = be.launches
    be.loss_and_grad(params, x, eps, objective="iwae")
    assert be.launches - start == 16                  # + iwae_weights, scale_rows


def test_bad_config_is_refused():
    from minivae.kernels.cuda import CudaConfig
    with pytest.raises(ValueError, match="tile"):
        make_backend(CudaConfig(tile=33))
    with pytest.raises(ValueError, match="gemm"):
        make_backend(CudaConfig(gemm=3))
