"""Train minivae and the PyTorch VAE example side by side on the same MNIST data; print the test -ELBO per epoch.

The PyTorch model is the one of pytorch/examples vae/main.py: 784-400-20 (relu), a Bernoulli decoder on grey-level
pixels, Adam(lr=1e-3), batch 128, loss = BCE(sum) + KL. Both models see the same examples in the same order
(one seeded permutation per epoch) with the same eps, and are scored on the same held-out split with the same
metric: the mean negative ELBO per example with one posterior sample of fixed noise (nats). The initial weights
differ (each library initializes its own way from the seed), so the run is repeated over --seeds seeds, and the
table gives, per epoch, the mean over seeds of each side, the mean difference and its range over seeds, and the
spread (sample standard deviation) of each side over seeds: the difference is to be read against that spread.

    python benchmarks/compare_torch.py [--data-dir ../shared/data/mnist] [--epochs 10] [--seeds 3] [--test 2000]
                                       [--threads 2] [--backend numpy|numba]

The data are the t10k files (the only real MNIST files the project has): the last --test examples are held out.
Needs torch (`pip install torch==2.13.0`, the CPU build); exits with a message if it is missing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import machine, table  # noqa: E402
from minivae import VAE  # noqa: E402
from minivae.data import read_idx  # noqa: E402
from minivae.optim import make_optimizer  # noqa: E402
from minivae.threads import limit_threads  # noqa: E402


def load_t10k(data_dir: Path):
    for suffix in (".gz", ""):
        p = data_dir / f"t10k-images-idx3-ubyte{suffix}"
        if p.exists():
            return read_idx(p).reshape(-1, 784).astype(np.float32) / 255.0
    raise SystemExit(f"compare_torch: no t10k-images-idx3-ubyte[.gz] in {data_dir}")


def torch_vae(torch, seed):
    nn = torch.nn
    torch.manual_seed(seed)

    class Net(nn.Module):           # pytorch/examples vae/main.py
        def __init__(self):
            super().__init__()
            self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
            self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

        def forward(self, x, eps):
            h = torch.relu(self.fc1(x))
            mu, logvar = self.fc21(h), self.fc22(h)
            z = mu + eps * torch.exp(0.5 * logvar)
            return self.fc4(torch.relu(self.fc3(z))), mu, logvar

    return Net()


def torch_loss(torch, net, x, eps):
    """Batch mean of -ELBO: BCE(sum) + KL, on logits (the example's sigmoid + BCE, computed stably)."""
    logits, mu, logvar = net(x, eps)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kld) / x.shape[0]


def run_seed(torch, x_train, x_test, args, seed, report):
    """One side-by-side run; ``report(epoch, ours, theirs, t_ours, t_torch)`` after every epoch."""
    n, B = len(x_train), args.batch_size
    rng = np.random.default_rng(seed)
    eps_test = rng.standard_normal((len(x_test), 20)).astype(np.float32)
    ours = VAE(784, 20, hidden=(400,), activation="relu", likelihood="bernoulli", dtype="float32",
               seed=seed, backend=args.backend)
    opt = make_optimizer("adam", ours.params.size, "float32", backend=ours.backend, lr=1e-3)
    net = torch_vae(torch, seed)
    topt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt_test, et_test = torch.from_numpy(x_test), torch.from_numpy(eps_test)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(n)
        eps_all = rng.standard_normal((n, 20)).astype(np.float32)
        t_ours = t_torch = 0.0
        for s in range(0, n, B):
            idx = order[s:s + B]
            xb, eb = x_train[idx], eps_all[idx]
            t0 = time.perf_counter()
            _, g = ours.loss_and_grad(xb, eps=eb)
            opt.step(ours.params, g)
            t1 = time.perf_counter()
            topt.zero_grad()
            torch_loss(torch, net, torch.from_numpy(xb), torch.from_numpy(eb)).backward()
            topt.step()
            t_torch += time.perf_counter() - t1
            t_ours += t1 - t0
        ours_test = -float(ours.elbo(x_test, eps=eps_test).mean())
        with torch.no_grad():
            torch_test = float(torch_loss(torch, net, xt_test, et_test))
        report(epoch, ours_test, torch_test, t_ours, t_torch)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=HERE.parents[1] / "shared/data/mnist")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3, help="runs with seeds --seed, --seed + 1, ... (default 3)")
    ap.add_argument("--test", type=int, default=2000, help="held-out rows at the end of t10k (default 2000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="for both libraries (default: all cores)")
    ap.add_argument("--backend", choices=("numpy", "numba"), default="numpy", help="minivae's (default numpy)")
    args = ap.parse_args(argv)
    for name in ("epochs", "seeds", "test", "batch_size", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seed < 0:
        ap.error("--seed must be >= 0")
    try:
        import torch
    except ImportError:
        raise SystemExit("compare_torch: torch is not installed (pip install torch==2.13.0)")
    torch.set_num_threads(args.threads)

    x = load_t10k(args.data_dir)
    if args.test >= len(x):
        raise SystemExit(f"compare_torch: --test {args.test} leaves no training rows ({len(x)} images)")
    x_train, x_test = x[:-args.test], x[-args.test:]
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"# {machine()}")
    print(f"# MNIST t10k: {len(x_train)} train / {len(x_test)} test, 784-400-20 relu, bernoulli, Adam 1e-3, batch "
          f"{args.batch_size}, {args.threads} threads, minivae backend={args.backend}, torch {torch.__version__}, "
          f"seeds {seeds}", flush=True)
    res = np.zeros((len(seeds), args.epochs, 4))       # minivae, torch test -ELBO; their training seconds

    def report_for(i):
        def report(epoch, a, b, ta, tb):
            res[i, epoch - 1] = a, b, ta, tb
            print(f"# seed {seeds[i]} epoch {epoch}: minivae {a:.2f}, torch {b:.2f}, diff {a - b:+.2f}",
                  file=sys.stderr, flush=True)
        return report

    with limit_threads(args.threads):
        for i, seed in enumerate(seeds):
            run_seed(torch, x_train, x_test, args, seed, report_for(i))

    sd = (lambda v: f"{np.std(v, ddof=1):.2f}") if len(seeds) > 1 else (lambda v: "-")
    rows = []
    for e in range(args.epochs):
        a, b = res[:, e, 0], res[:, e, 1]
        d = a - b
        rows.append([e + 1, f"{a.mean():.2f}", f"{b.mean():.2f}", f"{d.mean():+.2f}",
                     f"{d.min():+.2f} .. {d.max():+.2f}", sd(a), sd(b),
                     f"{np.median(res[:, e, 2]):.2f}", f"{np.median(res[:, e, 3]):.2f}"])
    print()
    print(table(rows, ["epoch", "minivae test -ELBO", "torch test -ELBO", "diff (mean)", "diff range over seeds",
                       "minivae sd", "torch sd", "minivae train s", "torch train s"]))
    final = res[:, -1, 0] - res[:, -1, 1]
    worst = np.abs(res[:, :, 0] - res[:, :, 1]).max()
    print(f"\nEpoch {args.epochs}: mean difference {final.mean():+.2f} nats (per seed "
          f"{', '.join(f'{v:+.2f}' for v in final)}); largest |difference| at any epoch and seed: {worst:.2f} "
          f"nats. Goal: within 1 nat at equal epochs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
