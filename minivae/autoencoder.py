"""The deterministic Autoencoder: configuration, parameters, input checks and the public API (docs/math.md §13).

The first model of the lecture: an encoder MLP maps x to a code z (no distribution, no sampling), a
decoder MLP maps z back to x_hat = sigmoid(logits) in [0, 1], and the loss is the squared l2
distance between x and x_hat, summed over pixels and averaged over the batch. Same flat parameter
vector, same layer names (``enc.*``, ``dec.*``) and same backends' shape as :class:`minivae.VAE`;
the arithmetic lives in ``minivae.kernels.numpy_ae`` (the reference) and ``minivae.kernels.cpu_ae``.

    >>> ae = Autoencoder(64, 2, hidden=(32,), dtype="float64")
    >>> loss, grad = ae.loss_and_grad(x)     # batch mean of sum_d (x_hat - x)^2, grad like ae.params
    >>> z = ae.encode(x); x_hat = ae.decode(z)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import checkpoint, checks, resources
from .layers import ACTIVATIONS
from .model import DTYPES, _int_tuple, check_x, check_z
from .params import FlatParams, ParamLayout

KIND = "ae"                     # meta["kind"] of an Autoencoder checkpoint (a VAE's is "model")
BACKENDS = ("numpy", "numba")          # "auto" stands for numba (there are no CUDA kernels for it)


@dataclass(frozen=True)
class AESpec:
    """Everything that fixes the shape and the meaning of the Autoencoder's parameters."""
    x_dim: int
    z_dim: int
    hidden: tuple = (400,)
    dec_hidden: tuple | None = None      # None: the mirror of ``hidden``
    activation: str = "relu"

    def __post_init__(self):
        for name in ("x_dim", "z_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        hidden = _int_tuple("hidden", self.hidden)
        object.__setattr__(self, "hidden", hidden)
        dec = hidden[::-1] if self.dec_hidden is None else _int_tuple("dec_hidden", self.dec_hidden)
        object.__setattr__(self, "dec_hidden", dec)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")

    @property
    def layout(self) -> ParamLayout:
        """enc.0 .. enc.head (H -> Z: the code itself), dec.0 .. dec.head (H' -> D: the logits)."""
        layers = []
        fan_in = self.x_dim
        for i, h in enumerate(self.hidden):
            layers.append((f"enc.{i}", fan_in, h))
            fan_in = h
        layers.append(("enc.head", fan_in, self.z_dim))
        fan_in = self.z_dim
        for i, h in enumerate(self.dec_hidden):
            layers.append((f"dec.{i}", fan_in, h))
            fan_in = h
        layers.append(("dec.head", fan_in, self.x_dim))
        return ParamLayout(layers)

    def to_dict(self):
        d = asdict(self)
        d["hidden"], d["dec_hidden"] = list(self.hidden), list(self.dec_hidden)
        return d


def _proxy_spec(spec):
    """A VAE spec at least as large as the Autoencoder's (its code head is z wide, the VAE's 2z), for
    the memory estimates of minivae.resources."""
    from .model import ModelSpec
    return ModelSpec(spec.x_dim, spec.z_dim, spec.hidden, spec.dec_hidden, spec.activation, "bernoulli")


def get_ae_backend(name):
    """The Autoencoder's backend class for ``name`` (numpy, numba, or auto: numba)."""
    if name == "auto":
        name = "numba"
    if name == "numpy":
        from .kernels.numpy_ae import AENumpyBackend
        return AENumpyBackend
    if name == "numba":
        from .kernels.cpu_ae import AENumbaBackend
        return AENumbaBackend
    raise ValueError(f"unknown backend {name!r} for the Autoencoder; expected one of {', '.join(BACKENDS)}")


class Autoencoder(FlatParams):
    """A deterministic MLP autoencoder with a sigmoid output and the squared-error loss (§13).

    ``x`` is (n, x_dim) in [0, 1] (the sigmoid's range); ``z`` is (m, z_dim), any real values.
    """

    def __init__(self, x_dim, z_dim, hidden=(400,), activation="relu", dtype="float32", seed=0,
                 backend="numpy", dec_hidden=None):
        self.spec = AESpec(x_dim, z_dim, hidden, dec_hidden, activation)
        try:
            name = np.dtype(dtype).name if dtype is not None else None
        except TypeError:
            name = None
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.dtype = np.dtype(name)
        proxy = _proxy_spec(self.spec)
        resources.check(resources.model_bytes(proxy, self.dtype.itemsize),
                        f"a model of about {resources.parameter_count(proxy):,} parameters")
        if seed is not None:               # saved in the config (JSON): an int, not a Generator
            checks.integer("seed", seed, lo=0)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.layout = self.spec.layout
        self._params = self.layout.init(self.rng, self.dtype)
        self.backend_name = "numba" if backend == "auto" else backend
        self.backend = get_ae_backend(backend)(self.spec, self.dtype)

    # -- configuration ------------------------------------------------------------------------
    def __getattr__(self, name):
        spec = self.__dict__.get("spec")
        if spec is not None and name in AESpec.__dataclass_fields__:
            return getattr(spec, name)
        raise AttributeError(name)

    def config(self) -> dict:
        return dict(self.spec.to_dict(), dtype=self.dtype.name, seed=self.seed, backend=self.backend_name)

    # -- input checks -------------------------------------------------------------------------
    def check_x(self, x) -> np.ndarray:
        return check_x(x, self.spec.x_dim, self.dtype, "the Autoencoder (its output is a sigmoid)")

    def _check_memory(self, n):
        """Refuse a pass of n rows this machine cannot hold (minivae.resources)."""
        resources.check(resources.pass_bytes(_proxy_spec(self.spec), self.dtype.itemsize, n, 1, True),
                        f"a pass of {n} examples")

    def _z(self, z):
        z = check_z(z, self.spec.z_dim, self.dtype)
        self._check_memory(z.shape[0])
        return z

    # -- the math, delegated to the backend ----------------------------------------------------
    def loss_and_grad(self, x, grad=None):
        """Batch mean of the squared error summed over pixels, 1/n sum_i ||x_hat_i - x_i||^2, and
        its gradient shaped like ``params`` (written into ``grad`` when given).   §13.2"""
        grad = checks.grad_buffer(grad, self._params)
        x = self.check_x(x)
        self._check_memory(x.shape[0])
        return self.backend.loss_and_grad(self._params, x, grad=grad)

    def sq_error(self, x):
        """Per-example squared error sum_d (x_hat_id - x_id)^2, shape (n,)."""
        return self.backend.sq_error(self._params, self.check_x(x))

    def encode(self, x):
        """The code z = encoder(x), shape (n, z_dim)."""
        return self.backend.encode(self._params, self.check_x(x))

    def decode(self, z):
        """x_hat = sigmoid(decoder(z)), shape (m, x_dim), in [0, 1]."""
        return self.backend.decode(self._params, self._z(z))

    def reconstruct(self, x):
        """decode(encode(x)), shape (n, x_dim)."""
        return self.backend.decode(self._params, self.encode(x))

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path, extra_meta=None, extra_arrays=None):
        """Write config and parameters to an ``.npz`` file, atomically (kind "ae")."""
        meta = {"kind": KIND, "config": self.config()}
        meta.update(extra_meta or {})
        checkpoint.save(path, meta, dict(extra_arrays or {}, params=self._params))

    @classmethod
    def from_config(cls, config: dict, backend=None):
        """A model built from a saved config, every field checked and its size bounded first (the
        checks of minivae.model.spec_from_config), so an absurd config is refused before anything
        is allocated. CheckpointError says what is wrong."""
        spec = _spec_from_config(config)
        return cls(spec.x_dim, spec.z_dim, hidden=spec.hidden, activation=spec.activation,
                   dtype=config["dtype"], seed=config.get("seed", 0),
                   backend=backend or config.get("backend", "numpy"), dec_hidden=spec.dec_hidden)

    @classmethod
    def load(cls, path, backend=None):
        """Read a checkpoint written by :meth:`save` (or by ``minivae train --model ae``). The config
        and the header of ``params`` are checked before the model is built or anything is read."""
        checked = {}

        def expect(meta):
            if meta.get("kind") != KIND:
                raise checkpoint.CheckpointError(f"{path}: a VAE checkpoint, not an Autoencoder's; "
                                                 f"load it with minivae.VAE.load")
            if "config" not in meta:
                raise checkpoint.CheckpointError(f"{path}: checkpoint has no model config or parameters")
            try:
                spec = _spec_from_config(meta["config"])
            except checkpoint.CheckpointError as e:
                raise checkpoint.CheckpointError(f"{path}: {e}") from None
            checked["config"] = meta["config"]
            return {"params": checkpoint.Expect((spec.layout.size,), meta["config"]["dtype"],
                                                source="the config implies")}

        meta, arrays = checkpoint.load(path, expect=expect)      # refuses a missing 'params' entry
        p = arrays["params"]
        bad = int((~np.isfinite(p)).sum())
        if bad:
            raise checkpoint.CheckpointError(f"{path}: {bad} of the model's {p.size} parameters are NaN or inf")
        try:
            model = cls.from_config(checked["config"], backend=backend)
        except (checkpoint.CheckpointError, ValueError) as e:
            raise checkpoint.CheckpointError(f"{path}: {e}") from None
        model.params[...] = p
        return model


def _spec_from_config(config) -> AESpec:
    """The AESpec of a saved config, checked like a VAE's (minivae.model.spec_from_config: types,
    widths, bounded size) before anything is allocated; z_dim must be one integer."""
    from .model import spec_from_config
    if not isinstance(config, dict):
        raise checkpoint.CheckpointError(f"checkpoint config is not a JSON object ({type(config).__name__})")
    if isinstance(config.get("z_dim"), (list, tuple)):
        raise checkpoint.CheckpointError("an Autoencoder's config z_dim must be one integer")
    vae, _ = spec_from_config(dict(config, likelihood="bernoulli"))   # every field checked, size bounded
    try:
        return AESpec(vae.x_dim, vae.z_dim, vae.hidden, vae.dec_hidden, vae.activation)
    except ValueError as e:
        raise checkpoint.CheckpointError(f"checkpoint config is malformed ({e})") from None


def load_model(path, backend=None):
    """A VAE or an Autoencoder, whichever the checkpoint holds (by ``meta["kind"]``)."""
    from .model import VAE
    meta, _ = checkpoint.load(path, expect=lambda meta: {})         # the header only: no array is read
    cls = Autoencoder if meta.get("kind") == KIND else VAE
    return cls.load(path, backend=backend)
