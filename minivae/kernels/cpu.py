"""The Numba CPU backend: fused @njit kernels over preallocated workspaces (docs/math.md §9).

It computes exactly the function of :class:`minivae.kernels.numpy_.NumpyBackend` (§6) with fewer
passes over memory; every kernel here has a NumPy oracle and a test against it (tests/test_numba.py).

Fusions (§9):
    bias_act_          a <- f(a + b) in place on the GEMM output; only h is kept (f' is a function of h)
    enc.head           [mu | logvar] is one GEMM: the layer already has shape (H, 2Z)
    reparam_fwd_ / posterior_bwd_   sigma, z; then dmu, dlogvar with the KL (or IWAE prior/entropy) terms
    likelihood_        log p(x|z) per row and the head's gradient, written over the head, in one pass
                       (one generic loop over the scalar functions of minivae/likelihoods)
    act_back_colsum_   da = dh f'(h) in place and db = sum_rows da from one read of dh
    sgd/adagrad/adam_update   one pass over (params, grad, state)
GEMM: BLAS (np.dot(a, b, out) on C- or F-contiguous views, no copies) or the custom register-blocked
kernels of ``minivae.kernels.gemm`` (operands read in place; only B^T, or B's last column panel, packed
into the panel buffer p1), chosen at call time by ``minivae.kernels.config.GEMM``. BLAS is never called
inside a prange.

Shape legend: n examples, D = x_dim, Z = z_dim, L samples (k for IWAE), R = L*n decoder rows,
K head width (D or 2D), H fan-in/out of a layer. Every kernel is @njit(cache=True, error_model="numpy"); float32 code
uses float32 constants (``dt = a.dtype.type``), so no float64 literal promotes a float32 array.
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict, namedtuple
from types import SimpleNamespace

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import config, require_one_stochastic_layer
from .config import BLAS, CUSTOM_SERIAL
from .interface import require_estimator
from .numba_cache import configure as _configure_cache
from .gemm import gemm_nn, gemm_nt, gemm_nt_packed, gemm_tn, pack_size
from .. import threads  # noqa: F401  (sets OMP_WAIT_POLICY before the first prange)
from ..layers import LEAKY_SLOPE
from .. import likelihoods
from ..distributions import _CB_TAYLOR
from ..objectives import OBJECTIVES

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)

ACT_CODES = {"relu": 1, "tanh": 2, "softplus": 3, "leaky_relu": 4}       # 0: identity (the heads)
LIK_CODES = likelihoods.codes()              # the registry's order (bernoulli 0, cb 1, gaussian 2)
_NO_MASK = np.empty(0, dtype=np.float64)                                   # kl_active not given
LOG_2PI = math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# GEMM                                                                               §2.1, §9
# ----------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def mm_nn(A, B, C, gemm, p1, mb, nb):
    """C = A B.   A: (M, K)  B: (K, N) (a weight)  C: (M, N).   gemm: config.BLAS, CUSTOM (parallel
    tiles) or CUSTOM_SERIAL (in the calling thread);  p1: panel buffer of the custom GEMM."""
    if gemm == BLAS:
        np.dot(A, B, C)
    else:
        gemm_nn(A, B, C, p1, mb, nb, gemm == CUSTOM_SERIAL)


@njit(cache=True, error_model="numpy")
def mm_nt(A, B, C, gemm, p1, mb, nb):
    """C = A B^T.   A: (M, K)  B: (N, K)  C: (M, N).   BLAS gets the F-contiguous view B.T;
    the custom GEMM packs B^T into p1."""
    if gemm == BLAS:
        np.dot(A, B.T, C)
    else:
        gemm_nt(A, B, C, p1, mb, nb, gemm == CUSTOM_SERIAL)


@njit(cache=True, error_model="numpy")
def mm_nt_layer(A, B, C, gemm, p1, mb, nb, lay, t, wt):
    """C = A B^T for layer t (B = its W): with the custom GEMM, a non-empty ``wt`` and lay[t, 4] >= 0,
    from B^T's panels packed beforehand at wt[lay[t, 4]:] (one packing for every part of a split step:
    cpu_stack.pack_claimed_); otherwise ``mm_nt`` (which packs B^T into p1 itself). Bit for bit the same.
    An empty ``wt`` never reads column 4 (4-column tables: cpu.layer_table)."""
    if gemm != BLAS and wt.size > 0 and lay[t, 4] >= 0:
        gemm_nt_packed(A, wt[lay[t, 4]:], C, mb, nb, gemm == CUSTOM_SERIAL)
    else:
        mm_nt(A, B, C, gemm, p1, mb, nb)


@njit(cache=True, error_model="numpy")
def mm_tn(A, B, C, gemm, p1, mb, nb):
    """C = A^T B.   A: (R, M)  B: (R, N)  C: (M, N).   The custom GEMM reads A^T in place."""
    if gemm == BLAS:
        np.dot(A.T, B, C)
    else:
        gemm_tn(A, B, C, p1, mb, nb, gemm == CUSTOM_SERIAL)



@njit(cache=True, error_model="numpy", inline="always")
def log1p_(e, one):
    """log(1 + e) to a few ulps through log alone (D. Goldberg, "What every computer scientist
    should know about floating-point arithmetic", Thm. 4): u = 1 + e; e when u == 1, else
    log(u) e / (u - 1). The quotient cancels the rounding of 1 + e; libm's log is several times
    faster than its log1p in these loops (benchmarks/README.md). ``one``: 1 in e's dtype."""
    u = one + e
    return e if u == one else np.log(u) * e / (u - one)


@intrinsic
def _bits_as_f32(typingctx, v):
    """Reinterpret the low 32 bits of an integer as the float32 with those bits (no conversion)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        bits = args[0]
        if v.bitwidth != 32:
            bits = builder.trunc(bits, ir.IntType(32))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(v), codegen


@intrinsic
def _f32_as_bits(typingctx, v):
    """The 32 bits of a float32 as an int32 (no conversion)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(v), codegen


@intrinsic
def fma_(typingctx, a, b, c):
    """a b + c rounded once (``llvm.fma``; one vfmadd instruction, and LLVM vectorizes it like any other
    arithmetic). The float32 polynomials below run Horner's rule through it: one rounding a step instead
    of two, and half the instructions (the Bernoulli pass over 320 x 784 pixels: 276 -> 208 us,
    benchmarks/README.md). a, b, c: one float type."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        T = context.get_value_type(a)
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(T, [T] * 3), f"llvm.fma.f{a.bitwidth}")
        return builder.call(f, args)
    return a(a, a, a), codegen


@njit(cache=True, error_model="numpy", inline="always")
def log_pos_f32(x):
    """log x for a normal float32 x > 0 in plain arithmetic (vectorizable): x = 2^k m with m in
    [sqrt(1/2), sqrt(2)) from the bits, log m = 2 artanh(s), s = (m - 1)/(m + 1) in [-0.172, 0.172]
    (odd series to s^9: truncation < 3e-9 relative), k ln 2 in two parts (Cody-Waite)."""
    bits = _f32_as_bits(x)
    k = (bits >> 23) - 127
    m = _bits_as_f32((bits & 0x7FFFFF) | 0x3F800000)            # [1, 2)
    big = m > np.float32(1.4142135)
    m = m * np.float32(0.5) if big else m
    k = k + 1 if big else k
    sn = (m - np.float32(1.0)) / (m + np.float32(1.0))         # m - 1 exact (Sterbenz)
    s2 = sn * sn
    p = np.float32(1.0 / 9.0)
    p = fma_(p, s2, np.float32(1.0 / 7.0))
    p = fma_(p, s2, np.float32(1.0 / 5.0))
    p = fma_(p, s2, np.float32(1.0 / 3.0))
    p = fma_(p, s2, np.float32(1.0))
    kf = np.float32(k)
    return kf * np.float32(0.693359375) + (kf * np.float32(-2.12194440e-4) + np.float32(2.0) * sn * p)


@njit(cache=True, error_model="numpy", inline="always")
def exp_nonpos_f32(x):
    """e^x for float32 x <= 0 in plain arithmetic, so that LLVM vectorizes the loops that call it
    (numba has no vector math library here: libm's expf is a scalar call per element).
    Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 Taylor polynomial (truncation
    < 1e-8 relative) and 2^n from the exponent bits; x is clamped at -87 (e^-87 ~ 1.6e-38), which
    changes no result by more than 1e-38 absolute."""
    x = max(x, np.float32(-87.0))
    nf = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = (x - nf * np.float32(0.693359375)) - nf * np.float32(-2.12194440e-4)
    p = np.float32(1.0 / 5040.0)
    p = fma_(p, r, np.float32(1.0 / 720.0))
    p = fma_(p, r, np.float32(1.0 / 120.0))
    p = fma_(p, r, np.float32(1.0 / 24.0))
    p = fma_(p, r, np.float32(1.0 / 6.0))
    p = fma_(p, r, np.float32(0.5))
    p = fma_(p, r, np.float32(1.0))
    p = fma_(p, r, np.float32(1.0))
    return p * _bits_as_f32((np.int32(nf) + 127) << 23)


@njit(cache=True, error_model="numpy", inline="always")
def log1p01_f32(e):
    """log(1 + e) for float32 e in [0, 1], in plain arithmetic (vectorizable): 2 artanh(s) with
    s = e/(2 + e) in [0, 1/3], the odd series to s^15 (truncation < 2e-9 relative). No cancellation:
    for tiny e it returns e."""
    s = e / (np.float32(2.0) + e)
    s2 = s * s
    p = np.float32(1.0 / 15.0)
    p = fma_(p, s2, np.float32(1.0 / 13.0))
    p = fma_(p, s2, np.float32(1.0 / 11.0))
    p = fma_(p, s2, np.float32(1.0 / 9.0))
    p = fma_(p, s2, np.float32(1.0 / 7.0))
    p = fma_(p, s2, np.float32(1.0 / 5.0))
    p = fma_(p, s2, np.float32(1.0 / 3.0))
    p = fma_(p, s2, np.float32(1.0))
    return np.float32(2.0) * s * p


@njit(cache=True, error_model="numpy", inline="always")
def tanh_f32(a):
    """tanh for float32 in plain arithmetic (vectorizable): a rational function x P(x^2) / Q(x^2) of
    degrees 5 and 3 in x^2, x = a clamped to [-8.8, 8.8] (beyond, tanh a rounds to +-1 in float32),
    the result clamped to [-1, 1]. Odd by construction; NaN stays NaN. The coefficients are a
    Lawson-weighted least-squares fit of tanh(x)/x on (0, 8.8] (benchmarks/fit_tanh_f32.py): relative
    error 2.9e-7 in exact arithmetic, at most 4.5 float32 eps over every third float32 in (0, 12].
    Half the time of sign(a) (1 - e)/(1 + e) with e = e^-2|a| and a series near 0 (0.36 against
    0.71 ns an element in bias_act_, benchmarks/README.md): 10 multiply-adds and one division."""
    c = np.float32(8.8)
    one = np.float32(1.0)
    x = c if a > c else a                          # NaN fails both tests and stays NaN
    x = -c if x < -c else x
    t = x * x
    p = np.float32(2.45668044e-11)
    p = fma_(p, t, np.float32(-1.52258978e-08))
    p = fma_(p, t, np.float32(1.00724455e-05))
    p = fma_(p, t, np.float32(3.00788707e-03))
    p = fma_(p, t, np.float32(1.29998323e-01))
    p = fma_(p, t, np.float32(9.99999989e-01))
    q = np.float32(2.40210928e-04)
    q = fma_(q, t, np.float32(2.41185219e-02))
    q = fma_(q, t, np.float32(4.63331582e-01))
    q = fma_(q, t, one)
    y = x * p / q
    y = one if y > one else y
    return -one if y < -one else y


@njit(cache=True, error_model="numpy", inline="always")
def one_minus_exp_neg_f32(h):
    """1 - e^-h = -expm1(-h) for float32 h >= 0 in plain arithmetic (vectorizable): Taylor to h^6
    below 0.125 (truncation < 1e-9 relative), else 1 - exp_nonpos_f32(-h) (a few ulps)."""
    p = np.float32(-1.0 / 720.0)
    p = fma_(p, h, np.float32(1.0 / 120.0))
    p = fma_(p, h, np.float32(-1.0 / 24.0))
    p = fma_(p, h, np.float32(1.0 / 6.0))
    p = fma_(p, h, np.float32(-0.5))
    p = fma_(p, h, np.float32(1.0))
    small = h * p
    big = np.float32(1.0) - exp_nonpos_f32(-h)
    return small if h < np.float32(0.125) else big


def _per_dtype(f32, f64):
    """The @overload typing function of a math stub below: ``f32`` (vectorizable plain arithmetic) for a
    float32 first argument, ``f64`` (libm, as the 1e-12 tests against NumPy need) otherwise."""
    def typer(*args):
        return f32 if args[0] == types.float32 else f64
    typer.__signature__ = inspect.signature(f64)       # numba checks it against the stub's parameters
    return typer


def tanh_(a):
    """tanh: the vectorizable float32 version, libm's in float64."""
    return np.tanh(a)


def one_minus_exp_neg(h):
    """-expm1(-h) for h >= 0: the vectorizable float32 version, libm's expm1 in float64."""
    return -np.expm1(-h)


overload(tanh_)(_per_dtype(lambda a: tanh_f32(a), lambda a: np.tanh(a)))


overload(one_minus_exp_neg)(_per_dtype(lambda h: one_minus_exp_neg_f32(h), lambda h: -np.expm1(-h)))


def exp_nonpos(x):
    """e^x for x <= 0: the vectorizable float32 version, libm's exp in float64 (tests ask 1e-12)."""
    return np.exp(x)


def log1p01(e):
    """log(1 + e) for e in [0, 1]: the vectorizable float32 series, log1p_ (through log) in float64."""
    return log1p_(e, 1.0)


overload(exp_nonpos)(_per_dtype(lambda x: exp_nonpos_f32(x), lambda x: np.exp(x)))


overload(log1p01)(_per_dtype(lambda e: log1p01_f32(e), lambda e: log1p_(e, 1.0)))


def log_pos(x):
    """log x for x > 0: the vectorizable float32 version, libm's log in float64."""
    return np.log(x)


def one_minus_e(a, e):
    """1 - e^-a given e = e^-a, for a >= 0.125: the subtraction in float32 (it loses nothing there and
    vectorizes), libm's -expm1(-a) in float64 (the 1e-12 tests against NumPy need it)."""
    return -np.expm1(-a)


overload(log_pos)(_per_dtype(lambda x: log_pos_f32(x), lambda x: np.log(x)))


overload(one_minus_e)(_per_dtype(lambda a, e: np.float32(1.0) - e, lambda a, e: -np.expm1(-a)))


# the arithmetic the likelihoods' scalar functions take (minivae/likelihoods/__init__.py, OPS)
SCALAR_OPS = SimpleNamespace(exp_nonpos=exp_nonpos, exp=np.exp, log1p01=log1p01, log_pos=log_pos,
                             one_minus_e=one_minus_e, compile=njit(inline="always", error_model="numpy"))


# ----------------------------------------------------------------------------------------------
# Layers                                                                               §2.2
# ----------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def bias_act_(a, b, act):
    """a <- f(a + b) in place.   a: (N, O)  b: (O,).   act: 0 identity, 1 relu, 2 tanh, 3 softplus,
    4 leaky_relu.   §2.1-§2.2   Serial: a parallel region costs 35-100 us to wake on 2 shared cores,
    more than this pass (benchmarks/README.md)."""
    N, O = a.shape
    dt = a.dtype.type
    zero = dt(0)
    one = dt(1)
    slope = dt(LEAKY_SLOPE)
    for r in range(N):
        if act == 0:
            for c in range(O):
                a[r, c] = a[r, c] + b[c]
        elif act == 1:
            for c in range(O):
                v = a[r, c] + b[c]
                a[r, c] = zero if v < zero else v      # NaN stays NaN, as numpy's maximum(v, 0)
        elif act == 2:
            for c in range(O):
                a[r, c] = tanh_(a[r, c] + b[c])
        elif act == 3:
            for c in range(O):
                v = a[r, c] + b[c]
                a[r, c] = max(v, zero) + log1p01(exp_nonpos(-abs(v)))
        else:
            for c in range(O):
                v = a[r, c] + b[c]
                a[r, c] = v if v > zero else v * slope


@njit(cache=True, error_model="numpy")
def act_back_colsum_(g, h, db, act):
    """g <- g * f'(h) in place and db = sum_rows g, in one read of g.   g, h: (N, O)  db: (O,).   §2.2

    f' from the output h alone: relu 1[h>0]; tanh 1-h^2; softplus -expm1(-h); leaky 1 or 0.01.
    act 0 (a head) leaves g as it is and only sums. Rows in order, columns vectorized: each db[c]
    is the plain sum over the rows in order, as numpy's axis-0 sum. Serial on purpose: at these
    sizes (5 us for 128 x 400) waking a second thread costs more than the pass.
    """
    N, O = g.shape
    dt = g.dtype.type
    zero = dt(0)
    one = dt(1)
    slope = dt(LEAKY_SLOPE)
    for c in range(O):
        db[c] = zero
    for r in range(N):
        if act == 0:
            for c in range(O):
                db[c] += g[r, c]
        elif act == 1:
            for c in range(O):
                v = g[r, c] if h[r, c] > zero else zero
                g[r, c] = v
                db[c] += v
        elif act == 2:
            for c in range(O):
                hv = h[r, c]
                v = g[r, c] * (one - hv * hv)
                g[r, c] = v
                db[c] += v
        elif act == 3:
            for c in range(O):
                v = g[r, c] * one_minus_exp_neg(h[r, c])
                g[r, c] = v
                db[c] += v
        else:
            for c in range(O):
                v = g[r, c] if h[r, c] > zero else g[r, c] * slope
                g[r, c] = v
                db[c] += v


# ----------------------------------------------------------------------------------------------
# Posterior and likelihoods                                                          §3, §4
# ----------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def reparam_fwd_(out, eps, std, z):
    """sigma = exp(logvar/2), z_l = mu + sigma eps_l.   out: (n, 2Z) = [mu | logvar]
    eps: (L, n, Z)  std: (n, Z)  z: (L*n, Z), row l*n + i.   §3.1"""
    L, n, Z = eps.shape
    half = out.dtype.type(0.5)
    for i in range(n):
        for j in range(Z):
            s = np.exp(half * out[i, Z + j])
            std[i, j] = s
            mu = out[i, j]
            for l in range(L):
                z[l * n + i, j] = mu + s * eps[l, i, j]


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def row_sum_f64_(a, r):
    """sum_d a[r, d] accumulated in float64, in any order: ``reassoc`` lets LLVM split the sum into
    vector lanes (a serial float64 sum of 784 pixels took 80 of the likelihood pass's 190 us). Not
    inlined by numba, so the flag stays on this loop alone (LLVM inlines the call and keeps it)."""
    acc = 0.0
    for d in range(a.shape[1]):
        acc += a[r, d]
    return acc


def _row_loop(logp_score, heads):
    """The pixel loop of one decoder row for one likelihood, written once for all of them:
    lp[d] = log p(x_id | head_r) (lp: one row of scratch), and, when ``want_score``, head_r <- sc * score
    in place.
    ``logp_score`` is the likelihood's scalar function (minivae/likelihoods), compiled here with
    inline="always" so that LLVM sees one loop body; ``heads`` (1 or 2 head values per pixel) is a
    compile-time constant. No reduction in the loop (the sum over d is row_sum_f64_'s): in float32,
    with the arithmetic exp/log1p of SCALAR_OPS, it vectorizes."""
    pixel = njit(inline="always", error_model="numpy")(logp_score)

    @njit(error_model="numpy")
    def row(x, head, lp, r, i, dt, lf, sw, sc, want_score):
        D = x.shape[1]
        if want_score:
            for d in range(D):
                h1 = head[r, D + d] if heads == 2 else head[r, d]
                v, g0, g1 = pixel(dt, x[i, d], head[r, d], h1, lf, sw)
                lp[d] = v
                head[r, d] = sc * g0
                if heads == 2:
                    head[r, D + d] = sc * g1
        else:
            for d in range(D):
                h1 = head[r, D + d] if heads == 2 else head[r, d]
                v, g0, g1 = pixel(dt, x[i, d], head[r, d], h1, lf, sw)
                lp[d] = v
    return row


def _dispatch(rows):
    """lik_row(lik, ...) = rows[lik](...): nested ifs generated from the registry (a code is a
    position in it), none written by hand. An unknown code leaves NaN in lp (the backends only pass
    registered codes). Built at import; not cached itself: the @njit(cache=True) callers are."""
    @njit(error_model="numpy")
    def unknown(lik, x, head, lp, r, i, dt, lf, sw, sc, want_score):
        for d in range(x.shape[1]):
            lp[d] = np.nan

    def link(code, row, rest):
        @njit(error_model="numpy")
        def step(lik, x, head, lp, r, i, dt, lf, sw, sc, want_score):
            if lik == code:
                row(x, head, lp, r, i, dt, lf, sw, sc, want_score)
            else:
                rest(lik, x, head, lp, r, i, dt, lf, sw, sc, want_score)
        return step

    f = unknown
    for code in range(len(rows) - 1, -1, -1):
        f = link(code, rows[code], f)
    return f


_lik_row = _dispatch([_row_loop(m.scalar(SCALAR_OPS), m.HEADS) for m in likelihoods.modules()])


@njit(cache=True, error_model="numpy")
def likelihood_(x, head, ll, lp, lik, var_floor, cb_switch, scale, want_score):
    """ll[r] = sum_d log p(x_i | head_r) (float64), and, when ``want_score``, head_r <- scale * score
    in place (the head's gradient for a row weight ``scale``).   x: (n, D)  head: (R, K)  ll: (R,)
    lp: (m, D) scratch, m >= 1: row r's pixel terms go to row r % m (the workspaces keep one row, which
    stays in L1; an (R, D) one would add 1 MB a part to a two-layer step's memory traffic).
    Row r is example r % n.   lik: the likelihood's code, LIK_CODES (the position in minivae.likelihoods'
    registry).   §4.1-§4.3

    One generic loop: per row, the registered likelihood's pixel loop (_row_loop over its scalar
    function), chosen by the generated _lik_row; then the row's sum in float64.
    """
    R = head.shape[0]
    n = x.shape[0]
    dt = head.dtype.type
    lf = dt(math.log(var_floor))       # the Gaussian's log var_floor (§4.3)
    sw = dt(cb_switch)                 # the continuous Bernoulli's Taylor switch (§4.2)
    sc = dt(scale)
    m = lp.shape[0]
    for r in range(R):
        _lik_row(lik, x, head, lp[r % m], r, r % n, dt, lf, sw, sc, want_score)
        ll[r] = row_sum_f64_(lp, r % m)


@njit(cache=True, error_model="numpy")
def scale_rows_(a, w):
    """a[r, :] *= w[r]: the IWAE row weights dlogw applied to the unweighted score.   §6 step 2"""
    N, O = a.shape
    for r in range(N):
        s = a.dtype.type(w[r])
        for c in range(O):
            a[r, c] *= s


@njit(cache=True, error_model="numpy")
def kl_dim_(out, Z, kld):
    """kld[j] = 1/n sum_i KL_ij, KL = 1/2 (mu^2 + expm1(logvar) - logvar).   (Z,) float64   §3.2"""
    n = out.shape[0]
    half = out.dtype.type(0.5)
    for j in range(Z):
        acc = 0.0
        for i in range(n):
            mu = out[i, j]
            lv = out[i, Z + j]
            acc += half * (mu * mu + (np.expm1(lv) - lv))
        kld[j] = acc / n


@njit(cache=True, error_model="numpy")
def elbo_objective_(ll, kld, n, L, beta, free_bits, kl_active, dkl):
    """loss = -1/(nL) sum ll + beta sum_j max(free_bits, kld_j); dkl_j = beta/n 1[active].   §5.1, §5.3

    ``kl_active`` (Z,) overrides the test kld_j > free_bits when it is not empty: a data-parallel
    rank passes the decision made on the whole minibatch's KL, and is charged kld_j (active) or
    free_bits (inactive), so that the ranks' weighted mean is the single-process objective."""
    s = 0.0
    for r in range(ll.shape[0]):
        s += ll[r]
    charged = 0.0
    Z = kld.shape[0]
    given = kl_active.shape[0] > 0
    for j in range(Z):
        if free_bits > 0:
            on = kl_active[j] > 0 if given else kld[j] > free_bits
            charged += kld[j] if on else free_bits
            dkl[j] = beta / n if on else 0.0
        else:
            charged += kld[j]
            dkl[j] = beta / n
    return -s / (n * L) + beta * charged


@njit(cache=True, error_model="numpy")
def iwae_logw_(ll, out, eps, z, beta, logw):
    """log w_li = ll_li + beta (log p(z_li) - log q(z_li|x_i)), in eps form.   (k*n,) float64   §5.2"""
    k, n, Z = eps.shape
    for l in range(k):
        for i in range(n):
            r = l * n + i
            lp = 0.0
            lq = 0.0
            for j in range(Z):
                zz = z[r, j]
                e = eps[l, i, j]
                lp += zz * zz + LOG_2PI
                lq += e * e + (LOG_2PI + out[i, Z + j])
            logw[r] = ll[r] + beta * (-0.5 * lp + 0.5 * lq)


@njit(cache=True, error_model="numpy")
def iwae_objective_(logw, k, n, bound, dlogw, lfloor):
    """bound_i = logsumexp_l log w_li - log k; loss = -mean bound; dlogw = -softmax_l / n.   §5.2
    A sample whose log-weight is more than -lfloor below its example's best gets dlogw = 0 (lfloor =
    ``weight_floor``: 2 log eps of the pass's dtype): its share of the gradient is below eps^2 of the best
    sample's, under the sum's rounding, and its gradient rows would otherwise be subnormal numbers, which
    Intel cores multiply at a fraction of their speed (§5.2; benchmarks/README.md, "Subnormal weights").
    lfloor = -inf keeps every weight."""
    loss = 0.0
    for i in range(n):
        m = -np.inf
        for l in range(k):
            m = max(m, logw[l * n + i])
        if not np.isfinite(m):
            m = 0.0
        s = 0.0
        for l in range(k):
            s += np.exp(logw[l * n + i] - m)
        lse = m + np.log(s)
        bound[i] = lse - np.log(k)
        loss -= bound[i]
        for l in range(k):
            r = l * n + i
            dlogw[r] = 0.0 if logw[r] - m < lfloor else -np.exp(logw[r] - lse) / n
    return loss / n


@njit(cache=True, error_model="numpy")
def weight_floor(a):
    """iwae_objective_'s lfloor for a pass in a's dtype: 2 log eps (float32 -31.9, float64 -72.1)."""
    return 2.0 * np.log(np.finfo(a.dtype).eps)


@njit(cache=True, error_model="numpy")
def posterior_bwd_(dz, eps, z, std, out, dout, dkl, dlogw, beta, iwae):
    """dmu = sum_l dz + dmu_KL;  dlogvar = 1/2 sigma sum_l dz eps + dlogvar_KL   (ELBO), or with the
    IWAE terms dz += beta dlogw (-z) and dlogvar += beta/2 sum_l dlogw.   dout = [dmu | dlogvar]
    (n, 2Z).   §3.1, §3.2, §6 steps 4-6"""
    L, n, Z = eps.shape
    dt = dz.dtype.type
    half = dt(0.5)
    zero = dt(0)
    for i in range(n):
        wsum = zero
        if iwae:
            for l in range(L):
                wsum += dt(beta * dlogw[l * n + i])
        for j in range(Z):
            smu = zero
            slv = zero
            for l in range(L):
                r = l * n + i
                g = dz[r, j]
                if iwae:
                    g = g + dt(beta * dlogw[r]) * -z[r, j]
                smu += g
                slv += g * eps[l, i, j]
            dmu = smu
            dlv = half * std[i, j] * slv
            if iwae:
                dlv = dlv + half * wsum
            else:
                w = dt(dkl[j])
                dmu = dmu + w * out[i, j]
                dlv = dlv + w * half * np.expm1(out[i, Z + j])
            dout[i, j] = dmu
            dout[i, Z + j] = dlv


# ----------------------------------------------------------------------------------------------
# The whole pass                                                                          §6
# ----------------------------------------------------------------------------------------------

@njit(cache=True, error_model="numpy")
def _view(flat, off, rows, cols):
    return flat[off:off + rows * cols].reshape((rows, cols))


@njit(cache=True, error_model="numpy")
def _buf(ws, bo, k):
    return _view(ws, bo[k, 0], bo[k, 1], bo[k, 2])


@njit(cache=True, error_model="numpy")
def mlp_fwd_(params, lay, t0, t1, inp, ws, bo, act, gemm, p1, mb, nb):
    """Layers t0..t1 of the layout; every layer but the last gets the activation. Layer t writes
    buffer t: a = h W + b, then bias + activation in place.   §2.3"""
    h = inp
    for t in range(t0, t1 + 1):
        W = _view(params, lay[t, 0], lay[t, 2], lay[t, 3])
        b = params[lay[t, 1]:lay[t, 1] + lay[t, 3]]
        a = _buf(ws, bo, t)
        mm_nn(h, W, a, gemm, p1, mb, nb)
        bias_act_(a, b, act if t < t1 else 0)
        h = a


@njit(cache=True, error_model="numpy")
def mlp_bwd_(params, grad, lay, t0, t1, first_in, dlast, dfirst, ws, bo, nl, act, gemm, p1, mb, nb,
             want_dx, wt):
    """Back through layers t1..t0: layer t1 is a head (no activation) whose upstream gradient is
    ``dlast``; hidden layer t has dh in buffer nl + t. dW, db are written into ``grad``'s views;
    dx of layer t0 goes to ``dfirst`` when ``want_dx``. ``wt``: W^T packed beforehand where the
    table's column 4 says so (``mm_nt_layer``), or empty: every product packs its own.
    §2.1, §2.3, §6 steps 3-4, 7-8"""
    g = dlast
    for t in range(t1, t0 - 1, -1):
        W = _view(params, lay[t, 0], lay[t, 2], lay[t, 3])
        dW = _view(grad, lay[t, 0], lay[t, 2], lay[t, 3])
        db = grad[lay[t, 1]:lay[t, 1] + lay[t, 3]]
        act_back_colsum_(g, _buf(ws, bo, t), db, act if t < t1 else 0)
        hin = first_in if t == t0 else _buf(ws, bo, t - 1)
        mm_tn(hin, g, dW, gemm, p1, mb, nb)
        if t > t0:
            dh = _buf(ws, bo, nl + t - 1)
            mm_nt_layer(g, W, dh, gemm, p1, mb, nb, lay, t, wt)
            g = dh
        elif want_dx:
            mm_nt_layer(g, W, dfirst, gemm, p1, mb, nb, lay, t, wt)


@njit(cache=True, error_model="numpy")
def forward_(params, x, eps, ws, bo, slots, ws64, lay, ne, act, lik, var_floor, cb_switch, gemm, mb, nb,
             scale, want_score):
    """F1-F6 of §6: encoder, reparameterization, decoder, likelihood. Leaves ll in ws64[:R] and, when
    ``want_score``, scale * score in the head buffer. ``slots``: the named buffers' rows (PassSlots)."""
    z_, dz_, std_, pack_, lp_ = slots
    nl = lay.shape[0]
    L, n, Z = eps.shape
    p1 = _buf(ws, bo, pack_)[0]
    mlp_fwd_(params, lay, 0, ne, x, ws, bo, act, gemm, p1, mb, nb)               # F1-F2
    out = _buf(ws, bo, ne)                                                        # (n, 2Z)
    std = _buf(ws, bo, std_)                                                 # (n, Z)
    z = _buf(ws, bo, z_)                                                     # (R, Z)
    reparam_fwd_(out, eps, std, z)                                                # F3
    mlp_fwd_(params, lay, ne + 1, nl - 1, z, ws, bo, act, gemm, p1, mb, nb)      # F4-F5
    head = _buf(ws, bo, nl - 1)                                                   # (R, K)
    lp = _buf(ws, bo, lp_)                                                   # (1, D)
    likelihood_(x, head, ws64[:L * n], lp, lik, var_floor, cb_switch, scale, want_score)  # F6


@njit(cache=True, error_model="numpy")
def loss_and_grad_(params, grad, x, eps, ws, bo, slots, ws64, lay, ne, act, lik, var_floor, cb_switch,
                   objective, beta, free_bits, kl_active, gemm_tiles):
    """The whole §6 pass into ``grad``; returns the loss. objective 0 ELBO, 1 IWAE.
    ``gemm_tiles`` = (gemm, mb, nb) travel as one tuple: numba's dispatcher leaks ~200 bytes a call
    for functions of 20 or more arguments (measured with numba 0.68)."""
    gemm, mb, nb = gemm_tiles
    z_, dz_, std_, pack_, lp_ = slots                # the named buffers' rows (PassSlots)
    nl = lay.shape[0]
    L, n, Z = eps.shape
    R = L * n
    ll = ws64[:R]
    aux = ws64[R:2 * R]                  # IWAE: log w, then dlogw
    bound = ws64[2 * R:2 * R + n]
    kld = ws64[2 * R + n:2 * R + n + Z]
    dkl = ws64[2 * R + n + Z:2 * R + n + 2 * Z]
    iwae = objective == 1
    scale = 1.0 if iwae else -1.0 / (n * L)          # ELBO: dll = -1/(nL) is known before ll
    forward_(params, x, eps, ws, bo, slots, ws64, lay, ne, act, lik, var_floor, cb_switch, gemm, mb, nb,
             scale, True)
    out = _buf(ws, bo, ne)
    z = _buf(ws, bo, z_)
    head = _buf(ws, bo, nl - 1)
    if iwae:                                                                     # step 1
        iwae_logw_(ll, out, eps, z, beta, aux)
        loss = iwae_objective_(aux, L, n, bound, aux, weight_floor(head))
        scale_rows_(head, aux)                                                   # step 2, 2nd pass
    else:
        kl_dim_(out, Z, kld)
        loss = elbo_objective_(ll, kld, n, L, beta, free_bits, kl_active, dkl)
    p1 = _buf(ws, bo, pack_)[0]
    dz = _buf(ws, bo, dz_)
    mlp_bwd_(params, grad, lay, ne + 1, nl - 1, z, head, dz, ws, bo, nl, act, gemm, p1, mb, nb,
             True, p1[:0])                                                       # steps 3-4
    dout = _buf(ws, bo, nl + ne)
    posterior_bwd_(dz, eps, z, _buf(ws, bo, std_), out, dout, dkl, aux, beta, iwae)   # 5-6
    mlp_bwd_(params, grad, lay, 0, ne, x, dout, dz, ws, bo, nl, act, gemm, p1, mb, nb,
             False, p1[:0])                                                      # steps 7-8
    return loss


@njit(cache=True, error_model="numpy")
def bound_(params, x, eps, ws, bo, slots, ws64, lay, ne, act, lik, var_floor, cb_switch, objective, beta,
           gemm, mb, nb, res):
    """Per-example bound into res (n,): ELBO (mean_l ll - beta sum_j KL) or IWAE.   §5.1, §5.2"""
    nl = lay.shape[0]
    z_ = slots[0]                                    # PassSlots.z
    L, n, Z = eps.shape
    R = L * n
    ll = ws64[:R]
    forward_(params, x, eps, ws, bo, slots, ws64, lay, ne, act, lik, var_floor, cb_switch, gemm, mb, nb,
             1.0, False)
    out = _buf(ws, bo, ne)
    if objective == 1:
        aux = ws64[R:2 * R]
        iwae_logw_(ll, out, eps, _buf(ws, bo, z_), beta, aux)
        iwae_objective_(aux, L, n, res, aux, -np.inf)
    else:
        half = out.dtype.type(0.5)
        for i in range(n):
            s = 0.0
            for l in range(L):
                s += ll[l * n + i]
            k = 0.0
            for j in range(Z):
                mu = out[i, j]
                lv = out[i, Z + j]
                k += half * (mu * mu + (np.expm1(lv) - lv))
            res[i] = s / L - beta * k


# ----------------------------------------------------------------------------------------------
# One-pass optimizers (same signatures as minivae.optim's references)                      §8
# ----------------------------------------------------------------------------------------------
# nogil: the threads of a split step update their segments of the parameters at the same time
# (kernels/batchsplit.py, ExampleSplit.reduce_in).

@njit(cache=True, nogil=True, error_model="numpy")
def sgd_update(params, grad, buf, t, lr, momentum, weight_decay):
    """torch.optim.SGD (dampening 0): g = grad + wd p; buf = g or momentum buf + g; p -= lr buf."""
    dt = params.dtype.type
    wd = dt(weight_decay)
    mom = dt(momentum)
    step = dt(lr)
    for q in range(params.shape[0]):
        g = grad[q] + wd * params[q] if weight_decay != 0 else grad[q]
        if momentum != 0:
            g = g if t == 1 else mom * buf[q] + g
            buf[q] = g
        params[q] -= step * g


@njit(cache=True, nogil=True, error_model="numpy")
def adagrad_update(params, grad, sum_sq, lr, eps, weight_decay):
    """torch.optim.Adagrad: s += g^2; p -= lr g / (sqrt(s) + eps)."""
    dt = params.dtype.type
    wd = dt(weight_decay)
    step = dt(lr)
    e = dt(eps)
    for q in range(params.shape[0]):
        g = grad[q] + wd * params[q] if weight_decay != 0 else grad[q]
        s = sum_sq[q] + g * g
        sum_sq[q] = s
        params[q] -= step * g / (np.sqrt(s) + e)


@njit(cache=True, nogil=True, error_model="numpy")
def adam_update(params, grad, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.Adam: m, v moving averages; p -= lr/(1-b1^t) m / (sqrt(v)/sqrt(1-b2^t) + eps),
    computed as p -= (lr sqrt(1-b2^t)/(1-b1^t)) m / (sqrt(v) + eps sqrt(1-b2^t)): the same number
    up to rounding with one division per element instead of two (the divisions bound this pass:
    250 -> 183 us over 652,824 float32 parameters, benchmarks/README.md)."""
    dt = params.dtype.type
    wd = dt(weight_decay)
    b1 = dt(beta1)
    b2 = dt(beta2)
    c1 = dt(1 - beta1)
    c2 = dt(1 - beta2)
    sbc2 = math.sqrt(1 - beta2 ** t)
    step = dt(lr / (1 - beta1 ** t) * sbc2)
    e = dt(eps * sbc2)
    for q in range(params.shape[0]):
        g = grad[q] + wd * params[q] if weight_decay != 0 else grad[q]
        mq = b1 * m[q] + c1 * g
        vq = b2 * v[q] + c2 * (g * g)
        m[q] = mq
        v[q] = vq
        params[q] -= step * mq / (np.sqrt(vq) + e)


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------

def layer_table(layout) -> np.ndarray:
    """(W offset, b offset, fan_in, fan_out) of every layer in layout order, the int64 table the kernels
    read the flat parameter vector with.   (layers, 4)   §1"""
    return np.array([[layout.slots[p + ".W"].offset, layout.slots[p + ".b"].offset, i, o]
                     for p, i, o in layout.layers], dtype=np.int64)


def gemm_settings(in_part=False):
    """(GEMM code, MB, NB) as kernels/config says at call time (never baked into a kernel), for a whole
    pass or (``in_part``) for one part of an example split (kernels/batchsplit.py)."""
    mb, nb = config.tiles(in_part)
    return config.gemm_code(in_part), mb, nb


def cached_workspace(cache, key, most, make):
    """The workspace of ``key`` from the OrderedDict ``cache``: made by ``make()`` on first use, then
    reused; beyond ``most`` entries the least recently used is dropped (every fast backend's buffers)."""
    ws = cache.get(key)
    if ws is None:
        ws = cache[key] = make()
        if len(cache) > most:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return ws


class BufferTable:
    """Named 2-D buffers in one flat array of one dtype: the workspace of a fused pass.

    ``entries``: (name, (rows, cols)) in order. Row k of the int64 table ``bo`` (offset, rows, cols) is
    entry k, which a kernel reads with ``_buf(ws, bo, k)``; ``index[name]`` = k; ``view(name)`` gives the
    array; ``slots_of(Cls)`` the indexes of a namedtuple class's fields, for the kernels to name buffers by
    (unpacked in the kernel as ``z_, dz_, ... = slots``, rather than row numbers)."""

    def __init__(self, entries, dtype):
        self.index = {name: k for k, (name, _) in enumerate(entries)}
        assert len(self.index) == len(entries), "buffer names must be unique"
        self.bo = np.zeros((len(entries), 3), dtype=np.int64)
        off = 0
        for k, (_, (r, c)) in enumerate(entries):
            self.bo[k] = off, r, c
            off += r * c
        self.ws = np.zeros(off, dtype=dtype)

    def view(self, name):
        """The buffer ``name`` as a (rows, cols) view of ``ws``."""
        o, r, c = self.bo[self.index[name]]
        return self.ws[o:o + r * c].reshape(r, c)

    def slots_of(self, cls):
        return cls(*(self.index[f] for f in cls._fields))


def layer_entries(layout, rows):
    """The layer buffers every pass starts with: entry t (t < nl) is layout layer t's output, named as the
    layer, (rows[t], fan_out); entry nl + t its gradient "d:<name>" (dh of a hidden layer, d[mu | logvar]
    of a head), except the last layer's, (0, K): its score is written in place of its output."""
    names = [p for p, _, _ in layout.layers]
    outs = [(r, o) for r, (_, _, o) in zip(rows, layout.layers)]
    grads = outs[:-1] + [(0, outs[-1][1])]
    return list(zip(names, outs)) + [("d:" + p, g) for p, g in zip(names, grads)]


def pack_entry(layout, rows, dtype):
    """("pack", (1, size)): the custom GEMM's panel buffer, the most any product of the pass needs
    (h W, g W^T and h^T g of every layer; kernels/gemm.pack_size)."""
    return ("pack", (1, max(max(pack_size("nn", o, i, dtype), pack_size("nt", i, o, dtype),
                                pack_size("tn", o, r, dtype)) for r, (_, i, o) in zip(rows, layout.layers))))


# The one-layer pass's named buffers beyond the layers' (their rows in ``bo``), as the kernels see them.
PassSlots = namedtuple("PassSlots", "z dz std pack lp")


class Workspace(BufferTable):
    """Every buffer of one (n, L) pass of the one-layer model in one flat array of the model dtype
    (+ a small float64 one). Named entries (BufferTable):
        <layer> / d:<layer>   the layers' outputs and gradients (layer_entries): enc rows n, dec rows R = L n
        z, dz                 the sample and its gradient (R, Z);   std: exp(logvar/2) (n, Z)
        pack                  the custom GEMM's panel buffer (1, size)
        lp                    one row's per-pixel log-probabilities (1, D), summed into ll
    ws64: ll (R) | log w / dlogw (R) | bound (n) | kl per dim (Z) | dkl (Z).
    """

    def __init__(self, layout, ne, n, L, z_dim, dtype):
        R = L * n
        rows = [n if t <= ne else R for t in range(len(layout.layers))]
        super().__init__(layer_entries(layout, rows) + [
            ("z", (R, z_dim)), ("dz", (R, z_dim)), ("std", (n, z_dim)), pack_entry(layout, rows, dtype),
            ("lp", (1, layout.layers[0][1]))], dtype)
        self.slots = tuple(self.slots_of(PassSlots))    # a plain tuple: numba's dispatcher leaks on namedtuples
        self.ws64 = np.zeros(2 * R + n + 2 * z_dim, dtype=np.float64)


class NumbaBackend:
    """Same interface and numbers as NumpyBackend (§6), computed by the fused kernels above."""
    name = "numba"
    estimators = ("reparam", "dreg")     # dreg: through cpu_stack.stack_step_ with S = 1 (_dreg)
    update_kernels = {"sgd": sgd_update, "adagrad": adagrad_update, "adam": adam_update}
    max_workspaces = 4       # (n, L) shapes kept; evaluation's last short batch adds one more

    def __init__(self, spec, dtype):
        require_one_stochastic_layer("numba", spec)
        self.spec = spec
        self.layout = spec.layout
        self.dtype = np.dtype(dtype)
        self.ne = len(spec.hidden)
        self.lay = layer_table(self.layout)
        self.act = ACT_CODES[spec.activation]
        self.lik = LIK_CODES[spec.likelihood]
        self.cb_switch = float(_CB_TAYLOR.get(self.dtype, 1e-2))
        self._ws = OrderedDict()
        self._stack = None       # cpu_stack.NumbaStackBackend for S = 1: DReG's pass, built on first use

    def workspace(self, n, L) -> Workspace:
        """The buffers of an (n, L) pass, allocated on first use and then reused."""
        return cached_workspace(self._ws, (n, L), self.max_workspaces,
                                lambda: Workspace(self.layout, self.ne, n, L, self.spec.z_dim, self.dtype))

    _gemm = staticmethod(gemm_settings)

    def _check(self, params, x, eps=None):
        if params.dtype != self.dtype or x.dtype != self.dtype:
            raise ValueError(f"params and x must be {self.dtype}, got {params.dtype} and {x.dtype}")
        if not (x.flags.c_contiguous and (eps is None or eps.flags.c_contiguous)):
            raise ValueError("x and eps must be C-contiguous arrays")

    # -- pieces --------------------------------------------------------------------------------
    def encode(self, params, x):
        """x: (n, D) -> mu, logvar: (n, Z)."""
        self._check(params, x)
        gemm, mb, nb = self._gemm()
        ws = self.workspace(x.shape[0], 1)
        mlp_fwd_(params, self.lay, 0, self.ne, x, ws.ws, ws.bo, self.act, gemm, ws.view("pack")[0], mb, nb)
        out = ws.view("enc.head")
        Z = self.spec.z_dim
        return out[:, :Z].copy(), out[:, Z:].copy()

    def decode(self, params, z):
        """z: (m, Z) -> head: (m, K)."""
        z = np.ascontiguousarray(z, dtype=self.dtype)
        gemm, mb, nb = self._gemm()
        ws = self.workspace(z.shape[0], 1)
        nl = len(self.lay)
        mlp_fwd_(params, self.lay, self.ne + 1, nl - 1, z, ws.ws, ws.bo, self.act, gemm, ws.view("pack")[0], mb, nb)
        return ws.view("dec.head").copy()

    # -- the whole pass -------------------------------------------------------------------------
    def bound(self, params, x, eps, objective="elbo", beta=1.0):
        """Per-example bound (n,): the ELBO with analytic KL, or the IWAE bound."""
        self._check(params, x, eps)
        L, n, _ = eps.shape
        gemm, mb, nb = self._gemm()
        ws = self.workspace(n, L)
        res = np.empty(n, dtype=self.dtype)
        bound_(params, x, eps, ws.ws, ws.bo, ws.slots, ws.ws64, self.lay, self.ne, self.act, self.lik,
               self.spec.var_floor, self.cb_switch, OBJECTIVES.index(objective), float(beta),
               gemm, mb, nb, res)
        return res

    def loss_and_grad(self, params, x, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=None,
                      kl_active=None, estimator="reparam"):
        """Batch mean of the negative bound and its gradient in the flat layout.   §6
        ``kl_active``: see objectives.elbo_loss (free bits decided on a larger batch).
        ``estimator="dreg"`` (IWAE, §12): the stack's fused pass, cpu_stack.stack_step_, for S = 1."""
        require_estimator(self, estimator)
        self._check(params, x, eps)
        if estimator == "dreg":
            return self._dreg(params, x, eps, beta, objective, grad)
        active = _NO_MASK if kl_active is None else np.ascontiguousarray(kl_active, dtype=np.float64)
        L, n, _ = eps.shape
        gemm, mb, nb = self._gemm()
        ws = self.workspace(n, L)
        if grad is None:
            grad = np.empty(self.layout.size, dtype=self.dtype)
        loss = loss_and_grad_(params, grad, x, eps, ws.ws, ws.bo, ws.slots, ws.ws64, self.lay, self.ne,
                              self.act, self.lik, self.spec.var_floor, self.cb_switch,
                              OBJECTIVES.index(objective), float(beta), float(free_bits), active,
                              (gemm, mb, nb))
        return float(loss), grad

    def _dreg(self, params, x, eps, beta, objective, grad):
        """DReG (§12) through kernels/cpu_stack.py's pass with S = 1 (eps as a tuple of one array):
        the fused one-layer pass above implements the reparameterized gradient only."""
        if objective != "iwae":
            raise ValueError("estimator 'dreg' applies to the iwae objective only")
        if self._stack is None:
            from .cpu_stack import NumbaStackBackend
            self._stack = NumbaStackBackend(self.spec, self.dtype)
        return self._stack.loss_and_grad(params, x, (eps,), beta=beta, objective=objective, grad=grad,
                                         estimator="dreg")
