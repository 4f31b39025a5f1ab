"""The GEMM ladder (minivae/kernels/cuda_gemm.py) type-checks and lowers for a GPU, without one.

The simulator (tests/cuda_sim/sim_gemm_ladder.py checks the numbers) runs kernels as Python and cannot
see a typing error of numba's CUDA compiler: here each variant, at the tile sizes benchmarks/gpu.py
launches on a device, goes through numba's CUDA pipeline to NVVM IR for compute capability 9.0."""
import pytest
from cudacompile import gpu_compiler


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_gemm_variant_compiles_for_the_gpu(dtype, monkeypatch):
    compile_for_gpu, types = gpu_compiler(monkeypatch, (9, 0))
    from minivae.kernels import cuda_gemm

    arr = types.Array(getattr(types, dtype), 2, "C")
    failures = []
    for number in cuda_gemm.VARIANTS:
        kernel, grid, block = cuda_gemm.kernel_and_launch(number, dtype, 4096, 4096)
        threads = 1
        for b in block:
            threads *= b
        assert 32 <= threads <= 1024 and threads % 32 == 0, (number, block)
        try:
            compile_for_gpu(kernel, (arr, arr, arr))
        except Exception as e:  # noqa: BLE001 - report every variant that fails
            failures.append(f"variant {number}: {type(e).__name__}: {str(e).splitlines()[0]}")
    assert not failures, "\n".join(failures)


def test_gpu_script_without_a_gpu_exits_with_one_line():
    """benchmarks/gpu.py on a machine without a GPU: exit status 1 and one line naming the cause."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from minivae.kernels.cuda import unavailable_reason
    if unavailable_reason() is None:
        pytest.skip("a GPU (or the simulator) is available here")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["PYTHONPATH"] = str(root)
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu.py"), "--quick"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert r.stderr.startswith("benchmarks/gpu.py needs an NVIDIA GPU: ") and r.stderr.count("\n") == 1, r.stderr
