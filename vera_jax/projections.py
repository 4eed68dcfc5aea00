"""The shared frozen pair A (r, in_max) and B (out_max, r), drawn exactly as PEFT draws them.

PEFT draws both with Kaiming-uniform (gain sqrt(2), a=0, fan_in = the buffer's second dimension) from
one torch generator, A first. Here the only source of randomness is a JAX threefry key, read as one
counter-mode stream: block i is Threefry-2x32 (20 rounds, Random123) of the counter pair (0, i) under
the key's two words, and gives stream values 2i and 2i+1. A (row-major) takes the first r*in_max
values; B starts at the next block. Each 32-bit value becomes a float32 in [0, 1) from its top 23
bits, then ``(2u - 1) * bound``. Hashing explicit counters keeps the values independent of
``jax_threefry_partitionable`` and of any future change of JAX's default key handling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.extend.random import threefry2x32_p

from vera_jax.config import VeraConfig
from vera_jax.layers import find_layers

__all__ = ["GENERATOR", "Projections", "init_projections", "projection_key", "projection_shapes", "kaiming_uniform_bound"]

_MAX_COUNTER = 2**31  # blocks at 2**31 and above stay free for keys derived with fold_in(key, 2**31 + n)
GENERATOR = "threefry2x32-counter-stream-v1"  # the stream described above; bump if it ever changes


@struct.dataclass
class Projections:
    """The frozen shared matrices, and the config they were drawn for (static, not a leaf).

    Attributes:
      A: (r, in_max); each layer uses ``A[:, :in_features]``.
      B: (out_max, r); each layer uses ``B[:out_features, :]``.
      config: the `VeraConfig` they belong to; carried so `merge` and the activation path need no more.
    """

    A: jax.Array
    B: jax.Array
    config: VeraConfig = struct.field(pytree_node=False)


def projection_key(config: VeraConfig) -> jax.Array:
    """The threefry key for ``config.projection_seed``."""
    return jax.random.key(config.projection_seed, impl="threefry2x32")


def projection_shapes(params: Mapping, config: VeraConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((r, in_max), (out_max, r))``: maxima over the adapted layers, as PEFT's ``_find_dim``."""
    layers = find_layers(params, config)
    in_max = max(layer.in_features for layer in layers)
    out_max = max(layer.out_features for layer in layers)
    return (config.r, in_max), (out_max, config.r)


def kaiming_uniform_bound(fan_in: int) -> float:
    """PEFT's Kaiming-uniform bound, sqrt(3) * (sqrt(2) / sqrt(fan_in)), in PEFT's order of operations."""
    return math.sqrt(3.0) * (math.sqrt(2.0) / math.sqrt(fan_in))


def _key_words(key: jax.Array) -> jax.Array:
    """A threefry key (typed, or legacy uint32[2]) -> its two uint32 words."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
        if "threefry2x32" not in impl or key.shape != ():
            raise ValueError(
                f"init_projections needs one threefry2x32 key, got a key of impl {impl} and shape {key.shape}; "
                "pass jax.random.key(seed, impl='threefry2x32') or vera_jax.projection_key(config)."
            )
        return jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"init_projections needs a threefry key, got an array of shape {key.shape} and dtype {key.dtype}; "
            "pass jax.random.key(seed) or vera_jax.projection_key(config)."
        )
    return key


def _blocks(size: int) -> int:
    return -(-size // 2)


def _uniform_stream(words: jax.Array, first_block: int, shape: tuple[int, int], bound: float) -> jax.Array:
    """U[-bound, bound] float32 values from the stream, starting at block ``first_block``."""
    size = int(np.prod(shape))
    if first_block + _blocks(size) > _MAX_COUNTER:
        raise ValueError(f"Projections of {size} values exceed the 2**31 counter blocks reserved for them; lower r.")
    low = jnp.arange(first_block, first_block + _blocks(size), dtype=jnp.uint32)
    even, odd = threefry2x32_p.bind(words[0], words[1], jnp.zeros_like(low), low)
    bits = jnp.stack([even, odd], axis=-1).reshape(-1)[:size]
    # 23 random mantissa bits under exponent 0: a float32 in [1, 2), minus 1 gives [0, 1).
    unit = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    return ((unit * 2.0 - 1.0) * jnp.float32(bound)).reshape(shape)


def init_projections(params: Mapping, key: jax.Array, config: VeraConfig) -> Projections:
    """Draw the shared A and B for the layers ``config`` adapts in ``params``.

    Pure: depends on the params' shapes only (``jax.ShapeDtypeStruct`` leaves are fine), the key and
    the config. Under ``jax.jit`` pass ``config`` as static.

    Returns:
      ``Projections(A (r, in_max), B (out_max, r), config)`` in ``config.dtype``, with
      A ~ U(-sqrt(6 / in_max), sqrt(6 / in_max)) and B ~ U(-sqrt(6 / r), sqrt(6 / r)).
    """
    (r, in_max), (out_max, _) = projection_shapes(params, config)
    words = _key_words(key)
    a = _uniform_stream(words, 0, (r, in_max), kaiming_uniform_bound(in_max))
    b = _uniform_stream(words, _blocks(r * in_max), (out_max, r), kaiming_uniform_bound(r))
    return Projections(A=a.astype(config.dtype), B=b.astype(config.dtype), config=config)
