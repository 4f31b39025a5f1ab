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

demo: $(STAMP)
	$(BIN)/minivae train --dataset digits --epochs 300 --z-dim 2 --hidden 128 --batch-size 64 \
		--likelihood continuous_bernoulli --out runs/demo --overwrite
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
