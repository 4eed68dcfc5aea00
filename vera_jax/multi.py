"""Many adapters over one frozen base and one shared A/B: they differ only by their trainable trees.

`stack` puts K trainable trees on a leading adapter axis (for ``jax.vmap`` over training, or for
serving); `map_adapters` trains them in one compiled program, vmapped ``adapters_per_pass`` at a time;
`adapt_mixed` runs one batch in which example i uses adapter ``adapter_ids[i]``: the frozen
matmuls and ``x @ A.T`` run once for the whole batch, and only the vectors (and Dense head leaves)
are gathered per example.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vera_jax.layers import LAMBDA_B, LAMBDA_D, VECTOR_NAMES
from vera_jax.ops import promote_add
from vera_jax.paths import SEP, flatten, unflatten
from vera_jax.projections import Projections
from vera_jax.vectors import initial_vector, layer_vectors

__all__ = ["stack", "unstack", "num_adapters", "map_adapters", "adapters_per_pass", "adapt_mixed"]

# Tokens one vmapped pass of a training step should hold on a CPU. Measured with MiniLM on 2 cores: a
# pass past about a thousand tokens runs slower per token than a small one (its activations leave the
# caches), so 16 adapters of 512 tokens vmapped at once were 0.8x as fast as 16 separate steps, and in
# passes of two 1.2x as fast. Accelerators are not capped: they vmap every adapter at once.
CPU_TOKENS_PER_PASS = 1024


def stack(trainables: Sequence[Mapping]) -> dict:
    """K trainable trees of one config -> one tree whose leaves have a leading axis of size K.

    Raises:
      ValueError: no trees, or trees whose paths or leaf shapes differ (adapters of other configs).
    """
    if not trainables:
        raise ValueError("stack needs at least one trainable tree.")
    flats = [flatten(t) for t in trainables]
    reference = {path: np.shape(leaf) for path, leaf in flats[0].items()}
    for index, flat in enumerate(flats[1:], start=1):
        shapes = {path: np.shape(leaf) for path, leaf in flat.items()}
        if shapes != reference:
            differing = sorted(set(shapes.items()) ^ set(reference.items()))[:4]
            raise ValueError(f"Adapter {index} does not match adapter 0 (differing leaves {differing}): stacked "
                             "adapters must share one config and one base model.")
    return unflatten({path: jnp.stack([flat[path] for flat in flats]) for path in reference})


def num_adapters(stacked: Mapping) -> int:
    """K, the size of the leading adapter axis."""
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stacked)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"Not a stacked trainable tree: leading axis sizes {sorted(map(str, sizes))}; use stack().")
    return sizes.pop()


def unstack(stacked: Mapping) -> list[dict]:
    """Inverse of `stack`."""
    return [jax.tree.map(lambda leaf: leaf[k], stacked) for k in range(num_adapters(stacked))]


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


def map_adapters(fn: Callable, in_axes: Sequence[int | None], adapters_per_pass: int | None = None) -> Callable:
    """``jax.vmap(fn, in_axes)`` over a leading adapter axis, computed ``adapters_per_pass`` adapters at a time.

    The K adapters still run in one program: passes of ``adapters_per_pass`` vmapped adapters, looped
    inside it by `jax.lax.map`, and a last pass of the remainder; a pass of one adapter runs ``fn``
    unbatched. The results are those of ``jax.vmap``. None vmaps all K in one pass.

    Args:
      fn: the per-adapter function, e.g. a training step ``(trainable, opt_state, params, batch)``.
      in_axes: one entry per positional argument: 0 for an argument stacked on the adapter axis, None
        for one shared by every adapter (the frozen params, the projections).
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
        stacked = tuple(arg for arg, axis in zip(args, in_axes) if axis == 0)
        sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(stacked)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"The stacked arguments of map_adapters have adapter axes of sizes "
                             f"{sorted(map(str, sizes))}; every leaf needs the same leading size K.")
        count = sizes.pop()
        per_pass = count if adapters_per_pass is None else min(adapters_per_pass, count)

        def run(values: tuple) -> object:
            """fn on a pass of n stacked adapters; a pass of one runs fn itself (a vmap of one costs time)."""
            def call(*per_adapter):
                values_iter = iter(per_adapter)
                return fn(*(next(values_iter) if axis == 0 else arg for arg, axis in zip(args, in_axes)))

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
        return outputs

    return mapped


def _check_ids(adapter_ids: jax.Array, count: int) -> None:
    if not jnp.issubdtype(adapter_ids.dtype, jnp.integer) or adapter_ids.ndim != 1:
        raise ValueError(f"adapter_ids must be a 1-D integer array (one id per example), got "
                         f"{adapter_ids.dtype} of shape {adapter_ids.shape}.")
    if not isinstance(adapter_ids, jax.core.Tracer):
        ids = np.asarray(adapter_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= count):
            raise ValueError(f"adapter_ids span {ids.min()}..{ids.max()}, but {count} adapters are stacked; "
                             f"ids must be in 0..{count - 1}.")


def _gather(stacked_leaf: jax.Array, adapter_ids: jax.Array) -> jax.Array:
    """Per-example rows; an id out of range (only possible under jit) yields NaN, never another adapter."""
    return jnp.take(stacked_leaf, adapter_ids, axis=0, mode="fill", fill_value=jnp.nan)


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """(batch, n) -> broadcastable against ``like`` (batch, ..., n)."""
    return values.reshape(values.shape[:1] + (1,) * (like.ndim - 2) + values.shape[1:])


@contextlib.contextmanager
def _mixed_interception(stacked: Mapping, projections: Projections, adapter_ids: jax.Array) -> Iterator[None]:
    config = projections.config
    flat = flatten(stacked)
    vectors = {p.rsplit(SEP, 1)[0] for p in flat if p.rsplit(SEP, 1)[1] in VECTOR_NAMES}
    heads = {p.rsplit(SEP, 1)[0] for p in flat if p.rsplit(SEP, 1)[1] not in VECTOR_NAMES}

    def interceptor(next_fun, args, kwargs, context):
        path = SEP.join(context.module.path)
        if context.method_name != "__call__" or path not in vectors | heads:
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        if path in heads:
            if not isinstance(context.module, nn.Dense):
                raise ValueError(f"{path!r} is trained in full but is a {type(context.module).__name__}; only Dense "
                                 "leaves can differ per example in a mixed batch.")
            kernel = _gather(flat[path + SEP + "kernel"], adapter_ids)  # (batch, in, out)
            y = jnp.einsum("b...i,bio->b...o", x.astype(kernel.dtype), kernel)
            if path + SEP + "bias" in flat:
                y = y + _per_example(_gather(flat[path + SEP + "bias"], adapter_ids), y)
            return y
        y = next_fun(*args, **kwargs)

        def vector(name: str, like: jax.Array) -> jax.Array:
            """Each example's vector, broadcastable against ``like``; a frozen vector is one constant."""
            if path + SEP + name not in flat:
                return initial_vector(config, name, y.shape[-1])
            return _per_example(_gather(flat[path + SEP + name], adapter_ids).astype(config.dtype), like)

        a, b = projections.pair(path)
        hidden = x.astype(config.dtype) @ a[:, : x.shape[-1]].T  # shared: (batch, ..., r)
        delta = (vector(LAMBDA_D, hidden) * hidden) @ b[: y.shape[-1], :].T
        return promote_add(y, vector(LAMBDA_B, delta) * delta)

    with nn.intercept_methods(interceptor):
        yield


def adapt_mixed(fn: Callable, stacked: Mapping, projections: Projections, adapter_ids: jax.Array) -> Callable:
    """Wrap ``fn(params, *args)`` so that example i of the batch runs with adapter ``adapter_ids[i]``.

    Args:
      fn: a function of the base params running a Flax linen model whose leading input axis is the batch.
      stacked: K trainable trees from `stack` (vectors, and optionally Dense head leaves).
      projections: the shared A and B of all K adapters.
      adapter_ids: (batch,) integers in [0, K).

    Raises:
      ValueError: ids out of range or of the wrong type, or adapters that do not fit the params.
    """
    adapter_ids = jnp.asarray(adapter_ids)
    _check_ids(adapter_ids, num_adapters(stacked))

    def adapted(params, *args, **kwargs):
        layer_vectors(params, jax.tree.map(lambda leaf: leaf[0], stacked), projections)  # shapes fit the params
        with _mixed_interception(stacked, projections, adapter_ids):
            return fn(params, *args, **kwargs)

    return adapted
