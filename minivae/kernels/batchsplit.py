"""Data parallelism inside one step of the numba backend: the batch's examples in P contiguous parts.

Every bound of this project is a mean over examples (docs/math.md §5: the ELBO and the IWAE bound are
sums of per-example terms divided by n), so with the examples cut into parts of n_p rows,

    loss = sum_p (n_p / n) loss_p,        grad = sum_p (n_p / n) grad_p,

where loss_p, grad_p are the same pass run on part p alone (its own mean). The fused passes
(cpu_stack.stack_step_) are serial code whose time goes to GEMMs; letting OpenBLAS thread each small
product scales poorly (a two-layer IWAE step at batch 128 took 20.2 ms on 1 thread and 16.0 ms on 2,
benchmarks/README.md), whereas P copies of the whole pass, each on one core with single-threaded BLAS,
share nothing until the reduction. So: P Python threads (the caller runs part 0), each calling the
@njit(nogil=True) pass on its part with its own workspace and gradient buffer, OpenBLAS held at one
thread for the duration (threadpoolctl: NumPy's and SciPy's copies), then (after a barrier) the
weighted sum of the P gradients, one segment of the parameter vector per thread.

P is the thread budget the user gave (``numba.get_num_threads()``, which ``threads.limit_threads``
sets), at most n // MIN_EXAMPLES. Inside a part every product runs on the part's own core: single-
threaded OpenBLAS, or the custom kernel task after task (``config.gemm_code(in_part=True)``; never its
prange tiles, whose threads would fight the parts'). The parts are fixed by (n, P), so a run is
reproducible at a given thread count; different P change the result only by rounding (the sum's order).

No BLAS call runs inside a prange (docs/math.md §9): the parts are Python threads, not prange.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from .. import threads
from .numba_cache import configure as _configure_cache

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)

MIN_EXAMPLES = 48       # examples per part at least: smaller parts lose to OpenBLAS threading each product (README)


def part_bounds(n: int, P: int) -> np.ndarray:
    """The P + 1 row boundaries of P contiguous parts of n examples, as equal as possible."""
    return (np.arange(P + 1, dtype=np.int64) * n) // P


@njit(cache=True, nogil=True, error_model="numpy")
def weighted_sum_(out, parts, w, lo, hi):
    """out[lo:hi] = sum_p w[p] parts[p, lo:hi], added in the order p = 0, 1, ... (so the result depends
    only on P). out: (size,);  parts: (P, size);  w: (P,) float64. One streaming loop per part."""
    dt = out.dtype.type
    o = out[lo:hi]                      # loops from 0 over views: no negative index, so they vectorize
    a = dt(w[0])
    src = parts[0, lo:hi]
    for j in range(o.shape[0]):
        o[j] = a * src[j]
    for p in range(1, parts.shape[0]):
        a = dt(w[p])
        src = parts[p, lo:hi]
        for j in range(o.shape[0]):
            o[j] += a * src[j]


class ExampleSplit:
    """The thread pool and the BLAS limit of the example-parallel step (one per backend instance)."""

    def __init__(self):
        self._pool = None
        self._workers = 0
        self._lock = threading.Lock()

    @staticmethod
    def parts(n: int) -> int:
        """How many parts a pass over n examples gets now (1: run it whole)."""
        import numba
        return max(1, min(numba.get_num_threads(), n // MIN_EXAMPLES))

    def _executor(self, workers):
        with self._lock:
            if self._pool is None or self._workers < workers:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="minivae-part")
                self._workers = workers
            return self._pool

    def run(self, P: int, part, then=None):
        """part(p) for p = 0..P-1, concurrently, part 0 in the calling thread; BLAS at one thread. With
        ``then``, each thread runs then(p) once every part has finished (a barrier): the gradients'
        weighted sum, one segment of the parameter vector per thread, without a second dispatch.
        Re-raises the first exception of any part (after every thread has stopped)."""
        pool = self._executor(P - 1)
        barrier = threading.Barrier(P) if then is not None else None

        def task(p):
            try:
                part(p)
                if barrier is not None:
                    barrier.wait()
                    then(p)
            except threading.BrokenBarrierError:
                return                                   # another part failed: it reports
            except BaseException:
                if barrier is not None:
                    barrier.abort()                      # release the others from the barrier
                raise

        with threads.blas_single_threaded():
            futures = [pool.submit(task, p) for p in range(1, P)]
            try:
                task(0)
            finally:
                errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e

    def reduce_in(self, P: int, out, parts, w, update=None):
        """The ``then`` of :meth:`run` that leaves out = sum_p w[p] parts[p], segment p by thread p; with
        ``update`` (an optimizer's ``begin_step``), thread p then applies the step to its segment, on
        the gradient it has just summed: every core updates a share of the parameters."""
        seg = part_bounds(out.shape[0], P)

        def then(p):
            weighted_sum_(out, parts, w, seg[p], seg[p + 1])
            if update is not None:
                update(seg[p], seg[p + 1])
        return then

    def __del__(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
