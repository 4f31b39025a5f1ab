"""The VAE: configuration, parameters, input checks and the public API (docs/math.md §6).

The model holds the flat parameter vector and a backend chosen by name; all arithmetic happens in
the backend (``minivae.kernels``). The model itself never imports numba.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import checkpoint, checks, resources
from . import distributions as dist
from .kernels import BACKENDS, get_backend
from .layers import ACTIVATIONS
from .objectives import check_objective
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
        resources.check(resources.model_bytes(self.spec, self.dtype.itemsize),
                        f"a model of {resources.parameter_count(self.spec):,} parameters")
        if seed is not None:               # saved in the config (JSON): an int, not a Generator
            checks.integer("seed", seed, lo=0)
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
        """Copy ``value`` (a finite real array of the parameters' shape) into the same buffer."""
        value = checks.real_array("params", value)
        if value.shape != self._params.shape:
            raise ValueError(f"params must have shape {self._params.shape}, got {value.shape}")
        if not np.isfinite(value).all():
            raise ValueError("params must be finite: the new values contain NaN or inf")
        self._params[...] = value

    def views(self, flat=None) -> dict:
        """Named views (``enc.0.W``, ...) into ``flat`` (default: the parameters)."""
        return self.layout.views(self._params if flat is None else flat)

    # -- input checks -------------------------------------------------------------------------
    def check_x(self, x) -> np.ndarray:
        x = checks.real_array("x", x)
        if x.ndim != 2:
            raise ValueError(f"x must be a 2-D array (n, {self.spec.x_dim}), got {x.ndim}-D shape {x.shape}")
        if x.shape[1] != self.spec.x_dim:
            raise ValueError(f"x must have {self.spec.x_dim} columns (x_dim), got shape {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("x must have at least one row")
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if not np.isfinite(x).all():
            raise ValueError("x must be finite: it contains NaN or inf")
        if self.spec.likelihood != "gaussian" and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"x must lie in [0, 1] for the {self.spec.likelihood} likelihood, "
                             f"got values in [{x.min():g}, {x.max():g}]")
        return x

    def _eps(self, eps, n, samples, backward=False):
        """eps (L, n, Z) of the model dtype, C-contiguous: the given one, checked, or L = ``samples``
        fresh draws. ``samples`` other than 1 must agree with a given eps. The memory of the pass
        is checked (minivae.resources) before anything is drawn."""
        Z = self.spec.z_dim
        samples = checks.integer("samples", samples)
        if eps is None:
            self._check_memory(n, samples, backward)
            return self.rng.standard_normal((samples, n, Z)).astype(self.dtype)
        eps = checks.real_array("eps", eps)
        if eps.ndim == 2:
            eps = eps[None]
        if eps.ndim != 3 or eps.shape[1:] != (n, Z) or eps.shape[0] < 1:
            raise ValueError(f"eps must have shape ({n}, {Z}) or (L, {n}, {Z}), got {eps.shape}")
        if samples != 1 and samples != eps.shape[0]:
            raise ValueError(f"samples={samples} disagrees with eps, which holds {eps.shape[0]} sample(s) "
                             f"per example; leave samples out when giving eps")
        if not np.isfinite(eps).all():
            raise ValueError("eps must be finite: it contains NaN or inf")
        self._check_memory(n, eps.shape[0], backward)
        return np.ascontiguousarray(eps, dtype=self.dtype)

    def _check_memory(self, n, samples=1, backward=False):
        """Refuse a pass of n rows x ``samples`` this machine cannot hold (minivae.resources)."""
        need = resources.pass_bytes(self.spec, self.dtype.itemsize, n, samples, backward)
        resources.check(need, f"a {'forward/backward' if backward else 'forward'} pass of {n} examples x "
                              f"{samples} samples")

    def _z(self, z):
        z = checks.real_array("z", z)
        if z.ndim != 2 or z.shape[1] != self.spec.z_dim:
            raise ValueError(f"z must be a 2-D array (m, {self.spec.z_dim}), got shape {z.shape}")
        if z.shape[0] == 0:
            raise ValueError("z must have at least one row")
        self._check_memory(z.shape[0])
        z = np.ascontiguousarray(z, dtype=self.dtype)
        if not np.isfinite(z).all():
            raise ValueError("z must be finite: it contains NaN or inf")
        return z

    # -- the math, delegated to the backend ----------------------------------------------------
    def loss_and_grad(self, x, eps=None, beta=1.0, objective="elbo", samples=1, free_bits=0.0,
                      grad=None):
        """Batch mean of the negative bound (nats/example) and its gradient, shaped like ``params``.

        ``eps``: (n, Z) or (L, n, Z); drawn from the model's generator when None (``samples`` = L,
        or k for IWAE). ``beta`` weights the KL (ELBO) or log p(z) - log q(z|x) (IWAE).
        ``free_bits`` is a per-dimension floor on the batch-mean KL (ELBO only).  docs/math.md §5-§6
        ``grad``: None (a new array), or a writable, C-contiguous 1-D array of params' dtype and
        length, not overlapping params, which receives the gradient and is returned.

        Every argument is checked here, the same way for every backend (minivae.checks): beta and
        free_bits are real finite numbers >= 0 (not str, not bool), samples a positive int. The
        backend receives Python floats and arrays of the model dtype.
        """
        check_objective(objective)
        beta = checks.number("beta", beta, lo=0.0)
        free_bits = checks.number("free_bits", free_bits, lo=0.0)
        if free_bits > 0 and objective != "elbo":
            raise ValueError("free_bits applies to the ELBO objective only")
        grad = checks.grad_buffer(grad, self._params)
        x = self.check_x(x)
        eps = self._eps(eps, x.shape[0], samples, backward=True)
        return self.backend.loss_and_grad(self._params, x, eps, beta=beta, objective=objective,
                                          free_bits=free_bits, grad=grad)

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
        x = self.check_x(x)
        self._check_memory(x.shape[0])
        return self.backend.encode(self._params, x)

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
        n = checks.integer("n", n)
        seed = checks.seed("seed", seed)
        mean = checks.flag("mean", mean)
        self._check_memory(n)
        rng = np.random.default_rng(seed) if seed is not None else self.rng
        z = rng.standard_normal((n, self.spec.z_dim)).astype(self.dtype)
        return self._head_to_x(self.backend.decode(self._params, z), not mean, rng)

    def reconstruct(self, x, sample=False, seed=None):
        """Decode the posterior mean of x: the mean of p(x|z=mu), or a sample from it."""
        sample = checks.flag("sample", sample)
        seed = checks.seed("seed", seed)
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
        """A model built from a saved config (``config()``), after :func:`spec_from_config` has
        checked every field and bounded its size, so an absurd config is refused before anything
        is allocated. CheckpointError says what is wrong."""
        spec, dtype = spec_from_config(config)
        return cls(spec.x_dim, spec.z_dim, hidden=spec.hidden, activation=spec.activation,
                   likelihood=spec.likelihood, dtype=dtype, seed=config.get("seed", 0),
                   backend=backend or config.get("backend", "numpy"), dec_hidden=spec.dec_hidden,
                   var_floor=spec.var_floor)

    @classmethod
    def load(cls, path, backend=None):
        """Read a checkpoint written by :meth:`save` (or by training); ``backend`` overrides the saved one.

        The config is checked and the size of ``params`` it implies compared with the member's
        header before the model is built or the parameters are read (minivae.checkpoint)."""
        checked = {}

        def expect(meta):
            if "config" not in meta:
                raise checkpoint.CheckpointError(f"{path}: checkpoint has no model config or parameters")
            try:
                spec, dtype = spec_from_config(meta["config"])
            except checkpoint.CheckpointError as e:
                raise checkpoint.CheckpointError(f"{path}: {e}") from None
            checked["config"] = meta["config"]
            return {"params": checkpoint.Expect((spec.layout.size,), dtype, source="the config implies")}

        meta, arrays = checkpoint.load(path, expect=expect)      # refuses a missing 'params' entry
        p = arrays["params"]
        if not np.isfinite(p).all():
            raise checkpoint.CheckpointError(f"{path}: the parameters contain NaN or inf")
        try:
            model = cls.from_config(checked["config"], backend=backend)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"{path}: {e}") from None
        model.params[...] = p
        return model


# Bounds on a config read from a file (checked before any allocation): a checkpoint's model is at
# most MAX_LAYERS hidden layers a side, MAX_WIDTH units wide, MAX_PARAMS parameters.
MAX_LAYERS = 64
MAX_WIDTH = 1 << 24
MAX_PARAMS = 1 << 30
CONFIG_KEYS = ("x_dim", "z_dim", "hidden", "dec_hidden", "activation", "likelihood", "dtype")


def _config_int(name, v, lo=1, hi=MAX_WIDTH):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise checkpoint.CheckpointError(f"config {name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def spec_from_config(config):
    """(ModelSpec, dtype name) of a saved config, every field checked, nothing allocated.

    The parameter count (docs/math.md §1: sum over layers of (fan_in + 1) * fan_out) is computed
    in Python integers from the widths and bounded by MAX_PARAMS before any layout is built."""
    if not isinstance(config, dict):
        raise checkpoint.CheckpointError(f"checkpoint config is not a JSON object ({type(config).__name__})")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint config is incomplete or malformed (no {', '.join(missing)})")
    x_dim, z_dim = (_config_int(k, config[k]) for k in ("x_dim", "z_dim"))
    widths = {}
    for key in ("hidden", "dec_hidden"):
        v = config[key]
        if not isinstance(v, (list, tuple)) or len(v) > MAX_LAYERS:
            raise checkpoint.CheckpointError(f"config {key} must be a list of at most {MAX_LAYERS} "
                                             f"widths, got {str(v)[:80]}")
        widths[key] = tuple(_config_int(f"{key} width", h) for h in v)
    for key in ("activation", "likelihood", "dtype"):
        if not isinstance(config[key], str):
            raise checkpoint.CheckpointError(f"config {key} must be a string, got {config[key]!r}")
    if config["dtype"] not in DTYPES:
        raise checkpoint.CheckpointError(f"config dtype must be one of {', '.join(DTYPES)}, got {config['dtype']!r}")
    seed = config.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise checkpoint.CheckpointError(f"config seed must be a non-negative integer, got {seed!r}")
    if not isinstance(config.get("backend", "numpy"), str):
        raise checkpoint.CheckpointError(f"config backend must be a string, got {config['backend']!r}")
    if config.get("backend", "numpy") not in BACKENDS:
        raise checkpoint.CheckpointError(f"config backend must be one of {', '.join(BACKENDS)}, "
                                         f"got {config['backend']!r}")
    var_floor = config.get("var_floor", dist.DEFAULT_VAR_FLOOR)
    if isinstance(var_floor, bool) or not isinstance(var_floor, (int, float)):
        raise checkpoint.CheckpointError(f"config var_floor must be a number, got {var_floor!r}")
    head = 2 * x_dim if config["likelihood"] == "gaussian" else x_dim      # dist.head_width
    enc_dims = [x_dim, *widths["hidden"], 2 * z_dim]                          # x -> ... -> [mu | logvar]
    dec_dims = [z_dim, *widths["dec_hidden"], head]                           # z -> ... -> head
    enc = sum((i + 1) * o for i, o in zip(enc_dims, enc_dims[1:]))
    dec = sum((i + 1) * o for i, o in zip(dec_dims, dec_dims[1:]))
    if enc + dec > MAX_PARAMS:
        raise checkpoint.CheckpointError(f"checkpoint config implies {enc + dec} parameters, more than "
                                         f"minivae loads ({MAX_PARAMS})")
    try:
        spec = ModelSpec(x_dim, z_dim, widths["hidden"], widths["dec_hidden"], config["activation"],
                         config["likelihood"], float(var_floor))
    except (ValueError, OverflowError) as e:
        raise checkpoint.CheckpointError(f"checkpoint config is malformed ({e})") from None
    if spec.layout.size != enc + dec:        # the count above is the layout's, by construction
        raise checkpoint.CheckpointError("checkpoint config: inconsistent parameter count")
    return spec, config["dtype"]
