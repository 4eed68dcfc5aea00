"""Mixed-adapter batches on an adapted NNX model: example i runs with adapter ``adapter_ids[i]`` of a stack.

The frozen layers and ``x @ A.T`` run once for the whole batch; only the vectors are gathered per
example, on the activation path whatever the model's path, so no kernel is ever copied per adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from vera_jax.adapter import Adapter, layer_vectors
from vera_jax.layers import trained_vectors
from vera_jax.multi import check_adapter_ids, first_adapter, num_adapters
from vera_jax.nnx.attach import base_params, adapted_modules, adapter_config
from vera_jax.nnx.modules import Binding, binding
from vera_jax.paths import SEP, flatten

__all__ = ["mixed"]


@contextlib.contextmanager
def mixed(model: nnx.Module, stacked: Adapter, adapter_ids: jax.Array) -> Iterator[None]:
    """Within the context, example i of every call of ``model`` runs with adapter ``adapter_ids[i]``.

    The model's vectors are swapped for the stack's for the duration (a stack of L layers holds them as
    (L, K, n), so that ``nnx.scan`` slices its layer axis) and put back on exit; it works eagerly and
    inside ``nnx.jit`` (pass the model, the stacked adapter and the ids as arguments).

    Args:
      model: a model adapted by `vera_jax.nnx.attach`, called on inputs whose leading axis is the batch.
      stacked: K adapters of the model's config, from `vera_jax.stack` (e.g. of `vera_jax.nnx.split` adapters).
      adapter_ids: (batch,) integers in [0, K).

    Raises:
      ValueError: ids out of range or of the wrong type, or adapters that do not fit the model.
    """
    adapter_ids = jnp.asarray(adapter_ids)
    check_adapter_ids(adapter_ids, num_adapters(stacked))
    params = base_params(model)
    config, layers = adapter_config(model, stacked, params)
    layer_vectors(params, first_adapter(stacked).replace(config=config), layers=layers)  # every vector fits
    flat = flatten(stacked.trainable)
    saved = []
    for name, module in adapted_modules(model).items():
        stack_axis = 1 if module.vera_layer.layer.layers else 0
        for vector in trained_vectors(config):
            variable = getattr(module, vector)
            saved.append((variable, variable.get_value()))
            variable.set_value(jnp.moveaxis(flat[name + SEP + vector], 0, stack_axis))
    try:
        with binding(Binding(stacked.projections, adapter_ids)):
            yield
    finally:
        for variable, value in saved:
            variable.set_value(value)
