"""The CUDA backend without a GPU.

1. The kernels and the device-resident step run under numba's CUDA simulator. The simulator is
   chosen when numba is imported (``NUMBA_ENABLE_CUDASIM=1``), so its tests (tests/cuda_sim/sim_*.py)
   run in a pytest process of their own, started here; its output is shown when it fails.
2. In this process (no simulator), ``backend="cuda"`` without a usable GPU fails at once with a
   one-line RuntimeError that names the cause, and never falls back to the CPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cudacompile import gpu_compiler

ROOT = Path(__file__).resolve().parent.parent
SIM_TESTS = sorted((ROOT / "tests" / "cuda_sim").glob("sim_*.py"))
CAUSES = ("numba.cuda cannot be imported", "no CUDA driver", "no CUDA device",
          "the CUDA driver failed to initialise", "the CUDA device cannot be used")


@pytest.mark.slow
def test_cuda_backend_under_the_simulator():
    assert SIM_TESTS, "tests/cuda_sim/sim_*.py not found"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    cmd = [sys.executable, "-m", "pytest", *map(str, SIM_TESTS), "-q", "-p", "no:cacheprovider",
           "-W", "ignore::numba.core.errors.NumbaWarning",          # xoroshiro seeding in object mode
           "-W", "ignore:overflow encountered:RuntimeWarning"]      # its uint64 arithmetic, in NumPy
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"simulator tests failed:\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


def _gpu_or_simulator():
    from numba.core import config
    if config.ENABLE_CUDASIM:
        return True
    from numba import cuda
    return cuda.is_available()


def _expect_unavailable(cause):
    from minivae import VAE
    with pytest.raises(RuntimeError) as e:
        VAE(4, 2, hidden=(3,), backend="cuda")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("backend 'cuda' is unavailable: ")
    assert cause in msg, msg
    return msg


def test_cuda_backend_without_a_gpu_fails_with_one_line():
    if _gpu_or_simulator():
        pytest.skip("a GPU (or the simulator) is available here")
    msg = _expect_unavailable("")
    assert any(c in msg for c in CAUSES), msg


def test_a_stack_on_cuda_without_a_gpu_fails_with_one_line(tmp_path, capsys):
    """cuda runs stacks (kernels/cuda_stack.py): without a GPU, the same one-line cause as for S = 1."""
    if _gpu_or_simulator():
        pytest.skip("a GPU (or the simulator) is available here")
    from minivae import VAE
    from minivae.cli import main
    with pytest.raises(RuntimeError, match=r"^backend 'cuda' is unavailable: [^\n]+$"):
        VAE(4, (3, 2), hidden=(3,), backend="cuda")
    code = main(["train", "--dataset", "digits", "--epochs", "1", "--quiet", "--no-plots", "--out",
                 str(tmp_path / "r"), "--z-dim", "4", "2", "--backend", "cuda", "--objective", "iwae",
                 "--estimator", "dreg"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("minivae: error: backend 'cuda' is unavailable: "), err


def test_the_message_names_a_missing_numba_cuda(monkeypatch):
    import numba
    monkeypatch.delattr(numba, "cuda", raising=False)
    monkeypatch.setitem(sys.modules, "numba.cuda", None)       # `from numba import cuda` -> ImportError
    _expect_unavailable("numba.cuda cannot be imported")


class _Driver:
    def __init__(self, count=0, error=None):
        self.count, self.error = count, error

    def get_device_count(self):
        if self.error:
            raise self.error
        return self.count


@pytest.mark.parametrize("driver,cause", [
    (_Driver(error=RuntimeError("Error at driver init: CUDA driver library cannot be found.")), "no CUDA driver"),
    (_Driver(error=RuntimeError("Error at driver init: Call to cuInit results in CUDA_ERROR_NO_DEVICE (100)")),
     "no CUDA device"),
    (_Driver(count=0), "no CUDA device"),
    (_Driver(count=1), "the CUDA device cannot be used"),
], ids=["no-driver", "no-device-at-init", "zero-devices", "unusable-device"])
def test_the_message_names_the_driver_or_device_cause(driver, cause, monkeypatch):
    from numba.core import config
    if config.ENABLE_CUDASIM:
        pytest.skip("the simulator has no driver")
    from numba import cuda
    from numba.cuda.cudadrv import driver as driver_module
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr(driver_module, "driver", driver)
    _expect_unavailable(cause)


# -- every launch type-checks and compiles for a GPU, without one -----------------------------------

def test_every_launch_compiles_for_the_gpu(monkeypatch):
    """The simulator runs kernels as Python, so it cannot see a typing error of numba's CUDA compiler.
    Here the host code runs against host-array stand-ins (every code path: both dtypes, both GEMMs,
    fused and not, ELBO with free bits and IWAE, the bounds, encode/decode, the trainer with each
    optimizer and both eps sources; a two-layer stack), each launch's argument types are recorded, and every distinct
    (kernel, types) goes through numba's CUDA pipeline, typing and lowering to NVVM IR, for compute
    capability 8.0 (only PTX generation needs the CUDA toolkit). The launch shapes are checked too."""
    compile_for_gpu, types = gpu_compiler(monkeypatch, (8, 0))

    from minivae.kernels.cuda import CudaConfig, recording_backend
    from minivae.kernels.cuda_stack import recording_stack_backend
    from minivae.model import ModelSpec
    from minivae.optim import make_optimizer

    launches = {}

    rng = np.random.default_rng(0)
    n, D, Z = 5, 9, 3
    for dtype in (np.float32, np.float64):
        for cfg in (CudaConfig(gemm=2, tile=16, reg=4), CudaConfig(gemm=1, tile=8, fuse=False)):
            spec = ModelSpec(D, Z, hidden=(6, 4), likelihood="gaussian")
            be = recording_backend(spec, dtype, cfg)
            params = spec.layout.init(rng, dtype)
            x = rng.random((n, D)).astype(dtype)
            eps = rng.standard_normal((2, n, Z)).astype(dtype)
            be.loss_and_grad(params, x, eps, free_bits=0.1)
            be.loss_and_grad(params, x, eps, objective="iwae", beta=0.5)
            be.bound(params, x, eps, "elbo")
            be.bound(params, x, eps, "iwae")
            be.encode(params, x)
            be.decode(params, eps[0])
            for name in ("adam", "sgd", "adagrad"):
                trainer = be.make_trainer(params.copy(), make_optimizer(name, params.size, dtype.__name__),
                                          samples=2)
                trainer.step(x, eps, 1.0)
                trainer.step(x, None, 1.0)
                trainer.attach_data(x)
                trainer.step_indices(np.array([0, 3, 1]), 1.0)
                trainer.sync_params()
            launches.update(be.recorded)
            # a stack of stochastic layers (kernels/cuda_stack.py): its blocks' launches
            stack = recording_stack_backend(ModelSpec(D, (Z, 2), hidden=((6, 4), (3,)), likelihood="gaussian"),
                                            dtype, cfg)
            sparams = stack.spec.layout.init(rng, dtype)
            seps = (eps, rng.standard_normal((2, n, 2)).astype(dtype))
            stack.loss_and_grad(sparams, x, seps, objective="iwae", estimator="dreg")
            stack.loss_and_grad(sparams, x, seps, objective="elbo")
            stack.bound(sparams, x, seps, "elbo")
            stack.make_trainer(sparams.copy(), make_optimizer("adam", sparams.size, dtype.__name__)).step(x, seps)
            assert stack.recorded
            launches.update(stack.recorded)
    for grid, block in launches.values():
        assert 1 <= np.prod(block) <= 1024
        assert grid[0] < 2 ** 31 and all(g < 65536 for g in grid[1:]), grid
    failures = []
    for (kernel, argtypes) in launches:
        try:
            compile_for_gpu(kernel, argtypes)
        except Exception as e:  # noqa: BLE001 - collect every failure, then report them all
            failures.append(f"{kernel.py_func.__name__}{argtypes}: {type(e).__name__}: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)
    names = {k.py_func.__name__ for k, _ in launches}
    assert names >= {"gemm_tiled", "gemm_regtile", "bias_act", "act_backward", "bias_grad", "reparam_kl",
                     "likelihood", "iwae_weights", "scale_rows", "posterior_backward", "gather_rows",
                     "adam_update", "sgd_update", "adagrad_update"}, names
    stack_kernels = {"stack_gauss_fwd", "stack_gauss_logpdf_add", "stack_gauss_logpdf_bwd", "stack_prior_add",
                     "stack_prior_bwd", "stack_logq_eps_add", "stack_kl_add", "stack_posterior_bwd", "stack_upstream",
                     "stack_dreg_factor", "stack_scale_rows_by", "stack_add", "stack_elbo_bound"}
    assert names >= stack_kernels, stack_kernels - names
