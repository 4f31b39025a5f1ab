"""Numba's on-disk cache is keyed by the whole package's source (minivae/kernels/numba_cache.py): a
cached kernel compiled from one version of the code is never loaded by another, since numba itself
only watches the file that defines each kernel and a stale cross-module cache crashes the process."""
import os
import subprocess
import sys

from numba.core import config as numba_config

from minivae.kernels import cpu, numba_cache  # noqa: F401  (importing cpu configures the cache)


def test_the_cache_folder_is_this_source_versions():
    assert numba_config.CACHE_DIR == str(numba_cache.cache_dir())
    assert numba_cache.cache_dir().name == numba_cache.source_hash()
    assert numba_cache.cache_dir().is_dir()


def test_any_edit_of_any_file_changes_the_folder(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "kernels" / "b.py").write_text("y = 2\n")
    first = numba_cache.source_hash(pkg)
    assert numba_cache.source_hash(pkg) == first                       # deterministic
    (pkg / "a.py").write_text("x = 2\n")                                # a file that defines no kernel
    second = numba_cache.source_hash(pkg)
    (pkg / "kernels" / "c.py").write_text("")                           # a new file
    third = numba_cache.source_hash(pkg)
    assert len({first, second, third}) == 3


def test_numba_cache_dir_is_the_base_when_set(tmp_path):
    code = ("from minivae.kernels import cpu; from numba.core import config; "
            "from minivae.kernels import numba_cache as c; print(config.CACHE_DIR); print(c.source_hash())")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "base"), "PATH": "/usr/bin:/bin"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    folder, digest = r.stdout.split()
    assert folder == str(tmp_path / "base" / digest)


def test_cache_writes_are_serialized_and_write_the_code_first(tmp_path, monkeypatch):
    """numba picks a cache file number from the index it reads: the save must hold the index's lock
    while it reads, numbers and writes, and write the code before the index entry that names it."""
    import fcntl
    import threading

    from numba.core import caching

    assert caching.IndexDataCacheFile.save is numba_cache._locked_save
    cache = caching.IndexDataCacheFile(str(tmp_path), "f-1", source_stamp=("stamp", 1))
    order = []
    real_data, real_index = cache._save_data, cache._save_index
    monkeypatch.setattr(cache, "_save_data", lambda name, data: (order.append(("data", name)),
                                                                  real_data(name, data)))

    def save_index(overloads):
        for name in overloads.values():                   # every entry's code is already on disk
            assert (tmp_path / name).is_file()
        order.append(("index", tuple(sorted(overloads.values()))))
        real_index(overloads)
    monkeypatch.setattr(cache, "_save_index", save_index)

    held = open(cache._index_path + ".lock", "a+b")
    fcntl.flock(held, fcntl.LOCK_EX)                       # another process is saving
    done = threading.Event()
    t = threading.Thread(target=lambda: (cache.save("sig-a", (1, 2)), done.set()))
    t.start()
    assert not done.wait(0.5)                              # it waits for the lock
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    t.join(10)
    assert done.is_set()
    cache.save("sig-b", (3, 4))
    assert [kind for kind, _ in order] == ["data", "index", "data", "index"]
    assert cache.load("sig-a") == (1, 2) and cache.load("sig-b") == (3, 4)
    assert order[0][1] != order[2][1]                      # two signatures, two files


CALLER = """
from numba import njit
from minivae.kernels import gemm


@njit(cache=True)
def caller(A, B, C, P):
    gemm.gemm_nn(A, B, C, P, 16, 64, False)          # the parallel tiles: a prange inside
"""

RUN_CALLER = """
import numpy as np
import caller_mod
A, B = np.arange(600.0).reshape(20, 30) / 600, np.ones((30, 40))
C = np.zeros((20, 40))
caller_mod.caller(A, B, C, np.zeros(1))
print(abs(C - A @ B).max())
"""


def test_a_cached_kernel_that_calls_a_prange_loads_in_a_new_process(tmp_path, monkeypatch):
    """A kernel whose cache entry does not say that it needs numba's threading layer (numba saves it so
    when its parallel callee came from the cache, not from a compile in the same process) still loads
    first thing in a new process: numba_cache starts the layer before the rebuild. Without that, the
    process dies (LLVM "Symbol not found: allocate_sched", or a segfault)."""
    import glob
    import pickle
    (tmp_path / "caller_mod.py").write_text(CALLER)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(tmp_path)] + sys.path))

    def run():
        r = subprocess.run([sys.executable, "-c", RUN_CALLER], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        assert float(r.stdout) <= 1e-12
    run()                                                    # compiles and caches caller, gemm_nn, tiles_
    files = glob.glob(str(tmp_path / "cache" / "**" / "caller_mod.caller-*.nbc"), recursive=True)
    assert len(files) == 1
    monkeypatch.syspath_prepend(str(tmp_path))               # the entry names caller_mod
    with open(files[0], "rb") as f:                          # numba's own pickle of the compile result,
        payload = pickle.load(f)                             # written by the run above
    assert payload[7] and numba_cache.needs_threading_layer(payload[0])      # reload_init; the symbols
    with open(files[0], "wb") as f:                          # the entry as numba writes it in that case
        pickle.dump(payload[:7] + ([],) + payload[8:], f, protocol=-1)
    run()                                                    # loads the stripped entry first thing
