"""Settings of the Numba CPU backend (docs/math.md §9), read at call time, never baked into a kernel.

GEMM   "blas": np.dot(a, b, out) inside @njit on contiguous (or transposed, F-contiguous) views:
               SciPy's OpenBLAS through numba's cython_blas binding, no copies.
       "custom": the register-blocked kernels of kernels/gemm.py (an 8 x 3-zmm micro-kernel written
               as LLVM IR, operands read in place, parallel over MB x NB tiles of C; in the parts of
               an example split, kernels/batchsplit.py, one core each, task after task).
       "auto" (default): BLAS for a whole pass (OpenBLAS threads each product), the custom kernel
               inside the parts of an example split, where each part has one core and the custom
               kernel was the faster one (benchmarks/README.md, "Training speed, a process each").
       The environment variable MINIVAE_GEMM overrides the default.
MB, NB Output tile of one parallel task of the custom GEMM (rows, columns; rounded up to whole 8 x 48
       (float32) or 8 x 24 (float64) micro-tiles). Runtime arguments of the kernels, so tests can set
       odd values (e.g. 3, 5) to hit every boundary guard.
PART_MB, PART_NB  The same for the products inside a part of an example split, which run their tasks
       one after another on the part's core: by default a task is one column panel over all the rows,
       so that the panel of B stays in L1 while every row tile reads it (a two-layer IWAE step at batch
       128 took 0.981 and 0.989 of the time with 16 x 64, 100 rounds each way; benchmarks/README.md).
"""
import os

GEMM = os.environ.get("MINIVAE_GEMM", "auto")
MB = 16
NB = 64
PART_MB = 1 << 30       # every row
PART_NB = 1             # one panel
GEMMS = ("auto", "blas", "custom")

# The kernels' GEMM codes (kernels/cpu.py mm_nn, mm_nt, mm_tn)
BLAS, CUSTOM, CUSTOM_SERIAL = 0, 1, 2


def gemm_code(in_part=False) -> int:
    """The kernels' GEMM code for a whole pass, or (``in_part``) for one part of an example split, which
    has a core of its own: BLAS, CUSTOM (parallel tiles) or CUSTOM_SERIAL. A clear error for an
    unknown GEMM."""
    if GEMM not in GEMMS:
        raise ValueError(f"minivae.kernels.config.GEMM must be one of {', '.join(GEMMS)}, got {GEMM!r}")
    if GEMM == "blas":
        return BLAS
    if in_part:
        return CUSTOM_SERIAL
    return CUSTOM if GEMM == "custom" else BLAS


def tiles(in_part=False):
    """(MB, NB), or (PART_MB, PART_NB) for a part of an example split; a clear error for a bad value."""
    named = (("PART_MB", PART_MB), ("PART_NB", PART_NB)) if in_part else (("MB", MB), ("NB", NB))
    for name, v in named:
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"minivae.kernels.config.{name} must be a positive integer, got {v!r}")
    return named[0][1], named[1][1]
