"""``minivae bench``: this machine's ceilings, and every kernel of a training step placed under them.

    minivae bench [--x-dim 784 --z-dim 20 --hidden 400 --batch 128 --dtype float32]
                  [--threads N] [--backend numba|numpy] [--gemm blas|custom] [--repeat 7]
                  [--plot roofline.png] [--json]

1. Ceilings, measured on the spot (never taken from a datasheet):
   - peak FMA throughput, float32 and float64, on 1 thread ("per core") and on ``threads`` threads
     ("all"): a Numba kernel of independent FMA chains on full-width vectors (``fma_chains_``,
     written in LLVM IR: NACC accumulators of VEC_BITS each, so that the FMA latency is hidden and
     nothing but the FMA ports limits it); 2 FLOPs per lane per FMA;
   - memory bandwidth, 1 thread and ``threads`` threads: a STREAM triad a = b + s c over float64
     arrays whose total is at least 4x the last-level cache (``triad_``), counted as STREAM does:
     24 bytes per element (read b and c, write a; the write-allocate read is not counted); and the
     L2 bandwidth, the same triad on half an L2 per thread, repeated inside the kernel;
   Each ceiling is the best of many short runs (20-30 of about 2-5 ms): a ceiling is what the machine
   can do, and on a shared machine the least disturbed run is the one that shows it.
2. Every kernel of one training step of the chosen model (ELBO, one sample, Adam): each GEMM of the
   forward and backward passes (docs/math.md §2.1, §6), each fused elementwise kernel (bias +
   activation, activation mask + bias gradient, reparameterization, KL, the likelihood and its score,
   the posterior backward), and the optimizer. For each: the median time over ``repeat`` timed runs
   (hand-written loop, each run long enough to time), GFLOP/s and GB/s, the arithmetic intensity
   AI = FLOPs / bytes, the bound that applies, min(peak, AI x bandwidth) with the ceilings of the
   threads the kernel uses (the GEMMs use ``threads``; the serial elementwise kernels one), and the
   percentage of it reached. Beside it, the NumPy reference of the same kernel (for a GEMM that is
   OpenBLAS, through ``np.matmul``) and the speed-up over it.
   Counting: a GEMM does 2 M N K FLOPs and moves at least (M K + K N + M N) elements (each operand
   read once, C written once). An elementwise kernel's FLOPs are the operations its loop does per
   element, with exp, log, sqrt and division counted as one FLOP each (so its AI is a lower bound);
   its bytes are every array it reads plus every array it writes, once. The model's arrays are small
   (a 128 x 400 float32 activation is 200 KB): they sit in L2/L3, and an elementwise kernel can pass
   100% of the DRAM bound. That is the bound as defined, not an error; ``pct_of_l2_bound`` judges it
   against the L2 roofline instead (the plot draws both).
3. The whole step (``loss_and_grad`` + the optimizer update, on the chosen backend), the sum of its
   kernels' medians, and the difference: the time spent between kernels (Python, dispatch, the
   small reductions not listed) -- negative when kernels run faster in the step (warm caches).

The numba backend's GEMM is whatever ``minivae.kernels.config.GEMM`` (``MINIVAE_GEMM``) selects for a whole
pass (the one-layer step here is never split; "auto" is BLAS): the kernels are called through the backend's
own entry points (``cpu.mm_nn``, ``mm_nt``, ``mm_tn``).

``--json`` prints one JSON object instead of the tables, with keys
    machine   {cpu, cores, load_average, date, blas: [{prefix, version, architecture, num_threads}]}
    config    {x_dim, z_dim, hidden, batch, dtype, threads, backend, gemm, repeat, activation, likelihood}
    ceilings  {threads, fma_gflops: {float32: {per_core, all}, float64: {per_core, all}},
               bandwidth_gbs: {per_core, all}, l2_bandwidth_gbs: {per_core, all}, vector_bits,
               accumulators, stream_mb}
    kernels   [{name, kind, shape, threads, flops, bytes, intensity, time_s, gflops, gbs,
                bound_gflops, bound, pct_of_bound, pct_of_l2_bound, ref_time_s, ref_gflops, speedup}]
    step      {time_s, kernels_sum_s, overhead_s}
``kind`` is "gemm", "elementwise" or "optimizer"; ``bound`` is "compute" or "memory"; ``ref_*`` and
``speedup`` are null with ``--backend numpy`` (the kernel is the reference).
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import likelihoods
from . import threads as _threads
from .kernels.numba_cache import configure as _configure_cache

_configure_cache()      # before the first @njit(cache=True): one cache per source version (kernels/numba_cache.py)

BACKENDS = ("numba", "numpy")


# ----------------------------------------------------------------------------------------------
# The machine's ceilings
# ----------------------------------------------------------------------------------------------

def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
VEC_BITS = 512 if "avx512f" in _FLAGS else 256 if "avx" in _FLAGS else 128
NACC = 12 if VEC_BITS == 512 else 10      # independent chains: > FMA latency x FMA ports (4 x 2), and
                                          # NACC + 2 vectors fit the register file (32 zmm / 16 ymm)


@intrinsic
def fma_chains_(typingctx, iters, m, c):
    """NACC independent chains acc <- acc * m + c on <VEC_BITS/bits x float> vectors, ``iters`` times
    (llvm.fma on whole vectors: nothing to vectorize, nothing LLVM may fold); returns the sum of every
    lane, so that no chain is dead. FLOPs: 2 x lanes x NACC x iters."""
    if not (isinstance(iters, types.Integer) and isinstance(m, types.Float) and m == c):
        return None
    lanes = VEC_BITS // m.bitwidth

    def codegen(context, builder, signature, args):
        n, mv, cv = args
        fty = context.get_value_type(signature.args[1])
        vty = ir.VectorType(fty, lanes)

        def splat(x):
            v = ir.Constant(vty, ir.Undefined)
            for k in range(lanes):
                v = builder.insert_element(v, x, ir.Constant(ir.IntType(32), k))
            return v

        mvec, cvec = splat(mv), splat(cv)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3),
                                             f"llvm.fma.v{lanes}f{m.bitwidth}")
        accs = [cgutils.alloca_once_value(builder, splat(ir.Constant(fty, 1.0 + 1e-3 * i)))
                for i in range(NACC)]
        with cgutils.for_range(builder, n):
            for a in accs:
                builder.store(builder.call(fma, [builder.load(a), mvec, cvec]), a)
        total = ir.Constant(fty, 0.0)
        for a in accs:
            v = builder.load(a)
            for k in range(lanes):
                total = builder.fadd(total, builder.extract_element(v, ir.Constant(ir.IntType(32), k)))
        return total

    return m(iters, m, c), codegen


@njit(cache=True, parallel=True)
def fma_peak_(iters, m, c, out):
    """out[t] = the chains' sum on thread t (one prange iteration per thread)."""
    for t in prange(out.shape[0]):
        out[t] = fma_chains_(iters, m, c)


@njit(cache=True, parallel=True)
def triad_(a, b, c, s, reps, nchunks):
    """STREAM triad a = b + s c, ``reps`` times, the arrays split into ``nchunks`` contiguous chunks
    (one per thread: each thread keeps its own chunk, so a chunk that fits a core's L2 stays there)."""
    n = a.shape[0]
    for t in prange(nchunks):
        i0 = t * n // nchunks
        i1 = (t + 1) * n // nchunks
        aa, bb, cc = a[i0:i1], b[i0:i1], c[i0:i1]       # 0-based indices: no wraparound test,
        for _ in range(reps):                          # the loop vectorizes (4 -> 25 GB/s)
            for i in range(aa.shape[0]):
                aa[i] = bb[i] + s * cc[i]


def _cache_bytes(level=None) -> int:
    """The size of one cache of ``level`` (default: the largest) from sysfs; 0 when unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in os.listdir(base):
            try:
                with open(os.path.join(base, d, "size")) as f:
                    txt = f.read().strip()
                with open(os.path.join(base, d, "level")) as f:
                    lev = int(f.read())
                with open(os.path.join(base, d, "type")) as f:
                    kind = f.read().strip()
            except (OSError, ValueError):
                continue
            if kind == "Instruction" or (level is not None and lev != level):
                continue
            mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(txt[-1:], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best


def measure_fma(dtype, nthreads, repeat=30, target_s=2e-3):
    """Peak FMA GFLOP/s of ``nthreads`` threads (each runs the chains; the slowest sets the time)."""
    t = np.dtype(dtype).type
    m, c = t(0.999999), t(1e-6)
    out = np.zeros(nthreads, dtype)
    lanes = VEC_BITS // (8 * np.dtype(dtype).itemsize)
    with _threads.limit_threads(nthreads):
        fma_peak_(10, m, c, out)                              # compile, wake the threads
        iters = 1000
        while True:                                           # calibrate: one run >= target_s
            t0 = time.perf_counter()
            fma_peak_(iters, m, c, out)
            dt = time.perf_counter() - t0
            if dt >= target_s or iters > 1e10:
                break
            iters = int(iters * max(2.0, 1.2 * target_s / max(dt, 1e-7)))
        best = best_time(lambda: fma_peak_(iters, m, c, out), repeat)
    if not np.all(np.isfinite(out)):
        raise RuntimeError("the FMA kernel produced a non-finite value")
    return 2.0 * lanes * NACC * iters * nthreads / best / 1e9


def measure_bandwidth(nthreads, repeat=20, level="dram", target_s=2e-3):
    """STREAM-triad GB/s of ``nthreads`` threads; returns (GB/s, MB per array).
    level "dram": arrays of 4x the largest cache in all (32 MiB assumed when unknown), one pass;
    level "l2": each thread's chunk half of its L2 (512 KiB assumed), passes repeated in the kernel."""
    if level == "dram":
        total = 4 * (_cache_bytes() or 32 * 1024 ** 2)
    else:
        total = nthreads * (_cache_bytes(2) or 1024 ** 2) // 2
    n = max(3 * 1024 * nthreads, total // 24)
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    with _threads.limit_threads(nthreads):
        triad_(a, b, c, 3.0, 1, nthreads)                     # compile, fault the pages in
        reps = 1
        if level != "dram":
            t0 = time.perf_counter()
            triad_(a, b, c, 3.0, 10, nthreads)
            reps = max(1, int(10 * target_s / max(time.perf_counter() - t0, 1e-7)))
        sec = best_time(lambda: triad_(a, b, c, 3.0, reps, nthreads), repeat)
    return 24.0 * n * reps / sec / 1e9, 8.0 * n / 1e6


def measure_ceilings(nthreads):
    """The ceilings are the best of many short runs (what the machine can do is what its least
    disturbed run did; on a shared machine the median would measure the neighbours)."""
    peaks = {}
    for dt in ("float32", "float64"):
        peaks[dt] = {"per_core": measure_fma(dt, 1), "all": measure_fma(dt, nthreads)}
    bw1, mb = measure_bandwidth(1)
    bwt, _ = measure_bandwidth(nthreads)
    l21, _ = measure_bandwidth(1, level="l2")
    l2t, _ = measure_bandwidth(nthreads, level="l2")
    return {"threads": nthreads, "fma_gflops": peaks, "bandwidth_gbs": {"per_core": bw1, "all": bwt},
            "l2_bandwidth_gbs": {"per_core": l21, "all": l2t}, "vector_bits": VEC_BITS,
            "accumulators": NACC, "stream_mb": mb}


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def best_time(fn, repeat):
    """The shortest of ``repeat`` timed calls, after one warm-up call (for the ceilings)."""
    fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def median_time(fn, repeat=7, min_s=2e-4):
    """Median seconds per call over ``repeat`` runs, after one warm-up call; each run makes enough
    calls to last ``min_s`` (short kernels are timed in batches)."""
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    number = max(1, int(min_s / max(once, 1e-7)))
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        ts.append((time.perf_counter() - t0) / number)
    return float(np.median(ts))


# ----------------------------------------------------------------------------------------------
# The kernels of one training step
# ----------------------------------------------------------------------------------------------

class Case:
    """One kernel: what it computes, its counts, and the callables to time."""

    def __init__(self, name, kind, shape, flops, nbytes, threads, fast, ref):
        self.name, self.kind, self.shape = name, kind, shape
        self.flops, self.bytes, self.threads = float(flops), float(nbytes), threads
        self.fast, self.ref = fast, ref


# FLOPs per element of the elementwise kernels (exp/log/sqrt/div count one each), by activation
_ACT_FWD = {0: 1, 1: 2, 2: 6, 3: 6, 4: 3}      # bias add + f
_ACT_BWD = {0: 1, 1: 2, 2: 4, 3: 4, 4: 3}      # mask/multiply + column sum


def _parallel(fn) -> bool:
    return bool(getattr(fn, "targetoptions", {}).get("parallel"))


def step_cases(spec, dtype, n, nthreads, backend="numba"):
    """The kernels of one ELBO training step (L = 1, Adam) of ``spec`` at batch ``n``: a list of Case."""
    from . import distributions as dist, optim
    from .kernels import cpu
    from .kernels.gemm import pack_size
    from .layers import activation_backward, activation_forward

    dtype = np.dtype(dtype)
    t = dtype.type
    isz = dtype.itemsize
    rng = np.random.default_rng(0)
    be = cpu.NumbaBackend(spec, dtype)
    gemm, mb, nb = be._gemm()
    act_name = spec.activation
    act = cpu.ACT_CODES[act_name]
    numpy_only = backend == "numpy"
    cases = []

    def rnd(*shape):
        return rng.standard_normal(shape).astype(dtype)

    def add(name, kind, shape, flops, nbytes, threads, fast, ref):
        if numpy_only:
            fast, ref = ref, None
        cases.append(Case(name, kind, shape, flops, nbytes, threads, fast, ref))

    def gemm_case(name, form, M, K, N):
        """C (M, N) = op(A) op(B) as the backend lays it out: nn a = h W; nt dh = da W^T; tn dW = h^T da."""
        C = np.empty((M, N), dtype)
        if form == "nn":
            A, B = rnd(M, K), rnd(K, N)
            p1 = np.empty(pack_size("nn", N, K, dtype), dtype)                      # the custom GEMM's panels
            fast = lambda: cpu.mm_nn(A, B, C, gemm, p1, mb, nb)                    # noqa: E731
            ref = lambda: np.matmul(A, B, out=C)                                   # noqa: E731
        elif form == "nt":
            A, B = rnd(M, K), rnd(N, K)
            p1 = np.empty(pack_size("nt", N, K, dtype), dtype)
            fast = lambda: cpu.mm_nt(A, B, C, gemm, p1, mb, nb)                    # noqa: E731
            ref = lambda: np.matmul(A, B.T, out=C)                                 # noqa: E731
        else:
            A, B = rnd(K, M), rnd(K, N)
            p1 = np.empty(pack_size("tn", N, K, dtype), dtype)
            fast = lambda: cpu.mm_tn(A, B, C, gemm, p1, mb, nb)                    # noqa: E731
            ref = lambda: np.matmul(A.T, B, out=C)                                 # noqa: E731
        add(f"{name} ({form})", "gemm", f"{M}x{K}x{N}", 2.0 * M * N * K, (M * K + K * N + M * N) * isz,
            nthreads, fast, ref)

    layers = spec.layout.layers
    ne = len(spec.hidden)
    nl = len(layers)
    Z = spec.z_dim
    D = spec.x_dim
    # forward: every layer's GEMM, then its bias + activation (identity on the heads)     §2.1-§2.3, §6 F1-F5
    for li, (lname, fi, fo) in enumerate(layers):
        gemm_case(f"{lname} fwd", "nn", n, fi, fo)
        code = act if li not in (ne, nl - 1) else 0
        a, b = rnd(n, fo), rnd(fo)
        work = a.copy()
        fname = act_name if code else "identity"
        add(f"{lname} bias+{fname}", "elementwise", f"{n}x{fo}", _ACT_FWD[code] * n * fo,
            (2 * n * fo + fo) * isz, 1 if not _parallel(cpu.bias_act_) else nthreads,
            lambda work=work, b=b, code=code: cpu.bias_act_(work, b, code),
            (lambda a=a, b=b: activation_forward(a + b, act_name)) if code else (lambda a=a, b=b: a + b))
    # reparameterization and KL                                                              §3.1, §3.2
    out = rnd(n, 2 * Z) * t(0.5)
    eps = rnd(1, n, Z)
    std, z, kld = np.empty((n, Z), dtype), np.empty((n, Z), dtype), np.empty(Z)
    add("reparam", "elementwise", f"{n}x{Z}", 4 * n * Z, 5 * n * Z * isz, 1,
        lambda: cpu.reparam_fwd_(out, eps, std, z),
        lambda: dist.reparam_forward(out[:, :Z], out[:, Z:], eps))
    add("KL per dim", "elementwise", f"{n}x{Z}", 7 * n * Z, 2 * n * Z * isz, 1,
        lambda: cpu.kl_dim_(out, Z, kld),
        lambda: dist.kl_forward(out[:, :Z], out[:, Z:]).mean(axis=0))
    # the likelihood and its score                                                           §4
    K = spec.head_width
    lik = cpu.LIK_CODES[spec.likelihood]
    x = rng.random((n, D)).astype(dtype)
    head = rnd(n, K)
    hw = head.copy()
    ll, lp = np.empty(n), np.empty((n, D), dtype)
    sw = be.cb_switch
    scale = -1.0 / n
    dll = np.full((1, n), scale, dtype)
    add(f"likelihood ({spec.likelihood})", "elementwise", f"{n}x{K}", getattr(likelihoods.get(spec.likelihood), "FLOPS_PER_PIXEL", 20) * n * D,
        (2 * n * K + n * D + 2 * n * D) * isz, 1,
        lambda: cpu.likelihood_(x, hw, ll, lp, lik, spec.var_floor, sw, scale, True),
        lambda: (dist.loglik_forward(spec.likelihood, x, head[None], spec.var_floor),
                 dist.loglik_backward(spec.likelihood, x, head[None], dll, spec.var_floor)))
    # backward: per layer the bias gradient (+ activation mask), dW, and dx (not for enc.0)  §2.1, §6 steps 3-8
    for li in range(nl - 1, -1, -1):
        lname, fi, fo = layers[li]
        code = act if li not in (ne, nl - 1) else 0
        g, h = rnd(n, fo), np.abs(rnd(n, fo))
        db = np.empty(fo, dtype)
        cache = (h, h, act_name)
        add(f"{lname} mask+colsum" if code else f"{lname} colsum", "elementwise", f"{n}x{fo}",
            _ACT_BWD[code] * n * fo, ((3 if code else 1) * n * fo + fo) * isz, 1,
            lambda g=g, h=h, db=db, code=code: cpu.act_back_colsum_(g, h, db, code),
            (lambda g=g, cache=cache: activation_backward(g, cache).sum(axis=0)) if code
            else (lambda g=g: g.sum(axis=0)))
        gemm_case(f"{lname} dW", "tn", fi, n, fo)
        if li != 0:
            gemm_case(f"{lname} dx", "nt", n, fo, fi)
        if li == ne + 1:        # the decoder's first layer gave dz: back through the posterior
            dz, dout, dkl = rnd(n, Z), np.empty((n, 2 * Z), dtype), np.full(Z, 1.0 / n)
            aux = np.empty(n)
            add("posterior bwd", "elementwise", f"{n}x{Z}", 9 * n * Z, 7 * n * Z * isz, 1,
                lambda: cpu.posterior_bwd_(dz, eps, z, std, out, dout, dkl, aux, 1.0, False),
                lambda: (dist.reparam_backward(dz[None], (std, eps)),
                         dist.kl_backward(1.0 / n, out[:, :Z], out[:, Z:])))
    # the optimizer                                                                           §8
    P = spec.layout.size
    p, gr = rnd(P), rnd(P) * t(1e-3)
    m, v = np.zeros(P, dtype), np.zeros(P, dtype)
    p2, m2, v2 = p.copy(), m.copy(), v.copy()
    add("adam update", "optimizer", f"{P}", 12 * P, 7 * P * isz, 1 if not _parallel(cpu.adam_update) else nthreads,
        lambda: cpu.adam_update(p, gr, m, v, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0),
        lambda: optim.adam_update(p2, gr, m2, v2, 3, 1e-3, 0.9, 0.999, 1e-8, 0.0))
    return cases


def time_step(spec, dtype, n, backend, repeat):
    """Median seconds of one training step: loss_and_grad (ELBO, L = 1) + the Adam update."""
    from .model import VAE
    from .optim import make_optimizer
    model = VAE(spec.x_dim, spec.z_dim, hidden=spec.hidden, activation=spec.activation,
                likelihood=spec.likelihood, dtype=dtype, seed=0, backend=backend)
    rng = np.random.default_rng(1)
    x = rng.random((n, spec.x_dim)).astype(dtype)
    eps = rng.standard_normal((1, n, spec.z_dim)).astype(dtype)
    params = model.params.copy()
    grad = np.empty_like(params)
    opt = make_optimizer("adam", params.size, np.dtype(dtype).name, backend=model.backend)

    def step():
        model.backend.loss_and_grad(params, x, eps, grad=grad)
        opt.step(params, grad)
    return median_time(step, repeat)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    blas = [{k: b[k] for k in ("prefix", "version", "architecture", "num_threads")}
            for b in _threads.blas_info()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "blas": blas}


def run(x_dim=784, z_dim=20, hidden=(400,), batch=128, dtype="float32", nthreads=None,
        backend="numba", repeat=7, activation="relu", likelihood="bernoulli", gemm=None) -> dict:
    """Measure the ceilings, every kernel of a step and the whole step; the result of ``--json``.
    ``gemm``: the numba backend's GEMM for this run (default: ``config.GEMM`` as it is)."""
    from .kernels import config

    if gemm is not None:
        old = config.GEMM
        config.GEMM = gemm
        try:
            config.gemm_code()                       # a clear error for an unknown name
            return run(x_dim, z_dim, hidden, batch, dtype, nthreads, backend, repeat, activation, likelihood)
        finally:
            config.GEMM = old
    from .model import ModelSpec

    if backend not in BACKENDS:
        raise ValueError(f"bench measures the CPU backends ({', '.join(BACKENDS)}), got {backend!r}; "
                         "for the GPU run benchmarks/gpu.py")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    for name, v in (("batch", batch), ("repeat", repeat)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    import numba
    nthreads = min(nthreads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
    spec = ModelSpec(x_dim, z_dim, hidden=hidden, activation=activation, likelihood=likelihood)
    result = {"machine": machine_info(),
              "config": {"x_dim": x_dim, "z_dim": z_dim, "hidden": list(spec.hidden), "batch": batch,
                         "dtype": dtype, "threads": nthreads, "backend": backend,
                         "gemm": config.GEMM if backend == "numba" else "openblas (numpy)",
                         "repeat": repeat, "activation": activation, "likelihood": likelihood}}
    ceil = measure_ceilings(nthreads)
    result["ceilings"] = ceil
    peaks = ceil["fma_gflops"][dtype]
    rows = []
    with _threads.limit_threads(nthreads):
        cases = step_cases(spec, dtype, batch, nthreads, backend)
        for c in cases:
            sec = median_time(c.fast, repeat)
            ref = median_time(c.ref, repeat) if c.ref is not None else None
            key = "all" if c.threads > 1 else "per_core"
            peak, bw = peaks[key], ceil["bandwidth_gbs"][key]
            ai = c.flops / c.bytes
            bound = min(peak, ai * bw)
            bound_l2 = min(peak, ai * ceil["l2_bandwidth_gbs"][key])
            gflops = c.flops / sec / 1e9
            rows.append({"name": c.name, "kind": c.kind, "shape": c.shape, "threads": c.threads,
                         "flops": c.flops, "bytes": c.bytes, "intensity": ai, "time_s": sec,
                         "gflops": gflops, "gbs": c.bytes / sec / 1e9, "bound_gflops": bound,
                         "bound": "compute" if peak <= ai * bw else "memory",
                         "pct_of_bound": 100.0 * gflops / bound, "pct_of_l2_bound": 100.0 * gflops / bound_l2,
                         "ref_time_s": ref, "ref_gflops": c.flops / ref / 1e9 if ref else None,
                         "speedup": ref / sec if ref else None})
        step = time_step(spec, dtype, batch, backend, repeat)
    total = sum(r["time_s"] for r in rows)
    result["kernels"] = rows
    result["step"] = {"time_s": step, "kernels_sum_s": total, "overhead_s": step - total}
    return result


def _table(head, rows):
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "| " + " | ".join(str(c).ljust(k) for c, k in zip(r, w)) + " |"   # noqa: E731
    return "\n".join([fmt(head), "| " + " | ".join("-" * k for k in w) + " |"] + [fmt(r) for r in rows])


def _g(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"


def format_report(r: dict) -> str:
    m, c, ce = r["machine"], r["config"], r["ceilings"]
    blas = "; ".join(f"{b['prefix']} {b['version']} {b['architecture']}" for b in m["blas"]) or "none found"
    load = m.get("load_average")
    busy = (f"; load average {load:.1f} on {m['cores']} cores: a shared machine, the times are noisy"
            if load is not None and load > 0.5 * m["cores"] else "")
    out = [f"machine: {m['cpu']}, {m['cores']} cores, {m['date']}; BLAS: {blas}{busy}",
           f"model: {c['x_dim']}-{'-'.join(map(str, c['hidden']))}-{c['z_dim']} {c['activation']} "
           f"{c['likelihood']}, batch {c['batch']}, {c['dtype']}, backend {c['backend']} "
           f"(GEMM: {c['gemm']}), {c['threads']} thread(s), median of {c['repeat']}", ""]
    f = ce["fma_gflops"]
    bw = ce["bandwidth_gbs"]
    T = ce["threads"]
    out.append(_table(["ceiling", "1 thread", f"{T} thread{'s' if T > 1 else ''} (--threads)", "how"], [
        ["peak FMA float32 (GFLOP/s)", _g(f["float32"]["per_core"]), _g(f["float32"]["all"]),
         f"{ce['accumulators']} chains of {ce['vector_bits']}-bit FMA"],
        ["peak FMA float64 (GFLOP/s)", _g(f["float64"]["per_core"]), _g(f["float64"]["all"]), "same"],
        ["memory bandwidth (GB/s)", _g(bw["per_core"]), _g(bw["all"]),
         f"triad, 3 x {ce['stream_mb']:.0f} MB float64, 24 B/element"],
        ["L2 bandwidth (GB/s)", _g(ce["l2_bandwidth_gbs"]["per_core"]), _g(ce["l2_bandwidth_gbs"]["all"]),
         "triad, half an L2 per thread, repeated"]]))
    out.append("")
    rows = []
    for k in r["kernels"]:
        rows.append([k["name"], k["shape"], k["threads"], _g(k["time_s"] * 1e6), _g(k["gflops"], 2),
                     _g(k["gbs"], 2), _g(k["intensity"], 2), f"{_g(k['bound_gflops'])} {k['bound'][:3]}",
                     f"{k['pct_of_bound']:.0f}%", f"{k['pct_of_l2_bound']:.0f}%",
                     _g(k["ref_time_s"] * 1e6 if k["ref_time_s"] else None),
                     f"{k['speedup']:.2f}x" if k["speedup"] else "-"])
    ref = "NumPy/OpenBLAS us"
    out.append(_table(["kernel", "shape (MxKxN)", "thr", "us", "GFLOP/s", "GB/s", "FLOP/B",
                       "bound GF/s", "of bound", "of L2 bound", ref,
                       "vs ref"], rows))
    s = r["step"]
    out += ["", f"whole step (loss_and_grad + adam): {s['time_s'] * 1e6:,.0f} us; sum of the kernels "
            f"{s['kernels_sum_s'] * 1e6:,.0f} us; between them {s['overhead_s'] * 1e6:,.0f} us "
            f"({100 * s['overhead_s'] / s['time_s']:.0f}%)"]
    return "\n".join(out)


def plot_roofline(r: dict, path):
    """Log-log roofline: the ceilings (all threads solid, one thread dashed) and every kernel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .checkpoint import atomic_write

    ce, dtype = r["ceilings"], r["config"]["dtype"]
    ks = r["kernels"]
    ais = [k["intensity"] for k in ks]
    lo, hi = min(ais + [0.05]) / 2, max(ais + [100.0]) * 2
    x = np.geomspace(lo, hi, 200)
    fig, ax = plt.subplots(figsize=(10, 7), dpi=110)
    T = ce["threads"]
    for key, style, lab in (("all", "-", f"{T} thread{'s' if T > 1 else ''} (--threads)"), ("per_core", "--", "1 thread")):
        peak, bw = ce["fma_gflops"][dtype][key], ce["bandwidth_gbs"][key]
        l2 = ce["l2_bandwidth_gbs"][key]
        ax.plot(x, np.minimum(peak, x * bw), style, color="k", lw=1.2,
                label=f"{lab}: {peak:,.0f} GFLOP/s {dtype}, DRAM {bw:,.1f} GB/s")
        ax.plot(x, np.minimum(peak, x * l2), style, color="tab:red", lw=0.8,
                label=f"{lab}: L2 {l2:,.1f} GB/s")
    colors = {"gemm": "tab:blue", "elementwise": "tab:orange", "optimizer": "tab:green"}
    for k in ks:
        ax.scatter(k["intensity"], k["gflops"], color=colors[k["kind"]], s=22, zorder=3)
        if k["ref_gflops"]:
            ax.scatter(k["intensity"], k["ref_gflops"], marker="x", color="grey", s=14, zorder=2)
        ax.annotate(k["name"], (k["intensity"], k["gflops"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    for kind, col in colors.items():
        ax.scatter([], [], color=col, label=kind)
    ax.scatter([], [], marker="x", color="grey", label="NumPy / OpenBLAS reference")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("GFLOP/s")
    c = r["config"]
    ax.set_title(f"minivae bench: {c['x_dim']}-{'-'.join(map(str, c['hidden']))}-{c['z_dim']}, batch "
                 f"{c['batch']}, {dtype}, {c['backend']} ({c['gemm']})", fontsize=9)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return path
