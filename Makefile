# Every target installs what it needs into .venv first (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUN := runs/demo

.PHONY: install demo test coverage lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Trains on the offline MNIST sample (no network), then samples the prior and reconstructs test digits.
demo: install
	$(BIN)/vae train --config mnist-sample --out $(DEMO_RUN) --overwrite
	$(BIN)/vae generate --run $(DEMO_RUN) --n 64 --out $(DEMO_RUN)/prior-samples.png
	$(BIN)/vae reconstruct --run $(DEMO_RUN) --out $(DEMO_RUN)/reconstructions.png
	$(BIN)/vae generate --run $(DEMO_RUN) --sampler gmm --n 64 --out $(DEMO_RUN)/gmm-samples.png
	$(BIN)/vae latent --run $(DEMO_RUN) --out $(DEMO_RUN)/latent.png
	$(BIN)/vae interpolate test:0 test:1 --run $(DEMO_RUN) --spherical --out $(DEMO_RUN)/interpolation.png
	$(BIN)/vae traverse --run $(DEMO_RUN) --out $(DEMO_RUN)/traverse.png
	$(BIN)/vae evaluate --run $(DEMO_RUN) --k 1000
	$(BIN)/vae runs runs
	@echo "demo: open $(DEMO_RUN)/prior-samples.png (z ~ p(z)), $(DEMO_RUN)/reconstructions.png (z ~ q(z|x)),"
	@echo "      gmm-samples.png, latent.png, interpolation.png, traverse.png and curves.png there"

# Two workers (pytest-xdist): much of the suite is single-threaded compiling, so on 2 cores they cut it from 12.4 to 8.7 min.
test: install
	$(BIN)/python -m pytest -q -n 2

# Line coverage of the package by the whole suite (pytest-cov), with the lines each module misses.
coverage: install
	$(BIN)/python -m pytest -q -n 2 --cov=vaecli --cov-report=term-missing:skip-covered

# Speed and memory figures for this machine (a table, and bench.json); not a test.
bench: install
	$(BIN)/python -m benchmarks.bench --out bench.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
