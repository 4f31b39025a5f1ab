"""The hand-offs between the threads of a split step (kernels/batchsplit.py) as spin waits on counters.

A split step hands work between threads three times: the parts start, they meet at a barrier before
the gradients' sum, and the caller learns that every thread has finished. Through Python's locks (a
Future, threading.Barrier) each hand-off wakes a sleeping thread, and on this project's 2-core VMs a
wake-up costs 50-120 us: together 0.3-0.45 ms of a 10 ms step (benchmarks/README.md, "The hand-offs
of a split step"). Here the threads instead watch int64 counters that only grow, one per 64-byte
cache line (:func:`counters`), reading them with atomic loads and adding to them with atomic adds inside
an @njit(nogil=True) loop (:func:`poll_`); a thread sees a change within a fraction of a microsecond.

    START    +1 when the caller posts a job (a part function, an optional barrier and ``then``)
    ARRIVED  +1 per thread at the barrier       (a job with a barrier waits for the total so far)
    DONE     +1 per helper thread that finished  (the caller waits for the total so far)
    ABORT    set to the job's number when one of its threads failed: the barrier lets nobody through

Spinning costs a core, so waits are bounded: a helper thread spins for IDLE_SPIN_S after a job (for
steps that follow each other at once) and then sleeps on a condition variable until the next job; a thread
at the barrier or waiting for the others spins for SPIN_S and then naps NAP_S between polls, so that
on an oversubscribed machine the thread it waits for gets the core.

The atomics are LLVM's (``atomicrmw add``, ``load atomic acquire``) through ``numba.extending.
intrinsic``, as the GEMM's vector code is (kernels/gemm.py); ``pause`` (x86) between polls.
"""
from __future__ import annotations

import platform
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .numba_cache import configure as _configure_cache

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)

START, ARRIVED, DONE, ABORT = 0, 8, 16, 24      # int64 slots, 64 bytes apart (one cache line each)
IDLE_SPIN_S = 2e-4      # a helper's spin for the next job before it sleeps (steps back to back come
                        # sooner; a training loop drawing eps between steps, ~1 ms, finds it asleep,
                        # and spinning longer gained nothing there: benchmarks/README.md)
SPIN_S = 3e-4           # a wait's spin before it starts napping: two processes of 2 threads on 2 cores
                        # took 23.6 ms a step with 2 ms of spin, 17.9-19.4 with 0.3 ms (19.2-19.4 with
                        # the locks); the parts of a step usually end within 0.3 ms of each other
NAP_S = 1e-4            # one nap
ROUND_S = 3e-4          # one round of polls without the GIL; between rounds the waiter takes the GIL to
                        # check the time and for signals (Ctrl-C)


def counters() -> np.ndarray:
    """Zeroed START, ARRIVED, DONE and ABORT, each on a cache line of its own."""
    return np.zeros(ABORT + 8, dtype=np.int64)


def _slot_ptr(context, builder, aryty, ary, i):
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [i])


def _atomic_rmw(op):
    """An intrinsic (ctl, i, v) -> the old ctl[i], that applies LLVM's ``atomicrmw <op>`` (sequentially
    consistent) to ctl[i] with v: one atomic instruction."""
    @intrinsic
    def rmw(typingctx, ctl, i, v):
        def codegen(context, builder, sig, args):
            return builder.atomic_rmw(op, _slot_ptr(context, builder, sig.args[0], args[0], args[1]), args[2],
                                      "seq_cst")
        return types.int64(ctl, i, v), codegen
    return rmw


atomic_add = _atomic_rmw("add")         # ctl[i] += v
atomic_max = _atomic_rmw("max")         # ctl[i] = max(ctl[i], v)


@intrinsic
def atomic_load(typingctx, ctl, i):
    """ctl[i], read with an atomic load (acquire: what its writer stored before it is visible after)."""
    def codegen(context, builder, sig, args):
        return builder.load_atomic(_slot_ptr(context, builder, sig.args[0], args[0], args[1]), "acquire", 8)
    return types.int64(ctl, i), codegen


_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


@intrinsic
def cpu_relax(typingctx):
    """x86's ``pause`` (a spin-wait hint: the core slows the loop down and frees resources); nothing
    elsewhere."""
    def codegen(context, builder, sig, args):
        if _X86:
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


@njit(cache=True)
def add_(ctl, i, v):
    """Atomically ctl[i] += v; returns the old value. (It keeps the GIL: releasing and taking it back
    would cost more than the one instruction.)"""
    return atomic_add(ctl, i, v)


@njit(cache=True)
def max_(ctl, i, v):
    """Atomically ctl[i] = max(ctl[i], v); returns the old value."""
    return atomic_max(ctl, i, v)


@njit(cache=True, nogil=True)
def poll_(ctl, i, target, abort_at, polls):
    """Watch ctl[i] for up to ``polls`` reads: 1 once ctl[i] >= target, -1 when ctl[ABORT] >= abort_at
    (abort_at > 0; checked again after the target is seen, because a failing thread sets ABORT before
    it counts itself), 0 when the polls ran out."""
    for _ in range(polls):
        if atomic_load(ctl, i) >= target:
            return -1 if abort_at > 0 and atomic_load(ctl, ABORT) >= abort_at else 1
        if abort_at > 0 and atomic_load(ctl, ABORT) >= abort_at:
            return -1
        cpu_relax()
    return 0


_POLLS_PER_S = None


def polls_per_second() -> float:
    """How many unsuccessful polls of :func:`poll_` this machine runs a second (measured once)."""
    global _POLLS_PER_S
    if _POLLS_PER_S is None:
        ctl = counters()
        poll_(ctl, START, 1, 0, 16)                         # compiled (or loaded) before it is timed
        n, best = 1 << 14, float("inf")
        for _ in range(3):
            t = time.perf_counter()
            poll_(ctl, START, 1, 0, n)
            best = min(best, time.perf_counter() - t)
        _POLLS_PER_S = n / max(best, 1e-9)
    return _POLLS_PER_S


def polls_for(seconds: float) -> int:
    return max(16, int(seconds * polls_per_second()))


def wait(ctl, i, target, abort_at=0) -> bool:
    """Until ctl[i] >= target (True) or the job ``abort_at`` is aborted (False). Spins in rounds of
    ROUND_S for SPIN_S, then naps NAP_S between short polls (the core free for whoever is late).
    Signals (Ctrl-C) arrive between rounds."""
    polls = polls_for(ROUND_S)
    start = time.perf_counter()
    while True:
        r = poll_(ctl, i, target, abort_at, polls)
        if r:
            return r > 0
        if time.perf_counter() - start > SPIN_S:
            polls = 16
            time.sleep(NAP_S)
