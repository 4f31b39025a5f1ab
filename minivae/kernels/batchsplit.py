"""Data parallelism inside one step of the numba backend: the batch's examples in P contiguous parts.

Every bound of this project is a mean over examples (docs/math.md §5: the ELBO and the IWAE bound are
sums of per-example terms divided by n), so with the examples cut into parts of n_p rows,

    loss = sum_p (n_p / n) loss_p,        grad = sum_p (n_p / n) grad_p,

where loss_p, grad_p are the same pass run on part p alone (its own mean). The fused passes
(cpu_stack.stack_step_) are serial code whose time goes to GEMMs; letting OpenBLAS thread each small
product scales poorly (a two-layer IWAE step at batch 128 took 20.2 ms on 1 thread and 16.0 ms on 2,
benchmarks/README.md), whereas P copies of the whole pass, each on one core with single-threaded BLAS,
share nothing until the reduction. So: P Python threads (the caller runs part 0), each calling the
@njit(nogil=True) pass on its part with its own workspace and gradient buffer (part 0: the caller's),
then (after a barrier) the weighted sum of the P gradients, one segment of the parameter vector per
thread. A part may come in phases with a barrier between them: the custom GEMM's backward reads every
W^T packed into panels, and the P threads first pack them once for all parts, each claiming panels
until none is left (cpu_stack.pack_claimed_: a helper that starts late packs less; each part packed
all of them before, 5 % of a step). When the parts' products
are OpenBLAS's (config.GEMM "blas"), every OpenBLAS is held at one thread meanwhile (threadpoolctl:
NumPy's and SciPy's copies). The helper threads stay alive between steps, and the start, the barriers
and the end are spin waits on atomic counters (kernels/spin.py): through locks each hand-off cost a
thread's wake-up, 0.3-0.45 ms a step.

P is the thread budget the user gave (``numba.get_num_threads()``, which ``threads.limit_threads``
sets), at most n, and at most n L // MIN_ROWS for L samples an example (each part gets MIN_ROWS rows of the
sample layers at least). Inside a part every product runs on the part's own core: single-
threaded OpenBLAS, or the custom kernel task after task (``config.gemm_code(in_part=True)``; never its
prange tiles, whose threads would fight the parts'). The parts are fixed by (n, P), so a run is
reproducible at a given thread count; different P change the result only by rounding (the sum's order).

No BLAS call runs inside a prange (docs/math.md §9): the parts are Python threads, not prange.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import numba
import numpy as np
from numba import njit
from numba.np.ufunc import parallel as _parallel

from .. import threads
from . import spin
from .numba_cache import configure as _configure_cache

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)

# rows (examples x samples) per part at least: with fewer, one pass threading each product in OpenBLAS is
# faster than the parts' fixed costs (the gradients' sum, the hand-offs); benchmarks/README.md, "Where a
# batch splits". The encoder's first block runs on a part's examples only, but it is a small share once
# the L-sample layers have 32 rows.
MIN_ROWS = 32


def part_bounds(n: int, P: int) -> np.ndarray:
    """The P + 1 row boundaries of P contiguous parts of n examples, as equal as possible."""
    return (np.arange(P + 1, dtype=np.int64) * n) // P


@functools.lru_cache(maxsize=64)
def _segments(size: int, P: int) -> tuple:
    """part_bounds(size, P) as a tuple of Python ints, made once per (size, P): the reduction's segments,
    asked for every step (a step's Python runs with its data out of cache, where each NumPy call on a
    few elements costs 10-30 us: benchmarks/README.md)."""
    return tuple(int(b) for b in part_bounds(size, P))


def _num_threads() -> int:
    """numba.get_num_threads() of the calling thread. That function takes the threading layer's start-up
    lock (a multiprocessing RLock) on every call: 26 us a step with the step's caches cold, 1.4 us hot.
    Once the layer has started, the reader behind it (a ctypes function of numba.np.ufunc.parallel,
    private to numba, which setup.cfg pins below 0.69) gives the same number in 0.1 us; before that, or
    where a numba lacks it, the public function. (An @njit reader cannot be cached: it holds the layer's
    function pointer.)"""
    if getattr(_parallel, "_is_initialized", False) and hasattr(_parallel, "_get_num_threads"):
        return _parallel._get_num_threads()
    return numba.get_num_threads()


@njit(cache=True, nogil=True, error_model="numpy")
def weighted_sum_(out, parts, w, lo, hi):
    """out[lo:hi] = sum_p w[p] parts[p][lo:hi], added in the order p = 0, 1, ... (so the result depends
    only on P). out: (size,);  parts: a (P, size) array or a tuple of P (size,) arrays, of which the
    first may be ``out`` itself (each element is read before it is written);  w: (P,) float64. One
    streaming loop per part."""
    dt = out.dtype.type
    o = out[lo:hi]                      # loops from 0 over views: no negative index, so they vectorize
    a = dt(w[0])
    src = parts[0][lo:hi]
    for j in range(o.shape[0]):
        o[j] = a * src[j]
    for p in range(1, len(parts)):
        a = dt(w[p])
        src = parts[p][lo:hi]
        for j in range(o.shape[0]):
            o[j] += a * src[j]


class _Job:
    """One call of ExampleSplit.run as the helper threads see it: its number (the START count that posts
    it), P, its stages (the part's phases, then ``then``), the ARRIVED count each barrier between two
    stages waits for, the DONE count the caller waits for, and each thread's exception."""
    __slots__ = ("number", "P", "stages", "arrive_at", "done_at", "errors")


def _work(ctl, job, p):
    """Thread p's share of ``job``: stage(p) for each stage, with a barrier between two stages (its
    arrival, then the wait for the others). An exception is kept in job.errors[p] and aborts the job:
    no barrier lets anybody through after it (those already past one finish their stage). Every thread
    counts itself at every barrier exactly once, failed or not, so that the next job's count starts
    right."""
    passed = 0                                      # barriers this thread has counted itself at
    try:
        for i, stage in enumerate(job.stages):
            if i:
                passed += 1
                spin.add_(ctl, spin.ARRIVED, 1)
                if not spin.wait(ctl, spin.ARRIVED, job.arrive_at[i - 1], job.number):
                    break                           # aborted: the failing thread's exception is raised
            stage(p)
    except BaseException as e:                      # re-raised by the caller (KeyboardInterrupt too)
        job.errors[p] = e
        spin.max_(ctl, spin.ABORT, job.number)      # before the arrivals below: see spin.poll_
    if passed < len(job.arrive_at):
        spin.add_(ctl, spin.ARRIVED, len(job.arrive_at) - passed)


def _serve(crew, p):
    """Helper thread p: wait for a job (spinning for IDLE_SPIN_S, then asleep on the condition), do its
    share when p < job.P, count itself DONE; until the crew is closed."""
    ctl, seen = crew.ctl, 0
    while True:
        if spin.poll_(ctl, spin.START, seen + 1, 0, crew.idle_polls) != 1:
            with crew.cond:
                crew.sleeping += 1                  # before the check of START: see _Crew.post
                while ctl[spin.START] <= seen and not crew.closed:
                    crew.cond.wait()
                crew.sleeping -= 1
        if crew.closed:
            return
        job = crew.job
        seen = job.number
        if p < job.P:
            _work(ctl, job, p)
            spin.add_(ctl, spin.DONE, 1)


class _Crew:
    """Helper threads 1..workers (``minivae-part-<p>``, daemons) and the counters they spin on (kernels/
    spin.py). They hold no reference to the ExampleSplit, whose __del__ closes them."""

    def __init__(self, workers):
        self.ctl = spin.counters()
        self.workers = workers
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.closed = False
        self.job = None
        self.posted = self.arrivals = self.finishes = 0     # START, ARRIVED, DONE once every job is done
        self.sleeping = 0                                   # helpers asleep on the condition (or about to be)
        self.idle_polls = spin.polls_for(spin.IDLE_SPIN_S)
        self.threads = [threading.Thread(target=_serve, args=(self, p), name=f"minivae-part-{p}", daemon=True)
                        for p in range(1, workers + 1)]
        for t in self.threads:
            t.start()

    def post(self, P, stages):
        job = _Job()
        self.posted += 1
        self.finishes += P - 1
        job.number, job.P, job.stages = self.posted, P, stages
        job.arrive_at = [self.arrivals + P * (i + 1) for i in range(len(stages) - 1)]
        self.arrivals += P * (len(stages) - 1)
        job.done_at, job.errors = self.finishes, [None] * P
        self.job = job                                  # before START: a helper reads it after the count
        spin.add_(self.ctl, spin.START, 1)
        # wake helpers that went to sleep. A helper counts itself in ``sleeping`` under the lock before it
        # checks START: one not counted yet will see the new START and not wait. (Taking the lock when
        # nobody sleeps cost 10-15 us a step.)
        if self.sleeping:
            with self.cond:
                self.cond.notify_all()
        return job

    def close(self):
        self.closed = True
        spin.add_(self.ctl, spin.START, 1)
        with self.cond:
            self.cond.notify_all()


class ExampleSplit:
    """The helper threads and the BLAS limit of the example-parallel step (one per backend instance)."""

    def __init__(self):
        self._crew = None
        self._lock = threading.Lock()           # one run at a time (the parts share the caller's buffers)

    @staticmethod
    def parts(n: int, L: int = 1) -> int:
        """How many parts a pass over n examples of L samples each gets now (1: run it whole)."""
        return max(1, min(_num_threads(), n, (n * L) // MIN_ROWS))

    def _crew_for(self, workers):
        crew = self._crew
        if crew is None or crew.workers < workers or crew.pid != os.getpid():
            if crew is not None and crew.pid == os.getpid():
                crew.close()
            crew = self._crew = _Crew(workers)          # (after a fork the old threads are gone)
        return crew

    def run(self, P: int, part, then=None, blas=True):
        """part(p) for p = 0..P-1, concurrently, part 0 in the calling thread; with ``blas`` (the parts call
        BLAS), every BLAS held at one thread meanwhile (threadpoolctl: ~35 us a step to set and restore). With
        ``then``, each thread runs then(p) once every part has finished (a barrier): the gradients'
        weighted sum, one segment of the parameter vector per thread, without a second dispatch.
        ``part`` may be a tuple of phases, each part(p) of them run by thread p in turn, with a barrier
        between two (a share of work that every part then reads: cpu_stack's packed W^T).
        Returns once every thread has finished; re-raises the exception of the lowest-numbered part
        that failed (a Ctrl-C in the caller too, after the others have stopped)."""
        stages = (tuple(part) if isinstance(part, tuple) else (part,)) + (() if then is None else (then,))
        with self._lock, (threads.blas_single_threaded() if blas else contextlib.nullcontext()):
            crew = self._crew_for(P - 1)
            job = crew.post(P, stages)
            _work(crew.ctl, job, 0)
            interrupted = None
            while True:                                  # the helpers write into the caller's buffers:
                try:                                     # never return before they have stopped
                    spin.wait(crew.ctl, spin.DONE, job.done_at)
                    break
                except KeyboardInterrupt as e:
                    interrupted = interrupted or e
            job.stages = None                           # a late-reading idle helper keeps no buffer alive
        for e in job.errors + [interrupted]:
            if e is not None:
                raise e

    def reduce_in(self, P: int, out, parts, w, update=None):
        """The ``then`` of :meth:`run` that leaves out = sum_p w[p] parts[p], segment p by thread p
        (parts: as weighted_sum_ takes them; parts[0] may be ``out``, summed in place); with
        ``update`` (an optimizer's ``begin_step``), thread p then applies the step to its segment, on
        the gradient it has just summed: every core updates a share of the parameters."""
        seg = _segments(out.shape[0], P)

        def then(p):
            weighted_sum_(out, parts, w, seg[p], seg[p + 1])
            if update is not None:
                update(seg[p], seg[p + 1])
        return then

    def __del__(self):
        try:
            if self._crew is not None and self._crew.pid == os.getpid():
                self._crew.close()
        except Exception:           # at interpreter shutdown the modules may be gone: the threads are daemons
            pass
