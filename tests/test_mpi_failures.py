"""A failure on one MPI rank stops every rank, each by itself, with the same one line (issue 6).

Complements tests/test_mpi.py (equivalence, resume, Ctrl-C, a NaN, a failed write, a rank that
dies): here the failures are *exceptions* raised on one rank, at start-up (the data, the backend),
inside a training step (in loss_and_grad, and with free bits after the KL decision's all-reduce)
and in the sharded evaluation. Before the fix in minivae/train.py an exception in rank 1's step hung the job: rank 1
printed its error and left, rank 0 waited in the gradient Allreduce forever.

Each job runs tests/mpi/launch.py under ``mpiexec -n 2`` with a time limit, and every rank writes
its own stderr and exit status (``--log``), so the test sees what each rank said and that each one
ended by itself rather than being killed by the launcher.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py and an MPI library: pip install -e '.[mpi]'")

import mpiutil  # noqa: E402
from minivae import checkpoint  # noqa: E402

pytestmark = pytest.mark.mpi

LAUNCH = Path(__file__).resolve().parent / "mpi" / "launch.py"
TIMEOUT = 120
COMMON = ["--dataset", "digits", "--dtype", "float64", "--z-dim", "4", "--hidden", "16", "--quiet",
          "--no-plots", "--threads", "1"]
FLAGS = ["--backend", "numpy", "--batch-size", "37", "--epochs", "2"]     # 1293 rows: 35 steps per epoch


def mpiexec(args, cwd):
    """``mpiexec -n 2 python ARGS``: (returncode, stdout, stderr); a job past TIMEOUT fails the test."""
    return mpiutil.run(args, cwd, TIMEOUT)


def fail_on_rank_1(tmp_path, inject, at=1, flags=FLAGS):
    """Train with ``inject`` on rank 1; returns (mpiexec's stderr, the one line every rank printed)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    code, out, err = mpiexec([LAUNCH, "--inject", inject, "--rank", 1, "--at", at, "--log", logs, "--",
                              "train", *COMMON, *flags, "--distributed", "--out", tmp_path / "run"], tmp_path)
    assert code != 0, f"the job succeeded\n{out}\n{err}"
    assert "Traceback" not in err and "BAD TERMINATION" not in err, err
    lines = []
    for r in range(2):
        rc = logs / f"rank{r}.rc"
        assert rc.exists(), f"rank {r} did not end by itself\n{err}"
        rank_err = (logs / f"rank{r}.err").read_text()
        assert int(rc.read_text()) == 1, rank_err
        assert "Traceback" not in rank_err, rank_err
        lines.append(rank_err.strip().splitlines())
    assert len(lines[0]) == 1 and lines[0] == lines[1], lines            # one line, the same on both ranks
    line = lines[0][0]
    assert line.startswith("minivae: error: ") and "rank 1" in line, line
    return line


def files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*"))


@pytest.mark.parametrize("inject,what", [("data", "loading the data failed on rank 1: injected: cannot read"),
                                         ("backend", "building the model failed on rank 1: injected: backend")])
def test_startup_failure_on_one_rank(tmp_path, inject, what):
    line = fail_on_rank_1(tmp_path, inject)
    assert what in line, line
    assert files(tmp_path / "run") == []                  # the folder root prepared, and nothing in it


@pytest.fixture(scope="module")
def epoch_1(tmp_path_factory):
    """The checkpoint's arrays of the same run stopped after epoch 1 (2 ranks)."""
    d = tmp_path_factory.mktemp("mpi_ref")
    code, out, err = mpiexec(["-m", "minivae", "train", *COMMON, *FLAGS[:-1], "1", "--distributed",
                              "--out", d / "ref"], d)
    assert code == 0, err
    return checkpoint.load(d / "ref" / "model.npz")[1]


def assert_epoch_1_kept(tmp_path, ref):
    """The run folder holds epoch 1's checkpoint and metrics, bit for bit those of the same run
    stopped after epoch 1 (``ref``), and no temporary file."""
    run_dir = tmp_path / "run"
    assert files(run_dir) == ["metrics.jsonl", "model.npz"]       # no temporary file
    meta, arrays = checkpoint.load(run_dir / "model.npz")
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert meta["train"]["epoch"] == 1 and [r["epoch"] for r in rows] == [1] == \
        [r["epoch"] for r in meta["train"]["metrics"]]
    assert np.isfinite(arrays["params"]).all()
    assert sorted(ref) == sorted(arrays)
    for name in ref:
        np.testing.assert_array_equal(arrays[name], ref[name], err_msg=name)


def test_exception_in_a_step_on_one_rank(tmp_path, epoch_1):
    """Call 40 is epoch 2, step 5 of 35: both ranks stop after that step."""
    line = fail_on_rank_1(tmp_path, "raise", at=40)
    assert "rank 1: the step failed (ValueError: injected: the backend failed) at epoch 2, step 5/35" in line
    assert "the last good checkpoint (epoch 1) is kept" in line
    assert_epoch_1_kept(tmp_path, epoch_1)


def test_exception_in_the_evaluation_on_one_rank(tmp_path, epoch_1):
    """The 3rd evaluation is epoch 2's test split: rank 1 runs out of memory in its shard."""
    line = fail_on_rank_1(tmp_path, "eval", at=3)
    assert "evaluating the test split failed on rank 1: MemoryError: injected: out of memory" in line
    assert_epoch_1_kept(tmp_path, epoch_1)


def test_exception_after_the_free_bits_all_reduce(tmp_path):
    """With free bits and P > 1 each step first all-reduces the per-dimension KL sums; rank 1 then
    fails in loss_and_grad (numba) and must still meet rank 0 in the gradient's all-reduce."""
    flags = ["--backend", "numba", "--batch-size", "37", "--epochs", "1", "--free-bits", "0.3"]
    line = fail_on_rank_1(tmp_path, "raise", at=3, flags=flags)
    assert "rank 1: the step failed (ValueError: injected: the backend failed) at epoch 1, step 3/35" in line
    assert "no checkpoint was written" in line
    assert files(tmp_path / "run") == []
