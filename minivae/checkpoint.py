"""Checkpoint files: ``.npz`` with a JSON header, written atomically, read without pickle.

A checkpoint holds a ``meta`` entry (JSON text: format, version, config, and anything the caller
adds) and named float/int arrays. It is written to a temporary file in the same folder and renamed,
so a crash never leaves half a file, and it is read with ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "minivae-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable minivae checkpoint."""


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync it, then rename it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path, meta: dict, arrays: dict):
    """Write ``meta`` (JSON-able) and ``arrays`` (name -> ndarray) to ``path`` atomically."""
    header = dict(meta, format=FORMAT, version=VERSION)
    payload = {"meta": np.array(json.dumps(header))}
    for k, v in arrays.items():
        a = np.asarray(v)
        if a.dtype == object:
            raise TypeError(f"checkpoint array {k!r} has dtype object; only numeric arrays are stored")
        payload[k] = a
    atomic_write(path, lambda f: np.savez(f, **payload))


def load(path):
    """Read a checkpoint: returns (meta, arrays). Raises CheckpointError with a one-line reason."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):          # a plain .npy array, not an archive
            raise CheckpointError(f"{path}: not a minivae checkpoint (a single array, not an .npz archive)")
        with z:
            if "meta" not in z.files:
                raise CheckpointError(f"{path}: not a minivae checkpoint (no 'meta' entry)")
            meta = json.loads(str(z["meta"][()]))
            arrays = {k: z[k] for k in z.files if k != "meta"}
    except CheckpointError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CheckpointError(f"{path}: holds pickled objects, which are never loaded") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a minivae checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this minivae reads version {VERSION}")
    return meta, arrays
