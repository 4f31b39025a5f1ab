"""The run folder: its lock, its checkpoint and metrics files, and reading a resumable checkpoint as
untrusted input (docs/math.md §8; docs/design.md, "The run folder"). Split out of minivae/train.py.

Checkpoint. ``RUNDIR/model.npz`` (minivae.checkpoint, atomic, no pickle) holds the parameters and the
model config (``VAE.load`` reads it) and the training state: the optimizer's arrays (``opt.*``), and in
``meta["train"]`` the training config, the epochs and steps completed, the generator's
``bit_generator.state`` (JSON), the metrics so far; after an interrupted epoch also the epoch's
permutation (``train.perm``) and its partial sums. The loop (minivae.train.Run) writes it after every
epoch, and on Ctrl-C after the last completed step, so ``--resume`` continues bit-identically. Before
a resume, everything in it is checked (:func:`read_run`, then :func:`check_against_data`).

The run folder. A run holds ``RUNDIR/.lock`` locked (``fcntl.flock``, advisory, exclusive) from
before it reads anything until it ends, resume included, and deletes it then (``RunLock``); with P
ranks only rank 0 holds it. A second run on the same folder stops at once with one line naming the
holder (pid, host, start time, command: what the holder wrote into the lock file). Under the lock,
the ``.tmp-*`` temporaries that a process killed mid-write left behind are removed. ``--overwrite``
replaces nothing up front: the new run validates everything (config, data, model, backend) first,
and its first checkpoint replaces the old ``model.npz`` and ``metrics.jsonl`` (the old pictures go
then too), so a typo in ``--data-dir`` loses nothing. A fresh run whose set-up fails removes the
folder it created (:class:`RunFolder`).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shlex
import socket
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import checkpoint
from .trainconfig import RESUMABLE, TrainConfig

CHECKPOINT = "model.npz"
METRICS = "metrics.jsonl"
LOCK = ".lock"              # the run folder's lock file (see the module doc)


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

    fd = None                                # the locked descriptor, once held (__del__ of a lock
                                             # refused or never taken finds None)

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



class RunFolder:
    """Root's hold on a run folder for the length of a run: :meth:`claim` creates it (a fresh run),
    locks it (:class:`RunLock`), clears stale temporaries and refuses a folder that holds a run unless
    --overwrite; :meth:`write` writes the checkpoint and the metrics (each atomically); :meth:`release`
    lets go, removing the folder after a failed set-up if this run made it and it is empty."""

    def __init__(self):
        self.lock = None                     # the RunLock, while held
        self.created = False                 # this run made the folder (removed again if set-up fails)
        self.replaces = False                # --overwrite: the old run goes at the first checkpoint

    def claim(self, run_dir, resume, overwrite=False):
        """Root only. On --resume, a missing folder is left to read_run to report."""
        run_dir = Path(run_dir)
        if resume and not run_dir.is_dir():
            return                                     # read_run says: no such run folder
        self.created = not run_dir.exists()
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
            self.replaces = True

    def write(self, model, run_dir, meta, arrays, metrics):
        """Root only: ``run_dir/model.npz`` (the model with ``meta`` and ``arrays``), then
        ``metrics.jsonl``; with --overwrite, the first write also removes the old run's pictures."""
        run_dir = Path(run_dir)
        model.save(run_dir / CHECKPOINT, extra_meta=meta, extra_arrays=arrays)
        write_metrics(run_dir / METRICS, metrics)
        if self.replaces:                    # --overwrite: the old run's pictures go with it
            from .plots import FILENAMES
            for name in FILENAMES.values():
                (run_dir / name).unlink(missing_ok=True)
            self.replaces = False

    def release(self, failed=False):
        if self.lock is None:
            return
        run_dir = self.lock.path.parent
        self.lock.release()
        self.lock = None
        if failed and self.created:
            try:
                run_dir.rmdir()                        # only when it is empty
            except OSError:
                pass


def check_against_data(path, state, arrays, params, n, steps):
    """What read_run cannot check without the data and the model: the parameters' shape and dtype
    (those of ``params``), and an interrupted epoch's permutation of the ``n`` training rows and its
    step within an epoch of ``steps`` steps. CheckpointError when they do not fit."""
    p = arrays.get("params")
    if p is None or p.shape != params.shape or p.dtype != params.dtype:
        raise checkpoint.CheckpointError(f"{path}: parameters do not match the model of the saved config")
    partial = state.get("partial")
    if partial is None:
        return
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
