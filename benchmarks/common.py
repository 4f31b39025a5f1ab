"""Shared helpers of the benchmark scripts: timing, machine description, the model's shapes, data.

Benchmarks are scripts that print tables; nothing here is a test. Timings on a shared machine are
noisy: every script takes medians over repeats and runs the things it compares alternately.
"""
from __future__ import annotations

import datetime
import gzip
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

MNIST_DIR = Path(os.environ.get("MINIVAE_MNIST_DIR", "/work/shared/data/mnist"))

# The benchmark model: 784-400-20, relu, bernoulli, Adam, batch 128, float32.
D, H, Z, BATCH = 784, 400, 20, 128
EPOCH_SAMPLES = 60000
STEPS_PER_EPOCH = -(-EPOCH_SAMPLES // BATCH)      # 469


def model_gemms(n=BATCH, D=D, H=H, Z=Z, K=None):
    """(name, M, K, N, kind) of every GEMM of one training step of the D-H-Z model (docs/math.md §6).

    kind: "nn" a = h W;  "nt" dh = da W^T;  "tn" dW = h^T da.  The first layer's dx is skipped."""
    K = D if K is None else K
    return [
        ("enc.0 fwd", n, D, H, "nn"), ("enc.head fwd", n, H, 2 * Z, "nn"),
        ("dec.0 fwd", n, Z, H, "nn"), ("dec.head fwd", n, H, K, "nn"),
        ("dec.head dW", H, n, K, "tn"), ("dec.head dh", n, K, H, "nt"),
        ("dec.0 dW", Z, n, H, "tn"), ("dec.0 dz", n, H, Z, "nt"),
        ("enc.head dW", H, n, 2 * Z, "tn"), ("enc.head dh", n, 2 * Z, H, "nt"),
        ("enc.0 dW", D, n, H, "tn"),
    ]


def timeit(fn, repeat=7, number=1, warmup=1):
    """Median seconds per call over ``repeat`` runs of ``number`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t) / number)
    return float(np.median(ts))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine() -> str:
    """One line: CPU model, cores, date (UTC), BLAS kernels in use."""
    from minivae.threads import blas_info
    blas = "; ".join(f"{b['prefix']} {b['version']} {b['architecture']} x{b['num_threads']}"
                     for b in blas_info())
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    flags = ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                                         "OMP_WAIT_POLICY") if k in os.environ)
    return (f"{cpu_model()}, {os.cpu_count()} cores, {date}; BLAS: {blas}"
            + (f"; env: {flags}" if flags else ""))


def mnist_like(n=EPOCH_SAMPLES, seed=0, dtype=np.float32):
    """n MNIST-shaped rows in [0, 1]: the real t10k images (tiled) when present, else synthetic."""
    path = MNIST_DIR / "t10k-images-idx3-ubyte.gz"
    if path.exists():
        with gzip.open(path, "rb") as f:
            raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 784)
        x = raw.astype(dtype) / dtype(255)
        reps = -(-n // len(x))
        return np.ascontiguousarray(np.tile(x, (reps, 1))[:n]), "MNIST t10k (tiled)"
    rng = np.random.default_rng(seed)
    return rng.random((n, 784), dtype=np.float32).astype(dtype), "synthetic uniform"


def table(rows, head):
    """A Markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    w = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "| " + " | ".join(c.ljust(k) for c, k in zip(r, w)) + " |"   # noqa: E731
    return "\n".join([fmt(head), "| " + " | ".join("-" * k for k in w) + " |"] + [fmt(r) for r in rows])
