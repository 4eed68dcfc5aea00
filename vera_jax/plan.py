"""Which path each adapted layer takes: `PathPlan`, and the pure FLOP model behind `plan_paths`.

A path is how an adapted layer runs: ``"merged"`` (W0 + delta_W built once per step), ``"activation"``
(the VeRA output added to the layer's output) or ``"activation-lean"`` (the activation path with a
backward pass that keeps only the r-sized intermediate). A plan assigns merged or activation to each
layer. For a layer with in/out features, rank r and T tokens per step (multiply-adds counted as 2 FLOPs):

    merged      forward  2 r in out                (build delta_W)
                backward 2 T in out + 4 r in out   (the kernel cotangent x^T dY, then through delta_W)
    activation  forward  2 T r (in + out)          (x A^T, then B)
                backward 4 T r (in + out)          (dx through A and B, and the vector gradients)

Merged pays once per step for the weight delta and its gradient; activation pays per token. FLOPs are
not equally fast on every device: `vera_jax.timing` measures instead of counting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vera_jax.config import VeraConfig
from vera_jax.layers import AdaptedLayer, find_layers

__all__ = ["PATHS", "NNX_PATHS", "PathPlan", "LayerCost", "layer_cost", "plan_paths"]

PATHS = ("merged", "activation", "activation-lean")
NNX_PATHS = ("merged", "activation")  # the paths `vera_jax.nnx` runs: no lean backward there


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
    stack = layer.layers or 1  # a stack of L layers: L times the work, each layer seeing the step's tokens
    merged, activation = stack * merged, stack * activation
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


def plan_paths(params: Mapping, config: VeraConfig, *, tokens: int, training: bool = True,
               per_layer: bool = True) -> PathPlan:
    """The cheaper path per layer by the FLOP model, for ``tokens`` tokens per step (batch x sequence length).

    Pure and instant. ``per_layer=False`` sends every layer down the path that is cheaper in total.

    Raises:
      ValueError: ``tokens`` is not positive, or the config selects no layer of ``params``.
    """
    if tokens <= 0:
        raise ValueError(f"tokens per step must be positive, got {tokens}.")
    return PathPlan(tuple(layer_cost(layer, config.r, tokens, training) for layer in find_layers(params, config)),
                    tokens, training, per_layer=per_layer)
