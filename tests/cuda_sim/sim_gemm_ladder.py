"""The GEMM ladder of minivae/kernels/cuda_gemm.py under the simulator: every variant against NumPy on
odd shapes, with small tiles that the shapes do not divide (every load and store guard is hit).

Run by tests/test_cuda_sim.py in a process with NUMBA_ENABLE_CUDASIM=1.
"""
import numpy as np
import pytest
from simutil import dev

# small tiles per variant; warp tiling keeps 32-thread warps (two warps, or two sub-tiles per warp)
TILES = [
    (1, {"T": 4}),
    (2, {"T": 5}),
    (3, {"BM": 6, "BN": 8, "BK": 3, "TM": 2, "TN": 4}),
    (4, {"BM": 6, "BN": 8, "BK": 4, "TM": 3, "TN": 2}),
    (5, {"BM": 16, "BN": 32, "BK": 4, "WM": 16, "WN": 16, "WNITER": 2, "TM": 2, "TN": 2}),
    (5, {"BM": 16, "BN": 16, "BK": 8, "WM": 16, "WN": 16, "WNITER": 1, "TM": 2, "TN": 2}),
]
IDS = ["1-naive", "2-smem", "3-regtile", "4-vectorized", "5-warptile-wn2", "5-warptile-wm2"]


def cg():
    from minivae.kernels import cuda_gemm
    return cuda_gemm


@pytest.mark.parametrize("number,tiles", TILES, ids=IDS)
@pytest.mark.parametrize("M,K,N", [(13, 11, 19), (1, 5, 3)])
def test_gemm_ladder_matches_numpy(number, tiles, M, K, N, rng):
    A = rng.standard_normal((M, K)).astype(np.float32)
    B = rng.standard_normal((K, N)).astype(np.float32)
    C = dev(np.full((M, N), np.nan, np.float32))
    cg().gemm(number, dev(A), dev(B), C, **tiles)
    np.testing.assert_allclose(C.copy_to_host(), A.astype(np.float64) @ B, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("number,tiles", [TILES[2], TILES[4]], ids=["3-regtile", "5-warptile"])
def test_gemm_ladder_float64(number, tiles, rng):
    A, B = rng.standard_normal((9, 7)), rng.standard_normal((7, 10))
    C = dev(np.zeros((9, 10)))
    cg().gemm(number, dev(A), dev(B), C, **tiles)
    np.testing.assert_allclose(C.copy_to_host(), A @ B, rtol=1e-12)


def test_gemm_ladder_rejects_bad_shapes_and_tiles():
    g = cg()
    z = dev(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="gemm"):
        g.gemm(1, z, z, dev(np.zeros((3, 4), np.float32)))
    with pytest.raises(ValueError, match="variant"):
        g.kernel_and_launch(6, np.float32, 4, 4)
    with pytest.raises(ValueError, match="multiples of 4"):
        g.kernel_and_launch(4, np.float32, 4, 4, BK=3)
    with pytest.raises(ValueError, match="warp tiling"):
        g.kernel_and_launch(5, np.float32, 4, 4, WM=48)
