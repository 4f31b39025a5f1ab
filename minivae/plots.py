"""Pictures of a VAE: reconstructions, samples, the 2-D latent manifold, interpolations, the latent
space, and training curves. Each function writes one PNG atomically and returns its path.

Images arrive as flat rows (n, D) with D = h * w, row-major, as the datasets store them; they are
shown in grey levels, 0 black and 1 white, pixel (0, 0) at the top left. The figures are drawn on a
bare ``matplotlib.figure.Figure`` (the Agg renderer, never pyplot), so nothing is ever shown on
screen and no global backend is switched.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
# matplotlib is imported inside the functions that draw: the command line reads FILENAMES at every
# start (and on every MPI rank), and importing matplotlib costs ~0.5-1 s there.

from . import distributions as dist
from .checkpoint import atomic_write

DPI = 100
CELL_IN = 0.8           # inches per image tile in the grids
PAD_VALUE = 0.5         # the grey of the 1-pixel lines between tiles

FILENAMES = {
    "reconstructions": "reconstructions.png",
    "samples": "samples.png",
    "manifold": "manifold.png",
    "interpolation": "interpolation.png",
    "latent": "latent.png",
    "curves": "curves.png",
}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _images(x, image_shape, what="images"):
    """Flat rows (n, h*w) (or one row (h*w,)) -> (n, h, w) float in [0, 1] for display."""
    h, w = _shape(image_shape)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[1] != h * w:
        raise ValueError(f"{what} must be flat rows of {h}x{w} = {h * w} pixels, got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{what}: no images to draw")
    return np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0).reshape(-1, h, w)


def _shape(image_shape):
    try:
        h, w = (int(s) for s in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be (height, width), got {image_shape!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"image_shape must be positive, got {image_shape!r}")
    return h, w


def image_grid(images, ncols, pad=1, pad_value=PAD_VALUE):
    """Tile (n, h, w) images into one (rows*(h+pad)-pad, ncols*(w+pad)-pad) array, row by row.

    Image i lands in tile row i // ncols, column i % ncols; empty tiles are ``pad_value``.
    """
    n, h, w = images.shape
    rows = math.ceil(n / ncols)
    grid = np.full((rows * (h + pad) - pad, ncols * (w + pad) - pad), pad_value, dtype=np.float64)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = img
    return grid


def _figure(width_in, height_in, dpi=DPI):
    from matplotlib.figure import Figure
    return Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")


def _show_grid(ax, grid):
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path):
    """Render ``fig`` to PNG at ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def _tile_centers(count, size, pad=1):
    return [i * (size + pad) + (size - 1) / 2 for i in range(count)]


def _is_ae(model) -> bool:
    """A deterministic minivae.Autoencoder (no likelihood, no prior), rather than a VAE."""
    return not hasattr(model.spec, "likelihood")


def _codes(model, x):
    """Where x sits in the latent space: the posterior means of a VAE, the codes of an Autoencoder."""
    return model.encode(x) if _is_ae(model) else model.encode(x)[0]


def _decode_mean(model, z):
    """E[x|z] for latent points z (m, Z): the decoder head through the likelihood's mean
    (an Autoencoder's decoder output x_hat itself)."""
    z = np.ascontiguousarray(z, dtype=model.dtype)
    if _is_ae(model):
        return model.decode(z)
    head = model.backend.decode(model.params, z)                    # (m, K)
    return dist.likelihood_mean(model.likelihood, head, model.x_dim)


# ----------------------------------------------------------------------------------------------
# The pictures
# ----------------------------------------------------------------------------------------------

def save_reconstructions(path, x, x_rec, image_shape, n=8, dpi=DPI):
    """The first ``n`` inputs in the top row, their reconstructions below."""
    x = _images(x, image_shape, "x")
    x_rec = _images(x_rec, image_shape, "x_rec")
    if len(x) != len(x_rec):
        raise ValueError(f"x and x_rec must hold as many images, got {len(x)} and {len(x_rec)}")
    n = min(int(n), len(x))
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    h, _ = x.shape[1:]
    grid = image_grid(np.concatenate([x[:n], x_rec[:n]]), ncols=n)
    fig = _figure(n * CELL_IN + 1.2, 2 * CELL_IN + 0.5, dpi)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_yticks(_tile_centers(2, h), ["input", "reconstruction"], fontsize=8)
    ax.set_title("reconstructions (mean of p(x|z = mu))", fontsize=9)
    return _save(fig, path)


def save_samples(path, images, image_shape, ncols=None, dpi=DPI, title="samples from the prior"):
    """A grid of images (default: as square as possible)."""
    images = _images(images, image_shape)
    n = len(images)
    ncols = int(ncols) if ncols else math.ceil(math.sqrt(n))
    if ncols < 1:
        raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
    ncols = min(ncols, n)
    rows = math.ceil(n / ncols)
    fig = _figure(ncols * CELL_IN * 0.75 + 0.3, rows * CELL_IN * 0.75 + 0.5, dpi)
    ax = fig.add_subplot()
    _show_grid(ax, image_grid(images, ncols))
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def manifold_grid(model, n=15):
    """The z grid of the manifold and its decoded means.

    Returns z_axis (n,), the increasing values Phi^-1((i + 1/2) / n), and means (n*n, D): tile
    (r, c), row-major, is E[x|z] at z = (z_axis[c], z_axis[n - 1 - r]), so z2 grows upwards.
    """
    from scipy.stats import norm

    if model.z_dim != 2:
        raise ValueError(f"the latent manifold needs a 2-D latent space, the model has z_dim = {model.z_dim}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    z_axis = norm.ppf((np.arange(n) + 0.5) / n)                         # (n,) increasing
    z1, z2 = np.meshgrid(z_axis, z_axis[::-1])                          # row 0 = largest z2
    z = np.stack([z1.ravel(), z2.ravel()], axis=1)                      # (n*n, 2), row-major tiles
    return z_axis, _decode_mean(model, z)


def save_manifold(path, model, image_shape, n=15, dpi=DPI):
    """The learned 2-D manifold (Kingma & Welling 2014, Fig. 4).

    An n x n grid of evenly spaced quantiles u = (i + 1/2) / n of the unit square goes through the
    inverse Gaussian CDF, z = Phi^-1(u), so the grid covers the prior N(0, I) by equal mass; each
    tile is the decoder's mean E[x|z]. z1 grows to the right, z2 grows upwards.
    """
    h, w = _shape(image_shape)
    z_axis, means = manifold_grid(model, n)
    n = len(z_axis)
    images = _images(means, (h, w), "decoded means")
    fig = _figure(n * CELL_IN * 0.6 + 1.0, n * CELL_IN * 0.6 + 1.0, dpi)
    ax = fig.add_subplot()
    _show_grid(ax, image_grid(images, n))
    ticks = sorted({0, n // 2, n - 1})
    ax.set_xticks([_tile_centers(n, w)[i] for i in ticks], [f"{z_axis[i]:.2f}" for i in ticks], fontsize=7)
    ax.set_yticks([_tile_centers(n, h)[i] for i in ticks], [f"{z_axis[::-1][i]:.2f}" for i in ticks],
                  fontsize=7)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("latent manifold: E[x|z], z = Phi^-1(u)", fontsize=9)
    return _save(fig, path)


def code_grid(model, codes, n=15, lo=1.0, hi=99.0):
    """An Autoencoder's decoded grid: there is no prior to take quantiles of, so the grid spans the
    [lo, hi] percentiles of the ``codes`` (m, 2) of some data, per axis.

    Returns z1_axis (n,), z2_axis (n,) increasing, and means (n*n, D): tile (r, c), row-major, is
    the decoding of z = (z1_axis[c], z2_axis[n - 1 - r]), so z2 grows upwards.
    """
    codes = np.asarray(codes, dtype=np.float64)
    if model.z_dim != 2 or codes.ndim != 2 or codes.shape[1] != 2 or len(codes) == 0:
        raise ValueError(f"the code grid needs a 2-D latent space and codes of shape (m, 2), "
                         f"got z_dim = {model.z_dim} and codes of shape {codes.shape}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    a = np.percentile(codes, [lo, hi], axis=0)                          # (2, 2): rows lo, hi
    z1_axis = np.linspace(a[0, 0], a[1, 0], n)
    z2_axis = np.linspace(a[0, 1], a[1, 1], n)
    z1, z2 = np.meshgrid(z1_axis, z2_axis[::-1])
    z = np.stack([z1.ravel(), z2.ravel()], axis=1)
    return z1_axis, z2_axis, _decode_mean(model, z)


def save_code_grid(path, model, codes, image_shape, n=15, dpi=DPI):
    """The Autoencoder's counterpart of the manifold: an n x n grid spanning the codes' range
    (1st to 99th percentile per axis), each tile the decoding of its grid point."""
    h, w = _shape(image_shape)
    z1_axis, z2_axis, means = code_grid(model, codes, n)
    images = _images(means, (h, w), "decoded grid")
    fig = _figure(n * CELL_IN * 0.6 + 1.0, n * CELL_IN * 0.6 + 1.0, dpi)
    ax = fig.add_subplot()
    _show_grid(ax, image_grid(images, n))
    ticks = sorted({0, n // 2, n - 1})
    ax.set_xticks([_tile_centers(n, w)[i] for i in ticks], [f"{z1_axis[i]:.2f}" for i in ticks], fontsize=7)
    ax.set_yticks([_tile_centers(n, h)[i] for i in ticks], [f"{z2_axis[::-1][i]:.2f}" for i in ticks],
                  fontsize=7)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("autoencoder: decoded grid over the codes' range", fontsize=9)
    return _save(fig, path)


def interpolate(model, xa, xb, steps=10):
    """Decoded means along the line between the posterior means of xa and xb.

    Returns t (steps,) from 0 to 1 and means (steps, D): E[x|z] at z = (1 - t) mu_a + t mu_b.
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    x = np.concatenate([np.atleast_2d(xa), np.atleast_2d(xb)])
    if len(x) != 2:
        raise ValueError(f"xa and xb must each be one image, got {len(x)} rows together")
    mu = _codes(model, x)                                               # posterior means (2, Z)
    t = np.linspace(0.0, 1.0, steps)                                    # (steps,)
    z = (1.0 - t[:, None]) * mu[0] + t[:, None] * mu[1]                 # (steps, Z)
    return t, _decode_mean(model, z)


def save_interpolation(path, model, xa, xb, image_shape, steps=10, dpi=DPI):
    """xa, then the decoded means along z = (1 - t) mu_a + t mu_b for t in [0, 1], then xb."""
    h, w = _shape(image_shape)
    ends = np.concatenate([_images(xa, (h, w), "xa"), _images(xb, (h, w), "xb")])
    if len(ends) != 2:
        raise ValueError("xa and xb must each be one image")
    t, means = interpolate(model, xa, xb, steps)
    path_images = _images(means, (h, w), "decoded means")
    row = np.concatenate([ends[:1], path_images, ends[1:]])
    fig = _figure((steps + 2) * CELL_IN + 0.3, CELL_IN + 0.7, dpi)
    ax = fig.add_subplot()
    _show_grid(ax, image_grid(row, steps + 2))
    labels = ["x_a"] + [f"{v:.2g}" for v in t] + ["x_b"]
    ax.set_xticks(_tile_centers(steps + 2, w), labels, fontsize=7)
    what = "codes" if _is_ae(model) else "posterior means"
    ax.set_title(f"interpolation between {what} (t from 0 to 1)", fontsize=9)
    return _save(fig, path)


def principal_axes(mu, k=2):
    """Project rows of mu (n, Z) on their first k principal axes: (projection (n, k), explained
    variance ratio (k,)). Signs fixed so the largest loading of each axis is positive."""
    centred = mu - mu.mean(axis=0)                                   # (n, Z)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)           # rows of vt: the axes
    axes = vt[:k]                                                    # (k', Z), k' = min(k, n, Z)
    largest = axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)]
    axes = axes * np.where(largest < 0, -1.0, 1.0)[:, None]
    var = s ** 2
    ratio = var[:len(axes)] / var.sum() if var.sum() > 0 else np.zeros(len(axes))
    return centred @ axes.T, ratio


def save_latent_scatter(path, mu, labels=None, dpi=DPI, what="posterior means"):
    """The posterior means (``what``: an Autoencoder's "codes") coloured by label: z1 vs z2 when
    Z = 2, the first two principal axes when Z > 2, z1 against the label when Z = 1."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 2 or len(mu) == 0:
        raise ValueError(f"mu must be a non-empty 2-D array (n, Z), got shape {mu.shape}")
    if labels is not None:
        labels = np.asarray(labels).ravel()
        if len(labels) != len(mu):
            raise ValueError(f"labels must have one entry per row of mu ({len(mu)}), got {len(labels)}")
    Z = mu.shape[1]
    if Z == 1:
        pts = np.stack([mu[:, 0], labels if labels is not None else np.zeros(len(mu))], axis=1)
        xlabel, ylabel, title = "z1", "label", what
    elif Z == 2:
        pts, xlabel, ylabel, title = mu, "z1", "z2", what
    else:
        pts, ratio = principal_axes(mu, 2)
        if pts.shape[1] < 2:
            pts = np.pad(pts, ((0, 0), (0, 2 - pts.shape[1])))
            ratio = np.pad(ratio, (0, 2 - len(ratio)))
        xlabel, ylabel = f"PC1 ({100 * ratio[0]:.0f}% var.)", f"PC2 ({100 * ratio[1]:.0f}% var.)"
        title = f"{what}, first two principal axes of Z = {Z}"
    fig = _figure(6.0, 5.0, dpi)
    ax = fig.add_subplot()
    size = 4 if len(mu) > 2000 else 8
    if labels is None:
        ax.scatter(pts[:, 0], pts[:, 1], s=size, alpha=0.6, linewidths=0)
    else:
        from matplotlib import colormaps
        cmap = colormaps["tab10"]
        for i, c in enumerate(np.unique(labels)):
            sel = labels == c
            ax.scatter(pts[sel, 0], pts[sel, 1], s=size, alpha=0.7, linewidths=0,
                       color=cmap(i % 10), label=str(c))
        ax.legend(title="label", markerscale=2.5 if size < 8 else 1.5, fontsize=7, title_fontsize=8,
                  loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


CURVES = (("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test"))


def save_curves(path, metrics, dpi=DPI):
    """train_loss, val_loss (if present) and test_loss per epoch from the metrics.jsonl records."""
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics is empty: no epochs to plot")
    fig = _figure(6.0, 4.0, dpi)
    ax = fig.add_subplot()
    drawn = 0
    for key, label in CURVES:
        pts = [(m.get("epoch", i + 1), m[key]) for i, m in enumerate(metrics)
               if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        if pts:
            e, v = zip(*pts)
            ax.plot(e, v, marker="o" if len(pts) < 30 else None, markersize=3, label=label)
            drawn += 1
    if not drawn:
        raise ValueError("metrics hold no finite train_loss, val_loss or test_loss values")
    ax.set_xlabel("epoch")
    ae = metrics[-1].get("objective") == "sq_error"          # an Autoencoder's run
    ax.set_ylabel("squared error per example" if ae else "negative ELBO (nats per example)")
    ax.set_title("training curves", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def save_all(run_dir, model, dataset, metrics, n_latent=5000):
    """Every picture that applies, into ``run_dir`` under the names of FILENAMES.

    Uses the test split (the validation split, then train, when it is empty). The manifold is drawn
    only when z_dim = 2, the curves only when ``metrics`` is non-empty. For an Autoencoder: no
    samples (it has no prior), and the manifold is the decoded grid over its codes (save_code_grid). Draws nothing from the
    model's own generator: the samples use a fixed seed. Returns the paths written.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    shape = tuple(dataset.image_shape)
    for x, y in ((dataset.x_test, dataset.y_test), (dataset.x_val, dataset.y_val),
                 (dataset.x_train, dataset.y_train)):
        if len(x):
            break
    paths = []
    n_rec = min(8, len(x))
    paths.append(save_reconstructions(run_dir / FILENAMES["reconstructions"], x[:n_rec],
                                      model.reconstruct(x[:n_rec]), shape, n=n_rec))
    ae = _is_ae(model)                   # an Autoencoder has no prior: no samples, a grid over its codes
    grid_n = 15 if shape[0] * shape[1] > 100 else 12
    if not ae:
        paths.append(save_samples(run_dir / FILENAMES["samples"], model.sample(64, seed=0), shape))
    if model.z_dim == 2 and ae:
        paths.append(save_code_grid(run_dir / FILENAMES["manifold"], model, model.encode(x[:n_latent]),
                                    shape, n=grid_n))
    elif model.z_dim == 2:
        paths.append(save_manifold(run_dir / FILENAMES["manifold"], model, shape, n=grid_n))
    if len(x) >= 2:
        other = np.flatnonzero(y != y[0])                # the first image with another label
        ib = int(other[0]) if len(other) else 1
        paths.append(save_interpolation(run_dir / FILENAMES["interpolation"], model, x[0], x[ib], shape))
    paths.append(save_latent_scatter(run_dir / FILENAMES["latent"], _codes(model, x[:n_latent]), y[:n_latent],
                                     what="codes" if ae else "posterior means"))
    if metrics:
        paths.append(save_curves(run_dir / FILENAMES["curves"], metrics))
    return paths
