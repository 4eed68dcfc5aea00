"""`adapt`: run any function of the base params as the adapted model, on the merged or activation path.

The activation path intercepts (`vera_jax.intercept`) the ``__call__`` of every module whose path is an
adapted layer (``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, GPT-2's ``FlaxConv1D``, or any linear
module of a Flax linen model) and returns ``y + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``,
laid out as y (`vera_jax.calls`). No weight is materialised. Inside a linen ``nn.scan`` each iteration
needs its own layer's vectors: a stack's vectors travel in the params tree beside its kernel, with the
layer axis where the scan slices it, and the call reads its slice there.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from vera_jax.adapter import Adapter, LayerVectors, layer_vectors
from vera_jax.axes import layer_axis
from vera_jax.calls import CallSpec, adapter_call_output, einsum_call, module_call
from vera_jax.intercept import LayerCall, intercept_layers
from vera_jax.layers import LAMBDA_B, LAMBDA_D, LAYER_INDEX, AdaptedLayer
from vera_jax.merge import merge_layers
from vera_jax.ops import dropout, promote_add
from vera_jax.paths import SEP, flatten, unflatten
from vera_jax.plan import PATHS, PathPlan
from vera_jax.vectors import full_leaves

__all__ = ["adapt", "call_spec"]



def call_spec(call: LayerCall, layer: AdaptedLayer) -> CallSpec:
    """The call's spec (`vera_jax.calls.module_call`), checking the roles of the adapted kernel against what its
    module states; a module of unknown kind runs the einsum its rule gives.

    Raises:
      ValueError: the module states other roles, or a module of unknown kind has a roles rule only (which
        says nothing of where its output puts the output axes), or as `vera_jax.calls.module_call`.
    """
    roles = layer.axes
    stated = module_call(call.module, call.path)
    if stated is None:
        if layer.equation is None:
            raise ValueError(
                f"{call.path!r} is a {type(call.module).__name__}, a module vera_jax does not know, and its "
                f"VeraConfig.kernel_axes rule gives roles {roles!r} only, which do not say where its output puts the "
                "output axes; write the rule as the einsum the module computes, e.g. "
                "{'<pattern>': 'kernel:BTD,DNH->BTNH'} (the merged path needs roles only).")
        return einsum_call(layer.equation, 1, repr(call.path))
    if stated.roles != roles.replace("l", ""):
        raise ValueError(
            f"{call.path!r} is a {type(call.module).__name__} whose kernel axes are {stated.roles!r}, but the adapter "
            f"takes them as {roles!r}; set VeraConfig.kernel_axes={{'.*': {stated.roles!r}}} (with 'l' where a "
            "stack has its layer axis) for such modules.")
    return stated.call


def stack_leaves(items: tuple[LayerVectors, ...], dropout: bool) -> dict:
    """The leaves a stack's vectors add beside its kernel for a linen ``nn.scan`` to slice: the vectors (and
    the layer index, with ``dropout``), each with its layer axis where the kernel has it (0, or 1 as in
    MaxText, where the scan slices every leaf of the layer at axis 1)."""
    leaves = {}
    for item in items:
        if item.layer.layers is None:
            continue
        axis = min(layer_axis(item.layer.axes), 1)
        path = item.layer.path + SEP
        leaves[path + LAMBDA_D] = jnp.moveaxis(item.lambda_d, 0, axis)
        leaves[path + LAMBDA_B] = jnp.moveaxis(item.lambda_b, 0, axis)
        if dropout:  # (L,), or (1, L) where the scan slices axis 1
            leaves[path + LAYER_INDEX] = jnp.arange(item.layer.layers, dtype=jnp.int32).reshape((1,) * axis + (-1,))
    return leaves


@contextlib.contextmanager
def _on_activations(items: tuple[LayerVectors, ...], adapter: Adapter, dropout_rng: jax.Array | None,
                    lean: bool) -> Iterator[None]:
    """Within this context, every Flax call of one of ``items``' layers gets the VeRA output added.

    Raises:
      ValueError: a layer's module states other kernel axes than the adapter's, its input does not fit
        the kernel, or no adapted layer was called at all.
    """
    config = adapter.config
    by_path = {item.layer.path: item for item in items}
    seen: set[str] = set()
    calls = itertools.count()

    def add_adapter_output(call: LayerCall):
        item = by_path[call.path]
        layer = item.layer
        spec = call_spec(call, layer)
        x, y = call.x, call.run()
        a, b = adapter.projections.pair(call.path)
        lambda_d, lambda_b = item.lambda_d, item.lambda_b
        key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, next(calls))
        if layer.layers is not None:  # one iteration of a scan over the stack: its slice travels with the kernel
            own = call.module.variables["params"]
            lambda_d, lambda_b = own[LAMBDA_D], own[LAMBDA_B]
            key = None if key is None else jax.random.fold_in(key, own[LAYER_INDEX].reshape(()))
        if lambda_b.shape != (layer.out_features,):
            raise ValueError(f"{call.path!r} runs with vectors of shape {lambda_b.shape}, not the ({layer.out_features},) "
                             "of one layer: a stack's layers must be run one at a time (nn.scan or a loop).")
        x = x.astype(config.dtype)
        if key is not None and config.dropout > 0.0:
            x = dropout(x, config.dropout, key)
        seen.add(call.path)
        delta = adapter_call_output(x, spec, layer.layer_kernel_shape, a, b, lambda_d.astype(config.dtype),
                                    lambda_b.astype(config.dtype), lean=lean)
        if delta.shape != y.shape:
            raise ValueError(f"{call.path!r} returned {y.shape} but VeRA's output for its input is {delta.shape}; "
                             "apply the model to the params the adapter was built for.")
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
        on_activations = tuple(i for i in items if i.layer.path not in merged)
        with_dropout = dropout_rng is not None and adapter.config.dropout > 0.0
        extra = full_leaves(adapter.trainable) | stack_leaves(on_activations, with_dropout)
        params = unflatten(flatten(params) | extra, like=params)
        if not on_activations:
            return fn(params, *args, **kwargs)
        with _on_activations(on_activations, adapter, dropout_rng, lean=path == "activation-lean"):
            return fn(params, *args, **kwargs)

    return adapted
