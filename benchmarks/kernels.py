"""Per-kernel benchmark of the Numba CPU backend against its NumPy references (docs/math.md §9).

    python benchmarks/kernels.py [--dtype float32] [--repeat 9]

For each fused kernel: median time, GB/s (elementwise) or GFLOP/s (GEMM) and the speed-up over the
NumPy reference it replaces. For the GEMM: OpenBLAS through NumPy (x @ W), the backend's BLAS path
(np.dot inside @njit: SciPy's OpenBLAS) and the custom register-blocked kernel (minivae/kernels/gemm.py, packing included),
at every shape of a 784-400-20 training step, with the custom/OpenBLAS throughput ratio.
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, if set, slow NumPy's OpenBLAS: unset them for this command.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BATCH, D, H, Z, machine, model_gemms, table, timeit  # noqa: E402

from minivae import distributions as dist, optim  # noqa: E402
from minivae.kernels import cpu  # noqa: E402
from minivae.kernels.gemm import pack_size  # noqa: E402
from minivae.layers import activation_backward, activation_forward  # noqa: E402


def gemm_rows(dtype, repeat):
    rng = np.random.default_rng(0)
    rows = []
    tot = {"numpy": 0.0, "blas": 0.0, "custom": 0.0}
    mb, nb = cpu.config.MB, cpu.config.NB
    for name, M, K, N, kind in model_gemms():
        # operands laid out as in the backend: weights (fan_in, fan_out), activations (rows, width)
        if kind == "nn":
            A, B = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
            ref = lambda: np.matmul(A, B, out=C)  # noqa: E731
            p1 = np.empty(pack_size("nn", N, K, dtype), dtype)
            run = lambda g: cpu.mm_nn(A, B, C, g, p1, mb, nb)  # noqa: E731
        elif kind == "nt":
            A, B = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((N, K)).astype(dtype)
            ref = lambda: np.matmul(A, B.T, out=C)  # noqa: E731
            p1 = np.empty(pack_size("nt", N, K, dtype), dtype)
            run = lambda g: cpu.mm_nt(A, B, C, g, p1, mb, nb)  # noqa: E731
        else:
            A, B = rng.standard_normal((K, M)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
            ref = lambda: np.matmul(A.T, B, out=C)  # noqa: E731
            p1 = np.empty(pack_size("tn", N, K, dtype), dtype)
            run = lambda g: cpu.mm_tn(A, B, C, g, p1, mb, nb)  # noqa: E731
        C = np.empty((M, N), dtype)
        gf = 2.0 * M * N * K / 1e9
        t = {}
        for _ in range(2):                       # alternate the three, keep the better median
            for key, fn in (("numpy", ref), ("blas", lambda: run(0)), ("custom", lambda: run(1))):
                v = timeit(fn, repeat=repeat, number=5)
                t[key] = min(t.get(key, np.inf), v)
        for k in tot:
            tot[k] += t[k]
        rows.append([f"{name} ({kind})", f"{M}x{K}x{N}", f"{t['numpy'] * 1e6:.0f}", f"{gf / t['numpy']:.0f}",
                     f"{gf / t['blas']:.0f}", f"{gf / t['custom']:.0f}", f"{t['numpy'] / t['custom']:.2f}"])
    rows.append(["one step, all GEMMs", "", f"{tot['numpy'] * 1e6:.0f}", "", f"{tot['numpy'] / tot['blas']:.2f}x",
                 f"{tot['numpy'] / tot['custom']:.2f}x", f"{tot['numpy'] / tot['custom']:.2f}"])
    head = ["GEMM", "MxKxN", "OpenBLAS us", "OpenBLAS GF/s", "njit BLAS GF/s", "custom GF/s",
            "custom / OpenBLAS"]
    return table(rows, head), tot


def elementwise_rows(dtype, repeat):
    rng = np.random.default_rng(1)
    isz = np.dtype(dtype).itemsize
    rows = []

    def add(name, shape_txt, nbytes, fast, ref):
        tf, tr = timeit(fast, repeat=repeat, number=5), timeit(ref, repeat=repeat, number=5)
        rows.append([name, shape_txt, f"{tf * 1e6:.1f}", f"{nbytes / tf / 1e9:.1f}", f"{tr * 1e6:.1f}",
                     f"{tr / tf:.1f}"])

    a = rng.standard_normal((BATCH, H)).astype(dtype)
    b = rng.standard_normal(H).astype(dtype)
    work = a.copy()
    for act in ("relu", "tanh", "softplus"):
        code = cpu.ACT_CODES[act]
        add(f"bias + {act}", f"{BATCH}x{H}", 2 * a.size * isz,
            lambda: cpu.bias_act_(work, b, code), lambda: activation_forward(a + b, act))
        h, cache = activation_forward(a + b, act)
        dh = rng.standard_normal(a.shape).astype(dtype)
        db = np.empty(H, dtype)
        g = dh.copy()
        add(f"{act} mask + bias colsum", f"{BATCH}x{H}", 3 * a.size * isz,
            lambda: cpu.act_back_colsum_(g, h, db, code),
            lambda: activation_backward(dh, cache).sum(axis=0))
    x = (rng.random((BATCH, D)) < 0.3).astype(dtype)
    head = rng.standard_normal((BATCH, D)).astype(dtype)
    hw = head.copy()
    ll = np.empty(BATCH)
    lp = np.empty((BATCH, D), dtype)
    for lik in ("bernoulli", "continuous_bernoulli"):
        code = cpu.LIK_CODES[lik]
        sw = cpu._CB_TAYLOR[np.dtype(dtype)]

        def ref():
            h3 = head[None]
            lp = dist.loglik_forward(lik, x, h3)
            return lp, dist.loglik_backward(lik, x, h3, np.full((1, BATCH), -1.0 / BATCH, dtype))
        add(f"{lik} loss + head grad", f"{BATCH}x{D}", 3 * head.size * isz,
            lambda: (hw.__setitem__(Ellipsis, head), cpu.likelihood_(x, hw, ll, lp, code, 1e-4, sw, -1.0 / BATCH, True)),
            ref)
    out = rng.standard_normal((BATCH, 2 * Z)).astype(dtype)
    eps = rng.standard_normal((1, BATCH, Z)).astype(dtype)
    std, zz = np.empty((BATCH, Z), dtype), np.empty((BATCH, Z), dtype)
    kld = np.empty(Z)
    add("reparam + KL", f"{BATCH}x{Z}", 5 * out.size // 2 * isz,
        lambda: (cpu.reparam_fwd_(out, eps, std, zz), cpu.kl_dim_(out, Z, kld)),
        lambda: (dist.reparam_forward(out[:, :Z], out[:, Z:], eps), dist.kl_forward(out[:, :Z], out[:, Z:]).mean(0)))
    P = D * H + H + H * 2 * Z + 2 * Z + Z * H + H + H * D + D
    p, gr = rng.standard_normal(P).astype(dtype), rng.standard_normal(P).astype(dtype) * dtype(1e-3)
    m, v = np.zeros(P, dtype), np.zeros(P, dtype)
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    add("adam update", f"{P}", 7 * P * isz,
        lambda: cpu.adam_update(p, gr, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0),
        lambda: optim.adam_update(p2, gr, m2, v2, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0))
    buf = np.zeros(P, dtype)
    add("sgd update (momentum)", f"{P}", 5 * P * isz,
        lambda: cpu.sgd_update(p, gr, buf, 3, 1e-3, 0.9, 0.0),
        lambda: optim.sgd_update(p2, gr, m2, 3, 1e-3, 0.9, 0.0))
    add("adagrad update", f"{P}", 5 * P * isz,
        lambda: cpu.adagrad_update(p, gr, buf, 1e-3, 1e-10, 0.0),
        lambda: optim.adagrad_update(p2, gr, m2, 1e-3, 1e-10, 0.0))
    return table(rows, ["kernel", "shape", "numba us", "GB/s", "NumPy us", "speed-up"])


def step_rows(dtype, repeat):
    from minivae import VAE
    rng = np.random.default_rng(2)
    x = (rng.random((BATCH, D)) < 0.3).astype(dtype)
    eps = rng.standard_normal((1, BATCH, Z)).astype(dtype)
    rows = []
    t = {}
    for be in ("numpy", "numba"):
        mdl = VAE(D, Z, hidden=(H,), dtype=dtype, backend=be)
        g = np.empty_like(mdl.params)
        t[be] = timeit(lambda: mdl.backend.loss_and_grad(mdl.params, x, eps, grad=g), repeat=repeat, number=5)
    rows.append(["loss_and_grad (ELBO, L=1)", f"{t['numpy'] * 1e3:.2f}", f"{t['numba'] * 1e3:.2f}",
                 f"{t['numpy'] / t['numba']:.2f}"])
    return table(rows, ["whole pass", "NumPy ms", "numba ms", "speed-up"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ap.add_argument("--repeat", type=int, default=9)
    a = ap.parse_args(argv)
    dtype = np.dtype(a.dtype).type
    print(f"machine: {machine()}")
    print(f"command: python benchmarks/kernels.py --dtype {a.dtype} --repeat {a.repeat}; "
          f"custom GEMM tiles MB={cpu.config.MB} NB={cpu.config.NB}\n")
    gem, _ = gemm_rows(dtype, a.repeat)
    print(gem, "\n")
    print(elementwise_rows(dtype, a.repeat), "\n")
    print(step_rows(dtype, a.repeat))


if __name__ == "__main__":
    main()
