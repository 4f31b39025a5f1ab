"""Plots: every function writes a readable PNG of the expected size, images keep their orientation,
the manifold grid and the interpolation decode what they claim to, PCA for Z > 2."""
from __future__ import annotations

import struct

import matplotlib.image as mpimg
import numpy as np
import pytest

from minivae import VAE, plots
from minivae import distributions as dist
from minivae.data import load_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", val_fraction=0.1)


@pytest.fixture(scope="module")
def model2():
    return VAE(64, 2, hidden=(16,), seed=0)


def read_png(path):
    """Check the signature and the IHDR size, read it back with matplotlib: (height, width, 4)."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    img = mpimg.imread(path)
    assert img.shape[:2] == (height, width)
    assert img[..., :3].std() > 0.01                        # not a blank canvas
    return img


def test_image_grid_places_and_orients():
    """Image i goes to tile (i // ncols, i % ncols), its pixel (r, c) at offset (r, c) in the tile."""
    h, w = 2, 3
    images = np.arange(5 * h * w, dtype=float).reshape(5, h, w) / 100
    grid = plots.image_grid(images, ncols=2, pad=1, pad_value=-1)
    assert grid.shape == (3 * (h + 1) - 1, 2 * (w + 1) - 1)
    for i in range(5):
        tr, tc = divmod(i, 2)
        np.testing.assert_array_equal(grid[tr * 3: tr * 3 + h, tc * 4: tc * 4 + w], images[i])
    assert np.all(grid[h, :] == -1) and np.all(grid[:, w] == -1)       # the separating lines
    assert np.all(grid[6:, 4:] == -1)                                  # the empty sixth tile


def test_png_orientation(tmp_path):
    """A flat row-major image with a white bar along the top left comes out that way: not flipped
    (the bar is at the top left) and not transposed (the bar is wider than tall)."""
    img = np.zeros((8, 8))
    img[:2, :6] = 1.0
    path = plots.save_samples(tmp_path / "one.png", img.ravel(), (8, 8), title="")
    rgb = read_png(path)[..., :3]
    black = np.all(rgb < 0.01, axis=2)                                 # the image area (and spines)
    rows, cols = np.flatnonzero(black.any(axis=1)), np.flatnonzero(black.any(axis=0))
    box = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    white = np.argwhere(np.all(box > 0.99, axis=2))
    H, W = box.shape[:2]
    assert len(white) > 0.15 * H * W                                   # 12 of the 64 pixels
    assert white[:, 0].min() < 0.05 * H and white[:, 0].max() < 0.3 * H
    assert white[:, 1].min() < 0.05 * W and 0.6 * W < white[:, 1].max() < 0.8 * W


def test_save_reconstructions(tmp_path, digits):
    x = digits.x_test[:10]
    p = plots.save_reconstructions(tmp_path / "rec.png", x, 1 - x, (8, 8), n=8, dpi=50)
    assert p == tmp_path / "rec.png"
    img = read_png(p)
    wide = read_png(plots.save_reconstructions(tmp_path / "rec4.png", x, x, (8, 8), n=4, dpi=50))
    assert img.shape[1] > wide.shape[1] and img.shape[0] == wide.shape[0]   # n sets the width
    with pytest.raises(ValueError, match="as many images"):
        plots.save_reconstructions(tmp_path / "bad.png", x, x[:3], (8, 8))
    with pytest.raises(ValueError, match="8x8 = 64 pixels"):
        plots.save_reconstructions(tmp_path / "bad.png", x[:, :60], x[:, :60], (8, 8))
    assert not (tmp_path / "bad.png").exists()


def test_save_samples_grid(tmp_path, digits):
    img = read_png(plots.save_samples(tmp_path / "s.png", digits.x_train[:12], (8, 8), ncols=4, dpi=50))
    assert img.shape[1] > img.shape[0]                                 # 3 rows of 4: wider than tall
    read_png(plots.save_samples(tmp_path / "sq.png", digits.x_train[:16], (8, 8), dpi=50))
    with pytest.raises(ValueError, match="image_shape"):
        plots.save_samples(tmp_path / "x.png", digits.x_train[:4], (8,))


def test_manifold_grid_covers_the_prior_by_quantiles(model2):
    from scipy.stats import norm

    n = 5
    z_axis, means = plots.manifold_grid(model2, n)
    np.testing.assert_allclose(norm.cdf(z_axis), [0.1, 0.3, 0.5, 0.7, 0.9])
    assert means.shape == (n * n, 64) and means.min() >= 0 and means.max() <= 1
    # tile (r, c) is E[x|z] at (z_axis[c], z_axis[n-1-r]): z1 to the right, z2 upwards
    for r, c in ((0, 0), (0, n - 1), (n - 1, 0), (2, 3)):
        z = np.array([[z_axis[c], z_axis[n - 1 - r]]], dtype=model2.dtype)
        head = model2.backend.decode(model2.params, z)
        np.testing.assert_allclose(means[r * n + c], dist.likelihood_mean("bernoulli", head, 64)[0],
                                   rtol=1e-6)


def test_save_manifold(tmp_path, model2):
    img = read_png(plots.save_manifold(tmp_path / "m.png", model2, (8, 8), n=6, dpi=50))
    assert abs(img.shape[0] - img.shape[1]) <= 1                       # a square grid


def test_manifold_refuses_other_latent_sizes(tmp_path):
    for z in (1, 3):
        with pytest.raises(ValueError, match="2-D latent space"):
            plots.save_manifold(tmp_path / "m.png", VAE(64, z, hidden=(8,)), (8, 8))
    assert not (tmp_path / "m.png").exists()
    with pytest.raises(ValueError, match="n must be"):
        plots.manifold_grid(VAE(64, 2, hidden=(8,)), 1)


def test_interpolation_ends_at_the_reconstructions(tmp_path, digits, model2):
    xa, xb = digits.x_test[0], digits.x_test[1]
    t, means = plots.interpolate(model2, xa, xb, steps=7)
    np.testing.assert_allclose(t, np.linspace(0, 1, 7))
    np.testing.assert_allclose(means[0], model2.reconstruct(xa[None])[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(means[-1], model2.reconstruct(xb[None])[0], rtol=1e-5, atol=1e-7)
    # the midpoint decodes the midpoint of the posterior means
    mu, _ = model2.encode(digits.x_test[:2])
    mid = 0.5 * (mu[0] + mu[1])
    _, m3 = plots.interpolate(model2, xa, xb, steps=3)
    head = model2.backend.decode(model2.params, np.ascontiguousarray(mid[None], dtype=model2.dtype))
    np.testing.assert_allclose(m3[1], dist.likelihood_mean("bernoulli", head, 64)[0], rtol=1e-5)
    img = read_png(plots.save_interpolation(tmp_path / "i.png", model2, xa, xb, (8, 8), steps=5, dpi=50))
    assert img.shape[1] > 3 * img.shape[0]                             # one long row
    with pytest.raises(ValueError, match="steps"):
        plots.interpolate(model2, xa, xb, steps=1)


def test_principal_axes_match_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    mu = rng.standard_normal((300, 5)) * np.array([5.0, 2.0, 1.0, 0.5, 0.1]) @ \
        np.linalg.qr(rng.standard_normal((5, 5)))[0]                    # a rotated ellipsoid
    proj, ratio = plots.principal_axes(mu, 2)
    pca = PCA(n_components=2).fit(mu)
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, rtol=1e-10)
    ref = pca.transform(mu)
    np.testing.assert_allclose(np.abs(proj), np.abs(ref), rtol=1e-8, atol=1e-10)   # up to sign
    assert proj[:, 0].var() > proj[:, 1].var()


def test_latent_scatter(tmp_path, digits, model2):
    mu2, _ = model2.encode(digits.x_test)
    read_png(plots.save_latent_scatter(tmp_path / "l2.png", mu2, digits.y_test, dpi=50))
    mu5, _ = VAE(64, 5, hidden=(8,)).encode(digits.x_test)            # the PCA path
    img = read_png(plots.save_latent_scatter(tmp_path / "l5.png", mu5, digits.y_test, dpi=50))
    assert img.shape[:2] == (250, 300)                                 # 6 x 5 inches at 50 dpi
    read_png(plots.save_latent_scatter(tmp_path / "l1.png", mu5[:, :1], digits.y_test, dpi=50))
    read_png(plots.save_latent_scatter(tmp_path / "nolabel.png", mu5, None, dpi=50))
    with pytest.raises(ValueError, match="one entry per row"):
        plots.save_latent_scatter(tmp_path / "x.png", mu5, digits.y_test[:3])


def test_curves(tmp_path):
    metrics = [{"epoch": e, "train_loss": 30.0 - e, "test_loss": 31.0 - e, "train_time_s": 0.1}
               for e in range(1, 6)]
    img = read_png(plots.save_curves(tmp_path / "c.png", metrics, dpi=50))
    assert img.shape[:2] == (200, 300)                                 # 6 x 4 inches at 50 dpi
    with_val = [dict(m, val_loss=m["test_loss"] - 0.5) for m in metrics]
    with_val[2]["val_loss"] = float("nan")                             # skipped, not drawn
    read_png(plots.save_curves(tmp_path / "cv.png", with_val, dpi=50))
    with pytest.raises(ValueError, match="empty"):
        plots.save_curves(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match="no finite"):
        plots.save_curves(tmp_path / "x.png", [{"epoch": 1}])


def test_save_all(tmp_path, digits, model2):
    state = model2.rng.bit_generator.state
    metrics = [{"epoch": 1, "train_loss": 40.0, "test_loss": 41.0},
               {"epoch": 2, "train_loss": 35.0, "test_loss": 37.0, "val_loss": 36.5}]
    paths = plots.save_all(tmp_path / "run", model2, digits, metrics)
    assert [p.name for p in paths] == ["reconstructions.png", "samples.png", "manifold.png",
                                       "interpolation.png", "latent.png", "curves.png"]
    for p in paths:
        read_png(p)
    assert sorted(f.name for f in (tmp_path / "run").iterdir()) == sorted(p.name for p in paths)
    assert model2.rng.bit_generator.state == state                     # the training RNG is untouched
    # z = 3: no manifold; no metrics: no curves
    names = [p.name for p in plots.save_all(tmp_path / "run3", VAE(64, 3, hidden=(8,)), digits, [])]
    assert names == ["reconstructions.png", "samples.png", "interpolation.png", "latent.png"]
