"""Checkpoint files: ``.npz`` with a JSON header, written atomically, read without pickle.

A checkpoint holds a ``meta`` entry (JSON text: format, version, config, and anything the caller
adds) and named float/int arrays. It is written to a temporary file in the same folder and renamed,
so a crash never leaves half a file, and it is read with ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
import zipfile

import numpy as np

FORMAT = "minivae-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable minivae checkpoint."""


TMP_PREFIX = ".tmp-"          # atomic_write's temporaries: TMP_PREFIX + 8 hex digits + "-" + the name


class NotARegularFileError(ValueError):
    """An output path that exists and is not a regular file (a device, FIFO, socket or folder)."""


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _refuse_special(path, shown):
    """Raise NotARegularFileError when ``path`` exists (following symlinks) and is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise NotARegularFileError(f"{shown}: is {kind}, not a regular file; refusing to replace it "
                               f"(give the path of a regular file to write)")


def _temporary_name(folder, name):
    """TMP_PREFIX + 8 random hex digits + "-" + ``name``, cut to the file-name limit of ``folder``
    (NAME_MAX, 255 bytes on Linux), so that a temporary fits whenever the target's name does."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    head = f"{TMP_PREFIX}{secrets.token_hex(4)}-"
    while name and len(os.fsencode(head + name)) > name_max:
        name = name[:-1]
    return os.path.join(folder, head + name)


def atomic_write(path, write):
    """Call ``write(fileobj)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    Every file the package writes goes through here (checkpoints, metrics.jsonl, pictures, IDX files,
    downloads), so this is the one place that guards the target:
      * only regular files are replaced: a target that exists and is a device, FIFO, socket or folder
        raises NotARegularFileError (a ValueError) before anything is written (``--out /dev/null``
        must not replace the system's /dev/null);
      * a symlink is followed, never replaced: the file it points to is written (the temporary lives
        in that file's folder, so the rename stays atomic) and the link is kept; a symlink to a
        special file is refused like the special file itself; a dangling one creates its target;
      * the temporary's name fits whenever the target's name does (see ``_temporary_name``).
    On any exception, Ctrl-C included, the temporary is removed and the target is left as it was; a
    process killed outright leaves a ``.tmp-*`` file, which ``remove_stale_temporaries`` clears.
    """
    shown = os.fspath(path)
    target = os.path.realpath(shown)                  # follow symlinks: the link itself stays
    _refuse_special(target, shown)
    folder, name = os.path.split(target)
    while True:
        tmp = _temporary_name(folder, name)
        try:       # mode 0666 less the umask: the permissions of an ordinary new file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:                        # 2**-32: draw another name
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _refuse_special(target, shown)                 # it may have appeared while we wrote
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_stale_temporaries(folder) -> list:
    """Delete the temporaries of ``atomic_write`` (regular files named ``.tmp-*``) left in ``folder``
    by a process that was killed mid-write. Only safe while no other process writes there (a run
    folder, under its lock). Returns the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except FileNotFoundError:
                pass
    return removed


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
