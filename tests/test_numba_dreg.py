"""DReG (§12) on the numba backend for one stochastic layer: kernels/cpu.py's NumbaBackend runs it
through the stack's fused pass, cpu_stack.stack_step_, with S = 1 (eps a tuple of one array). The
kernels that S = 1 changes (the top layer's KL and log q shared by the L samples of an example)
against their NumPy oracles, then the whole pass against NumpyBackend: every objective and estimator
the pass runs, float64 to 1e-12 and float32 to 1e-4.
"""
import numpy as np
import pytest

from minivae import VAE, gradcheck
from minivae import distributions as dist
from minivae.kernels import cpu_stack as cs
from minivae.kernels.numpy_ import NumpyBackend
from minivae.model import ModelSpec

rel_error = gradcheck.rel_error
TOL = {np.float64: 1e-12, np.float32: 1e-4}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_the_top_kl_per_row_matches_its_oracle_shared_or_not(dtype, shared):
    """kl_add_: row r = l n + i reads posterior m = r mod m_out: the example's (S = 1, m_out = n) or
    the row's own (S > 1, m_out = R). Oracle: distributions.kl_forward summed over Z."""
    rng = np.random.default_rng(2)
    L, n, Z = 3, 4, 5
    m = n if shared else L * n
    out = np.concatenate([rng.standard_normal((m, Z)), 0.5 * rng.standard_normal((m, Z))], 1).astype(dtype)
    acc = np.full(L * n, 0.5)
    cs.kl_add_(out, acc, -0.7)
    o64 = out.astype(np.float64)
    kl = dist.kl_forward(o64[:, :Z], o64[:, Z:]).sum(-1)                      # (m,)
    ref = 0.5 - 0.7 * (np.tile(kl, L) if shared else kl)
    assert rel_error(acc, ref) <= TOL[dtype]


CASES = [((4,), "bernoulli", "tanh"), ((5, 3), "gaussian", "softplus"), ((), "continuous_bernoulli", "relu")]


@pytest.mark.parametrize("hidden,likelihood,activation", CASES)
def test_the_stack_pass_with_one_layer_matches_the_reference(hidden, likelihood, activation):
    """stack_step_ with S = 1 (what NumbaBackend's DReG runs) equals NumpyBackend for ELBO and IWAE,
    reparam and DReG, two betas, L = 3; the bounds too."""
    spec = ModelSpec(7, 3, hidden=hidden, activation=activation, likelihood=likelihood)
    rng = np.random.default_rng(5)
    params = spec.layout.init(rng, np.float64)
    x = gradcheck.make_inputs(likelihood, 4, 7, rng, np.float64)
    eps = rng.standard_normal((3, 4, 3))
    ref = NumpyBackend(spec, np.float64)
    for dtype in (np.float64, np.float32):
        st = cs.NumbaStackBackend(spec, dtype)
        p, xx, e = params.astype(dtype), x.astype(dtype), eps.astype(dtype)
        for objective, estimator, beta in (("elbo", "reparam", 1.0), ("elbo", "reparam", 0.4),
                                           ("iwae", "reparam", 0.7), ("iwae", "dreg", 1.0), ("iwae", "dreg", 0.6)):
            kw = dict(beta=beta, objective=objective, estimator=estimator)
            lr, gr = ref.loss_and_grad(params, x, eps, **kw)
            lf, gf = st.loss_and_grad(p, xx, (e,), **kw)
            assert lf == pytest.approx(lr, rel=TOL[dtype]), (dtype, objective, estimator, beta)
            assert rel_error(gf, gr) <= TOL[dtype], (dtype, objective, estimator, beta)
        for objective in ("elbo", "iwae"):
            np.testing.assert_allclose(st.bound(p, xx, (e,), objective, 0.8),
                                       ref.bound(params, x, eps, objective, 0.8), rtol=TOL[dtype])


def test_the_numba_backend_runs_dreg_for_one_layer():
    """The model's API: backend 'numba' with one stochastic layer takes estimator='dreg' and gives the
    reference's loss and gradient (float64, 1e-12); its reparam pass is still the fused one-layer one."""
    kw = dict(hidden=(6,), seed=4)
    ref = VAE(9, 2, backend="numpy", dtype="float64", **kw)
    fast = VAE(9, 2, backend="numba", dtype="float64", **kw)
    assert fast.backend.estimators == ("reparam", "dreg")
    rng = np.random.default_rng(8)
    x = (rng.random((5, 9)) > 0.5).astype(np.float64)
    eps = rng.standard_normal((4, 5, 2))
    for beta in (1.0, 0.5):
        lr, gr = ref.loss_and_grad(x, eps=eps, objective="iwae", estimator="dreg", beta=beta)
        gr = gr.copy()
        lf, gf = fast.loss_and_grad(x, eps=eps, objective="iwae", estimator="dreg", beta=beta)
        assert lf == pytest.approx(lr, rel=1e-12) and rel_error(gf, gr) <= 1e-12
    # DReG changes only the encoder's gradient: the decoder's is IWAE's
    _, g_iwae = fast.loss_and_grad(x, eps=eps, objective="iwae")
    g_iwae = g_iwae.copy()
    _, g_dreg = fast.loss_and_grad(x, eps=eps, objective="iwae", estimator="dreg")
    dec = [n for n in fast.layout.names if n.startswith("dec")]
    enc = [n for n in fast.layout.names if n.startswith("enc")]
    for name in dec:
        assert rel_error(fast.layout.view(g_dreg, name), fast.layout.view(g_iwae, name)) <= 1e-12
    assert max(rel_error(fast.layout.view(g_dreg, n), fast.layout.view(g_iwae, n)) for n in enc) > 1e-3
    with pytest.raises(ValueError, match="estimator 'dreg' applies to the iwae objective only"):
        fast.backend.loss_and_grad(fast.params, x, eps, objective="elbo", estimator="dreg")
