"""Where the coefficients of minivae.kernels.cpu.tanh_f32 come from, and what they cost and give.

tanh_f32 is x P(t) / Q(t), t = x^2, x = a clamped to [-C, C] (C = 8.8: beyond it tanh a rounds to +-1
in float32), P of degree 5 and Q of degree 3 in t with Q(0) = 1. This script

1. fits P / Q to f(t) = tanh(x) / x on (0, C] in float64: linearized least squares of P - f Q = 0 on
   relative error, then Lawson's iteration (each point's weight multiplied by its error, 200 rounds),
   which moves the least-squares fit towards the minimax one;
2. prints the fitted coefficients next to the ones compiled into tanh_f32;
3. measures tanh_f32 (and the formula it replaced: sign(a) (1 - e) / (1 + e), e = e^-2|a|, with an odd
   series below 0.125) against float64 tanh over every third float32 in (0, 12], in float32 eps;
4. times both in bias_act_'s loop (a + b, then tanh, over a 320 x 200 float32 block), medians of rounds
   that alternate the two.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/fit_tanh_f32.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minivae.kernels.cpu import exp_nonpos_f32, tanh_f32  # noqa: E402

C = 8.8
DEG_P, DEG_Q = 6, 3            # coefficients of P (degree 5) and of Q beyond Q(0) = 1


def fit(rounds=200):
    """(p, q): P and Q's coefficients, lowest degree first (q[0] = 1)."""
    x = np.concatenate([np.linspace(1e-4, C, 20000), np.geomspace(1e-6, 1e-4, 200)])
    t = x * x
    f = np.tanh(x) / x
    A = np.concatenate([np.vander(t, DEG_P, increasing=True),
                        -f[:, None] * np.vander(t, DEG_Q + 1, increasing=True)[:, 1:]], axis=1)

    def solve(weight, Q):                           # rows scaled to relative error, times sqrt(weight)
        s = np.sqrt(weight) / (f * Q)
        coef, *_ = np.linalg.lstsq(A * s[:, None], f * s, rcond=None)
        return coef[:DEG_P], np.concatenate([[1.0], coef[DEG_P:]])

    Q = np.ones_like(x)
    for _ in range(30):                             # least squares: reweight by the last Q
        p, q = solve(np.ones_like(x), Q)
        Q = np.polyval(q[::-1], t)
    weight = np.ones_like(x) / x.size
    for _ in range(rounds):                         # Lawson
        p, q = solve(weight, Q)
        Q = np.polyval(q[::-1], t)
        err = np.abs(np.polyval(p[::-1], t) / Q / f - 1)
        weight = weight * err
        weight /= weight.sum()
    return p, q, err.max()


@njit(error_model="numpy", inline="always")
def tanh_exp_f32(a):
    """The formula tanh_f32 replaced (kept here for the comparison)."""
    t = abs(a)
    a2 = a * a
    p = np.float32(62.0 / 2835.0)
    p = p * a2 + np.float32(-17.0 / 315.0)
    p = p * a2 + np.float32(2.0 / 15.0)
    p = p * a2 + np.float32(-1.0 / 3.0)
    small = a + a * (a2 * p)
    e = exp_nonpos_f32(np.float32(-2.0) * t)
    big = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    big = big if a >= np.float32(0.0) else -big
    return small if t < np.float32(0.125) else big


def worst(f):
    @njit(error_model="numpy")
    def run(xs):
        w, at = 0.0, 0.0
        for i in range(xs.size):
            r = np.tanh(np.float64(xs[i]))
            e = abs(np.float64(f(xs[i])) - r) / (abs(r) * 1.1920928955078125e-07)
            if e > w:
                w, at = e, xs[i]
        return w, at
    return run


def bias_tanh(f):
    @njit(error_model="numpy")
    def run(a, b):
        for r in range(a.shape[0]):
            for c in range(a.shape[1]):
                a[r, c] = f(a[r, c] + b[c])
    return run


def main():
    p, q, rel = fit()
    print(f"# fit on (0, {C}]: max relative error {rel:.2e} in float64")
    print("P:", " ".join(f"{v:.8e}" for v in p))
    print("Q:", " ".join(f"{v:.8e}" for v in q))
    xs = np.arange(1, np.float32(12).view(np.int32), 3, dtype=np.int32).view(np.float32)
    rng = np.random.default_rng(0)
    a0 = (2 * rng.standard_normal((320, 200))).astype(np.float32)
    b = rng.standard_normal(200).astype(np.float32)
    kernels = {"tanh_f32 (rational)": tanh_f32, "exp form (before)": tanh_exp_f32}
    runs = {k: bias_tanh(f) for k, f in kernels.items()}
    times = {k: [] for k in kernels}
    for k, run in runs.items():
        run(a0.copy(), b)
    for r in range(40):
        for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            a = a0.copy()
            t0 = time.perf_counter()
            runs[k](a, b)
            times[k].append(time.perf_counter() - t0)
    print("\n| float32 tanh | worst error (eps), at | ns an element in bias_act_ |")
    print("| --- | --- | --- |")
    for k, f in kernels.items():
        w, at = worst(f)(xs)
        print(f"| {k} | {w:.2f}, a = {at:.4f} | {np.median(times[k]) / a0.size * 1e9:.3f} |")


if __name__ == "__main__":
    main()
