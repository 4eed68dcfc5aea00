"""Merged and activation paths on every model family: init identity, equality, unmerge."""

import jax
import numpy as np
import pytest
from conftest import max_rel_error, random_like

import families
import vera_jax
from vera_jax.paths import flatten

TOL = 1e-5


@pytest.fixture(scope="module", params=families.ALL, ids=lambda f: f.__name__)
def family(request):
    return request.param()


@pytest.fixture(scope="module")
def projections(family):
    return vera_jax.init_projections(family.params, vera_jax.projection_key(family.config), family.config)


@pytest.mark.parametrize("path", vera_jax.activation.PATHS)
def test_adapted_model_equals_base_model_at_init(family, projections, path):
    trainable = vera_jax.init_trainable(family.params, family.config)
    # Op by op (no jit) so that XLA cannot fuse the programs differently: then "identical" means bitwise.
    base = family.apply(family.params, family.inputs)
    adapted = vera_jax.adapt(family.apply, trainable, projections, path=path)(family.params, family.inputs)
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))


def test_merged_equals_activation_with_random_vectors(family, projections):
    trainable = families.random_trainable(family)
    base = family.apply(family.params, family.inputs)
    merged = vera_jax.adapt(family.apply, trainable, projections, path="merged")(family.params, family.inputs)
    activation = vera_jax.adapt(family.apply, trainable, projections, path="activation")(family.params, family.inputs)
    assert max_rel_error(merged, base) > 100 * TOL, "the adapter must change the output for this test to mean anything"
    assert max_rel_error(activation, merged) < TOL


def test_unmerge_inverts_merge(family, projections):
    vectors = random_like(vera_jax.init_vectors(family.params, family.config), jax.random.key(2))
    merged = vera_jax.merge(family.params, vectors, projections)
    restored = vera_jax.unmerge(merged, vectors, projections)
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
