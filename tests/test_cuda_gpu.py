"""The CUDA backend on a real NVIDIA GPU, at MNIST size (skipped without one, and under the simulator,
which has its own tests in tests/cuda_sim). Run with ``python -m pytest -m gpu tests/test_cuda_gpu.py``.
"""
import math
from pathlib import Path

import numpy as np
import pytest

from minivae import VAE
from minivae.gradcheck import rel_error
from minivae.optim import make_optimizer


def _gpu():
    try:
        from numba.core import config
        if config.ENABLE_CUDASIM:
            return False
        from numba import cuda
        return cuda.is_available()
    except Exception:  # noqa: BLE001 - numba.cuda not importable: no GPU tests
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu(), reason="needs an NVIDIA GPU (numba.cuda.is_available() is false)")]

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def images():
    """MNIST test images in [0, 1] (the shared t10k file), or random pixels when it is absent."""
    if MNIST.exists():
        from minivae.data import read_idx
        return (read_idx(MNIST).reshape(-1, 784) / 255.0).astype(np.float32)
    return np.random.default_rng(0).random((2048, 784), dtype=np.float32)


@pytest.mark.parametrize("variant", [1, 2])
@pytest.mark.parametrize("trans_a,trans_b,ones_a", [(False, False, True), (True, False, True), (False, True, False)])
def test_gemm_at_model_size(variant, trans_a, trans_b, ones_a):
    from numba import cuda

    from minivae.kernels.cuda import CudaBackend, CudaConfig
    from minivae.model import ModelSpec
    be = CudaBackend(ModelSpec(784, 20), np.float32, CudaConfig(gemm=variant))
    rng = np.random.default_rng(1)
    M, N, K = 1000, 400, 785
    one = int(ones_a)
    A = rng.standard_normal((K, M - one) if trans_a else (M, K - one)).astype(np.float32)
    B = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    C = cuda.device_array((M, N), np.float32)
    be.gemm(cuda.to_device(A), cuda.to_device(B), C, trans_a=trans_a, trans_b=trans_b, ones_a=ones_a)
    A64 = np.concatenate([A, np.ones((A.shape[0], 1))], axis=1) if ones_a else A.astype(np.float64)
    ref = (A64.T if trans_a else A64) @ (B.T if trans_b else B).astype(np.float64)
    assert rel_error(C.copy_to_host(), ref) < 1e-5


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_mnist_model_matches_numpy(images, likelihood, objective):
    kw = dict(hidden=(400,), likelihood=likelihood, seed=0)
    cpu, gpu = VAE(784, 20, backend="numpy", **kw), VAE(784, 20, backend="cuda", **kw)
    x = images[:128]
    if likelihood == "bernoulli":
        x = (x > 0.5).astype(np.float32)
    L = 5 if objective == "iwae" else 1
    eps = np.random.default_rng(2).standard_normal((L, 128, 20)).astype(np.float32)
    l1, g1 = cpu.loss_and_grad(x, eps, objective=objective)
    l2, g2 = gpu.loss_and_grad(x, eps, objective=objective)
    assert abs(l2 - l1) <= 1e-4 * abs(l1)
    for name in cpu.layout.names:
        assert rel_error(cpu.layout.view(g1, name), cpu.layout.view(g2, name)) < 1e-4, name


@pytest.mark.parametrize("objective,estimator", [("elbo", "reparam"), ("iwae", "reparam"), ("iwae", "dreg")])
def test_two_layer_iwae_paper_model_matches_numpy(images, objective, estimator):
    """Burda et al.'s two-layer model (784-200-200-100 / 100-100-100-50, tanh) on kernels/cuda_stack.py,
    in float64: the same numbers to rounding."""
    kw = dict(hidden=((200, 200), (100, 100)), activation="tanh", dtype="float64", seed=0)
    cpu, gpu = VAE(784, (100, 50), backend="numpy", **kw), VAE(784, (100, 50), backend="cuda", **kw)
    x = (images[:128] > 0.5).astype(np.float64)
    rng = np.random.default_rng(4)
    eps = tuple(rng.standard_normal((5, 128, z)) for z in (100, 50))
    kw = dict(objective=objective, estimator=estimator)
    l1, g1 = cpu.loss_and_grad(x, eps, **kw)
    g1 = g1.copy()
    l2, g2 = gpu.loss_and_grad(x, eps, **kw)
    assert abs(l2 - l1) <= 1e-10 * abs(l1)
    for name in cpu.layout.names:
        assert rel_error(cpu.layout.view(g1, name), cpu.layout.view(g2, name)) < 1e-9, name


def test_importance_sampling_with_k_5000(images):
    """log p(x) estimates with k = 5000 go through the decoder in chunks."""
    cpu, gpu = VAE(784, 20, backend="numpy", seed=0), VAE(784, 20, backend="cuda", seed=0)
    x = (images[:8] > 0.5).astype(np.float32)
    eps = np.random.default_rng(3).standard_normal((5000, 8, 20)).astype(np.float32)
    np.testing.assert_allclose(gpu.iwae_bound(x, eps), cpu.iwae_bound(x, eps), rtol=1e-4)


def test_device_eps_statistics_at_scale():
    from numba import cuda

    from minivae.kernels.cuda import CudaBackend
    from minivae.model import ModelSpec
    be = CudaBackend(ModelSpec(784, 50), np.float32)
    n, Z = 20000, 50
    out = cuda.to_device(np.zeros((n, 2 * Z), np.float32))
    eps, z, kl, logr = (cuda.device_array(s, np.float32) for s in ((1, n, Z), (n, Z), (n, Z), (n,)))
    be._reparam(out, eps, z, kl, logr, be._create_states(n, seed=1))
    e = eps.copy_to_host().ravel()
    N = e.size
    assert abs(e.mean()) < 5 / math.sqrt(N)
    assert abs(e.var() - 1) < 5 * math.sqrt(2 / N)
    assert abs(np.mean(np.abs(e) < 1) - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / N)


def test_device_training_matches_host(images):
    """20 device steps (dataset on the device, eps drawn there) against host steps with the same
    rows and the eps read back. SGD, whose update is linear in the gradient: Adam's m / sqrt(v)
    would turn rounding-level differences of near-zero gradients into whole steps of lr."""
    gpu = VAE(784, 20, hidden=(400,), backend="cuda", seed=0)
    cpu = VAE(784, 20, hidden=(400,), backend="numpy", seed=0)
    X = (images > 0.5).astype(np.float32)
    opt_g = make_optimizer("sgd", gpu.params.size, "float32", lr=1e-3, momentum=0.9)
    opt_c = make_optimizer("sgd", cpu.params.size, "float32", lr=1e-3, momentum=0.9)
    trainer = gpu.backend.make_trainer(gpu.params, opt_g, None, "elbo", 0.0, seed=0, loss_every=1)
    trainer.attach_data(X)
    rng = np.random.default_rng(4)
    for _ in range(20):
        idx = rng.choice(len(X), 128, replace=False)
        loss = trainer.step_indices(idx, 1.0)
        eps = gpu.backend._workspace(128, 1).eps.copy_to_host()
        l_c, g = cpu.backend.loss_and_grad(cpu.params, X[idx], eps)
        opt_c.step(cpu.params, g)
        assert loss == pytest.approx(l_c, rel=1e-4)
    trainer.sync_params()
    assert rel_error(gpu.params, cpu.params) < 1e-4
    np.testing.assert_allclose(opt_g.state["buf"], opt_c.state["buf"], rtol=1e-3, atol=1e-6)
    assert trainer.launches_per_step == 16


def test_device_training_learns(images):
    """Adam on the device, 320 steps of 128 binarized MNIST digits: the loss falls well below its start."""
    gpu = VAE(784, 20, hidden=(400,), backend="cuda", seed=0)
    X = (images > 0.5).astype(np.float32)
    opt = make_optimizer("adam", gpu.params.size, "float32", lr=1e-3)
    trainer = gpu.backend.make_trainer(gpu.params, opt, None, "elbo", 0.0, seed=0, loss_every=20)
    trainer.attach_data(X)
    rng = np.random.default_rng(5)
    losses = [trainer.step_indices(rng.choice(len(X), 128, replace=False), 1.0) for _ in range(320)]
    reported = [v for v in losses if v is not None]
    assert len(reported) == 16 and all(np.isfinite(reported))
    assert reported[-1] < 0.7 * reported[0]
    trainer.sync_params()
    assert opt.t == 320 and np.isfinite(gpu.params).all()


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_two_layer_device_trainer_matches_host_steps(images, objective):
    """The paper's two-layer model trained on the device (CudaStackTrainer: parameters, gradient and SGD
    state there) against NumPy steps on the same rows and eps, float64, 10 steps of batch 64."""
    kw = dict(hidden=((200, 200), (100, 100)), activation="tanh", dtype="float64", seed=0)
    gpu, cpu = VAE(784, (100, 50), backend="cuda", **kw), VAE(784, (100, 50), backend="numpy", **kw)
    X = (images > 0.5).astype(np.float64)
    opt_g = make_optimizer("sgd", gpu.params.size, "float64", lr=1e-3, momentum=0.9)
    opt_c = make_optimizer("sgd", cpu.params.size, "float64", lr=1e-3, momentum=0.9)
    trainer = gpu.backend.make_trainer(gpu.params, opt_g, None, objective, 0.0, loss_every=1)
    rng = np.random.default_rng(5)
    k = 5 if objective == "iwae" else 1
    for _ in range(10):
        x = X[rng.choice(len(X), 64, replace=False)]
        eps = tuple(rng.standard_normal((k, 64, z)) for z in (100, 50))
        l_c, g = cpu.backend.loss_and_grad(cpu.params, x, eps, objective=objective)
        opt_c.step(cpu.params, g)
        assert trainer.step(x, eps, 1.0) == pytest.approx(l_c, rel=1e-9)
    trainer.sync_params()
    assert rel_error(trainer.params, cpu.params) < 1e-9
