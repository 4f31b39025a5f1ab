"""The custom GEMM (minivae/kernels/gemm.py) and the earlier variants of its ladder
(minivae/kernels/gemm_variants.py) against NumPy, in float64 (rel_error <= 1e-12) and float32 (1e-5).

Shapes straddle the micro-tile (8 rows x 48 float32 / 24 float64 columns) and the ymm edge kernels
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
# panels, a thin model-like product, and k in several blocks (the tn form's KC_TN: whole blocks, and
# one more k after them)
SHAPES = [(1, 1, 1), (3, 0, 4), (7, 5, 8), (9, 3, 17), (8, 6, 16), (16, 2, 24), (5, 4, 31), (8, 9, 32),
          (17, 11, 33), (6, 5, 47), (8, 4, 48), (9, 6, 49), (33, 70, 65), (10, 3, 97), (20, 40, 100),
          (9, 2 * gemm.KC_TN, 40), (12, gemm.KC_TN + 1, 37)]
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


def _custom(form, A, B, P, mb, nb, serial, dtype):
    M, N = A.shape[0], B.shape[1]
    if form == "nn":
        return _run(lambda C: gemm.gemm_nn(A, B, C, P, mb, nb, serial), M, N, dtype)
    if form == "nt":
        Bt = np.ascontiguousarray(B.T)
        return _run(lambda C: gemm.gemm_nt(A, Bt, C, P, mb, nb, serial), M, N, dtype)
    if form == "nt packed":                # B^T packed beforehand (the split step's shared W^T)
        Bt = np.ascontiguousarray(B.T)
        gemm.pack_bt_panels_(Bt, P, 0, -(-N // gemm.panel_width(dtype)))
        return _run(lambda C: gemm.gemm_nt_packed(A, P, C, mb, nb, serial), M, N, dtype)
    At = np.ascontiguousarray(A.T)
    return _run(lambda C: gemm.gemm_tn(At, B, C, P, mb, nb, serial), M, N, dtype)


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["nn", "nt", "nt packed", "tn"])
def test_custom_gemm_matches_numpy(dtype, form, serial):
    """Over prange tiles, or (``serial``) task after task in the calling thread, as inside the parts of
    an example split (kernels/batchsplit.py)."""
    rng = np.random.default_rng(21)
    for M, K, N in SHAPES:
        A, B, want = _operands(rng, M, K, N, dtype)
        P = np.full(gemm.pack_size(form.split()[0], N, K, dtype), np.nan, dtype=dtype)
        for mb, nb in TILES:
            C = _custom(form, A, B, P, mb, nb, serial, dtype)
            assert rel_error(C, want) <= TOL[dtype], (form, M, K, N, mb, nb)


@pytest.mark.parametrize("form", ["nn", "nt", "tn"])
def test_serial_custom_gemm_is_the_parallel_one_bit_for_bit(form):
    """The same tasks, each summing over k in the same order: only who runs them differs."""
    rng = np.random.default_rng(5)
    A, B, _ = _operands(rng, 45, 70, 83, np.float32)
    P = np.zeros(gemm.pack_size(form, 83, 70, np.float32), np.float32)
    assert np.array_equal(_custom(form, A, B, P, 16, 64, True, np.float32),
                          _custom(form, A, B, P, 16, 64, False, np.float32))


@pytest.mark.parametrize("serial", [False, True])
def test_gemm_nt_from_packed_panels_is_gemm_nt_bit_for_bit(serial):
    """gemm_nt_packed reads the panels that gemm_nt would pack itself: the same products, the same sums."""
    rng = np.random.default_rng(6)
    A, B, _ = _operands(rng, 45, 70, 83, np.float32)
    P = np.zeros(gemm.pack_size("nt", 83, 70, np.float32), np.float32)
    assert np.array_equal(_custom("nt packed", A, B, P, 16, 64, serial, np.float32),
                          _custom("nt", A, B, P.copy(), 16, 64, serial, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_panel_of_bt_is_packed_as_numpy_transposes_it(dtype):
    """pack_bt_panel_ (in-register W x W block transposes inside Bt, element by element at its edges)
    against NumPy: panel p of B = Bt^T, K x nr, zero-padded beyond N, for every panel of shapes that are
    and are not whole blocks, for the GEMM's panel width and odd ones (the variant ladder packs other
    widths); nothing written beyond the last panel."""
    rng = np.random.default_rng(24)
    for nr in (gemm.panel_width(dtype), 48, 8, 5):
        for N, K in [(1, 1), (7, 9), (8, 8), (33, 17), (40, 64), (100, 50), (200, 784)]:
            Bt = rng.standard_normal((N, K)).astype(dtype)
            panels = -(-N // nr)
            P = np.full(K * nr * panels + 7, np.nan, dtype=dtype)
            for p in range(panels):
                gemm.pack_bt_panel_(Bt, P, nr, p)
            want = np.zeros((panels * nr, K), dtype=dtype)
            want[:N] = Bt
            want = want.reshape(panels, nr, K).transpose(0, 2, 1).ravel()      # panel p: (K, nr) of B
            assert np.array_equal(P[:want.size], want), (nr, N, K)
            assert np.isnan(P[want.size:]).all(), (nr, N, K)


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
    assert gemm.panel_width(np.float32) == 48 and gemm.panel_width(np.float64) == 24
    assert gemm.pack_size("nt", 49, 5, np.float32) == 5 * 48 * 2
    assert gemm.pack_size("nn", 33, 5, np.float64) == gemm.pack_size("tn", 33, 5, np.float64) == 0   # in place


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


_GUARDED = r'''
import ctypes, mmap, sys
import numpy as np
from minivae.kernels import gemm

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)


def guarded(shape, dtype):
    """A C-contiguous array whose last element ends where a PROT_NONE page begins: one read past its end
    is a segmentation fault."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    pages = -(-size // PAGE) + 1
    buf = mmap.mmap(-1, (pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(base + pages * PAGE), PAGE, 0) == 0
    raw = np.frombuffer(buf, dtype=np.uint8, count=pages * PAGE)
    return raw[pages * PAGE - size:].view(dtype).reshape(shape)


rng = np.random.default_rng(3)
worst = 0.0
for dtype, edges in ((np.float32, (5, 13, 20, 28, 40)), (np.float64, (3, 7, 10, 14, 20))):
    nr = gemm.panel_width(dtype)
    for e in edges:
        for K, N in ((9, nr + e), (4, e)):
            for serial, M in ((False, 11), (True, 11), (True, 2 * gemm.KC_TN + 3)):     # tn: k in blocks
                A = rng.standard_normal((M, K)).astype(dtype)
                B = guarded((K, N), dtype)
                B[...] = rng.standard_normal((K, N))
                C = guarded((M, N), dtype)                                       # stores too
                gemm.gemm_nn(A, B, C, np.empty(0, dtype), 16, 64, serial)        # B in place
                worst = max(worst, float(np.abs(C - A.astype(np.float64) @ B).max()))
                At = np.ascontiguousarray(A.T)                                   # (K, M)
                G = guarded((M, N), dtype)                                       # tn: B = G (rows M)
                G[...] = rng.standard_normal((M, N))
                D = guarded((K, N), dtype)
                gemm.gemm_tn(A, G, D, np.empty(0, dtype), 16, 64, serial)
                worst = max(worst, float(np.abs(D - A.T.astype(np.float64) @ G).max()))
print(worst)
'''


def test_the_last_panel_is_read_in_place_and_never_past_b():
    """The nn and tn forms read B's last, partial column panel in place through masked loads, and every
    kernel of a partial panel stores through masked stores: with B and C ending where an unreadable page
    begins (so that any access past them kills the process), every edge kernel (1-3 ymm vectors, 2 masked
    zmm) gives the right product, also where the tn form runs k in blocks and reads C back (masked loads
    of the partial panel). In a child process, so that a read past the end is a failed test, not a crashed
    worker."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _GUARDED], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"child died with {r.returncode}: {r.stderr[-2000:]}"
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-4
