"""Activation path: add the VeRA output to the targeted layers of any Flax linen model, unedited.

``flax.linen.intercept_methods`` intercepts the ``__call__`` of every module whose path is an adapted
layer (``nn.Dense``, GPT-2's ``FlaxConv1D``, or any linear module) and returns
``y + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x))))``. No weight is materialised.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vera_jax.config import VeraConfig
from vera_jax.layers import LAMBDA_B, LAMBDA_D, VECTOR_NAMES, trained_vectors
from vera_jax.merge import merge_layers
from vera_jax.ops import adapter_output, adapter_output_lean, promote_add
from vera_jax.paths import SEP, flatten, unflatten
from vera_jax.projections import Projections
from vera_jax.strategy import PathPlan
from vera_jax.vectors import extra_leaves, initial_vector, layer_vectors

__all__ = ["activation_path", "adapt", "PATHS"]

PATHS = ("merged", "activation", "activation-lean")


def _module_layout(module: nn.Module) -> str | None:
    """The kernel layout a known linear module uses, or None when it is not known."""
    if isinstance(module, nn.Dense):
        return "in_out"
    if type(module).__name__ == "FlaxConv1D":
        return "out_in"
    return None


def _vectors_by_module(trainable: Mapping, config: VeraConfig) -> dict[str, dict[str, jax.Array]]:
    """Module path -> its trained vectors by name (a frozen vector is absent: `initial_vector` supplies it)."""
    by_module: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in flatten(trainable).items():
        module, name = path.rsplit(SEP, 1) if SEP in path else ("", path)
        if name in trained_vectors(config):
            by_module.setdefault(module, {})[name] = leaf
    return by_module


def _dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


@contextlib.contextmanager
def activation_path(
    trainable: Mapping,
    projections: Projections,
    *,
    dropout_rng: jax.Array | None = None,
    lean: bool = False,
) -> Iterator[None]:
    """Within this context, every Flax call of an adapted layer gets the VeRA output added.

    Use it inside the function you ``jax.jit`` (it acts while the model is traced). The adapter path
    runs in ``config.dtype`` and the sum is cast back to the layer's output dtype, as in PEFT.

    Args:
      trainable: the trainable tree (only its VeRA vectors are read here).
      projections: the shared A (r, in_max) and B (out_max, r) with their config.
      dropout_rng: key for ``config.dropout`` on the layer inputs; None means no dropout (evaluation).
      lean: use `adapter_output_lean`, whose backward pass keeps only the r-sized intermediate.

    Raises:
      ValueError: a layer's module type contradicts ``config.kernel_layout``, its input or output does
        not fit the vectors or projections, or no adapted layer was called at all.
    """
    config = projections.config
    vectors = _vectors_by_module(trainable, config)
    if not vectors:
        raise ValueError("The trainable tree holds no VeRA vectors; build it with vera_jax.init_trainable(params, config).")
    seen: set[str] = set()
    calls = itertools.count()

    def interceptor(next_fun, args, kwargs, context):
        path = SEP.join(context.module.path)
        if context.method_name != "__call__" or path not in vectors:
            return next_fun(*args, **kwargs)
        layout = _module_layout(context.module)
        if layout is not None and layout != config.kernel_layout:
            raise ValueError(
                f"{path!r} is a {type(context.module).__name__}, whose kernel is stored {layout}, but "
                f"VeraConfig.kernel_layout is {config.kernel_layout!r}; set kernel_layout={layout!r}."
            )
        x = args[0] if args else kwargs["inputs"]
        y = next_fun(*args, **kwargs)
        given = vectors[path]
        lambda_d, lambda_b = (given.get(name, initial_vector(config, name, y.shape[-1])) for name in VECTOR_NAMES)
        a, b = projections.pair(path)
        if x.shape[-1] > a.shape[1] or y.shape[-1] != lambda_b.shape[-1] or y.shape[-1] > b.shape[0]:
            raise ValueError(
                f"{path!r} maps {x.shape[-1]} to {y.shape[-1]} features, which does not fit lambda_b "
                f"{lambda_b.shape}, A {a.shape} and B {b.shape}; build the vectors and "
                "projections from the same params and config as the model."
            )
        x = x.astype(config.dtype)
        if dropout_rng is not None and config.dropout > 0.0:
            x = _dropout(x, config.dropout, jax.random.fold_in(dropout_rng, next(calls)))
        seen.add(path)
        output = adapter_output_lean if lean else adapter_output
        delta = output(x, a, b, lambda_d.astype(config.dtype), lambda_b.astype(config.dtype))
        return promote_add(y, delta)

    with nn.intercept_methods(interceptor):
        yield
    if not seen:
        raise ValueError(
            f"The activation path saw none of the {len(vectors)} adapted layers (e.g. {next(iter(vectors))!r}) "
            "being called. Call the Flax model inside the context (inside the jitted function), and key the "
            "vectors by the module paths of the params the model is applied with."
        )


def adapt(
    fn: Callable,
    trainable: Mapping,
    projections: Projections,
    *,
    path: str | PathPlan = "merged",
    dropout_rng: jax.Array | None = None,
) -> Callable:
    """Wrap ``fn(params, *args, **kwargs)`` so that it runs the adapted model.

    Example: ``logits = adapt(apply_fn, trainable, projections, path="activation")(params, batch)``.

    Args:
      fn: any function whose first argument is the base params tree.
      trainable: the trainable tree (VeRA vectors and extra leaves).
      projections: the shared A, B and their config.
      path: ``"merged"`` builds W0 + delta_W and calls ``fn`` with those params (any function works);
        ``"activation"`` adds the VeRA output to the layer outputs (Flax linen models; supports
        dropout); ``"activation-lean"`` does so with a backward pass that keeps only the r-sized
        intermediate; a `PathPlan` (from `plan_paths`) picks merged or activation per layer.
      dropout_rng: key for ``config.dropout``; applied on the activation path only.
    """
    if not isinstance(path, PathPlan) and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or a vera_jax.PathPlan, got {path!r}.")
    if path == "merged" and dropout_rng is not None and projections.config.dropout > 0.0:
        raise ValueError("VeRA dropout acts on activations: use path='activation' to train with dropout.")

    def adapted(params, *args, **kwargs):
        items = layer_vectors(params, trainable, projections)  # fail early, with names, on a mismatch
        if isinstance(path, PathPlan):
            merged = path.merged
        else:
            merged = {item.layer.path for item in items} if path == "merged" else set()
        params = merge_layers(params, [i for i in items if i.layer.path in merged], projections)
        params = unflatten(flatten(params) | extra_leaves(trainable))
        on_activations = [i for i in items if i.layer.path not in merged]
        if not on_activations:
            return fn(params, *args, **kwargs)
        vectors = unflatten({f"{i.layer.path}{SEP}{name}": leaf for i in on_activations
                             for name, leaf in ((LAMBDA_D, i.lambda_d), (LAMBDA_B, i.lambda_b))})
        with activation_path(vectors, projections, dropout_rng=dropout_rng, lean=path == "activation-lean"):
            return fn(params, *args, **kwargs)

    return adapted
