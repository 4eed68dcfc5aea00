"""The adapted NNX model as a pure function of (params, adapter): the pure view on either path.

`vera_jax.nnx.split` gives the base model's graphdef, its params and an `Adapter`; with ``vera_jax.merge``
that runs the merged path. `functional` runs the model's own adapted modules instead, so the activation
path (no delta materialised) is a pure function too, for ``jax.grad`` over ``adapter.trainable``, optax,
``jax.vmap`` and checkpoints of the adapter alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from vera_jax.adapter import Adapter, layer_vectors
from vera_jax.nnx.attach import PATHS, adapted_modules, adapter_config
from vera_jax.nnx.modules import PROJECTIONS, dropping, model_record
from vera_jax.paths import SEP, flatten, unflatten

__all__ = ["functional"]


def functional(model: nnx.Module, *, path: str | None = None) -> Callable:
    """``call(params, adapter, *args, stream_keys=None, dropout_key=None, **kwargs)``: ``model(*args, **kwargs)``
    with the base's ``params`` (as `vera_jax.nnx.split` gives them) and ``adapter``'s vectors and A/B, on ``path``.

    The model is only a template: its own values are not read for the leaves ``params`` and ``adapter``
    give, and nothing is written to it. Its RNG streams (a dropout's) start from the template's keys, or from
    ``stream_keys`` (``{"dropout": key}``: each named stream reseeded from its key, split to the stream's shape
    for stacked layers, as ``nnx.reseed(..., policy="match_shape")`` does), so a training step passes a new key.
    ``dropout_key`` draws VeRA's own dropout (``config.dropout`` on each adapted layer's input, activation path
    only; as ``dropout_rng`` of `vera_jax.adapt`); None runs without it. Leaves of ``adapter.trainable`` that are
    not VeRA vectors (its ``modules_to_save``, a head trained in full) replace the base's.

    Args:
      model: a model adapted by `vera_jax.nnx.attach`.
      path: ``"merged"`` or ``"activation"``; None keeps the path it was attached with.

    Raises:
      ValueError: an unknown path, or (when called) an adapter that does not fit the model, or a
        ``dropout_key`` on the merged path with ``config.dropout`` > 0.
    """
    model_record(model)
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}.")
    modules = adapted_modules(model)
    attached = {name: module.vera_path for name, module in modules.items()}
    for module in modules.values():
        module.vera_path = path or module.vera_path
    try:
        graphdef, template = nnx.split(model)
    finally:
        for name, module in modules.items():
            module.vera_path = attached[name]
    layout = nnx.to_pure_dict(template)

    def call(params, adapter: Adapter, *args, stream_keys: dict | None = None, dropout_key: jax.Array | None = None,
             **kwargs):
        config, layers = adapter_config(model, adapter, params)  # shapes only: fine under jit
        layer_vectors(params, adapter.replace(config=config), layers=layers)
        flat = flatten(params) | flatten(adapter.trainable)
        flat |= {f"{PROJECTIONS}{SEP}A": adapter.projections.A, f"{PROJECTIONS}{SEP}B": adapter.projections.B}
        state = jax.tree.map(lambda leaf: leaf, template)  # fresh variables, filled below
        nnx.replace_by_pure_dict(state, unflatten(flat, like=layout))
        adapted = nnx.merge(graphdef, state)
        if stream_keys:
            nnx.reseed(adapted, policy="match_shape", **stream_keys)
        with dropping(dropout_key):
            return adapted(*args, **kwargs)

    return call
