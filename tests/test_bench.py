"""``minivae bench`` (minivae/bench.py): its kernels against NumPy, and the command's table, JSON and
roofline at tiny sizes. No timing is asserted: only the structure and that the numbers are sane."""
import json
import math

import numpy as np
import pytest

from minivae import bench
from minivae.cli import main

TINY = ["bench", "--x-dim", "9", "--z-dim", "2", "--hidden", "5", "3", "--batch", "4", "--repeat", "1",
        "--threads", "1"]
KERNEL_KEYS = {"name", "kind", "shape", "threads", "flops", "bytes", "intensity", "time_s", "gflops", "gbs",
               "bound_gflops", "bound", "pct_of_bound", "pct_of_l2_bound", "ref_time_s", "ref_gflops", "speedup"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_chains_match_numpy(dtype):
    """Each of the NACC x lanes chains is acc <- acc m + c from 1 + 1e-3 i; the kernel returns their sum."""
    m, c, iters = dtype(0.999), dtype(0.01), 50
    out = np.zeros(2, dtype)
    bench.fma_peak_(iters, m, c, out)
    lanes = bench.VEC_BITS // (8 * np.dtype(dtype).itemsize)
    acc = 1.0 + 1e-3 * np.arange(bench.NACC, dtype=np.float64).astype(dtype).astype(np.float64)
    for _ in range(iters):
        acc = acc * float(m) + float(c)
    np.testing.assert_allclose(out, lanes * acc.sum(), rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_triad_matches_numpy(rng):
    b, c = rng.standard_normal(1001), rng.standard_normal(1001)
    a = np.empty_like(b)
    bench.triad_(a, b, c, 3.0, 2, 3)
    np.testing.assert_allclose(a, b + 3.0 * c, rtol=1e-15)


def test_step_cases_count_every_gemm_of_the_step():
    """Per layer one forward GEMM and one dW; a dx for every layer but the first: 3 nl - 1 GEMMs,
    each with 2 M K N FLOPs and (MK + KN + MN) elements."""
    from minivae.model import ModelSpec
    spec = ModelSpec(9, 2, hidden=(5, 3))
    cases = bench.step_cases(spec, "float64", 4, 1)
    gemms = [c for c in cases if c.kind == "gemm"]
    assert len(gemms) == 3 * len(spec.layout.layers) - 1
    for c in gemms:
        M, K, N = map(int, c.shape.split("x"))
        assert c.flops == 2 * M * K * N and c.bytes == 8 * (M * K + K * N + M * N)
    assert {c.kind for c in cases} == {"gemm", "elementwise", "optimizer"}
    for c in cases:                    # every kernel and its reference run
        c.fast()
        c.ref()


def test_bench_json_and_plot(tmp_path, capsys):
    png = tmp_path / "roofline.png"
    assert main(TINY + ["--json", "--plot", str(png)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) == {"machine", "config", "ceilings", "kernels", "step"}
    assert r["config"]["hidden"] == [5, 3] and r["config"]["threads"] == 1
    ce = r["ceilings"]
    for dt in ("float32", "float64"):
        assert ce["fma_gflops"][dt]["per_core"] > 0 and ce["fma_gflops"][dt]["all"] > 0
    for key in ("bandwidth_gbs", "l2_bandwidth_gbs"):
        assert ce[key]["per_core"] > 0 and ce[key]["all"] > 0
    assert len(r["kernels"]) > 10
    for k in r["kernels"]:
        assert set(k) == KERNEL_KEYS
        assert k["time_s"] > 0 and k["ref_time_s"] > 0 and k["flops"] > 0 and k["bytes"] > 0
        assert k["bound"] in ("compute", "memory") and k["bound_gflops"] > 0
        assert math.isfinite(k["pct_of_bound"]) and k["pct_of_bound"] > 0
        assert math.isfinite(k["pct_of_l2_bound"]) and 0 < k["pct_of_l2_bound"] <= k["pct_of_bound"]
    s = r["step"]
    assert s["time_s"] > 0 and math.isclose(s["kernels_sum_s"], sum(k["time_s"] for k in r["kernels"]))
    assert math.isclose(s["overhead_s"], s["time_s"] - s["kernels_sum_s"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_gemm_option_is_used_and_restored(monkeypatch):
    from minivae.kernels import config
    monkeypatch.setattr(config, "GEMM", "blas")
    seen = []
    monkeypatch.setattr(bench, "measure_ceilings", lambda n: seen.append(config.GEMM) or _fake_ceilings(n))
    r = bench.run(9, 2, (5,), 4, "float64", 1, "numba", 1, gemm="custom")
    assert seen == ["custom"] and r["config"]["gemm"] == "custom"
    assert config.GEMM == "blas"                     # restored
    with pytest.raises(ValueError, match="GEMM"):
        bench.run(9, 2, (5,), 4, "float64", 1, "numba", 1, gemm="nope")


def _fake_ceilings(n):
    one = {"per_core": 1.0, "all": 1.0}
    return {"threads": n, "fma_gflops": {"float32": one, "float64": one}, "bandwidth_gbs": one,
            "l2_bandwidth_gbs": one, "vector_bits": 512, "accumulators": 12, "stream_mb": 1.0}


def test_bench_table_numpy_backend(capsys):
    assert main(TINY + ["--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    for text in ("peak FMA float32", "memory bandwidth", "enc.0 fwd (nn)", "dec.head dW (tn)", "adam update",
                 "whole step"):
        assert text in out, text


@pytest.mark.parametrize("args", [["--backend", "cuda"], ["--batch", "0"], ["--dtype", "float16"]])
def test_bench_bad_arguments_exit_2(args, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_bench_plot_into_a_missing_folder_fails_at_once(tmp_path, capsys):
    assert main(TINY + ["--plot", str(tmp_path / "no" / "r.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("minivae: error: --plot") and err.count("\n") == 1
