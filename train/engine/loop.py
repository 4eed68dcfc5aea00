"""The one training loop: a run's adapter, or a sweep program's K stacked adapters, trained step by step.

Each step takes the batch of the adapter's data order (`train_groups`: shuffled by seed, split into groups of rows
of like length), computes each group's gradients with one jitted function and applies their sum with another
(donated), logs the loss every ``--log-every`` steps and saves checkpoints. An adapter whose loss or trained
vectors stop being finite has diverged: a run stops there (`TrainingDiverged`); a stack of adapters goes on
with the others and reports each one's step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import vera_jax
from train.engine import data as data_lib
from train.engine import mesh as mesh_lib
from train.engine import steps
from train.engine.checkpoints import RunCheckpoints
from train.engine.errors import TrainingDiverged
from train.engine.metrics import MetricsLog
from train.engine.profile import JobProfile
from train.options import OptimOptions, Options
from vera_jax.host import to_host

__all__ = ["Context", "Trainees", "Trained", "Validation", "validation_due", "fit", "train_groups", "group_count",
           "dropout_key", "step_key", "learning_rate_flags", "DROPOUT_STREAM"]

DROPOUT_STREAM = 2**31  # fold_in offset for the dropout key: disjoint from the projection stream's blocks


@dataclasses.dataclass
class Context:
    """Everything the training and evaluation loops read, placed on the mesh."""

    options: Options
    mesh: jax.sharding.Mesh
    params: dict
    train_data: data_lib.TextData
    test_data: data_lib.TextData
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    length_groups: int = 1  # groups of rows a batch runs as (`group_count`)
    validation_data: data_lib.TextData | None = None


@dataclasses.dataclass(frozen=True)
class Trainees:
    """What the loop trains: one adapter (``seeds`` None), or K adapters stacked on a leading axis
    (`vera_jax.stack`) that train side by side in one program, vmapped ``adapters_per_pass`` at a time.

    Attributes:
      names: each adapter's name in the metrics log.
      seeds: None: the adapter draws its batches and dropout from ``--seed``; else stacked adapter k draws them
        from ``seeds[k]``, as a run with ``--seed seeds[k]`` would.
      adapters_per_pass: stacked adapters vmapped together; None: `vera_jax.adapters_per_pass` picks.
    """

    names: tuple[str, ...]
    seeds: tuple[int, ...] | None = None
    adapters_per_pass: int | None = None

    @property
    def stacked(self) -> bool:
        return self.seeds is not None

    @property
    def one_order(self) -> bool:
        """Whether every adapter sees the same batches (one data order)."""
        return not self.stacked or len(set(self.seeds)) == 1

    def per_adapter(self, fn: Callable, in_axes: tuple[int | None, ...], tokens: int) -> Callable:
        """``fn`` of one adapter, or mapped over the stack (`vera_jax.map_adapters`); ``tokens``: one adapter's
        tokens per call, from which the passes are sized."""
        if not self.stacked:
            return fn
        return vera_jax.map_adapters(fn, in_axes, self.adapters_per_pass or vera_jax.adapters_per_pass(tokens))

    def dropout_keys(self, seed: int) -> jax.Array:
        """The run's `dropout_key` of ``seed`` (one adapter), or one per stacked adapter, (K,)."""
        if not self.stacked:
            return dropout_key(seed)
        return jnp.stack([dropout_key(s) for s in self.seeds])

    def step_keys(self, keys: jax.Array, step, group) -> jax.Array:
        """`step_key` of each adapter's key."""
        return jax.vmap(step_key, (0, None, None))(keys, step, group) if self.stacked else step_key(keys, step, group)

    def train_groups(self, ctx: Context, step: int) -> list[dict]:
        """Step ``step``'s groups of rows: one adapter's (`train_groups`), or for a stack with several data orders
        each group with a leading adapter axis, (K, rows, tokens), padded to one length."""
        if self.one_order:
            return train_groups(ctx, step, self.seeds[0] if self.stacked else ctx.options.run.seed)
        by_seed = {seed: train_groups(ctx, step, seed) for seed in set(self.seeds)}
        return [_stack_groups([by_seed[seed][i] for seed in self.seeds], ctx.pad_id)
                for i in range(ctx.length_groups)]

    def finite(self, trainable) -> np.ndarray:
        """(K,) whether each adapter's trained tree is finite (K = 1 for one adapter)."""
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(to_host(trainable))]
        count = len(self.names)
        return np.all([np.isfinite(x.reshape(count, -1)).all(axis=1) for x in leaves], axis=0)


@dataclasses.dataclass(frozen=True)
class Validation:
    """Scoring on the validation rows while training: after the last step of every epoch, every ``every`` steps
    if set, and after the run's last step. Each score goes to the metrics log (``validation_accuracy``,
    ``validation_loss``).

    Attributes:
      score: ``score(adapter) -> (accuracy, loss)`` on the validation rows: floats, or (K,) for a stack.
      every: steps between validations besides the epochs' ends; None: at the epochs' ends only.
      keep_best: keep the adapter of the best validation accuracy too (one adapter only; checkpoints carry it).
    """

    score: Callable
    every: int | None = None
    keep_best: bool = False

    def due(self, done: int, ctx: Context) -> bool:
        """Whether to validate after ``done`` steps."""
        return validation_due(done, ctx.steps_per_epoch, ctx.total_steps, self.every)


def validation_due(done: int, steps_per_epoch: int, total_steps: int, every: int | None) -> bool:
    """Whether a run validates after ``done`` steps: at every epoch's end, every ``every`` steps if set, and after
    its last step."""
    return done % steps_per_epoch == 0 or done == total_steps or (every is not None and done % every == 0)


@dataclasses.dataclass(frozen=True)
class Trained:
    """What `fit` returns.

    Attributes:
      adapter: the trained adapter (stacked for stacked trainees; replicated on the mesh).
      tokens_per_second: the training tokens per second.
      diverged_at: per adapter, the step at which it diverged (None: it did not).
      validation_accuracy: the last validation's accuracy (float, or (K,)), None without `Validation`.
      best: with ``Validation.keep_best``, the adapter of the best validation accuracy, else None.
      best_step: the step it was trained to, and ``best_accuracy`` its validation accuracy.
    """

    adapter: vera_jax.Adapter
    tokens_per_second: float
    diverged_at: tuple[int | None, ...]
    validation_accuracy: float | np.ndarray | None = None
    best: vera_jax.Adapter | None = None
    best_step: int | None = None
    best_accuracy: float | None = None


def dropout_key(seed: int) -> jax.Array:
    """The key of a run's dropout (the model's and VeRA's): a stream of ``--seed``'s key that the
    projections never draw from."""
    return jax.random.fold_in(jax.random.key(seed, impl="threefry2x32"), DROPOUT_STREAM)


def step_key(key: jax.Array, step, group) -> jax.Array:
    """The dropout key of one group of rows of training step ``step`` (`train_groups`), from a `dropout_key`."""
    return jax.random.fold_in(jax.random.fold_in(key, step), group)


def group_count(optim: OptimOptions, devices: int) -> int:
    """The groups of rows a batch runs as: ``--length-groups``, lowered (with a note) to the most that split the
    batch into whole rows on every device."""
    groups = next(k for k in range(optim.length_groups, 0, -1) if optim.batch_size % (k * devices) == 0)
    if groups < optim.length_groups and jax.process_index() == 0:
        print(f"--length-groups {optim.length_groups} lowered to {groups}: a batch of {optim.batch_size} rows "
              f"over {devices} device(s) splits into at most {groups} equal groups with whole rows on each device; "
              f"the run is that of --length-groups {groups}")
    return groups


def train_groups(ctx: Context, step: int, seed: int) -> list[dict]:
    """Training step ``step``'s batch in data order ``seed`` as ``ctx.length_groups`` collated groups of rows
    (`train.engine.data.length_groups`)."""
    options = ctx.options
    indices = data_lib.batch_indices(len(ctx.train_data), seed, step, ctx.steps_per_epoch, options.optim.batch_size)
    return [data_lib.collate(ctx.train_data, group, ctx.pad_id, options.data.max_length, options.data.pad_multiple)
            for group in data_lib.length_groups(ctx.train_data, indices, ctx.length_groups)]


def _stack_groups(groups: list[dict], pad_id: int) -> dict:
    """K groups padded to one length and stacked: input_ids and attention_mask (K, rows, tokens), labels (K, rows)."""
    length = max(group["input_ids"].shape[1] for group in groups)

    def pad(array, value):
        return np.pad(array, ((0, 0), (0, length - array.shape[1])), constant_values=value)

    return {"input_ids": np.stack([pad(group["input_ids"], pad_id) for group in groups]),
            "attention_mask": np.stack([pad(group["attention_mask"], 0) for group in groups]),
            "labels": np.stack([group["labels"] for group in groups])}


def fit(ctx: Context, trainees: Trainees, adapter: vera_jax.Adapter, logits_fn: Callable, log: MetricsLog, *,
        checkpoints: RunCheckpoints | None = None, meta: dict | None = None, profile: JobProfile | None = None,
        hoist=None, validation: Validation | None = None) -> Trained:
    """Train ``adapter.trainable`` for ``ctx.total_steps`` (resuming from ``checkpoints``); ``adapter`` itself is
    left as it was.

    Args:
      trainees: one adapter or a stack (`Trainees`).
      logits_fn: the adapted model's ``logits(params, adapter, batch, rng)``.
      log: the metrics log each adapter's loss goes to.
      checkpoints, meta: the run's checkpoints and what they record (one adapter only).
      profile: counts the groups' shapes and times the checkpoints.
      hoist: the model of a merged-path ``logits_fn`` whose merge then runs once a step (`Run.hoist`, one adapter
        only) rather than once a group of rows (`train.engine.steps.make_merged_group_gradients`).
      validation: when and how to score the adapters on the validation rows while training.

    Raises:
      TrainingDiverged: every adapter's loss or trained state stopped being finite.
    """
    options, profile = ctx.options, profile or JobProfile()
    keep_best = validation is not None and validation.keep_best
    if trainees.stacked and (hoist is not None or checkpoints is not None or keep_best):
        raise ValueError("Stacked adapters train without a hoisted merge, checkpoints or a kept best adapter.")
    replicated, batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
    tx = steps.make_optimizer(options.optim, ctx.total_steps)
    init = jax.vmap(tx.init) if trainees.stacked else tx.init
    adapter = mesh_lib.place(adapter, replicated)  # its own buffers: the step donates them
    state = {"trainable": adapter.trainable, "opt_state": init(adapter.trainable)}
    if keep_best:
        state["best"] = to_host(adapter.trainable)  # its own buffers: the step donates the trainable ones
    state = mesh_lib.place(state, replicated)
    start, best_step, best_accuracy, last_validation = 0, None, -math.inf, None
    if checkpoints is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = checkpoints.restore(abstract, meta)
        if restored is not None:
            start, state, restored_meta = restored
            if keep_best and restored_meta.get("best"):
                best_step, best_accuracy = restored_meta["best"]["step"], restored_meta["best"]["validation_accuracy"]
            log = MetricsLog(log.path, start, enabled=log.enabled)  # drops records past an older step resumed
            print(f"[{trainees.names[0]}] resumed from the checkpoint at step {start}")
    best = state.get("best")

    base_shardings = jax.tree.map(lambda x: x.sharding, ctx.params)
    if hoist is None:  # the groups differentiate the adapter's trainable tree
        gradients, prepare = steps.make_group_gradients(logits_fn, options.data.task), lambda adapter, params: adapter
    else:  # the groups differentiate the merged leaves, merged once a step
        gradients = steps.make_merged_group_gradients(hoist, options.data.task)
        prepare = jax.jit(lambda adapter, params: steps.merged_leaves(params, adapter),
                          in_shardings=(replicated, base_shardings))
    group_tokens = options.optim.batch_size // ctx.length_groups * options.data.max_length
    gradients = trainees.per_adapter(gradients, (0, None, None if trainees.one_order else 0, 0), group_tokens)
    keys = trainees.dropout_keys(options.run.seed)

    def group_fn(inputs, params, group, step, index):
        return gradients(inputs, params, group, trainees.step_keys(keys, step, index))

    group_fn = jax.jit(group_fn, in_shardings=(None, base_shardings, batch_sharding, None, None),
                       out_shardings=replicated)
    apply_fn = jax.jit(trainees.per_adapter(steps.make_apply_gradients(tx, hoisted=hoist is not None),
                                            (0, 0, 0, None), group_tokens),
                       in_shardings=(replicated, replicated, replicated, base_shardings), out_shardings=replicated,
                       donate_argnums=(0, 1))
    adapter, opt_state = adapter.replace(trainable=state["trainable"]), state["opt_state"]
    diverged: list[int | None] = [None] * len(trainees.names)
    tokens, validating, started = 0, 0.0, time.perf_counter()
    progress = tqdm(total=ctx.total_steps, initial=start, desc=", ".join(trainees.names)[:60],
                    disable=jax.process_index() != 0)
    for step in range(start, ctx.total_steps):
        groups = trainees.train_groups(ctx, step)
        for group in groups:
            mask = group["attention_mask"]
            tokens += int(mask.sum())
            profile.ran(mask.reshape(-1, mask.shape[-1]))
        inputs = prepare(adapter, ctx.params)
        parts = tuple(group_fn(inputs, ctx.params, mesh_lib.global_batch(group, batch_sharding), np.uint32(step),
                               np.uint32(i)) for i, group in enumerate(groups))
        adapter, opt_state, loss = apply_fn(adapter, opt_state, parts, ctx.params)
        done = step + 1
        if done % options.run.log_every == 0 or done == ctx.total_steps:
            losses = np.atleast_1d(np.asarray(loss, np.float64))
            for k, (name, value) in enumerate(zip(trainees.names, losses)):
                if math.isfinite(value):
                    log.write(run=name, step=done, epoch=step // ctx.steps_per_epoch, loss=float(value))
                elif diverged[k] is None:
                    diverged[k] = done
            if None not in diverged:
                raise _diverged(options, done, f"the training loss is {losses[-1]}", checkpoints, diverged)
            finite = losses[np.isfinite(losses)]
            progress.set_postfix(loss=f"{float(np.mean(finite)):.4f}")
        if validation is not None and validation.due(done, ctx):
            validating -= time.perf_counter()
            with profile.phase("validation"):
                last_validation, losses = validation.score(adapter)
            validating += time.perf_counter()
            for name, accuracy, value in zip(trainees.names, np.atleast_1d(last_validation), np.atleast_1d(losses)):
                if math.isfinite(value):  # a diverged adapter of a stack has no validation
                    log.write(run=name, step=done, epoch=(done - 1) // ctx.steps_per_epoch,
                              validation_accuracy=float(accuracy), validation_loss=float(value))
            if keep_best and float(last_validation) > best_accuracy:
                best_step, best_accuracy = done, float(last_validation)
                best = mesh_lib.place(to_host(adapter.trainable), replicated)  # a copy: the step donates the adapter
        if checkpoints is not None and (done % options.run.checkpoint_every == 0 or done == ctx.total_steps):
            state = {"trainable": adapter.trainable, "opt_state": opt_state} | ({"best": best} if keep_best else {})
            if not _all_finite(state):
                raise _diverged(options, done, "the trained state is not finite", checkpoints, (done,))
            epoch, position = divmod(done, ctx.steps_per_epoch)
            kept = {"best": {"step": best_step, "validation_accuracy": best_accuracy}} if best_step else {}
            with profile.phase("checkpoints"):
                checkpoints.save(done, state, {**meta, "step": done, "epoch": epoch, "batch_in_epoch": position,
                                               **kept})
        progress.update(1)
    progress.close()
    for k, finite in enumerate(trainees.finite(adapter.trainable)):
        if not finite and diverged[k] is None:
            diverged[k] = ctx.total_steps
    if None not in diverged:
        raise _diverged(options, ctx.total_steps, "the trained state is not finite", checkpoints, diverged)
    seconds = time.perf_counter() - started - validating
    kept = {} if best_step is None else {"best": adapter.replace(trainable=best), "best_step": best_step,
                                         "best_accuracy": best_accuracy}
    return Trained(adapter, tokens / seconds if tokens else 0.0, tuple(diverged), last_validation, **kept)


def _all_finite(tree) -> bool:
    """Whether every entry of a (replicated) tree is finite: one host copy of an adapter-sized tree."""
    return all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(to_host(tree)))


def learning_rate_flags(options: Options) -> str:
    """The flags of the learning rates in use, for an error that asks to lower them."""
    optim = options.optim
    return f"--lr-vectors {optim.lr_vectors:g}" + (f", --lr-head {optim.lr_head:g}" if options.model.head else "")


def _diverged(options: Options, step: int, what: str, checkpoints: RunCheckpoints | None,
              diverged_at) -> TrainingDiverged:
    kept = checkpoints.latest_step() if checkpoints is not None else None
    return TrainingDiverged(f"Training stopped at step {step}: {what}. Lower the learning rate "
                            f"({learning_rate_flags(options)}) and train "
                            "in a new --output-dir" + (f"; the last checkpoint here, step {kept}, is finite."
                                                       if kept is not None else "."), tuple(diverged_at))
