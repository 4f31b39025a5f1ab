"""The pixel likelihoods p(x | head), one module each, and their registry (docs/math.md §4).

A likelihood is one module (bernoulli.py, continuous_bernoulli.py, gaussian.py) holding, for it:

    NAME        its name (``--likelihood``, ``VAE(likelihood=...)``, checkpoints)
    HEADS       head values per pixel: the decoder head is (..., K) with K = HEADS * D (1 or 2)
    logprob(x, head, var_floor)   log p(x_d | head) per pixel, (..., D)      the NumPy pair ...
    score(x, head, var_floor)     d log p / d head, (..., K)                 ... (the reference)
    mean(head)                    E[x | head], (..., D)
    sample(head, rng, var_floor)  x ~ p(x | head), (..., D)
    scalar(ops)   -> logp_score(dt, x, h0, h1, log_var_floor, cb_switch) -> (log p, d/dh0, d/dh1)
                  the same per pixel, on scalars, in plain arithmetic: written once, compiled by the
                  kernels as a Numba @njit(inline="always") function (kernels/cpu.py, ops = cpu.SCALAR_OPS)
                  and as a numba.cuda device function (kernels/cuda_kernels.py, ops = DEVICE_OPS). ``dt``
                  is the head's scalar type (for typed constants: ``dt(0.5)``), ``ops`` the exp/log
                  functions each target wants (see :data:`OPS`); h1 and d/dh1 are unused when HEADS == 1
    test_inputs(dtype)  -> (x (n, D), head (n, K)): representative and edge-case values for the tests

and, optionally (the defaults suit a likelihood of grey levels whose head is its parameters as they are):

    UNIT_INTERVAL                 True when x must lie in [0, 1] (checked on input; default True)
    FLOPS_PER_PIXEL               log p + score's arithmetic, for `minivae bench` (default 20)
    decoded(head, var_floor)      what ``VAE.decode`` returns for the head (default: the head itself)
    draw_x(rng, shape)            data suited to it, for gradient checks (default: uniform in (0.02, 0.98))
    output_bias(x, var_floor)     the head's bias matching the data's per-pixel statistics
                                  (``--init-output-bias data``; without it that option is refused)

and a new one is that module plus one ``register`` line below. The kernels' likelihood codes are the
positions in the registry; their dispatch over the codes is generated from it (kernels/cpu.py,
kernels/cuda_kernels.py), so no kernel names a likelihood.

The Numba kernels are cached on disk and built from the registry when they are first imported: a
likelihood registered from outside this package must be registered before ``minivae.kernels.cpu``
(or any numba kernel module) is imported; its module's source then keys the cache folder
(kernels/numba_cache.py), and ``register`` refuses it afterwards.
"""
from __future__ import annotations

import hashlib
import inspect
from types import SimpleNamespace

_REGISTRY: dict = {}            # name -> module, in code order
_FROZEN_BY: list = []           # who built kernels from the registry (register refuses after that)

# The names of the arithmetic a scalar function may take from ``ops`` (each target supplies all):
#   exp_nonpos(v)      e^v for v <= 0          (float32 CPU: a vectorizable polynomial)
#   exp(v)             e^v
#   log1p01(e)         log(1 + e), e in [0, 1]  (float32 CPU: a vectorizable series)
#   log_pos(v)         log v, v > 0             (float32 CPU: vectorizable)
#   one_minus_e(a, e)  1 - e^-a given e = e^-a, a >= 0.125 (the subtraction in float32, expm1 in float64)
#   compile(f)         f compiled for the target, for a helper the scalar function calls (as it is compiled)
OPS = ("exp_nonpos", "exp", "log1p01", "log_pos", "one_minus_e", "compile")
_REQUIRED = ("NAME", "HEADS", "logprob", "score", "mean", "sample", "scalar", "test_inputs")


def register(module):
    """Add a likelihood module (see the module doc for what it holds); its code is its position."""
    missing = [a for a in _REQUIRED if not hasattr(module, a)]
    if missing:
        raise ValueError(f"likelihood module {module.__name__!r} lacks {', '.join(missing)}")
    if module.HEADS not in (1, 2):
        raise ValueError(f"likelihood {module.NAME!r}: HEADS must be 1 or 2, got {module.HEADS!r}")
    if module.NAME in _REGISTRY:
        if _REGISTRY[module.NAME] is module:
            return module
        raise ValueError(f"a likelihood named {module.NAME!r} is already registered")
    if _FROZEN_BY:
        raise RuntimeError(f"likelihood {module.NAME!r} must be registered before {_FROZEN_BY[0]} is imported "
                           f"(its kernels are built from the registry: {', '.join(_REGISTRY)})")
    _REGISTRY[module.NAME] = module
    return module


def freeze(by: str):
    """Called by the kernel modules that compile the registry in (numba's cache, the CUDA kernels):
    from now on ``register`` refuses new likelihoods. Returns the registered modules, in code order."""
    if not _FROZEN_BY:
        _FROZEN_BY.append(by)
    return modules()


def modules() -> tuple:
    """The registered likelihood modules in code order."""
    return tuple(_REGISTRY.values())


def names() -> tuple:
    return tuple(_REGISTRY)


def codes() -> dict:
    """name -> the kernels' integer code (the position in the registry)."""
    return {name: i for i, name in enumerate(_REGISTRY)}


def get(name: str):
    """The module of likelihood ``name``; a ValueError naming the choices when there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown likelihood {name!r}; expected one of {', '.join(_REGISTRY)}") from None


def fingerprint() -> str:
    """A hash of the registry's names and of the source of every module outside this package ("" when
    there is none): kernels/numba_cache.py adds it to the cache folder's key."""
    outside = [m for m in _REGISTRY.values() if not m.__name__.startswith(__name__ + ".")]
    if not outside:
        return ""
    h = hashlib.sha256(" ".join(_REGISTRY).encode())
    for m in outside:
        try:
            h.update(inspect.getsource(m).encode())
        except (OSError, TypeError):          # no source to read: its name, and no cache across versions
            h.update(f"{m.__name__} {id(m)}".encode())
    return h.hexdigest()[:16]


def x_in_unit_interval(name: str) -> bool:
    """Whether likelihood ``name`` needs x in [0, 1] (its UNIT_INTERVAL, default True)."""
    return bool(getattr(get(name), "UNIT_INTERVAL", True))


def decoded(name: str, head, var_floor):
    """What ``VAE.decode`` gives for a decoder head: the module's ``decoded``, else the head."""
    f = getattr(get(name), "decoded", None)
    return head if f is None else f(head, var_floor)


def draw_x(name: str, rng, shape):
    """Data suited to likelihood ``name`` (float64), for gradient checks: the module's ``draw_x``, else
    grey levels uniform in (0.02, 0.98)."""
    f = getattr(get(name), "draw_x", None)
    return rng.uniform(0.02, 0.98, size=shape) if f is None else f(rng, shape)


def output_bias(name: str, x, var_floor):
    """The decoder head's bias that makes p(x|z) match the per-pixel statistics of x (n, D) (the
    module's ``output_bias``; docs/math.md §8.4)."""
    f = getattr(get(name), "output_bias", None)
    if f is None:
        raise ValueError(f"likelihood {name!r} has no output_bias: --init-output-bias data is not available for it")
    return f(x, var_floor)


def numpy_ops():
    """``ops`` in NumPy, for running a scalar function in plain Python (tests, the simulator)."""
    import numpy as np
    return SimpleNamespace(exp_nonpos=np.exp, exp=np.exp, log1p01=np.log1p, log_pos=np.log,
                           one_minus_e=lambda a, e: -np.expm1(-a), compile=lambda f: f)


from . import bernoulli, continuous_bernoulli, gaussian  # noqa: E402

register(bernoulli)
register(continuous_bernoulli)
register(gaussian)
