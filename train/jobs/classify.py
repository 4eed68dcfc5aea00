"""The main job: fine-tune a Hugging Face sequence classifier with VeRA (our NNX encoder by default, or
transformers' linen class), sharded and resumable.

Order of work: check every flag (before anything loads), then the output directory, mesh, data,
labels, model and targets (`train.engine.run.start`) before any compute; place the frozen base (FSDP by
path rules) and the replicated small trees on the mesh; restore the latest checkpoint if the run
directory has one; train with one jitted, donated step, validating after every epoch (and every
--eval-every steps) on the validation rows; test the last adapter (or with --keep-best the best validated)
once on the test rows; write it, the metrics, plot and summary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import vera_jax
from train.engine import data as data_lib
from train.engine import steps
from train.engine.profile import JobProfile
from train.engine.errors import RunError
from train.engine.evaluation import Evaluator, evaluate
from train.engine.loop import Trainees, Validation, fit
from train.engine.metrics import directory_bytes, validations
from train.engine.run import Prepared, check_targets, count_steps, locked_run, publish, save_adapters, start
from train.models.load import check_positions, check_source, classifier_shapes, load_classifier
from train.options import CLASSIFY, Options, add_options, from_args

__all__ = ["run", "prepare", "add_arguments", "command", "RunError"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CLASSIFY)


def command(args: argparse.Namespace) -> None:
    run(from_args(args))


def prepare(options: Options, choosing: str | None = None) -> Prepared:
    """Load and check the splits and labels, check --max-length against the model's config, load the classifier
    with the head they need, tokenise the splits.

    ``choosing``: the flag that picks an adapter by its validation accuracy (default: --keep-best when given); the
    run then needs validation rows. A head the checkpoint lacks is drawn from ``--seed`` (transformers' own
    initialisation).
    """
    check_source(options.model.name)
    splits = data_lib.load_splits(options.data, options.optim.batch_size)
    choosing = choosing or ("--keep-best" if options.run.keep_best else None)
    if choosing and splits.validation is None:
        raise data_lib.DataError(f"{choosing} picks the adapter by its validation accuracy, but the run has no "
                                 f"validation rows: drop {choosing}, or give --validation-fraction or "
                                 "--validation-files.")
    num_labels = data_lib.check_labels(splits, options.data)
    check_positions(options)
    backend = options.model.backend
    check_targets(options, *classifier_shapes(options.model.name, num_labels, backend))
    model, tokenizer = load_classifier(options.model.name, num_labels, seed=options.run.seed, backend=backend,
                                       scan_remat=options.model.scan_remat)
    label_dtype = np.float32 if options.data.task == "regression" else np.int32
    train_data, test_data = (data_lib.tokenize(split, tokenizer, options.data.max_length, label_dtype)
                             for split in (splits.train, splits.test))
    validation_data = None if splits.validation is None else data_lib.tokenize(
        splits.validation, tokenizer, options.data.max_length, label_dtype)
    count_steps(options.optim, len(train_data))  # a split smaller than one batch fails here, before any compute
    return Prepared(model, tokenizer, train_data, test_data, tokenizer.pad_token_id or 0, splits.test,
                    validation_data)


@locked_run
def run(options: Options) -> dict:
    """Run the job described by ``options`` and return the summary it also writes to summary.json."""
    started = time.perf_counter()
    with JobProfile().watching() as profile:
        with profile.phase("loading"):
            setup = start(options, prepare)
        params, ctx = setup.params, setup.ctx
        logits_fn = setup.logits()
        scorer = Evaluator(ctx, logits_fn)
        validation = None if ctx.validation_data is None else Validation(
            lambda adapter: scorer(adapter, ctx.validation_data), options.run.eval_every, options.run.keep_best)
        with profile.phase("training"):
            trained = fit(ctx, Trainees(("vera",)), setup.adapter, logits_fn, setup.log,
                          checkpoints=setup.checkpoints, meta=setup.meta(), profile=profile, hoist=setup.hoist,
                          validation=validation)
            setup.checkpoints.close()
        kept = trained.best if options.run.keep_best else trained.adapter
        kept_step = trained.best_step if options.run.keep_best else setup.total_steps
        with profile.phase("evaluation"):
            accuracy, test_loss = scorer(kept, ctx.test_data)
        setup.log.write(run="vera", step=kept_step, test_accuracy=accuracy, test_loss=test_loss)
        with profile.phase("saving"):
            adapter_dir = save_adapters(setup, kept, "SEQ_CLS")

    trainable_params, all_params = vera_jax.count_parameters(params, setup.adapter)
    summary = {
        "model": options.model.name, "backend": options.model.backend, "dataset": options.data.dataset,
        "scan_remat": getattr(setup.job.model, "scan_remat", None), "task": options.data.task,
        "path": options.model.path,
        "path_detail": setup.path_detail, "mesh": dict(setup.ctx.mesh.shape), "steps": setup.total_steps,
        "train_examples": len(setup.job.train_data), "test_examples": len(setup.job.test_data),
        "validation_examples": len(ctx.validation_data) if ctx.validation_data is not None else 0,
        "test_accuracy": accuracy, "test_loss": test_loss, "adapter_step": kept_step,
        "validation_accuracy": trained.best_accuracy if options.run.keep_best else
        None if trained.validation_accuracy is None else float(trained.validation_accuracy),
        "validations": validations(setup.log.records()) if setup.primary else [],
        "trainable_params": trainable_params,
        "all_params": all_params, "adapter_bytes": directory_bytes(adapter_dir),
        "tokens_per_second": trained.tokens_per_second, "profile": profile.summary(),
    }
    if options.run.baseline:
        head = setup.adapter.replace(trainable=vera_jax.paths.unflatten(vera_jax.vectors.full_leaves(
            setup.adapter.trainable)))
        head_fn = steps.head_only_logits(setup.model)
        head_trained = fit(setup.ctx, Trainees(("head-only",)), head, head_fn, setup.log).adapter
        summary["baseline_accuracy"], _ = evaluate(setup.ctx, head_trained, head_fn)
        setup.log.write(run="head-only", step=setup.total_steps, test_accuracy=summary["baseline_accuracy"])
    summary["wall_seconds"] = time.perf_counter() - started
    report = _report(summary, vera_jax.parameter_report(params, setup.adapter), setup.out)
    publish(setup.out, summary, setup.log, report)
    return summary


def _report(summary: dict, parameters: str, out: Path) -> str:
    baseline, validation = summary.get("baseline_accuracy"), summary["validation_accuracy"]
    lines = [
        f"test accuracy        {summary['test_accuracy']:.4f}"
        + (f"   (head-only baseline {baseline:.4f})" if baseline is not None else ""),
        *([f"validation accuracy  {validation:.4f} (step {summary['adapter_step']} of {summary['steps']}; every "
           "validation in summary.json's validations)"] if validation is not None else []),
        parameters,
        f"adapter on disk      {summary['adapter_bytes']:,d} bytes ({out / 'adapter'})",
        f"wall time            {summary['wall_seconds']:.1f} s ({_phases(summary['profile'])})",
        f"training throughput  {summary['tokens_per_second']:,.0f} tokens/s",
        f"run directory        {out}",
    ]
    return "\n".join(lines)


def _phases(profile: dict) -> str:
    """'loading 6.1 s, training 290.2 s, ...; compiling 14.0 s of them'."""
    compiling = sum(entry["seconds"] for functions in profile["compiles"].values() for entry in functions.values())
    return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in profile["seconds"].items()) + \
        f"; compiling {compiling:.1f} s of them"
