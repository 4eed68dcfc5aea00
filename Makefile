# The two set-up commands: `make run` (the main job) and `make test` (the test suite).
# Each creates .venv/ itself on a fresh machine with Python 3.11 and make, and installs the locked
# set of packages (exact versions with sha256 hashes) from requirements/run.txt or requirements/test.txt.
# `make lock` regenerates both locks from pyproject.toml's ranges (needs the package registry).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# pip itself is pinned too, so the resolver and installer are the same next year.
PIP ?= pip==26.3
RUN_LOCK := requirements/run.txt
TEST_LOCK := requirements/test.txt

.PHONY: run test lock clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(PIP)"

# Fails, naming what is missing, when pyproject.toml asks for a package or version the lock does
# not give (pyproject.toml changed without `make lock`).
define CHECK_LOCK
import sys
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
bad = []
for line in distribution("vera_jax").requires or []:
    req = Requirement(line)
    if req.marker and not any(req.marker.evaluate({"extra": extra}) for extra in [""] + sys.argv[1:]):
        continue
    try:
        installed = distribution(req.name).version
    except PackageNotFoundError:
        installed = None
    if installed is None or not req.specifier.contains(installed, prereleases=True):
        bad.append(f"{req} (installed: {installed})")
if bad:
    sys.exit("The lock does not satisfy pyproject.toml; run `make lock`:\n  " + "\n  ".join(bad))
endef
export CHECK_LOCK

$(VENV)/.installed: $(RUN_LOCK) pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --require-hashes -r $(RUN_LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -c "$$CHECK_LOCK" train
	touch $@

# The test lock holds every version of the run lock plus the test extra and torch 2.13.0 (the CPU
# build on this machine's disk): another build of torch means editing requirements/test.in and `make lock`.
$(VENV)/.installed-test: $(TEST_LOCK) $(VENV)/.installed
	$(BIN)/pip install --quiet --require-hashes -r $(TEST_LOCK)
	$(BIN)/python -c "$$CHECK_LOCK" train test
	touch $@

run: $(VENV)/.installed
	$(BIN)/python -m train

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2

# Regenerates both locks with pip-compile (pip-tools, in a throwaway venv outside the project) from
# pyproject.toml (+ requirements/test.in for the test lock). Needs the package registry. Existing
# pins are kept where the ranges still allow them; `make lock LOCK_ARGS=--upgrade` takes the newest
# versions the ranges allow, `LOCK_ARGS="--upgrade-package jax"` only those named.
PIP_TOOLS ?= pip-tools==7.7.0
LOCK_VENV ?= /tmp/vera_jax-pip-tools
LOCK_ARGS ?=
COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --generate-hashes \
	--allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS)

lock:
	test -x $(LOCK_VENV)/bin/pip || $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet "$(PIP)" "$(PIP_TOOLS)"
	$(COMPILE) --extra train -o $(RUN_LOCK) pyproject.toml
	$(COMPILE) --extra train --extra test -o $(TEST_LOCK) pyproject.toml requirements/test.in

clean:
	rm -rf $(VENV)
