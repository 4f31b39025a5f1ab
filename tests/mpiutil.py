"""Launching ``mpiexec`` from the tests (tests/test_mpi.py, tests/test_mpi_failures.py).

mpiexec is looked up beside the running interpreter first (the ``mpich`` wheel installs it into the
virtual environment's bin/), then on PATH. Every job has a time limit, so a hang fails the test
instead of the suite.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def find_mpiexec():
    """The mpiexec of this environment (beside python), else the one on PATH, else None."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("mpiexec")


def mpi_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    # Hydra (MPICH's mpiexec): start the ranks on this machine by fork, whatever a batch system or a
    # host file in the environment says; other launchers ignore these variables
    env["HYDRA_LAUNCHER"] = "fork"
    env.pop("HYDRA_HOST_FILE", None)
    env.pop("MINIVAE_DEBUG", None)
    # Python's own buffering: stderr flushed a line at a time, so mpiexec, which merges the ranks'
    # streams as they come, does not splice one rank's message into the middle of another's line
    env.pop("PYTHONUNBUFFERED", None)
    return env


def run(args, cwd, timeout, nproc=2):
    """``mpiexec -n nproc python ARGS`` (nproc=None: plain python); (returncode, stdout, stderr).

    On a timeout mpiexec gets SIGTERM, which ends every rank (hydra puts them in sessions of their
    own, out of reach of a process-group kill), then the group is killed; the test fails."""
    cmd = [sys.executable, *map(str, args)]
    if nproc is not None:
        exe = find_mpiexec()
        if exe is None:
            pytest.fail(f"mpi4py is installed but no mpiexec was found beside {sys.executable} or on PATH")
        cmd = [exe, "-n", str(nproc), *cmd]
    p = subprocess.Popen(cmd, cwd=cwd, env=mpi_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s\n--- stdout\n{out}\n--- stderr\n{err}")
    return p.returncode, out, err
