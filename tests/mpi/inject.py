"""Launched by tests/test_mpi.py: ``mpiexec -n P python tests/mpi/inject.py FAULT RANK minivae-args...``

Makes one thing go wrong on rank RANK only, by patching minivae from the outside (the library has
no test hooks), then runs the ``minivae`` command line (minivae.cli.main) with the remaining
arguments and exits with its status. FAULT is one of

    nan:N         the N-th training step's loss and gradient are NaN (N counts from 1 over the run)
    sigint:N      SIGINT arrives during the N-th training step (Ctrl-C on this rank only)
    write:N       the N-th atomic file write fails half-way with ENOSPC (rank 0 writes the files)
    crash:N       the process dies during the N-th training step (os._exit(3), no message, no MPI
                  finalization)

Every other rank runs unpatched. The step counters count calls of the backend's loss_and_grad.
"""
import errno
import os
import signal
import sys

from mpi4py import MPI

from minivae import checkpoint, cli
from minivae.kernels import get_backend


def backend_name(argv):
    return argv[argv.index("--backend") + 1] if "--backend" in argv else "numpy"


def on_step(argv, n, action):
    """Pass the result of the n-th loss_and_grad call (of the backend named in argv) through ``action``."""
    cls = get_backend(backend_name(argv))
    real = cls.loss_and_grad
    calls = [0]

    def loss_and_grad(self, *args, **kw):
        calls[0] += 1
        result = real(self, *args, **kw)
        return action(result) if calls[0] == n else result
    cls.loss_and_grad = loss_and_grad


def main():
    fault, rank, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    kind, _, arg = fault.partition(":")
    if MPI.COMM_WORLD.Get_rank() == rank:
        if kind == "nan":
            def poison(result):
                loss, grad = result
                grad[...] = float("nan")
                return float("nan"), grad
            on_step(argv, int(arg), poison)
        elif kind == "sigint":
            def interrupt(result):
                os.kill(os.getpid(), signal.SIGINT)
                return result
            on_step(argv, int(arg), interrupt)
        elif kind == "crash":
            on_step(argv, int(arg), lambda result: os._exit(3))
        elif kind == "write":
            real, calls, n = checkpoint.atomic_write, [0], int(arg)

            def atomic_write(path, write):
                calls[0] += 1
                if calls[0] != n:
                    return real(path, write)

                def half(f):
                    f.write(b"PK\x03\x04 a partial archive")
                    raise OSError(errno.ENOSPC, "No space left on device (injected)")
                return real(path, half)
            checkpoint.atomic_write = atomic_write
        else:
            raise SystemExit(f"inject.py: unknown fault {fault!r}")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
