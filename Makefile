# make demo  : set up a virtual environment and train on the embedded 8x8 digits (no network needed)
# make test  : set up the same environment and run the whole test suite (the notebooks included)
# make tutorial : re-execute every notebook in notebooks/ in place (fresh kernels), refreshing their outputs
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test tutorial gradcheck bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,mpi,tutorial]"
	touch $(STAMP)

setup: $(STAMP)

# The demo trains to a flat curve in ~15 s: the Bernoulli likelihood (on grey levels the continuous Bernoulli's
# -ELBO still falls steeply after 300 epochs as its densities sharpen, and its posterior means drift away
# from the prior's centre, so the manifold's grid over the prior misses the data), lr 3e-3, and one thread:
# at 64x256 the NumPy backend is fastest on one core (more threads only contend; Numba's first compile
# alone would take longer than the training).
demo: $(STAMP)
	$(BIN)/minivae train --dataset digits --epochs 200 --z-dim 2 --hidden 256 --batch-size 64 --lr 3e-3 \
		--likelihood bernoulli --backend numpy --threads 1 --out runs/demo --overwrite
	@echo "pictures and metrics are in runs/demo/"

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# nbclient's jupyter-execute: each notebook in a new ipykernel of this environment, cells in order,
# outputs written back into the notebook; JUPYTER_DATA_DIR keeps a kernel spec in your home out of it.
tutorial: $(STAMP)
	JUPYTER_DATA_DIR=$(abspath $(VENV))/share/jupyter-tutorial $(BIN)/jupyter-execute --inplace \
		--kernel_name=python3 --timeout=600 notebooks/[0-9][0-9]_*.ipynb

gradcheck: $(STAMP)
	$(BIN)/minivae gradcheck

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
