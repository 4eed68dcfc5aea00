"""The main job: fine-tune a Hugging Face Flax sequence classifier with VeRA, sharded and resumable.

Order of work: check every input (output directory, mesh, data, labels, model, targets) before any
compute; then place the frozen base (FSDP by path rules) and the replicated small trees on the mesh;
restore the latest checkpoint if the run directory has one; train with one jitted, donated step;
evaluate; write the adapter, metrics, plot and summary.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import vera_jax
from train import data as data_lib
from train import mesh as mesh_lib
from train import steps
from train.checkpoints import RunCheckpoints
from train.metrics import MetricsLog, directory_bytes, plot_curves, write_json
from train.model import load_classifier
from train.options import RESUME_KEYS, Options
from vera_jax import checkpoint as adapter_checkpoint
from vera_jax import peft as vera_peft

__all__ = ["run", "RunError"]

HUB_IDS = {"default": "sentence-transformers/all-MiniLM-L6-v2"}  # what the packaged default model is
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


def _init_distributed(options: Options) -> None:
    if options.coordinator:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(options.coordinator, options.num_processes, options.process_id)


def _output_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):  # one per process: no races
            pass
    except OSError as err:
        raise RunError(f"Cannot write to --output-dir {out}: {err.strerror}. Choose a writable directory.") from None
    return out


def _place(tree, sharding):
    """Host values -> global arrays with ``sharding`` (one sharding, or a tree of them)."""
    shardings = sharding if isinstance(sharding, dict) else jax.tree.map(lambda _: sharding, tree)

    def put(x, s):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def _global_batch(batch: dict, sharding) -> dict:
    """Every process holds the global batch (cheap for text) and supplies its own contiguous rows."""
    count, index = jax.process_count(), jax.process_index()
    return {k: jax.make_array_from_process_local_data(sharding, np.split(v, count)[index], v.shape)
            for k, v in batch.items()}


def _train_batch(ctx: Context, step: int) -> dict:
    epoch, position = divmod(step, ctx.steps_per_epoch)
    order = data_lib.epoch_order(len(ctx.train_data), ctx.options.seed, epoch)
    indices = order[position * ctx.options.batch_size:(position + 1) * ctx.options.batch_size]
    return data_lib.collate(ctx.train_data, indices, ctx.pad_id, ctx.options.max_length)


def _recipe_meta(ctx: Context, key: jax.Array) -> dict:
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ctx.options).items()
               if k in RESUME_KEYS}
    return {"options": options, "projection": adapter_checkpoint.projection_recipe(ctx.projections, key)}


def fit(ctx: Context, name: str, trainable, logits_fn, log: MetricsLog, checkpoints: RunCheckpoints | None,
        meta: dict | None):
    """Train ``trainable`` for ``ctx.total_steps`` (resuming from ``checkpoints``); returns it and the tokens/s."""
    options = ctx.options
    replicated, batch_sharding = mesh_lib.replicated(ctx.mesh), mesh_lib.batch_sharding(ctx.mesh)
    tx = steps.make_optimizer(options, ctx.total_steps)
    state = _place({"trainable": trainable, "opt_state": tx.init(trainable)}, replicated)
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
        batch = _train_batch(ctx, step)
        tokens += int(batch["attention_mask"].sum())
        trainable, opt_state, loss = step_fn(trainable, opt_state, ctx.params, ctx.projections,
                                             _global_batch(batch, batch_sharding), np.uint32(step))
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
        c, l, w = eval_fn(trainable, ctx.params, ctx.projections, _global_batch(batch, batch_sharding))
        correct, loss, count = correct + float(c), loss + float(l), count + float(w)
    return correct / count, loss / count


def run(options: Options) -> dict:
    """Run the job described by ``options`` and return the summary it also writes to summary.json."""
    started = time.perf_counter()
    _init_distributed(options)
    out = _output_dir(options.output_dir)
    if options.strategy not in STRATEGIES:
        raise RunError(f"--strategy must be one of {STRATEGIES}, got {options.strategy!r}.")
    mesh = mesh_lib.make_mesh(options.mesh, options.batch_size)
    train_split, test_split = data_lib.load_splits(options)
    num_labels = data_lib.check_labels(train_split, test_split, options)
    model, tokenizer = load_classifier(options.model, num_labels)
    params = model.params
    try:
        config = vera_jax.VeraConfig(r=options.r, target_modules=options.targets, trainable=options.head,
                                     d_initial=options.d_initial, dropout=options.dropout,
                                     projection_seed=options.seed)
        trainable = vera_jax.init_trainable(params, config)  # checks the targets and the head against the model
    except (TypeError, ValueError) as err:
        raise RunError(f"VeRA settings do not fit {options.model!r}: {err}") from None
    label_dtype = np.float32 if options.task == "regression" else np.int32
    train_data = data_lib.tokenize(train_split, tokenizer, options.max_length, label_dtype)
    test_data = data_lib.tokenize(test_split, tokenizer, options.max_length, label_dtype)
    steps_per_epoch = len(train_data) // options.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"The training split has {len(train_data)} rows, fewer than one batch of "
                       f"{options.batch_size}; lower --batch-size.")
    total_steps = steps_per_epoch * options.epochs
    if options.max_steps is not None:
        total_steps = min(total_steps, options.max_steps)

    key = vera_jax.projection_key(config)
    projections = vera_jax.init_projections(params, key, config)
    replicated = mesh_lib.replicated(mesh)
    ctx = Context(options, mesh, _place(params, mesh_lib.base_shardings(params, mesh)), _place(projections, replicated),
                  train_data, test_data, tokenizer.pad_token_id or 0, steps_per_epoch, total_steps,
                  jax.random.fold_in(key, DROPOUT_STREAM))
    primary = jax.process_index() == 0
    if primary:
        print(vera_jax.parameter_report(params, config))
    checkpoints = RunCheckpoints(out / "checkpoints", options.keep_checkpoints)
    resume_step = checkpoints.latest_step() or 0
    log = MetricsLog(out / "metrics.jsonl", resume_step, enabled=primary)
    strategy = options.strategy
    if strategy == "auto":
        strategy = vera_jax.plan_paths(params, config, tokens=options.batch_size * options.max_length)
        if primary:
            print(strategy.summary())
    logits_fn = steps.vera_logits(model, strategy)
    trainable, tokens_per_second = fit(ctx, "vera", trainable, logits_fn, log, checkpoints, _recipe_meta(ctx, key))
    checkpoints.close()
    accuracy, test_loss = evaluate(ctx, trainable, logits_fn)
    log.write(run="vera", step=total_steps, test_accuracy=accuracy, test_loss=test_loss)
    adapter_dir = adapter_checkpoint.save(out / "adapter", trainable, ctx.projections, key)
    if primary:  # the same adapter in the format peft.PeftModel.from_pretrained reads
        host_trainable = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), trainable)
        vera_peft.save_adapter(out / "peft_adapter", config, host_trainable, projections, params=params,
                               task_type="SEQ_CLS", base_model_name_or_path=HUB_IDS.get(options.model, options.model))

    summary = {
        "model": options.model, "dataset": options.dataset, "task": options.task, "strategy": options.strategy,
        "strategy_detail": strategy.summary() if isinstance(strategy, vera_jax.PathPlan) else strategy,
        "mesh": dict(mesh.shape), "steps": total_steps, "train_examples": len(train_data),
        "test_examples": len(test_data), "test_accuracy": accuracy, "test_loss": test_loss,
        "trainable_params": vera_jax.count_parameters(params, config)[0],
        "all_params": vera_jax.count_parameters(params, config)[1],
        "adapter_bytes": directory_bytes(adapter_dir), "tokens_per_second": tokens_per_second,
    }
    if options.baseline:
        head = {path: leaf for path, leaf in vera_jax.paths.flatten(vera_jax.init_trainable(params, config)).items()
                if path.rsplit("/", 1)[-1] not in (vera_jax.LAMBDA_D, vera_jax.LAMBDA_B)}
        head_fn = steps.head_only_logits(model)
        head_trained, _ = fit(ctx, "head-only", vera_jax.paths.unflatten(head), head_fn, log, None, None)
        summary["baseline_accuracy"], _ = evaluate(ctx, head_trained, head_fn)
        log.write(run="head-only", step=total_steps, test_accuracy=summary["baseline_accuracy"])
    summary["wall_seconds"] = time.perf_counter() - started
    if primary:
        write_json(out / "summary.json", summary)
        plot_curves(log.records(), out / "curves.png")
        _print_report(summary, vera_jax.parameter_report(params, config), out)
    return summary


def _print_report(summary: dict, parameters: str, out: Path) -> None:
    baseline = summary.get("baseline_accuracy")
    lines = [
        f"test accuracy        {summary['test_accuracy']:.4f}"
        + (f"   (head-only baseline {baseline:.4f})" if baseline is not None else ""),
        parameters,
        f"adapter on disk      {summary['adapter_bytes']:,d} bytes ({out / 'adapter'})",
        f"wall time            {summary['wall_seconds']:.1f} s",
        f"training throughput  {summary['tokens_per_second']:,.0f} tokens/s",
        f"run directory        {out}",
    ]
    print("\n".join(lines))
