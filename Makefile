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

# The PostgreSQL tests start their own server with initdb/pg_ctl unless RADFLOW_TEST_POSTGRES_URL names
# one. Missing both, as root on Debian/Ubuntu, install the server; otherwise the tests say what to do.
test: $(STAMP)
	@[ -n "$$RADFLOW_TEST_POSTGRES_URL" ] || command -v initdb >/dev/null \
	  || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) \
	  || echo "make test: could not install postgresql; the PostgreSQL tests will fail" >&2
	@# The offline Data Docs test renders pages in headless Chromium (Debian's package).
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  || echo "make test: could not install chromium; the offline Data Docs test will fail" >&2
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
