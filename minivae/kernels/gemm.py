"""The custom GEMM of the Numba CPU backend: a register-blocked micro-kernel over prange tiles
(docs/math.md §2.1, §9; the variants tried and their numbers: benchmarks/README.md, "Custom GEMM").

    C (M, N) = A (M, K) B (K, N), in the three forms a training step uses (minivae.kernels.cpu):
        nn   a  = h W        A = h (rows, fan_in)        B = W (fan_in, fan_out)
        nt   dh = da W^T     A = da (rows, fan_out)      B^T = W (fan_in, fan_out), read as B (N, K)
        tn   dW = h^T da     A^T = h (rows, fan_in)      B = da (rows, fan_out)

The micro-kernel (``ukernel``) keeps an MR x NR tile of C in 3 MR vector registers (MR = 8 rows,
NR = 3 vectors of 64 bytes: 48 float32 or 24 float64 columns; 24 of the 32 zmm registers of
AVX-512) and runs the k loop as rank-1 updates: per k, three vector loads of a row of B, MR
broadcasts of a column of A and 3 MR fused multiply-adds. (A tile of 2 vectors a row, 16 registers,
spent 10 loads on 16 FMAs, against 11 on 24 here; on the Intel Xeon VM one part's products took
0.88-0.96 of the time: benchmarks/README.md, "A wider register tile".) Numba's own loops do not get
there (LLVM vectorizes the k loop with gathers instead of keeping the tile in registers,
benchmarks/README.md variant 2), so the micro-kernel is written as LLVM IR through
``numba.extending.intrinsic``: explicit <W x T> vectors and ``llvm.fma``; the assembly is
``vbroadcastss``/``vfmadd231ps`` on zmm registers.

Operands are read where they are, through (row, column) strides, so nothing is packed except what
the vector loads need contiguous: the rows of B (k, j..j+NR). They are contiguous in the nn and tn
forms (B is C-contiguous with N columns); the last, partial panel of N % NR columns is read there too,
through masked loads that never touch the columns beyond N (packing it cost 4% of a split two-layer
step, benchmarks/README.md). In the nt form B^T is packed panel by panel into P (K x NR each,
zero-padded) by the parallel task that owns the panel, just before it uses it; or, where several
products read one B^T (every part of a split step reads each W^T), once beforehand
(``pack_bt_panels_``, shared out among threads) and then read by ``gemm_nt_packed``. A panel is
packed in W x W blocks transposed in registers (``transpose_block``, LLVM shuffles; 0.2-0.3 ns an
element against 0.7-0.8 element by element, benchmarks/README.md). A is read by
broadcasts at any strides: a (M, K) C-contiguous array (nn, nt) or the transpose of a (K, M) one
(tn). Rows of A beyond M in the last row panel re-read row M - 1; their results are not stored. The
last column panel runs a tile of 1-3 ymm vectors (8 float32 / 4 float64 columns each), as many as its
columns need, or the 3-zmm tile with masked loads beyond 3 ymm.

k in blocks (tn form only): a column panel of B holds K rows of NR elements, and in the tn form K is
the batch's rows (320 in a part of the two-layer IWAE at batch 128: 60 KB of float32, more than L1).
There k runs in blocks of KC_TN (12 KB of the panel), each block passing over every row panel of A
and adding to C from the second block on (the micro-kernel's ``acc_c``). In the nn and nt forms K is a
layer's width and the panel is read once per row panel straight from L2 or its packed copy: blocks made
them slower (benchmarks/README.md).

Parallelism: one prange over (tm x tn) tiles of C (each a block of whole micro-tiles, ``tile_``), then
a sequential sweep of its micro-tiles. With ``serial`` the same tasks run one after another in the
calling thread (``tiles_serial_``, bit-identical), for a pass that already has a core of its own (a
part of an example split, kernels/batchsplit.py). BLAS is never called here.

Numba's cache keys a function on its own source file only, and the cached kernels of cpu.py that
call these embed a copy of them; minivae therefore keeps one cache folder per version of the whole
package's source (kernels/numba_cache.py), so an edit here never meets a stale copy.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .numba_cache import configure as _configure_cache

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)

MR = 8            # rows of the register tile
NV = 3            # vectors of 64 bytes per row of the register tile
VBYTES = 64       # one zmm register
KC_TN = 64        # k per block of a column panel in the tn form (benchmarks/README.md, "... k in blocks")
WHOLE_K = 1 << 62  # no blocks: nn and nt


def panel_width(dtype) -> int:
    """NR: columns of the register tile for this dtype (48 float32, 24 float64)."""
    return NV * VBYTES // np.dtype(dtype).itemsize


def pack_size(form, N, K, dtype) -> int:
    """Elements of the panel buffer P that a product (M, K) x (K, N) needs: all of B^T packed in
    panels for "nt"; none for "nn" and "tn", whose B is read in place."""
    nr = panel_width(dtype)
    return K * nr * -(-N // nr) if form == "nt" else 0


def make_ukernel(nv, vbytes, masked=False):
    """The micro-kernel intrinsic with an (MR, nv vectors of vbytes bytes) register tile. ``masked``: B's
    rows are read with masked loads of their first nr elements only (``llvm.masked.load``: the lanes
    masked off are never touched), so that the last, partial column panel is read in place."""

    @intrinsic
    def ukernel(typingctx, K, A, ao, a_i, a_k, mr, B, bo, b_k, C, co, c_i, nr, acc_c):
        """C[co + i c_i + j] = sum_k A[ao + min(i, mr-1) a_i + k a_k] B[bo + k b_k + j]
        for i < mr, j < nr (MR x NR register tile; A, B, C any arrays, flat element offsets); with
        ``acc_c`` nonzero, C[...] += that sum (the tile starts from C: a block of k after the first).

        Shapes: the tile is (MR, NR) = (8, 2 W), W = 64 bytes / itemsize. Unmasked: nr = NR (a full
        panel; B's rows and C's hold NR elements). Masked: any nr <= NR, B's rows and C's hold nr."""
        dt = A.dtype
        W = vbytes // (dt.bitwidth // 8)

        def codegen(context, builder, sig, args):
            K, A, ao, a_i, a_k, mr, B, bo, b_k, C, co, c_i, nr, acc_c = args
            T = context.get_value_type(dt)
            vty = ir.VectorType(T, W)
            i64 = ir.IntType(64)
            i32 = ir.IntType(32)
            c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.v{W}{'f32' if dt.bitwidth == 32 else 'f64'}")
            pa = context.make_array(sig.args[1])(context, builder, A).data
            pb = context.make_array(sig.args[6])(context, builder, B).data
            pc = context.make_array(sig.args[9])(context, builder, C).data
            vptr = lambda p, off: builder.bitcast(builder.gep(p, [off]), vty.as_pointer())  # noqa: E731
            undef = ir.Constant(vty, ir.Undefined)
            splat0 = ir.Constant(ir.VectorType(i32, W), [0] * W)
            # the 2 MR accumulators: allocas promoted to registers by mem2reg
            acc = [[cgutils.alloca_once_value(builder, ir.Constant(vty, None)) for _ in range(nv)]
                   for _ in range(MR)]
            last = builder.sub(mr, c64(1))
            rows = [builder.add(ao, builder.mul(builder.select(builder.icmp_signed("<", c64(i), mr), c64(i), last),
                                                a_i)) for i in range(MR)]
            if masked:                                  # lane j of vector v is read when v W + j < nr
                mty = ir.VectorType(ir.IntType(1), W)
                mload = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, mty, vty]),
                    f"llvm.masked.load.v{W}{'f32' if dt.bitwidth == 32 else 'f64'}.p0")
                zero = ir.Constant(vty, None)
                lanes = ir.Constant(ir.VectorType(i64, W), list(range(W)))
                undef64 = ir.Constant(ir.VectorType(i64, W), ir.Undefined)
                masks = []
                for v in range(nv):
                    lim = builder.insert_element(undef64, builder.sub(nr, c64(v * W)), ir.Constant(i32, 0))
                    lim = builder.shuffle_vector(lim, undef64, splat0)
                    masks.append(builder.icmp_signed("<", lanes, lim))
            with builder.if_then(builder.icmp_signed("!=", acc_c, c64(0))):    # start from C's rows < mr
                for i in range(MR):
                    with builder.if_then(builder.icmp_signed("<", c64(i), mr)):
                        base = builder.add(co, builder.mul(c64(i), c_i))
                        for v in range(nv):
                            ptr = vptr(pc, builder.add(base, c64(v * W)))
                            if masked:
                                val = builder.call(mload, [ptr, ir.Constant(i32, 1), masks[v], zero])
                            else:
                                val = builder.load(ptr, align=1)
                            builder.store(val, acc[i][v])
            with cgutils.for_range(builder, K) as loop:                      # rank-1 update per k
                k = loop.index
                ka = builder.mul(k, a_k)
                kb = builder.add(bo, builder.mul(k, b_k))
                if masked:
                    b = [builder.call(mload, [vptr(pb, builder.add(kb, c64(v * W))), ir.Constant(i32, 1), masks[v],
                                              zero]) for v in range(nv)]
                else:
                    b = [builder.load(vptr(pb, builder.add(kb, c64(v * W))), align=1) for v in range(nv)]
                for i in range(MR):
                    a = builder.load(builder.gep(pa, [builder.add(rows[i], ka)]))
                    a = builder.shuffle_vector(builder.insert_element(undef, a, ir.Constant(i32, 0)), undef, splat0)
                    for v in range(nv):
                        builder.store(builder.call(fma, [a, b[v], builder.load(acc[i][v])]), acc[i][v])
            if masked:
                mstore = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), i32, mty]),
                    f"llvm.masked.store.v{W}{'f32' if dt.bitwidth == 32 else 'f64'}.p0")
            for i in range(MR):                                              # store rows < mr, columns < nr
                with builder.if_then(builder.icmp_signed("<", c64(i), mr)):
                    base = builder.add(co, builder.mul(c64(i), c_i))
                    for v in range(nv):
                        val = builder.load(acc[i][v])
                        ptr = vptr(pc, builder.add(base, c64(v * W)))
                        if masked:                           # the columns < nr of this vector
                            builder.call(mstore, [val, ptr, ir.Constant(i32, 1), masks[v]])
                        else:                                # a full panel: nr = NR
                            builder.store(val, ptr, align=1)
            return context.get_dummy_value()

        return types.void(K, A, ao, a_i, a_k, mr, B, bo, b_k, C, co, c_i, nr, acc_c), codegen

    return ukernel


ukernel = make_ukernel(NV, VBYTES)                 # full panels: 8 x 3 zmm
# the last, partial panel: 8 x 1-3 ymm vectors, so that it costs what its columns need (Zen 4 runs a zmm
# FMA as two ymm halves: the narrow tiles lose nothing per flop), or 3 zmm beyond 3 ymm; its B rows read
# in place through masked loads (nothing packed), or from the zero-padded packed panel (nt)
ukernel_y1 = make_ukernel(1, 32, masked=True)
ukernel_y2 = make_ukernel(2, 32, masked=True)
ukernel_y3 = make_ukernel(3, 32, masked=True)
ukernel_m = make_ukernel(NV, VBYTES, masked=True)


@intrinsic
def transpose_block(typingctx, S, so, s_i, D, do, d_i):
    """D[do + c d_i + i] = S[so + i s_i + c] for i, c < W: a W x W block (W = one ymm vector: 8 float32,
    4 float64) transposed in registers. W vector loads of S's rows, log2 W stages of shuffles that swap
    the off-diagonal b x b sub-blocks (b = W/2, ..., 1), W vector stores of D's rows. S, D: flat arrays
    of one dtype; offsets and row strides in elements."""
    dt = S.dtype
    W = 32 // (dt.bitwidth // 8)

    def codegen(context, builder, sig, args):
        S, so, s_i, D, do, d_i = args
        T = context.get_value_type(dt)
        vty = ir.VectorType(T, W)
        i64 = ir.IntType(64)
        ps = context.make_array(sig.args[0])(context, builder, S).data
        pd = context.make_array(sig.args[3])(context, builder, D).data
        row = lambda p, o, st, i: builder.bitcast(  # noqa: E731
            builder.gep(p, [builder.add(o, builder.mul(st, ir.Constant(i64, i)))]), vty.as_pointer())
        r = [builder.load(row(ps, so, s_i, i), align=1) for i in range(W)]
        mask = lambda m: ir.Constant(ir.VectorType(ir.IntType(32), W), m)  # noqa: E731
        b = W // 2
        while b >= 1:                      # rows i, i + b (i & b == 0): swap block (i, c + b) with (i + b, c)
            lo = mask([c if c & b == 0 else W + c - b for c in range(W)])
            hi = mask([c + b if c & b == 0 else W + c for c in range(W)])
            for i in range(W):
                if i & b == 0:
                    r[i], r[i + b] = (builder.shuffle_vector(r[i], r[i + b], lo),
                                      builder.shuffle_vector(r[i], r[i + b], hi))
            b //= 2
        for i in range(W):
            builder.store(r[i], row(pd, do, d_i, i), align=1)
        return context.get_dummy_value()

    return types.void(S, so, s_i, D, do, d_i), codegen


@njit(cache=True, error_model="numpy")
def pack_bt_panel_(Bt, P, nr, p):
    """P[p K nr + k nr + j] <- Bt[p nr + j, k] (0 beyond N): column panel p of B = Bt^T, K x nr,
    zero-padded.   Bt: (N, K), C-contiguous.

    In W x W blocks transposed in registers (``transpose_block``, W = 32 bytes of elements) where a
    block lies inside Bt; element by element at the edges (k beyond the last whole block, the columns
    of a last, partial panel)."""
    N, K = Bt.shape
    base = p * K * nr
    n0 = p * nr
    e = max(0, min(nr, N - n0))                    # columns of B in this panel
    w = 32 // Bt.itemsize
    ew = e - e % w                                 # in whole blocks: columns < ew, k < kw
    kw = K - K % w
    flat = Bt.reshape(N * K)
    for kb in range(0, kw, w):                     # rows kb..kb+w-1 of the panel: whole cache lines
        for jb in range(0, ew, w):
            transpose_block(flat, (n0 + jb) * K + kb, K, P, base + kb * nr + jb, nr)
    for j in range(nr):                            # the edges, reading Bt's rows in order
        n = n0 + j
        if j < ew:
            for k in range(kw, K):
                P[base + k * nr + j] = Bt[n, k]
        elif j < e:
            for k in range(K):
                P[base + k * nr + j] = Bt[n, k]
        else:
            for k in range(K):
                P[base + k * nr + j] = 0


@njit(cache=True, error_model="numpy", inline="always")
def tile_(t, ntj, tm, tn, nmi, nnj, M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, Bt, pack, kc):
    """Task t of ``tiles_``: its block of (tm x tn) micro-tiles of C, after packing its own column
    panels of Bt when ``pack``. Per column panel, k runs in blocks of kc: the block's rows of the panel
    stay in L1 while every row panel of A passes over them; a block after the first adds to C."""
    nr = NV * VBYTES // A.itemsize
    wy = 32 // A.itemsize                          # one ymm vector
    ti = t // ntj
    tj = t % ntj
    if pack:
        for pj in range(tj * tn, min(tj * tn + tn, nnj)):
            pack_bt_panel_(Bt, P, nr, pj)
    for pj in range(tj * tn, min(tj * tn + tn, nnj)):
        j0 = pj * nr
        e = min(nr, N - j0)                        # columns of this panel
        if pj < nfull:
            Bv, bo, bk = B, j0, b_k
        else:
            Bv, bo, bk = P, (pj - nfull) * K * nr, nr
        for k0 in range(0, max(K, 1), kc):         # (K = 0: one empty block, which stores zeros)
            kk = min(kc, K - k0)
            ak = k0 * a_k
            bb = bo + k0 * bk
            for pi in range(ti * tm, min(ti * tm + tm, nmi)):
                i0 = pi * MR
                mr = min(MR, M - i0)
                if e == nr:
                    ukernel(kk, A, i0 * a_i + ak, a_i, a_k, mr, Bv, bb, bk, C, i0 * N + j0, N, e, k0)
                elif e <= wy:
                    ukernel_y1(kk, A, i0 * a_i + ak, a_i, a_k, mr, Bv, bb, bk, C, i0 * N + j0, N, e, k0)
                elif e <= 2 * wy:
                    ukernel_y2(kk, A, i0 * a_i + ak, a_i, a_k, mr, Bv, bb, bk, C, i0 * N + j0, N, e, k0)
                elif e <= 3 * wy:
                    ukernel_y3(kk, A, i0 * a_i + ak, a_i, a_k, mr, Bv, bb, bk, C, i0 * N + j0, N, e, k0)
                else:
                    ukernel_m(kk, A, i0 * a_i + ak, a_i, a_k, mr, Bv, bb, bk, C, i0 * N + j0, N, e, k0)


@njit(cache=True, error_model="numpy", inline="always")
def task_grid_(M, N, A, mb, nb, pack):
    """(ntasks, ntj, tm, tn, nmi, nnj): the task grid of ``tiles_`` over C (M, N)."""
    nr = NV * VBYTES // A.itemsize
    nmi = (M + MR - 1) // MR                       # micro-tile rows, columns
    nnj = (N + nr - 1) // nr
    tm = nmi if pack else max(1, (mb + MR - 1) // MR)     # micro-tiles per task: rows, columns
    tn = max(1, (nb + nr - 1) // nr)
    nti = (nmi + tm - 1) // tm
    ntj = (nnj + tn - 1) // tn
    return nti * ntj, ntj, tm, tn, nmi, nnj


@njit(cache=True, error_model="numpy", parallel=True)
def tiles_(M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, mb, nb, Bt, pack, kc):
    """C (M, N) = A B over prange tiles of about mb x nb elements (rounded up to whole micro-tiles
    of MR x NR).

    Column panel p < nfull is read in place from B (row stride b_k; a last, partial one through
    masked loads); the others from P, packed K x NR each from panel nfull on. A at element i a_i + k a_k. With ``pack`` (nfull = 0), each
    task first packs its own column panels from Bt (N, K) into P, inside the same parallel region
    (a second region costs a wake-up of the pool); its tile then spans all rows."""
    ntasks, ntj, tm, tn, nmi, nnj = task_grid_(M, N, A, mb, nb, pack)
    for t in prange(ntasks):
        tile_(t, ntj, tm, tn, nmi, nnj, M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, Bt, pack, kc)


@njit(cache=True, error_model="numpy", nogil=True)
def tiles_serial_(M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, mb, nb, Bt, pack, kc):
    """``tiles_`` in the calling thread, task after task (no parallel region): for passes that already
    run one per core (kernels/batchsplit.py)."""
    ntasks, ntj, tm, tn, nmi, nnj = task_grid_(M, N, A, mb, nb, pack)
    for t in range(ntasks):
        tile_(t, ntj, tm, tn, nmi, nnj, M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, Bt, pack, kc)


@njit(cache=True, error_model="numpy", inline="always")
def run_tiles_(serial, M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, mb, nb, Bt, pack, kc):
    """``tiles_serial_`` when ``serial``, else the parallel ``tiles_``."""
    if serial:
        tiles_serial_(M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, mb, nb, Bt, pack, kc)
    else:
        tiles_(M, N, K, A, a_i, a_k, B, b_k, nfull, P, C, mb, nb, Bt, pack, kc)


@njit(cache=True, error_model="numpy", nogil=True)
def gemm_nn(A, B, C, P, mb, nb, serial=False):
    """C = A B over (mb x nb) parallel tiles.   A: (M, K)  B: (K, N)  C: (M, N), all C-contiguous;
    P: >= pack_size("nn", N, K)."""
    M, K = A.shape
    N = B.shape[1]
    nr = NV * VBYTES // A.itemsize
    nfull = (N + nr - 1) // nr                     # every panel in place, the last one masked
    run_tiles_(serial, M, N, K, A.reshape(M * K), K, 1, B.reshape(K * N), N, nfull, P, C.reshape(M * N), mb, nb, B, False,
               WHOLE_K)


@njit(cache=True, error_model="numpy", nogil=True)
def gemm_nt(A, Bt, C, P, mb, nb, serial=False):
    """C = A Bt^T.   A: (M, K)  Bt: (N, K)  C: (M, N), C-contiguous;  P: >= pack_size("nt", N, K)."""
    M, K = A.shape
    N = Bt.shape[0]
    nr = NV * VBYTES // A.itemsize
    run_tiles_(serial, M, N, K, A.reshape(M * K), K, 1, P, nr, 0, P, C.reshape(M * N), mb, nb, Bt, True, WHOLE_K)


@njit(cache=True, error_model="numpy", nogil=True)
def pack_bt_panels_(Bt, P, p0, p1):
    """Column panels p0..p1-1 of B = Bt^T into P, laid out as gemm_nt packs them (K x NR each,
    zero-padded), for ``gemm_nt_packed``: one packing of a B^T that several products read (the parts
    of a split step pack every W^T once, each thread the panels it claims: cpu_stack.pack_claimed_).
    Bt: (N, K)."""
    nr = NV * VBYTES // Bt.itemsize
    for p in range(p0, p1):
        pack_bt_panel_(Bt, P, nr, p)


@njit(cache=True, error_model="numpy", nogil=True)
def gemm_nt_packed(A, P, C, mb, nb, serial=False):
    """C = A Bt^T from B^T's panels packed beforehand into P (``pack_bt_panels_`` over every panel of
    Bt (N, K)): bit for bit ``gemm_nt``, without its packing.   A: (M, K)  C: (M, N)."""
    M, K = A.shape
    N = C.shape[1]
    nr = NV * VBYTES // A.itemsize                 # (C stands in for Bt, which pack=False never reads)
    run_tiles_(serial, M, N, K, A.reshape(M * K), K, 1, P, nr, 0, P, C.reshape(M * N), mb, nb, C, False, WHOLE_K)


@njit(cache=True, error_model="numpy", nogil=True)
def gemm_tn(At, B, C, P, mb, nb, serial=False):
    """C = At^T B.   At: (R, M)  B: (R, N)  C: (M, N), C-contiguous;  P: >= pack_size("tn", N, R)."""
    R, M = At.shape
    N = B.shape[1]
    nr = NV * VBYTES // At.itemsize
    nfull = (N + nr - 1) // nr                     # every panel in place, the last one masked
    run_tiles_(serial, M, N, R, At.reshape(R * M), 1, M, B.reshape(R * N), N, nfull, P, C.reshape(M * N), mb, nb, B,
               False, KC_TN)
