"""The spin hand-offs of a split step (kernels/spin.py) and the helper threads that use them
(kernels/batchsplit.py, ExampleSplit.run): atomic counts under contention, the three outcomes of a
poll, and runs after runs with changing P, barriers, failures, sleeping helpers, Ctrl-C and a fork."""
from __future__ import annotations

import gc
import os
import sys
import threading
import time

import numpy as np
import pytest
from numba import njit

from minivae.kernels import spin
from minivae.kernels.batchsplit import ExampleSplit


@njit(nogil=True)
def _add_many(ctl, n):
    for _ in range(n):
        spin.atomic_add(ctl, spin.DONE, 1)


@njit(nogil=True)
def _max_many(ctl, values):
    for v in values:
        spin.atomic_max(ctl, spin.ABORT, v)


def test_atomic_adds_from_several_threads_lose_no_increment():
    ctl = spin.counters()
    n, T = 200_000, 4
    _add_many(ctl, 1)
    ctl[:] = 0
    ts = [threading.Thread(target=_add_many, args=(ctl, n)) for _ in range(T)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert ctl[spin.DONE] == n * T
    assert ctl.sum() == n * T                     # nothing else written: each counter on its own line


def test_atomic_max_keeps_the_largest_value_from_every_thread():
    ctl = spin.counters()
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 10**9, 50_000) for _ in range(3)]
    ts = [threading.Thread(target=_max_many, args=(ctl, c)) for c in chunks]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert ctl[spin.ABORT] == max(c.max() for c in chunks)
    assert spin.max_(ctl, spin.ABORT, 5) == ctl[spin.ABORT]     # returns the old value, keeps the max


def test_a_poll_reports_reached_timed_out_and_aborted():
    ctl = spin.counters()
    ctl[spin.ARRIVED] = 3
    assert spin.poll_(ctl, spin.ARRIVED, 3, 0, 10) == 1
    assert spin.poll_(ctl, spin.ARRIVED, 4, 0, 10) == 0
    ctl[spin.ABORT] = 7
    assert spin.poll_(ctl, spin.ARRIVED, 4, 7, 10) == -1       # the job 7 was aborted
    assert spin.poll_(ctl, spin.ARRIVED, 3, 7, 10) == -1       # reached, but aborted: nobody through
    assert spin.poll_(ctl, spin.ARRIVED, 3, 8, 10) == 1        # an abort of an earlier job is no abort
    assert spin.wait(ctl, spin.ARRIVED, 3) is True and spin.wait(ctl, spin.ARRIVED, 9, 7) is False


def test_a_wait_ends_when_another_thread_counts():
    ctl = spin.counters()
    t = threading.Timer(0.02, lambda: spin.add_(ctl, spin.DONE, 2))
    t.start()
    t0 = time.perf_counter()
    assert spin.wait(ctl, spin.DONE, 2)
    assert time.perf_counter() - t0 >= 0.015
    t.join()


def test_polls_per_second_is_measured_once_and_positive():
    a = spin.polls_per_second()
    assert a > 0 and spin.polls_per_second() == a
    assert spin.polls_for(0.0) == 16 and spin.polls_for(1.0) >= spin.polls_for(1e-3)


def _check_runs(sp, plan):
    """Run ``plan`` (P, with_barrier) in order; each part must run once per run and every then after
    every part of its own run."""
    for P, barrier in plan:
        log = []
        lock = threading.Lock()

        def part(p):
            time.sleep(0.0005 * (p % 2))                      # uneven parts
            with lock:
                log.append(("part", p))

        def then(p):
            with lock:
                log.append(("then", p))
        sp.run(P, part, then if barrier else None)
        parts = sorted(p for k, p in log if k == "part")
        assert parts == list(range(P))
        if barrier:
            assert sorted(p for k, p in log if k == "then") == list(range(P))
            assert all(k == "part" for k, _ in log[:P])          # the barrier: every part before any then
        else:
            assert len(log) == P


def test_runs_after_runs_with_changing_parts_barriers_and_failures():
    sp = ExampleSplit()
    _check_runs(sp, [(2, True), (2, False), (3, True), (1, True), (2, True), (3, False), (4, True)])

    def bad(p):
        if p == 2:
            raise ValueError("part 2 failed")
    for then in (None, lambda p: None):
        with pytest.raises(ValueError, match="part 2 failed"):
            sp.run(4, bad, then)
    _check_runs(sp, [(4, True), (2, True), (3, False), (4, True)])      # the counters are still right


def test_a_part_in_phases_passes_a_barrier_between_each_two():
    """run(P, (phase_1, phase_2, ...), then): every thread finishes phase i before any starts phase
    i + 1 (the shared W^T packing before the passes); a failing phase stops every thread at the next
    barrier, and the counts stay right for the runs after."""
    sp = ExampleSplit()
    for P, phases, barrier in [(2, 2, True), (3, 3, False), (4, 2, True), (1, 3, True), (2, 1, False)]:
        log, lock = [], threading.Lock()

        def stage(name):
            def run(p):
                time.sleep(0.0005 * ((p + len(name)) % 2))    # uneven threads
                with lock:
                    log.append(name)
            return run
        sp.run(P, tuple(stage(f"phase{i}") for i in range(phases)), stage("then") if barrier else None)
        names = [f"phase{i}" for i in range(phases)] + (["then"] if barrier else [])
        assert log == [name for name in names for _ in range(P)], (P, phases, barrier)

    ran = []

    def bad(p):
        if p == 1:
            raise ValueError("phase 1 of part 1 failed")
    with pytest.raises(ValueError, match="part 1 failed"):
        sp.run(3, (bad, ran.append), ran.append)
    assert ran == []                                           # nobody passed the first barrier
    _check_runs(sp, [(3, True), (2, False), (4, True)])


def test_a_sleeping_helper_wakes_for_the_next_run():
    sp = ExampleSplit()
    _check_runs(sp, [(2, True)])
    time.sleep(5 * spin.IDLE_SPIN_S + 0.02)                  # past the helpers' spin: asleep on the condition
    _check_runs(sp, [(2, True), (2, False)])


def test_a_ctrl_c_in_the_caller_waits_for_the_others_and_aborts_the_barrier():
    sp = ExampleSplit()
    done, after = [], []

    def part(p):
        if p == 0:
            raise KeyboardInterrupt
        time.sleep(0.05)
        done.append(p)
    with pytest.raises(KeyboardInterrupt):
        sp.run(3, part, after.append)
    assert sorted(done) == [1, 2] and after == []             # the others finished; nobody passed the barrier
    _check_runs(sp, [(3, True)])


def test_a_split_closes_its_helper_threads_when_it_goes_away():
    sp = ExampleSplit()
    _check_runs(sp, [(3, True)])
    crew = sp._crew
    names = {t.name for t in threading.enumerate() if t.name.startswith("minivae-part-")}
    assert {"minivae-part-1", "minivae-part-2"} <= names
    del sp
    gc.collect()
    assert crew.closed
    for t in crew.threads:
        t.join(timeout=5)
    assert len(crew.threads) == 2 and not any(t.is_alive() for t in crew.threads)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs os.fork")
def test_after_a_fork_the_child_starts_its_own_helpers():
    sp = ExampleSplit()
    _check_runs(sp, [(2, True)])
    pid = os.fork()
    if pid == 0:                                              # the child: the parent's helpers do not exist here
        code = 1
        try:
            _check_runs(sp, [(2, True), (3, False)])
            code = 0 if sp._crew.pid == os.getpid() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    _check_runs(sp, [(2, True)])

