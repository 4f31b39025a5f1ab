"""The Numba CPU backend against its NumPy oracles (docs/math.md §9).

Every kernel of minivae/kernels/cpu.py is compared with the reference function it fuses; the whole
model's loss and gradient with NumpyBackend's for every likelihood x objective x activation; odd and
tiny shapes (1x1, z = 1, batch 1, sizes that are no multiple of the tile, tiles of odd size) with
both GEMMs. Tolerances: rel_error <= 1e-12 in float64 and <= 1e-5 in float32 (IWAE's softmax
weights amplify the float32 rounding of log w ~ 500 nats, so its float32 gradient gets 1e-4).
Shapes stay tiny: CI compiles every kernel cold on 2 cores.
"""
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from numba import njit

from minivae import VAE, distributions as dist, objectives as obj
from minivae import optim
from minivae.gradcheck import check_model, format_report, rel_error
from minivae.kernels import config
from minivae.kernels import cpu
from minivae.kernels.gemm import pack_size
from minivae.layers import activation_backward, activation_forward, ACTIVATIONS
from minivae.likelihoods import continuous_bernoulli

TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = (np.float64, np.float32)


@pytest.fixture(params=["blas", "custom"])
def gemm(request, monkeypatch):
    """Run a test with each GEMM; the custom one with odd tile sizes (boundary guards)."""
    monkeypatch.setattr(config, "GEMM", request.param)
    if request.param == "custom":
        monkeypatch.setattr(config, "MB", 3)
        monkeypatch.setattr(config, "NB", 5)
    return request.param


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------

GEMM_SHAPES = [(1, 1, 1), (1, 3, 1), (2, 1, 3), (5, 7, 3), (17, 13, 9), (9, 33, 10)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("code, mb, nb", [(0, 16, 64), (1, 16, 64), (1, 3, 5), (1, 1, 1), (1, 4, 4)])
def test_gemm_variants_match_numpy(dtype, code, mb, nb):
    rng = np.random.default_rng(1)
    for M, K, N in GEMM_SHAPES:
        A = rng.standard_normal((M, K)).astype(dtype)
        B = rng.standard_normal((K, N)).astype(dtype)
        At = np.ascontiguousarray(A.T)                         # (K, M): A = At^T
        Bt = np.ascontiguousarray(B.T)                         # (N, K)
        p1 = np.zeros(pack_size("nt", N, K, dtype), dtype=dtype)    # the largest of the three forms
        want = A.astype(np.float64) @ B.astype(np.float64)
        for name, run in (("nn", lambda C: cpu.mm_nn(A, B, C, code, p1, mb, nb)),
                          ("nt", lambda C: cpu.mm_nt(A, Bt, C, code, p1, mb, nb)),
                          ("tn", lambda C: cpu.mm_tn(At, B, C, code, p1, mb, nb))):
            C = np.full((M, N), np.nan, dtype=dtype)
            run(C)
            assert rel_error(C, want) <= TOL[dtype], (name, M, K, N, code, mb, nb)


# ----------------------------------------------------------------------------------------------
# Elementary functions
# ----------------------------------------------------------------------------------------------

@njit
def _apply(f, a, out):
    for q in range(a.size):
        out[q] = f(a[q])


@njit
def _fma(a, b, c):
    out = np.empty_like(a)
    for q in range(a.size):
        out[q] = cpu.fma_(a[q], b[q], c[q])
    return out


def test_fma_rounds_once():
    """fma_(a, b, c) is a b + c rounded once: (1 + u)^2 - (1 + 2u) = u^2 exactly, where the product rounded
    first gives 0; and on random float32 operands it equals a b + c computed in float64 (where a b is
    exact) and rounded to float32. That double rounding differs from one rounding only when the float64
    sum lands on a float32 midpoint, about 2^-29 of cases; none of these 10,000 does."""
    for dt, u in ((np.float32, 2.0 ** -12), (np.float64, 2.0 ** -27)):
        a = np.array([1 + u], dtype=dt)
        c = np.array([-(1 + 2 * u)], dtype=dt)
        assert (a * a + c)[0] == 0 and _fma(a, a, c)[0] == dt(u * u)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(10000).astype(np.float32) for _ in range(3))
    exact = a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)
    assert np.array_equal(_fma(a, b, c), exact.astype(np.float32))


def test_arithmetic_exp_and_log1p_float32():
    """exp_nonpos_f32 on [-100, 0] and log1p01_f32 on [0, 1] against float64 numpy: a few ulps
    (exp_nonpos_f32 clamps at -87, below which e^x < 2e-38: an absolute error under 2e-38)."""
    x = -np.concatenate([np.linspace(0, 100, 100001), np.geomspace(1e-30, 1, 1000)]).astype(np.float32)
    out = np.empty_like(x)
    _apply(cpu.exp_nonpos_f32, x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.all(np.abs(out - ref) <= 4 * np.finfo(np.float32).eps * ref + 2e-38)
    # normal numbers only: its inputs come from exp_nonpos_f32, which never returns a subnormal
    tiny = np.finfo(np.float32).tiny
    e = np.concatenate([np.linspace(0, 1, 100001), np.geomspace(tiny, 1, 1000)]).astype(np.float32)
    out = np.empty_like(e)
    _apply(cpu.log1p01_f32, e, out)
    ref = np.log1p(e.astype(np.float64))
    assert np.all(np.abs(out - ref) <= 3 * np.finfo(np.float32).eps * ref)


def test_arithmetic_tanh_and_one_minus_exp_float32():
    """tanh_f32 and one_minus_exp_neg_f32 (= -expm1(-h)) against float64 numpy: a few ulps."""
    a = np.concatenate([np.linspace(-12, 12, 200001), np.geomspace(1e-30, 1, 1000)]).astype(np.float32)
    a = np.concatenate([a, -a])
    out = np.empty_like(a)
    _apply(cpu.tanh_f32, a, out)
    ref = np.tanh(a.astype(np.float64))
    assert np.all(np.abs(out - ref) <= 8 * np.finfo(np.float32).eps * np.abs(ref))
    assert np.all(np.abs(out) <= 1) and np.array_equal(out[a.size // 2:], -out[:a.size // 2])   # bounded, odd
    special = np.array([np.inf, -np.inf, 1e30, -1e30, 0.0, np.nan], dtype=np.float32)
    out = np.empty_like(special)
    _apply(cpu.tanh_f32, special, out)
    assert np.array_equal(out[:5], [1, -1, 1, -1, 0]) and np.isnan(out[5])
    h = np.concatenate([np.linspace(0, 100, 200001), np.geomspace(1e-30, 1, 1000)]).astype(np.float32)
    out = np.empty_like(h)
    _apply(cpu.one_minus_exp_neg_f32, h, out)
    ref = -np.expm1(-h.astype(np.float64))
    assert np.all(np.abs(out - ref) <= 8 * np.finfo(np.float32).eps * ref)


def test_arithmetic_log_and_cb_closed_form_float32():
    """log_pos_f32 over the whole normal range (a few ulps of float64 numpy's log), and the continuous
    Bernoulli's closed form with the float32 ops (continuous_bernoulli.closed_form) against the float64 closed forms of distributions.cb_log_norm / cb_log_norm_grad."""
    tiny = np.finfo(np.float32).tiny
    x = np.concatenate([np.geomspace(tiny, np.finfo(np.float32).max, 200001),
                        np.linspace(0.5, 2.0, 100001)]).astype(np.float32)
    out = np.empty_like(x)
    _apply(cpu.log_pos_f32, x, out)
    ref = np.log(x.astype(np.float64))
    assert np.all(np.abs(out - ref) <= 4 * np.spacing(np.abs(ref).astype(np.float32)))
    a = np.concatenate([np.linspace(0.3, 90, 100001), [0.3, 1.0, 20.0]]).astype(np.float32)
    e = np.empty_like(a)
    _apply(cpu.exp_nonpos_f32, -a, e)
    logc, dl = _cb_far_f32(a, e)
    l64 = a.astype(np.float64)
    ref_logc = dist.cb_log_norm(l64) - np.log1p(np.exp(-l64))
    ref_dl = dist.cb_log_norm_grad(l64)
    # e in float32 carries its own rounding, amplified by 1/(1 - e) near the switch: an absolute
    # error of a few ulps of max(1, |log C|) (numpy's float32 closed form: 3.2e-7 here, this 2.9e-7)
    f32eps = np.finfo(np.float32).eps
    assert np.all(np.abs(logc - ref_logc) <= 4 * f32eps * np.maximum(1.0, np.abs(ref_logc)))
    # 1/a - 1/sinh(a) cancels to a/6 near the switch: an absolute error of a few ulps of 1/a
    assert np.all(np.abs(dl - ref_dl) <= 8 * f32eps / l64)


# the continuous Bernoulli's closed form (minivae/likelihoods/continuous_bernoulli.py) with the CPU's ops
_CB_FAR = njit(continuous_bernoulli.closed_form(cpu.SCALAR_OPS))


@njit
def _cb_far_f32(a, e):
    logc, dl = np.empty_like(a), np.empty_like(a)
    for q in range(a.size):
        logc[q], dl[q] = _CB_FAR(np.float32, a[q], e[q])
    return logc, dl


@njit
def _log1p01(e):
    return cpu.log1p01(e)


def test_log1p_through_log_float64():
    """In float64 the kernels keep libm: log1p01 is Goldberg's log1p through log (a few ulps)."""
    e = np.concatenate([np.linspace(0, 1, 10001), np.geomspace(1e-300, 1, 1000)])
    out = np.empty_like(e)
    _apply(_log1p01, e, out)
    ref = np.log1p(e)
    assert np.all(np.abs(out - ref) <= 4 * np.finfo(np.float64).eps * ref)


# ----------------------------------------------------------------------------------------------
# Layers, posterior, likelihoods, objectives
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bias_act_and_backward_colsum(dtype, act):
    rng = np.random.default_rng(4)
    for N, O in [(1, 1), (3, 17), (20, 33)]:
        a0 = (3 * rng.standard_normal((N, O))).astype(dtype)
        b = rng.standard_normal(O).astype(dtype)
        dh = rng.standard_normal((N, O)).astype(dtype)
        h_ref, cache = activation_forward(a0 + b, act)
        h = a0.copy()
        cpu.bias_act_(h, b, cpu.ACT_CODES[act])
        assert rel_error(h, h_ref) <= TOL[dtype]
        da_ref = activation_backward(dh, cache)
        g = dh.copy()
        db = np.full(O, np.nan, dtype=dtype)
        cpu.act_back_colsum_(g, h, db, cpu.ACT_CODES[act])
        assert rel_error(g, da_ref) <= TOL[dtype]
        assert rel_error(db, da_ref.sum(axis=0)) <= TOL[dtype]
    # identity (the heads): bias only, and the plain column sum
    a = rng.standard_normal((4, 5)).astype(dtype)
    h = a.copy()
    cpu.bias_act_(h, b[:5] if O >= 5 else np.ones(5, dtype), 0)
    db = np.empty(5, dtype=dtype)
    g = a.copy()
    cpu.act_back_colsum_(g, h, db, 0)
    np.testing.assert_array_equal(g, a)
    assert rel_error(db, a.sum(axis=0)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bias_act_propagates_nan_and_inf_like_numpy(dtype, act):
    """A NaN weight must give NaN on every backend (numba's relu once mapped NaN to 0, so a broken
    checkpoint evaluated as finite on numba and NaN on numpy)."""
    a0 = np.array([[np.nan, -np.inf, np.inf, -1.0, 0.0, 2.0]], dtype=dtype)
    b = np.zeros(6, dtype=dtype)
    h_ref, _ = activation_forward(a0 + b, act)
    h = a0.copy()
    cpu.bias_act_(h, b, cpu.ACT_CODES[act])
    np.testing.assert_array_equal(np.isnan(h), np.isnan(h_ref))
    finite = ~np.isnan(h_ref)
    np.testing.assert_allclose(h[finite], h_ref[finite], rtol=TOL[dtype], atol=1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparam_and_kl(dtype):
    rng = np.random.default_rng(5)
    for L, n, Z in [(1, 1, 1), (3, 4, 2)]:
        out = rng.standard_normal((n, 2 * Z)).astype(dtype)
        eps = rng.standard_normal((L, n, Z)).astype(dtype)
        std = np.empty((n, Z), dtype)
        z = np.empty((L * n, Z), dtype)
        cpu.reparam_fwd_(out, eps, std, z)
        z_ref, (std_ref, _) = dist.reparam_forward(out[:, :Z], out[:, Z:], eps)
        assert rel_error(z, z_ref.reshape(L * n, Z)) <= TOL[dtype]
        assert rel_error(std, std_ref) <= TOL[dtype]
        kld = np.empty(Z)
        cpu.kl_dim_(out, Z, kld)
        assert rel_error(kld, dist.kl_forward(out[:, :Z], out[:, Z:]).mean(axis=0)) <= TOL[dtype]


@pytest.mark.parametrize("free_bits, kl_active", [(0.0, None), (0.3, None), (0.3, [1.0, 0.0, 1.0])])
def test_elbo_objective(free_bits, kl_active):
    rng = np.random.default_rng(6)
    L, n, Z = 2, 5, 3
    ll = rng.standard_normal(L * n) * 10
    kld = np.array([0.1, 0.5, 2.0])
    kl = np.broadcast_to(kld, (n, Z)).copy()                    # batch mean = kld
    dkl = np.empty(Z)
    mask = cpu._NO_MASK if kl_active is None else np.array(kl_active)
    loss = cpu.elbo_objective_(ll, kld, n, L, 0.7, free_bits, mask, dkl)
    loss_ref, _, dkl_ref = obj.elbo_loss(ll.reshape(L, n), kl, 0.7, free_bits, kl_active)
    assert abs(loss - loss_ref) <= 1e-12 * abs(loss_ref)
    assert rel_error(dkl, dkl_ref[0]) <= 1e-12


def test_iwae_objective():
    rng = np.random.default_rng(7)
    k, n, Z = 4, 3, 2
    out = rng.standard_normal((n, 2 * Z))
    eps = rng.standard_normal((k, n, Z))
    z = (out[:, :Z] + np.exp(0.5 * out[:, Z:]) * eps).reshape(k * n, Z)
    ll = rng.standard_normal(k * n) * 5
    logw = np.empty(k * n)
    cpu.iwae_logw_(ll, out, eps, z, 0.8, logw)
    ref = obj.log_weights(ll.reshape(k, n), dist.log_prior(z.reshape(k, n, Z)),
                          dist.log_posterior_eps(out[:, Z:], eps), 0.8)
    assert rel_error(logw, ref.reshape(-1)) <= 1e-12
    bound = np.empty(n)
    dlogw = np.empty(k * n)
    loss = cpu.iwae_objective_(logw, k, n, bound, dlogw, -np.inf)
    loss_ref, dlogw_ref = obj.iwae_loss(ref)
    assert abs(loss - loss_ref) <= 1e-12 * abs(loss_ref)
    assert rel_error(bound, obj.iwae_per_example(ref)) <= 1e-12
    assert rel_error(dlogw, dlogw_ref.reshape(-1)) <= 1e-12


def test_iwae_objective_drops_only_weights_below_its_floor():
    """iwae_objective_ with lfloor (cpu.weight_floor: 2 log eps): a sample more than -lfloor nats behind
    its example's best gets dlogw = 0; the bound and every other weight are the reference's."""
    logw = np.array([[0.0, 3.0], [-10.0, 3.0], [-40.0, -200.0], [-80.0, 2.5]]).reshape(-1)   # (k, n) = (4, 2),
    # flat at l n + i: example 0 has samples 40 and 80 nats behind (rows 4, 6), example 1 one 203 behind (row 5)
    k, n = 4, 2
    ref_loss, ref_dlogw = obj.iwae_loss(logw.reshape(k, n))
    assert cpu.weight_floor(np.zeros(1, np.float32)) == pytest.approx(2 * np.log(2.0 ** -23))
    assert cpu.weight_floor(np.zeros(1, np.float64)) == pytest.approx(2 * np.log(2.0 ** -52))
    for dtype, dropped in ((np.float32, [4, 5, 6]), (np.float64, [5, 6])):    # floors 31.9 and 72.1 nats
        bound, dlogw = np.empty(n), np.empty(k * n)
        loss = cpu.iwae_objective_(logw, k, n, bound, dlogw, cpu.weight_floor(np.zeros(1, dtype)))
        assert loss == pytest.approx(ref_loss, rel=1e-15)
        np.testing.assert_allclose(bound, obj.iwae_per_example(logw.reshape(k, n)), rtol=1e-15)
        want = ref_dlogw.reshape(-1).copy()
        want[dropped] = 0.0
        assert np.all(dlogw[dropped] == 0.0) and np.all(dlogw[np.setdiff1d(np.arange(k * n), dropped)] != 0.0)
        np.testing.assert_allclose(dlogw, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lik", dist.LIKELIHOODS)
def test_likelihood_loss_and_score(dtype, lik):
    rng = np.random.default_rng(8)
    L, n, D = 2, 3, 11
    K = 2 * D if lik == "gaussian" else D
    x = rng.random((n, D)).astype(dtype)
    head = (4 * rng.standard_normal((L * n, K))).astype(dtype)
    if lik == "continuous_bernoulli":              # both sides of the series / closed-form switch
        sw = cpu._CB_TAYLOR[np.dtype(dtype)]
        head[0, :6] = np.array([0, sw / 2, -sw / 2, sw * 0.999, sw * 1.001, -sw * 1.001])
    vf = 1e-3
    ll_ref = dist.loglik_forward(lik, x, head.reshape(L, n, K), vf).reshape(-1)
    dll = rng.standard_normal((L, n)).astype(dtype)
    score_ref = dist.loglik_backward(lik, x, head.reshape(L, n, K), np.ones_like(dll), vf)
    h = head.copy()
    ll = np.empty(L * n)
    lp = np.empty((L * n, D), dtype)
    cpu.likelihood_(x, h, ll, lp, dist.LIKELIHOODS.index(lik), vf, cpu._CB_TAYLOR[np.dtype(dtype)],
                    -0.25, True)
    assert rel_error(ll, ll_ref) <= TOL[dtype]
    assert rel_error(h, -0.25 * score_ref.reshape(L * n, K)) <= TOL[dtype]
    cpu.scale_rows_(h, dll.reshape(-1).astype(np.float64))
    ref = -0.25 * score_ref * dll[..., None]
    assert rel_error(h, ref.reshape(L * n, K)) <= TOL[dtype]
    h2 = head.copy()                                # want_score=False leaves the head alone
    cpu.likelihood_(x, h2, ll, lp, dist.LIKELIHOODS.index(lik), vf, 0.01, 1.0, False)
    np.testing.assert_array_equal(h2, head)


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_update_kernels_match_reference(dtype):
    rng = np.random.default_rng(9)
    P = 37
    cases = [("sgd", dict(momentum=0.9, weight_decay=0.0)), ("sgd", dict(momentum=0.0, weight_decay=0.01)),
             ("adagrad", dict(eps=1e-10, weight_decay=0.0)), ("adagrad", dict(eps=1e-6, weight_decay=0.1)),
             ("adam", dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)),
             ("adam", dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05))]
    for name, hyper in cases:
        nstate = {"sgd": 1, "adagrad": 1, "adam": 2}[name]
        p = [rng.standard_normal(P).astype(dtype)] * 2
        p = [p[0].copy(), p[0].copy()]
        st = [[np.zeros(P, dtype) for _ in range(nstate)] for _ in range(2)]
        for t in range(1, 4):
            g = rng.standard_normal(P).astype(dtype)
            for k, upd in enumerate((optim.REFERENCE_UPDATES[name], cpu.NumbaBackend.update_kernels[name])):
                if name == "adagrad":
                    upd(p[k], g, *st[k], 0.01, hyper["eps"], hyper["weight_decay"])
                elif name == "sgd":
                    upd(p[k], g, *st[k], t, 0.01, hyper["momentum"], hyper["weight_decay"])
                else:
                    upd(p[k], g, *st[k], t, 1e-3, hyper["beta1"], hyper["beta2"], hyper["eps"],
                        hyper["weight_decay"])
        assert rel_error(p[1], p[0]) <= TOL[dtype], (name, hyper)
        for a, b in zip(st[0], st[1]):
            assert rel_error(b, a) <= TOL[dtype], (name, hyper)


def test_make_optimizer_picks_the_fused_kernel():
    m = VAE(6, 2, hidden=(4,), backend="numba", dtype="float64")
    o = optim.make_optimizer("adam", m.layout.size, "float64", backend=m.backend)
    assert o.update is cpu.adam_update


# ----------------------------------------------------------------------------------------------
# The whole model against NumpyBackend
# ----------------------------------------------------------------------------------------------

def _pair(dtype, seed=0, **kw):
    a = VAE(dtype=dtype, seed=seed, backend="numpy", **kw)
    b = VAE(dtype=dtype, seed=seed, backend="numba", **kw)
    return a, b


def _data(rng, n, D, L, Z, dtype, gaussian=False):
    x = rng.standard_normal((n, D)) if gaussian else rng.random((n, D))
    return x.astype(dtype), rng.standard_normal((L, n, Z)).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lik", dist.LIKELIHOODS)
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_loss_and_grad_match_numpy(dtype, lik, objective, act):
    rng = np.random.default_rng(10)
    ref, fast = _pair(dtype, x_dim=9, z_dim=3, hidden=(7,), activation=act, likelihood=lik)
    x, eps = _data(rng, 5, 9, 3, 3, dtype, lik == "gaussian")
    kw = dict(beta=0.7, objective=objective, free_bits=0.2 if objective == "elbo" else 0.0)
    l1, g1 = ref.loss_and_grad(x, eps, **kw)
    grad = np.full(ref.layout.size, np.nan, dtype=dtype)
    l2, g2 = fast.loss_and_grad(x, eps, grad=grad, **kw)
    assert g2 is grad and g2.dtype == dtype
    tol = TOL[dtype] * (10 if (dtype == np.float32 and objective == "iwae") else 1)
    assert abs(l1 - l2) <= tol * max(1.0, abs(l1))
    for name, s in ref.layout.slots.items():
        sl = slice(s.offset, s.offset + s.size)
        assert rel_error(g2[sl], g1[sl]) <= tol, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [
    dict(x_dim=1, z_dim=1, hidden=(), n=1, L=1),                  # 1 x 1, no hidden layers
    dict(x_dim=5, z_dim=1, hidden=(1,), n=1, L=2),                # z = 1, batch 1, width 1
    dict(x_dim=13, z_dim=2, hidden=(6, 5), dec_hidden=(3,), n=7, L=2),
    dict(x_dim=21, z_dim=5, hidden=(17,), n=9, L=1),              # no multiple of any tile
])
def test_odd_shapes_both_gemms(dtype, shape, gemm):
    shape = dict(shape)
    n, L = shape.pop("n"), shape.pop("L")
    rng = np.random.default_rng(11)
    ref, fast = _pair(dtype, **shape)
    x, eps = _data(rng, n, shape["x_dim"], L, shape["z_dim"], dtype)
    l1, g1 = ref.loss_and_grad(x, eps)
    l2, g2 = fast.loss_and_grad(x, eps)
    assert abs(l1 - l2) <= TOL[dtype] * max(1.0, abs(l1))
    assert rel_error(g2, g1) <= TOL[dtype]
    assert rel_error(fast.elbo(x, eps), ref.elbo(x, eps)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bound_encode_decode_match(dtype):
    rng = np.random.default_rng(12)
    for lik in dist.LIKELIHOODS:
        ref, fast = _pair(dtype, x_dim=10, z_dim=3, hidden=(8,), likelihood=lik, activation="tanh")
        x, eps = _data(rng, 6, 10, 4, 3, dtype, lik == "gaussian")
        assert rel_error(fast.elbo(x, eps), ref.elbo(x, eps)) <= TOL[dtype]
        assert rel_error(fast.iwae_bound(x, eps), ref.iwae_bound(x, eps)) <= TOL[dtype]
        for a, b in zip(fast.encode(x), ref.encode(x)):
            assert rel_error(a, b) <= TOL[dtype]
        z = rng.standard_normal((4, 3)).astype(dtype)
        for a, b in zip(np.atleast_1d(fast.decode(z)), np.atleast_1d(ref.decode(z))):
            assert rel_error(a, b) <= TOL[dtype]
        assert fast.elbo(x, eps).dtype == ref.elbo(x, eps).dtype


def test_gradcheck_float64():
    """The whole-model finite-difference check (issue 2) on this backend."""
    rng = np.random.default_rng(13)
    for lik, objective in [("bernoulli", "elbo"), ("gaussian", "iwae"), ("continuous_bernoulli", "elbo")]:
        m = VAE(6, 2, hidden=(5,), activation="tanh", likelihood=lik, dtype="float64", backend="numba")
        x, eps = _data(rng, 4, 6, 2, 2, np.float64, lik == "gaussian")
        checks = check_model(m, x, eps, objective=objective)
        assert all(c.ok for c in checks), format_report(checks)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
def test_seeded_run_same_losses(dtype, tol):
    """N Adam steps from the same seed: the same loss curve on both backends."""
    rng = np.random.default_rng(14)
    X = rng.random((40, 12)).astype(dtype)
    curves = []
    for backend in ("numpy", "numba"):
        m = VAE(12, 3, hidden=(10,), dtype=dtype, seed=3, backend=backend)
        o = optim.make_optimizer("adam", m.layout.size, dtype, backend=m.backend, lr=1e-2)
        g = np.empty_like(m.params)
        erng = np.random.default_rng(0)
        losses = []
        for step in range(12):
            xb = X[(step % 4) * 10:(step % 4 + 1) * 10]
            eps = erng.standard_normal((1, 10, 3)).astype(dtype)
            loss, _ = m.backend.loss_and_grad(m.params, xb, eps, grad=g)
            o.step(m.params, g)
            losses.append(loss)
        curves.append(np.array(losses))
    assert curves[0][-1] < curves[0][0]
    np.testing.assert_allclose(curves[1], curves[0], rtol=tol)


def test_bad_gemm_setting(monkeypatch):
    monkeypatch.setattr(config, "GEMM", "mkl")
    m = VAE(4, 1, hidden=(), backend="numba", dtype="float64")
    with pytest.raises(ValueError, match="GEMM must be one of"):
        m.loss_and_grad(np.full((2, 4), 0.5))


# ----------------------------------------------------------------------------------------------
# No allocation per step in steady state
# ----------------------------------------------------------------------------------------------

def _steps(m, x, eps, g, mstate, vstate, k):
    """k training steps on the hot path: loss_and_grad into a reused buffer, the fused Adam update
    (with a fixed t: the Optimizer object's growing step counter is an int the test need not see)."""
    for _ in range(k):
        m.backend.loss_and_grad(m.params, x, eps, grad=g)
        cpu.adam_update(m.params, g, mstate, vstate, 7, 1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_no_python_allocation_per_step():
    """tracemalloc over two windows of 300 steps after warm-up: after a one-off object of a few bytes
    in the first window, the traced memory does not grow at all. Only allocations made from this
    thread's steps count (a frame of minivae or of this file in their traceback): tracemalloc traces
    every thread, and a thread an earlier test of the same xdist worker left running (a progress-bar
    monitor, a local HTTP server) allocates at times of its own."""
    m = VAE(20, 3, hidden=(16,), backend="numba", dtype="float32")
    rng = np.random.default_rng(15)
    x, eps = _data(rng, 8, 20, 1, 3, np.float32)
    g, ms, vs = (np.zeros_like(m.params) for _ in range(3))
    _steps(m, x, eps, g, ms, vs, 5)
    ours = [tracemalloc.Filter(True, "*/minivae/*", all_frames=True),
            tracemalloc.Filter(True, __file__, all_frames=True),
            tracemalloc.Filter(False, tracemalloc.__file__, all_frames=True)]   # not the snapshots

    def traced():
        return sum(t.size for t in tracemalloc.take_snapshot().filter_traces(ours).traces)
    tracemalloc.start(64)
    try:
        _steps(m, x, eps, g, ms, vs, 10)
        m0 = traced()
        _steps(m, x, eps, g, ms, vs, 300)
        m1 = traced()
        _steps(m, x, eps, g, ms, vs, 300)
        m2 = traced()
    finally:
        tracemalloc.stop()
    assert m1 - m0 <= 1024, f"traced memory grew by {m1 - m0} bytes over the first 300 steps"
    assert m2 - m1 <= 0, f"traced memory grew by {m2 - m1} bytes over the next 300 steps"


NRT_SCRIPT = """
import numpy as np
from numba.core.runtime import rtsys
from minivae import VAE
from minivae.kernels import config, cpu
m = VAE(20, 3, hidden=(16,), backend="numba", dtype="float32")
rng = np.random.default_rng(0)
x = rng.random((8, 20)).astype(np.float32); eps = rng.standard_normal((1, 8, 3)).astype(np.float32)
g, ms, vs = (np.zeros_like(m.params) for _ in range(3))
def steps(k):
    for _ in range(k):
        m.backend.loss_and_grad(m.params, x, eps, grad=g)
        cpu.adam_update(m.params, g, ms, vs, 7, 1e-3, 0.9, 0.999, 1e-8, 0.0)
for config.GEMM in ("blas", "custom"):
    steps(3)
    a = rtsys.get_allocation_stats()
    steps(50)
    b = rtsys.get_allocation_stats()
    print(b.alloc - a.alloc, b.free - a.free, b.mi_alloc - a.mi_alloc, b.mi_free - a.mi_free)
"""
# Array arguments that cross the Python -> jit boundary per step: numba wraps each one in a
# MemInfo (a header around the caller's data, no data copied): 9 for loss_and_grad_ (params, grad,
# x, eps, ws, bo, ws64, lay, kl_active) and 4 for adam_update (params, grad, m, v).
BOUNDARY_ARRAYS_PER_STEP = 13


def test_no_native_allocation_per_step(tmp_path):
    """Numba's allocator (NRT statistics, 50 steady-state steps, BLAS and custom GEMM): no buffer is
    allocated inside the kernels; the only NRT objects are the per-call argument wrappers, all freed.

    The statistics build compiles the address of this process's counters into the code, and numba's
    cache key does not include NUMBA_NRT_STATS: the subprocess gets a cache folder of its own, or
    every later process that loads its loss_and_grad_ from the shared cache crashes."""
    env = dict(os.environ, NUMBA_NRT_STATS="1", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    r = subprocess.run([sys.executable, "-c", NRT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split("\n")[:2]
    for gemm, line in zip(("blas", "custom"), lines, strict=True):
        alloc, free, mi_alloc, mi_free = map(int, line.split())
        # nothing but the argument wrappers, and every one of them released again
        assert alloc == mi_alloc == 50 * BOUNDARY_ARRAYS_PER_STEP, (gemm, alloc, mi_alloc)
        assert (free, mi_free) == (alloc, mi_alloc), gemm


def test_importance_sampled_log_likelihood_matches_numpy():
    """evaluate.iw_log_likelihood_per_example (chunked IWAE bounds, docs/math.md §7) on this backend."""
    from minivae import evaluate
    rng = np.random.default_rng(16)
    x = rng.random((7, 10))
    out = []
    for backend in ("numpy", "numba"):
        m = VAE(10, 2, hidden=(6,), dtype="float64", seed=1, backend=backend)
        out.append(evaluate.iw_log_likelihood_per_example(m, x, 60, seed=3, batch_size=40, chunk=25))
    assert rel_error(out[1], out[0]) <= 1e-12


@pytest.mark.parametrize("given", [None, "9"])
def test_openblas_workers_are_told_to_sleep_soon_unless_the_user_said_otherwise(given):
    """minivae.threads sets OPENBLAS_THREAD_TIMEOUT (2^22 cycles; OpenBLAS's default 2^28 let a worker
    spin ~0.1 s into the split steps after a threaded BLAS pass) before SciPy's OpenBLAS, the one np.dot
    inside @njit calls, is loaded: importing the numba backends must not load it; a user's value stays."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if given is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = given
    code = ("import os, sys, minivae, minivae.kernels.cpu, minivae.kernels.cpu_stack; "
            "print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'), 'scipy.linalg.cython_blas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [given or "22", "False"]


def test_limit_threads_sets_and_restores_both_pools():
    import numba
    from minivae.threads import blas_info, limit_threads
    before_nb = numba.get_num_threads()
    before_blas = [b["num_threads"] for b in blas_info()]
    with limit_threads(1):
        assert numba.get_num_threads() == 1
        assert all(b["num_threads"] == 1 for b in blas_info())
        m = VAE(5, 1, hidden=(3,), backend="numba", dtype="float64")
        m.loss_and_grad(np.full((2, 5), 0.5))
    assert numba.get_num_threads() == before_nb
    assert [b["num_threads"] for b in blas_info()] == before_blas
    with pytest.raises(ValueError, match="positive integer"):
        with limit_threads(0):
            pass
