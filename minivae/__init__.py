"""minivae: a Variational Autoencoder written by hand in NumPy, with Numba and CUDA kernels.

The names below are imported on first use (PEP 562): ``import minivae`` itself loads nothing heavy,
so that the ``minivae`` command answers a Ctrl-C during its start-up with one line (minivae.cli).
"""
__version__ = "0.1.0"
__all__ = ["VAE", "ModelSpec", "Autoencoder", "gradcheck", "__version__"]

_LAZY = {"VAE": ".model", "ModelSpec": ".model", "Autoencoder": ".autoencoder", "gradcheck": None}


def __getattr__(name):
    from importlib import import_module
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _LAZY[name] is None:                          # a submodule
        return import_module(f".{name}", __name__)
    value = getattr(import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
