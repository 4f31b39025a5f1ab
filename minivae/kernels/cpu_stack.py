"""The numba backend for stacks of S > 1 stochastic layers (docs/math.md §11, §12): one fused pass.

The whole training step (forward and backward over every layer, every objective and estimator) is one
@njit function, ``stack_step_``, over named, preallocated workspace buffers (``StackWorkspace``, one per
(n, L) shape), with the layout passed as arrays (``lay``: one row per linear layer; ``blk``: the layer
range of every MLP block), as ``cpu.loss_and_grad_`` does for S = 1. It composes four stages:

    block       cpu.mlp_fwd_ / cpu.mlp_bwd_ (BLAS or the custom GEMM through cpu.mm_*), and
                mlp_bwd_dx_ (the input gradient alone, DReG's stopped log q)                    §2
    gaussian    gauss_fwd_ / posterior_bwd_ (reparameterization, log q in eps or, under DReG,
                log N(z; mu, logvar) with mu, logvar stopped, the top KL), gauss_logpdf_add_ /
                gauss_logpdf_bwd_ (log p(z_{l-1}|z_l)), prior_add_ / prior_bwd_ (log p(z_S))     §3, §11.1
    likelihood  cpu.likelihood_ (log p(x|z_1) and the head's score in one pass)                  §4
    objective   cpu.iwae_objective_ (softmax weights), the ELBO mean, DReG's weights            §5, §11.2, §12

Every kernel names its NumPy oracle (tests/test_numba_stack.py checks each against it, float64 and
float32). The oracle of the whole pass is ``NumpyBackend`` (tests/test_stack.py, tests/test_numba_stack.py).

DReG (§12) without a second generative pass: the generative part of d loss / d z_l (likelihood, the
blocks dec{l}, log p terms) is, row by row, linear in the row's upstream d log w, so DReG's is IWAE's
times (1 - beta) + beta w~ (the ratio of dreg_weights to IWAE's -w~/n); the inference blocks then run
once with DReG's weights and log q stopped.

Shape legend: n examples, L samples (k for IWAE), R = L n rows (row r = l n + i), Z_l = z_dims[l-1];
layers are l = 1..S, Python indexes them s = l - 1.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from numba import njit, types
from numba.extending import overload

from .cpu import (ACT_CODES, LIK_CODES, LOG_2PI, BufferTable, _buf, act_back_colsum_, adagrad_update, adam_update,
                  cached_workspace, exp_nonpos_f32, gemm_settings, iwae_objective_, layer_entries, layer_table,
                  likelihood_, mlp_bwd_, mlp_fwd_, mm_nt_layer, mm_tn, pack_entry, row_sum_f64_, scale_rows_,
                  sgd_update, weight_floor)
from . import config, spin
from .batchsplit import ExampleSplit, part_bounds
from .gemm import NV, VBYTES, pack_bt_panels_, pack_size
from .numpy_ import NumpyBackend
from ..distributions import _CB_TAYLOR
from ..objectives import OBJECTIVES
from .numba_cache import configure as _configure_cache

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)

# ----------------------------------------------------------------------------------------------
# The Gaussian stage                                                                  §3, §11.1
# ----------------------------------------------------------------------------------------------


@njit(cache=True, error_model="numpy", inline="always")
def exp_f32(x):
    """e^x for float32 in plain arithmetic, so that the loops calling it vectorize: cpu.exp_nonpos_f32
    on min(x, 88) (its reduction works for 2^n up to 2^127; e^88 < float32's max, and only a value that
    overflows float32 anyway is changed)."""
    return exp_nonpos_f32(min(x, np.float32(88.0)))


def exp_(x):
    """e^x: the vectorizable float32 version, libm's exp in float64 (the tests ask 1e-12 there)."""
    return np.exp(x)


@overload(exp_)
def _ov_exp(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: np.exp(x)


@njit(cache=True, error_model="numpy")
def gauss_fwd_(out, eps, std, z, shared):
    """std = exp(logvar/2), z = mu + std eps.   out: (m, 2Z) = [mu | logvar], m = n when ``shared``
    (layer 1: one mu per example for every sample) else R;  eps: (L, n, Z);  std: (m, Z);  z: (R, Z).
    Oracle: distributions.reparam_forward.   §3.1, §11.1"""
    L, n, Z = eps.shape
    half = out.dtype.type(0.5)
    for m in range(out.shape[0]):
        for j in range(Z):
            std[m, j] = exp_(half * out[m, Z + j])
    for r in range(L * n):
        l = r // n
        i = r - l * n
        m = i if shared else r
        for j in range(Z):
            z[r, j] = out[m, j] + std[m, j] * eps[l, i, j]


@njit(cache=True, error_model="numpy")
def gauss_logpdf_add_(z, pm, acc, w, u, tt):
    """acc[r] += w log N(z_r; m_r, s_r) = w (-1/2 sum_j ((z - m)^2 e^-s + s + log 2pi)); keeps
    u = (z - m) e^-s for the backward pass.   z, u, tt (scratch): (R, Z);  pm: (R, 2Z) = [m | s];
    acc: (R,) float64 (each row summed in float64).   Oracle: distributions.gauss_logpdf.  §11.1"""
    R, Z = z.shape
    for r in range(R):           # row views and one output per loop: few enough pointers that LLVM's alias
        zr, mr, sr, ur, tr = z[r], pm[r, :Z], pm[r, Z:], u[r], tt[r]     # checks let both loops vectorize
        for j in range(Z):       # (1.11 -> 0.65-0.88 ns an element alone, float32, benchmarks/README.md)
            ur[j] = (zr[j] - mr[j]) * exp_(-sr[j])
        for j in range(Z):
            tr[j] = (zr[j] - mr[j]) * ur[j] + sr[j]
        acc[r] += w * (-0.5 * (row_sum_f64_(tt, r) + Z * LOG_2PI))


@njit(cache=True, error_model="numpy")
def gauss_logpdf_bwd_(a, z, pm, u, dz, dpm):
    """With u = (z - m) e^-s (from gauss_logpdf_add_) and upstream a[r]:  dz += -a u;
    dpm = [a u | a ((z - m) u - 1)/2].   a: (R,) float64;  z, u, dz: (R, Z);  pm, dpm: (R, 2Z).
    Oracle: distributions.gauss_logpdf_backward.  §11.1"""
    R, Z = z.shape
    dt = z.dtype.type
    half = dt(0.5)
    one = dt(1)
    for r in range(R):           # two loops over row views, as in gauss_logpdf_add_ (0.93 -> 0.32-0.45 ns)
        g = dt(a[r])
        ur, dzr, dm, ds = u[r], dz[r], dpm[r, :Z], dpm[r, Z:]
        for j in range(Z):
            dzr[j] += -g * ur[j]
            dm[j] = g * ur[j]
        zr, mr = z[r], pm[r, :Z]
        for j in range(Z):
            ds[j] = half * g * ((zr[j] - mr[j]) * ur[j] - one)


@njit(cache=True, error_model="numpy")
def prior_add_(z, acc, w):
    """acc[r] += w log N(z_r; 0, I) = w (-1/2 sum_j (z^2 + log 2pi)).   Oracle: distributions.log_prior.  §3.3"""
    R, Z = z.shape
    for r in range(R):
        t = 0.0
        for j in range(Z):
            t += z[r, j] * z[r, j]
        acc[r] += w * (-0.5 * (t + Z * LOG_2PI))


@njit(cache=True, error_model="numpy")
def prior_bwd_(a, z, dz):
    """dz += a[r] (-z).   Oracle: distributions.log_prior_backward.   §3.3"""
    R, Z = z.shape
    for r in range(R):
        g = z.dtype.type(a[r])
        for j in range(Z):
            dz[r, j] += -g * z[r, j]


@njit(cache=True, error_model="numpy")
def logq_eps_add_(eps, out, shared, acc, w):
    """acc[r] += w log q(z_r) in eps form = w (-1/2 (sum_j eps^2 + sum_j (log 2pi + logvar))).
    out: (m, 2Z) as in gauss_fwd_.   Oracle: distributions.log_posterior_eps.   §3.3"""
    L, n, Z = eps.shape
    for r in range(L * n):
        l = r // n
        i = r - l * n
        m = i if shared else r
        t = 0.0
        for j in range(Z):
            e = eps[l, i, j]
            t += e * e + out[m, Z + j]
        acc[r] += w * (-0.5 * (t + Z * LOG_2PI))


@njit(cache=True, error_model="numpy")
def kl_add_(out, acc, w):
    """acc[r] += w sum_j KL_mj, KL = 1/2 (mu^2 + expm1(logvar) - logvar), from row m = r mod m_out of
    out: (m_out, 2Z), acc: (R,): m_out = R for a top layer S > 1 (one posterior per sample), n for
    S = 1 (one per example, shared by the L samples of rows r = l n + i).
    Oracle: distributions.kl_forward (summed over Z).   §3.2, §11.2"""
    M = out.shape[0]
    Z = out.shape[1] // 2
    half = out.dtype.type(0.5)
    for r in range(acc.shape[0]):
        m = r % M
        t = 0.0
        for j in range(Z):
            mu = out[m, j]
            lv = out[m, Z + j]
            t += half * (mu * mu + (np.expm1(lv) - lv))
        acc[r] += w * t


@njit(cache=True, error_model="numpy")
def posterior_bwd_(dz, eps, z, std, out, dout, sq, aq, qs, ckl, stopped, shared):
    """Layer l's B5-B6 (§6, §11.3): from dz (R, Z) to dout = [dmu | dlogvar] (m, 2Z), m as in gauss_fwd_.

    Per row r with a = qs aq[r], the upstream of log q(z_l|z_{l-1}):
      not stopped: log q in eps (§3.3): dlogvar += -a/2;
      stopped (DReG, §12): log N(z; mu, logvar) with mu, logvar stopped: dz += -a u (u = (z - mu) e^-logvar),
        and sq = dout + [a u | a ((z - mu) u - 1)/2] (the input-only upstream; not formed when shared);
    reparameterization (§3.1): dmu = dz, dlogvar = 1/2 std dz eps, summed over samples when shared;
    the top layer's analytic KL with weight ckl (§3.2, per row r; when shared, S = 1, each example's
    L rows add up to L ckl): dmu += ckl mu, dlogvar += ckl expm1(logvar)/2.
    Oracles: distributions.reparam_backward, log_posterior_eps_backward, gauss_logpdf_backward, kl_backward.
    """
    L, n, Z = eps.shape
    dt = dz.dtype.type
    half = dt(0.5)
    one = dt(1)
    c = dt(ckl)
    if shared:
        for i in range(out.shape[0]):
            for j in range(2 * Z):
                dout[i, j] = dt(0)
    for r in range(L * n):
        l = r // n
        i = r - l * n
        m = i if shared else r
        a = dt(qs * aq[r])
        for j in range(Z):
            mu = out[m, j]
            lv = out[m, Z + j]
            g = dz[r, j]
            qm = dt(0)
            qv = dt(0)
            if stopped:
                d = z[r, j] - mu
                u = d * exp_(-lv)
                g = g - a * u
                qm = a * u
                qv = half * a * (d * u - one)
            dmu = g
            dlv = half * std[m, j] * (g * eps[l, i, j])
            if not stopped:
                dlv = dlv - half * a
            if ckl != 0.0:
                dmu = dmu + c * mu
                dlv = dlv + c * half * np.expm1(lv)
            if shared:
                dout[m, j] += dmu
                dout[m, Z + j] += dlv
            else:
                dout[r, j] = dmu
                dout[r, Z + j] = dlv
                if stopped:
                    sq[r, j] = dmu + qm
                    sq[r, Z + j] = dlv + qv


@njit(cache=True, error_model="numpy")
def mlp_bwd_dx_(params, lay, t0, t1, dlast, dfirst, ws, bo, nl, act, gemm, p1, mb, nb, dbs, wt):
    """The input gradient alone of layers t1..t0 (the head t1 has upstream ``dlast``): like
    cpu.mlp_bwd_ without dW and with db summed into the scratch ``dbs``; dx into ``dfirst``
    (``wt``: as cpu.mlp_bwd_'s).
    Oracle: layers.mlp_backward's dx (through NumpyBackend._block_backward).   §2.3, §12"""
    g = dlast
    for t in range(t1, t0 - 1, -1):
        W = params[lay[t, 0]:lay[t, 0] + lay[t, 2] * lay[t, 3]].reshape((lay[t, 2], lay[t, 3]))
        if t < t1:
            act_back_colsum_(g, _buf(ws, bo, t), dbs[:lay[t, 3]], act)
        if t > t0:
            dh = _buf(ws, bo, nl + t - 1)
            mm_nt_layer(g, W, dh, gemm, p1, mb, nb, lay, t, wt)
            g = dh
        else:
            mm_nt_layer(g, W, dfirst, gemm, p1, mb, nb, lay, t, wt)


@njit(cache=True, error_model="numpy")
def add_(a, b):
    """a += b.   (R, Z)"""
    for r in range(a.shape[0]):
        for j in range(a.shape[1]):
            a[r, j] += b[r, j]


@njit(cache=True, error_model="numpy")
def scale_rows_by_(a, f):
    """a[r, :] *= f[r] (f float64).   (R, Z)"""
    for r in range(a.shape[0]):
        s = a.dtype.type(f[r])
        for j in range(a.shape[1]):
            a[r, j] *= s


@njit(cache=True, error_model="numpy")
def dreg_factor_(dlogw, n, beta, fac, aq):
    """From IWAE's dlogw = -w~/n: DReG's weights (1-beta) dlogw - beta n dlogw^2 = -((1-beta) w~ + beta w~^2)/n,
    their ratio to IWAE's fac = (1 - beta) + beta w~, and aq = -beta x DReG's weights.
    Oracle: objectives.dreg_weights.   §12"""
    for r in range(dlogw.shape[0]):
        wt = -n * dlogw[r]
        fac[r] = (1.0 - beta) + beta * wt
        aq[r] = -beta * (-((1.0 - beta) * wt + beta * wt * wt) / n)


# ----------------------------------------------------------------------------------------------
# The whole pass                                                                   §6, §11.3, §12
# ----------------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, error_model="numpy")
def stack_step_(params, grad, x, eps, ws, bo, ws64, lay, blk, codes, reals, gemm_tiles, wt):
    """Forward (F1-F6, G of §11.3), the objective (B1) and, when want_grad, the backward (B2-B9) into
    ``grad``. Returns the loss; the per-example bound is left in ws64's ``bound``.

    eps: a tuple of S >= 1 arrays (L, n, Z_l) (S = 1: the numba one-layer backend's DReG, kernels/cpu.py).  codes = (act, lik, objective 0 ELBO / 1 IWAE, dreg, want_grad);
    reals = (beta, var_floor, cb_switch);  gemm_tiles = (gemm, mb, nb).
    lay: column 4 is the offset in ``wt`` of each layer's W^T packed beforehand (-1: none;
    ``pack_claimed_``, the parts of a split step); with ``wt`` empty every product packs its own into p1.
    bo rows (StackWorkspace): t < nl layer outputs, nl + t their gradients, then 6 per layer
    (z, dz, std, tmp, sq, u), then the custom GEMM's panel buffer p1 (pack), the pixel scratch lp and dbs.
    ws64: ll | log w | dlogw | ap | aq | fac (R each) | bound (n).
    """
    act, lik, objective, dreg, want_grad = codes
    beta, var_floor, cb_switch = reals
    gemm, mb, nb = gemm_tiles
    S = len(eps)
    nl = lay.shape[0]
    L, n, _ = eps[0].shape
    R = L * n
    G = 2 * nl
    E = G + 6 * S
    p1 = _buf(ws, bo, E)[0]                 # pack
    lp = _buf(ws, bo, E + 1)
    dbs = _buf(ws, bo, E + 2)[0]
    ll = ws64[:R]
    logw = ws64[R:2 * R]
    dlogw = ws64[2 * R:3 * R]
    ap = ws64[3 * R:4 * R]
    aq = ws64[4 * R:5 * R]
    fac = ws64[5 * R:6 * R]
    bound = ws64[6 * R:6 * R + n]
    iwae = objective == 1
    c = 1.0 / (n * L)

    # F1-F3 for l = 1..S: block enc{l} on z_{l-1} (x for l = 1), then the reparameterization
    for s in range(S):
        inp = x if s == 0 else _buf(ws, bo, G + 6 * (s - 1))
        mlp_fwd_(params, lay, blk[2 * s, 0], blk[2 * s, 1], inp, ws, bo, act, gemm, p1, mb, nb)
        gauss_fwd_(_buf(ws, bo, blk[2 * s, 1]), eps[s], _buf(ws, bo, G + 6 * s + 2),
                   _buf(ws, bo, G + 6 * s), s == 0)
    # G: block dec{l} on z_l gives [m | s] of p(z_{l-1}|z_l), l = 2..S
    for s in range(1, S):
        mlp_fwd_(params, lay, blk[2 * s + 1, 0], blk[2 * s + 1, 1], _buf(ws, bo, G + 6 * s), ws, bo, act,
                 gemm, p1, mb, nb)
    # F4-F6: block dec on z_1, the likelihood (ELBO: the score scaled by dll = -1/(nL) already)
    mlp_fwd_(params, lay, blk[1, 0], blk[1, 1], _buf(ws, bo, G), ws, bo, act, gemm, p1, mb, nb)
    head = _buf(ws, bo, blk[1, 1])
    likelihood_(x, head, ll, lp, lik, var_floor, cb_switch, 1.0 if iwae else -c, want_grad)

    # B1: log w (IWAE) or the ELBO's per-sample terms, in float64   §11.2
    for r in range(R):
        logw[r] = ll[r]
    for s in range(S - 1):
        gauss_logpdf_add_(_buf(ws, bo, G + 6 * s), _buf(ws, bo, blk[2 * s + 3, 1]), logw, beta,
                          _buf(ws, bo, G + 6 * s + 5), _buf(ws, bo, G + 6 * s + 3))
        logq_eps_add_(eps[s], _buf(ws, bo, blk[2 * s, 1]), s == 0, logw, -beta)
    top = _buf(ws, bo, blk[2 * S - 2, 1])
    if iwae:
        prior_add_(_buf(ws, bo, G + 6 * (S - 1)), logw, beta)
        logq_eps_add_(eps[S - 1], top, S == 1, logw, -beta)          # S = 1: the top is layer 1
        loss = iwae_objective_(logw, L, n, bound, dlogw, weight_floor(head))
    else:
        kl_add_(top, logw, -beta)
        loss = 0.0
        for i in range(n):
            t = 0.0
            for l in range(L):
                t += logw[l * n + i]
            bound[i] = t / L
            loss -= bound[i]
        loss /= n
    if not want_grad:
        return loss
    for r in range(R):
        ap[r] = beta * dlogw[r] if iwae else -beta * c
        aq[r] = -ap[r]
    if iwae:
        scale_rows_(head, dlogw)                                                 # B2: dll = dlogw

    # B3-B4: block dec, dz_1;  G': each p(z_{l-1}|z_l) and block dec{l}, in increasing l so that
    # every dz_l is written (by its block's input gradient) before it is added to;  the prior
    mlp_bwd_(params, grad, lay, blk[1, 0], blk[1, 1], _buf(ws, bo, G), head, _buf(ws, bo, G + 1), ws, bo,
             nl, act, gemm, p1, mb, nb, True, wt)
    for s in range(1, S):
        t1 = blk[2 * s + 1, 1]
        dpm = _buf(ws, bo, nl + t1)
        gauss_logpdf_bwd_(ap, _buf(ws, bo, G + 6 * (s - 1)), _buf(ws, bo, t1), _buf(ws, bo, G + 6 * (s - 1) + 5),
                          _buf(ws, bo, G + 6 * (s - 1) + 1), dpm)
        mlp_bwd_(params, grad, lay, blk[2 * s + 1, 0], t1, _buf(ws, bo, G + 6 * s), dpm,
                 _buf(ws, bo, G + 6 * s + 1), ws, bo, nl, act, gemm, p1, mb, nb, True, wt)
    if iwae:
        prior_bwd_(ap, _buf(ws, bo, G + 6 * (S - 1)), _buf(ws, bo, G + 6 * (S - 1) + 1))
    if dreg:                                                                     # §12
        dreg_factor_(dlogw, n, beta, fac, aq)
        for s in range(S):
            scale_rows_by_(_buf(ws, bo, G + 6 * s + 1), fac)

    # B5-B8, top down: the Gaussian stage, then block enc{l}, whose input gradient joins dz_{l-1}
    for s in range(S - 1, -1, -1):
        t0 = blk[2 * s, 0]
        t1 = blk[2 * s, 1]
        dout = _buf(ws, bo, nl + t1)
        sq = _buf(ws, bo, G + 6 * s + 4)
        top_kl = (not iwae) and s == S - 1
        posterior_bwd_(_buf(ws, bo, G + 6 * s + 1), eps[s], _buf(ws, bo, G + 6 * s), _buf(ws, bo, G + 6 * s + 2),
                       _buf(ws, bo, t1), dout, sq, aq, 0.0 if top_kl else 1.0, beta * c if top_kl else 0.0,
                       dreg == 1, s == 0)
        if s == 0:
            mlp_bwd_(params, grad, lay, t0, t1, x, dout, dout, ws, bo, nl, act, gemm, p1, mb, nb, False, wt)
        else:
            tmp = _buf(ws, bo, G + 6 * (s - 1) + 3)
            mlp_bwd_(params, grad, lay, t0, t1, _buf(ws, bo, G + 6 * (s - 1)), dout, tmp, ws, bo, nl, act,
                     gemm, p1, mb, nb, dreg == 0, wt)
            if dreg:                                                             # the input only
                mlp_bwd_dx_(params, lay, t0, t1, sq, tmp, ws, bo, nl, act, gemm, p1, mb, nb, dbs, wt)
            add_(_buf(ws, bo, G + 6 * (s - 1) + 1), tmp)
    return loss


@njit(cache=True, nogil=True, error_model="numpy")
def pack_claimed_(params, lay, wt, claim):
    """Pack every W^T that the 5-column table ``lay`` places in ``wt`` (column 4 >= 0), each as gemm_nt
    packs it for dh = g W^T, one panel at a time, claiming panels with an atomic add on claim[0] (0 at
    the start; the panels of all those layers numbered in order). Every thread of a split step calls it
    at once and packs what it claims until none is left, so the work goes to whoever is running: a
    helper thread that starts late (it is woken from its sleep, 50-120 us) packs less, and the parts
    then start together. Every part then reads the same packing (cpu.mm_nt_layer) instead of packing
    all of it again. Each caller ends with one claim beyond the last panel (claim[0] = panels + callers).
    Oracle: gemm.pack_bt_panels_ over each whole W (tests/test_numba_stack.py)."""
    nr = NV * VBYTES // wt.itemsize
    while True:
        c = spin.atomic_add(claim, 0, 1)                # this thread's next panel, counted over all layers
        for t in range(lay.shape[0]):
            if lay[t, 4] < 0:
                continue
            N = lay[t, 2]
            nnj = (N + nr - 1) // nr
            if c < nnj:
                K = lay[t, 3]
                W = params[lay[t, 0]:lay[t, 0] + N * K].reshape((N, K))
                pack_bt_panels_(W, wt[lay[t, 4]:], c, c + 1)
                break
            c -= nnj
        else:
            return                                      # past the last panel


def shared_pack_table(lay, skip, dtype):
    """(lay with a 5th column, size): the offset of each layer's W^T, packed for gemm_nt, in one
    buffer of ``size`` elements; -1 for the layers in ``skip`` (no product reads their W^T)."""
    offsets, at = [], 0
    for t, (_, _, fan_in, fan_out) in enumerate(lay):
        if t in skip:
            offsets.append(-1)
        else:
            offsets.append(at)
            at += pack_size("nt", int(fan_in), int(fan_out), dtype)
    return np.ascontiguousarray(np.column_stack([lay, offsets]), dtype=np.int64), at


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------

class StackWorkspace(BufferTable):
    """Every buffer of one (n, L) pass of a stack, named, in one flat array of the model dtype (+ float64).

    ``index[name]`` is the row of the table ``bo`` (offset, rows, cols) that ``stack_step_`` reads:
        <layer name>        t < nl: the output of layout layer t (rows n in block enc, R elsewhere)
        d:<layer name>      nl + t: its gradient (dh of a hidden layer; d[mu | logvar] of an enc head,
                            d[m | s] of a dec{l} head; none for the dec head, whose score is in place)
        z{l} dz{l} std{l} tmp{l} sq{l} u{l}   for l = 1..S: the sample (R, Z_l), its gradient, exp(logvar/2)
                            ((n, Z_1) for l = 1), the input gradient of enc{l+1} (and the forward's
                            scratch for log p(z_l|z_{l+1})), DReG's stopped upstream of enc{l} (R, 2Z_l),
                            and u = (z_l - m) e^-s of p(z_l|z_{l+1}) (l < S)
        pack                the custom GEMM's panel buffer (kernels/gemm.pack_size)
        lp                  one row's per-pixel log-probabilities (1, D), summed into ll
        dbs                 a scratch bias gradient (DReG's input-only pass)
    ws64 (float64, named in ``index64``): ll, logw, dlogw, ap, aq, fac (R each), bound (n).
    """

    def __init__(self, spec, n, L, dtype):
        layout = spec.layout
        R = L * n
        S = spec.n_stochastic
        rows = [n if p.split(".")[0] == "enc" else R for p, _, _ in layout.layers]
        entries = layer_entries(layout, rows)
        for l, Z in enumerate(spec.z_dims, start=1):
            entries += [(f"z{l}", (R, Z)), (f"dz{l}", (R, Z)), (f"std{l}", (n if l == 1 else R, Z)),
                        (f"tmp{l}", (R, Z)), (f"sq{l}", (R, 2 * Z) if l > 1 else (0, 2 * Z)),
                        (f"u{l}", (R, Z) if l < S else (0, Z))]
        entries += [pack_entry(layout, rows, dtype), ("lp", (1, spec.x_dim)),
                    ("dbs", (1, max(o for _, _, o in layout.layers)))]
        super().__init__(entries, dtype)
        nl = len(rows)
        assert self.index["z1"] == 2 * nl and self.index["pack"] == 2 * nl + 6 * S
        self.index64 = {k: (i * R, R) for i, k in enumerate(("ll", "logw", "dlogw", "ap", "aq", "fac"))}
        self.index64["bound"] = (6 * R, n)
        self.ws64 = np.zeros(6 * R + n, dtype=np.float64)

    def view(self, name):
        """The buffer ``name`` (see the class docstring) as an array view."""
        if name in self.index64:
            o, m = self.index64[name]
            return self.ws64[o:o + m]
        return super().view(name)


class SplitWorkspace:
    """An (n, L) pass cut into P parts of contiguous examples (kernels/batchsplit.py): per part its
    StackWorkspace, its eps (copied from the caller's, C-contiguous), its gradient row (parts 1..P-1:
    part 0 writes into the caller's gradient, which the reduction then sums the others into, in place)
    and its loss; and ``wt``, every W^T packed once for all parts (``pack_claimed_``, which counts the
    panels claimed in ``claim``)."""

    def __init__(self, spec, n, L, P, dtype, wt_size):
        self.bounds = part_bounds(n, P)
        sizes = np.diff(self.bounds)
        self.weights = sizes / n                                    # (P,) float64: n_p / n
        self.weight_list = [float(w) for w in self.weights]         # the same as Python floats
        self.parts = [StackWorkspace(spec, int(m), L, dtype) for m in sizes]
        self.eps = [tuple(np.empty((L, int(m), Z), dtype=dtype) for Z in spec.z_dims) for m in sizes]
        self.grads = np.empty((P - 1, spec.layout.size), dtype=dtype)
        self.losses = [0.0] * P                    # Python floats: no NumPy call on two numbers in a step
        self.wt = np.empty(wt_size, dtype=dtype)
        self.claim = np.zeros(8, dtype=np.int64)           # pack_claimed_'s panel counter (a cache line)


class NumbaStackBackend(NumpyBackend):
    """The numba backend for S > 1 (built through ``kernels.stack_class``): loss_and_grad and bound in
    the fused ``stack_step_`` (in example parts on several threads: kernels/batchsplit.py); the pieces
    (encode, decode, sampling) are the reference's composition with the MLP blocks in cpu.py's kernels
    over a cached workspace. Oracle: ``NumpyBackend``."""
    name = "numba"
    estimators = ("reparam", "dreg")   # stack_step_; score is the reference's (numpy) only
    update_kernels = {"sgd": sgd_update, "adagrad": adagrad_update, "adam": adam_update}
    max_workspaces = 4       # (n, L) shapes kept; evaluation's last short batch adds one more

    def __init__(self, spec, dtype):
        super().__init__(spec, dtype)
        self.act = ACT_CODES[spec.activation]
        self.lik = LIK_CODES[spec.likelihood]
        self.cb_switch = float(_CB_TAYLOR.get(self.dtype, 1e-2))
        lay = self.layout
        self.lay = layer_table(lay)
        prefixes = [p.split(".")[0] for p, _, _ in lay.layers]
        blk = []
        for l in range(1, self.S + 1):
            for prefix in (spec.enc_prefix(l), spec.dec_prefix(l)):
                ts = [t for t, q in enumerate(prefixes) if q == prefix]
                assert ts == list(range(ts[0], ts[-1] + 1))
                blk.append((ts[0], ts[-1]))
        self.blk = np.array(blk, dtype=np.int64)       # row 2(l-1): enc{l}; row 2(l-1)+1: dec{l}
        self.block_of = {prefixes[t0]: (t0, t1) for t0, t1 in blk}
        # column 4: where the split step packs each W^T once for all parts (not enc1's first layer: no
        # dx of x); a pass given the empty _no_wt instead packs in each product
        self.lay, self.wt_size = shared_pack_table(self.lay, {blk[0][0]}, self.dtype)
        self._no_wt = np.empty(0, dtype=self.dtype)
        self._ws = OrderedDict()
        self.split = ExampleSplit()

    def workspace(self, n, L) -> StackWorkspace:
        """The buffers of an (n, L) pass, allocated on first use and then reused."""
        return cached_workspace(self._ws, (n, L), self.max_workspaces,
                                lambda: StackWorkspace(self.spec, n, L, self.dtype))

    def split_workspace(self, n, L, P) -> "SplitWorkspace":
        """The buffers of an (n, L) pass cut into P parts (kernels/batchsplit.py)."""
        return cached_workspace(self._ws, (n, L, P), self.max_workspaces,
                                lambda: SplitWorkspace(self.spec, n, L, P, self.dtype, self.wt_size))

    _gemm = staticmethod(gemm_settings)

    def _step(self, params, x, eps, grad, objective, beta, estimator, want_grad, update=None):
        """One pass (``stack_step_``), whole or in example parts; returns (loss, the workspaces whose
        ``bound`` rows hold the per-example bound, in example order). ``update``: an optimizer's
        ``begin_step``, applied to the gradient (segment by segment, by the parts' threads)."""
        if params.dtype != self.dtype or x.dtype != self.dtype:
            raise ValueError(f"params and x must be {self.dtype}, got {params.dtype} and {x.dtype}")
        eps = tuple(eps)
        if len(eps) != self.S or not all(e.dtype == self.dtype and e.flags.c_contiguous for e in eps):
            raise ValueError(f"eps must be {self.S} C-contiguous {self.dtype} arrays (L, n, Z_l)")
        if not x.flags.c_contiguous:
            raise ValueError("x must be a C-contiguous array")
        L, n, _ = eps[0].shape
        codes = (self.act, self.lik, OBJECTIVES.index(objective), int(estimator == "dreg"), int(want_grad))
        reals = (float(beta), float(self.spec.var_floor), self.cb_switch)
        P = self.split.parts(n, L)
        if P == 1:
            ws = self.workspace(n, L)
            loss = stack_step_(params, grad, x, eps, ws.ws, ws.bo, ws.ws64, self.lay, self.blk, codes, reals,
                               self._gemm(), self._no_wt)
            if update is not None:
                update(0, grad.shape[0])
            return float(loss), (ws,)
        gemm = self._gemm(in_part=True)
        sw = self.split_workspace(n, L, P)
        b = sw.bounds

        grads = (grad,) + tuple(sw.grads) if want_grad else None    # part 0's gradient: the caller's buffer
        shared = want_grad and gemm[0] != config.BLAS      # the parts' backward reads every W^T (custom GEMM)
        wt = sw.wt if shared else self._no_wt

        def pack(p):                                   # every W^T, shared out as claimed, before any part starts
            pack_claimed_(params, self.lay, wt, sw.claim)

        def part(p):                                   # examples b[p]:b[p+1], on one core
            ws, ep = sw.parts[p], sw.eps[p]
            for e, buf in zip(eps, ep):
                np.copyto(buf, e[:, b[p]:b[p + 1]])
            sw.losses[p] = stack_step_(params, grads[p] if want_grad else params, x[b[p]:b[p + 1]], ep, ws.ws,
                                       ws.bo, ws.ws64, self.lay, self.blk, codes, reals, gemm, wt)

        sw.claim[0] = 0                                # no thread of the last run is left (it returned)
        self.split.run(P, (pack, part) if shared else part,
                       self.split.reduce_in(P, grad, grads, sw.weights, update) if want_grad else None,
                       blas=gemm[0] == config.BLAS)
        return sum(w * l for w, l in zip(sw.weight_list, sw.losses)), sw.parts

    def loss_and_grad(self, params, x, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=None,
                      kl_active=None, estimator="reparam", update=None):
        """Batch mean of the negative bound and its gradient in the flat layout.   §6, §11.3, §12
        ``update``: an optimizer's ``begin_step(params, grad)``, applied to the gradient as it is
        finished (each thread of a split its own segment: trainers.SegmentUpdateTrainer)."""
        if free_bits > 0 or kl_active is not None:
            raise ValueError("free_bits applies to models with one stochastic layer only")
        if grad is None:
            grad = np.empty(self.layout.size, dtype=self.dtype)
        loss, _ = self._step(params, x, eps, grad, objective, beta, estimator, True, update)
        return loss, grad

    def make_trainer(self, params, optimizer, comm=None, objective="elbo", free_bits=0.0, estimator="reparam"):
        """In one process, trainers.SegmentUpdateTrainer (the optimizer's step inside the pass, on every
        thread of the split); None (trainers.HostTrainer) with several ranks, whose all-reduce comes
        between the gradient and the step."""
        from ..trainers import SegmentUpdateTrainer, SerialComm
        comm = SerialComm() if comm is None else comm
        if comm.size > 1:
            return None
        return SegmentUpdateTrainer(self, params, optimizer, comm, objective, free_bits, estimator)

    def bound(self, params, x, eps, objective="elbo", beta=1.0):
        """Per-example bound (n,): the ELBO with the top KL analytic, or the IWAE bound.   §11.2"""
        _, parts = self._step(params, x, eps, params, objective, beta, "reparam", False)
        return np.concatenate([ws.view("bound") for ws in parts]).astype(self.dtype)

    # -- the pieces' MLP blocks (encode, decode, sampling): cpu.py's kernels into a cached workspace -----
    def piece_workspace(self, m) -> BufferTable:
        """The buffers of the pieces' blocks over m rows: every layer's output (named as the layer) and
        the custom GEMM's panels, allocated on first use and then reused."""
        rows = [m] * len(self.lay)
        return cached_workspace(self._ws, ("pieces", m), self.max_workspaces, lambda: BufferTable(
            layer_entries(self.layout, rows)[:len(rows)] + [pack_entry(self.layout, rows, self.dtype)], self.dtype))

    def _block_forward(self, params, prefix, h):
        """h: (m, I) -> out: (m, O), a new array, and the block's cache (its layers' outputs, its weights).
        cpu.mlp_fwd_ writes every layer into the pieces' workspace of m rows, so nothing is allocated but
        the output; the cache holds views of that workspace, valid until the next call for the same block
        and row count (NumpyBackend.forward runs each block once before its backward).  §2.3"""
        gemm, mb, nb = self._gemm()
        h = np.ascontiguousarray(h, dtype=self.dtype)
        ws = self.piece_workspace(h.shape[0])
        t0, t1 = self.block_of[prefix]
        mlp_fwd_(params, self.lay, t0, t1, h, ws.ws, ws.bo, self.act, gemm, ws.view("pack")[0], mb, nb)
        outs = [h] + [ws.view(self.layout.layers[t][0]) for t in range(t0, t1 + 1)]
        return outs[-1].copy(), (outs, [W for W, _ in self.layout.layer_views(params, prefix)])

    def _block_backward(self, dout, cache):
        """dout: (R, O) -> dh: (R, I) and [(dW, db), ...] for the hidden layers and the head.  §2.1, §2.3"""
        gemm, mb, nb = self._gemm()
        outs, Ws = cache
        g = np.array(dout, dtype=self.dtype, order="C")                      # modified in place
        grads = []
        for t in range(len(Ws) - 1, -1, -1):
            W = Ws[t]
            hin = outs[t]                                                    # (R, I_t)
            db = np.empty(W.shape[1], dtype=self.dtype)
            act_back_colsum_(g, outs[t + 1], db, self.act if t < len(Ws) - 1 else 0)
            dW = np.empty(W.shape, dtype=self.dtype)
            R = hin.shape[0]
            p1 = np.empty(max(pack_size("tn", W.shape[1], R, self.dtype), pack_size("nt", W.shape[0], W.shape[1],
                                                                               self.dtype)) if gemm else 1,
                          dtype=self.dtype)                                  # the custom GEMM's panels
            mm_tn(hin, g, dW, gemm, p1, mb, nb)                              # dW = h^T g
            dh = np.empty(hin.shape, dtype=self.dtype)
            mm_nt(g, np.ascontiguousarray(W), dh, gemm, p1, mb, nb)          # dh = g W^T
            grads.append((dW, db))
            g = dh
        return g, grads[::-1]
