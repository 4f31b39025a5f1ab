"""numba.cuda kernels of the GPU backend (docs/math.md §9); the host side is in kernels/cuda.py.

Importing this module imports ``numba.cuda``; kernels/cuda.py imports it only after checking that a
GPU (or the simulator, ``NUMBA_ENABLE_CUDASIM=1``) can be used. Each kernel mirrors a NumPy
reference in layers.py / distributions.py / objectives.py / optim.py, and the tests in
tests/cuda_sim check every one of them against that reference.

Shape legend: n examples, D = x_dim, H hidden width, Z = z_dim, L samples, K head width (D or 2D),
R = L*n decoder rows (row r = l*n + i), P parameters.

Kernels whose shared-memory or register arrays need compile-time sizes are built by factories
(``gemm_kernel(variant, T, R, dtype)``, ``rowsum_kernels(B, dtype)``, ...) and cached, so a test can
ask for odd tile sizes. Everything else takes small integer codes as arguments (activation,
likelihood, epilogue): one compiled kernel per dtype, and a branch that costs nothing next to the
memory traffic.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np
from numba import cuda
from numba.core import config as _numba_config
from numba.cuda.random import xoroshiro128p_normal_float32, xoroshiro128p_normal_float64

from .. import likelihoods
from ..layers import ACTIVATIONS, LEAKY_SLOPE

LOG_2PI = math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)

# activation codes: 0 = identity (the heads), then layers.ACTIVATIONS in order
IDENTITY = 0
ACT_CODE = {name: i + 1 for i, name in enumerate(ACTIVATIONS)}
RELU, TANH, SOFTPLUS, LEAKY = (ACT_CODE[a] for a in ("relu", "tanh", "softplus", "leaky_relu"))
# likelihood codes: the positions in minivae.likelihoods' registry (frozen now: the kernels compile it in)
_LIKELIHOODS = likelihoods.freeze("minivae.kernels.cuda_kernels")
LIK_CODE = likelihoods.codes()
BERNOULLI, CONT_BERNOULLI, GAUSSIAN = (LIK_CODE[k] for k in ("bernoulli", "continuous_bernoulli", "gaussian"))

# GEMM epilogues: what happens to an accumulated value v = (op(A) @ op(B))[r, c]
EPI_STORE = 0   # C = v
EPI_ACT = 1     # C = f(v)                 forward, bias folded into the GEMM by the ones column
EPI_DMASK = 2   # C = v * f'(a), from H    backward through an activation: dA_prev = (dY W^T) * f'(a_prev)


# ----------------------------------------------------------------------------------------------
# Activations (§2.2), written so that the backward needs only the output h = f(a)
# ----------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def softplus(a):
    """log(1 + e^a) = max(a, 0) + log1p(e^-|a|), no overflow for either sign. (No builtin max/min in
    the kernels: numba 0.68's built-in CUDA target fails to type them.)"""
    p = a if a > 0 else a * 0
    return p + math.log1p(math.exp(-abs(a)))


@cuda.jit(device=True)
def act_forward(a, act):
    """h = f(a).   identity, relu, tanh, softplus (stable), leaky_relu(0.01)."""
    if act == RELU:
        return a if a > 0 else a * 0
    if act == TANH:
        return math.tanh(a)
    if act == SOFTPLUS:
        return softplus(a)
    if act == LEAKY:
        return a if a > 0 else a * LEAKY_SLOPE
    return a


@cuda.jit(device=True)
def act_grad_from_h(h, act):
    """f'(a) written in h = f(a):  relu 1[h>0];  tanh 1-h^2;  softplus sigmoid(a) = -expm1(-h);
    leaky 1 or 0.01 (h > 0 iff a > 0).   §2.2"""
    if act == RELU:
        return 1.0 if h > 0 else 0.0
    if act == TANH:
        return 1.0 - h * h
    if act == SOFTPLUS:
        return -math.expm1(-h)
    if act == LEAKY:
        return 1.0 if h > 0 else LEAKY_SLOPE
    return 1.0


# ----------------------------------------------------------------------------------------------
# GEMM:  C[M, N] = op(A)[M, K] @ op(B)[K, N], then an epilogue                        §2.1, §9
# ----------------------------------------------------------------------------------------------
# op(X) is X or X^T (trans_a, trans_b). ``ones_a`` appends a column of ones to the *stored* A:
#   forward   a = [x | 1] @ [W; b]            A = x (N, I), K = I + 1
#   backward  [dW; db] = [x | 1]^T @ dY       A = x (N, I) transposed, M = I + 1
# and [W; b] is exactly the contiguous (I + 1, O) block of the flat layout (W then b, §1), so
# the bias and the bias gradient ride along in the GEMM. Loads are coalesced: the thread x index
# walks the stored matrix's last (contiguous) axis, whichever way the tile is used.

@functools.lru_cache(maxsize=None)
def _loader(acc):
    """A[r, c] of the stored matrix, 1 on the virtual ones column, 0 outside (boundary guard).
    The constants have the accumulator's type: float literals would make every float32 load a
    round trip through float64."""
    ONE, ZERO = acc(1), acc(0)

    @cuda.jit(device=True)
    def load(A, r, c, ones):
        if r < A.shape[0]:
            if c < A.shape[1]:
                return A[r, c]
            if ones and c == A.shape[1]:
                return ONE
        return ZERO

    return load


@cuda.jit(device=True)
def _epilogue(C, H, r, c, v, epi, act):
    if epi == EPI_ACT:
        v = act_forward(v, act)
    elif epi == EPI_DMASK:
        v = v * act_grad_from_h(H[r, c], act)
    C[r, c] = v


def _make_gemm_tiled(T, acc, TA, TB, ONES):
    """Kernel 1: one T x T shared-memory tile per block, one output per thread.
    Block (T, T): thread x on output columns, y on rows. Grid (ceil(N/T), ceil(M/T))."""

    SHAPE = (T, T + 1)                                 # +1 column: no shared-memory bank conflicts
    _load = _loader(acc)

    @cuda.jit
    def gemm_tiled(A, B, C, M, N, K, epi, act, H):
        sA = cuda.shared.array(SHAPE, acc)             # op(A)[m0 + i, k0 + k] at sA[i, k]
        sB = cuda.shared.array(SHAPE, acc)             # op(B)[k0 + k, n0 + j] at sB[k, j]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        m0 = cuda.blockIdx.y * T
        n0 = cuda.blockIdx.x * T
        s = acc(0)                                     # the accumulator in the kernel's precision
        for k0 in range(0, K, T):
            if TA:                                         # A stored (K, M): x walks m
                sA[tx, ty] = _load(A, k0 + ty, m0 + tx, ONES)
            else:                                          # A stored (M, K): x walks k
                sA[ty, tx] = _load(A, m0 + ty, k0 + tx, ONES)
            if TB:                                    # B stored (N, K): x walks k
                sB[tx, ty] = _load(B, n0 + ty, k0 + tx, 0)
            else:                                          # B stored (K, N): x walks n
                sB[ty, tx] = _load(B, k0 + ty, n0 + tx, 0)
            cuda.syncthreads()
            for k in range(T):
                s += sA[ty, k] * sB[k, tx]
            cuda.syncthreads()
        r = m0 + ty
        c = n0 + tx
        if r < M and c < N:
            _epilogue(C, H, r, c, s, epi, act)

    return gemm_tiled


def _make_gemm_regtile(T, R, acc, TA, TB, ONES):
    """Kernel 2: 2-D register tiling. A block of T x T threads computes a (T R) x (T R) tile of C;
    each thread keeps R x R accumulators in registers and reuses each shared-memory load R times.
    Thread (ty, tx) owns rows m0 + ty + i T and columns n0 + tx + j T (i, j < R): neighbouring
    threads touch neighbouring columns, so stores stay coalesced and shared reads conflict-free."""
    BM = T * R
    SHAPE_A, SHAPE_B = (BM, T + 1), (T, BM + 1)        # +1 column: no shared-memory bank conflicts
    _load = _loader(acc)

    @cuda.jit
    def gemm_regtile(A, B, C, M, N, K, epi, act, H):
        sA = cuda.shared.array(SHAPE_A, acc)           # op(A) tile [m, k]
        sB = cuda.shared.array(SHAPE_B, acc)           # op(B) tile [k, n]
        s = cuda.local.array((R, R), acc)
        a_r = cuda.local.array(R, acc)
        b_r = cuda.local.array(R, acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BM
        for i in range(R):
            for j in range(R):
                s[i, j] = 0.0
        for k0 in range(0, K, T):
            for i in range(R):
                if TA:
                    sA[tx + i * T, ty] = _load(A, k0 + ty, m0 + tx + i * T, ONES)
                else:
                    sA[ty + i * T, tx] = _load(A, m0 + ty + i * T, k0 + tx, ONES)
                if TB:
                    sB[tx, ty + i * T] = _load(B, n0 + ty + i * T, k0 + tx, 0)
                else:
                    sB[ty, tx + i * T] = _load(B, k0 + ty, n0 + tx + i * T, 0)
            cuda.syncthreads()
            for k in range(T):
                for i in range(R):
                    a_r[i] = sA[ty + i * T, k]
                for j in range(R):
                    b_r[j] = sB[k, tx + j * T]
                for i in range(R):
                    for j in range(R):
                        s[i, j] += a_r[i] * b_r[j]
            cuda.syncthreads()
        for i in range(R):
            r = m0 + ty + i * T
            for j in range(R):
                c = n0 + tx + j * T
                if r < M and c < N:
                    _epilogue(C, H, r, c, s[i, j], epi, act)

    return gemm_regtile


def accumulator(dtype):
    """float32 accumulators for float32 models; float64 models keep float64 (gradient checks)."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


@functools.lru_cache(maxsize=None)
def gemm_kernel(variant, T, R, dtype, trans_a=False, trans_b=False, ones_a=False):
    """The GEMM kernel and the edge of the output tile one block computes (T or T R).

    The transpositions and the ones column are compile-time constants: each kernel holds only its
    own load path (with them as run-time flags, ptxas gives the register-tiled kernel 132
    registers per thread instead of 72-80, sm_90, R = 4)."""
    acc = accumulator(dtype)
    flags = (bool(trans_a), bool(trans_b), int(bool(ones_a)))
    if variant == 1:
        return _make_gemm_tiled(T, acc, *flags), T
    if variant == 2:
        return _make_gemm_regtile(T, R, acc, *flags), T * R
    raise ValueError(f"gemm variant must be 1 (shared-memory tile) or 2 (register tiling), got {variant!r}")


# ----------------------------------------------------------------------------------------------
# Elementwise kernels over (rows, cols), 2-D grid, thread x on columns                  §2
# ----------------------------------------------------------------------------------------------

@cuda.jit
def bias_act(A, b, Hout, act):
    """Hout = f(A + b), row-broadcast bias (Hout may be A).   §2.1-§2.2"""
    c, r = cuda.grid(2)
    if r < A.shape[0] and c < A.shape[1]:
        Hout[r, c] = act_forward(A[r, c] + b[c], act)


@cuda.jit
def act_backward(dH, H, act, dA):
    """dA = dH * f'(a), f' written in h = f(a) (dA may be dH).   §2.2"""
    c, r = cuda.grid(2)
    if r < dH.shape[0] and c < dH.shape[1]:
        dA[r, c] = dH[r, c] * act_grad_from_h(H[r, c], act)


@cuda.jit
def gather_rows(X, idx, out):
    """out[i] = X[idx[i]]: a minibatch from the device-resident dataset."""
    c, i = cuda.grid(2)
    if i < out.shape[0] and c < out.shape[1]:
        out[i, c] = X[idx[i], c]


@cuda.jit
def scale_rows(G, w):
    """G[r, :] *= w[r] (IWAE: dhead = dlogw * dlogp/dhead).   §5.2"""
    c, r = cuda.grid(2)
    if r < G.shape[0] and c < G.shape[1]:
        G[r, c] *= w[r]


@functools.lru_cache(maxsize=None)
def bias_grad_kernel(T, dtype):
    """db[c] = sum_r dA[r, c]. Block (T, T): x on columns (coalesced), y strides over rows, then a
    shared-memory sum along y.   §2.1"""
    acc = accumulator(dtype)

    @cuda.jit
    def bias_grad(dA, db):
        sh = cuda.shared.array((T, T), acc)
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        c = cuda.blockIdx.x * T + tx
        s = acc(0)
        if c < dA.shape[1]:
            for r in range(ty, dA.shape[0], T):
                s += dA[r, c]
        sh[ty, tx] = s
        cuda.syncthreads()
        if ty == 0 and c < dA.shape[1]:
            t = acc(0)
            for k in range(T):
                t += sh[k, tx]
            db[c] = t

    return bias_grad


# ----------------------------------------------------------------------------------------------
# Posterior: reparameterization, KL, log p(z) - log q(z|x), eps drawn on the device     §3
# ----------------------------------------------------------------------------------------------

if _numba_config.ENABLE_CUDASIM:
    # Under the simulator a kernel sees FakeCUDAArray wrappers, which numba.cuda.random's host-jitted
    # generators cannot type (every call would take an error path that is slow and not thread-safe):
    # hand them the NumPy array inside. On a GPU this branch does not exist.
    def _normal(states, r, f64):
        raw = states.__dict__.get("_item", states)     # FakeWithinKernelCUDAArray -> FakeCUDAArray
        raw = raw.__dict__.get("_ary", raw)             # -> numpy
        return xoroshiro128p_normal_float64(raw, r) if f64 else xoroshiro128p_normal_float32(raw, r)
else:
    @cuda.jit(device=True)
    def _normal(states, r, f64):
        """One N(0, 1) draw from thread r's xoroshiro128p state."""
        if f64:
            return xoroshiro128p_normal_float64(states, r)
        return xoroshiro128p_normal_float32(states, r)


@cuda.jit
def reparam_kl(out, eps, z, kl, logr, states, draw, f64):
    """One thread per decoder row r = l n + i (l < L, i < n), a loop over the Z latent dims:

        eps ~ N(0, 1) from this thread's xoroshiro128p state when ``draw`` (stored into eps)
        z[r, j]  = mu_ij + exp(logvar_ij / 2) eps_lij                          §3.1
        kl[i, j] = 1/2 (mu^2 + expm1(logvar) - logvar) >= 0     (rows l = 0)    §3.2
        logr[r]  = log p(z) - log q(z|x) = -1/2 sum_j (z^2 - eps^2 - logvar)   §3.3 (log 2 pi cancels)

    out: (n, 2Z) = [mu | logvar];  eps: (L, n, Z);  z: (R, Z);  kl: (n, Z);  logr: (R,).
    """
    r = cuda.grid(1)
    L = eps.shape[0]
    n = eps.shape[1]
    Z = eps.shape[2]
    if r >= L * n:
        return
    l = r // n
    i = r - l * n
    s = 0.0
    for j in range(Z):
        mu = out[i, j]
        lv = out[i, Z + j]
        if draw:
            e = _normal(states, r, f64)
            eps[l, i, j] = e
        else:
            e = eps[l, i, j]
        zz = mu + math.exp(0.5 * lv) * e
        z[r, j] = zz
        s += -0.5 * (zz * zz - e * e - lv)
        if l == 0:
            kl[i, j] = 0.5 * (mu * mu + (math.expm1(lv) - lv))
    logr[r] = s


@cuda.jit
def iwae_weights(ll, logr, beta, dlw, bound, loss_acc, inv_n):
    """One thread per example i: log w_l = ll_l + beta logr_l; the bound logsumexp_l(log w) - log k,
    and dlogw_l = -softmax_l(log w) / n; adds -bound/n to the loss accumulator.   §5.2
    ll, logr, dlw: (k, n);  bound: (n,)."""
    i = cuda.grid(1)
    k = ll.shape[0]
    if i >= ll.shape[1]:
        return
    m = -math.inf
    for l in range(k):
        w = ll[l, i] + beta * logr[l, i]
        if w > m:
            m = w
    s = 0.0
    for l in range(k):
        s += math.exp(ll[l, i] + beta * logr[l, i] - m)
    b = m + math.log(s) - math.log(k)
    bound[i] = b
    for l in range(k):
        dlw[l, i] = -math.exp(ll[l, i] + beta * logr[l, i] - m) / s * inv_n
    cuda.atomic.add(loss_acc, 0, -b * inv_n)


# ----------------------------------------------------------------------------------------------
# Kernels built around a block reduction (block size B, any B >= 1)
# ----------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _block_sum(sh, v):
    """Sum of v over the threads of a 1-D block (any size): pairwise tree in shared memory."""
    t = cuda.threadIdx.x
    bd = cuda.blockDim.x
    sh[t] = v
    cuda.syncthreads()
    stride = 1
    while stride < bd:
        if t % (2 * stride) == 0 and t + stride < bd:
            sh[t] += sh[t + stride]
        stride *= 2
        cuda.syncthreads()
    total = sh[0]
    cuda.syncthreads()                  # sh may be reused right after
    return total


# ----------------------------------------------------------------------------------------------
# Likelihoods: the scalar functions of minivae/likelihoods as device functions           §4
# ----------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def _exp(v):
    return math.exp(v)


@cuda.jit(device=True)
def _log1p(e):
    return math.log1p(e)


@cuda.jit(device=True)
def _log(v):
    return math.log(v)


@cuda.jit(device=True)
def _one_minus_e(a, e):
    return -math.expm1(-a)


# the arithmetic the likelihoods' scalar functions take (minivae/likelihoods/__init__.py, OPS): CUDA's libm
DEVICE_OPS = SimpleNamespace(exp_nonpos=_exp, exp=_exp, log1p01=_log1p, log_pos=_log, one_minus_e=_one_minus_e,
                             compile=cuda.jit(device=True))


def _dispatch(pixels):
    """pixel(lik, dt, x, h0, h1, lf, sw) = pixels[lik](dt, x, h0, h1, lf, sw) -> (log p, d/dh0, d/dh1):
    nested ifs generated from the registry (a code is a position in it), none written by hand. An
    unknown code gives NaN (the backend only passes registered codes)."""
    @cuda.jit(device=True)
    def unknown(lik, dt, x, h0, h1, lf, sw):
        nan = dt(math.nan)
        return nan, nan, nan

    def link(code, pixel, rest):
        @cuda.jit(device=True)
        def step(lik, dt, x, h0, h1, lf, sw):
            if lik == code:
                return pixel(dt, x, h0, h1, lf, sw)
            return rest(lik, dt, x, h0, h1, lf, sw)
        return step

    f = unknown
    for code in range(len(pixels) - 1, -1, -1):
        f = link(code, pixels[code], f)
    return f


_pixel = _dispatch([cuda.jit(device=True)(m.scalar(DEVICE_OPS)) for m in _LIKELIHOODS])


@functools.lru_cache(maxsize=None)
def rowsum_kernels(B, dtype):
    """The kernels that reduce inside a block of B threads: the likelihoods and the posterior backward."""
    acc = accumulator(dtype)

    @cuda.jit
    def likelihood(X, head, G, ll, lik, log_floor, cb_switch, scale, grad, loss_acc, loss_w):
        """One block per decoder row r (x row i = r mod n), threads over the D pixels:
            G[r, :] = scale * d log p(x_i | head_r) / d head_r      (§4.1-§4.3)
            ll[r]   = log p(x_i | head_r)                           (block sum)
        and loss_acc[0] += loss_w * ll[r] (the ELBO's -1/(nL) sum ll). G is left alone when not
        ``grad`` (evaluation). X: (n, D); head, G: (R, K), K = D or 2D (a second head value per
        pixel: the Gaussian's s). One generic loop: the registered likelihood's scalar function
        (minivae/likelihoods), chosen by its code ``lik`` through the generated _pixel."""
        sh = cuda.shared.array(B, acc)
        r = cuda.blockIdx.x
        n = X.shape[0]
        D = X.shape[1]
        two = head.shape[1] > D
        i = r % n
        lf = acc(log_floor)                         # the Gaussian's log var_floor (§4.3)
        sw = acc(cb_switch)                         # the continuous Bernoulli's Taylor switch (§4.2)
        s = 0.0
        for d in range(cuda.threadIdx.x, D, B):
            h0 = head[r, d]
            h1 = head[r, D + d] if two else h0
            lp, g0, g1 = _pixel(lik, acc, X[i, d], h0, h1, lf, sw)
            s += lp
            if grad:
                G[r, d] = scale * g0
                if two:
                    G[r, D + d] = scale * g1
        total = _block_sum(sh, s)
        if cuda.threadIdx.x == 0:
            ll[r] = total
            if loss_w != 0:
                cuda.atomic.add(loss_acc, 0, loss_w * total)

    @cuda.jit
    def posterior_backward(out, eps, z, dz, kl, dlw, dout, beta, free_bits, kl_active, given, iwae,
                           loss_acc):
        """One block per latent dim j, threads over the n examples. Back through z = mu + std eps
        and the KL (or, for IWAE, log p(z) - log q(z|x)) into dout = [dmu | dlogvar]:   §3, §5, §6

          ELBO: kl_j = 1/n sum_i KL_ij (block sum); with free bits, dim j is on when kl_j > free_bits,
                or, when ``given``, when kl_active[j] > 0 (the decision taken over every rank's share,
                §5.3, §10); charged kl_j if on else free_bits into the loss;
                dKL_ij = beta/n if on (or no free bits) else 0   (oracle: objectives.elbo_loss)
                dmu = sum_l dz + dKL mu;   dlogvar = std/2 sum_l dz eps + dKL expm1(logvar)/2
          IWAE: dz += beta dlogw (-z)   (d log p(z)/dz);   dlogvar += beta/2 sum_l dlogw
        out, dout: (n, 2Z); eps: (L, n, Z); z, dz: (R, Z); kl: (n, Z); dlw: (L, n); kl_active: (Z,)
        float64 when ``given``, else any placeholder."""
        sh = cuda.shared.array(B, acc)
        j = cuda.blockIdx.x
        L = eps.shape[0]
        n = eps.shape[1]
        Z = eps.shape[2]
        dkl = 0.0
        if not iwae:
            s = 0.0
            for i in range(cuda.threadIdx.x, n, B):
                s += kl[i, j]
            kl_j = _block_sum(sh, s) / n
            if free_bits > 0:
                on = kl_active[j] > 0 if given else kl_j > free_bits
                charged = kl_j if on else free_bits
                dkl = beta / n if on else 0.0
            else:
                charged = kl_j
                dkl = beta / n
            if cuda.threadIdx.x == 0:
                cuda.atomic.add(loss_acc, 0, beta * charged)
        for i in range(cuda.threadIdx.x, n, B):
            mu = out[i, j]
            lv = out[i, Z + j]
            gmu = 0.0
            geps = 0.0
            gq = 0.0
            for l in range(L):
                r = l * n + i
                d = dz[r, j]
                if iwae:
                    d -= beta * dlw[l, i] * z[r, j]
                    gq += dlw[l, i]
                gmu += d
                geps += d * eps[l, i, j]
            dlv = 0.5 * math.exp(0.5 * lv) * geps + dkl * 0.5 * math.expm1(lv)
            if iwae:
                dlv += 0.5 * beta * gq
            dout[i, j] = gmu + dkl * mu
            dout[i, Z + j] = dlv

    return likelihood, posterior_backward


# ----------------------------------------------------------------------------------------------
# Optimizer updates over the flat vectors, one thread per parameter (torch.optim semantics) §8
# ----------------------------------------------------------------------------------------------

@cuda.jit
def sgd_update(p, g, buf, first, lr, momentum, wd):
    """g += wd p;  buf = g (first step) or momentum buf + g;  p -= lr buf (lr g without momentum)."""
    k = cuda.grid(1)
    if k < p.size:
        gk = g[k] + wd * p[k]
        if momentum != 0:
            if first:
                b = gk
            else:
                b = momentum * buf[k] + gk
            buf[k] = b
            gk = b
        p[k] -= lr * gk


@cuda.jit
def adagrad_update(p, g, sum_sq, lr, eps, wd):
    """g += wd p;  s += g^2;  p -= lr g / (sqrt(s) + eps)."""
    k = cuda.grid(1)
    if k < p.size:
        gk = g[k] + wd * p[k]
        s = sum_sq[k] + gk * gk
        sum_sq[k] = s
        p[k] -= lr * gk / (math.sqrt(s) + eps)


@cuda.jit
def adam_update(p, g, m, v, step_size, beta1, beta2, inv_sqrt_bc2, eps, wd):
    """g += wd p;  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps); step_size and inv_sqrt_bc2 come from the host's t."""
    k = cuda.grid(1)
    if k < p.size:
        gk = g[k] + wd * p[k]
        mk = beta1 * m[k] + (1.0 - beta1) * gk
        vk = beta2 * v[k] + (1.0 - beta2) * gk * gk
        m[k] = mk
        v[k] = vk
        p[k] -= step_size * mk / (math.sqrt(vk) * inv_sqrt_bc2 + eps)


# ----------------------------------------------------------------------------------------------
# The stack's Gaussian stage and objective (docs/math.md §3, §11, §12), for kernels/cuda_stack.py.
# One thread per decoder row r = l n + i (R = L n rows) unless said otherwise; each mirrors the
# numba kernel of the same name in kernels/cpu_stack.py and names its NumPy oracle. Per-row sums
# are float64 (acc, a, f: (R,) float64), as there.
# ----------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def sample_row(r, n, shared):
    """Row r = l n + i of the (R, .) arrays: its sample l, its example i, and the row m of a posterior
    that is (n, 2Z) when ``shared`` (layer 1: one per example) else (R, 2Z)."""
    l = r // n
    i = r - l * n
    return l, i, (i if shared else r)


@cuda.jit
def stack_gauss_fwd(out, eps, std, z, shared):
    """std = exp(logvar/2), z = mu + std eps.   out: (m, 2Z) = [mu | logvar], m = n when ``shared``
    (layer 1: one posterior per example for every sample) else R;  eps: (L, n, Z);  std: (m, Z);
    z: (R, Z). Oracle: distributions.reparam_forward (cpu_stack.gauss_fwd_).   §3.1, §11.1"""
    r = cuda.grid(1)
    L, n, Z = eps.shape
    if r >= L * n:
        return
    l, i, m = sample_row(r, n, shared)
    for j in range(Z):
        s = math.exp(0.5 * out[m, Z + j])
        if m == r or l == 0:                       # each std row written by one thread
            std[m, j] = s
        z[r, j] = out[m, j] + s * eps[l, i, j]


@cuda.jit
def stack_gauss_logpdf_add(z, pm, acc, w, u):
    """acc[r] += w log N(z_r; m_r, s_r) = w (-1/2 sum_j ((z - m)^2 e^-s + s + log 2pi)); keeps
    u = (z - m) e^-s for the backward.   z, u: (R, Z);  pm: (R, 2Z) = [m | s].
    Oracle: distributions.gauss_logpdf (cpu_stack.gauss_logpdf_add_).   §11.1"""
    r = cuda.grid(1)
    R, Z = z.shape
    if r >= R:
        return
    t = 0.0
    for j in range(Z):
        d = z[r, j] - pm[r, j]
        s = pm[r, Z + j]
        uu = d * math.exp(-s)
        u[r, j] = uu
        t += d * uu + s
    acc[r] += w * (-0.5 * (t + Z * LOG_2PI))


@cuda.jit
def stack_gauss_logpdf_bwd(a, z, pm, u, dz, dpm):
    """With u from stack_gauss_logpdf_add and upstream a[r]:  dz += -a u;
    dpm = [a u | a ((z - m) u - 1)/2].   a: (R,);  z, u, dz: (R, Z);  pm, dpm: (R, 2Z).
    Oracle: distributions.gauss_logpdf_backward (cpu_stack.gauss_logpdf_bwd_).   §11.1"""
    r = cuda.grid(1)
    R, Z = z.shape
    if r >= R:
        return
    g = a[r]
    for j in range(Z):
        d = z[r, j] - pm[r, j]
        uu = u[r, j]
        dz[r, j] += -g * uu
        dpm[r, j] = g * uu
        dpm[r, Z + j] = 0.5 * g * (d * uu - 1.0)


@cuda.jit
def stack_prior_add(z, acc, w):
    """acc[r] += w log N(z_r; 0, I) = w (-1/2 sum_j (z^2 + log 2pi)).
    Oracle: distributions.log_prior (cpu_stack.prior_add_).   §3.3"""
    r = cuda.grid(1)
    R, Z = z.shape
    if r >= R:
        return
    t = 0.0
    for j in range(Z):
        t += z[r, j] * z[r, j]
    acc[r] += w * (-0.5 * (t + Z * LOG_2PI))


@cuda.jit
def stack_prior_bwd(a, z, dz):
    """dz += a[r] (-z).   Oracle: distributions.log_prior_backward (cpu_stack.prior_bwd_).   §3.3"""
    r = cuda.grid(1)
    R, Z = z.shape
    if r >= R:
        return
    g = a[r]
    for j in range(Z):
        dz[r, j] += -g * z[r, j]


@cuda.jit
def stack_logq_eps_add(eps, out, shared, acc, w):
    """acc[r] += w log q(z_r) in eps form = w (-1/2 (sum_j eps^2 + sum_j (log 2pi + logvar))).
    out: (m, 2Z) as in stack_gauss_fwd. Oracle: distributions.log_posterior_eps
    (cpu_stack.logq_eps_add_).   §3.3"""
    r = cuda.grid(1)
    L, n, Z = eps.shape
    if r >= L * n:
        return
    l, i, m = sample_row(r, n, shared)
    t = 0.0
    for j in range(Z):
        e = eps[l, i, j]
        t += e * e + out[m, Z + j]
    acc[r] += w * (-0.5 * (t + Z * LOG_2PI))


@cuda.jit
def stack_kl_add(out, acc, w):
    """acc[r] += w sum_j KL_mj, KL = 1/2 (mu^2 + expm1(logvar) - logvar), m = r mod m_out, out:
    (m_out, 2Z), acc: (R,). Oracle: distributions.kl_forward summed over Z (cpu_stack.kl_add_).  §3.2"""
    r = cuda.grid(1)
    if r >= acc.shape[0]:
        return
    M = out.shape[0]
    Z = out.shape[1] // 2
    m = r % M
    t = 0.0
    for j in range(Z):
        mu = out[m, j]
        lv = out[m, Z + j]
        t += 0.5 * (mu * mu + (math.expm1(lv) - lv))
    acc[r] += w * t


@cuda.jit
def stack_posterior_bwd(dz, eps, z, std, out, dout, sq, aq, qs, ckl, stopped, shared):
    """Layer l's B5-B6 (§6, §11.3, §12): from dz (R, Z) to dout = [dmu | dlogvar] (m, 2Z). One thread
    per row of ``out`` (per example when ``shared``, summing its L samples; else per row r).
    Per row r with a = qs aq[r]: not stopped: dlogvar += -a/2 (log q in eps form); stopped (DReG):
    dz += -a u (u = (z - mu) e^-logvar) and sq = dout + [a u | a ((z - mu) u - 1)/2] (not shared);
    reparameterization: dmu = dz, dlogvar = std/2 dz eps; the top KL with weight ckl per row:
    dmu += ckl mu, dlogvar += ckl expm1(logvar)/2.
    Oracles: distributions.reparam_backward, log_posterior_eps_backward, gauss_logpdf_backward,
    kl_backward (cpu_stack.posterior_bwd_)."""
    m = cuda.grid(1)
    L, n, Z = eps.shape
    M = out.shape[0]
    if m >= M:
        return
    rows = L if shared else 1
    for j in range(Z):
        mu = out[m, j]
        lv = out[m, Z + j]
        sm = 0.0 * mu
        sv = 0.0 * mu
        for k in range(rows):
            r = k * n + m if shared else m
            l, i, _ = sample_row(r, n, shared)
            a = qs * aq[r]
            g = dz[r, j]
            qm = 0.0
            qv = 0.0
            if stopped:
                d = z[r, j] - mu
                u = d * math.exp(-lv)
                g = g - a * u
                qm = a * u
                qv = 0.5 * a * (d * u - 1.0)
            dmu = g
            dlv = 0.5 * std[m, j] * (g * eps[l, i, j])
            if not stopped:
                dlv = dlv - 0.5 * a
            if ckl != 0.0:
                dmu = dmu + ckl * mu
                dlv = dlv + ckl * 0.5 * math.expm1(lv)
            sm += dmu
            sv += dlv
            if stopped and not shared:
                sq[r, j] = dmu + qm
                sq[r, Z + j] = dlv + qv
        dout[m, j] = sm
        dout[m, Z + j] = sv


@cuda.jit
def stack_upstream(dlogw, iwae, beta, c, ap, aq):
    """The upstream of every log p term, ap = beta dlogw (IWAE) or -beta c (ELBO, c = 1/(nL)), and of
    every log q term, aq = -ap.   (R,) float64.   Oracle: NumpyBackend._iwae_upstream, stack_elbo_loss."""
    r = cuda.grid(1)
    if r >= ap.shape[0]:
        return
    v = beta * dlogw[r] if iwae else -beta * c
    ap[r] = v
    aq[r] = -v


@cuda.jit
def stack_dreg_factor(dlogw, n, beta, fac, aq):
    """From IWAE's dlogw = -w~/n: fac = (1 - beta) + beta w~ (DReG's weights over IWAE's) and
    aq = -beta x DReG's weights, -((1-beta) w~ + beta w~^2)/n.
    Oracle: objectives.dreg_weights (cpu_stack.dreg_factor_).   §12"""
    r = cuda.grid(1)
    if r >= dlogw.shape[0]:
        return
    wt = -n * dlogw[r]
    fac[r] = (1.0 - beta) + beta * wt
    aq[r] = -beta * (-((1.0 - beta) * wt + beta * wt * wt) / n)


@cuda.jit
def stack_scale_rows_by(a, f):
    """a[r, :] *= f[r].   a: (R, Z), f: (R,) float64.   (cpu_stack.scale_rows_by_)"""
    r = cuda.grid(1)
    if r >= a.shape[0]:
        return
    for j in range(a.shape[1]):
        a[r, j] *= f[r]


@cuda.jit
def stack_add(a, b):
    """a += b, (R, Z).   (cpu_stack.add_)"""
    r = cuda.grid(1)
    if r >= a.shape[0]:
        return
    for j in range(a.shape[1]):
        a[r, j] += b[r, j]


@cuda.jit
def stack_elbo_bound(logw, L, bound, loss_acc):
    """One thread per example i: bound_i = 1/L sum_l logw[l n + i] (the stack's ELBO, §11.2), and
    -bound_i / n added to the loss.   logw: (R,) float64, bound: (n,) float64.
    Oracle: objectives.stack_elbo_per_example (cpu_stack.stack_step_'s ELBO mean)."""
    i = cuda.grid(1)
    n = bound.shape[0]
    if i >= n:
        return
    t = 0.0
    for l in range(L):
        t += logw[l * n + i]
    b = t / L
    bound[i] = b
    cuda.atomic.add(loss_acc, 0, -b / n)
