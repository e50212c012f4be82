# Two targets a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Files that must each be fully covered, branches included: the sans-IO parsers. The
# floor for the whole package is fail_under in pyproject.toml.
COMPLETE := src/sockserve/framing.py src/sockserve/framers.py \
            src/sockserve/proxy_protocol.py src/sockserve/proxy_header.py

.PHONY: demo test lint typecheck unit bench clean

demo: $(STAMP)
	$(BIN)/sockserve demo $(ARGS)

test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks fuzz
	$(BIN)/ruff format --check src tests benchmarks fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite under branch coverage (server processes included), then the figure.
# Coverage data goes to a directory of the run's own that anyone may write: some tests
# run servers as nobody. Most of a test's time is spent waiting on its servers, so JOBS
# test processes (pytest-xdist) share the cores; JOBS=0 runs the suite in this process.
JOBS ?= 4
unit: $(STAMP)
	@data=$$(mktemp -d) && chmod 1777 $$data && export COVERAGE_FILE=$$data/.coverage && \
	trap 'rm -rf $$data' EXIT && \
	$(BIN)/coverage run -m pytest -n $(JOBS) --dist worksteal $(PYTEST_ARGS) && \
	$(BIN)/coverage combine --quiet && \
	for f in $(COMPLETE); do \
		$(BIN)/coverage report --include=$$f --fail-under=100 --format=total >/dev/null || { \
			$(BIN)/coverage report --include=$$f --show-missing --fail-under=100; \
			echo "$$f must be fully covered (branches too)"; exit 1; }; \
	done && \
	$(BIN)/coverage report

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(ARGS)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
