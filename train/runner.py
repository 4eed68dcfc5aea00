"""What every training job shares: the run context on the mesh, the resumable training loop, evaluation.

A job (classification in `train.classify`, causal LM in `train.causal_lm`) checks its inputs, builds a
`Context` (frozen base FSDP-placed by path rules, small trees replicated, tokenised splits) and calls
`fit` and `evaluate`; the loss and metrics follow ``options.task`` (`train.steps`).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

import vera_jax
from train import data as data_lib
from train import mesh as mesh_lib
from train import steps
from train.checkpoints import RunCheckpoints
from train.metrics import MetricsLog, plot_curves, write_json
from train.options import RESUME_KEYS, Options
from train.model import hub_id
from vera_jax import checkpoint as adapter_checkpoint
from vera_jax import peft as vera_peft

__all__ = ["Context", "RunError", "init_distributed", "output_dir", "place", "global_batch", "train_batch",
           "recipe_meta", "fit", "evaluate", "make_context", "count_steps", "vera_setup",
           "resolve_strategy", "save_adapters", "publish", "DROPOUT_STREAM", "STRATEGIES"]

STRATEGIES = (*vera_jax.activation.PATHS, "auto")
DROPOUT_STREAM = 2**31  # fold_in offset for the dropout key: disjoint from the projection stream's blocks


class RunError(ValueError):
    """A run cannot start as configured; the message names the setting to change."""


@dataclasses.dataclass
class Context:
    """Everything the training loop reads, placed on the mesh."""

    options: Options
    mesh: jax.sharding.Mesh
    params: dict
    projections: vera_jax.Projections
    train_data: data_lib.TextData
    test_data: data_lib.TextData
    pad_id: int
    steps_per_epoch: int
    total_steps: int
    dropout_key: jax.Array


def make_context(options: Options, mesh: jax.sharding.Mesh, params: dict, projections: vera_jax.Projections,
                 key: jax.Array, train_data: data_lib.TextData, test_data: data_lib.TextData,
                 pad_id: int) -> Context:
    """Count the steps (an error when the split is smaller than one batch) and place everything on ``mesh``."""
    steps_per_epoch, total_steps = count_steps(options, len(train_data))
    return Context(options, mesh, place(params, mesh_lib.base_shardings(params, mesh)),
                   place(projections, mesh_lib.replicated(mesh)), train_data, test_data, pad_id, steps_per_epoch,
                   total_steps, jax.random.fold_in(key, DROPOUT_STREAM))


def count_steps(options: Options, train_rows: int) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; a RunError when the split is smaller than one batch."""
    steps_per_epoch = train_rows // options.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"The training split has {train_rows} rows, fewer than one batch of "
                       f"{options.batch_size}; lower --batch-size.")
    total_steps = steps_per_epoch * options.epochs
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)
    return steps_per_epoch, total_steps


def vera_setup(options: Options, params: dict, model_type: str) -> tuple[vera_jax.VeraConfig, dict]:
    """The adapter's config and its initial trainable tree; settings that do not fit the model are a RunError.

    GPT-2's ``FlaxConv1D`` stores kernels (out, in); every other family here uses Dense (in, out).
    """
    try:
        config = vera_jax.VeraConfig(r=options.r, target_modules=options.targets, trainable=options.head,
                                     d_initial=options.d_initial, b_initial=options.b_initial, dropout=options.dropout,
                                     projection_seed=options.seed, projection_init=options.projection_init,
                                     projection_sharing=options.projection_sharing,
                                     train_vectors=options.train_vectors,
                                     kernel_layout="out_in" if model_type == "gpt2" else "in_out")
        return config, vera_jax.init_trainable(params, config)  # checks the targets and the head against the model
    except (TypeError, ValueError) as err:
        raise RunError(f"VeRA settings do not fit {options.model!r}: {err}") from None


def resolve_strategy(options: Options, model, config: vera_jax.VeraConfig,
                     projections: vera_jax.Projections) -> str | vera_jax.PathPlan:
    """``--strategy``, with 'auto' the path whose whole training step runs faster here (timed, and printed).

    `vera_jax.whole_step_plan` times the model's gradient step on each path for a batch of this shape.
    Process 0 measures and every process takes its numbers, so that all of them compile one program.
    """
    if options.strategy not in STRATEGIES:
        raise RunError(f"--strategy must be one of {STRATEGIES}, got {options.strategy!r}.")
    if options.strategy != "auto":
        return options.strategy
    primary = jax.process_index() == 0
    tokens = options.batch_size * options.max_length
    if primary:
        ids = np.ones((options.batch_size, options.max_length), np.int32)
        plan = vera_jax.whole_step_plan(lambda p, x: model(x, params=p).logits, model.params,
                                        vera_jax.init_trainable(model.params, config), projections, ids, tokens=tokens)
    if jax.process_count() > 1:
        totals = np.array(plan.totals if primary else (0.0, 0.0), np.float32)
        merged, activation = map(float, multihost_utils.broadcast_one_to_all(totals))
        plan = vera_jax.PathPlan.from_whole_steps(model.params, config, merged, activation, tokens)
    if primary:
        print(plan.summary())
    return plan


def save_adapters(out: Path, ctx: Context, config: vera_jax.VeraConfig, trainable, key: jax.Array, params: dict,
                  projections: vera_jax.Projections, task_type: str) -> Path:
    """``out/adapter`` (Orbax, every process) and ``out/peft_adapter`` (PEFT format, process 0, when PEFT can
    hold the adapter: one shared pair); returns the first."""
    adapter_dir = adapter_checkpoint.save(out / "adapter", trainable, ctx.projections, key)
    if jax.process_index() == 0 and config.projection_sharing == "shared":
        host_trainable = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), trainable)
        vera_peft.save_adapter(out / "peft_adapter", config, host_trainable, projections, params=params,
                               task_type=task_type, base_model_name_or_path=hub_id(ctx.options.model))
    return adapter_dir


def publish(out: Path, summary: dict, log: MetricsLog, report: str) -> None:
    """On process 0: ``summary.json``, ``curves.png`` from the metrics, and the report on stdout."""
    if jax.process_index() == 0:
        write_json(out / "summary.json", summary)
        plot_curves(log.records(), out / "curves.png")
        print(report)


def init_distributed(options: Options) -> None:
    if options.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id)


def output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):  # one per process: no races
            pass
    except OSError as err:
        raise RunError(f"Cannot write to --output-dir {out}: {err.strerror}. Choose a writable directory.") from None
    return out


def place(tree, sharding):
    """Host values -> global arrays with ``sharding`` (one sharding, or a tree of them)."""
    shardings = sharding if isinstance(sharding, dict) else jax.tree.map(lambda _: sharding, tree)

    def put(x, s):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def global_batch(batch: dict, sharding) -> dict:
    """Every process holds the global batch (cheap for text) and supplies its own contiguous rows."""
    count, index = jax.process_count(), jax.process_index()
    return {k: jax.make_array_from_process_local_data(sharding, np.split(v, count)[index], v.shape)
            for k, v in batch.items()}


def train_batch(ctx: Context, step: int) -> dict:
    indices = data_lib.batch_indices(len(ctx.train_data), ctx.options.seed, step, ctx.steps_per_epoch,
                                     ctx.options.batch_size)
    return data_lib.collate(ctx.train_data, indices, ctx.pad_id, ctx.options.max_length)


def recipe_meta(ctx: Context, key: jax.Array) -> dict:
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ctx.options).items()
               if k in RESUME_KEYS}
    return {"options": options, "projection": adapter_checkpoint.projection_recipe(ctx.projections, key)}


def fit(ctx: Context, name: str, trainable, logits_fn, log: MetricsLog, checkpoints: RunCheckpoints | None,
        meta: dict | None):
    """Train ``trainable`` for ``ctx.total_steps`` (resuming from ``checkpoints``); returns it and the tokens/s."""
    options = ctx.options
    replicated, batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
    tx = steps.make_optimizer(options, ctx.total_steps)
    state = place({"trainable": trainable, "opt_state": tx.init(trainable)}, replicated)
    start = 0
    if checkpoints is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = checkpoints.restore(abstract, meta)
        if restored is not None:
            start, state, _ = restored
            print(f"[{name}] resumed from the checkpoint at step {start}")

    base_shardings = jax.tree.map(lambda x: x.sharding, ctx.params)
    train_step = steps.make_train_step(logits_fn, tx, options.task)

    def step_fn(trainable, opt_state, params, projections, batch, step):
        return train_step(trainable, opt_state, params, projections, batch, jax.random.fold_in(ctx.dropout_key, step))

    step_fn = jax.jit(step_fn, in_shardings=(replicated, replicated, base_shardings, replicated, batch_sharding, None),
                      out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
    trainable, opt_state = state["trainable"], state["opt_state"]
    tokens, started = 0, time.perf_counter()
    progress = tqdm(total=ctx.total_steps, initial=start, desc=name, disable=jax.process_index() != 0)
    for step in range(start, ctx.total_steps):
        batch = train_batch(ctx, step)
        tokens += int(batch["attention_mask"].sum())
        trainable, opt_state, loss = step_fn(trainable, opt_state, ctx.params, ctx.projections,
                                             global_batch(batch, batch_sharding), np.uint32(step))
        done = step + 1
        if done % options.log_every == 0 or done == ctx.total_steps:
            loss = float(loss)
            log.write(run=name, step=done, epoch=step // ctx.steps_per_epoch, loss=loss)
            progress.set_postfix(loss=f"{loss:.4f}")
        if checkpoints is not None and (done % options.checkpoint_every == 0 or done == ctx.total_steps):
            epoch, position = divmod(done, ctx.steps_per_epoch)
            checkpoints.save(done, {"trainable": trainable, "opt_state": opt_state},
                             {**meta, "step": done, "epoch": epoch, "batch_in_epoch": position})
        progress.update(1)
    progress.close()
    seconds = time.perf_counter() - started
    return trainable, (tokens / seconds if tokens else 0.0)


def evaluate(ctx: Context, trainable, logits_fn) -> tuple[float, float]:
    """(accuracy, mean loss) on the held-out split; the last batch is padded with zero-weight rows."""
    devices = ctx.mesh.size
    size = -(-ctx.options.eval_batch_size // devices) * devices
    replicated, batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
    eval_fn = jax.jit(steps.make_eval_step(logits_fn, ctx.options.task),
                      in_shardings=(replicated, jax.tree.map(lambda x: x.sharding, ctx.params), replicated,
                                    batch_sharding))
    correct = loss = count = 0.0
    n = len(ctx.test_data)
    for start in range(0, n, size):
        indices = np.arange(start, start + size)
        weights = (indices < n).astype(np.float32)
        batch = data_lib.collate(ctx.test_data, np.minimum(indices, n - 1), ctx.pad_id, ctx.options.max_length)
        batch["weights"] = weights
        sums = eval_fn(trainable, ctx.params, ctx.projections, global_batch(batch, batch_sharding))
        correct, loss, count = (total + float(part) for total, part in zip((correct, loss, count), sums))
    return correct / count, loss / count
