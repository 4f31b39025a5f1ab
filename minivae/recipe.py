"""Training recipes as options: learning-rate schedules and a data-based output bias (docs/math.md §8.4).

Learning-rate schedules, the rate of epoch ``e`` (1-based) out of ``E``, from the base rate ``lr``:

    constant   lr
    step       lr * gamma ** floor((e - 1) / step_epochs)
    iwae       Burda et al. (2015), appendix C: stages i = 0 .. 7 of 3^i passes each (3,280 in all), the
               rate in stage i being lr * 10^(-i/7), so it falls from lr to lr / 10: epoch 1 is stage 0,
               epochs 2-4 stage 1, 5-13 stage 2, ..., 1094-3280 stage 7. It is the paper's schedule for
               E = 3,280; a shorter run stops part of the way through it, a longer one stays at lr / 10.

The decoder's output bias from the data (``init_output_bias="data"``): with the weights of the head
small at initialization, the head's output is close to its bias, so a bias that makes p(x|z) match the
per-pixel mean m_d of the training data starts the model at the best factorized model that ignores z:

    bernoulli              b_d = log(m_d / (1 - m_d))                     (the mean's log-odds)
    continuous_bernoulli   b_d = the logit l whose mean 1/(1 - e^-l) - 1/l equals m_d (bisection)
    gaussian               mean half b_d = m_d; log-variance half s_d = log(max(v_d - floor, tiny)),
                           so that var_floor + exp(s_d) is the per-pixel variance v_d

with m_d clipped to [1e-3, 1 - 1e-3] for the Bernoulli likelihoods (a pixel that is always 0 would
otherwise ask for an infinite logit). Each is its likelihood module's ``output_bias`` (minivae/likelihoods/).
"""
from __future__ import annotations

import numpy as np

LR_SCHEDULES = ("constant", "step", "iwae")
OUTPUT_BIAS_INITS = ("zero", "data")

IWAE_STAGES = 8                       # i = 0 .. 7
IWAE_PASSES = sum(3 ** i for i in range(IWAE_STAGES))     # 3280


def iwae_stage(epoch: int) -> int:
    """The stage i (0 .. 7) of ``epoch`` (1-based) in Burda et al.'s schedule of 3^i passes per stage."""
    cum = 0
    for i in range(IWAE_STAGES):
        cum += 3 ** i
        if epoch <= cum:
            return i
    return IWAE_STAGES - 1


def lr_at(schedule: str, lr: float, epoch: int, step_epochs: int = 1, gamma: float = 0.1) -> float:
    """The learning rate of ``epoch`` (1-based) under ``schedule`` (see the module doc)."""
    if schedule == "constant":
        return float(lr)
    if schedule == "step":
        return float(lr) * float(gamma) ** ((epoch - 1) // step_epochs)
    if schedule == "iwae":
        return float(lr) * 10.0 ** (-iwae_stage(epoch) / (IWAE_STAGES - 1))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")


def output_bias_from_data(likelihood: str, x, var_floor: float) -> np.ndarray:
    """The decoder head's bias that makes p(x|z) match the per-pixel mean (and variance) of ``x`` (n, D)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"the output bias needs a non-empty 2-D array of training rows, got shape {x.shape}")
    from . import likelihoods
    return likelihoods.output_bias(likelihood, x, var_floor)                     # each module's, §8.4


def init_output_bias(model, x_train) -> None:
    """Set the decoder head's bias (``dec.head.b``) of ``model`` in place from the training rows."""
    spec = model.spec
    likelihood = getattr(spec, "likelihood", "bernoulli")     # an Autoencoder's sigmoid output: log-odds
    bias = model.layout.view(model.params, "dec.head.b")
    bias[...] = output_bias_from_data(likelihood, x_train, getattr(spec, "var_floor", 0.0))


__all__ = ["LR_SCHEDULES", "OUTPUT_BIAS_INITS", "iwae_stage", "lr_at", "output_bias_from_data",
           "init_output_bias"]
