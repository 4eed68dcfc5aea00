"""`CompiledStep`: what the benchmarks time, a function compiled once with its state donated and carried from call
to call, with its compile seconds and XLA's compiled peak memory; `training_step`, a VeRA training step as one."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from train.engine import steps

__all__ = ["CompiledStep", "training_step", "peak_bytes"]


def peak_bytes(compiled: jax.stages.Compiled) -> int | None:
    """XLA's compiled peak: temporaries, arguments and outputs, less the outputs aliasing donated arguments (None
    where the backend gives no memory analysis)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               - analysis.alias_size_in_bytes)


def _copy(state: tuple) -> tuple:
    return jax.tree.map(jnp.copy, state)  # its own buffers: the step donates them


class CompiledStep:
    """``fn(*state, *args, *per_call())`` jitted with ``state`` donated, lowered and compiled once for these arguments.

    Each call runs it on the current state, blocks and returns its outputs, whose first ``len(state)`` become the
    next state. ``args`` are the same every call (params, batch);
    ``per_call`` gives arguments drawn anew for each call (a dropout key).
    """

    def __init__(self, fn: Callable, state: tuple = (), args: tuple = (), per_call: Callable[[], tuple] = tuple):
        self.initial, self.args, self.per_call = state, args, per_call
        self.state = _copy(state)
        started = time.perf_counter()
        jitted = jax.jit(fn, donate_argnums=tuple(range(len(state))))
        self.compiled = jitted.lower(*self.state, *args, *per_call()).compile()
        self.compile_seconds = time.perf_counter() - started
        self.peak_bytes = peak_bytes(self.compiled)

    def once(self, *args):
        """All outputs of one call from a copy of the initial state, on ``args`` (default: the timed ones); the timed
        state stays as it is."""
        return self.compiled(*_copy(self.initial), *(args or self.args), *self.per_call())

    def __call__(self):
        outputs = jax.block_until_ready(self.compiled(*self.state, *self.args, *self.per_call()))
        if self.state:
            self.state = tuple(outputs[:len(self.state)])
        return outputs


def training_step(logits_fn: Callable, adapter, params, batch: dict, task: str, *, dropout: bool) -> CompiledStep:
    """A step of `train.engine.steps.make_train_step` with Adam on ``adapter`` (any struct with ``trainable``) and
    ``batch``: with ``dropout`` the model in training mode, a fresh dropout key each step; without, in eval mode."""
    tx = optax.adam(1e-3)
    step = steps.make_train_step(logits_fn, tx, task)
    state = (adapter, tx.init(adapter.trainable))
    if not dropout:
        return CompiledStep(step, state, (params, batch, None))
    keys = (jax.random.fold_in(jax.random.key(0), i) for i in itertools.count())
    return CompiledStep(step, state, (params, batch), per_call=lambda: (next(keys),))
