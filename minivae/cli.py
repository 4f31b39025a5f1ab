"""The ``minivae`` command: train, evaluate, sample, plot, gradcheck, download, bench.

    minivae train --dataset digits --epochs 30 --z-dim 2 --hidden 128 --out runs/demo
    minivae evaluate runs/demo/model.npz --iw-samples 1000 --json
    minivae sample runs/demo --n 64 --out samples.png
    minivae plot runs/demo --kind all --out pictures/
    minivae gradcheck
    minivae download mnist
    minivae bench --plot roofline.png

Exit status: 0 on success; 2 for a bad argument (argparse, one line); 1 for bad input found later
(a missing or corrupt file, a bad checkpoint, an existing run folder, a diverged run), printed as
one line ``minivae: error: ...`` without a traceback (set MINIVAE_DEBUG=1 to see it); 130 on Ctrl-C.

Ctrl-C prints the one line ``minivae: interrupted`` (training: where it saved) and exits 130 at any
point: during start-up, while numpy and numba are imported (this module and the package's
``__init__`` import nothing heavy at module level, and ``main`` does everything else inside its
``try``), and during shut-down (``console``, the program's entry point, then answers a Ctrl-C by
flushing stdout, printing that line and leaving with ``os._exit(130)``: no traceback from atexit
handlers or threads, no "Exception ignored" message).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from . import __version__
from . import interrupts

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130
SAMPLE_MAX = 4096          # sample --n: a 64 x 64 grid is the most one PNG shows legibly


# ----------------------------------------------------------------------------------------------
# Argument types: a bad value is an argparse error (exit 2, one line)
# ----------------------------------------------------------------------------------------------

def _int_at_least(lo, what):
    """An argparse type: an integer >= lo, else a one-line argparse error naming ``what``."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")


def _int_between(lo, hi, what):
    """An argparse type: an integer in [lo, hi], else a one-line argparse error naming ``what``."""
    at_least = _int_at_least(lo, what)

    def parse(text):
        v = at_least(text)
        if v > hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


def _float(text, what, ok):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(v) or not ok(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive_float(text):
    return _float(text, "a finite number > 0", lambda v: v > 0)


def nonneg_float(text):
    return _float(text, "a finite number >= 0", lambda v: v >= 0)


def decay_factor(text):
    return _float(text, "a number in (0, 1]", lambda v: 0 < v <= 1)


def unit_interval(text):
    return _float(text, "a number in [0, 1)", lambda v: 0 <= v < 1)


class _Parser(argparse.ArgumentParser):
    """argparse, with its error on one line (the usage is one ``--help`` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from .data import BINARIZE, DATASETS
    from .distributions import LIKELIHOODS
    from .kernels import BACKENDS
    from .kernels.config import GEMMS
    from .layers import ACTIVATIONS
    from .model import DTYPES
    from .objectives import OBJECTIVES
    from .optim import OPTIMIZERS
    from .plots import FILENAMES
    from .recipe import LR_SCHEDULES, OUTPUT_BIAS_INITS
    from .train import TrainConfig

    d = TrainConfig()
    parser = _Parser(prog="minivae", description="A Variational Autoencoder written by hand in NumPy, "
                     "with Numba CPU and CUDA kernels.")
    parser.add_argument("--version", action="version", version=f"minivae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # -- train: every option defaults to SUPPRESS, so the ones given explicitly are known (--resume)
    S = argparse.SUPPRESS
    t = sub.add_parser("train", help="train a VAE, writing checkpoints, metrics and pictures to a run folder",
                       description="Train a VAE. Writes RUNDIR/model.npz (parameters, config and the "
                       "training state, every epoch), RUNDIR/metrics.jsonl (one line per epoch) and, "
                       "at the end, the pictures.")
    g = t.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default=S, help=f"(default: {d.dataset}, bundled, no network)")
    g.add_argument("--data-dir", metavar="DIR", default=S,
                   help="folder with the IDX files (default: $MINIVAE_DATA, then ~/.cache/minivae/<dataset>)")
    g.add_argument("--binarize", choices=BINARIZE, default=S,
                   help=f"static: one Bernoulli draw per pixel; dynamic: a fresh draw per minibatch "
                        f"(default: {d.binarize})")
    g.add_argument("--val-fraction", type=unit_interval, metavar="F", default=S,
                   help=f"fraction of train held out for validation (default: {d.val_fraction})")
    g = t.add_argument_group("model")
    g.add_argument("--model", choices=("vae", "ae"), default=S,
                   help="vae, or ae: the deterministic autoencoder, trained on the squared error "
                        f"(numpy or numba; no likelihood or objective options) (default: {d.model})")
    g.add_argument("--z-dim", type=positive_int, nargs="+", metavar="Z", default=S,
                   help=f"latent dimensions; several values, bottom to top, make a stack of stochastic "
                        f"layers, e.g. --z-dim 100 50 (default: {d.z_dim})")
    g.add_argument("--hidden", type=positive_int, nargs="+", action="append", metavar="H", default=S,
                   help=f"hidden layer widths of the encoder; the decoder mirrors them. Given once: every "
                        f"block; given once per stochastic layer: one per block (default: {d.hidden[0]})")
    g.add_argument("--activation", choices=ACTIVATIONS, default=S, help=f"(default: {d.activation})")
    g.add_argument("--likelihood", choices=LIKELIHOODS, default=S, help=f"p(x|z) per pixel (default: {d.likelihood})")
    g.add_argument("--init-output-bias", choices=OUTPUT_BIAS_INITS, default=S,
                   help="data: start the decoder's output bias at the training data's mean (log-odds for the "
                        "Bernoulli likelihoods) (default: zero)")
    g.add_argument("--dtype", choices=DTYPES, default=S, help=f"(default: {d.dtype})")
    g.add_argument("--backend", choices=BACKENDS, default=S,
                   help=f"auto: cuda when a GPU is usable, else numba; numpy is the slow reference "
                        f"(default: {d.backend}; on --resume, the run's own)")
    g = t.add_argument_group("objective")
    g.add_argument("--objective", choices=OBJECTIVES, default=S, help=f"(default: {d.objective})")
    g.add_argument("--samples", type=positive_int, metavar="L", default=S,
                   help=f"Monte Carlo samples per example for the ELBO (default: {d.samples})")
    g.add_argument("--estimator", choices=("reparam", "dreg", "score"), default=S,
                   help="the inference network's gradient: dreg is the doubly reparameterized IWAE gradient "
                        "(--objective iwae); score is REINFORCE (--objective elbo, one stochastic layer, "
                        f"--backend numpy; a study tool: far noisier) (default: {d.estimator})")
    g.add_argument("--k", type=positive_int, metavar="K", default=S,
                   help=f"importance samples per example for --objective iwae (default: {d.k})")
    g.add_argument("--beta", type=nonneg_float, default=S, help=f"weight of the KL term (default: {d.beta:g})")
    g.add_argument("--warmup", type=nonneg_float, metavar="EPOCHS", default=S,
                   help="linear KL warm-up: beta rises from 0 over this many epochs (default: 0, none)")
    g.add_argument("--free-bits", type=nonneg_float, metavar="NATS", default=S,
                   help="per-dimension floor on the batch-mean KL (default: 0, none)")
    g = t.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S, help=f"(default: {d.optimizer})")
    g.add_argument("--lr", type=positive_float, default=S,
                   help="learning rate (default: 1e-3 for adam, 1e-2 for sgd and adagrad)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=S,
                   help="constant; step (times --lr-gamma every --lr-step-epochs epochs); iwae (Burda et al.'s "
                        "3^i passes at lr 10^(-i/7), i = 0..7: 3280 passes in all) (default: constant)")
    g.add_argument("--lr-step-epochs", type=positive_int, metavar="N", default=S,
                   help=f"step schedule: epochs between decays (default: {d.lr_step_epochs})")
    g.add_argument("--lr-gamma", type=decay_factor, metavar="G", default=S,
                   help=f"step schedule: factor of each decay (default: {d.lr_gamma:g})")
    g.add_argument("--adam-eps", type=positive_float, metavar="EPS", default=S,
                   help=f"Adam's epsilon (default: {d.adam_eps:g}; Burda et al. use 1e-4)")
    g.add_argument("--momentum", type=unit_interval, default=S, help=f"sgd momentum (default: {d.momentum})")
    g.add_argument("--weight-decay", type=nonneg_float, metavar="WD", default=S,
                   help="L2 weight decay, the N(0, 1/WD) prior on the weights (default: 0)")
    g.add_argument("--epochs", type=positive_int, default=S, help=f"(default: {d.epochs})")
    g.add_argument("--batch-size", type=positive_int, metavar="B", default=S,
                   help=f"global minibatch size, over all processes (default: {d.batch_size})")
    g.add_argument("--seed", type=nonneg_int, default=S, help=f"(default: {d.seed})")
    g = t.add_argument_group("run")
    g.add_argument("--out", metavar="RUNDIR", default=S, help="run folder (default: runs/<dataset>)")
    g.add_argument("--resume", metavar="RUNDIR", default=S,
                   help="continue the run in RUNDIR (bit-identical to an uninterrupted run); "
                        "--epochs, --data-dir, --backend and the output options may change")
    g.add_argument("--overwrite", action="store_true", default=S, help="replace a run already in --out")
    g.add_argument("--eval-batch-size", type=positive_int, metavar="N", default=S,
                   help=f"rows per evaluation call (default: {d.eval_batch_size})")
    g.add_argument("--no-plots", dest="plots", action="store_false", default=S,
                   help="do not draw the pictures at the end")
    g.add_argument("--quiet", action="store_true", default=S, help="no progress bar and no per-epoch lines")
    g.add_argument("--distributed", action="store_true", default=S,
                   help="data-parallel over MPI: mpiexec -n P minivae train --distributed ... (needs mpi4py)")
    _threads_option(g)
    t.set_defaults(func=cmd_train)

    # -- evaluate
    e = sub.add_parser("evaluate", help="ELBO, importance-weighted log p(x), active units, reconstruction error",
                       description="Evaluate a checkpoint on a split of a dataset. Every number is per "
                       "example, in nats (the reconstruction error: squared error summed over pixels).")
    e.add_argument("checkpoint", metavar="CKPT", help="a model.npz, or a run folder holding one")
    _data_options(e, DATASETS, BINARIZE)
    e.add_argument("--split", choices=("test", "val", "train"), default="test", help="(default: test)")
    e.add_argument("--iw-samples", type=nonneg_int, metavar="K", default=100,
                   help="importance samples for log p(x); 0 skips it (default: 100; Burda et al. use 5000)")
    e.add_argument("--batch-size", type=positive_int, metavar="N", default=1000,
                   help="rows (examples x samples) per backend call, which bounds memory whatever "
                        "--iw-samples and --chunk say (default: 1000)")
    e.add_argument("--chunk", type=positive_int, default=100,
                   help="importance samples per backend call, at most --batch-size (default: 100)")
    e.add_argument("--seed", type=nonneg_int, default=0, help="seed of the evaluation noise (default: 0)")
    e.add_argument("--backend", choices=BACKENDS, default=None, help="(default: the checkpoint's)")
    e.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    e.add_argument("--per-example", metavar="FILE.npz", default=None,
                   help="also write the per-example values (arrays elbo, recon_error and, with "
                        "--iw-samples > 0, iw_log_likelihood; one entry per example) to this .npz file")
    _threads_option(e)
    e.set_defaults(func=cmd_evaluate)

    # -- sample
    s = sub.add_parser("sample", help="draw images from the prior into a PNG grid")
    s.add_argument("checkpoint", metavar="CKPT", help="a model.npz, or a run folder holding one")
    s.add_argument("--n", type=_int_between(1, SAMPLE_MAX, f"an integer in [1, {SAMPLE_MAX}] (one PNG grid)"),
                   default=64, help=f"number of images, at most {SAMPLE_MAX} (a 64 x 64 grid; default: 64)")
    s.add_argument("--out", metavar="PNG", required=True, help="the PNG file to write")
    s.add_argument("--seed", type=nonneg_int, default=0, help="(default: 0)")
    s.add_argument("--draw", action="store_true", help="draw x ~ p(x|z) instead of showing its mean")
    s.set_defaults(func=cmd_sample)

    # -- plot
    p = sub.add_parser("plot", help="draw one of the pictures (or all) from a checkpoint")
    p.add_argument("checkpoint", metavar="CKPT", help="a model.npz, or a run folder holding one")
    p.add_argument("--kind", choices=tuple(FILENAMES) + ("all",), required=True)
    _data_options(p, DATASETS, BINARIZE)
    p.add_argument("--out", metavar="PATH", required=True, help="the PNG file (a folder for --kind all)")
    p.set_defaults(func=cmd_plot)

    # -- gradcheck
    gc = sub.add_parser("gradcheck", help="check every gradient against central differences (float64)")
    gc.add_argument("--backend", choices=BACKENDS, default="numpy", help="(default: numpy)")
    gc.add_argument("--seed", type=nonneg_int, default=0, help="(default: 0)")
    gc.add_argument("--tol", type=positive_float, default=1e-6, help="largest relative error passed (default: 1e-6)")
    gc.set_defaults(func=cmd_gradcheck)

    # -- download
    dl = sub.add_parser("download", help="fetch the MNIST or Fashion-MNIST IDX files, SHA-256 verified")
    dl.add_argument("name", choices=("mnist", "fashion-mnist"))
    dl.add_argument("--data-dir", metavar="DIR", default=None,
                    help="target folder (default: $MINIVAE_DATA/<name>, then ~/.cache/minivae/<name>)")
    dl.add_argument("--base-url", metavar="URL", default=None, help="a mirror to use instead of the default ones")
    dl.add_argument("--quiet", action="store_true", help="no progress output")
    dl.set_defaults(func=cmd_download)

    # -- bench (minivae/bench.py)
    b = sub.add_parser("bench", help="this machine's ceilings and every kernel of a training step on a roofline")
    for flag, default in (("--x-dim", 784), ("--z-dim", 20), ("--batch", 128), ("--repeat", 7)):
        b.add_argument(flag, type=positive_int, metavar="N", default=default, help=f"(default: {default})")
    b.add_argument("--hidden", type=positive_int, nargs="+", metavar="H", default=[400], help="(default: 400)")
    b.add_argument("--activation", choices=ACTIVATIONS, default="relu", help="(default: relu)")
    b.add_argument("--likelihood", choices=LIKELIHOODS, default="bernoulli", help="(default: bernoulli)")
    b.add_argument("--dtype", choices=DTYPES, default="float32", help="(default: float32)")
    b.add_argument("--backend", choices=("numba", "numpy"), default="numba", help="(default: numba)")
    b.add_argument("--gemm", choices=GEMMS, default=None, help="the numba backend's GEMM (default: $MINIVAE_GEMM or auto: BLAS, and the custom kernel in the parts of an example split)")
    _threads_option(b)
    b.add_argument("--plot", metavar="PNG", default=None, help="write the roofline there")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    b.set_defaults(func=cmd_bench)
    return parser


def _data_options(p, datasets, binarize):
    p.add_argument("--dataset", choices=datasets, default=None,
                   help="(default: the dataset the checkpoint was trained on)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder with the IDX files")
    p.add_argument("--binarize", choices=binarize, default=None,
                   help="(default: as in training; 'dynamic' evaluates one fixed binarization)")
    p.add_argument("--val-fraction", type=unit_interval, metavar="F", default=None,
                   help="(default: as in training, else 0.1)")


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def _threads_option(group):
    group.add_argument("--threads", type=positive_int, metavar="N", default=None,
                       help="threads of this process for Numba and every OpenBLAS copy (default: all "
                            "cores; with P ranks on one machine, give cores / P)")


# set by the launchers for each of P processes: MPICH/Intel MPI (hydra), Open MPI
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def _launched_processes() -> int:
    """How many processes an MPI launcher started (1 when not under one)."""
    sizes = [1]
    for name in _LAUNCHER_SIZE_VARS:
        try:
            sizes.append(int(os.environ.get(name, "1")))
        except ValueError:
            pass
    return max(sizes)


def cmd_train(args):
    from .train import TrainConfig, resume_config, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "threads")}
    launched = _launched_processes()
    if launched > 1 and not given.get("distributed", False):
        raise ValueError(f"started as one of {launched} MPI processes without --distributed: each would train "
                         "its own copy into the same folder; add --distributed (or run one process)")
    if "hidden" in given:        # action=append: once for every block, or once per stochastic layer
        h = given["hidden"]
        given["hidden"] = tuple(h[0]) if len(h) == 1 else tuple(tuple(b) for b in h)
    if "z_dim" in given:
        z = given["z_dim"]
        given["z_dim"] = z[0] if len(z) == 1 else tuple(z)
    if "resume" in given:
        if "out" in given and Path(given["out"]).resolve() != Path(given["resume"]).resolve():
            raise ValueError("--resume continues the run in its own folder; leave out --out or give the same folder")
        config = resume_config(given["resume"], given)
    else:
        config = TrainConfig(**given)
    train(config)
    return 0


def _checkpoint_path(text) -> Path:
    p = Path(text)
    return p / "model.npz" if p.is_dir() else p


def load_checkpoint(text, backend=None):
    """(model, meta) from a model.npz or a run folder."""
    from . import checkpoint
    from .autoencoder import load_model

    path = _checkpoint_path(text)
    model = load_model(path, backend=backend)
    meta, _ = checkpoint.load(path)
    return model, meta


def _train_config(meta) -> dict:
    state = meta.get("train")
    cfg = state.get("config", {}) if isinstance(state, dict) else {}
    return cfg if isinstance(cfg, dict) else {}          # a crafted file may hold anything here


def image_shape(model, meta):
    """The (h, w) of the images: saved by training, else a square x_dim."""
    shape = meta.get("image_shape")
    if isinstance(shape, list) and len(shape) == 2 and all(type(v) is int for v in shape) \
            and shape[0] * shape[1] == model.x_dim:
        return tuple(int(v) for v in shape)
    side = math.isqrt(model.x_dim)
    if side * side == model.x_dim:
        return side, side
    raise ValueError(f"the checkpoint does not say the image shape and x_dim={model.x_dim} is not a square")


def load_split(args, model, meta, split="test"):
    """The dataset named by the options (default: the checkpoint's), and the rows of ``split``."""
    from .data import load_dataset
    from .train import eval_split

    cfg = _train_config(meta)
    name = args.dataset or meta.get("dataset") or cfg.get("dataset")
    if name is None:
        raise ValueError("the checkpoint does not say which dataset it was trained on; pass --dataset")
    binarize = args.binarize or cfg.get("binarize", "none")
    val_fraction = args.val_fraction if args.val_fraction is not None else cfg.get("val_fraction", 0.1)
    data_dir = args.data_dir or (cfg.get("data_dir") if name == cfg.get("dataset") else None)
    if data_dir is not None and not isinstance(data_dir, str):
        raise ValueError(f"the checkpoint's data_dir {data_dir!r} is not a folder name; pass --data-dir")
    ds = load_dataset(name, data_dir, binarize=binarize, val_fraction=val_fraction,
                      seed=cfg.get("seed", 0), dtype=model.dtype.name)
    if ds.x_dim != model.x_dim:
        raise ValueError(f"{name} has {ds.x_dim} pixels per image, the model expects x_dim={model.x_dim}")
    x = {"test": ds.x_test, "val": ds.x_val, "train": ds.x_train}[split]
    if len(x) == 0:
        raise ValueError(f"the {split} split of {name} is empty (--val-fraction {val_fraction})")
    return ds, eval_split(x, binarize, split)


def _json_number(v):
    """A JSON-safe number: NaN and inf become None (null)."""
    return v if v is None or not isinstance(v, float) or math.isfinite(v) else None


def cmd_evaluate(args):
    """Print the evaluation as a table or one JSON line (always valid JSON: non-finite numbers are
    null); a non-finite figure is then a failure (one line on stderr, exit 1)."""
    import numpy as np

    from .evaluate import evaluate, nonfinite, save_per_example

    if args.per_example is not None:           # before a long evaluation, not after it
        target = Path(args.per_example)
        if target.is_dir() or not target.parent.is_dir():
            raise ValueError(f"--per-example {target}: expected a file in an existing folder")
    model, meta = load_checkpoint(args.checkpoint, backend=args.backend)
    bad_params = int((~np.isfinite(model.params)).sum())
    if bad_params:       # some backends' ReLU maps NaN to 0: the figures alone would not always tell
        raise ValueError(f"{args.checkpoint}: {bad_params} of the model's {model.params.size} parameters are "
                         "NaN or inf; there is nothing to evaluate")
    ds, x = load_split(args, model, meta, args.split)
    if _is_ae(model):
        return _evaluate_ae(args, model, ds, x)
    with np.errstate(all="ignore"):           # a NaN result is reported below, in one line
        r = evaluate(model, x, iw_samples=args.iw_samples, batch_size=args.batch_size, chunk=args.chunk,
                     seed=args.seed, per_example=args.per_example is not None)
    r = dict(r, dataset=ds.name, split=args.split)
    if args.per_example is not None:
        save_per_example(args.per_example, r["per_example"])
    if args.json:
        keys = ("elbo", "elbo_se", "iw_log_likelihood", "iw_log_likelihood_se", "iw_samples", "active_units",
                "recon_error", "recon_error_se", "n", "dataset", "split", "seed")
        if model.n_stochastic > 1:
            keys += ("active_units_per_layer",)
        print(json.dumps({k: _json_number(r[k]) for k in keys}, allow_nan=False))
    else:
        def pm(key, fmt):
            se = r[f"{key}_se"]
            return f"{r[key]:{fmt}}" + (f" +/- {se:{fmt}}" if se is not None else "")
        rows = [("dataset", f"{ds.name} ({args.split}, {r['n']} examples)"),
                ("ELBO", f"{pm('elbo', '.3f')} nats/example (one sample, analytic KL)")]
        if r["iw_log_likelihood"] is not None:
            rows.append((f"log p(x), K={r['iw_samples']}", f"{pm('iw_log_likelihood', '.3f')} nats/example"))
        units = (f"{r['active_units']} of {model.z_dim}" if model.n_stochastic == 1 else
                 ", ".join(f"{a} of {z}" for a, z in zip(r["active_units_per_layer"], model.z_dims)) + " (per layer)")
        rows += [("active units", f"{units} (Var_x E_q[z_j] > 1e-2)"),
                 ("reconstruction error", f"{pm('recon_error', '.4f')} (squared error summed over pixels)")]
        w = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
        print(f"{'':<{w}}  (+/- one standard error of the mean over the examples)")
    bad = nonfinite(r)
    if bad:
        raise ValueError(f"the evaluation is not finite ({', '.join(bad)}: NaN or inf); the model's "
                         "parameters or outputs are not finite numbers")
    return 0


def _is_ae(model) -> bool:
    from .autoencoder import Autoencoder
    return isinstance(model, Autoencoder)


def _evaluate_ae(args, model, ds, x):
    """An Autoencoder has no ELBO, no log p(x) and no posterior: its reconstruction error only, with its
    standard error, the per-example values (``--per-example``: array ``recon_error``) and the same
    refusal of non-finite results as a VAE's."""
    import numpy as np

    from .evaluate import save_per_example, standard_error
    bs = args.batch_size
    with np.errstate(all="ignore"):
        errs = np.concatenate([model.sq_error(x[lo:lo + bs]).astype(np.float64) for lo in range(0, len(x), bs)])
    err = float(errs.mean())
    se = standard_error(float(((errs - err) ** 2).sum()), len(errs)) if np.isfinite(err) else None
    if args.per_example is not None:
        save_per_example(args.per_example, {"recon_error": errs})
    if args.json:
        print(json.dumps({"elbo": None, "iw_log_likelihood": None, "iw_samples": 0, "active_units": None,
                          "recon_error": _json_number(err), "recon_error_se": _json_number(se), "n": len(x),
                          "dataset": ds.name, "split": args.split, "seed": args.seed, "model": "ae"},
                         allow_nan=False))
    else:
        rows = [("dataset", f"{ds.name} ({args.split}, {len(x)} examples)"),
                ("model", "autoencoder: the ELBO, log p(x) and active units need a VAE"),
                ("reconstruction error", f"{err:.4f}" + (f" +/- {se:.4f}" if se is not None else "")
                 + " (squared error summed over pixels)")]
        w = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    if not np.isfinite(err):
        raise ValueError("the evaluation is not finite (recon_error: NaN or inf); the model's "
                         "parameters or outputs are not finite numbers")
    return 0


_NO_PRIOR = "an autoencoder has no prior to sample from; see its decoded grid: minivae plot CKPT --kind manifold"


def cmd_sample(args):
    from .plots import save_samples

    model, meta = load_checkpoint(args.checkpoint)
    if _is_ae(model):
        raise ValueError(_NO_PRIOR)
    images = model.sample(args.n, seed=args.seed, mean=not args.draw)
    path = save_samples(args.out, images, image_shape(model, meta),
                        title="draws from p(x|z)" if args.draw else "samples from the prior (mean of p(x|z))")
    print(path)
    return 0


def _metrics(meta, ckpt_text):
    state = meta.get("train")
    if isinstance(state, dict) and state.get("metrics"):
        metrics = state["metrics"]
        if not isinstance(metrics, list) or not all(isinstance(r, dict) for r in metrics):
            raise ValueError(f"{ckpt_text}: the training metrics in the checkpoint are malformed")
        return metrics
    path = _checkpoint_path(ckpt_text).parent / "metrics.jsonl"
    if path.is_file():
        from .checkpoint import MAX_META_BYTES, parse_json
        if path.stat().st_size > MAX_META_BYTES:
            raise ValueError(f"{path}: larger than any metrics file minivae writes ({MAX_META_BYTES} bytes)")
        rows = []
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                row = parse_json(line, lambda msg: ValueError(f"{path}: line {i} is not JSON ({msg})"),
                                 allow_nan=True)               # a diverged validation loss is NaN
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {i} is not a JSON object")
                rows.append(row)
        return rows
    return []


def cmd_plot(args):
    from . import plots

    model, meta = load_checkpoint(args.checkpoint)
    shape = image_shape(model, meta)
    kind, out = args.kind, Path(args.out)
    if kind == "curves" or kind == "all":
        metrics = _metrics(meta, args.checkpoint)
    if kind == "curves":
        if not metrics:
            raise ValueError(f"{args.checkpoint}: no training metrics to draw")
        paths = [plots.save_curves(out, metrics)]
    elif kind == "samples":
        if _is_ae(model):
            raise ValueError(_NO_PRIOR)
        paths = [plots.save_samples(out, model.sample(64, seed=0), shape)]
    elif kind == "manifold" and _is_ae(model):
        if model.z_dim != 2:
            raise ValueError(f"the decoded grid needs z_dim = 2, the model has z_dim = {model.z_dim}")
        _, x = load_split(args, model, meta, "test")
        paths = [plots.save_code_grid(out, model, model.encode(x[:5000]), shape)]
    elif kind == "manifold":
        if model.z_dims[-1] != 2:
            raise ValueError(f"the manifold needs z_dim = 2 (for a stack, a top layer of 2), the model has "
                             f"z_dim = {model.z_dim}")
        paths = [plots.save_manifold(out, model, shape)]
    else:
        ds, x = load_split(args, model, meta, "test")
        y = ds.y_test
        if kind == "all":
            paths = plots.save_all(out, model, ds, metrics)
        elif kind == "reconstructions":
            n = min(8, len(x))
            paths = [plots.save_reconstructions(out, x[:n], model.reconstruct(x[:n]), shape, n=n)]
        elif kind == "interpolation":
            if len(x) < 2:
                raise ValueError("the interpolation needs two test images")
            import numpy as np
            other = np.flatnonzero(y != y[0])
            paths = [plots.save_interpolation(out, model, x[0], x[int(other[0]) if len(other) else 1], shape)]
        else:  # latent
            what = "codes" if _is_ae(model) else "posterior means"
            paths = [plots.save_latent_scatter(out, plots._codes(model, x[:5000]), y[:5000], what=what)]
    for path in paths:
        print(path)
    return 0


def cmd_gradcheck(args):
    from .gradcheck import run_suite

    return 0 if run_suite(backend=args.backend, seed=args.seed, tol=args.tol) else EXIT_ERROR


def cmd_bench(args):
    from . import bench

    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise ValueError(f"--plot {args.plot}: the folder {Path(args.plot).resolve().parent} does not exist")
    r = bench.run(args.x_dim, args.z_dim, tuple(args.hidden), args.batch, args.dtype, args.threads,
                  args.backend, args.repeat, args.activation, args.likelihood, gemm=args.gemm)
    if args.plot:
        bench.plot_roofline(r, args.plot)
    print(json.dumps(r) if args.json else bench.format_report(r))
    return 0


def cmd_download(args):
    from .data import download

    print(download(args.name, args.data_dir, base_url=args.base_url, quiet=args.quiet))
    return 0


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def _one_line(e) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text


INTERRUPTED_LINE = "minivae: interrupted"


def main(argv=None) -> int:
    """Run the command line; returns the exit status (``console``, the program, exits with it)."""
    try:
        return _run(argv)
    except Exception:
        # a Ctrl-C breaks what it lands in on its way out: a C extension whose initialization it
        # stopped fails to import (ImportError), a library may wrap it in its own error. With a
        # Ctrl-C pending (minivae.interrupts), whatever failed is the interruption
        if not interrupts.pending() or os.environ.get("MINIVAE_DEBUG"):
            raise
        print(INTERRUPTED_LINE, file=sys.stderr)
        return EXIT_INTERRUPTED


def _run(argv) -> int:
    try:
        parser = build_parser()                  # imports numpy, numba: Ctrl-C may land here
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:                  # --help (0) or a bad argument (2)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        from .train import Interrupted
        interrupts.raise_if_pending()            # a Ctrl-C that Python dropped (minivae.interrupts)
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        return EXIT_INTERRUPTED

    try:
        threads = getattr(args, "threads", None)
        if threads is None:
            code = args.func(args)
        else:
            from .threads import limit_threads
            with limit_threads(threads):
                code = args.func(args)
        interrupts.raise_if_pending()            # dropped while the command ran: it was asked to stop
        return code
    except Interrupted as e:
        print(f"minivae: {_one_line(e)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as e:                          # the last resort: sizes are checked up front
        if os.environ.get("MINIVAE_DEBUG") or interrupts.pending():
            raise
        detail = f" ({_one_line(e)})" if str(e) else ""
        print(f"minivae: error: out of memory{detail}; try smaller sizes (--batch-size, --hidden, "
              "--samples, --k, --z-dim)", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError, RuntimeError) as e:   # DataError, CheckpointError, TrainingError among them
        if os.environ.get("MINIVAE_DEBUG") or interrupts.pending():
            raise
        print(f"minivae: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


def _interrupted_at_exit(signum, frame):  # pragma: no cover - runs in a subprocess (tests/test_hardening_runs.py)
    """SIGINT once ``main`` has returned: what is left is shut-down (atexit handlers, threads,
    finalizers), where a KeyboardInterrupt would print a traceback or "Exception ignored". Flush
    what was printed, say the one line, leave at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or reentrant stream: nothing more to save
            pass
    os.write(2, (INTERRUPTED_LINE + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


def console():  # pragma: no cover - runs in a subprocess (tests/test_hardening_runs.py)
    """The ``minivae`` program (the console script and ``python -m minivae``): ``main`` on sys.argv,
    then exit with its status. Ctrl-C during shut-down gives the one line and exit 130, as it does
    during the work (``main``). Not for in-process callers: it changes the SIGINT handler for good."""
    try:
        try:
            code = main()
        finally:
            if not interrupts.ignored():
                signal.signal(signal.SIGINT, _interrupted_at_exit)
    except KeyboardInterrupt:                    # between main's return and the handler
        _interrupted_at_exit(signal.SIGINT, None)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    console()
