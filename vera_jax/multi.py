"""Many adapters over one frozen base and one shared A/B: they differ only by their trainable trees.

`stack` puts K trainable trees on a leading adapter axis (for ``jax.vmap`` over training, or for
serving); `map_adapters` trains them in one compiled program, vmapped ``adapters_per_pass`` at a time;
`adapt_mixed` runs one batch in which example i uses adapter ``adapter_ids[i]``: the frozen
matmuls and ``x @ A.T`` run once for the whole batch, and only the vectors (and Dense head leaves)
are gathered per example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.activation import call_spec
from vera_jax.adapter import Adapter, layer_vectors
from vera_jax.axes import layer_axis
from vera_jax.calls import adapter_call_output
from vera_jax.intercept import LayerCall, intercept_layers
from vera_jax.layers import LAMBDA_B, LAMBDA_D, VECTOR_NAMES, AdaptedLayer, vector_module
from vera_jax.ops import promote_add
from vera_jax.paths import SEP, flatten, split_leaf, unflatten
from vera_jax.vectors import initial_vector

__all__ = ["stack", "unstack", "num_adapters", "map_adapters", "adapters_per_pass", "adapt_mixed", "check_adapter_ids",
           "gather_rows", "first_adapter"]

# Tokens one vmapped pass of a training step should hold on a CPU. Measured with MiniLM on 2 cores: a
# pass past about a thousand tokens runs slower per token than a small one (its activations leave the
# caches), so 16 adapters of 512 tokens vmapped at once were 0.8x as fast as 16 separate steps, and in
# passes of two 1.2x as fast. Accelerators are not capped: they vmap every adapter at once.
CPU_TOKENS_PER_PASS = 1024


def stack(adapters: Sequence[Adapter]) -> Adapter:
    """K adapters of one config -> one adapter whose trainable leaves have a leading axis of size K.

    The K adapters share A and B (one config, one key), so the stacked adapter holds them once.

    Raises:
      ValueError: no adapters, adapters of different configs or projections, or trainable trees whose
        paths or leaf shapes differ.
    """
    if not adapters:
        raise ValueError("stack needs at least one adapter.")
    first = adapters[0]
    flats = [flatten(adapter.trainable) for adapter in adapters]
    reference = {path: np.shape(leaf) for path, leaf in flats[0].items()}
    for index, (adapter, flat) in enumerate(zip(adapters[1:], flats[1:]), start=1):
        if (adapter.config, adapter.generator) != (first.config, first.generator):
            differing = sorted(k for k, v in adapter.config.to_dict().items() if first.config.to_dict()[k] != v)
            raise ValueError(f"Adapter {index} has another config than adapter 0 (fields {differing or ['generator']}): "
                             "stacked adapters share one config, and so one A/B.")
        shapes = {path: np.shape(leaf) for path, leaf in flat.items()}
        if shapes != reference:
            differing = sorted(set(shapes.items()) ^ set(reference.items()))[:4]
            raise ValueError(f"Adapter {index} does not match adapter 0 (differing leaves {differing}): stacked "
                             "adapters must share one config and one base model.")
    trainable = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(adapter.trainable for adapter in adapters))
    return first.replace(trainable=trainable)


def num_adapters(stacked: Adapter) -> int:
    """K, the size of the leading adapter axis of a stacked adapter.

    Raises:
      ValueError: the adapter's leaves have no common leading axis (not made by `stack`).
    """
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stacked.trainable)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"Not a stacked adapter: leading axis sizes {sorted(map(str, sizes))}; use vera_jax.stack().")
    return sizes.pop()


def unstack(stacked: Adapter) -> list[Adapter]:
    """Inverse of `stack`: the K adapters."""
    return [stacked.replace(trainable=jax.tree.map(lambda leaf: leaf[k], stacked.trainable))
            for k in range(num_adapters(stacked))]


def adapters_per_pass(tokens_per_adapter: int, platform: str | None = None) -> int | None:
    """How many adapters `map_adapters` should vmap at once: None (all of them) on an accelerator; on a
    CPU as many as keep a pass within ``CPU_TOKENS_PER_PASS`` tokens, at least one.

    Args:
      tokens_per_adapter: tokens in one adapter's batch (batch size x sequence length).
      platform: ``"cpu"``, ``"gpu"``, ``"tpu"``...; None means JAX's default backend.
    """
    if (platform or jax.default_backend()) != "cpu":
        return None
    return max(1, CPU_TOKENS_PER_PASS // max(1, tokens_per_adapter))


def _is_adapter(value) -> bool:
    return isinstance(value, Adapter)


def _trainable_parts(tree) -> tuple[list, Callable[[list], object]]:
    """``tree``'s leaves with every `Adapter` in it replaced by its trainable tree, and the inverse.

    The inverse takes A and B of ``shared`` (the mapped input adapter): a stacked adapter holds them once.
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_adapter)
    parts = [leaf.trainable if _is_adapter(leaf) else leaf for leaf in leaves]

    def rebuild(new_parts: list, shared: Adapter | None = None) -> object:
        return jax.tree.unflatten(treedef, [
            (shared or leaf).replace(trainable=part) if _is_adapter(leaf) else part
            for leaf, part in zip(leaves, new_parts)])

    return parts, rebuild


def map_adapters(fn: Callable, in_axes: Sequence[int | None], adapters_per_pass: int | None = None) -> Callable:
    """``jax.vmap(fn, in_axes)`` over a leading adapter axis, computed ``adapters_per_pass`` adapters at a time.

    The K adapters still run in one program: passes of ``adapters_per_pass`` vmapped adapters, looped
    inside it by `jax.lax.map`, and a last pass of the remainder; a pass of one adapter runs ``fn``
    unbatched. The results are those of ``jax.vmap``. None vmaps all K in one pass. A stacked
    `Adapter` (from `stack`) maps over its trainable tree and shares its A and B; an `Adapter` that
    ``fn`` returns comes back stacked the same way, with the mapped input adapter's A and B.

    Args:
      fn: the per-adapter function, e.g. a training step ``(adapter, opt_state, params, batch)``.
      in_axes: one entry per positional argument: 0 for an argument stacked on the adapter axis, None
        for one shared by every adapter (the frozen params).
      adapters_per_pass: adapters vmapped together (see `adapters_per_pass`); None for all.

    Raises:
      ValueError: ``in_axes`` other than 0/None, a pass size below 1, or stacked arguments whose
        adapter axes differ.
    """
    in_axes = tuple(in_axes)
    if any(axis not in (0, None) for axis in in_axes) or 0 not in in_axes:
        raise ValueError(f"map_adapters maps the leading adapter axis: in_axes must hold 0 (stacked) or None "
                         f"(shared) for each argument, at least one 0; got {in_axes}.")
    if adapters_per_pass is not None and (not isinstance(adapters_per_pass, int) or adapters_per_pass < 1):
        raise ValueError(f"adapters_per_pass must be a positive integer or None (all at once), got "
                         f"{adapters_per_pass!r}.")

    def mapped(*args):
        if len(args) != len(in_axes):
            raise ValueError(f"map_adapters was given {len(in_axes)} in_axes but called with {len(args)} arguments.")
        mapped_args = [arg for arg, axis in zip(args, in_axes) if axis == 0]
        stacked, rebuild_args = _trainable_parts(mapped_args)
        shared_adapter = next((arg for arg in mapped_args if _is_adapter(arg)), None)
        sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stacked)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"The stacked arguments of map_adapters have adapter axes of sizes "
                             f"{sorted(map(str, sizes))}; every leaf needs the same leading size K.")
        count = sizes.pop()
        per_pass = count if adapters_per_pass is None else min(adapters_per_pass, count)
        rebuild_output = []  # set while tracing fn: puts the output's adapters back together

        def run(values: list) -> list:
            """fn on a pass of n stacked adapters; a pass of one runs fn itself (a vmap of one costs time)."""
            def call(*per_adapter):
                values_iter = iter(rebuild_args(list(per_adapter)))
                parts, rebuild = _trainable_parts(fn(*(next(values_iter) if axis == 0 else arg
                                                       for arg, axis in zip(args, in_axes))))
                rebuild_output[:] = [rebuild]
                return parts

            if jax.tree.leaves(values)[0].shape[0] == 1:
                return jax.tree.map(lambda y: y[None], call(*jax.tree.map(lambda x: x[0], values)))
            return jax.vmap(call)(*values)

        passes, remainder = divmod(count, per_pass)
        split = passes * per_pass
        if passes == 1:
            outputs = run(jax.tree.map(lambda x: x[:split], stacked))
        else:  # the passes loop inside the program
            grouped = jax.tree.map(lambda x: x[:split].reshape(passes, per_pass, *x.shape[1:]), stacked)
            outputs = jax.tree.map(lambda y: y.reshape(split, *y.shape[2:]), jax.lax.map(run, grouped))
        if remainder:
            rest = run(jax.tree.map(lambda x: x[split:], stacked))
            outputs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outputs, rest)
        return rebuild_output[0](outputs, shared_adapter)

    return mapped


def check_adapter_ids(adapter_ids: jax.Array, count: int) -> None:
    """Checks ``adapter_ids`` is (batch,) integers in [0, count) (the range only outside jit).

    Raises:
      ValueError: another dtype or rank, or an id out of range.
    """
    if not jnp.issubdtype(adapter_ids.dtype, jnp.integer) or adapter_ids.ndim != 1:
        raise ValueError(f"adapter_ids must be a 1-D integer array (one id per example), got "
                         f"{adapter_ids.dtype} of shape {adapter_ids.shape}.")
    if not isinstance(adapter_ids, jax.core.Tracer):
        ids = np.asarray(adapter_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= count):
            raise ValueError(f"adapter_ids span {ids.min()}..{ids.max()}, but {count} adapters are stacked; "
                             f"ids must be in 0..{count - 1}.")


def gather_rows(stacked_leaf: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    """Per-example rows; an id out of range (only possible under jit) yields NaN, never another adapter."""
    return jnp.take(stacked_leaf, adapter_ids, axis=0, mode="fill", fill_value=jnp.nan)


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """(batch, n) -> broadcastable against ``like`` (batch, ..., n)."""
    return values.reshape(values.shape[:1] + (1,) * (like.ndim - 2) + values.shape[1:])


def _stacked_vector_leaves(flat: dict, layers: dict[str, AdaptedLayer]) -> dict:
    """A stack's K adapters' vectors (K, L, n) beside its kernel, their layer axis where a linen ``nn.scan``
    slices the kernel's (0, or 1 as in MaxText), so that each iteration sees its layer's (K, n)."""
    leaves = {}
    for path, layer in layers.items():
        if layer.layers is None:
            continue
        axis = min(layer_axis(layer.axes), 1)
        for name in (LAMBDA_D, LAMBDA_B):
            if path + SEP + name in flat:
                leaves[path + SEP + name] = jnp.moveaxis(flat[path + SEP + name], 1, axis)
    return leaves


def _mixed_handler(stacked: Adapter, adapter_ids: jax.Array, layers: dict[str, AdaptedLayer]
                   ) -> Callable[[LayerCall], jax.Array]:
    """Each adapted layer adds every example's own VeRA output (`vera_jax.calls.adapter_call_output`, any
    kernel rank, a stack's layer one scan iteration at a time); each Dense trained in full uses its own leaves."""
    config = stacked.config
    flat = flatten(stacked.trainable)
    adapted = {vector_module(path) for path in flat} - {None}

    def handle(call: LayerCall) -> jax.Array:
        x = call.x
        if call.path not in adapted:  # a module trained in full
            if not isinstance(call.module, nn.Dense):
                raise ValueError(f"{call.path!r} is trained in full but is a {type(call.module).__name__}; only "
                                 "Dense leaves can differ per example in a mixed batch.")
            kernel = gather_rows(flat[call.path + SEP + "kernel"], adapter_ids)  # (batch, in, out)
            y = jnp.einsum("b...i,bio->b...o", x.astype(kernel.dtype), kernel)
            if call.path + SEP + "bias" in flat:
                y = y + _per_example(gather_rows(flat[call.path + SEP + "bias"], adapter_ids), y)
            return y
        layer = layers[call.path]
        if layer.layers is not None:  # one iteration of a scan over the stack: its (K, n) slice travels with it
            own = call.module.variables["params"]
        else:
            own = {name: flat[call.path + SEP + name] for name in VECTOR_NAMES if call.path + SEP + name in flat}

        def vector(name: str) -> jax.Array:
            """Each example's vector (batch, n); a frozen vector is one constant (n,)."""
            if name not in own:
                return initial_vector(config, name, dataclasses.replace(layer, layers=None))
            return gather_rows(own[name], adapter_ids).astype(config.dtype)

        a, b = stacked.projections.pair(call.path)
        delta = adapter_call_output(x.astype(config.dtype), call_spec(call, layer), layer.layer_kernel_shape, a, b,
                                    vector(LAMBDA_D), vector(LAMBDA_B))
        return promote_add(call.run(), delta)

    return handle


def adapt_mixed(fn: Callable, stacked: Adapter, adapter_ids: jax.Array) -> Callable:
    """Wrap ``fn(params, *args)`` so that example i of the batch runs with adapter ``adapter_ids[i]``.

    Args:
      fn: a function of the base params running a Flax linen model whose leading input axis is the batch.
      stacked: K adapters from `stack` (vectors, and optionally Dense leaves trained in full).
      adapter_ids: (batch,) integers in [0, K).

    Raises:
      ValueError: ids out of range or of the wrong type, or adapters that do not fit the params.
    """
    adapter_ids = jnp.asarray(adapter_ids)
    check_adapter_ids(adapter_ids, num_adapters(stacked))
    modules = {split_leaf(path)[0] for path in flatten(stacked.trainable)}

    def adapted(params, *args, **kwargs):
        layers = {item.layer.path: item.layer for item in layer_vectors(params, first_adapter(stacked))}  # shapes fit
        params = unflatten(flatten(params) | _stacked_vector_leaves(flatten(stacked.trainable), layers), like=params)
        with intercept_layers(modules, _mixed_handler(stacked, adapter_ids, layers)):
            return fn(params, *args, **kwargs)

    return adapted


def first_adapter(stacked: Adapter) -> Adapter:
    """Adapter 0 of a stacked adapter, without copying the others."""
    return stacked.replace(trainable=jax.tree.map(lambda leaf: leaf[0], stacked.trainable))
