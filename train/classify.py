"""The main job: fine-tune a Hugging Face Flax sequence classifier with VeRA, sharded and resumable.

Order of work: check every input (output directory, mesh, data, labels, model, targets) before any
compute; then place the frozen base (FSDP by path rules) and the replicated small trees on the mesh;
restore the latest checkpoint if the run directory has one; train with one jitted, donated step;
evaluate; write the adapter, metrics, plot and summary.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

import vera_jax
from train import data as data_lib
from train import mesh as mesh_lib
from train import steps
from train.checkpoints import RunCheckpoints
from train.metrics import MetricsLog, directory_bytes
from train.model import load_classifier
from train.options import Options
from train.runner import (RunError, count_steps, evaluate, fit, init_distributed, make_context, output_dir, publish,
                          recipe_meta, resolve_strategy, save_adapters, vera_setup)

__all__ = ["run", "prepare", "Prepared", "RunError"]


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A classification job's model and tokenised splits, checked against each other."""

    model: object  # a Hugging Face Flax sequence classifier
    train_data: data_lib.TextData
    test_data: data_lib.TextData
    pad_id: int


def prepare(options: Options) -> Prepared:
    """Load and check the splits and labels, load the classifier with the head they need, tokenise both splits."""
    train_split, test_split = data_lib.load_splits(options)
    num_labels = data_lib.check_labels(train_split, test_split, options)
    model, tokenizer = load_classifier(options.model, num_labels)
    label_dtype = np.float32 if options.task == "regression" else np.int32
    train_data = data_lib.tokenize(train_split, tokenizer, options.max_length, label_dtype)
    test_data = data_lib.tokenize(test_split, tokenizer, options.max_length, label_dtype)
    count_steps(options, len(train_data))  # a split smaller than one batch fails here, before any compute
    return Prepared(model, train_data, test_data, tokenizer.pad_token_id or 0)


def run(options: Options) -> dict:
    """Run the job described by ``options`` and return the summary it also writes to summary.json."""
    started = time.perf_counter()
    init_distributed(options)
    out = output_dir(options.output_dir)
    mesh = mesh_lib.make_mesh(options.mesh, options.batch_size)
    job = prepare(options)
    model, train_data, test_data = job.model, job.train_data, job.test_data
    params = model.params
    config, trainable = vera_setup(options, params, model.config.model_type)
    key = vera_jax.projection_key(config)
    projections = vera_jax.init_projections(params, key, config)
    strategy = resolve_strategy(options, model, config, projections)
    ctx = make_context(options, mesh, params, projections, key, train_data, test_data, job.pad_id)
    primary = jax.process_index() == 0
    if primary:
        print(vera_jax.parameter_report(params, config))
    checkpoints = RunCheckpoints(out / "checkpoints", options.keep_checkpoints)
    resume_step = checkpoints.latest_step() or 0
    log = MetricsLog(out / "metrics.jsonl", resume_step, enabled=primary)
    logits_fn = steps.vera_logits(model, strategy)
    trainable, tokens_per_second = fit(ctx, "vera", trainable, logits_fn, log, checkpoints, recipe_meta(ctx, key))
    checkpoints.close()
    accuracy, test_loss = evaluate(ctx, trainable, logits_fn)
    log.write(run="vera", step=ctx.total_steps, test_accuracy=accuracy, test_loss=test_loss)
    adapter_dir = save_adapters(out, ctx, config, trainable, key, params, projections, "SEQ_CLS")

    summary = {
        "model": options.model, "dataset": options.dataset, "task": options.task, "strategy": options.strategy,
        "strategy_detail": strategy.summary() if isinstance(strategy, vera_jax.PathPlan) else strategy,
        "mesh": dict(mesh.shape), "steps": ctx.total_steps, "train_examples": len(train_data),
        "test_examples": len(test_data), "test_accuracy": accuracy, "test_loss": test_loss,
        "trainable_params": vera_jax.count_parameters(params, config)[0],
        "all_params": vera_jax.count_parameters(params, config)[1],
        "adapter_bytes": directory_bytes(adapter_dir), "tokens_per_second": tokens_per_second,
    }
    if options.baseline:
        head = vera_jax.vectors.extra_leaves(vera_jax.init_trainable(params, config))
        head_fn = steps.head_only_logits(model)
        head_trained, _ = fit(ctx, "head-only", vera_jax.paths.unflatten(head), head_fn, log, None, None)
        summary["baseline_accuracy"], _ = evaluate(ctx, head_trained, head_fn)
        log.write(run="head-only", step=ctx.total_steps, test_accuracy=summary["baseline_accuracy"])
    summary["wall_seconds"] = time.perf_counter() - started
    publish(out, summary, log, _report(summary, vera_jax.parameter_report(params, config), out))
    return summary


def _report(summary: dict, parameters: str, out: Path) -> str:
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
    return "\n".join(lines)
