"""The training config: every option of ``minivae train``, its checks, and the per-step glue of the
schedules (docs/math.md §5, §8.4). Split out of minivae/train.py (docs/design.md, "The run").

KL warm-up (Bowman et al. 2016, Sønderby et al. 2016), per step:
    beta_t = beta * min(1, (epoch - 1 + s / steps) / warmup)    epoch 1-based, step s 0-based,
so beta_t rises linearly from 0 over ``warmup`` epochs (0: no warm-up, beta_t = beta). The learning
rate's schedule is minivae.recipe.lr_at, per epoch.

Backend. ``auto`` (the default of ``train``) becomes ``cuda`` when every rank has a usable GPU, else
``numba`` (minivae.kernels.resolve_backend, :func:`auto_backend`); the concrete name is what the
checkpoint's config, every metrics row and the summary say. On ``--resume``, ``auto`` keeps the run's
own backend.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from . import checkpoint
from . import data as data_mod
from . import evaluate as ev

MODELS = ("vae", "ae")
RESUMABLE = ("epochs", "data_dir", "backend", "quiet", "plots", "eval_batch_size", "distributed")


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
        if self.estimator != "reparam" and self.backend != "auto":
            from .kernels.interface import implementing          # the backends' declared estimators
            where = implementing(self.estimator, spec.n_stochastic > 1)
            if self.backend not in where:
                raise ValueError(f"--estimator {self.estimator} runs on --backend {' or '.join(where)} only"
                                 f"{' for a stack' if spec.n_stochastic > 1 else ''}, got {self.backend!r}")
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
    GPU on every rank, else numba (stacks on their kernels/cpu_stack.py and cuda_stack.py), among the
    backends that implement the estimator (kernels/interface.implementing: score of one stochastic
    layer needs the numpy reference)."""
    from .kernels.interface import implementing
    from .model import ModelSpec
    if config.model == "ae":                              # minivae.Autoencoder: numpy or numba
        return "numba"
    stack = ModelSpec(1, config.z_dim, config.hidden).n_stochastic > 1
    where = implementing(config.estimator, stack)
    return next(b for b in (("cuda",) if gpu else ()) + ("numba", "numpy") if b in where)


def auto_reason(config: TrainConfig, gpu: bool) -> str:
    """Why ``--backend auto`` became ``config.backend`` (after auto_backend), for the run's summary."""
    if config.backend == "cuda":
        return "a GPU is usable"
    if config.model == "ae":
        return "the autoencoder runs on numpy and numba only"
    if config.backend == "numba":
        return f"the {config.estimator} estimator does not run on cuda" if gpu else "no usable GPU"
    return f"the {config.estimator} estimator runs on numpy only"


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def beta_at(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The KL weight of step ``step`` (0-based) of epoch ``epoch`` (1-based): a linear warm-up."""
    if config.warmup <= 0:
        return float(config.beta)
    return float(config.beta) * min(1.0, (epoch - 1 + step / steps) / config.warmup)

