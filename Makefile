# The two set-up commands: `make run` (the main job) and `make test` (the test suite).
# Each creates .venv/ itself on a fresh machine with Python 3.11 and make, and installs the locked
# set of packages (exact versions with sha256 hashes) from requirements/run.txt or requirements/test.txt
# (transformers 5). `make test` also creates .venv-hf-flax/ from requirements/hf-flax.txt (transformers 4
# and its Flax classes) and runs there the tests of the linen Hugging Face models (marker `hf_flax`).
# `make lock` regenerates the three locks from pyproject.toml's ranges (needs the package registry).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LEGACY_VENV := .venv-hf-flax
LEGACY_BIN := $(LEGACY_VENV)/bin
# pip itself is pinned too, so the resolver and installer are the same next year.
PIP ?= pip==26.3
RUN_LOCK := requirements/run.txt
TEST_LOCK := requirements/test.txt
LEGACY_LOCK := requirements/hf-flax.txt

.PHONY: run test lock clean

$(BIN)/activate $(LEGACY_BIN)/activate:
	$(PYTHON) -m venv $(patsubst %/bin/activate,%,$@)
	$(@D)/pip install --quiet "$(PIP)"

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
# build on this machine's disk): another build of torch means editing requirements/*.in and `make lock`.
$(VENV)/.installed-test: $(TEST_LOCK) $(VENV)/.installed
	$(BIN)/pip install --quiet --require-hashes -r $(TEST_LOCK)
	$(BIN)/python -c "$$CHECK_LOCK" train test
	touch $@

$(LEGACY_VENV)/.installed: $(LEGACY_LOCK) pyproject.toml | $(LEGACY_BIN)/activate
	$(LEGACY_BIN)/pip install --quiet --require-hashes -r $(LEGACY_LOCK)
	$(LEGACY_BIN)/pip install --quiet --no-deps -e .
	$(LEGACY_BIN)/python -c "$$CHECK_LOCK" train hf-flax test
	touch $@

run: $(VENV)/.installed
	$(BIN)/python -m train

# Two runs, one per environment: every test marked `hf_flax` runs in the legacy one, every other test
# in the transformers-5 one (tests/conftest.py fails a test that lands in the wrong one).
test: $(VENV)/.installed-test $(LEGACY_VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 -m "not hf_flax"
	$(LEGACY_BIN)/python -m pytest -q -n 2 -m hf_flax

# Regenerates the three locks with pip-compile (pip-tools, in a throwaway venv outside the project) from
# pyproject.toml and requirements/*.in: the test lock first, then the run lock within it. Needs the package registry. Existing
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
	$(COMPILE) --extra train --extra test -o $(TEST_LOCK) pyproject.toml requirements/test.in
	$(COMPILE) --extra train -o $(RUN_LOCK) pyproject.toml requirements/run.in
	$(COMPILE) --extra train --extra hf-flax --extra test -o $(LEGACY_LOCK) pyproject.toml requirements/hf-flax.in

clean:
	rm -rf $(VENV) $(LEGACY_VENV)
