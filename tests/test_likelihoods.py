"""Every registered likelihood (minivae/likelihoods), from its own module's test inputs:

1. the NumPy pair: the score against centred differences of log p (float64), mean/sample meaning;
2. the scalar function, run in plain Python with NumPy's ops, against the NumPy pair (float64);
3. the Numba kernel (cpu.likelihood_, the generic loop over the scalar function) against the NumPy
   pair: 1e-12 in float64, 1e-5 in float32;
4. the registry: codes, refusals, and the promise that a new likelihood is one module plus one
   ``register`` line: a toy defined below goes end to end (NumPy, Numba, the CUDA kernel under the
   simulator) in a fresh process, without any other file edited.
The CUDA kernel on every registered likelihood under the simulator: tests/cuda_sim/sim_likelihoods.py.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from minivae import distributions as dist
from minivae import likelihoods
from minivae.gradcheck import PIECE_TOL, numerical_grad_array, rel_error
from minivae.kernels import cpu
from minivae.kernels import numba_cache

ROOT = Path(__file__).resolve().parent.parent
NAMES = likelihoods.names()
VAR_FLOOR = 1e-3
TOL = {np.float64: 1e-12, np.float32: 1e-5}


def inputs(name, dtype=np.float64):
    x, head = likelihoods.get(name).test_inputs(dtype)
    assert x.dtype == head.dtype == dtype and head.shape[-1] == likelihoods.get(name).HEADS * x.shape[-1]
    return x, head


# -- 1. the NumPy pair -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_score_matches_centred_differences(name, rng):
    m = likelihoods.get(name)
    x, head = inputs(name)
    head = head.copy()
    dlp = rng.standard_normal(x.shape)                        # a random upstream weight per pixel
    analytic = m.score(x, head, VAR_FLOOR) * np.tile(dlp, m.HEADS)      # d sum(dlp * log p) / d head
    numeric = numerical_grad_array(lambda h: m.logprob(x, h, VAR_FLOOR), head, dlp)
    assert rel_error(analytic, numeric) < PIECE_TOL


@pytest.mark.parametrize("name", NAMES)
def test_pair_is_finite_and_the_registry_routes_to_it(name):
    m = likelihoods.get(name)
    x, head = inputs(name)
    lp, g = m.logprob(x, head, VAR_FLOOR), m.score(x, head, VAR_FLOOR)
    assert lp.shape == x.shape and g.shape == head.shape
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(g))
    np.testing.assert_array_equal(dist.loglik_forward(name, x, head[None], VAR_FLOOR)[0], lp.sum(axis=-1))
    np.testing.assert_array_equal(dist.loglik_backward(name, x, head[None], np.ones((1, len(x))), VAR_FLOOR)[0], g)
    assert dist.head_width(name, 7) == m.HEADS * 7


@pytest.mark.parametrize("name", NAMES)
def test_mean_is_the_sample_average(name):
    """The mean and the sampler agree: the average of N = 20000 draws at a few heads is within 5
    standard errors (plus 5/N, for the saturated heads where no draw differs) of mean(head) (fixed seed)."""
    m = likelihoods.get(name)
    x, head = inputs(name)
    head = head[:, ::5]                                       # a few columns per head group
    D = head.shape[-1] // m.HEADS
    head = np.concatenate([head[:, j * D:(j + 1) * D] for j in range(m.HEADS)], axis=-1)
    if m.HEADS == 2:
        head[:, D:] = np.clip(head[:, D:], -6, 3)              # moderate variances: a useful standard error
    draws = m.sample(np.broadcast_to(head, (20000,) + head.shape).copy(), np.random.default_rng(5), VAR_FLOOR)
    N = len(draws)
    se = draws.std(axis=0) / np.sqrt(N)
    assert np.all(np.abs(draws.mean(axis=0) - m.mean(head)) <= 5 * se + 5 / N)


def test_the_inputs_reach_the_edges():
    """Each built-in's test inputs hold its hard cases: x at 0 and 1; saturated logits; both sides of
    the continuous Bernoulli's Taylor switch in both dtypes; the Gaussian's variance at its floor and huge."""
    for name in NAMES:
        x, _ = inputs(name)
        assert (x == 0).any() and (x == 1).any(), name
    _, l = inputs("bernoulli")
    assert np.abs(l).max() >= 40 and (l == 0).any()
    _, l = inputs("continuous_bernoulli")
    for sw in dist._CB_TAYLOR.values():
        a = np.abs(l)
        assert ((a < sw) & (a > 0.99 * sw)).any() and ((a >= sw) & (a < 1.01 * sw)).any(), sw
    x, head = inputs("gaussian")
    s = head[:, x.shape[1]:]
    assert s.min() < np.log(VAR_FLOOR) - 20 and s.max() >= 30


# -- 2. the scalar function, in plain Python ---------------------------------------------------------

def run_scalar(name, x, head, ops, dt=np.float64, lf=np.log(VAR_FLOOR)):
    m = likelihoods.get(name)
    f = m.scalar(ops)
    D = x.shape[-1]
    lp, g = np.empty(x.shape), np.empty(head.shape)
    sw = dt(dist._CB_TAYLOR[np.dtype(dt)])
    for i in range(x.shape[0]):
        for d in range(D):
            h1 = head[i, D + d] if m.HEADS == 2 else head[i, d]
            lp[i, d], g[i, d], g1 = f(dt, x[i, d], head[i, d], h1, dt(lf), sw)
            if m.HEADS == 2:
                g[i, D + d] = g1
    return lp, g


@pytest.mark.parametrize("name", NAMES)
def test_scalar_function_matches_the_pair(name):
    m = likelihoods.get(name)
    x, head = inputs(name)
    with np.errstate(all="ignore"):                          # the discarded branch may divide by 0
        lp, g = run_scalar(name, x, head, likelihoods.numpy_ops())
    assert rel_error(lp, m.logprob(x, head, VAR_FLOOR)) < 1e-13
    assert rel_error(g, m.score(x, head, VAR_FLOOR)) < 1e-13


# -- 3. the Numba kernel -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", NAMES)
def test_numba_kernel_matches_the_pair(name, dtype):
    m = likelihoods.get(name)
    x, head = inputs(name, dtype)
    n, K = head.shape
    D = x.shape[1]
    heads = np.stack([head, head[::-1]])                      # L = 2 rows per example: row r is example r % n
    ll_ref = dist.loglik_forward(name, x, heads, VAR_FLOOR).reshape(-1)
    g_ref = (-0.5 * m.score(x, heads, VAR_FLOOR)).reshape(2 * n, K)
    h = heads.reshape(2 * n, K).copy()
    ll, lp = np.empty(2 * n), np.empty((2 * n, D), dtype)
    sw = dist._CB_TAYLOR[np.dtype(dtype)]
    cpu.likelihood_(x, h, ll, lp, cpu.LIK_CODES[name], VAR_FLOOR, sw, -0.5, True)
    assert rel_error(ll, ll_ref) <= TOL[dtype]
    assert rel_error(h, g_ref) <= TOL[dtype]
    h2 = heads.reshape(2 * n, K).copy()
    cpu.likelihood_(x, h2, ll, lp, cpu.LIK_CODES[name], VAR_FLOOR, sw, 1.0, False)
    np.testing.assert_array_equal(h2, heads.reshape(2 * n, K))
    assert rel_error(ll, ll_ref) <= TOL[dtype]


# -- 4. the registry -------------------------------------------------------------------------------

def test_codes_are_registry_positions():
    assert NAMES[:3] == ("bernoulli", "continuous_bernoulli", "gaussian")
    assert cpu.LIK_CODES == {name: i for i, name in enumerate(NAMES)} == likelihoods.codes()
    assert dist.LIKELIHOODS == NAMES


def test_registration_refusals():
    import types
    bad = types.ModuleType("bad")
    with pytest.raises(ValueError, match="lacks"):
        likelihoods.register(bad)
    with pytest.raises(ValueError, match="already registered"):
        dup = types.ModuleType("dup")
        dup.__dict__.update({k: getattr(likelihoods.get("bernoulli"), k) for k in likelihoods._REQUIRED})
        likelihoods.register(dup)
    likelihoods.register(likelihoods.get("gaussian"))          # the same module again: nothing happens
    assert likelihoods.names() == NAMES
    late = types.ModuleType("late")
    late.__dict__.update({k: getattr(likelihoods.get("bernoulli"), k) for k in likelihoods._REQUIRED})
    late.NAME = "late"
    with pytest.raises(RuntimeError, match="registered before"):   # the numba kernels are built already
        likelihoods.register(late)
    assert likelihoods.names() == NAMES
    with pytest.raises(ValueError, match="unknown likelihood 'nope'; expected one of bernoulli"):
        dist.check_likelihood("nope")


TOY = '''
"""A toy likelihood, a Laplace on [m | log b]: log p = -log 2 - log b - |x - m| / b, K = 2D."""
import math
import numpy as np

NAME = "toy_laplace"
HEADS = 2


def logprob(x, head, var_floor=None):
    D = x.shape[-1]
    m, lb = head[..., :D], head[..., D:]
    return -math.log(2.0) - lb - np.abs(x - m) * np.exp(-lb)


def score(x, head, var_floor=None):
    D = x.shape[-1]
    m, lb = head[..., :D], head[..., D:]
    u = np.abs(x - m) * np.exp(-lb)
    return np.concatenate([np.sign(x - m) * np.exp(-lb), u - 1.0], axis=-1)


def mean(head):
    return head[..., :head.shape[-1] // 2]


def sample(head, rng, var_floor=None):
    D = head.shape[-1] // 2
    return (head[..., :D] + np.exp(head[..., D:]) * rng.laplace(size=head[..., :D].shape)).astype(head.dtype)


def scalar(ops):
    exp = ops.exp

    def logp_score(dt, x, m, lb, lf, sw):
        ib = exp(-lb)
        r = x - m
        a = r if r > dt(0) else -r
        sgn = dt(1) if r > dt(0) else (dt(-1) if r < dt(0) else dt(0))
        return -dt(0.6931471805599453) - lb - a * ib, sgn * ib, a * ib - dt(1)

    return logp_score


def test_inputs(dtype=np.float64):
    x = np.array([[0.0, 1.0, 0.3, 0.7, 0.05], [1.0, 0.0, 0.6, 0.2, 0.95]])
    head = np.array([[0.4, 0.2, -0.5, 1.5, 0.3, 0.0, -1.0, 2.0, -3.0, 0.5],
                     [0.1, 0.8, 0.2, -0.4, 0.55, 1.0, -2.0, 0.0, 0.7, -0.2]])
    return x.astype(dtype), head.astype(dtype)
'''

SCRIPT = '''
import sys
import numpy as np
from minivae import likelihoods
import toy_laplace
likelihoods.register(toy_laplace)                        # the one registration line

from minivae import VAE, distributions as dist
from minivae.gradcheck import check_loglik, check_model, rel_error
from minivae.kernels import cpu, numba_cache
assert dist.LIKELIHOODS[-1] == "toy_laplace" and cpu.LIK_CODES["toy_laplace"] == 3, cpu.LIK_CODES
assert numba_cache.source_hash() != sys.argv[1]          # its own numba cache folder
rng = np.random.default_rng(3)
assert all(c.ok for c in check_loglik("toy_laplace", rng)), "NumPy pair"
x, head = toy_laplace.test_inputs(np.float64)             # float64 only: one compile fewer
h = head.copy(); ll = np.empty(len(x)); lp = np.empty(x.shape)
cpu.likelihood_(x, h, ll, lp, cpu.LIK_CODES["toy_laplace"], 1e-4, 0.01, 1.0, True)
assert rel_error(ll, dist.loglik_forward("toy_laplace", x, head[None])[0]) <= 1e-12, "numba ll"
assert rel_error(h, toy_laplace.score(x, head)) <= 1e-12, "numba score"
x = rng.uniform(0.05, 0.95, (6, 5))
eps = rng.standard_normal((2, 6, 2))
kw = dict(hidden=(4,), activation="tanh", likelihood="toy_laplace", dtype="float64", seed=1)
ref = VAE(5, 2, backend="numpy", **kw)
assert all(c.ok for c in check_model(ref, x, eps)), "numpy model gradient"
fast = VAE(5, 2, backend="numba", **kw)
(l0, g0), (l1, g1) = ref.loss_and_grad(x, eps=eps), fast.loss_and_grad(x, eps=eps)
assert abs(l0 - l1) <= 1e-12 * abs(l0) and rel_error(g0, g1) <= 1e-12, "numba model"
from minivae.kernels.cuda import CudaBackend, CudaConfig
from numba import cuda
be = CudaBackend(ref.spec, np.float64, CudaConfig(block=4))
xd, hd = toy_laplace.test_inputs(np.float64)
G, ll = cuda.to_device(np.zeros_like(hd)), cuda.to_device(np.zeros(len(xd)))
be._likelihood(cuda.to_device(xd), cuda.to_device(hd), G, ll, 1.0, 0.0)
assert rel_error(ll.copy_to_host(), dist.loglik_forward("toy_laplace", xd, hd[None])[0]) <= 1e-12, "cuda ll"
assert rel_error(G.copy_to_host(), toy_laplace.score(xd, hd)) <= 1e-12, "cuda score"
print("toy ok")
'''


@pytest.mark.slow
def test_a_new_likelihood_is_one_module_and_one_registration_line(tmp_path):
    """The toy Laplace above, registered from outside the package in a fresh process (before the
    numba kernels are imported), runs through the registry: its NumPy pair's gradient check, the
    Numba kernel, a whole VAE on numpy (gradient check) and numba (equal to it), and the CUDA kernel
    under the simulator. No file of minivae is edited; its numba cache folder is its own."""
    (tmp_path / "toy_laplace.py").write_text(textwrap.dedent(TOY))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, numba_cache.source_hash()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "toy ok" in r.stdout, r.stdout[-3000:] + r.stderr[-5000:]


def test_the_optional_parts_and_their_defaults(monkeypatch):
    """UNIT_INTERVAL, decoded, draw_x and output_bias: each module's own where it has one, the registry's
    default otherwise (a module with the required parts only), and --init-output-bias refused without one."""
    import types
    from minivae.recipe import output_bias_from_data
    rng = np.random.default_rng(0)
    assert likelihoods.x_in_unit_interval("bernoulli") and not likelihoods.x_in_unit_interval("gaussian")
    head = rng.standard_normal((3, 8))
    mean, logvar = likelihoods.decoded("gaussian", head, 1e-4)
    assert np.array_equal(mean, head[:, :4])
    np.testing.assert_allclose(np.exp(logvar), 1e-4 + np.exp(head[:, 4:]), rtol=1e-12)
    assert likelihoods.decoded("bernoulli", head, 1e-4) is head
    assert set(np.unique(likelihoods.draw_x("bernoulli", rng, (50,)))) <= {0.0, 1.0}
    bare = types.SimpleNamespace(NAME="bare", HEADS=1)             # the required parts are not looked at here
    monkeypatch.setitem(likelihoods._REGISTRY, "bare", bare)
    assert likelihoods.x_in_unit_interval("bare") and likelihoods.decoded("bare", head, 1e-4) is head
    x = likelihoods.draw_x("bare", rng, (200, 3))
    assert x.shape == (200, 3) and 0.02 <= x.min() and x.max() <= 0.98
    with pytest.raises(ValueError, match="has no output_bias"):
        output_bias_from_data("bare", x, 1e-4)
    with pytest.raises(ValueError, match="unknown likelihood"):
        output_bias_from_data("poisson", x, 1e-4)
