# pipeflow: `make demo` and `make test` work on a fresh machine with Python 3.11+, Rust and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.deps-installed

DOCS   := $(VENV)/.docs-installed
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test test-rust test-loom test-python lint build docs docs-build bench bench-build \
	bench-smoke soak clean

# The virtual environment with maturin; re-made when the dependency list changes.
$(STAMP): pyproject.toml
	@echo "creating $(VENV) (pip, maturin)..."
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip
	@$(PIP) install --quiet "maturin>=1.7,<2"
	@touch $(STAMP)

# Builds the extension in release mode into the venv, with the runtime and dev dependencies.
# The package's bytecode is compiled as a wheel install does (maturin develop installs the source
# tree as it is): a worker process would otherwise compile pipeflow at each start, ~50 ms here,
# where PYTHONDONTWRITEBYTECODE is set and nothing is cached.
build: $(STAMP)
	$(VENV)/bin/maturin develop --release --quiet --extras dev
	$(PY) -m compileall -q python/pipeflow

# The demo needs the runtime dependencies only; the build's output goes to a log, shown if it
# fails.
demo: $(STAMP)
	@echo "building pipeflow (Rust, release) with its runtime dependencies..."
	@$(VENV)/bin/maturin develop --release --quiet >$(VENV)/build.log 2>&1 \
		|| { cat $(VENV)/build.log; exit 1; }
	@$(PY) -m compileall -q python/pipeflow
	@echo "running the demo..."
	@$(PY) -m pipeflow demo

test: build test-rust test-loom lint docs-build test-python bench-smoke

test-rust:
	cargo test --workspace --release

# Loom model checks of our own concurrency protocols (a separate target dir: other cfg flags).
test-loom:
	RUSTFLAGS="--cfg loom" cargo test -p pipeflow-core --test loom --test loom_ring --release --target-dir target/loom

test-python: build
	$(PY) -m pytest -q
	# Workers started as fresh interpreters, not by the fork server: the process fault suite again.
	PIPEFLOW_START_METHOD=spawn $(PY) -m pytest -q tests/test_faults.py tests/test_worker_process.py -k process

lint: build
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --release -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest pipeflow._core

# The docs site (mkdocs.yml): the guide, the API reference from the docstrings, the internals.
# Only the `docs` extra is needed: mkdocstrings reads the sources and the stubs, it imports nothing.
# The docs extra's requirements, read from pyproject.toml (one list to keep).
DOCS_EXTRA := import tomllib; \
	extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; \
	print("\n".join(extras["docs"]))

$(DOCS): $(STAMP) pyproject.toml
	@echo "installing the docs tools (the docs extra)..."
	@$(PY) -c '$(DOCS_EXTRA)' >$(VENV)/docs-requirements.txt
	@$(PIP) install --quiet -r $(VENV)/docs-requirements.txt
	@touch $(DOCS)

# Serves the docs at http://127.0.0.1:8000, rebuilt as files change.
docs: $(DOCS)
	$(VENV)/bin/mkdocs serve

# Builds the docs into site/ with every warning an error (a broken reference, a docstring griffe
# cannot read), so that they cannot rot; a few seconds.
docs-build: $(DOCS)
	$(VENV)/bin/mkdocs build --strict --quiet

# The long runs of the suite's trials (docs/fuzzing.md). Fuzzing: the shared-memory ring's header
# and frames, the arena's header, slots and descriptors (proptest, SOAK_CASES cases per property
# instead of a few thousand), then the wire and the arena from Python (hypothesis, 100 times the
# examples of make test). Each prints its count of executions.
SOAK_CASES ?= 500000

soak: build
	PROPTEST_CASES=$(SOAK_CASES) cargo test -p pipeflow-core --release --test fuzz_ring --test fuzz_arena -- --nocapture
	HYPOTHESIS_PROFILE=soak $(PY) -m pytest -q -s -p no:cacheprovider --timeout=3600 tests/test_fuzz_wire.py

# Benchmarks: pytest-benchmark suites, then the side-by-side comparison with the peers.
BENCHES := compare transport processes w2check memory faults startup arrays dask_bench

# The extension with the peers of the comparison (the `bench` extra) beside the dev tools.
bench-build: $(STAMP)
	$(VENV)/bin/maturin develop --release --quiet --extras dev,bench
	$(PY) -m compileall -q python/pipeflow

bench: bench-build
	$(PY) -m pytest benches -q --benchmark-enable -p no:cacheprovider
	set -e; for b in $(BENCHES); do $(PY) -m benches.$$b; done

# Every benchmark once, small (`--quick`), so that the harness itself keeps working: a smoke
# run, not a measurement (no figure is checked; a bench that fails or hangs fails the target).
bench-smoke: bench-build
	$(PY) -m pytest benches -q -p no:cacheprovider
	set -e; for b in $(BENCHES); do timeout 600 $(PY) -m benches.$$b --quick >/dev/null; done

clean:
	rm -rf $(VENV) target site
