"""Which adapted layers read one input, found by tracing the model: `shared_input_groups`.

Layers that read one input (q/k/v, gate/up) share ``x A^T`` on the activation path, so their cost is
a group's, not each layer's; `vera_jax.timing.measured_plan` times such groups together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax

from vera_jax.config import VeraConfig
from vera_jax.intercept import LayerCall, intercept_layers
from vera_jax.layers import find_layers

__all__ = ["shared_input_groups"]


def shared_input_groups(fn: Callable, params: Mapping, config: VeraConfig, *args) -> tuple[tuple[str, ...], ...]:
    """The adapted layers grouped by the input they read, found by tracing ``fn(params, *args)`` (no compute).

    ``args`` may be ``jax.ShapeDtypeStruct``; e.g. ``(('.../q_proj', '.../k_proj', '.../v_proj'), ...)``.
    """
    layers = find_layers(params, config)
    adapted = {layer.path for layer in layers}
    readers: dict[int, list[str]] = {}
    inputs = []  # keeps every traced input alive, so that no id is reused while tracing

    def record(call: LayerCall):
        inputs.append(call.x)
        readers.setdefault(id(call.x), []).append(call.path)
        return call.run()

    def traced(params, *args):
        with intercept_layers(adapted, record):
            return fn(params, *args)

    jax.eval_shape(traced, params, *args)
    order = {layer.path: i for i, layer in enumerate(layers)}
    groups = {tuple(sorted(set(paths), key=order.__getitem__)) for paths in readers.values()}
    missing = adapted.difference(*groups)
    return tuple(sorted(groups | {(path,) for path in missing}, key=lambda group: order[group[0]]))
