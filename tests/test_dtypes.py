"""bf16 base weights with a float32 adapter path; the library's own code is explicit about dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_rel_error

import families
import vera_jax
from vera_jax.ops import adapter_output, delta_weight
from vera_jax.paths import flatten
from vera_jax.plan import PATHS

# bf16 keeps 8 significant bits: a unit roundoff of 2**-8. Logits after two bf16 transformer layers
# carry a few roundoffs of error relative to their largest entry.
BF16_TOL = 4 * 2.0**-8


@pytest.mark.hf_flax
@pytest.mark.parametrize("path", PATHS)
def test_bf16_base_matches_float32_reference(path):
    reference, low = families.bert(), families.bert(dtype=jnp.bfloat16)
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), low.params)
    adapter = families.random_adapter(reference, seed=3)
    expected = vera_jax.adapt(reference.apply, adapter, path=path)(reference.params, reference.inputs)
    base = reference.apply(reference.params, reference.inputs)
    logits = jax.jit(vera_jax.adapt(low.apply, adapter, path=path))(params_bf16, low.inputs)
    assert logits.dtype == jnp.bfloat16
    assert max_rel_error(expected, base) > 10 * BF16_TOL, "the adapter must matter more than bf16 noise"
    assert max_rel_error(logits, expected) < BF16_TOL


def test_merge_adds_a_float32_delta_into_bf16_kernels():
    family = families.cnn()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), family.params)
    adapter = families.random_adapter(family)
    projections = adapter.projections
    assert projections.A.dtype == jnp.float32
    merged = flatten(vera_jax.merge(params, adapter))
    flat_t, flat_p = flatten(adapter.trainable), flatten(params)
    for layer in vera_jax.find_layers(params, family.config):
        kernel = layer.path + "/kernel"
        delta = delta_weight(projections.A, projections.B, flat_t[layer.path + "/vera_lambda_d"],
                             flat_t[layer.path + "/vera_lambda_b"], layer.in_features)
        assert delta.dtype == jnp.float32
        expected = (flat_p[kernel].astype(jnp.float32) + delta.T).astype(jnp.bfloat16)
        assert merged[kernel].dtype == jnp.bfloat16
        np.testing.assert_array_equal(merged[kernel], expected)


def test_adapter_output_runs_in_the_projection_dtype():
    x = jax.random.normal(jax.random.key(0), (3, 6), jnp.bfloat16)
    a = jax.random.normal(jax.random.key(1), (4, 8))
    b = jax.random.normal(jax.random.key(2), (9, 4))
    d, lb = jnp.linspace(0.5, 1.0, 4), jnp.linspace(-1.0, 1.0, 5)
    out = adapter_output(x, a, b, d, lb)
    assert out.dtype == jnp.float32
    expected = lb * ((d * (np.asarray(x, np.float32) @ np.asarray(a)[:, :6].T)) @ np.asarray(b)[:5].T)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_library_code_passes_under_strict_dtype_promotion(path):
    family = families.cnn()
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), family.params)
    images = family.inputs.astype(jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):
        adapter = vera_jax.init_adapter(params, family.config)
        adapter = adapter.replace(trainable=jax.tree.map(lambda x: x + jnp.ones_like(x), adapter.trainable))
        logits = jax.jit(vera_jax.adapt(family.apply, adapter, path=path))(params, images)
    assert logits.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(logits, np.float32)))
