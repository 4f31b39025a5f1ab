"""The fused numba path for stacks of S > 1 stochastic layers (minivae/kernels/cpu_stack.py).

Every kernel against its NumPy oracle (distributions.py, objectives.py, the reference's blocks), in
float64 (relative 1e-12) and float32 (1e-4 relative to the float64 oracle); the whole step against the
NumPy reference for S = 2 and 3, every objective and estimator, likelihood and activation; and no native
allocation per step in steady state (NUMBA_NRT_STATS).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minivae import VAE, gradcheck
from minivae import distributions as dist
from minivae import objectives as obj
from minivae.kernels import cpu_stack as cs

rel_error = gradcheck.rel_error
ROOT = Path(__file__).resolve().parents[1]
TOL = {np.float64: 1e-12, np.float32: 1e-4}
DTYPES = (np.float64, np.float32)


def close(fast, ref, dtype):
    """fast (computed in dtype) against ref (the float64 oracle)."""
    assert rel_error(np.asarray(fast, dtype=np.float64), np.asarray(ref, dtype=np.float64)) <= TOL[dtype]


def gauss_inputs(rng, L, n, Z, shared, dtype):
    m = n if shared else L * n
    out = np.concatenate([rng.standard_normal((m, Z)), 0.5 * rng.standard_normal((m, Z))], axis=1)
    eps = rng.standard_normal((L, n, Z))
    return out.astype(dtype), eps.astype(dtype)


def ref_z(out, eps, shared):
    """distributions.reparam_forward, with (L, n, Z) mu when not shared; z as (R, Z) rows l n + i."""
    L, n, Z = eps.shape
    mu, lv = out[:, :Z].astype(np.float64), out[:, Z:].astype(np.float64)
    if not shared:
        mu, lv = mu.reshape(L, n, Z), lv.reshape(L, n, Z)
    z, (std, _) = dist.reparam_forward(mu, lv, eps.astype(np.float64))
    return z.reshape(L * n, Z), std.reshape(-1, Z), mu, lv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [True, False])
def test_gauss_fwd_and_log_densities_match_their_oracles(dtype, shared):
    rng = np.random.default_rng(0)
    L, n, Z = 3, 4, 5
    out, eps = gauss_inputs(rng, L, n, Z, shared, dtype)
    std, z = np.empty((out.shape[0], Z), dtype), np.empty((L * n, Z), dtype)
    cs.gauss_fwd_(out, eps, std, z, shared)
    zr, stdr, mu, lv = ref_z(out, eps, shared)
    close(z, zr, dtype)
    close(std, stdr, dtype)
    e64 = eps.astype(np.float64)
    # log q in eps form (distributions.log_posterior_eps), summed into acc with a weight
    acc = np.full(L * n, 0.25)
    cs.logq_eps_add_(eps, out, shared, acc, -0.7)
    close(acc, 0.25 - 0.7 * dist.log_posterior_eps(lv, e64).reshape(-1), dtype)
    # log N(z; 0, I) (distributions.log_prior)
    acc = np.zeros(L * n)
    cs.prior_add_(z, acc, 1.3)
    close(acc, 1.3 * dist.log_prior(z.astype(np.float64)), dtype)
    if not shared:
        # the top layer's analytic KL per row (distributions.kl_forward summed over Z)
        acc = np.zeros(L * n)
        cs.kl_add_(out, acc, -0.5)
        close(acc, -0.5 * dist.kl_forward(mu, lv).sum(-1).reshape(-1), dtype)


def test_exp_f32_matches_libm():
    """The vectorizable float32 e^x of the Gaussian stage (cpu_stack.exp_f32) against np.exp in float64."""
    x = np.concatenate([np.linspace(-87, 88, 20001), [-0.0, 1e-8, -1e-8]]).astype(np.float32)
    got = np.array([cs.exp_f32(v) for v in x], dtype=np.float64)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(got - ref) / ref) < 1e-6
    assert 0 <= cs.exp_f32(np.float32(-200.0)) < 1e-37 and np.isfinite(cs.exp_f32(np.float32(88.0)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gauss_logpdf_pair_matches_its_oracle(dtype):
    rng = np.random.default_rng(1)
    R, Z = 12, 4
    z = rng.standard_normal((R, Z)).astype(dtype)
    pm = np.concatenate([rng.standard_normal((R, Z)), 0.5 * rng.standard_normal((R, Z))], 1).astype(dtype)
    z64, m64, s64 = z.astype(np.float64), pm[:, :Z].astype(np.float64), pm[:, Z:].astype(np.float64)
    acc = np.full(R, -1.0)
    u, tt = np.empty_like(z), np.empty_like(z)
    cs.gauss_logpdf_add_(z, pm, acc, 0.7, u, tt)
    close(acc, -1.0 + 0.7 * dist.gauss_logpdf(z64, m64, s64), dtype)
    close(u, (z64 - m64) * np.exp(-s64), dtype)
    a = rng.standard_normal(R)
    dz0 = rng.standard_normal((R, Z)).astype(dtype)
    dz, dpm = dz0.copy(), np.empty_like(pm)
    cs.gauss_logpdf_bwd_(a, z, pm, u, dz, dpm)
    rz, rm, rs = dist.gauss_logpdf_backward(a, z64, m64, s64)
    close(dz, dz0.astype(np.float64) + rz, dtype)
    close(dpm, np.concatenate([rm, rs], 1), dtype)
    dz = dz0.copy()
    cs.prior_bwd_(a, z, dz)
    close(dz, dz0.astype(np.float64) + dist.log_prior_backward(a, z64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared,stopped,kl", [(True, False, False), (True, True, False),
                                               (False, False, True), (False, False, False),
                                               (False, True, False)])
def test_posterior_bwd_matches_its_oracles(dtype, shared, stopped, kl):
    """B5-B6 of one layer: distributions.reparam_backward + log_posterior_eps_backward (or, stopped,
    gauss_logpdf_backward) + kl_backward."""
    rng = np.random.default_rng(2)
    L, n, Z = 3, 4, 5
    R = L * n
    out, eps = gauss_inputs(rng, L, n, Z, shared, dtype)
    std, z = np.empty((out.shape[0], Z), dtype), np.empty((R, Z), dtype)
    cs.gauss_fwd_(out, eps, std, z, shared)
    zr, stdr, mu, lv = ref_z(out, eps, shared)
    dz = rng.standard_normal((R, Z)).astype(dtype)
    aq = rng.standard_normal(R)
    ckl = 0.3 if kl else 0.0
    dout = np.empty_like(out)
    sq = np.empty_like(out) if not shared else np.empty((0, 2 * Z), dtype)
    cs.posterior_bwd_(dz.copy(), eps, z, std, out, dout, sq, aq, 1.0, ckl, stopped, shared)
    # the oracle, in float64 on the same z
    e64 = eps.astype(np.float64)
    dz3 = dz.astype(np.float64).reshape(L, n, Z)
    a = aq.reshape(L, n)
    z3 = z.astype(np.float64).reshape(L, n, Z)
    if stopped:
        dzq, dmq, dvq = dist.gauss_logpdf_backward(a, z3, np.broadcast_to(mu, z3.shape), np.broadcast_to(lv, z3.shape))
        dz3 = dz3 + dzq
    dmu, dlv = dist.reparam_backward(dz3, (std.astype(np.float64).reshape(mu.shape), e64))
    if not stopped:
        dlv = dlv + dist.log_posterior_eps_backward(a, lv)
    if kl:
        kmu, klv = dist.kl_backward(np.full(mu.shape, ckl), mu, lv)
        dmu, dlv = dmu + kmu, dlv + klv
    close(dout, np.concatenate([dmu.reshape(-1, Z), dlv.reshape(-1, Z)], 1), dtype)
    if stopped and not shared:
        close(sq, np.concatenate([(dmu + dmq).reshape(-1, Z), (dlv + dvq).reshape(-1, Z)], 1), dtype)


def test_dreg_factor_matches_dreg_weights():
    rng = np.random.default_rng(3)
    k, n, beta = 4, 6, 0.7
    logw = 3 * rng.standard_normal((k, n))
    loss, dlogw = obj.iwae_loss(logw)
    fac, aq = np.empty(k * n), np.empty(k * n)
    cs.dreg_factor_(dlogw.reshape(-1), n, beta, fac, aq)
    ref = obj.dreg_weights(logw, beta)
    assert rel_error(aq, -beta * ref.reshape(-1)) <= 1e-12
    assert rel_error(fac * dlogw.reshape(-1), ref.reshape(-1)) <= 1e-12     # DReG's = fac x IWAE's


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus", "leaky_relu"])
def test_mlp_bwd_dx_is_the_blocks_input_gradient(dtype, activation):
    """Oracle: the reference block's input gradient (NumpyBackend._block_backward)."""
    from minivae.kernels.numpy_ import NumpyBackend
    m = VAE(6, (3, 2), hidden=((5, 4), (4, 3)), activation=activation, dtype="float64", seed=4)
    rng = np.random.default_rng(5)
    m.params[...] = 0.5 * rng.standard_normal(m.params.shape)
    be = cs.NumbaStackBackend(m.spec, dtype)
    ws = be.workspace(4, 3)                               # enc2 has R = 12 rows
    params = m.params.astype(dtype)
    h = rng.standard_normal((12, 3)).astype(dtype)
    t0, t1 = be.blk[2]                                    # enc2
    gemm, mb, nb = be._gemm()
    cs.mlp_fwd_(params, be.lay, t0, t1, h, ws.ws, ws.bo, be.act, gemm, ws.view("pack")[0], mb, nb)
    dout = rng.standard_normal((12, 4)).astype(dtype)
    nl = len(be.lay)
    ref = NumpyBackend(m.spec, "float64")
    _, cache = ref._block_forward(m.params, "enc2", h.astype(np.float64))
    dxr, _ = ref._block_backward(dout.astype(np.float64), cache)
    wt = np.empty(be.wt_size, dtype)
    cs.pack_claimed_(params, be.lay, wt, np.zeros(8, dtype=np.int64))
    in_part = be._gemm(in_part=True)[0]                          # the custom GEMM, as in a split's part
    for code, w in ((gemm, be._no_wt), (in_part, be._no_wt), (in_part, wt)):   # W^T packed by each product, or before
        dx = np.empty((12, 3), dtype)
        cs.mlp_bwd_dx_(params, be.lay, t0, t1, dout.copy(), dx, ws.ws, ws.bo, nl, be.act, code,
                       ws.view("pack")[0], mb, nb, ws.view("dbs")[0], w)
        close(dx, dxr, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_claiming_panels_pack_each_once_as_gemm_nt_would(dtype):
    """The split step's shared W^T (cs.pack_claimed_): P threads (nogil) claiming panels at once, each into
    a buffer of its own, together write every panel of every listed layer exactly once, as
    gemm.pack_bt_panels_ packs the whole W (its oracle), and nothing for the skipped layer (enc's
    first: no product reads its W^T); the counter ends at panels + P (one claim past the end each)."""
    import threading
    from minivae.kernels.gemm import pack_bt_panels_, panel_width
    m = VAE(33, z_dim=(5, 3), hidden=((20, 7), (9,)), dtype="float64", seed=1, backend="numpy")
    be = cs.NumbaStackBackend(m.spec, dtype)
    params = np.random.default_rng(8).standard_normal(m.params.shape).astype(dtype)
    lay, nr = be.lay, panel_width(dtype)
    assert lay[be.blk[0, 0], 4] == -1 and (np.delete(lay[:, 4], be.blk[0, 0]) >= 0).all()
    ref = np.full(be.wt_size, np.nan, dtype)
    panels = 0
    for t, (wo, _, fan_in, fan_out, off) in enumerate(lay):
        if off >= 0:
            pack_bt_panels_(params[wo:wo + fan_in * fan_out].reshape(fan_in, fan_out), ref[off:], 0,
                            -(-fan_in // nr))
            panels += -(-fan_in // nr)
    assert not np.isnan(ref).any()                          # the offsets tile the buffer
    for P in (1, 2, 3, 5):
        for _ in range(5):
            shares = np.full((P, be.wt_size), np.nan, dtype)
            claim = np.zeros(8, dtype=np.int64)
            go = threading.Barrier(P)

            def run(p):
                go.wait()
                cs.pack_claimed_(params, lay, shares[p], claim)

            threads = [threading.Thread(target=run, args=(p,)) for p in range(P)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            written = ~np.isnan(shares)
            assert (written.sum(axis=0) == 1).all(), P             # each element by exactly one thread
            assert np.array_equal(np.nansum(shares, axis=0), ref), P
            assert claim[0] == panels + P, P


def test_workspace_names_every_buffer_and_is_reused():
    m = VAE(10, (4, 3), hidden=((6, 5), (5,)), backend="numba", dtype="float32", seed=0)
    be = m.backend
    ws = be.workspace(7, 2)
    assert be.workspace(7, 2) is ws
    assert ws.view("enc.head").shape == (7, 8) and ws.view("enc2.head").shape == (14, 6)
    assert ws.view("dec2.head").shape == (14, 8) and ws.view("d:dec2.head").shape == (14, 8)
    assert ws.view("z2").shape == (14, 3) and ws.view("std1").shape == (7, 4) and ws.view("sq2").shape == (14, 6)
    assert ws.view("u1").shape == (14, 4) and ws.view("u2").shape == (0, 3)
    assert ws.view("lp").shape == (1, 10) and ws.view("bound").shape == (7,)
    assert [ws.index[f"{p}"] for p, _, _ in m.layout.layers] == list(range(len(m.layout.layers)))


# ----------------------------------------------------------------------------------------------
# the whole step against the NumPy reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("z,hidden,likelihood,activation", [
    ((5, 3), ((7, 6), (4, 4)), "bernoulli", "tanh"),
    ((5, 3), ((7,), ()), "gaussian", "softplus"),
    ((4, 3, 2), ((6,), (5,), (3,)), "continuous_bernoulli", "relu"),
])
def test_fused_stack_step_matches_the_reference_in_both_dtypes(z, hidden, likelihood, activation):
    kw = dict(hidden=hidden, activation=activation, likelihood=likelihood, seed=3)
    ref = VAE(11, z, backend="numpy", dtype="float64", **kw)
    f64 = VAE(11, z, backend="numba", dtype="float64", **kw)
    f32 = VAE(11, z, backend="numba", dtype="float32", **kw)
    rng = np.random.default_rng(6)
    x = gradcheck.make_inputs(likelihood, 5, 11, rng)
    eps = tuple(rng.standard_normal((4, 5, q)) for q in z)
    x32, eps32 = x.astype(np.float32), tuple(e.astype(np.float32) for e in eps)
    for objective, estimator, beta in (("elbo", "reparam", 1.0), ("elbo", "reparam", 0.4),
                                       ("iwae", "reparam", 1.0), ("iwae", "dreg", 1.0), ("iwae", "dreg", 0.6)):
        kw = dict(objective=objective, estimator=estimator, beta=beta)
        lr, gr = ref.loss_and_grad(x, eps=eps, **kw)
        gr = gr.copy()
        lf, gf = f64.loss_and_grad(x, eps=eps, **kw)
        assert lf == pytest.approx(lr, rel=1e-12) and rel_error(gf, gr) <= 1e-12, (objective, estimator)
        l32, g32 = f32.loss_and_grad(x32, eps=eps32, **kw)
        assert l32 == pytest.approx(lr, rel=1e-4) and rel_error(g32, gr) <= 1e-4, (objective, estimator, beta)
    for bound in ("elbo", "iwae_bound"):
        np.testing.assert_allclose(getattr(f64, bound)(x, eps), getattr(ref, bound)(x, eps), rtol=1e-12)
        np.testing.assert_allclose(getattr(f32, bound)(x32, eps32), getattr(ref, bound)(x, eps), rtol=1e-4)


def test_negligible_importance_weights_get_no_gradient_and_leave_no_subnormal_rows():
    """docs/math.md §5.2, "Negligible weights": one sample of each example drawn far out (eps scaled by s,
    sigma small, so -log q sets it tens to hundreds of nats ahead of the others). A sample more than
    2 log eps behind its example's best gets dlogw = 0 exactly, the others their softmax weight; no buffer
    of the float32 pass holds a subnormal number; the gradient matches the float64 reference (which keeps
    every weight) as ever. The sweep must put samples where the weights alone would make the rows
    subnormal in float32 (87-104 nats behind), or it tests nothing."""
    kw = dict(hidden=((7, 6), (4, 4)), activation="tanh", likelihood="bernoulli", seed=3)
    ref, f64, f32 = (VAE(11, (5, 3), backend=b, dtype=d, **kw)
                     for b, d in (("numpy", "float64"), ("numba", "float64"), ("numba", "float32")))
    for m in (ref, f64, f32):
        m.layout.views(m.params)["enc.head.b"][5:] = -4.0            # sigma_1 = e^-2
    rng = np.random.default_rng(1)
    x = (rng.random((5, 11)) < 0.5).astype(np.float64)
    tiny = np.finfo(np.float32).tiny
    in_window = flushed = 0
    for s in np.linspace(3, 9, 13):
        e1 = rng.standard_normal((4, 5, 5))
        e1[0] *= s
        eps = (e1, rng.standard_normal((4, 5, 3)))
        lr, gr = ref.loss_and_grad(x, eps=eps, objective="iwae")
        gr = gr.copy()
        l64, g64 = f64.loss_and_grad(x, eps=eps, objective="iwae")
        assert l64 == pytest.approx(lr, rel=1e-12) and rel_error(g64, gr) <= 1e-12, s
        l32, g32 = f32.loss_and_grad(x.astype(np.float32), eps=tuple(e.astype(np.float32) for e in eps),
                                     objective="iwae")
        assert l32 == pytest.approx(lr, rel=1e-4) and rel_error(g32, gr) <= 1e-4, s
        ws = f32.backend.workspace(5, 4)
        logw, dlogw = ws.view("logw").reshape(4, 5), ws.view("dlogw").reshape(4, 5)
        behind = logw - logw.max(axis=0)
        lse = logw.max(axis=0) + np.log(np.exp(behind).sum(axis=0))
        keep = behind >= 2 * np.log(np.finfo(np.float32).eps)
        assert np.all(dlogw[~keep] == 0.0), s
        np.testing.assert_allclose(dlogw[keep], (-np.exp(logw - lse) / 5)[keep], rtol=1e-12)
        flushed += int((~keep).sum())
        in_window += int(((behind < -87) & (behind > -104)).sum())
        for name in ws.index:
            a = ws.view(name)
            assert not np.any((a != 0) & (np.abs(a) < tiny)), (s, name)
    assert flushed > 10 and in_window > 0


def test_the_stack_trains_with_the_fused_optimizer_updates():
    from minivae.optim import make_optimizer
    m = VAE(8, (3, 2), hidden=(5,), backend="numba", dtype="float32", seed=0)
    opt = make_optimizer("adam", m.params.size, "float32", backend=m.backend, lr=1e-3)
    assert opt.update is cs.adam_update
    x = (np.random.default_rng(0).random((6, 8)) < 0.5).astype(np.float32)
    eps = tuple(np.random.default_rng(1).standard_normal((2, 6, q)).astype(np.float32) for q in (3, 2))
    before = m.loss_and_grad(x, eps=eps, objective="iwae")[0]
    for _ in range(30):
        opt.step(m.params, m.loss_and_grad(x, eps=eps, objective="iwae")[1])
    assert m.loss_and_grad(x, eps=eps, objective="iwae")[0] < before


NRT_SCRIPT = """
import numpy as np
from numba.core.runtime import rtsys
from minivae import VAE
from minivae.kernels import cpu
m = VAE(20, (4, 3), hidden=((16,), (8,)), backend="numba", dtype="float32")
rng = np.random.default_rng(0)
x = (rng.random((8, 20)) < 0.5).astype(np.float32)
eps = tuple(rng.standard_normal((3, 8, z)).astype(np.float32) for z in (4, 3))
g, ms, vs = (np.zeros_like(m.params) for _ in range(3))
def steps(k):
    for i in range(k):
        est = "dreg" if i % 2 else "reparam"
        m.backend.loss_and_grad(m.params, x, eps, objective="iwae", estimator=est, grad=g)
        cpu.adam_update(m.params, g, ms, vs, 7, 1e-3, 0.9, 0.999, 1e-8, 0.0)
steps(3)
a = rtsys.get_allocation_stats()
steps(50)
b = rtsys.get_allocation_stats()
print(b.alloc - a.alloc, b.free - a.free, b.mi_alloc - a.mi_alloc, b.mi_free - a.mi_free)
"""
# Array arguments that cross the Python -> jit boundary per step, each wrapped in a MemInfo (no data
# copied): params, grad, x, ws, bo, ws64, lay, blk, wt (empty in a whole pass) and the S = 2 eps arrays
# for stack_step_ (11), and params, grad, m, v for adam_update (4).
BOUNDARY_ARRAYS_PER_STEP = 9 + 2 + 4


def test_no_native_allocation_per_step(tmp_path):
    """Numba's allocator (NRT statistics, 50 steady-state IWAE/DReG steps of a two-layer model): no
    buffer is allocated inside the kernels; the only NRT objects are the argument wrappers, all freed.
    Its own cache folder: the statistics build must not share numba's cache (tests/test_numba.py)."""
    env = dict(os.environ, NUMBA_NRT_STATS="1", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", NRT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    alloc, free, mi_alloc, mi_free = map(int, r.stdout.split())
    assert alloc == mi_alloc == 50 * BOUNDARY_ARRAYS_PER_STEP, (alloc, mi_alloc)
    assert (free, mi_free) == (alloc, mi_alloc)


def test_the_pieces_reuse_one_workspace_and_match_the_reference():
    """encode / encode_up / decode / decode_down on numba run cpu.mlp_fwd_ into a workspace cached per row
    count (nothing but the returned array allocated per call), with the reference's numbers."""
    kw = dict(x_dim=12, z_dim=(5, 3), hidden=((7, 6), (6,)), activation="tanh", dtype="float64", seed=0)
    fast, ref = VAE(backend="numba", **kw), VAE(backend="numpy", **kw)
    rng = np.random.default_rng(0)
    x, z1, z2 = rng.random((9, 12)), rng.standard_normal((9, 5)), rng.standard_normal((9, 3))
    calls = [("encode", (x,)), ("encode_up", (z1, 2)), ("decode", (z1,)), ("decode_down", (z2, 2))]
    for name, args in calls:
        a = getattr(fast.backend, name)(fast.params, *args)
        b = getattr(ref.backend, name)(ref.params, *args)
        assert rel_error(np.asarray(a), np.asarray(b)) <= 1e-12, name
    ws = fast.backend.piece_workspace(9)
    out1 = fast.backend.decode(fast.params, z1)
    assert fast.backend.piece_workspace(9) is ws and not np.shares_memory(out1, ws.ws)
    out2 = fast.backend.decode(fast.params, z1 + 1.0)
    assert not np.array_equal(out1, out2)                        # the first result was not overwritten


def test_minivae_gradcheck_on_numba_covers_two_layers():
    """`minivae gradcheck --backend numba` runs every two-layer case the numba stack backend implements
    (reparam and DReG) through its fused pass, and they pass."""
    results = gradcheck.run_model_cases(backend="numba")
    names = {name for _, name, _ in results}
    for lik, o, est in gradcheck.stack_suite_cases():
        assert f"S=2 {lik} {o} {est}" in names
    assert all(c.ok for _, _, checks in results for c in checks)
