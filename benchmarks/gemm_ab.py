"""Versions of the custom GEMM (minivae/kernels/gemm.py) side by side on the products of one part of a split
two-layer IWAE step, in one process, in alternating rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/gemm_ab.py HEAD~1 HEAD [--examples 64]

Each version is a git revision of this repository (or a path to a gemm.py file). Its gemm.py is loaded
as a module of its own and compiled afresh (a minute or so each), so the versions run in the same
process on the same operands: a busy machine slows all of them within a round, and the ratio to the
first version, round by round, cancels that out (these machines' hosts change speed by up to 2x from
one minute to the next).

The products are those of one part of the paper's two-layer model (784-200-200-100 / 100-100-100-50,
k = 5) with ``--examples`` examples, as the part runs them: one core, task after task (serial), a task
per column panel over every row; per layer nn (a = h W), tn (dW = h^T g) and nt (dh = g W^T, from B^T
packed beforehand; not for the first layer, whose dx is never computed). Each version is first checked
against NumPy. Per round, each version runs the whole set (the best of 3); the table gives each
version's median time and the median (quartiles) of its per-round ratio to the first version, then the
same per product form.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from numba.core.dispatcher import Dispatcher

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table  # noqa: E402
from iwae_paper import minivae_model  # noqa: E402

from threadpoolctl import threadpool_limits  # noqa: E402

import minivae.kernels  # noqa: E402,F401  (the package the versions' relative imports resolve in)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "minivae/kernels/gemm.py"


def layers(n, L):
    """(name, rows, fan_in, fan_out) of every layer of the paper's two-layer model (iwae_paper.MODELS
    "iwae2"), for n examples: rows n in block enc, which runs once per example, n L elsewhere (as
    cpu_stack.StackWorkspace lays them out)."""
    layout = minivae_model("iwae2", 0, "numpy").layout
    return [(p, n if p.split(".")[0] == "enc" else n * L, fi, fo) for p, fi, fo in layout.layers]


def load(version, i, folder):
    """The gemm module of ``version`` (a git revision, or a file), as minivae.kernels.gemm_ab<i>."""
    if os.path.isfile(version):
        path = version
    else:
        r = subprocess.run(["git", "-C", ROOT, "show", f"{version}:{PATH}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"gemm_ab.py: no {PATH} at revision {version!r}: {r.stderr.strip()}")
        path = os.path.join(folder, f"gemm_{i}.py")
        with open(path, "w") as f:
            f.write(r.stdout)
    spec = importlib.util.spec_from_file_location(f"minivae.kernels.gemm_ab{i}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    enable = Dispatcher.enable_caching     # compiled afresh, never cached: numba's cache would tie a
    Dispatcher.enable_caching = lambda self: None       # version's kernels to the name it was loaded under
    try:
        spec.loader.exec_module(module)
    finally:
        Dispatcher.enable_caching = enable
    return module


def jobs(m, n, L, dtype, rng):
    """[(form, fn, flops)] for every product of the part, each checked against NumPy once."""
    out = []
    E = np.empty(1, dtype)
    big = 1 << 30
    for t, (name, M, K, N) in enumerate(layers(n, L)):
        h = rng.standard_normal((M, K)).astype(dtype)
        W = rng.standard_normal((K, N)).astype(dtype)
        g = rng.standard_normal((M, N)).astype(dtype)
        a, dW, dh = np.empty((M, N), dtype), np.empty((K, N), dtype), np.empty((M, K), dtype)
        P = np.empty(m.pack_size("nt", K, N, dtype), dtype)
        m.pack_bt_panels_(W, P, 0, -(-K // m.panel_width(dtype)))
        forms = [("nn", lambda h=h, W=W, a=a: m.gemm_nn(h, W, a, E, big, 1, True), a, h @ W),
                 ("tn", lambda h=h, g=g, dW=dW: m.gemm_tn(h, g, dW, E, big, 1, True), dW, h.T @ g)]
        if t > 0:                           # the first layer's dx is never computed
            forms.append(("nt", lambda g=g, P=P, dh=dh: m.gemm_nt_packed(g, P, dh, big, 1, True), dh, g @ W.T))
        for form, fn, res, want in forms:
            fn()
            err = np.abs(res - want).max() / max(np.abs(want).max(), 1e-30)
            if not err < (1e-5 if dtype == np.float32 else 1e-12):
                raise SystemExit(f"gemm_ab.py: {m.__name__} {name} {form}: relative error {err:.2e}")
            out.append((form, fn, 2 * M * K * N))
    return out


def best_of(fns, tries=3):
    best = np.inf
    for _ in range(tries):
        t = time.perf_counter()
        for fn in fns:
            fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("versions", nargs="+", help="git revisions or gemm.py files; ratios are to the first")
    p.add_argument("--examples", type=int, default=64, help="examples in the part (64: batch 128 on 2 threads)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--rounds", type=int, default=40)
    a = p.parse_args(argv)
    if a.examples < 1 or a.k < 1 or a.rounds < 1:
        raise SystemExit("gemm_ab.py: --examples, --k and --rounds must be positive integers")
    dtype = np.dtype(a.dtype).type
    threadpool_limits(1)
    with tempfile.TemporaryDirectory() as folder:
        mods = [load(v, i, folder) for i, v in enumerate(a.versions)]
        sets = [jobs(m, a.examples, a.k, dtype, np.random.default_rng(0)) for m in mods]
    forms = ("nn", "tn", "nt")
    whole = [[] for _ in mods]
    per = {f: [[] for _ in mods] for f in forms}
    for r in range(a.rounds):
        order = range(len(mods)) if r % 2 == 0 else reversed(range(len(mods)))
        for i in order:
            whole[i].append(best_of([fn for _, fn, _ in sets[i]]))
            for f in forms:
                per[f][i].append(best_of([fn for g, fn, _ in sets[i] if g == f]))
    flops = sum(fl for _, _, fl in sets[0])

    def ratio(ts, i):
        rat = np.array(ts[i]) / np.array(ts[0])
        q1, q3 = np.quantile(rat, [0.25, 0.75])
        return f"{np.median(rat):.3f} ({q1:.3f}-{q3:.3f})"

    rows = []
    for i, v in enumerate(a.versions):
        rows.append([v, f"{np.median(whole[i]) * 1e3:.3f}", f"{flops / np.median(whole[i]) / 1e9:.1f}",
                     ratio(whole, i)] + [ratio(per[f], i) for f in forms])
    print(f"# {machine()}")
    print(f"# one part of the two-layer IWAE step: {a.examples} examples x k = {a.k}, {a.dtype}, "
          f"{flops / 1e9:.3f} GFLOP; {a.rounds} rounds, alternating; ratios: per round, to {a.versions[0]}")
    print(table(rows, ["version", "ms (median)", "GF/s", "time ratio", "nn ratio", "tn ratio", "nt ratio"]))


if __name__ == "__main__":
    main()
