"""Choose, per adapted layer, the cheaper of the merged and activation paths from a FLOP model.

For a layer with in/out features, rank r and T tokens per step (multiply-adds counted as 2 FLOPs):

    merged      forward  2 r in out                (build delta_W)
                backward 2 T in out + 4 r in out   (the kernel cotangent x^T dY, then through delta_W)
    activation  forward  2 T r (in + out)          (x A^T, then B)
                backward 4 T r (in + out)          (dx through A and B, and the vector gradients)

Merged pays once per step for the weight delta and its gradient; activation pays per token. Large r
relative to in*out/(in+out), or few tokens, favour merged... and the other way round.

FLOPs are not equally fast: on a CPU the merged path's FLOPs (the transposed weight-gradient
contraction and the passes over out x in weights) run about 1.6x slower than the activation path's
tall matmuls, enough to flip 576 x 1536 layers at 1,024 tokens. And layers that read one input
(q/k/v, gate/up) share ``x A^T`` on the activation path: XLA computes it once for all of them.
``plan_paths(..., measure=True)`` therefore times both paths on the device at hand, for every
distinct group of layers that share an input (`shared_input_groups` finds them by tracing the model;
without it each layer is its own group), and picks per group by the measured time.

Timed alone, layers can still mislead about a whole model (on SmolLM2 the groups' timings favoured
merged while the whole merged step ran 1.24x slower than the whole activation step), so where one
path serves the whole model `whole_step_plan` times the model's own gradient step on each path.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from vera_jax.config import VeraConfig
from vera_jax.layers import AdaptedLayer, find_layers
from vera_jax.ops import adapter_output, delta_weight
from vera_jax.paths import SEP

__all__ = ["PathPlan", "LayerCost", "layer_cost", "measured_seconds", "shared_input_groups", "plan_paths",
           "whole_step_plan"]

_TIMED_RUNS = 5


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One layer's cost per step on each path (estimated FLOPs, or measured seconds), and the choice."""

    path: str
    merged: float
    activation: float

    @property
    def choice(self) -> str:
        return "merged" if self.merged <= self.activation else "activation"


def layer_cost(layer: AdaptedLayer, r: int, tokens: int, training: bool) -> LayerCost:
    """The FLOP model above for one layer (training includes the backward pass)."""
    weight = layer.in_features * layer.out_features
    per_token = r * (layer.in_features + layer.out_features)
    merged = 2 * r * weight + ((2 * tokens * weight + 4 * r * weight) if training else 0)
    activation = 2 * tokens * per_token * (3 if training else 1)
    return LayerCost(layer.path, merged, activation)


@dataclasses.dataclass(frozen=True)
class PathPlan:
    """Which path each adapted layer takes; hashable, so it can be a static argument to `jax.jit`.

    Attributes:
      costs: one `LayerCost` per adapted layer, in params order.
      tokens: tokens per step the plan was made for.
      training: whether backward passes were counted.
      measured: costs are seconds measured on a device, not estimated FLOPs.
      per_layer: each layer takes its own cheaper path; False: one path, cheaper in total, for all.
      whole_steps: the costs are whole model steps (`whole_step_plan`), spread evenly over the layers.
    """

    costs: tuple[LayerCost, ...]
    tokens: int
    training: bool
    measured: bool = False
    per_layer: bool = True
    whole_steps: bool = False

    @classmethod
    def from_whole_steps(cls, params: Mapping, config: VeraConfig, merged: float, activation: float,
                         tokens: int) -> PathPlan:
        """One path for every layer, from the seconds of the model's whole training step on each path."""
        layers = find_layers(params, config)
        costs = tuple(LayerCost(layer.path, merged / len(layers), activation / len(layers)) for layer in layers)
        return cls(costs, tokens, training=True, measured=True, per_layer=False, whole_steps=True)

    def paths(self) -> tuple[str, ...]:
        """The path each layer takes, in `costs` order: its own cheaper one, or (``per_layer=False``) the
        one cheaper in total for every layer."""
        if self.per_layer:
            return tuple(c.choice for c in self.costs)
        merged, activation = self.totals
        return ("merged" if merged <= activation else "activation",) * len(self.costs)

    @property
    def totals(self) -> tuple[float, float]:
        """``(merged, activation)``: the cost of sending every layer down each path."""
        return sum(c.merged for c in self.costs), sum(c.activation for c in self.costs)

    @property
    def merged(self) -> frozenset[str]:
        return frozenset(c.path for c, path in zip(self.costs, self.paths()) if path == "merged")

    @property
    def activation(self) -> frozenset[str]:
        return frozenset(c.path for c, path in zip(self.costs, self.paths()) if path == "activation")

    def _format(self, cost: float, scale: str) -> str:
        if self.measured:
            return f"{cost * 1e3:.1f} ms"
        return f"{cost / 1e9:.2f} GFLOP" if scale == "G" else f"{cost / 1e6:.1f} MFLOP"

    def summary(self) -> str:
        """One line: what was picked and why."""
        merged, activation = len(self.merged), len(self.activation)
        total = dict(zip(("merged", "activation"), self.totals))
        chosen = sum(getattr(c, path) for c, path in zip(self.costs, self.paths()))
        mode = "training" if self.training else "inference"
        if self.whole_steps:
            return (f"auto: every layer {self.paths()[0]}, for {self.tokens} tokens per {mode} step; measured "
                    f"whole steps of the model on this device: {self._format(total['merged'], 'G')} all merged, "
                    f"{self._format(total['activation'], 'G')} all on activations")
        how = ("measured on this device" if self.measured else "estimated") + ("" if self.per_layer else
                                                                                 ", one path for the whole model")
        return (f"auto: {merged} layers merged, {activation} on the activation path for {self.tokens} tokens per "
                f"{mode} step; {how} {self._format(chosen, 'G')} of VeRA work against "
                f"{self._format(total['merged'], 'G')} all merged and {self._format(total['activation'], 'G')} all "
                "on activations")

    def explain(self) -> str:
        """`summary` and a row per layer with both costs (whole-step plans have no per-layer costs)."""
        if self.whole_steps:
            return self.summary()
        rows = [f"{c.path}  merged {self._format(c.merged, 'M')}  activation {self._format(c.activation, 'M')}  "
                f"-> {path}" for c, path in zip(self.costs, self.paths())]
        return "\n".join([self.summary(), *rows])


def _median_seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(_TIMED_RUNS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@functools.lru_cache(maxsize=64)
def measured_seconds(in_features: int, out_features: tuple[int, ...], r: int, tokens: int, training: bool,
                     dtype: str = "float32", device: jax.Device | None = None) -> tuple[float, float]:
    """``(merged, activation)``: median seconds of one step of layers (in, out_i) that read one input x.

    One jitted function per path: ``x @ W_i`` plus each layer's VeRA term for ``tokens`` rows of x, with
    the gradient of the vectors and of x when ``training`` (the ``x @ W_i`` are common to both paths).
    Cached per shape, on ``device`` (default: the first device).
    """
    device = device or jax.devices()[0]
    keys = iter(jax.random.split(jax.random.key(0), 2 + 3 * len(out_features)))
    normal = lambda *shape: jax.device_put(jax.random.normal(next(keys), shape, dtype), device)  # noqa: E731
    x, a = normal(tokens, in_features), normal(r, in_features)
    layers = [(normal(in_features, out), normal(out, r), normal(tokens, out)) for out in out_features]
    lambda_d = jax.device_put(jnp.full((len(out_features), r), 0.1, dtype), device)
    lambda_b = tuple(jax.device_put(jnp.full((out,), 0.1, dtype), device) for out in out_features)

    def merged(lambda_d, lambda_b, x, a, layers):
        return sum(jnp.vdot(x @ (w + delta_weight(a, b, d, lb, in_features).T), cotangent)
                   for d, lb, (w, b, cotangent) in zip(lambda_d, lambda_b, layers))

    def activation(lambda_d, lambda_b, x, a, layers):
        return sum(jnp.vdot(x @ w + adapter_output(x, a, b, d, lb), cotangent)
                   for d, lb, (w, b, cotangent) in zip(lambda_d, lambda_b, layers))

    args = (lambda_d, lambda_b, x, a, layers)
    step = (lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2)))) if training else jax.jit
    return _median_seconds(step(merged), *args), _median_seconds(step(activation), *args)


def shared_input_groups(fn, params: Mapping, config: VeraConfig, *args) -> tuple[tuple[str, ...], ...]:
    """The adapted layers grouped by the input they read, found by tracing ``fn(params, *args)`` (no compute).

    ``args`` may be ``jax.ShapeDtypeStruct``; e.g. ``(('.../q_proj', '.../k_proj', '.../v_proj'), ...)``.
    """
    adapted = {layer.path for layer in find_layers(params, config)}
    readers: dict[int, list[str]] = {}
    inputs = []  # keeps every traced input alive, so that no id is reused while tracing

    def interceptor(next_fun, call_args, kwargs, context):
        path = SEP.join(context.module.path)
        if context.method_name == "__call__" and path in adapted:
            x = call_args[0] if call_args else kwargs["inputs"]
            inputs.append(x)
            readers.setdefault(id(x), []).append(path)
        return next_fun(*call_args, **kwargs)

    def traced(params, *args):
        with nn.intercept_methods(interceptor):
            return fn(params, *args)

    jax.eval_shape(traced, params, *args)
    order = {layer.path: i for i, layer in enumerate(find_layers(params, config))}
    groups = {tuple(sorted(set(paths), key=order.__getitem__)) for paths in readers.values()}
    missing = adapted.difference(*groups)
    return tuple(sorted(groups | {(path,) for path in missing}, key=lambda group: order[group[0]]))


def plan_paths(params: Mapping, config: VeraConfig, *, tokens: int, training: bool = True,
               measure: bool = False, input_groups: tuple[tuple[str, ...], ...] | None = None,
               per_layer: bool = True) -> PathPlan:
    """The cheaper path per layer for ``tokens`` tokens per step (e.g. batch size x sequence length).

    ``measure=False`` (pure, instant) compares the FLOP model; ``measure=True`` compares times measured
    on the default device with `measured_seconds`, a few seconds per distinct group shape, for the
    ``input_groups`` from `shared_input_groups` (default: every layer alone); a group takes one path and
    each member is charged an equal share of the group's time. ``per_layer=False`` sends every layer down
    the path that is cheaper in total: measured whole programs mixing the two paths ran slower than the
    predictions of their parts (SmolLM2 on a CPU: 60 of 210 layers merged, 6.71 s a step, against 6.12 s
    with every layer on activations), so the training entry points plan one path per model, and time
    it as whole steps (`whole_step_plan`).
    """
    if tokens <= 0:
        raise ValueError(f"tokens per step must be positive, got {tokens}.")
    layers = find_layers(params, config)
    if not measure:
        return PathPlan(tuple(layer_cost(layer, config.r, tokens, training) for layer in layers), tokens, training,
                        per_layer=per_layer)
    by_path = {layer.path: layer for layer in layers}
    groups = input_groups or tuple((layer.path,) for layer in layers)
    share = {}
    for group in groups:
        members = [by_path[path] for path in group]
        if len({layer.in_features for layer in members}) != 1:
            raise ValueError(f"Layers {group} read one input but have different in_features.")
        seconds = measured_seconds(members[0].in_features, tuple(layer.out_features for layer in members), config.r,
                                   tokens, training, config.dtype)
        share.update({path: tuple(t / len(group) for t in seconds) for path in group})
    if set(share) != set(by_path):
        raise ValueError(f"input_groups cover {sorted(set(share))[:4]}... but the adapted layers are "
                         f"{sorted(by_path)[:4]}...; build them with shared_input_groups for these params and config.")
    return PathPlan(tuple(LayerCost(layer.path, *share[layer.path]) for layer in layers), tokens, training,
                    measured=True, per_layer=per_layer)


def whole_step_plan(fn, params: Mapping, trainable: Mapping, projections, *args, tokens: int) -> PathPlan:
    """One path for the whole model: the one whose gradient step of ``fn(params, *args)`` runs faster here.

    Compiles and times (median of a few runs) the gradient of the trainable tree through
    ``vera_jax.adapt(fn, trainable, projections, path=...)`` for "merged" and for "activation", on the
    default device; ``args`` are example inputs of the training batch's shape (e.g. token ids (B, T)).
    Costs seconds of compiling, and the truth where per-layer timings mislead.

    Args:
      fn: a function of the base params whose output (any pytree of arrays) the loss reads.
      tokens: tokens per step in ``args``, for the summary.
    """
    from vera_jax.activation import adapt  # the adapter paths build on this module's plans

    outputs = jax.eval_shape(fn, params, *args)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(outputs))))
    cotangents = jax.tree.map(lambda o: jax.random.normal(next(keys), o.shape, jnp.float32), outputs)

    def gradient(path):
        def loss(trainable):
            out = adapt(fn, trainable, projections, path=path)(params, *args)
            return sum(jnp.vdot(o.astype(jnp.float32), c) for o, c in zip(jax.tree.leaves(out),
                                                                          jax.tree.leaves(cotangents)))

        return jax.jit(jax.grad(loss))

    merged, activation = (_median_seconds(gradient(path), trainable) for path in ("merged", "activation"))
    return PathPlan.from_whole_steps(params, projections.config, merged, activation, tokens)
