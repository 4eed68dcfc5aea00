"""Merged and activation paths on every model family: init identity, equality, unmerge."""

import dataclasses
import sys

import jax
import numpy as np
import pytest
from conftest import max_rel_error, random_like

import families
import vera_jax
from vera_jax.layers import find_full_leaves, find_layers
from vera_jax.paths import flatten, unflatten
from vera_jax.plan import PATHS

TOL = 1e-5


@pytest.fixture(scope="module", params=families.ALL, ids=lambda f: f.__name__)
def family(request):
    return request.param()


@pytest.fixture(scope="module")
def adapter(family):
    return vera_jax.init_adapter(family.params, family.config)


@pytest.mark.parametrize("path", PATHS)
def test_adapted_model_equals_base_model_at_init(family, adapter, path):
    # Op by op (no jit) so that XLA cannot fuse the programs differently: then "identical" means bitwise.
    base = family.apply(family.params, family.inputs)
    adapted = vera_jax.adapt(family.apply, adapter, path=path)(family.params, family.inputs)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))
    # Not because the adapter is inert: lambda_d, A and B are non-zero, so any lambda_b acts.
    flat = flatten(adapter.trainable)
    nudged = adapter.replace(trainable=unflatten(
        {path: leaf + 0.5 if vera_jax.is_vector_path(path) else leaf for path, leaf in flat.items()}))
    moved = vera_jax.adapt(family.apply, nudged, path=path)(family.params, family.inputs)
    assert max_rel_error(moved, base) > 100 * TOL


def test_merged_equals_activation_with_random_vectors(family):
    adapter = families.random_adapter(family)
    base = family.apply(family.params, family.inputs)
    merged = vera_jax.adapt(family.apply, adapter, path="merged")(family.params, family.inputs)
    activation = vera_jax.adapt(family.apply, adapter, path="activation")(family.params, family.inputs)
    assert max_rel_error(merged, base) > 100 * TOL, "the adapter must change the output for this test to mean anything"
    assert max_rel_error(activation, merged) < TOL


def test_unmerge_inverts_merge(family):
    config = dataclasses.replace(family.config, modules_to_save=())  # vectors only: unmerge restores every leaf
    initial = vera_jax.init_adapter(family.params, config)
    adapter = initial.replace(trainable=random_like(initial.trainable, jax.random.key(2)))
    merged = vera_jax.merge(family.params, adapter)
    restored = vera_jax.unmerge(merged, adapter)
    original, merged, restored = (flatten(t) for t in (family.params, merged, restored))
    assert restored.keys() == original.keys()
    kernels = {layer.path + "/kernel" for layer in vera_jax.find_layers(family.params, family.config)}
    for path, leaf in original.items():
        if path in kernels:
            changed = np.asarray(merged[path])
            assert np.max(np.abs(changed - leaf)) > 1e-3
            ulps = 4 * np.finfo(np.float32).eps * np.max(np.abs(changed))
            np.testing.assert_allclose(np.asarray(restored[path]), leaf, rtol=0, atol=ulps)
        else:
            np.testing.assert_array_equal(np.asarray(restored[path]), np.asarray(leaf))


def test_merge_changes_only_the_adapted_kernels_and_the_leaves_trained_in_full(family):
    adapter = families.random_adapter(family, seed=5)
    full = set(find_full_leaves(family.params, family.config))
    assert full == {path for path in flatten(adapter.trainable) if not vera_jax.is_vector_path(path)}
    assert bool(full) == bool(family.config.modules_to_save)
    kernels = {layer.path + "/kernel" for layer in vera_jax.find_layers(family.params, family.config)}
    original, trained = flatten(family.params), flatten(adapter.trainable)
    merged = flatten(vera_jax.merge(family.params, adapter))
    restored = flatten(vera_jax.unmerge(vera_jax.merge(family.params, adapter), adapter))
    assert merged.keys() == original.keys()
    for path, leaf in original.items():
        if path in full:
            assert not np.array_equal(trained[path], leaf)
            np.testing.assert_array_equal(merged[path], trained[path])
            np.testing.assert_array_equal(restored[path], trained[path])  # documented: no original to restore
        elif path in kernels:
            assert not np.allclose(merged[path], leaf, atol=1e-3)
        else:
            np.testing.assert_array_equal(merged[path], leaf)


def test_each_public_call_finds_the_layers_once(monkeypatch):
    """init_adapter, adapt on each path, merge and unmerge each work out the layer table once."""
    family = families.bert()
    found = []

    def counting(params, config):
        found.append(config)
        return find_layers(params, config)

    for module in [module for name, module in sys.modules.items() if name.split(".")[0] == "vera_jax"]:
        if getattr(module, "find_layers", None) is find_layers:
            monkeypatch.setattr(module, "find_layers", counting)

    def times_found(run) -> int:
        found.clear()
        run()
        return len(found)

    adapter = vera_jax.init_adapter(family.params, family.config)
    assert len(found) == 1
    for path in PATHS:
        assert times_found(lambda: vera_jax.adapt(family.apply, adapter, path=path)(family.params, family.inputs)) == 1
    assert times_found(lambda: vera_jax.merge(family.params, adapter)) == 1
    assert times_found(lambda: vera_jax.unmerge(family.params, adapter)) == 1
