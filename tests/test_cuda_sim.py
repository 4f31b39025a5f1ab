"""The CUDA backend without a GPU.

1. The kernels and the device-resident step run under numba's CUDA simulator. The simulator is
   chosen when numba is imported (``NUMBA_ENABLE_CUDASIM=1``), so its tests (tests/cuda_sim/sim_*.py)
   run in a pytest process of their own, started here; its output is shown when it fails.
2. In this process (no simulator), ``backend="cuda"`` without a usable GPU fails at once with a
   one-line RuntimeError that names the cause, and never falls back to the CPU.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIM_TESTS = sorted((ROOT / "tests" / "cuda_sim").glob("sim_*.py"))
CAUSES = ("numba.cuda cannot be imported", "no CUDA driver", "no CUDA device",
          "the CUDA driver failed to initialise", "the CUDA device cannot be used")


@pytest.mark.slow
def test_cuda_backend_under_the_simulator():
    assert SIM_TESTS, "tests/cuda_sim/sim_*.py not found"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    cmd = [sys.executable, "-m", "pytest", *map(str, SIM_TESTS), "-q", "-p", "no:cacheprovider",
           "-W", "ignore::numba.core.errors.NumbaWarning",          # xoroshiro seeding in object mode
           "-W", "ignore:overflow encountered:RuntimeWarning"]      # its uint64 arithmetic, in NumPy
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"simulator tests failed:\n{r.stdout[-20000:]}\n{r.stderr[-5000:]}"
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]


def _gpu_or_simulator():
    from numba.core import config
    if config.ENABLE_CUDASIM:
        return True
    from numba import cuda
    return cuda.is_available()


def _expect_unavailable(cause):
    from minivae import VAE
    with pytest.raises(RuntimeError) as e:
        VAE(4, 2, hidden=(3,), backend="cuda")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("backend 'cuda' is unavailable: ")
    assert cause in msg, msg
    return msg


def test_cuda_backend_without_a_gpu_fails_with_one_line():
    if _gpu_or_simulator():
        pytest.skip("a GPU (or the simulator) is available here")
    msg = _expect_unavailable("")
    assert any(c in msg for c in CAUSES), msg


def test_the_message_names_a_missing_numba_cuda(monkeypatch):
    import numba
    monkeypatch.delattr(numba, "cuda", raising=False)
    monkeypatch.setitem(sys.modules, "numba.cuda", None)       # `from numba import cuda` -> ImportError
    _expect_unavailable("numba.cuda cannot be imported")


class _Driver:
    def __init__(self, count=0, error=None):
        self.count, self.error = count, error

    def get_device_count(self):
        if self.error:
            raise self.error
        return self.count


@pytest.mark.parametrize("driver,cause", [
    (_Driver(error=RuntimeError("Error at driver init: CUDA driver library cannot be found.")), "no CUDA driver"),
    (_Driver(error=RuntimeError("Error at driver init: Call to cuInit results in CUDA_ERROR_NO_DEVICE (100)")),
     "no CUDA device"),
    (_Driver(count=0), "no CUDA device"),
    (_Driver(count=1), "the CUDA device cannot be used"),
], ids=["no-driver", "no-device-at-init", "zero-devices", "unusable-device"])
def test_the_message_names_the_driver_or_device_cause(driver, cause, monkeypatch):
    from numba.core import config
    if config.ENABLE_CUDASIM:
        pytest.skip("the simulator has no driver")
    from numba import cuda
    from numba.cuda.cudadrv import driver as driver_module
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    monkeypatch.setattr(driver_module, "driver", driver)
    _expect_unavailable(cause)
