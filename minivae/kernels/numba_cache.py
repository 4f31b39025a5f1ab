"""Where Numba's on-disk cache (``cache=True``) lives: one folder per version of minivae's source.

Numba decides whether a cached kernel is still valid from the modification time and size of the one
file that defines it. A kernel that calls a jitted function of *another* module (cpu_ae.py and
gemm.py call into cpu.py, cpu.py into gemm.py) is not recompiled when only that other file changes,
and a stale machine-code cache that refers to a callee's old layout crashes the process (a segfault,
not an exception). It happened here after merges and after editing cpu.py.

So the cache is keyed by every source file of the package at once: :func:`configure` points
``numba.config.CACHE_DIR`` at ``<base>/<hash>``, where the hash covers the text of every ``.py`` file
of minivae, numba's version and Python's. Any edit, pull or upgrade starts a fresh folder (one
compile, about a minute), and a stale cache is never loaded. ``<base>`` is ``$NUMBA_CACHE_DIR`` when it is
set, else ``$XDG_CACHE_HOME/minivae/numba`` (``~/.cache/minivae/numba``). A likelihood registered from
outside the package (minivae/likelihoods) adds its module's source to the hash, and the registry is
frozen from the first call on: the kernels compile it in. Folders of other versions
are left for the user to remove (``minivae`` never deletes what it did not write in this run).

Numba's own cache writes are not safe between processes: to add a specialization it reads the
function's index, picks the first unused file number, writes the index, then the code. Two processes
compiling *different* specializations at once (two first runs, the workers of a benchmark, the
xdist workers of the tests) can pick the same number; the index then names one signature and the
file holds the other's machine code, and the next process to load it crashes. :func:`configure` also
makes that sequence safe: an exclusive ``fcntl.flock`` on ``<index>.lock`` around it, and the code
written before the index that points at it (each file is still replaced atomically by numba).

Loading is made safe too: a cached kernel that calls numba's threading layer (a prange, or a callee
with one) is loaded only after the layer has started (:func:`_rebuild_with_threads`); numba itself
does that only for kernels whose prange it compiled in the same process.

It must run before the first ``@njit(cache=True)`` decorator: every module of the package that
defines cached kernels calls it first. Idempotent; when no folder can be made it leaves Numba's own
default (``__pycache__`` beside the sources) in place.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import sys
from pathlib import Path

_DONE = None


def source_hash(root=None) -> str:
    """A short hash of every .py file below ``root`` (default: the minivae package, and then also the
    source of any likelihood registered from outside it), numba's version and Python's."""
    import numba
    default = root is None
    root = Path(__file__).resolve().parents[1] if root is None else Path(root)
    h = hashlib.sha256(f"{numba.__version__} {sys.version}".encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    if default:                       # likelihoods registered from outside the package (likelihoods/__init__.py)
        from .. import likelihoods
        h.update(likelihoods.fingerprint().encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("NUMBA_CACHE_DIR") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minivae" / "numba"
    return Path(base) / source_hash()


def _locked_save(self, key, data):
    """numba.core.caching.IndexDataCacheFile.save, serialized between processes by an flock on the
    index's lock file, and with the code written before the index entry that names it."""
    with open(self._index_path + ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            overloads = self._load_index()
            data_name = overloads.get(key)
            if data_name is None:                   # the first number no signature uses
                existing = set(overloads.values())
                data_name = next(name for name in (self._data_name(i) for i in itertools.count(1))
                                 if name not in existing)
                overloads[key] = data_name
            self._save_data(data_name, data)
            self._save_index(overloads)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# what numba's threading layer gives the code it compiles (numba/np/ufunc/parallel.py, _launch_threads)
THREADING_SYMBOLS = (b"numba_parallel_for", b"do_scheduling_signed", b"do_scheduling_unsigned", b"allocate_sched",
                     b"deallocate_sched", b"get_num_threads", b"set_num_threads", b"get_thread_id",
                     b"set_parallel_chunksize", b"get_parallel_chunksize", b"get_sched_size")


def needs_threading_layer(libdata) -> bool:
    """Whether a cached library (numba's ``(name, kind, data)``) names a threading-layer symbol."""
    _, _, data = libdata
    blobs = data if isinstance(data, tuple) else (data,)
    return any(sym in blob for blob in blobs if isinstance(blob, (bytes, bytearray)) for sym in THREADING_SYMBOLS)


_rebuild = None


def _rebuild_with_threads(self, target_context, payload):
    """numba.core.caching.CompileResultCacheImpl.rebuild, with numba's threading layer started first
    when the cached code calls into it. Numba records that need (the kernel's ``reload_init``) only
    where a prange was compiled in the same process: a kernel compiled against a parallel callee that
    was itself loaded from the cache is saved without it (numba 0.68: an unserialized library has an
    empty ``_reload_init``). The next process that loads such a kernel before anything started the
    threads cannot resolve ``allocate_sched``: "LLVM ERROR: Symbol not found" and an abort, or a
    segfault. Whether a cache holds such kernels depends on the order of compiles across processes;
    a clean test run left 7 of them."""
    if needs_threading_layer(payload[0]):
        import numba
        numba.get_num_threads()                 # starts the threading layer (idempotent): its symbols
    return _rebuild(self, target_context, payload)


def make_cache_writes_safe():
    """Replace numba's cache-file ``save`` by :func:`_locked_save`, and its rebuild of a cached kernel
    by :func:`_rebuild_with_threads` (once; see the module doc)."""
    global _rebuild
    from numba.core import caching
    if caching.IndexDataCacheFile.save is not _locked_save:
        caching.IndexDataCacheFile.save = _locked_save
    if caching.CompileResultCacheImpl.rebuild is not _rebuild_with_threads:
        _rebuild = caching.CompileResultCacheImpl.rebuild
        caching.CompileResultCacheImpl.rebuild = _rebuild_with_threads


def configure():
    """Point numba.config.CACHE_DIR at this source version's folder (once per process); returns it,
    or None when it cannot be created (numba then keeps its default)."""
    global _DONE
    if _DONE is not None:
        return _DONE or None
    make_cache_writes_safe()
    from .. import likelihoods
    likelihoods.freeze("minivae's numba kernels")   # the kernels compile the registry in; the hash covers it
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
