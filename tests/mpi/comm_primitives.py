"""Launched by tests/test_mpi.py as ``mpiexec -n P python tests/mpi/comm_primitives.py`` (P >= 2).

Checks minivae.distributed.MPIComm's collectives against the values worked out by hand. A failed
check is recorded, not raised: every rank must go on calling the same collectives in the same order,
or the other ranks would wait forever. Each rank prints one JSON line, {"rank", "size", "failures"},
and exits with 1 when it has any failure.
"""
import json
import sys

import numpy as np

from minivae.distributed import MESSAGE_BYTES, MPIComm

comm = MPIComm()
r, P = comm.rank, comm.size
failures = []


def check(ok, what):
    if not ok:
        failures.append(what)


def close(a, b, what, rtol=1e-15):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    check(a.shape == b.shape and np.allclose(a, b, rtol=rtol, atol=0), f"{what}: got {a.tolist()}, expected {b.tolist()}")


check(P >= 2, f"launched with {P} process(es); these checks need at least 2")
check(comm.is_root == (r == 0), f"is_root is {comm.is_root} on rank {r}")

# -- allreduce_mean_ without weights: the plain mean, in place, dtype kept
base = np.arange(6, dtype=np.float64)
for dtype in (np.float64, np.float32):
    arr = (base * (r + 1) + r).astype(dtype)
    out = comm.allreduce_mean_(arr)
    expected = sum(base * (q + 1) + q for q in range(P)) / P
    check(out is arr, f"allreduce_mean_ ({np.dtype(dtype).name}) did not return its argument")
    check(arr.dtype == dtype, f"allreduce_mean_ changed the dtype to {arr.dtype}")
    close(arr, expected, f"allreduce_mean_ ({np.dtype(dtype).name})", rtol=1e-15 if dtype == np.float64 else 1e-6)

# -- allreduce_mean_ with unequal weights: each rank holds the mean of w_r rows; the result is the
#    mean over all sum_r w_r rows. Rank r holds w_r = 2r + 3 rows with the values r*10 + j.
rows = [np.arange(3 * (2 * q + 3), dtype=np.float64).reshape(2 * q + 3, 3) + 10 * q for q in range(P)]
arr = rows[r].mean(axis=0)
comm.allreduce_mean_(arr, weight=len(rows[r]))
close(arr, np.concatenate(rows).mean(axis=0), "weighted allreduce_mean_", rtol=1e-14)

# a rank with an empty share (weight 0, zero gradient) does not count
arr = np.zeros(3) if r == 0 else rows[r].mean(axis=0)
comm.allreduce_mean_(arr, weight=0 if r == 0 else len(rows[r]))
close(arr, np.concatenate(rows[1:]).mean(axis=0), "allreduce_mean_ with one weight 0", rtol=1e-14)

# -- allreduce_sum: a new float64 array, the argument untouched, any numeric input
mine = np.array([r, 1, 2.5 * r], dtype=np.float32)
before = mine.copy()
total = comm.allreduce_sum(mine)
check(total is not mine and total.dtype == np.float64, f"allreduce_sum returned {type(total)} {total.dtype}")
check(np.array_equal(mine, before), "allreduce_sum changed its argument")
close(total, [sum(range(P)), P, 2.5 * sum(range(P))], "allreduce_sum")
close(comm.allreduce_sum([r, True]), [sum(range(P)), P], "allreduce_sum of a list")
close(comm.allreduce_sum(np.arange(4, dtype=np.int64)[::2] * (r + 1)),
      [0, 2 * sum(q + 1 for q in range(P))], "allreduce_sum of a strided int array")

# -- all_ok: agreement on failure
check(comm.all_ok(True, None) == (True, None), "all_ok when every rank is ok")
got = comm.all_ok(r != 1, "rank one cannot read /data/x.idx" if r == 1 else None)
check(got == (False, "rank 1: rank one cannot read /data/x.idx"), f"all_ok with rank 1 failing: {got!r}")
got = comm.all_ok(False, f"broken on {r}")                    # every rank fails: the lowest one speaks
check(got == (False, "rank 0: broken on 0"), f"all_ok with every rank failing: {got!r}")
got = comm.all_ok(r != P - 1, None)                           # no message: still named
check(got == (False, f"rank {P - 1}: failed"), f"all_ok without a message: {got!r}")
long = "é" * MESSAGE_BYTES                                    # 2 bytes each: cut mid-character
got = comm.all_ok(r != 1, long if r == 1 else None)
check(got[0] is False and got[1].startswith("rank 1: éé") and len(got[1].encode()) <= MESSAGE_BYTES + 16,
      f"all_ok with a message longer than {MESSAGE_BYTES} bytes: {got[1][:40]!r}...")
check(comm.all_ok(True, None) == (True, None), "all_ok after failures")

# -- local_rank: every rank of this test runs on one machine
check(comm.local_rank() == (r, P), f"local_rank on one node: {comm.local_rank()!r}")

comm.barrier()
print(json.dumps({"rank": r, "size": P, "failures": failures}), flush=True)
sys.exit(1 if failures else 0)
