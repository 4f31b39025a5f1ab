"""Datasets: the embedded 8x8 digits, MNIST and Fashion-MNIST from IDX files, binarization, download.

Every dataset arrives as flat rows: x is (n, D) with D = h * w, grey levels in [0, 1] (or {0, 1}
when statically binarized), y is (n,) int64 class labels. Three splits: train, a validation split
held out of train, and test.

Where the IDX files are looked for (``resolve_data_dir``):
    1. ``data_dir`` (the ``--data-dir`` flag), if given;
    2. ``$MINIVAE_DATA/<name>`` if that folder exists, else ``$MINIVAE_DATA`` itself;
    3. the user cache, ``$XDG_CACHE_HOME/minivae/<name>`` (``~/.cache/minivae/<name>``).
Each of the four canonical files may be gzipped (``train-images-idx3-ubyte.gz``) or raw.

Every failure is a :class:`DataError`: a ``ValueError`` with a one-line message that names the
file or folder at fault.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import atomic_write

DATASETS = ("digits", "mnist", "fashion-mnist")
IDX_DATASETS = ("mnist", "fashion-mnist")
BINARIZE = ("none", "static", "dynamic")
DTYPES = ("float32", "float64")

# The four canonical files, without the optional ".gz".
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# Default mirrors, tried in order (``base_url`` replaces them).
MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# SHA-256 of the published files. "size": the bytes of the ``.gz`` file as distributed (a download
# stops there); "gz": its SHA-256; "idx": the SHA-256 of its decompressed content, or None where we
# do not know it. The content digest is what identifies the data: the
# same bytes are sometimes re-gzipped with another header (the MNIST t10k copies in the project's
# shared folder are such files), so a file passes when either digest matches.
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte": {
            "size": 9912422,
            "gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "idx": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"},
        "train-labels-idx1-ubyte": {
            "size": 28881,
            "gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "idx": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"},
        "t10k-images-idx3-ubyte": {
            "size": 1648877,
            "gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "idx": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"},
        "t10k-labels-idx1-ubyte": {
            "size": 4542,
            "gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "idx": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"},
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": {
            "size": 26421880, "gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", "idx": None},
        "train-labels-idx1-ubyte": {
            "size": 29515, "gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", "idx": None},
        "t10k-images-idx3-ubyte": {
            "size": 4422102, "gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", "idx": None},
        "t10k-labels-idx1-ubyte": {
            "size": 5148, "gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", "idx": None},
    },
}

# IDX data-type codes (third byte of the magic number) and their big-endian NumPy types.
IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IMAGES_MAGIC = 0x00000803   # uint8, 3 dimensions (n, h, w)
LABELS_MAGIC = 0x00000801   # uint8, 1 dimension (n,)
N_CLASSES = 10


def _is_terminal(stream) -> bool:
    """A progress bar only on a terminal: in a pipe or a CI log it would leave dead lines."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class DataError(ValueError):
    """A dataset that cannot be found, downloaded or read; the message names the file or folder."""


# ----------------------------------------------------------------------------------------------
# The dataset container
# ----------------------------------------------------------------------------------------------

@dataclass(repr=False)
class Dataset:
    """Three splits of flat images.  x_*: (n, D) float, C-contiguous; y_*: (n,) int64."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    image_shape: tuple          # (h, w), with h * w = D
    binarize: str = "none"      # "dynamic": the train loop resamples each batch (dynamic_binarize)
    source: str = ""            # where the data came from (a folder, or the bundled copy)

    @property
    def x_dim(self) -> int:
        return int(self.image_shape[0] * self.image_shape[1])

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={len(self.x_train)}, val={len(self.x_val)}, "
                f"test={len(self.x_test)}, image_shape={tuple(self.image_shape)}, "
                f"binarize={self.binarize!r}, dtype={self.x_train.dtype})")


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------

MAX_IDX_BYTES = 1 << 30        # the most data one IDX file may promise (MNIST's train images: 47 MB)
DEFLATE_MAX_RATIO = 1032       # deflate inflates one byte to at most 1032: a gzip's ceiling
_CHUNK = 1 << 20
_TRAILING_COUNTED = 1 << 20    # trailing bytes past the data are counted up to this many


def _read_up_to(f, n) -> bytearray:
    """At most ``n`` bytes of ``f``, read in chunks (memory grows only with what arrives)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(min(_CHUNK, n - len(buf)))
        if not chunk:
            break
        buf += chunk
    return buf


def _idx_header(path, f, expect_ndim=None, expect_dtype=None, what=""):
    """(dtype, dims) from the header of the IDX stream ``f``, read and checked field by field."""
    magic = _read_up_to(f, 4)
    if len(magic) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(magic)} bytes, no header)")
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{bytes(magic).hex()}; "
                        f"expected 0x000008NN for uint8 data)")
    dtype, ndim = IDX_TYPES[magic[2]], magic[3]
    if ndim == 0:
        raise DataError(f"{path}: bad IDX header (zero dimensions)")
    if (expect_ndim is not None and ndim != expect_ndim) or (expect_dtype is not None and dtype != expect_dtype):
        raise DataError(f"{path}: expected {what}, got {dtype.newbyteorder('=')} with {ndim} dimensions")
    raw_dims = _read_up_to(f, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header ({4 + len(raw_dims)} bytes, the header needs {4 + 4 * ndim})")
    dims = tuple(int.from_bytes(raw_dims[4 * i:4 * i + 4], "big") for i in range(ndim))
    return dtype, dims


def read_idx(path, expect_ndim=None, expect_dtype=None, what="") -> np.ndarray:
    """Parse an IDX file (raw or gzipped) into an array with the dimensions of its header.

    Layout: magic (4 bytes: 0, 0, type code, number of dimensions), then one big-endian uint32 per
    dimension, then exactly prod(dims) items, big-endian. MNIST images are 0x00000803 (uint8,
    (n, h, w)), labels 0x00000801 (uint8, (n,)). Anything else is a DataError naming the file.

    The header is read and checked first (against ``expect_ndim``/``expect_dtype`` when given);
    then what it promises is bounded (MAX_IDX_BYTES; a raw file must hold exactly that many bytes,
    a gzip cannot inflate more than DEFLATE_MAX_RATIO times its size), and exactly that much is
    streamed in; more or less is refused. Nothing is read whole.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        gz = path.suffix == ".gz" or f.read(2) == b"\x1f\x8b"
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f, mode="rb") if gz else f
        try:
            return _read_idx_stream(path, stream, size, gz, expect_ndim, expect_dtype, what)
        except DataError:
            raise
        except (OSError, EOFError, zlib.error) as e:
            if gz:
                raise DataError(f"{path}: corrupt gzip data ({e})") from None
            raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _read_idx_stream(path, f, size, gz, expect_ndim, expect_dtype, what):
    dtype, dims = _idx_header(path, f, expect_ndim, expect_dtype, what)
    header = 4 + 4 * len(dims)
    nbytes = math.prod(dims) * dtype.itemsize              # Python ints: the product cannot overflow
    expected = header + nbytes
    if nbytes > MAX_IDX_BYTES:
        raise DataError(f"{path}: the IDX header {dims} promises {nbytes} bytes of data, more than "
                        f"minivae reads ({MAX_IDX_BYTES})")
    if not gz and size < expected:
        raise DataError(f"{path}: truncated ({size} bytes, the header {dims} implies {expected})")
    if not gz and size > expected:
        raise DataError(f"{path}: {size - expected} trailing bytes after the data "
                        f"(the header {dims} implies {expected} bytes)")
    if gz and nbytes > DEFLATE_MAX_RATIO * size:
        raise DataError(f"{path}: the IDX header {dims} promises {nbytes} bytes, more than a gzip file "
                        f"of {size} bytes can hold")
    data = _read_up_to(f, nbytes)
    if len(data) < nbytes:
        raise DataError(f"{path}: truncated ({header + len(data)} bytes, the header {dims} implies {expected})")
    extra = len(_read_up_to(f, _TRAILING_COUNTED))
    if extra:
        more = "" if extra < _TRAILING_COUNTED else "at least "
        raise DataError(f"{path}: {more}{extra} trailing bytes after the data "
                        f"(the header {dims} implies {expected} bytes)")
    arr = np.frombuffer(data, dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))          # native byte order, a writable copy


def write_idx(path, array):
    """Write ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``; atomic."""
    a = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in IDX_TYPES.items()}
    native = a.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX stores uint8, int8, int16, int32, float32 or float64, got {a.dtype}")
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got {a.ndim}")
    code = codes[native]
    payload = (bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
               + np.ascontiguousarray(a, dtype=IDX_TYPES[code]).tobytes())
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    atomic_write(path, lambda f: f.write(payload))
    return Path(path)


# ----------------------------------------------------------------------------------------------
# Where the files live
# ----------------------------------------------------------------------------------------------

def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minivae"


def resolve_data_dir(name, data_dir=None) -> Path:
    """The folder that should hold the IDX files of ``name`` (see the module docstring)."""
    _check_name(name)
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MINIVAE_DATA")
    if env:
        root = Path(env).expanduser()
        return root / name if (root / name).is_dir() else root
    return _cache_root() / name


def _download_dir(name, data_dir=None) -> Path:
    """Where ``download`` writes: like resolve_data_dir, but always a per-dataset folder."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MINIVAE_DATA")
    return (Path(env).expanduser() if env else _cache_root()) / name


def _how_to_provide(name, folder) -> str:
    files = ", ".join(FILES.values())
    return (f"run `minivae download {name}`, or copy the four IDX files ({files}; .gz or raw) "
            f"into {folder}, or point --data-dir or $MINIVAE_DATA at a folder that holds them")


def find_idx_files(name, data_dir=None) -> dict:
    """The paths of the four files (key -> Path), the ``.gz`` preferred; DataError if any is missing."""
    folder = resolve_data_dir(name, data_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder for {name}; {_how_to_provide(name, folder)}")
    found, missing = {}, []
    for key, stem in FILES.items():
        for candidate in (folder / (stem + ".gz"), folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            missing.append(stem)
    if missing:
        raise DataError(f"{folder / missing[0]}[.gz]: missing ({len(missing)} of the 4 {name} files "
                        f"absent: {', '.join(missing)}); {_how_to_provide(name, folder)}")
    return found


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def _check_name(name):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def _read_split(images_path, labels_path):
    """Images (n, h, w) uint8 and labels (n,) uint8 of one split, cross-checked."""
    images = read_idx(images_path, 3, np.dtype("u1"),
                      f"an image file (magic 0x{IMAGES_MAGIC:08x}, uint8 n x h x w)")
    labels = read_idx(labels_path, 1, np.dtype("u1"), f"a label file (magic 0x{LABELS_MAGIC:08x}, uint8 n)")
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels, but {images_path} holds "
                        f"{len(images)} images")
    if len(images) == 0:
        raise DataError(f"{images_path}: holds no images")
    if 0 in images.shape[1:]:
        raise DataError(f"{images_path}: images of {images.shape[1]}x{images.shape[2]} pixels; "
                        f"expected at least 1x1")
    if labels.max() >= N_CLASSES:
        raise DataError(f"{labels_path}: labels must be 0..{N_CLASSES - 1}, found {int(labels.max())}")
    return images, labels


def _load_idx_dataset(name, data_dir, dtype):
    paths = find_idx_files(name, data_dir)
    train_images, train_labels = _read_split(paths["train_images"], paths["train_labels"])
    test_images, test_labels = _read_split(paths["test_images"], paths["test_labels"])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(f"{paths['test_images']}: images are {test_images.shape[1:]}, but "
                        f"{paths['train_images']} holds {train_images.shape[1:]}")
    image_shape = tuple(int(s) for s in train_images.shape[1:])

    def flat(images):                       # (n, h, w) uint8 -> (n, h*w) in [0, 1]
        x = images.reshape(len(images), -1).astype(dtype)
        x /= 255
        return x

    return (flat(train_images), train_labels.astype(np.int64), flat(test_images),
            test_labels.astype(np.int64), image_shape, str(paths["train_images"].parent))


DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0       # fixed: the digits test split is the same for every run


def _load_digits(dtype):
    """scikit-learn's bundled 8x8 digits (1797 images, grey levels 0..16), split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(dtype)                                   # (1797, 64) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        x, y.astype(np.int64), test_size=DIGITS_TEST_FRACTION, stratify=y,
        random_state=DIGITS_SPLIT_SEED)
    return x_train, y_train, x_test, y_test, (8, 8), "sklearn.datasets.load_digits"


def static_binarize(x, rng, chunk=8192):
    """One Bernoulli(x) draw per pixel: the usual "statically binarized" data.  x: (n, D) in [0, 1]."""
    out = np.empty_like(x)
    for i in range(0, len(x), chunk):        # chunks keep the uniform draws small
        out[i:i + chunk] = dynamic_binarize(x[i:i + chunk], rng)
    return out


def dynamic_binarize(x, rng):
    """A fresh Bernoulli(x) draw per pixel, for each minibatch (dynamic binarization).

    x: (n, D) grey levels in [0, 1]; rng: a numpy Generator. Returns {0, 1} in x's dtype.
    """
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
    return (rng.random(x.shape, dtype=dtype) < x).astype(dtype)


def load_dataset(name, data_dir=None, binarize="none", val_fraction=0.1, seed=0,
                 dtype="float32") -> Dataset:
    """Load ``name`` ("digits", "mnist" or "fashion-mnist") as a :class:`Dataset`.

    ``val_fraction`` of train (chosen by a permutation seeded with ``seed``) becomes the
    validation split; 0 gives empty (0, D) validation arrays. ``binarize``: "none" keeps grey
    levels; "static" draws Bernoulli(x) once per pixel (seeded, so always the same data); "dynamic"
    keeps grey levels and records that the train loop should call :func:`dynamic_binarize`.
    """
    _check_name(name)
    if binarize not in BINARIZE:
        raise ValueError(f"unknown binarize mode {binarize!r}; expected one of {', '.join(BINARIZE)}")
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        val_fraction = float(val_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}") from None
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    dtype = np.dtype(str(dtype))

    if name == "digits":
        x_train, y_train, x_test, y_test, image_shape, source = _load_digits(dtype)
    else:
        x_train, y_train, x_test, y_test, image_shape, source = _load_idx_dataset(name, data_dir, dtype)

    # The validation split: a seeded choice of rows of train, both parts kept in file order.
    n = len(x_train)
    n_val = int(round(val_fraction * n))
    if n_val >= n:
        raise ValueError(f"val_fraction {val_fraction} leaves no training examples out of {n}")
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    x_val, y_val = x_train[is_val], y_train[is_val]
    x_train, y_train = x_train[~is_val], y_train[~is_val]

    if binarize == "static":
        rng = np.random.default_rng([seed, 0xB1])        # one fixed stream per seed
        x_train, x_val, x_test = (static_binarize(a, rng) for a in (x_train, x_val, x_test))

    c = np.ascontiguousarray
    return Dataset(name, c(x_train), c(y_train), c(x_val), c(y_val), c(x_test), c(y_test),
                   tuple(image_shape), binarize=binarize, source=source)


# ----------------------------------------------------------------------------------------------
# Download with SHA-256 verification
# ----------------------------------------------------------------------------------------------

MAX_DOWNLOAD_BYTES = 64 << 20  # a download whose published size is not known stops here


class _Digests:
    """SHA-256 of a stream and of its gunzipped content, updated chunk by chunk.

    The inflated content is hashed in bounded pieces and only up to MAX_IDX_BYTES: a stream that
    inflates to more cannot match a content digest anyway."""

    def __init__(self):
        self.gz = hashlib.sha256()
        self.idx = hashlib.sha256()
        self._inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._inflated = 0
        self.idx_ok = True                      # False once the stream is not valid gzip

    def update(self, chunk):
        self.gz.update(chunk)
        try:
            while self.idx_ok:
                out = self._inflate.decompress(chunk, _CHUNK)      # at most _CHUNK bytes at a time
                self._inflated += len(out)
                if self._inflated > MAX_IDX_BYTES:
                    self.idx_ok = False
                self.idx.update(out)
                chunk = self._inflate.unconsumed_tail
                if not chunk and len(out) < _CHUNK:                 # input used up, output drained
                    break
        except zlib.error:
            self.idx_ok = False

    def matches(self, expected) -> bool:
        if self.gz.hexdigest() == expected["gz"]:
            return True
        return bool(expected.get("idx")) and self.idx_ok and self._inflate.eof \
            and self.idx.hexdigest() == expected["idx"]


def verify_file(path, expected) -> bool:
    """True when the ``.gz`` file at ``path`` is the published file (or its content re-gzipped).

    A file more than twice the published size is not it, and is not read."""
    size = expected.get("size")
    if size is not None and os.path.getsize(path) > 2 * size:
        return False
    d = _Digests()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            d.update(chunk)
    return d.matches(expected)


def _fetch(url, f, expected, timeout, quiet, desc):
    """Stream ``url`` into the open file ``f``, hashing as it goes, never past the published size
    (``expected["size"]``, else MAX_DOWNLOAD_BYTES); DataError on a Content-Length that disagrees,
    on more bytes than that, or on a bad digest (the caller's atomic write then keeps nothing)."""
    from tqdm.auto import tqdm

    size = expected.get("size")
    limit = size if size is not None else MAX_DOWNLOAD_BYTES
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = response.headers.get("Content-Length")
        if total is not None:
            try:
                total = int(total)
            except ValueError:
                raise DataError(f"{url}: the server sent a malformed Content-Length {total!r}; "
                                f"the download was discarded") from None
            if (size is not None and total != size) or total > limit:
                published = f"the published file has {size}" if size is not None else f"at most {limit} are read"
                raise DataError(f"{url}: the server announces {total} bytes, {published}; "
                                f"the download was discarded")
        digests = _Digests()
        got = 0
        with tqdm(total=limit, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=quiet or not _is_terminal(sys.stderr),
                  leave=False) as bar:
            while True:
                chunk = response.read(min(1 << 16, limit + 1 - got))   # the budget: the size + 1
                if not chunk:
                    break
                got += len(chunk)
                if got > limit:
                    raise DataError(f"{url}: the server sent more than the {limit} bytes of the published "
                                    f"file; the download was discarded")
                f.write(chunk)
                digests.update(chunk)
                bar.update(len(chunk))
    if not digests.matches(expected):
        raise DataError(f"{url}: SHA-256 mismatch (got {digests.gz.hexdigest()}, expected "
                        f"{expected['gz']}); the download was discarded")


def download(name, data_dir=None, base_url=None, quiet=False, timeout=30) -> Path:
    """Fetch the four IDX files of ``name`` into a folder, verify their SHA-256, return the folder.

    The folder is ``data_dir``, else ``$MINIVAE_DATA/<name>``, else ``~/.cache/minivae/<name>``.
    Files already there with a good checksum are kept. Each download goes to a temporary file
    that is renamed only once its digest matches the published one (``CHECKSUMS``). The default
    mirrors are ``MIRRORS[name]``, tried in order; ``base_url`` replaces them.
    """
    _check_name(name)
    if name not in IDX_DATASETS:
        raise DataError(f"{name}: bundled with scikit-learn, there is nothing to download")
    folder = _download_dir(name, data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{folder}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(folder, os.W_OK):
        raise DataError(f"{folder}: the folder is not writable")
    mirrors = (base_url,) if base_url else MIRRORS[name]
    mirrors = tuple(m if m.endswith("/") else m + "/" for m in mirrors)

    for stem in FILES.values():
        filename = stem + ".gz"
        dest = folder / filename
        expected = CHECKSUMS[name][stem]
        if dest.is_file() and verify_file(dest, expected):
            if not quiet:
                print(f"{dest}: present, checksum OK")
            continue
        errors = []
        for mirror in mirrors:
            url = mirror + filename
            try:
                atomic_write(dest, lambda f: _fetch(url, f, expected, timeout, quiet, filename))
                break
            except urllib.error.HTTPError as e:
                errors.append(f"{url}: HTTP {e.code} {e.reason}")
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                # offline, refused, timed out, DNS failure, connection cut mid-file
                reason = getattr(e, "reason", None) or e
                errors.append(f"{url}: {reason}")
        else:
            raise DataError(f"could not download {filename} ({'; '.join(errors)}). Offline? "
                            f"Fetch the four files from {mirrors[0]} on another machine and copy "
                            f"them into {folder} (or point --data-dir or $MINIVAE_DATA at them)")
        if not quiet:
            print(f"{dest}: downloaded, checksum OK")
    return folder
