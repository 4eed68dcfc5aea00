"""The trainable tree: lambda_d / lambda_b per adapted layer, plus leaves trained in full.

The trainable tree mirrors the params tree and is a sub-tree of the combined view: each adapted
layer's module gets ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out,) next to its ``kernel``; leaves
selected by ``VeraConfig.trainable`` (e.g. ``classifier/kernel``) keep their params paths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vera_jax.config import VeraConfig
from vera_jax.layers import LAMBDA_D, VECTOR_NAMES, AdaptedLayer, find_layers, find_trainable_leaves, trained_vectors
from vera_jax.paths import SEP, flatten, unflatten

__all__ = ["init_vectors", "init_trainable", "LayerVectors", "layer_vectors", "extra_leaves", "initial_vector"]


def initial_vector(config: VeraConfig, name: str, out_features: int) -> jax.Array:
    """lambda_d: d_initial (r,), or lambda_b: b_initial (out,), in ``config.dtype``; also a frozen vector's value."""
    if name == LAMBDA_D:
        return jnp.full((config.r,), config.d_initial, dtype=config.dtype)
    return jnp.full((out_features,), config.b_initial, dtype=config.dtype)


def init_vectors(params: Mapping, config: VeraConfig) -> dict:
    """lambda_d = d_initial (r,) and lambda_b = b_initial = 0 (out,) per adapted layer, in ``config.dtype``.

    With lambda_b = 0 the adapted model starts exactly equal to the base model. Only the vectors
    ``config.train_vectors`` trains are in the tree; a frozen one stays the constant `initial_vector`.
    """
    return unflatten({layer.path + SEP + name: initial_vector(config, name, layer.out_features)
                      for layer in find_layers(params, config) for name in trained_vectors(config)})


def init_trainable(params: Mapping, config: VeraConfig) -> dict:
    """`init_vectors` plus a copy of every leaf ``config.trainable`` selects (e.g. a classifier head)."""
    flat_params = flatten(params)
    flat = flatten(init_vectors(params, config))
    flat.update({path: jnp.array(flat_params[path]) for path in find_trainable_leaves(params, config)})
    return unflatten(flat)


@dataclasses.dataclass(frozen=True)
class LayerVectors:
    """An adapted layer with its vectors: lambda_d (r,), lambda_b (out,)."""

    layer: AdaptedLayer
    lambda_d: jax.Array
    lambda_b: jax.Array


def _shape(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def layer_vectors(params: Mapping, trainable: Mapping, projections) -> tuple[LayerVectors, ...]:
    """Pair every adapted layer with its vectors, checking that trainable and projections fit params.

    Raises:
      ValueError: a layer lacks vectors, vectors name a layer that is not adapted, a vector or an extra
        leaf has the wrong shape, or the projections are too small for a layer.
    """
    config = projections.config
    layers = find_layers(params, config)
    flat = flatten(trainable)
    flat_params = flatten(params)
    # A frozen tree from `split` lacks the leaves trained in full: look for them in both trees.
    extra = set(find_trainable_leaves(unflatten(flat_params | extra_leaves(trainable)), config))
    vector_paths = {layer.path + SEP + name for layer in layers for name in trained_vectors(config)}
    missing = sorted(vector_paths - set(flat))
    unexpected = sorted(set(flat) - vector_paths - extra)
    if missing or unexpected:
        raise ValueError(
            "The trainable tree does not fit these params and config: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''} "
            f"({len(missing)} in all), unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} "
            f"({len(unexpected)} in all). Build it with vera_jax.init_trainable(params, config) for the same "
            "params and config."
        )
    r, in_max = _shape(projections.A)[-2:]
    out_max, r_b = _shape(projections.B)[-2:]
    if r != config.r or r_b != config.r:
        raise ValueError(
            f"Projections A {projections.A.shape} and B {projections.B.shape} do not have rank r={config.r}; "
            "rebuild them with vera_jax.init_projections(params, key, config)."
        )
    per_layer = config.projection_sharing == "per_layer"
    if {len(_shape(projections.A)), len(_shape(projections.B))} != {3 if per_layer else 2}:
        raise ValueError(
            f"Projections A {_shape(projections.A)} and B {_shape(projections.B)} are not the "
            f"{'(layers, r, in_max) and (layers, out_max, r)' if per_layer else '(r, in_max) and (out_max, r)'} "
            f"that projection_sharing={config.projection_sharing!r} needs; rebuild them with "
            "vera_jax.init_projections(params, key, config)."
        )
    if per_layer and (projections.layers != tuple(layer.path for layer in layers)
                      or not _shape(projections.A)[0] == _shape(projections.B)[0] == len(layers)):
        raise ValueError("These per-layer projections were drawn for other layers than the config adapts in these "
                         "params; rebuild them with vera_jax.init_projections(params, key, config).")
    for path in extra & set(flat) & set(flat_params):
        if _shape(flat[path]) != _shape(flat_params[path]):
            raise ValueError(
                f"Trainable leaf {path!r} has shape {_shape(flat[path])} but the params leaf has "
                f"{_shape(flat_params[path])}; the trainable tree was built for another model."
            )
    result = []
    for layer in layers:
        lambda_d, lambda_b = (flat.get(layer.path + SEP + name, initial_vector(config, name, layer.out_features))
                              for name in VECTOR_NAMES)
        if _shape(lambda_d) != (config.r,) or _shape(lambda_b) != (layer.out_features,):
            raise ValueError(
                f"Vectors of {layer.path!r} have shapes lambda_d {_shape(lambda_d)} and lambda_b {_shape(lambda_b)}; "
                f"this layer (kernel {layer.kernel_shape}, layout {config.kernel_layout}) needs "
                f"lambda_d ({config.r},) and lambda_b ({layer.out_features},). Check VeraConfig.kernel_layout "
                "and rebuild the vectors with vera_jax.init_trainable(params, config)."
            )
        if layer.in_features > in_max or layer.out_features > out_max:
            raise ValueError(
                f"Projections A {projections.A.shape} / B {projections.B.shape} are too small for {layer.path!r}, "
                f"which needs in={layer.in_features}, out={layer.out_features}; rebuild them with "
                "vera_jax.init_projections(params, key, config) on these params."
            )
        result.append(LayerVectors(layer, lambda_d, lambda_b))
    return tuple(result)


def extra_leaves(trainable: Mapping) -> dict:
    """The leaves of the trainable tree that are not VeRA vectors, flat by path."""
    return {path: leaf for path, leaf in flatten(trainable).items() if path.rsplit(SEP, 1)[-1] not in VECTOR_NAMES}
