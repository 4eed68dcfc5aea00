"""``python -m train sweep``: K adapters on a grid of d_initial x seed, trained in one vmapped program.

Every adapter shares the frozen base and one A/B (VeRA's point); each has its own initial lambda_d,
its own data order and head initialisation (its seed), and its own optimizer state. One compiled step
trains all K, vmapped ``--adapters-per-pass`` at a time (`vera_jax.map_adapters`); one such evaluation
scores them on the same held-out split. Takes every flag of
``python -m train`` (model, data, r, learning rates, ...) plus the grid; single-device, no checkpoints.

The paper's ablations are grid axes too (``--projection-inits``, ``--projection-sharings``,
``--train-vectors``, each taking several values): each combination of them is a variant with its own
projections or trainable-tree structure, trained as its own vmapped program over d_initial x seed.
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
from train import classify
from train import data as data_lib
from train import steps
from train.metrics import MetricsLog, write_json
from train.options import Options, parse_options
from train.runner import RunError, count_steps, output_dir
from vera_jax import checkpoint as adapter_checkpoint

__all__ = ["parse_args", "sweep", "Grid"]

# VeraConfig fields a sweep can vary, and the flag that lists each one's values.
ABLATIONS = {"projection_init": "--projection-inits", "projection_sharing": "--projection-sharings",
             "train_vectors": "--train-vectors"}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The sweep: every combination of an ablation variant, a d_initial and a seed is one adapter.

    Adapters of one variant (same projections, same trainable-tree structure) train in one vmapped
    program; variants run one after another.
    """

    d_initials: tuple[float, ...]
    seeds: tuple[int, ...]
    variants: tuple[tuple[str, str, str], ...]  # (projection_init, projection_sharing, train_vectors)
    frozen_b: float = 1.0  # the value lambda_b is held at in variants that train lambda_d only
    adapters_per_pass: int | None = None  # adapters vmapped together; None: `vera_jax.adapters_per_pass` picks


def parse_args(argv) -> tuple[Options, Grid]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--d-initials", type=float, nargs="+", default=[1e-7, 0.1, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    for name, flag in ABLATIONS.items():
        parser.add_argument(flag, dest=name + "_values", nargs="+", default=None, metavar=name.upper())
    parser.add_argument("--frozen-b", type=float, default=1.0)
    parser.add_argument("--adapters-per-pass", type=int, default=None)
    grid, rest = parser.parse_known_args(argv)
    options = parse_options(rest)
    if grid.adapters_per_pass is not None and grid.adapters_per_pass < 1:
        raise RunError(f"--adapters-per-pass must be at least 1, got {grid.adapters_per_pass}.")
    choices = [getattr(grid, name + "_values") or [getattr(options, name)] for name in ABLATIONS]
    return options, Grid(tuple(grid.d_initials), tuple(grid.seeds), tuple(itertools.product(*choices)), grid.frozen_b,
                         grid.adapters_per_pass)


def _variant_label(variant: tuple[str, str, str]) -> str:
    """The settings that differ from VeRA's defaults, e.g. 'kaiming_normal+lambda_b'; '' for plain VeRA."""
    defaults = {field.name: field.default for field in dataclasses.fields(vera_jax.VeraConfig)}
    return "+".join(value for value, name in zip(variant, ABLATIONS) if value != defaults[name])


def _setting_name(variant: tuple[str, str, str], d_initial: float) -> str:
    """One point of the grid but for the seed, e.g. 'kaiming_normal d=0.1'."""
    return f"{_variant_label(variant) or 'vera'} d={d_initial:g}"


def _run_name(variant: tuple[str, str, str], d_initial: float, seed: int) -> str:
    return f"{_setting_name(variant, d_initial)} seed={seed}"


def _adapter_name(variant: tuple[str, str, str], d_initial: float, seed: int) -> str:
    label = _variant_label(variant)
    return f"{label + '-' if label else ''}d{d_initial:g}-seed{seed}"


def _config(options: Options, grid: Grid, variant: tuple[str, str, str], d_initial: float) -> vera_jax.VeraConfig:
    projection_init, projection_sharing, train_vectors = variant
    try:
        return vera_jax.VeraConfig(
            r=options.r, target_modules=options.targets, trainable=options.head, d_initial=d_initial,
            b_initial=grid.frozen_b if train_vectors == "lambda_d" else options.b_initial,
            projection_seed=options.seed, projection_init=projection_init, projection_sharing=projection_sharing,
            train_vectors=train_vectors)
    except ValueError as err:
        raise RunError(f"Sweep variant {variant} with d_initial={d_initial:g}: {err}") from None


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
        if path.rsplit("/", 1)[-1] not in vera_jax.layers.VECTOR_NAMES:
            flat[path] = (0.02 * jax.random.normal(next(keys), leaf.shape, leaf.dtype) if path.endswith("kernel")
                          else jnp.zeros_like(leaf))
    return vera_jax.paths.unflatten(flat)


def _per_pass(grid: Grid, batch_size: int, options: Options) -> int | None:
    return grid.adapters_per_pass or vera_jax.adapters_per_pass(batch_size * options.max_length)


def _train_variant(job: classify.Prepared, options: Options, grid: Grid, configs: list[vera_jax.VeraConfig],
                   seeds: list[int], names: list[str], log: MetricsLog, steps_per_epoch: int,
                   total_steps: int) -> tuple[dict, vera_jax.Projections, np.ndarray]:
    """Train one adapter per (config, seed) of one variant in one compiled program; returns them stacked,
    their shared projections, and their held-out accuracies (K,)."""
    params, pad_id = job.model.params, job.pad_id
    projections = vera_jax.init_projections(params, vera_jax.projection_key(configs[0]), configs[0])
    stacked = vera_jax.stack([_head_for_seed(vera_jax.init_trainable(params, c), seed)
                              for c, seed in zip(configs, seeds)])
    tx = steps.make_optimizer(options, total_steps)
    logits_fn = steps.vera_logits(job.model, options.strategy)
    train_step = vera_jax.map_adapters(steps.make_train_step(logits_fn, tx, options.task), (0, 0, None, None, 0, 0),
                                       _per_pass(grid, options.batch_size, options))
    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    opt_state = jax.vmap(tx.init)(stacked)
    progress = tqdm(range(total_steps), desc=f"{len(configs)} adapters, {names[0].rsplit(' d=', 1)[0]}")
    for step in progress:
        batches = [data_lib.collate(job.train_data,
                                    data_lib.batch_indices(len(job.train_data), seed, step, steps_per_epoch,
                                                           options.batch_size), pad_id, options.max_length)
                   for seed in seeds]
        rngs = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(jnp.asarray(seeds))
        stacked, opt_state, losses = train_step(stacked, opt_state, params, projections,
                                                _stack_batches(batches, pad_id), rngs)
        if (step + 1) % options.log_every == 0 or step + 1 == total_steps:
            for name, loss in zip(names, np.asarray(losses)):
                log.write(run=name, step=step + 1, loss=float(loss))
            progress.set_postfix(loss=f"{float(np.mean(losses)):.4f}")

    evaluate = jax.jit(vera_jax.map_adapters(steps.make_eval_step(logits_fn, options.task), (0, None, None, None),
                                             _per_pass(grid, options.eval_batch_size, options)))
    correct = np.zeros(len(configs))
    for start in range(0, len(job.test_data), options.eval_batch_size):
        indices = np.arange(start, min(start + options.eval_batch_size, len(job.test_data)))
        batch = data_lib.collate(job.test_data, indices, pad_id, options.max_length)
        batch["weights"] = np.ones(len(indices), np.float32)
        correct += np.asarray(evaluate(stacked, params, projections, batch)[0])
    return stacked, projections, correct / len(job.test_data)


def sweep(options: Options, grid: Grid) -> dict:
    started = time.perf_counter()
    out = output_dir(options.output_dir)
    job = classify.prepare(options)
    steps_per_epoch, total_steps = count_steps(options, len(job.train_data))
    log = MetricsLog(out / "metrics.jsonl", 0)
    points = list(itertools.product(grid.d_initials, grid.seeds))
    # Every variant's configs are built (and so checked) before any training starts.
    configs = {variant: [_config(options, grid, variant, d) for d, _ in points] for variant in grid.variants}
    rows = []
    for variant in grid.variants:
        names = [_run_name(variant, d, seed) for d, seed in points]
        stacked, projections, accuracy = _train_variant(job, options, grid, configs[variant], [s for _, s in points],
                                                        names, log, steps_per_epoch, total_steps)
        trainable_params = vera_jax.count_parameters(job.model.params, configs[variant][0])[0]
        for (d, seed), config, adapter, acc, name in zip(points, configs[variant], vera_jax.unstack(stacked),
                                                         accuracy, names):
            rows.append({**dict(zip(ABLATIONS, variant)), "d_initial": d, "seed": seed, "test_accuracy": float(acc),
                         "trainable_params": trainable_params})
            log.write(run=name, step=total_steps, test_accuracy=float(acc))
            adapter_checkpoint.save(out / "adapters" / _adapter_name(variant, d, seed), adapter,
                                    dataclasses.replace(projections, config=config), vera_jax.projection_key(config))
    groups = {}
    for row in rows:
        groups.setdefault(_setting_name(tuple(row[a] for a in ABLATIONS), row["d_initial"]), []).append(
            row["test_accuracy"])
    summary = {"grid": rows, "mean_accuracy": {label: float(np.mean(v)) for label, v in groups.items()},
               "mean_accuracy_by_d_initial": {f"{d:g}": float(np.mean([r["test_accuracy"] for r in rows
                                                                      if r["d_initial"] == d]))
                                              for d in grid.d_initials},
               "adapters": len(rows), "steps": total_steps, "wall_seconds": time.perf_counter() - started,
               "options": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(options).items()}}
    write_json(out / "sweep.json", summary)
    _plot(summary["mean_accuracy"], groups, log.records(), out / "sweep.png")
    header = [*ABLATIONS, "d_initial", "seed", "trainable", "test accuracy"]
    print("  ".join(f"{h:>18}" for h in header))
    for row in rows:
        print("  ".join(f"{v:>18}" for v in (*(row[a] for a in ABLATIONS), f"{row['d_initial']:g}", row["seed"],
                                              f"{row['trainable_params']:,d}", f"{row['test_accuracy']:.4f}")))
    for label, mean in summary["mean_accuracy"].items():
        print(f"{label}: mean accuracy {mean:.4f} over {len(grid.seeds)} seeds")
    return summary


def _plot(means: dict[str, float], groups: dict[str, list[float]], records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in sorted({r["run"] for r in records if "loss" in r}):
        points = [r for r in records if r["run"] == run and "loss" in r]
        left.plot([r["step"] for r in points], [r["loss"] for r in points], label=run, alpha=0.8)
    left.set(xlabel="step", ylabel="training loss", title="training loss per adapter")
    left.legend(fontsize=6)
    for i, (label, accuracies) in enumerate(groups.items()):
        right.scatter([i] * len(accuracies), accuracies)
        right.bar(i, means[label], alpha=0.3)
    right.set_xticks(range(len(groups)), list(groups), rotation=30, ha="right", fontsize=7)
    right.set(ylabel="held-out accuracy", title="accuracy per setting (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
