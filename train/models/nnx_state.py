"""An NNX model rebuilt around new values: how our NNX models run as pure functions of a params dict."""

from __future__ import annotations

import jax
from flax import nnx

__all__ = ["holding"]


def holding(graphdef: nnx.GraphDef, state: nnx.State, params: dict) -> nnx.Module:
    """The module of ``graphdef`` and ``state`` with ``params`` (a pure dict, all or part of the state's values) in
    place of the values it names; ``state`` itself is not written (nothing is copied eagerly under jit)."""
    state = jax.tree.map(lambda leaf: leaf, state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
