"""Burda et al. (2015)'s one- and two-layer VAE and IWAE on MNIST, with their recipe, side by side with PyTorch.

The models of the paper's Table 1 (tanh MLPs, Bernoulli pixels, dynamically binarized MNIST):

    one layer    784-200-200-50: q(z|x) and p(x|z) with two hidden layers of 200
    two layers   784-200-200-100 for q(z1|x) and p(x|z1), 100-100-100-50 for q(z2|z1) and p(z1|z2)

trained with the recipe of its appendix C as minivae options: Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 20,
the `iwae` learning-rate schedule (stages of 3^i passes at 1e-3 * 10^(-i/7), cut short at --epochs: see
docs/math.md §8.4), the decoder's output bias at the training data's mean log-odds. The VAE is trained with one
sample (k = 1), the IWAE with k = --k (50 in the paper). Test NLL is -log p^_K(x) with K = --eval-k (5000 in the
paper), averaged over the first --eval-n test images.

minivae and the PyTorch implementation of the same model (benchmarks/torch_iwae.py, eager) see the same
minibatches in the same order, the same dynamic binarization and the same eps, and are scored on the same test
rows with the same K; their initial weights differ (each initializes its own way). minivae's step is the one
`minivae train` runs (trainers.make_trainer: the backend's loss_and_grad into a reused buffer, then the
optimizer's update); torch's is zero_grad, the loss, backward and Adam's step.

    python benchmarks/iwae_paper.py [--data-dir DIR] [--models vae1 iwae1 vae2 iwae2] [--epochs 10] [--k 50]
                                    [--eval-k 5000] [--eval-n 1000] [--backend numba] [--no-torch] [--json FILE]
    python benchmarks/iwae_paper.py --speed [--batches 20 128] [--k 5]     # training speed only, no data needed

With the four MNIST files in --data-dir it trains on the 60,000 training images and tests on the 10,000 test
images; with only the t10k files (the project's ../shared/data/mnist) it trains on the first 8,000 test images and
tests on the last 2,000. The paper's budget is 3,280 passes over 60,000 images; give it with --epochs 3280.
Benchmark commands: unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

_OMP_WAIT_POLICY_BEFORE = os.environ.get("OMP_WAIT_POLICY")    # before minivae sets its own (threads.py)

from common import MNIST_DIR, machine, table  # noqa: E402
from minivae import VAE  # noqa: E402
from minivae.data import find_idx_files, read_idx  # noqa: E402
from minivae.evaluate import iw_log_likelihood_per_example  # noqa: E402
from minivae.optim import make_optimizer  # noqa: E402
from minivae.recipe import lr_at, output_bias_from_data  # noqa: E402
from minivae.threads import limit_threads  # noqa: E402
from minivae.trainers import SerialComm, make_trainer  # noqa: E402

# name: (z_dims bottom-to-top, hidden widths per stochastic layer, objective)
MODELS = {
    "vae1": ((50,), ((200, 200),), "elbo"),
    "iwae1": ((50,), ((200, 200),), "iwae"),
    "vae2": ((100, 50), ((200, 200), (100, 100)), "elbo"),
    "iwae2": ((100, 50), ((200, 200), (100, 100)), "iwae"),
}
# Burda et al. (2015), Table 1, test NLL (nats) at k = 1 (VAE) and k = 50 (IWAE), K = 5000
PAPER_NLL = {"vae1": 86.76, "iwae1": 84.78, "vae2": 85.33, "iwae2": 82.90}
ADAM = dict(betas=(0.9, 0.999), eps=1e-4)
BASE_LR = 1e-3


def load_mnist(data_dir: Path):
    """(x_train, x_test, what): grey levels in [0, 1], float32."""
    def flat(path):
        return (read_idx(path).reshape(-1, 784) / np.float32(255)).astype(np.float32)

    try:
        files = find_idx_files("mnist", data_dir)
        return flat(files["train_images"]), flat(files["test_images"]), "MNIST train 60,000 / test 10,000"
    except (ValueError, OSError, KeyError):
        pass
    for suffix in (".gz", ""):
        p = Path(data_dir) / f"t10k-images-idx3-ubyte{suffix}"
        if p.exists():
            x = flat(p)
            return x[:8000], x[8000:], "MNIST t10k only: first 8,000 to train, last 2,000 to test"
    raise SystemExit(f"iwae_paper: no MNIST IDX files in {data_dir}")


def eps_for(rng, z_dims, k, n):
    """One eps array (k, n, Z_l) per stochastic layer, float32."""
    return [rng.standard_normal((k, n, z), dtype=np.float32) for z in z_dims]


def minivae_model(name, seed, backend):
    z_dims, hidden, _ = MODELS[name]
    if len(z_dims) == 1:
        return VAE(784, z_dims[0], hidden=hidden[0], activation="tanh", likelihood="bernoulli",
                   dtype="float32", seed=seed, backend=backend)
    return VAE(784, z_dims, hidden=hidden, activation="tanh", likelihood="bernoulli", dtype="float32",
               seed=seed, backend=backend)


def minivae_stepper(model, opt, objective, estimator):
    """step(xb, eps) -> loss: one optimizer step through the trainer ``minivae train`` runs
    (trainers.make_trainer; the data are checked once, as the run checks its data set once)."""
    trainer = make_trainer(model, opt, SerialComm(), objective, 0.0, estimator)
    return lambda xb, eps: trainer.step(xb, eps[0] if len(eps) == 1 else tuple(eps), 1.0)


def torch_step(torch, net, topt, xb, eps, objective):
    topt.zero_grad()
    loss = net.loss(torch.from_numpy(xb), [torch.from_numpy(e) for e in eps], objective)
    loss.backward()
    topt.step()
    return loss.item()


def train_pair(name, x_train, x_test, args, torch):
    """Train minivae (and torch) on the same stream; returns the result row."""
    import torch_iwae
    z_dims, hidden, objective = MODELS[name]
    k = args.k if objective == "iwae" else 1
    rng = np.random.default_rng([args.seed, 7])
    bias = output_bias_from_data("bernoulli", x_train, 1e-4).astype(np.float32)
    ours = minivae_model(name, args.seed, args.backend)
    ours.layout.view(ours.params, "dec.head.b")[...] = bias
    opt = make_optimizer("adam", ours.params.size, "float32", backend=ours.backend, lr=BASE_LR, **ADAM)
    step = minivae_stepper(ours, opt, objective, args.estimator)
    net = topt = None
    if torch is not None:
        net = torch_iwae.build(torch, 784, z_dims, hidden, "tanh", seed=args.seed)
        net.init_output_bias(bias)
        topt = torch.optim.Adam(net.parameters(), lr=BASE_LR, **ADAM)
    n, B = len(x_train), args.batch_size
    t_ours = t_torch = 0.0
    for epoch in range(1, args.epochs + 1):
        lr = lr_at("iwae", BASE_LR, epoch)
        opt.lr = lr
        if topt is not None:
            for group in topt.param_groups:
                group["lr"] = lr
        order = rng.permutation(n)
        for s in range(0, n, B):
            idx = order[s:s + B]
            xb = (rng.random((len(idx), 784), dtype=np.float32) < x_train[idx]).astype(np.float32)
            eps = eps_for(rng, z_dims, k, len(idx))
            t0 = time.perf_counter()
            step(xb, eps)
            t1 = time.perf_counter()
            if net is not None:
                torch_step(torch, net, topt, xb, eps, objective)
            t_torch += time.perf_counter() - t1
            t_ours += t1 - t0
        print(f"# {name} epoch {epoch}/{args.epochs} lr {lr:.2e}: minivae {t_ours:.1f} s"
              + (f", torch {t_torch:.1f} s" if net is not None else ""), file=sys.stderr, flush=True)
    xt = x_test[:args.eval_n]
    ours_nll = -float(iw_log_likelihood_per_example(ours, xt, args.eval_k, seed=0, batch_size=1000,
                                                    chunk=min(100, args.eval_k)).mean())
    theirs_nll = None
    if net is not None:
        theirs_nll = -float(torch_iwae.iw_log_likelihood(torch, net, xt, args.eval_k,
                                                         np.random.default_rng(0)).mean())
    return {"model": name, "k": k, "paper_nll": PAPER_NLL[name], "minivae_nll": ours_nll, "torch_nll": theirs_nll,
            "minivae_s_per_epoch": t_ours / args.epochs,
            "torch_s_per_epoch": t_torch / args.epochs if net is not None else None}


def _spawn(cmd, env):
    """A timing worker (torch_iwae.serve_steps) started and warmed up."""
    import subprocess
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline().strip()
    if line != "ready":
        p.kill()
        raise SystemExit(f"iwae_paper: the timing worker {' '.join(cmd[1:3])} did not start (said {line!r})")
    return p


def _timed(p, steps):
    p.stdin.write(f"{steps}\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def speed(args, torch):
    """Training steps per second of the two-layer IWAE, minivae against torch eager, in alternating blocks.

    By default each framework runs in a process of its own (``--speed-worker``), started with the caller's
    environment as it was before minivae was imported: minivae sets OMP_WAIT_POLICY=PASSIVE for its own
    threads, which slows PyTorch's OpenMP threads down, and neither's idle thread pool spins while the other
    is timed (each block starts --pause seconds after the other's ended: OpenBLAS's idle workers spin
    for about 0.1 s after a call, and would take a core from the other). ``--same-process`` times both in this process instead (the setting of earlier tables).

    Both train on one fixed batch (x, eps), step after step. From about step 80 to 200 that makes the
    importance weights of some samples negligible (tens of nats behind the best), and their gradient rows
    subnormal numbers, which Intel cores multiply tens of times slower. minivae's CPU kernels give such
    samples no gradient (docs/math.md §5.2); PyTorch computes them, unless ``--torch-flush-denormal``
    (torch.set_flush_denormal(True): subnormals read and written as zero, FTZ/DAZ)."""
    import torch_iwae
    if not args.same_process:
        env = dict(os.environ)
        if _OMP_WAIT_POLICY_BEFORE is None:
            env.pop("OMP_WAIT_POLICY", None)
        else:
            env["OMP_WAIT_POLICY"] = _OMP_WAIT_POLICY_BEFORE
    rows, out = [], []
    z_dims, hidden = torch_iwae.SPEED_MODEL
    assert (z_dims, hidden) == MODELS["iwae2"][:2]
    for B in args.batches:
        if args.same_process:
            x, eps = torch_iwae.speed_batch(B, args.k, z_dims)
            ours = minivae_model("iwae2", 0, args.backend)
            opt = make_optimizer("adam", ours.params.size, "float32", backend=ours.backend, lr=1e-4, **ADAM)
            net = torch_iwae.build(torch, 784, z_dims, hidden, "tanh", seed=0)
            topt = torch.optim.Adam(net.parameters(), **torch_iwae.SPEED_ADAM)
            step = minivae_stepper(ours, opt, "iwae", args.estimator)
            fns = {"minivae": lambda: step(x, eps),
                   "torch": lambda: torch_step(torch, net, topt, x, eps, "iwae")}
            for f in fns.values():                  # compile / warm up
                for _ in range(3):
                    f()

            def block(name):
                t = time.perf_counter()
                for _ in range(args.steps):
                    fns[name]()
                return time.perf_counter() - t
        else:
            common = ["--batch", str(B), "--k", str(args.k), "--threads", str(args.threads)]
            procs = {"minivae": _spawn([sys.executable, __file__, "--speed-worker"] + common +
                                       ["--estimator", args.estimator, "--backend", args.backend], os.environ),
                     "torch": _spawn([sys.executable, str(HERE / "torch_iwae.py"), "--speed-worker"] + common +
                                     (["--flush-denormal"] if args.torch_flush_denormal else []), env)}

            def block(name):
                time.sleep(args.pause)              # the other's idle threads (OpenBLAS spins ~0.1 s) asleep
                return _timed(procs[name], args.steps)
        times = {"minivae": [], "torch": []}
        for r in range(args.repeats):               # alternate (ABBA), so that load and drift hit both alike
            for name in (("minivae", "torch") if r % 2 == 0 else ("torch", "minivae")):
                times[name].append(block(name) / args.steps)
        if not args.same_process:
            for p in procs.values():
                p.stdin.close()
                p.wait()
        med = {name: float(np.median(v)) for name, v in times.items()}
        ratio = med["torch"] / med["minivae"]
        paired = np.array(times["torch"]) / np.array(times["minivae"])     # round by round, side by side
        q1, q2, q3 = (float(q) for q in np.percentile(paired, [25, 50, 75]))
        out.append({"batch": B, "k": args.k, "minivae_ms": 1e3 * med["minivae"], "torch_ms": 1e3 * med["torch"],
                    "minivae_examples_per_s": B / med["minivae"], "torch_examples_per_s": B / med["torch"],
                    "speedup": ratio, "speedup_paired_median": q2, "speedup_paired_quartiles": [q1, q3]})
        rows.append([B, args.k, f"{1e3 * med['minivae']:.2f}", f"{1e3 * med['torch']:.2f}",
                     f"{B / med['minivae']:,.0f}", f"{B / med['torch']:,.0f}", f"{ratio:.2f}",
                     f"{q2:.2f} ({q1:.2f}-{q3:.2f})"])
    print(table(rows, ["batch", "k", "minivae ms/step", "torch ms/step", "minivae ex/s", "torch ex/s",
                       "torch/minivae time", "per round: median (quartiles)"]))
    return out


def _speed_worker(argv):
    """minivae's side of ``speed`` in a process of its own (torch_iwae.serve_steps)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed-worker", action="store_true", required=True)
    for name in ("batch", "k", "threads"):
        ap.add_argument(f"--{name}", type=int, required=True)
    ap.add_argument("--estimator", default="reparam")
    ap.add_argument("--backend", default="numba")
    args = ap.parse_args(argv)
    import torch_iwae
    x, eps = torch_iwae.speed_batch(args.batch, args.k, MODELS["iwae2"][0])
    ours = minivae_model("iwae2", 0, args.backend)
    opt = make_optimizer("adam", ours.params.size, "float32", backend=ours.backend, lr=1e-4, **ADAM)
    step = minivae_stepper(ours, opt, "iwae", args.estimator)
    with limit_threads(args.threads):
        torch_iwae.serve_steps(lambda: step(x, eps))
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--speed-worker" in argv:
        return _speed_worker(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=MNIST_DIR if MNIST_DIR.is_dir() else HERE.parents[2] / "shared/data/mnist")
    ap.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    ap.add_argument("--epochs", type=int, default=10, help="passes over the training images (paper: 3280)")
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--k", type=int, default=50, help="IWAE samples in training (paper: 1, 5, 50)")
    ap.add_argument("--estimator", choices=("reparam", "dreg"), default="reparam")
    ap.add_argument("--eval-k", type=int, default=5000)
    ap.add_argument("--eval-n", type=int, default=1000, help="test images scored (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=("numpy", "numba"), default="numba")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-torch", action="store_true", help="minivae only")
    ap.add_argument("--speed", action="store_true", help="time training steps of the two-layer IWAE only")
    ap.add_argument("--batches", type=int, nargs="+", default=[20, 128])
    ap.add_argument("--pause", type=float, default=0.3, help="--speed: seconds of rest before each timed block")
    ap.add_argument("--same-process", action="store_true",
                    help="--speed: time minivae and torch in this one process (default: a process each)")
    ap.add_argument("--torch-flush-denormal", action="store_true",
                    help="--speed: PyTorch with torch.set_flush_denormal(True), subnormals as zero (a process each only)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    for name in ("epochs", "batch_size", "k", "eval_k", "eval_n", "threads", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.torch_flush_denormal and args.same_process:
        ap.error("--torch-flush-denormal needs a process each (it would set minivae's thread too)")
    torch = None
    if not args.no_torch or args.speed:
        try:
            import torch
        except ImportError:
            if args.speed:
                raise SystemExit("iwae_paper: --speed needs torch (pip install -e '.[bench]')")
            print("# torch is not installed: minivae only", file=sys.stderr)
        else:
            torch.set_num_threads(args.threads)
    print(f"# {machine()}")
    with limit_threads(args.threads):
        if args.speed:
            print(f"# two-layer IWAE 784-200-200-100-100-100-50 tanh, k={args.k}, estimator {args.estimator}, "
                  f"float32, {args.threads} threads, backend {args.backend}, torch {torch.__version__} eager; "
                  f"median of {args.repeats} blocks of {args.steps} steps, alternating ABBA; per round: torch/minivae of "
                  f"adjacent blocks; "
                  f"{'one process' if args.same_process else 'a process each'}")
            results = {"speed": speed(args, torch)}
        else:
            x_train, x_test, what = load_mnist(args.data_dir)
            print(f"# {what}; {args.epochs} passes, batch {args.batch_size}, k={args.k} (IWAE), "
                  f"test NLL with K={args.eval_k} on {min(args.eval_n, len(x_test))} images; backend {args.backend}, "
                  f"{args.threads} threads" + (f", torch {torch.__version__}" if torch else ""), flush=True)
            res = [train_pair(name, x_train, x_test, args, torch) for name in args.models]
            fmt = (lambda v: "-" if v is None else f"{v:.2f}")
            print(table([[r["model"], r["k"], fmt(r["paper_nll"]), fmt(r["minivae_nll"]), fmt(r["torch_nll"]),
                          fmt(r["minivae_s_per_epoch"]), fmt(r["torch_s_per_epoch"])] for r in res],
                        ["model", "k (training)", "paper NLL (k = 1 VAE, 50 IWAE)", "minivae NLL", "torch NLL",
                         "minivae s/pass", "torch s/pass"]))
            results = {"train": res}
    if args.json is not None:
        results.update(machine=machine(), args={k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(args).items()})
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
