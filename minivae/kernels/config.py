"""Settings of the Numba CPU backend (docs/math.md §9), read at call time, never baked into a kernel.

GEMM   "blas": np.dot(a, b, out) inside @njit on contiguous (or transposed, F-contiguous) views:
               SciPy's OpenBLAS through numba's cython_blas binding, no copies.
       "custom": the register-blocked kernels of kernels/gemm.py (an 8 x 2-zmm micro-kernel written
               as LLVM IR, operands read in place, parallel over MB x NB tiles of C).
       Default: "blas", the faster one on the benchmark machine (benchmarks/README.md);
       the environment variable MINIVAE_GEMM overrides it.
MB, NB Output tile of one parallel task of the custom GEMM (rows, columns; rounded up to whole 8 x 32
       (float32) or 8 x 16 (float64) micro-tiles). Runtime arguments of the kernels, so tests can set
       odd values (e.g. 3, 5) to hit every boundary guard.
"""
import os

GEMM = os.environ.get("MINIVAE_GEMM", "blas")
MB = 16
NB = 64
GEMMS = ("blas", "custom")


def gemm_code() -> int:
    """0 for BLAS, 1 for the custom kernel; a clear error for anything else."""
    if GEMM not in GEMMS:
        raise ValueError(f"minivae.kernels.config.GEMM must be one of {', '.join(GEMMS)}, got {GEMM!r}")
    return GEMMS.index(GEMM)


def tiles():
    for name, v in (("MB", MB), ("NB", NB)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"minivae.kernels.config.{name} must be a positive integer, got {v!r}")
    return MB, NB
