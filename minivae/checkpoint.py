"""Checkpoint files: ``.npz`` with a JSON header, written atomically, read without pickle.

A checkpoint holds a ``meta`` entry (JSON text: format, version, config, and anything the caller
adds) and named float/int arrays. It is written to a temporary file in the same folder and renamed,
so a crash never leaves half a file.

Reading treats the file as untrusted and checks before it allocates (:class:`Archive`):
    1. the zip directory: at most MAX_MEMBERS members, each a ``NAME.npy``, none twice, none
       encrypted, stored or deflated only, each lying inside the file (a stored member's size is
       then what the file holds);
    2. ``meta``: a 0-d unicode array of at most MAX_META_BYTES, parsed as strict JSON (no NaN or
       Infinity, no duplicate keys, integers of at most MAX_INT_DIGITS digits, nesting at most
       MAX_JSON_DEPTH deep), a JSON object of the right format and version;
    3. each array's ``.npy`` header (``numpy.lib.format``, which never unpickles): a numeric dtype,
       a shape of non-negative integers, and a size that agrees with what the zip directory
       declares. A caller that knows what to expect (``load(path, expect=...)``, e.g. the model
       from its config) gives the exact shape and dtype of each member it wants; other members
       are skipped unread. A deflated array may inflate to at most MAX_RATIO times its compressed
       size (or 1 MiB): minivae writes its arrays stored, and floats do not compress that well;
    4. only then each wanted member is read, in chunks, never past what its header promised.
Every failure is a :class:`CheckpointError` with a one-line message that names the file.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import stat
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy_format

FORMAT = "minivae-checkpoint"
VERSION = 1

MAX_MEMBERS = 64                  # a checkpoint holds params, a few optimizer arrays, a permutation
MAX_META_BYTES = 64 << 20         # the meta text (UTF-32 in the .npy: 16 M characters)
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 64               # the generator state holds 128-bit integers (39 digits)
MAX_RATIO = 64                    # what a deflated array may inflate to, times its compressed size
NUMERIC_KINDS = "biuf"            # bool, signed and unsigned integers, floats
_CHUNK = 1 << 20
_MAX_NPY_HEADER = 16 + 65536      # magic, length and a header dict (numpy writes < 10000 bytes)


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


@dataclass(frozen=True)
class Expect:
    """What a reader wants of one member: its ``shape`` (an entry None: any length) and ``dtype``."""
    shape: tuple
    dtype: object
    required: bool = True
    source: str = "expected"       # how the message names where the expectation comes from


@dataclass(frozen=True)
class Member:
    """One array of the archive, as its ``.npy`` header describes it."""
    name: str                      # without ".npy"
    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    header_size: int               # bytes of the .npy magic and header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize     # Python ints: no overflow


class _Capped:
    """A read-only view of a file object that refuses to read more than ``limit`` bytes in all."""

    def __init__(self, f, limit):
        self._f, self._left = f, limit

    def read(self, n=-1):
        if n is None or n < 0 or n > self._left:
            raise ValueError("the .npy header is longer than any numpy writes")
        data = self._f.read(n)
        self._left -= len(data)
        return data

    def tell(self):
        return self._f.tell()


def _pickle_like(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


class Archive:
    """An open checkpoint whose zip directory and meta entry are checked (steps 1-2 above).

    ``meta``: the parsed JSON header; ``names``: the array members other than meta;
    ``member(name)``: its checked ``.npy`` header; ``read(name, expect)``: the array.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such checkpoint file")
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:
            self._open_zip()
            self._members = {}
            self.meta = self._read_meta()
        except BaseException:
            self.close()
            raise

    # -- helpers ----------------------------------------------------------------------------
    def _error(self, message):
        return CheckpointError(f"{self.path}: {message}")

    def close(self):
        z = getattr(self, "_zip", None)
        if z is not None:
            z.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- step 1: the zip directory ----------------------------------------------------------
    def _open_zip(self):
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        self._file.seek(0)
        if head[:6] == b"\x93NUMPY":
            raise self._error("not a minivae checkpoint (a single .npy array, not an .npz archive)")
        if _pickle_like(head):
            raise self._error("not a minivae checkpoint (a Python pickle, which is never loaded)")
        if head[:2] != b"PK":
            raise self._error("not a minivae checkpoint (not a zip archive)" if head else
                              "not a minivae checkpoint (an empty file)")
        try:        # any exception of the zip parser means the same: the directory is unreadable
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
        except Exception as e:
            raise self._error(f"not a readable checkpoint (a damaged zip archive: {type(e).__name__}: {e})") from None
        if len(infos) > MAX_MEMBERS:
            raise self._error(f"not a minivae checkpoint ({len(infos)} zip members, at most {MAX_MEMBERS} expected)")
        self._infos = {}
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or info.is_dir():
                raise self._error(f"not a minivae checkpoint (zip member {name!r} is not a .npy array)")
            key = name[:-4]
            if key in self._infos:
                raise self._error(f"not a minivae checkpoint (zip member {name!r} appears twice)")
            if info.flag_bits & 0x1:
                raise self._error(f"zip member {name!r} is encrypted; checkpoints are never encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise self._error(f"zip member {name!r} uses compression method {info.compress_type}; "
                                  f"minivae reads stored or deflated members only")
            if info.header_offset + info.compress_size > size:
                raise self._error(f"zip member {name!r} claims {info.compress_size} bytes past the end of "
                                  f"the file ({size} bytes): truncated or damaged")
            if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                raise self._error(f"zip member {name!r} is stored with {info.compress_size} bytes but "
                                  f"declares {info.file_size}")
            self._infos[key] = info
        self.names = [k for k in self._infos if k != "meta"]

    # -- step 3: one member's .npy header ---------------------------------------------------
    def member(self, name) -> Member:
        if name in self._members:
            return self._members[name]
        info = self._infos[name]
        try:        # numpy's header parser, fed untrusted bytes, can raise nearly anything
            with self._zip.open(info) as raw, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f = _Capped(raw, _MAX_NPY_HEADER)      # a header never inflates past this
                version = npy_format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = npy_format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = npy_format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version[0]}.{version[1]} is not read")
                header_size = f.tell()
        except (zlib.error, zipfile.BadZipFile, EOFError, OSError) as e:      # the stream itself
            raise self._error(f"member {name!r} is damaged ({type(e).__name__}: {e})") from None
        except Exception as e:
            text = str(e).splitlines()[0] if str(e) else ""
            raise self._error(f"member {name!r} is not a numeric array (a malformed .npy header: "
                              f"{type(e).__name__}: {text[:200]})") from None
        if dtype.hasobject:
            raise self._error(f"member {name!r} holds pickled objects (dtype object), which are never loaded")
        allowed = NUMERIC_KINDS + ("U" if name == "meta" else "")
        if dtype.kind not in allowed or dtype.fields is not None or dtype.subdtype is not None:
            raise self._error(f"member {name!r} is not a numeric array (dtype {dtype})")
        if any(s < 0 for s in shape):
            raise self._error(f"member {name!r} has a negative dimension in its shape {shape}")
        m = Member(name, tuple(shape), dtype, fortran, header_size)
        if info.file_size != header_size + m.nbytes:
            raise self._error(f"member {name!r}: its .npy header promises {m.nbytes} bytes of data "
                              f"{m.shape} {dtype}, the zip directory {info.file_size - header_size}")
        self._members[name] = m
        return m

    # -- step 4: a bounded read -------------------------------------------------------------
    def read(self, name, expect: Expect | None = None) -> np.ndarray:
        """The array ``name``, after checking its header against ``expect`` (or the generic bound)."""
        info = self._infos[name]
        m = self.member(name)
        if expect is not None:
            want = np.dtype(expect.dtype)
            shape_ok = len(m.shape) == len(expect.shape) and all(
                e is None or s == e for s, e in zip(m.shape, expect.shape))
            if not shape_ok or m.dtype.newbyteorder("=") != want:
                shown = tuple("n" if e is None else e for e in expect.shape)
                raise self._error(f"member {name!r} has shape {m.shape} and dtype {m.dtype}, "
                                  f"{expect.source} {shown} {want}")
        if name != "meta" and info.compress_type == zipfile.ZIP_DEFLATED and \
                info.file_size > max(MAX_RATIO * info.compress_size, _CHUNK):
            raise self._error(f"member {name!r} would inflate {info.compress_size} bytes to "
                              f"{info.file_size}, more than minivae reads")
        try:
            with self._zip.open(info) as f:
                f.read(m.header_size)
                buf = bytearray()
                while len(buf) < m.nbytes:
                    chunk = f.read(min(_CHUNK, m.nbytes - len(buf)))
                    if not chunk:
                        break
                    buf += chunk
                extra = f.read(1)
        except Exception as e:       # zlib.error, BadZipFile (CRC), EOFError, OSError ...
            raise self._error(f"member {name!r} is damaged ({type(e).__name__}: {e})") from None
        if len(buf) != m.nbytes or extra:
            raise self._error(f"member {name!r} is truncated or damaged ({len(buf)} of {m.nbytes} bytes)")
        arr = np.frombuffer(buf, dtype=m.dtype)
        arr = arr.reshape(m.shape, order="F" if m.fortran_order else "C")
        if not m.dtype.isnative:
            arr = arr.astype(m.dtype.newbyteorder("="))
        return arr

    # -- step 2: meta ----------------------------------------------------------------------
    def _read_meta(self):
        if "meta" not in self._infos:
            raise self._error("not a minivae checkpoint (no 'meta' entry)")
        m = self.member("meta")
        if m.dtype.kind != "U" or m.shape != ():
            raise self._error(f"not a minivae checkpoint (its 'meta' entry is {m.shape} {m.dtype}, not text)")
        if m.nbytes > MAX_META_BYTES:
            raise self._error(f"its 'meta' entry of {m.nbytes} bytes is larger than minivae reads "
                              f"({MAX_META_BYTES})")
        text = str(self.read("meta", Expect((), m.dtype))[()])
        meta = parse_json(text, lambda msg: self._error(f"its 'meta' entry is not valid JSON ({msg})"))
        if not isinstance(meta, dict):
            raise self._error(f"not a minivae checkpoint (its 'meta' entry is a JSON {type(meta).__name__}, "
                              f"not an object)")
        if meta.get("format") != FORMAT:
            fmt = meta.get("format")
            raise self._error(f"not a minivae checkpoint (format {fmt!r})")
        if meta.get("version") != VERSION:
            raise self._error(f"checkpoint version {meta.get('version')!r}, this minivae reads version {VERSION}")
        return meta


def parse_json(text, error, allow_nan=False):
    """Strict JSON: no NaN/Infinity (unless ``allow_nan``), no duplicate keys, bounded integers
    and nesting. ``error(message)`` builds the exception to raise."""
    def constant(token):
        if allow_nan:
            return float(token)
        raise ValueError(f"{token} is not a JSON number")

    def pairs(items):
        d = {}
        for k, v in items:
            if k in d:
                raise ValueError(f"duplicate key {k!r}")
            d[k] = v
        return d

    def integer(s):
        if len(s) > MAX_INT_DIGITS:
            raise ValueError(f"an integer of {len(s)} digits")
        return int(s)

    def real(s):
        f = float(s)
        if not math.isfinite(f) and not allow_nan:
            raise ValueError(f"the number {s[:20]} is out of range")
        return f

    try:
        obj = json.loads(text, object_pairs_hook=pairs, parse_constant=constant, parse_int=integer,
                         parse_float=real)
    except RecursionError:
        raise error("nested too deeply") from None
    except ValueError as e:                 # JSONDecodeError and the hooks' refusals
        raise error(str(e).splitlines()[0][:200]) from None
    stack = [(obj, 1)]                      # the depth, without recursion
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise error(f"nested more than {MAX_JSON_DEPTH} deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return obj


def load(path, expect=None):
    """Read a checkpoint: returns (meta, arrays). Raises CheckpointError with a one-line reason.

    ``expect(meta) -> {name: Expect}``, when given, says which members to read and what each must
    be (it may raise CheckpointError or ValueError about the meta, before anything is read); the
    other members are skipped. Without it, every member is read under the generic bounds.
    """
    path = os.fspath(path)
    with Archive(path) as a:
        for name in a.names:                # every header first (bounded): a bad one refuses the file
            a.member(name)
        if expect is None:
            wanted = {name: None for name in a.names}
        else:
            try:
                wanted = expect(a.meta)
            except CheckpointError:
                raise
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
            missing = [n for n, e in wanted.items() if e.required and n not in a.names]
            if missing:
                raise CheckpointError(f"{path}: checkpoint has no {', '.join(repr(n) for n in missing)} entry")
        arrays = {name: a.read(name, e) for name, e in wanted.items() if name in a.names}
        return a.meta, arrays
