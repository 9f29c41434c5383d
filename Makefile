# The two commands a newcomer needs: `make up` and `make test`.
# Both create/refresh .venv and build the Cython extensions first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: up test build lint typecheck unit bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# .[dev] is everything: the client, felix[server,postgres,perf] and the test tools.
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Rebuild the extensions in place whenever a .pyx/.pxd/.h changed (cythonize checks timestamps).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

lint: build
	$(VENV)/bin/ruff check felix tests perf
	$(VENV)/bin/ruff format --check felix tests perf

typecheck: build
	$(VENV)/bin/mypy

unit: build
	$(VENV)/bin/pytest -q

test: lint typecheck unit

up: build
	$(VENV)/bin/felix up $(ARGS)

# Benchmarks print felix beside its baseline or peers from the same run (not part of CI).
# The latency harness (perf/README.md): `make bench` runs its quick mode,
# `make bench BENCH_ARGS=--full` the full one; results go to perf/results/.
BENCH_ARGS ?=
bench: build
	$(PY) perf/bench_codec.py
	$(PY) perf/bench_ring.py
	$(PY) perf/bench_disklog.py --quick
	$(PY) -m perf $(BENCH_ARGS)

clean:
	rm -rf build felix/*.so felix/_codec.c felix/_ring.c felix/_logscan.c
