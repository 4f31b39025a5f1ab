"""Thread control for the CPU backends: Numba's threads and every OpenBLAS copy in the process.

NumPy and SciPy each ship their own OpenBLAS (NumPy's serves ``x @ W`` in the NumPy backend; SciPy's
serves ``np.dot`` inside @njit code, through numba's cython_blas binding). threadpoolctl finds and
limits both; ``numba.set_num_threads`` limits the prange kernels. The two pools never run at the same
time: no kernel calls BLAS inside a prange (docs/math.md §9).

    >>> with limit_threads(1):
    ...     model.loss_and_grad(x)
"""
from __future__ import annotations

import contextlib
import os

from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits


# OpenMP workers that spin after a parallel region take the core that BLAS (or the caller, or another
# process) needs next: with 2 cores a training step ran 14x slower (benchmarks/README.md).
# Passive waiting, unless the user chose otherwise. libgomp reads this when Numba first loads its
# OpenMP pool (the first prange call), so setting it at import of the CPU backend is early enough.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# OpenBLAS's own (pthreads) workers spin the same way after a threaded call: 2^28 cycles, about 0.1 s,
# by default. The numba stack backend runs a small batch (an epoch's last one) through BLAS threaded over
# every core, and the split steps after it (its own threads on every core, kernels/batchsplit.py) then
# shared the cores with a spinning OpenBLAS worker: in `minivae train` the next ~70 ms of steps took 11
# ms instead of 5.5 (benchmarks/README.md). 2^22 cycles (1-2 ms) keeps a worker awake between the
# products of one pass, and lets it sleep before the next step. OpenBLAS reads this when it is loaded:
# SciPy's copy (the one np.dot inside @njit calls, loaded by _load_scipy_blas below) comes after this
# module; NumPy's copy, loaded with NumPy, keeps whatever the environment said. A user's value wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "22")


def blas_info() -> list[dict]:
    """One dict per BLAS library loaded (prefix, version, architecture, num_threads, filepath)."""
    _load_scipy_blas()
    return [{k: d.get(k) for k in ("prefix", "version", "architecture", "num_threads", "filepath")}
            for d in threadpool_info() if d.get("user_api") == "blas"]


def _load_scipy_blas():
    """Load SciPy's OpenBLAS (the one np.dot inside @njit calls) now, so that threadpoolctl sees and
    limits it too: it only acts on libraries already loaded."""
    try:
        import scipy.linalg.cython_blas  # noqa: F401
    except ImportError:  # pragma: no cover - numba's np.dot needs scipy anyway
        pass


def _check(n):
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"number of threads must be a positive integer or None, got {n!r}")


@contextlib.contextmanager
def limit_threads(n: int | None = None, blas: int | None = None):
    """Limit Numba to ``n`` threads and every BLAS to ``blas`` (default: ``n``) inside the block;
    both are restored on exit. ``None`` leaves that pool as it is."""
    _check(n)
    _check(blas)
    blas = n if blas is None else blas
    import numba
    _load_scipy_blas()
    old = numba.get_num_threads()
    if n is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        if blas is not None:
            with threadpool_limits(limits=blas, user_api="blas"):
                yield
        else:
            yield
    finally:
        numba.set_num_threads(old)


_CONTROLLER = None


@contextlib.contextmanager
def blas_single_threaded():
    """Every BLAS loaded (NumPy's and SciPy's OpenBLAS) at one thread inside the block, restored on
    exit: for code that runs several BLAS callers in threads of its own (kernels/batchsplit.py).
    The controller is found once (~4 ms) and kept; entering costs ~15 us."""
    global _CONTROLLER
    if _CONTROLLER is None:
        _load_scipy_blas()
        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield
