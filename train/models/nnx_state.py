"""An NNX model rebuilt around new values: how our NNX models run as pure functions of a params dict."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

__all__ = ["holding", "mixed_logits"]


def holding(graphdef: nnx.GraphDef, state: nnx.State, params: dict) -> nnx.Module:
    """The module of ``graphdef`` and ``state`` with ``params`` (a pure dict, all or part of the state's values) in
    place of the values it names; ``state`` itself is not written (nothing is copied eagerly under jit)."""
    state = jax.tree.map(lambda leaf: leaf, state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def mixed_logits(model: nnx.Module, config) -> Callable:
    """``logits(params, stacked, adapter_ids, batch)`` of ``model`` (an NNX model called as ``model(input_ids,
    attention_mask)``) serving many adapters in one batch through `vera_jax.nnx.mixed`: a template adapted with
    ``config`` (a `vera_jax.VeraConfig`) on the activation path, whose own vectors and A/B are never read (the
    stack's are)."""
    import vera_jax.nnx

    graphdef, state = nnx.split(vera_jax.nnx.attach(model, config, path="activation"))

    def logits(params, stacked, adapter_ids, batch):
        adapted = holding(graphdef, state, params)
        with vera_jax.nnx.mixed(adapted, stacked, adapter_ids):
            return adapted(batch["input_ids"], batch["attention_mask"])

    return logits
