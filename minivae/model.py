"""The VAE: configuration, parameters, input checks and the public API (docs/math.md §6).

The model holds the flat parameter vector and a backend chosen by name; all arithmetic happens in
the backend (``minivae.kernels``). The model itself never imports numba.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import checkpoint
from . import distributions as dist
from .kernels import get_backend
from .layers import ACTIVATIONS
from .objectives import check_estimator, check_objective
from .params import ParamLayout

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the shape and the meaning of the parameters."""
    x_dim: int
    z_dim: int
    hidden: tuple = (400,)
    dec_hidden: tuple | None = None      # None: the mirror of ``hidden``
    activation: str = "relu"
    likelihood: str = "bernoulli"
    var_floor: float = dist.DEFAULT_VAR_FLOOR

    def __post_init__(self):
        for name in ("x_dim", "z_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        object.__setattr__(self, "x_dim", int(self.x_dim))
        object.__setattr__(self, "z_dim", int(self.z_dim))
        hidden = _int_tuple("hidden", self.hidden)
        object.__setattr__(self, "hidden", hidden)
        dec = hidden[::-1] if self.dec_hidden is None else _int_tuple("dec_hidden", self.dec_hidden)
        object.__setattr__(self, "dec_hidden", dec)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        dist.check_likelihood(self.likelihood)
        if not (np.isfinite(self.var_floor) and self.var_floor > 0):
            raise ValueError(f"var_floor must be a positive number, got {self.var_floor!r}")
        object.__setattr__(self, "var_floor", float(self.var_floor))

    @property
    def head_width(self) -> int:
        return dist.head_width(self.likelihood, self.x_dim)

    @property
    def layout(self) -> ParamLayout:
        layers = []
        fan_in = self.x_dim
        for i, h in enumerate(self.hidden):
            layers.append((f"enc.{i}", fan_in, h))
            fan_in = h
        layers.append(("enc.head", fan_in, 2 * self.z_dim))
        fan_in = self.z_dim
        for i, h in enumerate(self.dec_hidden):
            layers.append((f"dec.{i}", fan_in, h))
            fan_in = h
        layers.append(("dec.head", fan_in, self.head_width))
        return ParamLayout(layers)

    def to_dict(self):
        d = asdict(self)
        d["hidden"], d["dec_hidden"] = list(self.hidden), list(self.dec_hidden)
        return d


def _int_tuple(name, v):
    if isinstance(v, (int, np.integer)):
        v = (v,)
    try:
        t = tuple(int(h) for h in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive integers, got {v!r}") from None
    if any(h < 1 for h in t):
        raise ValueError(f"{name} must be a sequence of positive integers, got {v!r}")
    return t


class VAE:
    """A Gaussian-latent VAE with MLP encoder and decoder and a choice of pixel likelihood.

    >>> model = VAE(64, 2, hidden=(32,), likelihood="bernoulli", dtype="float64")
    >>> loss, grad = model.loss_and_grad(x)         # batch mean of -ELBO, gradient like model.params
    """

    def __init__(self, x_dim, z_dim, hidden=(400,), activation="relu", likelihood="bernoulli",
                 dtype="float32", seed=0, backend="numpy", dec_hidden=None,
                 var_floor=dist.DEFAULT_VAR_FLOOR):
        self.spec = ModelSpec(x_dim, z_dim, hidden, dec_hidden, activation, likelihood, var_floor)
        try:   # "float32", np.float32 and np.dtype("float32") all name the same dtype
            name = np.dtype(dtype).name if dtype is not None else None
        except TypeError:
            name = None
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = np.dtype(name)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.layout = self.spec.layout
        self._params = self.layout.init(self.rng, self.dtype)
        self.backend_name = backend
        self.backend = get_backend(backend)(self.spec, self.dtype)

    # -- configuration ------------------------------------------------------------------------
    def __getattr__(self, name):
        # x_dim, z_dim, hidden, activation, likelihood, ... read through to the spec
        spec = self.__dict__.get("spec")
        if spec is not None and name in ModelSpec.__dataclass_fields__:
            return getattr(spec, name)
        raise AttributeError(name)

    def config(self) -> dict:
        return dict(self.spec.to_dict(), dtype=self.dtype.name, seed=self.seed, backend=self.backend_name)

    @property
    def params(self) -> np.ndarray:
        """The flat, contiguous, writable parameter vector the model computes from."""
        return self._params

    @params.setter
    def params(self, value):
        value = np.asarray(value)
        if value.shape != self._params.shape:
            raise ValueError(f"params must have shape {self._params.shape}, got {value.shape}")
        self._params[...] = value

    def views(self, flat=None) -> dict:
        """Named views (``enc.0.W``, ...) into ``flat`` (default: the parameters)."""
        return self.layout.views(self._params if flat is None else flat)

    # -- input checks -------------------------------------------------------------------------
    def check_x(self, x) -> np.ndarray:
        unit = None if self.spec.likelihood == "gaussian" else f"the {self.spec.likelihood} likelihood"
        return check_x(x, self.spec.x_dim, self.dtype, unit)

    def _eps(self, eps, n, samples):
        Z = self.spec.z_dim
        if eps is None:
            if not isinstance(samples, (int, np.integer)) or samples < 1:
                raise ValueError(f"samples must be a positive integer, got {samples!r}")
            return self.rng.standard_normal((samples, n, Z)).astype(self.dtype)
        eps = np.asarray(eps, dtype=self.dtype)
        if eps.ndim == 2:
            eps = eps[None]
        if eps.ndim != 3 or eps.shape[1:] != (n, Z) or eps.shape[0] < 1:
            raise ValueError(f"eps must have shape ({n}, {Z}) or (L, {n}, {Z}), got {eps.shape}")
        if not np.isfinite(eps).all():
            raise ValueError("eps must be finite: it contains NaN or inf")
        return np.ascontiguousarray(eps)

    def _z(self, z):
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.spec.z_dim:
            raise ValueError(f"z must be a 2-D array (m, {self.spec.z_dim}), got shape {z.shape}")
        z = np.ascontiguousarray(z, dtype=self.dtype)
        if not np.isfinite(z).all():
            raise ValueError("z must be finite: it contains NaN or inf")
        return z

    # -- the math, delegated to the backend ----------------------------------------------------
    def loss_and_grad(self, x, eps=None, beta=1.0, objective="elbo", samples=1, free_bits=0.0,
                      grad=None, estimator="reparam"):
        """Batch mean of the negative bound (nats/example) and its gradient, shaped like ``params``.

        ``eps``: (n, Z) or (L, n, Z); drawn from the model's generator when None (``samples`` = L,
        or k for IWAE). ``beta`` weights the KL (ELBO) or log p(z) - log q(z|x) (IWAE).
        ``free_bits`` is a per-dimension floor on the batch-mean KL (ELBO only).  docs/math.md §5-§6
        ``estimator``: how the encoder's gradient is estimated, "reparam" (the pathwise derivative of
        the loss) or "score" (REINFORCE, §5.4: ELBO, numpy backend); the loss is the same.
        """
        check_objective(objective)
        check_estimator(estimator)
        if estimator != "reparam":
            from .estimators import check_estimator_use
            check_estimator_use(estimator, objective, self.backend_name)
        _check_number("beta", beta, lo=0.0)
        _check_number("free_bits", free_bits, lo=0.0)
        if free_bits > 0 and objective != "elbo":
            raise ValueError("free_bits applies to the ELBO objective only")
        x = self.check_x(x)
        eps = self._eps(eps, x.shape[0], samples)
        kw = {} if estimator == "reparam" else {"estimator": estimator}
        return self.backend.loss_and_grad(self._params, x, eps, beta=beta, objective=objective,
                                          free_bits=free_bits, grad=grad, **kw)

    def elbo(self, x, eps=None, samples=1):
        """Per-example ELBO (analytic KL, beta = 1), shape (n,).  §5.1"""
        x = self.check_x(x)
        return self.backend.bound(self._params, x, self._eps(eps, x.shape[0], samples), "elbo")

    def iwae_bound(self, x, eps=None, samples=1):
        """Per-example importance-weighted bound with k = ``samples`` (or eps.shape[0]), shape (n,).  §5.2"""
        x = self.check_x(x)
        return self.backend.bound(self._params, x, self._eps(eps, x.shape[0], samples), "iwae")

    def encode(self, x):
        """q(z|x): returns mu, logvar, each (n, Z)."""
        return self.backend.encode(self._params, self.check_x(x))

    def decode(self, z):
        """The decoder's distribution parameters for z (m, Z): logits (m, D) for the Bernoulli
        likelihoods; for "gaussian", (mean, logvar) where exp(logvar) = var_floor + exp(head)."""
        head = self.backend.decode(self._params, self._z(z))
        if self.spec.likelihood == "gaussian":
            D = self.spec.x_dim
            return head[:, :D], np.log(dist.gaussian_var(head[:, D:], self.spec.var_floor))
        return head

    def _head_to_x(self, head, sample, rng):
        if sample:
            return dist.likelihood_sample(self.spec.likelihood, head, self.spec.x_dim, rng,
                                          self.spec.var_floor)
        return dist.likelihood_mean(self.spec.likelihood, head, self.spec.x_dim)

    def sample(self, n, seed=None, mean=True):
        """n draws x ~ p(x|z), z ~ N(0, I); the mean of p(x|z) when ``mean`` (the usual picture)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng(seed) if seed is not None else self.rng
        z = rng.standard_normal((n, self.spec.z_dim)).astype(self.dtype)
        return self._head_to_x(self.backend.decode(self._params, z), not mean, rng)

    def reconstruct(self, x, sample=False, seed=None):
        """Decode the posterior mean of x: the mean of p(x|z=mu), or a sample from it."""
        mu, _ = self.encode(x)
        rng = np.random.default_rng(seed) if seed is not None else self.rng
        return self._head_to_x(self.backend.decode(self._params, mu), sample, rng)

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path, extra_meta=None, extra_arrays=None):
        """Write config and parameters to an ``.npz`` file, atomically."""
        meta = {"kind": "model", "config": self.config()}
        meta.update(extra_meta or {})
        checkpoint.save(path, meta, dict(extra_arrays or {}, params=self._params))

    @classmethod
    def from_config(cls, config: dict, backend=None):
        c = dict(config)
        try:
            return cls(c["x_dim"], c["z_dim"], hidden=tuple(c["hidden"]), activation=c["activation"],
                       likelihood=c["likelihood"], dtype=c["dtype"], seed=c.get("seed", 0),
                       backend=backend or c.get("backend", "numpy"), dec_hidden=tuple(c["dec_hidden"]),
                       var_floor=c.get("var_floor", dist.DEFAULT_VAR_FLOOR))
        except (KeyError, TypeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint config is incomplete or malformed ({e})") from None

    @classmethod
    def load(cls, path, backend=None):
        """Read a checkpoint written by :meth:`save` (or by training); ``backend`` overrides the saved one."""
        meta, arrays = checkpoint.load(path)
        if meta.get("kind") == "ae":
            raise checkpoint.CheckpointError(f"{path}: an Autoencoder checkpoint, not a VAE's; "
                                             f"load it with minivae.Autoencoder.load")
        if "config" not in meta or "params" not in arrays:
            raise checkpoint.CheckpointError(f"{path}: checkpoint has no model config or parameters")
        model = cls.from_config(meta["config"], backend=backend)
        p = arrays["params"]
        if p.shape != model.params.shape or p.dtype != model.dtype:
            raise checkpoint.CheckpointError(
                f"{path}: parameters have shape {p.shape} and dtype {p.dtype}, the config implies "
                f"{model.params.shape} {model.dtype}")
        model.params[...] = p
        return model


def check_x(x, x_dim, dtype, unit_interval_for=None) -> np.ndarray:
    """x as a C-contiguous (n, x_dim) array of ``dtype``, or a ValueError saying what was expected.

    ``unit_interval_for``: what needs x in [0, 1] (e.g. "the bernoulli likelihood"), None if nothing.
    Shared by VAE and Autoencoder.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array (n, {x_dim}), got {x.ndim}-D shape {x.shape}")
    if x.shape[1] != x_dim:
        raise ValueError(f"x must have {x_dim} columns (x_dim), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x must have at least one row")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"x must be a real numeric array, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=dtype)
    if not np.isfinite(x).all():
        raise ValueError("x must be finite: it contains NaN or inf")
    if unit_interval_for is not None and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1] for {unit_interval_for}, "
                         f"got values in [{x.min():g}, {x.max():g}]")
    return x


def _check_number(name, v, lo=None):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not np.isfinite(f) or (lo is not None and f < lo):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {v!r}")
