"""The ``minivae`` command (minivae/cli.py): the documented flags work end to end, and every bad
input of issue 3 gives a one-line error, a non-zero exit status and no traceback."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minivae import VAE, checkpoint
from minivae import gradcheck as gradcheck_mod
from minivae.cli import main
from minivae.data import read_idx, write_idx
from minivae.train import HostTrainer
from cliutil import cli, one_line_error

MNIST = Path("/work/shared/data/mnist")
DIGITS_RUN = ["train", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--z-dim", "2",
              "--hidden", "16", "--quiet", "--no-plots"]



@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished two-epoch run on the digits, z = 2 (so every picture applies)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(DIGITS_RUN + ["--out", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def mini_mnist(tmp_path_factory):
    """600 training and 200 test images of the real MNIST t10k file, as the four canonical files."""
    if not (MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the MNIST t10k files are not in {MNIST}")
    x = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    y = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    d = tmp_path_factory.mktemp("mnist")
    write_idx(d / "train-images-idx3-ubyte.gz", x[:600])
    write_idx(d / "train-labels-idx1-ubyte.gz", y[:600])
    write_idx(d / "t10k-images-idx3-ubyte", x[600:800])
    write_idx(d / "t10k-labels-idx1-ubyte", y[600:800])
    return d


# ----------------------------------------------------------------------------------------------
# The documented commands
# ----------------------------------------------------------------------------------------------

def test_the_exact_flags_of_issue_3(tmp_path, capsys, mini_mnist):
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", "--dataset", "mnist", "--data-dir", mini_mnist, "--epochs", 2,
                         "--batch-size", 50, "--z-dim", 5, "--hidden", 32, 16, "--activation", "relu",
                         "--likelihood", "bernoulli", "--optimizer", "adam", "--lr", "1e-3",
                         "--backend", "numpy", "--seed", 3, "--dtype", "float32", "--out", run)
    assert code == 0, err
    assert (run / "model.npz").is_file() and (run / "metrics.jsonl").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["train_samples"] == 540   # 10% held out
    assert "epoch 2/2" in out and "final test -ELBO" in out                 # per-epoch lines, summary
    for name in ("reconstructions", "samples", "interpolation", "latent", "curves"):
        assert (run / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "manifold.png").exists()                               # z = 5
    model = VAE.load(run / "model.npz")
    assert model.config()["hidden"] == [32, 16] and model.z_dim == 5 and model.dtype == np.float32


def test_evaluate_json_is_one_line(capsys, digits_run):
    code, out, err = cli(capsys, "evaluate", digits_run / "model.npz", "--iw-samples", 50, "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert set(r) >= {"elbo", "iw_log_likelihood", "active_units", "recon_error", "n"}
    assert r["dataset"] == "digits" and r["n"] == 360 and r["iw_samples"] == 50
    assert r["iw_log_likelihood"] > r["elbo"] and 0 <= r["active_units"] <= 2 and r["recon_error"] > 0
    # the ELBO is the test loss of the last epoch (same fixed noise)
    last = json.loads((digits_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert -r["elbo"] == pytest.approx(last["test_loss"], rel=1e-9)


def test_evaluate_table_and_run_folder_argument(capsys, digits_run):
    code, out, err = cli(capsys, "evaluate", digits_run, "--iw-samples", 0, "--split", "val")
    assert code == 0, err
    assert "ELBO" in out and "active units" in out and "log p(x)" not in out and "val, 144 examples" in out


def test_sample_and_plot(tmp_path, capsys, digits_run):
    code, out, _ = cli(capsys, "sample", digits_run, "--n", 10, "--out", tmp_path / "s.png", "--seed", 1)
    assert code == 0 and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    for kind in ("reconstructions", "samples", "manifold", "interpolation", "latent", "curves"):
        code, out, err = cli(capsys, "plot", digits_run / "model.npz", "--kind", kind, "--out",
                             tmp_path / f"{kind}.png")
        assert code == 0, (kind, err)
        assert (tmp_path / f"{kind}.png").read_bytes()[:4] == b"\x89PNG"
    code, out, _ = cli(capsys, "plot", digits_run, "--kind", "all", "--dataset", "digits", "--out", tmp_path / "all")
    assert code == 0 and len(list((tmp_path / "all").glob("*.png"))) == 6


def test_plot_manifold_needs_two_latent_dims(tmp_path, capsys):
    VAE(64, 3, hidden=(8,)).save(tmp_path / "m.npz")
    code, _, err = cli(capsys, "plot", tmp_path / "m.npz", "--kind", "manifold", "--out", tmp_path / "x.png")
    assert code == 1 and one_line_error(err) and "z_dim = 2" in err


def test_gradcheck(capsys, monkeypatch):
    code, out, _ = cli(capsys, "gradcheck")
    assert code == 0 and "passed" in out
    monkeypatch.setattr(gradcheck_mod, "run_suite", lambda **kw: False)
    assert cli(capsys, "gradcheck", "--seed", 2, "--tol", "1e-8")[0] == 1


def test_download_offline_is_one_line(tmp_path, capsys):
    import socket
    with socket.socket() as s:                                   # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = cli(capsys, "download", "mnist", "--data-dir", tmp_path, "--quiet",
                       "--base-url", f"http://127.0.0.1:{port}/")
    assert code == 1 and one_line_error(err)


def test_resume_through_the_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, *DIGITS_RUN, "--out", run)[0] == 0
    code, out, err = cli(capsys, "train", "--resume", run, "--epochs", 3, "--quiet")
    assert code == 0, err
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    # options that define the run cannot change on resume
    code, _, err = cli(capsys, "train", "--resume", run, "--epochs", 4, "--lr", "0.5")
    assert code == 1 and one_line_error(err) and "--lr cannot change" in err
    code, _, err = cli(capsys, "train", "--resume", run, "--out", tmp_path / "elsewhere")
    assert code == 1 and one_line_error(err)


def test_ctrl_c_exits_130_with_one_line_and_resumes(tmp_path, capsys, monkeypatch):
    real = HostTrainer.step
    calls = {"n": 0}

    def step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **kw)
    monkeypatch.setattr(HostTrainer, "step", step)
    run = tmp_path / "run"
    code, _, err = cli(capsys, *DIGITS_RUN, "--out", run)
    assert code == 130
    assert one_line_error(err, "minivae: interrupted") and f"--resume {run}" in err
    monkeypatch.undo()
    assert cli(capsys, "train", "--resume", run)[0] == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# ----------------------------------------------------------------------------------------------
# Bad arguments: argparse, exit 2, one line
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--epochs", "-1"], "--epochs"),
    (["train", "--likelihood", "poisson"], "--likelihood"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--hidden", "0"], "--hidden"),
    (["train", "--z-dim", "two"], "--z-dim"),
    (["train", "--val-fraction", "1"], "--val-fraction"),
    (["train", "--dataset", "cifar"], "--dataset"),
    (["evaluate"], "CKPT"),
    (["evaluate", "x.npz", "--iw-samples", "-5"], "--iw-samples"),
    (["sample", "x.npz", "--n", "0", "--out", "a.png"], "--n"),
    (["plot", "x.npz", "--kind", "pie", "--out", "a.png"], "--kind"),
    (["download", "cifar"], "name"),
    (["train", "--threads", "0"], "--threads"),
    (["evaluate", "x.npz", "--threads", "two"], "--threads"),
    ([], "COMMAND"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, args, words):
    code, _, err = cli(capsys, *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error:" in err and words in err and "Traceback" not in err


def test_help(capsys):
    code, out, _ = cli(capsys, "train", "--help")
    assert code == 0 and "--batch-size" in out and "--resume" in out


# ----------------------------------------------------------------------------------------------
# Bad input found later: exit 1, "minivae: error: ..." on one line
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def bad_checkpoints(tmp_path, digits_run):
    good = (digits_run / "model.npz").read_bytes()
    junk = tmp_path / "junk.npz"
    junk.write_bytes(np.random.default_rng(0).bytes(3000))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good[:len(good) // 2])
    meta, arrays = checkpoint.load(digits_run / "model.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, meta=np.array(json.dumps(meta)), params=np.array([{"x": 1}], dtype=object))
    other = tmp_path / "other-version.npz"
    np.savez(other, meta=np.array(json.dumps(dict(meta, version=99))), **arrays)
    return {"junk": junk, "truncated": truncated, "pickled": pickled, "other version": other,
            "missing": tmp_path / "absent.npz"}


@pytest.mark.parametrize("kind, words", [("junk", "junk.npz"),
                                         ("truncated", "not a readable checkpoint"),
                                         ("pickled", "pickled"), ("other version", "version 99"),
                                         ("missing", "no such checkpoint")])
@pytest.mark.parametrize("command", ["evaluate", "sample", "plot"])
def test_bad_checkpoints(tmp_path, capsys, bad_checkpoints, kind, words, command):
    extra = {"evaluate": [], "sample": ["--out", tmp_path / "a.png"],
             "plot": ["--kind", "samples", "--out", tmp_path / "a.png"]}[command]
    code, _, err = cli(capsys, command, bad_checkpoints[kind], *extra)
    assert code == 1 and one_line_error(err) and words in err, err


@pytest.mark.parametrize("kind", ["junk", "truncated", "pickled", "other version"])
def test_resume_from_a_bad_checkpoint(tmp_path, capsys, bad_checkpoints, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.npz").write_bytes(bad_checkpoints[kind].read_bytes())
    code, _, err = cli(capsys, "train", "--resume", run)
    assert code == 1 and one_line_error(err) and "model.npz" in err


def test_existing_run_folder_is_refused(capsys, digits_run):
    before = (digits_run / "model.npz").read_bytes()
    code, _, err = cli(capsys, *DIGITS_RUN, "--out", digits_run)
    assert code == 1 and one_line_error(err) and "already holds a run" in err
    assert (digits_run / "model.npz").read_bytes() == before


def test_missing_data_folder(tmp_path, capsys):
    code, _, err = cli(capsys, "train", "--dataset", "mnist", "--data-dir", tmp_path / "nowhere",
                       "--out", tmp_path / "run", "--quiet")
    assert code == 1 and one_line_error(err) and "nowhere" in err


def test_divergence_is_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, *DIGITS_RUN, "--optimizer", "sgd", "--lr", "1e6", "--momentum", "0",
                       "--out", tmp_path / "run")
    assert code == 1 and one_line_error(err) and "training stopped" in err


def test_evaluate_on_a_dataset_of_another_shape(capsys, digits_run, mini_mnist):
    code, _, err = cli(capsys, "evaluate", digits_run, "--dataset", "mnist", "--data-dir", mini_mnist)
    assert code == 1 and one_line_error(err) and "x_dim=64" in err


# ----------------------------------------------------------------------------------------------
# The real programs: the console script and python -m minivae
# ----------------------------------------------------------------------------------------------

def test_console_script_and_module(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minivae", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "train" in r.stdout and "evaluate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "minivae", "train", "--batch-size", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "minivae", "evaluate", str(junk)], capture_output=True, text=True)
    assert r.returncode == 1 and one_line_error(r.stderr)


def test_dynamic_binarization_evaluates_like_training(tmp_path, capsys):
    """Training evaluates one fixed binarization of test; ``minivae evaluate`` uses the same one."""
    run = tmp_path / "run"
    assert cli(capsys, *DIGITS_RUN, "--binarize", "dynamic", "--out", run)[0] == 0
    code, out, err = cli(capsys, "evaluate", run, "--iw-samples", 0, "--json")
    assert code == 0, err
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert -json.loads(out)["elbo"] == pytest.approx(last["test_loss"], rel=1e-9)


def test_a_bare_model_file_needs_the_dataset_named(tmp_path, capsys):
    """A checkpoint written by VAE.save carries no training config: evaluate asks for --dataset."""
    VAE(64, 2, hidden=(8,)).save(tmp_path / "m.npz")
    code, _, err = cli(capsys, "evaluate", tmp_path / "m.npz")
    assert code == 1 and one_line_error(err) and "--dataset" in err
    code, out, err = cli(capsys, "evaluate", tmp_path / "m.npz", "--dataset", "digits", "--iw-samples", 3, "--json")
    assert code == 0 and json.loads(out)["n"] == 360
    assert cli(capsys, "sample", tmp_path / "m.npz", "--n", 4, "--out", tmp_path / "s.png")[0] == 0


def test_threads_limit_numba_and_every_blas_during_the_command(tmp_path, capsys, monkeypatch):
    """--threads N holds Numba and both OpenBLAS copies (NumPy's, SciPy's) at N while the command runs,
    and gives the previous limits back afterwards."""
    import numba
    from threadpoolctl import threadpool_info

    import minivae.train as train_mod
    from minivae.threads import blas_info

    seen = {}
    real_train = train_mod.train

    def spy(config, comm=None):
        seen["numba"] = numba.get_num_threads()
        seen["blas"] = [d["num_threads"] for d in threadpool_info() if d.get("user_api") == "blas"]
        return real_train(config, comm)

    monkeypatch.setattr(train_mod, "train", spy)
    before = numba.get_num_threads(), [d["num_threads"] for d in blas_info()]
    code, _, err = cli(capsys, *DIGITS_RUN, "--threads", "1", "--out", tmp_path / "run")
    assert code == 0, err
    assert seen["numba"] == 1 and len(seen["blas"]) >= 2 and set(seen["blas"]) == {1}
    assert (numba.get_num_threads(), [d["num_threads"] for d in blas_info()]) == before


@pytest.mark.parametrize("var", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_several_launched_processes_need_distributed(tmp_path, capsys, monkeypatch, var):
    """`mpiexec -n 2 minivae train` without --distributed would train two copies into one folder."""
    monkeypatch.setenv(var, "2")
    code, _, err = cli(capsys, *DIGITS_RUN, "--out", tmp_path / "run")
    assert code == 1 and one_line_error(err) and "--distributed" in err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv(var, "1")                                 # one process under a launcher is fine
    code, _, err = cli(capsys, *DIGITS_RUN, "--out", tmp_path / "run")
    assert code == 0, err
