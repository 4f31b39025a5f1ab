"""The earlier rungs of the custom GEMM's ladder, kept to be validated and timed beside the one in use
(benchmarks/gemm.py; benchmarks/README.md, "Custom GEMM"). Not used by the backend.

    1  dot-product tiles: operands packed k-contiguous (blocked transposes), a 4 x 4 tile of scalar
       accumulators, the k loop vectorized by LLVM under fastmath (horizontal sums per tile); the
       backend's custom GEMM until issue 13
    2  rank-1 updates in Numba loops: the 8 x NR tile of minivae.kernels.gemm, same in-place operands
       and prange tiles, but the register tile is a stack array (``stack_tile``) updated by plain
       loops: LLVM unrolls them and vectorizes the k loop with gathers/scatters into the stack array
       instead of keeping the tile in registers
    3  (minivae.kernels.gemm) the same tile as explicit <W x T> vectors and llvm.fma, written as
       LLVM IR through numba intrinsics: 16 zmm accumulators, vbroadcastss + vfmadd231ps

Every variant has the interface of minivae.kernels.gemm: ``VARIANTS[v][form](A, B, C, P, P2, mb, nb)``
with the operands of the form (nn: A (M, K), B (K, N); nt: A (M, K), Bt (N, K); tn: At (K, M),
B (K, N)) and panel buffers P, P2 of ``buffer_size(v, M, N, K, dtype)`` elements each.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.np.numpy_support import carray

from . import gemm as g3
from .gemm import MR

from .numba_cache import configure as _configure_cache

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)


# ----------------------------------------------------------------------------------------------
# 1: dot-product tiles on k-contiguous packed operands
# ----------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy", parallel=True, fastmath=True)
def gemm_nt_(A, B, C, mb, nb):
    """C = A B^T with both operands k-contiguous.  A: (M, K)  B: (N, K)  ->  C: (M, N).

    Each parallel task owns an (mb x nb) output tile; inside it a 4x4 register tile keeps 16
    accumulators while the k loop (vectorized, fastmath reassociation) streams 4 rows of A and 4 of B;
    remainders of the tile fall back to single dot products.
    """
    M, K = A.shape
    N = B.shape[0]
    zero = A.dtype.type(0)
    nmb = (M + mb - 1) // mb
    nnb = (N + nb - 1) // nb
    for t in prange(nmb * nnb):
        i0 = (t // nnb) * mb
        j0 = (t % nnb) * nb
        i1 = min(i0 + mb, M)
        j1 = min(j0 + nb, N)
        i = i0
        while i + 4 <= i1:
            j = j0
            while j + 4 <= j1:
                s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = zero
                s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = zero
                for k in range(K):
                    a0 = A[i, k]
                    a1 = A[i + 1, k]
                    a2 = A[i + 2, k]
                    a3 = A[i + 3, k]
                    b0 = B[j, k]
                    b1 = B[j + 1, k]
                    b2 = B[j + 2, k]
                    b3 = B[j + 3, k]
                    s00 += a0 * b0
                    s01 += a0 * b1
                    s02 += a0 * b2
                    s03 += a0 * b3
                    s10 += a1 * b0
                    s11 += a1 * b1
                    s12 += a1 * b2
                    s13 += a1 * b3
                    s20 += a2 * b0
                    s21 += a2 * b1
                    s22 += a2 * b2
                    s23 += a2 * b3
                    s30 += a3 * b0
                    s31 += a3 * b1
                    s32 += a3 * b2
                    s33 += a3 * b3
                C[i, j] = s00
                C[i, j + 1] = s01
                C[i, j + 2] = s02
                C[i, j + 3] = s03
                C[i + 1, j] = s10
                C[i + 1, j + 1] = s11
                C[i + 1, j + 2] = s12
                C[i + 1, j + 3] = s13
                C[i + 2, j] = s20
                C[i + 2, j + 1] = s21
                C[i + 2, j + 2] = s22
                C[i + 2, j + 3] = s23
                C[i + 3, j] = s30
                C[i + 3, j + 1] = s31
                C[i + 3, j + 2] = s32
                C[i + 3, j + 3] = s33
                j += 4
            for jj in range(j, j1):                 # columns left over in this 4-row strip
                for ii in range(i, i + 4):
                    s = zero
                    for k in range(K):
                        s += A[ii, k] * B[jj, k]
                    C[ii, jj] = s
            i += 4
        for ii in range(i, i1):                     # rows left over in this tile
            for jj in range(j0, j1):
                s = zero
                for k in range(K):
                    s += A[ii, k] * B[jj, k]
                C[ii, jj] = s


@njit(cache=True, error_model="numpy", parallel=True)
def transpose_(A, At):
    """At = A^T in 32 x 32 blocks (the packing step of the custom GEMM).  A: (M, N) -> At: (N, M)."""
    M, N = A.shape
    bs = 32
    nbm = (M + bs - 1) // bs
    nbn = (N + bs - 1) // bs
    for t in prange(nbm * nbn):
        i0 = (t // nbn) * bs
        j0 = (t % nbn) * bs
        for j in range(j0, min(j0 + bs, N)):
            for i in range(i0, min(i0 + bs, M)):
                At[j, i] = A[i, j]


def _v1_nn(A, B, C, P, P2, mb, nb):
    K, N = B.shape
    Bt = P[:N * K].reshape((N, K))
    transpose_(B, Bt)
    gemm_nt_(A, Bt, C, mb, nb)


def _v1_nt(A, Bt, C, P, P2, mb, nb):
    gemm_nt_(A, Bt, C, mb, nb)


def _v1_tn(At, B, C, P, P2, mb, nb):
    R, M = At.shape
    N = B.shape[1]
    A = P[:M * R].reshape((M, R))
    Bt = P2[:N * R].reshape((N, R))
    transpose_(At, A)
    transpose_(B, Bt)
    gemm_nt_(A, Bt, C, mb, nb)


# ----------------------------------------------------------------------------------------------
# 2: the register tile as a stack array, updated by Numba loops
# ----------------------------------------------------------------------------------------------

NR2 = 32                    # columns of variant 2's tile (variant 3's float32 width until its 3-vector tile)


@intrinsic
def _stack_tile(typingctx, dtype):
    """A pointer to MR * NR2 elements on the stack (an alloca in the function's entry block)."""
    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype),
                                   size=context.get_constant(types.intp, MR * NR2))
    return types.CPointer(dtype.dtype)(dtype), codegen


@njit(error_model="numpy", fastmath=True, inline="always")
def ukernel_loops(K, A, ao, a_i, a_k, mr, B, bo, b_k, C, co, c_i, nr):
    """Variant 3's micro-kernel contract (MR x NR2 tile) in plain loops."""
    acc = carray(_stack_tile(C.dtype), (MR, NR2))
    for i in range(MR):
        for j in range(NR2):
            acc[i, j] = 0
    for k in range(K):
        for i in range(MR):
            a = A[ao + min(i, mr - 1) * a_i + k * a_k]
            for j in range(NR2):
                acc[i, j] += a * B[bo + k * b_k + j]
    for i in range(mr):
        for j in range(nr):
            C[co + i * c_i + j] = acc[i, j]


@njit(cache=True, error_model="numpy", parallel=True, fastmath=True)
def tiles_v2_(M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, mb, nb):
    """Variant 3's tiles_ with ukernel_loops (NR2 columns for both dtypes)."""
    nr = NR2
    tm = max(1, (mb + MR - 1) // MR)
    tn = max(1, (nb + nr - 1) // nr)
    nmi = (M + MR - 1) // MR
    nnj = (N + nr - 1) // nr
    nti = (nmi + tm - 1) // tm
    ntj = (nnj + tn - 1) // tn
    for t in prange(nti * ntj):
        ti = t // ntj
        tj = t % ntj
        for pj in range(tj * tn, min(tj * tn + tn, nnj)):
            j0 = pj * nr
            if pj < nfull:
                Bv, bo, bk = B, j0, b_k
            else:
                Bv, bo, bk = P, (pj - nfull) * K * nr, nr
            for pi in range(ti * tm, min(ti * tm + tm, nmi)):
                i0 = pi * MR
                ukernel_loops(K, A, i0 * a_i, a_i, a_k, min(MR, M - i0), Bv, bo, bk, C, i0 * N + j0, N,
                              min(nr, N - j0))


@njit(cache=True, error_model="numpy")
def pack_b_edge_(B, P, nr):
    """P <- the last, partial column panel of B zero-padded (K x nr).   B: (K, N). (Variant 3 packed it
    too until it read that panel in place through masked loads.)"""
    K, N = B.shape
    j0 = (N // nr) * nr
    for k in range(K):
        for j in range(nr):
            P[k * nr + j] = B[k, j0 + j] if j0 + j < N else 0


def _v2_nn(A, B, C, P, P2, mb, nb):
    M, K = A.shape
    N = B.shape[1]
    nfull = N // NR2
    if nfull * NR2 < N:
        pack_b_edge_(B, P, NR2)
    tiles_v2_(M, N, K, A.reshape(M * K), K, 1, B.reshape(K * N), N, nfull, P, C.reshape(M * N), mb, nb)


def _v2_nt(A, Bt, C, P, P2, mb, nb):
    M, K = A.shape
    N = Bt.shape[0]
    for p in range(-(-N // NR2)):
        g3.pack_bt_panel_(Bt, P, NR2, p)
    tiles_v2_(M, N, K, A.reshape(M * K), K, 1, P, NR2, 0, P, C.reshape(M * N), mb, nb)


def _v2_tn(At, B, C, P, P2, mb, nb):
    R, M = At.shape
    N = B.shape[1]
    nfull = N // NR2
    if nfull * NR2 < N:
        pack_b_edge_(B, P, NR2)
    tiles_v2_(M, N, R, At.reshape(R * M), 1, M, B.reshape(R * N), N, nfull, P, C.reshape(M * N), mb, nb)


def _v3(fn):
    return lambda A, B, C, P, P2, mb, nb: fn(A, B, C, P, mb, nb)


VARIANTS = {
    1: {"nn": _v1_nn, "nt": _v1_nt, "tn": _v1_tn},
    2: {"nn": _v2_nn, "nt": _v2_nt, "tn": _v2_tn},
    3: {"nn": _v3(g3.gemm_nn), "nt": _v3(g3.gemm_nt), "tn": _v3(g3.gemm_tn)},
}
NAMES = {1: "dot-product 4x4 tiles, packed k-contiguous (the old custom GEMM)",
         2: "rank-1 8xNR tile in Numba loops (stack array)",
         3: "rank-1 8x3-vector tile as LLVM IR (zmm FMA), in place (minivae.kernels.gemm)"}


def buffer_size(v, M, N, K, dtype) -> int:
    """Elements of each of the panel buffers P, P2 variant v needs for an (M, K) x (K, N) product."""
    if v == 1:
        return max(M, N) * K
    if v == 2:
        return K * NR2 * -(-N // NR2)
    return g3.pack_size("nt", N, K, dtype)
