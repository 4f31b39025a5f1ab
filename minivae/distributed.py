"""Data-parallel training over MPI (mpi4py): the communicator the training loop talks to.

The loop in minivae/train.py is written against a small protocol, implemented by ``trainers.SerialComm`` for
one process and by :class:`MPIComm` here:

    rank, size, is_root
    allreduce_mean_(arr, weight=None)   in place: the (weighted) mean over ranks of a flat array
    allreduce_sum(arr)                  the elementwise sum over ranks (a new array)
    all_ok(ok, message)                 (True, None) if every rank is ok, else (False, first failing rank's message)
    barrier()
    local_rank()                        (rank on this node, ranks on this node), for binding GPUs

:func:`collective` runs a piece of work on every rank and makes the ranks agree on its failure, so that an
error on one rank stops them all with the same message instead of leaving the others in the next collective.

Everything moves as contiguous NumPy buffers through the upper-case mpi4py calls (``Allreduce``, ``Bcast``):
no Python object is ever pickled. Launch with ``mpiexec -n P minivae train --distributed ...``.
"""
from __future__ import annotations

import numpy as np

MESSAGE_BYTES = 1024   # an error message travels as a fixed-size UTF-8 buffer


def collective(comm, fn, what):
    """Run ``fn`` on every rank and agree: if it fails on any rank, every rank raises, so nothing
    hangs. One process raises its own exception; with more ranks every rank raises the same
    RuntimeError, naming the first failing rank and its message (chained to its own exception on
    that rank), so each rank's one line says what happened where. With more ranks any exception
    counts (a MemoryError on one node must not leave the others in the next collective); the
    unexpected kinds are named in the message."""
    err = None
    try:
        result = fn()
    except (ValueError, OSError, RuntimeError) as e:
        result, err = None, e
    except Exception as e:
        if comm.size == 1:
            raise
        result, err = None, e
    text = None
    if err is not None:
        text = str(err) if isinstance(err, (ValueError, OSError, RuntimeError)) else f"{type(err).__name__}: {err}"
    ok, message = comm.all_ok(err is None, text)
    if err is not None and comm.size == 1:
        raise err
    if not ok or err is not None:
        raise RuntimeError(f"{what} failed on {message or f'rank {comm.rank}: {text}'}") from err
    return result


def mpi_available() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return True


class MPIComm:
    """The communicator protocol over ``MPI.COMM_WORLD`` (or a given mpi4py communicator)."""

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError("--distributed needs mpi4py and an MPI library: pip install -e '.[mpi]'") from None
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.is_root = self.rank == 0

    def allreduce_mean_(self, arr, weight=None):
        """arr <- sum_r w_r arr_r / sum_r w_r, in place (w_r = 1 when ``weight`` is None).

        Weights let ranks with unequal shares of a minibatch (the last, partial one) combine their
        per-rank *means* into the exact global mean.
        """
        w = 1.0 if weight is None else float(weight)
        total = self._scalar(w, self.MPI.SUM) if weight is not None else float(self.size)
        if w != 1.0:
            arr *= arr.dtype.type(w)
        self.comm.Allreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)
        arr *= arr.dtype.type(1.0 / total)
        return arr

    def _scalar(self, value, op):
        buf = np.array([value], dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=op)
        return float(buf[0])

    def allreduce_sum(self, arr):
        a = np.ascontiguousarray(np.asarray(arr, dtype=np.float64))
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=self.MPI.SUM)
        return out

    def all_ok(self, ok, message=None):
        """Agree on failure: if any rank is not ok, every rank learns the lowest failing rank's message."""
        first_bad = int(self._scalar(self.size if ok else self.rank, self.MPI.MIN))
        if first_bad == self.size:
            return True, None
        buf = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
        if self.rank == first_bad:
            raw = (message or "failed").encode("utf-8")[:MESSAGE_BYTES]
            buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.comm.Bcast(buf, root=first_bad)
        text = bytes(buf).rstrip(b"\0").decode("utf-8", errors="replace")
        return False, f"rank {first_bad}: {text}"

    def barrier(self):
        self.comm.Barrier()

    def local_rank(self):
        """(rank among the processes on this node, how many there are): a collective call.
        Ranks that share a node share its GPUs (see kernels.cuda.select_local_device)."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank(), node.Get_size()
        finally:
            node.Free()
