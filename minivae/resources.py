"""How much memory a model, a training step or an evaluation pass needs, checked up front.

A size flag (``--hidden 1000000000``, ``--samples``, ``--k``, ``--batch-size``, ``--z-dim``) or an API
argument can ask for terabytes. Rather than die with a MemoryError traceback halfway through (or be
killed by the kernel), the model and the trainer estimate what they are about to allocate and refuse
in one line when it exceeds the memory this machine has available:

    training a model of 190,000,000,104 parameters on batches of 128 examples x 1 sample(s) would need
    about 18,209.2 GiB, this machine has 22.0 GiB available

The estimate (one function per use, all from :func:`parameter_count` and :func:`pass_bytes`):

    parameters      P = sum over layers of (fan_in + 1) fan_out                     (docs/math.md §1)
    model           P x itemsize, plus the float64 draws of the largest tensor at initialisation
    training        P x itemsize x (params + grad + optimizer state: 1 sgd/adagrad, 2 adam)
                    + one forward/backward pass of batch_size examples x L samples
    one pass        rows x (sum of the widths each row goes through) x itemsize x FACTOR
                    encoder rows: n (x, hidden, [mu | logvar]); decoder rows: R = L n (eps, z, dz,
                    hidden, head, per-pixel log-probabilities); FACTOR covers the layer output, the
                    cache (pre-activations) and the gradient of each buffer (backward), or output and
                    cache (forward only). An upper estimate of the NumPy reference, which allocates most.

It is an estimate ("about"), meant to tell 10 GiB from 10 TiB, not 10 from 11. The available memory
is /proc/meminfo's MemAvailable (Linux), else os.sysconf's available pages; when neither can be read
nothing is refused. Estimates under CHECK_ABOVE bytes are not checked at all (no file is read on the
hot path of small calls).
"""
from __future__ import annotations

import os

GiB = 2 ** 30
CHECK_ABOVE = 256 * 2 ** 20          # smaller estimates are never refused
FORWARD_FACTOR = 2                   # output + cache of each buffer
BACKWARD_FACTOR = 4                  # + its gradient + the temporaries of the backward products
OPTIMIZER_STATES = {"sgd": 1, "adagrad": 1, "adam": 2}
NOMINAL_X_DIM = {"digits": 64, "mnist": 784, "fashion-mnist": 784}   # pixels of the bundled/canonical images


class MemoryLimitError(ValueError):
    """A request that would need more memory than this machine has available."""


def available_bytes():
    """Memory available to a new allocation now, in bytes (None when it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def format_bytes(n) -> str:
    if n >= 1e6 * GiB:
        return f"{n / GiB:.3g} GiB"
    if n >= GiB / 10:
        return f"{n / GiB:,.1f} GiB"
    return f"{n / 2 ** 20:,.1f} MiB"


def check(nbytes, what):
    """Raise MemoryLimitError when ``what`` would need more than the available memory."""
    if nbytes < CHECK_ABOVE:
        return
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise MemoryLimitError(f"{what} would need about {format_bytes(nbytes)}, this machine has "
                               f"{format_bytes(avail)} available")


# -- the estimates (Python ints throughout: no overflow, whatever the flags say) --------------------

def _blocks(spec):
    """(fan_in, hidden widths, head width) of every MLP block in the order of the flat layout:
    enc, enc2, ..., encS, decS, ..., dec2, dec (docs/math.md §1, §11), from the spec's integers alone."""
    Z, S = spec.z_dims, spec.n_stochastic
    blocks = [(spec.x_dim if l == 1 else Z[l - 2], spec.enc_blocks[l - 1], 2 * Z[l - 1]) for l in range(1, S + 1)]
    blocks += [(Z[l - 1], spec.dec_blocks[l - 1], spec.head_width if l == 1 else 2 * Z[l - 2])
               for l in range(S, 0, -1)]
    return blocks


def _layers(spec):
    """(fan_in, fan_out) of every layer, in the order of params.ParamLayout."""
    out = []
    for fan_in, widths, head in _blocks(spec):
        dims = [fan_in, *widths, head]
        out += list(zip(dims[:-1], dims[1:]))
    return out


def parameter_count(spec) -> int:
    """P = sum (fan_in + 1) fan_out: the length of the flat parameter vector.   §1"""
    return sum((i + 1) * o for i, o in _layers(spec))


def model_bytes(spec, itemsize) -> int:
    """The parameter vector, and the float64 draws of its largest tensor at initialisation."""
    largest = max(i * o for i, o in _layers(spec))
    return parameter_count(spec) * itemsize + 8 * largest


def pass_bytes(spec, itemsize, n, samples=1, backward=True) -> int:
    """The buffers of one pass of n examples with L = ``samples`` draws of eps (see the module doc)."""
    R = int(samples) * int(n)
    Z = spec.z_dims
    # q(z_1|x) runs on the n rows; the blocks above it, and every generative block, on the R rows
    enc = int(n) * (spec.x_dim + sum(spec.enc_blocks[0]) + 2 * Z[0])
    enc += R * sum(sum(w) + 2 * z for w, z in zip(spec.enc_blocks[1:], Z[1:]))
    dec = R * (3 * sum(Z) + sum(sum(w) for w in spec.dec_blocks) + spec.head_width + spec.x_dim + 2 * sum(Z[:-1]))
    factor = BACKWARD_FACTOR if backward else FORWARD_FACTOR
    return factor * (enc + dec) * itemsize + 4 * 8 * R            # + the float64 ll, log w, dlogw rows


def training_bytes(spec, itemsize, batch_size, samples, optimizer="adam", eval_batch_size=0) -> int:
    """Parameters, gradient and optimizer state, and the larger of a training step and an
    evaluation pass (one sample, forward only) of ``eval_batch_size`` rows."""
    vectors = 2 + OPTIMIZER_STATES.get(optimizer, 2)
    step = max(pass_bytes(spec, itemsize, batch_size, samples, backward=True),
               pass_bytes(spec, itemsize, eval_batch_size, 1, backward=False))
    return model_bytes(spec, itemsize) + (vectors - 1) * parameter_count(spec) * itemsize + step


def check_training(config):
    """Refuse a training configuration (minivae.train.TrainConfig) this machine cannot hold, before
    any folder is made or any data is read. The image size is the dataset's nominal one."""
    import numpy as np

    from .model import ModelSpec

    spec = ModelSpec(NOMINAL_X_DIM.get(config.dataset, 784), config.z_dim, tuple(config.hidden),
                     None, config.activation, config.likelihood)
    itemsize = np.dtype(config.dtype).itemsize
    need = training_bytes(spec, itemsize, config.batch_size, config.eps_samples(), config.optimizer,
                          config.eval_batch_size)
    check(need, f"training a model of {parameter_count(spec):,} parameters on batches of "
                f"{config.batch_size} examples x {config.eps_samples()} sample(s)")
