"""The numba.cuda GEMM ladder: C = A B, numbered variants, each a step up from the last (docs/math.md §2.1, §9).

    1  naive            one thread per output, A and B read from global memory      (block 16 x 16)
    2  smem             T x T tiles of A and B staged in shared memory               (block T x T)
    3  regtile          2-D register tiling: a block computes BM x BN, each thread TM x TN
                        accumulators, reusing every shared-memory value TM (or TN) times
    4  vectorized       3, with 4-wide global loads (each thread moves 4 consecutive elements: the
                        float4 pattern; ptxas fuses them into ld.global.v4 only when it can prove
                        the alignment) and A stored transposed in shared memory, so the TM values
                        of a thread's column are consecutive (vectorizable shared loads)
    5  warptile         4, with warp tiling: each warp owns a WM x WN part of the block tile and walks
                        it in WMITER x WNITER sub-tiles, so a warp's threads share their shared-memory
                        rows (fewer bank conflicts, better register reuse)

The ladder follows S. Boehm, "How to optimize a CUDA matmul kernel for cuBLAS-like performance" (2022),
kernels 1, 3, 5, 6 and 10, written in numba.cuda. These kernels stand beside the backend's own GEMMs
(kernels/cuda_kernels.py: transposed operands, the ones column and the fused epilogues): they answer how
far numba.cuda can go on the plain problem, and benchmarks/gpu.py times each against cuBLAS.

A, B, C are C-contiguous device arrays: A (M, K), B (K, N), C (M, N); float32 or float64 (the
accumulator has the operands' type). Every load is guarded (0 outside the matrix) and every store too,
so any M, N, K works; the tile sizes are compile-time constants of a factory (cached), and the tests
run every variant under the simulator with small, odd-shaped tiles.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import cuda

WARP = 32


@dataclass(frozen=True)
class Variant:
    """One rung of the ladder with its tile sizes (the defaults are the GPU's; tests pass small ones)."""
    number: int
    name: str
    params: tuple                    # (name, value) pairs, the factory's keyword arguments

    def kw(self) -> dict:
        return dict(self.params)


VARIANTS = {
    1: Variant(1, "naive", (("T", 16),)),
    2: Variant(2, "smem tiles", (("T", 32),)),
    3: Variant(3, "2-D register tiling", (("BM", 128), ("BN", 128), ("BK", 8), ("TM", 8), ("TN", 8))),
    4: Variant(4, "vectorized loads", (("BM", 128), ("BN", 128), ("BK", 8), ("TM", 8), ("TN", 8))),
    5: Variant(5, "warp tiling", (("BM", 128), ("BN", 128), ("BK", 16), ("WM", 64), ("WN", 64),
                                  ("WNITER", 4), ("TM", 8), ("TN", 4))),
}


def _acc(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# ----------------------------------------------------------------------------------------------
# 1  naive
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def naive(dtype, T=16):
    """Thread (x, y) computes C[y, x]: x walks the columns, so B loads and C stores coalesce."""
    acc = _acc(dtype)

    @cuda.jit
    def gemm_naive(A, B, C):
        c, r = cuda.grid(2)
        M, K = A.shape
        N = B.shape[1]
        if r < M and c < N:
            s = acc(0)
            for k in range(K):
                s += A[r, k] * B[k, c]
            C[r, c] = s

    return gemm_naive


# ----------------------------------------------------------------------------------------------
# 2  shared-memory tiles
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def smem(dtype, T=32):
    """A block of T x T threads stages a T x T tile of A and of B in shared memory per step of k;
    every global element is read once per block instead of once per thread."""
    acc = _acc(dtype)
    SHAPE = (T, T + 1)                          # +1: no bank conflicts on the column reads

    @cuda.jit
    def gemm_smem(A, B, C):
        sA = cuda.shared.array(SHAPE, acc)
        sB = cuda.shared.array(SHAPE, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        M, K = A.shape
        N = B.shape[1]
        r = cuda.blockIdx.y * T + ty
        c = cuda.blockIdx.x * T + tx
        s = acc(0)
        for k0 in range(0, K, T):
            sA[ty, tx] = A[r, k0 + tx] if r < M and k0 + tx < K else acc(0)
            sB[ty, tx] = B[k0 + ty, c] if k0 + ty < K and c < N else acc(0)
            cuda.syncthreads()
            for k in range(T):
                s += sA[ty, k] * sB[k, tx]
            cuda.syncthreads()
        if r < M and c < N:
            C[r, c] = s

    return gemm_smem


# ----------------------------------------------------------------------------------------------
# 3  2-D register tiling
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def regtile(dtype, BM=128, BN=128, BK=8, TM=8, TN=8):
    """(BM/TM)(BN/TN) threads per block (1-D); thread t owns rows ty TM + i and columns tx TN + j of the
    block tile (ty = t // (BN/TN), tx = t % (BN/TN)). Per step of k: the block loads BM x BK of A and
    BK x BN of B (consecutive threads on consecutive elements: coalesced), then each thread does
    BK TM TN FMAs out of TM + TN shared reads per k."""
    acc = _acc(dtype)
    NT = (BM // TM) * (BN // TN)
    CT = BN // TN

    @cuda.jit
    def gemm_regtile(A, B, C):
        sA = cuda.shared.array((BM, BK), acc)
        sB = cuda.shared.array((BK, BN), acc)
        s = cuda.local.array((TM, TN), acc)
        ra = cuda.local.array(TM, acc)
        rb = cuda.local.array(TN, acc)
        t = cuda.threadIdx.x
        ty = t // CT
        tx = t % CT
        M, K = A.shape
        N = B.shape[1]
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                s[i, j] = 0
        for k0 in range(0, K, BK):
            for e in range(t, BM * BK, NT):
                i = e // BK
                k = e % BK
                sA[i, k] = A[m0 + i, k0 + k] if m0 + i < M and k0 + k < K else acc(0)
            for e in range(t, BK * BN, NT):
                k = e // BN
                j = e % BN
                sB[k, j] = B[k0 + k, n0 + j] if k0 + k < K and n0 + j < N else acc(0)
            cuda.syncthreads()
            for k in range(BK):
                for i in range(TM):
                    ra[i] = sA[ty * TM + i, k]
                for j in range(TN):
                    rb[j] = sB[k, tx * TN + j]
                for i in range(TM):
                    for j in range(TN):
                        s[i, j] += ra[i] * rb[j]
            cuda.syncthreads()
        for i in range(TM):
            r = m0 + ty * TM + i
            for j in range(TN):
                c = n0 + tx * TN + j
                if r < M and c < N:
                    C[r, c] = s[i, j]

    return gemm_regtile


@cuda.jit(device=True, inline=True)
def _load4(X, r, c, rows, cols, zero):
    """X[r, c:c+4] as four values, 0 outside: the float4 load (one guard when the quad is inside)."""
    if r < rows and c + 3 < cols:
        return X[r, c], X[r, c + 1], X[r, c + 2], X[r, c + 3]
    v0 = X[r, c] if r < rows and c < cols else zero
    v1 = X[r, c + 1] if r < rows and c + 1 < cols else zero
    v2 = X[r, c + 2] if r < rows and c + 2 < cols else zero
    v3 = X[r, c + 3] if r < rows and c + 3 < cols else zero
    return v0, v1, v2, v3


# ----------------------------------------------------------------------------------------------
# 4  vectorized loads, A transposed in shared memory
# ----------------------------------------------------------------------------------------------


@cuda.jit(device=True, inline=True)
def _stage4(A, B, sAt, sB, m0, n0, k0, t, NT, BM, BK, QA, QB, zero):
    """One K-step's tiles into shared memory, 4 elements a load (_load4): A's BM x BK tile transposed
    into sAt (BK, BM), B's BK x BN tile into sB (BK, BN); the NT threads of the block stride over the
    QA = BK/4 (QB = BN/4) quads of each row. Rungs 4 and 5 stage their tiles this way."""
    M, K = A.shape
    N = B.shape[1]
    for e in range(t, BM * QA, NT):
        i = e // QA
        k = (e % QA) * 4
        v0, v1, v2, v3 = _load4(A, m0 + i, k0 + k, M, K, zero)
        sAt[k, i] = v0
        sAt[k + 1, i] = v1
        sAt[k + 2, i] = v2
        sAt[k + 3, i] = v3
    for e in range(t, BK * QB, NT):
        k = e // QB
        j = (e % QB) * 4
        v0, v1, v2, v3 = _load4(B, k0 + k, n0 + j, K, N, zero)
        sB[k, j] = v0
        sB[k, j + 1] = v1
        sB[k, j + 2] = v2
        sB[k, j + 3] = v3

@functools.lru_cache(maxsize=None)
def vectorized(dtype, BM=128, BN=128, BK=8, TM=8, TN=8):
    """As 3, but each thread moves quads of 4 consecutive elements (BK and BN multiples of 4), and A
    goes to shared memory transposed, sAt[k, m]: the TM values a thread reads per k are consecutive."""
    if BK % 4 or BN % 4:
        raise ValueError(f"vectorized GEMM: BK and BN must be multiples of 4, got {BK}, {BN}")
    acc = _acc(dtype)
    NT = (BM // TM) * (BN // TN)
    CT = BN // TN
    QA = BK // 4                                # quads per row of the A tile
    QB = BN // 4

    @cuda.jit
    def gemm_vectorized(A, B, C):
        sAt = cuda.shared.array((BK, BM), acc)
        sB = cuda.shared.array((BK, BN), acc)
        s = cuda.local.array((TM, TN), acc)
        ra = cuda.local.array(TM, acc)
        rb = cuda.local.array(TN, acc)
        zero = acc(0)
        t = cuda.threadIdx.x
        ty = t // CT
        tx = t % CT
        M, K = A.shape
        N = B.shape[1]
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(TM):
            for j in range(TN):
                s[i, j] = 0
        for k0 in range(0, K, BK):
            _stage4(A, B, sAt, sB, m0, n0, k0, t, NT, BM, BK, QA, QB, zero)
            cuda.syncthreads()
            for k in range(BK):
                for i in range(TM):
                    ra[i] = sAt[k, ty * TM + i]
                for j in range(TN):
                    rb[j] = sB[k, tx * TN + j]
                for i in range(TM):
                    for j in range(TN):
                        s[i, j] += ra[i] * rb[j]
            cuda.syncthreads()
        for i in range(TM):
            r = m0 + ty * TM + i
            for j in range(TN):
                c = n0 + tx * TN + j
                if r < M and c < N:
                    C[r, c] = s[i, j]

    return gemm_vectorized


# ----------------------------------------------------------------------------------------------
# 5  warp tiling
# ----------------------------------------------------------------------------------------------

def warptile_shape(BM, BN, BK, WM, WN, WNITER, TM, TN):
    """(threads per block, WMITER) of a warp-tiled configuration; a ValueError if the tiles do not nest."""
    if BM % WM or BN % WN:
        raise ValueError(f"warp tiling: the warp tile {WM}x{WN} must divide the block tile {BM}x{BN}")
    per_warp = WM * WN // (WARP * TM * TN)          # = WMITER * WNITER sub-tiles per thread
    if per_warp < 1 or WM * WN % (WARP * TM * TN) or per_warp % WNITER:
        raise ValueError(f"warp tiling: {WM}x{WN} is not a whole number of {WARP}-thread passes of {TM}x{TN} "
                         f"in {WNITER} column steps")
    WMITER = per_warp // WNITER
    if WN % WNITER or WM % WMITER or (WN // WNITER) % TN or (WM // WMITER) % TM:
        raise ValueError("warp tiling: the sub-tiles do not divide the warp tile")
    if (WN // WNITER // TN) * (WM // WMITER // TM) != WARP:
        raise ValueError("warp tiling: a sub-tile must hold one output patch per thread of the warp")
    if BK % 4 or BN % 4:
        raise ValueError(f"warp tiling: BK and BN must be multiples of 4, got {BK}, {BN}")
    return (BM // WM) * (BN // WN) * WARP, WMITER


@functools.lru_cache(maxsize=None)
def warptile(dtype, BM=128, BN=128, BK=16, WM=64, WN=64, WNITER=4, TM=8, TN=4):
    """The block tile BM x BN is split into warp tiles WM x WN (warp w at warp-row w // (BN/WN));
    a warp covers its tile in WMITER x WNITER sub-tiles of (WM/WMITER) x (WN/WNITER), where its 32
    threads are laid out as a (WSUBM/TM) x (WSUBN/TN) grid, each with a TM x TN patch. Loads as in 4."""
    NT, WMITER = warptile_shape(BM, BN, BK, WM, WN, WNITER, TM, TN)
    acc = _acc(dtype)
    WSUBM = WM // WMITER
    WSUBN = WN // WNITER
    TCOLS = WSUBN // TN                          # threads across a sub-tile
    WCOLS = BN // WN                             # warps across the block tile
    QA = BK // 4
    QB = BN // 4
    RM = WMITER * TM                             # a thread's accumulators: RM x RN
    RN = WNITER * TN

    @cuda.jit
    def gemm_warptile(A, B, C):
        sAt = cuda.shared.array((BK, BM), acc)
        sB = cuda.shared.array((BK, BN), acc)
        s = cuda.local.array((RM, RN), acc)
        ra = cuda.local.array(RM, acc)
        rb = cuda.local.array(RN, acc)
        zero = acc(0)
        t = cuda.threadIdx.x
        w = t // WARP
        lane = t % WARP
        wr = (w // WCOLS) * WM                   # the warp tile's origin in the block tile
        wc = (w % WCOLS) * WN
        tr = (lane // TCOLS) * TM                # the thread's patch in each sub-tile
        tc = (lane % TCOLS) * TN
        M, K = A.shape
        N = B.shape[1]
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN
        for i in range(RM):
            for j in range(RN):
                s[i, j] = 0
        for k0 in range(0, K, BK):
            _stage4(A, B, sAt, sB, m0, n0, k0, t, NT, BM, BK, QA, QB, zero)
            cuda.syncthreads()
            for k in range(BK):
                for mi in range(WMITER):
                    for i in range(TM):
                        ra[mi * TM + i] = sAt[k, wr + mi * WSUBM + tr + i]
                for ni in range(WNITER):
                    for j in range(TN):
                        rb[ni * TN + j] = sB[k, wc + ni * WSUBN + tc + j]
                for i in range(RM):
                    for j in range(RN):
                        s[i, j] += ra[i] * rb[j]
            cuda.syncthreads()
        for mi in range(WMITER):
            for i in range(TM):
                r = m0 + wr + mi * WSUBM + tr + i
                for ni in range(WNITER):
                    for j in range(TN):
                        c = n0 + wc + ni * WSUBN + tc + j
                        if r < M and c < N:
                            C[r, c] = s[mi * TM + i, ni * TN + j]

    return gemm_warptile


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------

def kernel_and_launch(number, dtype, M, N, **params):
    """(kernel, grid, block) of variant ``number`` for an M x N output; ``params`` override its tiles."""
    if number not in VARIANTS:
        raise ValueError(f"GEMM variant must be one of {sorted(VARIANTS)}, got {number!r}")
    kw = dict(VARIANTS[number].kw(), **params)
    dtype = np.dtype(dtype).name

    def cdiv(a, b):
        return max(1, -(-a // b))
    if number in (1, 2):
        T = kw["T"]
        k = (naive if number == 1 else smem)(dtype, T)
        return k, (cdiv(N, T), cdiv(M, T)), (T, T)
    if number in (3, 4):
        k = (regtile if number == 3 else vectorized)(dtype, kw["BM"], kw["BN"], kw["BK"], kw["TM"], kw["TN"])
        nt = (kw["BM"] // kw["TM"]) * (kw["BN"] // kw["TN"])
        return k, (cdiv(N, kw["BN"]), cdiv(M, kw["BM"])), (nt,)
    k = warptile(dtype, kw["BM"], kw["BN"], kw["BK"], kw["WM"], kw["WN"], kw["WNITER"], kw["TM"], kw["TN"])
    nt, _ = warptile_shape(kw["BM"], kw["BN"], kw["BK"], kw["WM"], kw["WN"], kw["WNITER"], kw["TM"], kw["TN"])
    return k, (cdiv(N, kw["BN"]), cdiv(M, kw["BM"])), (nt,)


def gemm(number, A, B, C, **params):
    """C = A B with variant ``number`` (device arrays). A (M, K), B (K, N), C (M, N)."""
    M, K = A.shape
    K2, N = B.shape
    if K != K2 or C.shape != (M, N):
        raise ValueError(f"gemm: A is {A.shape}, B is {B.shape}, C is {C.shape}; expected (M, K), (K, N), (M, N)")
    kernel, grid, block = kernel_and_launch(number, A.dtype, M, N, **params)
    kernel[grid, block](A, B, C)
