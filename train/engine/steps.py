"""Loss, optimizer and the jitted train / eval steps, for VeRA and for the head-only baseline."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import vera_jax
from train.options import OptimOptions
from vera_jax.paths import SEP, flatten, unflatten

__all__ = ["make_optimizer", "head_only_logits", "make_train_step", "make_eval_step", "make_group_gradients",
           "make_apply_gradients", "merged_leaves", "make_merged_group_gradients", "loss_value", "loss_terms",
           "next_token_terms"]


def _schedule(kind: str, peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    warmup = max(1, int(round(warmup_ratio * total_steps)))
    decay_steps = max(1, total_steps - warmup)
    decay = {
        "linear": optax.linear_schedule(peak, 0.0, decay_steps),
        "cosine": optax.cosine_decay_schedule(peak, decay_steps),
        "constant": optax.constant_schedule(peak),
    }
    if kind not in decay:
        raise ValueError(f"--schedule must be one of {sorted(decay)}, got {kind!r}.")
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay[kind]], [warmup])


def make_optimizer(optim: OptimOptions, total_steps: int) -> optax.GradientTransformation:
    """AdamW with separate learning-rate schedules for the VeRA vectors and the leaves trained in full."""

    def labels(tree):
        return unflatten({path: "vectors" if vera_jax.is_vector_path(path) else "head" for path in flatten(tree)})

    make = lambda lr: optax.adamw(_schedule(optim.schedule, lr, total_steps, optim.warmup_ratio),  # noqa: E731
                                  weight_decay=optim.weight_decay)
    return optax.multi_transform({"vectors": make(optim.lr_vectors), "head": make(optim.lr_head)}, labels)


def head_only_logits(model) -> Callable:
    """The baseline: the frozen model (a `train.models.interface.Model`) with only its head's leaves swapped for the
    trained ones (``adapter.trainable`` holds the head alone)."""

    def logits(params, adapter, batch, rng):
        return model.logits(vera_jax.combine(params, adapter), batch, rng)

    return logits


def loss_value(logits: jax.Array, labels: jax.Array, task: str) -> jax.Array:
    """Per-example loss: softmax cross-entropy, or squared error for regression (logits (B, 1))."""
    if task == "regression":
        return jnp.square(logits[:, 0] - labels)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def next_token_terms(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal LM: (nll, hit, weight), each (B, L-1), for predicting token t+1 from logits at t.

    ``batch['labels']`` (B, L) is 1 on the tokens that are scored (the answers) and 0 elsewhere.
    """
    targets = batch["input_ids"][:, 1:]
    logits = logits[:, :-1].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll, jnp.argmax(logits, axis=-1) == targets, batch["labels"][:, 1:].astype(jnp.float32)


def loss_terms(logits: jax.Array, batch: dict, task: str) -> tuple[jax.Array, jax.Array]:
    """``(total, count)``: the summed loss and what it averages over (examples, or scored tokens for
    ``task='causal-lm'``); the training objective is ``total / max(count, 1)`` over the whole batch."""
    if task == "causal-lm":
        nll, _, weight = next_token_terms(logits, batch)
        return jnp.sum(nll * weight), jnp.sum(weight)
    losses = loss_value(logits, batch["labels"], task)
    return jnp.sum(losses), jnp.asarray(losses.shape[0], jnp.float32)


def make_group_gradients(logits_fn: Callable, task: str) -> Callable:
    """``gradients(adapter, params, group, rng) -> (total, count, grads)`` on one group of a batch's rows.

    ``total`` and ``count`` are `loss_terms`; ``grads`` is the gradient of ``total`` for ``adapter.trainable``.
    `make_apply_gradients` turns the groups of one batch into that batch's step: groups padded apart compute
    the batch's gradient without padding short rows to the longest.
    """

    def gradients(adapter, params, group, rng):
        def total(trainable):
            return loss_terms(logits_fn(params, adapter.replace(trainable=trainable), group, rng), group, task)

        (total_loss, count), grads = jax.value_and_grad(total, has_aux=True)(adapter.trainable)
        return total_loss, count, grads

    return gradients


def merged_leaves(params: dict, adapter) -> dict:
    """The leaves `vera_jax.merge` changes, flat by path: each adapted kernel ``W0 + delta_W`` and each leaf
    trained in full. A function of ``adapter.trainable``: what `make_merged_group_gradients` differentiates."""
    merged = flatten(vera_jax.merge(params, adapter))
    kernels = [layer.path + SEP + "kernel" for layer in vera_jax.find_layers(params, adapter.config)]
    return {path: merged[path] for path in kernels} | vera_jax.vectors.full_leaves(adapter.trainable)


def make_merged_group_gradients(model, task: str) -> Callable:
    """The merged path with its merge hoisted out of a batch's groups: ``gradients(merged, params, group, rng) ->
    (total, count, grads)``, where ``merged`` is `merged_leaves` (computed once for every group of a step) and
    ``grads`` the gradient of ``total`` for those leaves (``make_apply_gradients(tx, hoisted=True)`` carries them
    back to the vectors). ``model`` is a `train.models.interface.Model` whose ``hoists_merge`` says so; its dropout
    draws from ``rng`` as its ``vera_logits`` has it draw."""

    def gradients(merged, params, group, rng):
        model_rng = None if rng is None else jax.random.split(rng)[0]

        def total(leaves):
            logits = model.logits(unflatten(flatten(params) | leaves, like=params), group, model_rng)
            return loss_terms(logits, group, task)

        (total_loss, count), grads = jax.value_and_grad(total, has_aux=True)(merged)
        return total_loss, count, grads

    return gradients


def make_apply_gradients(tx: optax.GradientTransformation, hoisted: bool = False) -> Callable:
    """``apply(adapter, opt_state, groups, params=None) -> (adapter, opt_state, loss)``: one optimizer step for the
    mean loss of a batch whose groups gave ``groups``, a sequence of `make_group_gradients` results, or with
    ``hoisted`` of `make_merged_group_gradients` results (their gradients reach the vectors through the VJP of
    `merged_leaves`, which reads ``params``)."""

    def apply(adapter, opt_state, groups, params=None):
        count = jnp.maximum(sum(group[1] for group in groups), 1.0)
        grads = jax.tree.map(lambda *parts: sum(parts) / count, *(group[2] for group in groups))
        if hoisted:
            _, pullback = jax.vjp(lambda trainable: merged_leaves(params, adapter.replace(trainable=trainable)),
                                  adapter.trainable)
            (grads,) = pullback(grads)
        updates, opt_state = tx.update(grads, opt_state, adapter.trainable)
        loss = sum(group[0] for group in groups) / count
        return adapter.replace(trainable=optax.apply_updates(adapter.trainable, updates)), opt_state, loss

    return apply


def make_train_step(logits_fn: Callable, tx: optax.GradientTransformation, task: str) -> Callable:
    """The one-group training step of sweeps and benchmarks.

    ``step(adapter, opt_state, params, batch, rng) -> (adapter, opt_state, loss)``: one optimizer step
    of ``adapter.trainable`` only (the frozen base and A/B get no gradient), for the loss of
    ``logits_fn(params, adapter, batch, rng)``. ``adapter`` is a `vera_jax.Adapter`, or any
    ``flax.struct`` with a ``trainable`` field (the benchmark's floor); ``opt_state`` is
    ``tx.init(adapter.trainable)``; rng None runs without dropout.
    """
    gradients, apply = make_group_gradients(logits_fn, task), make_apply_gradients(tx)

    def step(adapter, opt_state, params, batch, rng):
        return apply(adapter, opt_state, (gradients(adapter, params, batch, rng),))

    return step


def make_eval_step(logits_fn: Callable, task: str) -> Callable:
    """``evaluate(adapter, params, batch) -> (correct, loss_sum, count)``, weighted sums.

    ``batch['weights']`` (B,) is 1 for real rows and 0 for padding rows. For regression, "correct"
    counts predictions with the label's sign (the binary task the scores define); for a causal LM the
    sums run over scored tokens, so loss_sum / count is the log-perplexity and correct / count the
    next-token accuracy.
    """

    def evaluate(adapter, params, batch):
        logits = logits_fn(params, adapter, batch, None)
        weights = batch["weights"]
        if task == "causal-lm":
            nll, hit, weight = next_token_terms(logits, batch)
            weight = weight * weights[:, None]
            return jnp.sum(hit * weight), jnp.sum(nll * weight), jnp.sum(weight)
        if task == "regression":
            correct = (logits[:, 0] > 0) == (batch["labels"] > 0)
        else:
            correct = jnp.argmax(logits, axis=-1) == batch["labels"]
        loss = loss_value(logits, batch["labels"], task)
        return jnp.sum(correct * weights), jnp.sum(loss * weights), jnp.sum(weights)

    return evaluate
