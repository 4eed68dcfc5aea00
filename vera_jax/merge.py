"""Merged path: fold every VeRA delta into the kernels, functionally; `unmerge` takes it back out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from vera_jax.axes import delta_to_kernel
from vera_jax.adapter import Adapter, LayerVectors, layer_vectors
from vera_jax.ops import delta_weight, promote_add
from vera_jax.paths import flatten, unflatten
from vera_jax.vectors import full_leaves

__all__ = ["merge", "unmerge", "merge_layers"]


def merge_layers(params: Mapping, items: Iterable[LayerVectors], adapter: Adapter, sign: float = 1.0) -> dict:
    """Add ``sign * delta_W`` to the kernel of each given (already checked) layer; other leaves unchanged."""
    flat = flatten(params)
    config = adapter.config
    for item in items:
        lambda_d = item.lambda_d.astype(config.dtype)
        lambda_b = item.lambda_b.astype(config.dtype)
        a, b = adapter.projections.pair(item.layer.path)
        delta = delta_weight(a, b, lambda_d, lambda_b, item.layer.in_features)  # (out, in) or (L, out, in)
        kernel_path = item.layer.kernel_path
        delta = delta_to_kernel(delta, item.layer.axes, item.layer.kernel_shape)
        flat[kernel_path] = promote_add(flat[kernel_path], sign * delta)
    return unflatten(flat, like=params)


def merge(params: Mapping, adapter: Adapter) -> dict:
    """Params with ``W0 + delta_W`` at every adapted layer and the leaves trained in full swapped in.

    ``delta_W = (lambda_b[:, None] * B[:out]) @ (lambda_d[:, None] * A[:, :in])`` is (out, in), laid
    out as the kernel by its axis roles: a ``Dense`` kernel (in, out) receives its transpose, a
    ``FlaxConv1D`` kernel (out, in) receives it as is, a (D, N, H) kernel ``delta_W.T.reshape(D, N, H)``;
    a stack of L layers gets all L deltas from one contraction. The delta is computed in ``config.dtype`` and added in the wider of that and the kernel's dtype.
    Works with any function that takes params; dropout is not applied (use the activation path).
    """
    merged = flatten(merge_layers(params, layer_vectors(params, adapter), adapter))
    merged.update(full_leaves(adapter.trainable))
    return unflatten(merged, like=params)


def unmerge(params: Mapping, adapter: Adapter) -> dict:
    """Subtract the deltas `merge` added: ``unmerge(merge(p, a), a) == p`` up to float rounding.

    Leaves trained in full (e.g. a trained head) are left as they are in ``params``: `merge` replaced
    them, so there is no original to restore.
    """
    return merge_layers(params, layer_vectors(params, adapter), adapter, -1.0)
