"""GPU benchmarks of the numba.cuda backend: GEMM GFLOP/s against cuBLAS, training throughput against
PyTorch CUDA eager (docs/math.md §9). Needs an NVIDIA GPU; prints markdown tables.

    python benchmarks/gpu.py [--data-dir ../shared/data/mnist] [--batch-sizes 128,4096] [--reps 20]

GEMM: C = op(A) op(B) in float32 at 4096^3 and at the shapes of one training step of the MNIST model
(784-400-20, batch 128 and the large batch), for both kernels (1: shared-memory tile, 2: register
tiling), each checked against cuBLAS before it is timed. cuBLAS comes from CuPy or PyTorch,
whichever is installed (TF32 off: a true FP32 comparison).
Training: examples/s of the device-resident step (dataset on the device, eps drawn there, Adam) against
the same model in PyTorch eager on the same GPU (data on the device, torch.randn eps, Adam), after a
warm-up that includes the JIT compilation. Goals (issue 5): our GEMM >= 50% of cuBLAS at 4096^3; an
epoch at batch 128 no slower than PyTorch eager.

Without a GPU it exits with a one-line message. ``--smoke`` runs tiny shapes, and is allowed under the
CUDA simulator (NUMBA_ENABLE_CUDASIM=1), to check the script itself.

``--resources`` needs no GPU: it records every launch of a training step of the MNIST model (host code
on host memory, kernels not run: minivae.kernels.cuda.recording_backend), compiles each kernel to PTX
for sm_90 and prints what ptxas reports (registers per thread, shared memory, stack/spills). It needs
NVVM, NVRTC and ptxas, e.g. ``pip install numba-cuda nvidia-cuda-nvcc-cu12 nvidia-cuda-nvrtc-cu12``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivae import VAE  # noqa: E402
from minivae.kernels.cuda import CudaBackend, CudaConfig, recording_backend, unavailable_reason  # noqa: E402
from minivae.model import ModelSpec  # noqa: E402
from minivae.optim import make_optimizer  # noqa: E402


def load_images(data_dir: Path, n_fallback: int):
    for suffix in (".gz", ""):
        p = data_dir / f"t10k-images-idx3-ubyte{suffix}"
        if p.exists():
            from minivae.data import read_idx
            return (read_idx(p).reshape(-1, 784) / 255.0).astype(np.float32), str(p)
    return np.random.default_rng(0).random((n_fallback, 784), dtype=np.float32), "random pixels (no MNIST found)"


# -- cuBLAS through CuPy or PyTorch -------------------------------------------------------------------

def cublas():
    """(name, matmul(A, B, trans_a, trans_b) on numba device arrays -> callable timing closure) or None."""
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


def gemm_rows(shapes, reps, smoke):
    from numba import cuda
    ref = cublas()
    variants = [("kernel 1: tile 16", CudaConfig(gemm=1, tile=16)),
                ("kernel 2: tile 16, reg 4", CudaConfig(gemm=2, tile=16, reg=4)),
                ("kernel 2: tile 16, reg 8", CudaConfig(gemm=2, tile=16, reg=8))]
    if smoke:
        variants = [("kernel 1: tile 3", CudaConfig(gemm=1, tile=3)),
                    ("kernel 2: tile 3, reg 2", CudaConfig(gemm=2, tile=3, reg=2))]
    spec = ModelSpec(784, 20)
    rows = []
    rng = np.random.default_rng(0)
    for label, M, N, K, ta, tb in shapes:
        A = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        B = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        dA, dB = cuda.to_device(A), cuda.to_device(B)
        C = cuda.device_array((M, N), np.float32)
        flops = 2.0 * M * N * K
        truth, ref_gflops = None, None
        if ref is not None:
            run, to_host, sync = ref[1](dA, dB, ta, tb)
            truth = to_host(run()).astype(np.float64)
            ref_gflops = flops / timed(run, sync, reps) / 1e9
        else:
            truth = (A.T if ta else A).astype(np.float64) @ (B.T if tb else B)
        for vlabel, cfg in variants:
            be = CudaBackend(spec, np.float32, cfg)
            be.gemm(dA, dB, C, trans_a=ta, trans_b=tb)
            err = float(np.abs(C.copy_to_host() - truth).max() / max(1e-30, np.abs(truth).max()))
            if err > 1e-4:
                raise SystemExit(f"gpu.py: {vlabel} disagrees with the reference at {label}: relative error {err:.1e}")
            sec = timed(lambda: be.gemm(dA, dB, C, trans_a=ta, trans_b=tb), cuda.synchronize, reps)
            g = flops / sec / 1e9
            rows.append((label, f"{M}x{N}x{K}", vlabel, f"{g:,.0f}",
                         f"{ref_gflops:,.0f}" if ref_gflops else "n/a",
                         f"{100 * g / ref_gflops:.0f}%" if ref_gflops else "n/a"))
    return rows, (ref[0] if ref else "cuBLAS: n/a (install cupy or torch)")


# -- training throughput -------------------------------------------------------------------------------

def ours(X, batch, epochs, hidden, z_dim):
    """Examples/s of the device-resident step, and its launch count."""
    from numba import cuda
    model = VAE(X.shape[1], z_dim, hidden=hidden, backend="cuda", seed=0)
    opt = make_optimizer("adam", model.params.size, "float32", lr=1e-3)
    trainer = model.backend.make_trainer(model.params, opt, None, "elbo", 0.0, seed=0, loss_every=10 ** 9)
    trainer.attach_data(X)
    rng = np.random.default_rng(0)
    steps = len(X) // batch
    perm = rng.permutation(len(X))
    for s in range(min(3, steps)):                       # warm-up: JIT compilation of every kernel
        trainer.step_indices(perm[s * batch:(s + 1) * batch], 1.0)
    cuda.synchronize()
    t = time.perf_counter()
    for _ in range(epochs):
        perm = rng.permutation(len(X))
        for s in range(steps):
            trainer.step_indices(perm[s * batch:(s + 1) * batch], 1.0)
    loss = trainer.flush_loss()                          # one copy back, and a synchronization
    sec = time.perf_counter() - t
    return epochs * steps * batch / sec, trainer.launches_per_step, loss


def torch_eager(X, batch, epochs, hidden, z_dim):
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
    steps = len(X) // batch

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

    perm = torch.randperm(len(X), device="cuda")
    for s in range(min(3, steps)):
        step(perm[s * batch:(s + 1) * batch])
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(X), device="cuda")
        for s in range(steps):
            loss = step(perm[s * batch:(s + 1) * batch])
    loss = float(loss)
    sec = time.perf_counter() - t
    return epochs * steps * batch / sec, loss


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


def resources(cc=(9, 0)):
    """ptxas -v for every kernel of a training step (ELBO and IWAE, fused and not), no GPU needed."""
    import re
    import subprocess
    import tempfile
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
            ptx, _ = cuda.compile_ptx(fn, sig, cc=cc)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "k.ptx"
                src.write_text(ptx)
                r = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", str(src), "-o", str(src) + ".cubin"],
                                   capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"gpu.py: ptxas failed on {label}: {r.stderr.strip().splitlines()[-1]}")
            info = r.stderr

            def grab(pattern):
                m = re.search(pattern, info)
                return int(m.group(1)) if m else 0
            threads = int(np.prod(block))
            regs = grab(r"Used (\d+) registers")
            rows.append((label, threads, regs, grab(r"(\d+) bytes smem"), grab(r"(\d+) bytes stack frame"),
                         grab(r"(\d+) bytes spill stores"),
                         min(32, 2048 // threads, 65536 // max(1, regs * threads))))   # sm_90 limits
    print(f"## Kernel resources, float32, sm_{cc[0]}{cc[1]} (ptxas -v; no GPU needed)\n")
    print(table(["kernel", "threads/block", "registers/thread", "shared memory (B)", "stack (B)",
                 "spill stores (B)", "resident blocks/SM (regs, threads)"], rows))


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/mnist")
    ap.add_argument("--batch-sizes", default="128,4096", help="training batch sizes (comma-separated)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs over the t10k images per batch size")
    ap.add_argument("--reps", type=int, default=20, help="repetitions per GEMM timing")
    ap.add_argument("--skip-torch", action="store_true", help="no PyTorch comparison")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (allowed on the CUDA simulator)")
    ap.add_argument("--resources", action="store_true",
                    help="no GPU needed: registers and shared memory of every kernel, from ptxas")
    args = ap.parse_args(argv)
    if args.resources:
        return resources()
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in batches) or args.epochs < 1 or args.reps < 1:
        ap.error("--batch-sizes, --epochs and --reps must be positive")

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
        shapes = [("square", 7, 8, 5, False, False), ("dW = x^T dY", 6, 5, 4, True, False)]
        batches = [4]
        args.reps = 1
    else:
        hidden, z_dim = (400,), 20
        X, source = load_images(args.data_dir, 10000)
        shapes = [("square 4096^3", 4096, 4096, 4096, False, False)]
        for b in batches:
            shapes += [(f"enc.0 forward, batch {b}", b, 400, 784, False, False),
                       (f"dec.head forward, batch {b}", b, 784, 400, False, False),
                       (f"dec.head dW = h^T dY, batch {b}", 400, 784, b, True, False),
                       (f"dec.head dX = dY W^T, batch {b}", b, 400, 784, False, True)]

    from numba import cuda
    dev = "CUDA simulator" if config.ENABLE_CUDASIM else cuda.get_current_device().name
    dev = dev.decode() if isinstance(dev, bytes) else dev
    print(f"# minivae GPU benchmarks on {dev}\n")
    rows, ref_name = gemm_rows(shapes, args.reps, args.smoke)
    print(f"## GEMM, float32 (GFLOP/s; reference: {ref_name})\n")
    print(table(["case", "MxNxK", "kernel", "GFLOP/s", "cuBLAS GFLOP/s", "of cuBLAS"], rows))

    have_torch = False
    if not args.skip_torch and not config.ENABLE_CUDASIM:
        try:
            import torch
            have_torch = torch.cuda.is_available()
        except ImportError:
            pass
    rows = []
    for b in batches:
        ex, launches, loss = ours(X, b, args.epochs, hidden, z_dim)
        row = [b, f"{ex:,.0f}", launches]
        if have_torch:
            tex, _ = torch_eager(X, b, args.epochs, hidden, z_dim)
            row += [f"{tex:,.0f}", f"{ex / tex:.2f}x"]
        else:
            row += ["n/a", "n/a"]
        rows.append(row)
    arch = "-".join(map(str, [X.shape[1], *hidden, z_dim]))
    print(f"\n## Training throughput, {arch} Bernoulli VAE, Adam, data: {source}\n")
    print(table(["batch", "minivae cuda (examples/s)", "launches/step", "PyTorch eager (examples/s)", "ratio"], rows))
    if not have_torch:
        print("\n(PyTorch CUDA not available: pip install torch with CUDA for the comparison)")


if __name__ == "__main__":
    main()
