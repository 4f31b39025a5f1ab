"""Data-parallel training under a real MPI launcher: ``mpiexec -n 2 python -m minivae train --distributed``.

Every test starts ``mpiexec`` as a subprocess with a time limit (nothing can hang the suite) and
compares what it wrote with a single-process run of the same command, done here in the test process
through minivae.cli.main. In float64 the two agree to the order of floating-point summation
(issue 6: relative 1e-10 on the parameters after an epoch). The helper scripts launched under
mpiexec live in tests/mpi/; failures are injected there, on one rank, by patching minivae from the
outside.

mpiexec is looked up next to the running interpreter first (the ``mpich`` wheel installs it into the
virtual environment's bin/), then on PATH. The module is skipped only when mpi4py is missing.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="the MPI tests need mpi4py and an MPI library: pip install -e '.[mpi]'")

import mpiutil  # noqa: E402
from minivae import checkpoint, cli  # noqa: E402
from minivae.model import VAE  # noqa: E402

pytestmark = pytest.mark.mpi

SCRIPTS = Path(__file__).resolve().parent / "mpi"
TIMEOUT = 180                       # seconds for one mpiexec job; a hang fails the test instead
RTOL = 1e-10                        # norm-wise relative agreement of 2 ranks with 1 process (float64)

# a small float64 model on the bundled digits: 1293 training rows, so every batch size below leaves
# a partial last minibatch
BASE = ["--dataset", "digits", "--z-dim", "3", "--hidden", "16", "--dtype", "float64", "--quiet",
        "--no-plots", "--threads", "1"]
N_TRAIN = 1293


def run(args, cwd, timeout=TIMEOUT, nproc=2):
    return mpiutil.run(args, cwd, timeout, nproc)


def train_mpi(tmp_path, out, *flags, nproc=2):
    code, stdout, stderr = run(["-m", "minivae", "train", *BASE, *map(str, flags), "--out", out,
                                "--distributed"], cwd=tmp_path, nproc=nproc)
    assert code == 0, f"exit {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    return stdout, stderr


def train_one(tmp_path, out, *flags, base=BASE):
    """The same command in this process, without --distributed (the single-process reference)."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["train", *base, *map(str, flags), "--out", str(out)]) == 0
    finally:
        os.chdir(cwd)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / scale) if scale > 0 else float(np.linalg.norm(a))


def compare_runs(many, one, world_size=2):
    """Assert that the run in ``many`` (world_size ranks, or a list: per epoch) is the run in ``one``
    (1 process): the parameters, the optimizer state, the generator and the per-epoch losses.
    Returns the largest relative differences seen, by name."""
    meta_p, arr_p = checkpoint.load(Path(many) / "model.npz")
    meta_1, arr_1 = checkpoint.load(Path(one) / "model.npz")
    assert sorted(arr_p) == sorted(arr_1)
    diffs = {name: rel(arr_p[name], arr_1[name]) for name in sorted(arr_1)
             if arr_1[name].dtype.kind == "f"}                   # params, opt.m, opt.v, ...
    for name, d in diffs.items():
        assert d <= RTOL, f"{name}: relative difference {d:.3g} between {world_size} ranks and 1 process"
    for name in set(arr_1) - set(diffs):                          # integer state: equal
        np.testing.assert_array_equal(arr_p[name], arr_1[name], err_msg=name)
    np.testing.assert_array_equal(VAE.load(Path(many) / "model.npz").params, arr_p["params"])
    s_p, s_1 = meta_p["train"], meta_1["train"]
    assert s_p["rng"] == s_1["rng"] and s_p["epoch"] == s_1["epoch"] and s_p["step"] == s_1["step"]

    rows_p, rows_1 = metrics(many), metrics(one)
    assert rows_p == s_p["metrics"]                                # metrics.jsonl = the checkpoint's
    assert [r["epoch"] for r in rows_p] == [r["epoch"] for r in rows_1] == list(range(1, len(rows_1) + 1))
    for r_p, r_1 in zip(rows_p, rows_1):
        sizes = world_size if isinstance(world_size, list) else [world_size] * len(rows_p)
        assert r_p["world_size"] == sizes[r_p["epoch"] - 1] and r_1["world_size"] == 1
        for key in ("train_samples", "steps", "beta", "lr", "objective", "backend"):
            assert r_p[key] == r_1[key], key
        for key in ("train_loss", "test_loss", "val_loss"):
            d = abs(r_p[key] - r_1[key]) / abs(r_1[key])
            diffs[f"{key}@{r_p['epoch']}"] = d
            assert d <= 1e-12, f"epoch {r_p['epoch']} {key}: {r_p[key]!r} vs {r_1[key]!r}"
    return diffs


def report(what, diffs):
    worst = max(diffs, key=diffs.get)
    print(f"\n{what}: largest relative difference {diffs[worst]:.2e} ({worst}); "
          f"params {diffs['params']:.2e}")


def files(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).rglob("*"))


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# The communicator's primitives
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nproc", [2, 3])
def test_mpicomm_primitives(tmp_path, nproc):
    """Weighted means with unequal (and zero) weights, sums, and agreement on failure, checked on
    every rank against values worked out by hand (tests/mpi/comm_primitives.py)."""
    code, out, err = run([SCRIPTS / "comm_primitives.py"], cwd=tmp_path, nproc=nproc)
    results = sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == list(range(nproc)), f"exit {code}\n{out}\n{err}"
    assert all(r["size"] == nproc for r in results)
    assert [r["failures"] for r in results] == [[]] * nproc
    assert code == 0, err


# ----------------------------------------------------------------------------------------------
# Two ranks compute the single-process run
# ----------------------------------------------------------------------------------------------

def _kl_spy(monkeypatch, record):
    """Record, at every step of a single-process run, the batch-mean KL of each latent dimension
    under the current parameters, for the whole minibatch and for the two shares that 2 ranks hold
    (to show that the free-bits floor lies between the dimensions' KLs, and that a rank deciding on
    its own share would decide otherwise). It watches Run._minibatch, so it sees every step whatever
    the trainer."""
    from minivae import train as train_mod
    from minivae.distributions import kl_forward
    real = train_mod.Run._minibatch

    def minibatch(self, perm, s):
        xb, eps, weight = real(self, perm, s)
        mu, logvar = self.model.backend.encode(self.model.params, xb)
        kl = kl_forward(np.asarray(mu, np.float64), np.asarray(logvar, np.float64))
        half = len(xb) // 2                                  # rank 0 holds [0, b // 2), rank 1 the rest
        record.append([kl.mean(axis=0), kl[:half].mean(axis=0), kl[half:].mean(axis=0)])
        return xb, eps, weight
    monkeypatch.setattr(train_mod.Run, "_minibatch", minibatch)


FREE_BITS = 0.02   # nats: the digits' three KLs start near 0.01 and pass it at different steps

EQUIVALENCE = {
    # B = 37 is odd (the ranks hold 18 and 19 rows: weighted means), the last minibatch has 35 rows;
    # a fresh binarization per minibatch, L = 2 samples, and a free-bits floor between the KLs
    "numpy-elbo": ["--backend", "numpy", "--batch-size", 37, "--binarize", "dynamic", "--samples", 2,
                   "--free-bits", FREE_BITS],
    "numba-elbo": ["--backend", "numba", "--batch-size", 37, "--binarize", "dynamic", "--samples", 2,
                   "--free-bits", FREE_BITS],
    # B = 646: the last minibatch has 1293 - 2 * 646 = 1 row, so rank 0's share of it is empty;
    # IWAE with k = 3, SGD with momentum and weight decay, a KL warm-up
    "numpy-iwae": ["--backend", "numpy", "--batch-size", 646, "--objective", "iwae", "--k", 3,
                   "--optimizer", "sgd", "--lr", 0.05, "--weight-decay", 1e-3, "--warmup", 0.5],
    "numba-iwae": ["--backend", "numba", "--batch-size", 646, "--objective", "iwae", "--k", 3,
                   "--binarize", "static", "--optimizer", "adagrad"],
}


@pytest.mark.parametrize("case", list(EQUIVALENCE))
def test_two_ranks_train_the_single_process_model(tmp_path, monkeypatch, case):
    """One epoch on 2 ranks = one epoch in 1 process: parameters and optimizer state to relative
    1e-10, the generator's state exactly, train/test/val losses to 1e-12, every example seen once."""
    flags = [*EQUIVALENCE[case], "--epochs", 1]
    kl = []
    free_bits = "--free-bits" in flags
    if free_bits:
        _kl_spy(monkeypatch, kl)
    train_one(tmp_path, tmp_path / "one", *flags)    # first: it fills numba's cache for the ranks
    train_mpi(tmp_path, "two", *flags)
    diffs = compare_runs(tmp_path / "two", tmp_path / "one")
    report(case, diffs)
    row = metrics(tmp_path / "two")[0]
    assert row["train_samples"] == N_TRAIN
    if free_bits:                # the floor decided something: on for some dimensions, off for others
        assert len(kl) == row["steps"] == math.ceil(N_TRAIN / 37)
        on = np.array(kl) > FREE_BITS                        # (steps, whole/share 0/share 1, Z)
        mixed = np.mean(on[:, 0].any(axis=1) & ~on[:, 0].all(axis=1))
        # steps at which a rank deciding on its own share would differ from the whole minibatch: the
        # kl_active all-reduce matters there (without it the parameters differ by ~6e-3)
        differ = int(((on[:, 1] != on[:, 0]) | (on[:, 2] != on[:, 0])).any(axis=1).sum())
        print(f"{case}: free bits {FREE_BITS} split the dimensions at {mixed:.0%} of the steps; "
              f"a share alone would decide otherwise at {differ}")
        assert mixed >= 0.25 and differ >= 3, (mixed, differ)


def test_distributed_without_mpiexec_is_one_process(tmp_path):
    """``--distributed`` started without mpiexec is an MPI job of size 1: the single-process run,
    bit for bit (the all-reduces of one rank change nothing)."""
    flags = ["--batch-size", 37, "--binarize", "dynamic", "--samples", 2, "--free-bits", FREE_BITS, "--epochs", 1]
    code, out, err = run(["-m", "minivae", "train", *BASE, *map(str, flags), "--out", "solo", "--distributed"],
                         cwd=tmp_path, nproc=None)
    assert code == 0, err
    train_one(tmp_path, tmp_path / "one", *flags)
    _, a = checkpoint.load(tmp_path / "solo" / "model.npz")
    _, b = checkpoint.load(tmp_path / "one" / "model.npz")
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    (row,) = metrics(tmp_path / "solo")
    assert row["world_size"] == 1
    assert {k: v for k, v in row.items() if not k.endswith(("_s", "per_s"))} == \
        {k: v for k, v in metrics(tmp_path / "one")[0].items() if not k.endswith(("_s", "per_s"))}


# ----------------------------------------------------------------------------------------------
# Resume, Ctrl-C, and what is written
# ----------------------------------------------------------------------------------------------

RESUME_FLAGS = ["--backend", "numpy", "--batch-size", 37, "--binarize", "dynamic", "--samples", 2,
                "--free-bits", FREE_BITS]


def resume_mpi(tmp_path, run_dir, *flags, fault=None):
    """``--resume run_dir`` on 2 ranks (through tests/mpi/inject.py when a fault is given)."""
    args = ["train", "--resume", run_dir, *map(str, flags), "--distributed", "--quiet", "--no-plots", "--threads", 1]
    return run(["-m", "minivae", *args] if fault is None else [SCRIPTS / "inject.py", *fault, *args], cwd=tmp_path)


def test_resume_and_ctrl_c_distributed(tmp_path):
    """1 epoch on 2 ranks; ``--resume`` to 2 epochs on 2 ranks, where a Ctrl-C reaches rank 1 alone
    during step 20 of epoch 2; ``--resume`` again: the result is 2 epochs in 1 process.

    On the Ctrl-C both ranks agree to stop after the same step, rank 0 saves the mid-epoch state,
    and both exit 130 with one line each."""
    train_one(tmp_path, tmp_path / "one", *RESUME_FLAGS, "--epochs", 2)
    train_mpi(tmp_path, "two", *RESUME_FLAGS, "--epochs", 1)
    assert [r["epoch"] for r in metrics(tmp_path / "two")] == [1]

    code, out, err = resume_mpi(tmp_path, "two", "--epochs", 2, fault=["sigint:20", 1])
    assert code == 130, f"exit {code}\n{err}"
    lines = error_lines(err)
    assert len(lines) == 2 and all(line.startswith("minivae: interrupted at epoch 2, step 20/35; saved to two")
                                   for line in lines), err
    meta, arrays = checkpoint.load(tmp_path / "two" / "model.npz")
    assert (meta["train"]["epoch"], meta["train"]["step"]) == (1, 20) and "train.perm" in arrays
    assert files(tmp_path / "two") == ["metrics.jsonl", "model.npz"]
    assert len(metrics(tmp_path / "two")) == 1                        # epoch 2 is not done
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")

    code, out, err = resume_mpi(tmp_path, "two")                      # --epochs 2 is saved
    assert code == 0, err
    report("resume + ctrl-c", compare_runs(tmp_path / "two", tmp_path / "one"))
    assert [r["epoch"] for r in metrics(tmp_path / "two")] == [1, 2]

    # the same mid-epoch state finished by one process (a job resumed on fewer nodes): the saved
    # config says --distributed, so this is an MPI job of size 1, started without mpiexec
    code, out, err = run(["-m", "minivae", "train", "--resume", "two_then_one", "--quiet", "--no-plots",
                          "--threads", 1], cwd=tmp_path, nproc=None)
    assert code == 0, err
    compare_runs(tmp_path / "two_then_one", tmp_path / "one", world_size=[2, 1])


def test_only_rank_0_writes(tmp_path):
    """With pictures and progress output on, the run folder of 2 ranks holds exactly the files of a
    single-process run, metrics.jsonl one line per epoch, and the summary is printed once."""
    base = [a for a in BASE if a not in ("--quiet", "--no-plots")]
    flags = ["--batch-size", 200, "--epochs", 2]
    code, out, err = run(["-m", "minivae", "train", *base, *map(str, flags), "--out", "two", "--distributed"],
                         cwd=tmp_path)
    assert code == 0, err
    train_one(tmp_path, tmp_path / "one", *flags, base=base)
    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert {"model.npz", "metrics.jsonl"} < set(files(tmp_path / "two"))
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2
    assert out.count("run folder") == 1 and out.count("epoch 1/2") == 1 and out.count("epoch 2/2") == 1, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]        # nothing else anywhere


# ----------------------------------------------------------------------------------------------
# A failure on one rank stops every rank, with one line each, and keeps the last good checkpoint
# (exceptions on one rank at start-up, in a step, in the evaluation: tests/test_mpi_failures.py)
# ----------------------------------------------------------------------------------------------

FAIL_FLAGS = ["--backend", "numpy", "--batch-size", 64, "--epochs", 3]
STEPS = math.ceil(N_TRAIN / 64)                                      # 21 steps per epoch


def launch_fault(tmp_path, fault, rank):
    return run([SCRIPTS / "inject.py", fault, rank, "train", *BASE, *map(str, FAIL_FLAGS), "--out", "run",
                "--distributed"], cwd=tmp_path)


def assert_one_line_each(err, *words):
    lines = error_lines(err)
    assert "Traceback" not in err, err
    assert len(lines) == 2 and all(line.startswith("minivae: error: ") for line in lines), err
    for w in words:                                   # every rank says what failed, and where
        assert all(w in line for line in lines), f"{w!r} not in every line of\n{err}"


def assert_epoch_1_kept(tmp_path, killed=False):
    """The run folder holds the checkpoint and metrics of epoch 1, whole, and nothing else (but, when
    the job was killed, rank 0's lock file, which it had no chance to delete: the next run takes it)."""
    run_dir = tmp_path / "run"
    assert files(run_dir) == ([".lock"] if killed else []) + ["metrics.jsonl", "model.npz"]
    meta, _ = checkpoint.load(run_dir / "model.npz")
    assert meta["train"]["epoch"] == 1 and len(metrics(run_dir)) == 1
    train_one(tmp_path, tmp_path / "one", *[f if f != 3 else 1 for f in FAIL_FLAGS])
    compare_runs(run_dir, tmp_path / "one")


def test_nan_on_one_rank_mid_training(tmp_path):
    """Rank 1's loss (and gradient) become NaN at epoch 2, step 5: every rank stops after that step,
    each says where in one line, and the checkpoint of epoch 1 is left as it was."""
    code, out, err = launch_fault(tmp_path, f"nan:{STEPS + 5}", 1)
    assert code == 1, err
    assert_one_line_each(err, "rank 1", "the loss became nan at epoch 2, step 5/21", "epoch 1")
    assert_epoch_1_kept(tmp_path)


def test_checkpoint_write_failure_on_rank_0(tmp_path):
    """Rank 0's disk fills up half-way through writing the epoch-2 checkpoint (the 3rd atomic write):
    both ranks stop with one line, no temporary file is left, epoch 1's checkpoint is intact."""
    code, out, err = launch_fault(tmp_path, "write:3", 0)
    assert code == 1, err
    assert_one_line_each(err, "No space left on device (injected)", "rank 0")
    assert_epoch_1_kept(tmp_path)


def test_a_rank_that_dies_does_not_hang_the_job(tmp_path):
    """Rank 1 vanishes mid-step (no message, no MPI finalization): mpiexec ends the whole job,
    non-zero, well within the time limit, and epoch 1's checkpoint is intact."""
    code, out, err = launch_fault(tmp_path, f"crash:{STEPS + 5}", 1)
    assert code != 0
    assert_epoch_1_kept(tmp_path, killed=True)

