"""The device-resident training step against host steps, under the simulator: each optimizer, eps
from the host and from the device RNG, the on-device dataset, loss reporting every N steps, the
launch count, the MPI all-reduce hook, and checkpoints moving between "GPU" and CPU.
"""
import numpy as np
import pytest
from simutil import configs

from minivae import VAE
from minivae.kernels.numpy_ import NumpyBackend
from minivae.model import ModelSpec
from minivae.optim import make_optimizer

CFG = configs()[0]
HYPER = {"adam": dict(lr=1e-2, weight_decay=1e-3), "sgd": dict(lr=5e-2, momentum=0.9, weight_decay=1e-3),
         "adagrad": dict(lr=5e-2, weight_decay=1e-3)}


def setup(rng, name="adam", likelihood="bernoulli", hidden=(5,), D=7, Z=3, N=9):
    from minivae.kernels.cuda import CudaBackend
    spec = ModelSpec(D, Z, hidden=hidden, likelihood=likelihood, activation="tanh")
    params = spec.layout.init(rng, np.float32)
    X = (rng.random((N, D)) > 0.5).astype(np.float32)
    be = CudaBackend(spec, np.float32, CFG)
    ref = NumpyBackend(spec, np.float32)
    opt_dev = make_optimizer(name, params.size, "float32", **HYPER[name])
    opt_host = make_optimizer(name, params.size, "float32", **HYPER[name])
    return spec, be, ref, params, X, opt_dev, opt_host


def host_step(ref, p, opt, xb, eps, beta, objective="elbo"):
    loss, g = ref.loss_and_grad(p, xb, eps, beta=beta, objective=objective)
    opt.step(p, g)
    return loss


def assert_same_state(trainer, p_host, opt_host):
    trainer.sync_params()
    np.testing.assert_allclose(trainer.params, p_host, rtol=1e-4, atol=2e-6)
    for k, v in opt_host.state.items():
        np.testing.assert_allclose(trainer.optimizer.state[k], v, rtol=1e-3, atol=1e-7)
    assert trainer.optimizer.t == opt_host.t


@pytest.mark.parametrize("name", ["adam", "sgd", "adagrad"])
def test_trainer_steps_match_host_steps(name, rng):
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng, name)
    p_host = params.copy()
    trainer = be.make_trainer(params, opt_dev, None, "elbo", 0.0, loss_every=1)
    for s, beta in enumerate((0.2, 0.6, 1.0)):
        xb = X[3 * s:3 * s + 4]
        eps = rng.standard_normal((1, len(xb), spec.z_dim)).astype(np.float32)
        loss = trainer.step(xb, eps, beta)
        assert loss == pytest.approx(host_step(ref, p_host, opt_host, xb, eps, beta), rel=1e-5)
    assert_same_state(trainer, p_host, opt_host)


@pytest.mark.parametrize("objective,samples", [("elbo", 1), ("iwae", 3)])
def test_step_indices_with_device_eps_matches_host(objective, samples, rng):
    """The dataset on the device, the minibatch gathered there and eps drawn there: the host step
    with the same rows and the same (read back) eps lands on the same parameters."""
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng)
    p_host = params.copy()
    trainer = be.make_trainer(params, opt_dev, None, objective, 0.0, samples=samples, seed=5, loss_every=1)
    trainer.attach_data(X)
    for idx in (np.array([7, 2, 4]), np.array([0, 8, 1])):
        loss = trainer.step_indices(idx, 0.9)
        eps = be._workspace(len(idx), samples).eps.copy_to_host()      # what the device drew
        assert eps.shape == (samples, len(idx), spec.z_dim) and np.isfinite(eps).all()
        assert loss == pytest.approx(host_step(ref, p_host, opt_host, X[idx], eps, 0.9, objective), rel=1e-5)
    assert_same_state(trainer, p_host, opt_host)


def test_device_noise_never_restarts_when_the_batch_grows(rng):
    """Threads keep their xoroshiro streams across steps; a larger batch adds new streams."""
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng)
    trainer = be.make_trainer(params, opt_dev, None, "elbo", 0.0, seed=3)
    draws = []
    for n in (2, 2, 4):
        trainer.step(X[:n], None, 1.0)
        draws.append(be._workspace(n, 1).eps.copy_to_host()[0])
    first, second, third = draws
    assert not np.allclose(first, second)             # the same threads, the next numbers
    assert not np.isclose(third[:2], first).any() and not np.isclose(third[:2], second).any()
    assert len({tuple(r) for r in np.concatenate(draws)}) == 8


def test_loss_comes_back_every_n_steps_and_launches_are_counted(rng):
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng)
    p_host = params.copy()
    trainer = be.make_trainer(params, opt_dev, None, "elbo", 0.0, loss_every=3)
    trainer.attach_data(X)
    host_losses, got = [], []
    for s in range(4):
        xb = X[2 * s:2 * s + 2]
        eps = rng.standard_normal((1, 2, spec.z_dim)).astype(np.float32)
        got.append(trainer.step(xb, eps, 1.0))
        host_losses.append(host_step(ref, p_host, opt_host, xb, eps, 1.0))
    assert got[:2] == [None, None] and got[3] is None
    assert got[2] == pytest.approx(np.mean(host_losses[:3]), rel=1e-5)
    assert trainer.flush_loss() == pytest.approx(host_losses[3], rel=1e-5)
    assert trainer.flush_loss() is None
    # one hidden layer each side, ELBO: 14 kernels for the pass + 1 optimizer update (+1 gather)
    assert trainer.launches_per_step == 15
    trainer.step_indices(np.array([1, 2]), 1.0)
    assert trainer.launches_per_step == 16
    trainer.sync_params()
    assert np.isfinite(trainer.params).all()


class FakeComm:
    """Two ranks holding the same data: the mean over ranks is the local gradient. Records calls."""
    size, rank, is_root = 2, 0, True

    def __init__(self):
        self.calls = []

    def allreduce_mean_(self, arr, weight=None):
        self.calls.append((arr.copy(), weight))
        return arr


def test_distributed_gradient_goes_through_the_communicator(rng):
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng, "sgd")
    p_host = params.copy()
    comm = FakeComm()
    trainer = be.make_trainer(params, opt_dev, comm, "elbo", 0.0, loss_every=1)
    xb = X[:3]
    eps = rng.standard_normal((1, 3, spec.z_dim)).astype(np.float32)
    trainer.step(xb, eps, 1.0, weight=3)
    _, g_ref = ref.loss_and_grad(p_host, xb, eps)
    assert len(comm.calls) == 1 and comm.calls[0][1] == 3
    np.testing.assert_allclose(comm.calls[0][0], g_ref, rtol=1e-4, atol=1e-6)
    # an empty share (a tiny last batch split over ranks) still joins the all-reduce with zeros
    assert trainer.step(X[:0], None, 1.0, weight=0) == 0.0          # no rows, no loss (as HostTrainer)
    assert len(comm.calls) == 2 and not comm.calls[1][0].any()
    opt_host.step(p_host, g_ref)
    opt_host.step(p_host, np.zeros_like(g_ref))
    assert_same_state(trainer, p_host, opt_host)


class OtherRankComm(FakeComm):
    """Two ranks; the other rank's per-dimension KL sum is ``other`` over ``n_other`` rows."""

    def __init__(self, other, n_other):
        super().__init__()
        self.other, self.n_other, self.sums = np.asarray(other, np.float64), n_other, []

    def allreduce_sum(self, arr):
        self.sums.append(arr.copy())
        return arr + np.append(self.other, self.n_other)


def test_free_bits_over_ranks_use_the_whole_minibatch_decision(rng):
    """With free bits and more than one rank, the trainer all-reduces the per-dimension KL sums
    (Z + 1 numbers, as trainers.HostTrainer) and the posterior backward applies the whole minibatch's
    decision (kl_active): here the other rank's KL reverses this share's decision on every dimension."""
    from minivae.distributions import kl_forward
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng, "sgd")
    xb = X[:4]
    eps = rng.standard_normal((2, 4, spec.z_dim)).astype(np.float32)
    mu, lv = ref.encode(params, xb)
    kl_sum = kl_forward(mu.astype(np.float64), lv.astype(np.float64)).sum(axis=0)
    free_bits = float(np.median(kl_sum / 4))
    local = kl_sum / 4 > free_bits
    # the other rank's 4 rows: KL far above the floor where this share is under, zero where over
    other = np.where(local, 0.0, 40 * free_bits + 1.0)
    want = ((kl_sum + other) / 8 > free_bits).astype(np.float64)
    assert (want != local).all()
    comm = OtherRankComm(other, 4)
    trainer = be.make_trainer(params.copy(), opt_dev, comm, "elbo", free_bits, loss_every=1)
    loss = trainer.step(xb, eps, 1.2, weight=4)
    assert len(comm.sums) == 1 and comm.sums[0][-1] == 4
    np.testing.assert_allclose(comm.sums[0][:-1], kl_sum, rtol=1e-5)
    l_ref, g_ref = ref.loss_and_grad(params, xb, eps, beta=1.2, free_bits=free_bits, kl_active=want)
    np.testing.assert_allclose(comm.calls[0][0], g_ref, rtol=1e-4, atol=1e-6)
    assert loss == pytest.approx(l_ref, rel=1e-5)
    # an empty share still joins both collectives (a zero KL sum over 0 rows)
    trainer.step(X[:0], None, 1.0, weight=0)
    assert len(comm.sums) == 2 and not comm.sums[1].any()


def test_a_failing_step_still_joins_the_all_reduce(rng, monkeypatch):
    """With other ranks waiting in the all-reduce, an exception in this rank's step is kept in
    ``trainer.error`` and the rank contributes a NaN gradient (the loop then stops every rank);
    alone, the exception is raised as it is."""
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng, "sgd")
    eps = rng.standard_normal((1, 3, spec.z_dim)).astype(np.float32)

    def boom(*args, **kwargs):
        raise FloatingPointError("injected")

    comm = FakeComm()
    trainer = be.make_trainer(params, opt_dev, comm, "elbo", 0.0, loss_every=1)
    monkeypatch.setattr(be, "_forward_backward", boom)
    trainer.step(X[:3], eps, 1.0, weight=3)
    assert isinstance(trainer.error, FloatingPointError)
    assert len(comm.calls) == 1 and np.isnan(comm.calls[0][0]).all()
    alone = be.make_trainer(params.copy(), make_optimizer("sgd", params.size, "float32", **HYPER["sgd"]))
    with pytest.raises(FloatingPointError, match="injected"):
        alone.step(X[:3], eps, 1.0)


def test_trainer_refuses_bad_use(rng):
    spec, be, ref, params, X, opt_dev, opt_host = setup(rng)
    trainer = be.make_trainer(params, opt_dev)
    with pytest.raises(RuntimeError, match="attach_data"):
        trainer.step_indices(np.array([0, 1]))
    with pytest.raises(ValueError, match="free_bits"):
        be.make_trainer(params, opt_dev, None, "iwae", 0.5)
    with pytest.raises(ValueError, match="x_train"):
        trainer.attach_data(X[:, :3])


def test_checkpoint_from_gpu_loads_on_cpu_and_back(tmp_path, rng, monkeypatch):
    """Train on the (simulated) GPU, save; the CPU model loads the same parameters and computes the
    same loss; loaded back on the GPU, training resumes exactly where the CPU would."""
    from minivae.kernels import cuda as cuda_backend
    monkeypatch.setattr(cuda_backend, "CONFIG", CFG)
    kw = dict(hidden=(5,), likelihood="continuous_bernoulli", activation="leaky_relu", seed=11)
    gpu = VAE(7, 2, backend="cuda", **kw)
    X = rng.random((6, 7)).astype(np.float32)
    opt = make_optimizer("adam", gpu.params.size, "float32", lr=1e-2)
    trainer = gpu.backend.make_trainer(gpu.params, opt, None, "elbo", 0.0, seed=1)
    trainer.attach_data(X)
    for idx in ([0, 1, 2], [3, 4, 5]):
        trainer.step_indices(np.array(idx), 1.0)
    trainer.sync_params()
    path = tmp_path / "gpu.npz"
    gpu.save(path, extra_arrays=opt.state_dict())

    cpu = VAE.load(path, backend="numpy")
    np.testing.assert_array_equal(cpu.params, gpu.params)
    eps = rng.standard_normal((6, 2)).astype(np.float32)
    l_cpu, _ = cpu.loss_and_grad(X, eps)
    l_gpu, _ = gpu.loss_and_grad(X, eps)
    assert l_gpu == pytest.approx(l_cpu, rel=1e-5)

    back = VAE.load(path, backend="cuda")
    assert back.backend.name == "cuda"
    np.testing.assert_array_equal(back.params, gpu.params)
    from minivae.checkpoint import load
    _, arrays = load(path)
    opt_gpu = make_optimizer("adam", back.params.size, "float32", lr=1e-2)
    opt_cpu = make_optimizer("adam", cpu.params.size, "float32", lr=1e-2)
    opt_gpu.load_state_dict(arrays)
    opt_cpu.load_state_dict(arrays)
    assert opt_gpu.t == 2
    t2 = back.backend.make_trainer(back.params, opt_gpu, None, "elbo", 0.0, loss_every=1)
    e = eps[None, :3]
    loss = t2.step(X[:3], e, 1.0)
    assert loss == pytest.approx(host_step(cpu.backend, cpu.params, opt_cpu, X[:3], e, 1.0), rel=1e-5)
    assert_same_state(t2, cpu.params, opt_cpu)


def test_ranks_on_a_node_take_its_gpus_in_turn():
    """The simulator shows one GPU: every local rank binds to device 0 (with G GPUs, rank % G)."""
    from numba import cuda

    from minivae.kernels.cuda import select_local_device
    assert len(cuda.gpus) >= 1
    for local_rank in range(3):
        assert select_local_device(local_rank) == local_rank % len(cuda.gpus)
