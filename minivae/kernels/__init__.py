"""Backends: one interface, several implementations, chosen by name.

Every backend is a class built as ``Backend(spec, dtype)`` with the methods and optional capabilities
declared in :class:`minivae.kernels.interface.Backend` (``encode``, ``decode``, ``bound``,
``loss_and_grad``; ``estimators``, ``make_trainer``, ``update_kernels``). The classes are registered in
:data:`REGISTRY`, one line each, and handed out by :func:`backend_class`, which gives each the
capabilities' defaults it lacks (``interface.declare``). The NumPy backend is the reference; faster
ones are tested against it (docs/design.md, "The backend interface" and "Adding a backend").

``auto`` stands for the fastest backend this machine can run: ``cuda`` when a GPU is usable
(numba.cuda imports and ``cuda.is_available()``; numba's CUDA simulator is not a GPU and does not
count), else ``numba``. :func:`resolve_backend` turns it into that concrete name; what is recorded
(metrics rows, checkpoint configs) is always the concrete name.
"""
from __future__ import annotations

BACKENDS = ("auto", "numpy", "numba", "cuda")
CONCRETE_BACKENDS = ("numpy", "numba", "cuda")


def gpu_usable() -> bool:
    """True when numba.cuda can run kernels on a real GPU here (never under NUMBA_ENABLE_CUDASIM)."""
    try:
        from numba import config
        if getattr(config, "ENABLE_CUDASIM", False):
            return False
        from .cuda import unavailable_reason
        return unavailable_reason() is None
    except Exception:  # noqa: BLE001 - any failure to probe means: no usable GPU
        return False


def resolve_backend(name: str) -> str:
    """The concrete backend ``name`` stands for: ``auto`` -> cuda or numba, others unchanged."""
    if name == "auto":
        return "cuda" if gpu_usable() else "numba"
    if name not in CONCRETE_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(CONCRETE_BACKENDS)} (or auto)")
    return name


# (concrete name, stack): "module:Class". stack=False: one stochastic layer; True: S > 1 (§11)
REGISTRY = {
    ("numpy", False): "numpy_:NumpyBackend",
    ("numpy", True): "numpy_:NumpyBackend",          # the reference runs any S
    ("numba", False): "cpu:NumbaBackend",              # fused, one stochastic layer
    ("numba", True): "cpu_stack:NumbaStackBackend",
    ("cuda", False): "cuda:CudaBackend",               # fused, one stochastic layer
    ("cuda", True): "cuda_stack:CudaStackBackend",
}


def backend_class(name: str, stack: bool = False):
    """The registered class of concrete backend ``name`` (for a stack when ``stack``), imported, with
    every optional capability declared (interface.declare). Importing never needs a GPU."""
    import importlib
    from .interface import declare
    module, cls = REGISTRY[(name, bool(stack))].split(":")
    return declare(getattr(importlib.import_module(f"{__name__}.{module}"), cls))


def get_backend(name: str):
    """The backend class for ``name`` (``auto`` included); a clear ValueError/RuntimeError when it
    cannot be used."""
    name = resolve_backend(name)
    if name == "numba":
        try:
            return backend_class("numba")
        except ImportError as e:  # pragma: no cover - numba is a hard dependency
            raise RuntimeError(f"backend 'numba' needs numba: {e}") from None
    return backend_class(name)    # cuda: building one raises RuntimeError with the cause when no GPU


def require_one_stochastic_layer(name: str, spec):
    """The fused backends implement one stochastic layer; a stack (docs/math.md §11) gets one line."""
    if spec.n_stochastic > 1:
        raise ValueError(f"backend {name!r} supports one stochastic layer only; a model with "
                         f"z_dim={spec.z_dims} needs backend 'numpy'")


def stack_class(name: str, cls):
    """The class that builds backend ``name`` for a stack of stochastic layers (S > 1, docs/math.md §11):
    on 'numba', the unfused kernels/cpu_stack.py; on 'cuda', kernels/cuda_stack.py; otherwise ``cls``
    itself (numpy runs stacks; the fused one-layer classes refuse them with one line)."""
    return backend_class(resolve_backend(name), stack=True) if name != "numpy" else cls
