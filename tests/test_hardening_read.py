"""Issue 10 (hardening), the readers of untrusted files: IDX files, checkpoints, resumable training
state and downloads. Every crafted file is built here; each must give the project's one-line error
(DataError / CheckpointError, `minivae: error: <file>: ...` from the CLI), never another exception,
and never allocate or read what its header merely promises."""
from __future__ import annotations

import gzip
import http.server
import hashlib
import json
import os
import struct
import threading
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minivae import VAE, checkpoint
from minivae import data as data_mod
from minivae.checkpoint import CheckpointError
from minivae.cli import main
from minivae.data import DataError, read_idx
from minivae.train import Run, SerialComm, TrainConfig, read_run, resume_config, train


def one_line(e, path):
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


class Peak:
    """The peak of Python allocations (tracemalloc) inside the ``with`` block, in bytes."""

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return False


# ==============================================================================================
# IDX files
# ==============================================================================================

def idx_bytes(code, dims, payload=b""):
    """An IDX file: magic 0, 0, type code, ndim; big-endian uint32 dims; the payload as given."""
    return bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims) + payload


def gz_stream(head, zeros, tail=b""):
    """A gzip of ``head`` + ``zeros`` zero bytes + ``tail``, compressed piecewise (small in memory)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [c.compress(head)]
    block = bytes(1 << 20)
    for i in range(0, zeros, len(block)):
        parts.append(c.compress(block[:min(len(block), zeros - i)]))
    parts.append(c.compress(tail))
    parts.append(c.flush())
    return b"".join(parts)


IDX_CASES = [
    # (case, content, words in the message)
    ("overflowing-dims", idx_bytes(8, (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)), "promises"),
    ("255-dims", idx_bytes(8, (2,) * 255), "promises"),
    ("wide-type", idx_bytes(0x0E, (1 << 28,)), "promises"),             # 2 GiB of float64
    ("bad-magic", b"\x00\x01\x08\x01" + (3).to_bytes(4, "big") + bytes(3), "bad magic number"),
    ("bad-type-code", idx_bytes(0x0A, (3,), bytes(3)), "bad magic number"),
    ("no-dims", bytes([0, 0, 8, 0]), "zero dimensions"),
    ("dims-cut", bytes([0, 0, 8, 3, 0, 0]), "truncated IDX header"),
    ("data-cut", idx_bytes(8, (10,), bytes(4)), "truncated"),
    ("trailing", idx_bytes(8, (3,), bytes(5)), "2 trailing bytes"),
    ("empty", b"", "no header"),
]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case, content, words", IDX_CASES, ids=[c[0] for c in IDX_CASES])
def test_malformed_idx_files_name_the_file_and_the_fault(tmp_path, case, content, words, gz):
    path = tmp_path / (f"{case}-idx1-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(content, mtime=0) if gz else content)
    with Peak() as peak, pytest.raises(DataError, match=words) as e:
        read_idx(path)
    one_line(e.value, path)
    assert peak.bytes < 4 << 20                          # nothing the header promised was allocated


def test_a_sparse_file_is_judged_by_its_header_and_size_without_being_read(tmp_path):
    """A raw file's size is known: a header that promises more than minivae reads, or other than
    what the file holds, is refused before any data is read (the sparse holes are never touched)."""
    huge = tmp_path / "huge-idx3-ubyte"
    with open(huge, "wb") as f:
        f.write(idx_bytes(8, (1 << 21, 32, 32)))          # 2 GiB promised, and the file is that big
    os.truncate(huge, 16 + (1 << 31))
    cut = tmp_path / "cut-idx3-ubyte"
    with open(cut, "wb") as f:
        f.write(idx_bytes(8, (1 << 18, 32, 32)))          # 256 MiB promised, 1 MiB held
    os.truncate(cut, 16 + (1 << 20))
    long = tmp_path / "long-idx3-ubyte"
    with open(long, "wb") as f:
        f.write(idx_bytes(8, (2, 2, 2)))                  # 8 bytes promised, 256 MiB held
    os.truncate(long, 1 << 28)
    for path, words in ((huge, "more than minivae reads"), (cut, "truncated"), (long, "trailing bytes")):
        with Peak() as peak, pytest.raises(DataError, match=words) as e:
            read_idx(path)
        one_line(e.value, path)
        assert peak.bytes < 1 << 20


def test_a_gzip_bomb_is_streamed_with_a_budget(tmp_path):
    """64 MiB of zeros after the 8 bytes a header promises: refused as trailing bytes after
    reading at most the promise and a bounded count, never the whole stream."""
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(gz_stream(idx_bytes(8, (2, 2, 2), bytes(8)), 64 << 20))
    assert bomb.stat().st_size < 1 << 20
    with Peak() as peak, pytest.raises(DataError, match="at least 1048576 trailing bytes") as e:
        read_idx(bomb)
    one_line(e.value, bomb)
    assert peak.bytes < 8 << 20


def test_a_small_gzip_cannot_promise_more_than_deflate_can_hold(tmp_path):
    path = tmp_path / "liar-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(8, (100_000, 28, 28)), mtime=0))   # 78 MB in ~40 bytes
    with Peak() as peak, pytest.raises(DataError, match="more than a gzip file of") as e:
        read_idx(path)
    one_line(e.value, path)
    assert peak.bytes < 1 << 20


def test_truncated_and_damaged_gzip_streams(tmp_path):
    good = gzip.compress(idx_bytes(8, (4, 5, 5), bytes(range(100))), mtime=0)
    cases = {"cut": good[:-10], "crc": good[:-8] + bytes(4) + good[-4:],
             "flipped": good[:20] + bytes([good[20] ^ 0xFF]) + good[21:],
             "garbage-after": good + b"this is not a second gzip member"}
    for case, content in cases.items():
        path = tmp_path / f"{case}-idx3-ubyte.gz"
        path.write_bytes(content)
        with pytest.raises(DataError) as e:
            read_idx(path)
        one_line(e.value, path)


def _write_split_files(folder, images, labels, test_images=None, test_labels=None):
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte": images, "train-labels-idx1-ubyte": labels,
             "t10k-images-idx3-ubyte": images if test_images is None else test_images,
             "t10k-labels-idx1-ubyte": labels if test_labels is None else test_labels}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


def _images(n, h=2, w=2):
    return idx_bytes(8, (n, h, w), bytes(n * h * w))


def _labels(values):
    return idx_bytes(8, (len(values),), bytes(values))


@pytest.mark.parametrize("case, images, labels, words", [
    ("0x0 images", idx_bytes(8, (3, 0, 0)), _labels([1, 2, 3]), "0x0 pixels"),
    ("0 images", idx_bytes(8, (0, 2, 2)), _labels([]), "holds no images"),
    ("count mismatch", _images(3), _labels([1, 2]), "2 labels, but"),
    ("label out of range", _images(3), _labels([1, 2, 10]), r"labels must be 0\.\.9, found 10"),
    ("labels as images", _labels([1, 2, 3]), _labels([1, 2, 3]), "expected an image file"),
    ("images as labels", _images(3), _images(3), "expected a label file"),
    ("int32 labels", _images(3), idx_bytes(0x0C, (3,), bytes(12)), "expected a label file"),
    ("float images", idx_bytes(0x0D, (3, 2, 2), bytes(48)), _labels([1, 2, 3]), "expected an image file"),
])
def test_dataset_level_checks(tmp_path, case, images, labels, words):
    folder = _write_split_files(tmp_path / "d", images, labels)
    with pytest.raises(DataError, match=words) as e:
        data_mod.load_dataset("mnist", data_dir=folder, val_fraction=0)
    one_line(e.value, folder)


def test_the_cli_reports_a_bad_idx_file_in_one_line(tmp_path, capsys):
    folder = _write_split_files(tmp_path / "d", _images(3), _labels([1, 2, 3]))
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(8, (0xFFFFFFFF, 28, 28)))
    code = main(["train", "--dataset", "mnist", "--data-dir", str(folder), "--epochs", "1", "--quiet",
                 "--no-plots", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("minivae: error: ") and err.count("\n") == 1, err
    assert "train-images-idx3-ubyte" in err and "Traceback" not in err


def _valid_idx(gz):
    rng = np.random.default_rng(3)
    raw = idx_bytes(8, (5, 3, 4), rng.integers(0, 256, 60, dtype=np.uint8).tobytes())
    return gzip.compress(raw, mtime=0) if gz else raw


@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gz=st.booleans(), cut=st.integers(0, 200), flips=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4))
def test_any_damage_to_an_idx_file_is_a_data_error_or_a_clean_read(tmp_path, gz, cut, flips):
    content = bytearray(_valid_idx(gz))
    for pos, mask in flips:
        content[pos % len(content)] ^= mask
    content = bytes(content[:len(content) - cut % (len(content) + 1)])
    path = tmp_path / ("h-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(content)
    try:
        a = read_idx(path)
    except DataError as e:
        one_line(e, path)
    else:
        assert a.ndim >= 1 and a.flags.writeable


# ==============================================================================================
# Checkpoints: crafted .npz archives
# ==============================================================================================

def npy_bytes(header, data=b"", version=(1, 0)):
    """A .npy member with a header dict given as text (padded like numpy's), then ``data``."""
    body = header.encode("latin1")
    if version == (1, 0):
        pad = (64 - (10 + len(body) + 1) % 64) % 64
        body += b" " * pad + b"\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body + data
    pad = (64 - (12 + len(body) + 1) % 64) % 64
    body += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes(version) + struct.pack("<I", len(body)) + body + data


def npy_of(a):
    import io
    f = io.BytesIO()
    np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)
    return f.getvalue()


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    """Write ``members`` (name -> bytes) as a zip archive; returns the path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                   # duplicate names are meant
        with zipfile.ZipFile(path, "w", compression=compression) as z:
            for name, content in members:
                z.writestr(name, content)
    return path


@pytest.fixture(scope="module")
def small_model():
    return VAE(6, 2, hidden=(3,), dtype="float64", seed=1)


@pytest.fixture
def good(tmp_path, small_model):
    path = tmp_path / "good.npz"
    small_model.save(path)
    return path


def meta_text(small_model, **change):
    meta = {"kind": "model", "config": small_model.config(), "format": "minivae-checkpoint", "version": 1}
    meta.update(change)
    return json.dumps(meta)


def members_of(small_model, meta=None, params=None):
    meta = meta_text(small_model) if meta is None else meta
    params = small_model.params if params is None else params
    return [("meta.npy", npy_of(np.array(meta))), ("params.npy", npy_of(params))]


def test_a_crafted_archive_that_is_well_formed_loads(tmp_path, small_model):
    """The builders below make valid checkpoints unless told otherwise (the control case)."""
    m = VAE.load(write_zip(tmp_path / "ok.npz", members_of(small_model)))
    assert np.array_equal(m.params, small_model.params)
    m = VAE.load(write_zip(tmp_path / "okz.npz", members_of(small_model), zipfile.ZIP_DEFLATED))
    assert np.array_equal(m.params, small_model.params)


P = 6 * 3 + 3 + 3 * 4 + 4 + 2 * 3 + 3 + 3 * 6 + 6      # the small model's parameter count


def _header(descr="'<f8'", fortran="False", shape=f"({P},)"):
    return "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape)


NPY_CASES = {
    # a malformed .npy header for 'params'; every one is refused before its data is read
    "bad magic": b"\x93NUMPX\x01\x00" + bytes(100),
    "version 9": b"\x93NUMPY\x09\x00" + bytes(100),
    "version 3": npy_bytes(_header(), bytes(8 * P), version=(3, 0)),
    "short": b"\x93NU",
    "header not a dict": npy_bytes("[1, 2, 3]"),
    "missing keys": npy_bytes("{'descr': '<f8', 'shape': (3,)}"),
    "extra keys": npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), 'x': 1}"),
    "shape not a tuple": npy_bytes(_header(shape="[3]")),
    "shape of floats": npy_bytes(_header(shape="(3.0,)")),
    "negative shape": npy_bytes(_header(shape="(-3,)")),
    "fortran not a bool": npy_bytes(_header(fortran="1")),
    "unknown descr": npy_bytes(_header(descr="'<z9'")),
    "descr not a string": npy_bytes(_header(descr="3")),
    "object descr": npy_bytes(_header(descr="'|O'"), bytes(8 * P)),
    "structured descr": npy_bytes(_header(descr="[('a', '<f8')]"), bytes(8 * P)),
    "subarray descr": npy_bytes(_header(descr="('<f8', (2,))"), bytes(16 * P)),
    "string descr": npy_bytes(_header(descr="'<U1'"), bytes(4 * P)),
    "python 2 ints": npy_bytes(_header(shape="(3L,)")),
    "tokenize error": npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (3L,), '''}"),
    "deep nesting": npy_bytes("{'descr': " + "(" * 3000 + ")" * 3000 + "}"),
    "huge header": npy_bytes(_header() + " " * 70000, version=(2, 0)),
    "4 GiB header length": b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{" * 64,
    "promises 10^12 floats": npy_bytes(_header(shape="(1000000000000,)"), bytes(64)),
    "data cut short": npy_bytes(_header(), bytes(8 * P - 3)),
    "data too long": npy_bytes(_header(), bytes(8 * P + 8)),
    "wrong shape": npy_bytes(_header(shape=f"({P}, 1)"), bytes(8 * P)),
    "wrong dtype": npy_bytes(_header(descr="'<f4'"), bytes(4 * P)),
}


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
@pytest.mark.parametrize("case", list(NPY_CASES))
def test_every_malformed_npy_header_is_a_checkpoint_error(tmp_path, small_model, case, compression):
    path = write_zip(tmp_path / "c.npz", [("meta.npy", npy_of(np.array(meta_text(small_model)))),
                                          ("params.npy", NPY_CASES[case])], compression)
    # a well-formed array of the wrong shape or dtype is refused by the model, which knows better
    loaders = (VAE.load,) if case.startswith("wrong") else (VAE.load, checkpoint.load)
    for load in loaders:
        with Peak() as peak, pytest.raises(CheckpointError) as e:
            load(path)
        msg = one_line(e.value, path)
        assert "params" in msg
        assert peak.bytes < 4 << 20
    if case == "object descr":
        assert "pickled objects" in msg


def _flag_encrypted(path):
    """Set bit 0 (encrypted) of the general-purpose flags in every local and central header."""
    raw = bytearray(path.read_bytes())
    for sig, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = raw.find(sig)
        while i >= 0:
            raw[i + offset] |= 0x01
            i = raw.find(sig, i + 4)
    path.write_bytes(bytes(raw))
    return path


def _claim_size(path, member, size):
    """Rewrite the central directory's uncompressed (and, for a stored member, compressed) size."""
    raw = bytearray(path.read_bytes())
    name = member.encode()
    i = raw.find(b"PK\x01\x02")
    while i >= 0:
        n = struct.unpack_from("<H", raw, i + 28)[0]
        if raw[i + 46:i + 46 + n] == name:
            method = struct.unpack_from("<H", raw, i + 10)[0]
            struct.pack_into("<I", raw, i + 24, size)
            if method == 0:
                struct.pack_into("<I", raw, i + 20, size)
        i = raw.find(b"PK\x01\x02", i + 4)
    path.write_bytes(bytes(raw))
    return path


def _archive_cases(tmp_path, small_model, good):
    m = members_of(small_model)
    raw = good.read_bytes()
    cases = {}

    def put(name, content, words):
        p = tmp_path / f"{name.replace(' ', '-')}.npz"
        p.write_bytes(content) if isinstance(content, bytes) else None
        cases[name] = (p if isinstance(content, bytes) else content, words)

    put("empty", b"", "empty file")
    put("junk", b"this is not a zip file\n" * 10, "not a zip archive")
    put("pickle", b"\x80\x04\x95" + bytes(50), "pickle")
    put("npy", npy_of(small_model.params), "single .npy array")
    put("zip magic then junk", b"PK\x03\x04" + bytes(200), "damaged zip archive")
    put("cut in half", raw[:len(raw) // 2], "checkpoint")
    put("not npy member", write_zip(tmp_path / "txt.npz", m + [("notes.txt", b"hi")]), "not a .npy array")
    put("duplicate member", write_zip(tmp_path / "dup.npz", m + [("params.npy", npy_of(small_model.params))]),
        "appears twice")
    put("folder member", write_zip(tmp_path / "dir.npz", m + [("sub/", b"")]), "not a .npy array")
    put("bzip2 member", write_zip(tmp_path / "bz.npz", m, zipfile.ZIP_BZIP2), "compression method")
    put("encrypted", _flag_encrypted(write_zip(tmp_path / "enc.npz", m)), "encrypted")
    put("stored 10^12 bytes", _claim_size(write_zip(tmp_path / "big.npz", m), "params.npy", 0xFFFFFFF0),
        "past the end of the file")
    put("deflated 4 GiB", _claim_size(write_zip(tmp_path / "bigz.npz", m, zipfile.ZIP_DEFLATED),
                                      "params.npy", 0xFFFFFFF0), "params")
    put("too many members", write_zip(tmp_path / "many.npz", m + [(f"x{i}.npy", npy_of(np.zeros(1)))
                                                                  for i in range(70)]), "zip members")
    put("no meta", write_zip(tmp_path / "nometa.npz", m[1:]), "no 'meta' entry")
    put("no params", write_zip(tmp_path / "noparams.npz", m[:1]), "no 'params' entry")
    put("meta a float", write_zip(tmp_path / "mf.npz", [("meta.npy", npy_of(np.zeros(3)))] + m[1:]), "not text")
    put("meta an array of text", write_zip(tmp_path / "ma.npz", [("meta.npy", npy_of(np.array(["{}", "{}"])))]
                                           + m[1:]), "not text")
    # a corrupt deflate stream: compress, then flip bytes inside the params member's data
    z = write_zip(tmp_path / "flip.npz", m, zipfile.ZIP_DEFLATED)
    b = bytearray(z.read_bytes())
    with zipfile.ZipFile(z) as zz:
        info = zz.getinfo("params.npy")
    start = info.header_offset + 30 + len("params.npy") + info.compress_size // 2   # inside the data
    for k in range(start, start + 20):
        b[k] ^= 0x5A
    z.write_bytes(bytes(b))
    put("corrupt deflate", z, "member 'params' is damaged")
    return cases


ARCHIVE_KINDS = ["empty", "junk", "pickle", "npy", "zip magic then junk", "cut in half", "not npy member",
                 "duplicate member", "folder member", "bzip2 member", "encrypted", "stored 10^12 bytes",
                 "deflated 4 GiB", "too many members", "no meta", "no params", "meta a float",
                 "meta an array of text", "corrupt deflate"]


@pytest.mark.parametrize("kind", ARCHIVE_KINDS)
def test_every_damaged_archive_is_a_checkpoint_error(tmp_path, small_model, good, kind):
    path, words = _archive_cases(tmp_path, small_model, good)[kind]
    loaders = (VAE.load,) if kind == "no params" else (VAE.load, checkpoint.load)
    for load in loaders:
        with Peak() as peak, pytest.raises(CheckpointError, match=words) as e:
            load(path)
        one_line(e.value, path)
        assert peak.bytes < 4 << 20


META_CASES = {
    "not json": ("{oops", "not valid JSON"),
    "deep json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "deep but parseable": ('{"a": ' * 40 + "1" + "}" * 40, "nested more than"),
    "NaN token": ('{"format": "minivae-checkpoint", "version": 1, "x": NaN}', "NaN"),
    "Infinity token": ('{"format": "minivae-checkpoint", "version": 1, "x": -Infinity}', "Infinity"),
    "overflowing float": ('{"format": "minivae-checkpoint", "version": 1, "x": 1e999}', "out of range"),
    "huge int": ('{"format": "minivae-checkpoint", "version": 1, "x": 1' + "0" * 5000 + "}", "digits"),
    "duplicate keys": ('{"format": "minivae-checkpoint", "format": "minivae-checkpoint", "version": 1}',
                       "duplicate key"),
    "a list": ('["format", "minivae-checkpoint"]', "a JSON list, not an object"),
    "a string": ('"minivae-checkpoint"', "a JSON str, not an object"),
    "no format": ('{"version": 1}', "format None"),
    "version 99": ('{"format": "minivae-checkpoint", "version": 99}', "version 99"),
    "version as text": ('{"format": "minivae-checkpoint", "version": "1"}', "version '1'"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_odd_meta_json_is_a_checkpoint_error(tmp_path, small_model, case):
    text, words = META_CASES[case]
    path = write_zip(tmp_path / "m.npz", members_of(small_model, meta=text))
    for load in (VAE.load, checkpoint.load):
        with pytest.raises(CheckpointError, match=words) as e:
            load(path)
        one_line(e.value, path)


def _config(small_model, **change):
    c = small_model.config()
    c.update(change)
    return c


CONFIG_CASES = {
    "not a dict": ([6, 2], "not a JSON object"),
    "x_dim a list": ({"x_dim": [6]}, "x_dim must be an integer"),
    "x_dim a float": ({"x_dim": 6.0}, "x_dim must be an integer"),
    "x_dim a bool": ({"x_dim": True}, "x_dim must be an integer"),
    "x_dim zero": ({"x_dim": 0}, "x_dim must be an integer"),
    "z_dim negative": ({"z_dim": -2}, "z_dim must be an integer"),
    "huge width": ({"hidden": [10 ** 15]}, "hidden width must be an integer"),
    "huge model": ({"hidden": [1 << 24] * 4}, "parameters, more than"),
    "hidden a number": ({"hidden": 3}, "hidden must be a list"),
    "hidden a string": ({"hidden": "3"}, "hidden must be a list"),
    "too many layers": ({"hidden": [3] * 100}, "at most 64"),
    "hidden of strings": ({"hidden": ["3"]}, "hidden width must be an integer"),
    "dec_hidden null": ({"dec_hidden": None}, "dec_hidden must be a list"),
    "unknown activation": ({"activation": "swish"}, "activation"),
    "activation a list": ({"activation": ["relu"]}, "activation must be a string"),
    "unknown likelihood": ({"likelihood": "poisson"}, "likelihood"),
    "dtype float16": ({"dtype": "float16"}, "dtype must be one of"),
    "dtype a dict": ({"dtype": {"a": 1}}, "dtype must be a string"),
    "seed negative": ({"seed": -1}, "seed must be"),
    "seed a float": ({"seed": 1.5}, "seed must be"),
    "backend a list": ({"backend": ["numpy"]}, "backend must be a string"),
    "unknown backend": ({"backend": "tpu"}, "backend"),
    "var_floor a string": ({"var_floor": "small"}, "var_floor must be a number"),
    "var_floor negative": ({"var_floor": -1.0}, "var_floor"),
    "missing keys": (None, "incomplete"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_odd_configs_are_refused_before_the_model_is_built(tmp_path, small_model, case):
    change, words = CONFIG_CASES[case]
    if change is None:
        config = {"x_dim": 6}
    elif isinstance(change, dict):
        config = _config(small_model, **change)
    else:
        config = change
    path = write_zip(tmp_path / "c.npz", members_of(small_model, meta=meta_text(small_model, config=config)))
    with Peak() as peak, pytest.raises(CheckpointError, match=words) as e:
        VAE.load(path)
    one_line(e.value, path)
    assert peak.bytes < 4 << 20


def test_a_huge_config_with_a_matching_header_is_refused_before_anything_is_allocated(tmp_path, small_model):
    """hidden = (1<<20,) for x_dim 6 is 27 M parameters: allowed, but its params header must
    match the config before anything is read; a header claiming them over 64 bytes is refused."""
    config = _config(small_model, hidden=[1 << 20], dec_hidden=[1 << 20])
    size = (6 + 1) * (1 << 20) + ((1 << 20) + 1) * 4 + (2 + 1) * (1 << 20) + ((1 << 20) + 1) * 6
    members = [("meta.npy", npy_of(np.array(meta_text(small_model, config=config)))),
               ("params.npy", npy_bytes(_header(shape=f"({size},)"), bytes(64)))]
    path = write_zip(tmp_path / "h.npz", members)
    with Peak() as peak, pytest.raises(CheckpointError, match="params") as e:
        VAE.load(path)
    one_line(e.value, path)
    assert peak.bytes < 1 << 20


def test_a_deflate_bomb_matching_the_config_is_refused_before_it_is_inflated(tmp_path, small_model):
    """A config of 6 M parameters whose params member is 48 MB of zeros deflated to ~50 kB: the
    header matches the config, but no array minivae writes inflates 64 times."""
    config = _config(small_model, hidden=[1 << 19], dec_hidden=[3])
    size = 7 * (1 << 19) + ((1 << 19) + 1) * 4 + 3 * 3 + 4 * 6
    head = npy_bytes(_header(shape=f"({size},)"))
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("meta.npy", npy_of(np.array(meta_text(small_model, config=config))))
        with z.open("params.npy", "w", force_zip64=True) as f:
            f.write(head)
            block = bytes(1 << 20)
            for i in range(0, 8 * size, len(block)):
                f.write(block[:min(len(block), 8 * size - i)])
    assert path.stat().st_size < 1 << 20
    with Peak() as peak, pytest.raises(CheckpointError, match="would inflate") as e:
        VAE.load(path)
    one_line(e.value, path)
    assert peak.bytes < 4 << 20


def test_parameters_must_be_finite(tmp_path, small_model):
    p = small_model.params.copy()
    p[3] = np.nan
    path = write_zip(tmp_path / "nan.npz", members_of(small_model, params=p))
    with pytest.raises(CheckpointError, match="NaN or inf"):
        VAE.load(path)


def test_unknown_members_are_skipped_unread_by_the_model(tmp_path, small_model):
    """A member the model does not need has its header checked but its data never read."""
    members = members_of(small_model) + [("junk.npy", npy_of(np.arange(1000.0)))]
    path = write_zip(tmp_path / "u.npz", members)
    raw = bytearray(path.read_bytes())
    i = raw.rfind(npy_of(np.arange(1000.0))[-800:])
    raw[i:i + 100] = bytes(100)                              # damage its data: a CRC mismatch
    path.write_bytes(bytes(raw))
    m = VAE.load(path)
    assert np.array_equal(m.params, small_model.params)
    with pytest.raises(CheckpointError, match="member 'junk' is damaged"):   # the generic reader reads it
        checkpoint.load(path)


def test_big_endian_and_fortran_members_are_read_as_numpy_writes_them(tmp_path, small_model):
    members = [("meta.npy", npy_of(np.array(meta_text(small_model)))),
               ("params.npy", npy_of(small_model.params.astype(">f8")))]
    m = VAE.load(write_zip(tmp_path / "be.npz", members))
    assert np.array_equal(m.params, small_model.params) and m.params.dtype.isnative
    a = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    path = write_zip(tmp_path / "f.npz", [("meta.npy", npy_of(np.array(meta_text(small_model)))),
                                          ("a.npy", npy_of(a))])
    _, arrays = checkpoint.load(path)
    assert np.array_equal(arrays["a"], a)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 3000), flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 255)),
                                                  max_size=3), deflate=st.booleans())
def test_any_damage_to_a_checkpoint_is_a_checkpoint_error_or_a_clean_load(tmp_path, small_model, cut,
                                                                          flips, deflate):
    base = tmp_path / "base.npz"
    write_zip(base, members_of(small_model), zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    content = bytearray(base.read_bytes())
    for pos, mask in flips:
        content[pos % len(content)] ^= mask
    content = bytes(content[:len(content) - cut % (len(content) + 1)])
    path = tmp_path / "h.npz"
    path.write_bytes(content)
    for load in (VAE.load, checkpoint.load):
        try:
            load(path)
        except CheckpointError as e:
            one_line(e, path)


def test_the_cli_reports_a_crafted_checkpoint_in_one_line(tmp_path, capsys, small_model):
    path = write_zip(tmp_path / "deep.npz", members_of(small_model, meta="[" * 50_000 + "]" * 50_000))
    for command in (["evaluate", path], ["sample", path, "--out", tmp_path / "s.png"]):
        code = main([str(a) for a in command])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith(f"minivae: error: {path}: ") and err.count("\n") == 1, err


# ==============================================================================================
# The resumable training state
# ==============================================================================================

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch digits run (tiny model), its checkpoint as (meta, arrays), and its train rows n."""
    root = tmp_path_factory.mktemp("resume")
    cfg = TrainConfig(dataset="digits", epochs=1, batch_size=256, z_dim=2, hidden=(8,), quiet=True,
                      plots=False, out=str(root / "run"), dtype="float64")
    train(cfg)
    meta, arrays = checkpoint.load(root / "run" / "model.npz")
    n = len(data_mod.load_dataset("digits", val_fraction=cfg.val_fraction, seed=cfg.seed).x_train)
    return meta, arrays, n


def _resumable(tmp_path, finished_run, mutate=None, mid_epoch=True):
    """A copy of the finished run's checkpoint, made mid-epoch (step 2 of epoch 2) unless told
    otherwise, then changed by ``mutate(state, arrays, meta)``; returns the run folder."""
    meta, arrays, n = finished_run
    meta = json.loads(json.dumps(meta))
    arrays = {k: v.copy() for k, v in arrays.items()}
    state = meta["train"]
    if mid_epoch:
        state["step"] = 2
        state["partial"] = {"step": 2, "loss_sum": 100.0, "seen": 512, "train_time_s": 0.5}
        arrays["train.perm"] = np.random.default_rng(0).permutation(n)
    if mutate is not None:
        mutate(state, arrays, meta)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    checkpoint.save(run / "model.npz", {k: v for k, v in meta.items() if k not in ("format", "version")}, arrays)
    return run


def _set(path, value):
    """A mutation setting ``state[path...] = value`` (path: keys into meta["train"])."""
    def mutate(state, arrays, meta):
        d = state
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return mutate


def _array(name, value):
    def mutate(state, arrays, meta):
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value(arrays[name]) if callable(value) else value
    return mutate


def test_the_crafted_resumable_state_is_valid(tmp_path, finished_run):
    """The control case: the mid-epoch state the mutations start from resumes."""
    run = _resumable(tmp_path, finished_run)
    r = Run(resume_config(run, {}), SerialComm())
    assert r.epoch == 1 and r.partial["step"] == 2
    r.close()                                   # let go of the run folder's lock
    r = Run(resume_config(_resumable(tmp_path, finished_run, mid_epoch=False), {}), SerialComm())
    assert r.epoch == 1 and r.partial is None
    r.close()


RESUME_CASES = {
    # data-dependent (Run._restore)
    "perm too short": (_array("train.perm", lambda p: p[:-1]), "permutation"),
    "perm out of range": (_array("train.perm", lambda p: p + 1), "not a permutation"),
    "perm repeats": (_array("train.perm", lambda p: np.where(p == 0, 1, p)), "not a permutation"),
    "perm negative": (_array("train.perm", lambda p: p - 1), "not a permutation"),
    "step past the epoch": (lambda s, a, m: (s.update(step=99), s["partial"].update(step=99)), "step 99"),
    "seen past the data": (_set(("partial", "seen"), 10 ** 6), "examples seen"),
    # read_run
    "perm of floats": (_array("train.perm", lambda p: p.astype(float)), "train.perm"),
    "perm 2-D": (_array("train.perm", lambda p: p[None]), "train.perm"),
    "perm missing": (_array("train.perm", None), "train.perm"),
    "perm without partial": (_set(("partial",), None), "permutation without"),
    "partial a list": (_set(("partial",), [1, 2]), "partial state"),
    "partial step not saved step": (_set(("partial", "step"), 3), "not the saved step"),
    "loss_sum text": (_set(("partial", "loss_sum"), "x"), "partial state"),
    "opt.m short": (_array("opt.m", lambda a: a[:-1]), "opt.m"),
    "opt.m float32": (_array("opt.m", lambda a: a.astype(np.float32)), "opt.m"),
    "opt.v missing": (_array("opt.v", None), "opt.v"),
    "opt.v negative": (_array("opt.v", lambda a: a - 1.0), "negative"),
    "opt.m NaN": (_array("opt.m", lambda a: np.full_like(a, np.nan)), "NaN"),
    "opt.t negative": (_array("opt.t", np.array(-5, dtype=np.int64)), "step count"),
    "opt.t a vector": (_array("opt.t", np.array([1, 2], dtype=np.int64)), "opt.t"),
    "opt.t a float": (_array("opt.t", np.array(1.0)), "opt.t"),
    "params short": (_array("params", lambda a: a[:-1]), "params"),
    "rng not a dict": (_set(("rng",), [1, 2]), "PCG64"),
    "rng another generator": (_set(("rng", "bit_generator"), "MT19937"), "PCG64"),
    "rng negative state": (_set(("rng", "state", "state"), -1), "PCG64"),
    "rng huge state": (_set(("rng", "state", "state"), 1 << 200), "PCG64"),
    "rng float state": (_set(("rng", "state", "inc"), 1.5), "PCG64"),
    "rng has_uint32 5": (_set(("rng", "has_uint32"), 5), "PCG64"),
    "rng missing key": (lambda s, a, m: s["rng"]["state"].pop("inc"), "PCG64"),
    "epoch negative": (_set(("epoch",), -1), "epoch must be a count"),
    "epoch a float": (_set(("epoch",), 1.0), "epoch must be a count"),
    "epoch text": (_set(("epoch",), "1"), "epoch must be a count"),
    "epoch huge": (_set(("epoch",), 10 ** 30), "epoch must be a count"),
    "step a list": (_set(("step",), [2]), "step must be a count"),
    "metrics not a list": (_set(("metrics",), {"a": 1}), "metrics"),
    "metrics too short": (_set(("metrics",), []), "metrics"),
    "metrics row odd": (lambda s, a, m: s["metrics"][0].update(train_loss="low"), "metrics row 1"),
    "no training state": (lambda s, a, m: m.pop("train"), "without training state"),
    "train not a dict": (lambda s, a, m: m.update(train=[1]), "without training state"),
    "train config a list": (_set(("config",), [1]), "training config"),
    "unknown train field": (_set(("config", "colour"), "red"), "unknown fields"),
    "epochs text": (_set(("config", "epochs"), "ten"), "epochs"),
    "hidden a float": (_set(("config", "hidden"), 5.5), "training config"),
    "batch size huge": (_set(("config", "batch_size"), 10 ** 20), "batch_size"),
    "quiet text": (_set(("config", "quiet"), "yes"), "quiet"),
    "data_dir a number": (_set(("config", "data_dir"), 5), "data_dir"),
    "optimizer unknown": (_set(("config", "optimizer"), "lion"), "optimizer"),
    "configs disagree": (_set(("config", "z_dim"), 3), "does not match"),
    "model config huge": (lambda s, a, m: m["config"].update(hidden=[1 << 24] * 8), "parameters, more than"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_a_bad_resumable_state_is_a_checkpoint_error_before_it_is_used(tmp_path, finished_run, case):
    mutate, words = RESUME_CASES[case]
    run = _resumable(tmp_path, finished_run, mutate)
    path = run / "model.npz"
    with pytest.raises(CheckpointError, match=words) as e:
        Run(TrainConfig(resume=str(run)), SerialComm())
    one_line(e.value, path)


def test_the_cli_reports_a_bad_resumable_state_in_one_line(tmp_path, capsys, finished_run):
    run = _resumable(tmp_path, finished_run, _array("train.perm", lambda p: p[::-1] * 0))
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("minivae: error: ") and err.count("\n") == 1, err
    assert "model.npz" in err and "permutation" in err


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 5000), flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 255)),
                                                  min_size=1, max_size=3))
def test_any_damage_to_a_training_checkpoint_is_a_checkpoint_error_or_a_clean_read(
        tmp_path, finished_run, cut, flips):
    run = _resumable(tmp_path, finished_run)
    path = run / "model.npz"
    content = bytearray(path.read_bytes())
    for pos, mask in flips:
        content[pos % len(content)] ^= mask
    path.write_bytes(bytes(content[:len(content) - cut % (len(content) + 1)]))
    try:
        read_run(run)
    except CheckpointError as e:
        one_line(e, path)


# ==============================================================================================
# Download: a server that streams without end, or announces the wrong size
# ==============================================================================================

class _Streaming(http.server.BaseHTTPRequestHandler):
    mode = "forever"
    seconds = 20.0                     # the server gives up by itself: a test can never hang on it

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        if self.mode == "liar":
            self.send_header("Content-Length", str(10 ** 12))
        elif self.mode == "garbled":
            self.send_header("Content-Length", "lots")
        self.end_headers()
        deadline = time.monotonic() + self.seconds
        block = b"\x1f\x8b" + bytes(1 << 16)
        try:
            while time.monotonic() < deadline:
                self.wfile.write(block)
        except OSError:               # the client hung up, as it should
            pass


@pytest.fixture
def streaming_server():
    """A 127.0.0.1 server whose every file is an endless stream (or a lying Content-Length)."""
    handler = type("S", (_Streaming,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def published(monkeypatch):
    """A checksum table for mnist whose files have a known size of 100 000 bytes."""
    sums = {stem: {"size": 100_000, "gz": "0" * 64, "idx": None} for stem in data_mod.FILES.values()}
    monkeypatch.setitem(data_mod.CHECKSUMS, "mnist", sums)
    return sums


@pytest.mark.parametrize("mode, words", [("forever", "more than the 100000 bytes"),
                                         ("liar", "announces 1000000000000 bytes"),
                                         ("garbled", "malformed Content-Length")])
def test_download_stops_at_the_published_size_and_keeps_nothing(tmp_path, streaming_server, published,
                                                                mode, words):
    base, handler = streaming_server
    handler.mode = mode
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match=words) as e:
        data_mod.download("mnist", data_dir=dest, base_url=base, quiet=True, timeout=10)
    assert "\n" not in str(e.value) and "train-images-idx3-ubyte.gz" in str(e.value)
    assert list(dest.iterdir()) == []                 # no partial file, no temporary


def test_download_without_a_known_size_stops_at_the_generic_ceiling(tmp_path, streaming_server, published,
                                                                    monkeypatch):
    base, handler = streaming_server
    for d in published.values():
        del d["size"]
    monkeypatch.setattr(data_mod, "MAX_DOWNLOAD_BYTES", 300_000)
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="more than the 300000 bytes"):
        data_mod.download("mnist", data_dir=dest, base_url=base, quiet=True, timeout=10)
    assert list(dest.iterdir()) == []


def test_the_published_sizes_match_the_shared_t10k_files():
    shared = Path("/work/shared/data/mnist")
    if not shared.is_dir():
        pytest.skip("the shared MNIST t10k files are not available")
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        expected = data_mod.CHECKSUMS["mnist"][stem]
        assert (shared / (stem + ".gz")).stat().st_size == expected["size"]
        assert data_mod.verify_file(shared / (stem + ".gz"), expected)
    for name in data_mod.IDX_DATASETS:
        assert all(isinstance(d["size"], int) and d["size"] > 0 for d in data_mod.CHECKSUMS[name].values())


def test_the_content_digest_does_not_inflate_without_bound(monkeypatch):
    """Hashing a gzip bomb's content stops at MAX_IDX_BYTES (such content cannot be the file)."""
    monkeypatch.setattr(data_mod, "MAX_IDX_BYTES", 1 << 20)
    d = data_mod._Digests()
    with Peak() as peak:
        d.update(gz_stream(b"", 8 << 20))
    assert not d.idx_ok and peak.bytes < 4 << 20


# ==============================================================================================
# The CLI's use of a model checkpoint's meta (evaluate, sample, plot)
# ==============================================================================================

@pytest.mark.parametrize("case, extra, command", [
    ("train config a list", {"train": {"config": [1]}, "dataset": "digits"}, "evaluate"),
    ("data_dir a list", {"train": {"config": {"data_dir": [1], "dataset": "mnist"}}, "dataset": "mnist"},
     "evaluate"),
    ("image_shape of dicts", {"image_shape": [{"a": 1}, 2]}, "sample"),
    ("metrics of numbers", {"train": {"metrics": [1, 2]}}, "plot"),
    ("metrics a string", {"train": {"metrics": "abc"}}, "plot"),
])
def test_odd_meta_fields_give_one_line_errors_in_the_cli(tmp_path, capsys, case, extra, command):
    path = tmp_path / "m.npz"
    VAE(64, 2, hidden=(4,)).save(path, extra_meta=extra)
    args = {"evaluate": [], "sample": ["--out", tmp_path / "s.png"],
            "plot": ["--kind", "curves", "--out", tmp_path / "c.png"]}[command]
    code = main([command, str(path), *map(str, args)])
    err = capsys.readouterr().err
    assert code in (0, 1) and "Traceback" not in err
    if code == 1:
        assert err.startswith("minivae: error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("step", [777, 1 << 16, None], ids=["small", "64k", "whole"])
def test_the_bounded_content_digest_is_the_digest_of_the_content(step):
    """Inflating in bounded pieces hashes exactly the content, whatever the chunks of the stream."""
    content = np.random.default_rng(5).integers(0, 3, 300_000, dtype=np.uint8).tobytes() + bytes(3 << 20)
    gz = gzip.compress(content, compresslevel=9, mtime=0)
    d = data_mod._Digests()
    step = step or len(gz)
    for i in range(0, len(gz), step):
        d.update(gz[i:i + step])
    assert d.idx_ok and d.matches({"gz": "0" * 64, "idx": hashlib.sha256(content).hexdigest()})


@pytest.mark.parametrize("content, words", [
    ("[1, 2]\n", "line 1 is not a JSON object"),
    ('{"epoch": 1, "train_loss": 1.0}\n{oops\n', "line 2 is not JSON"),
    ("[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply"),
    ('{"epoch": 1, "test_loss": 1.0, "epoch": 2}\n', "duplicate key"),
])
def test_a_bad_metrics_file_beside_a_model_is_a_one_line_error(tmp_path, capsys, content, words):
    VAE(64, 2, hidden=(4,)).save(tmp_path / "model.npz", extra_meta={"dataset": "digits"})
    (tmp_path / "metrics.jsonl").write_text(content)
    code = main(["plot", str(tmp_path / "model.npz"), "--kind", "curves", "--out", str(tmp_path / "c.png")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("minivae: error: ") and err.count("\n") == 1, err
    assert "metrics.jsonl" in err and words in err
