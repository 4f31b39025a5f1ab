"""The deterministic Autoencoder (docs/math.md §13): gradients in float64, meaning, checkpoints, input checks,
and the numba backend against the NumPy reference."""
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import minivae
from minivae import Autoencoder, VAE, gradcheck
from minivae.checkpoint import CheckpointError
from minivae.gradcheck import KINK_MARGIN, check_model, format_report
from minivae.layers import ACTIVATIONS
from cliutil import cli, one_line_error

MODEL_TOL = 1e-6
widths = st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple)


def assert_all_ok(checks):
    assert checks, "no tensor was checked"
    assert all(c.ok for c in checks), "\n" + format_report(checks)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------

@given(activation=st.sampled_from(ACTIVATIONS), x_dim=st.integers(1, 6), z_dim=st.integers(1, 3),
       hidden=widths, dec_hidden=st.one_of(st.none(), widths), n=st.integers(1, 4),
       seed=st.integers(0, 2**32 - 1))
def test_gradient_matches_centred_differences(activation, x_dim, z_dim, hidden, dec_hidden, n, seed):
    rng = np.random.default_rng(seed)
    model = Autoencoder(x_dim, z_dim, hidden=hidden, dec_hidden=dec_hidden, activation=activation,
                        dtype="float64", seed=seed % 1000)
    x = rng.random((n, x_dim))
    assume(gradcheck.ae_kink_distance(model, x) > KINK_MARGIN)
    loss, g = model.loss_and_grad(x)
    res = gradcheck.fd_resolution(loss)
    assume(all(np.max(np.abs(g[s.offset:s.offset + s.size])) == 0
               or np.max(np.abs(g[s.offset:s.offset + s.size])) * MODEL_TOL > 10 * res
               for s in model.layout.slots.values()))
    assert_all_ok(check_model(model, x, None, tol=MODEL_TOL))


def test_sq_error_piece_and_suite_cases():
    assert_all_ok(gradcheck.check_sq_error(np.random.default_rng(0)))
    results = gradcheck.run_ae_cases()
    assert [name for _, name, _ in results] == [f"autoencoder {a}" for a in gradcheck.AE_ACTIVATIONS]
    for _, _, checks in results:
        assert_all_ok(checks)


def test_gradient_check_catches_a_wrong_sigmoid_derivative(monkeypatch):
    """A backward that forgets the sigmoid's derivative x_hat (1 - x_hat) must fail the check."""
    from minivae.kernels import numpy_ae

    def wrong(de, cache):
        r, _ = cache
        return (2 * de)[:, None] * r
    monkeypatch.setattr(numpy_ae, "sq_error_backward", wrong)
    model = Autoencoder(5, 2, hidden=(4,), activation="tanh", dtype="float64")
    checks = check_model(model, np.random.default_rng(1).random((3, 5)), None)
    assert not all(c.ok for c in checks)


# ----------------------------------------------------------------------------------------------
# meaning
# ----------------------------------------------------------------------------------------------

def test_loss_is_the_batch_mean_of_the_squared_error_summed_over_pixels(rng):
    model = Autoencoder(7, 3, hidden=(6, 5), activation="softplus", dtype="float64")
    x = rng.random((5, 7))
    # the forward pass written out from the views, independently of the backend
    v = model.views()
    sp = lambda a: np.logaddexp(0, a)  # noqa: E731
    h = sp(sp(x @ v["enc.0.W"] + v["enc.0.b"]) @ v["enc.1.W"] + v["enc.1.b"])
    z = h @ v["enc.head.W"] + v["enc.head.b"]
    hd = sp(sp(z @ v["dec.0.W"] + v["dec.0.b"]) @ v["dec.1.W"] + v["dec.1.b"])
    xhat = 1 / (1 + np.exp(-(hd @ v["dec.head.W"] + v["dec.head.b"])))
    expected = ((xhat - x) ** 2).sum(axis=1)
    np.testing.assert_allclose(model.encode(x), z, rtol=1e-12)
    np.testing.assert_allclose(model.decode(z), xhat, rtol=1e-12)
    np.testing.assert_allclose(model.reconstruct(x), xhat, rtol=1e-12)
    np.testing.assert_allclose(model.sq_error(x), expected, rtol=1e-12)
    loss, _ = model.loss_and_grad(x)
    assert loss == pytest.approx(expected.mean(), rel=1e-12)


def test_layout_names_and_shapes():
    model = Autoencoder(10, 2, hidden=(8, 6))
    shapes = {n: s.shape for n, s in model.layout.slots.items()}
    assert shapes["enc.head.W"] == (6, 2) and shapes["dec.0.W"] == (2, 6) and shapes["dec.head.W"] == (8, 10)
    assert list(shapes)[0] == "enc.0.W" and list(shapes)[-1] == "dec.head.b"
    assert model.params.ndim == 1 and model.params.flags.c_contiguous and model.params.dtype == np.float32
    assert model.x_dim == 10 and model.z_dim == 2 and model.dec_hidden == (6, 8)


def test_decode_lies_in_the_unit_interval_even_for_extreme_codes():
    model = Autoencoder(6, 2, hidden=(5,), dtype="float32")
    out = model.decode(np.array([[1e4, -1e4], [0, 0], [-1e6, 1e6]]))
    assert out.dtype == np.float32 and np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_training_fits_the_digits():
    """A few hundred Adam steps on the embedded digits bring the reconstruction error far below
    the error of predicting the mean image (a deterministic run: fixed seeds)."""
    from minivae.data import load_dataset
    from minivae.optim import make_optimizer
    ds = load_dataset("digits", None, "none", 0.0, 0, "float32")
    x = ds.x_train
    model = Autoencoder(x.shape[1], 8, hidden=(64,), seed=0)
    opt = make_optimizer("adam", model.params.size, model.dtype, lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(300):
        _, g = model.loss_and_grad(x[rng.integers(0, len(x), 64)])
        opt.step(model.params, g)
    baseline = ((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()
    assert model.sq_error(x).mean() < 0.5 * baseline


# ----------------------------------------------------------------------------------------------
# checkpoints and input checks
# ----------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_kinds_do_not_mix(tmp_path):
    ae = Autoencoder(6, 2, hidden=(5,), activation="tanh", dtype="float64", seed=3)
    ae.params += 0.5
    ae.save(tmp_path / "ae.npz")
    back = Autoencoder.load(tmp_path / "ae.npz")
    np.testing.assert_array_equal(back.params, ae.params)
    assert back.config() == ae.config()
    with pytest.raises(CheckpointError, match="an Autoencoder checkpoint.*Autoencoder.load"):
        VAE.load(tmp_path / "ae.npz")
    VAE(6, 2, hidden=(5,)).save(tmp_path / "vae.npz")
    with pytest.raises(CheckpointError, match="a VAE checkpoint.*VAE.load"):
        Autoencoder.load(tmp_path / "vae.npz")
    from minivae.autoencoder import load_model
    assert isinstance(load_model(tmp_path / "ae.npz"), Autoencoder)
    assert isinstance(load_model(tmp_path / "vae.npz"), VAE)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("x, match", [
    (np.zeros(6), "2-D"),
    (np.zeros((2, 5)), "6 columns"),
    (np.zeros((0, 6)), "at least one row"),
    (np.full((2, 6), np.nan), "finite"),
    (np.full((2, 6), 1.5), r"\[0, 1\] for the Autoencoder"),
    (np.array([["a"] * 6]), "real numeric"),
])
def test_bad_x_is_a_clear_error(x, match):
    model = Autoencoder(6, 2, hidden=(5,))
    for call in (model.loss_and_grad, model.encode, model.reconstruct, model.sq_error):
        with pytest.raises(ValueError, match=match):
            call(x)


@pytest.mark.parametrize("kw, match", [
    (dict(z_dim=0), "z_dim must be a positive integer"),
    (dict(activation="gelu"), "unknown activation"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(backend="cuda"), "backend 'cuda' for the Autoencoder"),
    (dict(hidden=(0,)), "hidden must be"),
])
def test_bad_config_is_a_clear_error(kw, match):
    args = dict(x_dim=6, z_dim=2)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        Autoencoder(**args)


def test_bad_z_is_a_clear_error():
    model = Autoencoder(6, 2, hidden=(5,))
    with pytest.raises(ValueError, match=r"\(m, 2\)"):
        model.decode(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="finite"):
        model.decode(np.full((1, 2), np.inf))


def test_exported():
    assert minivae.Autoencoder is Autoencoder and "Autoencoder" in minivae.__all__


# ----------------------------------------------------------------------------------------------
# the numba backend against the NumPy reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gemm, tiles", [("blas", (16, 64)), ("custom", (3, 5))])
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-12), ("float32", 2e-5)])
@pytest.mark.parametrize("activation, hidden", [("relu", (7, 5)), ("tanh", ()), ("softplus", (4,)),
                                                ("leaky_relu", (6,))])
def test_numba_matches_numpy(monkeypatch, gemm, tiles, dtype, rtol, activation, hidden):
    from minivae.kernels import config
    monkeypatch.setattr(config, "GEMM", gemm)
    monkeypatch.setattr(config, "MB", tiles[0])
    monkeypatch.setattr(config, "NB", tiles[1])
    ref = Autoencoder(9, 3, hidden=hidden, activation=activation, dtype=dtype, seed=1)
    fast = Autoencoder(9, 3, hidden=hidden, activation=activation, dtype=dtype, seed=1, backend="numba")
    rng = np.random.default_rng(0)
    for n in (5, 1, 5):                       # a second shape, then the first workspace again
        x = rng.random((n, 9)).astype(dtype)
        lr, gr = ref.loss_and_grad(x)
        grad = np.full_like(fast.params, np.nan)
        lf, gf = fast.loss_and_grad(x, grad=grad)
        assert gf is grad
        assert lf == pytest.approx(lr, rel=rtol)
        assert np.abs(gf - gr).max() <= rtol * np.abs(gr).max()
        atol = 10 * np.finfo(dtype).eps
        np.testing.assert_allclose(fast.encode(x), ref.encode(x), rtol=rtol, atol=atol)
        np.testing.assert_allclose(fast.reconstruct(x), ref.reconstruct(x), rtol=rtol, atol=atol)
        np.testing.assert_allclose(fast.sq_error(x), ref.sq_error(x), rtol=rtol, atol=atol)
        z = 3 * rng.standard_normal((4, 3))
        np.testing.assert_allclose(fast.decode(z), ref.decode(z), rtol=rtol, atol=atol)


def test_numba_gradient_check_suite_cases():
    for _, _, checks in gradcheck.run_ae_cases(backend="numba"):
        assert_all_ok(checks)


def test_numba_checkpoint_loads_on_either_backend(tmp_path):
    fast = Autoencoder(6, 2, hidden=(5,), dtype="float64", backend="numba", seed=4)
    fast.save(tmp_path / "ae.npz")
    ref = Autoencoder.load(tmp_path / "ae.npz", backend="numpy")
    x = np.random.default_rng(0).random((3, 6))
    assert ref.loss_and_grad(x)[0] == pytest.approx(fast.loss_and_grad(x)[0], rel=1e-12)


# ----------------------------------------------------------------------------------------------
# minivae train --model ae, evaluate, sample, plot
# ----------------------------------------------------------------------------------------------

AE_RUN = ["train", "--model", "ae", "--dataset", "digits", "--epochs", "3", "--batch-size", "64",
          "--z-dim", "2", "--hidden", "16", "--quiet", "--lr", "3e-3"]



@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    from minivae.cli import main
    run = tmp_path_factory.mktemp("ae") / "run"
    assert main(AE_RUN + ["--out", str(run)]) == 0
    return run


def test_train_ae_writes_checkpoint_metrics_and_pictures(ae_run):
    import json
    from minivae.data import load_dataset
    from minivae.evaluate import mean_sq_error
    rows = [json.loads(line) for line in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(r["objective"] == "sq_error" for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    model = Autoencoder.load(ae_run / "model.npz")
    assert model.z_dim == 2 and model.hidden == (16,)
    # test_loss is the mean squared error per example on the test split
    ds = load_dataset("digits", None, "none", 0.1, 0, "float32")
    assert rows[-1]["test_loss"] == pytest.approx(model.sq_error(ds.x_test).mean(), rel=1e-5)
    assert rows[-1]["test_loss"] == pytest.approx(mean_sq_error(model, ds.x_test, batch_size=7), rel=1e-5)
    names = sorted(p.name for p in ae_run.glob("*.png"))
    assert names == ["curves.png", "interpolation.png", "latent.png", "manifold.png", "reconstructions.png"]


def test_resume_ae_is_bit_identical(tmp_path):
    from minivae.cli import main
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(AE_RUN + ["--out", str(full), "--no-plots"]) == 0
    assert main([a if a != "3" else "2" for a in AE_RUN] + ["--out", str(part), "--no-plots"]) == 0
    assert main(["train", "--resume", str(part), "--epochs", "3", "--quiet", "--no-plots"]) == 0
    a = Autoencoder.load(full / "model.npz")
    b = Autoencoder.load(part / "model.npz")
    np.testing.assert_array_equal(a.params, b.params)


def test_evaluate_sample_and_plot_an_ae_checkpoint(ae_run, tmp_path, capsys):
    import json
    code, out, _ = cli(capsys, "evaluate", ae_run, "--json")
    r = json.loads(out)
    assert code == 0 and r["elbo"] is None and r["recon_error"] > 0 and r["model"] == "ae"
    code, out, _ = cli(capsys, "evaluate", ae_run)
    assert code == 0 and "reconstruction error" in out and "need a VAE" in out
    code, _, err = cli(capsys, "sample", ae_run, "--out", tmp_path / "s.png")
    assert code == 1 and one_line_error(err) and "no prior" in err
    for kind in ("manifold", "latent", "interpolation", "reconstructions", "curves"):
        code, out, _ = cli(capsys, "plot", ae_run, "--kind", kind, "--out", tmp_path / f"{kind}.png")
        assert code == 0 and (tmp_path / f"{kind}.png").is_file()
    code, _, err = cli(capsys, "plot", ae_run, "--kind", "samples", "--out", tmp_path / "x.png")
    assert code == 1 and one_line_error(err)


@pytest.mark.parametrize("extra, match", [
    (["--beta", "0.5"], "--beta applies to --model vae only"),
    (["--objective", "iwae"], "--objective applies to --model vae only"),
    (["--likelihood", "gaussian"], "--likelihood applies to --model vae only"),
    (["--backend", "cuda"], "runs on backend numpy or numba"),
])
def test_train_ae_refuses_vae_options(tmp_path, capsys, extra, match):
    code, _, err = cli(capsys, *AE_RUN, "--out", tmp_path / "r", *extra)
    assert code == 1 and one_line_error(err) and match in err
    assert not (tmp_path / "r" / "model.npz").exists()


def test_train_model_choice_is_an_argparse_error(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--model", "gan", "--out", tmp_path / "r")
    assert code == 2 and "invalid choice" in err


def test_code_grid_spans_the_codes():
    from minivae import plots
    model = Autoencoder(16, 2, hidden=(8,), dtype="float64")
    codes = np.random.default_rng(0).normal([1.0, -5.0], [2.0, 0.5], size=(500, 2))
    z1, z2, means = plots.code_grid(model, codes, n=5)
    np.testing.assert_allclose([z1[0], z1[-1]], np.percentile(codes[:, 0], [1, 99]))
    np.testing.assert_allclose([z2[0], z2[-1]], np.percentile(codes[:, 1], [1, 99]))
    # tile (r, c) decodes (z1[c], z2[n - 1 - r])
    np.testing.assert_allclose(means[1 * 5 + 3], model.decode(np.array([[z1[3], z2[3]]]))[0])
    with pytest.raises(ValueError, match="2-D latent space"):
        plots.code_grid(Autoencoder(16, 3, hidden=(8,)), codes)
