"""The stack's Gaussian-stage and objective kernels (kernels/cuda_kernels.py, ``stack_*``) against
their NumPy oracles (distributions.py, objectives.py), under the simulator: float64 to 1e-11 relative
(one float32 case per kernel family, 1e-4). The same oracles as tests/test_numba_stack.py's for the
numba kernels they mirror (kernels/cpu_stack.py). Tiny shapes: every CUDA thread is a Python thread.

Run by tests/test_cuda_sim.py in a process with NUMBA_ENABLE_CUDASIM=1.
"""
import numpy as np
import pytest
from simutil import configs, dev, make_backend

from minivae import distributions as dist
from minivae import objectives as obj
from minivae.gradcheck import rel_error

TOL = {np.float64: 1e-11, np.float32: 1e-4}
L, n, Z = 2, 3, 4
R = L * n


def ck():
    from minivae.kernels import cuda_kernels
    return cuda_kernels


def run(kernel, size, *args):
    make_backend(configs()[0])._launch1(kernel, size, *args)


def close(fast, ref, dtype):
    got = fast.copy_to_host() if hasattr(fast, "copy_to_host") else fast
    err = rel_error(np.asarray(got, np.float64), np.asarray(ref, np.float64))
    assert err <= TOL[dtype], err


def gauss_inputs(rng, shared, dtype):
    m = n if shared else R
    out = np.concatenate([rng.standard_normal((m, Z)), 0.5 * rng.standard_normal((m, Z))], axis=1)
    return out.astype(dtype), rng.standard_normal((L, n, Z)).astype(dtype)


def ref_z(out, eps, shared):
    """distributions.reparam_forward, with (L, n, Z) mu when not shared; z as (R, Z) rows l n + i."""
    mu, lv = out[:, :Z].astype(np.float64), out[:, Z:].astype(np.float64)
    if not shared:
        mu, lv = mu.reshape(L, n, Z), lv.reshape(L, n, Z)
    z, (std, _) = dist.reparam_forward(mu, lv, eps.astype(np.float64))
    return z.reshape(R, Z), std.reshape(-1, Z), mu, lv


@pytest.mark.parametrize("dtype,shared", [(np.float64, True), (np.float64, False), (np.float32, False)])
def test_reparameterization_and_log_densities(dtype, shared, rng):
    """stack_gauss_fwd (reparam_forward), stack_logq_eps_add (log_posterior_eps), stack_prior_add
    (log_prior), stack_kl_add (kl_forward summed over Z; one posterior per example when shared)."""
    k = ck()
    out, eps = gauss_inputs(rng, shared, dtype)
    std, z = dev(np.zeros((out.shape[0], Z), dtype)), dev(np.zeros((R, Z), dtype))
    run(k.stack_gauss_fwd, R, dev(out), dev(eps), std, z, int(shared))
    zr, stdr, mu, lv = ref_z(out, eps, shared)
    close(z, zr, dtype)
    close(std, stdr, dtype)
    acc = dev(np.full(R, 0.25))
    run(k.stack_logq_eps_add, R, dev(eps), dev(out), int(shared), acc, -0.7)
    close(acc, 0.25 - 0.7 * dist.log_posterior_eps(lv, eps.astype(np.float64)).reshape(-1), dtype)
    acc = dev(np.zeros(R))
    run(k.stack_prior_add, R, z, acc, 1.3)
    close(acc, 1.3 * dist.log_prior(z.copy_to_host().astype(np.float64)), dtype)
    acc = dev(np.full(R, 0.5))
    run(k.stack_kl_add, R, dev(out), acc, -0.6)
    kl = dist.kl_forward(mu, lv).sum(-1).reshape(-1)                        # (n,) shared, else (R,)
    close(acc, 0.5 - 0.6 * (np.tile(kl, L) if shared else kl), dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_gauss_logpdf_pair_and_prior_backward(dtype, rng):
    """stack_gauss_logpdf_add / _bwd (gauss_logpdf, gauss_logpdf_backward), stack_prior_bwd
    (log_prior_backward)."""
    k = ck()
    z = rng.standard_normal((R, Z)).astype(dtype)
    pm = np.concatenate([rng.standard_normal((R, Z)), 0.5 * rng.standard_normal((R, Z))], 1).astype(dtype)
    z64, m64, s64 = z.astype(np.float64), pm[:, :Z].astype(np.float64), pm[:, Z:].astype(np.float64)
    acc, u = dev(np.full(R, -1.0)), dev(np.zeros((R, Z), dtype))
    run(k.stack_gauss_logpdf_add, R, dev(z), dev(pm), acc, 0.7, u)
    close(acc, -1.0 + 0.7 * dist.gauss_logpdf(z64, m64, s64), dtype)
    close(u, (z64 - m64) * np.exp(-s64), dtype)
    a = rng.standard_normal(R)
    dz0 = rng.standard_normal((R, Z)).astype(dtype)
    dz, dpm = dev(dz0), dev(np.zeros_like(pm))
    run(k.stack_gauss_logpdf_bwd, R, dev(a), dev(z), dev(pm), u, dz, dpm)
    rz, rm, rs = dist.gauss_logpdf_backward(a, z64, m64, s64)
    close(dz, dz0 + rz, dtype)
    close(dpm, np.concatenate([rm, rs], 1), dtype)
    dz = dev(dz0)
    run(k.stack_prior_bwd, R, dev(a), dev(z), dz)
    close(dz, dz0 + dist.log_prior_backward(a, z64), dtype)


@pytest.mark.parametrize("shared,stopped,kl,dtype", [(True, False, False, np.float64), (True, True, False, np.float64),
                                                     (False, False, True, np.float64), (False, True, False, np.float64),
                                                     (True, False, True, np.float32)])
def test_posterior_backward_of_a_stack_layer(shared, stopped, kl, dtype, rng):
    """stack_posterior_bwd: reparam_backward + log_posterior_eps_backward (or, stopped, DReG's
    gauss_logpdf_backward with mu, logvar stopped, and its input-only upstream sq) + kl_backward."""
    k = ck()
    out, eps = gauss_inputs(rng, shared, dtype)
    zr, stdr, mu, lv = ref_z(out, eps, shared)
    z, std = zr.astype(dtype), stdr.astype(dtype)
    dz = rng.standard_normal((R, Z)).astype(dtype)
    aq = rng.standard_normal(R)
    ckl = 0.3 if kl else 0.0
    dout = dev(np.zeros_like(out))
    sq = dev(np.zeros_like(out) if not shared else np.zeros((1, 2 * Z), dtype))
    run(k.stack_posterior_bwd, out.shape[0], dev(dz), dev(eps), dev(z), dev(std), dev(out), dout, sq,
        dev(aq), 1.0, ckl, int(stopped), int(shared))
    dz3, a, z3 = dz.astype(np.float64).reshape(L, n, Z), aq.reshape(L, n), z.astype(np.float64).reshape(L, n, Z)
    if stopped:
        dzq, dmq, dvq = dist.gauss_logpdf_backward(a, z3, np.broadcast_to(mu, z3.shape), np.broadcast_to(lv, z3.shape))
        dz3 = dz3 + dzq
    dmu, dlv = dist.reparam_backward(dz3, (std.astype(np.float64).reshape(mu.shape), eps.astype(np.float64)))
    if not stopped:
        dlv = dlv + dist.log_posterior_eps_backward(a, lv)
    if kl:                                   # ckl per row: an example's L rows when shared
        kmu, klv = dist.kl_backward(np.full(mu.shape, ckl * (L if shared else 1)), mu, lv)
        dmu, dlv = dmu + kmu, dlv + klv
    close(dout, np.concatenate([dmu.reshape(-1, Z), dlv.reshape(-1, Z)], 1), dtype)
    if stopped and not shared:
        close(sq, np.concatenate([(dmu + dmq).reshape(-1, Z), (dlv + dvq).reshape(-1, Z)], 1), dtype)


def test_objective_kernels(rng):
    """stack_upstream (NumpyBackend._iwae_upstream; the ELBO's -beta/(nL)), stack_dreg_factor
    (objectives.dreg_weights), stack_elbo_bound (the per-sample terms' mean over L), stack_scale_rows_by,
    stack_add."""
    k = ck()
    beta = 0.7
    logw = 3 * rng.standard_normal((L, n))
    _, dlogw = obj.iwae_loss(logw)
    ap, aq = dev(np.zeros(R)), dev(np.zeros(R))
    run(k.stack_upstream, R, dev(dlogw.reshape(-1)), 1, beta, 1.0 / R, ap, aq)
    close(ap, beta * dlogw.reshape(-1), np.float64)
    close(aq, -beta * dlogw.reshape(-1), np.float64)
    run(k.stack_upstream, R, dev(dlogw.reshape(-1)), 0, beta, 1.0 / R, ap, aq)
    close(ap, np.full(R, -beta / R), np.float64)
    fac = dev(np.zeros(R))
    run(k.stack_dreg_factor, R, dev(dlogw.reshape(-1)), n, beta, fac, aq)
    ref = obj.dreg_weights(logw, beta).reshape(-1)
    close(aq, -beta * ref, np.float64)
    close(fac.copy_to_host() * dlogw.reshape(-1), ref, np.float64)        # DReG's = fac x IWAE's
    bound, acc = dev(np.zeros(n)), dev(np.zeros(1))
    run(k.stack_elbo_bound, n, dev(logw.reshape(-1)), L, bound, acc)
    close(bound, logw.mean(axis=0), np.float64)
    assert acc.copy_to_host()[0] == pytest.approx(-logw.mean(), rel=1e-12)
    a, b, f = rng.standard_normal((R, Z)), rng.standard_normal((R, Z)), rng.standard_normal(R)
    da = dev(a)
    run(k.stack_scale_rows_by, R, da, dev(f))
    close(da, a * f[:, None], np.float64)
    run(k.stack_add, R, da, dev(b))
    close(da, a * f[:, None] + b, np.float64)
