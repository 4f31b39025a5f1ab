"""The example-parallel step of the numba stack backend (minivae/kernels/batchsplit.py).

The split pass is the same mathematics as the whole one (every bound is a mean over examples), so its
loss, gradient and per-example bound equal the unsplit pass's and the NumPy reference's in float64, for
every objective and estimator, odd part sizes and more parts than threads; the parts' reduction equals
NumPy's weighted sum; a failing part raises in the caller and the BLAS thread counts come back.
"""
import numpy as np
import pytest

from minivae import VAE, gradcheck
from minivae.kernels import batchsplit, config
from minivae.kernels.batchsplit import ExampleSplit, part_bounds, weighted_sum_
from minivae.threads import blas_info, limit_threads

rel_error = gradcheck.rel_error


@pytest.mark.parametrize("n,P", [(1, 1), (7, 2), (8, 2), (97, 3), (128, 5)])
def test_part_bounds_cover_every_example_once_in_near_equal_parts(n, P):
    b = part_bounds(n, P)
    assert b[0] == 0 and b[-1] == n and len(b) == P + 1
    sizes = np.diff(b)
    assert sizes.min() >= n // P and sizes.max() <= -(-n // P)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_weighted_sum_matches_numpy(dtype):
    rng = np.random.default_rng(0)
    parts = rng.standard_normal((3, 1001)).astype(dtype)
    w = np.array([0.2, 0.5, 0.3])
    out = np.full(1001, np.nan, dtype=dtype)
    weighted_sum_(out, parts, w, 0, 1001)
    ref = (w[:, None] * parts.astype(np.float64)).sum(0)
    assert rel_error(out.astype(np.float64), ref) <= (1e-15 if dtype == np.float64 else 1e-6)
    out2 = np.zeros(1001, dtype=dtype)
    weighted_sum_(out2, parts, w, 100, 300)                       # a segment only
    assert np.array_equal(out2[100:300], out[100:300]) and not out2[:100].any() and not out2[300:].any()


def stack(backend, seed=0, likelihood="bernoulli"):
    return VAE(x_dim=12, z_dim=(5, 3), hidden=((7,), (6,)), activation="tanh", likelihood=likelihood,
               dtype="float64", seed=seed, backend=backend)


@pytest.mark.parametrize("gemm", ["auto", "blas", "custom"])
@pytest.mark.parametrize("objective,estimator", [("elbo", "reparam"), ("iwae", "reparam"), ("iwae", "dreg")])
@pytest.mark.parametrize("P", [2, 3])
def test_split_pass_equals_the_whole_pass_and_the_reference(monkeypatch, objective, estimator, P, gemm):
    monkeypatch.setattr(config, "GEMM", gemm)          # the parts: single-threaded BLAS or the serial kernel
    rng = np.random.default_rng(1)
    n, L = 11, 4                                                   # parts of 5/6 or 3/4/4 examples
    x = (rng.random((n, 12)) < 0.4).astype(np.float64)
    eps = (rng.standard_normal((L, n, 5)), rng.standard_normal((L, n, 3)))
    fast, ref = stack("numba"), stack("numpy")
    kw = dict(eps=eps, objective=objective, samples=L, estimator=estimator)
    loss_ref, g_ref = ref.loss_and_grad(x, **kw)
    b_ref = ref.backend.bound(ref.params, x, eps, objective=objective)
    monkeypatch.setattr(ExampleSplit, "parts", staticmethod(lambda n, L=1: 1))
    loss_1, g_1 = fast.loss_and_grad(x, **kw)
    monkeypatch.setattr(ExampleSplit, "parts", staticmethod(lambda n, L=1: P))
    calls = []
    orig = ExampleSplit.run
    monkeypatch.setattr(ExampleSplit, "run", lambda self, p, f, then=None, **kw: (calls.append(p),
                                                                                orig(self, p, f, then, **kw)))
    loss_p, g_p = fast.loss_and_grad(x, **kw)
    b_p = fast.backend.bound(fast.params, x, eps, objective=objective)
    assert calls == [P, P]                                         # the split really ran
    for a, b in ((loss_p, loss_1), (loss_p, loss_ref)):
        assert abs(a - b) <= 1e-12 * abs(b)
    assert rel_error(g_p, g_1) <= 1e-12 and rel_error(g_p, g_ref) <= 1e-12
    assert b_p.shape == (n,) and rel_error(b_p, b_ref) <= 1e-12


def test_the_split_is_chosen_from_the_thread_budget_and_the_batch(monkeypatch):
    with limit_threads(1):
        assert ExampleSplit.parts(1000) == 1
    with limit_threads(2):
        import numba
        two = min(2, numba.config.NUMBA_NUM_THREADS)
        R = batchsplit.MIN_ROWS
        assert ExampleSplit.parts(2 * R) == two                  # one sample an example: rows = examples
        assert ExampleSplit.parts(2 * R - 1) == 1
        assert ExampleSplit.parts(2 * R // 8, 8) == two          # L samples an example: n L rows
        assert ExampleSplit.parts(2 * R // 8 - 1, 8) == 1
        assert ExampleSplit.parts(2, 10 * R) == two              # one example a part, with many samples
        assert ExampleSplit.parts(1, 10 * R) == 1                # never a part without an example


@pytest.mark.parametrize("objective,estimator", [("elbo", "reparam"), ("iwae", "dreg")])
def test_parts_of_one_example_each(objective, estimator):
    """The rule splits 2 examples of many samples into parts of one example: the same loss, gradient
    and bound as the NumPy reference."""
    rng = np.random.default_rng(3)
    n, L = 2, batchsplit.MIN_ROWS
    x = (rng.random((n, 12)) < 0.4).astype(np.float64)
    eps = (rng.standard_normal((L, n, 5)), rng.standard_normal((L, n, 3)))
    fast, ref = stack("numba"), stack("numpy")
    kw = dict(eps=eps, objective=objective, samples=L, estimator=estimator)
    with limit_threads(2):
        import numba
        assert ExampleSplit.parts(n, L) == min(2, numba.config.NUMBA_NUM_THREADS)
        loss, g = fast.loss_and_grad(x, **kw)
        b = fast.backend.bound(fast.params, x, eps, objective=objective)
    loss_ref, g_ref = ref.loss_and_grad(x, **kw)
    assert abs(loss - loss_ref) <= 1e-12 * abs(loss_ref) and rel_error(g, g_ref) <= 1e-12
    assert rel_error(b, ref.backend.bound(ref.params, x, eps, objective=objective)) <= 1e-12


def test_the_thread_budget_is_numbas_in_every_thread():
    """batchsplit._num_threads (the fast reader ExampleSplit.parts asks every step) says what
    numba.get_num_threads says: in this thread under each budget, and in a thread started afresh."""
    import threading
    import numba
    for k in (1, 2):
        with limit_threads(k):
            assert batchsplit._num_threads() == numba.get_num_threads() == min(k, numba.config.NUMBA_NUM_THREADS)
    seen = []
    t = threading.Thread(target=lambda: seen.append((batchsplit._num_threads(), numba.get_num_threads())))
    t.start()
    t.join()
    assert seen and seen[0][0] == seen[0][1] >= 1


@pytest.mark.parametrize("gemm,whole,part", [("auto", config.BLAS, config.CUSTOM_SERIAL),
                                             ("blas", config.BLAS, config.BLAS),
                                             ("custom", config.CUSTOM, config.CUSTOM_SERIAL)])
def test_a_part_never_runs_the_parallel_custom_gemm(monkeypatch, gemm, whole, part):
    """A part has one core: its products are single-threaded BLAS or the custom kernel task after task,
    never the custom kernel's prange tiles, whose threads would fight the parts'."""
    monkeypatch.setattr(config, "GEMM", gemm)
    assert config.gemm_code() == whole and config.gemm_code(in_part=True) == part


def test_a_part_has_tile_settings_of_its_own(monkeypatch):
    """The products of a part run task after task on one core, with PART_MB x PART_NB tasks (by default
    one column panel over every row); the whole pass keeps MB x NB. A bad value is a clear error."""
    from minivae.kernels.cpu import gemm_settings
    monkeypatch.setattr(config, "GEMM", "custom")
    assert gemm_settings(in_part=True) == (config.CUSTOM_SERIAL, config.PART_MB, config.PART_NB)
    assert gemm_settings() == (config.CUSTOM, config.MB, config.NB)
    monkeypatch.setattr(config, "PART_NB", 0)
    with pytest.raises(ValueError, match="PART_NB must be a positive integer"):
        gemm_settings(in_part=True)


def test_a_failing_part_raises_in_the_caller_and_blas_threads_come_back():
    before = [d["num_threads"] for d in blas_info()]
    done = []

    def part(p):
        if p == 1:
            raise ValueError("part 1 failed")
        done.append(p)

    with pytest.raises(ValueError, match="part 1 failed"):
        ExampleSplit().run(3, part)
    assert sorted(done) == [0, 2]
    assert [d["num_threads"] for d in blas_info()] == before
    after = []                                                     # with a reduction after the barrier:
    with pytest.raises(ValueError, match="part 1 failed"):         # the others are released, none reduces
        ExampleSplit().run(3, part, then=after.append)
    assert after == [] and [d["num_threads"] for d in blas_info()] == before


def test_blas_is_held_at_one_thread_only_for_parts_that_call_it():
    """run(..., blas=True) (single-threaded OpenBLAS in the parts) holds every BLAS at one thread while
    the parts run; parts that never call BLAS (the custom GEMM, config.GEMM "auto") leave it alone."""
    from minivae.threads import limit_threads
    with limit_threads(2, blas=2):
        before = [d["num_threads"] for d in blas_info()]
        seen = {}
        for blas in (True, False):
            ExampleSplit().run(2, lambda p, blas=blas: seen.setdefault((blas, p), [d["num_threads"] for d in blas_info()]),
                               blas=blas)
        assert seen[(True, 0)] == [1] * len(before) and seen[(False, 0)] == before
        assert [d["num_threads"] for d in blas_info()] == before


def test_the_reduction_after_the_barrier_covers_every_segment_once():
    rng = np.random.default_rng(3)
    parts = rng.standard_normal((3, 1003))
    w = np.array([0.5, 0.25, 0.25])
    out = np.full(1003, np.nan)
    sp = ExampleSplit()
    sp.run(3, lambda p: None, then=sp.reduce_in(3, out, parts, w))
    assert rel_error(out, w @ parts) <= 1e-15


@pytest.mark.parametrize("opt", ["adam", "sgd", "adagrad"])
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("objective,estimator", [("elbo", "reparam"), ("iwae", "dreg")])
def test_the_update_inside_the_split_is_the_host_trainers_step_bit_for_bit(monkeypatch, opt, P, objective,
                                                                           estimator):
    """trainers.SegmentUpdateTrainer (each thread updates its segment of the parameters right after
    summing it) against HostTrainer (the whole gradient, then optimizer.step): the same parameters,
    optimizer state, step count and losses, bit for bit, over several steps."""
    from minivae.optim import make_optimizer
    from minivae.trainers import HostTrainer, SegmentUpdateTrainer, SerialComm, make_trainer
    monkeypatch.setattr(ExampleSplit, "parts", staticmethod(lambda n, L=1: P))
    n, L = 13, 3
    runs = []
    for fused in (True, False):
        m = stack("numba", seed=2)
        o = make_optimizer(opt, m.params.size, "float64", backend=m.backend, lr=1e-2)
        t = (make_trainer(m, o, SerialComm(), objective, 0.0, estimator) if fused else
             HostTrainer(m.backend, m.params, o, SerialComm(), objective, 0.0, estimator))
        assert isinstance(t, SegmentUpdateTrainer) == fused
        r = np.random.default_rng(7)
        losses = []
        for _ in range(4):
            x = (r.random((n, 12)) < 0.4).astype(np.float64)
            eps = (r.standard_normal((L, n, 5)), r.standard_normal((L, n, 3)))
            losses.append(t.step(x, eps, 1.0))
        runs.append((m.params.copy(), {k: v.copy() for k, v in o.state.items()}, o.t, losses))
    (p1, s1, t1, l1), (p2, s2, t2, l2) = runs
    assert np.array_equal(p1, p2) and t1 == t2 == 4 and l1 == l2
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)


def test_a_failing_step_with_the_update_inside_leaves_the_optimizer_as_it_was(monkeypatch):
    from minivae.optim import make_optimizer
    from minivae.trainers import SerialComm, make_trainer
    m = stack("numba")
    o = make_optimizer("adam", m.params.size, "float64", backend=m.backend)
    t = make_trainer(m, o, SerialComm(), "iwae", 0.0)
    before = m.params.copy()
    with pytest.raises(ValueError, match="eps"):
        t.step(np.zeros((4, 12)), (np.zeros((2, 4, 5)),), 1.0)             # one eps array for two layers
    assert o.t == 0 and np.array_equal(m.params, before) and not o.state["m"].any()


def test_with_several_ranks_the_numba_stack_leaves_training_to_the_host_trainer():
    from minivae.optim import make_optimizer
    from minivae.trainers import HostTrainer, SegmentUpdateTrainer, make_trainer

    class TwoRanks:
        size, rank, is_root = 2, 0, True
    m = stack("numba")
    o = make_optimizer("adam", m.params.size, "float64", backend=m.backend)
    t = make_trainer(m, o, TwoRanks(), "elbo", 0.0)
    assert type(t) is HostTrainer and not isinstance(t, SegmentUpdateTrainer)
