"""Trainers and communicators: one optimizer step on this rank's share, and the agreement of the
ranks of a data-parallel run (docs/math.md §6, §8, §10). Split out of minivae/train.py
(docs/design.md, "The run" and "Data-parallel shares").

The loop (minivae.train.Run) never touches a gradient itself: a *trainer* turns (minibatch, eps,
beta) into one optimizer step, and a *communicator* combines the ranks.

Communicator protocol (``SerialComm`` here, ``minivae.distributed.MPIComm`` for ``--distributed``):
    rank, size, is_root
    allreduce_mean_(arr, weight=None)   in place: the mean over ranks (weighted by ``weight``)
    allreduce_sum(arr)                  the elementwise sum over ranks, as a new float64 array
    all_ok(ok, message)                 (True, None) when every rank is ok, else (False, a message)
    barrier()

Trainer protocol (``HostTrainer`` here; a backend may supply its own through
``backend.make_trainer(params, optimizer, comm, objective, free_bits, estimator=...)``, e.g. one that
keeps the parameters and the optimizer state on a GPU, or SegmentUpdateTrainer; ``make_trainer`` is one
of the optional capabilities of minivae.kernels.interface.Backend, None when the backend has none, and
it returns None for a run it leaves to HostTrainer):
    step(xb, eps, beta, weight=None) -> float   one step on this rank's share; returns its loss
                                                (``weight`` is passed only when ranks hold shares of
                                                unequal size: then it is this rank's row count)
    sync_params()                               afterwards ``params``, ``optimizer.state`` and
                                                ``optimizer.t`` on the host are current (the loop
                                                calls it before every evaluation and checkpoint)

Rank agreement. Work that may fail on one rank only (reading, building a backend, a step) goes
through ``distributed.collective`` (or :func:`on_root` for root-only work such as writing files), so
every rank stops at the same point with the same one-line message naming the first failing rank.
"""
from __future__ import annotations

import numpy as np

from .distributed import collective
from .distributions import kl_forward
from .kernels.interface import require_estimator


def on_root(comm, fn, what):
    """Run ``fn`` on the root rank only; every rank learns whether it failed (``collective``)."""
    return collective(comm, fn if comm.is_root else (lambda: None), what)


class SerialComm:
    """The communicator of a single process: every collective is the identity."""
    rank = 0
    size = 1
    is_root = True

    def allreduce_mean_(self, arr, weight=None):
        return arr

    def allreduce_sum(self, arr):
        return np.array(arr, dtype=np.float64)

    def all_ok(self, ok, message=None):
        return (True, None) if ok else (False, message)

    def barrier(self):
        pass


def make_comm(distributed=False):
    """SerialComm, or the MPI communicator for ``--distributed`` (needs mpi4py)."""
    if not distributed:
        return SerialComm()
    from .distributed import MPIComm, mpi_available
    if not mpi_available():
        raise RuntimeError("--distributed needs mpi4py and an MPI library: pip install -e '.[mpi]'")
    return MPIComm()


def kl_active_over_ranks(comm, kl_sum, n, free_bits):
    """The free-bits decision (§5.3) for the whole minibatch split over ranks: each rank gives its
    per-dimension KL sum kl_sum (Z,) over its n rows; one all-reduce of Z + 1 numbers; dimension j is
    active (1.0) when the minibatch's mean KL_j exceeds free_bits. Every rank gets the same (Z,)."""
    total = comm.allreduce_sum(np.append(kl_sum, n))
    return (total[:-1] / max(total[-1], 1.0) > free_bits).astype(np.float64)


class HostTrainer:
    """One optimizer step on host arrays: loss_and_grad into a preallocated buffer, the all-reduce of
    the gradient (the mean over ranks), then the optimizer's in-place update.   §6, §8"""

    def __init__(self, backend, params, optimizer, comm, objective="elbo", free_bits=0.0, estimator="reparam"):
        self.backend, self.params, self.optimizer, self.comm = backend, params, optimizer, comm
        self.objective, self.free_bits = objective, free_bits
        self.est_kw = {"estimator": estimator}        # one of backend.estimators (interface.py)
        self.grad = np.empty_like(params)                     # (P,) reused every step
        self.error = None      # the exception of the last step on this rank (with more than one rank)

    def step(self, xb, eps, beta, weight=None) -> float:
        """With P > 1 ranks, an exception in this rank's own arithmetic must not leave the others
        waiting in the all-reduce: the rank keeps it in ``self.error``, still takes part in every
        collective of the step (with a NaN gradient) and returns a NaN loss, so the loop's per-step
        check stops every rank with its message."""
        self.error = None
        kw = {}
        if self.free_bits > 0 and self.comm.size > 1:
            kw["kl_active"] = self._kl_active(xb)
        kw.update(self.est_kw)
        loss = float("nan")
        if self.error is None:
            try:
                if len(xb):
                    loss = self._loss_and_grad(xb, eps, beta, kw)
                else:                                          # an empty share of a tiny last batch
                    loss, self.grad[...] = 0.0, 0
            except Exception as e:
                self._failed(e)
        self.comm.allreduce_mean_(self.grad, weight)
        self.optimizer.step(self.params, self.grad)
        return float(loss)

    def _loss_and_grad(self, xb, eps, beta, kw):
        """This rank's loss; its gradient into ``self.grad``."""
        loss, _ = self.backend.loss_and_grad(self.params, xb, eps, beta=beta, objective=self.objective,
                                             free_bits=self.free_bits, grad=self.grad, **kw)
        return loss

    def _failed(self, e):
        if self.comm.size == 1:
            raise e
        self.error = e
        self.grad[...] = np.nan

    def _kl_active(self, xb):
        """Free bits over ranks: the floor applies to the batch-mean KL of the *whole* minibatch, so
        the ranks add up their per-dimension KL sums (one small all-reduce of Z + 1 numbers, after an
        encoder pass) and every rank applies the same decision.   §5.3"""
        kl_sum = np.zeros(self.backend.spec.z_dim)
        if len(xb):
            try:
                mu, logvar = self.backend.encode(self.params, xb)
                kl_sum = kl_forward(mu.astype(np.float64), logvar.astype(np.float64)).sum(axis=0)
            except Exception as e:
                self._failed(e)
                kl_sum = np.full(self.backend.spec.z_dim, np.nan)
        return kl_active_over_ranks(self.comm, kl_sum, len(xb), self.free_bits)

    def sync_params(self):
        pass


class SegmentUpdateTrainer(HostTrainer):
    """HostTrainer's step in one process, with the optimizer's update taken into the backend's pass
    (``loss_and_grad(..., update=optimizer.begin_step(params, grad))``): a backend that splits the step
    over threads (kernels/batchsplit.py) updates each thread's segment of the parameters as soon as that
    segment of the gradient is summed, on every core and while it is in cache, instead of once after the
    pass on one core. The same arithmetic per element, so bit for bit HostTrainer's parameters, state and
    step count (tests/test_batchsplit.py). Made by ``NumbaStackBackend.make_trainer``."""

    def step(self, xb, eps, beta, weight=None) -> float:
        update = self.optimizer.begin_step(self.params, self.grad)
        try:
            loss, _ = self.backend.loss_and_grad(self.params, xb, eps, beta=beta, objective=self.objective,
                                                 free_bits=self.free_bits, grad=self.grad, update=update,
                                                 **self.est_kw)
        except BaseException:
            self.optimizer.t -= 1                 # the step did not happen (as HostTrainer's would not)
            raise
        return float(loss)


class AETrainer(HostTrainer):
    """HostTrainer for the Autoencoder (``--model ae``): no eps, no beta; the loss is the batch
    mean of the squared error (§13)."""

    def _loss_and_grad(self, xb, eps, beta, kw):
        loss, _ = self.backend.loss_and_grad(self.params, xb, grad=self.grad)
        return loss


def make_trainer(model, optimizer, comm, objective, free_bits, estimator="reparam"):
    """The backend's own trainer when it makes one for this run (``backend.make_trainer`` is not None and
    returns a trainer), else HostTrainer."""
    if not hasattr(model.spec, "likelihood"):            # minivae.Autoencoder
        return AETrainer(model.backend, model.params, optimizer, comm)
    backend = model.backend                     # capabilities declared (kernels/interface.py)
    require_estimator(backend, estimator)
    if backend.make_trainer is not None:
        trainer = backend.make_trainer(model.params, optimizer, comm, objective, free_bits, estimator=estimator)
        if trainer is not None:
            return trainer
    return HostTrainer(model.backend, model.params, optimizer, comm, objective, free_bits, estimator)

