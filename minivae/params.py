"""One flat parameter vector with named views (docs/math.md §1).

Every weight of the model lives in a single contiguous 1-D array. ``W`` and ``b`` of each layer are
*views* into it, so optimizers, gradient checks, checkpoints and the MPI all-reduce act on one
vector, and a gradient vector with the same layout has the same views.

Layer names:
    enc.0 ... enc.{k-1}   encoder hidden layers          W: (in, out)   b: (out,)
    enc.head              encoder head -> [mu | logvar]   W: (H, 2Z)     b: (2Z,)
    dec.0 ... dec.{m-1}   decoder hidden layers
    dec.head              decoder head -> likelihood parameters (D or 2D columns)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slot:
    name: str          # e.g. "enc.0.W"
    offset: int        # first element in the flat vector
    shape: tuple       # (in, out) for W, (out,) for b

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


class ParamLayout:
    """Name -> (offset, shape) over a flat vector, in a fixed order (the order of ``layers``)."""

    def __init__(self, layers):
        """``layers``: list of (prefix, fan_in, fan_out); each adds ``prefix.W`` and ``prefix.b``."""
        self.layers = [(str(p), int(i), int(o)) for p, i, o in layers]
        self.slots: dict[str, Slot] = {}
        off = 0
        for prefix, fan_in, fan_out in self.layers:
            for suffix, shape in (("W", (fan_in, fan_out)), ("b", (fan_out,))):
                s = Slot(f"{prefix}.{suffix}", off, shape)
                self.slots[s.name] = s
                off += s.size
        self.size = off

    @property
    def names(self):
        return list(self.slots)

    def view(self, flat: np.ndarray, name: str) -> np.ndarray:
        s = self.slots[name]
        return flat[s.offset:s.offset + s.size].reshape(s.shape)

    def views(self, flat: np.ndarray) -> dict:
        """All named views into ``flat`` (no copies: writing a view writes ``flat``)."""
        if flat.shape != (self.size,):
            raise ValueError(f"expected a flat vector of {self.size} elements, got shape {flat.shape}")
        return {n: self.view(flat, n) for n in self.slots}

    def layer_views(self, flat: np.ndarray, prefix: str):
        """[(W, b), ...] for the layers whose prefix starts with ``prefix`` ("enc" or "dec"), in order."""
        return [(self.view(flat, f"{p}.W"), self.view(flat, f"{p}.b"))
                for p, _, _ in self.layers if p.split(".")[0] == prefix]

    def init(self, rng: np.random.Generator, dtype) -> np.ndarray:
        """PyTorch's nn.Linear default: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        flat = np.empty(self.size, dtype=dtype)
        for prefix, fan_in, fan_out in self.layers:
            bound = 1.0 / np.sqrt(fan_in)
            for n in (f"{prefix}.W", f"{prefix}.b"):
                v = self.view(flat, n)
                v[...] = rng.uniform(-bound, bound, size=v.shape)
        return flat


class FlatParams:
    """The ``params`` and ``views`` of a model that keeps one flat vector ``self._params`` laid out by
    ``self.layout`` (minivae.VAE, minivae.Autoencoder).   §1"""

    @property
    def params(self) -> np.ndarray:
        """The flat, contiguous, writable parameter vector the model computes from."""
        return self._params

    @params.setter
    def params(self, value):
        """Copy ``value`` (a finite real array of the parameters' shape) into the same buffer."""
        from . import checks
        value = checks.real_array("params", value)
        if value.shape != self._params.shape:
            raise ValueError(f"params must have shape {self._params.shape}, got {value.shape}")
        if not np.isfinite(value).all():
            raise ValueError("params must be finite: the new values contain NaN or inf")
        self._params[...] = value

    def views(self, flat=None) -> dict:
        """Named views (``enc.0.W``, ...) into ``flat`` (default: the parameters)."""
        return self.layout.views(self._params if flat is None else flat)
