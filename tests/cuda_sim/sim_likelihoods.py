"""The CUDA likelihood kernel (one generic loop over the registered scalar functions, cuda_kernels.py)
against each likelihood module's NumPy pair, on the module's own test inputs, under the simulator.

Run by tests/test_cuda_sim.py in a process with NUMBA_ENABLE_CUDASIM=1.
"""
import numpy as np
import pytest
from simutil import configs, dev, make_backend

from minivae import distributions as dist
from minivae import likelihoods
from minivae.gradcheck import rel_error


def test_codes_come_from_the_registry():
    from minivae.kernels import cuda_kernels as ck
    assert ck.LIK_CODE == likelihoods.codes()
    assert (ck.BERNOULLI, ck.CONT_BERNOULLI, ck.GAUSSIAN) == (0, 1, 2)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("name", likelihoods.names())
def test_likelihood_kernel_on_the_modules_inputs(name, dtype, tol):
    m = likelihoods.get(name)
    x, head = m.test_inputs(dtype)
    x, head = x[:3], head[:3]                                  # 3 rows: the simulator is slow
    be = make_backend(configs()[0], likelihood=name, dtype=dtype, x_dim=x.shape[1])
    R, K = head.shape
    G, ll = dev(np.zeros((R, K), dtype)), dev(np.zeros(R, dtype))
    be._likelihood(dev(x), dev(head), G, ll, -0.5, 0.0)
    vf = be.spec.var_floor
    assert rel_error(ll.copy_to_host(), dist.loglik_forward(name, x, head[None], vf)[0]) <= tol
    assert rel_error(G.copy_to_host(), -0.5 * m.score(x, head, vf)) <= tol
