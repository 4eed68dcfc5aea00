"""`attach` VeRA to an NNX model in place, `split` it into the pure view, `update` it with an adapter.

Each target's weight and call come from its module (see `vera_jax.calls.module_call`: ``nnx.Linear``,
``nnx.LinearGeneral``, ``nnx.Einsum``, tunix's ``Einsum``), otherwise from a ``VeraConfig.kernel_axes``
rule. A stack's layer axis is the one axis a weight has beyond one layer's, first by NNX's rule (where
``nnx.vmap`` and ``nnx.scan`` with axis 0 put it), since each scan iteration slices the vectors there too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator

import jax.numpy as jnp
from flax import nnx

from vera_jax.adapter import Adapter, init_adapter, layer_vectors
from vera_jax.axes import KernelRule, parse_rule
from vera_jax.calls import ModuleCall, module_call
from vera_jax.config import VeraConfig
from vera_jax.layers import LAYER_INDEX, VECTOR_NAMES, AdaptedLayer, find_layers, trained_vectors
from vera_jax.nnx.kinds import rule_call, unknown_module_error, weight_of
from vera_jax.nnx.modules import (PROJECTIONS, LayerRecord, ModelRecord, adapted_class, is_adapted_layer,
                                  is_adapted_model, model_record)
from vera_jax.nnx.variables import VeraLayerIndex, VeraProjections, VeraVector, kernel_mesh, vector_like_kernel
from vera_jax.paths import SEP, compile_rules, first_match, flatten, patterns_regex, unflatten
from vera_jax.plan import NNX_PATHS as PATHS
from vera_jax.projections import Projections

__all__ = ["attach", "split", "update", "adapted_modules", "adapter_config", "base_params", "PATHS"]


def _join(path: tuple) -> str:
    return SEP.join(str(part) for part in path)


def _layer_roles(path: str, module: nnx.Module, kernel_shape: tuple[int, ...], found: ModuleCall,
                 rule: KernelRule | None) -> str:
    """The roles of a target's weight: a rule's own roles with 'l', else one layer's roles, with a stack's
    layer axis first when the weight has one axis more (NNX's rule for ``nnx.vmap`` and ``nnx.scan``).

    Raises:
      ValueError: the weight has neither one layer's rank nor one more, or its layer's shape is not the
        module's.
    """
    if rule is not None and "l" in rule.roles:
        return rule.roles  # find_layers checks it against the weight's rank
    own = found.roles
    if len(kernel_shape) == len(own) and found.own_shape in (None, kernel_shape):
        return own
    if len(kernel_shape) == len(own) + 1 and found.own_shape in (None, kernel_shape[1:]):
        return "l" + own
    one_layer = found.own_shape or f"of rank {len(own)}"
    raise ValueError(f"Target {path!r} ({type(module).__name__}) has a weight {kernel_shape}, which is neither one "
                     f"layer's weight ({one_layer}) nor a stack of them with the layer axis first.")


def _target_call(path: str, module: nnx.Module, rule: KernelRule | None) -> tuple[str, ModuleCall]:
    """The full roles of a target's weight (a stack's layer axis included) and its module's call.

    Raises:
      ValueError: a module of unknown kind without a rule, a rule that contradicts the module, or a
        weight whose extra axis cannot be a layer axis first.
    """
    found = module_call(module, path)
    if found is None:
        if rule is None:
            raise unknown_module_error(path, module)
        found = rule_call(module, path, rule)
    elif rule is not None and (rule.weight != found.weight or rule.roles.replace("l", "") != found.roles):
        raise ValueError(f"VeraConfig.kernel_axes gives {path!r} the rule {str(rule)!r}, but its "
                         f"{type(module).__name__} states the weight {found.weight!r} with roles {found.roles!r}; "
                         "drop or fix the rule.")
    roles = _layer_roles(path, module, tuple(getattr(module, found.weight).get_value().shape), found, rule)
    if "l" in roles and not roles.startswith("l"):
        raise ValueError(f"Target {path!r} has its stack's layer axis at position {roles.index('l')} (roles {roles!r}); "
                         "VeRA on NNX gives a stack's vectors the layer axis first, where nnx.vmap and nnx.scan with "
                         "axis 0 put it: build and scan the stack over axis 0.")
    return roles, found


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    return {_join(path): module for path, module in nnx.iter_modules(model) if path}


def adapted_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """The model's adapted modules by path."""
    return {name: module for name, module in _modules(model).items() if is_adapted_layer(module)}


def adapter_config(model: nnx.Module, adapter: Adapter, params: dict) -> tuple[VeraConfig, tuple[AdaptedLayer, ...]]:
    """``adapter``'s config with the model's stated kernel axes, and the layers it adapts in ``params`` (the
    model's, or the pure view's), once it is known to adapt what the model's VeRA adapts (layers, rank,
    trained vectors).

    Raises:
      ValueError: it adapts other layers, another rank or other trained vectors.
    """
    info = model_record(model)
    rules = info.stated + tuple(rule for rule in adapter.config.kernel_axes if rule not in info.stated)
    config = dataclasses.replace(adapter.config, kernel_axes=rules)
    theirs = find_layers(params, config)
    ours = {name: module.vera_layer.layer for name, module in adapted_modules(model).items()}  # attach found them
    if ({layer.path: layer for layer in theirs} != ours or config.r != info.config.r
            or trained_vectors(config) != trained_vectors(info.config)):
        raise ValueError(
            f"This adapter adapts {[layer.path for layer in theirs][:4]} (r={config.r}, train_vectors="
            f"{config.train_vectors!r}), but the model's VeRA adapts {list(ours)[:4]} "
            f"(r={info.config.r}, train_vectors={info.config.train_vectors!r}); attach VeRA with the adapter's config.")
    return config, theirs


def base_params(model: nnx.Module) -> dict:
    """The model's ``nnx.Param`` values (VeRA's vectors excluded) as a nested dict of arrays."""
    return nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(VeraVector))))


def attach(model: nnx.Module, config: VeraConfig, *, path: str = "merged") -> nnx.Module:
    """Adapt ``model`` in place with a new adapter (see the module docstring); returns ``model``.

    A and B are drawn from ``config.projection_seed`` exactly as `vera_jax.init_adapter` draws them for the
    same kernels; lambda_d starts at ``d_initial`` and lambda_b at ``b_initial`` (0: the model is unchanged).

    Args:
      path: ``"merged"`` (fold each delta into its kernel for the call) or ``"activation"``.

    Raises:
      ValueError: VeRA is already attached, a target matches nothing or is not a linear module, a module
        of unknown kind has no ``kernel_axes`` rule, a layer axis does not fit, or an option VeRA on NNX
        does not offer (modules trained in full).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    if is_adapted_model(model) or is_adapted_layer(model):
        raise ValueError("VeRA is already attached to this model; attach it to a freshly built model, or update "
                         "its vectors with vera_jax.nnx.update(model, adapter).")
    if config.modules_to_save:
        raise ValueError("VeRA on NNX models does not train modules in full (modules_to_save); set "
                         "modules_to_save=() and train a head with its own optimizer, or pass its params in "
                         "adapter.trainable to vera_jax.nnx.functional.")
    modules = _modules(model)
    targets = patterns_regex(config.target_modules)
    matched = {name: module for name, module in modules.items() if targets.fullmatch(name)}
    with_weight = [name for name, module in modules.items() if isinstance(weight_of(module), nnx.Variable)]
    if not matched:
        raise ValueError(f"VeraConfig.target_modules={config.target_modules!r} matches no module of this "
                         f"{type(model).__name__}. Modules with a weight are: {with_weight[:40]}.")
    rules = compile_rules([(pattern, parse_rule(text, pattern)) for pattern, text in config.kernel_axes])
    stated, calls = [], {}
    for name, module in matched.items():
        if not any(isinstance(value, nnx.Variable) for value in vars(module).values()):
            raise ValueError(f"Target {name!r} is a {type(module).__name__} without a weight of its own; narrow "
                             f"VeraConfig.target_modules to linear modules, e.g. among {with_weight[:12]}.")
        roles, calls[name] = _target_call(name, module, first_match(rules, name))
        if path == "activation" and calls[name].call is None:
            raise ValueError(
                f"Target {name!r} is a {type(module).__name__}, described by a roles rule only, which does not say "
                "where its output puts the output axes, so it runs on the merged path only; write its "
                f"VeraConfig.kernel_axes rule as the einsum its call computes ('{calls[name].weight}:X,KERNEL->Y'), "
                "or attach with path='merged'.")
        stated.append((re.escape(name), str(KernelRule(calls[name].weight, roles))))
    full_config = dataclasses.replace(config, kernel_axes=tuple(stated) + config.kernel_axes)
    params = base_params(model)
    table = find_layers(params, full_config)
    adapter = init_adapter(params, full_config, layers=table)
    layers = {layer.path: layer for layer in table}
    weights = {name: getattr(module, calls[name].weight) for name, module in matched.items()}
    meshes = [kernel_mesh(weight) for weight in weights.values()]
    setattr(model, PROJECTIONS, VeraProjections(adapter.projections, next(filter(None, meshes), None)))
    model.vera_model = ModelRecord(full_config, tuple(stated), adapter.generator, adapter.projections.layers)
    vectors = flatten(adapter.trainable)
    for name, module in matched.items():
        for vector in trained_vectors(full_config):
            setattr(module, vector, vector_like_kernel(vectors[name + SEP + vector], vector, weights[name],
                                                       layers[name].axes))
        if full_config.dropout > 0.0 and layers[name].layers is not None:
            setattr(module, LAYER_INDEX, VeraLayerIndex(jnp.arange(layers[name].layers, dtype=jnp.int32)))
        module.vera_layer = LayerRecord(layers[name], full_config, calls[name].call)
        module.vera_path = path
        module.__class__ = adapted_class(module, model=False)
    model.__class__ = adapted_class(model, model=True)
    return model


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict, Adapter]:
    """The pure view: ``(graphdef, params, adapter)``.

    ``graphdef`` is the base model's (no VeRA), ``params`` its ``nnx.Param`` values as a nested dict, and
    ``adapter`` a `vera_jax.Adapter` holding the model's vectors and A/B. So
    ``nnx.merge(graphdef, vera_jax.merge(params, adapter))(x)`` gives the adapted model's output, and
    every pure function of the library (checkpoints, `vera_jax.stack`, ...) applies.
    """
    info = model_record(model)
    trainable = unflatten(flatten(nnx.to_pure_dict(nnx.state(model, VeraVector))))  # string keys, as init_adapter's
    pair = getattr(model, PROJECTIONS)
    adapter = Adapter(trainable=trainable,
                      projections=Projections(pair.A.get_value(), pair.B.get_value(), info.projection_layers),
                      config=info.config, generator=info.generator)
    with _detached(model):
        graphdef = nnx.graphdef(model)
    return graphdef, base_params(model), adapter


def update(model: nnx.Module, adapter: Adapter) -> None:
    """Write ``adapter`` (its vectors, A/B and config) into the adapted ``model``: after pure training, a
    restored checkpoint or a PEFT file (`vera_jax.peft.load_adapter` on ``split(model)[1]``).

    Raises:
      ValueError: the adapter adapts other layers (or another rank, or other trained vectors) than the
        model's VeRA, or its vectors do not fit.
    """
    params = base_params(model)
    config, layers = adapter_config(model, adapter, params)
    layer_vectors(params, adapter.replace(config=config), layers=layers)  # every vector and A/B fits, before any write
    flat = flatten(adapter.trainable)
    for name, module in adapted_modules(model).items():
        module.vera_layer = dataclasses.replace(module.vera_layer, config=config)
        for vector in trained_vectors(config):
            getattr(module, vector).set_value(flat[name + SEP + vector])
    pair = getattr(model, PROJECTIONS)
    pair.A.set_value(adapter.projections.A)
    pair.B.set_value(adapter.projections.B)
    model.vera_model = dataclasses.replace(model_record(model), config=config, generator=adapter.generator)


@contextlib.contextmanager
def _detached(model: nnx.Module) -> Iterator[None]:
    """The base model within the context: VeRA's classes, variables and records taken off, then put back."""
    saved = []
    for module in [model, *_modules(model).values()]:
        if is_adapted_layer(module) or is_adapted_model(module):
            extra = {name: getattr(module, name) for name in (*VECTOR_NAMES, "vera_layer", "vera_path", "vera_model",
                                                                PROJECTIONS) if hasattr(module, name)}
            saved.append((module, module.__class__, extra))
            for name in extra:
                delattr(module, name)
            module.__class__ = module.__class__.__mro__[1]
    try:
        yield
    finally:
        for module, cls, extra in saved:
            module.__class__ = cls
            for name, value in extra.items():
                setattr(module, name, value)
