"""Where Numba's on-disk cache (``cache=True``) lives: one folder per version of minivae's source.

Numba decides whether a cached kernel is still valid from the modification time and size of the one
file that defines it. A kernel that calls a jitted function of *another* module (cpu_ae.py and
gemm.py call into cpu.py, cpu.py into gemm.py) is not recompiled when only that other file changes,
and a stale machine-code cache that refers to a callee's old layout crashes the process (a segfault,
not an exception). It happened here after merges and after editing cpu.py.

So the cache is keyed by every source file of the package at once: :func:`configure` points
``numba.config.CACHE_DIR`` at ``<base>/<hash>``, where the hash covers the text of every ``.py`` file
of minivae, numba's version and Python's. Any edit, pull or upgrade starts a fresh folder (one
compile, ~30 s), and a stale cache is never loaded. ``<base>`` is ``$NUMBA_CACHE_DIR`` when it is
set, else ``$XDG_CACHE_HOME/minivae/numba`` (``~/.cache/minivae/numba``). Folders of other versions
are left for the user to remove (``minivae`` never deletes what it did not write in this run).

It must run before the first ``@njit(cache=True)`` decorator: every module of the package that
defines cached kernels calls it first. Idempotent; when no folder can be made it leaves Numba's own
default (``__pycache__`` beside the sources) in place.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

_DONE = None


def source_hash(root=None) -> str:
    """A short hash of every .py file below ``root`` (default: the minivae package), numba's version
    and Python's."""
    import numba
    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    h = hashlib.sha256(f"{numba.__version__} {sys.version}".encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("NUMBA_CACHE_DIR") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivae" / "numba"
    return Path(base) / source_hash()


def configure():
    """Point numba.config.CACHE_DIR at this source version's folder (once per process); returns it,
    or None when it cannot be created (numba then keeps its default)."""
    global _DONE
    if _DONE is not None:
        return _DONE or None
    from numba.core import config as numba_config
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        _DONE = ""
        return None
    numba_config.CACHE_DIR = str(folder)
    _DONE = str(folder)
    return _DONE
