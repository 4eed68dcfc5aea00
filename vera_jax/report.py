"""How much VeRA trains: PEFT's one-line parameter report, and a per-layer table."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax

from vera_jax.adapter import Adapter
from vera_jax.config import VeraConfig
from vera_jax.layers import VECTOR_NAMES, AdaptedLayer, find_full_leaves, find_layers, trained_vectors
from vera_jax.paths import flatten

__all__ = ["count_parameters", "parameter_report", "layer_table"]


def _size(leaf) -> int:
    return math.prod(getattr(leaf, "shape", ()))


def count_parameters(params: Mapping, adapter: Adapter) -> tuple[int, int]:
    """``(trainable, all)`` counted as PEFT counts them.

    trainable = sum over adapted layers of (r + out) + the leaves trained in full; all = the base
    params + the vectors + the trained copies of full leaves (PEFT keeps the original and a copy).
    A and B are frozen buffers and are not counted, nor is a vector ``config.train_vectors`` freezes.
    """
    config, flat = adapter.config, flatten(params)
    layers = find_layers(params, config)
    vectors = sum(_vector_sizes(layer, config)[name] for layer in layers for name in trained_vectors(config))
    extra = sum(_size(flat[path]) for path in find_full_leaves(params, config, layers=layers))
    base = sum(_size(leaf) for leaf in jax.tree.leaves(params))
    return vectors + extra, base + vectors + extra


def _vector_sizes(layer: AdaptedLayer, config: VeraConfig) -> dict[str, int]:
    return {name: math.prod(layer.vector_shape(name, config.r)) for name in VECTOR_NAMES}


def parameter_report(params: Mapping, adapter: Adapter) -> str:
    """``'trainable params: N || all params: M || trainable%: P'`` exactly as PEFT prints it."""
    trainable, total = count_parameters(params, adapter)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def layer_table(params: Mapping, adapter: Adapter) -> str:
    """One row per adapted layer: path, kernel shape, in/out used, and the vector sizes ('frozen' if not trained)."""
    config = adapter.config
    rows = [("path", "kernel", "in", "out", "lambda_d", "lambda_b")]
    for layer in find_layers(params, config):
        sizes = _vector_sizes(layer, config)
        vectors = [str(sizes[name]) if name in trained_vectors(config) else "frozen" for name in VECTOR_NAMES]
        rows.append((layer.path, "x".join(map(str, layer.kernel_shape)), str(layer.in_features),
                     str(layer.out_features), *vectors))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
