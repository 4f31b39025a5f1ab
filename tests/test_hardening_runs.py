"""Issue 10, part 1: run folders, output files, Ctrl-C and everyday defaults (minivae/checkpoint.py
atomic_write, minivae/train.py Run/RunLock, minivae/cli.py console, minivae/kernels resolve_backend).

Each test is one of the failures the issue reports, caught: ``--out`` onto a device or FIFO, two
trainings on one folder, ``.tmp-*`` left by kill -9, ``--overwrite`` losing the old run to a typo,
a 245-character name refused, Ctrl-C at start-up or shut-down printing a traceback, the slow
``numpy`` backend as the default, dead ``0%|`` progress lines in a piped log."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minivae import VAE, checkpoint
from minivae.checkpoint import NotARegularFileError, atomic_write, remove_stale_temporaries
from minivae.cli import main
from minivae.kernels import BACKENDS, CONCRETE_BACKENDS, get_backend, resolve_backend
from minivae.train import LOCK, RunLock, TrainConfig, train
from cliutil import cli, one_line_error as one_line

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["--dataset", "digits", "--batch-size", "64", "--z-dim", "2", "--hidden", "8", "--no-plots"]



def env():
    """The environment of a ``python -m minivae`` subprocess: this checkout's minivae first."""
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    e.pop("MINIVAE_DEBUG", None)
    return e


def tmp_names(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".tmp-"))


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished one-epoch run with its pictures: the bytes of every file, to compare after."""
    run = tmp_path_factory.mktemp("old") / "run"
    assert main(["train", *TINY[:-1], "--epochs", "1", "--backend", "numpy", "--quiet", "--out", str(run)]) == 0
    return run


def snapshot(run):
    return {p.name: p.read_bytes() for p in sorted(Path(run).iterdir()) if p.is_file() and p.name != LOCK}


# ----------------------------------------------------------------------------------------------
# atomic_write: only regular files, symlinks followed, temporaries within NAME_MAX
# ----------------------------------------------------------------------------------------------

def write_text(path, text="new"):
    atomic_write(path, lambda f: f.write(text.encode()))


def test_a_fifo_a_folder_and_a_socket_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        for path, kind in ((fifo, "FIFO"), (folder, "folder"), (sock_path, "socket")):
            with pytest.raises(NotARegularFileError, match=f"{path}: is a.*{kind}.*not a regular file"):
                write_text(path)
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and stat.S_ISSOCK(os.stat(sock_path).st_mode)
    assert folder.is_dir() and tmp_names(tmp_path) == []


def test_sample_and_plot_onto_a_fifo_give_one_line(tmp_path, capsys):
    VAE(64, 2, hidden=(8,)).save(tmp_path / "m.npz")
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    for args in (["sample", tmp_path / "m.npz", "--n", 4, "--out", fifo],
                 ["plot", tmp_path / "m.npz", "--kind", "samples", "--out", fifo]):
        code, out, err = cli(capsys, *args)
        assert code == 1 and one_line(err) and "not a regular file" in err and out == ""
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and tmp_names(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_sample_onto_a_character_device_is_refused(tmp_path, capsys):
    """The /dev/null of the issue, made in a temporary folder: never the machine's own."""
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("this container may not create device nodes")
    VAE(64, 2, hidden=(8,)).save(tmp_path / "m.npz")
    code, _, err = cli(capsys, "sample", tmp_path / "m.npz", "--n", 4, "--out", node)
    assert code == 1 and one_line(err) and "character device" in err
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and tmp_names(tmp_path) == []


def test_symlinks_are_followed_never_replaced(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"           # the link kept, its file written

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    to_fifo = tmp_path / "to_fifo"
    to_fifo.symlink_to(fifo)
    with pytest.raises(NotARegularFileError, match="FIFO"):
        write_text(to_fifo)
    assert to_fifo.is_symlink() and stat.S_ISFIFO(os.stat(fifo).st_mode)

    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "made.txt")
    write_text(dangling, "made")
    assert dangling.is_symlink() and (tmp_path / "made.txt").read_text() == "made"
    assert tmp_names(tmp_path) == []


@pytest.mark.parametrize("length", [245, 255])
def test_a_legal_long_name_is_written(tmp_path, capsys, length):
    VAE(64, 2, hidden=(8,)).save(tmp_path / "m.npz")
    path = tmp_path / ("s" * (length - 4) + ".png")
    code, out, err = cli(capsys, "sample", tmp_path / "m.npz", "--n", 4, "--out", path)
    assert code == 0, err
    assert path.read_bytes()[:4] == b"\x89PNG" and tmp_names(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def write(f):
        f.write(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert path.read_text() == "old" and tmp_names(tmp_path) == []


def test_new_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "f.txt").st_mode) == 0o644


def test_remove_stale_temporaries_removes_only_temporary_files(tmp_path):
    for name in (".tmp-1234abcd-model.npz", ".tmp-oldstylemetrics.jsonl", "model.npz", ".tmpx"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".tmp-folder").mkdir()
    (tmp_path / ".tmp-link").symlink_to(tmp_path / "model.npz")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(Path(p).name for p in removed) == [".tmp-1234abcd-model.npz", ".tmp-oldstylemetrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-folder", ".tmp-link", ".tmpx", "model.npz"]


# ----------------------------------------------------------------------------------------------
# The run folder: --overwrite replaces at the first checkpoint, the lock, stale temporaries
# ----------------------------------------------------------------------------------------------

def test_overwrite_with_a_bad_data_dir_keeps_the_old_run(old_run, tmp_path, capsys):
    before = snapshot(old_run)
    assert "model.npz" in before and "curves.png" in before
    code, _, err = cli(capsys, "train", "--dataset", "mnist", "--data-dir", tmp_path / "typo", "--overwrite",
                       "--out", old_run, "--quiet")
    assert code == 1 and one_line(err)
    assert snapshot(old_run) == before


def test_overwrite_that_diverges_in_its_first_epoch_keeps_the_old_run(old_run, capsys):
    before = snapshot(old_run)
    code, _, err = cli(capsys, "train", *TINY, "--backend", "numpy", "--lr", "1e12", "--optimizer", "sgd",
                       "--overwrite", "--out", old_run, "--quiet")
    assert code == 1 and one_line(err) and "old run" in err and "is kept" in err
    assert snapshot(old_run) == before


def test_overwrite_replaces_the_run_and_its_pictures(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY[:-1], "--epochs", "1", "--backend", "numpy", "--quiet", "--out", run)[0] == 0
    assert (run / "manifold.png").is_file()                          # z = 2
    code, _, err = cli(capsys, "train", *TINY, "--z-dim", "3", "--epochs", "1", "--backend", "numpy",
                       "--quiet", "--overwrite", "--out", run)
    assert code == 0, err
    assert VAE.load(run / "model.npz").z_dim == 3 and not (run / "manifold.png").exists()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_fresh_run_that_cannot_start_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "new" / "run"
    code, _, err = cli(capsys, "train", "--dataset", "mnist", "--data-dir", tmp_path / "typo", "--out", run)
    assert code == 1 and one_line(err) and not run.exists()


def test_out_that_is_a_file_gives_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = cli(capsys, "train", *TINY, "--out", tmp_path / "f")
    assert code == 1 and one_line(err) and "not a folder" in err


def test_a_locked_run_folder_names_its_holder(old_run, capsys):
    lock = RunLock(old_run)          # another open file description: flock conflicts even in-process
    try:
        info = json.loads((old_run / LOCK).read_text())
        assert info["pid"] == os.getpid() and set(info) == {"pid", "host", "started", "command"}
        for args in (["train", *TINY, "--overwrite", "--out", old_run], ["train", "--resume", old_run]):
            code, _, err = cli(capsys, *args)
            assert code == 1 and one_line(err) and "in use by another training run" in err
            assert f"pid {os.getpid()} on {socket.gethostname()} since " in err
    finally:
        lock.release()
    assert not (old_run / LOCK).exists()     # a released lock leaves only the run in the folder


def test_a_lock_file_deleted_by_its_holder_is_not_a_lock(tmp_path):
    """B opened the lock file just before its holder A deleted it on release; C then made a new one
    and holds it. B's flock on the deleted file succeeds, but B must not count it as the lock."""
    a = RunLock(tmp_path)
    stale = os.open(a.path, os.O_RDWR)
    a.release()
    c = RunLock(tmp_path)
    b = RunLock.__new__(RunLock)
    b.path = tmp_path / LOCK
    try:
        assert b._lock(stale, tmp_path) is False
    finally:
        os.close(stale)
        c.release()


def train_subprocess(run, *extra, stdout=subprocess.DEVNULL):
    return subprocess.Popen([PY, "-m", "minivae", "train", *TINY, "--backend", "numpy", "--out", str(run),
                             *[str(a) for a in extra]],
                            stdout=stdout, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)


def wait_for(predicate, proc, timeout=120):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the subprocess ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the subprocess")
        time.sleep(0.05)


def locked_by(run, pid):
    try:
        return json.loads((run / LOCK).read_text())["pid"] == pid
    except (OSError, ValueError, KeyError):
        return False


def test_two_concurrent_trainings_on_one_folder(tmp_path, capsys):
    run = tmp_path / "run"
    first = train_subprocess(run, "--epochs", 10000, "--quiet")
    try:
        wait_for(lambda: locked_by(run, first.pid), first)
        code, _, err = cli(capsys, "train", *TINY, "--backend", "numpy", "--out", run, "--overwrite", "--quiet")
        assert code == 1 and one_line(err) and f"pid {first.pid} on " in err and "minivae train" in err
        wait_for(lambda: (run / "model.npz").exists(), first)       # it trains on, undisturbed
        first.send_signal(signal.SIGINT)
        _, err1 = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130 and one_line(err1, "minivae: interrupted") and "--resume" in err1
    code, _, err = cli(capsys, "train", "--resume", run, "--epochs", 1, "--quiet")   # the lock is free again
    assert code == 0, err


KILLER = """
import os, signal, sys
from minivae import checkpoint
real, calls, at = checkpoint.atomic_write, [0], int(sys.argv[1])

def atomic_write(path, write):
    def killing(f):
        write(f)
        calls[0] += 1
        if calls[0] == at:                   # the temporary is written, the rename not done: kill -9
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    real(path, killing)
checkpoint.atomic_write = atomic_write
sys.argv = ["minivae"] + sys.argv[2:]
from minivae.__main__ import entry
entry()
"""


@pytest.mark.parametrize("case", ["first write", "a later write"])
def test_kill_9_mid_checkpoint_then_start_or_resume_cleans_temporaries(tmp_path, capsys, case):
    # writes: model.npz, metrics.jsonl per epoch; the kill point is drawn with a fixed seed
    at = 1 if case == "first write" else int(np.random.default_rng(10).integers(2, 7))
    run = tmp_path / "run"
    proc = subprocess.run([PY, "-c", KILLER, str(at), "train", *TINY, "--backend", "numpy", "--epochs", "4",
                           "--quiet", "--out", str(run)], capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(tmp_names(run)) == 1
    if at == 1:                              # no checkpoint yet: a new start takes the folder
        code, _, err = cli(capsys, "train", *TINY, "--backend", "numpy", "--epochs", 1, "--quiet", "--out", run)
    else:
        code, _, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert code == 0, err
    assert tmp_names(run) == [] and sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "model.npz"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == (1 if at == 1 else 4)


# ----------------------------------------------------------------------------------------------
# Ctrl-C at start-up and at shut-down: one line, exit 130
# ----------------------------------------------------------------------------------------------

def before_minivae(err):
    """A Ctrl-C that landed in the interpreter's own start-up (site, runpy), before any code of the
    package ran: no package can turn that one into a line. Its traceback has no frame in minivae/
    (and a signal before Python installed its handler kills the process silently)."""
    return f"{os.sep}minivae{os.sep}" not in err


# what pip writes for ``minivae = minivae.__main__:entry`` (setup.cfg)
CONSOLE_SCRIPT = """import re
import sys
from minivae.__main__ import entry
if __name__ == "__main__":
    sys.argv[0] = "minivae"
    sys.exit(entry())
"""


def communicate_or_dump(proc, timeout):
    """stderr of ``proc`` once it ends; if it is still running after ``timeout`` seconds, fail with
    where each of its threads is (SIGABRT: the traceback dump of PYTHONFAULTHANDLER) and how far the
    run got."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate()
        runs = sorted(str(p.relative_to(p.parents[1])) for p in Path(proc.args[-1]).parent.rglob("*"))
        pytest.fail(f"still running {timeout} s after the Ctrl-C; files {runs}; its threads:\n{err[-8000:]}")


@pytest.mark.parametrize("entry", ["module", "console script"])
def test_ctrl_c_during_start_up(tmp_path, entry):
    """SIGINT at fixed, seeded delays from the start: while minivae, numpy, numba import, the data
    loads, the backend compiles or loads its kernels, or (the last delays) training runs."""
    head = [PY, "-m", "minivae"] if entry == "module" else [PY, "-c", CONSOLE_SCRIPT]
    delays = np.sort(np.random.default_rng(20261201 + len(entry)).uniform(0.05, 1.5, size=5))
    lines = 0
    for i, delay in enumerate(delays):
        proc = subprocess.Popen(head + ["train", *TINY, "--epochs", "10000", "--out", str(tmp_path / f"r{i}")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=dict(env(), PYTHONFAULTHANDLER="1"))
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = communicate_or_dump(proc, 120)
        # -SIGINT: CPython ends by SIGINT (as a shell shows it: 130) once a KeyboardInterrupt has
        # passed through code that an extension ran with PyRun_String (a Cython module's init),
        # even when minivae caught it; what matters is the one line and no traceback
        if proc.returncode in (130, -signal.SIGINT) and one_line(err, "minivae: interrupted"):
            lines += 1
        else:
            assert before_minivae(err), (delay, proc.returncode, err)
    assert lines >= 1                        # the last delays land in minivae's start-up or training


# A Ctrl-C that lands in a finalizer or a weakref callback (importlib runs one for every module lock
# it frees): Python cannot raise it there, prints "Exception ignored" and carries on. DROP makes one
# land at a chosen point: argv[1] names it, "imports" (right after minivae's handler went in, while
# the command line imports), or a module and function that the command calls; a trailing "!" makes
# that call then fail as an extension module does whose initialization a Ctrl-C stopped.
DROP = """
import importlib, signal, sys


class Finalizer:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)       # the handler runs here, inside __del__


def dropping(f, broken):
    def wrapper(*a, **kw):
        Finalizer()
        if broken:
            raise ImportError("initialization failed")
        return f(*a, **kw)
    return wrapper


where, sys.argv = sys.argv[1], ["minivae"] + sys.argv[2:]
from minivae import interrupts
if where == "imports":
    install = interrupts.install

    def install_then_drop():
        install()
        Finalizer()
    interrupts.install = install_then_drop
else:
    module, name = where.rstrip("!").split(":")
    m = importlib.import_module(module)
    setattr(m, name, dropping(getattr(m, name), where.endswith("!")))
from minivae.__main__ import entry
entry()
"""


@pytest.mark.parametrize("where", ["imports", "loading the data", "an import it breaks", "a command's work"])
def test_a_ctrl_c_that_python_drops_still_stops_the_program(tmp_path, where):
    """minivae.interrupts: the dropped Ctrl-C is remembered and stops the program where it can stop
    cleanly, with the one line and exit 130 (no "Exception ignored", no training that runs on, no
    traceback of what it broke)."""
    if where == "a command's work":
        VAE(64, 2, hidden=(8,)).save(tmp_path / "m.npz")
        point, args = "minivae.plots:save_samples", ["sample", str(tmp_path / "m.npz"), "--n", "4",
                                                     "--out", str(tmp_path / "s.png")]
    else:
        point = {"imports": "imports", "loading the data": "minivae.data:load_dataset",
                 "an import it breaks": "minivae.data:load_dataset!"}[where]
        args = ["train", *TINY, "--epochs", "10000", "--out", str(tmp_path / "run")]
    proc = subprocess.run([PY, "-c", DROP, point, *args], capture_output=True, text=True, env=env(), cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 130 and proc.stderr == "minivae: interrupted\n", (proc.returncode, proc.stderr)
    if where == "a command's work":              # the work was done before the program stopped
        assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    else:                                        # stopped before a training step: no checkpoint
        assert not (tmp_path / "run" / "model.npz").exists()


def test_only_a_dropped_ctrl_c_is_kept_quiet(monkeypatch):
    """The program's unraisable hook: a KeyboardInterrupt (counted by the handler) says nothing,
    any other exception that Python cannot raise still reaches the default hook."""
    from minivae import interrupts
    seen = []
    monkeypatch.setattr(sys, "__unraisablehook__", seen.append)
    for exc in (KeyboardInterrupt(), ValueError("in __del__")):
        interrupts._unraisable(type("Args", (), {"exc_value": exc})())
    assert [type(a.exc_value) for a in seen] == [ValueError]


def test_a_run_started_with_ctrl_c_ignored_ignores_it(tmp_path):
    """A shell without job control starts ``minivae train ... &`` with SIGINT ignored, so that
    Ctrl-C at the terminal is not for it: minivae keeps it so, through start-up, training and exit."""
    run = tmp_path / "run"
    proc = subprocess.Popen([PY, "-m", "minivae", "train", *TINY, "--backend", "numpy", "--epochs", "200", "--quiet",
                             "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    sent = 0
    try:
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            sent += 1
            time.sleep(0.1)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == 0 and err == "" and sent >= 5, (proc.returncode, err, sent)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 200


SLOW_EXIT = """
import atexit, sys, time
atexit.register(time.sleep, 60)          # a slow shut-down: an atexit handler still running
sys.argv = ["minivae"] + sys.argv[1:]
from minivae.__main__ import entry
entry()
"""


def test_ctrl_c_during_shut_down(tmp_path):
    VAE(64, 2, hidden=(8,)).save(tmp_path / "m.npz")
    out = tmp_path / "s.png"
    proc = subprocess.Popen([PY, "-c", SLOW_EXIT, "sample", str(tmp_path / "m.npz"), "--n", "4", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    try:
        line = proc.stdout.readline()            # main is done once it printed the path
        assert line.strip() == str(out)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err == "minivae: interrupted\n" and rest == ""
    assert out.read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------
# The everyday default backend: auto
# ----------------------------------------------------------------------------------------------

def test_auto_is_a_backend_name_everywhere(monkeypatch):
    import minivae.kernels as kernels
    assert "auto" in BACKENDS and resolve_backend("auto") in ("numba", "cuda")
    assert TrainConfig().backend == "auto" and VAE(4, 2, hidden=(3,)).backend_name == "numpy"
    model = VAE(64, 2, hidden=(8,), backend="auto")
    assert type(model.backend) is get_backend(resolve_backend("auto"))
    monkeypatch.setattr(kernels, "gpu_usable", lambda: True)
    assert resolve_backend("auto") == "cuda"
    monkeypatch.setattr(kernels, "gpu_usable", lambda: False)
    assert resolve_backend("auto") == "numba"
    for name in CONCRETE_BACKENDS:
        assert resolve_backend(name) == name
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        resolve_backend("gpu")


def test_numbas_cuda_simulator_is_not_a_gpu(monkeypatch):
    import numba

    from minivae.kernels import gpu_usable
    monkeypatch.setattr(numba.config, "ENABLE_CUDASIM", True, raising=False)
    assert gpu_usable() is False


def test_piped_training_has_no_bars_and_records_the_concrete_backend(tmp_path):
    """The default backend (auto), stdout and stderr both pipes: one plain line per epoch, no tqdm."""
    run = tmp_path / "run"
    proc = subprocess.run([PY, "-m", "minivae", "train", *TINY, "--epochs", "2", "--out", str(run)],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "0%|" not in proc.stderr and "|" not in proc.stderr and "\r" not in proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1/2", "2/2"]
    chosen = resolve_backend("auto")
    assert any(ln.split() [:2] == ["backend", chosen] and "--backend auto" in ln for ln in lines)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == [chosen, chosen]
    meta, _ = checkpoint.load(run / "model.npz")
    assert meta["train"]["config"]["backend"] == chosen and meta["config"]["backend"] == chosen


def test_resume_of_a_numpy_run_keeps_numpy(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *TINY, "--backend", "numpy", "--epochs", 1, "--quiet", "--out", run)[0] == 0
    assert cli(capsys, "train", "--resume", run, "--epochs", 2, "--quiet")[0] == 0        # through the CLI
    train(TrainConfig(resume=str(run), epochs=3, quiet=True, plots=False))              # default: auto
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["numpy"] * 3
    meta, _ = checkpoint.load(run / "model.npz")
    assert meta["train"]["config"]["backend"] == "numpy"


def test_a_nan_validation_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """A checkpoint never holds a NaN: a non-finite validation loss stops the run like a test loss."""
    from minivae import checkpoint as ckpt
    from minivae import evaluate as ev
    from minivae.train import TrainConfig, TrainingError, resume_config, train

    real, calls = ev.mean_elbo, {"validation": 0}

    def fake(model, x, *args, split="given", **kw):
        value = real(model, x, *args, split=split, **kw)
        if split == "validation":
            calls["validation"] += 1
            if calls["validation"] == 2:
                return float("nan")
        return value
    monkeypatch.setattr(ev, "mean_elbo", fake)
    out = tmp_path / "run"
    cfg = TrainConfig(dataset="digits", hidden=(8,), z_dim=2, epochs=3, batch_size=200, quiet=True,
                      plots=False, backend="numpy", out=str(out))
    with pytest.raises(TrainingError, match="validation loss became nan after epoch 2"):
        train(cfg)
    meta, _ = ckpt.load(out / "model.npz")
    assert meta["train"]["epoch"] == 1
    monkeypatch.setattr(ev, "mean_elbo", real)
    summary = train(resume_config(out, {"quiet": True, "plots": False}))   # the kept checkpoint resumes
    assert summary["epochs"] == 3
