"""Datasets: IDX reading and validation, folder resolution, the digits and MNIST loaders, the
validation split, binarization, and the download against a local HTTP server."""
from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from minivae import data
from minivae.data import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data/mnist")
SHARED_IMAGES = SHARED / "t10k-images-idx3-ubyte.gz"
SHARED_LABELS = SHARED / "t10k-labels-idx1-ubyte.gz"
needs_shared = pytest.mark.skipif(not (SHARED_IMAGES.is_file() and SHARED_LABELS.is_file()),
                                  reason="the shared MNIST t10k files are not available")


def synthetic(n, h=4, w=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, h, w), dtype=np.uint8),
            rng.integers(0, 10, size=n, dtype=np.uint8))


def write_set(folder, n_train=30, n_test=10, gz=True, h=4, w=3):
    """The four canonical files with small synthetic content; returns the arrays written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    xtr, ytr = synthetic(n_train, h, w, seed=1)
    xte, yte = synthetic(n_test, h, w, seed=2)
    data.write_idx(folder / f"train-images-idx3-ubyte{sfx}", xtr)
    data.write_idx(folder / f"train-labels-idx1-ubyte{sfx}", ytr)
    data.write_idx(folder / f"t10k-images-idx3-ubyte{sfx}", xte)
    data.write_idx(folder / f"t10k-labels-idx1-ubyte{sfx}", yte)
    return xtr, ytr, xte, yte


@pytest.fixture(autouse=True)
def _no_user_data(monkeypatch, tmp_path):
    """Never look at the real user cache or environment."""
    monkeypatch.delenv("MINIVAE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------
# IDX files
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_idx_round_trip(tmp_path, suffix, dtype):
    a = (np.arange(30) * (1 if dtype == "u1" else -1)).astype(dtype).reshape(2, 3, 5)
    path = data.write_idx(tmp_path / f"a.idx{suffix}", a)
    b = data.read_idx(path)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    assert b.flags.writeable and b.dtype.isnative


def test_idx_header_layout(tmp_path):
    """The bytes follow the IDX spec: 0, 0, type 0x08, ndim, big-endian dims, then row-major data."""
    a = np.array([[[1, 2, 3], [4, 5, 6]]], dtype=np.uint8)           # (1, 2, 3)
    raw = data.write_idx(tmp_path / "x-idx3-ubyte", a).read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == (1).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert raw[16:] == bytes([1, 2, 3, 4, 5, 6])
    gz = data.write_idx(tmp_path / "x-idx3-ubyte.gz", a).read_bytes()
    assert gzip.decompress(gz) == raw


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="IDX stores"):
        data.write_idx(tmp_path / "a", np.zeros(3, dtype=np.uint16))


def _corrupt(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    return p


def _valid_bytes(n=5):
    return bytes([0, 0, 8, 1]) + n.to_bytes(4, "big") + bytes(range(n))


@pytest.mark.parametrize("case, content, message", [
    ("wrong-magic", b"\x12\x34\x08\x01" + (5).to_bytes(4, "big") + bytes(5), "bad magic number"),
    ("bad-type", b"\x00\x00\x07\x01" + (5).to_bytes(4, "big") + bytes(5), "bad magic number"),
    ("zero-dims", b"\x00\x00\x08\x00", "zero dimensions"),
    ("tiny", b"\x00\x00", "no header"),
    ("short-header", b"\x00\x00\x08\x03" + (5).to_bytes(4, "big"), "truncated IDX header"),
    ("truncated", _valid_bytes()[:-2], "truncated"),
    ("trailing", _valid_bytes() + b"\x00\x00\x00", "3 trailing bytes"),
])
def test_idx_validation_names_the_file(tmp_path, case, content, message):
    p = _corrupt(tmp_path, f"{case}-idx1-ubyte", content)
    with pytest.raises(DataError, match=message) as e:
        data.read_idx(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    # the same content gzipped fails the same way
    pg = _corrupt(tmp_path, f"{case}-idx1-ubyte.gz", gzip.compress(content))
    with pytest.raises(DataError, match=message) as e:
        data.read_idx(pg)
    assert str(pg) in str(e.value)


def test_valid_bytes_are_read(tmp_path):
    assert list(data.read_idx(_corrupt(tmp_path, "ok", _valid_bytes()))) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("content", [
    b"\x1f\x8b\x08\x00garbage that is not deflate data",
    gzip.compress(_valid_bytes(200), mtime=0)[:-12],        # cut inside the stream
    b"plainly not gzip at all",                             # named .gz but not gzip
], ids=["not-deflate", "truncated", "not-gzip"])   # fixed ids: both xdist workers must collect the same tests
def test_corrupt_gzip_names_the_file(tmp_path, content):
    p = _corrupt(tmp_path, "x-idx1-ubyte.gz", content)
    with pytest.raises(DataError, match="corrupt gzip") as e:
        data.read_idx(p)
    assert str(p) in str(e.value)


def test_missing_idx_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as e:
        data.read_idx(tmp_path / "nope.gz")
    assert "nope.gz" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

def test_resolve_data_dir_order(tmp_path, monkeypatch):
    assert data.resolve_data_dir("mnist", tmp_path / "given") == tmp_path / "given"
    assert data.resolve_data_dir("mnist") == tmp_path / "cache" / "minivae" / "mnist"
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("MINIVAE_DATA", str(root))
    assert data.resolve_data_dir("mnist") == root                       # no mnist/ inside: the root
    (root / "mnist").mkdir()
    assert data.resolve_data_dir("mnist") == root / "mnist"
    assert data.resolve_data_dir("fashion-mnist") == root
    assert data.resolve_data_dir("mnist", tmp_path / "given") == tmp_path / "given"
    with pytest.raises(ValueError, match="unknown dataset"):
        data.resolve_data_dir("cifar")


def test_missing_folder(tmp_path):
    folder = tmp_path / "absent"
    with pytest.raises(DataError) as e:
        data.load_dataset("mnist", data_dir=folder)
    msg = str(e.value)
    assert str(folder) in msg and "minivae download mnist" in msg and "train-images-idx3-ubyte" in msg
    assert "\n" not in msg


def test_missing_folder_default_cache(tmp_path):
    with pytest.raises(DataError, match="minivae download fashion-mnist") as e:
        data.load_dataset("fashion-mnist")
    assert str(tmp_path / "cache" / "minivae" / "fashion-mnist") in str(e.value)


def test_missing_file(tmp_path):
    write_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing") as e:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(e.value)


def test_mismatched_label_count(tmp_path):
    write_set(tmp_path)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(29, dtype=np.uint8))
    with pytest.raises(DataError, match="29 labels, but") as e:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(e.value)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(e.value)


def test_labels_out_of_range(tmp_path):
    write_set(tmp_path, n_test=10)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"labels must be 0\.\.9") as e:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)


def test_swapped_files_are_refused(tmp_path):
    xtr, ytr, _, _ = write_set(tmp_path)
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", ytr)        # labels where images go
    with pytest.raises(DataError, match="expected an image file") as e:
        data.load_dataset("mnist", data_dir=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    data.write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr)
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", xtr)        # images where labels go
    with pytest.raises(DataError, match="expected a label file"):
        data.load_dataset("mnist", data_dir=tmp_path)


def test_train_and_test_shapes_must_agree(tmp_path):
    write_set(tmp_path)
    xte, _ = synthetic(10, 5, 3)
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", xte)
    with pytest.raises(DataError, match="images are"):
        data.load_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_load_synthetic_folder(tmp_path, gz):
    xtr, ytr, xte, yte = write_set(tmp_path, gz=gz)
    ds = data.load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=0.2, seed=3)
    assert ds.image_shape == (4, 3) and ds.x_dim == 12
    assert ds.x_train.shape == (24, 12) and ds.x_val.shape == (6, 12) and ds.x_test.shape == (10, 12)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    for a in (ds.x_train, ds.x_val, ds.x_test, ds.y_train):
        assert a.flags.c_contiguous
    np.testing.assert_allclose(ds.x_test, xte.reshape(10, 12) / 255.0, rtol=1e-6)
    assert np.array_equal(ds.y_test, yte)
    # train + val is a partition of the file's train rows, each part in file order
    rows = {r.tobytes(): i for i, r in enumerate((xtr.reshape(30, 12) / 255.0).astype(np.float32))}
    idx_train = [rows[r.tobytes()] for r in ds.x_train]
    idx_val = [rows[r.tobytes()] for r in ds.x_val]
    assert sorted(idx_train + idx_val) == list(range(30))
    assert idx_train == sorted(idx_train) and idx_val == sorted(idx_val)
    assert np.array_equal(ds.y_val, ytr[idx_val])


def test_mnist_from_environment(tmp_path, monkeypatch):
    write_set(tmp_path / "root" / "mnist")
    monkeypatch.setenv("MINIVAE_DATA", str(tmp_path / "root"))
    ds = data.load_dataset("mnist")
    assert ds.source == str(tmp_path / "root" / "mnist") and len(ds.x_test) == 10


@needs_shared
def test_load_real_mnist_t10k(tmp_path):
    """train-* from the first 8000 real t10k examples, t10k-* the shared files' last 2000."""
    images, labels = data.read_idx(SHARED_IMAGES), data.read_idx(SHARED_LABELS)
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    data.write_idx(tmp_path / "train-images-idx3-ubyte", images[:8000])          # raw works too
    data.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:8000])
    data.write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[8000:])
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[8000:])
    ds = data.load_dataset("mnist", data_dir=tmp_path, val_fraction=0.1, seed=0)
    assert ds.image_shape == (28, 28) and ds.x_dim == 784
    assert ds.x_train.shape == (7200, 784) and ds.x_val.shape == (800, 784)
    assert ds.x_test.shape == (2000, 784)
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    np.testing.assert_array_equal(ds.x_test, images[8000:].reshape(2000, 784).astype(np.float32) / 255)
    assert set(np.unique(ds.y_train)) == set(range(10))
    # a real digit has ink in the middle and none in the corners
    mean = ds.x_train.mean(axis=0).reshape(28, 28)
    assert mean[10:18, 10:18].mean() > 0.3 and mean[:3, :3].max() == 0.0


@needs_shared
def test_shared_files_match_the_published_content_digests():
    """The hard-coded MNIST t10k content digests identify the real files (re-gzipped or not)."""
    sums = dict(line.split()[::-1] for line in (SHARED / "SHA256SUMS").read_text().splitlines() if line)
    for path in (SHARED_IMAGES, SHARED_LABELS):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sums[path.name]
        expected = data.CHECKSUMS["mnist"][path.name[:-3]]
        assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == expected["idx"]
        assert data.verify_file(path, expected)
        assert not data.verify_file(path, {"gz": "0" * 64, "idx": None})


def test_digits_shapes_range_determinism():
    ds = data.load_dataset("digits")
    assert ds.name == "digits" and ds.image_shape == (8, 8) and ds.x_dim == 64
    n_total = len(ds.x_train) + len(ds.x_val) + len(ds.x_test)
    assert n_total == 1797
    assert len(ds.x_test) == 360                                       # 20 %, stratified
    assert len(ds.x_val) == round(0.1 * (1797 - 360))
    for x in (ds.x_train, ds.x_val, ds.x_test):
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape[1] == 64
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert ds.x_train.max() == 1.0
    assert np.allclose(ds.x_train * 16, np.round(ds.x_train * 16), atol=1e-5)   # grey levels /16
    counts = np.bincount(ds.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37                   # stratified: ~36 per class
    again = data.load_dataset("digits")
    for f in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert np.array_equal(getattr(ds, f), getattr(again, f))
    other = data.load_dataset("digits", seed=1)
    assert np.array_equal(other.x_test, ds.x_test)                      # the test split is fixed
    assert not np.array_equal(other.y_val, ds.y_val)                    # the val split is seeded
    assert "train=1293" in repr(ds)


def test_val_fraction_zero_and_bad_values():
    ds = data.load_dataset("digits", val_fraction=0, dtype="float64")
    assert ds.x_val.shape == (0, 64) and ds.y_val.shape == (0,) and ds.x_train.shape == (1437, 64)
    assert ds.x_train.dtype == np.float64
    for bad in (-0.1, 1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="val_fraction"):
            data.load_dataset("digits", val_fraction=bad)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match="dtype"):
        data.load_dataset("digits", dtype="float16")
    with pytest.raises(ValueError, match="seed"):
        data.load_dataset("digits", seed=-1)


def test_binarize_modes():
    grey = data.load_dataset("digits")
    static = data.load_dataset("digits", binarize="static")
    assert static.binarize == "static"
    for b, g in ((static.x_train, grey.x_train), (static.x_test, grey.x_test)):
        assert set(np.unique(b)) == {0.0, 1.0} and b.dtype == np.float32
        assert b[g == 0].max() == 0.0 and b[g == 1].min() == 1.0       # Bernoulli(0), Bernoulli(1)
        assert abs(b.mean() - g.mean()) < 0.01                          # E[b] = x
    assert np.array_equal(static.x_train, data.load_dataset("digits", binarize="static").x_train)
    # another seed, another draw (the digits test split itself does not depend on the seed)
    assert not np.array_equal(static.x_test, data.load_dataset("digits", binarize="static", seed=1).x_test)
    dynamic = data.load_dataset("digits", binarize="dynamic")
    assert dynamic.binarize == "dynamic" and np.array_equal(dynamic.x_train, grey.x_train)
    with pytest.raises(ValueError, match="binarize"):
        data.load_dataset("digits", binarize="yes")


def test_dynamic_binarize():
    rng = np.random.default_rng(0)
    x = np.tile(np.linspace(0, 1, 11, dtype=np.float32), (20000, 1))   # (20000, 11)
    b = data.dynamic_binarize(x, rng)
    assert b.dtype == np.float32 and b.shape == x.shape and set(np.unique(b)) <= {0.0, 1.0}
    # column j has p = j/10; the sample mean is within 5 standard errors
    p = x[0]
    se = np.sqrt(p * (1 - p) / len(x))
    assert np.all(np.abs(b.mean(axis=0) - p) <= 5 * se + 1e-12)
    assert not np.array_equal(b, data.dynamic_binarize(x, rng))         # fresh draws each call
    assert data.dynamic_binarize(x[:3].astype(np.float64), rng).dtype == np.float64


# ----------------------------------------------------------------------------------------------
# Download, against a local HTTP server
# ----------------------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list

    def log_message(self, *args):           # keep the test output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (a free port); yields (base_url, folder, requests)."""
    www = tmp_path / "www"
    www.mkdir()
    requests = []
    handler = type("H", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", www, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _publish(www, monkeypatch, name="mnist"):
    """Write a small synthetic set as .gz into www and make its digests the "published" ones."""
    arrays = write_set(www, gz=True)
    sums = {stem: {"gz": hashlib.sha256((www / (stem + ".gz")).read_bytes()).hexdigest(), "idx": None}
            for stem in data.FILES.values()}
    monkeypatch.setitem(data.CHECKSUMS, name, sums)
    return arrays, sums


def test_download_success_then_skip(server, tmp_path, monkeypatch, capsys):
    base, www, requests = server
    (xtr, ytr, xte, yte), _ = _publish(www, monkeypatch)
    dest = tmp_path / "dest"
    out = data.download("mnist", data_dir=dest, base_url=base, quiet=True)
    assert out == dest
    for stem in data.FILES.values():
        assert (dest / (stem + ".gz")).read_bytes() == (www / (stem + ".gz")).read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == sorted(s + ".gz" for s in data.FILES.values())
    assert len(requests) == 4 and capsys.readouterr().out == ""
    ds = data.load_dataset("mnist", data_dir=dest, val_fraction=0)
    assert np.array_equal(ds.y_train, ytr) and np.array_equal(ds.y_test, yte)
    # a second run finds good files and fetches nothing
    data.download("mnist", data_dir=dest, base_url=base.rstrip("/"), quiet=False)
    assert len(requests) == 4
    assert capsys.readouterr().out.count("checksum OK") == 4


def test_download_into_environment_folder(server, tmp_path, monkeypatch):
    base, www, _ = server
    _publish(www, monkeypatch, "fashion-mnist")
    monkeypatch.setenv("MINIVAE_DATA", str(tmp_path / "env"))
    out = data.download("fashion-mnist", base_url=base, quiet=True)
    assert out == tmp_path / "env" / "fashion-mnist"
    assert data.load_dataset("fashion-mnist").source == str(out)


def test_download_replaces_a_bad_local_file(server, tmp_path, monkeypatch):
    base, www, requests = server
    _publish(www, monkeypatch)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "t10k-labels-idx1-ubyte.gz").write_bytes(b"stale")
    data.download("mnist", data_dir=dest, base_url=base, quiet=True)
    assert (dest / "t10k-labels-idx1-ubyte.gz").read_bytes() == (www / "t10k-labels-idx1-ubyte.gz").read_bytes()


def test_download_accepts_regzipped_content(server, tmp_path, monkeypatch):
    """A mirror that re-gzips the same IDX bytes passes through the content digest."""
    base, www, _ = server
    _, sums = _publish(www, monkeypatch)
    stem = "train-labels-idx1-ubyte"
    content = gzip.decompress((www / (stem + ".gz")).read_bytes())
    sums[stem]["idx"] = hashlib.sha256(content).hexdigest()
    (www / (stem + ".gz")).write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
    assert hashlib.sha256((www / (stem + ".gz")).read_bytes()).hexdigest() != sums[stem]["gz"]
    data.download("mnist", data_dir=tmp_path / "dest", base_url=base, quiet=True)
    assert gzip.decompress((tmp_path / "dest" / (stem + ".gz")).read_bytes()) == content


def test_download_bad_checksum(server, tmp_path, monkeypatch):
    base, www, _ = server
    _, sums = _publish(www, monkeypatch)
    sums["t10k-images-idx3-ubyte"]["gz"] = "0" * 64
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="SHA-256 mismatch") as e:
        data.download("mnist", data_dir=dest, base_url=base, quiet=True)
    assert "t10k-images-idx3-ubyte.gz" in str(e.value)
    # the bad file and its temporary are gone; the files before it were kept
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_download_404(server, tmp_path, monkeypatch):
    base, www, _ = server
    _publish(www, monkeypatch)
    (www / "t10k-labels-idx1-ubyte.gz").unlink()
    dest = tmp_path / "dest"
    with pytest.raises(DataError, match="HTTP 404") as e:
        data.download("mnist", data_dir=dest, base_url=base, quiet=True)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and str(dest) in msg and "\n" not in msg
    assert not any(p.name.startswith(".tmp") for p in dest.iterdir())


def test_download_offline(tmp_path, monkeypatch):
    """Connection refused: a port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        data.download("mnist", data_dir=dest, base_url=f"http://127.0.0.1:{port}", quiet=True, timeout=5)
    msg = str(e.value)
    assert "could not download train-images-idx3-ubyte.gz" in msg
    assert "Offline?" in msg and str(dest) in msg and "\n" not in msg
    assert list(dest.iterdir()) == []


def test_download_refuses_digits(tmp_path):
    with pytest.raises(DataError, match="nothing to download"):
        data.download("digits", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.download("svhn", data_dir=tmp_path)


def test_checksum_table_is_complete():
    for name in data.IDX_DATASETS:
        assert set(data.CHECKSUMS[name]) == set(data.FILES.values())
        for d in data.CHECKSUMS[name].values():
            assert len(d["gz"]) == 64 and int(d["gz"], 16) >= 0
        assert all(m.startswith("http") for m in data.MIRRORS[name])
    assert os.path.basename(data.MIRRORS["mnist"][0].rstrip("/")) == "mnist"
