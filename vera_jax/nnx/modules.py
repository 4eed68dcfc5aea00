"""What an adapted NNX module and model do when called.

An adapted module's class is a subclass of its own whose ``__call__`` adds VeRA: on the merged path the
delta is folded into the kernel for the call, on the activation path VeRA's output is added to the
module's. A and B are not in the layers' state (a scan over stacked layers would slice them): the
adapted model's ``__call__`` hands them to its layers through a context for the call. Within
`vera_jax.nnx.mixed`, the context also carries each example's adapter id and the layers gather each
example's vectors (always on the activation path: no kernel is copied per adapter).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import zlib
from collections.abc import Iterator

import flax.errors
import jax
from flax import nnx

from vera_jax.axes import delta_to_kernel
from vera_jax.calls import CallSpec, adapter_call_output
from vera_jax.config import VeraConfig
from vera_jax.layers import LAYER_INDEX, VECTOR_NAMES, AdaptedLayer, trained_vectors
from vera_jax.multi import gather_rows
from vera_jax.ops import delta_weight, dropout, promote_add
from vera_jax.projections import Projections
from vera_jax.vectors import initial_vector

__all__ = ["LayerRecord", "ModelRecord", "Binding", "bound", "binding", "dropping", "model_record", "adapted_class",
           "is_adapted_layer", "is_adapted_model", "PROJECTIONS"]

PROJECTIONS = "vera_projections"


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What an adapted module needs at call time (static, hashable): its layer, config and call (None for a
    module known by a roles rule only: merged path only)."""

    layer: AdaptedLayer
    config: VeraConfig
    call: CallSpec | None


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """What the adapted model records (static): the full config (its modules' stated kernel axes first),
    those stated axes, the generator and the pair's layers."""

    config: VeraConfig
    stated: tuple[tuple[str, str], ...]
    generator: str
    projection_layers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Binding:
    """A and B for the adapted layers during a call; ``adapter_ids`` (batch,) in a mixed-adapter call."""

    projections: Projections
    adapter_ids: jax.Array | None = None


_BINDING: contextvars.ContextVar[Binding | None] = contextvars.ContextVar("vera_jax_nnx_binding", default=None)


@contextlib.contextmanager
def binding(value: Binding) -> Iterator[None]:
    """Within the context, the adapted layers run with ``value``."""
    token = _BINDING.set(value)
    try:
        yield
    finally:
        _BINDING.reset(token)


_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("vera_jax_nnx_dropout", default=None)


@contextlib.contextmanager
def dropping(key: jax.Array | None) -> Iterator[None]:
    """Within the context, adapted layers on the activation path apply ``config.dropout`` to their input, each
    layer with its own key from ``key`` (folded with its path and, in a stack, its layer index); None: no dropout."""
    token = _DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


def _layer_dropout_key(module: nnx.Module, key: jax.Array) -> jax.Array:
    """One layer's dropout key: ``key`` folded with its path (and its index within a stack)."""
    key = jax.random.fold_in(key, zlib.crc32(module.vera_layer.layer.path.encode()) & 0x7FFFFFFF)
    index = getattr(module, LAYER_INDEX, None)
    return key if index is None else jax.random.fold_in(key, index.get_value().reshape(()))


def model_record(model: nnx.Module) -> ModelRecord:
    """The adapted model's record.

    Raises:
      ValueError: ``model`` has no VeRA attached.
    """
    info = getattr(model, "vera_model", None)
    if not isinstance(info, ModelRecord):
        raise ValueError(f"This {type(model).__name__} has no VeRA attached; call vera_jax.nnx.attach(model, config).")
    return info


@contextlib.contextmanager
def bound(model: nnx.Module) -> Iterator[None]:
    """Within the context, the adapted layers of ``model`` use its A and B (its ``__call__`` does this itself;
    inside `vera_jax.nnx.mixed`, the mixed call's binding stays).

    Raises:
      ValueError: ``model`` has no VeRA attached.
    """
    info = model_record(model)
    current = _BINDING.get()
    if current is not None and current.adapter_ids is not None:
        yield
        return
    pair = getattr(model, PROJECTIONS)
    with binding(Binding(Projections(pair.A.get_value(), pair.B.get_value(), info.projection_layers))):
        yield


def _current_binding(path: str) -> Binding:
    value = _BINDING.get()
    if value is None:
        raise ValueError(f"The VeRA layer {path!r} ran outside its model's call, so it has no A and B. Call the model "
                         "itself, or wrap the call: `with vera_jax.nnx.bound(model): model.method(...)`.")
    return value


def _vector(module: nnx.Module, name: str, adapter_ids: jax.Array | None) -> jax.Array:
    """One layer's vector in ``config.dtype``: the variable (each example's row in a mixed call), or a
    frozen vector's constant."""
    record: LayerRecord = module.vera_layer
    layer, config = record.layer, record.config
    if name not in trained_vectors(config):
        return initial_vector(config, name, dataclasses.replace(layer, layers=None))
    value = getattr(module, name).get_value()
    one = layer.vector_shape(name, config.r)[-1:]
    expected = one if adapter_ids is None else (None,) + one
    if value.ndim != len(expected) or value.shape[-1] != one[0]:
        fix = ("run a stack one layer at a time (nnx.scan), and K stacked adapters through vera_jax.nnx.mixed"
               if adapter_ids is None else "give vera_jax.nnx.mixed adapters stacked by vera_jax.stack")
        raise ValueError(f"{layer.path!r} runs with {name} of shape {value.shape}, not {one} per adapter and "
                         f"layer: {fix}.")
    if adapter_ids is not None:
        value = gather_rows(value, adapter_ids)  # (batch, n)
    return value.astype(config.dtype)


def _layer_call(self, *args, **kwargs):
    """An adapted module's ``__call__``: its own class's call with VeRA added."""
    record: LayerRecord = self.vera_layer
    layer = record.layer
    base_call = type(self).__mro__[1].__call__
    context = _current_binding(layer.path)
    a, b = context.projections.pair(layer.path)
    lambda_d, lambda_b = (_vector(self, name, context.adapter_ids) for name in VECTOR_NAMES)
    kernel_shape = layer.layer_kernel_shape
    dropout_key = _DROPOUT_KEY.get() if record.config.dropout > 0.0 and context.adapter_ids is None else None
    if self.vera_path == "merged" and dropout_key is not None:
        raise ValueError(f"VeRA dropout acts on {layer.path!r}'s input, which the merged path never computes: attach "
                         "with path='activation' (or call vera_jax.nnx.functional with path='activation').")
    if self.vera_path == "merged" and context.adapter_ids is None:
        delta = delta_weight(a, b, lambda_d, lambda_b, layer.in_features)
        kernel = getattr(self, layer.weight)
        base = kernel.get_value()
        merged = promote_add(base, delta_to_kernel(delta, layer.axes.replace("l", ""), kernel_shape))
        try:
            kernel.set_value(merged)
        except flax.errors.TraceContextError:  # the kernel belongs to an outer trace (closed over, not passed in)
            copy = nnx.clone(self)  # this module alone, its variables made in the current trace
            getattr(copy, layer.weight).set_value(merged)
            return base_call(copy, *args, **kwargs)
        try:
            return base_call(self, *args, **kwargs)
        finally:
            kernel.set_value(base)
    if record.call is None:
        raise ValueError(f"{layer.path!r} is known by a roles rule only, which does not say where its output puts the "
                         "output axes, so it runs on the merged path only (not in vera_jax.nnx.mixed); write its "
                         "VeraConfig.kernel_axes rule as the einsum its call computes.")
    x = args[0] if args else next(iter(kwargs.values()))
    y = base_call(self, *args, **kwargs)
    x = x.astype(record.config.dtype)
    if dropout_key is not None:
        x = dropout(x, record.config.dropout, _layer_dropout_key(self, dropout_key))
    return promote_add(y, adapter_call_output(x, record.call, kernel_shape, a, b, lambda_d, lambda_b))


def _model_call(self, *args, **kwargs):
    """The adapted model's ``__call__``: its own class's call, with A and B handed to the adapted layers."""
    with bound(self):
        return type(self).__mro__[1].__call__(self, *args, **kwargs)


_LAYER, _MODEL = "layer", "model"
_CALLS = {_LAYER: _layer_call, _MODEL: _model_call}


@functools.cache
def _subclass(kind: str, base: type) -> type:
    """One subclass per (kind, module class), so graphdefs of adapted models compare equal."""
    return type(base)(f"Vera{base.__name__}", (base,),
                      {"__module__": base.__module__, "__call__": _CALLS[kind], "_vera_kind": kind})


def adapted_class(module: nnx.Module, *, model: bool) -> type:
    """The adapted subclass of ``module``'s class: a model's or a layer's."""
    return _subclass(_MODEL if model else _LAYER, type(module))


def is_adapted_layer(module: nnx.Module) -> bool:
    return type(module).__dict__.get("_vera_kind") == _LAYER


def is_adapted_model(module: nnx.Module) -> bool:
    return type(module).__dict__.get("_vera_kind") == _MODEL
