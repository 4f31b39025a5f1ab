"""Compile CUDA kernels for a GPU without one (shared by tests/test_cuda_sim.py and tests/test_cuda_gemm.py).

The simulator runs kernels as Python and cannot see a typing error of numba's CUDA compiler. ``gpu_compiler``
sends a kernel through numba's CUDA pipeline (typing and lowering to NVVM IR) for a given compute capability,
with the device query answered by a stand-in; only PTX generation would need the CUDA toolkit. It skips the
calling test where that is impossible (under the simulator, or a numba.cuda without these entry points)."""
import pytest


def gpu_compiler(monkeypatch, cc):
    """(compile, types): compile(kernel, argtypes) lowers ``kernel`` (a numba.cuda dispatcher) for compute
    capability ``cc``; ``types`` is numba.core.types, to build the argument types."""
    from numba.core import config
    if config.ENABLE_CUDASIM:
        pytest.skip("the simulator replaces the CUDA compiler")
    try:
        from numba.core import types
        from numba.cuda import dispatcher as cuda_dispatcher
        from numba.cuda.compiler import compile_cuda
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"numba.cuda's compiler cannot be imported here ({type(e).__name__})")
    if not hasattr(cuda_dispatcher, "get_current_device"):
        pytest.skip("this numba.cuda picks the device's compute capability elsewhere")

    class Device:
        compute_capability = cc
    monkeypatch.setattr(cuda_dispatcher, "get_current_device", lambda: Device)
    return (lambda kernel, argtypes: compile_cuda(kernel.py_func, types.void, argtypes, cc=cc)), types
