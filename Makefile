# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.radflow-installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# The embedded default data is synthetic, so `run` pseudonymizes it in development mode, with the
# public development key (the model version is tagged pseudonym_key=development). A configured
# RADFLOW_PSEUDONYM_KEY, when exported, is used instead. Real data needs that key: see README.
run: $(STAMP)
	RADFLOW_PSEUDONYM_DEV_MODE=1 $(VENV)/bin/radflow run

test: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pipeline_steps
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
