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
from vera_jax.layers import AdaptedLayer, find_layers

__all__ = ["GENERATOR", "Projections", "init_projections", "projection_key", "projection_shapes",
           "kaiming_uniform_bound"]

_MAX_COUNTER = 2**31  # blocks at 2**31 and above stay free for keys derived with fold_in(key, 2**31 + n)
GENERATOR = "threefry2x32-counter-stream-v1"  # the stream described above; bump if it ever changes


@struct.dataclass
class Projections:
    """The frozen random matrices.

    Attributes:
      A: (r, in_max), shared: each layer uses ``A[:, :in_features]``. With
        ``config.projection_sharing == "per_layer"``: (layers, r, in_max), one slab per adapted layer.
      B: (out_max, r), shared: each layer uses ``B[:out_features, :]``; per layer: (layers, out_max, r).
      layers: per-layer pairs only: the adapted layers' paths, in the order of A's and B's leading axis.
    """

    A: jax.Array
    B: jax.Array
    layers: tuple[str, ...] = struct.field(pytree_node=False, default=())

    def pair(self, path: str) -> tuple[jax.Array, jax.Array]:
        """``(A (r, in_max), B (out_max, r))`` that the layer at ``path`` slices.

        Raises:
          ValueError: per-layer projections hold no pair for ``path``.
        """
        if not self.layers:
            return self.A, self.B
        try:
            index = self.layers.index(path)
        except ValueError:
            raise ValueError(
                f"These per-layer projections hold no pair for {path!r} (they cover {len(self.layers)} layers); "
                "build the adapter with vera_jax.init_adapter on the same params and config.") from None
        return self.A[index], self.B[index]


def projection_key(config: VeraConfig) -> jax.Array:
    """The threefry key for ``config.projection_seed``."""
    return jax.random.key(config.projection_seed, impl="threefry2x32")


def projection_shapes(layers: tuple[AdaptedLayer, ...], r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((r, in_max), (out_max, r))``: maxima over the adapted layers, as PEFT's ``_find_dim``."""
    in_max = max(layer.in_features for layer in layers)
    out_max = max(layer.out_features for layer in layers)
    return (r, in_max), (out_max, r)


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
                "pass jax.random.key(seed, impl='threefry2x32')."
            )
        return jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"init_projections needs a threefry key, got an array of shape {key.shape} and dtype {key.dtype}; "
            "pass jax.random.key(seed)."
        )
    return key


def _blocks(size: int) -> int:
    return -(-size // 2)


def _unit_stream(words: jax.Array, first_block: int, size: int) -> jax.Array:
    """``size`` float32 values in [0, 1) from the stream, starting at block ``first_block``: (size,)."""
    if first_block + _blocks(size) > _MAX_COUNTER:
        raise ValueError(f"Projections of {size} values exceed the 2**31 counter blocks reserved for them; lower r.")
    low = jnp.arange(first_block, first_block + _blocks(size), dtype=jnp.uint32)
    even, odd = threefry2x32_p.bind(words[0], words[1], jnp.zeros_like(low), low)
    bits = jnp.stack([even, odd], axis=-1).reshape(-1)[:size]
    # 23 random mantissa bits under exponent 0: a float32 in [1, 2), minus 1 gives [0, 1).
    return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def _draw(words: jax.Array, first_block: int, shape: tuple[int, int], fan_in: int, init: str) -> jax.Array:
    """One matrix of ``shape`` from the stream at ``first_block``, by ``VeraConfig.projection_init``.

    kaiming_uniform: ``(2u - 1) * sqrt(6 / fan_in)``; kaiming_normal: ``sqrt(2 / fan_in) * z`` with
    ``z = sqrt(2) erfinv(2u' - 1)`` and ``u' = u + 2**-24`` (never 0); uniform: ``0.1 * u``.
    """
    unit = _unit_stream(words, first_block, int(np.prod(shape)))
    if init == "kaiming_uniform":
        values = (unit * 2.0 - 1.0) * jnp.float32(kaiming_uniform_bound(fan_in))
    elif init == "kaiming_normal":
        normal = jnp.float32(math.sqrt(2.0)) * jax.scipy.special.erfinv((unit + 2.0**-24) * 2.0 - 1.0)
        values = normal * jnp.float32(math.sqrt(2.0 / fan_in))
    else:
        values = unit * jnp.float32(0.1)
    return values.reshape(shape)


def init_projections(params: Mapping, key: jax.Array, config: VeraConfig, *,
                     layers: tuple[AdaptedLayer, ...] | None = None) -> Projections:
    """Draw the frozen A and B for the layers ``config`` adapts in ``params``.

    Pure: depends on the params' shapes only (``jax.ShapeDtypeStruct`` leaves are fine), the key and
    the config. Under ``jax.jit`` pass ``config`` as static. ``layers``: ``find_layers(params, config)``,
    where the caller has it already.

    Returns:
      ``Projections(A (r, in_max), B (out_max, r))`` in ``config.dtype``, with (by default)
      A ~ U(-sqrt(6 / in_max), sqrt(6 / in_max)) and B ~ U(-sqrt(6 / r), sqrt(6 / r)). With
      ``projection_sharing="per_layer"``: A (layers, r, in_max) and B (layers, out_max, r), layer i's pair
      drawn after layer i-1's with fan-ins in_i and r (columns past in_i of its A slab are never used).
    """
    layers = find_layers(params, config) if layers is None else layers
    (r, in_max), (out_max, _) = projection_shapes(layers, config.r)
    words = _key_words(key)
    draw = lambda block, shape, fan_in: _draw(words, block, shape, fan_in, config.projection_init)  # noqa: E731
    if config.projection_sharing == "shared":
        a = draw(0, (r, in_max), in_max)
        b = draw(_blocks(r * in_max), (out_max, r), r)
        return Projections(A=a.astype(config.dtype), B=b.astype(config.dtype))
    stacked = [layer.path for layer in layers if layer.layers is not None]
    if stacked:
        raise ValueError(f"projection_sharing='per_layer' draws one pair per adapted module, but {stacked[:3]} are "
                         "stacks of layers; use the default projection_sharing='shared' (one A/B for every layer).")
    per_layer = _blocks(r * in_max) + _blocks(out_max * r)
    a = jnp.stack([draw(i * per_layer, (r, in_max), layer.in_features) for i, layer in enumerate(layers)])
    b = jnp.stack([draw(i * per_layer + _blocks(r * in_max), (out_max, r), r) for i in range(len(layers))])
    return Projections(A=a.astype(config.dtype), B=b.astype(config.dtype),
                       layers=tuple(layer.path for layer in layers))
