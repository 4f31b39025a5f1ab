"""Fixtures for the CUDA-simulator tests (files ``sim_*.py``, run by tests/test_cuda_sim.py).

These tests need ``NUMBA_ENABLE_CUDASIM=1`` in the environment *before* numba is imported, so they run
in their own pytest process: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim/sim_*.py``.
The file names do not match ``test_*.py``, so the normal test run never collects them; this
conftest only defines fixtures and imports no numba.

The simulator runs every CUDA thread as a Python thread and every __syncthreads() as a polled
barrier, so the shapes are tiny, the tiles odd (3, 5: every boundary guard is hit), and the
interpreter's thread switch interval short (barriers wait on it).
"""
import os
import sys

import numpy as np
import pytest

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


@pytest.fixture(autouse=True, scope="session")
def _simulator():
    if not SIM:
        pytest.skip("run through tests/test_cuda_sim.py: needs NUMBA_ENABLE_CUDASIM=1 before numba is imported")
    _thread_safe_shared_arrays()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def _thread_safe_shared_arrays():
    """numba's simulator hands every thread of a block the same array for a ``cuda.shared.array``
    call site through an unlocked get-or-create, so two threads switched between the get and the
    set can end up with private copies (a race of the simulator, not of the kernels: on a GPU the
    allocation is static). Make the get-or-create atomic; the call site is the caller's
    (file, line), as in the original."""
    import threading

    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    cls = kernelapi.FakeCUDAShared
    if getattr(cls, "_minivae_locked", False):
        return
    original = cls.array
    lock = threading.Lock()

    def array(self, shape, dtype):
        if shape == 0:                                 # dynamic shared memory: no call-site lookup
            return original(self, shape, dtype)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    cls.array = array
    cls._minivae_locked = True


@pytest.fixture
def rng():
    return np.random.default_rng(20261124)

