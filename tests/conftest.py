"""Shared pytest configuration: a derandomized hypothesis profile and small fixtures.

The "minivae" profile keeps hypothesis deterministic (derandomize=True: the same examples on every
run and every machine), without deadlines (timings on a shared 2-core CI box are noisy), and with a
modest number of examples so the gradient tests stay well under a minute. Select another profile
with HYPOTHESIS_PROFILE=... (e.g. "thorough" for a longer local search).
"""
import os

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


@pytest.fixture
def rng():
    """A fixed-seed generator: every statistical test is reproducible."""
    return np.random.default_rng(20261124)
