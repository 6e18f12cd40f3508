# Two commands on a fresh machine: `make run` (the default pipeline) and `make test` (the suite).
# Both install into the project-local .venv first; the install is redone only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install chromium run repro grid test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/incompat pipeline --params params.yaml

# The same pipeline as DVC stages (dvc.yaml); the stages call `incompat step NAME`, found on the venv's PATH.
repro: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The paper's scenario grid (params.yaml: grid) as a DVC-tracked table: data/grid/grid.csv and grid.md.
grid: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro bench/dvc.yaml

# Headless Chromium (Debian's package) for tests/test_report_browser.py; installed when absent. A machine without
# apt (or without root) gets a warning and the browser test skips itself, unless INCOMPAT_REQUIRE_CHROMIUM is set.
chromium:
	@command -v chromium >/dev/null 2>&1 || \
	  (apt-get update && apt-get install -y --no-install-recommends chromium fonts-dejavu-core) || \
	  echo "warning: could not install chromium (apt-get install chromium); the report's browser test needs it" >&2

test: $(STAMP) chromium
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/bench_trainer.py

# The outputs go; the .gitignore files in the output folders stay (git tracks them: without them a later
# `make run` would leave every output as an untracked file).
clean:
	rm -rf runs data/raw data/poisoned data/models data/checkpoints
	rm -rf data/cluster/* data/clean/* data/reports/*
