"""Paths timed on the device at hand, where the FLOP model of `vera_jax.plan` misleads.

On a CPU the merged path's FLOPs (the transposed weight-gradient contraction and the passes over
out x in weights) run about 1.6x slower than the activation path's tall matmuls, enough to flip
576 x 1536 layers at 1,024 tokens; and layers that read one input (q/k/v, gate/up) share ``x A^T`` on
the activation path. `measured_plan` times both paths for every distinct group of layers that share
an input (`vera_jax.shared_input_groups` finds them) and picks per group. Timed alone, layers can still
mislead about a whole model (on SmolLM2 the groups' timings favoured merged while the whole merged
step ran 1.24x slower), so `whole_step_plan` times the model's own gradient step on each path. Both time
with `time_in_rounds`, which also times the benchmarks of ``python -m train``.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from vera_jax.activation import adapt
from vera_jax.adapter import Adapter
from vera_jax.config import VeraConfig
from vera_jax.layers import find_layers
from vera_jax.ops import adapter_output, delta_weight
from vera_jax.plan import LayerCost, PathPlan

__all__ = ["measured_seconds", "measured_plan", "whole_step_plan", "time_in_rounds"]

_TIMED_RUNS = 5


def time_in_rounds(runners: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
                   settle: float = 0.0) -> dict[str, list[float]]:
    """Seconds of each blocking call, timed in rounds: one call of every runner per round, in a shuffled
    order, so that machine noise falls on all of them alike. ``warmup`` untimed calls each come first (the
    first one compiles a jitted runner); ``settle`` idle seconds precede each timed call (another framework's
    threads may spin on after a call)."""
    for runner in runners.values():
        for _ in range(warmup):
            runner()
    times = {name: [] for name in runners}
    order = random.Random(0)
    for _ in range(rounds):
        names = list(runners)
        order.shuffle(names)  # no runner always runs right after the same other one
        for name in names:
            time.sleep(settle)
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _median_seconds(fn, *args) -> float:
    runner = {"fn": lambda: jax.block_until_ready(fn(*args))}
    return statistics.median(time_in_rounds(runner, _TIMED_RUNS)["fn"])


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


def measured_plan(params: Mapping, config: VeraConfig, *, tokens: int, training: bool = True,
                  input_groups: tuple[tuple[str, ...], ...] | None = None, per_layer: bool = True) -> PathPlan:
    """The faster path per group of layers, timed on the default device (a few seconds per distinct shape).

    ``input_groups`` come from `vera_jax.shared_input_groups` (default: every layer alone); a group takes
    one path and each member is charged an equal share of the group's time. Measured whole programs
    mixing the two paths ran slower than the predictions of their parts (SmolLM2 on a CPU: 60 of 210
    layers merged, 6.71 s a step, against 6.12 s with every layer on activations), so the training
    entry points plan one path per model with `whole_step_plan`.

    Raises:
      ValueError: ``tokens`` is not positive, or the groups do not cover the adapted layers exactly.
    """
    if tokens <= 0:
        raise ValueError(f"tokens per step must be positive, got {tokens}.")
    layers = find_layers(params, config)
    by_path = {layer.path: layer for layer in layers}
    groups = input_groups or tuple((layer.path,) for layer in layers)
    share = {}
    for group in groups:
        members = [by_path[path] for path in group if path in by_path]
        if len(members) != len(group) or len({layer.in_features for layer in members}) != 1:
            raise ValueError(f"Layers {group} are not adapted layers that read one input of one width; build the "
                             "groups with vera_jax.shared_input_groups for these params and config.")
        seconds = measured_seconds(members[0].in_features, tuple(layer.out_features for layer in members), config.r,
                                   tokens, training, config.dtype)
        share.update({path: tuple(t / len(group) for t in seconds) for path in group})
    if set(share) != set(by_path):
        raise ValueError(f"input_groups cover {sorted(set(share))[:4]}... but the adapted layers are "
                         f"{sorted(by_path)[:4]}...; build them with vera_jax.shared_input_groups for these params "
                         "and config.")
    return PathPlan(tuple(LayerCost(layer.path, *share[layer.path]) for layer in layers), tokens, training,
                    measured=True, per_layer=per_layer)


def whole_step_plan(fn: Callable, params: Mapping, adapter: Adapter, *args, tokens: int) -> PathPlan:
    """One path for the whole model: the one whose gradient step of ``fn(params, *args)`` runs faster here.

    Compiles and times (median of a few runs) the gradient of ``adapter.trainable`` through
    ``vera_jax.adapt(fn, adapter, path=...)`` for "merged" and for "activation", on the default device;
    ``args`` are example inputs of the training batch's shape (e.g. token ids (B, T)). Costs seconds of
    compiling, and the truth where per-layer timings mislead.

    Args:
      fn: a function of the base params whose output (any pytree of arrays) the loss reads.
      tokens: tokens per step in ``args``, for the summary.
    """
    outputs = jax.eval_shape(fn, params, *args)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(outputs))))
    cotangents = jax.tree.map(lambda o: jax.random.normal(next(keys), o.shape, jnp.float32), outputs)

    def gradient(path):
        def loss(trainable):
            out = adapt(fn, adapter.replace(trainable=trainable), path=path)(params, *args)
            return sum(jnp.vdot(o.astype(jnp.float32), c) for o, c in zip(jax.tree.leaves(out),
                                                                          jax.tree.leaves(cotangents)))

        return jax.jit(jax.grad(loss))

    merged, activation = (_median_seconds(gradient(path), adapter.trainable) for path in ("merged", "activation"))
    return PathPlan.from_whole_steps(params, adapter.config, merged, activation, tokens)
