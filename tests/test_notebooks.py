"""The tutorial (notebooks/*.ipynb, issue 12): every notebook runs top to bottom in a fresh kernel.

Each notebook is executed with nbclient on a temporary copy, so the committed notebook (with its outputs,
which render where the repository is browsed) is never rewritten; any cell error fails the test. The
kernel is ipykernel's own "python3" (the interpreter running the tests), found with a private Jupyter data
folder so that a kernel spec installed in the user's home cannot substitute another Python. The kernel
inherits this environment (PYTHONPATH included), so it imports the same minivae as the tests.
`make tutorial` re-executes the notebooks in place to refresh the committed outputs.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the tutorial extra is not installed: pip install -e '.[tutorial]'")
nbclient = pytest.importorskip("nbclient", reason="the tutorial extra is not installed: pip install -e '.[tutorial]'")
pytest.importorskip("ipykernel", reason="the tutorial extra is not installed: pip install -e '.[tutorial]'")

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))
MAX_BYTES = 300_000             # outputs are small PNGs: keep the repository light
CELL_TIMEOUT_S = 600


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_notebook_per_step_of_the_lecture():
    names = [p.stem for p in NOTEBOOKS]
    assert names == sorted(_generator().NOTEBOOKS), "notebooks/ and make_notebooks.py list different notebooks"
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(1, 8)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed_and_current(path):
    """The committed file holds the generator's cells, run in order, with pictures and no errors."""
    assert path.stat().st_size < MAX_BYTES, f"{path.name} is {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    expected = [(c.cell_type, c.source) for c in _generator().NOTEBOOKS[path.stem]]
    assert [(c.cell_type, c.source) for c in nb.cells] == expected, \
        f"{path.name} differs from make_notebooks.py: run `python notebooks/make_notebooks.py {path.stem}` and `make tutorial`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "not executed top to bottom in one run"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no picture"
    assert "docs/math.md" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter"))      # no user kernel specs
    committed_bytes = path.read_bytes()
    copy = tmp_path / path.name
    copy.write_bytes(committed_bytes)
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()                     # raises CellExecutionError on the first cell that fails
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    pictures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    committed = sum("image/png" in o.get("data", {}) for c in nbformat.read(path, as_version=4).cells
                    if c.cell_type == "code" for o in c.outputs)
    assert pictures == committed, f"{path.name} drew {pictures} pictures, the committed copy holds {committed}"
    assert path.read_bytes() == committed_bytes, "the committed notebook was rewritten"
