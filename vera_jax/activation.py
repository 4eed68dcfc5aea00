"""`adapt`: run any function of the base params as the adapted model, on the merged or activation path.

The activation path intercepts (`vera_jax.intercept`) the ``__call__`` of every module whose path is an
adapted layer (``nn.Dense``, GPT-2's ``FlaxConv1D``, or any linear module of a Flax linen model) and
returns ``y + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``. No weight is materialised.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vera_jax.adapter import Adapter, LayerVectors, layer_vectors
from vera_jax.intercept import LayerCall, intercept_layers
from vera_jax.merge import merge_layers
from vera_jax.ops import adapter_output, adapter_output_lean, promote_add
from vera_jax.paths import flatten, unflatten
from vera_jax.plan import PATHS, PathPlan
from vera_jax.vectors import full_leaves

__all__ = ["adapt", "module_layout"]


def module_layout(module: nn.Module) -> str | None:
    """The kernel layout a known linear module uses, or None when it is not known."""
    if isinstance(module, nn.Dense):
        return "in_out"
    if type(module).__name__ == "FlaxConv1D":
        return "out_in"
    return None


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


@contextlib.contextmanager
def _on_activations(items: tuple[LayerVectors, ...], adapter: Adapter, dropout_rng: jax.Array | None,
                    lean: bool) -> Iterator[None]:
    """Within this context, every Flax call of one of ``items``' layers gets the VeRA output added.

    Raises:
      ValueError: a layer's module type contradicts ``config.kernel_layout``, its input or output does
        not fit the vectors or projections, or no adapted layer was called at all.
    """
    config = adapter.config
    by_path = {item.layer.path: item for item in items}
    seen: set[str] = set()
    calls = itertools.count()

    def add_adapter_output(call: LayerCall):
        layout = module_layout(call.module)
        if layout is not None and layout != config.kernel_layout:
            raise ValueError(
                f"{call.path!r} is a {type(call.module).__name__}, whose kernel is stored {layout}, but "
                f"VeraConfig.kernel_layout is {config.kernel_layout!r}; set kernel_layout={layout!r}.")
        x, y, item = call.x, call.run(), by_path[call.path]
        a, b = adapter.projections.pair(call.path)
        if x.shape[-1] != item.layer.in_features or y.shape[-1] != item.layer.out_features:
            raise ValueError(
                f"{call.path!r} maps {x.shape[-1]} to {y.shape[-1]} features, but its kernel "
                f"{item.layer.kernel_shape} ({config.kernel_layout}) says {item.layer.in_features} to "
                f"{item.layer.out_features}; apply the model to the params the adapter was built for.")
        x = x.astype(config.dtype)
        if dropout_rng is not None and config.dropout > 0.0:
            x = _dropout(x, config.dropout, jax.random.fold_in(dropout_rng, next(calls)))
        seen.add(call.path)
        output = adapter_output_lean if lean else adapter_output
        delta = output(x, a, b, item.lambda_d.astype(config.dtype), item.lambda_b.astype(config.dtype))
        return promote_add(y, delta)

    with intercept_layers(by_path, add_adapter_output):
        yield
    if not seen:
        raise ValueError(
            f"The activation path saw none of the {len(by_path)} adapted layers (e.g. {next(iter(by_path))!r}) "
            "being called. Call the Flax model inside the adapted function, with the params the adapter was "
            "built for.")


def adapt(fn: Callable, adapter: Adapter, *, path: str | PathPlan = "merged",
          dropout_rng: jax.Array | None = None) -> Callable:
    """Wrap ``fn(params, *args, **kwargs)`` so that it runs the adapted model.

    Example: ``logits = adapt(apply_fn, adapter, path="activation")(params, batch)``.

    Args:
      fn: any function whose first argument is the base params tree.
      adapter: the `vera_jax.Adapter` (its trainable tree is what a training step differentiates).
      path: ``"merged"`` builds W0 + delta_W and calls ``fn`` with those params (any function works);
        ``"activation"`` adds the VeRA output to the layer outputs (Flax linen models; supports
        dropout); ``"activation-lean"`` does so with a backward pass that keeps only the r-sized
        intermediate; a `PathPlan` (from `plan_paths` or `whole_step_plan`) picks per layer.
      dropout_rng: key for ``config.dropout``; applied on the activation path only.

    Raises:
      ValueError: an unknown path, dropout asked of the merged path, or an adapter that does not fit
        the params ``fn`` is called with.
    """
    if not isinstance(path, PathPlan) and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or a vera_jax.PathPlan, got {path!r}.")
    if path == "merged" and dropout_rng is not None and adapter.config.dropout > 0.0:
        raise ValueError("VeRA dropout acts on activations: use path='activation' to train with dropout.")

    def adapted(params, *args, **kwargs):
        items = layer_vectors(params, adapter)  # fail early, with names, on a mismatch
        if isinstance(path, PathPlan):
            merged = path.merged
        else:
            merged = {item.layer.path for item in items} if path == "merged" else set()
        params = merge_layers(params, [i for i in items if i.layer.path in merged], adapter)
        params = unflatten(flatten(params) | full_leaves(adapter.trainable))
        on_activations = tuple(i for i in items if i.layer.path not in merged)
        if not on_activations:
            return fn(params, *args, **kwargs)
        with _on_activations(on_activations, adapter, dropout_rng, lean=path == "activation-lean"):
            return fn(params, *args, **kwargs)

    return adapted
