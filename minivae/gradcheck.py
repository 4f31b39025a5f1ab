"""Gradient checking: centred differences, ``rel_error`` and a per-tensor report.

Use float64: with h = 1e-5 the centred difference has error O(h^2 f''') + O(eps_mach |f| / h), which
is about 1e-10 in float64 and useless in float32.

    >>> from minivae import VAE, gradcheck
    >>> m = VAE(16, 3, hidden=(8,), dtype="float64")
    >>> report = gradcheck.check_model(m, x, eps)
    >>> gradcheck.format_report(report)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_H = 1e-5
DEFAULT_TOL = 1e-6


def rel_error(a, b) -> float:
    """max|a - b| / max(1e-8, max(|a| + |b|)): the worst difference relative to the tensor's scale.

    Normalizing by the tensor's largest entry (rather than entry by entry) keeps a gradient entry
    that is zero up to rounding from reporting a spurious error of order 1.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1e-8, float(np.max(np.abs(a) + np.abs(b)))))


def numerical_grad(f, x, h=DEFAULT_H, index=None):
    """Centred differences (f(x + h e_i) - f(x - h e_i)) / 2h of a scalar f, perturbing x in place.

    ``x`` is modified during the call and restored; ``index`` limits the check to some flat indices.
    """
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_grad needs a contiguous array it can perturb in place")
    g = np.zeros(flat.shape, dtype=np.float64)
    idx = range(flat.size) if index is None else index
    for i in idx:
        old = flat[i]
        flat[i] = old + h
        fp = float(f())
        flat[i] = old - h
        fm = float(f())
        flat[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g.reshape(x.shape)


def numerical_grad_array(f, x, df, h=DEFAULT_H):
    """Centred differences of sum(f(x) * df) for an array-valued f: the vector-Jacobian product."""
    return numerical_grad(lambda: np.sum(np.asarray(f(x)) * df), x, h)


@dataclass
class TensorCheck:
    name: str
    shape: tuple
    rel_error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.rel_error < self.tol)


def check_model(model, x, eps, h=DEFAULT_H, tol=DEFAULT_TOL, **loss_kwargs):
    """Compare ``model.loss_and_grad`` with centred differences of its loss, tensor by tensor.

    ``eps`` is fixed, so the loss is a deterministic function of the parameters. Returns a list of
    :class:`TensorCheck`, one per named tensor (``enc.0.W``, ``enc.0.b``, ..., ``dec.head.b``).
    """
    if model.dtype != np.float64:
        raise ValueError("gradient checks need a float64 model (dtype='float64')")
    x = np.asarray(x, dtype=np.float64)
    eps = np.asarray(eps, dtype=np.float64)
    _, analytic = model.loss_and_grad(x, eps=eps, **loss_kwargs)
    analytic = analytic.copy()
    numeric = numerical_grad(lambda: model.loss_and_grad(x, eps=eps, **loss_kwargs)[0], model.params, h)
    out = []
    for name, slot in model.layout.slots.items():
        sl = slice(slot.offset, slot.offset + slot.size)
        out.append(TensorCheck(name, slot.shape, rel_error(analytic[sl], numeric[sl]), tol))
    return out


def format_report(checks, title=None) -> str:
    """A plain-text table: tensor, shape, max relative error, pass/fail."""
    rows = [(c.name, "x".join(map(str, c.shape)), f"{c.rel_error:.2e}", "pass" if c.ok else "FAIL")
            for c in checks]
    head = ("tensor", "shape", "rel error", "result")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    lines = ([title] if title else []) + [line, "-" * len(line)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)
