# One-command set-up and the project's everyday jobs. `make setup` is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

.PHONY: setup test lint run bench clean

setup: $(STAMP)

# torch goes in first and pinned, so no later install can pull a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[redis,serve,dev]'
	touch $(STAMP)

# pytest exits 5 when it collects nothing: a failure, not a pass.
test: setup
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check lmcache_ext tests benchmarks

run: setup
	$(VENV)/bin/lmcache-ext run $(if $(CONFIG),--config $(CONFIG),)

bench: setup
	$(PY) benchmarks/data_path.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
