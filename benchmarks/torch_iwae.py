"""The same VAE/IWAE with S stochastic layers in PyTorch (eager), for side-by-side runs with minivae.

It mirrors minivae's model (docs/math.md §11) layer for layer, so both can be fed the same minibatches and
the same eps: q(z_l | z_{l-1}) and p(z_l | z_{l+1}) are MLP blocks ending in a head that gives [mu | logvar],
p(x | z_1) is a Bernoulli on logits, p(z_S) = N(0, I), and

    log w = log p(x|z_1) + sum_{l<S} log p(z_l|z_{l+1}) + log p(z_S) - sum_l log q(z_l|z_{l-1}).

The loss is the batch mean of -(1/k) sum_i log w_i (the ELBO, objective "elbo", in its log-weight form) or of
-(LSE_i log w_i - log k) (IWAE). torch's autograd computes the gradient. Needs torch (the bench extra).
"""
from __future__ import annotations

import math

LOG_2PI = math.log(2 * math.pi)


def build(torch, x_dim, z_dims, hidden, activation="tanh", seed=0):
    """A torch.nn.Module with ``log_weights(x, eps_list) -> (k, n)`` and ``loss(x, eps_list, objective)``.

    ``z_dims``: bottom-to-top latent sizes; ``hidden``: one tuple of widths per stochastic layer (the
    generative blocks mirror them)."""
    nn = torch.nn
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus}[activation]

    def mlp(fan_in, widths, out):
        layers = []
        for w in widths:
            layers += [nn.Linear(fan_in, w), act()]
            fan_in = w
        layers.append(nn.Linear(fan_in, out))
        return nn.Sequential(*layers)

    S = len(z_dims)
    below = [x_dim] + list(z_dims[:-1])                # the input of q(z_l | .): x, z_1, ..., z_{S-1}

    class StackedVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.ModuleList(mlp(below[l], hidden[l], 2 * z_dims[l]) for l in range(S))
            # p(z_l | z_{l+1}) for l < S, and p(x | z_1) as dec[0]
            self.dec = nn.ModuleList(mlp(z_dims[l], tuple(reversed(hidden[l])),
                                         x_dim if l == 0 else 2 * z_dims[l - 1]) for l in range(S))

        @staticmethod
        def log_normal(z, mu, logvar):
            return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar)).sum(-1)

        def log_weights(self, x, eps):
            """``eps``: S tensors (k, n, Z_l). Returns log w, (k, n)."""
            h, logw = x, 0.0
            zs = []
            for l in range(S):                                        # upward: sample z_l ~ q(z_l | z_{l-1})
                mu, logvar = self.enc[l](h).chunk(2, dim=-1)
                z = mu + torch.exp(0.5 * logvar) * eps[l]
                logw = logw - self.log_normal(z, mu, logvar)
                zs.append(z)
                h = z
            logw = logw + (-0.5 * (LOG_2PI + zs[-1] ** 2)).sum(-1)    # log p(z_S)
            for l in range(S - 1, 0, -1):                             # downward: log p(z_l | z_{l+1})
                mu, logvar = self.dec[l](zs[l]).chunk(2, dim=-1)
                logw = logw + self.log_normal(zs[l - 1], mu, logvar)
            logits = self.dec[0](zs[0])
            ll = -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, x.expand_as(logits), reduction="none").sum(-1)
            return logw + ll

        def loss(self, x, eps, objective="iwae"):
            logw = self.log_weights(x, eps)
            k = logw.shape[0]
            if objective == "elbo":
                return -logw.mean()
            return -(torch.logsumexp(logw, dim=0) - math.log(k)).mean()

        def init_output_bias(self, bias):
            with torch.no_grad():
                self.dec[0][-1].bias.copy_(torch.as_tensor(bias, dtype=self.dec[0][-1].bias.dtype))

    return StackedVAE()


def iw_log_likelihood(torch, net, x, K, rng, chunk=100, rows=50):
    """log p^_K(x_i) per row, K samples in chunks (LSE of chunks), with numpy noise from ``rng``.   (n,)"""
    import numpy as np
    z_dims = [m[-1].out_features // 2 for m in net.enc]
    out = np.empty(len(x))
    with torch.no_grad():
        for lo in range(0, len(x), rows):
            xb = torch.from_numpy(x[lo:lo + rows])
            acc = torch.full((len(xb),), -math.inf, dtype=torch.float64)
            done = 0
            while done < K:
                kc = min(chunk, K - done)
                eps = [torch.from_numpy(rng.standard_normal((kc, len(xb), z), dtype=np.float32)) for z in z_dims]
                lw = net.log_weights(xb, eps).double()
                acc = torch.logaddexp(acc, torch.logsumexp(lw, dim=0))
                done += kc
            out[lo:lo + len(xb)] = (acc - math.log(K)).numpy()
    return out


# ----------------------------------------------------------------------------------------------
# Timing in a process of its own (benchmarks/iwae_paper.py --speed)
# ----------------------------------------------------------------------------------------------

SPEED_MODEL = ((100, 50), ((200, 200), (100, 100)))       # the paper's two-layer model: z_dims, hidden
SPEED_ADAM = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-4)


def speed_batch(n, k, z_dims, seed=0):
    """The timed minibatch: x (n, 784) binary float32 and one eps (k, n, Z_l) per layer, the same in every
    process that asks with the same arguments."""
    import numpy as np
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 784)) < 0.3).astype(np.float32)
    return x, [rng.standard_normal((k, n, z), dtype=np.float32) for z in z_dims]


def serve_steps(step, out=None, inp=None):
    """The worker side of the alternating timing: after ``ready``, each line ``N`` read runs ``step()`` N times
    and answers the seconds it took; an empty line (end of input) ends it."""
    import sys
    import time
    out = out or sys.stdout
    inp = inp or sys.stdin
    for _ in range(3):                       # warm up (numba compiles or loads its cache here)
        step()
    print("ready", file=out, flush=True)
    for line in inp:
        n = int(line)
        t = time.perf_counter()
        for _ in range(n):
            step()
        print(repr(time.perf_counter() - t), file=out, flush=True)


def _worker(argv=None):
    """python benchmarks/torch_iwae.py --speed-worker --batch B --k K --threads T: PyTorch alone in this
    process (no minivae import, so none of its thread settings), timed on request (serve_steps)."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--speed-worker", action="store_true", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True): subnormal numbers read and written as zero (FTZ/DAZ)")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("torch_iwae: torch.set_flush_denormal is not supported on this CPU")
    z_dims, hidden = SPEED_MODEL
    x, eps = speed_batch(args.batch, args.k, z_dims)
    net = build(torch, 784, z_dims, hidden, "tanh", seed=0)
    opt = torch.optim.Adam(net.parameters(), **SPEED_ADAM)
    xt, et = torch.from_numpy(x), [torch.from_numpy(e) for e in eps]

    def step():
        opt.zero_grad()
        net.loss(xt, et, "iwae").backward()
        opt.step()

    serve_steps(step)


if __name__ == "__main__":
    _worker()
