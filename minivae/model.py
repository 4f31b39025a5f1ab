"""The VAE: configuration, parameters, input checks and the public API (docs/math.md §6).

The model holds the flat parameter vector and a backend chosen by name; all arithmetic happens in
the backend (``minivae.kernels``). The model itself never imports numba.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import checkpoint, checks, resources
from . import distributions as dist
from . import likelihoods
from .kernels import BACKENDS, get_backend, resolve_backend, stack_class
from .layers import ACTIVATIONS
from .objectives import check_estimator, check_objective
from .params import FlatParams, ParamLayout

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


class VAE(FlatParams):
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
        name = resolve_backend(backend)          # "auto" -> the concrete name the config records
        self.backend_name = name
        cls = get_backend(name)
        if self.spec.n_stochastic > 1:
            cls = stack_class(name, cls)
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

    # -- input checks -------------------------------------------------------------------------
    def check_x(self, x) -> np.ndarray:
        lik = self.spec.likelihood
        unit = f"the {lik} likelihood" if likelihoods.x_in_unit_interval(lik) else None
        return check_x(x, self.spec.x_dim, self.dtype, unit)

    def _eps(self, eps, n, samples, backward=False):
        """eps as the backend takes it, of the model dtype, C-contiguous: (L, n, Z) for S = 1; for S > 1 a
        tuple of S arrays (L, n, Z_l). The given one(s), checked, or L = ``samples`` fresh draws, layer by
        layer, from the model's generator. ``samples`` other than 1 must agree with a given eps. The
        memory of the pass is checked (minivae.resources) before anything is drawn."""
        Zs = self.spec.z_dims
        S = len(Zs)
        samples = checks.integer("samples", samples)
        if eps is None:
            self._check_memory(n, samples, backward)
            draws = tuple(self.rng.standard_normal((samples, n, Z)).astype(self.dtype) for Z in Zs)
            return draws[0] if S == 1 else draws
        if S == 1:
            out = (self._eps_layer(eps, n, Zs[0], "eps"),)
        else:
            if isinstance(eps, np.ndarray) or not isinstance(eps, (list, tuple)) or len(eps) != S:
                raise ValueError(f"eps must be a sequence of {S} arrays, one per stochastic layer, "
                                 f"eps[l] of shape (n, Z_l) or (L, n, Z_l) with Z = {Zs}")
            out = tuple(self._eps_layer(e, n, Z, f"eps[{l}]") for l, (e, Z) in enumerate(zip(eps, Zs)))
            if len({e.shape[0] for e in out}) != 1:
                raise ValueError(f"eps[l] must all have the same number of samples L, got "
                                 f"{[e.shape[0] for e in out]}")
        L = out[0].shape[0]
        if samples != 1 and samples != L:
            raise ValueError(f"samples={samples} disagrees with eps, which holds {L} sample(s) "
                             f"per example; leave samples out when giving eps")
        self._check_memory(n, L, backward)
        return out[0] if S == 1 else out

    def _eps_layer(self, eps, n, Z, name):
        eps = checks.real_array(name, eps)
        if eps.ndim == 2:
            eps = eps[None]
        if eps.ndim != 3 or eps.shape[1:] != (n, Z) or eps.shape[0] < 1:
            raise ValueError(f"{name} must have shape ({n}, {Z}) or (L, {n}, {Z}), got {eps.shape}")
        if not np.isfinite(eps).all():
            raise ValueError(f"{name} must be finite: it contains NaN or inf")
        return np.ascontiguousarray(eps, dtype=self.dtype)

    def _check_memory(self, n, samples=1, backward=False):
        """Refuse a pass of n rows x ``samples`` this machine cannot hold (minivae.resources)."""
        need = resources.pass_bytes(self.spec, self.dtype.itemsize, n, samples, backward)
        resources.check(need, f"a {'forward/backward' if backward else 'forward'} pass of {n} examples x "
                              f"{samples} samples")

    def _z(self, z):
        z = check_z(z, self.spec.z_dims[0], self.dtype)   # decode takes z_1, the bottom layer
        self._check_memory(z.shape[0])
        return z

    # -- the math, delegated to the backend ----------------------------------------------------
    def loss_and_grad(self, x, eps=None, beta=1.0, objective="elbo", samples=1, free_bits=0.0,
                      grad=None, estimator="reparam"):
        """Batch mean of the negative bound (nats/example) and its gradient, shaped like ``params``.

        ``eps``: (n, Z) or (L, n, Z); for S > 1 a sequence of S such arrays, one per stochastic layer;
        drawn from the model's generator when None (``samples`` = L, or k for IWAE). ``beta`` weights
        the KL (ELBO) or log p(z) - log q(z|x) (IWAE). ``free_bits`` is a per-dimension floor on the
        batch-mean KL (ELBO, S = 1 only). ``estimator``: how the inference network's gradient is
        estimated, "reparam" (the pathwise derivative of the loss), "score" (REINFORCE, §5.4: ELBO,
        S = 1, numpy backend) or "dreg" (IWAE only: doubly reparameterized, §12); the loss is the same.
        docs/math.md §5-§6, §11-§12
        ``grad``: None (a new array), or a writable, C-contiguous 1-D array of params' dtype and
        length, not overlapping params, which receives the gradient and is returned.

        Every argument is checked here, the same way for every backend (minivae.checks): beta and
        free_bits are real finite numbers >= 0 (not str, not bool), samples a positive int. The
        backend receives Python floats and arrays of the model dtype.
        """
        check_objective(objective)
        check_estimator(estimator)
        if estimator != "reparam":
            from .estimators import check_estimator_use      # the backend's capability included
            check_estimator_use(estimator, objective, self.backend_name, self.spec.n_stochastic)
        beta = checks.number("beta", beta, lo=0.0)
        free_bits = checks.number("free_bits", free_bits, lo=0.0)
        if free_bits > 0 and objective != "elbo":
            raise ValueError("free_bits applies to the ELBO objective only")
        if free_bits > 0 and self.spec.n_stochastic > 1:
            raise ValueError("free_bits applies to models with one stochastic layer only")
        if estimator == "dreg" and objective != "iwae":
            raise ValueError("estimator 'dreg' applies to the iwae objective only")
        grad = checks.grad_buffer(grad, self._params)
        x = self.check_x(x)
        eps = self._eps(eps, x.shape[0], samples, backward=True)
        return self.backend.loss_and_grad(self._params, x, eps, beta=beta, objective=objective,
                                          free_bits=free_bits, grad=grad, estimator=estimator)

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
        x = self.check_x(x)
        self._check_memory(x.shape[0])
        return self.backend.encode(self._params, x)

    def decode(self, z):
        """The parameters of p(x|z_1) for z (m, Z_1): logits (m, D) for the Bernoulli
        likelihoods; for "gaussian", (mean, logvar) where exp(logvar) = var_floor + exp(head)."""
        head = self.backend.decode(self._params, self._z(z))
        return likelihoods.decoded(self.spec.likelihood, head, self.spec.var_floor)

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
        z = rng.standard_normal((n, self.spec.z_dims[-1])).astype(self.dtype)     # z_S ~ N(0, I)
        if self.spec.n_stochastic > 1:     # down through p(z_l | z_{l+1}): means, or draws
            z = self.backend.generate_down(self._params, z, None if mean else rng)
        return self._head_to_x(self.backend.decode(self._params, z), not mean, rng)

    def reconstruct(self, x, sample=False, seed=None):
        """Decode the posterior mean of x: the mean of p(x|z_1=mu_1), or a sample from it."""
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
            if meta.get("kind") == "ae":
                raise checkpoint.CheckpointError(f"{path}: an Autoencoder checkpoint, not a VAE's; "
                                                 f"load it with minivae.Autoencoder.load")
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
        bad = int((~np.isfinite(p)).sum())
        if bad:
            raise checkpoint.CheckpointError(f"{path}: {bad} of the model's {p.size} parameters are NaN or inf")
        try:
            model = cls.from_config(checked["config"], backend=backend)
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"{path}: {e}") from None
        model.params[...] = p
        return model


# Bounds on a config read from a file (checked before any allocation): a checkpoint's model is at
# most MAX_LAYERS hidden layers a side, MAX_WIDTH units wide, MAX_PARAMS parameters.
MAX_LAYERS = 64
MAX_STOCHASTIC = 16
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
    x_dim = _config_int("x_dim", config["x_dim"])
    z_dim = config["z_dim"]                      # an int (S = 1), or a list bottom to top (a stack)
    if isinstance(z_dim, (list, tuple)):
        if not 1 <= len(z_dim) <= MAX_STOCHASTIC:
            raise checkpoint.CheckpointError(f"config z_dim must list 1 to {MAX_STOCHASTIC} latent sizes, "
                                             f"got {str(z_dim)[:80]}")
        z_dim = tuple(_config_int("z_dim", z) for z in z_dim)
        S = len(z_dim)
    else:
        z_dim, S = _config_int("z_dim", z_dim), 1
    widths = {}
    for key in ("hidden", "dec_hidden"):
        v = config[key]
        if not isinstance(v, (list, tuple)) or len(v) > MAX_LAYERS:
            raise checkpoint.CheckpointError(f"config {key} must be a list of at most {MAX_LAYERS} "
                                             f"widths, got {str(v)[:80]}")
        if S > 1 and v and all(isinstance(b, (list, tuple)) for b in v):      # one list per layer
            if len(v) != S or any(len(b) > MAX_LAYERS for b in v):
                raise checkpoint.CheckpointError(f"config {key} must give {S} lists of at most {MAX_LAYERS} "
                                                 f"widths, got {str(v)[:80]}")
            widths[key] = tuple(tuple(_config_int(f"{key} width", h) for h in b) for b in v)
        else:
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
    try:                                     # integers only: the layout is not built yet
        spec = ModelSpec(x_dim, z_dim, widths["hidden"], widths["dec_hidden"], config["activation"],
                         config["likelihood"], float(var_floor))
    except (ValueError, OverflowError) as e:
        raise checkpoint.CheckpointError(f"checkpoint config is malformed ({e})") from None
    count = resources.parameter_count(spec)      # sum over layers of (fan_in + 1) fan_out, Python ints
    if count > MAX_PARAMS:
        raise checkpoint.CheckpointError(f"checkpoint config implies {count} parameters, more than "
                                         f"minivae loads ({MAX_PARAMS})")
    if spec.layout.size != count:             # the count above is the layout's, by construction
        raise checkpoint.CheckpointError("checkpoint config: inconsistent parameter count")
    return spec, config["dtype"]


def check_z(z, z_dim, dtype) -> np.ndarray:
    """z as a C-contiguous, finite (m, z_dim) array of ``dtype``, m >= 1, or a ValueError saying what was
    expected. Shared by VAE and Autoencoder."""
    z = checks.real_array("z", z)
    if z.ndim != 2 or z.shape[1] != z_dim:
        raise ValueError(f"z must be a 2-D array (m, {z_dim}), got shape {z.shape}")
    if z.shape[0] == 0:
        raise ValueError("z must have at least one row")
    z = np.ascontiguousarray(z, dtype=dtype)
    if not np.isfinite(z).all():
        raise ValueError("z must be finite: it contains NaN or inf")
    return z


def check_x(x, x_dim, dtype, unit_interval_for=None) -> np.ndarray:
    """x as a C-contiguous (n, x_dim) array of ``dtype``, or a ValueError saying what was expected.

    ``unit_interval_for``: what needs x in [0, 1] (e.g. "the bernoulli likelihood"), None if nothing.
    Shared by VAE and Autoencoder.
    """
    x = checks.real_array("x", x)
    if x.ndim != 2:
        raise ValueError(f"x must be a 2-D array (n, {x_dim}), got {x.ndim}-D shape {x.shape}")
    if x.shape[1] != x_dim:
        raise ValueError(f"x must have {x_dim} columns (x_dim), got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x must have at least one row")
    x = np.ascontiguousarray(x, dtype=dtype)
    if not np.isfinite(x).all():
        raise ValueError("x must be finite: it contains NaN or inf")
    if unit_interval_for is not None and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1] for {unit_interval_for}, "
                         f"got values in [{x.min():g}, {x.max():g}]")
    return x

