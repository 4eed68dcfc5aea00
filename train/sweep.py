"""``python -m train sweep``: K adapters on a grid of d_initial x seed, trained in one vmapped program.

Every adapter shares the frozen base and one A/B (VeRA's point); each has its own initial lambda_d,
its own data order and head initialisation (its seed), and its own optimizer state. One ``jax.vmap``-ed
step trains all K; one vmapped evaluation scores them on the same held-out split. Takes every flag of
``python -m train`` (model, data, r, learning rates, ...) plus the grid; single-device, no checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import vera_jax
from train import data as data_lib
from train import steps
from train.runner import RunError, output_dir
from train.metrics import MetricsLog, write_json
from train.model import load_classifier
from train.options import Options, parse_options
from vera_jax import checkpoint as adapter_checkpoint

__all__ = ["parse_args", "sweep"]


def parse_args(argv) -> tuple[Options, list[float], list[int]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--d-initials", type=float, nargs="+", default=[1e-7, 0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    grid, rest = parser.parse_known_args(argv)
    return parse_options(rest), grid.d_initials, grid.seeds


def _stack_batches(batches: list[dict], pad_id: int) -> dict:
    """K batches padded to one length and stacked: input_ids (K, B, L), attention_mask (K, B, L), labels (K, B)."""
    length = max(b["input_ids"].shape[1] for b in batches)
    pad = lambda a, value: np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=value)  # noqa: E731
    return {"input_ids": np.stack([pad(b["input_ids"], pad_id) for b in batches]),
            "attention_mask": np.stack([pad(b["attention_mask"], 0) for b in batches]),
            "labels": np.stack([b["labels"] for b in batches])}


def _head_for_seed(trainable: dict, seed: int) -> dict:
    """Re-draw the leaves trained in full (the head) for this seed: N(0, 0.02) kernels, zero biases."""
    flat = vera_jax.paths.flatten(trainable)
    keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
    for path, leaf in flat.items():
        if path.rsplit("/", 1)[-1] not in (vera_jax.LAMBDA_D, vera_jax.LAMBDA_B):
            flat[path] = (0.02 * jax.random.normal(next(keys), leaf.shape, leaf.dtype) if path.endswith("kernel")
                          else jnp.zeros_like(leaf))
    return vera_jax.paths.unflatten(flat)


def sweep(options: Options, d_initials: list[float], seeds: list[int]) -> dict:
    started = time.perf_counter()
    out = output_dir(options.output_dir)
    grid = list(itertools.product(d_initials, seeds))
    train_split, test_split = data_lib.load_splits(options)
    num_labels = data_lib.check_labels(train_split, test_split, options)
    model, tokenizer = load_classifier(options.model, num_labels)
    params = model.params
    configs = [vera_jax.VeraConfig(r=options.r, target_modules=options.targets, trainable=options.head,
                                   d_initial=d, projection_seed=options.seed) for d, _ in grid]
    label_dtype = np.float32 if options.task == "regression" else np.int32
    train_data = data_lib.tokenize(train_split, tokenizer, options.max_length, label_dtype)
    test_data = data_lib.tokenize(test_split, tokenizer, options.max_length, label_dtype)
    steps_per_epoch = len(train_data) // options.batch_size
    if steps_per_epoch == 0:
        raise RunError(f"The training split has {len(train_data)} rows, fewer than one batch of {options.batch_size}.")
    total_steps = min(steps_per_epoch * options.epochs, options.max_steps or steps_per_epoch * options.epochs)

    projections = vera_jax.init_projections(params, vera_jax.projection_key(configs[0]), configs[0])
    stacked = vera_jax.stack([_head_for_seed(vera_jax.init_trainable(params, c), seed)
                              for c, (_, seed) in zip(configs, grid)])
    tx = steps.make_optimizer(options, total_steps)
    logits_fn = steps.vera_logits(model, options.strategy)
    train_step = jax.vmap(steps.make_train_step(logits_fn, tx, options.task), in_axes=(0, 0, None, None, 0, 0))
    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    opt_state = jax.vmap(tx.init)(stacked)
    pad_id = tokenizer.pad_token_id or 0
    log = MetricsLog(out / "metrics.jsonl", 0)
    progress = tqdm(range(total_steps), desc=f"sweep of {len(grid)}")
    for step in progress:
        epoch, position = divmod(step, steps_per_epoch)
        batches = []
        for _, seed in grid:
            order = data_lib.epoch_order(len(train_data), seed, epoch)
            indices = order[position * options.batch_size:(position + 1) * options.batch_size]
            batches.append(data_lib.collate(train_data, indices, pad_id, options.max_length))
        rngs = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(jnp.asarray([s for _, s in grid]))
        stacked, opt_state, losses = train_step(stacked, opt_state, params, projections,
                                                _stack_batches(batches, pad_id), rngs)
        if (step + 1) % options.log_every == 0 or step + 1 == total_steps:
            for (d, seed), loss in zip(grid, np.asarray(losses)):
                log.write(run=f"d={d:g} seed={seed}", step=step + 1, loss=float(loss))
            progress.set_postfix(loss=f"{float(np.mean(losses)):.4f}")

    evaluate = jax.jit(jax.vmap(steps.make_eval_step(logits_fn, options.task), in_axes=(0, None, None, None)))
    correct = np.zeros(len(grid))
    for start in range(0, len(test_data), options.eval_batch_size):
        indices = np.arange(start, min(start + options.eval_batch_size, len(test_data)))
        batch = data_lib.collate(test_data, indices, pad_id, options.max_length)
        batch["weights"] = np.ones(len(indices), np.float32)
        correct += np.asarray(evaluate(stacked, params, projections, batch)[0])
    accuracy = correct / len(test_data)
    rows = [{"d_initial": d, "seed": seed, "test_accuracy": float(a)} for (d, seed), a in zip(grid, accuracy)]
    for row in rows:
        log.write(run=f"d={row['d_initial']:g} seed={row['seed']}", step=total_steps, test_accuracy=row["test_accuracy"])
    by_d = {d: [r["test_accuracy"] for r in rows if r["d_initial"] == d] for d in d_initials}
    summary = {"grid": rows, "mean_accuracy_by_d_initial": {f"{d:g}": float(np.mean(v)) for d, v in by_d.items()},
               "adapters": len(grid), "steps": total_steps, "wall_seconds": time.perf_counter() - started,
               "options": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}}
    for (d, seed), config, adapter in zip(grid, configs, vera_jax.unstack(stacked)):
        adapter_checkpoint.save(out / "adapters" / f"d{d:g}-seed{seed}", adapter,
                                dataclasses.replace(projections, config=config), vera_jax.projection_key(config))
    write_json(out / "sweep.json", summary)
    _plot(rows, log.records(), out / "sweep.png")
    print(f"{'d_initial':>10} {'seed':>5} {'test accuracy':>14}")
    for row in rows:
        print(f"{row['d_initial']:>10g} {row['seed']:>5d} {row['test_accuracy']:>14.4f}")
    for d, mean in summary["mean_accuracy_by_d_initial"].items():
        print(f"d_initial={d}: mean accuracy {mean:.4f} over {len(seeds)} seeds")
    return summary


def _plot(rows: list[dict], records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for run in sorted({r["run"] for r in records if "loss" in r}):
        points = [r for r in records if r["run"] == run and "loss" in r]
        left.plot([r["step"] for r in points], [r["loss"] for r in points], label=run, alpha=0.8)
    left.set(xlabel="step", ylabel="training loss", title="training loss per adapter")
    left.legend(fontsize=7)
    d_values = sorted({r["d_initial"] for r in rows})
    for i, d in enumerate(d_values):
        accuracies = [r["test_accuracy"] for r in rows if r["d_initial"] == d]
        right.scatter([i] * len(accuracies), accuracies)
        right.bar(i, np.mean(accuracies), alpha=0.3)
    right.set_xticks(range(len(d_values)), [f"{d:g}" for d in d_values])
    right.set(xlabel="d_initial", ylabel="held-out accuracy", title="accuracy by d_initial (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
