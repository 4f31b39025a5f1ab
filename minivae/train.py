"""The training loop: seeded minibatches, schedules, checkpoints, metrics and progress (docs/math.md §5, §8).

It never touches a gradient itself: a *trainer* turns (minibatch, eps, beta) into one optimizer step,
and a *communicator* combines the ranks of a data-parallel run.

Communicator protocol (``SerialComm`` here, ``minivae.distributed.MPIComm`` for ``--distributed``):
    rank, size, is_root
    allreduce_mean_(arr, weight=None)   in place: the mean over ranks (weighted by ``weight``)
    allreduce_sum(arr)                  the elementwise sum over ranks, as a new float64 array
    all_ok(ok, message)                 (True, None) when every rank is ok, else (False, a message)
    barrier()

Trainer protocol (``HostTrainer`` here; a backend may supply its own through
``backend.make_trainer(params, optimizer, comm, objective, free_bits)``, e.g. one that keeps the
parameters and the optimizer state on a GPU):
    step(xb, eps, beta, weight=None) -> float   one step on this rank's share; returns its loss
                                                (``weight`` is passed only when ranks hold shares of
                                                unequal size: then it is this rank's row count)
    sync_params()                               afterwards ``params``, ``optimizer.state`` and
                                                ``optimizer.t`` on the host are current (the loop
                                                calls it before every evaluation and checkpoint)

Minibatches. ``batch_size`` B is the *global* batch. Each epoch draws one permutation of the n
training rows and walks it in ceil(n / B) steps; the last, partial minibatch is kept (every example
is seen once per epoch; its gradient is the mean over its own, fewer, rows). Rank r of P takes the
contiguous share [r b / P, (r + 1) b / P) of each minibatch of b rows, for rows and eps alike, so P
processes compute the single-process step up to the order of floating-point summation.

Random numbers. One generator, ``default_rng([seed, 1])``, drives training, identically on every
rank, in this order: per epoch the permutation; per step the dynamic binarization of the global
minibatch (``--binarize dynamic``), then eps (L, b, Z) for the global minibatch (L = samples, or k
for IWAE). The model's initial weights come from ``default_rng(seed)`` (minivae.model). Evaluation
uses its own fixed noise (minivae.evaluate, seed 0), the same at every epoch, so test losses are
comparable from epoch to epoch and equal to ``minivae evaluate``'s ELBO.

KL warm-up (Bowman et al. 2016, Sønderby et al. 2016), per step:
    beta_t = beta * min(1, (epoch - 1 + s / steps) / warmup)    epoch 1-based, step s 0-based,
so beta_t rises linearly from 0 over ``warmup`` epochs (0: no warm-up, beta_t = beta).

Metrics. ``RUNDIR/metrics.jsonl`` holds one JSON object per epoch:
    epoch          1-based
    train_loss     mean over the epoch's examples of the minibatch loss that was optimized, nats per
                   example: the negative ELBO (with L samples), or the negative IWAE bound; with
                   beta_t != 1 or free bits, that objective rather than -ELBO. A reported mean of a
                   device trainer counts for the rows of the steps it covers.
    test_loss      -ELBO per example on the test split, one sample of fixed noise, beta = 1
    val_loss       the same on the validation split (absent when it is empty)
    train_time_s   seconds of training steps only (no evaluation, no checkpoint)
    eval_time_s    seconds of the evaluation
    train_samples  examples seen in the epoch, over all ranks; samples_per_s = train_samples / train_time_s
    steps, world_size, beta (beta_t at the epoch's last step), lr, objective, backend
With ``--binarize dynamic`` the validation and test splits are evaluated on one fixed binarization
each (``eval_split``), the same for every epoch and for ``minivae evaluate``.

Checkpoint. ``RUNDIR/model.npz`` (minivae.checkpoint, atomic, no pickle) holds the parameters and the
model config (``VAE.load`` reads it) and the training state: the optimizer's arrays (``opt.*``), and in
``meta["train"]`` the training config, the epochs and steps completed, the generator's
``bit_generator.state`` (JSON), the metrics so far; after an interrupted epoch also the epoch's
permutation (``train.perm``) and its partial sums. It is written after every epoch, and on Ctrl-C
after the last completed step, so ``--resume`` continues bit-identically. A NaN or inf loss stops
the run without writing: the last good checkpoint stays. With P ranks, a NaN on any rank, or an
exception in one rank's set-up, step or evaluation, stops every rank at the same point with the
same one-line message naming the first failing rank (``distributed.collective``, ``Run._check``).

The run folder. A run holds ``RUNDIR/.lock`` locked (``fcntl.flock``, advisory, exclusive) from
before it reads anything until it ends, resume included, and deletes it then (``RunLock``); with P
ranks only rank 0 holds it. A second run on the same folder stops at once with one line naming the
holder (pid, host, start time, command: what the holder wrote into the lock file). Under the lock,
the ``.tmp-*`` temporaries that a process killed mid-write left behind are removed. ``--overwrite``
replaces nothing up front: the new run validates everything (config, data, model, backend) first,
and its first checkpoint replaces the old ``model.npz`` and ``metrics.jsonl`` (the old pictures go
then too), so a typo in ``--data-dir`` loses nothing. A fresh run whose set-up fails removes the
folder it created.

Backend. ``auto`` (the default of ``train``) becomes ``cuda`` when every rank has a usable GPU, else
``numba`` (minivae.kernels.resolve_backend); the concrete name is what the checkpoint's config, every
metrics row and the summary say. On ``--resume``, ``auto`` keeps the run's own backend.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from . import __version__
from . import checkpoint
from . import data as data_mod
from . import evaluate as ev
from . import resources
from .distributed import collective
from .distributions import kl_forward
from .model import VAE
from .optim import make_optimizer
from .recipe import init_output_bias, lr_at

CHECKPOINT = "model.npz"
METRICS = "metrics.jsonl"
TRAIN_STREAM = 1             # the training generator is default_rng([seed, TRAIN_STREAM])
EVAL_BINARIZE_SEED = 0xE1    # --binarize dynamic: the one fixed binarization of val/test
LOCK = ".lock"              # the run folder's lock file (see the module doc)
MODELS = ("vae", "ae")
RESUMABLE = ("epochs", "data_dir", "backend", "quiet", "plots", "eval_batch_size", "distributed")


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN or inf loss); the message says what happened and what is kept."""


class Interrupted(Exception):
    """Ctrl-C: the state after the last completed step is saved; the message says how to resume."""


# ----------------------------------------------------------------------------------------------
# Communicator and trainer
# ----------------------------------------------------------------------------------------------

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


class HostTrainer:
    """One optimizer step on host arrays: loss_and_grad into a preallocated buffer, the all-reduce of
    the gradient (the mean over ranks), then the optimizer's in-place update.   §6, §8"""

    def __init__(self, backend, params, optimizer, comm, objective="elbo", free_bits=0.0, estimator="reparam"):
        self.backend, self.params, self.optimizer, self.comm = backend, params, optimizer, comm
        self.objective, self.free_bits = objective, free_bits
        self.est_kw = {} if estimator == "reparam" else {"estimator": estimator}   # numpy backend only
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
        total = self.comm.allreduce_sum(np.append(kl_sum, len(xb)))
        return (total[:-1] / max(total[-1], 1.0) > self.free_bits).astype(np.float64)

    def sync_params(self):
        pass


class AETrainer(HostTrainer):
    """HostTrainer for the Autoencoder (``--model ae``): no eps, no beta; the loss is the batch
    mean of the squared error (§13)."""

    def _loss_and_grad(self, xb, eps, beta, kw):
        loss, _ = self.backend.loss_and_grad(self.params, xb, grad=self.grad)
        return loss


def make_trainer(model, optimizer, comm, objective, free_bits, estimator="reparam"):
    """The backend's own trainer when it has one (``backend.make_trainer``), else HostTrainer."""
    if not hasattr(model.spec, "likelihood"):            # minivae.Autoencoder
        return AETrainer(model.backend, model.params, optimizer, comm)
    factory = getattr(model.backend, "make_trainer", None)
    if factory is not None and estimator == "reparam":
        return factory(model.params, optimizer, comm, objective, free_bits)
    if estimator not in getattr(model.backend, "estimators", ("reparam",)):
        raise ValueError(f"--estimator {estimator} is not implemented on --backend {model.backend_name}")
    return HostTrainer(model.backend, model.params, optimizer, comm, objective, free_bits, estimator)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Every option of ``minivae train`` (the CLI flag is the field name with dashes)."""
    dataset: str = "digits"
    data_dir: str | None = None
    out: str | None = None                  # the run folder (default runs/<dataset>)
    epochs: int = 10
    batch_size: int = 128                   # global minibatch, over all ranks
    z_dim: int | tuple = 20                 # a tuple (Z_1, ..., Z_S): S stochastic layers (§11)
    hidden: tuple = (400,)                  # widths of every block, or one tuple per stochastic layer
    activation: str = "relu"
    likelihood: str = "bernoulli"
    optimizer: str = "adam"
    lr: float | None = None                 # None: the optimizer's default (adam 1e-3, sgd/adagrad 1e-2)
    lr_schedule: str = "constant"           # constant | step | iwae (minivae.recipe)
    lr_step_epochs: int = 10                # step: epochs between two decays
    lr_gamma: float = 0.1                   # step: the factor of each decay
    adam_eps: float = 1e-8                  # Adam's epsilon (Burda et al. use 1e-4)
    init_output_bias: str = "zero"          # zero | data: the decoder's output bias (minivae.recipe)
    momentum: float = 0.9                   # sgd only
    weight_decay: float = 0.0
    backend: str = "auto"                   # cuda with a usable GPU, else numba (minivae.kernels)
    seed: int = 0
    dtype: str = "float32"
    samples: int = 1                        # L, Monte Carlo samples per example (elbo)
    objective: str = "elbo"
    estimator: str = "reparam"              # "dreg": doubly reparameterized IWAE gradient (§12)
    k: int = 5                              # importance samples per example (iwae)
    beta: float = 1.0
    warmup: float = 0.0                     # epochs of linear KL warm-up (0: none)
    free_bits: float = 0.0                  # per-dimension KL floor, nats (elbo)
    binarize: str = "none"
    val_fraction: float = 0.1
    eval_batch_size: int = ev.DEFAULT_BATCH_SIZE
    resume: str | None = None
    overwrite: bool = False
    quiet: bool = False
    plots: bool = True
    distributed: bool = False
    model: str = "vae"                      # "vae", or "ae": the deterministic minivae.Autoencoder (§13)

    def validate(self) -> "TrainConfig":
        """Check every field; a ValueError says which one and what was expected."""
        from .distributions import LIKELIHOODS
        from .kernels import BACKENDS
        from .layers import ACTIVATIONS
        from .model import DTYPES
        from .model import ModelSpec
        from .objectives import ESTIMATORS, OBJECTIVES
        from .optim import OPTIMIZERS
        from .recipe import LR_SCHEDULES, OUTPUT_BIAS_INITS

        choices = {"lr_schedule": LR_SCHEDULES, "init_output_bias": OUTPUT_BIAS_INITS, "dataset": data_mod.DATASETS, "activation": ACTIVATIONS, "likelihood": LIKELIHOODS,
                   "optimizer": OPTIMIZERS, "backend": BACKENDS, "dtype": DTYPES,
                   "objective": OBJECTIVES, "estimator": ESTIMATORS, "binarize": data_mod.BINARIZE,
                   "model": MODELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "samples", "k", "eval_batch_size", "lr_step_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        hidden = tuple(self.hidden) if not isinstance(self.hidden, (int, np.integer)) else (self.hidden,)
        if hidden and all(isinstance(h, (list, tuple)) for h in hidden):   # one tuple per stochastic layer
            hidden = tuple(tuple(h) for h in hidden)
            flat = [h for block in hidden for h in block]
        else:
            flat = hidden
        if not hidden or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1 for h in flat):
            raise ValueError(f"hidden must be one or more positive integers, got {self.hidden!r}")
        self.hidden = tuple(int(h) for h in hidden) if flat is hidden else tuple(tuple(int(h) for h in b) for b in hidden)
        spec = ModelSpec(1, self.z_dim, self.hidden)       # z_dim and per-layer hidden: the model's checks
        self.z_dim = spec.z_dim
        if spec.n_stochastic > 1 and self.free_bits > 0:
            raise ValueError("--free-bits applies to models with one stochastic layer only")
        if self.estimator == "score" and (self.objective != "elbo" or spec.n_stochastic > 1):
            raise ValueError("--estimator score applies to --objective elbo with one stochastic layer only")
        if self.estimator == "dreg" and self.objective != "iwae":
            raise ValueError("--estimator dreg applies to --objective iwae only")
        if self.estimator != "reparam" and not (self.backend in ("numpy", "auto") or spec.n_stochastic > 1):
            raise ValueError(f"--estimator {self.estimator} runs on --backend numpy (or any backend for a stack) only")
        if self.lr is not None and not (_finite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (_finite(self.lr_gamma) and 0 < self.lr_gamma <= 1):
            raise ValueError(f"lr_gamma must be a finite number in (0, 1], got {self.lr_gamma!r}")
        if not (_finite(self.adam_eps) and self.adam_eps > 0):
            raise ValueError(f"adam_eps must be a finite number > 0, got {self.adam_eps!r}")
        if not (_finite(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must be a finite number in [0, 1), got {self.momentum!r}")
        for name in ("beta", "weight_decay", "warmup", "free_bits"):
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not _finite(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {self.val_fraction!r}")
        if self.objective == "iwae" and self.samples != 1:
            raise ValueError("--samples is for --objective elbo; --objective iwae takes its samples from --k")
        if self.objective == "iwae" and self.free_bits > 0:
            raise ValueError("--free-bits applies to --objective elbo only")
        if self.model == "ae":
            self._check_ae()
        return self

    def _check_ae(self):
        """--model ae: the options of the VAE's objective do not apply; numpy or numba only."""
        d = TrainConfig()
        for name in ("likelihood", "objective", "samples", "k", "beta", "warmup", "free_bits"):
            if getattr(self, name) != getattr(d, name):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} applies to --model vae only (the autoencoder's loss is the squared error)")
        from .autoencoder import BACKENDS as AE_BACKENDS
        if self.backend not in AE_BACKENDS + ("auto",):
            raise ValueError(f"--model ae runs on backend {' or '.join(AE_BACKENDS)}, got {self.backend!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = [list(h) if isinstance(h, tuple) else h for h in self.hidden]
        if isinstance(self.z_dim, tuple):
            d["z_dim"] = list(self.z_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise checkpoint.CheckpointError(f"training config has unknown fields {sorted(unknown)}")
        c = cls(**d)
        c.hidden = tuple(tuple(h) if isinstance(h, list) else h for h in c.hidden)
        if isinstance(c.z_dim, list):
            c.z_dim = tuple(c.z_dim)
        return c

    def run_dir(self) -> Path:
        return Path(self.resume or self.out or f"runs/{self.dataset}")

    def optimizer_hyper(self) -> dict:
        h = {"weight_decay": self.weight_decay}
        if self.lr is not None:
            h["lr"] = self.lr
        if self.optimizer == "sgd":
            h["momentum"] = self.momentum
        if self.optimizer == "adam":
            h["eps"] = self.adam_eps
        return h

    def eps_samples(self) -> int:
        return self.k if self.objective == "iwae" else self.samples


def auto_backend(config: TrainConfig, gpu: bool) -> str:
    """What ``--backend auto`` becomes for this run: the fastest backend that runs its math: cuda with a
    GPU on every rank, else numba (stacks on their kernels/cpu_stack.py and cuda_stack.py); the score and
    DReG estimators of one stochastic layer need the numpy reference."""
    from .model import ModelSpec
    if config.model == "ae":                              # minivae.Autoencoder: numpy or numba
        return "numba"
    stack = ModelSpec(1, config.z_dim, config.hidden).n_stochastic > 1
    if config.estimator != "reparam" and not stack:
        return "numpy"
    return "cuda" if gpu else "numba"


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def beta_at(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The KL weight of step ``step`` (0-based) of epoch ``epoch`` (1-based): a linear warm-up."""
    if config.warmup <= 0:
        return float(config.beta)
    return float(config.beta) * min(1.0, (epoch - 1 + step / steps) / config.warmup)


# ----------------------------------------------------------------------------------------------
# The run folder and its checkpoint
# ----------------------------------------------------------------------------------------------

def holds_run(run_dir) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / CHECKPOINT).exists() or (run_dir / METRICS).exists()


def read_run(run_dir):
    """The checkpoint of a run folder: (TrainConfig, meta, arrays). CheckpointError when it is not one.

    Everything is checked before use (:func:`check_train_state`): the training config, the model
    config it must agree with, the sizes of the optimizer's arrays (read only once their headers
    match), the counters, the generator state and the metrics. What needs the data (the length of
    ``train.perm``, the step within the epoch) is checked by ``Run._restore``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise checkpoint.CheckpointError(f"{run_dir}: no such run folder")
    path = run_dir / CHECKPOINT
    found = {}

    def expect(meta):
        found["config"], expected = _expected_arrays(path, meta)
        return expected

    meta, arrays = checkpoint.load(path, expect=expect)
    check_train_state(path, found["config"], meta, arrays)
    return found["config"], meta, arrays


MAX_COUNT = 1 << 40            # epochs, steps and examples in a checkpoint: a sane bound on counters
_BOOLS = ("overwrite", "quiet", "plots", "distributed")
_PATHS = ("data_dir", "out", "resume")


def _expected_arrays(path, meta):
    """(TrainConfig, {name: checkpoint.Expect}) of a training checkpoint, from its meta alone."""
    from .model import spec_from_config
    from .optim import Adagrad, Adam, SGD

    def fail(message):
        return checkpoint.CheckpointError(f"{path}: {message}")

    state = meta.get("train")
    if not isinstance(state, dict) or "config" not in state or "rng" not in state:
        raise fail("a model without training state; it cannot be resumed")
    d = state["config"]
    if not isinstance(d, dict):
        raise fail(f"malformed training config (a JSON {type(d).__name__}, not an object)")
    try:
        config = TrainConfig.from_dict(d)
        config.validate()
    except checkpoint.CheckpointError as e:
        raise fail(str(e)) from None
    except (TypeError, ValueError) as e:
        raise fail(f"malformed training config ({e})") from None
    for name in _BOOLS:
        if not isinstance(getattr(config, name), bool):
            raise fail(f"malformed training config ({name} must be true or false)")
    for name in _PATHS:
        if not isinstance(getattr(config, name), (str, type(None))):
            raise fail(f"malformed training config ({name} must be a string or null)")
    for name in ("epochs", "batch_size", "samples", "k", "eval_batch_size", "z_dim"):
        v = getattr(config, name)
        if (max(v) if isinstance(v, tuple) else v) > MAX_COUNT:
            raise fail(f"malformed training config ({name} {getattr(config, name)} is out of range)")
    if config.seed >= 1 << 64:
        raise fail(f"malformed training config (seed {config.seed} is out of range)")
    if "config" not in meta:
        raise fail("checkpoint has no model config or parameters")
    try:
        if config.model == "ae":                 # minivae.Autoencoder: no likelihood
            from .autoencoder import _spec_from_config
            spec, dtype = _spec_from_config(meta["config"]), meta["config"]["dtype"]
            saved = (spec.z_dim, spec.hidden, spec.activation, dtype)
            wanted = (config.z_dim, config.hidden, config.activation, config.dtype)
        else:
            spec, dtype = spec_from_config(meta["config"])
            saved = (spec.z_dim, spec.hidden, spec.activation, spec.likelihood, dtype)
            wanted = (config.z_dim, config.hidden, config.activation, config.likelihood, config.dtype)
    except checkpoint.CheckpointError as e:
        raise fail(str(e)) from None
    if saved != wanted:
        raise fail("the model config does not match the training config")
    size = spec.layout.size
    names = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam}[config.optimizer].state_names
    expected = {"params": checkpoint.Expect((size,), dtype, source="the config implies")}
    for k in names:
        expected[f"opt.{k}"] = checkpoint.Expect((size,), dtype, source=f"the {config.optimizer} optimizer implies")
    expected["opt.t"] = checkpoint.Expect((), np.int64)
    expected["train.perm"] = checkpoint.Expect((None,), np.int64, required=state.get("partial") is not None)
    return config, expected


def _count(v, lo=0, hi=MAX_COUNT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _number(v, lo=-math.inf) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= lo


def check_train_state(path, config, meta, arrays):
    """Refuse a training state that could not have been written by a run (CheckpointError)."""
    def fail(message):
        return checkpoint.CheckpointError(f"{path}: bad training state ({message})")

    state = meta["train"]
    epoch, step = state.get("epoch"), state.get("step", 0)
    if not _count(epoch):
        raise fail(f"epoch must be a count, got {str(epoch)[:40]}")
    if not _count(step):
        raise fail(f"step must be a count, got {str(step)[:40]}")
    rng = state["rng"]
    ok = (isinstance(rng, dict) and rng.get("bit_generator") == "PCG64" and isinstance(rng.get("state"), dict)
          and set(rng["state"]) == {"state", "inc"} and all(_count(v, 0, (1 << 128) - 1) for v in rng["state"].values())
          and rng.get("has_uint32") in (0, 1) and _count(rng.get("uinteger"), 0, (1 << 32) - 1))
    if ok:
        try:
            np.random.default_rng(0).bit_generator.state = rng
        except (TypeError, ValueError, KeyError, OverflowError):
            ok = False
    if not ok:
        raise fail("the generator state is not a PCG64 state")
    metrics = state.get("metrics")
    if not isinstance(metrics, list) or len(metrics) != epoch:
        raise fail(f"metrics must be a list of one row per epoch ({epoch})")
    for i, row in enumerate(metrics):
        good = (isinstance(row, dict) and row.get("epoch") == i + 1
                and all(_number(row.get(k)) for k in ("train_loss", "test_loss"))
                and ("val_loss" not in row or _number(row["val_loss"]))
                and _number(row.get("train_time_s"), 0) and _count(row.get("train_samples"))
                and _count(row.get("world_size"), 1))
        if not good:
            raise fail(f"metrics row {i + 1} is malformed")
    partial = state.get("partial")
    if partial is not None:
        if not (isinstance(partial, dict) and _count(partial.get("step")) and _number(partial.get("loss_sum"))
                and _count(partial.get("seen")) and _number(partial.get("train_time_s"), 0)):
            raise fail("the interrupted epoch's partial state is malformed")
        if partial["step"] != step:
            raise fail(f"the interrupted epoch's step {partial['step']} is not the saved step {step}")
    elif "train.perm" in arrays:
        raise fail("a permutation without an interrupted epoch")
    t = arrays["opt.t"]
    if not 0 <= int(t) <= MAX_COUNT:
        raise fail(f"the optimizer's step count {int(t)} is out of range")
    for name, a in arrays.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise fail(f"{name} contains NaN or inf")
    for name in ("opt.v", "opt.sum_sq"):                 # sums of squares
        if name in arrays and config.optimizer in ("adam", "adagrad") and (arrays[name] < 0).any():
            raise fail(f"{name} holds negative values")


def resume_config(run_dir, overrides: dict) -> TrainConfig:
    """The saved config of ``run_dir`` with the fields a resume may change (RESUMABLE) taken from
    ``overrides``; any other field in ``overrides`` must equal the saved value."""
    saved, _, _ = read_run(run_dir)
    changes = {}
    for name, value in overrides.items():
        if name in ("resume", "out", "overwrite"):
            continue
        if name in RESUMABLE:
            changes[name] = value
        elif name == "hidden" and tuple(tuple(v) if isinstance(v, list) else v for v in value) == tuple(saved.hidden):
            continue
        elif getattr(saved, name) != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} cannot change on --resume (the run in {run_dir} uses {getattr(saved, name)!r})")
    return replace(saved, resume=str(run_dir), out=str(run_dir), overwrite=False, **changes)


class RunLockedError(ValueError):
    """The run folder is locked by another running ``minivae train``."""


class RunLock:
    """An exclusive advisory lock on ``run_dir/.lock`` (fcntl.flock, never waits), held until
    :meth:`release` (or the end of the process, whatever ends it). The holder writes who it is into
    the file (one JSON line: pid, host, started, command) so that a second run can say who holds it,
    and deletes the file when it releases it, so a finished run folder holds only the run.

    Deleting a lock file is safe with one more check: a process that opened the file just before
    the holder deleted it may lock that deleted file; so after locking, the lock is kept only if
    the path still names the very file locked, else it starts over. The lock file is written in
    place, never through atomic_write (a new inode would be a second, independent lock)."""
    fd = None                                # until locked (a refused lock has none to release)

    def __init__(self, run_dir):
        self.path = path = Path(run_dir) / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            try:
                if self._lock(fd, run_dir):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)                     # the holder deleted it as it ended: take the new one
        self.fd = fd

    def _lock(self, fd, run_dir) -> bool:
        """Lock ``fd``; False when its file is no longer at ``self.path``."""
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise checkpoint.NotARegularFileError(f"{self.path}: the lock file is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"{run_dir} is in use by another training run ({_holder(os.pread(fd, 4096, 0))}); "
                                 f"wait for it to end, or train into another --out") from None
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            return False
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": _command_line()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        return True

    def release(self):
        """Delete the lock file (still holding the lock), then let go of it."""
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)                # closing the descriptor releases the flock
            self.fd = None

    def __del__(self):                       # a Run dropped without close() still lets go
        try:
            self.release()
        except OSError:
            pass


def _command_line() -> str:
    """This process's command line, the way it was typed: ``minivae ...`` for the console script
    and ``python -m minivae`` alike (sys.argv[0] is then minivae/__main__.py)."""
    if not sys.argv:
        return ""
    name = Path(sys.argv[0]).name
    return shlex.join(["minivae" if name in ("__main__.py", "minivae") else name] + sys.argv[1:])


def _holder(raw: bytes) -> str:
    """The holder's lock-file line as words: "pid 12 on host h since 2026-...Z: minivae train ..."."""
    try:
        info = json.loads(raw.decode("utf-8"))
        return f"pid {info['pid']} on {info['host']} since {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "its lock file does not say which process; it is still running"


def write_metrics(path, metrics):
    text = "".join(json.dumps(row) + "\n" for row in metrics)
    checkpoint.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}


def eval_split(x, binarize, split="test"):
    """The rows evaluated: as loaded, or for ``--binarize dynamic`` one fixed binarization of the
    split (the stream default_rng([EVAL_BINARIZE_SEED, SPLIT_STREAMS[split]]))."""
    if binarize == "dynamic" and len(x):
        rng = np.random.default_rng([EVAL_BINARIZE_SEED, SPLIT_STREAMS[split]])
        return data_mod.static_binarize(x, rng)
    return x


# ----------------------------------------------------------------------------------------------
# Ctrl-C: finish the step, save, stop
# ----------------------------------------------------------------------------------------------

class _StopFlag:
    """Within ``with``, the first SIGINT sets ``.set`` (the loop saves and stops after the step it
    is in); a second one raises KeyboardInterrupt at once. Outside the main thread it does nothing."""

    def __init__(self):
        self.set = False
        self._old = None

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def _on_root(comm, fn, what):
    return collective(comm, fn if comm.is_root else (lambda: None), what)


class Run:
    """One training run: the data, the model, the optimizer, the state of the loop."""

    def __init__(self, config: TrainConfig, comm):
        config.validate()
        self.comm = comm
        self.lock = None                     # root's RunLock
        self._created = False                # root made the folder (removed again if set-up fails)
        self._replaces = False               # --overwrite: the old run goes at the first checkpoint
        self.has_checkpoint = False          # this run's own checkpoint exists (written or resumed)
        try:
            self._setup(config)
        except BaseException:
            self.close(failed=True)
            raise

    def _setup(self, config):
        comm = self.comm
        saved = None
        if config.resume:                    # every rank reads the state; the saved config rules
            _on_root(comm, lambda: self._claim(Path(config.resume), resume=True), "locking the run folder")
            saved_config, meta, arrays = collective(comm, lambda: read_run(config.resume), "reading the checkpoint")
            given = {name: getattr(config, name) for name in RESUMABLE}
            if given["backend"] == "auto":   # no choice made: the run keeps its own backend
                given["backend"] = saved_config.backend
            config = replace(saved_config, resume=str(config.resume), out=str(config.resume), overwrite=False,
                             **given)
            config.validate()
            saved = (meta, arrays)
            self.has_checkpoint = True
        else:
            _on_root(comm, lambda: self._claim(config.run_dir(), resume=False,
                                                   overwrite=config.overwrite), "preparing the run folder")
        self.backend_auto = config.backend == "auto"
        if self.backend_auto:                # cuda only when every rank can use a GPU
            from .kernels import gpu_usable    # never raises: any failure to probe means no GPU
            gpus = comm.allreduce_sum(np.array([float(gpu_usable())]))[0]
            config = replace(config, backend=auto_backend(config, gpus == comm.size))
        self.config = c = config
        # refuse sizes a machine cannot hold (minivae.resources), before any folder is made or data read
        collective(comm, lambda: resources.check_training(c), "checking the memory")
        self.run_dir = config.run_dir()
        self.ckpt_path = self.run_dir / CHECKPOINT
        self.metrics_path = self.run_dir / METRICS

        self.dataset = collective(comm, lambda: data_mod.load_dataset(
            c.dataset, c.data_dir, c.binarize, c.val_fraction, c.seed, c.dtype), "loading the data")
        ds = self.dataset
        if c.backend == "cuda" and comm.size > 1:          # ranks on a node share its GPUs in turn
            local_rank, _ = comm.local_rank()
            from .kernels.cuda import select_local_device
            collective(comm, lambda: select_local_device(local_rank), "choosing a GPU")
        # a backend can fail on one machine only (no GPU there): every rank must learn it
        self.model = collective(comm, lambda: _build_model(c, ds.x_dim), "building the model")
        m = self.model
        self.x_train = m.check_x(ds.x_train)
        self.x_test = m.check_x(eval_split(ds.x_test, c.binarize, "test"))
        self.x_val = m.check_x(eval_split(ds.x_val, c.binarize, "val")) if len(ds.x_val) else None
        self.test_eps = ev.eval_eps(len(self.x_test), c.z_dim, m.dtype)
        self.val_eps = ev.eval_eps(len(self.x_val), c.z_dim, m.dtype) if self.x_val is not None else None
        self.optimizer = make_optimizer(c.optimizer, m.params.size, m.dtype, backend=m.backend,
                                        **c.optimizer_hyper())
        self.base_lr = self.optimizer.lr                  # the schedule's rate at epoch 1
        if c.init_output_bias == "data":                  # before a resume overwrites every parameter
            init_output_bias(m, self.x_train)
        self.rng = np.random.default_rng([c.seed, TRAIN_STREAM])
        self.epoch, self.metrics = 0, []
        self.partial = None                  # the interrupted epoch: perm, step, sums
        if saved is not None:
            collective(comm, lambda: self._restore(*saved), "restoring the training state")
        self.trainer = collective(comm, lambda: make_trainer(m, self.optimizer, comm, c.objective, c.free_bits,
                                                             c.estimator),
                                   "setting up the trainer")

    # -- setup ---------------------------------------------------------------------------------
    def _claim(self, run_dir, resume, overwrite=False):
        """Root only: create the folder (a fresh run), lock it, clear stale temporaries, and refuse
        a folder that holds a run unless --overwrite (which replaces it only at the first checkpoint)."""
        if resume and not run_dir.is_dir():
            return                                     # read_run says: no such run folder
        self._created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ValueError(f"{run_dir}: exists and is not a folder; --out names the run folder") from None
        self.lock = RunLock(run_dir)
        checkpoint.remove_stale_temporaries(run_dir)
        if not resume and holds_run(run_dir):
            if not overwrite:
                raise ValueError(f"{run_dir} already holds a run ({CHECKPOINT} or {METRICS}); pass "
                                 f"--resume {run_dir} to continue it or --overwrite to replace it")
            self._replaces = True

    def close(self, failed=False):
        """Release the run folder (root); after a failed set-up, remove the folder if this run made it
        and it is empty."""
        if self.lock is None:
            return
        run_dir = self.lock.path.parent
        self.lock.release()
        self.lock = None
        if failed and self._created:
            try:
                run_dir.rmdir()                        # only when it is empty
            except OSError:
                pass

    def _restore(self, meta, arrays):
        """Load the state read (and checked) by read_run, after checking what needs the data."""
        state, path, m = meta["train"], self.ckpt_path, self.model
        p = arrays.get("params")
        if p is None or p.shape != m.params.shape or p.dtype != m.dtype:
            raise checkpoint.CheckpointError(f"{path}: parameters do not match the model of the saved config")
        n = len(self.x_train)
        steps = math.ceil(n / self.config.batch_size)
        partial = state.get("partial")
        if partial is not None:
            perm = arrays.get("train.perm")
            if perm is None or perm.shape != (n,):
                raise checkpoint.CheckpointError(
                    f"{path}: bad training state (the interrupted epoch's permutation has shape "
                    f"{None if perm is None else perm.shape}, the data has {n} training rows)")
            if perm.min(initial=0) < 0 or perm.max(initial=0) >= n or \
                    np.bincount(perm, minlength=n).max(initial=1) != 1:
                raise checkpoint.CheckpointError(f"{path}: bad training state (train.perm is not a "
                                                 f"permutation of the {n} training rows)")
            if not (partial["step"] <= steps and partial["seen"] <= n):
                raise checkpoint.CheckpointError(
                    f"{path}: bad training state (step {partial['step']} of an epoch of {steps} steps, "
                    f"{partial['seen']} of {n} examples seen)")
        try:
            self.optimizer.load_state_dict(arrays)
            self.rng.bit_generator.state = state["rng"]
            self.epoch = int(state["epoch"])
            self.metrics = list(state["metrics"])
            if partial is not None:
                self.partial = dict(partial, perm=arrays["train.perm"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise checkpoint.CheckpointError(f"{path}: incomplete training state ({type(e).__name__}: {e})") from None
        m.params[...] = p

    # -- checkpoint ----------------------------------------------------------------------------
    def _kept(self):
        if self.has_checkpoint:
            return f"the last good checkpoint (epoch {self.epoch}) is kept in {self.ckpt_path}"
        if self.config.overwrite:
            return f"no checkpoint was written (the old run in {self.run_dir}, if any, is kept)"
        return "no checkpoint was written"

    def save(self, step=0, perm=None, partial=None):
        """Write the whole state (root only, agreed by every rank). ``perm``/``partial``: mid-epoch."""
        self.trainer.sync_params()
        state = {"config": self.config.to_dict(), "epoch": self.epoch, "step": int(step),
                 "rng": self.rng.bit_generator.state, "metrics": self.metrics,
                 "optimizer": {"name": self.config.optimizer, "hyper": self.optimizer.hyper()},
                 "partial": partial}
        arrays = dict(self.optimizer.state_dict())
        if perm is not None:
            arrays["train.perm"] = perm
        meta = {"train": state, "dataset": self.config.dataset,
                "image_shape": [int(v) for v in self.dataset.image_shape], "minivae_version": __version__}

        def write():
            self.model.save(self.ckpt_path, extra_meta=meta, extra_arrays=arrays)
            write_metrics(self.metrics_path, self.metrics)
            if self._replaces:               # --overwrite: the old run's pictures go with it
                from .plots import FILENAMES
                for name in FILENAMES.values():
                    (self.run_dir / name).unlink(missing_ok=True)
                self._replaces = False
        _on_root(self.comm, write, "writing the checkpoint")
        self.has_checkpoint = True

    # -- one epoch -----------------------------------------------------------------------------
    def _minibatch(self, perm, s):
        """This rank's rows and eps for step ``s``: its share of the global minibatch (see module doc)."""
        c, comm, m = self.config, self.comm, self.model
        idx = perm[s * c.batch_size:(s + 1) * c.batch_size]              # the global minibatch, b rows
        b = len(idx)
        lo, hi = comm.rank * b // comm.size, (comm.rank + 1) * b // comm.size
        if c.binarize == "dynamic":
            xb = data_mod.dynamic_binarize(self.x_train[idx], self.rng)[lo:hi]
        else:
            xb = self.x_train[idx[lo:hi]]
        weight = None if b % comm.size == 0 else hi - lo
        if c.model == "ae":                                               # deterministic: no eps
            return np.ascontiguousarray(xb), None, weight
        if m.n_stochastic > 1:                   # one (L, b, Z_l) draw per layer, bottom to top
            eps = tuple(np.ascontiguousarray(self.rng.standard_normal((c.eps_samples(), b, Z), dtype=m.dtype)[:, lo:hi])
                        for Z in m.z_dims)
            return np.ascontiguousarray(xb), eps, weight
        eps = self.rng.standard_normal((c.eps_samples(), b, c.z_dim), dtype=m.dtype)  # (L, b, Z)
        return np.ascontiguousarray(xb), np.ascontiguousarray(eps[:, lo:hi]), weight

    def _check(self, loss, stop, epoch, s, steps, bar):
        """Agree over ranks, after every step: did any rank see a NaN/inf loss (stop, keep the last
        checkpoint), or a Ctrl-C (returns True: save and stop)? One small all-reduce."""
        error = getattr(self.trainer, "error", None)         # an exception in this rank's step
        bad_here = error is not None or (loss is not None and not math.isfinite(loss))
        bad, interrupted = self.comm.allreduce_sum(
            np.array([bad_here, stop is not None and stop.set], dtype=np.float64))
        if bad:
            bar.close()
            kept = self._kept()
            what = None
            if bad_here:
                what = f"the step failed ({type(error).__name__}: {error})" if error is not None \
                    else f"the loss became {loss}"
            if self.comm.size > 1:             # every rank learns which rank failed first, and why
                _, what = self.comm.all_ok(not bad_here, what)
            raise TrainingError(f"{what} at epoch {epoch}, step {s + 1}/{steps} (lr {self.optimizer.lr:g}); "
                                f"training stopped and {kept}") from error
        return bool(interrupted)

    def run_epoch(self, stop, bar_factory):
        """Train one epoch (or finish an interrupted one); returns its metrics row."""
        c, comm = self.config, self.comm
        epoch = self.epoch + 1
        n = len(self.x_train)
        steps = math.ceil(n / c.batch_size)
        if self.partial is not None:          # resume inside this epoch
            perm, first = self.partial["perm"], int(self.partial["step"])
            loss_sum = float(self.partial["loss_sum"]) if comm.is_root else 0.0
            seen = int(self.partial["seen"]) if comm.is_root else 0
            train_time = float(self.partial["train_time_s"])
            self.partial = None
        else:
            perm, first, loss_sum, seen, train_time = self.rng.permutation(n), 0, 0.0, 0, 0.0

        # A trainer returns each step's loss (HostTrainer), or a mean over its last few steps and
        # None in between (a device-resident trainer; flush_loss() gives the rest at the end). A
        # reported mean counts for the rows of the steps it covers.
        flush = getattr(self.trainer, "flush_loss", None)
        unreported = 0                                   # rows of steps whose loss is not in yet
        self.optimizer.lr = lr_at(c.lr_schedule, self.base_lr, epoch, c.lr_step_epochs, c.lr_gamma)
        bar = bar_factory(steps, first, epoch)
        t0 = time.perf_counter()
        beta = beta_at(c, epoch, max(first - 1, 0), steps)
        for s in range(first, steps):
            beta = beta_at(c, epoch, s, steps)
            xb, eps, weight = self._minibatch(perm, s)
            loss = self.trainer.step(xb, eps, beta) if weight is None else \
                self.trainer.step(xb, eps, beta, weight=weight)
            seen += len(xb)
            unreported += len(xb)
            if loss is None and s == steps - 1 and flush is not None:
                loss = flush()                           # the steps since the last report
            if loss is not None:
                loss_sum += loss * unreported
                unreported = 0
            interrupted = self._check(loss, stop, epoch, s, steps, bar)
            bar.update(1)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.2f}", beta=f"{beta:.3g}", refresh=False)
            if interrupted:
                train_time += time.perf_counter() - t0
                bar.close()
                if flush is not None and unreported:
                    last = flush()
                    self._check(last, None, epoch, s, steps, bar)
                    loss_sum += (last or 0.0) * unreported
                totals = comm.allreduce_sum(np.array([loss_sum, seen], dtype=np.float64))
                self.save(step=s + 1, perm=perm, partial={"step": s + 1, "loss_sum": float(totals[0]),
                                                          "seen": int(totals[1]), "train_time_s": train_time})
                raise Interrupted(f"interrupted at epoch {epoch}, step {s + 1}/{steps}; saved to {self.ckpt_path} "
                                  f"(continue with: minivae train --resume {self.run_dir})")
        train_time += time.perf_counter() - t0
        bar.close()

        total_loss, total_seen = comm.allreduce_sum(np.array([loss_sum, seen], dtype=np.float64))
        self.trainer.sync_params()
        t1 = time.perf_counter()
        m, ebs = self.model, c.eval_batch_size
        if c.model == "ae":          # mean squared error per example (§13), the loss it optimizes
            test_loss = ev.mean_sq_error(m, self.x_test, batch_size=ebs, comm=comm, split="test")
            val_loss = ev.mean_sq_error(m, self.x_val, batch_size=ebs, comm=comm, split="validation") \
                if self.x_val is not None else None
        else:
            test_loss = -ev.mean_elbo(m, self.x_test, batch_size=ebs, comm=comm, eps=self.test_eps, split="test")
            val_loss = -ev.mean_elbo(m, self.x_val, batch_size=ebs, comm=comm, eps=self.val_eps,
                                     split="validation") if self.x_val is not None else None
        eval_time = time.perf_counter() - t1
        for split, value in (("test", test_loss), ("validation", val_loss)):
            if value is not None and not math.isfinite(value):   # a checkpoint never holds a NaN
                kept = self._kept()
                raise TrainingError(f"the {split} loss became {value} after epoch {epoch} "
                                    f"(lr {self.optimizer.lr:g}); training stopped and {kept}")
        row = {"epoch": epoch, "train_loss": float(total_loss / total_seen), "test_loss": float(test_loss)}
        if val_loss is not None:
            row["val_loss"] = float(val_loss)
        row.update({
            "train_time_s": train_time, "eval_time_s": eval_time,
            "train_samples": int(total_seen), "samples_per_s": float(total_seen / train_time) if train_time > 0 else None,
            "steps": steps, "world_size": comm.size, "beta": beta, "lr": self.optimizer.lr,
            "objective": "sq_error" if c.model == "ae" else c.objective, "backend": c.backend,
        })
        return row

    # -- all epochs ----------------------------------------------------------------------------
    def fit(self):
        c, comm = self.config, self.comm
        verbose = comm.is_root and not c.quiet
        if self.epoch >= c.epochs and self.partial is None:
            if verbose:
                print(f"{self.run_dir}: already trained {self.epoch} epochs (--epochs {c.epochs}); nothing to do")
            return
        # a diverging run overflows on its way to NaN: the NaN check reports it, in one line
        with _StopFlag() as stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            bars = verbose and _is_terminal(sys.stderr)
            bar_factory = _progress_factory(bars, c.epochs)
            while self.epoch < c.epochs:
                row = self.run_epoch(stop, bar_factory)
                self.epoch += 1
                self.metrics.append(row)
                self.save()
                if verbose:
                    _epoch_line(row, c.epochs, bars)
                if stop.set:
                    raise Interrupted(f"interrupted after epoch {self.epoch}; saved to {self.ckpt_path} "
                                      f"(continue with: minivae train --resume {self.run_dir})")


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):             # no isatty, or a closed stream
        return False


def _build_model(c: TrainConfig, x_dim):
    """The VAE, or with ``--model ae`` the Autoencoder, of a training config."""
    if c.model == "ae":
        from .autoencoder import Autoencoder
        return Autoencoder(x_dim, c.z_dim, hidden=c.hidden, activation=c.activation, dtype=c.dtype,
                           seed=c.seed, backend=c.backend)
    return VAE(x_dim, c.z_dim, hidden=c.hidden, activation=c.activation, likelihood=c.likelihood,
               dtype=c.dtype, seed=c.seed, backend=c.backend)


def _progress_factory(enabled, epochs):
    """Progress bars (tqdm, on stderr) when ``enabled``: only when stderr is a terminal. Under a pipe
    or in CI a bar would leave a dead ``0%|`` line per epoch in the log; there the per-epoch line
    (``_epoch_line``) is the only progress output."""

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    def make(steps, first, epoch):
        if not enabled:
            return _Null()
        from tqdm.auto import tqdm
        return tqdm(total=steps, initial=first, desc=f"epoch {epoch}/{epochs}", unit="batch",
                    leave=False, mininterval=0.5, dynamic_ncols=True)
    return make


def _epoch_line(row, epochs, bars=False):
    """One plain line per epoch on stdout (flushed, so a log shows it at once)."""
    parts = [f"epoch {row['epoch']:>{len(str(epochs))}}/{epochs}", f"train {row['train_loss']:.3f}",
             f"test {row['test_loss']:.3f}"]
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.3f}")
    parts.append(f"beta {row['beta']:.3g}")
    parts.append(f"{row['train_time_s']:.2f} s")
    if bars:                                          # between bars: tqdm keeps them intact
        from tqdm.auto import tqdm
        tqdm.write("  ".join(parts), file=sys.stdout)
        sys.stdout.flush()
    else:
        print("  ".join(parts), flush=True)


def summarize(metrics, run_dir, plots=(), backend=None, backend_auto=False):
    """The numbers of the summary table (a dict; ``format_summary`` prints it). ``backend``: the
    concrete backend of the run (default: the last metrics row's); ``backend_auto``: chosen by auto."""
    if backend is None and metrics:
        backend = metrics[-1].get("backend")
    if not metrics:
        return {"run_dir": str(run_dir), "epochs": 0, "plots": [str(p) for p in plots],
                "backend": backend, "backend_auto": bool(backend_auto)}
    key = "val_loss" if "val_loss" in metrics[-1] else "test_loss"
    best = min(metrics, key=lambda r: r[key])
    time_s = sum(r["train_time_s"] for r in metrics)
    samples = sum(r["train_samples"] for r in metrics)
    last = metrics[-1]
    return {
        "run_dir": str(run_dir), "epochs": last["epoch"],
        "final_train_loss": last["train_loss"], "final_test_loss": last["test_loss"],
        "final_val_loss": last.get("val_loss"),
        "best_epoch": best["epoch"], "best_by": key, "best_loss": best[key],
        "train_time_s": time_s, "samples_per_s": samples / time_s if time_s > 0 else None,
        "world_size": last["world_size"], "plots": [str(p) for p in plots],
        "backend": backend, "backend_auto": bool(backend_auto),
        "loss_name": "squared error" if last.get("objective") == "sq_error" else "-ELBO",
    }


def format_summary(s) -> str:
    rows = [("run folder", s["run_dir"])]
    if s.get("backend"):
        why = {"cuda": "a GPU is usable", "numba": "no usable GPU", "numpy": "its estimator runs on numpy only"}
        auto = f" (chosen by --backend auto: {why.get(s['backend'], s['backend'])})"
        rows.append(("backend", s["backend"] + (auto if s.get("backend_auto") else "")))
    unit = "per example" if s.get("loss_name") == "squared error" else "nats/example"
    if s["epochs"]:
        rows += [
            ("epochs", str(s["epochs"])),
            ("final train loss", f"{s['final_train_loss']:.3f} {unit}"),
            (f"final test {s['loss_name']}", f"{s['final_test_loss']:.3f} {unit}"),
        ]
        if s["final_val_loss"] is not None:
            rows.append((f"final val {s['loss_name']}", f"{s['final_val_loss']:.3f} {unit}"))
        rows += [
            (f"best epoch (by {s['best_by'].replace('_loss', '')})", f"{s['best_epoch']} ({s['best_loss']:.3f})"),
            ("training time", f"{s['train_time_s']:.2f} s on {s['world_size']} process(es)"),
            ("throughput", f"{s['samples_per_s']:,.0f} examples/s" if s["samples_per_s"] else "-"),
        ]
    if s["plots"]:
        rows.append(("pictures", ", ".join(Path(p).name for p in s["plots"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def train(config: TrainConfig, comm=None) -> dict:
    """Train (or resume) a run; returns the summary dict (see :func:`summarize`).

    With ``config.resume`` the run continues from its checkpoint under its saved config, except for
    the fields of RESUMABLE, which come from ``config``: build it with :func:`resume_config` to
    start from the saved values. Raises ValueError/DataError/CheckpointError for bad input,
    TrainingError when the loss becomes NaN or inf, and Interrupted after saving on Ctrl-C.
    """
    comm = comm if comm is not None else make_comm(config.distributed)
    run = Run(config, comm)
    try:
        run.fit()
        plots = []
        if run.config.plots and run.metrics:
            def draw():
                from . import plots as plots_mod
                return plots_mod.save_all(run.run_dir, run.model, run.dataset, run.metrics)
            try:
                plots = _on_root(comm, draw, "drawing the pictures") or []
            except (ValueError, OSError, RuntimeError) as e:
                if comm.is_root:
                    print(f"minivae: warning: the pictures could not be drawn ({e})", file=sys.stderr)
    finally:
        run.close()                          # the lock is held while the pictures are drawn
    summary = summarize(run.metrics, run.run_dir, plots, backend=run.config.backend,
                        backend_auto=run.backend_auto)
    if comm.is_root:
        print(format_summary(summary))
    return summary
