# Two entry points (README "Quickstart"): `make demo` and `make test`. Both create the virtual
# environment on first use and install the package with the exact versions CI uses
# (.ci/constraints.txt); a cluster user installs with plain `pip install .` into an environment
# that already has its CUDA build of torch (docs/cluster.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup demo test lint data clean-venv

$(STAMP): pyproject.toml .ci/constraints.txt .ci/build-constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c .ci/constraints.txt --build-constraint .ci/build-constraints.txt \
	  -e '.[test,embedded,trackers]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST from Debian (the embedded default's data); best effort: without root or apt the
# harness says which package is missing, and the tests fall back to scikit-learn's digits.
data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  { (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null 2>&1 || \
	    echo "note: could not install dataset-fashion-mnist (need root and apt)"; }

demo: $(STAMP) data
	HF_HUB_OFFLINE=1 $(BIN)/bench demo $(ARGS)

# `data` first: the Fashion-MNIST tests need the dataset (installed as root, as .ci/run does).
# WORKERS pytest processes (pytest-xdist; WORKERS=0 runs in this process), each test file whole on
# one worker (--dist loadfile), so a file's module fixtures (the demo's smoke run, the local SLURM
# cluster, prepared data) are built once. Much of the suite waits on subprocesses (the CLI's torch
# import, SLURM polls, kill-and-resume); two workers overlap those waits (README, "How long it takes").
WORKERS ?= 2
test: $(STAMP) data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile --durations=15 $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
