"""Shared helpers, and the suite's strictness.

JAX's strict dtype promotion (mixing dtypes without a cast is an error, as it is a bug in a mixed-precision
model) holds in every test but those of `STANDARD_PROMOTION`'s modules and those marked ``standard_promotion``.
Warnings are errors; pyproject's filterwarnings lists the few that are not, each with its reason.

The whole run shares one JAX compilation cache, new for the run (so a run is as cold as CI's) and removed after:
tests that compile the same programs (the tiny models, the `python -m train` subprocesses) compile them once.
XLA compiles for the CPU without LLVM's optimisations (``--xla_backend_optimization_level=0``): the tests' tiny
models spend most of their time compiling, and a quarter less of it at level 0; the arithmetic is the same IEEE
float32 (no fast-math at any level), so every tolerance stays as it is. Subprocesses get the flag through
`tiny_run.xla_flags`; the real model's training runs in an optimised subprocess (its compute outweighs its
compiling).
"""

import importlib.util
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

import tiny_run
from train.engine import compile_cache

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {tiny_run.UNOPTIMISED}".strip()


def pytest_configure(config):
    """The run's compilation cache: made by the main process (pytest-xdist's workers and every subprocess inherit
    its environment variable), turned on in each test process."""
    if not hasattr(config, "workerinput"):
        config.run_compile_cache = tempfile.mkdtemp(prefix="vera_jax-test-xla-")
        os.environ[compile_cache.ENV] = config.run_compile_cache
    compile_cache.enable()


def pytest_unconfigure(config):
    if hasattr(config, "run_compile_cache"):
        shutil.rmtree(config.run_compile_cache, ignore_errors=True)

# Modules whose tests run third-party code that mixes dtypes itself, so they keep JAX's standard promotion:
# transformers' Flax models (bool with int32 attention masks in flax.linen's combine_masks, int32 positions with
# float32 in their einsums, a bfloat16 base with float32 layer norms), tunix's models (int32 positions with float32
# in their rotary embeddings) and optax's AdamW (a Python float with its int32 step count; tests that train NNX
# models with it are marked ``standard_promotion`` one by one). vera_jax's own code, its NNX path on the project's
# NNX models, and the application's options and layering run strict.
STANDARD_PROMOTION = {
    "test_ablations", "test_bench_job", "test_causal_lm", "test_checkpoint", "test_dtypes", "test_errors",
    "test_evaluation", "test_forward_paths", "test_fuzz_files", "test_gguf_llama", "test_length_groups", "test_lora",
    "test_multi", "test_peft_interop", "test_peft_parity", "test_plan", "test_readme", "test_real_assets",
    "test_reference_run", "test_run_safety", "test_startup", "test_train_pipeline", "test_training", "test_tunix",
    "test_validation", "test_writers",
}


# Modules whose tests (nearly all) run transformers' Flax classes, marked ``hf_flax`` whole; elsewhere such a test
# carries the mark itself. `make test` runs them in .venv-hf-flax (transformers 4.57), the rest in .venv
# (transformers 5, which has no Flax classes).
HF_FLAX = {
    "test_ablations", "test_atomic", "test_checkpoint", "test_errors", "test_evaluation", "test_forward_paths",
    "test_fuzz_files", "test_gguf_llama", "test_length_groups", "test_lora", "test_peft_files",
    "test_peft_interop", "test_peft_parity", "test_reference_run", "test_training",
}


def pytest_ignore_collect(collection_path, config):
    """With ``-m "not hf_flax"`` (make test's transformers-5 run) the `HF_FLAX` modules are not imported: every test
    in them would be deselected, and some import transformers' Flax classes at the top."""
    return collection_path.stem in HF_FLAX and config.getoption("markexpr") == "not hf_flax" or None


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in STANDARD_PROMOTION:
            item.add_marker("standard_promotion")
        if item.module.__name__ in HF_FLAX:
            item.add_marker("hf_flax")


def _has_flax_classes() -> bool:
    return importlib.util.find_spec("transformers.models.auto.modeling_flax_auto") is not None


def pytest_runtest_setup(item):
    """A test of transformers' Flax classes (marked ``hf_flax``) fails in one line where transformers has none: it
    runs in the legacy environment, as `make test` does (``.venv-hf-flax/bin/python -m pytest -m hf_flax``)."""
    if item.get_closest_marker("hf_flax") and not _has_flax_classes():
        import transformers

        pytest.fail(f"{item.nodeid} runs transformers' Flax classes, which transformers {transformers.__version__} "
                    "lacks: run it in .venv-hf-flax (make test runs `-m hf_flax` there).", pytrace=False)


@pytest.fixture(autouse=True)
def strict_dtype_promotion(request):
    promotion = "standard" if request.node.get_closest_marker("standard_promotion") else "strict"
    with jax.numpy_dtype_promotion(promotion):
        yield


def max_rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: a relative error that is robust to entries near zero."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def random_like(tree, key, scale=1.0):
    """Independent N(0, scale^2) draws shaped like every leaf of tree."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )


def randomise_vectors(model, seed: int = 1) -> None:
    """N(0, 0.25) vectors on an NNX model with VeRA attached, so that every comparison sees VeRA's output."""
    from flax import nnx

    import vera_jax.nnx as vera_nnx

    leaves, treedef = jax.tree.flatten(nnx.state(model, vera_nnx.VeraVector))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, leaf.shape)
                                                   for k, leaf in zip(keys, leaves)]))
