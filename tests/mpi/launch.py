"""Run ``minivae train`` under mpiexec with one failure injected on one rank (tests/test_mpi_failures.py).

    mpiexec -n 2 python tests/mpi/launch.py --inject raise --rank 1 --at 40 --log DIR -- train --distributed ...

The library has no test hooks: this script patches minivae on the chosen rank only, then calls the
real entry point, ``minivae.cli.main``, and exits with its status. Injections:

    data      loading the dataset raises DataError on that rank
    backend   building the model's backend raises RuntimeError on that rank (a node without the
              library or the GPU the backend needs)
    raise     the ``--at``-th call (1-based, over the run) of the backend's loss_and_grad on that
              rank raises ValueError: an exception in one rank's arithmetic, mid-step
    eval      the ``--at``-th evaluation of a split (per epoch: test, then validation) on that
              rank raises MemoryError

With ``--log DIR`` each rank writes its own stdout and stderr to DIR/rank<r>.out and DIR/rank<r>.err
(mpiexec merges the ranks' streams as they come) and, when the command line returns, its exit status
to DIR/rank<r>.rc: a rank without that file did not end by itself.
"""
from __future__ import annotations

import argparse
import os
import sys


def _wrap_nth_call(owner, name, at, exc):
    """Make the ``at``-th call of ``owner.name`` raise ``exc``."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kw):
        calls[0] += 1
        if calls[0] == at:
            raise exc
        return original(*args, **kw)
    setattr(owner, name, wrapper)


def inject(kind, at):
    if kind == "data":
        from minivae import data

        def load_dataset(name, *args, **kw):
            raise data.DataError(f"injected: cannot read the {name} files")
        data.load_dataset = load_dataset
    elif kind == "backend":
        from minivae import model

        def get_backend(name):
            raise RuntimeError(f"injected: backend {name!r} cannot start on this node")
        model.get_backend = get_backend
    elif kind == "raise":
        from minivae.kernels.cpu import NumbaBackend
        from minivae.kernels.numpy_ import NumpyBackend
        for cls in (NumpyBackend, NumbaBackend):
            _wrap_nth_call(cls, "loss_and_grad", at, ValueError("injected: the backend failed"))
    elif kind == "eval":
        from minivae import evaluate
        _wrap_nth_call(evaluate, "elbo_per_example", at, MemoryError("injected: out of memory in the evaluation"))
    else:
        raise SystemExit(f"unknown injection {kind!r}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--inject", choices=("data", "backend", "raise", "eval"), required=True)
    p.add_argument("--rank", type=int, default=1, help="the rank that fails")
    p.add_argument("--at", type=int, default=1, help="which call fails (1-based)")
    p.add_argument("--log", metavar="DIR", help="per-rank stdout, stderr and exit status files")
    opts, rest = p.parse_known_args()
    if rest[:1] == ["--"]:
        rest = rest[1:]
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.Get_rank()
    if opts.log:
        for fd, ext in ((1, "out"), (2, "err")):
            f = os.open(os.path.join(opts.log, f"rank{rank}.{ext}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
    if rank == opts.rank:
        inject(opts.inject, opts.at)
    from minivae.cli import main as cli_main
    code = cli_main(rest)
    sys.stdout.flush()
    sys.stderr.flush()
    if opts.log:
        with open(os.path.join(opts.log, f"rank{rank}.rc"), "w") as f:
            f.write(f"{code}\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
