"""The VAE: configuration, parameters, input checks and the public API (docs/math.md §6).

The model holds the flat parameter vector and a backend chosen by name; all arithmetic happens in
the backend (``minivae.kernels``). The model itself never imports numba.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import checkpoint
from . import distributions as dist
from .kernels import get_backend, stack_class
from .layers import ACTIVATIONS
from .objectives import check_estimator, check_objective
from .params import ParamLayout

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that fixes the shape and the meaning of the parameters.

    ``z_dim``: an int (one stochastic layer, S = 1) or a tuple (Z_1, ..., Z_S), bottom to top.
    ``hidden``: a tuple of ints, the hidden widths of every inference block, or (S > 1) one tuple per
    stochastic layer: ``hidden[l-1]`` is the block of q(z_l | z_{l-1}), z_0 = x.
    ``dec_hidden``: the same two forms for the generative blocks; ``dec_hidden[l-1]`` is the block of
    p(z_{l-1} | z_l) (p(x | z_1) for l = 1). None: each mirrors its inference block.  docs/math.md §11
    For S = 1, ``z_dim`` stays an int and ``hidden`` / ``dec_hidden`` tuples of ints, as before.
    """
    x_dim: int
    z_dim: int | tuple
    hidden: tuple = (400,)
    dec_hidden: tuple | None = None      # None: the mirror of ``hidden``
    activation: str = "relu"
    likelihood: str = "bernoulli"
    var_floor: float = dist.DEFAULT_VAR_FLOOR

    def __post_init__(self):
        v = self.x_dim
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"x_dim must be a positive integer, got {v!r}")
        object.__setattr__(self, "x_dim", int(self.x_dim))
        z_dims = _z_dims(self.z_dim)
        S = len(z_dims)
        object.__setattr__(self, "z_dim", z_dims[0] if S == 1 else z_dims)
        enc = _blocks("hidden", self.hidden, S)
        dec = tuple(h[::-1] for h in enc) if self.dec_hidden is None else _blocks("dec_hidden", self.dec_hidden, S)
        object.__setattr__(self, "hidden", enc[0] if S == 1 else enc)
        object.__setattr__(self, "dec_hidden", dec[0] if S == 1 else dec)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        dist.check_likelihood(self.likelihood)
        if not (np.isfinite(self.var_floor) and self.var_floor > 0):
            raise ValueError(f"var_floor must be a positive number, got {self.var_floor!r}")
        object.__setattr__(self, "var_floor", float(self.var_floor))

    # -- the stack ------------------------------------------------------------------------------
    @property
    def z_dims(self) -> tuple:
        """(Z_1, ..., Z_S), bottom to top, for every S."""
        return (self.z_dim,) if isinstance(self.z_dim, int) else self.z_dim

    @property
    def n_stochastic(self) -> int:
        """S, the number of stochastic layers."""
        return len(self.z_dims)

    @property
    def enc_blocks(self) -> tuple:
        """Hidden widths of each inference block, ((...) for q(z_1|x), ..., (...) for q(z_S|z_{S-1}))."""
        return (self.hidden,) if self.n_stochastic == 1 else self.hidden

    @property
    def dec_blocks(self) -> tuple:
        """Hidden widths of each generative block, ((...) for p(x|z_1), (...) for p(z_1|z_2), ...)."""
        return (self.dec_hidden,) if self.n_stochastic == 1 else self.dec_hidden

    @staticmethod
    def enc_prefix(l: int) -> str:
        """Parameter prefix of q(z_l | z_{l-1}): "enc", "enc2", "enc3", ...   (l is 1-based)"""
        return "enc" if l == 1 else f"enc{l}"

    @staticmethod
    def dec_prefix(l: int) -> str:
        """Parameter prefix of p(z_{l-1} | z_l), z_0 = x: "dec", "dec2", "dec3", ..."""
        return "dec" if l == 1 else f"dec{l}"

    @property
    def head_width(self) -> int:
        return dist.head_width(self.likelihood, self.x_dim)

    @property
    def layout(self) -> ParamLayout:
        """Flat order: enc, enc2, ..., encS, decS, ..., dec2, dec (for S = 1: enc, dec, as always).

        Every block is its hidden layers ``<prefix>.0``, ``<prefix>.1``, ... and ``<prefix>.head``;
        inference heads and the heads of p(z_{l-1}|z_l), l > 1, give [mu | logvar].   docs/math.md §1, §11
        """
        Z = self.z_dims
        S = len(Z)
        blocks = []                                      # (prefix, fan_in, hidden widths, head width)
        for l in range(1, S + 1):
            blocks.append((self.enc_prefix(l), self.x_dim if l == 1 else Z[l - 2], self.enc_blocks[l - 1],
                           2 * Z[l - 1]))
        for l in range(S, 0, -1):
            blocks.append((self.dec_prefix(l), Z[l - 1], self.dec_blocks[l - 1],
                           self.head_width if l == 1 else 2 * Z[l - 2]))
        layers = []
        for prefix, fan_in, widths, out in blocks:
            for i, h in enumerate(widths):
                layers.append((f"{prefix}.{i}", fan_in, h))
                fan_in = h
            layers.append((f"{prefix}.head", fan_in, out))
        return ParamLayout(layers)

    def to_dict(self):
        d = asdict(self)
        if self.n_stochastic == 1:
            d["hidden"], d["dec_hidden"] = list(self.hidden), list(self.dec_hidden)
        else:
            d["z_dim"] = list(self.z_dims)
            d["hidden"] = [list(h) for h in self.hidden]
            d["dec_hidden"] = [list(h) for h in self.dec_hidden]
        return d


def _z_dims(v):
    """z_dim as a tuple of positive ints: an int, or a non-empty sequence of them."""
    seq = (v,) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else v
    try:
        t = tuple(seq)
    except TypeError:
        t = None
    if (not t or any(isinstance(z, bool) or not isinstance(z, (int, np.integer)) or z < 1 for z in t)):
        raise ValueError(f"z_dim must be a positive integer, got {v!r} (or, for a stack of stochastic "
                         f"layers, a non-empty sequence of them, bottom to top)")
    return tuple(int(z) for z in t)


def _blocks(name, v, S):
    """``hidden`` / ``dec_hidden`` as S tuples of widths: one tuple of ints applies to every block;
    a sequence of S sequences gives one per block."""
    if isinstance(v, (int, np.integer)):
        v = (v,)
    try:
        items = list(v)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of positive integers, got {v!r}") from None
    if items and all(not isinstance(h, (int, np.integer, str)) and hasattr(h, "__iter__") for h in items):
        if len(items) != S:
            raise ValueError(f"{name} must give one tuple of widths per stochastic layer ({S}), "
                             f"or one tuple for every block; got {len(items)} tuples")
        return tuple(_int_tuple(name, h) for h in items)
    return (_int_tuple(name, v),) * S


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
        cls = get_backend(backend)
        if self.spec.n_stochastic > 1:
            cls = stack_class(backend, cls)
        self.backend = cls(self.spec, self.dtype)

    # -- configuration ------------------------------------------------------------------------
    def __getattr__(self, name):
        # x_dim, z_dim, hidden, activation, likelihood, ... read through to the spec
        spec = self.__dict__.get("spec")
        if spec is not None and name in ModelSpec.__dataclass_fields__:
            return getattr(spec, name)
        raise AttributeError(name)

    @property
    def z_dims(self) -> tuple:
        """(Z_1, ..., Z_S), bottom to top; ``z_dim`` is Z_1 as an int when S = 1, the tuple otherwise."""
        return self.spec.z_dims

    @property
    def n_stochastic(self) -> int:
        """S, the number of stochastic layers."""
        return self.spec.n_stochastic

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
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"x must be a 2-D array (n, {self.spec.x_dim}), got {x.ndim}-D shape {x.shape}")
        if x.shape[1] != self.spec.x_dim:
            raise ValueError(f"x must have {self.spec.x_dim} columns (x_dim), got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("x must have at least one row")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ValueError(f"x must be a real numeric array, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if not np.isfinite(x).all():
            raise ValueError("x must be finite: it contains NaN or inf")
        if self.spec.likelihood != "gaussian" and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"x must lie in [0, 1] for the {self.spec.likelihood} likelihood, "
                             f"got values in [{x.min():g}, {x.max():g}]")
        return x

    def _eps(self, eps, n, samples):
        """eps as the backend takes it: (L, n, Z) for S = 1; for S > 1 a tuple of S arrays (L, n, Z_l),
        drawn layer by layer from the model's generator when ``eps`` is None."""
        Zs = self.spec.z_dims
        S = len(Zs)
        if eps is None:
            if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
                raise ValueError(f"samples must be a positive integer, got {samples!r}")
            draws = tuple(self.rng.standard_normal((samples, n, Z)).astype(self.dtype) for Z in Zs)
            return draws[0] if S == 1 else draws
        if S == 1:
            return self._eps_layer(eps, n, Zs[0], "eps")
        if isinstance(eps, np.ndarray) or not isinstance(eps, (list, tuple)) or len(eps) != S:
            raise ValueError(f"eps must be a sequence of {S} arrays, one per stochastic layer, "
                             f"eps[l] of shape (n, Z_l) or (L, n, Z_l) with Z = {Zs}")
        out = tuple(self._eps_layer(e, n, Z, f"eps[{l}]") for l, (e, Z) in enumerate(zip(eps, Zs)))
        if len({e.shape[0] for e in out}) != 1:
            raise ValueError(f"eps[l] must all have the same number of samples L, got "
                             f"{[e.shape[0] for e in out]}")
        return out

    def _eps_layer(self, eps, n, Z, name):
        eps = np.asarray(eps, dtype=self.dtype)
        if eps.ndim == 2:
            eps = eps[None]
        if eps.ndim != 3 or eps.shape[1:] != (n, Z) or eps.shape[0] < 1:
            raise ValueError(f"{name} must have shape ({n}, {Z}) or (L, {n}, {Z}), got {eps.shape}")
        if not np.isfinite(eps).all():
            raise ValueError(f"{name} must be finite: it contains NaN or inf")
        return np.ascontiguousarray(eps)

    def _z(self, z):
        Z = self.spec.z_dims[0]      # decode takes z_1, the bottom layer
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != Z:
            raise ValueError(f"z must be a 2-D array (m, {Z}), got shape {z.shape}")
        z = np.ascontiguousarray(z, dtype=self.dtype)
        if not np.isfinite(z).all():
            raise ValueError("z must be finite: it contains NaN or inf")
        return z

    # -- the math, delegated to the backend ----------------------------------------------------
    def loss_and_grad(self, x, eps=None, beta=1.0, objective="elbo", samples=1, free_bits=0.0,
                      grad=None, estimator="reparam"):
        """Batch mean of the negative bound (nats/example) and its gradient, shaped like ``params``.

        ``eps``: (n, Z) or (L, n, Z); for S > 1 a sequence of S such arrays, one per stochastic layer;
        drawn from the model's generator when None (``samples`` = L, or k for IWAE). ``beta`` weights
        the KL (ELBO) or log p(z) - log q(z|x) (IWAE). ``free_bits`` is a per-dimension floor on the
        batch-mean KL (ELBO, S = 1 only). ``estimator``: "reparam" (the gradient of the loss) or
        "dreg" (IWAE only: doubly reparameterized inference-network gradient).  docs/math.md §5-§6, §11-§12
        """
        check_objective(objective)
        check_estimator(estimator)
        _check_number("beta", beta, lo=0.0)
        _check_number("free_bits", free_bits, lo=0.0)
        if free_bits > 0 and objective != "elbo":
            raise ValueError("free_bits applies to the ELBO objective only")
        if free_bits > 0 and self.spec.n_stochastic > 1:
            raise ValueError("free_bits applies to models with one stochastic layer only")
        if estimator == "dreg" and objective != "iwae":
            raise ValueError("estimator 'dreg' applies to the iwae objective only")
        if estimator == "score":
            raise ValueError("estimator 'score' is not implemented in this version")
        x = self.check_x(x)
        eps = self._eps(eps, x.shape[0], samples)
        kw = {} if estimator == "reparam" else dict(estimator=estimator)
        if estimator not in getattr(self.backend, "estimators", ("reparam",)):
            raise ValueError(f"estimator {estimator!r} is not implemented on backend {self.backend_name!r}")
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
        """q(z_1|x): returns mu, logvar, each (n, Z_1)."""
        return self.backend.encode(self._params, self.check_x(x))

    def decode(self, z):
        """The parameters of p(x|z_1) for z (m, Z_1): logits (m, D) for the Bernoulli
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
        z = rng.standard_normal((n, self.spec.z_dims[-1])).astype(self.dtype)     # z_S ~ N(0, I)
        if self.spec.n_stochastic > 1:     # down through p(z_l | z_{l+1}): means, or draws
            z = self.backend.generate_down(self._params, z, None if mean else rng)
        return self._head_to_x(self.backend.decode(self._params, z), not mean, rng)

    def reconstruct(self, x, sample=False, seed=None):
        """Decode the posterior mean of x: the mean of p(x|z_1=mu_1), or a sample from it."""
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
            z_dim = c["z_dim"] if isinstance(c["z_dim"], int) else tuple(c["z_dim"])
            return cls(c["x_dim"], z_dim, hidden=tuple(c["hidden"]), activation=c["activation"],
                       likelihood=c["likelihood"], dtype=c["dtype"], seed=c.get("seed", 0),
                       backend=backend or c.get("backend", "numpy"), dec_hidden=tuple(c["dec_hidden"]),
                       var_floor=c.get("var_floor", dist.DEFAULT_VAR_FLOOR))
        except (KeyError, TypeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint config is incomplete or malformed ({e})") from None

    @classmethod
    def load(cls, path, backend=None):
        """Read a checkpoint written by :meth:`save` (or by training); ``backend`` overrides the saved one."""
        meta, arrays = checkpoint.load(path)
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


def _check_number(name, v, lo=None):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not np.isfinite(f) or (lo is not None and f < lo):
        raise ValueError(f"{name} must be a finite number >= {lo}, got {v!r}")
