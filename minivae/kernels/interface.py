"""The backend interface, declared: what every VAE backend implements, with the same arguments on every
backend (docs/design.md, "The backend interface").

A backend is a class built as ``cls(spec, dtype)`` (``spec``: model.ModelSpec) whose methods take the
flat parameter vector ``params`` (P,) and host arrays, and return host arrays. The NumPy backend
(kernels/numpy_.py) is the reference; every other backend is tested against it.

Shape legend: n examples, D = x_dim, Z = z_dim (Z_1 for a stack), L samples (k for IWAE), K the
likelihood head's width (D or 2D). For a stack of S > 1 stochastic layers ``eps`` is a sequence of S
arrays, eps[l] (L, n, Z_l) (docs/math.md §11).

Optional capabilities are attributes, present on every backend class (never looked up with
``getattr``): a backend that lacks one has its documented default (:data:`CAPABILITY_DEFAULTS`),
set by :func:`declare`, which kernels/__init__.py applies to every class it hands out
(kernels.backend_class). ``missing_or_different`` lists how a class departs from the Protocol;
tests/test_backend_interface.py runs it on every backend class.
"""
from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import Callable, Mapping, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    """The methods and attributes of a VAE backend. ``d<name>`` is dL/d<name>, as everywhere."""

    name: str                          # the concrete backend name: numpy, numba or cuda
    spec: object                       # model.ModelSpec
    layout: object                     # params.Layout: name -> (offset, shape) in the flat vector
    dtype: np.dtype

    # -- optional capabilities (defaults in CAPABILITY_DEFAULTS) -------------------------------
    estimators: tuple                  # objectives.ESTIMATORS it implements; default ("reparam",)
    make_trainer: Callable | None      # (params, optimizer, comm, objective, free_bits, estimator=) -> a
                                       # trainer (trainers.py's protocol) of its own, e.g. keeping its
                                       # state on a GPU, or None for a run it leaves to HostTrainer;
                                       # None: training always goes through trainers.HostTrainer
    update_kernels: Mapping            # optimizer name -> a fused update with the signature of
                                       # optim.py's NumPy update; default {} (the NumPy updates)

    def encode(self, params, x):
        """x: (n, D) -> mu, logvar: (n, Z), the bottom posterior q(z_1 | x).   §3, §11"""

    def decode(self, params, z):
        """z: (m, Z_1) -> head: (m, K), the likelihood's parameters of p(x | z_1).   §4"""

    def bound(self, params, x, eps, objective="elbo", beta=1.0):
        """Per-example bound, (n,) float64: the ELBO (mean over L) or the IWAE bound (log-mean-exp
        over k), with ``beta`` on the prior-minus-posterior terms.   §5.1, §5.2, §11.2"""

    def loss_and_grad(self, params, x, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=None,
                      kl_active=None, estimator="reparam"):
        """(loss, grad): the batch mean of the negative bound (a float, nats per example) and its
        gradient (P,) in the flat layout, written into ``grad`` when given. ``free_bits``: the
        per-dimension KL floor (§5.3); ``kl_active`` (Z,) 0/1: the floor's decision taken on a larger
        batch (data-parallel, §10); ``estimator``: one of ``self.estimators`` (§5.4, §12).   §6"""


CAPABILITY_DEFAULTS = {
    "estimators": ("reparam",),
    "make_trainer": None,
    "update_kernels": MappingProxyType({}),
}
METHODS = ("encode", "decode", "bound", "loss_and_grad")


def declare(cls):
    """Give ``cls`` every optional capability it does not define (own or inherited) at its default;
    returns ``cls``. Idempotent."""
    for name, default in CAPABILITY_DEFAULTS.items():
        if not hasattr(cls, name):
            setattr(cls, name, default)
    return cls


def implementing(estimator, stack=False) -> list[str]:
    """The concrete backends whose class (for a stack of S > 1 stochastic layers when ``stack``)
    declares ``estimator`` in its ``estimators``, in the registry's order. Importing the classes
    needs no GPU."""
    from . import CONCRETE_BACKENDS, backend_class
    if estimator == "reparam":                    # every backend's (missing_or_different checks it)
        return list(CONCRETE_BACKENDS)
    return [name for name in CONCRETE_BACKENDS if estimator in backend_class(name, stack).estimators]


def require_estimator(backend, estimator, stack=None):
    """One-line ValueError when ``backend`` (a backend instance or class) does not implement
    ``estimator``, naming the backends that do. ``stack``: whether the model has S > 1 stochastic
    layers (read from ``backend.spec`` for an instance). The one check of this capability: the
    backends' loss_and_grad, the model and the trainers all call it."""
    if estimator in backend.estimators:
        return
    from ..objectives import check_estimator
    check_estimator(estimator)                       # an unknown name: the list of known ones
    if stack is None:
        stack = getattr(getattr(backend, "spec", None), "n_stochastic", 1) > 1
    where = "a stack of stochastic layers" if stack else "one stochastic layer"
    others = implementing(estimator, stack)
    runs_on = (f"it runs on backend {' or '.join(map(repr, others))} only" if others
               else "no backend implements it")
    raise ValueError(f"estimator {estimator!r} is not implemented on backend {backend.name!r} for {where}; "
                     f"{runs_on}")


def missing_or_different(cls) -> list[str]:
    """How ``cls`` departs from :class:`Backend`, one line per difference (empty: it conforms).

    A method conforms when it takes every parameter of the Protocol's method, at the same position,
    by the same name, with the same default; it may take more, each with a default. Capabilities
    are checked on the class as :func:`declare` leaves it."""
    out = []
    for name in METHODS:
        impl = getattr(cls, name, None)
        if impl is None or not callable(impl):
            out.append(f"{name}: missing")
            continue
        want = list(inspect.signature(getattr(Backend, name)).parameters.values())
        have = list(inspect.signature(impl).parameters.values())
        for i, p in enumerate(want):
            if i >= len(have) or have[i].name != p.name:
                found = [q.name for q in have]
                out.append(f"{name}: parameter {p.name!r} missing or not at position {i} (has {found})")
                break
            if have[i].default != p.default:
                out.append(f"{name}: {p.name} defaults to {have[i].default!r}, not {p.default!r}")
        for q in have[len(want):]:
            if q.default is inspect.Parameter.empty and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD):
                out.append(f"{name}: extra parameter {q.name!r} without a default")
    for name in CAPABILITY_DEFAULTS:
        if not hasattr(cls, name):
            out.append(f"{name}: capability not declared")
    if not isinstance(getattr(cls, "estimators", ()), tuple) or "reparam" not in getattr(cls, "estimators", ()):
        out.append("estimators: must be a tuple that holds 'reparam'")
    return out
