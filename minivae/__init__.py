"""minivae: a Variational Autoencoder written by hand in NumPy, with Numba and CUDA kernels."""
from . import gradcheck
from .autoencoder import Autoencoder
from .model import VAE, ModelSpec

__version__ = "0.1.0"
__all__ = ["VAE", "ModelSpec", "Autoencoder", "gradcheck", "__version__"]
