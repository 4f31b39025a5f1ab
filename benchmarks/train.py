"""Training throughput: minivae (NumPy and Numba backends; the Numba one also with its custom GEMM) against PyTorch eager and JAX jit.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train.py [--epochs 3] [--steps 469]

The same model everywhere: 784-400-20, relu, Bernoulli likelihood, ELBO with L = 1, Adam (lr 1e-3),
batch 128, float32, on MNIST-shaped data (the t10k images tiled to 60,000 rows, or synthetic).
Each contender lives in its own worker process (one process tree); the parent asks them for one
epoch at a time, round-robin, so the noise of a shared machine falls on all of them alike. After one
warm-up epoch each, it prints the median epoch time, samples/s and the ratios. Frameworks that are
not installed are skipped. Also:
  * the GEMM-only floor: one step's GEMMs (benchmarks/common.model_gemms) alone in NumPy's OpenBLAS,
    times the steps of an epoch, measured in the same round-robin;
  * start-up: a fresh process that imports minivae, builds the model and takes its first step with
    a warm Numba cache, and the wall time of a second `minivae train --backend numba --epochs 1`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import BATCH, D, H, STEPS_PER_EPOCH, Z, machine, mnist_like, model_gemms, table  # noqa: E402

CONTENDERS = ("minivae-numpy", "minivae-numba", "minivae-numba-custom", "pytorch-eager", "jax-jit", "gemm-floor")


# ----------------------------------------------------------------------------------------------
# Workers: each sets itself up, then runs one epoch per "epoch" line on stdin
# ----------------------------------------------------------------------------------------------

def _batches(steps):
    x, _ = mnist_like(BATCH * steps)
    return x


def worker_minivae(backend, steps):
    from minivae import VAE, optim
    from minivae.train import HostTrainer, SerialComm
    x = _batches(steps)
    model = VAE(D, Z, hidden=(H,), backend=backend, dtype="float32", seed=0)
    opt = optim.make_optimizer("adam", model.layout.size, "float32", backend=model.backend, lr=1e-3)
    trainer = HostTrainer(model.backend, model.params, opt, SerialComm())
    rng = np.random.default_rng(0)
    eps = np.empty((1, BATCH, Z), np.float32)

    def epoch():
        loss = 0.0
        for s in range(steps):
            rng.standard_normal(out=eps, dtype=np.float32)
            loss = trainer.step(x[s * BATCH:(s + 1) * BATCH], eps, 1.0)
        return loss
    return epoch


def worker_torch(steps):
    import torch
    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    x = torch.from_numpy(_batches(steps))

    class VAE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.e0, self.eh = torch.nn.Linear(D, H), torch.nn.Linear(H, 2 * Z)
            self.d0, self.dh = torch.nn.Linear(Z, H), torch.nn.Linear(H, D)

        def forward(self, xb):
            mu, logvar = self.eh(torch.relu(self.e0(xb))).chunk(2, dim=1)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            logits = self.dh(torch.relu(self.d0(z)))
            rec = torch.nn.functional.binary_cross_entropy_with_logits(logits, xb, reduction="sum")
            kl = 0.5 * (mu * mu + logvar.exp() - 1 - logvar).sum()
            return (rec + kl) / xb.shape[0]

    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch():
        for s in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = model(x[s * BATCH:(s + 1) * BATCH])
            loss.backward()
            opt.step()
        return float(loss.detach())
    return epoch


def worker_jax(steps):
    import jax
    import jax.numpy as jnp
    import optax
    x = jnp.asarray(_batches(steps))
    key = jax.random.PRNGKey(0)
    ks = jax.random.split(key, 5)

    def lin(k, i, o):
        b = 1.0 / np.sqrt(i)
        k1, k2 = jax.random.split(k)
        return (jax.random.uniform(k1, (i, o), jnp.float32, -b, b), jax.random.uniform(k2, (o,), jnp.float32, -b, b))
    params = {"e0": lin(ks[0], D, H), "eh": lin(ks[1], H, 2 * Z), "d0": lin(ks[2], Z, H), "dh": lin(ks[3], H, D)}
    tx = optax.adam(1e-3)
    state = tx.init(params)

    def loss_fn(p, xb, eps):
        h = jax.nn.relu(xb @ p["e0"][0] + p["e0"][1])
        out = h @ p["eh"][0] + p["eh"][1]
        mu, logvar = out[:, :Z], out[:, Z:]
        z = mu + jnp.exp(0.5 * logvar) * eps
        logits = jax.nn.relu(z @ p["d0"][0] + p["d0"][1]) @ p["dh"][0] + p["dh"][1]
        rec = jnp.sum(jnp.maximum(logits, 0) - logits * xb + jnp.log1p(jnp.exp(-jnp.abs(logits))))
        kl = 0.5 * jnp.sum(mu * mu + jnp.exp(logvar) - 1 - logvar)
        return (rec + kl) / xb.shape[0]

    @jax.jit
    def step(p, s, xb, k):
        k, sub = jax.random.split(k)
        eps = jax.random.normal(sub, (xb.shape[0], Z), jnp.float32)
        loss, g = jax.value_and_grad(loss_fn)(p, xb, eps)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss, k

    carry = {"p": params, "s": state, "k": ks[4]}

    def epoch():
        p, s, k = carry["p"], carry["s"], carry["k"]
        for i in range(steps):
            p, s, loss, k = step(p, s, x[i * BATCH:(i + 1) * BATCH], k)
        loss.block_until_ready()
        carry.update(p=p, s=s, k=k)
        return float(loss)
    return epoch


def worker_floor(steps):
    """One step's GEMMs alone, in NumPy's OpenBLAS, as many times as the epoch has steps."""
    rng = np.random.default_rng(0)
    ops = []
    for _, M, K, N, kind in model_gemms():
        if kind == "nn":
            A, B = rng.random((M, K), np.float32), rng.random((K, N), np.float32)
        elif kind == "nt":
            A, B = rng.random((M, K), np.float32), rng.random((N, K), np.float32).T
        else:
            A, B = rng.random((K, M), np.float32).T, rng.random((K, N), np.float32)
        ops.append((A, B, np.empty((M, N), np.float32)))

    def epoch():
        for _ in range(steps):
            for A, B, C in ops:
                np.matmul(A, B, out=C)
        return 0.0
    return epoch


def run_worker(name, steps):
    if name == "minivae-numpy":
        epoch = worker_minivae("numpy", steps)
    elif name == "minivae-numba":
        epoch = worker_minivae("numba", steps)
    elif name == "minivae-numba-custom":              # the backend's own GEMM (MINIVAE_GEMM=custom)
        from minivae.kernels import config
        config.GEMM = "custom"
        epoch = worker_minivae("numba", steps)
    elif name == "pytorch-eager":
        epoch = worker_torch(steps)
    elif name == "jax-jit":
        epoch = worker_jax(steps)
    else:
        epoch = worker_floor(steps)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "epoch":
            break
        t = time.perf_counter()
        loss = epoch()
        print(f"{time.perf_counter() - t:.6f} {loss:.4f}", flush=True)


# ----------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------

def available(name):
    mod = {"pytorch-eager": "torch", "jax-jit": "jax"}.get(name)
    if mod is None:
        return True
    import importlib.util
    if mod == "jax":
        return all(importlib.util.find_spec(m) is not None for m in ("jax", "jaxlib", "optax"))
    return importlib.util.find_spec(mod) is not None


def start(name, steps):
    p = subprocess.Popen([sys.executable, __file__, "--worker", name, "--steps", str(steps)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"worker {name} failed to start")
    return p


def ask(p):
    p.stdin.write("epoch\n")
    p.stdin.flush()
    t, loss = p.stdout.readline().split()
    return float(t), float(loss)


def startup_rows():
    rows = []
    code = ("import time; t=time.perf_counter(); import numpy as np; from minivae import VAE; "
            f"m=VAE({D},{Z},hidden=({H},),backend='numba'); x=np.full(({BATCH},{D}),0.5,np.float32); "
            "m.loss_and_grad(x); print(time.perf_counter()-t)")
    for _ in range(2):               # the first run fills the cache if it is cold
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    rows.append(["import + build + first step (fresh process, warm cache)", f"{float(r.stdout.split()[-1]):.2f}"])
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["minivae", "train", "--dataset", "digits", "--epochs", "1", "--backend", "numba",
               "--hidden", str(H), "--z-dim", str(Z), "--out", os.path.join(tmp, "run"), "--overwrite"]
        wall = []
        for _ in range(2):
            t = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True)
            wall.append(time.perf_counter() - t)
        if r.returncode == 0:
            rows.append([f"second run of `{' '.join(cmd[:9])} ...` (digits, whole epoch + eval + plots)",
                         f"{wall[1]:.2f}"])
        else:
            rows.append(["`minivae train` failed: " + (r.stderr.strip().splitlines() or ["?"])[-1], "-"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="measured epochs per contender (after 1 warm-up)")
    ap.add_argument("--steps", type=int, default=STEPS_PER_EPOCH, help="steps per epoch (469 = 60,000 samples)")
    ap.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--gap", type=float, default=1.0,
                    help="seconds of idle between two contenders, so that one's spinning threads "
                         "(OpenMP, XLA) are asleep before the next starts (default 1)")
    ap.add_argument("--no-startup", action="store_true")
    ap.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return run_worker(a.worker, a.steps)

    print(f"machine: {machine()}")
    print(f"command: python benchmarks/train.py --epochs {a.epochs} --steps {a.steps} --gap {a.gap}; "
          f"data: {mnist_like(1)[1]}")
    names = [n for n in a.only if available(n)]
    for n in a.only:
        if n not in names:
            print(f"skipped {n}: not installed")
    procs = {n: start(n, a.steps) for n in names}
    times = {n: [] for n in names}
    losses = {}
    try:
        for n in names:                        # warm-up epoch (compilation, caches)
            ask(procs[n])
            time.sleep(a.gap)
        for _ in range(a.epochs):
            for n in names:
                t, losses[n] = ask(procs[n])
                time.sleep(a.gap)
                times[n].append(t)
    finally:
        for p in procs.values():
            try:
                p.stdin.write("quit\n")
                p.stdin.flush()
            except OSError:
                pass
            p.wait(timeout=60)
    scale = STEPS_PER_EPOCH / a.steps           # report per 60,000-sample epoch
    med = {n: float(np.median(times[n])) * scale for n in names}
    rows = []
    for n in names:
        r = [n, f"{med[n]:.2f}", f"{STEPS_PER_EPOCH * BATCH / med[n]:.0f}" if n != "gemm-floor" else "-"]
        for ref in ("pytorch-eager", "jax-jit", "gemm-floor"):
            r.append(f"{med[n] / med[ref]:.2f}" if ref in med else "-")
        r.append(f"{losses[n]:.1f}" if n != "gemm-floor" else "-")
        rows.append(r)
    print()
    print(table(rows, ["contender", "epoch s (median)", "samples/s", "/ PyTorch", "/ JAX", "/ GEMM floor",
                       "last loss"]))
    print(f"\n(median of {a.epochs} epochs of {a.steps} steps after 1 warm-up, scaled to {STEPS_PER_EPOCH} "
          f"steps; run round-robin)")
    if not a.no_startup:
        print()
        print(table(startup_rows(), ["start-up", "wall s"]))


if __name__ == "__main__":
    main()
