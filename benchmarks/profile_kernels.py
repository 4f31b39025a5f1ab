"""Where the CPU time of a training step goes, kernel by kernel: perf's samples with Numba's functions named.

perf shows a Numba kernel as anonymous JIT code ("[JIT] tid ..."). This script runs the step of the paper's
two-layer IWAE (the one `benchmarks/iwae_paper.py --speed` times: numba backend, the trainer `minivae train`
runs) in a child process that compiles its kernels afresh (NUMBA_CACHE_DIR is a new temporary folder: code
loaded from Numba's cache keeps no LLVM module, hence no function names; the compile takes a minute or
two), writes perf's map of JIT code, /tmp/perf-<pid>.map (start, size, name of every compiled function),
and then keeps stepping while this process records it with ``perf record -p`` for --seconds. It prints the
share of the samples per function, both threads of a split step together (kernels/batchsplit.py).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/profile_kernels.py [--batch 128] [--k 5]
                                                                               [--threads 2] [--seconds 10]

Needs the ``perf`` tool (linux-tools) and permission to record another process of the same user
(kernel.perf_event_paranoid <= 2). A function compiled into several callers appears once per copy; the table
adds the copies up under one name. perf samples a software clock where the machine has no PMU (a VM).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def _qualname(symbol: str) -> str:
    """minivae.kernels.gemm.tiles_serial_ from Numba's Itanium-style mangled name (the identifiers only)."""
    m = re.match(r"_ZN(\d.*)", symbol)
    if not m:
        return symbol
    s, i, parts = m.group(1), 0, []
    while i < len(s) and s[i].isdigit():
        j = i
        while s[j].isdigit():
            j += 1
        n = int(s[i:j])
        parts.append(s[j:j + n])
        i = j + n
    return ".".join(p.replace("_3clocals_3e", "<locals>") for p in parts)


def write_perf_map(path) -> int:
    """perf's JIT map for every function Numba compiled in this process; returns how many."""
    from numba.core.registry import CPUDispatcher
    import gc
    entries = {}
    for d in (o for o in gc.get_objects() if isinstance(o, CPUDispatcher)):
        for cres in list(d.overloads.values()):
            lib = cres.library
            for fn in lib._final_module.functions:          # empty for code loaded from the cache
                if fn.is_declaration:
                    continue
                addr = lib.get_pointer_to_function(fn.name)
                if addr:
                    entries[addr] = _qualname(fn.name)
    addrs = sorted(entries)
    with open(path, "w") as f:
        for a, b in zip(addrs, addrs[1:] + addrs[-1:]):
            size = b - a if b > a else 1 << 16           # the last one: up to 64 KiB
            f.write(f"{a:x} {min(size, 1 << 20):x} {entries[a]}\n")
    return len(addrs)


def child(args):
    from iwae_paper import ADAM, MODELS, minivae_model, minivae_stepper
    import torch_iwae
    from minivae.optim import make_optimizer
    from minivae.threads import limit_threads
    x, eps = torch_iwae.speed_batch(args.batch, args.k, MODELS["iwae2"][0])
    model = minivae_model("iwae2", 0, "numba")
    opt = make_optimizer("adam", model.params.size, "float32", backend=model.backend, lr=1e-4, **ADAM)
    step = minivae_stepper(model, opt, "iwae", args.estimator)       # what --speed times
    with limit_threads(args.threads):
        for _ in range(5):
            step(x, eps)
        n = write_perf_map(f"/tmp/perf-{os.getpid()}.map")
        print(f"READY {n}", flush=True)
        steps, t = 0, time.perf_counter()
        end = t + args.seconds + 60
        while time.perf_counter() < end:
            step(x, eps)
            steps += 1
        print(f"{(time.perf_counter() - t) / steps * 1e3:.2f}", flush=True)


def parse_report(text):
    """[(share %, name)] from ``perf report --sort sym --stdio``, the copies of a name added up."""
    shares = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+\[(.)\]\s+(.+?)\s*$", line)
        if m:
            name = m.group(3)
            shares[name] = shares.get(name, 0.0) + float(m.group(1))
    return sorted(((v, k) for k, v in shares.items()), reverse=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--estimator", default="reparam", choices=("reparam", "dreg"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if shutil.which("perf") is None:
        raise SystemExit("profile_kernels: needs the perf tool on PATH (linux-tools)")
    with tempfile.TemporaryDirectory(prefix="minivae-profile-") as tmp:
        env = dict(os.environ, NUMBA_CACHE_DIR=tmp)
        cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--k", str(args.k),
               "--threads", str(args.threads), "--estimator", args.estimator, "--seconds", str(args.seconds)]
        print(f"# compiling the kernels afresh in {tmp} (a minute or two) ...", file=sys.stderr, flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        try:
            line = proc.stdout.readline()
            if not line.startswith("READY"):
                raise SystemExit(f"profile_kernels: the child stopped before its first steps ({proc.wait()})")
            data = os.path.join(tmp, "perf.data")
            rec = subprocess.run(["perf", "record", "-q", "-p", str(proc.pid), "-o", data, "--", "sleep",
                                  str(args.seconds)], capture_output=True, text=True)
            if rec.returncode != 0 or not os.path.exists(data):
                msg = (rec.stderr.strip().splitlines() or ["no output"])[0]
                raise SystemExit(f"profile_kernels: perf record failed: {msg}")
            rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym", "--stdio"],
                                 capture_output=True, text=True)
        finally:
            proc.kill()
            proc.wait()
            Path(f"/tmp/perf-{proc.pid}.map").unlink(missing_ok=True)
    from common import machine, table
    rows = parse_report(rep.stdout)
    print(f"# {machine()}")
    print(f"# two-layer IWAE step (784-200-200-100 / 100-100-100-50 tanh, k={args.k}, batch {args.batch}, "
          f"estimator {args.estimator}, float32, numba, {args.threads} threads, Adam); perf samples over "
          f"{args.seconds:g} s, all threads; {line.split()[1]} compiled functions named")
    print(table([[f"{v:.2f}", k] for v, k in rows[:args.top]], ["% of samples", "function"]))
    print(f"# the rest: {sum(v for v, _ in rows[args.top:]):.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
