"""Optimizers over the flat parameter vector: SGD with momentum, Adagrad, Adam (docs/math.md §8).

Each update rule is one in-place function over flat vectors (the NumPy reference); a backend may
supply a fused kernel with the same signature (``backend.update_kernels[name]``), which the
optimizer then calls instead. The rules and defaults follow torch.optim, so a run can be compared
step for step:

    SGD      g <- grad + wd p;  buf <- g (t = 1) or momentum buf + g;  p <- p - lr buf
    Adagrad  g <- grad + wd p;  s <- s + g^2;  p <- p - lr g / (sqrt(s) + eps)
    Adam     g <- grad + wd p;  m <- b1 m + (1-b1) g;  v <- b2 v + (1-b2) g^2;
             p <- p - lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
Weight decay ``wd`` is the gradient of the Gaussian prior (wd/2)|p|^2 on the weights.
"""
from __future__ import annotations

import math

import numpy as np

from . import checks

OPTIMIZERS = ("sgd", "adagrad", "adam")


def sgd_update(params, grad, buf, t, lr, momentum, weight_decay):
    """One SGD step in place (torch.optim.SGD, dampening 0, no Nesterov); ``t`` is 1-based."""
    g = grad + weight_decay * params if weight_decay else grad
    if momentum:
        if t == 1:
            buf[...] = g
        else:
            buf *= momentum
            buf += g
        g = buf
    params -= lr * g


def adagrad_update(params, grad, sum_sq, lr, eps, weight_decay):
    """One Adagrad step in place (torch.optim.Adagrad, lr_decay 0, initial accumulator 0)."""
    g = grad + weight_decay * params if weight_decay else grad
    sum_sq += g * g
    params -= lr * g / (np.sqrt(sum_sq) + eps)


def adam_update(params, grad, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One Adam step in place (torch.optim.Adam, amsgrad off); ``t`` is 1-based."""
    g = grad + weight_decay * params if weight_decay else grad
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * (g * g)
    bc1 = 1 - beta1 ** t
    bc2 = 1 - beta2 ** t
    params -= (lr / bc1) * m / (np.sqrt(v) / math.sqrt(bc2) + eps)


REFERENCE_UPDATES = {"sgd": sgd_update, "adagrad": adagrad_update, "adam": adam_update}


class Optimizer:
    """Holds the state vectors and the step count; ``step(params, grad)`` updates params in place.
    Each rule (SGD, Adagrad, Adam below) defines ``_update(params, grad, lo, hi)``: its update kernel on
    the slices [lo:hi] of params, grad and its state."""
    name = ""
    state_names: tuple = ()

    def __init__(self, size, dtype="float32", lr=1e-3, weight_decay=0.0, update=None):
        # hyper-parameters: real finite numbers (not str, not bool; see minivae.checks), kept as floats
        self.lr = checks.number("learning rate", lr, lo=0.0, lo_open=True)
        self.weight_decay = checks.number("weight decay", weight_decay, lo=0.0)
        self.size = checks.integer("size", size, lo=0)
        try:
            self.dtype = np.dtype(dtype)
        except TypeError:
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}") from None
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.t = 0
        self.state = {k: np.zeros(self.size, dtype=self.dtype) for k in self.state_names}
        self.update = update or REFERENCE_UPDATES[self.name]

    def hyper(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def step(self, params, grad):
        """One step in place: params (and the state) from grad by the update rule."""
        self.begin_step(params, grad)(0, self.size)

    def begin_step(self, params, grad):
        """Count one step and return ``update(lo, hi)``, which applies it to params[lo:hi] from grad[lo:hi]
        and the state's [lo:hi]. Every rule is elementwise, so calling ``update`` once on each segment of
        a tiling of [0, size), in any order and on any threads, is exactly one :meth:`step`: a backend that
        finishes the gradient segment by segment on several threads updates each segment there
        (kernels/batchsplit.py, trainers.SegmentUpdateTrainer)."""
        self._check(params, grad)
        self.t += 1
        return lambda lo, hi: self._update(params, grad, lo, hi)

    def _check(self, params, grad):
        """params: a writable C-contiguous (size,) vector of the optimizer's dtype; grad: the same
        shape and dtype (a length-1 grad would otherwise broadcast silently)."""
        for name, a in (("params", params), ("grad", grad)):
            if not isinstance(a, np.ndarray) or a.shape != (self.size,) or a.dtype != self.dtype \
                    or not a.flags.c_contiguous:
                got = f"shape {a.shape}, dtype {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(f"{name} must be a C-contiguous 1-D array of {self.size} {self.dtype}, got {got}")
        if not params.flags.writeable:
            raise ValueError("params must be writable (the step updates them in place)")

    def state_dict(self) -> dict:
        """Arrays (``opt.<name>``) and scalars, ready for a checkpoint."""
        d = {f"opt.{k}": v for k, v in self.state.items()}
        d["opt.t"] = np.array(self.t, dtype=np.int64)
        return d

    def load_state_dict(self, d: dict):
        for k in self.state_names:
            a = np.asarray(d[f"opt.{k}"])
            if a.shape != (self.size,):
                raise ValueError(f"optimizer state {k!r} has shape {a.shape}, expected ({self.size},)")
            self.state[k][...] = a
        self.t = int(d["opt.t"])


class SGD(Optimizer):
    name = "sgd"
    state_names = ("buf",)

    def __init__(self, size, dtype="float32", lr=1e-2, momentum=0.9, weight_decay=0.0, update=None):
        super().__init__(size, dtype, lr, weight_decay, update)
        self.momentum = checks.number("momentum", momentum, lo=0.0, hi=1.0, hi_open=True)

    def hyper(self):
        return dict(super().hyper(), momentum=self.momentum)

    def _update(self, params, grad, lo, hi):
        self.update(params[lo:hi], grad[lo:hi], self.state["buf"][lo:hi], self.t, self.lr, self.momentum,
                    self.weight_decay)


class Adagrad(Optimizer):
    name = "adagrad"
    state_names = ("sum_sq",)

    def __init__(self, size, dtype="float32", lr=1e-2, eps=1e-10, weight_decay=0.0, update=None):
        super().__init__(size, dtype, lr, weight_decay, update)
        self.eps = checks.number("eps", eps, lo=0.0)

    def hyper(self):
        return dict(super().hyper(), eps=self.eps)

    def _update(self, params, grad, lo, hi):
        self.update(params[lo:hi], grad[lo:hi], self.state["sum_sq"][lo:hi], self.lr, self.eps, self.weight_decay)


class Adam(Optimizer):
    name = "adam"
    state_names = ("m", "v")

    def __init__(self, size, dtype="float32", lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, update=None):
        super().__init__(size, dtype, lr, weight_decay, update)
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.beta1, self.beta2 = (checks.number("betas", b, lo=0.0, hi=1.0, hi_open=True) for b in betas)
        self.eps = checks.number("eps", eps, lo=0.0)

    def hyper(self):
        return dict(super().hyper(), betas=[self.beta1, self.beta2], eps=self.eps)

    def _update(self, params, grad, lo, hi):
        self.update(params[lo:hi], grad[lo:hi], self.state["m"][lo:hi], self.state["v"][lo:hi], self.t, self.lr,
                    self.beta1, self.beta2, self.eps, self.weight_decay)


def make_optimizer(name, size, dtype="float32", backend=None, **hyper):
    """An optimizer by name, using ``backend.update_kernels[name]`` when the backend has one."""
    classes = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    update = getattr(backend, "update_kernels", {}).get(name) if backend is not None else None
    return classes[name](size, dtype=dtype, update=update, **hyper)
