"""Argument checks of the public API, done once, in the same way for every backend.

The model (and the optimizers, and evaluate) check what they are given here and hand the backends
plain Python floats and ints and arrays of the right dtype, shape and layout, so a bad argument gives
the same one-line ``ValueError`` on numpy, numba and cuda instead of a silent truncation on one and
a Numba typing error on another.

What counts as what:

    number   a real, finite number: int, float, numpy integer or floating scalar (or a 0-d array of
             one). Not a str (``"0.5"`` is refused, not parsed), not a bool (``beta=True`` is more
             likely a slip than a weight of 1), not complex.
    integer  an int or numpy integer (not a bool, not a float that happens to be whole).
    seed     None, an integer >= 0, a numpy SeedSequence or Generator (what default_rng accepts,
             less arrays of ints).
    array    a real numeric numpy array or nested sequence (not bool, not str/object, not complex).
"""
from __future__ import annotations

import math
import numbers

import numpy as np


def _is_bool(v) -> bool:
    return isinstance(v, (bool, np.bool_))


def number(name, v, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """``v`` as a Python float, checked to be a real finite number in the given range."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if _is_bool(v) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name} must be a number, got {v!r}")
    f = float(v)
    bad = not math.isfinite(f)
    bad = bad or (lo is not None and (f <= lo if lo_open else f < lo))
    bad = bad or (hi is not None and (f >= hi if hi_open else f > hi))
    if bad:
        if lo is not None and hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        elif hi is not None:
            rng = f"{'<' if hi_open else '<='} {hi:g}"
        else:
            rng = ""
        raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {v!r}")
    return f


def integer(name, v, lo=1) -> int:
    """``v`` as a Python int, checked to be an integer >= ``lo`` (default: positive)."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if _is_bool(v) or not isinstance(v, (int, np.integer)) or v < lo:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ValueError(f"{name} must be {what}, got {v!r}")
    return int(v)


def flag(name, v) -> bool:
    """A bool (or numpy bool)."""
    if not _is_bool(v):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return bool(v)


def seed(name, v):
    """None, an integer >= 0, or a numpy SeedSequence/Generator: what ``np.random.default_rng`` takes."""
    if v is None or isinstance(v, (np.random.SeedSequence, np.random.Generator)):
        return v
    if _is_bool(v) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name} must be None, an integer >= 0 or a numpy Generator, got {v!r}")
    return int(v)


def real_array(name, a) -> np.ndarray:
    """``a`` as an ndarray of a real numeric dtype (ints and floats; not bool, str, object, complex)."""
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:              # ragged nested lists and the like
        raise ValueError(f"{name} must be a real numeric array ({e})") from None
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return arr


def grad_buffer(grad, params: np.ndarray):
    """``grad=``: None, or a writable, C-contiguous 1-D array of ``params``' dtype and length that
    does not overlap ``params`` (the backends write the whole gradient into it, in place)."""
    if grad is None:
        return None
    want = f"a writable, C-contiguous 1-D array of {params.size} {params.dtype} (like params)"
    if not isinstance(grad, np.ndarray):
        raise ValueError(f"grad must be None or {want}, got {type(grad).__name__}")
    if grad.dtype != params.dtype or grad.shape != params.shape:
        raise ValueError(f"grad must be {want}, got shape {grad.shape} and dtype {grad.dtype}")
    if not grad.flags.c_contiguous:
        raise ValueError(f"grad must be {want}, got a strided view (strides {grad.strides})")
    if not grad.flags.writeable:
        raise ValueError(f"grad must be {want}, got a read-only array")
    if np.shares_memory(grad, params):
        raise ValueError("grad must not share memory with params (the gradient would overwrite them)")
    return grad
