"""The public API of DESIGN.md: input checks, the writable parameter vector, dtypes, and
checkpoints (save/load round trip, atomic writes, clear errors for bad files)."""
import os
import pickle

import numpy as np
import pytest

import minivae
from minivae import VAE, checkpoint
from minivae.checkpoint import CheckpointError


def binary(n, d, seed=0):
    return (np.random.default_rng(seed).random((n, d)) < 0.5).astype(np.float64)


@pytest.fixture
def model():
    return VAE(6, 2, hidden=(5,), dtype="float64", seed=0)


# ----------------------------------------------------------------------------------------------
# bad input: ValueError whose message says what was expected
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(likelihood, bad):
    m = VAE(4, 2, hidden=(3,), likelihood=likelihood)
    x = np.full((2, 4), 0.5)
    x[1, 2] = bad
    for call in (m.loss_and_grad, m.elbo, m.iwae_bound, m.encode, m.reconstruct):
        with pytest.raises(ValueError, match="x must be finite: it contains NaN or inf"):
            call(x)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
@pytest.mark.parametrize("bad", [-0.01, 1.5])
def test_values_outside_0_1_are_refused_by_the_bernoulli_likelihoods(likelihood, bad):
    m = VAE(4, 2, hidden=(3,), likelihood=likelihood)
    x = np.full((2, 4), 0.5)
    x[0, 0] = bad
    with pytest.raises(ValueError, match=rf"x must lie in \[0, 1\] for the {likelihood} likelihood"):
        m.loss_and_grad(x)


def test_gaussian_accepts_any_real_values():
    m = VAE(4, 2, hidden=(3,), likelihood="gaussian", dtype="float64")
    loss, grad = m.loss_and_grad(np.array([[-3.0, 0.0, 2.5, 10.0]]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("x,match", [
    (np.zeros((2, 5)), r"x must have 6 columns \(x_dim\), got shape \(2, 5\)"),
    (np.zeros(6), r"x must be a 2-D array \(n, 6\), got 1-D"),
    (np.zeros((1, 2, 6)), r"x must be a 2-D array \(n, 6\), got 3-D"),
    (np.zeros((0, 6)), "x must have at least one row"),
    (np.array([["a"] * 6]), "x must be a real numeric array"),
    (np.zeros((2, 6), dtype=complex), "x must be a real numeric array"),
])
def test_bad_shapes_and_types_are_refused(model, x, match):
    with pytest.raises(ValueError, match=match):
        model.loss_and_grad(x)


@pytest.mark.parametrize("eps", [np.zeros((2, 3)), np.zeros((2, 1)), np.zeros((1, 3, 2)), np.zeros((3,)),
                                 np.zeros((1, 1, 2, 2)), np.zeros((0, 2, 2))])
def test_bad_eps_shape_is_refused(model, eps):
    with pytest.raises(ValueError, match=r"eps must have shape \(2, 2\) or \(L, 2, 2\)"):
        model.loss_and_grad(binary(2, 6), eps=eps)


def test_nonfinite_eps_is_refused(model):
    eps = np.zeros((1, 2, 2))
    eps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="eps must be finite"):
        model.loss_and_grad(binary(2, 6), eps=eps)


def test_eps_of_shape_n_by_z_is_one_sample(model):
    x = binary(3, 6)
    eps = np.random.default_rng(1).standard_normal((3, 2))
    assert model.loss_and_grad(x, eps=eps)[0] == model.loss_and_grad(x, eps=eps[None])[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="float16"), "dtype must be one of float32, float64"),
    (dict(dtype="int"), "dtype must be one of float32, float64"),
    (dict(likelihood="poisson"), "unknown likelihood 'poisson'; expected one of bernoulli, continuous_bernoulli, gaussian"),
    (dict(activation="gelu"), "unknown activation 'gelu'; expected one of relu, tanh, softplus, leaky_relu"),
    (dict(z_dim=0), "z_dim must be a positive integer, got 0"),
    (dict(z_dim=-2), "z_dim must be a positive integer"),
    (dict(z_dim=2.5), "z_dim must be a positive integer"),
    (dict(z_dim=True), "z_dim must be a positive integer"),
    (dict(x_dim=0), "x_dim must be a positive integer"),
    (dict(hidden=(4, 0)), "hidden must be a sequence of positive integers"),
    (dict(hidden="big"), "hidden must be a sequence of positive integers"),
    (dict(backend="tpu"), "unknown backend 'tpu'; expected one of numpy, numba, cuda"),
])
def test_bad_configuration_is_refused(kwargs, match):
    args = dict(x_dim=4, z_dim=2, hidden=(3,))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        VAE(**args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=-1.0), "beta must be a finite number >= 0"),
    (dict(beta=float("nan")), "beta must be a finite number >= 0"),
    (dict(beta="one"), "beta must be a number"),
    (dict(free_bits=-0.1), "free_bits must be a finite number >= 0"),
    (dict(samples=0), "samples must be a positive integer"),
])
def test_bad_loss_arguments_are_refused(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.loss_and_grad(binary(2, 6), **kwargs)


def test_bad_sample_and_decode_arguments(model):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0)
    with pytest.raises(ValueError, match=r"z must be a 2-D array \(m, 2\)"):
        model.decode(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="z must be finite"):
        model.decode(np.full((1, 2), np.nan))


# ----------------------------------------------------------------------------------------------
# the parameter vector the model computes from
# ----------------------------------------------------------------------------------------------

def test_params_is_a_flat_contiguous_writable_vector(model):
    p = model.params
    assert p.ndim == 1 and p.flags.c_contiguous and p.flags.writeable and p.size == model.layout.size
    assert p is model.params                               # the same buffer every time


def test_writing_into_params_changes_the_model(model):
    x = binary(4, 6)
    eps = np.random.default_rng(1).standard_normal((1, 4, 2))
    before = model.loss_and_grad(x, eps=eps)[0]
    mu_before = model.encode(x)[0].copy()
    model.params[model.layout.slots["enc.head.b"].offset] += 0.5     # mu_0 of every example moves
    assert model.loss_and_grad(x, eps=eps)[0] != before
    np.testing.assert_allclose(model.encode(x)[0][:, 0], mu_before[:, 0] + 0.5, rtol=1e-13)
    model.params[...] = 0.0                                 # in-place writes through numpy work too
    assert np.all(model.encode(x)[0] == 0)
    model.views()["dec.head.b"][...] = 3.0                  # and through the named views
    np.testing.assert_allclose(model.decode(np.zeros((1, 2))), 3.0)


def test_assigning_params_copies_into_the_same_buffer(model):
    buf = model.params
    model.params = np.ones(model.params.size)
    assert model.params is buf and np.all(buf == 1)
    with pytest.raises(ValueError, match="params must have shape"):
        model.params = np.ones(3)


def test_gradient_has_the_layout_of_params(model):
    loss, grad = model.loss_and_grad(binary(3, 6), eps=np.zeros((1, 3, 2)))
    assert grad.shape == model.params.shape and grad.dtype == model.params.dtype
    out = np.empty_like(model.params)
    loss2, grad2 = model.loss_and_grad(binary(3, 6), eps=np.zeros((1, 3, 2)), grad=out)
    assert grad2 is out and np.array_equal(grad, out) and loss == loss2


# ----------------------------------------------------------------------------------------------
# float32 and float64
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_float32_matches_float64(likelihood, objective):
    m64 = VAE(8, 3, hidden=(6, 5), activation="tanh", likelihood=likelihood, dtype="float64", seed=2)
    m32 = VAE(8, 3, hidden=(6, 5), activation="tanh", likelihood=likelihood, dtype="float32", seed=2)
    m32.params[...] = m64.params                            # the same weights, rounded
    m64.params[...] = m32.params
    rng = np.random.default_rng(3)
    x = rng.random((5, 8)) if likelihood != "bernoulli" else binary(5, 8, 3)
    eps = rng.standard_normal((4, 5, 3))
    l64, g64 = m64.loss_and_grad(x, eps=eps, objective=objective, beta=0.5)
    l32, g32 = m32.loss_and_grad(x, eps=eps, objective=objective, beta=0.5)
    assert isinstance(l32, float) and g32.dtype == np.float32 and g64.dtype == np.float64
    assert l32 == pytest.approx(l64, rel=1e-5, abs=1e-5)
    assert np.max(np.abs(g32 - g64)) <= 1e-4 * max(1.0, np.max(np.abs(g64)))
    for a, b in zip(m32.encode(x), m64.encode(x)):
        assert a.dtype == np.float32 and np.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dtype_may_be_given_as_a_numpy_type():
    assert VAE(4, 2, hidden=(3,), dtype=np.float64).params.dtype == np.float64
    assert VAE(4, 2, hidden=(3,), dtype=np.dtype("float32")).params.dtype == np.float32


def test_inputs_are_cast_to_the_model_dtype():
    m = VAE(4, 2, hidden=(3,), dtype="float32")
    x = np.array([[0, 1, 1, 0]], dtype=np.int64)            # integer pixels are fine
    mu, logvar = m.encode(x)
    assert mu.dtype == np.float32
    loss, grad = m.loss_and_grad(x.astype(np.float64), eps=np.zeros((1, 1, 2)))
    assert grad.dtype == np.float32 and np.isfinite(loss)


# ----------------------------------------------------------------------------------------------
# the rest of the public API
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
def test_sample_reconstruct_encode_decode_shapes(likelihood):
    m = VAE(6, 2, hidden=(5,), likelihood=likelihood, dtype="float64", seed=1)
    x = binary(3, 6)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (3, 2)
    assert m.elbo(x).shape == (3,) and m.iwae_bound(x, samples=4).shape == (3,)
    for mean in (True, False):
        s = m.sample(4, seed=0, mean=mean)
        assert s.shape == (4, 6)
        np.testing.assert_array_equal(s, m.sample(4, seed=0, mean=mean))     # seeded: reproducible
        if likelihood != "gaussian":
            assert s.min() >= 0 and s.max() <= 1
    r = m.reconstruct(x)
    assert r.shape == (3, 6)
    assert m.reconstruct(x, sample=True, seed=0).shape == (3, 6)
    head = m.decode(mu)
    if likelihood == "gaussian":
        np.testing.assert_allclose(r, head[0])
    else:
        assert head.shape == (3, 6)


def test_the_package_exports_the_public_api():
    assert minivae.VAE is VAE and callable(minivae.gradcheck.run_suite)
    assert isinstance(minivae.__version__, str)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "gaussian"])
def test_save_load_round_trip_is_exact(tmp_path, dtype, likelihood):
    m = VAE(6, 3, hidden=(5, 4), dec_hidden=(7,), activation="softplus", likelihood=likelihood,
            dtype=dtype, seed=4, var_floor=2e-3)
    m.params[...] += np.random.default_rng(5).standard_normal(m.params.size).astype(dtype)   # not just init
    path = tmp_path / "model.npz"
    m.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]     # atomic: no temporary file left behind
    r = VAE.load(path)
    assert r.params.dtype == m.params.dtype
    assert r.params.tobytes() == m.params.tobytes()          # bitwise
    assert r.config() == m.config()
    assert r.spec == m.spec
    x = binary(3, 6)
    eps = np.random.default_rng(6).standard_normal((2, 3, 3))
    l1, g1 = m.loss_and_grad(x, eps=eps)
    l2, g2 = r.loss_and_grad(x, eps=eps)
    assert l1 == l2 and g1.tobytes() == g2.tobytes()


def test_save_keeps_extra_meta_and_arrays(tmp_path, model):
    path = tmp_path / "ckpt.npz"
    model.save(path, extra_meta={"step": 7}, extra_arrays={"m": np.arange(3.0)})
    meta, arrays = checkpoint.load(path)
    assert meta["step"] == 7 and meta["config"] == model.config()
    np.testing.assert_array_equal(arrays["m"], np.arange(3.0))
    np.testing.assert_array_equal(arrays["params"], model.params)


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, model, monkeypatch):
    path = tmp_path / "model.npz"
    model.save(path)
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", crash)
    model.params[...] = 0.0
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]


def test_object_arrays_are_never_written(tmp_path, model):
    with pytest.raises(TypeError, match="only numeric arrays"):
        model.save(tmp_path / "x.npz", extra_arrays={"bad": np.array([{"a": 1}], dtype=object)})
    assert os.listdir(tmp_path) == []


def _bad_files(tmp_path, model):
    good = tmp_path / "good.npz"
    model.save(good)
    raw = good.read_bytes()
    files = {}
    files["missing"] = tmp_path / "missing.npz"
    (files.setdefault("empty", tmp_path / "empty.npz")).write_bytes(b"")
    (files.setdefault("junk", tmp_path / "junk.npz")).write_bytes(b"this is not a zip file\n" * 10)
    (files.setdefault("truncated", tmp_path / "truncated.npz")).write_bytes(raw[: len(raw) // 2])
    with open(files.setdefault("pickle", tmp_path / "pickle.npz"), "wb") as f:
        pickle.dump({"params": model.params}, f)
    np.savez(files.setdefault("object_array", tmp_path / "object_array.npz"),
             meta=np.array('{"format": "minivae-checkpoint", "version": 1}'),
             params=np.array([{"a": 1}], dtype=object))
    np.save(files.setdefault("plain_npy", tmp_path / "plain.npy"), model.params)
    np.savez(files.setdefault("no_meta", tmp_path / "no_meta.npz"), params=model.params)
    np.savez(files.setdefault("other_format", tmp_path / "other.npz"), meta=np.array('{"format": "x"}'))
    np.savez(files.setdefault("meta_not_json", tmp_path / "notjson.npz"), meta=np.array("{oops"))
    np.savez(files.setdefault("no_config", tmp_path / "noconfig.npz"),
             meta=np.array('{"format": "minivae-checkpoint", "version": 1}'), params=model.params)
    return files


BAD_KINDS = ["missing", "empty", "junk", "truncated", "pickle", "object_array", "plain_npy", "no_meta",
             "other_format", "meta_not_json", "no_config"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_files_raise_a_one_line_checkpoint_error(tmp_path, model, kind):
    path = _bad_files(tmp_path, model)[kind]
    with pytest.raises(CheckpointError) as info:
        VAE.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert isinstance(info.value, ValueError)                  # callers may catch ValueError
    if kind == "pickle" or kind == "object_array":
        assert "pickle" in msg


def test_parameters_that_do_not_fit_the_config_are_refused(tmp_path, model):
    path = tmp_path / "m.npz"
    checkpoint.save(path, {"kind": "model", "config": model.config()}, {"params": np.zeros(5)})
    with pytest.raises(CheckpointError, match="the config implies"):
        VAE.load(path)
    checkpoint.save(path, {"kind": "model", "config": model.config()},
                    {"params": model.params.astype(np.float32)})
    with pytest.raises(CheckpointError, match="dtype float32"):
        VAE.load(path)
