"""The score-function (REINFORCE) estimator of the ELBO's gradient (docs/math.md §5.4).

Statistical tests with fixed seeds: the score estimate is unbiased (its mean over many eps matches
the reparameterized gradient within its standard error), a known bias is detected by the same test,
and on a trained model its variance is much the larger one.
"""
import numpy as np
import pytest

from minivae import VAE, estimators, gradcheck
from minivae.kernels import numpy_ as numpy_backend
from minivae.objectives import ESTIMATORS, check_estimator

Z_LIMIT = 4.0     # |z| of a projection of the mean difference; N(0, 1) exceeds it with p = 6e-5


def _small_model_and_x():
    model = VAE(12, 2, hidden=(6,), activation="tanh", dtype="float64", seed=2)
    x = (np.random.default_rng(3).random((4, 12)) < 0.5).astype(np.float64)
    return model, x


def projected_z_scores(model, diff, seed=7, projections=3):
    """{(tensor, k): z} for fixed random projections of each encoder tensor's per-estimate
    difference: mean / (std / sqrt S)."""
    r = np.random.default_rng(seed)
    S = diff.shape[0]
    out = {}
    for name, sl in model.layout.slots.items():
        if not name.startswith("enc."):
            continue
        for k in range(projections):
            d = diff[:, sl.offset:sl.offset + sl.size] @ r.standard_normal(sl.size)
            out[name, k] = float(d.mean() / (d.std(ddof=1) / np.sqrt(S)))
    return out


def paired_difference(model, x, S=400, L=50, seed=5):
    """S estimates of L samples each, score minus reparam on the same eps: (S, P)."""
    gs = estimators.gradient_samples(model, x, S, "score", L=L, seed=seed)
    gr = estimators.gradient_samples(model, x, S, "reparam", L=L, seed=seed)
    return gs - gr


def test_tuple_and_names():
    assert ESTIMATORS == ("reparam", "score", "dreg")
    for name in ESTIMATORS:
        check_estimator(name)
    with pytest.raises(ValueError, match="unknown estimator 'pathwise'"):
        check_estimator("pathwise")


def test_same_loss_same_decoder_gradient_different_encoder_gradient(rng):
    model, x = _small_model_and_x()
    eps = rng.standard_normal((3, 4, 2))
    ls, gs = model.loss_and_grad(x, eps=eps, estimator="score", beta=0.7)
    lr, gr = model.loss_and_grad(x, eps=eps, beta=0.7)
    assert ls == lr
    dec, enc = estimators.part_slice(model, "dec"), estimators.part_slice(model, "enc")
    np.testing.assert_array_equal(gs[dec], gr[dec])
    assert not np.allclose(gs[enc], gr[enc])


def test_score_piece_matches_centred_differences():
    checks = gradcheck.check_score(np.random.default_rng(0))
    assert [c.name for c in checks] == ["score dmu", "score dlogvar"]
    assert all(c.ok for c in checks), gradcheck.format_report(checks)


def test_score_is_a_zero_mean_function(rng):
    """E_q[d log q/d mu] = E[eps]/sigma = 0 and E_q[d log q/d logvar] = E[eps^2 - 1]/2 = 0: with a
    constant f the estimate averages to zero (the property that makes REINFORCE unbiased)."""
    logvar = rng.standard_normal((3, 2))
    eps = rng.standard_normal((200000, 3, 2))
    dmu, dlogvar = estimators.score_backward(np.full(eps.shape[:2], 1.0 / len(eps)), eps, logvar)
    se = np.sqrt(np.exp(-logvar) / len(eps))
    assert np.all(np.abs(dmu) < 4 * se)
    assert np.all(np.abs(dlogvar) < 4 * np.sqrt(0.5 / len(eps)))


def test_score_estimate_is_unbiased():
    """Over 20000 eps (400 estimates of L = 50), the mean of score - reparam on the same eps is zero
    within its standard error, on three fixed random projections of every encoder tensor."""
    model, x = _small_model_and_x()
    diff = paired_difference(model, x)
    zs = projected_z_scores(model, diff)
    assert len(zs) == 12
    assert max(abs(z) for z in zs.values()) < Z_LIMIT, zs
    dec = estimators.part_slice(model, "dec")
    assert np.all(diff[:, dec] == 0)


def test_the_unbiasedness_test_detects_a_known_bias(monkeypatch):
    """The same test, run on a score estimate that forgets the -1 of (eps^2 - 1)/2 (a bias of
    E[f]/2 in the logvar direction), must fail: the threshold is meaningful."""
    def biased(w, eps, logvar):
        dmu, _ = estimators.score_backward(w, eps, logvar)
        return dmu, 0.5 * (w[..., None] * eps * eps).sum(axis=0)
    monkeypatch.setattr(numpy_backend, "score_backward", biased)
    model, x = _small_model_and_x()
    zs = projected_z_scores(model, paired_difference(model, x))
    assert max(abs(z) for z in zs.values()) > 2 * Z_LIMIT


def test_score_variance_is_much_larger_on_a_trained_model():
    """Train a small digits VAE for 300 Adam steps, then compare the total variance (trace of the
    covariance) of the encoder's single-sample gradient under both estimators on the same eps."""
    from minivae.data import load_dataset
    from minivae.optim import make_optimizer
    x = load_dataset("digits", None, "none", 0.0, 0, "float64").x_train
    model = VAE(64, 2, hidden=(32,), dtype="float64", seed=0)
    opt = make_optimizer("adam", model.params.size, model.dtype, lr=3e-3)
    rng = np.random.default_rng(0)
    first = None
    for _ in range(300):
        loss, g = model.loss_and_grad(x[rng.integers(0, len(x), 64)])
        first = loss if first is None else first
        opt.step(model.params, g)
    assert loss < first                      # it did train
    enc = estimators.part_slice(model, "enc")
    var = {e: estimators.total_variance(estimators.gradient_samples(model, x[:16], 200, e, seed=1)[:, enc])
           for e in ("score", "reparam")}
    assert var["score"] > 10 * var["reparam"], var


@pytest.mark.parametrize("kw, match", [
    (dict(estimator="dreg"), "'dreg' is not available"),
    (dict(estimator="score", objective="iwae"), "objective 'elbo' only"),
    (dict(estimator="nope"), "unknown estimator"),
])
def test_refusals_are_one_line(kw, match):
    model, x = _small_model_and_x()
    with pytest.raises(ValueError, match=match):
        model.loss_and_grad(x, **kw)


def test_numba_backend_refuses_the_score_estimator():
    model = VAE(12, 2, hidden=(6,), dtype="float64", backend="numba")
    with pytest.raises(ValueError, match="backend 'numpy' only"):
        model.loss_and_grad(np.zeros((2, 12)), estimator="score")


def test_gradient_samples_checks_its_arguments():
    model, x = _small_model_and_x()
    g = estimators.gradient_samples(model, x, 3, "score", L=2, seed=0)
    assert g.shape == (3, model.params.size) and g.dtype == np.float64
    np.testing.assert_array_equal(g, estimators.gradient_samples(model, x, 3, "score", L=2, seed=0))
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        estimators.gradient_samples(model, x, 0)
    with pytest.raises(ValueError, match="eps must have shape"):
        estimators.gradient_samples(model, x, 2, eps=np.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="part must be"):
        estimators.part_slice(model, "head")
