"""Tiny models for the NNX and stacked-layer tests: Einsum attention with kernels of rank 3 and 4, and a
linen ``nn.scan`` stack with the layer axis at 1 (MaxText's layout)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

D, N, H, K = 16, 4, 4, 2  # model width, query heads, head size, key/value heads


class EinsumAttention(nnx.Module):
    """Gemma-style attention: q (D, N, H), fused kv (2, K, D, H), out (N, H, D), all ``nnx.Einsum``."""

    def __init__(self, rngs: nnx.Rngs):
        self.q_einsum = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), rngs=rngs)
        self.kv_einsum = nnx.Einsum("BSD,CKDH->CBSKH", (2, K, D, H), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (N, H, D), (D,), rngs=rngs)
        self.head = nnx.Linear(D, 5, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        q = self.q_einsum(x)
        k, v = self.kv_einsum(x)
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        weights = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(H), axis=-1)
        out = x + self.attn_vec_einsum(jnp.einsum("BNTS,BSNH->BTNH", weights, v))
        return self.head(out)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(2 * D, name="up")(x)
        return x + nn.Dense(D, name="down")(jax.nn.gelu(h)), None


class LinenScanStack(nn.Module):
    """L blocks under ``nn.scan`` with every parameter's layer axis at 1: kernels (in, L, out)."""

    layers: int = 3

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(LinenBlock, variable_axes={"params": 1}, split_rngs={"params": True}, length=self.layers,
                        metadata_params={nn.PARTITION_NAME: None})
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(3, name="head")(x)


class LinenUnrolled(nn.Module):
    """The same blocks one by one: ``blocks_0``, ``blocks_1``, ... with (in, out) kernels."""

    layers: int = 3

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x, _ = LinenBlock(name=f"blocks_{i}")(x, None)
        return nn.Dense(3, name="head")(x)


def unrolled_params(stacked: dict, layers: int) -> dict:
    """The scanned stack's params laid out for `LinenUnrolled`: layer i is the slice [:, i] of each leaf."""
    params = {name: value for name, value in stacked.items() if name != "blocks"}
    for i in range(layers):
        params[f"blocks_{i}"] = jax.tree.map(lambda leaf: jnp.take(leaf, i, axis=1), stacked["blocks"])
    return params


class RematScanStack(nnx.Module):
    """Three Linear blocks built with ``nnx.vmap``, run with ``nnx.scan`` over an ``nnx.remat`` body."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return nnx.Linear(D, D, rngs=rngs)

        self.blocks = blocks(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def run(x, block):
            return x + jnp.tanh(block(x))

        return run(x, self.blocks)


def _partitioned(*names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


class ShardedStack(nnx.Module):
    """Megatron-style sharded kernels over a ``model`` mesh axis: Einsums of (D, N, H) sharded over their
    heads (N) or their last axis (H), one of (N, H, D) sharded by rows (N), and a scanned stack of MLP
    blocks (up (D, 4D) sharded by columns, down (4D, D) by rows)."""

    def __init__(self, rngs: nnx.Rngs):
        self.heads = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), kernel_init=_partitioned(None, "model", None), rngs=rngs)
        self.values = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), kernel_init=_partitioned(None, None, "model"), rngs=rngs)
        self.mix = nnx.Einsum("BTNH,NHE->BTE", (N, H, D), kernel_init=_partitioned("model", None, None), rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
        def blocks(rngs):
            return MLPBlock(rngs)

        self.blocks = blocks(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.mix(self.heads(x) * self.values(x))

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: None})
        def run(x, block):
            return block(x)

        return run(x, self.blocks)


class MLPBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(D, 4 * D, kernel_init=_partitioned(None, "model"), use_bias=False, rngs=rngs)
        self.down = nnx.Linear(4 * D, D, kernel_init=_partitioned("model", None), use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(x)))
