"""Write the tutorial notebooks (notebooks/NN_*.ipynb) from the cell sources in this file.

The notebooks are the product: they are committed *with* their outputs, so that they render where
the repository is browsed. This script is only how their cells were written. It writes them without
outputs; `make tutorial` (nbclient's `jupyter-execute --inplace`) then runs each one, top to bottom,
in a fresh kernel. Edit a notebook here, then run both:

    python notebooks/make_notebooks.py [NAME ...] && make tutorial
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

# The first code cell of every notebook: each notebook runs on its own, nothing is imported from
# another notebook or from a helper file.
SETUP = '''\
import numpy as np
import matplotlib.pyplot as plt
from threadpoolctl import threadpool_limits

import minivae
from minivae.data import load_dataset
from minivae.optim import Adam
from minivae.plots import image_grid

threadpool_limits(1)      # 8x8 images: one BLAS thread is the fastest (and CI has two cores)
plt.rcParams.update({"figure.dpi": 72, "image.cmap": "gray", "font.size": 9,
                     "axes.titlesize": 9, "figure.constrained_layout.use": True})

digits = load_dataset("digits", val_fraction=0)     # scikit-learn's 8x8 digits, grey levels in [0, 1]
x_train, y_train = digits.x_train, digits.y_train   # (1437, 64)
x_test, y_test = digits.x_test, digits.y_test       # (360, 64)


def fit(model, x, epochs, lr=3e-3, batch=64, seed=0, after_epoch=None, **loss_kwargs):
    """Adam on shuffled minibatches of x; returns the mean training loss of each epoch."""
    opt = Adam(model.params.size, dtype=model.dtype, lr=lr)
    rng = np.random.default_rng(seed)
    curve = []
    for epoch in range(epochs):
        losses = []
        for idx in np.array_split(rng.permutation(len(x)), len(x) // batch):
            loss, grad = model.loss_and_grad(x[idx], **loss_kwargs)
            opt.step(model.params, grad)            # params -= lr * (Adam's step), in place
            losses.append(loss)
        curve.append(np.mean(losses))
        if after_epoch is not None:
            after_epoch(epoch)
    return np.array(curve)


def show(ax, images, ncols, title=None):
    """Flat 8x8 images (n, 64) tiled ncols wide, grey levels 0 (black) .. 1 (white)."""
    grid = image_grid(np.clip(np.asarray(images, dtype=float), 0, 1).reshape(-1, 8, 8), ncols)
    ax.imshow(grid, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([]); ax.set_yticks([])
    if title:
        ax.set_title(title)
'''


def md(text):
    return new_markdown_cell(text.strip("\n"))


def code(text):
    return new_code_cell(text.strip("\n"))


NOTEBOOKS: dict[str, list] = {}
# ------------------------------------------------------------------------------------------------
NOTEBOOKS["01_autoencoder"] = [
    md(r"""
# 1. The autoencoder

An autoencoder is trained to reproduce its input from a learned encoding: an encoder MLP maps an image
$x$ (64 pixels here) to a short code $z$ (2 numbers), a decoder MLP maps $z$ back to an image
$\hat x = \varsigma(\text{decoder}(z))$ in $[0, 1]$, and the loss is the squared $\ell_2$ distance between
the input and its reconstruction, summed over pixels and averaged over the batch:

$$\mathcal L = \frac1n\sum_i \lVert \hat x_i - x_i\rVert^2 .$$

Nothing here is random: `minivae.Autoencoder` is deterministic (docs/math.md §13 derives its gradient;
the layers are those of §2). This is the model the VAE will improve on.
"""),
    code(SETUP),
    code(r"""
ae = minivae.Autoencoder(x_dim=64, z_dim=2, hidden=(128,), seed=0)
curve = fit(ae, x_train, epochs=80)

fig, ax = plt.subplots(figsize=(4.5, 2.6))
ax.plot(np.arange(1, len(curve) + 1), curve)
ax.set_xlabel("epoch"); ax.set_ylabel("squared error per image"); ax.set_yscale("log"); ax.grid(alpha=0.3)
plt.show()
print(f"test squared error per image: {ae.sq_error(x_test).mean():.2f} (64 pixels; "
      f"predicting the mean image gives {((x_test - x_train.mean(0)) ** 2).sum(1).mean():.2f})")
"""),
    md(r"""
## Reconstructions

Top row: test inputs; bottom row: `ae.reconstruct(x)` = `decode(encode(x))`. Two numbers per image are
enough to recover the digit's overall shape, not its details.
"""),
    code(r"""
fig, ax = plt.subplots(figsize=(8, 2.2))
picks = np.concatenate([np.flatnonzero(y_test == d)[:1] for d in range(10)])     # one of each digit
show(ax, np.concatenate([x_test[picks], ae.reconstruct(x_test[picks])]), 10, "inputs (top) and reconstructions")
plt.show()
"""),
    md(r"""
## The latent space

Every test image is one point $z = \text{encoder}(x)$. The digits form clusters, but nothing says where
they should sit, how far apart, or what lies between them; the scale of the codes is whatever training
happened to produce. The next notebook looks at what the decoder makes of the space between the points.
"""),
    code(r"""
z = ae.encode(x_test)                                                   # (360, 2)
fig, ax = plt.subplots(figsize=(5, 4))
sc = ax.scatter(z[:, 0], z[:, 1], c=y_test, cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
ax.set_xlabel("z1"); ax.set_ylabel("z2"); ax.set_title("autoencoder codes of the test set")
plt.show()
"""),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["02_why_not_satisfying"] = [
    md(r"""
# 2. Why the autoencoder was not satisfying

The autoencoder learns codes that make reconstruction easy, and nothing else. The inputs get
*memorized* in the latent space: similar inputs may get distant codes, and the space between the codes
decodes to nothing meaningful. So we cannot use its decoder to generate: we do not know which $z$ to feed it.

The VAE (notebooks 3 to 5) trains the same networks with a stochastic encoder and a KL term that pulls
every code towards the prior $\mathcal N(0, I)$ (docs/math.md §3, §5.1). Here both are trained with the
same size, 64 → 128 → 2 → 128 → 64, and we decode their latent spaces side by side.
"""),
    code(SETUP),
    code(r"""
ae = minivae.Autoencoder(x_dim=64, z_dim=2, hidden=(128,), seed=0)
fit(ae, x_train, epochs=80)
vae = minivae.VAE(x_dim=64, z_dim=2, hidden=(128,), likelihood="bernoulli", seed=0)
fit(vae, x_train, epochs=80)

z_ae = ae.encode(x_test)                     # (360, 2) codes
z_vae, _ = vae.encode(x_test)                # (360, 2) posterior means


def decode_vae(z):
    # E[x|z] of the VAE's Bernoulli decoder: sigmoid of the logits (§4.1).
    return 1 / (1 + np.exp(-vae.decode(np.asarray(z, dtype=np.float32))))


def grid_over(z, n=12):
    # An n x n grid over the box holding the central 98% of the codes z (n*n, 2), z2 growing upwards.
    lo, hi = np.percentile(z, [1, 99], axis=0)
    g1, g2 = np.meshgrid(np.linspace(lo[0], hi[0], n), np.linspace(hi[1], lo[1], n))
    return np.stack([g1.ravel(), g2.ravel()], axis=1), (lo, hi)
"""),
    md(r"""
## Decoding a grid over the latent space

For each model, a $12\times12$ grid over the box that holds 98% of its test codes (left: the codes, the
box in black), decoded (right). The autoencoder's codes have an arbitrary scale and leave large empty
regions between the clusters (and stragglers far outside them); no training image was ever encoded there,
so whatever the decoder makes of those regions is an accident of training: here, the same few shapes
stretched over large areas and abrupt borders between them. The VAE's codes fill a region around the
origin of the size of the prior, with no holes, and its decoded grid changes gradually from digit to digit.
(On 8x8 digits with two latent dimensions the autoencoder's decoder stays fairly tame: the bottleneck is
too narrow to memorize much. The VAE's images are blurrier: it pays for its smooth latent space in
reconstruction, notebook 5.)
"""),
    code(r"""
fig, axes = plt.subplots(2, 2, figsize=(8, 8))
for row, (name, z, decode) in enumerate((("autoencoder", z_ae, ae.decode), ("VAE", z_vae, decode_vae))):
    grid, (lo, hi) = grid_over(z)
    ax = axes[row, 0]
    ax.scatter(z[:, 0], z[:, 1], c=y_test, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
    ax.plot([lo[0], hi[0], hi[0], lo[0], lo[0]], [lo[1], lo[1], hi[1], hi[1], lo[1]], "k", lw=1)
    ax.set_title(f"{name}: test codes, coloured by digit")
    show(axes[row, 1], decode(grid.astype(np.float32)), 12, f"{name}: decoded grid over the box")
plt.show()
"""),
    md(r"""
## Random codes

To *generate*, we need a distribution to draw codes from. The VAE has one by construction, the prior
$\mathcal N(0, I)$. For the autoencoder the best we can do is a Gaussian fitted to its codes (same mean
and covariance): some of its draws land between the clusters or outside them, and decode to
malformed shapes.
"""),
    code(r"""
rng = np.random.default_rng(0)
z_rand_ae = rng.multivariate_normal(z_ae.mean(0), np.cov(z_ae.T), size=32).astype(np.float32)
z_rand_vae = rng.standard_normal((32, 2)).astype(np.float32)
fig, axes = plt.subplots(1, 2, figsize=(9, 2.8))
show(axes[0], ae.decode(z_rand_ae), 8, "autoencoder: z ~ Gaussian fitted to its codes")
show(axes[1], decode_vae(z_rand_vae), 8, "VAE: z ~ N(0, I), the prior")
plt.show()
"""),
    md(r"""
## Interpolating between two codes

Encode two test images, walk along the straight line between their codes and decode every step:
$z_t = (1 - t)\,z_a + t\,z_b$. Look at how the image changes from step to step: the autoencoder's path
holds one shape, then switches abruptly, often through digits unrelated to either end; the VAE's path is
a smooth transition between the two digits.
"""),
    code(r"""
pairs = [(np.flatnonzero(y_test == a)[0], np.flatnonzero(y_test == b)[0]) for a, b in ((0, 1), (2, 7), (4, 3))]
t = np.linspace(0, 1, 10)[:, None]
rows = []
for name, z, decode in (("AE", z_ae, ae.decode), ("VAE", z_vae, decode_vae)):
    for ia, ib in pairs:
        path = (1 - t) * z[ia] + t * z[ib]                                   # (10, 2)
        rows.append(np.concatenate([x_test[ia:ia + 1], decode(path.astype(np.float32)), x_test[ib:ib + 1]]))
fig, ax = plt.subplots(figsize=(7, 4.8))
show(ax, np.concatenate(rows), 12, "x_a, 10 steps from z_a to z_b, x_b: AE (top 3 rows), VAE (bottom 3)")
plt.show()
"""),
    md(r"""
## Similar inputs, distant codes?

For every test image take its nearest neighbour in pixel space (another test image), and compare the
distance between their codes with the typical distance between two random codes. A ratio near 0 means
"similar inputs get similar codes"; a ratio near 1 means the code ignores similarity. With only two
latent dimensions both models keep most neighbours close (a 2-D code cannot afford to scatter them); the
lecture's "similar inputs may get distant codes" is the regime of wide codes and big networks, where an
autoencoder can memorize. What separates the two models here is the 10% tail and, above all, the
space between the codes.
"""),
    code(r"""
d_pix = ((x_test[:, None, :] - x_test[None, :, :]) ** 2).sum(-1)        # (360, 360) pixel distances
np.fill_diagonal(d_pix, np.inf)
nn = d_pix.argmin(1)                                                    # nearest neighbour of each image
for name, z in (("autoencoder", z_ae), ("VAE", z_vae)):
    d_code = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))    # (360, 360) code distances
    typical = np.median(d_code[np.triu_indices(len(z), 1)])
    ratio = d_code[np.arange(len(z)), nn] / typical
    print(f"{name:12s} code distance to the pixel-space nearest neighbour / typical code distance: "
          f"median {np.median(ratio):.2f}, 90th percentile {np.percentile(ratio, 90):.2f}")
"""),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["03_stochastic_encoder"] = [
    md(r"""
# 3. A stochastic encoder

The VAE's encoder does not return a code: it returns the parameters of a distribution over codes,
a Gaussian $q(z\mid x) = \mathcal N(\mu(x), \operatorname{diag}(e^{v(x)}))$ with a mean $\mu$ and a
**log-variance** $v$ per latent dimension (docs/math.md §3). A code is a *sample* from it, drawn by the
reparameterization $z = \mu + e^{v/2}\,\varepsilon$, $\varepsilon\sim\mathcal N(0, I)$ (§3.1).

This notebook trains a small VAE with a 2-D latent space, draws many $z$ for one input, and checks that
their spread is the $e^{v}$ the encoder reported.
"""),
    code(SETUP),
    code(r"""
model = minivae.VAE(x_dim=64, z_dim=2, hidden=(128,), likelihood="bernoulli", seed=0)
curve = fit(model, x_train, epochs=60)
print(f"-ELBO per example: first epoch {curve[0]:.1f}, last epoch {curve[-1]:.1f} nats (train)")
"""),
    md(r"""
## Many codes for one input

`model.encode(x)` gives $\mu$ and $v$ = `logvar`, each of shape $(n, Z)$. We draw 2000 values of
$\varepsilon$ and form $z = \mu + e^{v/2}\varepsilon$ exactly as `reparam_forward` does (§3.1).
"""),
    code(r"""
from minivae.distributions import reparam_forward

x0 = x_test[y_test == 0][:1]                     # one input (the first test "0"), (1, 64)
mu, logvar = model.encode(x0)                    # (1, 2) each
eps = np.random.default_rng(1).standard_normal((2000, 1, 2))   # (L, n, Z)
z, _ = reparam_forward(mu, logvar, eps)          # (L, 1, 2)
z = z[:, 0]                                      # (2000, 2)

table = np.stack([np.exp(logvar[0]), z.var(axis=0, ddof=1), mu[0], z.mean(axis=0)])
print("                        z1        z2")
for name, row in zip(["exp(logvar)", "sample variance", "mu", "sample mean"], table):
    print(f"{name:16s} {row[0]:9.4f} {row[1]:9.4f}")
"""),
    md(r"""
The sample variance matches $e^{v}$ up to Monte Carlo error (its relative standard error with
2000 draws is about $\sqrt{2/1999}\approx 3\%$). Below: the cloud of codes for this input over the
posterior means of the whole test set, with the $1\sigma$ and $2\sigma$ ellipses of $q(z\mid x)$, and the
images decoded from a few of the codes — every one is a plausible reconstruction.
"""),
    code(r"""
mu_all, _ = model.encode(x_test)
std = np.exp(0.5 * logvar[0])
t = np.linspace(0, 2 * np.pi, 200)

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
ax = axes[0]
ax.scatter(mu_all[:, 0], mu_all[:, 1], s=4, c="0.75", label="mu(x), test set")
ax.scatter(z[:, 0], z[:, 1], s=2, alpha=0.3, color="C0", label="z ~ q(z|x0)")
for k in (1, 2):
    ax.plot(mu[0, 0] + k * std[0] * np.cos(t), mu[0, 1] + k * std[1] * np.sin(t), "C3", lw=1)
ax.plot(*mu[0], "C3+", ms=10, label="mu(x0); 1 and 2 sigma")
ax.set_xlabel("z1"); ax.set_ylabel("z2"); ax.legend(fontsize=7, loc="best")
ax.set_title("2000 codes drawn for one input")

from minivae.distributions import likelihood_mean
heads = model.backend.decode(model.params, z[:15].astype(model.dtype))      # (15, 64) logits
show(axes[1], np.concatenate([x0, likelihood_mean(model.likelihood, heads, 64)]), 4,
     "x0 (top left), then E[x|z] for 15 of the codes")
plt.show()
"""),
    md(r"""
## The spread differs from input to input

Each input gets its own $\mu$ and its own variance. Here are eight test inputs, 300 codes each:
where the encoder is sure, the cloud is tight. Note also that $e^{v}$ is well below 1 (the prior's
variance): the code carries information about $x$, which is what the KL term of the loss (notebook 5)
pays for.
"""),
    code(r"""
fig, ax = plt.subplots(figsize=(5, 4))
ax.scatter(mu_all[:, 0], mu_all[:, 1], s=4, c="0.8")
rng = np.random.default_rng(2)
for i, j in enumerate(np.flatnonzero(np.r_[True, np.diff(y_test) != 0])[:8]):
    m, lv = model.encode(x_test[j:j + 1])
    zz, _ = reparam_forward(m, lv, rng.standard_normal((300, 1, 2)))
    ax.scatter(zz[:, 0, 0], zz[:, 0, 1], s=3, alpha=0.4, color=f"C{i}", label=f"digit {y_test[j]}")
ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
ax.set_xlabel("z1"); ax.set_ylabel("z2"); ax.set_title("q(z|x) for eight inputs (300 draws each)")
plt.show()
print("posterior std per input, averaged over the test set:", np.exp(0.5 * model.encode(x_test)[1]).mean(0).round(3))
"""),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["04_stochastic_decoder"] = [
    md(r"""
# 4. A stochastic decoder

The decoder does not return an image either: it returns the parameters of a distribution over images,
$p(x\mid z)$, one factor per pixel (docs/math.md §4). With the **Gaussian** likelihood (§4.3) the decoder
head gives a mean $m$ and a variance $\mathrm{var} = \mathrm{var\_floor} + e^{s}$ for every pixel, and a
reconstruction is a *sample* $x\sim\mathcal N(m, \operatorname{diag}(\mathrm{var}))$. The picture we
usually show, the "reconstruction", is only the mean of that distribution.

Below: the mean image, the variance image and several sampled reconstructions of one input, then the
same for the two other likelihoods of minivae, the **Bernoulli** on logits (§4.1: a pixel is 0 or 1, its
mean is $\varsigma(\eta)$) and the **continuous Bernoulli** (§4.2: a density on $[0, 1]$ with the same
logits, normalized by $C(\eta)$).
"""),
    code(SETUP),
    code(r"""
models = {}
for likelihood in ("gaussian", "bernoulli", "continuous_bernoulli"):
    models[likelihood] = minivae.VAE(x_dim=64, z_dim=4, hidden=(128,), likelihood=likelihood, seed=0)
    curve = fit(models[likelihood], x_train, epochs=60, lr=2e-3)
    print(f"{likelihood:21s} -ELBO per example: first epoch {curve[0]:8.1f}, last {curve[-1]:8.1f} nats")
"""),
    md(r"""
The three losses are not comparable: the Bernoulli's is a probability of a binary image, the other two are
densities over grey levels (which can exceed 1, hence negative losses).

## The Gaussian decoder: mean, variance, samples

`model.decode(z)` returns, for the Gaussian likelihood, the mean and the **log**-variance of every pixel.
We decode the posterior mean $z = \mu(x)$ of one test image and draw six reconstructions from
$p(x\mid z)$ with `model.reconstruct(x, sample=True)`.
"""),
    code(r"""
gauss = models["gaussian"]
x0 = x_test[y_test == 3][:1]                         # one test "3", (1, 64)
mu, logvar = gauss.encode(x0)
mean, log_var = gauss.decode(mu)                     # (1, 64) each: m and log(var_floor + e^s)
samples = np.concatenate([gauss.reconstruct(x0, sample=True, seed=s) for s in range(6)])

fig, axes = plt.subplots(1, 4, figsize=(9, 2.6), gridspec_kw={"width_ratios": [1, 1, 1.25, 3]})
show(axes[0], x0, 1, "input x")
show(axes[1], mean, 1, "mean m")
im = axes[2].imshow(np.exp(log_var).reshape(8, 8), cmap="magma", interpolation="nearest")
axes[2].set_xticks([]); axes[2].set_yticks([]); axes[2].set_title("variance")
fig.colorbar(im, ax=axes[2], shrink=0.8)
show(axes[3], samples, 3, "six samples x ~ p(x|z = mu)")
plt.show()
print(f"pixel std: min {np.exp(0.5 * log_var).min():.3f}, max {np.exp(0.5 * log_var).max():.3f}")
"""),
    md(r"""
The variance is small on the background, which is black in almost every image, and large on the
strokes, where the model is unsure whether a pixel is ink. The samples are noisy versions of the mean:
the Gaussian decoder explains the pixel-level detail it cannot predict as independent noise. (Sampled
values outside $[0, 1]$ are clipped for display.)

## Bernoulli and continuous Bernoulli

Both decoders output one logit $\eta$ per pixel. Under the **Bernoulli** a sample is a binary image
with $P(x_d = 1) = \varsigma(\eta_d)$; its mean $\varsigma(\eta)$ is the usual grey "reconstruction". The
**continuous Bernoulli** is a density on $[0,1]$, $p(x\mid\eta)\propto \varsigma(\eta)^x(1-\varsigma(\eta))^{1-x}$;
its mean is *not* $\varsigma(\eta)$ but $A'(\eta)$ (§4.2), and its samples are grey levels. Its variance is
at most $1/12$: it cannot be as sure of a pixel as the Gaussian with a small variance.
"""),
    code(r"""
fig, axes = plt.subplots(3, 2, figsize=(7, 3.6), gridspec_kw={"width_ratios": [2, 6]})
for row, (likelihood, model) in enumerate(models.items()):
    mean = model.reconstruct(x0)                                        # E[x | z = mu(x)]
    samples = np.concatenate([model.reconstruct(x0, sample=True, seed=s) for s in range(6)])
    show(axes[row, 0], np.concatenate([x0, mean]), 2, f"{likelihood}: x, mean")
    show(axes[row, 1], samples, 6, "six samples from p(x|z = mu)")
plt.show()
"""),
    md(r"""
All three means look alike; the samples show what each model believes a pixel is. The Bernoulli's
binary samples are a poor model of grey levels, which is why its reconstructions are always shown
as means; the continuous Bernoulli is the right density for grey levels with the same network. See
docs/math.md §4.2 for its normalizer and §7 for the reconstruction error that compares the three.
"""),
    code(r"""
from minivae.evaluate import reconstruction_sq_error

for likelihood, model in models.items():
    err = reconstruction_sq_error(model, x_test, model.encode(x_test)[0]).mean()
    print(f"{likelihood:21s} squared error of the mean reconstruction: {err:.2f} per image (64 pixels)")
"""),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["05_the_loss"] = [
    md(r"""
# 5. The loss: reconstruction and KL

The VAE minimizes the negative ELBO, per example (docs/math.md §5.1, with the analytic KL of §3.2):

$$-\mathrm{ELBO}(x) = \underbrace{-\mathbb E_{q(z\mid x)}\big[\log p(x\mid z)\big]}_{\text{reconstruction}}
\; + \; \beta\,\underbrace{\mathrm{KL}\big(q(z\mid x)\,\Vert\,p(z)\big)}_{\text{regularizer}},\qquad \beta = 1.$$

The first term asks the code to recover $x$; the second pulls every $q(z\mid x)$ towards the prior
$\mathcal N(0, I)$, which keeps the encoding continuous and the space between codes decodable. This
notebook plots both terms over training, then changes $\beta$ and looks at the latent space.
"""),
    code(SETUP),
    code(r"""
from minivae.distributions import kl_forward

eps_test = np.random.default_rng(0).standard_normal((20, len(x_test), 2))   # fixed noise: (L, n, Z)


def loss_terms(model, x=x_test, eps=eps_test):
    # Both terms on the test set, nats per example: (reconstruction, KL).
    mu, logvar = model.encode(x)
    kl = kl_forward(mu, logvar).sum(axis=1)                  # (n,) analytic KL, §3.2
    elbo = model.elbo(x, eps=eps)                            # (n,) mean over L of log p(x|z) - KL, §5.1
    return float(np.mean(-elbo - kl)), float(np.mean(kl))


model = minivae.VAE(x_dim=64, z_dim=2, hidden=(128,), likelihood="bernoulli", seed=0)
terms = [loss_terms(model)]                                  # before training
fit(model, x_train, epochs=80, after_epoch=lambda epoch: terms.append(loss_terms(model)))
terms = np.array(terms)                                      # (epochs + 1, 2)

fig, axes = plt.subplots(1, 2, figsize=(8, 3))
axes[0].plot(terms[:, 0], label="reconstruction  -E_q log p(x|z)")
axes[0].plot(terms.sum(axis=1), "k--", lw=1, label="-ELBO (sum)")
axes[1].plot(terms[:, 1], "C1", label="KL(q(z|x) || p(z))")
for ax in axes:
    ax.set_xlabel("epoch"); ax.set_ylabel("nats per example (test)"); ax.legend(); ax.grid(alpha=0.3)
plt.show()
print(f"after training: reconstruction {terms[-1, 0]:.1f} + KL {terms[-1, 1]:.1f} = {terms[-1].sum():.1f} nats")
"""),
    md(r"""
At the start the code says nothing about $x$: the KL is near 0 and the reconstruction is poor. Training
buys reconstruction with KL: each nat of KL is information about $x$ that the code carries, and the
reconstruction term falls far more than the KL rises.

## What $\beta$ does to the latent space

$\beta < 1$ makes the KL cheap: the codes spread out and the posteriors shrink, towards an
autoencoder. $\beta > 1$ makes it expensive: the codes huddle at the prior's centre, the classes
overlap, and the reconstructions blur (the $\beta$-VAE; with $\beta\neq 1$ the objective is no longer a bound,
§5.1). Far enough, the posterior *collapses*: $q(z\mid x) = p(z)$ for every $x$, the KL is 0, the code says
nothing and every reconstruction is the average digit. The dashed circle is the prior's 2-sigma circle.
"""),
    code(r"""
betas = (0.1, 1.0, 2.0, 4.0)
fig, axes = plt.subplots(2, len(betas), figsize=(11, 4.6), gridspec_kw={"height_ratios": [3, 1.2]})
t = np.linspace(0, 2 * np.pi, 100)
for col, beta in enumerate(betas):
    m = minivae.VAE(x_dim=64, z_dim=2, hidden=(128,), likelihood="bernoulli", seed=0)
    fit(m, x_train, epochs=60, beta=beta)
    rec, kl = loss_terms(m)
    mu, logvar = m.encode(x_test)
    ax = axes[0, col]
    ax.scatter(mu[:, 0], mu[:, 1], c=y_test, cmap="tab10", s=5, vmin=-0.5, vmax=9.5)
    ax.plot(2 * np.cos(t), 2 * np.sin(t), "k--", lw=0.8)
    ax.set_aspect("equal", "datalim")
    ax.set_title(f"beta = {beta}: recon {rec:.1f}, KL {kl:.1f} nats\nmean posterior std {np.exp(0.5 * logvar).mean():.2f}")
    show(axes[1, col], m.reconstruct(x_test[:8]), 4, "reconstructions of 8 test digits")
plt.show()
"""),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["06_reparameterization"] = [
    md(r"""
# 6. Reparameterization

To train the encoder we need $\nabla_\phi\,\mathbb E_{q_\phi(z\mid x)}[f(z)]$ with $f(z) = \log p(x\mid z)$.
The expectation is over a distribution that *depends on* $\phi$, so we cannot move the gradient inside
and differentiate a sample: sampling is not differentiable.

**Without reparameterization** the standard answer is the score function (REINFORCE) identity,
$\nabla_\phi\mathbb E_q[f(z)] = \mathbb E_q\big[f(z)\,\nabla_\phi\log q_\phi(z\mid x)\big]$: unbiased, needs
no gradient of $f$, and is very noisy (docs/math.md §5.4).

**With it**, $z = \mu + \sigma\varepsilon$ with $\varepsilon\sim\mathcal N(0, I)$ drawn *outside* the
parameters (§3.1), so $\nabla_\phi\mathbb E_\varepsilon[f(\mu+\sigma\varepsilon)] =
\mathbb E_\varepsilon[\nabla_z f\cdot\nabla_\phi z]$: the gradient flows through the sample.

minivae implements both by hand: `model.loss_and_grad(x, eps=..., estimator="score")` is the
score-function estimate of the encoder's gradient (the KL stays analytic; the decoder's gradient is
the usual one), and `minivae.estimators.gradient_samples` returns one gradient estimate per draw of
$\varepsilon$. We compare them on a trained model, for the same batch and the same noise.
"""),
    code(SETUP),
    code(r"""
from minivae import estimators

model = minivae.VAE(x_dim=64, z_dim=2, hidden=(128,), likelihood="bernoulli", seed=0)
fit(model, x_train, epochs=40)
x = x_test[:16]                                               # one batch of 16 test images

S = 2048                                                      # single-sample gradient estimates
grads = {e: estimators.gradient_samples(model, x, S, estimator=e, seed=1) for e in ("reparam", "score")}
enc, dec = estimators.part_slice(model, "enc"), estimators.part_slice(model, "dec")
print("decoder part identical for both estimators:", np.array_equal(grads["reparam"][:, dec], grads["score"][:, dec]))
for e, g in grads.items():
    print(f"{e:8s} trace of the covariance of the encoder gradient (one sample): {estimators.total_variance(g[:, enc]):12.4g}")
"""),
    md(r"""
## Same mean, different spread

Both are unbiased estimators of the same gradient: averaged over the 2048 draws, they agree within the
score estimator's standard error. Left: the distribution of single-sample estimates of one encoder
parameter's gradient (the one where the reparameterized gradient is largest); right: the mean of
every encoder coordinate under both estimators, with the score estimate's $\pm2$ standard errors.
"""),
    code(r"""
g_rep, g_sco = grads["reparam"][:, enc], grads["score"][:, enc]
j = np.argmax(np.abs(g_rep.mean(0)))
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
lo, hi = np.percentile(g_sco[:, j], [0.5, 99.5])
bins = np.linspace(lo, hi, 80)
axes[0].hist(g_sco[:, j], bins=bins, alpha=0.6, label="score function", density=True)
axes[0].hist(g_rep[:, j], bins=bins, alpha=0.8, label="reparameterization", density=True)
axes[0].axvline(g_rep[:, j].mean(), color="k", lw=1)
axes[0].set_xlabel(f"gradient of encoder parameter #{j}"); axes[0].legend(); axes[0].set_yticks([])

sel = np.argsort(np.abs(g_rep.mean(0)))[-40:]                # the 40 largest encoder coordinates
se = g_sco[:, sel].std(0, ddof=1) / np.sqrt(S)
axes[1].errorbar(g_rep[:, sel].mean(0), g_sco[:, sel].mean(0), yerr=2 * se, fmt="o", ms=3, lw=1)
lim = np.abs(g_rep[:, sel].mean(0)).max() * 1.2
axes[1].plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
axes[1].set_xlabel("mean of reparameterized estimates"); axes[1].set_ylabel("mean of score estimates")
axes[1].set_title("40 encoder coordinates, +-2 standard errors")
plt.show()
se_diff = np.sqrt(g_sco.var(0, ddof=1) / S + g_rep.var(0, ddof=1) / S)
live = se_diff > 0                                           # coordinates behind a dead ReLU are 0 for both
z = (g_sco.mean(0) - g_rep.mean(0))[live] / se_diff[live]
print(f"|difference of means| / standard error over the {z.size} live encoder coordinates: "
      f"median {np.median(np.abs(z)):.2f}, share above 3: {np.mean(np.abs(z) > 3):.4f}")
# (both estimators saw the same eps, so the standard error of independent means used here is only a guide)
"""),
    md(r"""
## Variance against the number of samples

An $L$-sample estimate is the mean of $L$ independent single-sample ones, so we form it from disjoint
groups of $L$ rows of the draws above and measure the total variance (the trace of its covariance,
summed over the encoder's parameters). Both fall like $1/L$, but the score function starts orders of
magnitude higher: it would need that many times more samples for the same precision.
"""),
    code(r"""
Ls = [1, 2, 4, 8, 16, 32, 64]
fig, ax = plt.subplots(figsize=(5, 3.4))
for e, g in grads.items():
    var = [estimators.total_variance(g[: S // L * L, enc].reshape(S // L, L, -1).mean(axis=1)) for L in Ls]
    ax.loglog(Ls, var, "o-", label=e)
    ax.loglog(Ls, var[0] / np.array(Ls), "k:", lw=0.8)
ax.set_xlabel("samples L per estimate"); ax.set_ylabel("total variance of the encoder gradient")
ax.set_xticks(Ls, [str(L) for L in Ls]); ax.minorticks_off()
ax.set_title("dotted: var(L = 1) / L"); ax.legend(); ax.grid(alpha=0.3, which="both")
plt.show()
ratio = estimators.total_variance(g_sco) / estimators.total_variance(g_rep)
print(f"score / reparam variance: {ratio:.0f}x, so the score function needs about {ratio:.0f} times as many samples")
"""),
]

# ------------------------------------------------------------------------------------------------
NOTEBOOKS["07_beyond"] = [
    md(r"""
# 7. Beyond the lecture

Three things the lecture stops short of: a tighter bound than the ELBO, deeper latent models, and how to
check by yourself that a hand-written gradient is right.

## The importance-weighted bound

With $k$ samples $z_l\sim q(z\mid x)$ and weights $w_l = p(x, z_l)/q(z_l\mid x)$, each $w_l$ is an unbiased
estimate of $p(x)$, and

$$\mathrm{IWAE}_k(x) = \log\frac1k\sum_{l=1}^k w_l\;\le\;\log p(x)\quad\text{in expectation},$$

with $\mathbb E[\mathrm{IWAE}_1] = $ the ELBO (with a Monte Carlo KL), and $\mathbb E[\mathrm{IWAE}_k]$
non-decreasing in $k$ and tending to $\log p(x)$ (docs/math.md §5.2, Burda et al. 2015). With $k$ in the
thousands it is the standard estimate of $\log p(x)$ (§7).
"""),
    code(SETUP),
    code(r"""
from minivae.evaluate import iw_log_likelihood_per_example

model = minivae.VAE(x_dim=64, z_dim=2, hidden=(128,), likelihood="bernoulli", seed=0)
fit(model, x_train, epochs=60)
elbo = model.elbo(x_test, samples=100).mean()               # analytic KL, 100 samples of log p(x|z)

ks = [1, 2, 5, 10, 30, 100, 300, 1000]
runs = np.array([[iw_log_likelihood_per_example(model, x_test, k, seed=s).mean() for k in ks]
                 for s in range(4)])                        # (4 seeds, len(ks)), mean over the test set

fig, ax = plt.subplots(figsize=(5.5, 3.4))
ax.errorbar(ks, runs.mean(0), yerr=runs.std(0, ddof=1), fmt="o-", capsize=3, label="IW estimate of log p(x), 4 seeds")
ax.axhline(elbo, color="C3", ls="--", label="ELBO")
ax.set_xscale("log"); ax.set_xlabel("k (importance samples)"); ax.set_ylabel("nats per example (test)")
ax.legend(loc="lower right"); ax.grid(alpha=0.3)
plt.show()
print(f"ELBO {elbo:.2f}; IW estimate k = 1: {runs[:, 0].mean():.2f}, k = {ks[-1]}: {runs[:, -1].mean():.2f} nats")
"""),
    md(r"""
The estimate rises quickly with $k$ and then flattens: the gap between $k = 1$ (the ELBO) and the
plateau is roughly the KL from $q(z\mid x)$ to the true posterior, what the encoder's Gaussian fails to
capture. Training *on* the IWAE bound (`objective="iwae"`) spends that gap: its gradient weights each
sample by its normalized importance weight (§5.2), so the model learns a better $\log p(x)$ (measured
here with $k = 1000$ for both models) even though its encoder is not trying to be a tight Gaussian.
"""),
    code(r"""
iwae_model = minivae.VAE(x_dim=64, z_dim=2, hidden=(128,), likelihood="bernoulli", seed=0)
fit(iwae_model, x_train, epochs=60, objective="iwae", samples=5)
for name, m in (("trained on the ELBO", model), ("trained on IWAE, k = 5", iwae_model)):
    ll = iw_log_likelihood_per_example(m, x_test, 1000, seed=0).mean()
    print(f"{name:24s} test ELBO {m.elbo(x_test, samples=100).mean():7.2f}   log p(x) (k = 1000) {ll:7.2f} nats")
"""),
    md(r"""
## Two stochastic layers

Burda et al.'s deeper model stacks a second Gaussian layer on top of the first (docs/math.md §11):
the generative network is $p(z_2)\,p(z_1\mid z_2)\,p(x\mid z_1)$ and the inference network
$q(z_1\mid x)\,q(z_2\mid z_1)$, each conditional an MLP whose head gives a mean and a log-variance.
The log-weight gathers every layer's density,

$$\log w = \log p(x\mid z_1) + \log p(z_1\mid z_2) + \log p(z_2) - \log q(z_1\mid x) - \log q(z_2\mid z_1),$$

and its gradients are written by hand like the rest (§11.3). `estimator="dreg"` replaces the inference
network's IWAE gradient by the doubly reparameterized one of Tucker et al. (§12): the same expectation,
a smaller variance. Here a two-layer model with $z_1$ of 8 and $z_2$ of 2 dimensions is trained on
the same IWAE bound, and scored like the one-layer models above:
"""),
    code(r"""
from minivae.evaluate import evaluate

deep = minivae.VAE(x_dim=64, z_dim=(8, 2), hidden=((128,), (32,)), likelihood="bernoulli", seed=0)
fit(deep, x_train, epochs=60, objective="iwae", samples=5)
deep_dreg = minivae.VAE(x_dim=64, z_dim=(8, 2), hidden=((128,), (32,)), likelihood="bernoulli", seed=0)
fit(deep_dreg, x_train, epochs=60, objective="iwae", samples=5, estimator="dreg")
for name, m in (("one layer (2), IWAE k = 5", iwae_model), ("two layers (8, 2), IWAE k = 5", deep),
                ("two layers (8, 2), DReG k = 5", deep_dreg)):
    r = evaluate(m, x_test, iw_samples=1000)
    print(f"{name:30s} test ELBO {r['elbo']:7.2f}   log p(x) (k = 1000) {r['iw_log_likelihood']:7.2f} +/- "
          f"{r['iw_log_likelihood_se']:.2f}   active units {r.get('active_units_per_layer', r['active_units'])}")

rng = np.random.default_rng(0)
z2 = rng.standard_normal((64, 2))                                  # z2 ~ p(z2) = N(0, I)
z1_mean = deep.backend.generate_down(deep.params, z2)              # the mean of p(z1|z2)
z1_draw = deep.backend.generate_down(deep.params, z2, rng)         # z1 ~ p(z1|z2)
sigmoid = lambda logits: 1 / (1 + np.exp(-logits))                 # the mean of the Bernoulli p(x|z1)
fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.5))
show(axes[0], sigmoid(deep.decode(z1_mean)), 8, "z1 = mean of p(z1|z2)")
show(axes[1], sigmoid(deep.decode(z1_draw)), 8, "z1 ~ p(z1|z2)")
plt.show()
"""),
    md(r"""
With only two dimensions on top, the mean of $p(z_1\mid z_2)$ carries little: most of what makes each
digit itself is in the spread of $z_1$ around it, which the right-hand draws show.
"""),
    md(r"""
## Checking a gradient yourself

Every backward pass in minivae is written by hand, so every one is checked against **centred
differences** $\big(f(\theta + h e_i) - f(\theta - h e_i)\big)/2h$, in float64 (the error is
$O(h^2) + O(\epsilon_\text{mach}/h)$, about $10^{-10}$ at $h = 10^{-5}$; in float32 it would be useless).
`minivae.gradcheck.check_model` does it for a whole model, tensor by tensor, with the noise
$\varepsilon$ held fixed so that the loss is a deterministic function of the parameters:
"""),
    code(r"""
from minivae import gradcheck

rng = np.random.default_rng(0)
small = minivae.VAE(x_dim=64, z_dim=2, hidden=(8,), activation="tanh", likelihood="continuous_bernoulli",
                    dtype="float64", seed=0)
xb, eps = x_test[:5].astype(np.float64), rng.standard_normal((3, 5, 2))       # eps: (L, n, Z)
print(gradcheck.format_report(gradcheck.check_model(small, xb, eps), title="VAE, L = 3"))
print()
print(gradcheck.format_report(gradcheck.check_model(small, xb, eps, objective="iwae", beta=0.5),
                              title="the same model, IWAE bound with beta = 0.5"))
"""),
    md(r"""
The same tools check a piece you write yourself. Take the analytic KL of §3.2,
$\mathrm{KL} = \tfrac12\sum_j(\mu_j^2 + e^{v_j} - 1 - v_j)$, with $\partial\mathrm{KL}/\partial\mu = \mu$ and
$\partial\mathrm{KL}/\partial v = \tfrac12(e^{v} - 1)$. `numerical_grad(f, x)` perturbs the array `x` in
place and calls `f()`; `rel_error` compares two tensors relative to their scale. A correct gradient
agrees to about $10^{-10}$; one with a typical slip (the $\tfrac12$ forgotten) does not:
"""),
    code(r"""
from minivae.distributions import kl_backward, kl_forward
from minivae.gradcheck import numerical_grad, rel_error

mu, logvar = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
kl = lambda: kl_forward(mu, logvar).sum()                     # a scalar function of the arrays

dmu, dlogvar = kl_backward(1.0, mu, logvar)                   # the analytic gradient
wrong_dlogvar = np.expm1(logvar)                              # d/dv without the 1/2: a bug
print(f"dKL/dmu      rel. error {rel_error(dmu, numerical_grad(kl, mu)):.1e}")
print(f"dKL/dlogvar  rel. error {rel_error(dlogvar, numerical_grad(kl, logvar)):.1e}")
print(f"the buggy dKL/dlogvar: rel. error {rel_error(wrong_dlogvar, numerical_grad(kl, logvar)):.1e}")
"""),
    md(r"""
From the command line, `minivae gradcheck [--backend numpy|numba]` runs the whole suite (every piece,
then models over the likelihoods, objectives and activations). Two traps that the suite avoids and you
should too: a ReLU pre-activation within $h$ of 0 makes the finite difference straddle a kink
(`gradcheck.kink_distance`), and a loss so large that $f(\theta\pm h e_i)$ differ only in their last
digits hides any error (`gradcheck.fd_resolution`).
"""),
]


# @@ more notebooks above this line

def main(argv):
    names = argv or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        sys.exit(f"make_notebooks.py: unknown notebook(s) {unknown}; expected some of {list(NOTEBOOKS)}")
    for name in names:
        nb = new_notebook(cells=NOTEBOOKS[name], metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"wrote notebooks/{name}.ipynb")


if __name__ == "__main__":
    main(sys.argv[1:])
