"""The custom GEMM (minivae/kernels/gemm.py) and the earlier variants of its ladder
(minivae/kernels/gemm_variants.py) against NumPy, in float64 (rel_error <= 1e-12) and float32 (1e-5).

Shapes straddle the micro-tile (8 rows x 32 float32 / 16 float64 columns) and the ymm edge kernels
(8 / 4 columns); tiles of one element and of the whole matrix; a NaN-filled panel buffer of exactly
``pack_size`` elements (a read beyond what was packed poisons the result) and a sentinel after C (a
store beyond C is seen).
"""
import numpy as np
import pytest

from minivae.gradcheck import rel_error
from minivae.kernels import gemm, gemm_variants

TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = (np.float64, np.float32)
# (M, K, N): 1 x 1, K = 0, columns 1..3 vectors of ymm, a full panel +- 1, several row and column
# panels, and a thin model-like product
SHAPES = [(1, 1, 1), (3, 0, 4), (7, 5, 8), (9, 3, 17), (8, 6, 16), (16, 2, 24), (5, 4, 31), (8, 9, 32),
          (17, 11, 33), (33, 70, 65), (20, 40, 100)]
TILES = [(1, 1), (3, 5), (16, 64), (10 ** 6, 10 ** 6)]


def _operands(rng, M, K, N, dtype):
    A = rng.standard_normal((M, K)).astype(dtype)
    B = rng.standard_normal((K, N)).astype(dtype)
    return A, B, A.astype(np.float64) @ B.astype(np.float64)


def _run(fn, M, N, dtype):
    """fn(C) on a C of shape (M, N) with NaN in it and a sentinel tail after it; returns C."""
    buf = np.full(M * N + 40, np.nan, dtype=dtype)
    buf[M * N:] = 7.0
    C = buf[:M * N].reshape(M, N)
    fn(C)
    assert np.all(buf[M * N:] == 7.0), "store beyond C"
    return C


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["nn", "nt", "tn"])
def test_custom_gemm_matches_numpy(dtype, form):
    rng = np.random.default_rng(21)
    for M, K, N in SHAPES:
        A, B, want = _operands(rng, M, K, N, dtype)
        P = np.full(gemm.pack_size(form, N, K, dtype), np.nan, dtype=dtype)
        for mb, nb in TILES:
            if form == "nn":
                C = _run(lambda C: gemm.gemm_nn(A, B, C, P, mb, nb), M, N, dtype)
            elif form == "nt":
                Bt = np.ascontiguousarray(B.T)
                C = _run(lambda C: gemm.gemm_nt(A, Bt, C, P, mb, nb), M, N, dtype)
            else:
                At = np.ascontiguousarray(A.T)
                C = _run(lambda C: gemm.gemm_tn(At, B, C, P, mb, nb), M, N, dtype)
            assert rel_error(C, want) <= TOL[dtype], (form, M, K, N, mb, nb)


def test_custom_gemm_on_a_model_shape():
    """A full-size product of the 784-400-20 model (128 x 784 x 400) in the three forms, float32."""
    rng = np.random.default_rng(22)
    A, B, want = _operands(rng, 128, 784, 400, np.float32)
    P = np.empty(gemm.pack_size("nt", 400, 784, np.float32), np.float32)
    for C in (_run(lambda C: gemm.gemm_nn(A, B, C, P, 64, 128), 128, 400, np.float32),
              _run(lambda C: gemm.gemm_nt(A, np.ascontiguousarray(B.T), C, P, 64, 128), 128, 400, np.float32),
              _run(lambda C: gemm.gemm_tn(np.ascontiguousarray(A.T), B, C, P, 64, 128), 128, 400, np.float32)):
        assert rel_error(C, want) <= 1e-5


def test_panel_width_and_pack_size():
    assert gemm.panel_width(np.float32) == 32 and gemm.panel_width(np.float64) == 16
    assert gemm.pack_size("nt", 33, 5, np.float32) == 5 * 32 * 2
    assert gemm.pack_size("nn", 33, 5, np.float64) == gemm.pack_size("tn", 33, 5, np.float64) == 5 * 16


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", sorted(gemm_variants.VARIANTS))
def test_every_variant_matches_numpy(dtype, v):
    """Each rung of the ladder is validated before benchmarks/gemm.py times it."""
    rng = np.random.default_rng(23)
    for M, K, N in [(1, 1, 1), (9, 3, 17), (17, 11, 33), (20, 40, 70)]:
        A, B, want = _operands(rng, M, K, N, dtype)
        size = gemm_variants.buffer_size(v, M, N, K, dtype)
        P, P2 = np.zeros(size, dtype), np.zeros(size, dtype)
        ops = {"nn": (A, B), "nt": (A, np.ascontiguousarray(B.T)), "tn": (np.ascontiguousarray(A.T), B)}
        for form, fn in gemm_variants.VARIANTS[v].items():
            for mb, nb in [(3, 5), (16, 64)]:
                C = _run(lambda C: fn(*ops[form], C, P, P2, mb, nb), M, N, dtype)
                assert rel_error(C, want) <= TOL[dtype], (v, form, M, K, N, mb, nb)


# moved with the code from tests/test_numba.py (variant 1 was the backend's custom GEMM)
def test_gemm_nt_kernel_on_a_model_shape():
    rng = np.random.default_rng(2)
    A = rng.standard_normal((37, 130)).astype(np.float32)
    B = rng.standard_normal((45, 130)).astype(np.float32)
    C = np.empty((37, 45), np.float32)
    gemm_variants.gemm_nt_(A, B, C, 16, 64)
    assert rel_error(C, A.astype(np.float64) @ B.T.astype(np.float64)) <= 1e-5


def test_transpose():
    rng = np.random.default_rng(3)
    for M, N in [(1, 1), (1, 40), (33, 65)]:
        A = rng.standard_normal((M, N))
        At = np.empty((N, M))
        gemm_variants.transpose_(A, At)
        np.testing.assert_array_equal(At, A.T)
