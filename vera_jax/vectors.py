"""The trainable tree: lambda_d / lambda_b per adapted layer, plus leaves trained in full.

The trainable tree mirrors the params tree and is a sub-tree of the combined view: each adapted
layer's module gets ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out,) next to its ``kernel`` (a
stack of L layers: (L, r) and (L, out)); leaves
selected by ``VeraConfig.modules_to_save`` (e.g. ``classifier/kernel``) keep their params paths.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vera_jax.config import VeraConfig
from vera_jax.layers import LAMBDA_D, AdaptedLayer, find_full_leaves, find_layers, is_vector_path, trained_vectors
from vera_jax.paths import SEP, flatten, unflatten

__all__ = ["initial_vector", "init_trainable", "full_leaves"]


def initial_vector(config: VeraConfig, name: str, layer: AdaptedLayer) -> jax.Array:
    """lambda_d: d_initial (r,), or lambda_b: b_initial (out,), with a leading (L,) for a stack, in
    ``config.dtype``; also a frozen vector's value."""
    value = config.d_initial if name == LAMBDA_D else config.b_initial
    return jnp.full(layer.vector_shape(name, config.r), value, dtype=config.dtype)


def init_trainable(params: Mapping, config: VeraConfig, *, layers: tuple[AdaptedLayer, ...] | None = None) -> dict:
    """lambda_d = d_initial (r,) and lambda_b = b_initial (out,) per adapted layer, in ``config.dtype``, plus a
    copy of every leaf ``config.modules_to_save`` selects (e.g. a classifier head).

    With lambda_b = 0 the adapted model starts exactly equal to the base model. Only the vectors
    ``config.train_vectors`` trains are in the tree; a frozen one stays the constant `initial_vector`.
    ``layers``: ``find_layers(params, config)``, where the caller has it already.
    """
    flat_params = flatten(params)
    layers = find_layers(params, config) if layers is None else layers
    flat = {layer.path + SEP + name: initial_vector(config, name, layer)
            for layer in layers for name in trained_vectors(config)}
    flat.update({path: jnp.array(flat_params[path]) for path in find_full_leaves(params, config, layers=layers)})
    return unflatten(flat)


def full_leaves(trainable: Mapping) -> dict:
    """The leaves of a trainable tree that are not VeRA vectors (the leaves trained in full), flat by path."""
    return {path: leaf for path, leaf in flatten(trainable).items() if not is_vector_path(path)}
