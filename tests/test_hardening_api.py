"""Issue 10, part 3: the API checks its arguments once, in the model, the same way for every backend;
size flags that would need more memory than the machine has are refused up front in one line;
evaluate stays within --batch-size rows per backend call, reports standard errors and per-example
values, and never prints NaN as JSON.

Each test covers a class of bad input (every variant of it that we know), not one report.
"""
import json
import math
import threading
import tracemalloc

import numpy as np
import pytest

from minivae import VAE, checks, resources
from minivae import evaluate as ev
from minivae.cli import SAMPLE_MAX, main
from minivae.data import load_dataset
from minivae.kernels.numpy_ import NumpyBackend
from minivae.model import ModelSpec
from minivae.optim import make_optimizer
from minivae.train import SerialComm
from cliutil import cli, one_line_error as one_line

BACKENDS = ["numpy", "numba"]



def binary(n, d, seed=0):
    return (np.random.default_rng(seed).random((n, d)) < 0.5).astype(np.float64)


@pytest.fixture(params=BACKENDS)
def model(request):
    return VAE(6, 2, hidden=(5,), dtype="float64", seed=0, backend=request.param)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", dtype="float64").x_test


# ----------------------------------------------------------------------------------------------
# grad=: the same ValueError on every backend, nothing silently truncated or re-typed
# ----------------------------------------------------------------------------------------------

def _bad_grads(p):
    ro = np.empty_like(p)
    ro.flags.writeable = False
    return {
        "float32 for float64 params": np.empty(p.size, dtype=np.float32),
        "int64": np.empty(p.size, dtype=np.int64),
        "too short": np.empty(p.size - 1, dtype=p.dtype),
        "too long": np.empty(p.size + 1, dtype=p.dtype),
        "2-D": np.empty((1, p.size), dtype=p.dtype),
        "strided view": np.empty(2 * p.size, dtype=p.dtype)[::2],
        "Fortran 2-D": np.empty((p.size, 1), dtype=p.dtype, order="F"),
        "read-only": ro,
        "a list": [0.0] * p.size,
        "params itself": p,
    }


@pytest.mark.parametrize("case", list(_bad_grads(np.zeros(4))))
def test_bad_grad_buffers_give_the_same_error_on_every_backend(case):
    x, eps = binary(3, 6), np.zeros((1, 3, 2))
    messages = {}
    for backend in BACKENDS:
        m = VAE(6, 2, hidden=(5,), dtype="float64", seed=0, backend=backend)
        before = m.params.copy()
        with pytest.raises(ValueError, match="grad must") as e:
            m.loss_and_grad(x, eps=eps, grad=_bad_grads(m.params)[case])
        assert np.array_equal(m.params, before)             # nothing was written anywhere
        messages[backend] = str(e.value)
    assert len(set(messages.values())) == 1, messages


def test_a_good_grad_buffer_is_filled_and_returned_on_every_backend():
    x, eps = binary(3, 6), np.random.default_rng(1).standard_normal((2, 3, 2))
    grads = {}
    for backend in BACKENDS:
        m = VAE(6, 2, hidden=(5,), dtype="float64", seed=0, backend=backend)
        buf = np.full_like(m.params, np.nan)
        _, g = m.loss_and_grad(x, eps=eps, grad=buf)
        assert g is buf and np.isfinite(buf).all()
        grads[backend] = buf
    np.testing.assert_allclose(grads["numba"], grads["numpy"], rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# numbers, integers, seeds, flags, arrays
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(beta="0.5"), "beta must be a number"),
    (dict(beta=b"1"), "beta must be a number"),
    (dict(beta=True), "beta must be a number"),
    (dict(beta=1 + 0j), "beta must be a number"),
    (dict(beta=None), "beta must be a number"),
    (dict(beta=[1.0]), "beta must be a number"),
    (dict(beta=float("inf")), "beta must be a finite number >= 0"),
    (dict(free_bits="1"), "free_bits must be a number"),
    (dict(free_bits=np.bool_(True)), "free_bits must be a number"),
    (dict(free_bits=np.nan), "free_bits must be a finite number >= 0"),
    (dict(samples=2.0), "samples must be a positive integer"),
    (dict(samples="2"), "samples must be a positive integer"),
    (dict(samples=True), "samples must be a positive integer"),
    (dict(samples=-3), "samples must be a positive integer"),
    (dict(objective="vae"), "objective"),
])
def test_bad_numbers_give_the_same_error_on_every_backend(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.loss_and_grad(binary(2, 6), **kwargs)


def test_numpy_scalars_are_numbers_and_give_the_numbers_of_floats(model):
    x, eps = binary(4, 6), np.random.default_rng(2).standard_normal((1, 4, 2))
    ref = model.loss_and_grad(x, eps=eps, beta=0.5, free_bits=0.1)
    for beta, fb in [(np.float64(0.5), np.float32(0.1)), (np.array(0.5), np.float64(0.1))]:
        loss, grad = model.loss_and_grad(x, eps=eps, beta=beta, free_bits=fb)
        assert loss == pytest.approx(ref[0], rel=1e-6)
    assert model.loss_and_grad(x, eps=eps, beta=np.int64(1))[0] == model.loss_and_grad(x, eps=eps, beta=1.0)[0]


@pytest.mark.parametrize("eps, match", [
    (np.array([["a", "b"]] * 2), "eps must be a real numeric array"),
    (np.zeros((2, 2), dtype=bool), "eps must be a real numeric array"),
    (np.zeros((2, 2), dtype=complex), "eps must be a real numeric array"),
    (np.zeros((2, 2), dtype=object), "eps must be a real numeric array"),
    ([[0.0, 1.0], [2.0]], "eps must be a real numeric array"),
    (np.zeros((2, 3)), r"eps must have shape \(2, 2\)"),
    (np.zeros((1, 1, 2, 2)), r"eps must have shape"),
    (np.full((2, 2), np.inf), "eps must be finite"),
])
def test_bad_eps(model, eps, match):
    for call in (model.loss_and_grad, model.elbo, model.iwae_bound):
        with pytest.raises(ValueError, match=match):
            call(binary(2, 6), eps=eps)


def test_samples_must_agree_with_a_given_eps(model):
    eps = np.zeros((3, 2, 2))
    with pytest.raises(ValueError, match="samples=5 disagrees with eps, which holds 3"):
        model.loss_and_grad(binary(2, 6), eps=eps, samples=5)
    with pytest.raises(ValueError, match="samples=2 disagrees"):
        model.iwae_bound(binary(2, 6), eps=eps, samples=2)
    assert model.iwae_bound(binary(2, 6), eps=eps, samples=3).shape == (2,)


@pytest.mark.parametrize("x, match", [
    (np.array([["0"] * 6]), "x must be a real numeric array"),
    (np.zeros((1, 6), dtype=bool), "x must be a real numeric array"),
    (np.zeros((1, 6), dtype=complex), "x must be a real numeric array"),
    ([[0.0] * 6, [0.0]], "x must be a real numeric array"),
])
def test_bad_x_dtypes(model, x, match):
    for call in (model.loss_and_grad, model.elbo, model.encode, model.reconstruct):
        with pytest.raises(ValueError, match=match):
            call(x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=2.0), "n must be a positive integer"),
    (dict(n="3"), "n must be a positive integer"),
    (dict(n=True), "n must be a positive integer"),
    (dict(n=2, seed="1"), "seed must be None, an integer >= 0"),
    (dict(n=2, seed=-1), "seed must be None, an integer >= 0"),
    (dict(n=2, seed=1.5), "seed must be None, an integer >= 0"),
    (dict(n=2, seed=True), "seed must be None, an integer >= 0"),
    (dict(n=2, mean="no"), "mean must be True or False"),
])
def test_bad_sample_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.sample(**kwargs)


@pytest.mark.parametrize("seed", ["0", -1, 1.0, True])
def test_bad_model_seeds(seed):
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        VAE(6, 2, hidden=(5,), seed=seed)


def test_good_seeds_are_what_default_rng_takes(model):
    a = model.sample(3, seed=np.int64(4))
    np.testing.assert_array_equal(a, model.sample(3, seed=4))
    np.testing.assert_array_equal(model.sample(3, seed=np.random.SeedSequence(4)), a)
    assert model.sample(3, seed=np.random.default_rng(4), mean=np.bool_(False)).shape == (3, 6)


def test_bad_reconstruct_and_decode_arguments(model):
    x = binary(2, 6)
    with pytest.raises(ValueError, match="sample must be True or False"):
        model.reconstruct(x, sample="yes")
    with pytest.raises(ValueError, match="seed must be None"):
        model.reconstruct(x, sample=True, seed="s")
    with pytest.raises(ValueError, match="z must be a real numeric array"):
        model.decode(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="z must have at least one row"):
        model.decode(np.zeros((0, 2)))


@pytest.mark.parametrize("value, match", [
    ("abc", "params must be a real numeric array"),
    (np.array(["1.0"] * 3), "params must be a real numeric array"),
    (True, "params must be a real numeric array"),
    (np.ones(3), "params must have shape"),
])
def test_bad_params_assignments_leave_the_params_alone(model, value, match):
    before = model.params.copy()
    with pytest.raises(ValueError, match=match):
        model.params = value
    assert np.array_equal(model.params, before)


def test_non_finite_params_are_refused_by_the_setter(model):
    before = model.params.copy()
    bad = before.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="params must be finite"):
        model.params = bad
    assert np.array_equal(model.params, before)
    model.params = before.astype(np.float32)          # any real dtype, cast into the same buffer
    np.testing.assert_allclose(model.params, before, rtol=1e-6)


@pytest.mark.parametrize("name, kwargs, match", [
    ("adam", dict(lr="0.1"), "learning rate must be a number"),
    ("adam", dict(lr=True), "learning rate must be a number"),
    ("adam", dict(lr=-1e-3), "learning rate must be a finite number > 0"),
    ("adam", dict(weight_decay="0"), "weight decay must be a number"),
    ("adam", dict(betas=("0.9", 0.999)), "betas must be a number"),
    ("adam", dict(betas=0.9), "betas must be a pair"),
    ("adam", dict(betas="ab"), "betas must be a pair"),
    ("adam", dict(eps="1e-8"), "eps must be a number"),
    ("adam", dict(eps=-1.0), "eps must be a finite number >= 0"),
    ("adagrad", dict(eps=float("nan")), "eps must be a finite number >= 0"),
    ("sgd", dict(momentum=True), "momentum must be a number"),
    ("sgd", dict(momentum="0.9"), "momentum must be a number"),
])
def test_bad_optimizer_hyper_parameters(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, 4, "float32", **kwargs)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_step_refuses_vectors_that_would_broadcast_or_retype(name, backend):
    m = VAE(6, 2, hidden=(5,), dtype="float32", backend=backend)
    opt = make_optimizer(name, m.params.size, m.dtype, backend=m.backend)
    p = m.params
    for grad in (np.ones(1, np.float32), np.ones(p.size, np.float64), np.ones(2 * p.size, np.float32)[::2]):
        with pytest.raises(ValueError, match="grad must be a C-contiguous 1-D array"):
            opt.step(p, grad)
    with pytest.raises(ValueError, match="params must be"):
        opt.step(p.astype(np.float64), np.ones(p.size, np.float32))
    assert opt.t == 0
    opt.step(p, np.ones(p.size, np.float32))
    assert opt.t == 1


def test_check_helpers_accept_what_they_document():
    assert checks.number("a", np.float32(2.5)) == 2.5 and type(checks.number("a", 3)) is float
    assert checks.integer("n", np.int32(4)) == 4 and type(checks.integer("n", np.int32(4))) is int
    assert checks.integer("k", 0, lo=0) == 0
    assert checks.number("m", 0.5, lo=0, hi=1, hi_open=True) == 0.5
    with pytest.raises(ValueError, match=r"m must be a finite number in \[0, 1\), got 1"):
        checks.number("m", 1, lo=0, hi=1, hi_open=True)


# ----------------------------------------------------------------------------------------------
# memory: refused up front, in one line, without allocating
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def gib_available(monkeypatch):
    """This machine 'has' 2 GiB available: the refusals do not depend on the machine running the tests."""
    monkeypatch.setattr(resources, "available_bytes", lambda: 2 * resources.GiB)


@pytest.mark.parametrize("args", [
    ["--hidden", 10 ** 9],
    ["--hidden", 400, 10 ** 30],                           # beyond int64: Python ints throughout
    ["--z-dim", 10 ** 9],
    ["--samples", 10 ** 7],
    ["--objective", "iwae", "--k", 10 ** 7],
    ["--batch-size", 10 ** 9],
    ["--eval-batch-size", 10 ** 9],
])
def test_huge_training_flags_are_refused_in_one_line_without_allocating(tmp_path, capsys, gib_available, args):
    run = tmp_path / "run"
    tracemalloc.start()
    try:
        code, out, err = cli(capsys, "train", "--dataset", "digits", "--epochs", 1, "--quiet", "--no-plots",
                             "--out", run, *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 1 and one_line(err), err
    assert "would need about" in err and "GiB, this machine has 2.0 GiB available" in err
    assert peak < 64 * 2 ** 20                               # numpy's allocations are traced too
    assert not run.exists()                                  # refused before any folder was made


def test_the_model_refuses_a_parameter_vector_it_cannot_hold(gib_available):
    size = ModelSpec(784, 2, (10 ** 6, 10 ** 3)).layout.size                  # the layout, never allocated
    with pytest.raises(resources.MemoryLimitError, match=f"a model of {size:,} parameters would need about"):
        VAE(784, 2, hidden=(10 ** 6, 10 ** 3))
    with pytest.raises(ValueError, match="would need about"):         # MemoryLimitError is a ValueError
        VAE(10, 10 ** 12, hidden=())


def test_api_passes_that_would_not_fit_are_refused_before_drawing(model, gib_available):
    x = binary(4, 6)
    tracemalloc.start()
    try:
        with pytest.raises(resources.MemoryLimitError, match="forward/backward pass of 4 examples x 1000000000"):
            model.loss_and_grad(x, samples=10 ** 9)
        with pytest.raises(resources.MemoryLimitError, match="forward pass of 4 examples"):
            model.iwae_bound(x, samples=10 ** 9)
        with pytest.raises(resources.MemoryLimitError, match=r"forward pass of 10000000000 examples"):
            model.sample(10 ** 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2 ** 20


def test_estimates_grow_with_every_size_and_match_the_layout():
    spec = VAE(64, 3, hidden=(16, 8), likelihood="gaussian").spec
    assert resources.parameter_count(spec) == spec.layout.size
    base = resources.training_bytes(spec, 4, 128, 1)
    assert resources.training_bytes(spec, 8, 128, 1) > base
    assert resources.training_bytes(spec, 4, 256, 1) > base
    assert resources.training_bytes(spec, 4, 128, 2) > base
    assert resources.training_bytes(spec, 4, 128, 1, "sgd") < base                # one state vector, not two
    # a step needs at least its decoder head output, (L n, K) values
    assert resources.pass_bytes(spec, 4, 100, 7) >= 700 * spec.head_width * 4


def test_sample_n_is_bounded_by_what_one_png_grid_shows(tmp_path, capsys):
    m = VAE(64, 2, hidden=(8,))
    m.save(tmp_path / "m.npz")
    for n in (0, SAMPLE_MAX + 1, 10 ** 12):
        code, _, err = cli(capsys, "sample", tmp_path / "m.npz", "--n", n, "--out", tmp_path / "s.png")
        assert code == 2 and one_line(err, "minivae sample: error: argument --n") and str(SAMPLE_MAX) in err
    assert not (tmp_path / "s.png").exists()


def test_a_memory_error_is_one_line_as_a_last_resort(tmp_path, capsys, monkeypatch):
    m = VAE(64, 2, hidden=(8,))
    m.save(tmp_path / "m.npz", extra_meta={"dataset": "digits"})

    def boom(*a, **k):
        raise MemoryError("Unable to allocate 7.28 TiB for an array with shape (1000000000000,)")
    monkeypatch.setattr(ev, "evaluate", boom)
    code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz")
    assert code == 1 and one_line(err) and "out of memory" in err and "7.28 TiB" in err and out == ""


# ----------------------------------------------------------------------------------------------
# evaluate: every backend call within --batch-size rows, for every flag combination
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def recorded_rows(monkeypatch):
    """Wrap the reference backend to record the rows (examples x samples) of every call."""
    rows = []
    for name, count in [("bound", lambda a: a[2].shape[0] * a[2].shape[1]),     # eps (L, n, Z)
                        ("encode", lambda a: a[1].shape[0]),                     # x (n, D)
                        ("decode", lambda a: a[1].shape[0])]:                    # z (m, Z)
        original = getattr(NumpyBackend, name)

        def wrapper(self, *a, _original=original, _count=count, **k):
            rows.append(_count(a))                       # a = (params, x or z, [eps])
            return _original(self, *a, **k)
        monkeypatch.setattr(NumpyBackend, name, wrapper)
    return rows


@pytest.mark.parametrize("iw_samples", [0, 1, 7, 250])
@pytest.mark.parametrize("chunk", [1, 3, 100, 10 ** 6])
@pytest.mark.parametrize("batch_size", [1, 5, 64, 10 ** 9])
def test_evaluate_calls_stay_within_batch_size_rows(recorded_rows, digits, iw_samples, chunk, batch_size):
    model = VAE(64, 3, hidden=(8,), dtype="float64", seed=1)
    x = digits[:11]
    r = ev.evaluate(model, x, iw_samples=iw_samples, chunk=chunk, batch_size=batch_size)
    assert recorded_rows and max(recorded_rows) <= batch_size
    assert r["n"] == len(x) and math.isfinite(r["elbo"])


def test_evaluate_command_stays_within_batch_size_rows(recorded_rows, tmp_path, capsys):
    m = VAE(64, 3, hidden=(8,), dtype="float64")
    m.save(tmp_path / "m.npz", extra_meta={"dataset": "digits"})
    for batch_size, chunk in [(7, 100), (50, 1000), (3, 2)]:
        recorded_rows.clear()
        code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz", "--iw-samples", 40, "--chunk", chunk,
                             "--batch-size", batch_size, "--split", "val", "--val-fraction", "0.01")
        assert code == 0, err
        assert max(recorded_rows) <= batch_size


def test_evaluate_refuses_a_batch_it_cannot_hold(tmp_path, capsys, gib_available):
    m = VAE(64, 3, hidden=(8,), dtype="float64")
    m.save(tmp_path / "m.npz", extra_meta={"dataset": "digits"})
    code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz", "--iw-samples", 10 ** 9, "--batch-size", 10 ** 12)
    assert code == 1 and one_line(err) and "rows per backend call (--batch-size) would need about" in err
    assert out == ""


# ----------------------------------------------------------------------------------------------
# evaluate: standard errors, per-example values, non-finite results
# ----------------------------------------------------------------------------------------------

def test_standard_errors_match_the_exported_per_example_values(tmp_path, capsys):
    m = VAE(64, 3, hidden=(8,), dtype="float32", seed=2)
    m.save(tmp_path / "m.npz", extra_meta={"dataset": "digits"})
    out_file = tmp_path / "per.npz"
    code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz", "--iw-samples", 5, "--json",
                         "--per-example", out_file)
    assert code == 0, err
    r = json.loads(out)
    with np.load(out_file, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    assert set(arrays) == {"elbo", "iw_log_likelihood", "recon_error"}
    for name, a in arrays.items():
        assert a.shape == (r["n"],) and a.dtype == np.float64
        assert r[name] == pytest.approx(a.mean(), rel=1e-12)
        assert r[f"{name}_se"] == pytest.approx(a.std(ddof=1) / math.sqrt(len(a)), rel=1e-10)
    assert not list(tmp_path.glob(".tmp-*"))                                     # written atomically
    code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz", "--iw-samples", 0)
    assert code == 0 and f"{r['elbo']:.3f} +/- {r['elbo_se']:.3f}" in out and "log p(x)" not in out


def test_per_example_target_is_checked_before_evaluating(tmp_path, capsys, monkeypatch):
    VAE(64, 3, hidden=(8,)).save(tmp_path / "m.npz", extra_meta={"dataset": "digits"})
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("evaluated before checking the target"))
    for target in (tmp_path, tmp_path / "no" / "such" / "p.npz"):
        code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz", "--per-example", target)
        assert code == 1 and one_line(err) and "expected a file in an existing folder" in err and out == ""


def test_without_iw_samples_the_file_has_no_iw_array(tmp_path, digits):
    m = VAE(64, 3, hidden=(8,), dtype="float64")
    r = ev.evaluate(m, digits[:9], iw_samples=0, per_example=True)
    assert set(r["per_example"]) == {"elbo", "recon_error"} and r["iw_log_likelihood_se"] is None
    ev.save_per_example(tmp_path / "p.npz", r["per_example"])
    with np.load(tmp_path / "p.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(f["elbo"], r["per_example"]["elbo"])


def test_one_example_has_no_standard_error(digits):
    r = ev.evaluate(VAE(64, 3, hidden=(8,), dtype="float64"), digits[:1], iw_samples=2)
    assert r["elbo_se"] is None and r["iw_log_likelihood_se"] is None and r["recon_error_se"] is None
    assert ev.nonfinite(r) == []


class ThreadComm(SerialComm):
    """Rank r of P ranks running as threads of this process, with a real all-reduce (a barrier and
    a sum in rank order): the sharded arithmetic of evaluate without an MPI launcher."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size, self.is_root = group, rank, group["size"], rank == 0

    def allreduce_sum(self, arr):
        g = self.group
        g["slots"][self.rank] = np.array(arr, dtype=np.float64)
        g["barrier"].wait()
        total = sum(g["slots"][1:], g["slots"][0].copy())
        g["barrier"].wait()
        return total


@pytest.mark.parametrize("size", [2, 3])
def test_sharded_standard_errors_and_per_example_values_are_those_of_one_process(digits, size):
    model = VAE(64, 3, hidden=(8,), dtype="float64", seed=3)
    x = digits[:23]
    whole = ev.evaluate(model, x, iw_samples=4, per_example=True, batch_size=5)
    group = {"size": size, "slots": [None] * size, "barrier": threading.Barrier(size, timeout=60)}
    results = [None] * size

    def rank(r):
        results[r] = ev.evaluate(model, x, iw_samples=4, per_example=True, batch_size=5,
                                 comm=ThreadComm(group, r))
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        for k in ("elbo", "elbo_se", "iw_log_likelihood", "iw_log_likelihood_se", "recon_error", "recon_error_se"):
            assert r[k] == pytest.approx(whole[k], rel=1e-10), k
        for k, a in whole["per_example"].items():
            np.testing.assert_allclose(r["per_example"][k], a, rtol=1e-12)


def _nan_json(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("json_flag", [True, False])
def test_a_non_finite_evaluation_is_valid_json_and_a_failure(tmp_path, capsys, backend, json_flag):
    m = VAE(64, 3, hidden=(8,), dtype="float32")
    m.views()["enc.head.b"][3:] = 200.0                       # finite parameters; exp(logvar) overflows
    m.save(tmp_path / "m.npz", extra_meta={"dataset": "digits"})
    args = ["evaluate", tmp_path / "m.npz", "--iw-samples", 3, "--backend", backend]
    code, out, err = cli(capsys, *args, *(["--json"] if json_flag else []))
    assert code == 1 and one_line(err) and "not finite" in err and "elbo" in err, err
    if json_flag:
        r = _nan_json(out)
        assert r["elbo"] is None and r["iw_log_likelihood"] is None and r["n"] == 360


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_parameters_are_refused_before_evaluating(tmp_path, capsys, backend):
    """Some backends' ReLU maps a NaN pre-activation to 0, so NaN weights can give finite figures:
    the parameters themselves are checked."""
    m = VAE(64, 3, hidden=(8,), dtype="float32")
    m.params[:5] = np.nan                                  # enc.0.W row 0: pixel 0 is always 0 in the digits
    m.save(tmp_path / "m.npz", extra_meta={"dataset": "digits"})
    code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz", "--json", "--backend", backend)
    assert code == 1 and one_line(err) and "5 of the model's" in err and "NaN or inf" in err
    assert out == ""
