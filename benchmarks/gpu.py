"""GPU benchmarks in one command: the numba.cuda GEMM ladder and the backend's GEMMs against cuBLAS FP32,
training throughput against PyTorch CUDA eager, and the two-stochastic-layer model (docs/math.md §9).

    python benchmarks/gpu.py --json gpu.json            # everything, < 8 minutes on an H200
    python benchmarks/gpu.py --quick --json gpu.json    # the headline numbers, ~2 minutes

1. GEMM ladder (minivae/kernels/cuda_gemm.py, variants 1-5: naive, shared-memory tiles, register
   tiling, 4-wide loads, warp tiling), float32, C = A B, at 4096^3 and at every distinct (M, K, N) of
   a training step of the 784-400-20 model at each batch size (the NT/TN products timed in the NN
   form with the same M, K, N). Each variant is validated against the reference (cuBLAS's product,
   or NumPy in float64 without cuBLAS: max |C - ref| <= 1e-4 max |ref|) before it is timed; a variant
   that fails is reported, not timed, and the script exits 1 at the end.
2. The backend's own GEMMs (kernels/cuda_kernels.py, 1: shared tile, 2: register tiling; with the
   transposes the passes use), validated and timed the same way.
   cuBLAS comes from CuPy or PyTorch, whichever imports (TF32 off: a true FP32 comparison). Times are
   wall-clock over ``--reps`` back-to-back launches between two synchronizations, so at the model's
   small shapes they include the launch cost from Python (numba's dispatch, or torch's/CuPy's).
3. Training: examples/s of the device-resident step (dataset on the device, eps drawn there, Adam)
   against the same model in PyTorch eager on the same GPU, at batch 128 and 1024, after a warm-up
   that includes the JIT compilation; ``--steps`` timed steps each.
4. The S = 2 model, ``VAE(784, z_dim=(100, 50), hidden=((200, 200), (100, 100)))``, trained the same
   way when this minivae has it (else skipped, with the reason).

Prints markdown tables; ``--json FILE`` writes every number (atomically). Without a GPU it exits with
one line. ``--smoke`` runs tiny shapes and is allowed under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1),
to check the script itself (tests/cuda_sim/sim_gpu_script.py runs its validation part that way).

``--resources`` needs no GPU: it records every launch of a training step of the MNIST model (host code
on host memory, kernels not run: minivae.kernels.cuda.recording_backend), compiles each kernel to PTX
for sm_90 and prints what ptxas reports (registers per thread, shared memory, stack/spills). It needs
NVVM, NVRTC and ptxas, e.g. ``pip install numba-cuda nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import model_gemms  # noqa: E402

from minivae import VAE  # noqa: E402
from minivae.kernels.cuda import CudaBackend, CudaConfig, recording_backend, unavailable_reason  # noqa: E402
from minivae.model import ModelSpec  # noqa: E402
from minivae.optim import make_optimizer  # noqa: E402

TOL = 1e-4                 # max |C - ref| / max |ref| accepted for a float32 GEMM


def load_images(data_dir: Path, n_fallback: int):
    for suffix in (".gz", ""):
        p = data_dir / f"t10k-images-idx3-ubyte{suffix}"
        if p.exists():
            from minivae.data import read_idx
            return (read_idx(p).reshape(-1, 784) / 255.0).astype(np.float32), str(p)
    return np.random.default_rng(0).random((n_fallback, 784), dtype=np.float32), "random pixels (no MNIST found)"


# -- cuBLAS through CuPy or PyTorch -------------------------------------------------------------------

def cublas():
    """(name, mm) where mm(A, B, trans_a, trans_b) on numba device arrays returns (run, to_host, sync);
    None when neither CuPy nor PyTorch can use the GPU (always None under the simulator)."""
    from numba.core import config
    if config.ENABLE_CUDASIM:
        return None
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            def mm(A, B, ta, tb):
                a, b = cupy.asarray(A), cupy.asarray(B)          # zero-copy (__cuda_array_interface__)
                a = a.T if ta else a
                b = b.T if tb else b
                return lambda: cupy.matmul(a, b), lambda r: cupy.asnumpy(r), cupy.cuda.Device().synchronize
            return "cuBLAS (CuPy)", mm
    except Exception:  # noqa: BLE001 - CuPy missing or unusable: try torch
        pass
    try:
        import torch
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            def mm(A, B, ta, tb):
                a, b = torch.as_tensor(A, device="cuda"), torch.as_tensor(B, device="cuda")
                a = a.T if ta else a
                b = b.T if tb else b
                return lambda: torch.matmul(a, b), lambda r: r.cpu().numpy(), torch.cuda.synchronize
            return "cuBLAS (torch)", mm
    except Exception:  # noqa: BLE001
        pass
    return None


def timed(fn, sync, reps):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def rel_err(C, truth) -> float:
    return float(np.abs(C - truth).max() / max(1e-30, float(np.abs(truth).max())))


class Shape:
    """One product: C (M, N) = op(A) op(B), op(A) (M, K); ta/tb: A stored (K, M) / B stored (N, K)."""

    def __init__(self, label, M, K, N, ta=False, tb=False):
        self.label, self.M, self.K, self.N, self.ta, self.tb = label, M, K, N, ta, tb

    def operands(self, rng):
        A = rng.standard_normal((self.K, self.M) if self.ta else (self.M, self.K), dtype=np.float32)
        B = rng.standard_normal((self.N, self.K) if self.tb else (self.K, self.N), dtype=np.float32)
        return A, B

    def reference(self, ref, A, B, dA, dB, reps):
        """(truth in float64 on the host, cuBLAS GFLOP/s or None)."""
        flops = 2.0 * self.M * self.N * self.K
        if ref is None:
            return (A.T if self.ta else A).astype(np.float64) @ (B.T if self.tb else B), None
        run, to_host, sync = ref[1](dA, dB, self.ta, self.tb)
        truth = to_host(run()).astype(np.float64)
        return truth, flops / timed(run, sync, reps) / 1e9


def _validated_time(label, launch, C, truth, flops, reps, ref_gflops, failures):
    """Launch once, compare with the truth; time only what agrees. One result row (a dict)."""
    from numba import cuda
    launch()
    err = rel_err(C.copy_to_host(), truth)
    row = {"kernel": label, "rel_error": err, "gflops": None, "cublas_gflops": ref_gflops, "of_cublas": None}
    if not err <= TOL:
        failures.append(f"{label}: relative error {err:.1e}")
        row["status"] = "FAILED validation"
        return row
    g = flops / timed(launch, cuda.synchronize, reps) / 1e9
    row.update(status="ok", gflops=g, of_cublas=g / ref_gflops if ref_gflops else None)
    return row


def ladder_variants(smoke):
    """(label, variant number, tile overrides): the GPU's tiles, or small odd ones for --smoke."""
    from minivae.kernels import cuda_gemm
    if smoke:
        small = {1: {"T": 4}, 2: {"T": 5}, 3: {"BM": 6, "BN": 8, "BK": 3, "TM": 2, "TN": 4},
                 4: {"BM": 6, "BN": 8, "BK": 4, "TM": 3, "TN": 2},
                 5: {"BM": 16, "BN": 32, "BK": 4, "WM": 16, "WN": 16, "WNITER": 2, "TM": 2, "TN": 2}}
    else:
        small = {n: {} for n in cuda_gemm.VARIANTS}
    return [(f"{n}: {v.name}", n, small[n]) for n, v in cuda_gemm.VARIANTS.items()]


def gemm_rows(shapes, reps, smoke, ref):
    """Validate, then time, the ladder (NN form) and the backend's GEMMs (the shape's transposes) at
    every shape. Returns (rows, failures)."""
    from numba import cuda
    from minivae.kernels import cuda_gemm
    backend_variants = [("backend 1: tile 16", CudaConfig(gemm=1, tile=16)),
                        ("backend 2: tile 16, reg 4", CudaConfig(gemm=2, tile=16, reg=4)),
                        ("backend 2: tile 16, reg 8", CudaConfig(gemm=2, tile=16, reg=8))]
    if smoke:
        backend_variants = [("backend 1: tile 3", CudaConfig(gemm=1, tile=3)),
                            ("backend 2: tile 3, reg 2", CudaConfig(gemm=2, tile=3, reg=2))]
    spec = ModelSpec(784, 20)
    rng = np.random.default_rng(0)
    rows, failures = [], []
    for sh in shapes:
        flops = 2.0 * sh.M * sh.N * sh.K
        C = cuda.device_array((sh.M, sh.N), np.float32)
        # the ladder: plain A (M, K) @ B (K, N)
        nn = Shape(sh.label, sh.M, sh.K, sh.N)
        A, B = nn.operands(rng)
        dA, dB = cuda.to_device(A), cuda.to_device(B)
        truth, ref_g = nn.reference(ref, A, B, dA, dB, reps)
        for label, number, tiles in ladder_variants(smoke):
            row = _validated_time(label, lambda: cuda_gemm.gemm(number, dA, dB, C, **tiles), C, truth, flops,
                                  reps, ref_g, failures)
            rows.append(dict(row, case=sh.label, shape=f"{sh.M}x{sh.K}x{sh.N}", form="nn"))
        # the backend's kernels, in the form the training step uses
        if sh.ta or sh.tb:
            A, B = sh.operands(rng)
            dA, dB = cuda.to_device(A), cuda.to_device(B)
            truth, ref_g = sh.reference(ref, A, B, dA, dB, reps)
        form = ("t" if sh.ta else "n") + ("t" if sh.tb else "n")
        for label, cfg in backend_variants:
            be = CudaBackend(spec, np.float32, cfg)
            row = _validated_time(label, lambda: be.gemm(dA, dB, C, trans_a=sh.ta, trans_b=sh.tb), C, truth,
                                  flops, reps, ref_g, failures)
            rows.append(dict(row, case=sh.label, shape=f"{sh.M}x{sh.K}x{sh.N}", form=form))
    return rows, failures


def model_shapes(batches):
    """Every distinct (M, K, N, transposes) of a 784-400-20 training step at each batch size."""
    out, seen = [], set()
    for b in batches:
        for name, M, K, N, kind in model_gemms(n=b):
            key = (M, K, N, kind)
            if key in seen:
                continue
            seen.add(key)
            out.append(Shape(f"{name}, batch {b}", M, K, N, ta=kind == "tn", tb=kind == "nt"))
    return out


# -- training throughput -------------------------------------------------------------------------------

def ours(X, batch, steps, hidden, z_dim):
    """Examples/s of the device-resident step over ``steps`` timed steps, its launches per step, the loss."""
    from numba import cuda
    model = VAE(X.shape[1], z_dim, hidden=hidden, backend="cuda", seed=0)
    opt = make_optimizer("adam", model.params.size, "float32", lr=1e-3)
    trainer = model.backend.make_trainer(model.params, opt, None, "elbo", 0.0, seed=0, loss_every=10 ** 9)
    trainer.attach_data(X)
    rng = np.random.default_rng(0)
    per_epoch = max(1, len(X) // batch)

    def batches(count):
        done = 0
        while done < count:
            perm = rng.permutation(len(X))
            for s in range(min(per_epoch, count - done)):
                yield perm[s * batch:(s + 1) * batch]
            done += min(per_epoch, count - done)
    for idx in batches(3):                              # warm-up: JIT compilation of every kernel
        trainer.step_indices(idx, 1.0)
    cuda.synchronize()
    t = time.perf_counter()
    for idx in batches(steps):
        trainer.step_indices(idx, 1.0)
    loss = trainer.flush_loss()                          # one copy back, and a synchronization
    sec = time.perf_counter() - t
    return steps * batch / sec, trainer.launches_per_step, loss


def torch_eager(X, batch, steps, hidden, z_dim):
    """The same model in PyTorch eager on the GPU: Linear layers, relu, BCE-with-logits + KL, Adam."""
    import torch
    nn = torch.nn
    torch.manual_seed(0)
    dims = [X.shape[1], *hidden]
    enc = nn.Sequential(*[m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), nn.ReLU())],
                        nn.Linear(dims[-1], 2 * z_dim)).cuda()
    ddims = [z_dim, *hidden[::-1]]
    dec = nn.Sequential(*[m for a, b in zip(ddims[:-1], ddims[1:]) for m in (nn.Linear(a, b), nn.ReLU())],
                        nn.Linear(ddims[-1], X.shape[1])).cuda()
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    Xd = torch.as_tensor(X, device="cuda")
    per_epoch = max(1, len(X) // batch)

    def step(idx):
        x = Xd[idx]
        mu, logvar = enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        bce = nn.functional.binary_cross_entropy_with_logits(dec(z), x, reduction="sum")
        kl = 0.5 * torch.sum(mu * mu + torch.expm1(logvar) - logvar)
        loss = (bce + kl) / x.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def run(count):
        done, loss = 0, None
        while done < count:
            perm = torch.randperm(len(X), device="cuda")
            for s in range(min(per_epoch, count - done)):
                loss = step(perm[s * batch:(s + 1) * batch])
            done += min(per_epoch, count - done)
        return loss

    run(3)
    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = float(run(steps))
    sec = time.perf_counter() - t
    return steps * batch / sec, loss



S2 = dict(z_dim=(100, 50), hidden=((200, 200), (100, 100)))


def s2_model(X, batch, steps):
    """The two-stochastic-layer model on the cuda backend, if this minivae builds it: (examples/s, note)."""
    try:
        VAE(X.shape[1], **S2, backend="numpy", seed=0)
    except Exception as e:  # noqa: BLE001 - not implemented yet: a note, not a failure
        return None, f"skipped: VAE(z_dim=(100, 50), ...) is not available here ({type(e).__name__}: {e})"
    try:
        from numba import cuda
        model = VAE(X.shape[1], **S2, backend="cuda", seed=0)
        opt = make_optimizer("adam", model.params.size, "float32", lr=1e-3, backend=model.backend)
        rng = np.random.default_rng(0)
        xb = [np.ascontiguousarray(X[rng.integers(0, len(X), batch)]) for _ in range(4)]
        for i in range(2):
            model.loss_and_grad(xb[i])
        cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            loss, grad = model.loss_and_grad(xb[i % 4])
            opt.step(model.params, grad)
        return steps * batch / (time.perf_counter() - t), "model.loss_and_grad + Adam on the host params"
    except Exception as e:  # noqa: BLE001
        return None, f"skipped: the S = 2 model does not run on the cuda backend ({type(e).__name__}: {e})"


def _ptxas():
    import shutil
    found = shutil.which("ptxas")
    if found:
        return found
    try:
        import nvidia.cuda_nvcc as nvcc
        p = Path(list(nvcc.__path__)[0]) / "bin" / "ptxas"
        return str(p) if p.exists() else None
    except ImportError:
        return None


def _ptxas_report(ptxas, fn, sig, cc, label):
    """Compile ``fn`` for ``sig`` to PTX for sm_<cc> and read ptxas -v: registers, smem, stack, spills."""
    import re
    import subprocess
    import tempfile
    from numba import cuda
    ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(src), "-o", str(src) + ".cubin"],
                           capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"gpu.py: ptxas failed on {label}: {r.stderr.strip().splitlines()[-1]}")

    def grab(pattern):
        m = re.search(pattern, r.stderr)
        return int(m.group(1)) if m else 0
    return {"registers": grab(r"Used (\d+) registers"), "smem": grab(r"(\d+) bytes smem"),
            "stack": grab(r"(\d+) bytes stack frame"), "spills": grab(r"(\d+) bytes spill stores")}


def _resident(threads, regs):
    """Blocks an sm_90 SM holds, limited by threads and registers."""
    return min(32, 2048 // threads, 65536 // max(1, regs * threads))


def resources(cc=(9, 0)):
    """ptxas -v for every kernel of a training step (ELBO and IWAE, fused and not) and of the GEMM
    ladder at its default tiles; no GPU needed."""
    from numba import cuda
    from numba.cuda import dispatcher
    ptxas = _ptxas()
    if ptxas is None:
        raise SystemExit("gpu.py --resources needs ptxas: install the CUDA toolkit or "
                         "pip install nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12")
    if not cuda.is_available():
        class Device:                       # device functions are compiled for this target
            compute_capability = cc
        if not hasattr(dispatcher, "get_current_device"):
            raise SystemExit("gpu.py --resources: this numba.cuda finds the device elsewhere; run it on a GPU")
        dispatcher.get_current_device = lambda: Device
    spec = ModelSpec(784, 20, hidden=(400,))
    rng = np.random.default_rng(0)
    seen, rows = set(), []
    for cfg in (CudaConfig(gemm=2, tile=16, reg=4), CudaConfig(gemm=2, tile=16, reg=8),
                CudaConfig(gemm=1, tile=16, fuse=False)):
        be = recording_backend(spec, np.float32, cfg)
        params = spec.layout.init(rng, np.float32)
        x = rng.random((128, 784), dtype=np.float32)
        eps = rng.standard_normal((2, 128, 20), dtype=np.float32)
        be.loss_and_grad(params, x, eps[:1])
        be.loss_and_grad(params, x, eps, objective="iwae")
        trainer = be.make_trainer(params, make_optimizer("adam", params.size, "float32"))
        trainer.attach_data(x)
        trainer.step_indices(np.arange(128), 1.0)
        for (kernel, sig), (grid, block) in be.recorded.items():
            fn = kernel.py_func
            consts = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
            label = fn.__name__
            if "TA" in consts:
                label += f" T={consts['T']}" + (f" R={consts['R']}" if "R" in consts else "")
                label += " op(A)=A^T" if consts["TA"] else ""
                label += " op(B)=B^T" if consts["TB"] else ""
                label += " +ones" if consts["ONES"] else ""
            if label in seen:
                continue
            seen.add(label)
            info = _ptxas_report(ptxas, fn, sig, cc, label)
            threads = int(np.prod(block))
            rows.append((label, threads, info["registers"], info["smem"], info["stack"], info["spills"],
                         _resident(threads, info["registers"])))
    from numba.core import types as nbtypes
    from minivae.kernels import cuda_gemm
    arr = nbtypes.Array(nbtypes.float32, 2, "C")
    for number, v in cuda_gemm.VARIANTS.items():
        kernel, _, block = cuda_gemm.kernel_and_launch(number, "float32", 4096, 4096)
        label = f"ladder {number}: {v.name} " + " ".join(f"{k}={x}" for k, x in v.params)
        info = _ptxas_report(ptxas, kernel.py_func, (arr, arr, arr), cc, label)
        threads = int(np.prod(block))
        rows.append((label, threads, info["registers"], info["smem"], info["stack"], info["spills"],
                     _resident(threads, info["registers"])))
    print(f"## Kernel resources, float32, sm_{cc[0]}{cc[1]} (ptxas -v; no GPU needed)\n")
    print(table(["kernel", "threads/block", "registers/thread", "shared memory (B)", "stack (B)",
                 "spill stores (B)", "resident blocks/SM (regs, threads)"], rows))


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def _f(v, fmt=None):
    if v is None:
        return "n/a"
    return (fmt or ("{:,.0f}" if abs(v) >= 100 else "{:.3g}")).format(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/mnist")
    ap.add_argument("--batch-sizes", default="128,1024", help="training batch sizes (comma-separated)")
    ap.add_argument("--steps", type=int, default=300, help="timed training steps per batch size")
    ap.add_argument("--reps", type=int, default=20, help="launches per GEMM timing")
    ap.add_argument("--skip-torch", action="store_true", help="no PyTorch comparison")
    ap.add_argument("--quick", action="store_true",
                    help="4096^3, the model's shapes at batch 128, 100 steps, 5 reps (about 2 minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (allowed on the CUDA simulator)")
    ap.add_argument("--json", type=Path, metavar="FILE", default=None, help="write every number there")
    ap.add_argument("--resources", action="store_true",
                    help="no GPU needed: registers and shared memory of every kernel, from ptxas")
    args = ap.parse_args(argv)
    if args.resources:
        return resources()
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in batches) or args.steps < 1 or args.reps < 1:
        ap.error("--batch-sizes, --steps and --reps must be positive")
    if args.json is not None and not args.json.resolve().parent.is_dir():
        ap.error(f"--json {args.json}: the folder does not exist")

    from numba.core import config
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"benchmarks/gpu.py needs an NVIDIA GPU: {reason}")
    if config.ENABLE_CUDASIM and not args.smoke:
        raise SystemExit("benchmarks/gpu.py: NUMBA_ENABLE_CUDASIM=1 is the simulator, not a GPU (use --smoke to check the script)")

    if args.smoke:
        hidden, z_dim = (6,), 3
        X = np.random.default_rng(0).random((24, 784), dtype=np.float32)[:, :9]
        source = "random pixels (smoke)"
        shapes = [Shape("odd", 7, 5, 8), Shape("dW = x^T dY", 6, 4, 5, ta=True), Shape("dX = dY W^T", 5, 6, 4, tb=True)]
        batches, args.reps, args.steps = [4], 1, 2
    else:
        hidden, z_dim = (400,), 20
        X, source = load_images(args.data_dir, 10000)
        if args.quick:
            batches, args.reps, args.steps = batches[:1], min(args.reps, 5), min(args.steps, 100)
        shapes = [Shape("square 4096^3", 4096, 4096, 4096)] + model_shapes(batches)

    from numba import cuda
    dev = "CUDA simulator" if config.ENABLE_CUDASIM else cuda.get_current_device().name
    dev = dev.decode() if isinstance(dev, bytes) else dev
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result = {"device": dev, "date": date, "command": "python benchmarks/gpu.py " + " ".join(argv or sys.argv[1:])}
    print(f"# minivae GPU benchmarks on {dev}, {date}\n")
    t0 = time.perf_counter()
    ref = cublas()
    ref_name = ref[0] if ref else "none (install cupy or torch); validated against NumPy"
    rows, failures = gemm_rows(shapes, args.reps, args.smoke, ref)
    result.update(cublas=ref_name, gemm=rows)
    print(f"## GEMM, float32 (GFLOP/s; reference: {ref_name}; validated to {TOL:g} before timing)\n")
    print(table(["case", "MxKxN", "form", "kernel", "GFLOP/s", "cuBLAS GFLOP/s", "of cuBLAS", "rel. error"],
                [(r["case"], r["shape"], r["form"], r["kernel"], _f(r["gflops"]) if r["status"] == "ok" else r["status"],
                  _f(r["cublas_gflops"]), _f(r["of_cublas"], "{:.0%}"), f"{r['rel_error']:.1e}") for r in rows]))
    print(f"\n(GEMM part: {time.perf_counter() - t0:.0f} s)")

    have_torch = False
    if not args.skip_torch and not config.ENABLE_CUDASIM:
        try:
            import torch
            have_torch = torch.cuda.is_available()
        except ImportError:
            pass
    train = []
    for b in batches:
        ex, launches, loss = ours(X, b, args.steps, hidden, z_dim)
        tex = torch_eager(X, b, args.steps, hidden, z_dim)[0] if have_torch else None
        train.append({"batch": b, "minivae_examples_s": ex, "launches_per_step": launches, "loss": loss,
                      "torch_examples_s": tex, "ratio": ex / tex if tex else None})
    arch = "-".join(map(str, [X.shape[1], *hidden, z_dim]))
    result["training"] = {"model": arch, "data": source, "steps": args.steps, "rows": train}
    print(f"\n## Training throughput, {arch} Bernoulli VAE, Adam, {args.steps} steps, data: {source}\n")
    print(table(["batch", "minivae cuda (examples/s)", "launches/step", "PyTorch eager (examples/s)", "ratio"],
                [(r["batch"], _f(r["minivae_examples_s"]), r["launches_per_step"], _f(r["torch_examples_s"]),
                  _f(r["ratio"], "{:.2f}x")) for r in train]))
    if not have_torch:
        print("\n(PyTorch CUDA not available: pip install torch with CUDA for the comparison)")

    if args.smoke:
        result["s2"] = {"examples_s": None, "note": "skipped in --smoke"}
    else:
        ex, note = s2_model(X, 128, min(args.steps, 50))
        result["s2"] = {"batch": 128, "examples_s": ex, "note": note}
        print(f"\n## S = 2 model (z_dim (100, 50), hidden ((200, 200), (100, 100))), batch 128: "
              f"{_f(ex)} examples/s ({note})")
    result["seconds"] = time.perf_counter() - t0
    result["failures"] = failures
    if args.json is not None:
        from minivae.checkpoint import atomic_write
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=1, default=float).encode()))
        print(f"\nwrote {args.json}")
    print(f"\ntotal: {result['seconds']:.0f} s")
    if failures:
        raise SystemExit("benchmarks/gpu.py: validation failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
