"""The cuda backend for stacks of stochastic layers (kernels/cuda_stack.py) against its oracle, the NumPy
reference, under the simulator: S = 2 and S = 3, every likelihood, ELBO / IWAE / DReG, float32 and
float64, with the fused (register tile) and the unfused (plain tile) launch configurations. Tiny shapes:
the simulator runs each CUDA thread as a Python thread.
"""
import numpy as np
import pytest
from simutil import configs

from minivae import VAE, gradcheck
from minivae.kernels.numpy_ import NumpyBackend
from minivae.model import ModelSpec

CONFIGS = configs()
LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")
OBJECTIVES = (("elbo", "reparam"), ("iwae", "reparam"), ("iwae", "dreg"))
# S = 2: a hidden layer in the lower blocks, none in the upper; S = 3: depths 2, 1, 0
STACKS = {2: ((3, 2), ((4,), ())), 3: ((3, 2, 2), ((4, 3), (3,), ()))}
TOL = {np.float32: 1e-4, np.float64: 1e-11}


def stack_backend(S, likelihood, activation, dtype, cfg):
    from minivae.kernels.cuda_stack import CudaStackBackend
    z, hidden = STACKS[S]
    spec = ModelSpec(5, z, hidden=hidden, activation=activation, likelihood=likelihood)
    return spec, NumpyBackend(spec, dtype), CudaStackBackend(spec, dtype, cfg)


def inputs(spec, likelihood, dtype, rng, n=3, L=2):
    params = spec.layout.init(rng, dtype)
    x = gradcheck.make_inputs(likelihood, n, spec.x_dim, rng, dtype)
    eps = tuple(rng.standard_normal((L, n, z)).astype(dtype) for z in spec.z_dims)
    return params, x, eps


def assert_close_per_tensor(layout, g_ref, g, tol):
    for name in layout.names:
        err = gradcheck.rel_error(layout.view(g_ref, name), layout.view(g, name))
        assert err < tol, f"{name}: relative error {err:.2e}"


# every (S, objective/estimator) pair; the likelihood, dtype, activation and launch configuration
# rotate so that each of them meets both S (12 cases: each likelihood x dtype twice)
CASES = [(S, objective, estimator, LIKELIHOODS[i % 3], (np.float32, np.float64)[(i // 3 + S) % 2], i)
         for S in (2, 3) for i, (objective, estimator) in
         enumerate(OBJECTIVES + OBJECTIVES[::-1])]


@pytest.mark.parametrize("S,objective,estimator,likelihood,dtype,i", CASES)
def test_stack_loss_and_grad_match_numpy(S, objective, estimator, likelihood, dtype, i, rng):
    activation = ("tanh", "relu", "softplus", "leaky_relu")[(i + S) % 4]
    cfg = CONFIGS[(i + S) % len(CONFIGS)]
    spec, ref, be = stack_backend(S, likelihood, activation, dtype, cfg)
    params, x, eps = inputs(spec, likelihood, dtype, rng)
    tol = TOL[dtype]
    kw = dict(beta=0.7, objective=objective, estimator=estimator)
    l_ref, g_ref = ref.loss_and_grad(params, x, eps, **kw)
    loss, g = be.loss_and_grad(params, x, eps, **kw)
    assert abs(loss - l_ref) <= tol * abs(l_ref)
    assert g.dtype == dtype and g.shape == params.shape
    assert_close_per_tensor(spec.layout, g_ref, g, tol)
    np.testing.assert_allclose(be.bound(params, x, eps, objective, beta=0.7),
                               ref.bound(params, x, eps, objective, beta=0.7), rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["fused-regtile", "unfused-tile"])
def test_stack_pieces_match_numpy(cfg, rng):
    """encode, encode_up, decode, decode_down: each one block on the device against the reference."""
    spec, ref, be = stack_backend(3, "gaussian", "tanh", np.float32, cfg)
    params, x, eps = inputs(spec, "gaussian", np.float32, rng)
    close = dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(be.encode(params, x), ref.encode(params, x)):
        np.testing.assert_allclose(a, b, **close)
    for l in (2, 3):
        z_below = rng.standard_normal((4, spec.z_dims[l - 2])).astype(np.float32)
        for a, b in zip(be.encode_up(params, z_below, l), ref.encode_up(params, z_below, l)):
            np.testing.assert_allclose(a, b, **close)
        z = rng.standard_normal((4, spec.z_dims[l - 1])).astype(np.float32)
        for a, b in zip(be.decode_down(params, z, l), ref.decode_down(params, z, l)):
            np.testing.assert_allclose(a, b, **close)
    z1 = rng.standard_normal((4, spec.z_dims[0])).astype(np.float32)
    np.testing.assert_allclose(be.decode(params, z1), ref.decode(params, z1), **close)


def test_buffers_are_reused_per_block_and_rows(rng):
    """A second pass of the same shape allocates nothing: one named buffer set per (block, rows); the
    launches of a fused pass."""
    spec, ref, be = stack_backend(2, "bernoulli", "relu", np.float32, CONFIGS[0])
    params, x, eps = inputs(spec, "bernoulli", np.float32, rng)
    be.loss_and_grad(params, x, eps, objective="iwae")
    # fused: per layer one GEMM forward, two backward ([dW; db] and the input's gradient), but x's
    # gradient, never formed; the Gaussian stage, likelihood and objective (S = 2, IWAE): forward S
    # reparameterizations, the likelihood, log p and log q of each lower layer (2 (S - 1)), the prior,
    # the top log q and the weights; backward the upstream, the head's scaling, each log p's backward
    # (S - 1), the prior's, S posterior backwards and S - 1 additions of an input gradient into dz
    S = 2
    stages = (S + 1 + 2 * (S - 1) + 3) + (2 + (S - 1) + 1 + S + (S - 1))
    assert be.launches == 3 * len(spec.layout.layers) - 1 + stages
    first = {k: id(v) for k, v in be._bufs.items()}
    assert set(first) == {("enc", 3), ("enc2", 6), ("dec2", 6), ("dec", 6)}
    be.loss_and_grad(params, x, eps, objective="iwae", estimator="dreg")
    assert {k: id(v) for k, v in be._bufs.items()} == first


def test_vae_and_training_on_cuda_with_a_stack(rng, monkeypatch):
    """VAE(backend="cuda") with z_dim=(3, 2) computes what backend="numpy" does from the same seed, and
    trains through the host trainer to the same parameters."""
    from minivae import optim, train
    from minivae.kernels import cuda as cuda_backend
    from minivae.kernels.cuda_stack import CudaStackBackend
    monkeypatch.setattr(cuda_backend, "CONFIG", CONFIGS[0])
    kw = dict(hidden=((4,), ()), likelihood="bernoulli", dtype="float64", seed=3)
    m_cpu, m_gpu = VAE(5, (3, 2), backend="numpy", **kw), VAE(5, (3, 2), backend="cuda", **kw)
    assert isinstance(m_gpu.backend, CudaStackBackend)
    np.testing.assert_array_equal(m_cpu.params, m_gpu.params)
    x = gradcheck.make_inputs("bernoulli", 3, 5, rng)
    eps = (rng.standard_normal((2, 3, 3)), rng.standard_normal((2, 3, 2)))
    np.testing.assert_allclose(m_gpu.iwae_bound(x, eps), m_cpu.iwae_bound(x, eps), rtol=1e-12)
    np.testing.assert_allclose(m_gpu.reconstruct(x), m_cpu.reconstruct(x), rtol=1e-12, atol=1e-14)
    for m in (m_cpu, m_gpu):
        opt = optim.make_optimizer("adam", m.params.size, dtype="float64", lr=1e-2)
        trainer = train.make_trainer(m, opt, train.SerialComm(), "iwae", 0.0, estimator="dreg")
        assert isinstance(trainer, train.HostTrainer)
        for _ in range(2):
            trainer.step(x, eps, 1.0)
        trainer.sync_params()
    np.testing.assert_allclose(m_gpu.params, m_cpu.params, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("objective,name", [("elbo", "adam"), ("iwae", "sgd")])
def test_the_device_trainer_of_a_stack_matches_host_steps(objective, name, rng):
    """CudaStackBackend.make_trainer (parameters, gradient and optimizer state on the device) against
    NumPy steps: loss_and_grad of the reference and optim.py's update, three steps, float64; the loss
    comes back every loss_every steps; an empty share joins with a zero gradient."""
    from minivae.kernels.cuda_stack import CudaStackTrainer
    from minivae.optim import make_optimizer
    spec, ref, be = stack_backend(2, "bernoulli", "tanh", np.float64, CONFIGS[0])
    params, x, _ = inputs(spec, "bernoulli", np.float64, rng)
    hyper = dict(lr=0.05, momentum=0.9) if name == "sgd" else dict(lr=0.05)
    opt_dev = make_optimizer(name, params.size, "float64", **hyper)
    opt_host = make_optimizer(name, params.size, "float64", **hyper)
    p_host = params.copy()
    trainer = be.make_trainer(params.copy(), opt_dev, None, objective, 0.0, loss_every=3)
    assert isinstance(trainer, CudaStackTrainer)
    losses, got = [], []
    for step in range(3):
        eps = tuple(rng.standard_normal((2, 3, z)) for z in spec.z_dims)
        loss, g = ref.loss_and_grad(p_host, x, eps, beta=0.8, objective=objective)
        opt_host.step(p_host, g)
        losses.append(loss)
        got.append(trainer.step(x, eps, 0.8))
    assert got[:2] == [None, None] and got[2] == pytest.approx(np.mean(losses), rel=1e-12)
    trainer.sync_params()
    np.testing.assert_allclose(trainer.params, p_host, rtol=1e-10, atol=1e-12)
    for k in opt_host.state:
        np.testing.assert_allclose(opt_dev.state[k], opt_host.state[k], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="takes eps from the host"):
        trainer.step(x, None, 1.0)
    with pytest.raises(ValueError, match="free_bits applies to models with one stochastic layer only"):
        be.make_trainer(params, opt_dev, None, "elbo", 0.5)
