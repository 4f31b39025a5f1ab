"""Every CUDA kernel against its NumPy reference, under the simulator (odd tiles, tiny shapes).

Run by tests/test_cuda_sim.py in a process with NUMBA_ENABLE_CUDASIM=1.
"""
import math

import numpy as np
import pytest
from simutil import configs, dev, make_backend

from minivae import distributions as dist
from minivae import objectives as obj
from minivae.layers import ACTIVATIONS, activation_backward, activation_forward
from minivae.optim import REFERENCE_UPDATES

CONFIGS = configs()


def ck():
    from minivae.kernels import cuda_kernels
    return cuda_kernels


# -- GEMM -----------------------------------------------------------------------------------------

def ref_gemm(A, B, trans_a, trans_b, ones_a):
    A = A.astype(np.float64)
    if ones_a:
        A = np.concatenate([A, np.ones((A.shape[0], 1))], axis=1)
    return (A.T if trans_a else A) @ (B.T if trans_b else B).astype(np.float64)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["regtile", "tile"])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("ones_a", [False, True])
def test_gemm_matches_numpy(cfg, trans_a, trans_b, ones_a, rng):
    """C = op(A) op(B) for every transposition, with and without the ones column; M, N, K are
    not multiples of the tile (7, 8, 4 against tiles 3, 5, 6)."""
    be = make_backend(cfg)
    M, N, K = 7, 8, 4
    one = int(ones_a)                                 # the ones column is the stored A's last
    A = rng.standard_normal((K, M - one) if trans_a else (M, K - one)).astype(np.float32)
    B = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32)
    C = dev(np.full((M, N), np.nan, np.float32))
    be.gemm(dev(A), dev(B), C, trans_a=trans_a, trans_b=trans_b, ones_a=ones_a)
    np.testing.assert_allclose(C.copy_to_host(), ref_gemm(A, B, trans_a, trans_b, ones_a), rtol=1e-5, atol=1e-5)


def test_gemm_rejects_mismatched_shapes():
    be = make_backend(CONFIGS[0])
    with pytest.raises(ValueError, match="gemm"):
        be.gemm(dev(np.zeros((3, 4), np.float32)), dev(np.zeros((5, 2), np.float32)), dev(np.zeros((3, 2), np.float32)))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["regtile", "tile"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gemm_epilogues(cfg, act, rng):
    """EPI_ACT: f([x | 1] [W; b]);  EPI_DMASK: (dY W^T) * f'(a) with f' read from h = f(a)."""
    k = ck()
    be = make_backend(cfg)
    code = k.ACT_CODE[act]
    x = rng.standard_normal((5, 4)).astype(np.float32)
    Wb = rng.standard_normal((5, 7)).astype(np.float32)
    h = dev(np.zeros((5, 7), np.float32))
    be.gemm(dev(x), dev(Wb), h, ones_a=True, epi=k.EPI_ACT, act=code)
    a = (x.astype(np.float64) @ Wb[:4] + Wb[4]).astype(np.float32)
    h_ref, cache = activation_forward(a, act)
    np.testing.assert_allclose(h.copy_to_host(), h_ref, rtol=1e-5, atol=1e-6)

    dY = rng.standard_normal((5, 3)).astype(np.float32)
    W2 = rng.standard_normal((7, 3)).astype(np.float32)
    dx = dev(np.zeros((5, 7), np.float32))
    be.gemm(dev(dY), dev(W2), dx, trans_b=True, epi=k.EPI_DMASK, act=code, H=dev(h_ref))
    ref = activation_backward((dY.astype(np.float64) @ W2.T).astype(np.float32), cache)
    np.testing.assert_allclose(dx.copy_to_host(), ref, rtol=1e-4, atol=1e-6)


def test_gemm_float64_keeps_float64(rng):
    be = make_backend(CONFIGS[0], dtype=np.float64)
    A, B = rng.standard_normal((4, 5)), rng.standard_normal((5, 6))
    C = dev(np.zeros((4, 6)))
    be.gemm(dev(A), dev(B), C)
    np.testing.assert_allclose(C.copy_to_host(), A @ B, rtol=1e-13)


# -- elementwise and reductions -----------------------------------------------------------------

@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bias_act_and_act_backward(act, rng):
    k = ck()
    be = make_backend(CONFIGS[1])
    A = (3 * rng.standard_normal((4, 7))).astype(np.float32)
    A[0, :3] = 0.0                                    # the kink itself
    b = rng.standard_normal(7).astype(np.float32)
    H = dev(np.zeros_like(A))
    be._launch2(k.bias_act, 4, 7, dev(A), dev(b), H, k.ACT_CODE[act])
    h_ref, cache = activation_forward(A + b, act)
    np.testing.assert_allclose(H.copy_to_host(), h_ref, rtol=1e-5, atol=1e-6)
    dH = rng.standard_normal((4, 7)).astype(np.float32)
    dA = dev(np.zeros_like(A))
    be._launch2(k.act_backward, 4, 7, dev(dH), dev(h_ref), k.ACT_CODE[act], dA)
    np.testing.assert_allclose(dA.copy_to_host(), activation_backward(dH, cache), rtol=1e-5, atol=1e-6)


def test_bias_grad_is_the_column_sum(rng):
    k = ck()
    be = make_backend(CONFIGS[1])                     # tile 5: 11 rows, 7 columns straddle blocks
    dA = rng.standard_normal((11, 7)).astype(np.float32)
    db = dev(np.zeros(7, np.float32))
    be._launch(k.bias_grad_kernel(5, "float32"), (2,), (5, 5), dev(dA), db)
    np.testing.assert_allclose(db.copy_to_host(), dA.sum(axis=0), rtol=1e-5, atol=1e-6)


def test_gather_rows_and_scale_rows(rng):
    k = ck()
    be = make_backend(CONFIGS[0])
    X = rng.random((9, 7)).astype(np.float32)
    idx = np.array([4, 0, 8, 4], np.int64)
    out = dev(np.zeros((4, 7), np.float32))
    be._launch2(k.gather_rows, 4, 7, dev(X), dev(idx), out)
    np.testing.assert_array_equal(out.copy_to_host(), X[idx])
    w = rng.standard_normal(9).astype(np.float32)
    G = dev(X)
    be._launch2(k.scale_rows, 9, 7, G, dev(w))
    np.testing.assert_allclose(G.copy_to_host(), X * w[:, None], rtol=1e-6)


# -- posterior ----------------------------------------------------------------------------------

def test_reparam_kl_matches_reference(rng):
    """z = mu + exp(logvar/2) eps, the analytic KL, and log p(z) - log q(z|x) per row."""
    be = make_backend(CONFIGS[0])
    L, n, Z = 2, 4, 3
    out = rng.standard_normal((n, 2 * Z)).astype(np.float32)
    eps = rng.standard_normal((L, n, Z)).astype(np.float32)
    z, kl, logr = (dev(np.zeros(s, np.float32)) for s in ((L * n, Z), (n, Z), (L * n,)))
    be._reparam(dev(out), dev(eps), z, kl, logr, None)
    mu, lv = out[:, :Z], out[:, Z:]
    z_ref, _ = dist.reparam_forward(mu, lv, eps)
    np.testing.assert_allclose(z.copy_to_host(), z_ref.reshape(L * n, Z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl.copy_to_host(), dist.kl_forward(mu, lv), rtol=1e-5, atol=1e-6)
    logr_ref = dist.log_prior(z_ref) - dist.log_posterior_eps(lv, eps)
    np.testing.assert_allclose(logr.copy_to_host(), logr_ref.reshape(-1), rtol=1e-5, atol=1e-5)


def test_device_eps_statistics():
    """eps drawn on the device (xoroshiro128p, one state per thread): mean 0, variance 1, the
    N(0,1) fraction inside one sd, no two threads alike; and z = mu + exp(logvar/2) eps has
    mean mu and variance exp(logvar) (the variance, not the standard deviation)."""
    be = make_backend(CONFIGS[0])
    L, n, Z = 1, 400, 8
    rows = L * n
    out = np.zeros((n, 2 * Z), np.float32)
    out[:, Z // 2:Z] = 1.0                            # mu = 1 ...
    out[:, Z + Z // 2:] = math.log(4.0)               # ... and variance 4 in the second half
    eps, z, kl, logr = (dev(np.zeros(s, np.float32)) for s in ((L, n, Z), (rows, Z), (n, Z), (rows,)))
    states = be._create_states(rows, seed=7)
    be._reparam(dev(out), eps, z, kl, logr, states)
    e = eps.copy_to_host().reshape(rows, Z)
    N = e.size
    assert abs(e.mean()) < 4 / math.sqrt(N)
    assert abs(e.var() - 1) < 4 * math.sqrt(2 / N)
    assert abs(np.mean(np.abs(e) < 1) - 0.6827) < 4 * math.sqrt(0.6827 * 0.3173 / N)
    assert len({tuple(r) for r in e}) == rows         # every thread its own stream
    lag = np.corrcoef(e[:-1].ravel(), e[1:].ravel())[0, 1]
    assert abs(lag) < 4 / math.sqrt(N)                # neighbouring threads uncorrelated
    zz = z.copy_to_host()
    half = Z // 2
    np.testing.assert_allclose(zz[:, :half], e[:, :half], rtol=1e-6)
    m2 = zz[:, half:]
    assert abs(m2.mean() - 1) < 4 * 2 / math.sqrt(m2.size)
    assert abs(m2.var() / 4 - 1) < 4 * math.sqrt(2 / m2.size)
    # the same seed draws the same numbers, another seed others
    again = dev(np.zeros((L, n, Z), np.float32))
    be._reparam(dev(out), again, z, kl, logr, be._create_states(rows, seed=7))
    np.testing.assert_array_equal(again.copy_to_host().reshape(rows, Z), e)
    be._reparam(dev(out), again, z, kl, logr, be._create_states(rows, seed=8))
    assert not np.allclose(again.copy_to_host().reshape(rows, Z), e)


def test_iwae_weights_kernel(rng):
    k = ck()
    be = make_backend(CONFIGS[0])
    K, n, beta = 5, 3, 0.7
    ll = (rng.standard_normal((K, n)) * 20 - 50).astype(np.float32)
    logr = rng.standard_normal((K, n)).astype(np.float32)
    dlw, bound, acc = dev(np.zeros((K, n), np.float32)), dev(np.zeros(n, np.float32)), dev(np.zeros(1))
    be._launch1(k.iwae_weights, n, dev(ll), dev(logr), beta, dlw, bound, acc, 1.0 / n)
    logw = ll.astype(np.float64) + beta * logr
    loss, dlogw = obj.iwae_loss(logw)
    np.testing.assert_allclose(bound.copy_to_host(), obj.iwae_per_example(logw), rtol=1e-5)
    np.testing.assert_allclose(dlw.copy_to_host(), dlogw, rtol=1e-4, atol=1e-7)
    assert acc.copy_to_host()[0] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("objective,free_bits,kl_active", [("elbo", 0.0, None), ("elbo", "median", None),
                                                       ("elbo", "median", "flip"), ("iwae", 0.0, None)])
def test_posterior_backward_kernel(objective, free_bits, kl_active, rng):
    """dmu, dlogvar through z = mu + std eps and the KL (with free bits: decided here, or by
    ``kl_active``, the decision of every rank's share), or IWAE's prior terms."""
    be = make_backend(CONFIGS[0])
    L, n, Z, beta = 2, 5, 4, 0.8
    mu = rng.standard_normal((n, Z)).astype(np.float32)
    lv = (0.5 * rng.standard_normal((n, Z))).astype(np.float32)
    eps = rng.standard_normal((L, n, Z)).astype(np.float32)
    z, cache = dist.reparam_forward(mu, lv, eps)
    dz = rng.standard_normal((L, n, Z)).astype(np.float32)
    kl = dist.kl_forward(mu, lv)
    if free_bits == "median":                         # half the dims under the floor
        free_bits = float(np.median(kl.mean(axis=0)))
    if kl_active == "flip":                           # the other ranks' decision: this share's, reversed
        kl_active = (kl.mean(axis=0) <= free_bits).astype(np.float64)
    dlw = -rng.dirichlet(np.ones(L), size=n).T.astype(np.float32) / n       # (L, n), like -softmax/n
    out = np.concatenate([mu, lv], axis=1)
    dout, acc = dev(np.zeros((n, 2 * Z), np.float32)), dev(np.zeros(1))
    _, post = ck().rowsum_kernels(be.config.block, "float32")
    be._launch(post, (Z,), (be.config.block,), dev(out), dev(eps), dev(z.reshape(L * n, Z)),
               dev(dz.reshape(L * n, Z)), dev(kl), dev(dlw), dout, beta, free_bits,
               dev(np.asarray(kl_active if kl_active is not None else [0.0], np.float64)),
               int(kl_active is not None), int(objective == "iwae"), acc)
    if objective == "elbo":
        loss, _, dkl = obj.elbo_loss(np.zeros((L, n)), kl, beta, free_bits, kl_active)
        dmu, dlv = dist.reparam_backward(dz, cache)
        kmu, klv = dist.kl_backward(dkl, mu, lv)
        dmu, dlv = dmu + kmu, dlv + klv
        assert acc.copy_to_host()[0] == pytest.approx(loss, rel=1e-5)
    else:
        dmu, dlv = dist.reparam_backward(dz + (beta * dlw)[..., None] * (-z), cache)
        dlv = dlv + 0.5 * beta * dlw.sum(axis=0)[:, None]
    got = dout.copy_to_host()
    np.testing.assert_allclose(got[:, :Z], dmu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, Z:], dlv, rtol=1e-5, atol=1e-6)


# -- likelihoods -----------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", dist.LIKELIHOODS)
def test_likelihood_kernel(likelihood, rng):
    """log p(x|z) per row and scale * dlog p/dhead, against distributions.py; logits include the
    continuous Bernoulli's Taylor region and large magnitudes."""
    be = make_backend(CONFIGS[0], likelihood=likelihood)
    L, n, D = 2, 3, 7
    K = 2 * D if likelihood == "gaussian" else D
    head = (3 * rng.standard_normal((L, n, K))).astype(np.float32)
    head[0, 0, :4] = [0.0, 1e-3, -0.2, 30.0]
    if likelihood != "gaussian":
        head[1, 0, :2] = [-40.0, 0.29]
    x = rng.random((n, D)).astype(np.float32)
    if likelihood == "bernoulli":
        x = (x > 0.5).astype(np.float32)
    G, ll = dev(np.zeros((L * n, K), np.float32)), dev(np.zeros(L * n, np.float32))
    scale = -1.0 / (L * n)
    be._likelihood(dev(x), dev(head.reshape(L * n, K)), G, ll, scale, scale)
    ll_ref = dist.loglik_forward(likelihood, x, head, be.spec.var_floor)
    g_ref = dist.loglik_backward(likelihood, x, head, np.full((L, n), scale, np.float32), be.spec.var_floor)
    np.testing.assert_allclose(ll.copy_to_host(), ll_ref.reshape(-1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(G.copy_to_host(), g_ref.reshape(L * n, K), rtol=1e-4, atol=1e-7)
    assert be._take_loss() == pytest.approx(scale * ll_ref.sum(), rel=1e-5)


# -- optimizers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_update_kernels_match_reference(name, rng):
    """Three steps (t = 1, 2, 3: SGD's first-step buffer and Adam's bias corrections), weight decay on."""
    k = ck()
    be = make_backend(CONFIGS[0])
    P = 11
    p = rng.standard_normal(P).astype(np.float32)
    s1, s2 = np.zeros(P, np.float32), np.zeros(P, np.float32)
    dp, d1, d2 = dev(p), dev(s1), dev(s2)
    lr, wd = 0.05, 0.01
    for t in (1, 2, 3):
        g = rng.standard_normal(P).astype(np.float32)
        if name == "sgd":
            REFERENCE_UPDATES[name](p, g, s1, t, lr, 0.9, wd)
            be._launch1(k.sgd_update, P, dp, dev(g), d1, int(t == 1), lr, 0.9, wd)
        elif name == "adagrad":
            REFERENCE_UPDATES[name](p, g, s1, lr, 1e-10, wd)
            be._launch1(k.adagrad_update, P, dp, dev(g), d1, lr, 1e-10, wd)
        else:
            b1, b2 = 0.9, 0.999
            REFERENCE_UPDATES[name](p, g, s1, s2, t, lr, b1, b2, 1e-8, wd)
            be._launch1(k.adam_update, P, dp, dev(g), d1, d2, lr / (1 - b1 ** t), b1, b2,
                        1 / math.sqrt(1 - b2 ** t), 1e-8, wd)
    np.testing.assert_allclose(dp.copy_to_host(), p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d1.copy_to_host(), s1, rtol=1e-5, atol=1e-7)
    if name == "adam":
        np.testing.assert_allclose(d2.copy_to_host(), s2, rtol=1e-5, atol=1e-9)
