"""The training loop: seeded minibatches, the epoch loop, its progress and metrics (docs/math.md §5, §8).

A run is split by concern (docs/design.md, "The run"):
    minivae.trainconfig   TrainConfig (every option, validated), auto_backend, beta_at (KL warm-up)
    minivae.trainers      SerialComm / make_comm (communicators), HostTrainer / AETrainer /
                          make_trainer (one optimizer step), on_root (rank agreement)
    minivae.runfolder     RunLock, RunFolder (claim, write, release), read_run / check_train_state /
                          check_against_data (a resumable checkpoint, read as untrusted), resume_config
    minivae.train         Run (set-up, the loop, progress and metrics) and train()
Every name those modules define that was importable from minivae.train before is still re-exported
here.

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

Failures. A NaN or inf loss stops the run without writing: the last good checkpoint stays. With P
ranks, a NaN on any rank, or an exception in one rank's set-up, step or evaluation, stops every rank
at the same point with the same one-line message naming the first failing rank
(``distributed.collective``, ``Run._check``). Ctrl-C finishes the step, saves and stops.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__
from . import checkpoint
from . import data as data_mod
from . import evaluate as ev
from . import interrupts
from . import resources
from .distributed import collective
from .model import VAE
from .optim import make_optimizer
from .recipe import init_output_bias, lr_at
# the split-out concerns; every name below was importable from minivae.train and still is
from .runfolder import (CHECKPOINT, LOCK, MAX_COUNT, METRICS, RunFolder, RunLock, RunLockedError,  # noqa: F401
                        check_against_data, check_train_state, holds_run, read_run, resume_config,
                        write_metrics, _command_line, _expected_arrays, _holder)
from .trainconfig import MODELS, RESUMABLE, TrainConfig, auto_backend, auto_reason, beta_at, _finite  # noqa: F401
from .trainers import AETrainer, HostTrainer, SerialComm, make_comm, make_trainer, on_root  # noqa: F401

_on_root = on_root             # the name this module used before the split
TRAIN_STREAM = 1             # the training generator is default_rng([seed, TRAIN_STREAM])
EVAL_BINARIZE_SEED = 0xE1    # --binarize dynamic: the one fixed binarization of val/test


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN or inf loss); the message says what happened and what is kept."""


class Interrupted(Exception):
    """Ctrl-C: the state after the last completed step is saved; the message says how to resume."""



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
    is in); a second one raises KeyboardInterrupt at once. Outside the main thread, or where SIGINT
    is ignored (minivae.interrupts.ignored), it does nothing.
    A Ctrl-C that Python dropped before (minivae.interrupts) stops the run before its first step."""

    def __init__(self):
        self.set = False
        self._old = None

    def _handler(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __enter__(self):
        interrupts.raise_if_pending()
        if threading.current_thread() is threading.main_thread() and not interrupts.ignored():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

class Run:
    """One training run: the data, the model, the optimizer, the state of the loop."""

    def __init__(self, config: TrainConfig, comm):
        config.validate()
        self.comm = comm
        self.folder = RunFolder()            # root's hold on the run folder (minivae.runfolder)
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
            on_root(comm, lambda: self.folder.claim(config.resume, resume=True), "locking the run folder")
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
            on_root(comm, lambda: self.folder.claim(config.run_dir(), resume=False, overwrite=config.overwrite),
                    "preparing the run folder")
        self.backend_auto = config.backend == "auto"
        if self.backend_auto:                # cuda only when every rank can use a GPU
            from .kernels import gpu_usable    # never raises: any failure to probe means no GPU
            every_rank = bool(comm.allreduce_sum(np.array([float(gpu_usable())]))[0] == comm.size)
            config = replace(config, backend=auto_backend(config, every_rank))
            self.backend_auto = auto_reason(config, every_rank)       # the summary says why
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

    # -- the run folder --------------------------------------------------------------------------
    def close(self, failed=False):
        """Release the run folder (root); after a failed set-up, remove the folder if this run made it
        and it is empty."""
        self.folder.release(failed)

    def _restore(self, meta, arrays):
        """Load the state read (and checked) by read_run, after checking what needs the data."""
        state, path, m = meta["train"], self.ckpt_path, self.model
        n = len(self.x_train)
        check_against_data(path, state, arrays, m.params, n, math.ceil(n / self.config.batch_size))
        partial = state.get("partial")
        try:
            self.optimizer.load_state_dict(arrays)
            self.rng.bit_generator.state = state["rng"]
            self.epoch = int(state["epoch"])
            self.metrics = list(state["metrics"])
            if partial is not None:
                self.partial = dict(partial, perm=arrays["train.perm"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise checkpoint.CheckpointError(f"{path}: incomplete training state ({type(e).__name__}: {e})") from None
        m.params[...] = arrays["params"]

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

        on_root(self.comm, lambda: self.folder.write(self.model, self.run_dir, meta, arrays, self.metrics),
                "writing the checkpoint")
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
                self._interrupt(bar, flush, unreported, perm, loss_sum, seen, train_time, epoch, s, steps)
        train_time += time.perf_counter() - t0
        bar.close()

        total_loss, total_seen = comm.allreduce_sum(np.array([loss_sum, seen], dtype=np.float64))
        self.trainer.sync_params()
        test_loss, val_loss, eval_time = self._evaluate(epoch)
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

    def _interrupt(self, bar, flush, unreported, perm, loss_sum, seen, train_time, epoch, s, steps):
        """Ctrl-C after step ``s``: take in the losses not yet reported, save the epoch's state so far
        (its permutation and partial sums) and raise Interrupted."""
        bar.close()
        if flush is not None and unreported:
            last = flush()
            self._check(last, None, epoch, s, steps, bar)
            loss_sum += (last or 0.0) * unreported
        totals = self.comm.allreduce_sum(np.array([loss_sum, seen], dtype=np.float64))
        self.save(step=s + 1, perm=perm, partial={"step": s + 1, "loss_sum": float(totals[0]),
                                                  "seen": int(totals[1]), "train_time_s": train_time})
        raise Interrupted(f"interrupted at epoch {epoch}, step {s + 1}/{steps}; saved to {self.ckpt_path} "
                          f"(continue with: minivae train --resume {self.run_dir})")

    def _evaluate(self, epoch):
        """(test_loss, val_loss or None, seconds): -ELBO per example with the fixed eval noise (the
        autoencoder: its mean squared error, §13). A non-finite test loss stops the run."""
        c, comm, m, ebs = self.config, self.comm, self.model, self.config.eval_batch_size
        t1 = time.perf_counter()
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
        return test_loss, val_loss, eval_time

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
    concrete backend of the run (default: the last metrics row's); ``backend_auto``: chosen by auto
    (True, or the reason as a string: trainconfig.auto_reason)."""
    if backend is None and metrics:
        backend = metrics[-1].get("backend")
    reason = backend_auto if isinstance(backend_auto, str) else None
    if not metrics:
        return {"run_dir": str(run_dir), "epochs": 0, "plots": [str(p) for p in plots],
                "backend": backend, "backend_auto": bool(backend_auto), "backend_reason": reason}
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
        "backend": backend, "backend_auto": bool(backend_auto), "backend_reason": reason,
        "loss_name": "squared error" if last.get("objective") == "sq_error" else "-ELBO",
    }


def format_summary(s) -> str:
    rows = [("run folder", s["run_dir"])]
    if s.get("backend"):
        why = {"cuda": "a GPU is usable", "numba": "no usable GPU", "numpy": "its estimator runs on numpy only"}
        auto = f" (chosen by --backend auto: {s.get('backend_reason') or why.get(s['backend'], s['backend'])})"
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
                plots = on_root(comm, draw, "drawing the pictures") or []
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
