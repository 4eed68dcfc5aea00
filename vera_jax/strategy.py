"""Choose, per adapted layer, the cheaper of the merged and activation paths from a FLOP model.

For a layer with in/out features, rank r and T tokens per step (multiply-adds counted as 2 FLOPs):

    merged      forward  2 r in out                (build delta_W)
                backward 2 T in out + 4 r in out   (the kernel cotangent x^T dY, then through delta_W)
    activation  forward  2 T r (in + out)          (x A^T, then B)
                backward 4 T r (in + out)          (dx through A and B, and the vector gradients)

Merged pays once per step for the weight delta and its gradient; activation pays per token. Large r
relative to in*out/(in+out), or few tokens, favour merged... and the other way round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vera_jax.config import VeraConfig
from vera_jax.layers import AdaptedLayer, find_layers

__all__ = ["PathPlan", "LayerCost", "layer_cost", "plan_paths"]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Estimated FLOPs of one layer's VeRA path per step, and the choice they make."""

    path: str
    merged: int
    activation: int

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

    @property
    def merged(self) -> frozenset[str]:
        return frozenset(c.path for c in self.costs if c.choice == "merged")

    @property
    def activation(self) -> frozenset[str]:
        return frozenset(c.path for c in self.costs if c.choice == "activation")

    def summary(self) -> str:
        """One line: what was picked and why."""
        merged, activation = len(self.merged), len(self.activation)
        total = {name: sum(getattr(c, name) for c in self.costs) for name in ("merged", "activation")}
        chosen = sum(min(c.merged, c.activation) for c in self.costs)
        mode = "training" if self.training else "inference"
        return (f"auto: {merged} layers merged, {activation} on the activation path for {self.tokens} tokens per "
                f"{mode} step; estimated {chosen / 1e9:.2f} GFLOP against {total['merged'] / 1e9:.2f} all merged "
                f"and {total['activation'] / 1e9:.2f} all on activations")

    def explain(self) -> str:
        """`summary` and a row per layer with both estimates."""
        rows = [f"{c.path}  merged {c.merged / 1e6:.1f} MFLOP  activation {c.activation / 1e6:.1f} MFLOP  -> {c.choice}"
                for c in self.costs]
        return "\n".join([self.summary(), *rows])


def plan_paths(params: Mapping, config: VeraConfig, *, tokens: int, training: bool = True) -> PathPlan:
    """The cheaper path per layer for ``tokens`` tokens per step (e.g. batch size x sequence length)."""
    if tokens <= 0:
        raise ValueError(f"tokens per step must be positive, got {tokens}.")
    costs = tuple(layer_cost(layer, config.r, tokens, training) for layer in find_layers(params, config))
    return PathPlan(costs, tokens, training)
