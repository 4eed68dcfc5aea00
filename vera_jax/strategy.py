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
tall matmuls, enough to flip 576 x 1536 layers at 1,024 tokens. ``plan_paths(..., measure=True)``
therefore times both paths of every distinct layer shape on the device at hand (one jitted layer,
forward and backward, a few runs each) and picks by the measured time.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from vera_jax.config import VeraConfig
from vera_jax.layers import AdaptedLayer, find_layers
from vera_jax.ops import adapter_output, delta_weight

__all__ = ["PathPlan", "LayerCost", "layer_cost", "measured_layer_seconds", "plan_paths"]

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
    """

    costs: tuple[LayerCost, ...]
    tokens: int
    training: bool
    measured: bool = False

    @property
    def merged(self) -> frozenset[str]:
        return frozenset(c.path for c in self.costs if c.choice == "merged")

    @property
    def activation(self) -> frozenset[str]:
        return frozenset(c.path for c in self.costs if c.choice == "activation")

    def _format(self, cost: float, scale: str) -> str:
        if self.measured:
            return f"{cost * 1e3:.1f} ms"
        return f"{cost / 1e9:.2f} GFLOP" if scale == "G" else f"{cost / 1e6:.1f} MFLOP"

    def summary(self) -> str:
        """One line: what was picked and why."""
        merged, activation = len(self.merged), len(self.activation)
        total = {name: sum(getattr(c, name) for c in self.costs) for name in ("merged", "activation")}
        chosen = sum(min(c.merged, c.activation) for c in self.costs)
        mode = "training" if self.training else "inference"
        how = "measured on this device" if self.measured else "estimated"
        return (f"auto: {merged} layers merged, {activation} on the activation path for {self.tokens} tokens per "
                f"{mode} step; {how} {self._format(chosen, 'G')} of VeRA work against "
                f"{self._format(total['merged'], 'G')} all merged and {self._format(total['activation'], 'G')} all "
                "on activations")

    def explain(self) -> str:
        """`summary` and a row per layer with both costs."""
        rows = [f"{c.path}  merged {self._format(c.merged, 'M')}  activation {self._format(c.activation, 'M')}  "
                f"-> {c.choice}" for c in self.costs]
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
def measured_layer_seconds(in_features: int, out_features: int, r: int, tokens: int, training: bool,
                           dtype: str = "float32", device: jax.Device | None = None) -> tuple[float, float]:
    """``(merged, activation)``: median seconds of one (in, out) layer's step on each path, on ``device``.

    Each is one jitted layer, ``x @ W`` plus the VeRA term for ``tokens`` rows of x, with the gradient of
    the vectors and of x when ``training``; the shared ``x @ W`` cancels in the comparison. Cached per shape.
    """
    device = device or jax.devices()[0]
    keys = jax.random.split(jax.random.key(0), 5)
    x, w, a, b, cotangent = (jax.device_put(jax.random.normal(key, shape, dtype), device) for key, shape in zip(
        keys, ((tokens, in_features), (in_features, out_features), (r, in_features), (out_features, r),
               (tokens, out_features))))
    lambda_d = jax.device_put(jnp.full((r,), 0.1, dtype), device)
    lambda_b = jax.device_put(jnp.full((out_features,), 0.1, dtype), device)

    def merged(lambda_d, lambda_b, x, w, a, b, cotangent):
        return jnp.vdot(x @ (w + delta_weight(a, b, lambda_d, lambda_b, in_features).T), cotangent)

    def activation(lambda_d, lambda_b, x, w, a, b, cotangent):
        return jnp.vdot(x @ w + adapter_output(x, a, b, lambda_d, lambda_b), cotangent)

    args = (lambda_d, lambda_b, x, w, a, b, cotangent)
    step = (lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2)))) if training else jax.jit
    return _median_seconds(step(merged), *args), _median_seconds(step(activation), *args)


def plan_paths(params: Mapping, config: VeraConfig, *, tokens: int, training: bool = True,
               measure: bool = False) -> PathPlan:
    """The cheaper path per layer for ``tokens`` tokens per step (e.g. batch size x sequence length).

    ``measure=False`` (pure, instant) compares the FLOP model; ``measure=True`` compares times measured
    on the default device with `measured_layer_seconds`, a few seconds per distinct layer shape.
    """
    if tokens <= 0:
        raise ValueError(f"tokens per step must be positive, got {tokens}.")
    layers = find_layers(params, config)
    if not measure:
        return PathPlan(tuple(layer_cost(layer, config.r, tokens, training) for layer in layers), tokens, training)
    costs = tuple(LayerCost(layer.path, *measured_layer_seconds(layer.in_features, layer.out_features, config.r, tokens,
                                                                 training, config.dtype)) for layer in layers)
    return PathPlan(costs, tokens, training, measured=True)
