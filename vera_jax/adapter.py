"""`Adapter`: the one value every public function takes or returns.

An adapter is its config (static), the frozen projections A and B, and the trainable tree (the VeRA
vectors and any leaves trained in full). Its key and recipe follow from the config: A and B are drawn
from ``jax.random.key(config.projection_seed)`` by ``generator``. Training differentiates only
``adapter.trainable``: ``adapter.replace(trainable=new)`` puts updated leaves back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
from flax import struct

from vera_jax.config import VeraConfig
from vera_jax.layers import VECTOR_NAMES, AdaptedLayer, find_full_leaves, find_layers, trained_vectors
from vera_jax.paths import SEP, flatten, unflatten
from vera_jax.projections import GENERATOR, Projections, init_projections, projection_key
from vera_jax.vectors import full_leaves, init_trainable, initial_vector

__all__ = ["Adapter", "init_adapter", "LayerVectors", "layer_vectors", "STORED"]

STORED = "stored"  # the generator of projections read from a file: they cannot be drawn again


@struct.dataclass
class Adapter:
    """One VeRA adapter; a pytree whose leaves are the trainable tree and A, B.

    Attributes:
      trainable: lambda_d (r,) and lambda_b (out,) under each adapted module's path, plus the leaves
        ``config.modules_to_save`` trains in full; a stacked adapter (`vera_jax.stack`) has a leading
        adapter axis (K, ...) on every one of these leaves.
      projections: the frozen ``A (r, in_max)`` and ``B (out_max, r)`` shared by every adapted layer.
      config: what is adapted and how (static).
      generator: how A and B came from ``config.projection_seed`` (static): this library's counter
        stream, PEFT's torch generator, or ``"stored"`` when they were read from a file.
    """

    trainable: dict
    projections: Projections
    config: VeraConfig = struct.field(pytree_node=False)
    generator: str = struct.field(pytree_node=False, default=GENERATOR)

    @property
    def key(self) -> jax.Array:
        """The projection key, ``jax.random.key(config.projection_seed)``."""
        return projection_key(self.config)

    @property
    def redrawable(self) -> bool:
        """Whether A and B can be drawn again here from the key (else a checkpoint must store them)."""
        return self.generator == GENERATOR


def init_adapter(params: Mapping, config: VeraConfig, *, layers: tuple[AdaptedLayer, ...] | None = None) -> Adapter:
    """A new adapter for the layers ``config`` adapts in ``params``.

    A and B are drawn from ``jax.random.key(config.projection_seed)`` (Kaiming-uniform as PEFT, by
    default); lambda_d starts at ``d_initial``, lambda_b at ``b_initial`` (0: the adapted model starts
    equal to the base model), and leaves of ``modules_to_save`` as copies of the base's. Pure: only the
    shapes of ``params`` are read for A and B (``jax.ShapeDtypeStruct`` leaves work with `jax.eval_shape`).
    ``layers``: ``find_layers(params, config)``, where the caller has it already.

    Raises:
      ValueError: the config selects no layer of ``params``, or a target that is not a linear layer.
    """
    layers = find_layers(params, config) if layers is None else layers
    projections = init_projections(params, projection_key(config), config, layers=layers)
    return Adapter(trainable=init_trainable(params, config, layers=layers), projections=projections, config=config)


@dataclasses.dataclass(frozen=True)
class LayerVectors:
    """An adapted layer with its vectors: lambda_d (r,), lambda_b (out,); a stack's (L, r), (L, out)."""

    layer: AdaptedLayer
    lambda_d: jax.Array
    lambda_b: jax.Array


def _shape(leaf) -> tuple[int, ...]:
    return tuple(getattr(leaf, "shape", ()))


def _check_projections(adapter: Adapter, layers: tuple[AdaptedLayer, ...]) -> None:
    config, projections = adapter.config, adapter.projections
    a_shape, b_shape = _shape(projections.A), _shape(projections.B)
    per_layer = config.projection_sharing == "per_layer"
    if {len(a_shape), len(b_shape)} != {3 if per_layer else 2}:
        raise ValueError(
            f"Projections A {a_shape} and B {b_shape} are not the "
            f"{'(layers, r, in_max) and (layers, out_max, r)' if per_layer else '(r, in_max) and (out_max, r)'} "
            f"that projection_sharing={config.projection_sharing!r} needs; build the adapter with "
            "vera_jax.init_adapter(params, config).")
    if a_shape[-2] != config.r or b_shape[-1] != config.r:
        raise ValueError(f"Projections A {a_shape} and B {b_shape} do not have rank r={config.r}; build the "
                         "adapter with vera_jax.init_adapter(params, config).")
    if per_layer and (projections.layers != tuple(layer.path for layer in layers)
                      or not a_shape[0] == b_shape[0] == len(layers)):
        raise ValueError("These per-layer projections were drawn for other layers than the config adapts in these "
                         "params; build the adapter with vera_jax.init_adapter(params, config).")
    in_max, out_max = a_shape[-1], b_shape[-2]
    for layer in layers:
        if layer.in_features > in_max or layer.out_features > out_max:
            raise ValueError(
                f"Projections A {a_shape} / B {b_shape} are too small for {layer.path!r}, which needs "
                f"in={layer.in_features}, out={layer.out_features}; build the adapter on these params.")


def layer_vectors(params: Mapping, adapter: Adapter, *,
                  layers: tuple[AdaptedLayer, ...] | None = None) -> tuple[LayerVectors, ...]:
    """Pair every adapted layer with its vectors, checking that the adapter fits ``params``.

    A vector that ``config.train_vectors`` freezes is its constant `initial_vector`. ``layers``:
    ``find_layers(params, adapter.config)``, where the caller has it already.

    Raises:
      ValueError: a layer lacks vectors, vectors name a layer that is not adapted, a vector or a leaf
        trained in full has the wrong shape, or the projections do not fit the layers.
    """
    config = adapter.config
    layers = find_layers(params, config) if layers is None else layers
    flat = flatten(adapter.trainable)
    flat_params = flatten(params)
    # A frozen tree from `split` lacks the leaves trained in full: look for them in both trees.
    full = set(find_full_leaves(unflatten(flat_params | full_leaves(adapter.trainable)), config, layers=layers))
    vector_paths = {layer.path + SEP + name for layer in layers for name in trained_vectors(config)}
    missing = sorted(vector_paths - set(flat))
    unexpected = sorted(set(flat) - vector_paths - full)
    if missing or unexpected:
        raise ValueError(
            "The adapter's trainable tree does not fit these params and config: "
            f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''} "
            f"({len(missing)} in all), unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} "
            f"({len(unexpected)} in all). Build it with vera_jax.init_adapter(params, config) for the same "
            "params and config.")
    _check_projections(adapter, layers)
    for path in full & set(flat) & set(flat_params):
        if _shape(flat[path]) != _shape(flat_params[path]):
            raise ValueError(f"Trainable leaf {path!r} has shape {_shape(flat[path])} but the params leaf has "
                             f"{_shape(flat_params[path])}; the adapter was built for another model.")
    result = []
    for layer in layers:
        lambda_d, lambda_b = (flat.get(layer.path + SEP + name, initial_vector(config, name, layer))
                              for name in VECTOR_NAMES)
        wanted_d, wanted_b = (layer.vector_shape(name, config.r) for name in VECTOR_NAMES)
        if _shape(lambda_d) != wanted_d or _shape(lambda_b) != wanted_b:
            raise ValueError(
                f"Vectors of {layer.path!r} have shapes lambda_d {_shape(lambda_d)} and lambda_b {_shape(lambda_b)}; "
                f"this layer (kernel {layer.kernel_shape}, axes {layer.axes!r}) needs lambda_d {wanted_d} and "
                f"lambda_b {wanted_b}. Check VeraConfig.kernel_axes and build the adapter with "
                "vera_jax.init_adapter(params, config).")
        result.append(LayerVectors(layer, lambda_d, lambda_b))
    return tuple(result)
