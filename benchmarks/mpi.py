"""Data-parallel training over MPI: measured throughput for P = 1, 2 here, and a model of P nodes.

    python benchmarks/mpi.py [--backend numba|numpy] [--rounds 3] [--epochs 5] [--steps 300] [--warmup 30]
                             [--max-seconds 5] [--model-threads 1|2] [--network NAME:GBPS:US ...]

The model is the benchmark model: 784-400-20, relu, Bernoulli, ELBO (L = 1), Adam (lr 1e-3), global batch
128, float32. Every measurement runs minivae's own training path in child processes launched with
``mpiexec -n P`` (mpiexec next to sys.executable, else on PATH):

1. Throughput as the user gets it: ``mpiexec -n P python -m minivae train --distributed --threads T`` on MNIST
   t10k (10,000 rows as the training set: a temporary folder links the t10k files under the train names;
   synthetic 784-pixel images if they are missing), read back from metrics.jsonl as
   train_samples / train_time_s, the median over the epochs after the first (which holds the warm-up).
   Configurations: P = 1 with 2 threads, P = 1 with 1 thread, P = 2 with 1 thread per rank.
2. The step taken apart: the worker builds a ``train.HostTrainer`` on a ``distributed.MPIComm`` (the trainer
   every rank of P > 1 runs) and runs the body of ``HostTrainer.step`` with a clock around each part: compute (``loss_and_grad`` + the optimizer), the wait for the slowest rank (a Barrier,
   added here only to separate load imbalance from communication) and the all-reduce of the flat gradient
   (``allreduce_mean_``, 652,824 float32 values). Medians over steps after a warm-up, of the largest value
   over the ranks. Then the step of the trainer ``train.make_trainer`` picks (what ``minivae train`` runs:
   HostTrainer for the CPU backends; a backend with its own ``make_trainer`` would be timed here), unclocked
   inside, for the whole step.
3. A pure ``Allreduce`` (in place, float32, SUM) over vector sizes on 2 ranks.
4. Compute alone (one process) at per-rank batches 128, 64, ..., 1, for 1 and 2 threads: a rank's
   loss_and_grad + optimizer, and the step of the single-process trainer.

The configurations alternate round by round, so the noise of a shared machine falls on all of them alike.

Finally the cost model of docs/math.md §10 predicts the step time on P nodes:

    T(P) = compute(b_rank) + 2 (P-1)/P * N s / B + 2 (P-1) alpha   [+ ceil(log2 P) alpha]

compute measured at the per-rank batch b_rank (one rank per node with --model-threads threads), N s the
gradient's bytes, B the link bandwidth and alpha the per-message latency of each --network. The bracketed term
is the loop's second, tiny all-reduce per step (2 float64: the NaN / Ctrl-C check in train.Run._check), a
latency-bound message that MPI sends by recursive doubling. Strong scaling keeps the global batch at 128
(b_rank = 128/P); weak scaling keeps b_rank = 128 (the global batch grows to 128 P).
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import BATCH, D, H, MNIST_DIR, Z, machine, mnist_like, table  # noqa: E402

CONFIGS = ((1, 2), (1, 1), (2, 1))                       # (P, threads per rank)
COMPUTE_BATCHES = (128, 64, 32, 16, 8, 4, 2, 1)
ALLREDUCE_SIZES = (1, 16, 256, 4096, 65536, 652824, 4 * 652824)
NETWORKS = ("InfiniBand-like:10:2", "10GbE-like:1.25:20")
MODEL_P = (1, 2, 4, 8, 16, 32, 64)
RESULT = "RESULT "


def find_mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("mpiexec")
    if found is None:
        raise SystemExit("mpi.py: no mpiexec next to the Python interpreter or on PATH (pip install -e '.[mpi]')")
    return found


# ----------------------------------------------------------------------------------------------
# Workers (run under mpiexec, or as a plain child for the compute sweep)
# ----------------------------------------------------------------------------------------------

def _model(backend):
    from minivae import VAE
    from minivae.optim import make_optimizer
    model = VAE(D, Z, hidden=(H,), activation="relu", likelihood="bernoulli", dtype="float32", seed=0,
                backend=backend)
    opt = make_optimizer("adam", model.params.size, "float32", backend=model.backend, lr=1e-3)
    return model, opt


def _emit(obj):
    print(RESULT + json.dumps(obj), flush=True)


def worker_step(args):
    """The HostTrainer step on this rank's share of each global minibatch, clocked part by part."""
    from minivae import train
    from minivae.distributed import MPIComm
    from minivae.threads import limit_threads
    comm = MPIComm()
    mpi = comm.comm
    x, source = mnist_like(BATCH * 80)
    model, opt = _model(args.backend)
    chosen = train.make_trainer(model, opt, comm, "elbo", 0.0)    # what `minivae train` runs
    host = train.HostTrainer(model.backend, model.params, opt, comm, "elbo", 0.0)   # the parts, clocked
    rng = np.random.default_rng([0, comm.rank])
    b, lo, hi = BATCH, comm.rank * BATCH // comm.size, (comm.rank + 1) * BATCH // comm.size
    nb = len(x) // b

    def minibatch(s):                      # as train.Run._minibatch: the global batch's eps, this rank's rows
        s %= nb
        eps = rng.standard_normal((1, b, Z), dtype=np.float32)
        return np.ascontiguousarray(x[s * b + lo:s * b + hi]), np.ascontiguousarray(eps[:, lo:hi])

    parts = np.zeros((args.steps, 3))       # compute, wait, all-reduce (s)
    whole = np.zeros(args.steps)
    with limit_threads(args.threads):
        for s in range(args.warmup + args.steps):
            xb, eps = minibatch(s)
            t0 = time.perf_counter()                   # the body of HostTrainer.step
            host.backend.loss_and_grad(host.params, xb, eps, beta=1.0, objective="elbo", free_bits=0.0,
                                       grad=host.grad)
            t1 = time.perf_counter()
            mpi.Barrier()
            t2 = time.perf_counter()
            comm.allreduce_mean_(host.grad)
            t3 = time.perf_counter()
            host.optimizer.step(host.params, host.grad)
            t4 = time.perf_counter()
            if s >= args.warmup:
                parts[s - args.warmup] = (t1 - t0) + (t4 - t3), t2 - t1, t3 - t2
        mpi.Barrier()
        for s in range(args.warmup + args.steps):      # the chosen trainer's own step, nothing added
            xb, eps = minibatch(s)
            t0 = time.perf_counter()
            chosen.step(xb, eps, 1.0)
            if s >= args.warmup:
                whole[s - args.warmup] = time.perf_counter() - t0
    worst = np.empty_like(parts)
    mpi.Allreduce(parts, worst, op=comm.MPI.MAX)             # per step, the slowest rank's part
    worst_whole = np.empty_like(whole)
    mpi.Allreduce(whole, worst_whole, op=comm.MPI.MAX)
    if comm.is_root:
        med = np.median(worst, axis=0)
        _emit({"P": comm.size, "threads": args.threads, "compute": med[0], "wait": med[1], "allreduce": med[2],
               "step": float(np.median(worst_whole)), "grad_size": int(host.grad.size), "data": source,
               "trainer": type(chosen).__name__})


def worker_allreduce(args):
    """In-place float32 SUM Allreduce of each size: the median over repeats of the slowest rank's time."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    out = []
    for n in ALLREDUCE_SIZES:
        buf = np.ones(n, dtype=np.float32)
        reps = max(20, min(2000, int(2e8 // (n * 4 + 4096))))
        ts = np.empty(reps)
        for i in range(10 + reps):
            comm.Barrier()
            t = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if i >= 10:
                ts[i - 10] = time.perf_counter() - t
        worst = np.empty_like(ts)
        comm.Allreduce(ts, worst, op=MPI.MAX)
        out.append((n, float(np.median(worst))))
    if comm.Get_rank() == 0:
        _emit({"P": comm.Get_size(), "sizes": out})


def worker_compute(args):
    """At each batch in COMPUTE_BATCHES, one process, ``args.threads`` threads: the rank's compute,
    loss_and_grad + optimizer step (HostTrainer's parts), and the step of the trainer a single process
    gets from train.make_trainer (HostTrainer for the CPU backends), alternating."""
    from minivae import train
    from minivae.threads import limit_threads
    x, _ = mnist_like(BATCH * 40)
    model, opt = _model(args.backend)
    chosen = train.make_trainer(model, opt, train.SerialComm(), "elbo", 0.0)
    grad = np.empty_like(model.params)
    backend = model.backend
    rng = np.random.default_rng(0)
    res, res_chosen = {}, {}

    def host_step(xb, eps):
        backend.loss_and_grad(model.params, xb, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=grad)
        opt.step(model.params, grad)

    with limit_threads(args.threads):
        for n in COMPUTE_BATCHES:
            steps = args.steps if n >= 32 else 3 * args.steps
            eps = rng.standard_normal((1, n, Z), dtype=np.float32)
            ts = np.empty((2, steps))
            nb = len(x) // n
            start = None
            for s in range(args.warmup + steps):
                if s == args.warmup:
                    start = time.perf_counter()
                elif start is not None and s - args.warmup >= 20 and time.perf_counter() - start > args.max_seconds:
                    ts = ts[:, :s - args.warmup]             # a slow (contended) configuration: enough steps
                    break
                xb = x[(s % nb) * n:(s % nb + 1) * n]
                t0 = time.perf_counter()
                host_step(xb, eps)
                t1 = time.perf_counter()
                chosen.step(xb, eps, 1.0)
                t2 = time.perf_counter()
                if s >= args.warmup:
                    ts[:, s - args.warmup] = t1 - t0, t2 - t1
            res[n], res_chosen[n] = float(np.median(ts[0])), float(np.median(ts[1]))
    _emit({"threads": args.threads, "compute": res, "single": res_chosen, "trainer": type(chosen).__name__})


# ----------------------------------------------------------------------------------------------
# The parent
# ----------------------------------------------------------------------------------------------

def _run(cmd, what, timeout=900):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"mpi.py: {what} failed (exit {p.returncode}): {' | '.join(tail)}")
    for line in p.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return None


def _worker_cmd(mpiexec, P, mode, args, threads):
    return [mpiexec, "-n", str(P), sys.executable, str(Path(__file__).resolve()), "--worker", mode,
            "--backend", args.backend, "--threads", str(threads), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds)]


def _write_idx(path, arr):
    """An IDX file (gzip): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def make_data_dir(folder: Path) -> str:
    """A folder the CLI reads as --dataset mnist: the t10k files also under the train names (10,000 rows),
    or synthetic images when t10k is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"images": "images-idx3-ubyte.gz", "labels": "labels-idx1-ubyte.gz"}
    src = {k: MNIST_DIR / f"t10k-{v}" for k, v in names.items()}
    if all(p.is_file() for p in src.values()):
        for k, v in names.items():
            for split in ("train", "t10k"):
                (folder / f"{split}-{v}").symlink_to(src[k])
        return "MNIST t10k (10,000 rows as train and as test)"
    rng = np.random.default_rng(0)
    for split, n in (("train", 10000), ("t10k", 2000)):
        _write_idx(folder / f"{split}-{names['images']}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(folder / f"{split}-{names['labels']}", rng.integers(0, 10, n, dtype=np.uint8))
    return "synthetic uniform 28x28 images (10,000 train rows)"


def cli_throughput(mpiexec, P, threads, args, data_dir, out):
    """samples/s of `minivae train --distributed` read from metrics.jsonl (median over epochs 2..)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [mpiexec, "-n", str(P), sys.executable, "-m", "minivae", "train", "--distributed",
           "--dataset", "mnist", "--data-dir", str(data_dir), "--val-fraction", "0",
           "--epochs", str(args.epochs), "--batch-size", str(BATCH), "--z-dim", str(Z), "--hidden", str(H),
           "--activation", "relu", "--likelihood", "bernoulli", "--optimizer", "adam", "--lr", "1e-3",
           "--dtype", "float32", "--backend", args.backend, "--threads", str(threads), "--seed", "0",
           "--no-plots", "--quiet", "--out", str(out)]
    _run(cmd, f"minivae train with P={P}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["train_samples"] / r["train_time_s"] for r in rows[1:]]
    return statistics.median(rates), rows[0]["train_samples"], rows[0]["steps"]


def parse_network(text):
    try:
        name, gbps, us = text.rsplit(":", 2)
        gbps, us = float(gbps), float(us)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME:GBPS:US (e.g. ib:10:2), got {text!r}") from None
    if not (gbps > 0 and us >= 0 and math.isfinite(gbps) and math.isfinite(us)):
        raise argparse.ArgumentTypeError(f"bandwidth must be > 0 and latency >= 0, got {text!r}")
    return name, gbps * 1e9, us * 1e-6


def monotone(times):
    """{batch: s} made non-decreasing in the batch: t(n) = min over m >= n of the measured t(m)."""
    out, best = {}, math.inf
    for n in sorted(times, reverse=True):
        best = min(best, times[n])
        out[n] = best
    return out


def ring_allreduce(P, nbytes, bw, alpha):
    """docs/math.md §10: 2 (P-1)/P N s / B + 2 (P-1) alpha (0 for one process)."""
    return 2 * (P - 1) / P * nbytes / bw + 2 * (P - 1) * alpha


def check_allreduce(P, alpha):
    """The loop's 2-number all-reduce per step (train.Run._check): ceil(log2 P) latency-bound rounds."""
    return math.ceil(math.log2(P)) * alpha if P > 1 else 0.0


def model_tables(compute, single, nbytes, networks, threads):
    """Markdown tables of the predicted strong and weak scaling for each network. ``compute``: a rank's
    loss_and_grad + optimizer by batch; ``single``: the step a single process takes (P = 1 rows)."""
    out = []
    for name, bw, alpha in networks:
        for kind in ("strong", "weak"):
            rows, base = [], None
            for P in MODEL_P:
                b_rank = BATCH // P if kind == "strong" else BATCH
                if b_rank < 1:
                    continue
                c = single[b_rank] if P == 1 else compute[b_rank]
                ar, ck = ring_allreduce(P, nbytes, bw, alpha), check_allreduce(P, alpha)
                T = c + ar + ck
                sps = b_rank * P / T
                base = sps if base is None else base
                rows.append([P, b_rank, b_rank * P, f"{c * 1e3:.3f}", f"{ar * 1e3:.3f}", f"{ck * 1e3:.3f}",
                             f"{T * 1e3:.3f}", f"{sps:,.0f}", f"{sps / base:.2f}", f"{sps / base / P:.0%}"])
            title = ("strong scaling (global batch 128 split over P)" if kind == "strong"
                     else "weak scaling (128 rows per rank, global batch 128 P)")
            out.append(f"**{name}: B = {bw / 1e9:g} GB/s, alpha = {alpha * 1e6:g} us; {title}; compute measured "
                       f"here with {threads} thread(s) per rank**\n")
            out.append(table(rows, ["P", "rows/rank", "global batch", "compute ms", "grad all-reduce ms",
                                    "check ms", "step ms", "samples/s", "speedup", "efficiency"]))
            out.append("")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("numba", "numpy"), default="numba")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of every measurement (default 3)")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of each `minivae train` run (default 5)")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per worker measurement (default 300)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    ap.add_argument("--network", type=parse_network, action="append",
                    help="NAME:GBPS:US, a link of GBPS GB/s and US microseconds per message (repeatable; "
                         "default: " + ", ".join(NETWORKS) + ")")
    ap.add_argument("--model-threads", type=int, choices=(1, 2), default=1,
                    help="threads per rank (one rank per node) of the compute the model uses (default 1)")
    ap.add_argument("--max-seconds", type=float, default=5.0,
                    help="stop a compute-by-batch measurement after this long once it has 20 steps (default 5)")
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=("step", "allreduce", "compute"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("rounds", "epochs", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch is the warm-up)")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if not args.max_seconds > 0:
        ap.error("--max-seconds must be > 0")
    if args.worker:
        return {"step": worker_step, "allreduce": worker_allreduce, "compute": worker_compute}[args.worker](args) or 0
    networks = args.network or [parse_network(n) for n in NETWORKS]
    mpiexec = find_mpiexec()
    print(f"# {machine()}")
    print(f"# mpiexec: {mpiexec}; backend {args.backend}; {args.rounds} rounds; load average at start: "
          f"{os.getloadavg()[0]:.2f}")

    cli = {c: [] for c in CONFIGS}
    steps = {c: [] for c in CONFIGS}
    allreduce, compute, loads = [], {1: [], 2: []}, []
    with tempfile.TemporaryDirectory(prefix="minivae-mpi-") as tmp:
        tmp = Path(tmp)
        data_source = make_data_dir(tmp / "data")
        for r in range(args.rounds):
            loads.append(os.getloadavg()[0])
            for c in CONFIGS:
                P, T = c
                cli[c].append(cli_throughput(mpiexec, P, T, args, tmp / "data", tmp / f"run{P}x{T}"))
                steps[c].append(_run(_worker_cmd(mpiexec, P, "step", args, T), f"step worker P={P}"))
            allreduce.append(_run(_worker_cmd(mpiexec, 2, "allreduce", args, 1), "Allreduce worker"))
            for T in (1, 2):
                compute[T].append(_run([sys.executable, str(Path(__file__).resolve()), "--worker", "compute",
                                        "--backend", args.backend, "--threads", str(T), "--steps",
                                        str(args.steps), "--warmup", str(args.warmup), "--max-seconds",
                                        str(args.max_seconds)], "compute worker"))
            print(f"# round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"# 1-minute load average before each round: {', '.join(f'{v:.2f}' for v in loads)}; at the end: "
          f"{os.getloadavg()[0]:.2f} (this machine has {os.cpu_count()} cores; above that, other processes ran too)")

    med = statistics.median
    grad_size = steps[CONFIGS[0]][0]["grad_size"]
    nbytes = 4 * grad_size
    print(f"\n## Training throughput: `mpiexec -n P python -m minivae train --distributed --threads T "
          f"--backend {args.backend}`\n")
    print(f"Data: {data_source}; {cli[CONFIGS[0]][0][1]:,} samples ({cli[CONFIGS[0]][0][2]} steps) per epoch, "
          f"batch {BATCH} global; samples/s = train_samples / train_time_s from metrics.jsonl, median over "
          f"epochs 2..{args.epochs} and over {args.rounds} runs.\n")
    base = med(x[0] for x in cli[(1, 2)])
    rows = []
    for P, T in CONFIGS:
        v = med(x[0] for x in cli[(P, T)])
        rows.append([P, T, P * T, f"{v:,.0f}", f"{v / base:.2f}"])
    print(table(rows, ["P (ranks)", "threads/rank", "threads in all", "samples/s", "vs P=1, 2 threads"]))

    print(f"\n## One step taken apart (HostTrainer + MPIComm, rows {BATCH}/P per rank, gradient {grad_size:,} "
          f"float32 = {nbytes / 1e6:.2f} MB)\n")
    print(f"Medians over {args.steps} steps after {args.warmup} warm-up steps of the slowest rank's time, then "
          f"the median over {args.rounds} runs. 'wait' is a Barrier before the all-reduce (load imbalance); the "
          f"whole `trainer.step` runs without it.\n")
    rows = []
    for P, T in CONFIGS:
        g = lambda k: med(x[k] for x in steps[(P, T)]) * 1e3   # noqa: E731
        rows.append([P, T, BATCH // P, f"{g('compute'):.3f}", f"{g('wait'):.3f}", f"{g('allreduce'):.3f}",
                     f"{g('allreduce') / g('compute'):.0%}", steps[(P, T)][0]["trainer"], f"{g('step'):.3f}",
                     f"{BATCH / g('step') * 1e3:,.0f}"])
    print(table(rows, ["P", "threads/rank", "rows/rank", "compute ms", "wait ms", "all-reduce ms",
                       "all-reduce / compute", "trainer (make_trainer)", "its step ms", "samples/s (128 / step)"]))
    print("\nWith P = 1 the all-reduce of MPIComm only scales the gradient by 1/1 (one pass over it); "
          "`minivae train` then picks the single-process trainer of the backend where it has one.")

    print(f"\n## Pure Allreduce on 2 ranks of this machine (in place, float32 SUM; shared memory)\n")
    print("Median of the slowest rank's time over many repeats (each after a Barrier), median over rounds; "
          "bus bandwidth = 2 (P-1)/P bytes / time.\n")
    rows = []
    for i, (n, _) in enumerate(allreduce[0]["sizes"]):
        t = med(a["sizes"][i][1] for a in allreduce)
        rows.append([f"{n:,}", f"{4 * n:,}", f"{t * 1e6:,.1f}", f"{2 * (2 - 1) / 2 * 4 * n / t / 1e9:.2f}"])
    print(table(rows, ["float32 values", "bytes", "time us", "bus GB/s"]))

    print(f"\n## Compute alone (loss_and_grad + Adam step, one process) by batch\n")
    comp = {T: {n: med(c["compute"][str(n)] for c in compute[T]) for n in COMPUTE_BATCHES} for T in (1, 2)}
    single = {T: {n: med(c["single"][str(n)] for c in compute[T]) for n in COMPUTE_BATCHES} for T in (1, 2)}
    used, used1 = monotone(comp[args.model_threads]), monotone(single[args.model_threads])
    name = compute[1][0]["trainer"]
    rows = [[n, f"{comp[1][n] * 1e3:.3f}", f"{comp[2][n] * 1e3:.3f}", f"{single[1][n] * 1e3:.3f}",
             f"{single[2][n] * 1e3:.3f}", f"{n / comp[args.model_threads][n]:,.0f}", f"{used[n] * 1e3:.3f}",
             f"{used1[n] * 1e3:.3f}"] for n in COMPUTE_BATCHES]
    print(table(rows, ["batch", "rank compute 1 thr. ms", "rank compute 2 thr. ms", f"{name} 1 thr. ms",
                       f"{name} 2 thr. ms", f"rank samples/s ({args.model_threads} thr.)",
                       "model: rank ms", f"model: P=1 ms"]))
    print(f"\n'rank compute': loss_and_grad + Adam step, what each of P > 1 ranks runs (HostTrainer). '{name}': "
          f"the step of the trainer `minivae train` uses in a single process. The model's columns are the medians "
          f"with {args.model_threads} thread(s), made non-decreasing in the batch (a smaller batch is never charged "
          f"more than a larger one, which it could be padded to), so that noise does not bend the curves.")

    print(f"\n## Model: P nodes, one rank per node (docs/math.md §10)\n")
    print(f"step = compute(rows per rank, measured above with {args.model_threads} thread(s)) + ring all-reduce "
          f"of {nbytes / 1e6:.2f} MB, 2 (P-1)/P bytes / B + 2 (P-1) alpha, + the per-step check all-reduce, "
          f"ceil(log2 P) alpha. P = 1 is the single process ({name}, no communication); P > 1 ranks run "
          f"HostTrainer. Speedup = samples/s over P = 1's; efficiency = speedup / P.\n")
    print(model_tables(used, used1, nbytes, networks, args.model_threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
