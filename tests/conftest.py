"""Shared pytest configuration: a derandomized hypothesis profile and small fixtures.

The "minivae" profile keeps hypothesis deterministic (derandomize=True: the same examples on every
run and every machine), without deadlines (timings on a shared 2-core CI box are noisy), and with a
modest number of examples so the gradient tests stay well under a minute. Select another profile
with HYPOTHESIS_PROFILE=... (e.g. "thorough" for a longer local search).
"""
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "minivae", derandomize=True, deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile(
    "thorough", derandomize=False, deadline=None, max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "minivae"))

# pytest-xdist: each worker compiles into a Numba cache folder of its own. Numba numbers a function's
# cached specializations from the index it last read, so two processes compiling *different*
# specializations (float32 in one worker, float64 in the other) at the same moment can write each
# other's machine code under one number, and a later load of the wrong code segfaults. Processes a test
# starts (MPI ranks, CLI runs) inherit their worker's folder. (minivae/kernels/numba_cache.py adds the
# source version below it.)
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER:
    _base = os.environ.get("NUMBA_CACHE_DIR") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivae" / "numba"
    os.environ["NUMBA_CACHE_DIR"] = str(Path(_base) / f"xdist-{_WORKER}")

# The Ctrl-C tests play a user at a terminal. A test run started with ``&`` by a shell without job
# control inherits SIGINT ignored, and minivae then leaves it ignored (minivae/interrupts.py), as it
# should for such a run: give this process, and through exec every process it starts, Python's own.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def rng():
    """A fixed-seed generator: every statistical test is reproducible."""
    return np.random.default_rng(20261124)
