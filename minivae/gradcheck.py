"""Gradient checking: centred differences, ``rel_error`` and a per-tensor report.

Use float64: with h = 1e-5 the centred difference has error O(h^2 f''') + O(eps_mach |f| / h), which
is about 1e-10 in float64 and useless in float32.

    >>> from minivae import VAE, gradcheck
    >>> m = VAE(16, 3, hidden=(8,), dtype="float64")
    >>> report = gradcheck.check_model(m, x, eps)
    >>> gradcheck.format_report(report)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_H = 1e-5
DEFAULT_TOL = 1e-6


def rel_error(a, b) -> float:
    """max|a - b| / max(1e-8, max(|a| + |b|)): the worst difference relative to the tensor's scale.

    Normalizing by the tensor's largest entry (rather than entry by entry) keeps a gradient entry
    that is zero up to rounding from reporting a spurious error of order 1.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1e-8, float(np.max(np.abs(a) + np.abs(b)))))


def numerical_grad(f, x, h=DEFAULT_H, index=None):
    """Centred differences (f(x + h e_i) - f(x - h e_i)) / 2h of a scalar f, perturbing x in place.

    ``x`` is modified during the call and restored; ``index`` limits the check to some flat indices.
    """
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_grad needs a contiguous array it can perturb in place")
    g = np.zeros(flat.shape, dtype=np.float64)
    idx = range(flat.size) if index is None else index
    for i in idx:
        old = flat[i]
        flat[i] = old + h
        fp = float(f())
        flat[i] = old - h
        fm = float(f())
        flat[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g.reshape(x.shape)


def numerical_grad_array(f, x, df, h=DEFAULT_H):
    """Centred differences of sum(f(x) * df) for an array-valued f: the vector-Jacobian product."""
    return numerical_grad(lambda: np.sum(np.asarray(f(x)) * df), x, h)


@dataclass
class TensorCheck:
    name: str
    shape: tuple
    rel_error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.rel_error < self.tol)


def check_model(model, x, eps, h=DEFAULT_H, tol=DEFAULT_TOL, **loss_kwargs):
    """Compare ``model.loss_and_grad`` with centred differences of its loss, tensor by tensor.

    ``eps`` is fixed (None for an Autoencoder), so the loss is a deterministic function of the parameters. Returns a list of
    :class:`TensorCheck`, one per named tensor (``enc.0.W``, ``enc.0.b``, ..., ``dec.head.b``).
    """
    if model.dtype != np.float64:
        raise ValueError("gradient checks need a float64 model (dtype='float64')")
    x = np.asarray(x, dtype=np.float64)
    if eps is not None:          # None: a deterministic model (minivae.Autoencoder) takes no eps
        loss_kwargs["eps"] = _as_float64_eps(eps)
    _, analytic = model.loss_and_grad(x, **loss_kwargs)
    analytic = analytic.copy()
    numeric = numerical_grad(lambda: model.loss_and_grad(x, **loss_kwargs)[0], model.params, h)
    out = []
    for name, slot in model.layout.slots.items():
        sl = slice(slot.offset, slot.offset + slot.size)
        out.append(TensorCheck(name, slot.shape, rel_error(analytic[sl], numeric[sl]), tol))
    return out


def _as_float64_eps(eps):
    """eps in float64: one array, or (S > 1 stochastic layers) a tuple of one array per layer."""
    if isinstance(eps, (list, tuple)):
        return tuple(np.asarray(e, dtype=np.float64) for e in eps)
    return np.asarray(eps, dtype=np.float64)


def format_report(checks, title=None) -> str:
    """A plain-text table: tensor, shape, max relative error, pass/fail."""
    rows = [(c.name, "x".join(map(str, c.shape)), f"{c.rel_error:.2e}", "pass" if c.ok else "FAIL")
            for c in checks]
    head = ("tensor", "shape", "rel error", "result")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    lines = ([title] if title else []) + [line, "-" * len(line)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Each piece alone: a paired forward/backward function against centred differences of its forward
# ----------------------------------------------------------------------------------------------

PIECE_TOL = 1e-7     # a single function is checked tighter than the whole model
KINK_MARGIN = 1e-4   # relu / leaky_relu: pre-activations closer than this to 0 make differences lie

_KINKED = ("relu", "leaky_relu")


def _vjp_check(name, forward, x, dout, analytic, h, tol):
    """TensorCheck of ``analytic`` against centred differences of sum(forward() * dout) w.r.t. ``x``."""
    numeric = numerical_grad(lambda: np.sum(np.asarray(forward()) * dout), x, h)
    return TensorCheck(name, tuple(np.shape(x)), rel_error(analytic, numeric), tol)


def _away_from_zero(rng, shape, lo=0.1, hi=2.0):
    """Random values with |v| in [lo, hi]: inputs of relu / leaky_relu that a step h cannot push across 0."""
    return rng.uniform(lo, hi, size=shape) * rng.choice([-1.0, 1.0], size=shape)


def check_linear(rng, n=4, fan_in=5, fan_out=3, h=DEFAULT_H, tol=PIECE_TOL):
    """linear_forward / linear_backward (docs/math.md §2.1): dx, dW, db."""
    from .layers import linear_backward, linear_forward
    x = rng.standard_normal((n, fan_in))
    W = rng.standard_normal((fan_in, fan_out))
    b = rng.standard_normal(fan_out)
    da = rng.standard_normal((n, fan_out))
    _, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(da, cache)
    f = lambda: linear_forward(x, W, b)[0]  # noqa: E731
    return [_vjp_check("linear dx", f, x, da, dx, h, tol),
            _vjp_check("linear dW", f, W, da, dW, h, tol),
            _vjp_check("linear db", f, b, da, db, h, tol)]


def check_activation(kind, rng, n=4, width=5, h=DEFAULT_H, tol=PIECE_TOL):
    """activation_forward / activation_backward (§2.2). Kinked activations are probed away from 0."""
    from .layers import activation_backward, activation_forward
    shape = (n, width)
    a = _away_from_zero(rng, shape) if kind in _KINKED else 2.0 * rng.standard_normal(shape)
    dh = rng.standard_normal(shape)
    _, cache = activation_forward(a, kind)
    da = activation_backward(dh, cache)
    return [_vjp_check(f"{kind} da", lambda: activation_forward(a, kind)[0], a, dh, da, h, tol)]


def check_reparam(rng, L=3, n=4, z_dim=2, h=DEFAULT_H, tol=PIECE_TOL):
    """reparam_forward / reparam_backward (§3.1): dmu, dlogvar with eps fixed."""
    from .distributions import reparam_backward, reparam_forward
    mu = rng.standard_normal((n, z_dim))
    logvar = rng.standard_normal((n, z_dim))
    eps = rng.standard_normal((L, n, z_dim))
    dz = rng.standard_normal((L, n, z_dim))
    _, cache = reparam_forward(mu, logvar, eps)
    dmu, dlogvar = reparam_backward(dz, cache)
    f = lambda: reparam_forward(mu, logvar, eps)[0]  # noqa: E731
    return [_vjp_check("reparam dmu", f, mu, dz, dmu, h, tol),
            _vjp_check("reparam dlogvar", f, logvar, dz, dlogvar, h, tol)]


def check_kl(rng, n=4, z_dim=2, h=DEFAULT_H, tol=PIECE_TOL):
    """kl_forward / kl_backward (§3.2): dmu, dlogvar."""
    from .distributions import kl_backward, kl_forward
    mu = rng.standard_normal((n, z_dim))
    logvar = rng.standard_normal((n, z_dim))
    dkl = rng.standard_normal((n, z_dim))
    dmu, dlogvar = kl_backward(dkl, mu, logvar)
    f = lambda: kl_forward(mu, logvar)  # noqa: E731
    return [_vjp_check("kl dmu", f, mu, dkl, dmu, h, tol),
            _vjp_check("kl dlogvar", f, logvar, dkl, dlogvar, h, tol)]


# logits where the continuous Bernoulli changes formula or is hardest: 0, the Taylor switch at
# |l| = 1e-2 (both sides), small and large |l|
CB_SPECIAL_LOGITS = (0.0, 1e-3, -1e-3, 1e-2 - 2e-6, 1e-2 + 2e-6, -1e-2 + 2e-6, -1e-2 - 2e-6,
                     0.5, -1.0, 20.0, -20.0)


def make_inputs(likelihood, n, x_dim, rng, dtype=np.float64):
    """Data suited to a likelihood: binary pixels for "bernoulli", grey levels in (0, 1) for
    "continuous_bernoulli", real values for "gaussian" (each module's ``draw_x``). Shape (n, x_dim)."""
    from . import likelihoods
    return np.ascontiguousarray(likelihoods.draw_x(likelihood, rng, (n, x_dim)), dtype=dtype)


def check_loglik(likelihood, rng, L=2, n=3, x_dim=4, var_floor=1e-4, h=DEFAULT_H, tol=PIECE_TOL):
    """loglik_forward / loglik_backward (§4) w.r.t. the decoder head, with a random upstream dll.

    The continuous Bernoulli's head holds the special logits of CB_SPECIAL_LOGITS among random ones.
    """
    from .distributions import head_width, loglik_backward, loglik_forward
    x = make_inputs(likelihood, n, x_dim, rng)
    K = head_width(likelihood, x_dim)
    head = 2.0 * rng.standard_normal((L, n, K))
    if likelihood == "continuous_bernoulli":
        flat = head.reshape(-1)
        m = min(flat.size, len(CB_SPECIAL_LOGITS))
        flat[:m] = CB_SPECIAL_LOGITS[:m]
    dll = rng.standard_normal((L, n))
    dhead = loglik_backward(likelihood, x, head, dll, var_floor)
    f = lambda: loglik_forward(likelihood, x, head, var_floor)  # noqa: E731
    return [_vjp_check(f"{likelihood} dhead", f, head, dll, dhead, h, tol)]


def check_elbo_loss(rng, L=2, n=3, z_dim=2, beta=0.7, h=DEFAULT_H, tol=PIECE_TOL):
    """elbo_loss (§5.1): dll and dkl."""
    from .objectives import elbo_loss
    ll = rng.standard_normal((L, n))
    kl = rng.uniform(0.0, 2.0, size=(n, z_dim))
    _, dll, dkl = elbo_loss(ll, kl, beta)
    f = lambda: elbo_loss(ll, kl, beta)[0]  # noqa: E731
    return [_vjp_check("elbo_loss dll", f, ll, 1.0, dll, h, tol),
            _vjp_check("elbo_loss dkl", f, kl, 1.0, dkl, h, tol)]


def check_iwae_loss(rng, k=4, n=3, h=DEFAULT_H, tol=PIECE_TOL):
    """iwae_loss (§5.2): dlogw = -softmax(logw) / n."""
    from .objectives import iwae_loss
    logw = 3.0 * rng.standard_normal((k, n))
    _, dlogw = iwae_loss(logw)
    return [_vjp_check("iwae_loss dlogw", lambda: iwae_loss(logw)[0], logw, 1.0, dlogw, h, tol)]


def check_gauss_logpdf(rng, L=2, n=3, z_dim=2, h=DEFAULT_H, tol=PIECE_TOL):
    """gauss_logpdf / gauss_logpdf_backward (§11.1): dz, dmu, dlogvar."""
    from .distributions import gauss_logpdf, gauss_logpdf_backward
    z, mu, lv = (rng.standard_normal((L, n, z_dim)) for _ in range(3))
    g = rng.standard_normal((L, n))
    dz, dmu, dlv = gauss_logpdf_backward(g, z, mu, lv)
    f = lambda: gauss_logpdf(z, mu, lv)  # noqa: E731
    return [_vjp_check("log N(z; mu, logvar) dz", f, z, g, dz, h, tol),
            _vjp_check("log N(z; mu, logvar) dmu", f, mu, g, dmu, h, tol),
            _vjp_check("log N(z; mu, logvar) dlogvar", f, lv, g, dlv, h, tol)]


def check_log_prior_and_posterior(rng, L=2, n=3, z_dim=2, h=DEFAULT_H, tol=PIECE_TOL):
    """log_prior / log_prior_backward and log_posterior_eps / log_posterior_eps_backward (§3.3)."""
    from .distributions import log_posterior_eps, log_posterior_eps_backward, log_prior, log_prior_backward
    z = rng.standard_normal((L, n, z_dim))
    eps = rng.standard_normal((L, n, z_dim))
    g = rng.standard_normal((L, n))
    out = [_vjp_check("log p(z) dz", lambda: log_prior(z), z, g, log_prior_backward(g, z), h, tol)]
    for name, shape in (("log q dlogvar", (n, z_dim)), ("log q dlogvar (L, n, Z)", (L, n, z_dim))):
        lv = rng.standard_normal(shape)
        out.append(_vjp_check(name, lambda: log_posterior_eps(lv, eps), lv, g,
                              log_posterior_eps_backward(g, lv), h, tol))
    return out


def check_stack_elbo_loss(rng, L=2, n=3, z_dim=2, beta=0.7, h=DEFAULT_H, tol=PIECE_TOL):
    """stack_elbo_loss (§11.2): dll, dmid, dkl."""
    from .objectives import stack_elbo_loss
    ll, mid = rng.standard_normal((L, n)), rng.standard_normal((L, n))
    kl = rng.uniform(0.0, 2.0, size=(L, n, z_dim))
    _, dll, dmid, dkl = stack_elbo_loss(ll, mid, kl, beta)
    f = lambda: stack_elbo_loss(ll, mid, kl, beta)[0]  # noqa: E731
    return [_vjp_check("stack_elbo_loss dll", f, ll, 1.0, dll, h, tol),
            _vjp_check("stack_elbo_loss dmid", f, mid, 1.0, dmid, h, tol),
            _vjp_check("stack_elbo_loss dkl", f, kl, 1.0, dkl, h, tol)]


def check_sq_error(rng, n=3, x_dim=4, h=DEFAULT_H, tol=PIECE_TOL):
    """sq_error_forward / sq_error_backward of the Autoencoder (§13.2) w.r.t. the logits."""
    from .kernels.numpy_ae import sq_error_backward, sq_error_forward
    x = rng.random((n, x_dim))
    logits = 2.0 * rng.standard_normal((n, x_dim))
    de = rng.standard_normal(n)
    _, cache = sq_error_forward(x, logits)
    dlogits = sq_error_backward(de, cache)
    return [_vjp_check("ae sq_error dlogits", lambda: sq_error_forward(x, logits)[0], logits, de,
                       dlogits, h, tol)]


def check_score(rng, L=3, n=4, z_dim=2, h=DEFAULT_H, tol=PIECE_TOL):
    """score_backward (§5.4): d/d(mu, logvar) of sum w log q(z|x) with z held fixed."""
    from .distributions import reparam_forward
    from .estimators import log_q_fixed_z, score_backward
    mu = rng.standard_normal((n, z_dim))
    logvar = rng.standard_normal((n, z_dim))
    eps = rng.standard_normal((L, n, z_dim))
    w = rng.standard_normal((L, n))
    z, _ = reparam_forward(mu, logvar, eps)          # drawn once, then held fixed
    dmu, dlogvar = score_backward(w, eps, logvar)
    f = lambda: log_q_fixed_z(z, mu, logvar)  # noqa: E731
    return [_vjp_check("score dmu", f, mu, w, dmu, h, tol),
            _vjp_check("score dlogvar", f, logvar, w, dlogvar, h, tol)]


def check_pieces(rng, tol=PIECE_TOL):
    """Every paired function alone, in float64: the checks ``run_suite`` prints under "pieces"."""
    from .distributions import LIKELIHOODS
    from .layers import ACTIVATIONS
    checks = check_linear(rng, tol=tol)
    for kind in ACTIVATIONS:
        checks += check_activation(kind, rng, tol=tol)
    checks += check_reparam(rng, tol=tol) + check_kl(rng, tol=tol)
    for lik in LIKELIHOODS:
        checks += check_loglik(lik, rng, tol=tol)
    checks += check_elbo_loss(rng, tol=tol) + check_iwae_loss(rng, tol=tol)
    checks += (check_gauss_logpdf(rng, tol=tol) + check_log_prior_and_posterior(rng, tol=tol)
               + check_stack_elbo_loss(rng, tol=tol))
    checks += check_sq_error(rng, tol=tol) + check_score(rng, tol=tol)
    return checks


# ----------------------------------------------------------------------------------------------
# Where finite differences cannot be trusted: kinks of relu / leaky_relu and of free bits
# ----------------------------------------------------------------------------------------------

def preactivations(model, x, eps):
    """Every hidden pre-activation ``a = h W + b`` of one pass (every inference and generative block), as a list.

    Computed with the reference math (kernels/numpy_.py) from ``model.params``, whatever the backend.
    ``eps`` as ``model.loss_and_grad`` takes it (for S > 1, one array per stochastic layer).
    """
    from .kernels.numpy_ import NumpyBackend
    x = np.asarray(x, dtype=model.dtype)
    eps = model._eps(eps, x.shape[0], 1)
    f = NumpyBackend(model.spec, model.dtype).forward(model.params, x, eps)
    blocks = [ql["block"] for ql in f["q"]] + [pl["block"] for pl in f["p"][2:]] + [f["dec"]]
    return [ac[0] for mlp_caches, _ in blocks for _, ac in mlp_caches]


def ae_preactivations(model, x):
    """Every hidden pre-activation of an Autoencoder's pass (encoder on x, decoder on z = code), a list."""
    from .layers import activation_forward, linear_forward
    layout, act = model.layout, model.spec.activation
    out, h = [], np.asarray(x, dtype=model.dtype)
    for part in ("enc", "dec"):
        layers = layout.layer_views(model.params, part)
        for W, b in layers[:-1]:
            a, _ = linear_forward(h, W, b)
            out.append(a)
            h, _ = activation_forward(a, act)
        h, _ = linear_forward(h, *layers[-1])
    return out


def ae_kink_distance(model, x):
    """The smallest |pre-activation| of an Autoencoder's relu / leaky_relu pass (inf otherwise)."""
    if model.spec.activation not in _KINKED:
        return np.inf
    return min((float(np.min(np.abs(a))) for a in ae_preactivations(model, x) if a.size), default=np.inf)


def kink_distance(model, x, eps, free_bits=0.0):
    """How far the point is from a kink of the loss (inf when the loss is smooth there).

    relu / leaky_relu: the smallest |pre-activation|. Free bits: the smallest |KL_j - free_bits|
    over latent dimensions j (batch-mean KL). Centred differences with step h are trustworthy
    only when this is well above h times the size of the inputs (KINK_MARGIN = 1e-4 is safe for
    the small models of the checks).
    """
    from .distributions import kl_forward
    d = np.inf
    if model.spec.activation in _KINKED:
        for a in preactivations(model, x, eps):
            if a.size:
                d = min(d, float(np.min(np.abs(a))))
    if free_bits > 0:
        mu, logvar = model.encode(x)
        kl_dim = kl_forward(mu, logvar).mean(axis=0)
        d = min(d, float(np.min(np.abs(kl_dim - free_bits))))
    return d


def fd_resolution(loss, h=DEFAULT_H) -> float:
    """The smallest derivative a float64 centred difference resolves: about eps_mach |loss| / h.

    Each loss value carries a rounding error of order eps_mach |loss| (taken as at least 1: the
    terms that cancel into a small loss are themselves of order 1), and the difference divides it
    by 2h. A gradient entry far below this is noise for the oracle, however right the analytic one is.
    """
    return float(np.finfo(np.float64).eps * max(1.0, abs(float(loss))) / h)


def resolvable(model, x, eps, tol=DEFAULT_TOL, h=DEFAULT_H, margin=10.0, **loss_kwargs) -> bool:
    """True when central differences can check every tensor of the model to ``tol`` at this point.

    A tensor passes if its gradient is exactly zero (a dead relu path: both sides give exact
    zeros) or if its largest entry times ``tol`` is ``margin`` times above :func:`fd_resolution`.
    Tiny tensors appear e.g. behind two negative leaky_relu units (slope 0.01^2) with beta = 0.
    """
    loss, g = model.loss_and_grad(np.asarray(x, dtype=np.float64), eps=_as_float64_eps(eps), **loss_kwargs)
    res = fd_resolution(loss, h)
    for slot in model.layout.slots.values():
        scale = float(np.max(np.abs(g[slot.offset:slot.offset + slot.size])))
        if scale != 0.0 and scale * tol <= margin * res:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# The suite printed by `minivae gradcheck`
# ----------------------------------------------------------------------------------------------

SUITE_X_DIM, SUITE_Z_DIM, SUITE_N, SUITE_HIDDEN = 6, 3, 4, (5, 4)
SUITE_STACK_Z, SUITE_STACK_HIDDEN = (3, 2), ((5, 4), (3,))     # the two-layer cases (§11)


def suite_cases():
    """(likelihood, objective, activation, hidden, samples, beta, free_bits) of every model case.

    Every likelihood x objective with tanh (smooth) and two hidden layers, L = 3 or k = 4 samples,
    beta = 0.7; then relu and leaky_relu cases (points drawn away from the
    kinks), and a softplus case without hidden layers with free bits.
    """
    from .distributions import LIKELIHOODS
    from .objectives import OBJECTIVES
    cases = [(lik, o, "tanh", SUITE_HIDDEN, 3 if o == "elbo" else 4, 0.7, 0.0)
             for lik in LIKELIHOODS for o in OBJECTIVES]
    cases.append(("continuous_bernoulli", "iwae", "relu", SUITE_HIDDEN, 4, 0.7, 0.0))
    cases.append(("bernoulli", "elbo", "leaky_relu", SUITE_HIDDEN, 2, 1.0, 0.0))
    cases.append(("gaussian", "elbo", "softplus", (), 2, 1.3, "mid"))
    return cases


def stack_suite_cases():
    """(likelihood, objective, estimator) of every two-layer case: each likelihood x objective with
    the reparameterization gradient, and IWAE with DReG (its generative part: the dec* tensors)."""
    from .distributions import LIKELIHOODS
    from .objectives import OBJECTIVES
    return ([(lik, o, "reparam") for lik in LIKELIHOODS for o in OBJECTIVES]
            + [(lik, "iwae", "dreg") for lik in LIKELIHOODS])


def _suite_point(model, likelihood, samples, free_bits, rng, loss_kwargs, tol, tries=50):
    """x, eps (and the free-bits floor) for one case, redrawn until the loss is smooth around them
    and every tensor's gradient is large enough for central differences to resolve."""
    for _ in range(tries):
        x = make_inputs(likelihood, SUITE_N, model.spec.x_dim, rng)
        eps = tuple(rng.standard_normal((samples, SUITE_N, z)) for z in model.spec.z_dims)
        eps = eps[0] if len(eps) == 1 else eps
        fb = free_bits
        if fb == "mid":
            # halfway between the two smallest per-dimension KLs: one dimension is floored, others not
            from .distributions import kl_forward
            mu, logvar = model.encode(x)
            kl_dim = np.sort(kl_forward(mu, logvar).mean(axis=0))
            fb = float(0.5 * (kl_dim[0] + kl_dim[1]))
        if (kink_distance(model, x, eps, fb) > KINK_MARGIN
                and resolvable(model, x, eps, tol, free_bits=fb, **loss_kwargs)):
            return x, eps, fb
    raise RuntimeError("could not find a point away from the kinks of the loss where central "
                       "differences resolve every tensor")


def run_model_cases(backend="numpy", seed=0, tol=DEFAULT_TOL):
    """[(title, short name, [TensorCheck])] for every case of :func:`suite_cases`, in float64."""
    from .model import VAE
    rng = np.random.default_rng(seed)
    results = []
    for lik, objective, act, hidden, samples, beta, fb in suite_cases():
        model = VAE(SUITE_X_DIM, SUITE_Z_DIM, hidden=hidden, activation=act, likelihood=lik,
                    dtype="float64", seed=seed, backend=backend)
        kw = dict(beta=beta, objective=objective)
        x, eps, fb = _suite_point(model, lik, samples, fb, rng, kw, tol)
        checks = check_model(model, x, eps, tol=tol, free_bits=fb, **kw)
        s = "L" if objective == "elbo" else "k"
        extra = f" free_bits={fb:.3g}" if fb else ""
        title = (f"{lik} / {objective}: {act}, hidden={hidden}, x_dim={SUITE_X_DIM}, "
                 f"z_dim={SUITE_Z_DIM}, n={SUITE_N}, {s}={samples}, beta={beta}{extra} "
                 f"(backend {backend}, float64)")
        name = f"{lik} {objective} {act}" + (" free_bits" if fb else "")
        results.append((title, name, checks))
    from .kernels import backend_class, resolve_backend
    stack_estimators = backend_class(resolve_backend(backend), stack=True).estimators
    for lik, objective, estimator in stack_suite_cases():
        if estimator not in stack_estimators:      # e.g. score: the numpy reference's only
            continue
        model = VAE(SUITE_X_DIM, SUITE_STACK_Z, hidden=SUITE_STACK_HIDDEN, activation="tanh", likelihood=lik,
                    dtype="float64", seed=seed, backend=backend)
        kw = dict(beta=0.7, objective=objective, estimator=estimator)
        samples = 3 if objective == "elbo" else 4
        x, eps, _ = _suite_point(model, lik, samples, 0.0, rng, kw, tol)
        checks = check_model(model, x, eps, tol=tol, **kw)
        what = ""
        if estimator == "dreg":       # its inference part is no derivative of the loss (§12)
            checks = [c for c in checks if c.name.startswith("dec")]
            what = ", generative tensors"
        s = "L" if objective == "elbo" else "k"
        title = (f"S=2 {lik} / {objective} ({estimator}{what}): tanh, z_dim={SUITE_STACK_Z}, "
                 f"hidden={SUITE_STACK_HIDDEN}, x_dim={SUITE_X_DIM}, n={SUITE_N}, {s}={samples}, beta=0.7 "
                 f"(backend {backend}, float64)")
        results.append((title, f"S=2 {lik} {objective} {estimator}", checks))
    return results


AE_ACTIVATIONS = ("tanh", "relu", "softplus", "leaky_relu")


def run_ae_cases(backend="numpy", seed=0, tol=DEFAULT_TOL, tries=50):
    """[(title, short name, [TensorCheck])]: the Autoencoder's loss_and_grad (§13) in float64, one
    case per activation, at points away from the kinks of relu / leaky_relu."""
    from .autoencoder import Autoencoder
    rng = np.random.default_rng(seed)
    results = []
    for act in AE_ACTIVATIONS:
        model = Autoencoder(SUITE_X_DIM, SUITE_Z_DIM, hidden=SUITE_HIDDEN, activation=act,
                            dtype="float64", seed=seed, backend=backend)
        for _ in range(tries):
            x = rng.random((SUITE_N, SUITE_X_DIM))
            if ae_kink_distance(model, x) > KINK_MARGIN:
                break
        else:
            raise RuntimeError("could not find a point away from the kinks of the Autoencoder's loss")
        title = (f"autoencoder (squared error, sigmoid output): {act}, hidden={SUITE_HIDDEN}, "
                 f"x_dim={SUITE_X_DIM}, z_dim={SUITE_Z_DIM}, n={SUITE_N} (backend {backend}, float64)")
        results.append((title, f"autoencoder {act}", check_model(model, x, None, tol=tol)))
    return results


def format_summary(rows) -> str:
    """Table of (case, worst rel error, tol, ok) rows."""
    rows = [(c, f"{e:.2e}", f"{t:.0e}", "pass" if ok else "FAIL") for c, e, t, ok in rows]
    head = ("case", "worst rel error", "tol", "result")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    return "\n".join([line, "-" * len(line)]
                     + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows])


def run_suite(backend="numpy", seed=0, tol=DEFAULT_TOL, out=print) -> bool:
    """Gradient-check every likelihood x objective on a small float64 model, the Autoencoder (on
    the backends it has: numpy, numba), and every piece alone.

    Prints, through ``out``, one table per case (tensor, shape, rel error, pass/fail), a table of
    the pieces (checked below min(tol, PIECE_TOL)) and a summary; returns True iff all pass.
    The pieces are the NumPy math of layers/distributions/objectives whatever ``backend`` is;
    the model cases run ``loss_and_grad`` of ``backend``.
    """
    summary = []
    from .autoencoder import BACKENDS as AE_BACKENDS
    ae_cases = run_ae_cases(backend, seed, tol) if backend in AE_BACKENDS else []
    for title, name, checks in run_model_cases(backend, seed, tol) + ae_cases:
        out(format_report(checks, title=title))
        out("")
        summary.append((name, max(c.rel_error for c in checks), tol, all(c.ok for c in checks)))
    piece_tol = min(tol, PIECE_TOL)
    pieces = check_pieces(np.random.default_rng(seed), tol=piece_tol)
    out(format_report(pieces, title=f"pieces: each paired function alone (float64, tol {piece_tol:.0e})"))
    out("")
    for c in pieces:
        summary.append((f"piece {c.name}", c.rel_error, piece_tol, c.ok))
    out("summary")
    out(format_summary(summary))
    ok = all(r[3] for r in summary)
    out(f"gradient check {'passed' if ok else 'FAILED'}: {sum(r[3] for r in summary)}/{len(summary)} cases")
    return ok
