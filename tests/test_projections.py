"""A and B: shapes, Kaiming-uniform bounds, draw order, and a generator pinned to its spec."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vera_jax
from vera_jax.projections import init_projections, kaiming_uniform_bound, projection_key

# Layers of different shapes: in_max = 300 (from "up"), out_max = 500 (from "down").
PARAMS = {
    "up": {"kernel": jax.ShapeDtypeStruct((300, 120), jnp.float32)},
    "down": {"kernel": jax.ShapeDtypeStruct((120, 500), jnp.float32)},
    "norm": {"scale": jax.ShapeDtypeStruct((120,), jnp.float32)},
}
CONFIG = vera_jax.VeraConfig(r=64, target_modules=("up", "down"))


def _threefry2x32(key0, key1, x0, x1):
    """Threefry-2x32 with 20 rounds (Salmon et al., Random123), written from the spec in numpy."""
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    keys = (np.uint32(key0), np.uint32(key1), np.uint32(key0) ^ np.uint32(key1) ^ np.uint32(0x1BD11BDA))
    with np.errstate(over="ignore"):
        x0, x1 = x0 + keys[0], x1 + keys[1]
        for group in range(5):
            for rot in rotations[group % 2]:
                x0 = x0 + x1
                x1 = ((x1 << np.uint32(rot)) | (x1 >> np.uint32(32 - rot))) ^ x0
            x0 = x0 + keys[(group + 1) % 3]
            x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def _reference_stream(key_words, first_block, size, bound):
    blocks = np.arange(first_block, first_block + -(-size // 2), dtype=np.uint32)
    even, odd = _threefry2x32(*key_words, np.zeros_like(blocks), blocks)
    bits = np.stack([even, odd], axis=-1).reshape(-1)[:size]
    unit = ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)
    return (unit * np.float32(2.0) - np.float32(1.0)) * np.float32(bound)


@pytest.fixture(scope="module")
def projections():
    """A and B of a new adapter for projection_seed 1234 (only the shapes of PARAMS are read)."""
    return vera_jax.init_adapter(PARAMS, dataclasses.replace(CONFIG, projection_seed=1234)).projections


def test_shapes_are_the_maxima_over_adapted_layers(projections):
    assert projections.A.shape == (64, 300)
    assert projections.B.shape == (500, 64)
    assert projections.A.dtype == projections.B.dtype == jnp.float32


@pytest.mark.parametrize("name, fan_in", [("A", 300), ("B", 64)])
def test_kaiming_uniform_bounds_and_moments(projections, name, fan_in):
    values = np.asarray(getattr(projections, name), np.float64)
    bound = np.sqrt(6.0 / fan_in)  # gain sqrt(2), a=0, fan_in = the buffer's second dimension
    assert kaiming_uniform_bound(fan_in) == pytest.approx(bound, rel=1e-15)
    assert values.min() >= -bound and values.max() <= bound
    # Tens of thousands of draws fill the interval: extremes within 0.1% of the bounds.
    assert values.min() < -0.999 * bound and values.max() > 0.999 * bound
    assert abs(values.mean()) < 0.02 * bound
    assert values.var() == pytest.approx(bound**2 / 3, rel=0.03)


def test_values_follow_the_documented_threefry_stream(projections):
    words = np.asarray(jax.random.key_data(jax.random.key(1234)), np.uint32)
    a_size = 64 * 300
    expected_a = _reference_stream(words, 0, a_size, np.sqrt(6.0 / 300)).reshape(64, 300)
    expected_b = _reference_stream(words, a_size // 2, 500 * 64, np.sqrt(6.0 / 64)).reshape(500, 64)
    np.testing.assert_array_equal(np.asarray(projections.A), expected_a)
    np.testing.assert_array_equal(np.asarray(projections.B), expected_b)


def test_a_is_drawn_before_b():
    key = jax.random.key(5)
    wider_out = {**PARAMS, "down": {"kernel": jax.ShapeDtypeStruct((120, 700), jnp.float32)}}
    wider_in = {**PARAMS, "up": {"kernel": jax.ShapeDtypeStruct((400, 120), jnp.float32)}}
    base, out, inn = (init_projections(p, key, CONFIG) for p in (PARAMS, wider_out, wider_in))
    # A comes first: a larger B leaves A unchanged, and B's leading rows too.
    np.testing.assert_array_equal(out.A, base.A)
    np.testing.assert_array_equal(out.B[:500], base.B)
    # B comes after A in the stream: a larger A moves B.
    assert not np.array_equal(inn.B, base.B)


@pytest.mark.parametrize("partitionable", [False, True])
def test_values_do_not_depend_on_threefry_partitionable(projections, partitionable):
    with jax.threefry_partitionable(partitionable):
        again = init_projections(PARAMS, jax.random.key(1234), CONFIG)
        jitted = jax.jit(init_projections, static_argnums=2)(PARAMS, jax.random.key(1234), CONFIG)
    for other in (again, jitted):
        np.testing.assert_array_equal(other.A, projections.A)
        np.testing.assert_array_equal(other.B, projections.B)


def test_legacy_uint32_keys_and_projection_key_agree(projections):
    legacy = init_projections(PARAMS, jax.random.PRNGKey(1234), CONFIG)
    np.testing.assert_array_equal(legacy.A, projections.A)
    typed = init_projections(PARAMS, jax.random.key(1234), CONFIG)
    np.testing.assert_array_equal(typed.B, projections.B)
    seeded = init_projections(PARAMS, projection_key(CONFIG), CONFIG)
    assert not np.array_equal(seeded.A, projections.A)  # seed 0, not 1234


def test_the_adapter_key_is_the_config_seed():
    adapter = vera_jax.init_adapter(PARAMS, dataclasses.replace(CONFIG, projection_seed=1234))
    np.testing.assert_array_equal(jax.random.key_data(adapter.key), jax.random.key_data(jax.random.key(1234)))
    assert adapter.redrawable and adapter.generator == vera_jax.projections.GENERATOR
    default = vera_jax.init_adapter(PARAMS, CONFIG)  # projection_seed 0
    np.testing.assert_array_equal(default.projections.A, init_projections(PARAMS, jax.random.key(0), CONFIG).A)
    assert not np.array_equal(default.projections.A, adapter.projections.A)


def test_different_keys_give_different_projections(projections):
    other = init_projections(PARAMS, jax.random.key(1235), CONFIG)
    assert np.mean(np.asarray(other.A) == np.asarray(projections.A)) < 0.01


def test_dtype_of_the_adapter_path():
    config = vera_jax.VeraConfig(r=8, target_modules=("up",), dtype="bfloat16")
    adapter = vera_jax.init_adapter(PARAMS, config)
    assert adapter.projections.A.dtype == jnp.bfloat16 and adapter.projections.B.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(adapter.trainable)} == {jnp.dtype(jnp.bfloat16)}


def test_rbg_keys_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="threefry2x32 key.*impl='threefry2x32'"):
        init_projections(PARAMS, jax.random.key(0, impl="rbg"), CONFIG)
    with pytest.raises(ValueError, match="needs a threefry key"):
        init_projections(PARAMS, jnp.zeros((4,), jnp.uint32), CONFIG)
