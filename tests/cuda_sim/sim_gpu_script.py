"""benchmarks/gpu.py's validation under the simulator, at tiny sizes: every GEMM variant (the ladder and
the backend's) is checked against NumPy before it is timed, and a wrong result is reported, not timed.

Run by tests/test_cuda_sim.py in a process with NUMBA_ENABLE_CUDASIM=1.
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_variant_is_validated_then_timed(gpu):
    shapes = [gpu.Shape("dW = x^T dY", 6, 4, 5, ta=True)]
    rows, failures = gpu.gemm_rows(shapes, reps=1, smoke=True, ref=gpu.cublas())
    assert failures == []
    kernels = [r["kernel"] for r in rows]
    assert len(kernels) == 5 + 2 and kernels[0].startswith("1:") and kernels[4].startswith("5:")
    for r in rows:
        assert r["status"] == "ok" and r["rel_error"] <= gpu.TOL and r["gflops"] > 0
    assert {r["form"] for r in rows} == {"nn", "tn"}


def test_a_wrong_kernel_is_reported_not_timed(gpu, monkeypatch):
    from minivae.kernels import cuda_gemm

    def wrong(number, A, B, C, **tiles):
        C.copy_to_device(np.zeros(C.shape, np.float32))
    monkeypatch.setattr(cuda_gemm, "gemm", wrong)
    rows, failures = gpu.gemm_rows([gpu.Shape("odd", 3, 2, 4)], reps=1, smoke=True, ref=None)
    bad = [r for r in rows if r["kernel"][0].isdigit()]
    assert len(bad) == 5 and len(failures) == 5
    assert all(r["status"] == "FAILED validation" and r["gflops"] is None for r in bad)
    assert all(r["status"] == "ok" for r in rows if r["kernel"].startswith("backend"))
