"""Shared helpers of the simulator tests (not collected: no test_ prefix)."""
import numpy as np


def configs():
    """The launch configurations every numeric test runs under: the register-tiled GEMM with
    everything fused, and the plain tile with the standalone elementwise kernels."""
    from minivae.kernels.cuda import CudaConfig
    return [CudaConfig(gemm=2, tile=3, reg=2, block=5, fuse=True),
            CudaConfig(gemm=1, tile=5, reg=1, block=4, fuse=False)]


def make_backend(cfg, likelihood="bernoulli", dtype=np.float32, **spec):
    """A CudaBackend for a tiny model (x_dim 7, z_dim 3 unless given)."""
    from minivae.kernels.cuda import CudaBackend
    from minivae.model import ModelSpec
    return CudaBackend(ModelSpec(spec.pop("x_dim", 7), spec.pop("z_dim", 3), likelihood=likelihood, **spec),
                       dtype, cfg)


def dev(a):
    """A device copy of a host array."""
    from numba import cuda
    return cuda.to_device(np.ascontiguousarray(a))
