"""VeRA on Flax NNX models: typed variables on the modules, and a pure view over ``nnx.split``.

`attach(model, config)` adapts a model in place, NNX's way:

- each adapted module gets ``vera_lambda_d`` (r,) and ``vera_lambda_b`` (out,) as `VeraVector`
  variables, a subclass of ``nnx.LoRAParam``: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``,
  ``nnx.DiffState`` and tunix's ``PeftTrainer`` train them and nothing else. A stack of L layers (built
  with ``nnx.vmap``, run with ``nnx.scan``) gets (L, r) and (L, out), so each scan iteration slices its own;
- the model gets one pair ``model.vera_projections.A`` (r, in_max) / ``.B`` (out_max, r) of
  `VeraProjection` variables, which are not ``nnx.Param``: never trained, never in a Param filter;
- the adapted modules' class becomes a subclass that adds VeRA to the call, on the merged path (the
  delta folded into the kernel for the call) or the activation path (VeRA's output added to the
  module's). The model's ``__call__`` hands A and B to the adapted layers for the duration of the call,
  so a scan over stacked layers needs no change: A and B are not in the scanned layers' state.

The axes of each kernel come from its module (``nnx.Linear`` (in, out), ``nnx.LinearGeneral``,
``nnx.Einsum`` from its equation), otherwise from ``VeraConfig.kernel_axes``; a stack's layer axis is
the one axis its kernel has beyond the module's own. `split` gives the pure view: the base model's
graphdef, its params and a `vera_jax.Adapter`, for `vera_jax.merge` and the rest of the library.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import re
from collections.abc import Iterator, Mapping

import jax
from flax import nnx

from vera_jax.adapter import Adapter, init_adapter, layer_vectors
from vera_jax.axes import delta_to_kernel
from vera_jax.calls import CallSpec, adapter_call_output, dense_call, einsum_call
from vera_jax.config import VeraConfig
from vera_jax.layers import VECTOR_NAMES, AdaptedLayer, find_layers, trained_vectors
from vera_jax.ops import delta_weight, promote_add
from vera_jax.paths import SEP, compile_rules, first_match, flatten, patterns_regex, unflatten
from vera_jax.projections import Projections
from vera_jax.vectors import initial_vector

__all__ = ["VeraVector", "VeraProjection", "attach", "bound", "split", "update", "PATHS"]

PATHS = ("merged", "activation")
PROJECTIONS = "vera_projections"
_BOUND: contextvars.ContextVar[Projections | None] = contextvars.ContextVar("vera_jax_nnx_projections", default=None)


class VeraVector(nnx.LoRAParam):
    """lambda_d (r,) or lambda_b (out,) of one adapted module; (L, r) / (L, out) for a stack of L layers."""


class VeraProjection(nnx.Variable):
    """A (r, in_max) or B (out_max, r): frozen, shared by every adapted layer, and not an ``nnx.Param``."""


class VeraProjections(nnx.Module):
    """The model's one pair of projections."""

    def __init__(self, projections: Projections):
        self.A = VeraProjection(projections.A)
        self.B = VeraProjection(projections.B)


@dataclasses.dataclass(frozen=True)
class _Layer:
    """What an adapted module needs at call time (static, hashable): its layer, config and call."""

    layer: AdaptedLayer
    config: VeraConfig
    call: CallSpec


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the adapted model records (static): the full config (its modules' stated kernel axes first),
    those stated axes, the generator and the pair's layers."""

    config: VeraConfig
    stated: tuple[tuple[str, str], ...]
    generator: str
    projection_layers: tuple[str, ...]


def _join(path: tuple) -> str:
    return SEP.join(str(part) for part in path)


def _module_call(module: nnx.Module, path: str) -> tuple[CallSpec, tuple[int, ...]] | None:
    """How a known NNX module calls its kernel, and one layer's kernel shape; None for an unknown kind."""
    if isinstance(module, nnx.Linear):
        return dense_call("io"), (module.in_features, module.out_features)
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis or sorted(module.axis) != list(range(-len(module.axis), 0)):
            raise ValueError(f"{path!r} is an nnx.LinearGeneral over axes {module.axis} with batch axes "
                             f"{dict(module.batch_axis)}; VeRA adapts it over x's trailing axes only.")
        roles = "i" * len(module.in_features) + "o" * len(module.out_features)
        return dense_call(roles), tuple(module.in_features) + tuple(module.out_features)
    if isinstance(module, nnx.Einsum):
        return einsum_call(module.einsum_str, 1, repr(path)), tuple(module.kernel_shape)
    return None


def _stated_roles(path: str, module: nnx.Module, kernel_shape: tuple[int, ...], rule: str | None
                  ) -> tuple[str, CallSpec]:
    """The full roles of a target's kernel (a stack's layer axis included) and its call.

    Raises:
      ValueError: a module of unknown kind without a rule, a rule that contradicts the module, or a
        kernel whose extra axis cannot be placed as one layer axis.
    """
    known = _module_call(module, path)
    if known is None:
        if rule is None:
            raise ValueError(
                f"Target {path!r} is a {type(module).__name__}, a module whose kernel axes vera_jax does not know; "
                f"add a VeraConfig.kernel_axes rule for it (its kernel is {kernel_shape}), e.g. kernel_axes="
                f"{{{re.escape(path)!r}: {'i' + 'o' * (len(kernel_shape) - 1)!r}}} (i input, o output, l layer axis).")
        return rule, dense_call(rule)
    call, own_shape = known
    per_layer = call.roles
    if rule is not None:
        if rule.replace("l", "") != per_layer:
            raise ValueError(f"VeraConfig.kernel_axes gives {path!r} the roles {rule!r}, but its "
                             f"{type(module).__name__} states {per_layer!r}; drop or fix the rule.")
        roles = rule
    elif kernel_shape == own_shape:
        roles = per_layer
    else:
        places = [k for k in range(len(kernel_shape)) if kernel_shape[:k] + kernel_shape[k + 1:] == own_shape]
        if len(places) != 1:
            problem = "could be at several positions" if places else "does not fit"
            raise ValueError(
                f"Target {path!r} ({type(module).__name__}) has a kernel {kernel_shape} whose layer axis {problem}: "
                f"one layer's kernel is {own_shape}. Add a VeraConfig.kernel_axes rule giving its roles with 'l' "
                f"at the layer axis, e.g. {{{re.escape(path)!r}: {'l' + per_layer!r}}}.")
        roles = per_layer[: places[0]] + "l" + per_layer[places[0]:]
    return roles, call  # find_layers checks the roles against the kernel's rank


def _bound_projections(path: str) -> tuple[jax.Array, jax.Array]:
    projections = _BOUND.get()
    if projections is None:
        raise ValueError(f"The VeRA layer {path!r} ran outside its model's call, so it has no A and B. Call the model "
                         "itself, or wrap the call: `with vera_jax.nnx.bound(model): model.method(...)`.")
    return projections.pair(path)


def _layer_call(self, *args, **kwargs):
    """An adapted module's ``__call__``: its own class's call with VeRA added."""
    spec: _Layer = self.vera_layer
    layer, config = spec.layer, spec.config
    base_call = type(self).__mro__[1].__call__
    a, b = _bound_projections(spec.layer.path)
    lambda_d, lambda_b = (_vector(self, name) for name in VECTOR_NAMES)
    if lambda_b.shape != (layer.out_features,):
        raise ValueError(f"{spec.layer.path!r} runs with lambda_b of shape {lambda_b.shape}, not the "
                         f"({layer.out_features},) of one layer: run a stack one layer at a time (nnx.scan).")
    kernel_shape = layer.layer_kernel_shape
    if self.vera_path == "merged":
        delta = delta_weight(a, b, lambda_d, lambda_b, layer.in_features)
        kernel = self.kernel
        base = kernel.get_value()
        kernel.set_value(promote_add(base, delta_to_kernel(delta, spec.call.roles, kernel_shape)))
        try:
            return base_call(self, *args, **kwargs)
        finally:
            kernel.set_value(base)
    x = args[0] if args else kwargs["inputs"]
    y = base_call(self, *args, **kwargs)
    return promote_add(y, adapter_call_output(x.astype(config.dtype), spec.call, kernel_shape, a, b, lambda_d,
                                              lambda_b))


def _vector(module: nnx.Module, name: str) -> jax.Array:
    """One layer's vector in ``config.dtype``: the variable, or a frozen vector's constant."""
    spec: _Layer = module.vera_layer
    if name in trained_vectors(spec.config):
        return getattr(module, name).get_value().astype(spec.config.dtype)
    return initial_vector(spec.config, name, dataclasses.replace(spec.layer, layers=None))


def _model_call(self, *args, **kwargs):
    """The adapted model's ``__call__``: its own class's call, with A and B handed to the adapted layers."""
    with bound(self):
        return type(self).__mro__[1].__call__(self, *args, **kwargs)


_LAYER, _MODEL = "layer", "model"
_CALLS = {_LAYER: _layer_call, _MODEL: _model_call}


@functools.cache
def _subclass(kind: str, base: type) -> type:
    """One subclass per (kind, module class), so graphdefs of adapted models compare equal."""
    return type(base)(f"Vera{base.__name__}", (base,),
                      {"__module__": base.__module__, "__call__": _CALLS[kind], "_vera_kind": kind})


def _is(module: nnx.Module, kind: str) -> bool:
    return type(module).__dict__.get("_vera_kind") == kind


@contextlib.contextmanager
def bound(model: nnx.Module) -> Iterator[None]:
    """Within the context, the adapted layers of ``model`` use its A and B (its ``__call__`` does this itself).

    Raises:
      ValueError: ``model`` has no VeRA attached.
    """
    info = _info(model)
    pair = getattr(model, PROJECTIONS)
    token = _BOUND.set(Projections(pair.A.get_value(), pair.B.get_value(), info.projection_layers))
    try:
        yield
    finally:
        _BOUND.reset(token)


def _info(model: nnx.Module) -> _Model:
    info = getattr(model, "vera_model", None)
    if not isinstance(info, _Model):
        raise ValueError(f"This {type(model).__name__} has no VeRA attached; call vera_jax.nnx.attach(model, config).")
    return info


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    return {_join(path): module for path, module in nnx.iter_modules(model) if path}


def _params(model: nnx.Module) -> dict:
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
        does not offer (dropout, modules trained in full).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    if isinstance(getattr(model, "vera_model", None), _Model) or _is(model, _LAYER):
        raise ValueError("VeRA is already attached to this model; attach it to a freshly built model, or update "
                         "its vectors with vera_jax.nnx.update(model, adapter).")
    if config.dropout > 0.0 or config.modules_to_save:
        raise ValueError("VeRA on NNX models does not offer dropout or modules_to_save yet; set dropout=0.0 and "
                         "modules_to_save=() (train a head with its own optimizer).")
    modules = _modules(model)
    targets = patterns_regex(config.target_modules)
    matched = {name: module for name, module in modules.items() if targets.fullmatch(name)}
    with_kernel = [name for name, module in modules.items() if isinstance(getattr(module, "kernel", None), nnx.Variable)]
    if not matched:
        raise ValueError(f"VeraConfig.target_modules={config.target_modules!r} matches no module of this "
                         f"{type(model).__name__}. Modules with a kernel are: {with_kernel[:40]}.")
    rules = compile_rules(config.kernel_axes)
    stated, calls = [], {}
    for name, module in matched.items():
        kernel = getattr(module, "kernel", None)
        if not isinstance(kernel, nnx.Variable):
            raise ValueError(f"Target {name!r} is a {type(module).__name__} without a kernel; narrow "
                             f"VeraConfig.target_modules to linear modules, e.g. among {with_kernel[:12]}.")
        rule = first_match(rules, name)  # VeraConfig checked its roles
        roles, calls[name] = _stated_roles(name, module, tuple(kernel.get_value().shape), rule)
        stated.append((re.escape(name), roles))
    full_config = dataclasses.replace(config, kernel_axes=tuple(stated) + config.kernel_axes)
    params = _params(model)
    adapter = init_adapter(params, full_config)
    layers = {layer.path: layer for layer in find_layers(params, full_config)}
    setattr(model, PROJECTIONS, VeraProjections(adapter.projections))
    model.vera_model = _Model(full_config, tuple(stated), adapter.generator, adapter.projections.layers)
    vectors = flatten(adapter.trainable)
    for name, module in matched.items():
        for vector in trained_vectors(full_config):
            setattr(module, vector, VeraVector(vectors[name + SEP + vector]))
        module.vera_layer = _Layer(layers[name], full_config, calls[name])
        module.vera_path = path
        module.__class__ = _subclass(_LAYER, type(module))
    model.__class__ = _subclass(_MODEL, type(model))
    return model


def split(model: nnx.Module) -> tuple[nnx.GraphDef, dict, Adapter]:
    """The pure view: ``(graphdef, params, adapter)``.

    ``graphdef`` is the base model's (no VeRA), ``params`` its ``nnx.Param`` values as a nested dict, and
    ``adapter`` a `vera_jax.Adapter` holding the model's vectors and A/B. So
    ``nnx.merge(graphdef, vera_jax.merge(params, adapter))(x)`` gives the adapted model's output, and
    every pure function of the library (checkpoints, `vera_jax.stack`, ...) applies.
    """
    info = _info(model)
    trainable = unflatten(flatten(nnx.to_pure_dict(nnx.state(model, VeraVector))))  # string keys, as init_adapter's
    pair = getattr(model, PROJECTIONS)
    adapter = Adapter(trainable=trainable,
                      projections=Projections(pair.A.get_value(), pair.B.get_value(), info.projection_layers),
                      config=info.config, generator=info.generator)
    with _detached(model):
        graphdef = nnx.graphdef(model)
    return graphdef, _params(model), adapter


def update(model: nnx.Module, adapter: Adapter) -> None:
    """Write ``adapter`` (its vectors, A/B and config) into the adapted ``model``: after pure training, a
    restored checkpoint or a PEFT file (`vera_jax.peft.load_adapter` on ``split(model)[1]``).

    Raises:
      ValueError: the adapter adapts other layers (or another rank, or other trained vectors) than the
        model's VeRA, or its vectors do not fit.
    """
    info = _info(model)
    rules = info.stated + tuple(rule for rule in adapter.config.kernel_axes if rule not in info.stated)
    config = dataclasses.replace(adapter.config, kernel_axes=rules)
    params = _params(model)
    theirs, ours = find_layers(params, config), find_layers(params, info.config)
    if theirs != ours or trained_vectors(config) != trained_vectors(info.config):
        raise ValueError(
            f"This adapter adapts {[layer.path for layer in theirs][:4]} (r={config.r}, train_vectors="
            f"{config.train_vectors!r}), but the model's VeRA adapts {[layer.path for layer in ours][:4]} "
            f"(r={info.config.r}, train_vectors={info.config.train_vectors!r}); attach VeRA with the adapter's config.")
    layer_vectors(params, adapter.replace(config=config))  # every vector and A/B fits, before anything is written
    flat = flatten(adapter.trainable)
    for name, module in _modules(model).items():
        if _is(module, _LAYER):
            module.vera_layer = dataclasses.replace(module.vera_layer, config=config)
            for vector in trained_vectors(config):
                getattr(module, vector).set_value(flat[name + SEP + vector])
    pair = getattr(model, PROJECTIONS)
    pair.A.set_value(adapter.projections.A)
    pair.B.set_value(adapter.projections.B)
    model.vera_model = dataclasses.replace(info, config=config, generator=adapter.generator)


@contextlib.contextmanager
def _detached(model: nnx.Module) -> Iterator[None]:
    """The base model within the context: VeRA's classes, variables and records taken off, then put back."""
    saved = []
    for module in [model, *_modules(model).values()]:
        if _is(module, _LAYER) or _is(module, _MODEL):
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
