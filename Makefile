# The two commands a newcomer needs: `make up` and `make test`.
# Both create/refresh .venv and build the Cython extensions first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Bytecode caches are what keep the suite's thousands of short Python processes (and
# pytest's collection) fast: never let the environment turn them off for these recipes.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: up test build lint typecheck unit unit-embedded bench faults slow clean

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

# The suite runs on PYTEST_WORKERS processes (pytest-xdist), each taking whole test files
# (--dist loadfile: a module's fixtures and its order stay within one process); most of a
# node test is waiting on its node's processes, so two workers fit a 2-core machine.
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

# Everything but the tests marked `soak` (long perf-style runs: `make slow`); those marked
# `serial` (subtests, which xdist workers do not report back) after the rest, without -n.
unit: build
	$(VENV)/bin/pytest -q $(XDIST) -m "not soak and not serial"
	$(VENV)/bin/pytest -q -m "serial and not soak"

# The node tests again on the topology `felix up` picks on small machines (shards inside
# the gateway; tests that need shard processes are skipped there): about a minute.
EMBEDDED_TESTS ?= tests/test_node.py tests/test_node_durable.py tests/test_node_quotas.py \
	tests/test_queues_node.py
unit-embedded: build
	FELIX_TEST_TOPOLOGY=embedded $(VENV)/bin/pytest -q $(XDIST) $(EMBEDDED_TESTS)

test: lint typecheck unit unit-embedded

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

# Long fault rounds (not part of `make test`): the crash, power-loss and bit-flip tests
# of durable streams with FAULT_ROUNDS times their quick number of random rounds.
FAULT_ROUNDS ?= 25
faults: build
	FELIX_FAULT_ROUNDS=$(FAULT_ROUNDS) $(VENV)/bin/pytest -q --timeout 3600 \
		tests/test_segfiles.py tests/test_disklog_faults.py tests/test_durable_faults.py

# Long perf-style smoke runs (not part of `make test`): the tests marked `soak`, i.e. the
# reduced runs of `python -m perf durable` and `python -m perf queue` (perf/README.md).
slow: build
	$(VENV)/bin/pytest -q -m soak

clean:
	rm -rf build felix/*.so felix/_codec.c felix/_ring.c felix/_logscan.c
