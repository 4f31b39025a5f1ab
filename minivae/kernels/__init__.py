"""Backends: one interface, several implementations, chosen by name.

Every backend is a class built as ``Backend(spec, dtype)`` with the same methods as
:class:`minivae.kernels.numpy_.NumpyBackend` (``encode``, ``decode``, ``bound``, ``loss_and_grad``).
The NumPy backend is the reference; faster ones are tested against it.
"""
from __future__ import annotations

BACKENDS = ("numpy", "numba", "cuda")


def get_backend(name: str):
    """The backend class for ``name``; a clear ValueError/RuntimeError when it cannot be used."""
    if name == "numpy":
        from .numpy_ import NumpyBackend
        return NumpyBackend
    if name == "numba":
        try:
            from .cpu import NumbaBackend
        except ImportError as e:  # pragma: no cover - numba is a hard dependency
            raise RuntimeError(f"backend 'numba' needs numba: {e}") from None
        return NumbaBackend
    if name == "cuda":
        from .cuda import CudaBackend  # raises RuntimeError with the cause when no GPU can be used
        return CudaBackend
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
