# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.radflow-installed

# radflow needs Python 3.11 (pyproject.toml: requires-python >=3.11,<3.12; constraints.txt is resolved
# on 3.11). The first of these on PATH that is 3.11 creates .venv; `make PYTHON=/path/to/python` names one.
NEED_PYTHON := 3.11
PYTHON_CANDIDATES := python3.11 python3 python
PYTHON ?= $(firstword $(foreach p,$(PYTHON_CANDIDATES),$(shell command -v $(p) >/dev/null 2>&1 \
  && $(p) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null | grep -qx '$(NEED_PYTHON)' \
  && command -v $(p))))

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || [ -n "$(PYTHON)" ] || { echo "make: radflow needs Python $(NEED_PYTHON) \
	(requires-python >=3.11,<3.12) and none of $(PYTHON_CANDIDATES) on PATH is $(NEED_PYTHON). Install \
	it (Debian/Ubuntu: apt-get install python3.11-venv; or pyenv install 3.11), or run \
	make PYTHON=/path/to/python3.11" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { echo "make: $(VENV) runs \
	Python $$($(PY) -c 'import platform; print(platform.python_version())'); radflow needs \
	$(NEED_PYTHON). Remove $(VENV) and run make again." >&2; exit 1; }
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
	@# The PACS tests start a real Orthanc with its DICOMweb plugin (Debian's packages).
	@{ command -v Orthanc >/dev/null || [ -x /usr/sbin/Orthanc ]; } \
	  && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 \
	  || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends orthanc orthanc-dicomweb) \
	  || echo "make test: could not install orthanc and orthanc-dicomweb; the PACS tests will fail" >&2
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy pipeline_steps
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit/test_docs.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
