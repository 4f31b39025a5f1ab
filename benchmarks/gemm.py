"""The custom GEMM's variants against OpenBLAS at every matrix product of a training step (issue 13).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gemm.py [--quick] [--json FILE]

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, if set, slow NumPy's OpenBLAS: unset them for this command (the
machine line says when they are set).

Every variant of minivae/kernels/gemm_variants.py (1: the old 4x4 dot-product kernel, 2: the
rank-1 tile in Numba loops, 3: the rank-1 tile as LLVM IR, the backend's custom GEMM) is first
validated against NumPy in float64 at every shape; then, for each product of the 784-400-20 and
784-200-200-50 models (batch 20, 128, 1000; nn a = h W, nt dh = g W^T, tn dW = h^T g, operands laid
out as in the backend; the first layer's dx is not computed), each dtype and thread count
(numba.set_num_threads for the variants, threadpoolctl for OpenBLAS), OpenBLAS (np.matmul) and the
variants run alternately, ``--repeat`` times: GFLOP/s are medians, and the ratio to OpenBLAS is the
median of the per-repeat ratios (robust to a busy machine). ``--asm`` counts the FMA instructions of
each variant's compiled tile loop by register width.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table  # noqa: E402

import numba  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from minivae.kernels import config, gemm, gemm_variants  # noqa: E402

MODELS = {"784-400-20": (784, (400,), 20), "784-200-200-50": (784, (200, 200), 50)}


def products(D, hidden, Z, n):
    """(name, form, M, K, N) of every GEMM of one training step (docs/math.md §6), identical shapes
    listed once ("x2" in the name). Encoder D -> hidden -> 2Z, decoder Z -> reversed hidden -> D."""
    enc = [D, *hidden, 2 * Z]
    dec = [Z, *reversed(hidden), D]
    layers = [(f"enc.{t}", i, o) for t, (i, o) in enumerate(zip(enc, enc[1:]))]
    layers += [(f"dec.{t}", i, o) for t, (i, o) in enumerate(zip(dec, dec[1:]))]
    out = {}
    for t, (name, i, o) in enumerate(layers):
        out.setdefault(("nn", n, i, o), []).append(f"{name} fwd")
        out.setdefault(("tn", i, n, o), []).append(f"{name} dW")
        if t > 0:                                   # no dx for the first layer
            out.setdefault(("nt", n, o, i), []).append(f"{name} dh")
    return [(names[0] + (f" x{len(names)}" if len(names) > 1 else ""), form, M, K, N)
            for (form, M, K, N), names in out.items()]


def operands(rng, form, M, K, N, dtype):
    """The two operands as the backend holds them, and OpenBLAS's call on them."""
    if form == "nn":
        A, B = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
        return (A, B), lambda C: np.matmul(A, B, out=C)
    if form == "nt":
        A, Bt = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
        return (A, Bt), lambda C: np.matmul(A, Bt.T, out=C)
    At, B = rng.standard_normal((K, M)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    return (At, B), lambda C: np.matmul(At.T, B, out=C)


def validate(variants, shapes):
    """Every variant against NumPy in float64 at every shape (and float32 at the first): raises on a miss."""
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        for _, form, M, K, N in (shapes if dtype == np.float64 else shapes[:1]):
            ops, ref = operands(rng, form, M, K, N, dtype)
            want = np.empty((M, N), dtype)
            ref(want)
            for v in variants:
                size = gemm_variants.buffer_size(v, M, N, K, dtype)
                P, P2 = np.zeros(size, dtype), np.zeros(size, dtype)
                C = np.full((M, N), np.nan, dtype)
                gemm_variants.VARIANTS[v][form](*ops, C, P, P2, config.MB, config.NB)
                err = np.abs(C - want).max() / max(1.0, np.abs(want).max())
                tol = 1e-12 if dtype == np.float64 else 1e-5
                if not err <= tol:
                    raise SystemExit(f"variant {v} {form} {M}x{K}x{N} {np.dtype(dtype).name}: error {err:.2e}")


def per_call(flops):
    """Calls per timed sample: about 2 ms of work at 50 GFLOP/s, at least one."""
    return max(1, int(2e-3 * 50e9 / flops))


def measure(fns, number, repeat):
    """Seconds per call of each function, sampled alternately: {key: [repeat samples]}."""
    for f in fns.values():
        f()
    ts = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(number):
                f()
            ts[k].append((time.perf_counter() - t) / number)
    return ts


def asm_report(variants):
    """FMA instructions in each variant's compiled tile loop (a fresh, uncached compile: numba keeps
    no assembly for code loaded from its cache), by register width, for float32 and float64."""
    rows = []
    for v in variants:
        for dtype in (np.float32, np.float64):
            x, i = np.zeros(64, dtype), np.int64(1)
            if v == 1:
                fn, args = gemm_variants.gemm_nt_, (x.reshape(8, 8), x.reshape(8, 8), x.reshape(8, 8), i, i)
            else:
                fn = gemm_variants.tiles_v2_ if v == 2 else gemm.tiles_
                args = (i, i, i, x, i, i, x, i, i, x, x, i, i) + ((x.reshape(8, 8), True, i) if v == 3 else ())
            opts = {k: o for k, o in fn.targetoptions.items() if k not in ("cache", "nopython")}
            fresh = numba.njit(**opts)(fn.py_func)
            sig = tuple(numba.typeof(y) for y in args)
            fresh.compile(sig)
            asm = fresh.inspect_asm(sig)
            fma = re.findall(r"vfmadd\w+\s+[^\n]*", asm)
            count = {w: sum(1 for y in fma if f"%{w}" in y) for w in ("zmm", "ymm", "xmm")}
            rows.append([v, np.dtype(dtype).name,
                         f"{len(fma)} FMA: zmm {count['zmm']}, ymm {count['ymm']}, xmm {count['xmm']}; "
                         f"gather {len(re.findall('vgather', asm))}, scatter {len(re.findall('vscatter', asm))}, "
                         f"broadcast {len(re.findall('vbroadcasts', asm))}"])
    return table(rows, ["variant", "dtype", "assembly of the tile loop (whole function, parfor body included)"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="784-400-20 at batch 128 only, 3 repeats")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    ap.add_argument("--batch", default="20,128,1000")
    ap.add_argument("--dtype", default="float32,float64")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--variants", default=",".join(map(str, sorted(gemm_variants.VARIANTS))))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--asm", action="store_true", help="count the FMA instructions of each variant")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.batch, a.repeat = "784-400-20", "128", 3
    models = a.models.split(",")
    if any(m not in MODELS for m in models):
        ap.error(f"--models: choose from {', '.join(MODELS)}")
    batches = [int(b) for b in a.batch.split(",")]
    dtypes = [np.dtype(d) for d in a.dtype.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    variants = [int(v) for v in a.variants.split(",")]
    if any(v not in gemm_variants.VARIANTS for v in variants):
        ap.error(f"--variants: choose from {sorted(gemm_variants.VARIANTS)}")

    print(f"# GEMM variants against OpenBLAS\n\n{machine()}\n")
    for v in variants:
        print(f"- variant {v}: {gemm_variants.NAMES[v]}")
    shapes = [(f"{m} n={n} {p[0]}", *p[1:]) for m in models for n in batches for p in products(*MODELS[m], n)]
    t0 = time.perf_counter()
    validate(variants, shapes)
    print(f"\nvalidated against NumPy: {len(variants)} variants x {len(shapes)} products in float64 "
          f"(and float32 at one), {time.perf_counter() - t0:.0f} s\n")

    rng = np.random.default_rng(1)
    records = []
    for nt in threads:
        numba.set_num_threads(nt)
        with threadpool_limits(nt):
            for dtype in dtypes:
                rows = []
                for m in models:
                    for n in batches:
                        for name, form, M, K, N in products(*MODELS[m], n):
                            ops, ref = operands(rng, form, M, K, N, dtype)
                            C = np.empty((M, N), dtype)
                            fns = {"openblas": lambda: ref(C)}
                            for v in variants:
                                size = gemm_variants.buffer_size(v, M, N, K, dtype)
                                P, P2 = np.empty(size, dtype), np.empty(size, dtype)
                                fns[v] = (lambda f, P, P2: lambda: f(*ops, C, P, P2, config.MB, config.NB))(
                                    gemm_variants.VARIANTS[v][form], P, P2)
                            flops = 2.0 * M * N * K
                            ts = measure(fns, per_call(flops), a.repeat)
                            gf = {str(k): flops / np.median(t) / 1e9 for k, t in ts.items()}
                            ratio = {str(v): float(np.median(np.array(ts["openblas"]) / np.array(ts[v])))
                                     for v in variants}
                            records.append(dict(model=m, batch=n, product=name, form=form, M=M, K=K, N=N,
                                                dtype=dtype.name, threads=nt, gflops=gf, ratio=ratio))
                            rows.append([m, n, name, form, f"{M}x{K}x{N}", f"{gf['openblas']:.0f}"]
                                        + [f"{gf[str(v)]:.0f}" for v in variants]
                                        + [f"{ratio[str(v)]:.2f}" for v in variants])
                head = (["model", "batch", "product", "form", "MxKxN", "OpenBLAS GF/s"]
                        + [f"v{v} GF/s" for v in variants] + [f"v{v}/OpenBLAS" for v in variants])
                print(f"## {dtype.name}, {nt} thread{'s' * (nt > 1)}\n\n{table(rows, head)}\n")

    best = max(variants)
    rows = []
    for nt in threads:
        for dtype in dtypes:
            r = [x["ratio"][str(best)] for x in records if x["threads"] == nt and x["dtype"] == dtype.name]
            rows.append([dtype.name, nt, len(r), f"{min(r):.2f}", f"{np.median(r):.2f}", f"{max(r):.2f}",
                         sum(x >= 0.8 for x in r)])
    print(f"## variant {best} / OpenBLAS (goal >= 0.8 at every product)\n")
    print(table(rows, ["dtype", "threads", "products", "min", "median", "max", ">= 0.8"]) + "\n")
    if a.asm:
        print("## assembly\n\n" + asm_report(variants) + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "variants": {str(v): gemm_variants.NAMES[v] for v in variants},
                       "repeat": a.repeat, "tiles": [config.MB, config.NB], "results": records}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
